//! The destination in one call: accept the source's connection, load over
//! every channel, answer the completion handshake, restore and start the
//! guest through the VMM's [`VmTarget`], and say what happened.
//!
//! ```text
//! accept main connection ─▶ load (page channels accepted as announced)
//!     setup matches ─▶ READY        any error ─▶ FAILED + why, guest never runs
//!   ─▶ restore_state ─▶ LOADED ─▶ wait for GO ─▶ resume ─▶ STARTED
//! ```
//!
//! Failure handling lives here once: a destination that never got GO
//! never calls [`VmTarget::resume`]; every refusal reaches the source with
//! its reason (see `engine/ack.rs`).
//!
//! The phases are separate steps ([`Destination::run`] calls
//! `load`, then `commit`): a postcopy phase, which resumes the guest
//! before every page arrived and keeps loading on a thread, goes between
//! them without changing the caller's one call.

use std::io::{self, Read, Write};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ack::{Commit, CommitError};
use super::loader::{LoadError, LoadOutcome, Loader};
use crate::memory::GuestMemory;
use crate::transport::{Incoming, Listener, TransportError, Uri, IO_TIMEOUT};
use crate::vm::{VmError, VmTarget};

/// Why an incoming migration did not end with the guest running here. In
/// every case but [`DestinationError::Resume`] the guest never ran here
/// and the source keeps (or resumes) its own.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// Binding or accepting the source's connection failed.
    #[error("waiting for the source: {0}")]
    Accept(#[source] TransportError),
    /// The stream was refused or failed to load; the source was told why.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The VMM could not restore the device and vCPU state; the source was
    /// told why.
    #[error(transparent)]
    Restore(VmError),
    /// Loaded, but the source never said GO (or LOADED could not be sent).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The source said GO (it stays paused) but the guest could not be
    /// started here: it runs nowhere until an operator acts.
    #[error("the source said GO and stays paused, but starting the guest here failed: {0}")]
    Resume(#[source] VmError),
}

/// What an incoming migration produced: the guest runs here.
#[derive(Debug)]
pub struct Arrival {
    /// What the load read: device state, the digest both sides agreed on
    /// (verify mode), figures.
    pub load: LoadOutcome,
    /// From the first byte of the stream to the end of the load.
    pub load_time: Duration,
    /// STARTED could not be sent: the guest rightly runs here, but the
    /// source did not hear it and stays paused, saying it was not
    /// confirmed. `None` when the source heard it (or on a snapshot).
    pub unconfirmed: Option<io::Error>,
}

/// The receiving end of one migration into `mem`, whose guest `vm` runs.
pub struct Destination<'a> {
    mem: &'a dyn GuestMemory,
    vm: &'a mut dyn VmTarget,
    progress: Arc<AtomicU64>,
    io_timeout: Duration,
}

impl<'a> Destination<'a> {
    /// A destination for a migration into `mem`; memory layout and vCPU
    /// count come from here, never from the stream.
    pub fn new(mem: &'a dyn GuestMemory, vm: &'a mut dyn VmTarget) -> Self {
        Destination {
            mem,
            vm,
            progress: Arc::new(AtomicU64::new(0)),
            io_timeout: IO_TIMEOUT,
        }
    }

    /// How long to wait for each page channel the source announced
    /// (default [`IO_TIMEOUT`]).
    pub fn with_io_timeout(mut self, t: Duration) -> Self {
        self.io_timeout = t;
        self
    }

    /// Stream bytes read so far (all channels), readable from another
    /// thread while [`Destination::run`] runs.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// Binds `uri`, accepts one migration there and runs it (see
    /// [`Destination::accept_on`]).
    pub fn run_at(self, uri: &Uri) -> Result<Arrival, DestinationError> {
        let l = Listener::bind(uri).map_err(DestinationError::Accept)?;
        self.accept_on(&l)
    }

    /// Accepts the source's main connection on `listener`, then its page
    /// channels as the stream announces them (each within the I/O
    /// timeout), and runs the migration.
    pub fn accept_on(self, listener: &Listener) -> Result<Arrival, DestinationError> {
        let main = listener.accept().map_err(DestinationError::Accept)?;
        let t = self.io_timeout;
        self.run(main, || {
            listener
                .accept_announced(t)
                .map(|i| i.reader)
                .map_err(io::Error::other)
        })
    }

