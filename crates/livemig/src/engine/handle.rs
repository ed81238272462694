//! The handle through which a caller steers and watches a running migration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::params::{Params, ParamsError};
use super::stats::{MigrationStats, Status};

/// One sync's worth of figures: the per-round log a report plots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncPoint {
    /// Milliseconds since the migration started.
    pub time_ms: u64,
    /// Sync number.
    pub sync: u64,
    /// Round (full passes completed).
    pub round: u64,
    /// Pages the tracker reported dirty at this sync.
    pub dirty_pages: u64,
    /// Pages still to send after the sync.
    pub remaining_pages: u64,
    /// Pages sent since the previous sync.
    pub sent_pages: u64,
    /// Bytes per second since the previous sync.
    pub throughput: u64,
    /// Dirty pages per second (last measurement).
    pub dirty_pages_rate: u64,
    /// Throttle at this sync.
    pub throttle: u8,
    /// Expected downtime in ms at this sync.
    pub expected_downtime: u64,
}

/// Postcopy's progress at one moment (taken about every 50 ms after the
/// switch, and at its end): what a report plots for the postcopy phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PostcopyPoint {
    /// Milliseconds since the migration started.
    pub time_ms: u64,
    /// Pages pushed in the background since the switch.
    pub pushed_pages: u64,
    /// Pages sent because the destination asked for them, since the
    /// switch.
    pub requested_pages: u64,
    /// Page requests received since the switch.
    pub requests: u64,
}

/// What a [`MigrationHandle`] tells its observers.
#[derive(Clone, Debug, PartialEq)]
pub enum HandleEvent {
    /// The status changed (QMP's `MIGRATION` event).
    Status(Status),
    /// The dirty tracker was synced: pass `n` of the memory begins (QMP's
    /// `MIGRATION_PASS` event).
    Pass(u64),
}

/// A function called on every [`HandleEvent`], from the thread that
/// changed the stats, with the stats locked: it must be quick and must not
/// touch the handle.
pub type Observer = Box<dyn Fn(&HandleEvent) + Send + Sync>;

#[derive(Default)]
struct Observers(Vec<Observer>);

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} observers", self.0.len())
    }
}

#[derive(Debug, Default)]
struct Shared {
    params: Mutex<Params>,
    stats: Mutex<MigrationStats>,
    history: Mutex<Vec<SyncPoint>>,
    postcopy_history: Mutex<Vec<PostcopyPoint>>,
    cancel: AtomicBool,
    observers: Mutex<Observers>,
    start_postcopy: AtomicBool,
    recovery: AtomicBool,
    reconnect: Mutex<Reconnect>,
}

/// A connection handed to a migration paused in postcopy.
#[derive(Default)]
pub(crate) enum Reconnect {
    #[default]
    None,
    /// The source's new connection (`migrate` with `resume`), and how to
    /// open more to the same place (the urgent connection, page
    /// channels), if the caller can.
    Out(crate::transport::Outgoing, Option<OpenConnection>),
    /// The destination's new connection (`migrate-recover`), and how to
    /// accept the source's further connections, if the caller can.
    In(crate::transport::Incoming, Option<AcceptConnection>),
}

/// Opens connection `i` of a resumed postcopy migration: page channel `i`
/// (1..=channels) or the urgent connection (`u16::MAX`).
pub type OpenConnection =
    Box<dyn FnMut(u16) -> std::io::Result<crate::engine::ChannelWriter> + Send>;
/// Accepts the next connection of a resumed postcopy migration (urgent
/// connection first, then the page channels) on the recovery listener.
pub type AcceptConnection = Box<dyn FnMut() -> std::io::Result<crate::transport::BoxRead> + Send>;

impl std::fmt::Debug for Reconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reconnect::None => "no connection",
            Reconnect::Out(..) => "an outgoing connection",
            Reconnect::In(..) => "an incoming connection",
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared view of one migration: parameters, stats, cancel. Cheap to clone
/// and safe to use from other threads (a progress bar, a control socket).
#[derive(Clone, Debug, Default)]
pub struct MigrationHandle {
    shared: Arc<Shared>,
}

impl MigrationHandle {
    /// A handle with these parameters.
    pub fn new(params: Params) -> Self {
        let h = MigrationHandle::default();
        *lock(&h.shared.params) = params;
        h
    }

    /// The current parameters.
    pub fn params(&self) -> Params {
        lock(&self.shared.params).clone()
    }

    /// Replaces the parameters; the engine applies them at its next step.
    pub fn set_params(&self, p: Params) -> Result<(), ParamsError> {
        p.validate()?;
        *lock(&self.shared.params) = p;
        Ok(())
    }

    /// A snapshot of the stats.
    pub fn stats(&self) -> MigrationStats {
        lock(&self.shared.stats).clone()
    }

    /// Per-sync history so far.
    pub fn history(&self) -> Vec<SyncPoint> {
        lock(&self.shared.history).clone()
    }

