//! A running [`Vm`] steered from livemig's control socket.
//!
//! [`ControlledVm`] is the VMM side of [`livemig::control`] (QMP): it
//! implements [`MigrationStarter`] for one VM, so the socket's `migrate`,
//! `migrate-incoming`, `migrate-cancel`, `stop`, `cont` and `query-status`
//! act on it, and it sends the `RESUME` event when an incoming guest
//! starts.
//!
//! - **stop / cont**: `stop` pauses a running guest (not during a
//!   migration); `cont` resumes it, or a source left paused by an
//!   unconfirmed migration. A guest paused by `stop` is not migrated.
//!
//! - **Outgoing** (`migrate`): a thread connects to the URI and runs
//!   [`migrate_out`] with the server's [`MigrationHandle`], so
//!   `query-migrate` shows that migration's stats. After a completed
//!   migration the VM stays paused for good (the guest lives on at the
//!   destination; `query-migrate` says `completed`) and refuses further
//!   migrations; after a failure or a cancel the guest runs on and a new
//!   `migrate` may start at once — except when GO went out and STARTED
//!   never came back ([`Phase::Unconfirmed`]): the VM stays paused until
//!   an operator who knows the destination is not running the guest sends
//!   `cont`.
//! - **Incoming** (`migrate-incoming`): the VM must have been created for
//!   it — [`GuestImage::Incoming`], paused — as `minivm run --incoming
//!   --control PATH` does. The URI is bound when the command runs (so a
//!   bad or busy address is an error answer); a thread accepts one
//!   migration and receives it with `livemig::engine::Destination` (RAM
//!   and vCPU/device state into this VM, LOADED, the guest resumed only on
//!   the source's GO; postcopy when `postcopy-ram` is set here, waiting
//!   for `migrate-recover` after a cut). A VM whose load failed never runs
//!   and takes no second stream. Such a VM, once it runs, can be migrated out again.
//! - **TLS**: with the `tls-creds` parameter (a directory holding
//!   `ca.pem`, `cert.pem`, `key.pem`) and optionally `tls-hostname`, both
//!   `migrate` and `migrate-incoming` run every connection over TLS
//!   through the library's `livemig::transport::Endpoint`; a destination
//!   refuses a peer whose handshake fails (logged) and waits on for a
//!   proper source.
//! - **Local mode** (parameter `mode` = `local` on both sides, `unix:`
//!   URIs only): the source hands its memfd-backed memory to the
//!   destination instead of copying it (`livemig::engine::local`); the VM
//!   must have been started with memfd memory (`minivm run --memfd`), and
//!   the destination maps the source's memory in place of its own. Same
//!   phases, same LOADED/GO/STARTED commit.
//! - **Snapshot files** (`file.rs`): `migrate file:PATH` with capability
//!   `mapped-ram` saves the paused guest to a mapped-ram file (the VM
//!   stays paused for good, as after any migration), with
//!   `background-snapshot` snapshots it while it runs on;
//!   `migrate-incoming file:PATH` of a mapped-ram file restores it,
//!   lazily with `x-livemig-lazy` (`query-migrate` says `postcopy-active`
//!   until every chunk is in; a damaged chunk fails it and the guest is
//!   paused for good).
//! - **Cancel**: the engine checks the cancel flag between pages; where it
//!   would wait on the transport instead (a destination that stops reading
//!   or never acknowledges), socket I/O is done in 100 ms slices that
//!   notice the cancel and fail, so a cancel always ends the migration
//!   within about 100 ms; the guest is resumed, tracking stops and the
//!   connection is closed.
//!
//! On the destination, `query-migrate` and the `MIGRATION` events show
//! the status only (`active` while it listens and loads, then `completed`
//! or `failed`); [`ControlledVm::phase`] tells where this VM is.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig::control::{
    ControlError, ControlServer, Events, FileOptions, MigrationStarter, MigrationTls, RunState,
};
use livemig::engine::local::LocalError;
use livemig::engine::{LoadStats, MigrationError, MigrationHandle, MigrationMode, Params, Status};
use livemig::transport::local::LocalListener;
use livemig::transport::{Endpoint, EndpointListener, Uri, IO_TIMEOUT};

use crate::dirty::TrackerKind;
use crate::guest::GuestImage;
use crate::migrate::{migrate_out, migrate_out_channels, MigrateError};
use crate::vm::Vm;

mod file;

