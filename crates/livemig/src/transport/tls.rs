//! TLS 1.3 over the TCP and Unix transports, with mutual authentication
//! by certificates (rustls, `ring` provider).
//!
//! Both sides hold a certificate signed by the same CA. The destination
//! (the TLS server) accepts only a client that presents a certificate
//! chaining to that CA; the source (the TLS client) checks that the
//! destination's certificate chains to the CA and names the server name
//! (by default the URI's host, `localhost` for a Unix socket). Only
//! TLS 1.3 is offered; the preferred cipher suite is
//! `TLS13_AES_128_GCM_SHA256` (see [`CIPHER_SUITES`]).
//!
//! After its handshake the destination sends a short confirmation inside
//! the TLS session, so a source whose certificate is refused learns it
//! while connecting rather than at its first write.
//!
//! A connection is split into the same halves as a plain socket
//! ([`Outgoing`](super::Outgoing) / [`Incoming`]): the stream one way, the return path the
//! other, usable from two threads. They share one rustls session behind a
//! lock. The reader never holds it while it waits for the socket; the
//! writer holds it while its records go out (writing them straight from
//! rustls's buffers saves a copy, a third more TLS throughput here): the
//! reader then waits until the peer has taken them, as it does anyway
//! while the stream flows. As with a plain socket, the connection ends
//! (close_notify) when both halves are dropped.
//!
//! rustls has no external pre-shared-key mode (TLS 1.3 PSK is used only
//! for its own session resumption), so authentication is by certificates;
//! [`Pki::generate`] makes a CA and peer certificates for a quick setup.
//!
//! ```no_run
//! use std::io::Read;
//! use livemig::engine::{ChannelWriter, Loader, MigrationHandle, Params, Source};
//! use livemig::memory::ProcessMemory;
//! use livemig::transport::tls::{self, TlsConfig, TlsListener};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Source: ca.pem, cert.pem, key.pem in one directory.
//! let cfg = TlsConfig::from_dir("pki/src".as_ref())?;
//! let uri = "tcp:10.0.0.2:4444".parse()?;
//! let memory = ProcessMemory::single(1 << 30)?;
//! let mut tracker = livemig::dirty::UffdTracker::new(&memory, Default::default())?;
//! let handle = MigrationHandle::new(Params { channels: 2, ..Params::default() });
//! let mut out = tls::connect(&uri, &cfg)?;
//! let mut open = |_: u16| -> std::io::Result<ChannelWriter> {
//!     Ok(tls::connect_deferred(&uri, &cfg).map_err(std::io::Error::other)?.writer)
//! };
//! let ack = out.ack.as_deref_mut().map(|r| r as &mut dyn Read);
//! Source::new(&memory, &mut tracker, &mut livemig::vm::NoVm, handle)
//!     .run_with_channels(out.writer, ack, &mut open)?;
//!
//! // Destination.
//! let cfg = TlsConfig::from_dir("pki/dst".as_ref())?;
//! let listener = TlsListener::bind(&"tcp:0.0.0.0:4444".parse()?, &cfg)?;
//! let incoming = listener.accept()?;
//! let memory = ProcessMemory::single(1 << 30)?;
//! Loader::new(&memory).load_channels(incoming.reader, || {
//!     listener.accept().map(|i| i.reader).map_err(std::io::Error::other)
//! })?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::crypto::ring as provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig,
    ServerConnection,
};

use super::{Incoming, Listener, TransportError, Uri, IO_TIMEOUT};

/// File names inside a TLS directory (`--tls-dir`).
pub const CA_FILE: &str = "ca.pem";
/// This peer's certificate (chain) in a TLS directory.
pub const CERT_FILE: &str = "cert.pem";
/// This peer's private key in a TLS directory.
pub const KEY_FILE: &str = "key.pem";

