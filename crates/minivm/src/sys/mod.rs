//! kvm-ioctls calls that are `unsafe`, the vCPU kick, and raw access to POD
//! KVM structures. All `unsafe` of the crate lives here (memory slots, the
//! dirty-log ioctls and the dirty ring are livemig's, feature `kvm`).

mod vcpu;

pub use vcpu::{current_thread, set_xsave, ExitRequest};

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

/// Takes back the advice for transparent huge pages on `len` bytes of
/// this process's memory at `addr` (MADV_NOHUGEPAGE): pages faulted in
/// after it are 4 KiB pages, until MADV_HUGEPAGE asks again.
pub fn advise_no_huge_pages(addr: u64, len: u64) -> io::Result<()> {
    // SAFETY: the caller passes a range inside a mapping it owns; the
    // advice changes how it is backed, never its contents.
    let r = unsafe {
        libc::madvise(
            addr as *mut libc::c_void,
            len as usize,
            libc::MADV_NOHUGEPAGE,
        )
    };
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

/// Asks the kernel to collapse `len` bytes of this process's anonymous
/// memory at `addr` into transparent huge pages now (MADV_COLLAPSE, Linux
/// 6.1+), synchronously: the pages are copied into a fresh huge page and
/// their contents stay the same. Fails with EINVAL on older kernels or
/// memory that cannot have huge pages, ENOMEM when no huge page is free
/// (or a page of the range is missing while a userfaultfd watches it),
/// EAGAIN on a transient conflict.
pub fn collapse_huge_pages(addr: u64, len: u64) -> io::Result<()> {
    const MADV_COLLAPSE: libc::c_int = 25;
    // SAFETY: the caller passes a range inside a private anonymous mapping
    // it owns; the advice changes how it is backed, never its contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, MADV_COLLAPSE) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's kernel thread id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// The nice value of thread `tid` of this process.
pub fn nice_of(tid: i32) -> io::Result<i32> {
    // SAFETY: getpriority only reads its arguments; it may legitimately
    // return -1, so errno (this thread's own) is cleared first and read
    // after.
    let (r, errno) = unsafe {
        *libc::__errno_location() = 0;
        let r = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (r, *libc::__errno_location())
    };
    if r == -1 && errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(r)
}

/// Sets the nice value of thread `tid` of this process (lowering it
/// below its current value needs `CAP_SYS_NICE`).
pub fn set_nice_of(tid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority only reads its arguments and changes the
    // scheduling weight of that thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's nice value (Linux: `setpriority` on the
/// thread's id affects that thread only).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    set_nice_of(current_tid(), nice)
}
