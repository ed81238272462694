//! The control socket: QMP, the QEMU Machine Protocol, on a Unix socket, so
//! a running VMM can be steered by the clients that drive QEMU (`qemu.qmp`,
//! `qmp-shell`, libvirt-style tooling).
//!
//! ## Protocol
//! On connect the server greets with
//! `{"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"},
//! "capabilities": []}}` (the version is livemig's own; `package` says
//! `livemig`). Until the client sends `qmp_capabilities`, every other
//! command is refused with class `CommandNotFound`, as QEMU does. Requests
//! are JSON objects `{"execute": NAME, "arguments": {...}, "id": ANY}`
//! sent back to back on the stream (no newline needed: a streaming scanner
//! finds where each ends; one request is at most [`MAX_LINE`] bytes, a
//! longer one ends the session with an error). Each answer is
//! `{"return": VALUE}` or `{"error": {"class", "desc"}}`, with the
//! request's `id` echoed; lines end in CRLF like QEMU's. Out-of-band
//! execution is not offered, so `exec-oob` is refused as an unexpected
//! member, as QEMU does when `oob` was not negotiated.
//!
//! Events, to every negotiated session, with
//! `"timestamp": {"seconds", "microseconds"}`:
//! - `MIGRATION` `{"status"}` on every status change (source and
//!   destination), and `MIGRATION_PASS` `{"pass"}` on every dirty sync,
//!   both only with the `events` capability on, as in QEMU;
//! - `STOP` when the guest pauses (stop-and-copy, `stop`), `RESUME` when
//!   it runs again (`cont`, a failed completion, the destination's guest
//!   starting).
//!
//! ## Commands
//! | command | arguments | does |
//! |---|---|---|
//! | `qmp_capabilities` | `enable` (empty) | ends capability negotiation |
//! | `query-commands`, `query-version` | none | as QEMU |
//! | `query-status` | none | `{"running", "status"}` (running, paused, inmigrate, postmigrate, finish-migrate) |
//! | `stop` / `cont` | none | pause / resume the guest (`cont` also resumes a source left paused by an unconfirmed migration) |
//! | `migrate` | `uri` or `channels`, `detach`, `resume` | starts an outgoing migration; with `resume: true`, reconnects one paused in postcopy (`postcopy-paused`) to `uri`, where the destination waits after `migrate-recover` |
//! | `migrate-incoming` | `uri` or `channels`, `exit-on-error` | starts waiting for an incoming one |
//! | `migrate-cancel` | none | cancels the outgoing migration or snapshot-file save (a file the save created is removed); the guest runs on. Also stops a `migrate-incoming file:` restore still loading (the waiting VM never runs) |
//! | `migrate-start-postcopy` | none | switches the running migration to postcopy (needs `postcopy-ram`) |
//! | `migrate-recover` | `uri` | destination paused in postcopy: listens on `uri` for the source's `migrate` with `resume: true` (the VMM must receive with `engine::postcopy::receive_recoverable`) |
//! | `query-migrate` | none | QEMU's shape; `{}` before any migration |
//! | `migrate-set-parameters` / `query-migrate-parameters` | QEMU's names (below) | applies now and to the next migration |
//! | `migrate-set-capabilities` / `query-migrate-capabilities` | `capabilities: [{capability, state}]` | `xbzrle`, `auto-converge`, `events`, `multifd`, `return-path`, `dirty-limit`, `postcopy-ram`, `postcopy-preempt`, `mapped-ram`, `background-snapshot`, `x-livemig-verify` |
//!
//! Snapshot files (see `file.rs`): `migrate file:PATH` with `mapped-ram`
//! writes livemig's mapped-ram file of the paused guest
//! ([`MigrationStarter::start_snapshot`]); with `background-snapshot` the
//! guest runs on while it is written. `migrate-incoming file:PATH` of such
//! a file restores it ([`MigrationStarter::start_restore`]), lazily with
//! livemig's parameter `x-livemig-lazy`. Parameter `mode` (`normal`,
//! `local`): local mode hands memfd-backed memory over a `unix:` socket
//! and refuses, naming them, `multifd`, `multifd-compression`, `xbzrle`,
//! `postcopy-ram`, `postcopy-preempt`, `tls-creds`, the snapshot
//! capabilities and `x-livemig-lazy`.
//!
//! Parameters: `max-bandwidth` (bytes/s), `downtime-limit` (ms),
//! `xbzrle-cache-size` (bytes), `cpu-throttle-initial`,
//! `cpu-throttle-increment`, `max-cpu-throttle` (%), `multifd-channels`
//! (used with the `multifd` capability), `multifd-compression` (`none`,
//! `zstd`, and livemig's `lz4`; applies with or without multifd),
//! `multifd-zstd-level`, `vcpu-dirty-limit` (MB/s per vCPU, used with the
//! `dirty-limit` capability), `tls-creds` (livemig: a directory holding
//! `ca.pem`, `cert.pem`, `key.pem`; `""` = off), `tls-hostname`, and
//! livemig's own `x-livemig-throttle-sync-period` (ms) and
//! `x-livemig-adaptive-encoding` (bool), and for snapshot files
//! `direct-io` (bool, QEMU's name: pages written with `O_DIRECT`) and
//! livemig's `x-livemig-lazy` (bool: lazy restore). Any other argument is refused
//! (`GenericError`, "Parameter 'NAME' is unexpected").