/// How long a peer may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The cipher suites offered, most preferred first. All TLS 1.3;
/// AES-128-GCM first: with AES-NI it is the fastest, and its strength is
/// not the weak point of a migration link.
pub const CIPHER_SUITES: [&str; 3] = [
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
];

/// What the destination sends inside TLS once it has accepted the source.
const CONFIRM: &[u8; 8] = b"LVMGTLS1";

/// Most plaintext encrypted per write call (rustls splits it in records).
const WRITE_CHUNK: usize = 256 * 1024;

/// TLS set-up and handshake errors, naming the file or the peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Read {
        /// Which file: "CA certificate", "certificate", "private key".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("the {what} file {} {problem}", path.display())]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: PemProblem,
    },
    /// The certificate and the private key do not go together.
    #[error("certificate {} with key {}: {source}", cert.display(), key.display())]
    KeyPair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The CA certificates do not make a client verifier.
    #[error("client verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the protocol settings or a new session.
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
    /// A name given for the destination's certificate is not a valid TLS
    /// server name.
    #[error("server name '{name}': {source}")]
    ServerName {
        /// The name given.
        name: String,
        /// Why it is not one.
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The URI's host cannot be a TLS server name: one must be given.
    #[error("'{host}' of {uri} cannot be a TLS server name ({source}): set one explicitly")]
    HostName {
        /// The host part of the URI.
        host: String,
        /// The URI.
        uri: String,
        /// Why it is not a server name.
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// TLS was asked for on a transport that does not carry it.
    #[error("TLS works over tcp: and unix: migrations, not over {0}")]
    Unsupported(String),
    /// Connecting or accepting failed before TLS started.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The handshake failed: the peer is not using TLS, or one side
    /// refused the other's certificate.
    #[error("TLS handshake with {peer} failed: {reason} ({hint})")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// What rustls or the socket said.
        #[source]
        reason: HandshakeFailure,
        /// What to check.
        hint: &'static str,
    },
    /// Generating keys or certificates failed.
    #[error("generating certificates: {0}")]
    Keygen(#[source] rcgen::Error),
    /// A peer name that cannot name a directory of its files.
    #[error("'{0}' cannot name a directory for its files")]
    PeerName(String),
    /// Writing generated files failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
}

/// Why a TLS handshake failed ([`TlsError::Handshake`]).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    /// What rustls said (a certificate refused, an alert from the peer).
    #[error("{0}")]
    Tls(#[source] rustls::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed(#[source] io::Error),
    /// The socket failed (or timed out).
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The destination's confirmation was not livemig's.
    #[error("unexpected confirmation {0:02x?}")]
    Confirmation([u8; CONFIRM.len()]),
}

impl HandshakeFailure {
    /// Sorts an I/O error from the handshake: rustls's own error when it
    /// carries one.
    fn of(e: io::Error) -> HandshakeFailure {
        if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
            let kind = e.kind();
            return match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
                Some(Ok(t)) => HandshakeFailure::Tls(*t),
                Some(Err(i)) => HandshakeFailure::Io(io::Error::new(kind, i)),
                None => HandshakeFailure::Io(kind.into()),
            };
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeFailure::Closed(e)
        } else {
            HandshakeFailure::Io(e)
        }
    }
}

