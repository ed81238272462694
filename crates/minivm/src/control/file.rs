//! Snapshot files from the control socket: `migrate file:PATH` with the
//! `mapped-ram` or `background-snapshot` capability, and
//! `migrate-incoming file:PATH` of a mapped-ram file, eager or lazy
//! (`x-livemig-lazy`). See [`livemig::control::FileOptions`].
//!
//! - **mapped-ram save**: the guest pauses (`STOP`), its state and memory
//!   are written with several threads, `query-migrate` says `completed`
//!   and the VM stays paused for good ([`Phase::MigratedAway`]), as after
//!   any outgoing migration. A failed save resumes the guest (`RESUME`).
//! - **background snapshot**: the guest pauses only to re-arm write
//!   protection and save its state (`STOP` then `RESUME`), then runs on
//!   ([`Phase::Running`]) while memory is written.
//! - **restore**: the VM waiting for an incoming migration loads the file
//!   (every chunk checked) and its state, then resumes (`RESUME`).
//! - **lazy restore**: the guest resumes once its state is loaded;
//!   `query-migrate` says `postcopy-active` while memory is still served
//!   from the file, then `completed`. A damaged chunk makes it `failed`
//!   with the chunk named, and the VM goes to [`Phase::IncomingFailed`]:
//!   the guest is paused where it can be and never runs on bad memory
//!   (vCPUs touching the missing chunk stay blocked).
//!
//! Neither a save nor a restore looks at `migrate-cancel`: each runs to
//! its end (a mapped-ram save with the guest paused).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use livemig::control::FileOptions;
use livemig::engine::{LoadStats, MigrationHandle, Status};
use livemig::snapshot::{
    background_save_cancellable, record_save, save_cancellable, BackgroundOptions, LazyOptions,
    LazyRestore, LoadOptions, MappedRamFile, SaveOptions,
};
use livemig::vm::{VmControl, VmError};

use super::{lock, ControlledVm, IncomingReport, Phase, St};

/// Why this VM cannot send its guest now, if it cannot.
pub(super) fn cannot_send(st: &St) -> Option<String> {
    if let Some(h) = &st.restoring {
        if !h.stats().status.is_final() {
            return Some(
                "a lazy restore is still loading this guest's memory from its file: wait for \
                 query-migrate to say completed"
                    .into(),
            );
        }
    }
    match &st.phase {
        Phase::Running if st.stopped => {
            Some("the guest is stopped ('stop'): send 'cont' before migrating".into())
        }
        Phase::Running => None,
        Phase::AwaitingIncoming => {
            Some("this VM waits for an incoming migration: it has no guest to send".into())
        }
        Phase::Incoming(u) => Some(format!("this VM is receiving a migration on {u}")),
        Phase::Outgoing => Some("a migration is still finishing".into()),
        Phase::MigratedAway => {
            Some("the guest was migrated away: this VM stays paused and sends nothing more".into())
        }
        Phase::IncomingFailed(e) => Some(format!(
            "the incoming migration failed ({e}): no guest here"
        )),
        Phase::Unconfirmed(e) => Some(format!(
            "{e}; send 'cont' first if the destination is not running the guest"
        )),
    }
}

/// The VM's control for a background snapshot: the pause and resume also
/// send the `STOP` and `RESUME` events.
struct Announcing<'a> {
    vm: &'a ControlledVm,
    inner: crate::vm::VmHandle,
}

impl VmControl for Announcing<'_> {
    fn pause(&mut self) -> Result<(), VmError> {
        self.inner.pause()?;
        self.vm.emit("STOP");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.inner.resume()?;
        self.vm.emit("RESUME");
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.inner.save_state()
    }
}

impl ControlledVm {
    /// Whether the last outgoing migration or snapshot completed (a
    /// background snapshot completes with the guest running on).
    pub fn outgoing_completed(&self) -> bool {
        lock(&self.inner.st)
            .outgoing
            .as_ref()
            .is_some_and(|h| h.stats().status == Status::Completed)
    }

    /// `migrate file:PATH` with `mapped-ram` / `background-snapshot`.
    pub(super) fn snapshot_to_file(
        &self,
        path: &Path,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let mut st = self.settle(lock(&self.inner.st));
        if let Some(e) = cannot_send(&st) {
            return Err(e);
        }
        let this = self.clone();
        let (path, opts, h) = (path.to_path_buf(), opts.clone(), handle.clone());
        let worker = std::thread::Builder::new()
            .name("migrate-snapshot".into())
            .spawn(move || this.run_snapshot(&path, &opts, &h))
            .map_err(|e| format!("starting the snapshot thread: {e}"))?;
        st.phase = Phase::Outgoing;
        st.worker = Some(worker);
        st.outgoing = Some(handle);
        Ok(())
    }

