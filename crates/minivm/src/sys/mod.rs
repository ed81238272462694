//! The few KVM ioctls and mappings kvm-ioctls lacks, and raw access to POD
//! KVM structures. All `unsafe` of the crate that is not a kvm-ioctls call
//! lives here.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, KVMIO};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

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

/// KVM_CLEAR_DIRTY_LOG: re-protects the pages of `slot` whose bits are set in
/// `bitmap`, starting at `first_page` (a multiple of 64), covering
/// `64 * bitmap.len()` pages.
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    let num_pages = u32::try_from(bitmap.len() * 64)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "clear range too large"))?;
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
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: `vm` is a KVM VM fd; the ioctl takes no argument.
    let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u32)
}

/// One vCPU's dirty ring, mapped from its fd, unmapped on drop.
#[derive(Debug)]
pub struct DirtyRing {
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
    pub fn map(vcpu: &impl AsRawFd, entries: u32) -> io::Result<Self> {
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
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Harvests every published entry in order: calls `f(slot, page)` and
    /// marks the entry for reset. Returns how many were harvested.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u64 {
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

/// Plain-old-data KVM structures: any byte pattern is a valid value.
///
/// # Safety
/// Implement only for `repr(C)` types made of integers (and arrays/unions
/// of them) with no pointers and no invalid bit patterns.
pub unsafe trait Pod: Default {}

// SAFETY: all are repr(C) structs of integers from the KVM uapi.
unsafe impl Pod for kvm_bindings::kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_bindings::kvm_debugregs {}

/// The bytes of a POD value.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod: every byte is initialised plain data (KVM structs
    // have explicit padding fields) and the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// A POD value from exactly `size_of::<T>()` bytes, or `None`.
pub fn pod_from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: T is Pod, so any bytes form a valid value; lengths match.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len());
    }
    Some(v)
}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs a do-nothing handler for [`kick_signal`] (once per process):
/// its only purpose is to make KVM_RUN return EINTR.
pub fn install_kick_handler() -> io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    })
    .map_err(io::Error::from_raw_os_error)
}

/// Sends the kick signal to thread `t`.
pub fn kick_thread(t: libc::pthread_t) {
    // SAFETY: `t` is a live thread of this process (the caller keeps its
    // JoinHandle); the handler installed for the signal does nothing.
    unsafe {
        libc::pthread_kill(t, kick_signal());
    }
}

/// Writes `kvm_run.immediate_exit` of a vCPU from another thread.
///
/// # Safety
/// `run` must point to the live `kvm_run` mapping of a vCPU.
pub unsafe fn set_immediate_exit(run: *mut kvm_bindings::kvm_run, v: u8) {
    // SAFETY: caller guarantees `run` is the mapped kvm_run; a volatile byte
    // store is what the kernel reads on the next KVM_RUN entry.
    unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), v) }
}

/// Asks for transparent huge pages on `len` bytes of this process's memory
/// at `addr` (MADV_HUGEPAGE).
pub fn advise_huge_pages(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: the caller passes a range inside a private anonymous mapping
    // it owns; the advice changes how it is backed, never its contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Populates (write-faults) `len` bytes of this process's memory at `addr`
/// with MADV_POPULATE_WRITE.
pub fn populate_write(addr: u64, len: u64) -> io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    // SAFETY: the caller passes a range inside a private anonymous mapping
    // it owns; populating only allocates pages, contents stay zero.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, MADV_POPULATE_WRITE) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The termination signal (SIGTERM or SIGINT) received, 0 if none.
static TERMINATION: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn note_termination(sig: libc::c_int) {
    TERMINATION.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Catches SIGTERM and SIGINT: instead of ending the process at once,
/// they are noted for [`termination_signal`], so the VMM can shut down in
/// order (and remove its control socket).
pub fn catch_termination() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid value to fill in.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = note_termination as extern "C" fn(libc::c_int) as usize;
        // Restart interrupted system calls: other threads' I/O goes on.
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa.sa_mask` is a valid sigset_t owned here; the handler
        // only stores to an atomic, which is async-signal-safe.
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The termination signal received since [`catch_termination`], if any.
pub fn termination_signal() -> Option<i32> {
    match TERMINATION.load(std::sync::atomic::Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
