//! File descriptors over a Unix stream socket (`SCM_RIGHTS`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// Control buffer large enough for `n` descriptors, aligned for `cmsghdr`.
fn cmsg_buffer(n: usize) -> Vec<u64> {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let bytes = unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as libc::c_uint) } as usize;
    vec![0u64; bytes.div_ceil(size_of::<u64>())]
}

/// Sends `data` with `fds` attached (to its first byte). Returns the bytes
/// sent, which may be fewer than `data.len()` (a stream socket): the
/// caller sends the rest with plain writes. At most [`MAX_FDS`]
/// descriptors.
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors, more than {MAX_FDS} in one message",
                fds.len()
            ),
        ));
    }
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte of data to travel with",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = cmsg_buffer(fds.len());
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size; it fits the buffer
        // `cmsg_buffer` sized with the same formula.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE((fds.len() * size_of::<RawFd>()) as libc::c_uint) } as _;
        // SAFETY: `msg` points at `control`, large enough for one header
        // and `fds.len()` descriptors (CMSG_SPACE above), so CMSG_FIRSTHDR
        // is non-null and the header and CMSG_DATA lie inside the buffer;
        // the descriptors are copied as plain integers (unaligned writes).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as libc::c_uint) as _;
            let p = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                p.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` refers to `iov` (over `data`, read-only for the
        // kernel) and `control`, both alive over the call; the socket is
        // open (borrowed). MSG_NOSIGNAL: a closed peer is an error, not a
        // signal.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What [`recv_with_fds`] got.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer (0: the peer closed).
    pub len: usize,
    /// Descriptors that came with them, close-on-exec, owned.
    pub fds: Vec<OwnedFd>,
    /// The peer sent more descriptors than `max_fds`: the kernel closed
    /// the rest (MSG_CTRUNC).
    pub truncated: bool,
}

/// Reads into `buf` once, taking up to `max_fds` (at most [`MAX_FDS`])
/// descriptors sent with those bytes.
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = cmsg_buffer(max_fds.max(1));
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = (control.len() * size_of::<u64>()) as _;
    let n = loop {
        // SAFETY: `msg` refers to `iov` (over `buf`, writable) and
        // `control`, both alive and exclusively ours over the call; the
        // socket is open (borrowed). MSG_CMSG_CLOEXEC: received
        // descriptors are close-on-exec from the start.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg` (msg_controllen says how much of
    // `control`); CMSG_FIRSTHDR/CMSG_NXTHDR walk only within it, and each
    // header's cmsg_len bounds the descriptors read from CMSG_DATA
    // (unaligned reads of plain integers). Every SCM_RIGHTS descriptor is
    // a new open descriptor of this process that nothing else owns: each
    // becomes an OwnedFd exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as usize - c as usize;
                let n = ((*c).cmsg_len as usize).saturating_sub(data) / size_of::<RawFd>();
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..n {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // The control buffer is rounded up, so a few more than `max_fds` may
    // fit: those count as too many too (and are closed here).
    let mut truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if fds.len() > max_fds {
        fds.truncate(max_fds);
        truncated = true;
    }
    Ok(Received {
        len: n,
        fds,
        truncated,
    })
}

/// Waits (within the socket's read timeout) until a byte can be read,
/// without taking it or its descriptors: `Ok(0)` means the peer closed
/// without sending anything.
pub fn peek(sock: &UnixStream) -> io::Result<usize> {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: reads at most one byte into `b`, alive over the call;
        // MSG_PEEK leaves the data (and any descriptors) queued.
        let n = unsafe { libc::recv(sock.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f1 = tempfile::tempfile().unwrap();
        f1.write_all(b"one").unwrap();
        let f2 = tempfile::tempfile().unwrap();
        let n = send_with_fds(&a, b"hello", &[f1.as_fd(), f2.as_fd()]).unwrap();
        assert_eq!(n, 5);
        assert_eq!(peek(&b).unwrap(), 1);
        let mut buf = [0u8; 16];
        let r = recv_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 2);
        assert!(!r.truncated);
        let mut got = std::fs::File::from(r.fds.into_iter().next().unwrap());
        got.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "one", "the same open file");
    }

    #[test]
    fn too_many_descriptors_are_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        send_with_fds(&a, b"x", &[f.as_fd(), f.as_fd(), f.as_fd()]).unwrap();
        let mut buf = [0u8; 1];
        let r = recv_with_fds(&b, &mut buf, 1).unwrap();
        assert!(r.truncated);
        assert!(r.fds.len() <= 1);
        // Plain bytes: no descriptors, not truncated; a closed peer: 0.
        (&a).write_all(b"y").unwrap();
        let r = recv_with_fds(&b, &mut buf, 1).unwrap();
        assert_eq!((r.len, r.fds.len(), r.truncated), (1, 0, false));
        drop(a);
        assert_eq!(peek(&b).unwrap(), 0);
        assert_eq!(recv_with_fds(&b, &mut buf, 1).unwrap().len, 0);
    }
}
