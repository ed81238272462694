//! Byte transports for the stream: TCP, Unix socket, file, and an
//! in-memory pipe for tests. Named by URI: `tcp:HOST:PORT`,
//! `unix:PATH`, `file:PATH`, and `shm:PATH` (same host: shared memory set
//! up over a Unix socket at PATH, see [`crate::transport::shm`]).
//!
//! [`Endpoint`] is what a VMM uses: a URI plus optional TLS settings
//! ([`tls`]), with the source's connect and the destination's
//! listen/accept, so the choice of transport lives here once.

pub mod endpoint;
pub mod local;
pub mod shm;
pub mod tls;

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Duration;

pub use endpoint::{Connection, Endpoint, EndpointError, EndpointListener};

/// Transport errors, naming the URI.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI is not one of the supported forms.
    #[error("bad migration URI '{0}': expected tcp:HOST:PORT, unix:PATH, shm:PATH or file:PATH")]
    BadUri(String),
    /// Connecting, listening, accepting or opening failed.
    #[error("{op} {uri}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The URI.
        uri: String,
        /// OS error.
        source: io::Error,
    },
    /// A peer connected and closed without sending a byte (a port scan, a
    /// health check): no migration came, the listener can wait on.
    #[error("{peer} connected to {uri} and closed without sending anything")]
    EmptyConnection {
        /// Who it was.
        peer: String,
        /// The URI listened on.
        uri: String,
    },
    /// Setting up the shared-memory transport failed.
    #[error("{op} {uri}: {source}")]
    Shm {
        /// What was being done.
        op: &'static str,
        /// The URI.
        uri: String,
        /// What went wrong.
        source: crate::transport::shm::ShmError,
    },
}

/// Where a stream goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    /// TCP `host:port`.
    Tcp(String),
    /// Unix socket path.
    Unix(PathBuf),
    /// A file: a snapshot.
    File(PathBuf),
    /// Shared memory with a process on this host, set up over a Unix
    /// socket at this path.
    Shm(PathBuf),
}

impl FromStr for Uri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadUri(s.to_string());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                Ok(Uri::Tcp(rest.to_string()))
            }
            "unix" => Ok(Uri::Unix(rest.into())),
            "file" => Ok(Uri::File(rest.into())),
            "shm" => Ok(Uri::Shm(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::File(p) => write!(f, "file:{}", p.display()),
            Uri::Shm(p) => write!(f, "shm:{}", p.display()),
        }
    }
}

/// A boxed reader half.
pub type BoxRead = Box<dyn Read + Send>;
/// A boxed writer half.
pub type BoxWrite = Box<dyn Write + Send>;

/// The source's end: the stream goes out through `writer`; `ack` is the
/// return path when the transport has one (sockets, not files).
pub struct Outgoing {
    /// Stream out.
    pub writer: BoxWrite,
    /// Acknowledgement in.
    pub ack: Option<BoxRead>,
}

/// The destination's end: the stream comes in through `reader`; `ack`
/// sends the acknowledgement when the transport has a return path.
pub struct Incoming {
    /// Stream in.
    pub reader: BoxRead,
    /// Acknowledgement out.
    pub ack: Option<BoxWrite>,
}

fn io_err<'a>(op: &'static str, uri: &'a Uri) -> impl FnOnce(io::Error) -> TransportError + 'a {
    move |source| TransportError::Io {
        op,
        uri: uri.to_string(),
        source,
    }
}

/// How long a peer may stay silent before the transport gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What TCP and Unix stream sockets share, for one set-up path.
trait Socket: Read + Write + Send + Sized + 'static {
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
    fn try_clone_socket(&self) -> io::Result<Self>;
}

