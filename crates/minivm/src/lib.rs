//! minivm: a reference KVM VMM for livemig.
//!
//! - [`Vm`]: guest memory in one or more KVM slots (exposed to livemig as
//!   [`livemig::memory::VmMemory`]), 1..N vCPU threads, pause/resume,
//!   throttle, memory dump;
//! - [`guest`]: the built-in ring-3 test guest (self-checking page writer)
//!   and foreign images (boot sector, flat binary);
//! - [`dirty`]: KVM dirty trackers (bitmap, manual protect, ring) behind
//!   livemig's `DirtyTracker`;
//! - [`state`]: vCPU and device state as a versioned blob;
//! - [`sys`]: the raw ioctls and mappings kvm-ioctls lacks and its `unsafe`
//!   calls: all the `unsafe` of the crate (denied everywhere else).
//!
//! Source side of a migration: `Vm::new`, `vm.memory()`, `vm.tracker(kind)`,
//! `vm.control()` (livemig `VmControl`). Destination: `Vm::new` with
//! `GuestImage::Incoming` and `start_paused`, load RAM into `vm.memory()`,
//! `vm.restore_state(blob)`, `vm.resume()`.
#![warn(missing_docs)]

mod activity;
pub mod bench;
pub mod collapse;
pub mod control;
pub mod defaults;
pub mod devices;
pub mod dirty;
pub mod dirtylimit;
pub mod guest;
pub mod migrate;
pub mod snapshot;
pub mod state;
#[allow(unsafe_code)]
pub mod sys;
pub mod vm;

pub use devices::{ClockPage, SerialOut};
pub use dirty::TrackerKind;
pub use guest::{CpuMode, GuestImage, TestGuestConfig};
pub use vm::{GuestStatus, SlotInfo, VcpuStatus, Vm, VmConfig, VmError, VmHandle};

/// Whether KVM can be used here: `Err` says why not in a sentence a user
/// can act on (no device, no permission, ...).
pub fn kvm_usable() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "no /dev/kvm on this machine: KVM needs a host with virtualization enabled and the kvm module loaded"
                .to_string(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(
            "cannot open /dev/kvm: permission denied (run as a member of the kvm group, or as root)".to_string(),
        ),
        Err(e) => Err(format!("cannot open /dev/kvm: {e}")),
    }
}