/// Where a [`ControlledVm`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The guest runs here and no migration is in flight.
    Running,
    /// Created for an incoming migration: nothing received yet, paused.
    AwaitingIncoming,
    /// Waiting on (or loading from) this address, as actually bound.
    Incoming(String),
    /// An outgoing migration is in flight (see `query-migrate`).
    Outgoing,
    /// An outgoing migration completed: the VM is paused for good, the
    /// guest runs on at the destination.
    MigratedAway,
    /// An incoming migration failed: the VM never ran and stays paused.
    IncomingFailed(String),
    /// An outgoing migration sent GO but the destination never confirmed
    /// it started: the destination may be running the guest, so this VM
    /// stays paused and refuses migrations. Only an operator who knows the
    /// destination is not running it may resume this one
    /// ([`ControlledVm::resume_unconfirmed`]).
    Unconfirmed(String),
}

impl Phase {
    /// True while a migration thread runs.
    pub fn in_flight(&self) -> bool {
        matches!(self, Phase::Incoming(_) | Phase::Outgoing)
    }
}

/// What the last incoming migration loaded.
#[derive(Clone, Debug)]
pub struct IncomingReport {
    /// Where it came from (the bound address).
    pub uri: String,
    /// Loader figures.
    pub stats: LoadStats,
    /// Milliseconds from accepting the connection to a resumed guest.
    pub load_time: u64,
    /// Whether the source sent a memory digest and it matched.
    pub verified: bool,
}

struct St {
    phase: Phase,
    worker: Option<JoinHandle<()>>,
    /// The handle of the outgoing migration in flight or last run.
    outgoing: Option<MigrationHandle>,
    incoming: Option<IncomingReport>,
    /// Paused by the control socket's `stop`.
    stopped: bool,
    /// The handle of a lazy restore, while it loads memory (`file.rs`).
    restoring: Option<MigrationHandle>,
}

struct Inner {
    vm: Vm,
    tracker: TrackerKind,
    st: Mutex<St>,
    cond: Condvar,
    /// The control server's events, once serving.
    events: Mutex<Option<Events>>,
}

/// A VM plus what the control socket needs to migrate it. Cheap to clone;
/// all clones share the VM.
#[derive(Clone)]
pub struct ControlledVm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControlledVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlledVm")
            .field("phase", &self.phase())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Slice in which blocked socket I/O looks at the cancel flag.
const SLICE: Duration = Duration::from_millis(100);