impl Socket for TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Socket for UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// Configures a connected socket and splits it into (stream, return path),
/// each failing with an error that names `peer` and the timeout when the
/// peer stays silent (or stops reading) for `timeout`.
fn split<S: Socket>(
    s: S,
    uri: &Uri,
    peer: String,
    timeout: Duration,
) -> Result<(Timed<S>, Timed<S>), TransportError> {
    let slice = timeout_slice(timeout);
    s.set_timeouts(slice).map_err(io_err("configure", uri))?;
    let other = s
        .try_clone_socket()
        .map_err(io_err("clone socket of", uri))?;
    let timed = |s| Timed {
        s,
        peer: peer.clone(),
        timeout,
        slice,
        moved_at: None,
    };
    Ok((timed(s), timed(other)))
}

/// The socket timeout a [`Timed`] waits in: a tenth of the I/O timeout, at
/// most 100 ms, so the timeout fires within a slice of the time given.
fn timeout_slice(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// A socket whose timeouts say who was silent and for how long.
///
/// The kernel's socket timeout restarts at every call, and a write that
/// moved some bytes before blocking returns them only when it times out:
/// with the timeout on the socket, a peer that stops reading is noticed
/// only after two or three timeouts. So the socket waits in short slices
/// and a call fails once the peer made no progress for the whole timeout,
/// counted from the start of the last call that moved data (the earliest
/// that data can have moved).
struct Timed<S> {
    s: S,
    peer: String,
    timeout: Duration,
    slice: Duration,
    /// Start of the last write that moved bytes only to then block (the
    /// peer may have been silent since).
    moved_at: Option<std::time::Instant>,
}

impl<S> Timed<S> {
    /// Runs `op` in slices until it moves data, fails otherwise, or the
    /// peer has been silent for the timeout.
    fn retry(
        &mut self,
        what: &str,
        writing: bool,
        mut op: impl FnMut(&mut S) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let start = std::time::Instant::now();
        let since = match self.moved_at.take() {
            Some(t) if writing => t,
            _ => start,
        };
        loop {
            match op(&mut self.s) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && since.elapsed() + self.slice / 2 < self.timeout =>
                {
                    continue
                }
                Err(e) => return Err(self.explain(e, what)),
                Ok(n) => {
                    if writing && start.elapsed() >= self.slice {
                        self.moved_at = Some(start);
                    }
                    return Ok(n);
                }
            }
        }
    }

    fn explain(&self, e: io::Error, what: &str) -> io::Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} {what} for {} s (I/O timeout)",
                    self.peer,
                    fmt_secs(self.timeout)
                ),
            )
        } else {
            e
        }
    }
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

impl<S: Read> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry("sent nothing", false, |s| s.read(buf))
    }
}

impl<S: Write> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry("took no data", true, |s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.retry("took no data", true, |s| s.flush().map(|_| 0))
            .map(|_| ())
    }
}

/// Connects to a destination (or creates the snapshot file), with the
/// default [`IO_TIMEOUT`].
pub fn connect(uri: &Uri) -> Result<Outgoing, TransportError> {
    connect_with_timeout(uri, IO_TIMEOUT)
}

/// Connects to a destination (or creates the snapshot file); on a socket,
/// any read or write that makes no progress for `io_timeout` fails with
/// an error naming the peer and the timeout.
pub fn connect_with_timeout(uri: &Uri, io_timeout: Duration) -> Result<Outgoing, TransportError> {
    fn out<S: Socket>(s: S, uri: &Uri, timeout: Duration) -> Result<Outgoing, TransportError> {
        let peer = format!("the destination at {uri}");
        let (w, r) = split(s, uri, peer, timeout)?;
        Ok(Outgoing {
            writer: Box::new(w),
            ack: Some(Box::new(r)),
        })
    }
    match uri {
        Uri::Tcp(addr) => out(
            TcpStream::connect(addr).map_err(io_err("connect to", uri))?,
            uri,
            io_timeout,
        ),
        Uri::Unix(path) => out(
            UnixStream::connect(path).map_err(io_err("connect to", uri))?,
            uri,
            io_timeout,
        ),
        Uri::File(path) => {
            let f = File::create(path).map_err(io_err("create", uri))?;
            Ok(Outgoing {
                writer: Box::new(SyncOnFlush(f, path.clone())),
                ack: None,
            })
        }
        Uri::Shm(path) => {
            let (writer, ack) =
                crate::transport::shm::connect(path).map_err(shm_err("connect to", uri))?;
            Ok(Outgoing {
                writer: Box::new(writer),
                ack: Some(Box::new(ack)),
            })
        }
    }
}