/// What is wrong with a PEM file ([`TlsError::Pem`]).
#[derive(Debug, thiserror::Error)]
pub enum PemProblem {
    /// The file is not valid PEM.
    #[error("is not valid PEM: {0}")]
    Invalid(#[source] rustls::pki_types::pem::Error),
    /// The file holds no certificate.
    #[error("holds no certificate (expected a '-----BEGIN CERTIFICATE-----' block)")]
    NoCertificate,
    /// The file holds no private key.
    #[error("holds no private key (expected a '-----BEGIN PRIVATE KEY-----' block)")]
    NoKey,
    /// The file's private key is not valid PEM.
    #[error("is not a valid PEM private key: {0}")]
    InvalidKey(#[source] rustls::pki_types::pem::Error),
    /// A CA certificate that rustls cannot use as a trust anchor.
    #[error("holds a certificate that cannot be a trust anchor: {0}")]
    NotTrustAnchor(#[source] rustls::Error),
}

impl TlsError {
    /// Whether this is a refused or failed handshake with one peer (a
    /// listener can go on accepting others).
    pub fn is_handshake(&self) -> bool {
        matches!(self, TlsError::Handshake { .. })
    }
}

/// Where the PEM inputs of a [`TlsConfig`] are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) peers must chain to.
    pub ca: PathBuf,
    /// This side's certificate, leaf first.
    pub cert: PathBuf,
    /// This side's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// `ca.pem`, `cert.pem` and `key.pem` inside `dir`.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }
}

/// Both ends' TLS settings: one configuration serves as client (source)
/// and as server (destination).
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: Option<ServerName<'static>>,
    io_timeout: Duration,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server_name", &self.server_name)
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The crypto provider: `ring`, with the suites in [`CIPHER_SUITES`] order.
fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    use provider::cipher_suite as cs;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..provider::default_provider()
    })
}

impl TlsConfig {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<TlsConfig, TlsError> {
        TlsConfig::from_files(&TlsFiles::in_dir(dir))
    }

    /// Loads the three PEM files; errors name the file at fault.
    pub fn from_files(files: &TlsFiles) -> Result<TlsConfig, TlsError> {
        let ca = read_pem("CA certificate", &files.ca)?;
        let cert = read_pem("certificate", &files.cert)?;
        let key = read_pem("private key", &files.key)?;
        TlsConfig::from_pem_named((&ca, &files.ca), (&cert, &files.cert), (&key, &files.key))
    }

    /// Builds a configuration from PEM text held in memory.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsConfig, TlsError> {
        TlsConfig::from_pem_named(
            (ca, Path::new("<ca>")),
            (cert, Path::new("<cert>")),
            (key, Path::new("<key>")),
        )
    }

    fn from_pem_named(
        (ca, ca_path): (&[u8], &Path),
        (cert, cert_path): (&[u8], &Path),
        (key, key_path): (&[u8], &Path),
    ) -> Result<TlsConfig, TlsError> {
        let certs_in = |what: &'static str, pem: &[u8], path: &Path| {
            let bad = |problem: PemProblem| TlsError::Pem {
                what,
                path: path.to_path_buf(),
                problem,
            };
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(PemProblem::Invalid(e)))?;
            if certs.is_empty() {
                return Err(bad(PemProblem::NoCertificate));
            }
            Ok(certs)
        };
        let ca_certs = certs_in("CA certificate", ca, ca_path)?;
        let chain = certs_in("certificate", cert, cert_path)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            what: "private key",
            path: key_path.to_path_buf(),
            problem: match e {
                rustls::pki_types::pem::Error::NoItemsFound => PemProblem::NoKey,
                e => PemProblem::InvalidKey(e),
            },
        })?;

        let mut roots = RootCertStore::empty();
        for c in ca_certs {
            roots.add(c).map_err(|e| TlsError::Pem {
                what: "CA certificate",
                path: ca_path.to_path_buf(),
                problem: PemProblem::NotTrustAnchor(e),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = crypto();
        let mismatch = |source: rustls::Error| TlsError::KeyPair {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        };

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Setup)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(mismatch)?;
        // One connection per session: no tickets, no resumption.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(mismatch)?;
        client.resumption = rustls::client::Resumption::disabled();

        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: None,
            io_timeout: IO_TIMEOUT,
        })
    }

    /// The name the destination's certificate must carry, instead of the
    /// one taken from the URI.
    pub fn with_server_name(mut self, name: &str) -> Result<TlsConfig, TlsError> {
        let n = ServerName::try_from(name.to_string()).map_err(|source| TlsError::ServerName {
            name: name.to_string(),
            source,
        })?;
        self.server_name = Some(n);
        Ok(self)
    }

    /// How long a connected peer may stay silent once the handshake is done
    /// (default [`IO_TIMEOUT`]; the handshake itself has
    /// [`HANDSHAKE_TIMEOUT`]).
    pub fn with_io_timeout(mut self, t: Duration) -> TlsConfig {
        self.io_timeout = t;
        self
    }

    /// The name checked against the destination's certificate when
    /// connecting to `uri`: the configured one, else the URI's host (an IP
    /// address is checked as one), else `localhost`.
    pub fn server_name_for(&self, uri: &Uri) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = match uri {
            Uri::Tcp(addr) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                host.trim_start_matches('[').trim_end_matches(']')
            }
            _ => "localhost",
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(host.to_string()).map_err(|source| TlsError::HostName {
            host: host.to_string(),
            uri: uri.to_string(),
            source,
        })
    }
}

