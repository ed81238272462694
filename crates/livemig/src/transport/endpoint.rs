//! One endpoint for every transport: a URI (`tcp:`, `unix:`, `shm:`,
//! `file:`) plus optional TLS settings, with both sides' operations —
//! [`Endpoint::connect`] and [`Endpoint::connect_channel`] for the source,
//! [`Endpoint::listen`] then [`EndpointListener::accept_source`] and
//! [`EndpointListener::accept_announced`] for the destination. A VMM (the
//! CLI, minivm's control socket) chooses nothing itself: it builds an
//! `Endpoint` from what its user gave.
//!
//! TLS runs over `tcp:` and `unix:` only; its settings come as a
//! [`TlsConfig`] or, as QMP's `tls-creds` / `tls-hostname` give them, as
//! a directory holding `ca.pem`, `cert.pem` and `key.pem` plus the name the
//! destination's certificate must carry ([`Endpoint::with_tls_dir`]).
//!
//! ```no_run
//! use livemig::transport::Endpoint;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Destination.
//! let ep = Endpoint::parse("tcp:0.0.0.0:4444")?.with_tls_dir("pki/dst".as_ref(), None)?;
//! let listener = ep.listen()?;
//! let (incoming, session) = listener.accept_source()?;
//! # drop((incoming, session));
//! // Source.
//! let ep = Endpoint::parse("tcp:10.0.0.2:4444")?.with_tls_dir("pki/src".as_ref(), None)?;
//! let conn = ep.connect()?;
//! # drop(conn);
//! # Ok(()) }
//! ```

use std::io;
use std::path::Path;
use std::time::Duration;

use super::tls::{self, TlsConfig, TlsError, TlsListener, TlsSession};
use super::{
    connect_with_timeout, BoxRead, Incoming, Listener, Outgoing, TransportError, Uri, IO_TIMEOUT,
};

/// Endpoint errors: the transport's or TLS's, naming the URI or the file.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Parsing the URI, connecting, listening or accepting failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Loading the TLS settings, or a TLS connection, failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TLS directory (QMP `tls-creds`) could not be used.
    #[error("tls-creds {}: {source}", dir.display())]
    TlsCreds {
        /// The directory given.
        dir: std::path::PathBuf,
        /// Why it is unusable.
        source: Box<TlsError>,
    },
    /// The name given for the destination's certificate (QMP
    /// `tls-hostname`) is not a valid TLS server name.
    #[error("tls-hostname '{name}': {source}")]
    TlsHostname {
        /// The name given.
        name: String,
        /// Why it is refused.
        source: Box<TlsError>,
    },
}

impl EndpointError {
    /// Whether this is a refused or failed TLS handshake with one peer (a
    /// listener can go on accepting others).
    pub fn is_handshake(&self) -> bool {
        matches!(self, EndpointError::Tls(e) if e.is_handshake())
    }
}

/// Where a migration goes or comes from: a URI, optional TLS settings and
/// the I/O timeout of its connections.
#[derive(Clone, Debug)]
pub struct Endpoint {
    uri: Uri,
    tls: Option<TlsConfig>,
    io_timeout: Duration,
}

/// What [`Endpoint::connect`] opened: the source's end, and what TLS
/// negotiated (`None` without TLS).
pub struct Connection {
    /// The stream out and its return path.
    pub out: Outgoing,
    /// The TLS session, when there is one.
    pub session: Option<TlsSession>,
}

impl Endpoint {
    /// A plain endpoint at `uri`, with the default [`IO_TIMEOUT`].
    pub fn new(uri: Uri) -> Endpoint {
        Endpoint {
            uri,
            tls: None,
            io_timeout: IO_TIMEOUT,
        }
    }

    /// As [`Endpoint::new`] from the URI's text.
    pub fn parse(uri: &str) -> Result<Endpoint, EndpointError> {
        Ok(Endpoint::new(uri.parse()?))
    }

    /// Runs every connection over TLS with `tls` (`None`: plain). TLS
    /// needs a `tcp:` or `unix:` URI: the others fail when used.
    pub fn with_tls(mut self, tls: Option<TlsConfig>) -> Endpoint {
        self.tls = tls;
        self
    }

    /// TLS with the certificates in `dir` (`ca.pem`, `cert.pem`,
    /// `key.pem`: QMP's `tls-creds` as livemig reads it) and, for a
    /// source, the name the destination's certificate must carry
    /// (`tls-hostname`; default: the URI's host, `localhost` for `unix:`).
    pub fn with_tls_dir(
        self,
        dir: &Path,
        hostname: Option<&str>,
    ) -> Result<Endpoint, EndpointError> {
        let mut c = TlsConfig::from_dir(dir).map_err(|source| EndpointError::TlsCreds {
            dir: dir.to_path_buf(),
            source: Box::new(source),
        })?;
        if let Some(name) = hostname {
            c = c
                .with_server_name(name)
                .map_err(|source| EndpointError::TlsHostname {
                    name: name.to_string(),
                    source: Box::new(source),
                })?;
        }
        Ok(self.with_tls(Some(c)))
    }

