//! Shared memory between two processes: a sealed memfd mapped shared,
//! bounds-checked copies and atomic words inside it, futex wait and wake on
//! those words, and a hang-up check on the Unix socket that carries the
//! memfd (passing it uses vmm-sys-util's safe `ScmSocket`).
//!
//! The peer maps the same memory and may be buggy or hostile: nothing here
//! hands out a Rust slice into the mapping. Bytes are copied in and out
//! (a peer writing meanwhile can only make the copy a mix of old and new
//! bytes, which the caller validates afterwards), and control words are
//! accessed only as atomics.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use super::mmap::{copy_in, copy_out, in_range, map_rw, unmap};

/// Seals a shared buffer must carry before it is mapped: with them the
/// peer can neither shrink the file under our mapping (which would turn
/// our accesses into SIGBUS) nor grow it.
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Creates a memfd of `len` bytes (zero-filled), sealed against shrinking
/// and growing.
pub fn create_memfd(name: &CStr, len: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are
    // constants. The result is checked before it is used.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody
    // else; the File takes ownership and closes it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len)?;
    let seals = REQUIRED_SEALS | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with an int argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Checks that `file` is a memfd sealed against shrinking and growing
/// whose size is exactly `len`: only then may a peer's file be mapped.
pub fn check_sealed(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: F_GET_SEALS on a descriptor we own; it takes no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the shared buffer is not a sealable memfd ({})",
                io::Error::last_os_error()
            ),
        ));
    }
    if seals & REQUIRED_SEALS != REQUIRED_SEALS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the shared buffer lacks the shrink/grow seals (seals {seals:#x})"),
        ));
    }
    let size = file.metadata()?.len();
    if size != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the shared buffer is {size} bytes, its announced layout needs {len}"),
        ));
    }
    Ok(())
}

/// A shared, read-write mapping of a whole file, unmapped on drop.
#[derive(Debug)]
pub struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is memory owned by this value; it is only accessed
// through bounds-checked copies and atomics, which are safe from any thread.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps the first `len` bytes of `file` shared (writes are seen by
    /// every process mapping it). The caller checks the file's size first
    /// ([`check_sealed`]): touching a page past the file's end faults.
    pub fn map(file: &File, len: usize) -> io::Result<Self> {
        let ptr = map_rw(len, Some(file))?;
        Ok(SharedMapping { ptr, len })
    }

    fn check(&self, offset: usize, len: usize) -> bool {
        in_range(self.len, offset, len)
    }

    /// The 32-bit word at `offset` as an atomic; None unless aligned and
    /// inside the mapping.
    pub fn word(&self, offset: usize) -> Option<&AtomicU32> {
        if !offset.is_multiple_of(4) || !self.check(offset, 4) {
            return None;
        }
        // SAFETY: the word lies inside the live mapping (checked) and is
        // 4-aligned (the mapping is page-aligned, the offset checked).
        // AtomicU32 has u32's layout; every bit pattern is valid, and other
        // processes access the word only atomically or not at all (a
        // hostile peer can only change its value, which callers validate).
        // The reference cannot outlive `self`, which keeps the mapping.
        Some(unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU32>() })
    }

    /// Copies `src` into the mapping at `offset`. False if out of range.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> bool {
        // SAFETY: the mapping is live and writable and cannot overlap
        // `src`, a Rust buffer. The ownership protocol gives this process
        // the range; a peer that breaks it can only corrupt bytes it shares
        // with us anyway.
        unsafe { copy_in(self.ptr, self.len, offset, src) }
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping. False if
    /// out of range.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> bool {
        // SAFETY: the mapping is live and cannot overlap `dst`, a Rust
        // buffer. A peer writing meanwhile can only make the copy a mix of
        // old and new bytes; the caller validates what it copied, never the
        // shared bytes in place.
        unsafe { copy_out(self.ptr, self.len, offset, dst) }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the whole range `map_rw` returned; references into it
        // (`word`) borrow `self` and are gone by now.
        unsafe { unmap(self.ptr, self.len) }
    }
}

/// Sleeps until `word` is woken or no longer holds `expected`, or `timeout`
/// passes (spurious wake-ups are possible: callers re-check the word).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT (shared: no PRIVATE flag, the word lives in a
    // MAP_SHARED mapping) on a valid, aligned u32 that outlives the call,
    // with a relative timeout read from a live timespec.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Value changed, timed out, or a signal: all mean "look again".
            Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) | Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
    Ok(())
}

/// Wakes every process and thread sleeping in [`futex_wait`] on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE (shared) on a valid, aligned u32; it only reads
    // the address to find waiters.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// True when the peer of `sock` has closed its end or died (hang-up,
/// error, or end-of-file pending). Does not block and consumes nothing.
/// After the handshake the peer sends nothing more, so readable data also
/// counts as "gone": it is a protocol violation.
pub fn peer_hung_up(sock: &UnixStream) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one live pollfd we own, timeout 0 (no blocking).
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0 && p.revents != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_round_trip_and_bounds() {
        let f = create_memfd(c"t", 8192).unwrap();
        check_sealed(&f, 8192).unwrap();
        assert!(check_sealed(&f, 4096).is_err(), "size mismatch must fail");
        let m = SharedMapping::map(&f, 8192).unwrap();
        let m2 = SharedMapping::map(&f, 8192).unwrap();
        assert!(m.copy_in(4090, b"abcdef"));
        let mut b = [0u8; 6];
        assert!(m2.copy_out(4090, &mut b));
        assert_eq!(&b, b"abcdef");
        assert!(!m.copy_in(8190, b"abc"));
        assert!(!m.copy_out(usize::MAX, &mut b));
        assert!(m.word(2).is_none());
        assert!(m.word(8192).is_none());
        assert!(m.word(8188).is_some());
        // The seals hold: the file cannot shrink under the mapping.
        assert!(f.set_len(4096).is_err());
    }

    #[test]
    fn unsealed_file_is_refused() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let e = check_sealed(&f, 4096).unwrap_err();
        assert!(e.to_string().contains("memfd"), "{e}");
    }

    #[test]
    fn hang_up_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!peer_hung_up(&a).unwrap());
        drop(b);
        assert!(peer_hung_up(&a).unwrap());
    }
}