/// What was negotiated on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSession {
    /// The peer: `HOST:PORT`, or the Unix socket URI.
    pub peer: String,
    /// Protocol version, e.g. `TLSv1_3`.
    pub protocol: String,
    /// Cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher_suite: String,
}

impl TlsSession {
    fn of(conn: &Connection, peer: &str) -> TlsSession {
        TlsSession {
            peer: peer.to_string(),
            protocol: conn
                .protocol_version()
                .map_or_else(|| "?".into(), |v| format!("{v:?}")),
            cipher_suite: conn
                .negotiated_cipher_suite()
                .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite())),
        }
    }
}

impl fmt::Display for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} with {}",
            self.protocol, self.cipher_suite, self.peer
        )
    }
}

/// A connected TCP or Unix socket before TLS.
trait RawSocket: Read + Write + Send + Sized + 'static {
    fn timeouts(&self, t: Duration) -> io::Result<()>;
    fn clone_socket(&self) -> io::Result<Self>;
}

impl RawSocket for TcpStream {
    fn timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl RawSocket for UnixStream {
    fn timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
    fn clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// Why a handshake failed and what to check, from the error rustls or the
/// socket gave.
fn handshake_error(peer: &str, e: io::Error) -> TlsError {
    use rustls::{CertificateError, Error as E};
    const NOT_TLS: &str = "is the peer using TLS (--tls-dir)?";
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let hint = match tls {
        Some(E::InvalidCertificate(CertificateError::NotValidForName))
        | Some(E::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            "the peer's certificate does not name the server name: see --tls-server-name"
        }
        Some(E::InvalidCertificate(
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
        )) => "the peer's certificate is not for this use: it needs the serverAuth (destination) or clientAuth (source) extended key usage",
        Some(E::InvalidCertificate(_)) => "is the peer's certificate signed by this side's CA?",
        Some(E::NoCertificatesPresented) => "the peer presented no certificate",
        Some(E::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::DecryptError,
        )) => "the peer refused this side's certificate: is it signed by the peer's CA?",
        Some(E::AlertReceived(AlertDescription::ProtocolVersion)) => {
            "the peer does not speak TLS 1.3"
        }
        _ => match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                "the peer did not answer in time: is it using TLS (--tls-dir)?"
            }
            _ => NOT_TLS,
        },
    };
    TlsError::Handshake {
        peer: peer.to_string(),
        reason: HandshakeFailure::of(e),
        hint,
    }
}