    /// Asks the migration to stop; the source guest keeps running.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether cancel was asked.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::SeqCst)
    }

    /// Calls `observer` on every later status change and dirty sync.
    pub fn observe(&self, observer: Observer) {
        lock(&self.shared.observers).0.push(observer);
    }

    /// Sets the status (and the error, when given) from outside the
    /// engine: for a VMM that reports the destination side of a migration
    /// through a handle of its own. Observers see the change.
    pub fn set_status(&self, status: Status, error: Option<String>) {
        self.update_stats(|s| {
            s.status = status;
            if error.is_some() {
                s.error_desc = error;
            }
        });
    }

    /// Asks a running migration with `postcopy-ram` to switch to postcopy
    /// at its next step (QEMU's `migrate-start-postcopy`). Fails when the
    /// capability is off.
    pub fn start_postcopy(&self) -> Result<(), String> {
        if !self.params().postcopy_ram {
            return Err("postcopy-ram is off: enable the capability before migrating".into());
        }
        self.shared.start_postcopy.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the switch to postcopy was asked.
    pub fn postcopy_requested(&self) -> bool {
        self.shared.start_postcopy.load(Ordering::SeqCst)
    }

    /// Lets an outgoing migration pause in postcopy when a connection is
    /// lost (`postcopy-paused`) and wait for
    /// [`MigrationHandle::resume_postcopy`], instead of failing: only for
    /// a caller that can hand a new connection over (a control socket
    /// does). Off by default.
    pub fn set_postcopy_recovery(&self, on: bool) {
        self.shared.recovery.store(on, Ordering::SeqCst);
    }

    /// Whether a lost connection pauses postcopy (see
    /// [`MigrationHandle::set_postcopy_recovery`]).
    pub fn postcopy_recovery(&self) -> bool {
        self.shared.recovery.load(Ordering::SeqCst)
    }

    /// Resumes an outgoing migration paused in postcopy (`postcopy-paused`)
    /// over `conn`, a new connection to the destination, which must be
    /// waiting for it (its own [`MigrationHandle::recover_postcopy`], QMP's
    /// `migrate-recover`). QEMU's `migrate` with `resume: true`.
    ///
    /// The migration resumes over `conn` alone: requested and background
    /// pages share it, even if the migration had an urgent connection or
    /// page channels. [`MigrationHandle::resume_postcopy_with`] reopens
    /// them.
    pub fn resume_postcopy(&self, conn: crate::transport::Outgoing) -> Result<(), String> {
        self.hand_over(Reconnect::Out(conn, None))
    }

    /// As [`MigrationHandle::resume_postcopy`], and `open(i)` opens the
    /// migration's further connections to the same destination as
    /// before the cut: the urgent connection (`i == u16::MAX`) when it
    /// had one, page channels `1..=channels` when it had them (after
    /// `conn`'s stream start, in that order; the destination must accept
    /// them: [`MigrationHandle::recover_postcopy_with`]).
    pub fn resume_postcopy_with(
        &self,
        conn: crate::transport::Outgoing,
        open: impl FnMut(u16) -> std::io::Result<crate::engine::ChannelWriter> + Send + 'static,
    ) -> Result<(), String> {
        self.hand_over(Reconnect::Out(conn, Some(Box::new(open))))
    }

    /// Hands an incoming migration paused in postcopy (`postcopy-paused`,
    /// on the destination) the source's new connection (`conn`, accepted
    /// on the address given to QMP's `migrate-recover`).
    /// A source that reopens an urgent connection or page channels is
    /// refused (it stays paused): see
    /// [`MigrationHandle::recover_postcopy_with`].
    pub fn recover_postcopy(&self, conn: crate::transport::Incoming) -> Result<(), String> {
        self.hand_over(Reconnect::In(conn, None))
    }

    /// As [`MigrationHandle::recover_postcopy`], and `accept()` takes the
    /// source's further connections from the recovery listener: its
    /// urgent connection, then its page channels, each checked as at
    /// the first connection (block list, channel count, session).
    pub fn recover_postcopy_with(
        &self,
        conn: crate::transport::Incoming,
        accept: impl FnMut() -> std::io::Result<crate::transport::BoxRead> + Send + 'static,
    ) -> Result<(), String> {
        self.hand_over(Reconnect::In(conn, Some(Box::new(accept))))
    }

    fn hand_over(&self, conn: Reconnect) -> Result<(), String> {
        let status = self.stats().status;
        if status != Status::PostcopyPaused {
            return Err(format!(
                "the migration is not paused in postcopy (status {}): nothing to recover",
                serde_json::to_value(status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ));
        }
        *lock(&self.shared.reconnect) = conn;
        Ok(())
    }

    /// The connection handed over for recovery, if any.
    pub(crate) fn take_reconnect(&self) -> Reconnect {
        std::mem::take(&mut *lock(&self.shared.reconnect))
    }

    /// Changes the stats; observers hear of a new status or dirty sync, in
    /// the order the changes were made (the stats stay locked meanwhile).
    pub(crate) fn update_stats(&self, f: impl FnOnce(&mut MigrationStats)) {
        let mut s = lock(&self.shared.stats);
        let (status, syncs) = (s.status, s.ram.dirty_sync_count);
        f(&mut s);
        let mut events = Vec::new();
        if s.ram.dirty_sync_count != syncs {
            events.push(HandleEvent::Pass(s.ram.dirty_sync_count));
        }
        if s.status != status {
            events.push(HandleEvent::Status(s.status));
        }
        if !events.is_empty() {
            let obs = lock(&self.shared.observers);
            for e in &events {
                for o in &obs.0 {
                    o(e);
                }
            }
        }
    }

    pub(crate) fn push_history(&self, p: SyncPoint) {
        lock(&self.shared.history).push(p);
    }

    /// Postcopy's progress over time, from the switch to the last page
    /// (empty for a migration that never switched).
    pub fn postcopy_history(&self) -> Vec<PostcopyPoint> {
        lock(&self.shared.postcopy_history).clone()
    }

    pub(crate) fn push_postcopy_point(&self, p: PostcopyPoint) {
        lock(&self.shared.postcopy_history).push(p);
    }
}