impl ControlledVm {
    /// Takes `vm`; outgoing migrations track dirty pages with `tracker`.
    /// A VM built with [`GuestImage::Incoming`] starts in
    /// [`Phase::AwaitingIncoming`], any other in [`Phase::Running`].
    pub fn new(vm: Vm, tracker: TrackerKind) -> ControlledVm {
        let phase = if matches!(vm.config().guest, GuestImage::Incoming) {
            Phase::AwaitingIncoming
        } else {
            Phase::Running
        };
        ControlledVm {
            inner: Arc::new(Inner {
                vm,
                tracker,
                st: Mutex::new(St {
                    phase,
                    worker: None,
                    outgoing: None,
                    incoming: None,
                    stopped: false,
                    restoring: None,
                }),
                cond: Condvar::new(),
                events: Mutex::new(None),
            }),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.inner.vm
    }

    /// Where the VM is.
    pub fn phase(&self) -> Phase {
        lock(&self.inner.st).phase.clone()
    }

    /// What the last incoming migration loaded, once it succeeded.
    pub fn incoming_report(&self) -> Option<IncomingReport> {
        lock(&self.inner.st).incoming.clone()
    }

    /// Serves a control socket at `path` for this VM, starting with
    /// `params`. The server stops (and removes the socket) when dropped. A
    /// file already at `path` is an error unless it is a stale socket.
    pub fn serve(&self, path: &Path, params: Params) -> Result<ControlServer, ControlError> {
        ControlServer::start(path, params, Box::new(self.clone()))
    }

    /// Waits up to `timeout` until `pred` holds for the phase and no
    /// migration thread is left to reap; returns the phase then, or `None`
    /// on timeout.
    pub fn wait_for(&self, pred: impl Fn(&Phase) -> bool, timeout: Duration) -> Option<Phase> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.inner.st);
        loop {
            if pred(&st.phase) {
                if !st.phase.in_flight() {
                    if let Some(t) = st.worker.take() {
                        drop(st);
                        let _ = t.join();
                        st = lock(&self.inner.st);
                        continue;
                    }
                }
                return Some(st.phase.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .inner
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` until no migration is in flight and its thread
    /// has ended (so its connection and tracker are released).
    pub fn wait_idle(&self, timeout: Duration) -> Option<Phase> {
        self.wait_for(|p| !p.in_flight(), timeout)
    }

    fn set_phase(&self, phase: Phase) {
        lock(&self.inner.st).phase = phase;
        self.inner.cond.notify_all();
    }

    /// After [`Phase::Unconfirmed`]: the operator knows the destination is
    /// not running the guest, so this copy resumes and may migrate again.
    /// Refused in any other phase.
    pub fn resume_unconfirmed(&self) -> Result<(), String> {
        let mut st = lock(&self.inner.st);
        if !matches!(st.phase, Phase::Unconfirmed(_)) {
            return Err(
                "cont resumes only a guest left paused by an unconfirmed migration \
                 (GO sent, STARTED never came)"
                    .into(),
            );
        }
        self.inner.vm.resume();
        st.phase = Phase::Running;
        drop(st);
        self.inner.cond.notify_all();
        Ok(())
    }

    /// Waits (briefly) for a migration whose status is already final to
    /// finish its thread, then reaps it.
    fn settle<'a>(&'a self, mut st: MutexGuard<'a, St>) -> MutexGuard<'a, St> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while st.phase == Phase::Outgoing
            && st
                .outgoing
                .as_ref()
                .is_some_and(|h| h.stats().status.is_final())
            && Instant::now() < deadline
        {
            st = self
                .inner
                .cond
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if !st.phase.in_flight() {
            if let Some(t) = st.worker.take() {
                let _ = t.join();
            }
        }
        st
    }

    fn emit(&self, event: &str) {
        if let Some(ev) = lock(&self.inner.events).as_ref() {
            ev.emit(event, None);
        }
    }

    fn run_outgoing(&self, ep: Endpoint, handle: MigrationHandle) {
        let uri = ep.uri().clone();
        let vm = &self.inner.vm;
        let kind = self.inner.tracker;
        if handle.params().mode == MigrationMode::Local {
            let result = livemig::transport::local::connect(&uri, IO_TIMEOUT)
                .map_err(|e| {
                    MigrateError::Local(LocalError::Socket {
                        what: "connecting",
                        source: io::Error::other(e),
                    })
                })
                .and_then(|sock| crate::migrate::migrate_out_local(vm, &handle, &sock));
            if let Err(MigrateError::Local(e)) = &result {
                // Failed before the engine ran: the handle says so too.
                if !handle.stats().status.is_final() {
                    handle.set_status(Status::Failed, Some(livemig::error_chain(e)));
                }
            }
            return self.outgoing_ended(&uri, result.map(|_| ()));
        }
        // The `dirty-limit` parameter, applied while the migration runs
        // (it needs the dirty ring: without one the migration fails).
        let limit = vm.follow_dirty_limit(&handle);
        let result = match (
            limit.as_ref().map_err(|e| e.to_string()),
            connect_out(&ep, &handle),
        ) {
            (Err(e), _) => migrate_out(vm, kind, handle.clone(), FailWriter(e), None),
            (Ok(_), Ok((writer, mut ack))) => {
                // Page channels (parameter `channels` above 1): one more
                // connection to the same address each, like QEMU multifd.
                let mut open = |_: u16| -> io::Result<livemig::engine::ChannelWriter> {
                    match connect_channel(&ep, &handle) {
                        Ok((w, _)) => Ok(w),
                        Err(e) => Err(io::Error::other(e)),
                    }
                };
                if handle.params().postcopy_ram {
                    // Postcopy reads page requests on a thread of its own.
                    let conn = livemig::transport::Outgoing {
                        writer,
                        ack: ack.take(),
                    };
                    crate::migrate::migrate_out_conn(vm, kind, handle.clone(), conn, &mut open)
                } else {
                    migrate_out_channels(
                        vm,
                        kind,
                        handle.clone(),
                        writer,
                        ack.as_mut().map(|r| r as &mut dyn Read),
                        &mut open,
                    )
                }
            }
            // Run the engine anyway so the handle (and query-migrate)
            // reports the failure like any other.
            (Ok(_), Err(e)) => migrate_out(vm, kind, handle.clone(), FailWriter(e), None),
        };
        drop(limit);
        self.outgoing_ended(&uri, result.map(|_| ()));
    }

    /// The phase after an outgoing migration.
    fn outgoing_ended(&self, uri: &Uri, result: Result<(), MigrateError>) {
        let phase = match result {
            Ok(()) => Phase::MigratedAway,
            Err(MigrateError::Migration(e @ MigrationError::Unconfirmed(_))) => {
                log::error!("outgoing migration to {uri}: {e}");
                Phase::Unconfirmed(e.to_string())
            }
            Err(e) => {
                log::warn!("outgoing migration to {uri}: {e} (the guest runs on)");
                Phase::Running
            }
        };
        self.set_phase(phase);
    }

    fn run_incoming(&self, listener: Incoming, handle: MigrationHandle) {
        let uri = match &listener {
            Incoming::Stream(l) => l.local_uri().to_string(),
            Incoming::Local(l) => l.local_uri().to_string(),
        };
        let result = match listener {
            Incoming::Stream(l) => self.load_incoming(l, &uri, &handle),
            Incoming::Local(l) => self.receive_local(l),
        };
        let mut st = lock(&self.inner.st);
        let ok = result.is_ok();
        match result {
            Ok(report) => {
                st.incoming = Some(report);
                st.phase = Phase::Running;
                handle.set_status(Status::Completed, None);
            }
            Err(e) => {
                log::warn!("incoming migration on {uri}: {e}");
                handle.set_status(Status::Failed, Some(e.clone()));
                st.phase = Phase::IncomingFailed(e);
            }
        }
        drop(st);
        if ok {
            self.emit("RESUME");
        }
        self.inner.cond.notify_all();
    }

    /// The destination of a local migration (mode `local`): the source's
    /// memory is taken over, not copied.
    fn receive_local(&self, listener: LocalListener) -> Result<IncomingReport, String> {
        let uri = listener.local_uri().to_string();
        let sock = listener.accept(IO_TIMEOUT).map_err(|e| e.to_string())?;
        // One migration per VM: stop listening (removes the socket).
        drop(listener);
        let t0 = Instant::now();
        let r = crate::migrate::receive_local(&self.inner.vm, &sock)
            .map_err(|e| livemig::error_chain(&e))?;
        Ok(IncomingReport {
            uri,
            stats: LoadStats {
                bytes: r.socket_bytes,
                ..LoadStats::default()
            },
            load_time: t0.elapsed().as_millis() as u64,
            verified: false,
        })
    }

    fn load_incoming(
        &self,
        listener: EndpointListener,
        uri: &str,
        handle: &MigrationHandle,
    ) -> Result<IncomingReport, String> {
        // A peer refused before any migration (a failed TLS handshake, a
        // bare connect-and-close) is logged; the wait goes on.
        let (inc, session) = listener
            .accept_source()
            .map_err(|e| livemig::error_chain(&e))?;
        if let Some(s) = &session {
            log::info!("incoming migration on {uri}: {s}");
        }
        let t0 = Instant::now();
        // Page channels of a multi-channel migration arrive on the same
        // listener after the main connection.
        let mut accept = || listener.accept_reader();
        // The destination's `postcopy-ram` lets the source switch; a
        // connection lost after the switch waits for `migrate-recover`.
        let postcopy = handle.params().postcopy_ram;
        let arrived = crate::migrate::receive_recoverable(
            &self.inner.vm,
            inc.reader,
            inc.ack,
            &mut accept,
            postcopy,
            Some(handle),
        )
        .map_err(|e| livemig::error_chain(&e));
        // One migration per VM: stop listening (removes a unix: socket).
        drop(listener);
        let arrived = arrived?;
        Ok(IncomingReport {
            uri: uri.to_string(),
            stats: arrived.load.stats,
            load_time: t0.elapsed().as_millis() as u64,
            verified: arrived.load.digest.is_some(),
        })
    }
}

/// The endpoint for `uri` with the TLS settings of `tls-creds` /
/// `tls-hostname` (the library chooses the transport).
fn endpoint(uri: &Uri, tls: Option<&MigrationTls>) -> Result<Endpoint, String> {
    let ep = Endpoint::new(uri.clone());
    match tls {
        None => Ok(ep),
        Some(t) => ep
            .with_tls_dir(&t.dir, t.hostname.as_deref())
            .map_err(|e| livemig::error_chain(&e)),
    }
}

impl MigrationStarter for ControlledVm {
    fn start_outgoing(
        &mut self,
        uri: &Uri,
        tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        // (The control server refuses TLS with local mode for both sides.)
        let ep = endpoint(uri, tls)?;
        let st = self.settle(lock(&self.inner.st));
        if let Some(e) = file::cannot_send(&st) {
            return Err(e);
        }
        let mut st = match &st.phase {
            Phase::Running if st.stopped => {
                return Err("the guest is stopped ('stop'): send 'cont' before migrating".into())
            }
            Phase::Running => st,
            Phase::AwaitingIncoming => {
                return Err(
                    "this VM waits for an incoming migration: it has no guest to send".into(),
                )
            }
            Phase::Incoming(u) => return Err(format!("this VM is receiving a migration on {u}")),
            Phase::Outgoing => return Err("a migration is still finishing".into()),
            Phase::MigratedAway => {
                return Err(
                    "the guest was migrated away: this VM stays paused and sends nothing more"
                        .into(),
                )
            }
            Phase::IncomingFailed(e) => {
                return Err(format!(
                    "the incoming migration failed ({e}): no guest here"
                ))
            }
            Phase::Unconfirmed(e) => {
                return Err(format!(
                    "{e}; send 'cont' first if the destination is not running the guest"
                ))
            }
        };
        let this = self.clone();
        let h = handle.clone();
        let worker = std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn(move || this.run_outgoing(ep, h))
            .map_err(|e| format!("starting the migration thread: {e}"))?;
        st.phase = Phase::Outgoing;
        st.worker = Some(worker);
        st.outgoing = Some(handle);
        Ok(())
    }

    fn run_state(&self) -> RunState {
        let st = lock(&self.inner.st);
        match &st.phase {
            Phase::Running if st.stopped => RunState::Paused,
            Phase::Running => RunState::Running,
            Phase::AwaitingIncoming | Phase::Incoming(_) | Phase::IncomingFailed(_) => {
                RunState::InMigrate
            }
            Phase::Outgoing => match st.outgoing.as_ref().map(|h| h.stats().status) {
                Some(Status::Device | Status::Completed) => RunState::FinishMigrate,
                _ => RunState::Running,
            },
            Phase::MigratedAway => RunState::PostMigrate,
            Phase::Unconfirmed(_) => RunState::Paused,
        }
    }

    fn stop(&mut self) -> Result<(), String> {
        let mut st = self.settle(lock(&self.inner.st));
        match &st.phase {
            Phase::Running => {
                self.inner.vm.pause().map_err(|e| e.to_string())?;
                st.stopped = true;
                Ok(())
            }
            Phase::Outgoing => {
                Err("a migration is running: it pauses the guest itself at the end".into())
            }
            p => Err(format!("no guest runs here ({p:?})")),
        }
    }

    fn cont(&mut self) -> Result<(), String> {
        let mut st = self.settle(lock(&self.inner.st));
        match &st.phase {
            Phase::Running if st.stopped => {
                self.inner.vm.resume();
                st.stopped = false;
                Ok(())
            }
            Phase::Unconfirmed(_) => {
                drop(st);
                ControlledVm::resume_unconfirmed(self)
            }
            Phase::AwaitingIncoming | Phase::Incoming(_) => Err(
                "this VM waits for an incoming migration: its guest starts when that completes"
                    .into(),
            ),
            p => Err(format!("nothing to resume here ({p:?})")),
        }
    }

    fn attach_events(&mut self, events: Events) {
        *lock(&self.inner.events) = Some(events);
    }

    fn start_snapshot(
        &mut self,
        path: &Path,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        self.snapshot_to_file(path, opts, handle)
    }

    fn start_restore(
        &mut self,
        path: &Path,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        self.restore_from_file(path, opts, handle)
    }

    fn start_incoming(
        &mut self,
        uri: &Uri,
        tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let ep = endpoint(uri, tls)?;
        let st = self.settle(lock(&self.inner.st));
        let mut st = match &st.phase {
            Phase::AwaitingIncoming => st,
            Phase::Incoming(u) => {
                return Err(format!("already waiting for an incoming migration on {u}"))
            }
            Phase::IncomingFailed(e) => {
                return Err(format!(
                    "an incoming migration already failed here ({e}): start a new VM"
                ))
            }
            _ => {
                return Err(
                    "this VM runs its own guest: an incoming migration needs a VM \
                     started for it (minivm run --incoming)"
                        .into(),
                )
            }
        };
        let (listener, local) = if handle.params().mode == MigrationMode::Local {
            let l = LocalListener::bind(uri).map_err(|e| e.to_string())?;
            let u = l.local_uri().to_string();
            (Incoming::Local(l), u)
        } else {
            let l = ep.listen().map_err(|e| livemig::error_chain(&e))?;
            let u = l.local_uri().to_string();
            (Incoming::Stream(l), u)
        };
        // Active from the answer on (not from when the thread first runs),
        // so a query right after `migrate-incoming` already says so.
        handle.set_status(Status::Active, None);
        let this = self.clone();
        let worker = std::thread::Builder::new()
            .name("migrate-in".into())
            .spawn(move || this.run_incoming(listener, handle))
            .map_err(|e| format!("starting the incoming thread: {e}"))?;
        st.phase = Phase::Incoming(local);
        st.worker = Some(worker);
        Ok(())
    }
}

/// What an incoming migration listens with.
enum Incoming {
    /// A stream of pages (mode `normal`), plain or TLS.
    Stream(EndpointListener),
    /// Memory handed over (mode `local`).
    Local(LocalListener),
}

/// A writer that fails with why the connection could not be made.
struct FailWriter(String);

impl Write for FailWriter {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other(self.0.clone()))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type Conn = (Box<dyn Write + Send>, Option<Box<dyn Read + Send>>);

/// Connects to the endpoint (TLS, shm, file: as the library's
/// [`Endpoint::connect`] does); a plain socket's I/O also notices a cancel
/// while the peer stalls.
fn connect_out(ep: &Endpoint, handle: &MigrationHandle) -> Result<Conn, String> {
    connect_with(ep, handle, false)
}

/// A further connection of the migration (page channel): over TLS its
/// handshake waits for its first write.
fn connect_channel(ep: &Endpoint, handle: &MigrationHandle) -> Result<Conn, String> {
    connect_with(ep, handle, true)
}

fn connect_with(ep: &Endpoint, handle: &MigrationHandle, channel: bool) -> Result<Conn, String> {
    fn wrap<S: Read + Write + Send + 'static>(s: S, clone: S, handle: &MigrationHandle) -> Conn {
        (
            Box::new(Cancellable::new(s, handle.clone())),
            Some(Box::new(Cancellable::new(clone, handle.clone()))),
        )
    }
    let uri = ep.uri();
    let err = |e: io::Error| format!("connect to {uri}: {e}");
    match uri {
        Uri::Tcp(addr) if ep.tls().is_none() => {
            let s = TcpStream::connect(addr).map_err(err)?;
            s.set_nodelay(true).map_err(err)?;
            s.set_read_timeout(Some(SLICE)).map_err(err)?;
            s.set_write_timeout(Some(SLICE)).map_err(err)?;
            let c = s.try_clone().map_err(err)?;
            Ok(wrap(s, c, handle))
        }
        Uri::Unix(path) if ep.tls().is_none() => {
            let s = UnixStream::connect(path).map_err(err)?;
            s.set_read_timeout(Some(SLICE)).map_err(err)?;
            s.set_write_timeout(Some(SLICE)).map_err(err)?;
            let c = s.try_clone().map_err(err)?;
            Ok(wrap(s, c, handle))
        }
        // TLS sockets time out on their own (IO_TIMEOUT); a cancel takes
        // effect at the next page. Shared memory waits for a slot in 20 ms
        // slices of its own and notices a dead peer at once, but does not
        // poll the cancel flag: against a destination that stalls with the
        // peer alive, a cancel takes effect when the wait for a slot ends
        // (IO_TIMEOUT at most).
        _ => {
            let out = if channel {
                ep.connect_channel()
            } else {
                ep.connect().map(|c| c.out)
            }
            .map_err(|e| livemig::error_chain(&e))?;
            Ok((out.writer, out.ack))
        }
    }
}

/// Socket I/O in [`SLICE`]s: a slice that times out is retried until
/// [`IO_TIMEOUT`] unless the migration was cancelled meanwhile.
struct Cancellable<S> {
    s: S,
    handle: MigrationHandle,
}

impl<S> Cancellable<S> {
    fn new(s: S, handle: MigrationHandle) -> Self {
        Cancellable { s, handle }
    }

    fn retry<T>(&mut self, mut op: impl FnMut(&mut S) -> io::Result<T>) -> io::Result<T> {
        let t0 = Instant::now();
        loop {
            match op(&mut self.s) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.handle.is_cancelled() {
                        // Not `Interrupted`: read_exact/write_all would retry.
                        return Err(io::Error::other("migration cancelled"));
                    }
                    if t0.elapsed() >= IO_TIMEOUT {
                        return Err(e);
                    }
                }
                r => return r,
            }
        }
    }
}

impl<S: Read> Read for Cancellable<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(|s| s.read(buf))
    }
}

impl<S: Write> Write for Cancellable<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(|s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.retry(|s| s.flush())
    }
}