/// Runs the handshake on `sock`, splits the session into the two halves
/// and exchanges the destination's confirmation.
fn establish<S: RawSocket>(
    mut conn: Connection,
    mut sock: S,
    peer: &str,
    io_timeout: Duration,
) -> Result<(TlsReader, TlsWriter, TlsSession), TlsError> {
    let is_server = matches!(conn, Connection::Server(_));
    let fail = |e: io::Error| handshake_error(peer, e);
    let io_fail = |e: io::Error| {
        TlsError::Transport(TransportError::Io {
            op: "configure",
            uri: peer.to_string(),
            source: e,
        })
    };
    sock.timeouts(HANDSHAKE_TIMEOUT).map_err(io_fail)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(fail)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(fail)?;
    }
    let session = TlsSession::of(&conn, peer);
    // Records are sent as they are written: no limit on what rustls holds.
    conn.set_buffer_limit(None);
    let out = sock.clone_socket().map_err(io_fail)?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new(Box::new(out)),
    });
    let mut reader = TlsReader {
        shared: shared.clone(),
        sock: Box::new(sock.clone_socket().map_err(io_fail)?),
        raw: vec![0; 64 * 1024],
        start: 0,
        end: 0,
        eof: false,
    };
    let mut writer = TlsWriter { shared };
    if is_server {
        writer.write_all(CONFIRM).map_err(fail)?;
        writer.flush().map_err(fail)?;
    } else {
        let mut got = [0u8; CONFIRM.len()];
        reader.read_exact(&mut got).map_err(fail)?;
        if &got != CONFIRM {
            return Err(TlsError::Handshake {
                peer: peer.to_string(),
                reason: HandshakeFailure::Confirmation(got),
                hint: "is the peer a livemig destination?",
            });
        }
    }
    sock.timeouts(io_timeout).map_err(io_fail)?;
    Ok((reader, writer, session))
}

/// What both halves of a connection share.
struct Shared {
    conn: Mutex<Connection>,
    /// The socket records are written to; taken before `conn`.
    out: Mutex<Box<dyn Write + Send>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Encrypts `plain` (may be empty) and sends it with whatever records
    /// are pending, in order. `out` must be this connection's socket lock.
    fn seal_and_send(&self, out: &mut dyn Write, plain: &[u8], close: bool) -> io::Result<()> {
        let mut conn = lock(&self.conn);
        if !plain.is_empty() {
            conn.writer().write_all(plain)?;
        }
        if close {
            conn.send_close_notify();
        }
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
        Ok(())
    }
}

impl Drop for Shared {
    /// Both halves are gone: end the session cleanly (close_notify), as
    /// closing a plain socket ends it. Not when only one half goes: a
    /// record the peer never reads would make its socket close with a
    /// reset, which can discard data it has not read yet.
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        conn.send_close_notify();
        let mut sealed = Vec::new();
        while conn.wants_write() {
            if conn.write_tls(&mut sealed).is_err() {
                return;
            }
        }
        let out = self.out.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(&sealed).and_then(|()| out.flush());
    }
}

/// The sending half of a TLS connection.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(WRITE_CHUNK);
        let mut out = lock(&self.shared.out);
        self.shared.seal_and_send(&mut **out, &buf[..n], false)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut out = lock(&self.shared.out);
        self.shared.seal_and_send(&mut **out, &[], false)?;
        out.flush()
    }
}

/// The receiving half of a TLS connection.
pub struct TlsReader {
    shared: Arc<Shared>,
    sock: Box<dyn Read + Send>,
    /// Received TLS bytes not yet handed to rustls: `raw[start..end]`.
    raw: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl TlsReader {
    /// Sends records rustls queued while reading (alerts, key updates)
    /// unless the writer is busy: it sends them with its next write.
    fn send_pending(&self) {
        if let Ok(mut out) = self.shared.out.try_lock() {
            let _ = self.shared.seal_and_send(&mut **out, &[], false);
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = lock(&self.shared.conn);
                match conn.reader().read(buf) {
                    // 0: the peer sent close_notify.
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut pending = &self.raw[self.start..self.end];
                    let used = conn.read_tls(&mut pending)?;
                    self.start += used;
                    let result = conn.process_new_packets();
                    let queued = conn.wants_write();
                    drop(conn);
                    if queued {
                        self.send_pending();
                    }
                    if let Err(e) = result {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    continue;
                }
                if self.eof {
                    // rustls has seen end-of-file and still has nothing.
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the TLS connection ended early",
                    ));
                }
            }
            let n = loop {
                match self.sock.read(&mut self.raw) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                self.eof = true;
                let mut conn = lock(&self.shared.conn);
                conn.read_tls(&mut io::empty())?;
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            self.start = 0;
            self.end = n;
        }
    }
}

