//! `--tls-*` flags: encrypted, mutually authenticated migration streams,
//! and `livemig tls-keygen` to make a CA and peer certificates. The
//! transport (plain or TLS) is the library's `transport::Endpoint`; this
//! module only turns flags into its settings.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use livemig::engine::{AckError, LoadError, MigrationError};
use livemig::stream::StreamErrorKind;
use livemig::transport::tls::{self, Pki, TlsConfig, TlsFiles, TlsSession};
use livemig::transport::{self, BoxRead, EndpointError, Incoming, Outgoing, Uri};

/// TLS settings of a destination (`incoming`, `vm-incoming`).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Use TLS 1.3 with certificates from DIR: ca.pem (the CA the peer's
    /// certificate must chain to), cert.pem and key.pem (this side's).
    /// Make them with `livemig tls-keygen`. Both sides need it.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The CA certificate (PEM), instead of DIR/ca.pem.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This side's certificate (PEM), instead of DIR/cert.pem.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM), instead of DIR/key.pem.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

/// TLS settings of a source (`migrate`, `vm-migrate`).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsSourceArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The name the destination's certificate must carry (default: the
    /// URI's host; `localhost` for a Unix socket).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The configuration, or `None` without any `--tls-*` flag.
    pub fn config(&self) -> Result<Option<TlsConfig>> {
        let files = match (&self.tls_dir, &self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None, None) => return Ok(None),
            (Some(dir), ca, cert, key) => {
                let mut f = TlsFiles::in_dir(dir);
                f.ca = ca.clone().unwrap_or(f.ca);
                f.cert = cert.clone().unwrap_or(f.cert);
                f.key = key.clone().unwrap_or(f.key);
                f
            }
            (None, Some(ca), Some(cert), Some(key)) => TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => bail!("--tls-ca, --tls-cert and --tls-key go together (or give --tls-dir)"),
        };
        Ok(Some(TlsConfig::from_files(&files)?))
    }
}

impl TlsSourceArgs {
    /// The configuration, or `None` without any `--tls-*` flag.
    pub fn config(&self) -> Result<Option<TlsConfig>> {
        let Some(c) = self.tls.config()? else {
            if self.tls_server_name.is_some() {
                bail!("--tls-server-name needs --tls-dir (or --tls-ca/--tls-cert/--tls-key)");
            }
            return Ok(None);
        };
        Ok(Some(match &self.tls_server_name {
            Some(n) => c.with_server_name(n)?,
            None => c,
        }))
    }
}

/// The library's endpoint for `uri` with these settings.
fn endpoint(uri: &Uri, tls: Option<&TlsConfig>, io_timeout: Duration) -> transport::Endpoint {
    transport::Endpoint::new(uri.clone())
        .with_tls(tls.cloned())
        .with_io_timeout(io_timeout)
}

/// Connects to a destination, over TLS when configured (then also says
/// what TLS negotiated); a peer that makes no progress for `io_timeout`
/// fails the migration.
pub fn connect(
    uri: &Uri,
    tls: Option<&TlsConfig>,
    io_timeout: Duration,
) -> Result<(Outgoing, Option<TlsSession>), EndpointError> {
    let c = endpoint(uri, tls, io_timeout).connect()?;
    Ok((c.out, c.session))
}

/// Opens the connection of a page channel (over TLS, its handshake waits
/// for its first write).
pub fn connect_channel(
    uri: &Uri,
    tls: Option<&TlsConfig>,
    io_timeout: Duration,
) -> Result<Outgoing, EndpointError> {
    endpoint(uri, tls, io_timeout).connect_channel()
}

/// The JSON of a session (`null` without TLS).
pub fn session_json(s: &Option<TlsSession>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Null,
        Some(s) => serde_json::json!({
            "protocol": s.protocol,
            "cipher-suite": s.cipher_suite,
            "peer": s.peer,
        }),
    }
}

/// A destination endpoint, plain or TLS (the library's
/// [`transport::EndpointListener`]); a connected source that makes no
/// progress for the I/O timeout fails the migration.
pub struct Endpoint(transport::EndpointListener);

impl Endpoint {
    /// Binds `uri`.
    pub fn bind(uri: &Uri, tls: Option<&TlsConfig>, io_timeout: Duration) -> Result<Endpoint> {
        Ok(Endpoint(endpoint(uri, tls, io_timeout).listen()?))
    }

    /// The actual address.
    pub fn local_uri(&self) -> Uri {
        self.0.local_uri()
    }

    /// Waits for the source's main connection. A peer whose TLS handshake
    /// fails, or that closes without sending anything, is reported on
    /// stderr and the endpoint waits for the next one.
    pub fn accept_source(&self) -> Result<(Incoming, Option<TlsSession>)> {
        Ok(self.0.accept_source_with(&mut |e, uri| {
            eprintln!("refused a connection: {e}; still waiting on {uri}");
        })?)
    }