fn shm_err<'a>(
    op: &'static str,
    uri: &'a Uri,
) -> impl FnOnce(crate::transport::shm::ShmError) -> TransportError + 'a {
    move |source| TransportError::Shm {
        op,
        uri: uri.to_string(),
        source,
    }
}

/// A file whose flush also syncs to disk, so "saved" means on disk; its
/// errors name the file (e.g. a full disk).
struct SyncOnFlush(File, PathBuf);

impl SyncOnFlush {
    fn named(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("writing {}: {e}", self.1.display()))
    }
}

impl Write for SyncOnFlush {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(|e| self.named(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(|e| self.named(e))
    }
}

impl Drop for SyncOnFlush {
    fn drop(&mut self) {
        let _ = self.0.sync_all();
    }
}

/// A bound destination endpoint, ready to accept one migration.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener, Uri),
    /// Unix socket (the path is removed on drop).
    Unix(UnixListener, Uri, PathBuf),
    /// A snapshot file to read.
    File(Uri, PathBuf),
    /// Shared memory: the Unix socket its sessions are set up over (the
    /// path is removed on drop).
    Shm(UnixListener, Uri, PathBuf),
}

impl Listener {
    /// Binds `uri` (for a file: checks it can be opened later).
    pub fn bind(uri: &Uri) -> Result<Listener, TransportError> {
        match uri {
            Uri::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr).map_err(io_err("listen on", uri))?,
                uri.clone(),
            )),
            Uri::Unix(path) => {
                // A stale socket from an earlier run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(
                    UnixListener::bind(path).map_err(io_err("listen on", uri))?,
                    uri.clone(),
                    path.clone(),
                ))
            }
            Uri::File(path) => {
                File::open(path).map_err(io_err("open", uri))?;
                Ok(Listener::File(uri.clone(), path.clone()))
            }
            Uri::Shm(path) => Ok(Listener::Shm(
                crate::transport::shm::bind(path).map_err(io_err("listen on", uri))?,
                uri.clone(),
                path.clone(),
            )),
        }
    }

    /// As [`Listener::accept_with_timeout`], but a source that has not
    /// connected within `io_timeout` is an error too: for the extra
    /// connections a migration announced (page channels), which a broken
    /// or hostile source might never open.
    pub fn accept_announced(&self, io_timeout: Duration) -> Result<Incoming, TransportError> {
        match self {
            Listener::Tcp(l, uri) => {
                let (s, addr) = poll_accept(l, uri, io_timeout)?;
                incoming_from(s, uri, format!("the source at tcp:{addr}"), io_timeout)
            }
            Listener::Unix(l, uri, _) => {
                let (s, _) = poll_accept(l, uri, io_timeout)?;
                incoming_from(s, uri, format!("the source on {uri}"), io_timeout)
            }
            Listener::Shm(l, uri, _) => {
                let (s, _) = poll_accept(l, uri, io_timeout)?;
                let (reader, ack) =
                    crate::transport::shm::take(s).map_err(shm_err("accept on", uri))?;
                Ok(Incoming {
                    reader: Box::new(reader),
                    ack: Some(Box::new(ack)),
                })
            }
            Listener::File(..) => self.accept_with_timeout(io_timeout),
        }
    }

    /// The actual address (useful with `tcp:127.0.0.1:0`).
    pub fn local_uri(&self) -> Uri {
        match self {
            Listener::Tcp(l, u) => l
                .local_addr()
                .map(|a| Uri::Tcp(a.to_string()))
                .unwrap_or_else(|_| u.clone()),
            Listener::Unix(_, u, _) | Listener::File(u, _) | Listener::Shm(_, u, _) => u.clone(),
        }
    }

    /// Waits for the source (or opens the file), with the default
    /// [`IO_TIMEOUT`].
    pub fn accept(&self) -> Result<Incoming, TransportError> {
        self.accept_with_timeout(IO_TIMEOUT)
    }

    /// Waits for the source (or opens the file). Once connected, a source
    /// that sends nothing (or reads nothing) for `io_timeout` fails the
    /// read or write with an error naming it and the timeout. The wait for
    /// the connection itself is not bounded.
    pub fn accept_with_timeout(&self, io_timeout: Duration) -> Result<Incoming, TransportError> {
        match self {
            Listener::Tcp(l, uri) => {
                let (s, addr) = l.accept().map_err(io_err("accept on", uri))?;
                first_bytes(
                    incoming_from(s, uri, format!("the source at tcp:{addr}"), io_timeout)?,
                    &self.local_uri(),
                    format!("tcp:{addr}"),
                )
            }
            Listener::Unix(l, uri, _) => {
                let s = l.accept().map_err(io_err("accept on", uri))?.0;
                first_bytes(
                    incoming_from(s, uri, format!("the source on {uri}"), io_timeout)?,
                    uri,
                    "a peer".into(),
                )
            }
            Listener::File(uri, path) => Ok(Incoming {
                reader: Box::new(File::open(path).map_err(io_err("open", uri))?),
                ack: None,
            }),
            Listener::Shm(l, uri, _) => {
                let (reader, ack) =
                    crate::transport::shm::accept(l).map_err(shm_err("accept on", uri))?;
                Ok(Incoming {
                    reader: Box::new(reader),
                    ack: Some(Box::new(ack)),
                })
            }
        }
    }
}