/// Connects to `uri` (tcp: or unix:) and runs the TLS handshake as the
/// source, returning the stream and its return path.
pub fn connect(uri: &Uri, tls: &TlsConfig) -> Result<super::Outgoing, TlsError> {
    connect_with_session(uri, tls).map(|(o, _)| o)
}

/// As [`connect`], also saying what was negotiated.
pub fn connect_with_session(
    uri: &Uri,
    tls: &TlsConfig,
) -> Result<(super::Outgoing, TlsSession), TlsError> {
    let name = tls.server_name_for(uri)?;
    let conn = ClientConnection::new(tls.client.clone(), name).map_err(TlsError::Setup)?;
    let io = |source| TransportError::Io {
        op: "connect to",
        uri: uri.to_string(),
        source,
    };
    let (r, w, s) = match uri {
        Uri::Tcp(addr) => {
            let sock = TcpStream::connect(addr).map_err(io)?;
            let peer = sock
                .peer_addr()
                .map_or_else(|_| addr.clone(), |a| a.to_string());
            establish(conn.into(), sock, &peer, tls.io_timeout)?
        }
        Uri::Unix(path) => {
            let sock = UnixStream::connect(path).map_err(io)?;
            establish(conn.into(), sock, &uri.to_string(), tls.io_timeout)?
        }
        Uri::File(_) | Uri::Shm(_) => return Err(TlsError::Unsupported(uri.to_string())),
    };
    Ok((
        super::Outgoing {
            writer: Box::new(w),
            ack: Some(Box::new(r)),
        },
        s,
    ))
}

/// As [`connect`], but the handshake waits for the first read or write.
///
/// For the page channels of a multi-channel migration: the destination
/// accepts them one after another, each once the previous one has sent its
/// start, while the source opens them all before writing to any. An eager
/// handshake on the second channel would wait for an `accept` that waits
/// for the first channel's data.
pub fn connect_deferred(uri: &Uri, tls: &TlsConfig) -> Result<super::Outgoing, TlsError> {
    let name = tls.server_name_for(uri)?;
    let conn = ClientConnection::new(tls.client.clone(), name).map_err(TlsError::Setup)?;
    let io_timeout = tls.io_timeout;
    let io = |source| TransportError::Io {
        op: "connect to",
        uri: uri.to_string(),
        source,
    };
    let handshake: Handshake = match uri {
        Uri::Tcp(addr) => {
            let sock = TcpStream::connect(addr).map_err(io)?;
            let peer = sock
                .peer_addr()
                .map_or_else(|_| addr.clone(), |a| a.to_string());
            Box::new(move || establish(conn.into(), sock, &peer, io_timeout))
        }
        Uri::Unix(path) => {
            let sock = UnixStream::connect(path).map_err(io)?;
            let peer = uri.to_string();
            Box::new(move || establish(conn.into(), sock, &peer, io_timeout))
        }
        Uri::File(_) | Uri::Shm(_) => return Err(TlsError::Unsupported(uri.to_string())),
    };
    let lazy = Arc::new(Mutex::new(Deferred::Pending(handshake)));
    Ok(super::Outgoing {
        writer: Box::new(DeferredWriter {
            lazy: lazy.clone(),
            inner: None,
        }),
        ack: Some(Box::new(DeferredReader { lazy, inner: None })),
    })
}

type Handshake = Box<dyn FnOnce() -> Result<(TlsReader, TlsWriter, TlsSession), TlsError> + Send>;

/// A connection whose handshake runs when either half is first used.
enum Deferred {
    Pending(Handshake),
    Ready {
        reader: Option<TlsReader>,
        writer: Option<TlsWriter>,
    },
    Failed(String),
}