    fn run_snapshot(&self, path: &Path, opts: &FileOptions, handle: &MigrationHandle) {
        let vm = &self.inner.vm;
        let t0 = Instant::now();
        let memory = vm.config().mem_size;
        handle.set_status(Status::Active, None);
        let result = if opts.background_snapshot {
            let mut control = Announcing {
                vm: self,
                inner: vm.control(),
            };
            let bo = BackgroundOptions {
                threads: opts.threads,
                instant_digest: false,
            };
            let cancelled = || handle.is_cancelled();
            background_save_cancellable(&*vm.memory(), path, &mut control, &bo, &cancelled)
                .map(|s| {
                    let pause = Duration::from_micros(s.pause_us);
                    record_save(
                        handle,
                        memory,
                        &s.save,
                        pause,
                        t0.elapsed(),
                        "userfaultfd write-protect (background snapshot)",
                    );
                    Phase::Running
                })
                .map_err(|e| livemig::error_chain(&e))
        } else {
            let so = SaveOptions {
                threads: opts.threads,
                direct_io: opts.direct_io,
            };
            let paused = Instant::now();
            match vm.pause() {
                Err(e) => Err(e.to_string()),
                Ok(()) => {
                    // STOP goes out with this status (the server's watch).
                    handle.set_status(Status::Device, None);
                    let saved = vm
                        .save_state()
                        .map_err(|e| livemig::error_chain(&e))
                        .and_then(|state| {
                            let cancelled = || handle.is_cancelled();
                            save_cancellable(&*vm.memory(), path, &state, &so, &cancelled)
                                .map_err(|e| livemig::error_chain(&e))
                        });
                    match saved {
                        Ok(s) => {
                            record_save(
                                handle,
                                memory,
                                &s,
                                paused.elapsed(),
                                t0.elapsed(),
                                "none (guest paused for the save)",
                            );
                            Ok(Phase::MigratedAway)
                        }
                        Err(e) => {
                            // The watch sends RESUME with the failure.
                            vm.resume();
                            Err(e)
                        }
                    }
                }
            }
        };
        // The phase first: a client that sees the final status finds the
        // guest where it stays (running on after a background snapshot).
        match result {
            Ok(p) => {
                self.set_phase(p);
                handle.set_status(Status::Completed, None);
            }
            Err(_) if handle.is_cancelled() => {
                // migrate-cancel: the guest runs on (resumed above after a
                // paused save), a file the save created is gone.
                log::info!(
                    "snapshot to {} cancelled (the guest runs on)",
                    path.display()
                );
                self.set_phase(Phase::Running);
                handle.set_status(Status::Cancelled, None);
            }
            Err(e) => {
                let e = format!("snapshot to {}: {e}", path.display());
                log::warn!("{e} (the guest runs on)");
                self.set_phase(Phase::Running);
                handle.set_status(Status::Failed, Some(e));
            }
        }
    }

