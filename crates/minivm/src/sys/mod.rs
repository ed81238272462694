//! Raw access to POD KVM structures, the vCPU kick signal and memory
//! advice. All `unsafe` of the crate that is not a kvm-ioctls call lives
//! here (the dirty-log ioctls and the dirty ring are livemig's).

use std::io;

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