/// Runs the handshake if no half has yet, and hands out this half.
fn take_half<T>(
    lazy: &Mutex<Deferred>,
    take: impl FnOnce(&mut Option<TlsReader>, &mut Option<TlsWriter>) -> Option<T>,
) -> io::Result<T> {
    let mut st = lock(lazy);
    if matches!(*st, Deferred::Pending(_)) {
        let Deferred::Pending(handshake) =
            std::mem::replace(&mut *st, Deferred::Failed(String::new()))
        else {
            unreachable!()
        };
        *st = match handshake() {
            Ok((r, w, _)) => Deferred::Ready {
                reader: Some(r),
                writer: Some(w),
            },
            Err(e) => Deferred::Failed(e.to_string()),
        };
    }
    match &mut *st {
        Deferred::Ready { reader, writer } => take(reader, writer)
            .ok_or_else(|| io::Error::other("this half of the TLS connection was taken")),
        Deferred::Failed(e) => Err(io::Error::other(e.clone())),
        Deferred::Pending(_) => unreachable!("the handshake ran above"),
    }
}

/// The sending half of a [`connect_deferred`] connection.
struct DeferredWriter {
    lazy: Arc<Mutex<Deferred>>,
    inner: Option<TlsWriter>,
}

impl DeferredWriter {
    fn get(&mut self) -> io::Result<&mut TlsWriter> {
        if self.inner.is_none() {
            self.inner = Some(take_half(&self.lazy, |_, w| w.take())?);
        }
        Ok(self.inner.as_mut().expect("set above"))
    }
}

impl Write for DeferredWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.get()?.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(w) => w.flush(),
            // Nothing written yet: nothing to flush, no handshake needed.
            None => Ok(()),
        }
    }
}

/// The receiving half of a [`connect_deferred`] connection.
struct DeferredReader {
    lazy: Arc<Mutex<Deferred>>,
    inner: Option<TlsReader>,
}

impl Read for DeferredReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.inner.is_none() {
            self.inner = Some(take_half(&self.lazy, |r, _| r.take())?);
        }
        self.inner.as_mut().expect("set above").read(buf)
    }
}

/// A bound destination endpoint that accepts only TLS sources holding a
/// certificate from the configured CA.
pub struct TlsListener {
    inner: Listener,
    tls: TlsConfig,
}

impl TlsListener {
    /// Binds `uri` (tcp: or unix:).
    pub fn bind(uri: &Uri, tls: &TlsConfig) -> Result<TlsListener, TlsError> {
        if matches!(uri, Uri::File(_) | Uri::Shm(_)) {
            return Err(TlsError::Unsupported(uri.to_string()));
        }
        Ok(TlsListener {
            inner: Listener::bind(uri)?,
            tls: tls.clone(),
        })
    }

    /// The actual address (useful with `tcp:127.0.0.1:0`).
    pub fn local_uri(&self) -> Uri {
        self.inner.local_uri()
    }

    /// Waits for a source and runs the handshake. A refused or failed
    /// handshake is [`TlsError::Handshake`] (see [`TlsError::is_handshake`]):
    /// the listener is still usable.
    pub fn accept(&self) -> Result<Incoming, TlsError> {
        self.accept_with_session().map(|(i, _)| i)
    }

    /// As [`TlsListener::accept`], also saying what was negotiated.
    pub fn accept_with_session(&self) -> Result<(Incoming, TlsSession), TlsError> {
        let conn = ServerConnection::new(self.tls.server.clone()).map_err(TlsError::Setup)?;
        let io = |uri: &Uri| {
            let uri = uri.to_string();
            move |source| TransportError::Io {
                op: "accept on",
                uri,
                source,
            }
        };
        let (r, w, s) = match &self.inner {
            Listener::Tcp(l, uri) => {
                let (sock, addr) = l.accept().map_err(io(uri))?;
                establish(conn.into(), sock, &addr.to_string(), self.tls.io_timeout)?
            }
            Listener::Unix(l, uri, _) => {
                let (sock, _) = l.accept().map_err(io(uri))?;
                establish(conn.into(), sock, &uri.to_string(), self.tls.io_timeout)?
            }
            Listener::File(uri, _) | Listener::Shm(_, uri, _) => {
                return Err(TlsError::Unsupported(uri.to_string()))
            }
        };
        Ok((
            Incoming {
                reader: Box::new(r),
                ack: Some(Box::new(w)),
            },
            s,
        ))
    }
}