    /// How long a connected peer may stay silent (default [`IO_TIMEOUT`]).
    pub fn with_io_timeout(mut self, t: Duration) -> Endpoint {
        self.io_timeout = t;
        self
    }

    /// The URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The TLS settings, when TLS is on.
    pub fn tls(&self) -> Option<&TlsConfig> {
        self.tls.as_ref()
    }

    /// The I/O timeout.
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    fn tls_config(&self) -> Option<TlsConfig> {
        self.tls
            .as_ref()
            .map(|t| t.clone().with_io_timeout(self.io_timeout))
    }

    /// The source's main connection (for `file:`, the snapshot file it
    /// creates), with the TLS handshake done when TLS is on.
    pub fn connect(&self) -> Result<Connection, EndpointError> {
        match self.tls_config() {
            None => Ok(Connection {
                out: connect_with_timeout(&self.uri, self.io_timeout)?,
                session: None,
            }),
            Some(t) => {
                let (out, s) = tls::connect_with_session(&self.uri, &t)?;
                Ok(Connection {
                    out,
                    session: Some(s),
                })
            }
        }
    }

    /// A further connection of the same migration (a page channel, the
    /// postcopy urgent connection). Over TLS its handshake waits for its
    /// first write ([`tls::connect_deferred`]): the destination accepts
    /// such connections one after another.
    pub fn connect_channel(&self) -> Result<Outgoing, EndpointError> {
        match self.tls_config() {
            None => Ok(connect_with_timeout(&self.uri, self.io_timeout)?),
            Some(t) => Ok(tls::connect_deferred(&self.uri, &t)?),
        }
    }

    /// Binds the destination's end (for `file:`, checks the file opens).
    pub fn listen(&self) -> Result<EndpointListener, EndpointError> {
        let kind = match self.tls_config() {
            None => Bound::Plain(Listener::bind(&self.uri)?),
            Some(t) => Bound::Tls(TlsListener::bind(&self.uri, &t)?),
        };
        Ok(EndpointListener {
            kind,
            io_timeout: self.io_timeout,
        })
    }
}

enum Bound {
    Plain(Listener),
    Tls(TlsListener),
}

/// A bound destination endpoint, plain or TLS.
pub struct EndpointListener {
    kind: Bound,
    io_timeout: Duration,
}

