//! Dirty tracking: livemig's KVM trackers over this VM's slots, with the
//! pages minivm's devices write (vm-memory's dirty bitmap) merged in.
//! minivm has no tracker code of its own: this is the wiring any VMM does.

use livemig::dirty::{DirtyError, DirtyTracker, WithDeviceWrites};

pub use livemig::dirty::kvm::TrackerKind;

use crate::vm::Vm;

/// Manual-protect support on this host: (offered, initially-set offered).
pub fn manual_protect_support(vm: &Vm) -> (bool, bool) {
    vm.shared.dirty.manual_protect_support()
}

impl Vm {
    /// Resolves [`TrackerKind::Auto`] to what this host offers, with a reason.
    pub fn resolve_tracker(&self, kind: TrackerKind) -> (TrackerKind, &'static str) {
        self.shared.dirty.resolve(kind)
    }

    /// A dirty tracker over this VM's memory (blocks = slots, in order):
    /// livemig's KVM tracker of `kind`, plus what the VMM's devices wrote.
    pub fn tracker(&self, kind: TrackerKind) -> Result<Box<dyn DirtyTracker>, DirtyError> {
        let kvm = self.shared.dirty.tracker(kind)?;
        Ok(Box::new(WithDeviceWrites::new(
            kvm,
            self.shared.device_writes.clone(),
        )))
    }
}