    /// Runs the migration whose main connection is `main` (already
    /// accepted, over any transport: TLS, shm...); `accept` returns the
    /// reader of each further connection (page channel) the stream
    /// announces.
    ///
    /// `Ok`: the guest was restored and resumed after the source's GO.
    /// An error: see [`DestinationError`]; the guest never ran here unless
    /// it is [`DestinationError::Resume`].
    pub fn run<R: Read + Send + 'static>(
        self,
        main: Incoming,
        accept: impl FnMut() -> io::Result<R>,
    ) -> Result<Arrival, DestinationError> {
        let Incoming { reader, mut ack } = main;
        let reply = ack.as_mut().map(|w| &mut **w as &mut (dyn Write + Send));
        self.run_with(reader, reply, accept)
    }

    /// As [`Destination::run`], over any reader and return path (`None`:
    /// a snapshot, no handshake) of a single-stream migration: a stream
    /// that announces page channels fails to load.
    pub fn run_single(
        self,
        input: impl Read + Send,
        reply: Option<&mut (dyn Write + Send)>,
    ) -> Result<Arrival, DestinationError> {
        self.run_with(input, reply, || -> io::Result<crate::transport::BoxRead> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this transport has one stream: the source must use one channel",
            ))
        })
    }

    /// As [`Destination::run`], over any reader and return path (`None`:
    /// a snapshot, no handshake), with `accept` bringing page channels.
    pub fn run_with<R: Read + Send + 'static>(
        self,
        input: impl Read + Send,
        reply: Option<&mut (dyn Write + Send)>,
        accept: impl FnMut() -> io::Result<R>,
    ) -> Result<Arrival, DestinationError> {
        let mut input = input;
        let mut reply = reply;
        let t0 = Instant::now();
        let loaded = self.load(
            &mut input,
            reply.as_mut().map(|w| &mut **w as &mut (dyn Write + Send)),
            accept,
        );
        let load_time = t0.elapsed();
        let commit = match reply {
            Some(w) => Commit::new(input, w),
            None => Commit::none(),
        };
        self.commit(commit, loaded, load_time)
    }

    /// Loads every channel (answering READY or FAILED on the way).
    fn load<R: Read + Send + 'static>(
        &self,
        input: &mut (dyn Read + Send),
        reply: Option<&mut (dyn Write + Send)>,
        mut accept: impl FnMut() -> io::Result<R>,
    ) -> Result<LoadOutcome, LoadError> {
        let mut loader = Loader::new(self.mem).sharing_progress(self.progress.clone());
        if let Some(n) = self.vm.vcpus() {
            loader = loader.expect_vcpus(n);
        }
        if let Some(w) = reply {
            loader = loader.with_return_path(w);
        }
        loader.load_channels(Box::new(input) as Box<dyn Read + Send + '_>, || {
            accept().map(|r| Box::new(r) as Box<dyn Read + Send + '_>)
        })
    }

    /// Restores the state, answers LOADED, waits for GO, resumes, says
    /// STARTED; or FAILED when the load or the restore failed.
    fn commit(
        self,
        commit: Commit<'_>,
        loaded: Result<LoadOutcome, LoadError>,
        load_time: Duration,
    ) -> Result<Arrival, DestinationError> {
        // The loader told the source about its own failures.
        let load = loaded?;
        if let Err(e) = self.vm.restore_state(&load.state) {
            commit.fail(&crate::error_chain(&e));
            return Err(DestinationError::Restore(e));
        }
        let go = commit.wait_go()?;
        if let Err(e) = self.vm.resume() {
            go.failed(&crate::error_chain(&e));
            return Err(DestinationError::Resume(e));
        }
        let unconfirmed = go.started().err();
        if let Some(e) = &unconfirmed {
            log::warn!(
                "the guest runs here, but STARTED did not reach the source ({e}): it stays paused"
            );
        }
        Ok(Arrival {
            load,
            load_time,
            unconfirmed,
        })
    }
}