    /// `migrate-incoming file:PATH` of a mapped-ram file.
    pub(super) fn restore_from_file(
        &self,
        path: &Path,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let mut st = self.settle(lock(&self.inner.st));
        match &st.phase {
            Phase::AwaitingIncoming => {}
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
                    "this VM runs its own guest: a restore needs a VM started for it \
                     (minivm run --incoming)"
                        .into(),
                )
            }
        }
        // Check the file against this VM before answering: a file that is
        // damaged in its header or laid out for another VM is the
        // command's error, and nothing was touched.
        let file = MappedRamFile::open_for(path, &*self.inner.vm.memory())
            .map_err(|e| format!("{}: {}", path.display(), livemig::error_chain(&e)))?;
        handle.set_status(Status::Active, None);
        let this = self.clone();
        let (p, o, h) = (path.to_path_buf(), opts.clone(), handle.clone());
        let worker = std::thread::Builder::new()
            .name("migrate-restore".into())
            .spawn(move || this.run_restore(file, p, &o, h))
            .map_err(|e| format!("starting the restore thread: {e}"))?;
        st.phase = Phase::Incoming(format!("file:{}", path.display()));
        st.worker = Some(worker);
        if opts.lazy {
            st.restoring = Some(handle);
        }
        Ok(())
    }

    fn run_restore(
        &self,
        file: MappedRamFile,
        path: PathBuf,
        opts: &FileOptions,
        handle: MigrationHandle,
    ) {
        let uri = format!("file:{}", path.display());
        let t0 = Instant::now();
        let vm = &self.inner.vm;
        let result = (|| -> Result<(Option<LazyRestore>, LoadStats), String> {
            let chain = |e: &(dyn std::error::Error + 'static)| livemig::error_chain(e);
            let state = file.state().map_err(|e| chain(&e))?;
            if state.is_empty() {
                return Err(
                    "the snapshot carries no vCPU state: it is a process-memory \
                     snapshot, not a VM's"
                        .into(),
                );
            }
            let memory = file.memory_bytes();
            if opts.lazy {
                let lazy = LazyRestore::start(file, &*vm.memory(), &LazyOptions::default())
                    .map_err(|e| chain(&e))?;
                vm.restore_state(&state).map_err(|e| chain(&e))?;
                let stats = LoadStats {
                    bytes: memory,
                    ..LoadStats::default()
                };
                Ok((Some(lazy), stats))
            } else {
                let s = file
                    .load_cancellable(
                        &*vm.memory(),
                        &LoadOptions {
                            threads: opts.threads,
                            fresh: false,
                        },
                        &|| handle.is_cancelled(),
                    )
                    .map_err(|e| chain(&e))?;
                vm.restore_state(&state).map_err(|e| chain(&e))?;
                let stats = LoadStats {
                    bytes: s.pages * livemig::PAGE_SIZE as u64,
                    zero_pages: s.zero_pages,
                    zero_pages_written: s.zero_pages_written,
                    raw_pages: s.pages,
                    ..LoadStats::default()
                };
                Ok((None, stats))
            }
        })();
        let mut st = lock(&self.inner.st);
        let (lazy, stats) = match result {
            Ok(r) => r,
            Err(e) => {
                let cancelled = handle.is_cancelled();
                let e = if cancelled {
                    format!("restoring {uri}: cancelled (migrate-cancel) with memory partly loaded")
                } else {
                    format!("restoring {uri}: {e}")
                };
                log::warn!("{e}");
                if cancelled {
                    handle.set_status(Status::Cancelled, None);
                } else {
                    handle.set_status(Status::Failed, Some(e.clone()));
                }
                st.phase = Phase::IncomingFailed(e);
                drop(st);
                self.inner.cond.notify_all();
                return;
            }
        };
        vm.resume();
        st.incoming = Some(IncomingReport {
            uri,
            stats,
            load_time: t0.elapsed().as_millis() as u64,
            // Every chunk is checked before it is placed; a lazy restore
            // has checked none yet.
            verified: lazy.is_none(),
        });
        st.phase = Phase::Running;
        handle.set_status(
            if lazy.is_some() {
                Status::PostcopyActive
            } else {
                Status::Completed
            },
            None,
        );
        drop(st);
        self.emit("RESUME");
        self.inner.cond.notify_all();
        if let Some(lazy) = lazy {
            // Follows the restore on a thread of its own (not the
            // worker, which `settle` joins under the lock).
            let this = self.clone();
            let spawned = std::thread::Builder::new()
                .name("lazy-restore".into())
                .spawn(move || this.follow_lazy(lazy, handle));
            if let Err(e) = spawned {
                log::error!("starting the lazy-restore watcher: {e}");
            }
        }
    }

    /// Watches a lazy restore until every chunk is in (`completed`) or it
    /// stops on an error (`failed`: the guest is paused, the VM never
    /// runs on).
    fn follow_lazy(&self, lazy: LazyRestore, handle: MigrationHandle) {
        loop {
            let s = lazy.status();
            if let Some(e) = s.error {
                let e = format!("lazy restore stopped, the guest will not run on: {e}");
                log::error!("{e}");
                handle.set_status(Status::Failed, Some(e.clone()));
                {
                    let mut st = lock(&self.inner.st);
                    st.phase = Phase::IncomingFailed(e);
                    st.restoring = None;
                }
                self.inner.cond.notify_all();
                // vCPUs blocked on the damaged chunk leave KVM_RUN only on
                // the pause's kick; the restore keeps the memory
                // registered for good, so none of them reads zeros.
                if let Err(e) = self.inner.vm.pause() {
                    log::error!("pausing the guest after the failed lazy restore: {e}");
                }
                // Keep the registration (the restore's drop does) and the
                // guest paused.
                drop(lazy);
                return;
            }
            if s.done {
                handle.set_status(Status::Completed, None);
                if let Some(r) = lock(&self.inner.st).incoming.as_mut() {
                    r.verified = true;
                }
                drop(lazy);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