    /// Accepts one more connection (a page channel the source announced;
    /// without TLS, one that does not come within the I/O timeout is an
    /// error); any failure is an error of the migration.
    pub fn accept(&self) -> std::io::Result<Incoming> {
        self.0.accept_announced().map_err(std::io::Error::other)
    }
}

/// What a plain source is told when the destination answered with TLS.
pub const DESTINATION_NEEDS_TLS: &str = "the destination requires TLS: give this side \
     --tls-dir too (with a certificate from the destination's CA)";

/// Whether a plain migration failed because the destination speaks TLS:
/// it closed the connection, and what it sent first is a TLS record.
pub fn plain_peer_was_tls(e: &MigrationError, tls: bool, ack: Option<&mut BoxRead>) -> bool {
    // The engine saw the TLS answer to its setup.
    if matches!(e, MigrationError::Ack(AckError::DestinationNeedsTls)) {
        return !tls;
    }
    // The destination closed the connection: what it sent is readable at
    // once.
    let closed = matches!(e, MigrationError::Send(io) if matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    ));
    match ack {
        Some(r) if !tls && closed => tls::peer_answered_tls(&mut **r),
        _ => false,
    }
}

/// After a failed plain migration: when the destination answered with
/// TLS, the error says so.
pub fn explain_plain_source_failure(
    result: Result<(), MigrationError>,
    tls: bool,
    ack: Option<&mut BoxRead>,
) -> Result<()> {
    let Err(e) = result else { return Ok(()) };
    if plain_peer_was_tls(&e, tls, ack) {
        return Err(e).context(DESTINATION_NEEDS_TLS);
    }
    Err(e.into())
}

/// A plain destination that received a TLS ClientHello says so.
pub fn explain_plain_dest_failure(e: LoadError, uri: &Uri, tls: bool) -> anyhow::Error {
    let hint = match &e {
        LoadError::Stream(s) if !tls => match &s.kind {
            StreamErrorKind::BadMagic(m) if tls::looks_like_tls(m) => Some(
                "the source is using TLS: give this side --tls-dir too \
                 (with a certificate from the source's CA)",
            ),
            _ => None,
        },
        _ => None,
    };
    let e = anyhow::Error::new(e).context(format!("loading from {uri}"));
    match hint {
        Some(h) => e.context(h),
        None => e,
    }
}

/// `livemig tls-keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory to write: ca.pem, ca-key.pem and one sub-directory per
    /// name holding ca.pem, cert.pem and key.pem (give it to --tls-dir).
    pub dir: PathBuf,
    /// Peer names, comma-separated: one certificate each, valid for both
    /// roles; each name is also in its certificate's subject alternative
    /// names (a host name or IP address the source connects to).
    #[arg(long, value_delimiter = ',', default_value = "src,dst")]
    pub names: Vec<String>,
    /// More names every certificate carries (host names or IP addresses
    /// the source may use in its URI), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1,::1")]
    pub hosts: Vec<String>,
}

/// `livemig tls-keygen`.
pub fn keygen(a: KeygenArgs) -> Result<()> {
    if a.dir.join("ca-key.pem").exists() {
        bail!(
            "{} already holds a CA (ca-key.pem): choose another directory",
            a.dir.display()
        );
    }
    let names: Vec<&str> = a.names.iter().map(String::as_str).collect();
    let hosts: Vec<&str> = a.hosts.iter().map(String::as_str).collect();
    let pki = Pki::generate(&names, &hosts)?;
    pki.write_to(&a.dir)?;
    eprintln!(
        "wrote a CA ({}) and certificates for {} (also valid for {})",
        a.dir.join("ca.pem").display(),
        names.join(", "),
        hosts.join(", ")
    );
    for n in &names {
        eprintln!("  --tls-dir {}", a.dir.join(n).display());
    }
    eprintln!(
        "keep {} off the migration hosts",
        a.dir.join("ca-key.pem").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_explicit_files_are_refused() {
        let a = TlsArgs {
            tls_ca: Some("ca.pem".into()),
            ..TlsArgs::default()
        };
        let e = a.config().unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        assert!(TlsArgs::default().config().unwrap().is_none());
    }

    #[test]
    fn missing_dir_names_the_file() {
        let a = TlsArgs {
            tls_dir: Some("/nonexistent/tls".into()),
            ..TlsArgs::default()
        };
        let e = format!("{:#}", a.config().unwrap_err());
        assert!(e.contains("/nonexistent/tls/ca.pem"), "{e}");
    }
}