/// The destination's end of an accepted socket.
/// Waits for the first bytes of a new connection (within its I/O
/// timeout): a peer that closes without sending any is
/// [`TransportError::EmptyConnection`]; otherwise the bytes are put back in
/// front of the stream.
fn first_bytes(inc: Incoming, uri: &Uri, peer: String) -> Result<Incoming, TransportError> {
    let Incoming { mut reader, ack } = inc;
    let mut first = [0u8; 64];
    let n = loop {
        match reader.read(&mut first) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("waiting for the first bytes on", uri)(e)),
        }
    };
    if n == 0 {
        return Err(TransportError::EmptyConnection {
            peer,
            uri: uri.to_string(),
        });
    }
    Ok(Incoming {
        reader: Box::new(io::Cursor::new(first[..n].to_vec()).chain(reader)),
        ack,
    })
}

fn incoming_from<S: Socket>(
    s: S,
    uri: &Uri,
    peer: String,
    timeout: Duration,
) -> Result<Incoming, TransportError> {
    let (r, w) = split(s, uri, peer, timeout)?;
    Ok(Incoming {
        reader: Box::new(r),
        ack: Some(Box::new(w)),
    })
}

/// A socket listener [`poll_accept`] can poll.
trait PollAccept {
    /// What an accept returns: the socket and its peer's address.
    type Conn;
    fn accept(&self) -> io::Result<Self::Conn>;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
}

impl PollAccept for TcpListener {
    type Conn = (TcpStream, std::net::SocketAddr);
    fn accept(&self) -> io::Result<Self::Conn> {
        TcpListener::accept(self)
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
}

impl PollAccept for UnixListener {
    type Conn = (UnixStream, std::os::unix::net::SocketAddr);
    fn accept(&self) -> io::Result<Self::Conn> {
        UnixListener::accept(self)
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, on)
    }
}

