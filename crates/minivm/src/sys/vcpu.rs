//! vCPU calls that need `unsafe`: asking a running vCPU to leave KVM_RUN,
//! naming the current thread for signals, and KVM_SET_XSAVE.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use kvm_bindings::{kvm_run, kvm_xsave};
use kvm_ioctls::VcpuFd;

/// A second mapping of a vCPU's `kvm_run` page, through which another
/// thread sets `immediate_exit`. It is mapped from the vCPU fd and owned
/// here (unmapped on drop), so it stays valid whatever happens to the
/// `VcpuFd` and its own mapping.
#[derive(Debug)]
pub struct ExitRequest {
    run: NonNull<kvm_run>,
    len: usize,
}

// SAFETY: the mapping is owned by this value; the only access is a
// volatile byte store to `immediate_exit`, which KVM reads on entry.
unsafe impl Send for ExitRequest {}
// SAFETY: as above; concurrent byte stores of the same field are benign
// for the kernel, which only reads it.
unsafe impl Sync for ExitRequest {}

impl ExitRequest {
    /// Maps the `kvm_run` page (offset 0) of `vcpu`.
    pub fn map(vcpu: &VcpuFd) -> io::Result<Self> {
        let len = std::mem::size_of::<kvm_run>().next_multiple_of(4096);
        // SAFETY: a new shared mapping of the vCPU fd at offset 0, where
        // KVM exposes `kvm_run`; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let run = NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(ExitRequest { run, len })
    }

    /// Sets `kvm_run.immediate_exit` to `v`: nonzero makes the next (or a
    /// signal-interrupted) KVM_RUN return at once.
    pub fn set(&self, v: u8) {
        // SAFETY: `run` is our live mapping of the vCPU's kvm_run; a
        // volatile byte store is what the kernel reads on KVM_RUN entry.
        unsafe {
            std::ptr::write_volatile(
                std::ptr::addr_of_mut!((*self.run.as_ptr()).immediate_exit),
                v,
            )
        }
    }
}

impl Drop for ExitRequest {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; nothing else uses it.
        unsafe {
            libc::munmap(self.run.as_ptr().cast(), self.len);
        }
    }
}

/// The calling thread's pthread id (for [`super::kick_thread`]).
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions and cannot fail.
    unsafe { libc::pthread_self() }
}

/// KVM_SET_XSAVE with a legacy 4 KiB `kvm_xsave`.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: kvm-ioctls marks this unsafe because, once a process has
    // enabled dynamic XSTATE features (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM,
    // e.g. AMX), KVM may read past 4096 bytes. minivm never asks for them,
    // so KVM reads exactly the `kvm_xsave` we pass (and validates it).
    unsafe { vcpu.set_xsave(xsave) }
}