impl EndpointListener {
    /// The actual address (useful with `tcp:127.0.0.1:0`).
    pub fn local_uri(&self) -> Uri {
        match &self.kind {
            Bound::Plain(l) => l.local_uri(),
            Bound::Tls(l) => l.local_uri(),
        }
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, Bound::Tls(_))
    }

    /// Waits for the source's main connection. A peer that is refused —
    /// its TLS handshake failed, or it closed without sending anything —
    /// is logged (`log::warn!`) and the listener waits for the next one.
    pub fn accept_source(&self) -> Result<(Incoming, Option<TlsSession>), EndpointError> {
        self.accept_source_with(&mut |e, uri| {
            log::warn!("refused a connection: {e}; still waiting on {uri}");
        })
    }

    /// As [`EndpointListener::accept_source`], telling `refused` about
    /// each refused peer (the error, and the URI still listened on).
    pub fn accept_source_with(
        &self,
        refused: &mut dyn FnMut(&EndpointError, &Uri),
    ) -> Result<(Incoming, Option<TlsSession>), EndpointError> {
        loop {
            let got = match &self.kind {
                Bound::Plain(l) => l
                    .accept_with_timeout(self.io_timeout)
                    .map(|i| (i, None))
                    .map_err(EndpointError::from),
                Bound::Tls(l) => l
                    .accept_with_session()
                    .map(|(i, s)| (i, Some(s)))
                    .map_err(EndpointError::from),
            };
            match got {
                Ok(x) => return Ok(x),
                Err(
                    e @ (EndpointError::Transport(TransportError::EmptyConnection { .. })
                    | EndpointError::Tls(TlsError::Handshake { .. })),
                ) => refused(&e, &self.local_uri()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts one more connection the source announced (a page channel,
    /// the postcopy urgent connection). Without TLS, one that does not
    /// come within the I/O timeout is an error; any failure is an error
    /// of the migration.
    pub fn accept_announced(&self) -> Result<Incoming, EndpointError> {
        match &self.kind {
            Bound::Plain(l) => Ok(l.accept_announced(self.io_timeout)?),
            Bound::Tls(l) => Ok(l.accept()?),
        }
    }

    /// [`EndpointListener::accept_announced`]'s reader, as the destination
    /// engine's `accept` callbacks take it.
    pub fn accept_reader(&self) -> io::Result<BoxRead> {
        self.accept_announced()
            .map(|i| i.reader)
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::transport::tls::Pki;

    fn pki(dir: &Path) {
        Pki::generate(&["src", "dst"], &["localhost", "127.0.0.1"])
            .unwrap()
            .write_to(dir)
            .unwrap();
    }

    fn round_trip(dst: Endpoint, src_of: impl FnOnce(&Uri) -> Endpoint) -> Option<TlsSession> {
        let l = dst.listen().unwrap();
        let src = src_of(&l.local_uri());
        let t = std::thread::spawn(move || {
            let mut c = src.connect().unwrap();
            c.out.writer.write_all(b"LIVEMIG-ping").unwrap();
            c.out.writer.flush().unwrap();
            let mut back = [0u8; 4];
            c.out.ack.as_mut().unwrap().read_exact(&mut back).unwrap();
            assert_eq!(&back, b"pong");
            // A channel: its TLS handshake waits for the first write.
            let mut ch = src.connect_channel().unwrap();
            ch.writer.write_all(b"chan").unwrap();
            ch.writer.flush().unwrap();
            let mut b = [0u8; 1];
            // The destination closes: end of file.
            let _ = ch.ack.as_mut().unwrap().read(&mut b);
            c.session
        });
        let (mut inc, session) = l.accept_source().unwrap();
        let mut b = [0u8; 12];
        inc.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"LIVEMIG-ping");
        inc.ack.as_mut().unwrap().write_all(b"pong").unwrap();
        inc.ack.as_mut().unwrap().flush().unwrap();
        let mut ch = l.accept_announced().unwrap();
        let mut b = [0u8; 4];
        ch.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"chan");
        drop(ch);
        let src_session = t.join().unwrap();
        assert_eq!(src_session.is_some(), session.is_some());
        session
    }

    #[test]
    fn plain_tcp_and_unix_endpoints_carry_a_migration() {
        let s = round_trip(Endpoint::parse("tcp:127.0.0.1:0").unwrap(), |u| {
            Endpoint::new(u.clone())
        });
        assert!(s.is_none());
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("unix:{}", dir.path().join("m.sock").display());
        let s = round_trip(Endpoint::parse(&uri).unwrap(), |u| Endpoint::new(u.clone()));
        assert!(s.is_none());
    }

    #[test]
    fn tls_endpoints_from_directories_carry_a_migration() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let dst = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .with_tls_dir(&dir.path().join("dst"), None)
            .unwrap();
        let src_dir = dir.path().join("src");
        let s = round_trip(dst, |u| {
            Endpoint::new(u.clone())
                .with_tls_dir(&src_dir, Some("localhost"))
                .unwrap()
        })
        .expect("a TLS session");
        assert_eq!(s.protocol, "TLSv1_3");
    }

    #[test]
    fn a_plain_peer_is_refused_by_a_tls_listener_which_waits_on() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let l = Endpoint::parse("tcp:127.0.0.1:0")
            .unwrap()
            .with_tls_dir(&dir.path().join("dst"), None)
            .unwrap()
            .listen()
            .unwrap();
        let uri = l.local_uri();
        let src_dir = dir.path().join("src");
        let t = std::thread::spawn(move || {
            // A plain source: refused.
            let mut c = Endpoint::new(uri.clone()).connect().unwrap();
            let _ = c.out.writer.write_all(b"LIVEMIG\0 not tls");
            let mut b = Vec::new();
            let _ = c.out.ack.as_mut().unwrap().read_to_end(&mut b);
            assert!(tls::looks_like_tls(&b), "a TLS alert came back: {b:02x?}");
            // Then a proper one.
            let mut c = Endpoint::new(uri)
                .with_tls_dir(&src_dir, None)
                .unwrap()
                .connect()
                .unwrap();
            c.out.writer.write_all(b"ok").unwrap();
            c.out.writer.flush().unwrap();
        });
        let mut refusals = Vec::new();
        let (mut inc, s) = l
            .accept_source_with(&mut |e, _| refusals.push(e.to_string()))
            .unwrap();
        let mut b = [0u8; 2];
        inc.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ok");
        assert!(s.is_some());
        t.join().unwrap();
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(refusals[0].contains("TLS handshake with"), "{refusals:?}");
    }

    #[test]
    fn bad_tls_settings_name_the_parameter() {
        let e = Endpoint::parse("tcp:127.0.0.1:1")
            .unwrap()
            .with_tls_dir("/nonexistent/creds".as_ref(), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls-creds /nonexistent/creds: "), "{e}");
        assert!(e.contains("/nonexistent/creds/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let e = Endpoint::parse("tcp:127.0.0.1:1")
            .unwrap()
            .with_tls_dir(&dir.path().join("src"), Some("not a name!"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls-hostname 'not a name!': "), "{e}");
        // TLS over a file is refused when used.
        let e = Endpoint::parse("file:/tmp/x")
            .unwrap()
            .with_tls_dir(&dir.path().join("src"), None)
            .unwrap()
            .connect()
            .err()
            .expect("no TLS over files")
            .to_string();
        assert!(e.contains("TLS works over tcp: and unix:"), "{e}");
    }
}