/// Accepts on `l` switched to non-blocking, polling for `timeout` at the
/// most; the listener is blocking again afterwards (accepted sockets are
/// blocking either way).
fn poll_accept<L: PollAccept>(
    l: &L,
    uri: &Uri,
    timeout: Duration,
) -> Result<L::Conn, TransportError> {
    let deadline = std::time::Instant::now() + timeout;
    l.set_nonblocking(true).map_err(io_err("configure", uri))?;
    let r = loop {
        match l.accept() {
            Ok(t) => break Ok(t),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(io_err("accept on", uri)(e)),
        }
        if std::time::Instant::now() >= deadline {
            break Err(TransportError::Io {
                op: "accept on",
                uri: uri.to_string(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection for {} s (I/O timeout)", fmt_secs(timeout)),
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = l.set_nonblocking(false);
    r
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, _, path) | Listener::Shm(_, _, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writer half of an in-memory pipe.
pub struct PipeWriter {
    tx: Option<SyncSender<Vec<u8>>>,
}

/// Reader half of an in-memory pipe.
pub struct PipeReader {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    timeout: Option<Duration>,
}

impl PipeReader {
    /// Like a socket's read timeout: a read that gets nothing for `t`
    /// fails with `TimedOut` (`None`: wait forever, the default).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }
}

/// An in-memory, bounded, one-way byte pipe between two threads. Dropping
/// the writer is end-of-file for the reader; dropping the reader makes
/// writes fail with `BrokenPipe`.
pub fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = sync_channel(64);
    (
        PipeWriter { tx: Some(tx) },
        PipeReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            timeout: None,
        },
    )
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "pipe closed"))?;
        tx.send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "pipe reader gone"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl PipeWriter {
    /// Closes the pipe: the reader sees end-of-file after what was written.
    pub fn close(&mut self) {
        self.tx = None;
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::sync::mpsc::RecvTimeoutError;
        while self.pos == self.cur.len() {
            let got = match self.timeout {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(t) => self.rx.recv_timeout(t),
            };
            match got {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "pipe: nothing for {} s",
                            fmt_secs(self.timeout.unwrap_or_default())
                        ),
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Uri>().unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:80".parse::<Uri>().unwrap(),
            Uri::Tcp("[::1]:80".into())
        );
        assert_eq!(
            "unix:/tmp/s".parse::<Uri>().unwrap(),
            Uri::Unix("/tmp/s".into())
        );
        assert_eq!(
            "file:snap.lm".parse::<Uri>().unwrap(),
            Uri::File("snap.lm".into())
        );
        assert_eq!(
            "shm:/tmp/x.sock".parse::<Uri>().unwrap(),
            Uri::Shm("/tmp/x.sock".into())
        );
        assert_eq!(
            Uri::Shm("/tmp/x.sock".into()).to_string(),
            "shm:/tmp/x.sock"
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:host:notaport",
            "tcp::80",
            "udp:x:1",
            "file:",
            "shm:",
            "nocolon",
        ] {
            assert!(
                matches!(bad.parse::<Uri>(), Err(TransportError::BadUri(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn pipe_moves_bytes_and_ends() {
        let (mut w, mut r) = pipe();
        let t = std::thread::spawn(move || {
            w.write_all(b"hello ").unwrap();
            w.write_all(b"world").unwrap();
        });
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        t.join().unwrap();
        assert_eq!(s, "hello world");
    }

    #[test]
    fn pipe_write_fails_when_reader_gone() {
        let (mut w, r) = pipe();
        drop(r);
        assert_eq!(w.write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn missing_file_names_the_uri() {
        let uri: Uri = "file:/nonexistent/dir/snap".parse().unwrap();
        let e = Listener::bind(&uri).err().expect("must fail");
        assert!(e.to_string().contains("file:/nonexistent/dir/snap"), "{e}");
    }

    #[test]
    fn silent_peer_times_out_naming_it() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = l.local_uri();
        // A source that connects and sends nothing.
        // The accept waits for its first bytes (a peer that closes without
        // any is refused), so the timeout ends the accept.
        let out = connect(&uri).unwrap();
        let e = l
            .accept_with_timeout(Duration::from_millis(300))
            .err()
            .expect("a silent source times out");
        let TransportError::Io { source: e, .. } = e else {
            panic!("{e}")
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let text = e.to_string();
        assert!(text.starts_with("the source at tcp:127.0.0.1:"), "{text}");
        assert!(
            text.contains("sent nothing for 0.3 s (I/O timeout)"),
            "{text}"
        );
        drop(out);
        // A destination that never answers.
        let mut out = connect_with_timeout(&uri, Duration::from_secs(1)).unwrap();
        out.writer.write_all(b"L").unwrap();
        let _inc = l.accept().unwrap();
        let mut ack = out.ack.unwrap();
        let mut b = [0u8; 1];
        let e = ack.read(&mut b).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the destination at {uri} sent nothing for 1 s (I/O timeout)")
        );
    }

    #[test]
    fn announced_connection_that_never_comes_times_out() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let e = l
            .accept_announced(Duration::from_millis(200))
            .err()
            .expect("nobody connects");
        let text = e.to_string();
        assert!(text.starts_with("accept on tcp:127.0.0.1:"), "{text}");
        assert!(
            text.ends_with("no connection for 0.2 s (I/O timeout)"),
            "{text}"
        );
        // One that does come is served, and the listener still blocks.
        let uri = l.local_uri();
        let t = std::thread::spawn(move || connect(&uri).unwrap());
        let mut inc = l.accept_announced(Duration::from_secs(20)).unwrap();
        let mut out = t.join().unwrap();
        out.writer.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        inc.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn tcp_round_trip_with_return_path() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = l.local_uri();
        let t = std::thread::spawn(move || {
            let mut inc = l.accept().unwrap();
            let mut b = [0u8; 4];
            inc.reader.read_exact(&mut b).unwrap();
            inc.ack.as_mut().unwrap().write_all(&b).unwrap();
        });
        let mut out = connect(&uri).unwrap();
        out.writer.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        out.ack.as_mut().unwrap().read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        t.join().unwrap();
    }

    #[test]
    fn shm_round_trip_with_return_path() {
        let dir = tempfile::tempdir().unwrap();
        let uri = Uri::Shm(dir.path().join("t.sock"));
        let l = Listener::bind(&uri).unwrap();
        assert_eq!(l.local_uri(), uri);
        let t = std::thread::spawn(move || {
            let mut inc = l.accept().unwrap();
            let mut all = Vec::new();
            inc.reader.read_to_end(&mut all).unwrap();
            inc.ack.as_mut().unwrap().write_all(&all[..4]).unwrap();
            all
        });
        let mut out = connect(&uri).unwrap();
        // More than the whole ring, so slots are reused.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        out.writer.write_all(b"ping").unwrap();
        out.writer.write_all(&big).unwrap();
        drop(out.writer); // end of stream
        let mut b = [0u8; 4];
        out.ack.as_mut().unwrap().read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        let all = t.join().unwrap();
        assert_eq!(&all[..4], b"ping");
        assert!(all[4..] == big[..], "the stream arrives intact");
        // The listener removed its socket file.
        assert!(!dir.path().join("t.sock").exists());
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;
    use std::time::Instant;

    /// A peer that accepts and then neither reads nor writes: the source's
    /// writes fail after the timeout given, not a multiple of it.
    #[test]
    fn a_stalled_peer_fails_a_write_after_the_timeout_given() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri: Uri = format!("tcp:{}", l.local_addr().unwrap()).parse().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(8));
            drop(s);
        });
        let mut out = connect_with_timeout(&uri, Duration::from_secs(1)).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let t0 = Instant::now();
        let mut last_progress = Instant::now();
        let err = loop {
            match out.writer.write(&chunk) {
                Ok(n) => {
                    assert!(n > 0);
                    last_progress = Instant::now();
                }
                Err(e) => break e,
            }
        };
        let stalled = last_progress.elapsed();
        eprintln!(
            "failed {stalled:?} after the last progress ({:?} in all): {err}",
            t0.elapsed()
        );
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // The last write that moved bytes blocked until its slice ended:
        // the peer has been silent since that write began.
        assert!(
            stalled >= Duration::from_millis(700) && stalled < Duration::from_millis(1500),
            "a 1 s timeout fired {stalled:?} after the last progress"
        );
        assert!(
            t0.elapsed() < Duration::from_millis(2500),
            "a 1 s timeout fired after {:?} (the peer never read)",
            t0.elapsed()
        );
        drop(out);
        t.join().unwrap();
    }
}
