//! memfd: guest memory in an anonymous shared-memory file, so that another
//! process can map the same pages (zero-copy local migration hands the
//! descriptor over a Unix socket).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// The seals a memfd carries when livemig made it: the file can never
/// shrink, so no process mapping it can be killed by SIGBUS because
/// another one truncated it.
pub const SEALS: libc::c_int = libc::F_SEAL_SHRINK;

/// Creates a memfd named `name` (a label in /proc, for humans) of `len`
/// bytes, close-on-exec, sealed against shrinking ([`SEALS`]).
pub fn create(name: &str, len: u64) -> io::Result<File> {
    create_with_seals(name, len, SEALS)
}

/// As [`create`], with `seals` (0: none, sealing still allowed later).
pub fn create_with_seals(name: &str, len: u64, seals: libc::c_int) -> io::Result<File> {
    let cname = CString::new(name.replace('\0', "_"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the
    // call; the flags are plain bits. The result is checked.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open and owned by
    // nothing else: the File takes sole ownership and closes it on drop.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    if seals != 0 {
        add_seals(&file, seals)?;
    }
    Ok(file)
}

/// Adds `seals` (F_SEAL_* bits) to a memfd.
pub fn add_seals(file: &File, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor `file` keeps open over the call, with
    // an integer argument; no memory is passed.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of `file` (F_SEAL_* bits). Fails (EINVAL) for a file that
/// is not a memfd or other shared-memory file: only those carry seals.
pub fn seals(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a descriptor `file` keeps open over the call; no
    // memory is passed.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_is_sized_and_sealed() {
        let f = create("livemig-test", 1 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        let s = seals(&f).unwrap();
        assert_ne!(s & libc::F_SEAL_SHRINK, 0, "seals {s:#x}");
        // Shrinking is refused; growing is not sealed.
        assert!(f.set_len(4096).is_err());
        f.set_len(2 << 20).unwrap();
        // A plain file has no seals.
        let t = tempfile::tempfile().unwrap();
        assert!(seals(&t).is_err());
    }
}
