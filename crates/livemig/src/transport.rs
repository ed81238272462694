//! Byte transports for the stream: TCP, Unix socket, file, and an
//! in-memory pipe for tests. Named by URI: `tcp:HOST:PORT`,
//! `unix:PATH`, `file:PATH`.

/// TLS 1.3 with mutual certificate authentication over TCP and Unix sockets.
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

/// Transport errors, naming the URI.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI is not one of the supported forms.
    #[error("bad migration URI '{0}': expected tcp:HOST:PORT, unix:PATH or file:PATH")]
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

/// Configures a connected socket and splits it into (stream, return path).
fn split<S: Socket>(s: S, uri: &Uri) -> Result<(S, S), TransportError> {
    s.set_timeouts(IO_TIMEOUT)
        .map_err(io_err("configure", uri))?;
    let other = s
        .try_clone_socket()
        .map_err(io_err("clone socket of", uri))?;
    Ok((s, other))
}

/// Connects to a destination (or creates the snapshot file).
pub fn connect(uri: &Uri) -> Result<Outgoing, TransportError> {
    fn out<S: Socket>(s: S, uri: &Uri) -> Result<Outgoing, TransportError> {
        let (w, r) = split(s, uri)?;
        Ok(Outgoing {
            writer: Box::new(w),
            ack: Some(Box::new(r)),
        })
    }
    match uri {
        Uri::Tcp(addr) => out(
            TcpStream::connect(addr).map_err(io_err("connect to", uri))?,
            uri,
        ),
        Uri::Unix(path) => out(
            UnixStream::connect(path).map_err(io_err("connect to", uri))?,
            uri,
        ),
        Uri::File(path) => {
            let f = File::create(path).map_err(io_err("create", uri))?;
            Ok(Outgoing {
                writer: Box::new(SyncOnFlush(f)),
                ack: None,
            })
        }
    }
}

/// A file whose flush also syncs to disk, so "saved" means on disk.
struct SyncOnFlush(File);

impl Write for SyncOnFlush {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
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
        }
    }

    /// The actual address (useful with `tcp:127.0.0.1:0`).
    pub fn local_uri(&self) -> Uri {
        match self {
            Listener::Tcp(l, u) => l
                .local_addr()
                .map(|a| Uri::Tcp(a.to_string()))
                .unwrap_or_else(|_| u.clone()),
            Listener::Unix(_, u, _) | Listener::File(u, _) => u.clone(),
        }
    }

    /// Waits for the source (or opens the file).
    pub fn accept(&self) -> Result<Incoming, TransportError> {
        fn inc<S: Socket>(s: S, uri: &Uri) -> Result<Incoming, TransportError> {
            let (r, w) = split(s, uri)?;
            Ok(Incoming {
                reader: Box::new(r),
                ack: Some(Box::new(w)),
            })
        }
        match self {
            Listener::Tcp(l, uri) => inc(l.accept().map_err(io_err("accept on", uri))?.0, uri),
            Listener::Unix(l, uri, _) => inc(l.accept().map_err(io_err("accept on", uri))?.0, uri),
            Listener::File(uri, path) => Ok(Incoming {
                reader: Box::new(File::open(path).map_err(io_err("open", uri))?),
                ack: None,
            }),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, _, path) = self {
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
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
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
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:host:notaport",
            "tcp::80",
            "udp:x:1",
            "file:",
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
}
