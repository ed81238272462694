//! KVM memory slots over rust-vmm guest memory.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors registering guest memory as a KVM memory slot.
#[derive(Debug, thiserror::Error)]
pub enum MemslotError {
    /// no guest memory region starts at guest address {0:#x}
    #[error("no guest memory region starts at guest address {0:#x}")]
    NoRegion(u64),
    /// KVM_SET_USER_MEMORY_REGION failed
    #[error("KVM_SET_USER_MEMORY_REGION failed")]
    Kvm(#[source] kvm_ioctls::Error),
}

/// Registers (or re-registers, to change dirty logging) the region of
/// `memory` that starts at `gpa` as KVM slot `slot` of `vm`.
///
/// `memory` must be the guest memory that stays with `vm` for the VM's
/// life: minivm keeps both in its `Shared`, the VM fd and vCPU fds are
/// dropped before the memory, and vCPU threads are joined before either.
pub(crate) fn set_memory_slot(
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    slot: u32,
    gpa: GuestAddress,
    log_dirty: bool,
) -> Result<(), MemslotError> {
    let region = memory
        .iter()
        .find(|r| r.start_addr() == gpa)
        .ok_or(MemslotError::NoRegion(gpa.0))?;
    let arg = kvm_userspace_memory_region {
        slot,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: gpa.0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the host range is a whole region of `memory`, mapped
    // read/write; the caller keeps `memory` mapped for as long as the VM
    // (its fd and vCPU fds) exists, as documented above.
    unsafe { vm.set_user_memory_region(arg) }.map_err(MemslotError::Kvm)
}
