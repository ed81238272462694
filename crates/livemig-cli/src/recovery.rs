//! Postcopy recovery for the CLI's migrations: `--resume-to URI` on a
//! source (`migrate`, `vm-migrate`), `--recover-on URI` on a destination
//! (`incoming`, `vm-incoming`). When a connection is lost after the
//! switch, both sides enter `postcopy-paused` instead of giving the guest
//! up; the destination then takes the source's next connection on its
//! recovery URI, the source reconnects there (retrying until it
//! listens), and postcopy goes on from the destination's received bitmap
//! (see `livemig::engine::postcopy`), with the urgent connection and the
//! page channels reopened to the same address.

use std::time::Duration;

use anyhow::{Context, Result};
use livemig::engine::{MigrationHandle, Status};
use livemig::transport::tls::TlsConfig;
use livemig::transport::Uri;

/// How often the watchers look at the migration's status.
const POLL: Duration = Duration::from_millis(20);
/// Wait between two connection attempts of a resuming source.
const RETRY: Duration = Duration::from_millis(200);

/// Waits until `handle` reports `postcopy-paused` (true) or a final status
/// (false).
fn wait_paused(handle: &MigrationHandle) -> bool {
    loop {
        let s = handle.stats().status;
        if s == Status::PostcopyPaused {
            return true;
        }
        if s.is_final() {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `handle` has left `postcopy-paused` (the new connection was
/// taken, or the migration ended).
fn wait_unpaused(handle: &MigrationHandle) {
    while handle.stats().status == Status::PostcopyPaused {
        std::thread::sleep(POLL);
    }
}

fn cause(handle: &MigrationHandle) -> String {
    handle
        .stats()
        .error_desc
        .unwrap_or_else(|| "connection lost".into())
}

/// Destination: binds `uri` now (so the port is known and held) and, each
/// time postcopy pauses, hands the source's next connection on it to the
/// paused migration. `handle` must be the one the destination receives
/// with (`Destination::recovery`).
pub fn destination(
    handle: &MigrationHandle,
    uri: &Uri,
    tls: Option<&TlsConfig>,
    io_timeout: Duration,
) -> Result<()> {
    let ep = std::sync::Arc::new(
        crate::tls::Endpoint::bind(uri, tls, io_timeout)
            .with_context(|| format!("--recover-on {uri}"))?,
    );
    let at = ep.local_uri();
    let h = handle.clone();
    std::thread::Builder::new()
        .name("postcopy-recover".into())
        .spawn(move || {
            while wait_paused(&h) {
                eprintln!(
                    "postcopy paused ({}): the guest runs here and waits for missing pages; waiting for the source on {at} (livemig migrate --resume-to {at})",
                    cause(&h)
                );
                match ep.accept_source() {
                    // The source's reopened urgent connection and page
                    // channels come on the same endpoint.
                    Ok((inc, _)) => match h.recover_postcopy_with(inc, {
                        let ep = ep.clone();
                        move || {
                            let i = ep.accept()?;
                            eprintln!("postcopy recovery: accepted a reopened connection (urgent or page channel)");
                            Ok(i.reader)
                        }
                    }) {
                        Ok(()) => eprintln!("postcopy recovery: the source reconnected"),
                        Err(e) => eprintln!("postcopy recovery: {e}"),
                    },
                    Err(e) => {
                        eprintln!("postcopy recovery: accepting on {at}: {e:#}");
                        std::thread::sleep(RETRY);
                        continue;
                    }
                }
                wait_unpaused(&h);
            }
        })?;
    Ok(())
}

/// Source: allows recovery on `handle` and, each time postcopy pauses,
/// reconnects to `uri` (retrying until the destination listens there)
/// and hands the connection to the paused migration.
pub fn source(
    handle: &MigrationHandle,
    uri: &Uri,
    tls: Option<TlsConfig>,
    io_timeout: Duration,
) -> Result<()> {
    handle.set_postcopy_recovery(true);
    let (h, uri) = (handle.clone(), uri.clone());
    std::thread::Builder::new()
        .name("postcopy-resume".into())
        .spawn(move || {
            while wait_paused(&h) {
                eprintln!(
                    "postcopy paused ({}): the guest runs on the destination; reconnecting to {uri}",
                    cause(&h)
                );
                loop {
                    if h.stats().status != Status::PostcopyPaused {
                        break;
                    }
                    match crate::tls::connect(&uri, tls.as_ref(), io_timeout) {
                        Ok((out, _)) => {
                            // The urgent connection and page channels are
                            // reopened to the same place.
                            let open = {
                                let (uri, tls) = (uri.clone(), tls.clone());
                                move |i: u16| {
                                    let w = crate::tls::connect_channel(
                                        &uri,
                                        tls.as_ref(),
                                        io_timeout,
                                    )
                                    .map(|o| o.writer)
                                    .map_err(std::io::Error::other)?;
                                    if i == u16::MAX {
                                        eprintln!("postcopy recovery: reopened the urgent connection");
                                    } else {
                                        eprintln!("postcopy recovery: reopened page channel {i}");
                                    }
                                    Ok(w)
                                }
                            };
                            match h.resume_postcopy_with(out, open) {
                                Ok(()) => eprintln!("postcopy recovery: reconnected to {uri}"),
                                Err(e) => eprintln!("postcopy recovery: {e}"),
                            }
                            break;
                        }
                        Err(_) => std::thread::sleep(RETRY),
                    }
                }
                wait_unpaused(&h);
            }
        })?;
    Ok(())
}