/// Whether `bytes` (what a peer sent first) look like a TLS record: a
/// plain side can then tell its user the peer expects TLS.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    // Content type (alert 21 or handshake 22), then version 3.x.
    matches!(bytes, [21 | 22, 3, 0..=4, ..])
}

/// Reads what a peer answered on a plain connection that failed, and says
/// whether it was TLS (an alert or a handshake record).
pub fn peer_answered_tls(r: &mut dyn Read) -> bool {
    let mut head = [0u8; 3];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    looks_like_tls(&head[..got])
}

/// A CA and the certificates it signed, as PEM.
pub struct Pki {
    /// The CA certificate (distributed to every peer as `ca.pem`).
    pub ca_cert: String,
    /// The CA's private key (keep it off the migration hosts).
    pub ca_key: String,
    /// Per peer: name, certificate, private key.
    pub peers: Vec<(String, String, String)>,
}

impl Pki {
    /// A fresh CA (ECDSA P-256) and one certificate per name, each valid as
    /// server and client, naming its peer name plus `extra_names` (DNS
    /// names or IP addresses, e.g. `localhost`, `127.0.0.1`).
    pub fn generate(names: &[&str], extra_names: &[&str]) -> Result<Pki, TlsError> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let err = TlsError::Keygen;
        let now = std::time::SystemTime::now();
        let not_before = now - Duration::from_secs(3600);
        let not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);

        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        // A name of its own, so a peer of another CA is told "unknown
        // issuer" rather than "bad signature".
        let id: String = ca_key.public_key_raw()[1..7]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ca.distinguished_name
            .push(DnType::CommonName, format!("livemig migration CA {id}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before.into();
        ca.not_after = not_after.into();
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

        let mut peers = Vec::new();
        for name in names {
            let mut sans: Vec<String> = vec![name.to_string()];
            for n in extra_names {
                if !sans.iter().any(|s| s == n) {
                    sans.push(n.to_string());
                }
            }
            let key = KeyPair::generate().map_err(err)?;
            let mut p = CertificateParams::new(sans).map_err(err)?;
            p.distinguished_name.push(DnType::CommonName, *name);
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.not_before = not_before.into();
            p.not_after = not_after.into();
            let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(err)?;
            peers.push((name.to_string(), cert.pem(), key.serialize_pem()));
        }
        Ok(Pki {
            ca_cert: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            peers,
        })
    }

    /// Writes `DIR/ca.pem`, `DIR/ca-key.pem` and, per peer, a directory
    /// `DIR/NAME/` holding `ca.pem`, `cert.pem` and `key.pem` (ready for
    /// [`TlsConfig::from_dir`]). Keys are readable by the owner only.
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        let mkdir = |d: &Path| {
            fs::create_dir_all(d).map_err(|source| TlsError::Write {
                path: d.to_path_buf(),
                source,
            })
        };
        mkdir(dir)?;
        write_file(&dir.join(CA_FILE), &self.ca_cert, false)?;
        write_file(&dir.join("ca-key.pem"), &self.ca_key, true)?;
        for (name, cert, key) in &self.peers {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(TlsError::PeerName(name.clone()));
            }
            let d = dir.join(name);
            mkdir(&d)?;
            write_file(&d.join(CA_FILE), &self.ca_cert, false)?;
            write_file(&d.join(CERT_FILE), cert, false)?;
            write_file(&d.join(KEY_FILE), key, true)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)
}

#[cfg(test)]
mod tests;
