//! The Unix socket of a zero-copy local migration
//! ([`crate::engine::local`]): the plain socket, not a byte stream, since
//! the memory's descriptors travel in its ancillary data (`SCM_RIGHTS`).
//! Only `unix:PATH` URIs: descriptors cannot cross hosts.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Uri;

/// Why the local-migration socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LocalSocketError {
    /// Local mode hands descriptors to a process on this host.
    #[error("local mode needs a unix:PATH URI (memory descriptors cannot cross hosts), not {0}")]
    NotUnix(String),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket: not removed")]
    NotASocket(String),
    /// Another process listens at the path.
    #[error("{0} is in use by another listener")]
    InUse(String),
    /// A socket operation failed.
    #[error("{op} {uri}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The URI.
        uri: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

fn unix_path(uri: &Uri) -> Result<&Path, LocalSocketError> {
    match uri {
        Uri::Unix(p) => Ok(p),
        other => Err(LocalSocketError::NotUnix(other.to_string())),
    }
}

fn io_err<'a>(op: &'static str, uri: &'a Uri) -> impl FnOnce(io::Error) -> LocalSocketError + 'a {
    move |source| LocalSocketError::Io {
        op,
        uri: uri.to_string(),
        source,
    }
}

fn with_timeouts(s: UnixStream, uri: &Uri, t: Duration) -> Result<UnixStream, LocalSocketError> {
    s.set_read_timeout(Some(t))
        .and_then(|()| s.set_write_timeout(Some(t)))
        .map_err(io_err("configure", uri))?;
    Ok(s)
}

/// Connects to a destination waiting in local mode; a peer silent for
/// `io_timeout` fails the read or write.
pub fn connect(uri: &Uri, io_timeout: Duration) -> Result<UnixStream, LocalSocketError> {
    let s = UnixStream::connect(unix_path(uri)?).map_err(io_err("connect to", uri))?;
    with_timeouts(s, uri, io_timeout)
}

/// A destination's socket waiting for one local migration; the socket file
/// is removed on drop (if it is still the one bound here).
#[derive(Debug)]
pub struct LocalListener {
    listener: UnixListener,
    uri: Uri,
    path: PathBuf,
    inode: (u64, u64),
}

impl LocalListener {
    /// Binds `uri` (`unix:PATH`). A file already at the path is removed
    /// only when it is a stale socket (nobody listens on it).
    pub fn bind(uri: &Uri) -> Result<Self, LocalSocketError> {
        let path = unix_path(uri)?;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", uri)(e)),
            Ok(m) if !m.file_type().is_socket() => {
                return Err(LocalSocketError::NotASocket(uri.to_string()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(LocalSocketError::InUse(uri.to_string())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io_err("remove the stale socket", uri))?;
                }
                Err(e) => return Err(io_err("inspect", uri)(e)),
            },
        }
        let listener = UnixListener::bind(path).map_err(io_err("listen on", uri))?;
        let m = std::fs::symlink_metadata(path).map_err(io_err("inspect", uri))?;
        Ok(LocalListener {
            listener,
            uri: uri.clone(),
            path: path.to_path_buf(),
            inode: (m.dev(), m.ino()),
        })
    }

    /// The URI listened on.
    pub fn local_uri(&self) -> &Uri {
        &self.uri
    }

    /// Waits for the source (not bounded); once connected, a source silent
    /// for `io_timeout` fails the read or write. A peer that connects and
    /// closes without sending anything (another process checking whether
    /// the path is in use) is skipped.
    pub fn accept(&self, io_timeout: Duration) -> Result<UnixStream, LocalSocketError> {
        loop {
            let (s, _) = self
                .listener
                .accept()
                .map_err(io_err("accept on", &self.uri))?;
            let s = with_timeouts(s, &self.uri, io_timeout)?;
            match crate::sys::scm::peek(&s) {
                Ok(0) => log::info!(
                    "{}: a peer connected and closed without sending anything",
                    self.uri
                ),
                Ok(_) => return Ok(s),
                Err(e) => return Err(io_err("waiting for the source on", &self.uri)(e)),
            }
        }
    }
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn unix_only_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.sock");
        let uri = Uri::Unix(path.clone());
        let tcp: Uri = "tcp:127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            LocalListener::bind(&tcp),
            Err(LocalSocketError::NotUnix(_))
        ));
        assert!(connect(&tcp, Duration::from_secs(1)).is_err());
        let l = LocalListener::bind(&uri).unwrap();
        assert!(
            matches!(LocalListener::bind(&uri), Err(LocalSocketError::InUse(_))),
            "a live listener is not replaced"
        );
        let t = std::thread::spawn({
            let uri = uri.clone();
            move || {
                let mut s = connect(&uri, Duration::from_secs(5)).unwrap();
                s.write_all(b"hi").unwrap();
            }
        });
        let mut s = l.accept(Duration::from_secs(5)).unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        t.join().unwrap();
        assert_eq!(&b, b"hi");
        drop(l);
        assert!(!path.exists(), "the socket is removed on drop");
        // A regular file is never removed.
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            LocalListener::bind(&uri),
            Err(LocalSocketError::NotASocket(_))
        ));
        assert!(path.exists());
    }
}
