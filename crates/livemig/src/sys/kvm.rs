//! The KVM ioctls and mappings kvm-ioctls 0.25 lacks (CLEAR_DIRTY_LOG,
//! RESET_DIRTY_RINGS, the per-vCPU dirty-ring mapping), and memory-slot
//! registration over a [`RawRegion`].

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_userspace_memory_region, KVMIO, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use super::mmap::RawRegion;

mod nr {
    //! Request numbers kvm-ioctls does not define.
    #![allow(missing_docs)]
    use super::*;
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// A dirty-ring entry the kernel has filled and userspace not yet harvested.
const GFN_F_DIRTY: u32 = 1;
/// Userspace has harvested the entry; the next RESET_DIRTY_RINGS recycles it.
const GFN_F_RESET: u32 = 2;

/// KVM_SET_USER_MEMORY_REGION for `slot` at guest address `gpa` over all of
/// `region`, with or without dirty logging.
///
/// Callers (the KVM dirty log) keep a clone of `region` for as long as the
/// slot is registered and delete the slot ([`delete_slot`]) before letting
/// it go, so KVM never maps memory that was unmapped.
pub(crate) fn set_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    region: &RawRegion,
    log_dirty: bool,
) -> io::Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: gpa,
        memory_size: region.len() as u64,
        userspace_addr: region.host_addr(),
    };
    // SAFETY: `region` is mapped read/write for as long as its owner lives;
    // the caller holds a clone of it while the slot is registered (see the
    // function's doc) and deletes the slot before dropping it.
    unsafe { vm.set_user_memory_region(r) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Deletes `slot` (KVM_SET_USER_MEMORY_REGION with size 0).
pub(crate) fn delete_slot(vm: &VmFd, slot: u32, gpa: u64) -> io::Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a zero-sized region deletes the slot; no memory is mapped.
    unsafe { vm.set_user_memory_region(r) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// KVM_CLEAR_DIRTY_LOG: re-protects the pages of `slot` whose bits are set in
/// `bitmap`, starting at `first_page` (a multiple of 64), covering
/// `num_pages` pages (a multiple of 64, or reaching the slot's end; at most
/// `64 * bitmap.len()`).
pub(crate) fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    let num_pages = u32::try_from(num_pages)
        .ok()
        .filter(|&n| n as usize <= bitmap.len() * 64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad clear range"))?;
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `vm` is a KVM VM fd; the kernel reads `num_pages` bits from the
    // bitmap, which is exactly `bitmap.len()` u64 words we own for the call.
    let r = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// KVM_RESET_DIRTY_RINGS: recycles harvested entries of all vCPU rings and
/// re-protects their pages. Returns how many entries were reset.
pub(crate) fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: `vm` is a KVM VM fd; the ioctl takes no argument.
    let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u32)
}

/// One vCPU's dirty ring, mapped from its fd, unmapped on drop.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    ptr: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at (free-running, taken modulo `entries`).
    fetch: u32,
}

// SAFETY: the mapping is shared memory owned by this value; entries are
// accessed with atomic loads/stores of their flags, as the kernel expects.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `entries` entries (a power of two) of vCPU `vcpu`.
    pub(crate) fn map(vcpu: &impl AsRawFd, entries: u32) -> io::Result<Self> {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * 4096;
        // SAFETY: mapping a vCPU fd's dirty-ring area at the documented
        // offset; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(DirtyRing {
            ptr,
            entries,
            fetch: 0,
        })
    }

    /// Entries the ring holds.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// Harvests every published entry in order: calls `f(slot, page)` and
    /// marks the entry for reset. Returns how many were harvested.
    pub(crate) fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u64 {
        let mut n = 0;
        loop {
            let idx = (self.fetch % self.entries) as usize;
            // SAFETY: idx < entries, inside the mapping.
            let e = unsafe { self.ptr.as_ptr().add(idx) };
            // SAFETY: `flags` is the first u32 of the entry, suitably aligned;
            // the kernel publishes the entry with a release store of it.
            let flags = unsafe { &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                return n;
            }
            // SAFETY: the entry is published (acquire above); slot and offset
            // are plain fields the kernel no longer writes.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            f(slot, offset);
            flags.store(GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), len);
        }
    }
}