use std::io;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::engine::MigrationHandle;
use crate::transport::Uri;

mod client;
mod commands;
mod events;
mod file;
mod framing;
mod server;

pub use client::ControlClient;
pub use events::Events;
pub use file::FileOptions;
pub use server::{ControlServer, Dispatcher};

/// Longest request (one JSON object) accepted, in bytes.
pub const MAX_LINE: usize = 64 << 10;

/// livemig's version as QMP reports it (`query-version`, the greeting).
fn version() -> Value {
    let num = |i: usize| -> u64 {
        env!("CARGO_PKG_VERSION")
            .split('.')
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    json!({
        "qemu": {"major": num(0), "minor": num(1), "micro": num(2)},
        "package": concat!("livemig ", env!("CARGO_PKG_VERSION")),
    })
}

/// Where the guest is, in QEMU's run-state names (`query-status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The guest runs.
    Running,
    /// Stopped by `stop`, or left paused by an unconfirmed migration.
    Paused,
    /// Waiting for (or loading) an incoming migration.
    InMigrate,
    /// Paused for the last pages of an outgoing migration.
    FinishMigrate,
    /// The guest was migrated away; this copy stays paused.
    PostMigrate,
}

impl RunState {
    /// QEMU's name.
    pub fn qmp_name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }

    /// Whether vCPUs run.
    pub fn running(self) -> bool {
        self == RunState::Running
    }
}

/// TLS for a migration, from the `tls-creds` and `tls-hostname`
/// parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationTls {
    /// Directory with `ca.pem`, `cert.pem`, `key.pem`
    /// ([`crate::transport::tls::TlsConfig::from_dir`]).
    pub dir: PathBuf,
    /// The name the destination's certificate must carry (default: the
    /// URI's host).
    pub hostname: Option<String>,
}

/// Starts migrations and steers the guest for the control server: the
/// VMM's side.
pub trait MigrationStarter: Send {
    /// Starts an outgoing migration to `uri` (over TLS when `tls` is
    /// given) in the background, steered and watched through `handle`.
    /// Returns once it has started.
    fn start_outgoing(
        &mut self,
        uri: &Uri,
        tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String>;

    /// Starts listening for an incoming migration on `uri` in the
    /// background. The VMM reports the incoming migration's status through
    /// `handle` ([`MigrationHandle::set_status`]: `active` once it
    /// listens, then `completed` or `failed`), which `query-migrate` and
    /// the `MIGRATION` events show.
    fn start_incoming(
        &mut self,
        uri: &Uri,
        tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String>;

    /// `migrate file:PATH` with capability `mapped-ram` or
    /// `background-snapshot`: writes a mapped-ram snapshot file of the
    /// guest in the background (see [`FileOptions`]), reporting through
    /// `handle` (e.g. with [`crate::snapshot::record_save`]). After a
    /// `mapped-ram` save the guest stays paused, as after any migration;
    /// after a background snapshot it runs on. Returns once it has
    /// started.
    fn start_snapshot(
        &mut self,
        path: &std::path::Path,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let _ = (path, opts, handle);
        Err("this VMM does not write mapped-ram snapshot files".into())
    }

    /// `migrate-incoming file:PATH` of a mapped-ram file: restores it into
    /// the waiting guest in the background (lazily with
    /// [`FileOptions::lazy`]) and reports through `handle` like
    /// [`MigrationStarter::start_incoming`]: `active` while loading,
    /// `postcopy-active` while a lazy restore still serves memory from the
    /// file, then `completed` or `failed` (a damaged chunk: the guest
    /// must not run on).
    fn start_restore(
        &mut self,
        path: &std::path::Path,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let _ = (path, opts, handle);
        Err("this VMM does not restore mapped-ram snapshot files".into())
    }

    /// Where the guest is (`query-status`).
    fn run_state(&self) -> RunState {
        RunState::Running
    }

    /// `stop`: pauses the guest.
    fn stop(&mut self) -> Result<(), String> {
        Err("this VMM cannot pause its guest from the control socket".into())
    }

    /// `cont`: resumes a guest paused by `stop`, or a source guest that an
    /// outgoing migration left paused because the destination never
    /// confirmed it started (`MigrationError::Unconfirmed`: the operator
    /// sends it only when the destination is known not to run the guest).
    fn cont(&mut self) -> Result<(), String> {
        Err("this VMM cannot resume a guest from the control socket".into())
    }

    /// Gives the VMM the server's event queue, for the events only it
    /// sees (`RESUME` when an incoming guest starts). Called once, before
    /// any command.
    fn attach_events(&mut self, events: Events) {
        let _ = events;
    }
}

/// Errors of the control socket (server and client).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting or talking failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the path: it is left alone.
    #[error("control socket {path}: a file that is not a socket is there; not removing it")]
    NotASocket {
        /// The path.
        path: String,
    },
    /// A live server already listens at the path: it is left alone.
    #[error("control socket {path}: another process is listening on it; not removing it")]
    InUse {
        /// The path.
        path: String,
    },
    /// The server answered something that is not QMP.
    #[error("control socket: bad answer {0:?}")]
    Protocol(String),
    /// The server answered with an error.
    #[error("{class}: {desc}")]
    Command {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
}

#[cfg(test)]
mod tests;
