//! The destination in one call: take the source's connection, load over
//! every channel, answer the completion handshake, restore and start the
//! guest through the VMM's [`VmControl`], and say what happened. Postcopy
//! included: a destination that allows it ([`Destination::postcopy`])
//! places the pages that arrive after the switch (see `engine/postcopy`).
//!
//! ```text
//! main connection ─▶ postcopy allowed?  ─ no ─▶ load every channel (accepted as announced)
//!                          │ yes (one stream or channels) │
//!                          ▼                              ▼
//!              engine::postcopy (loads; at a switch:   restore_state ─▶ LOADED ─▶ GO
//!              uffd, restore, LOADED/GO, resume,        ─▶ resume ─▶ STARTED
//!              STARTED, places the rest)
//!   any failure before GO ─▶ FAILED + why to the source; the guest never runs here
//! ```
//!
//! Failure handling lives here once: a destination that never got GO
//! never calls [`VmControl::resume`]; every failure before GO reaches the
//! source with its reason (see `engine/ack.rs`).

use std::io::{self, Read};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ack::{Commit, CommitError};
use super::handle::MigrationHandle;
use super::loader::{LoadError, LoadOutcome, Loader};
use super::postcopy::{self, IncomingGuest, PostcopyFigures, ReceiveError};
use crate::memory::GuestMemory;
use crate::transport::{BoxRead, BoxWrite, Incoming, Listener, TransportError, IO_TIMEOUT};
use crate::vm::{VmControl, VmError};

/// Why an incoming migration did not end with the guest running here. In
/// every case but [`DestinationError::Resume`] and
/// [`DestinationError::Postcopy`] after the switch, the guest never ran
/// here and the source keeps (or resumes) its own.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// Waiting for the source's connection failed.
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
    /// Postcopy failed: refused at the switch (the source keeps its
    /// guest), or broke after it (see [`ReceiveError::SourceLost`]).
    #[error(transparent)]
    Postcopy(ReceiveError),
}

impl DestinationError {
    /// True when the guest may have run here (GO arrived): the source
    /// stays paused, and this copy is the one to keep or inspect.
    pub fn after_go(&self) -> bool {
        matches!(
            self,
            DestinationError::Resume(_)
                | DestinationError::Postcopy(ReceiveError::SourceLost { .. })
        )
    }
}

/// What an incoming migration produced: the guest runs here.
#[derive(Debug)]
pub struct Arrival {
    /// What the load read: device state (already restored), the digest
    /// both sides agreed on (verify mode), figures.
    pub load: LoadOutcome,
    /// From the first byte of the stream to the guest's resume.
    pub load_time: Duration,
    /// Postcopy figures, when the source switched to postcopy.
    pub postcopy: Option<PostcopyFigures>,
    /// STARTED could not be sent: the guest rightly runs here, but the
    /// source did not hear it and stays paused, saying it was not
    /// confirmed. `None` when the source heard it (or on a snapshot).
    pub unconfirmed: Option<io::Error>,
}

/// The receiving end of one migration into `mem`, whose guest `vm` runs.
///
/// ```no_run
/// # fn demo(mem: &dyn livemig::memory::GuestMemory, vm: &mut dyn livemig::vm::VmControl)
/// #     -> Result<(), Box<dyn std::error::Error>> {
/// use livemig::engine::Destination;
/// use livemig::transport::Listener;
/// let listener = Listener::bind(&"tcp:0.0.0.0:4444".parse()?)?;
/// let arrived = Destination::new(mem, vm).postcopy(true).accept_on(&listener)?;
/// println!("loaded {} bytes", arrived.load.stats.bytes);
/// # Ok(()) }
/// ```
pub struct Destination<'a> {
    mem: &'a dyn GuestMemory,
    vm: &'a mut dyn VmControl,
    postcopy: bool,
    recovery: Option<&'a MigrationHandle>,
    io_timeout: Duration,
    progress: Arc<AtomicU64>,
}

impl<'a> Destination<'a> {
    /// A destination for a migration into `mem`; its memory layout comes
    /// from here, never from the stream. `vm` restores the state the
    /// stream carries ([`VmControl::restore_state`]) and starts the guest
    /// ([`VmControl::resume`]) once the source said GO.
    pub fn new(mem: &'a dyn GuestMemory, vm: &'a mut dyn VmControl) -> Self {
        Destination {
            mem,
            vm,
            postcopy: false,
            recovery: None,
            io_timeout: IO_TIMEOUT,
            progress: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Allows the source to switch to postcopy (QEMU's `postcopy-ram` on
    /// the destination). Off by default: a source that switches is then
    /// refused at the switch, and keeps its guest.
    pub fn postcopy(mut self, on: bool) -> Self {
        self.postcopy = on;
        self
    }

    /// With postcopy: a connection lost after the switch does not lose
    /// the guest. The destination reports `postcopy-paused` on `handle`
    /// and waits for [`MigrationHandle::recover_postcopy`] to hand it the
    /// source's new connection (QMP `migrate-recover`); see
    /// [`postcopy::receive_recoverable`].
    pub fn recovery(mut self, handle: &'a MigrationHandle) -> Self {
        self.recovery = Some(handle);
        self
    }

    /// How long to wait for each page channel the source announced
    /// (default [`IO_TIMEOUT`]), with [`Destination::accept_on`].
    pub fn with_io_timeout(mut self, t: Duration) -> Self {
        self.io_timeout = t;
        self
    }

    /// Stream bytes loaded so far (all channels, precopy), readable from
    /// another thread while the migration runs.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// Accepts the source's main connection on `listener`, then its
    /// further connections (page channels, the postcopy urgent connection)
    /// as the stream announces them, each within the I/O timeout.
    pub fn accept_on(self, listener: &Listener) -> Result<Arrival, DestinationError> {
        let main = loop {
            match listener.accept_with_timeout(self.io_timeout) {
                Ok(m) => break m,
                // A probe that connects and sends nothing is not the source.
                Err(e @ TransportError::EmptyConnection { .. }) => {
                    log::warn!("refused a connection: {e}; still waiting");
                }
                Err(e) => return Err(DestinationError::Accept(e)),
            }
        };
        let t = self.io_timeout;
        self.run(main, &mut || {
            listener
                .accept_announced(t)
                .map(|i| i.reader)
                .map_err(io::Error::other)
        })
    }

    /// Runs the migration whose main connection is `main` (already
    /// accepted, over any transport: TLS, shm...); `accept` returns the
    /// reader of each further connection the stream announces.
    ///
    /// `Ok`: the guest was restored and resumed after the source's GO.
    /// An error: see [`DestinationError`].
    pub fn run(
        self,
        main: Incoming,
        accept: &mut dyn FnMut() -> io::Result<BoxRead>,
    ) -> Result<Arrival, DestinationError> {
        self.run_with(main.reader, main.ack, accept)
    }

    /// As [`Destination::run`] over any reader and return path (`None`: a
    /// snapshot file, no handshake).
    pub fn run_with<'r>(
        self,
        input: impl Read + Send + 'r,
        reply: Option<BoxWrite>,
        accept: &mut dyn FnMut() -> io::Result<BoxRead>,
    ) -> Result<Arrival, DestinationError> {
        let t0 = Instant::now();
        let r = if self.postcopy {
            self.receive(input, reply, accept, t0)
        } else {
            self.load_and_commit(input, reply, accept, t0)
        };
        // The load raised this thread for the pause (see `priority.rs`);
        // normally it is lowered at the resume already.
        super::priority::lower_this_thread();
        r
    }

    /// Precopy, over one stream or several channels.
    fn load_and_commit<'r>(
        self,
        input: impl Read + Send + 'r,
        reply: Option<BoxWrite>,
        accept: &mut dyn FnMut() -> io::Result<BoxRead>,
        t0: Instant,
    ) -> Result<Arrival, DestinationError> {
        let mut input = input;
        let mut loader = Loader::new(self.mem)
            .holding_priority()
            .sharing_progress(self.progress.clone())
            .expect_shape(self.vm.shape())
            .on_setup(self.vm.setup_hook());
        if let Some(w) = reply {
            // The setup verdict (ACCEPTED) goes out from inside the load.
            loader = loader.answering(w);
        }
        let loaded = loader
            .load_channels(Box::new(&mut input) as Box<dyn Read + Send + '_>, || {
                accept().map(|r| Box::new(r) as Box<dyn Read + Send + '_>)
            });
        let reply = loader.take_answer();
        drop(loader);
        let commit = match reply {
            Some(w) => Commit::new(input, w),
            None => Commit::none(),
        };
        let load = match loaded {
            Ok(l) => l,
            Err(e) => {
                commit.fail(&crate::error_chain(&e));
                return Err(e.into());
            }
        };
        if let Err(e) = self.vm.restore_state(&load.state) {
            commit.fail(&crate::error_chain(&e));
            return Err(DestinationError::Restore(e));
        }
        let go = commit.wait_go()?;
        // Without STARTED the source stays paused and says the migration
        // was not confirmed: one guest, and it never ran.
        let resumed = self.vm.resume();
        super::priority::lower_this_thread();
        resumed.map_err(DestinationError::Resume)?;
        let load_time = t0.elapsed();
        let unconfirmed = go.started().err();
        if let Some(e) = &unconfirmed {
            log::warn!(
                "the guest runs here, but STARTED did not reach the source ({e}): it stays paused"
            );
        }
        Ok(Arrival {
            load,
            load_time,
            postcopy: None,
            unconfirmed,
        })
    }

    /// Postcopy allowed (one stream or page channels): `engine::postcopy`
    /// runs it.
    fn receive<'r>(
        self,
        input: impl Read + Send + 'r,
        reply: Option<BoxWrite>,
        accept: &mut dyn FnMut() -> io::Result<BoxRead>,
        t0: Instant,
    ) -> Result<Arrival, DestinationError> {
        let mut guest = Guest {
            vm: self.vm,
            resumed: None,
        };
        let got = match self.recovery {
            Some(h) => postcopy::receive_recoverable(
                self.mem,
                input,
                reply,
                &mut guest,
                true,
                Some(accept),
                h,
            ),
            None => postcopy::receive(self.mem, input, reply, &mut guest, true, Some(accept)),
        };
        match got {
            Ok(r) => Ok(Arrival {
                load: r.load,
                load_time: guest.resumed.unwrap_or_else(Instant::now) - t0,
                postcopy: r.postcopy,
                unconfirmed: None,
            }),
            Err(ReceiveError::Load(e)) => Err(DestinationError::Load(e)),
            Err(ReceiveError::Commit(e)) => Err(DestinationError::Commit(e)),
            Err(ReceiveError::Restore(e)) => Err(DestinationError::Restore(e)),
            Err(ReceiveError::Resume(e)) => Err(DestinationError::Resume(e)),
            Err(e) => Err(DestinationError::Postcopy(e)),
        }
    }
}

/// The VMM as `engine::postcopy` drives it (notes when it resumed).
struct Guest<'v> {
    vm: &'v mut dyn VmControl,
    resumed: Option<Instant>,
}

impl IncomingGuest for Guest<'_> {
    fn restore(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.vm.restore_state(state)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        let r = self.vm.resume();
        self.resumed = Some(Instant::now());
        // The pause is over: postcopy's work runs at normal priority.
        super::priority::lower_this_thread();
        r
    }

    fn shape(&self) -> crate::vm::VmShape {
        self.vm.shape()
    }

    fn pause(&mut self) {
        // Threads waiting for a missing page stay blocked; the others stop.
        if let Err(e) = self.vm.pause() {
            log::warn!("pausing the guest after the source was lost: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;
    use crate::dirty::SoftwareTracker;
    use crate::engine::{
        memory_digest, MigrationError, MigrationHandle, MigrationStats, Params, Source, Status,
    };
    use crate::memory::ProcessMemory;
    use crate::testkit::workload::{fill_random, PageWriter};
    use crate::transport::{pipe, Outgoing, PipeReader, PipeWriter, Uri};
    use crate::vm::NoVm;

    const MIB: u64 = 1 << 20;

    fn layout() -> Vec<(&'static str, u64)> {
        vec![("ram0", 4 * MIB), ("ram1", 2 * MIB)]
    }

    /// A VMM that records what the destination asked of it.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<&'static str>,
        refuse_restore: Option<&'static str>,
    }

    impl VmControl for Recorder {
        fn pause(&mut self) -> Result<(), VmError> {
            self.calls.push("pause");
            Ok(())
        }
        fn resume(&mut self) -> Result<(), VmError> {
            self.calls.push("resume");
            Ok(())
        }
        fn restore_state(&mut self, _state: &[u8]) -> Result<(), VmError> {
            self.calls.push("restore");
            match self.refuse_restore {
                Some(why) => Err(VmError::restore_state(why)),
                None => Ok(()),
            }
        }
    }

    /// A source guest half filled with random bytes, and an empty
    /// destination of the same layout.
    fn memories() -> (ProcessMemory, ProcessMemory) {
        let src = ProcessMemory::new(&layout()).unwrap();
        let (_, log) = SoftwareTracker::new(&src);
        let writer: PageWriter = Arc::new(move |b, off, data| log.write(b, off, data));
        fill_random(&src.blocks()[..1], &writer, 11);
        (src, ProcessMemory::new(&layout()).unwrap())
    }

    fn pipes_out() -> (Outgoing, PipeReader, PipeWriter) {
        let (w, r) = pipe();
        let (ack_w, ack_r) = pipe();
        let out = Outgoing {
            writer: Box::new(w),
            ack: Some(Box::new(ack_r)),
        };
        (out, r, ack_w)
    }

    fn one_stream() -> io::Result<BoxRead> {
        Err(io::Error::other("one stream"))
    }

    /// Runs the source over `out`; `NoVm` as its guest.
    fn send(
        src: &ProcessMemory,
        params: Params,
        out: Outgoing,
    ) -> Result<MigrationStats, MigrationError> {
        let (mut tracker, _log) = SoftwareTracker::new(src);
        let handle = MigrationHandle::new(params.clone());
        if params.postcopy_ram {
            handle.start_postcopy().unwrap();
        }
        Source::new(src, &mut tracker, &mut NoVm, handle).run_over(out)
    }

    /// A destination thread over pipes with a [`Recorder`]: its result and
    /// the calls it made.
    fn receive_with(
        dst: &ProcessMemory,
        r: PipeReader,
        ack_w: PipeWriter,
        rec: Recorder,
        postcopy: bool,
    ) -> thread::JoinHandle<(Result<Arrival, DestinationError>, Vec<&'static str>)> {
        let dst = dst.clone();
        thread::spawn(move || {
            let mut rec = rec;
            let res = Destination::new(&dst, &mut rec)
                .postcopy(postcopy)
                .run_with(r, Some(Box::new(ack_w)), &mut one_stream);
            (res, rec.calls)
        })
    }

    fn same(a: &ProcessMemory, b: &ProcessMemory) -> bool {
        memory_digest(a) == memory_digest(b)
    }

    #[test]
    fn precopy_restores_then_resumes_after_go() {
        let (src, dst) = memories();
        let (out, r, ack_w) = pipes_out();
        let dest = receive_with(&dst, r, ack_w, Recorder::default(), false);
        let params = Params {
            verify: true,
            ..Params::default()
        };
        let stats = send(&src, params, out).expect("migration completes");
        assert_eq!(stats.status, Status::Completed);
        let (res, calls) = dest.join().unwrap();
        let arrived = res.expect("the guest runs here");
        assert_eq!(calls, ["restore", "resume"]);
        assert!(arrived.unconfirmed.is_none() && arrived.postcopy.is_none());
        assert!(arrived.load.digest.is_some(), "verified");
        assert!(same(&src, &dst));
    }

    #[test]
    fn a_refused_state_reaches_the_source_and_nothing_resumes() {
        let (src, dst) = memories();
        let (out, r, ack_w) = pipes_out();
        let rec = Recorder {
            refuse_restore: Some("vCPU state does not fit this VM"),
            ..Recorder::default()
        };
        let dest = receive_with(&dst, r, ack_w, rec, false);
        let e = send(&src, Params::default(), out).expect_err("the destination refuses");
        assert!(
            matches!(&e, MigrationError::Destination(m) if m.0.contains("vCPU state does not fit")),
            "{e}"
        );
        let (res, calls) = dest.join().unwrap();
        let de = res.expect_err("refused");
        assert!(matches!(de, DestinationError::Restore(_)), "{de}");
        assert!(!de.after_go());
        assert_eq!(calls, ["restore"], "never resumed");
    }

    #[test]
    fn without_go_the_guest_never_resumes() {
        // A source without a return path sends END and never says GO.
        let (src, dst) = memories();
        let (w, r) = pipe();
        let (ack_w, _ack_r) = pipe();
        let dest = receive_with(&dst, r, ack_w, Recorder::default(), false);
        let (mut tracker, _log) = SoftwareTracker::new(&src);
        let handle = MigrationHandle::new(Params::default());
        Source::new(&src, &mut tracker, &mut NoVm, handle)
            .run(w, None)
            .expect("the stream is sent");
        let (res, calls) = dest.join().unwrap();
        let e = res.expect_err("no GO");
        assert!(matches!(e, DestinationError::Commit(_)), "{e}");
        assert!(e.to_string().contains("never runs"), "{e}");
        assert_eq!(calls, ["restore"], "never resumed");
    }

    #[test]
    fn channels_over_a_listener_after_an_empty_connection() {
        let (src, dst) = memories();
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = listener.local_uri();
        let dst2 = dst.clone();
        let dest = thread::spawn(move || {
            Destination::new(&dst2, &mut NoVm)
                .with_io_timeout(Duration::from_secs(30))
                .accept_on(&listener)
        });
        // A peer that connects and closes: refused, the wait goes on.
        let Uri::Tcp(addr) = &uri else { unreachable!() };
        drop(std::net::TcpStream::connect(addr).unwrap());
        let (mut tracker, _log) = SoftwareTracker::new(&src);
        let handle = MigrationHandle::new(Params {
            channels: 3,
            verify: true,
            ..Params::default()
        });
        let stats = Source::new(&src, &mut tracker, &mut NoVm, handle)
            .run_to(&uri)
            .expect("migration completes");
        assert_eq!(stats.status, Status::Completed);
        let arrived = dest.join().unwrap().expect("the guest runs here");
        assert_eq!(arrived.load.stats.channels, 3);
        assert!(arrived.load.digest.is_some());
        assert!(same(&src, &dst));
    }

    /// A postcopy migration, switched at once, into a destination that
    /// allows postcopy or not: the source's result, the destination's, and
    /// the calls the destination made.
    fn postcopy_into(
        src: &ProcessMemory,
        dst: &ProcessMemory,
        allowed: bool,
    ) -> (
        Result<MigrationStats, MigrationError>,
        Result<Arrival, DestinationError>,
        Vec<&'static str>,
    ) {
        let (out, r, ack_w) = pipes_out();
        let dest = receive_with(dst, r, ack_w, Recorder::default(), allowed);
        let params = Params {
            postcopy_ram: true,
            ..Params::default()
        };
        let sent = send(src, params, out);
        let (res, calls) = dest.join().unwrap();
        (sent, res, calls)
    }

    #[test]
    fn postcopy_goes_through_the_same_call() {
        let (src, dst) = memories();
        let (sent, res, calls) = postcopy_into(&src, &dst, true);
        let stats = sent.expect("postcopy completes");
        assert_eq!(stats.status, Status::Completed);
        let arrived = res.expect("the guest runs here");
        let pc = arrived.postcopy.expect("the source switched");
        assert!(pc.discarded_pages > 0);
        assert_eq!(calls, ["restore", "resume"]);
        assert!(same(&src, &dst));
    }

    #[test]
    fn a_destination_without_postcopy_refuses_the_switch() {
        let (src, dst) = memories();
        let (sent, res, calls) = postcopy_into(&src, &dst, false);
        let e = sent.expect_err("refused at the switch");
        assert!(e.to_string().contains("postcopy"), "{e}");
        let de = res.expect_err("refused");
        assert!(
            matches!(
                de,
                DestinationError::Load(LoadError::Postcopy {
                    cause: crate::engine::PostcopyLoadError::NotAllowed,
                    ..
                })
            ),
            "{de}"
        );
        assert!(
            de.to_string().contains("engine::Destination::postcopy"),
            "{de}"
        );
        assert!(calls.is_empty(), "{calls:?}");
    }

    /// A VMM of a given vCPU count.
    struct Shaped(u32);

    impl VmControl for Shaped {
        fn pause(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn shape(&self) -> crate::vm::VmShape {
            crate::vm::VmShape { vcpus: self.0 }
        }
    }

    /// Counts what the source hands to the transport.
    struct Counting(PipeWriter, Arc<std::sync::atomic::AtomicU64>);

    impl io::Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }

    /// Migrates `src` (a guest of `src_vcpus`) into `dst` (of
    /// `dst_vcpus`): the source's result, the bytes it sent, the
    /// destination's result.
    fn shaped(
        src: &ProcessMemory,
        src_vcpus: u32,
        dst: &ProcessMemory,
        dst_vcpus: u32,
        params: Params,
    ) -> (
        Result<MigrationStats, MigrationError>,
        u64,
        Result<Arrival, DestinationError>,
    ) {
        let (w, r) = pipe();
        let (ack_w, ack_r) = pipe();
        let dst = dst.clone();
        let dest = thread::spawn(move || {
            Destination::new(&dst, &mut Shaped(dst_vcpus)).run_with(
                r,
                Some(Box::new(ack_w)),
                &mut one_stream,
            )
        });
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let out = Outgoing {
            writer: Box::new(Counting(w, sent.clone())),
            ack: Some(Box::new(ack_r)),
        };
        let (mut tracker, _log) = SoftwareTracker::new(src);
        let handle = MigrationHandle::new(params);
        let res = Source::new(src, &mut tracker, &mut Shaped(src_vcpus), handle).run_over(out);
        let got = dest.join().unwrap();
        (res, sent.load(std::sync::atomic::Ordering::Relaxed), got)
    }

    #[test]
    fn a_destination_of_another_size_refuses_before_any_page() {
        let (src, _) = memories();
        let dst = ProcessMemory::new(&[("ram0", 4 * MIB), ("ram1", 4 * MIB)]).unwrap();
        let (res, sent, got) = shaped(&src, 1, &dst, 1, Params::default());
        let e = res.expect_err("refused");
        assert!(matches!(e, MigrationError::Refused(_)), "{e}");
        let text = e.to_string();
        assert!(
            text.starts_with("the destination refused the migration before any page was sent: ")
                && text.contains("block 'ram1' is 2097152 bytes in the stream, 4194304 here"),
            "{text}"
        );
        assert!(sent < 4096, "{sent} bytes went before the refusal");
        let de = got.expect_err("the destination refuses");
        assert!(
            matches!(de, DestinationError::Load(LoadError::Layout { .. })),
            "{de}"
        );
    }

    #[test]
    fn another_vcpu_count_is_refused_at_setup_and_an_unsaid_one_is_not() {
        let (src, dst) = memories();
        let (res, sent, got) = shaped(&src, 4, &dst, 2, Params::default());
        let e = res.expect_err("refused");
        assert!(matches!(e, MigrationError::Refused(_)), "{e}");
        assert!(
            e.to_string()
                .ends_with("the source's VM has 4 vCPUs, this destination's 2"),
            "{e}"
        );
        assert!(sent < 4096, "{sent} bytes went before the refusal");
        let de = got.expect_err("the destination refuses");
        assert!(
            matches!(
                de,
                DestinationError::Load(LoadError::Vcpus {
                    source_vcpus: 4,
                    here: 2,
                    ..
                })
            ),
            "{de}"
        );
        // Either side not saying (0) is not checked; equal counts pass.
        for (a, b) in [(0, 2), (3, 0), (2, 2)] {
            let (res, sent, got) = shaped(&src, a, &dst, b, Params::default());
            res.unwrap_or_else(|e| panic!("{a} -> {b}: {e}"));
            got.unwrap_or_else(|e| panic!("{a} -> {b}: {e}"));
            assert!(sent > 2 * MIB, "{a} -> {b}: the memory went ({sent} bytes)");
        }
        assert!(same(&src, &dst));
    }

    /// A source VMM that says how busy its guest is.
    struct Loaded(Option<u32>);

    impl VmControl for Loaded {
        fn pause(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn vcpu_load(&self) -> Option<u32> {
            self.0
        }
    }

    /// A destination VMM whose setup hook records what the source said,
    /// and whether the memory was still empty then.
    struct Hooked {
        dst: ProcessMemory,
        seen: Arc<std::sync::Mutex<Vec<(crate::vm::SourceGuest, bool)>>>,
    }

    impl VmControl for Hooked {
        fn pause(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), VmError> {
            Ok(())
        }
        fn setup_hook(&self) -> Option<crate::vm::SetupHook> {
            let (dst, seen) = (self.dst.clone(), self.seen.clone());
            Some(Box::new(move |g| {
                let mut page = vec![0xffu8; 4096];
                let empty = dst.blocks().iter().all(|b| {
                    (0..b.len() as usize)
                        .step_by(4096)
                        .all(|o| b.region().read(o, &mut page) && page.iter().all(|&x| x == 0))
                });
                seen.lock().unwrap().push((*g, empty));
            }))
        }
    }

    #[test]
    fn the_setup_hook_hears_the_source_load_before_any_page() {
        for load in [Some(0), Some(300), None] {
            let (src, dst) = memories();
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (out, r, ack_w) = pipes_out();
            let mut hooked = Hooked {
                dst: dst.clone(),
                seen: seen.clone(),
            };
            let dest = thread::spawn(move || {
                Destination::new(&hooked.dst.clone(), &mut hooked).run_with(
                    r,
                    Some(Box::new(ack_w)),
                    &mut one_stream,
                )
            });
            let (mut tracker, _log) = SoftwareTracker::new(&src);
            let handle = MigrationHandle::new(Params::default());
            let res = Source::new(&src, &mut tracker, &mut Loaded(load), handle).run_over(out);
            res.unwrap_or_else(|e| panic!("{load:?}: {e}"));
            dest.join().unwrap().expect("the guest runs here");
            let seen = seen.lock().unwrap().clone();
            assert_eq!(
                seen,
                [(crate::vm::SourceGuest { vcpus: 0, load }, true)],
                "once, with the source's load, before any page"
            );
            assert!(same(&src, &dst));
        }
    }

    #[test]
    fn a_source_that_gives_up_tells_the_destination() {
        let (src, dst) = memories();
        let (out, r, ack_w) = pipes_out();
        let dest = receive_with(&dst, r, ack_w, Recorder::default(), false);
        let (mut tracker, _log) = SoftwareTracker::new(&src);
        // 1 MiB/s: 4 MiB of data cannot go before the cancel.
        let handle = MigrationHandle::new(Params {
            max_bandwidth: MIB,
            ..Params::default()
        });
        let h = handle.clone();
        let canceller = thread::spawn(move || {
            while h.stats().ram.transferred < 256 << 10 {
                thread::sleep(Duration::from_millis(5));
            }
            h.cancel();
        });
        let e = Source::new(&src, &mut tracker, &mut NoVm, handle)
            .run_over(out)
            .expect_err("cancelled");
        canceller.join().unwrap();
        assert!(matches!(e, MigrationError::Cancelled), "{e}");
        let (res, calls) = dest.join().unwrap();
        let de = res.expect_err("aborted");
        assert!(
            matches!(&de, DestinationError::Load(LoadError::SourceAborted { reason })
                if reason == "migration cancelled"),
            "{de}"
        );
        assert_eq!(de.to_string(), "source aborted: migration cancelled");
        assert!(calls.is_empty(), "nothing restored or resumed: {calls:?}");
    }

    #[test]
    fn an_unknown_version_or_feature_is_refused_at_setup_with_the_reason() {
        use crate::engine::{read_reply, Reply};
        use crate::stream::format::{FLAG_SETUP, HEADER_LEN, MAGIC, VERSION};
        use crate::stream::{BlockDesc, StreamWriter};
        let (_, dst) = memories();
        let descs: Vec<BlockDesc> = layout()
            .into_iter()
            .map(|(id, len)| BlockDesc { id: id.into(), len })
            .collect();
        // What a source of a later build might send: a feature bit this
        // build does not know, or a stream version it cannot read.
        let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
        w.block_list(&descs).unwrap();
        w.setup(1, 1 << 31).unwrap();
        w.section_end(0).unwrap();
        let feature = w.get_mut().clone();
        let mut version = feature.clone();
        version[8..10].copy_from_slice(&(VERSION + 1).to_be_bytes());
        assert_eq!(&version[..8], &MAGIC[..]);
        for (bytes, why) in [
            (
                feature,
                "needs features 0x80000000 this build does not know",
            ),
            (version, "stream version 2 is not supported"),
        ] {
            let (mut w, r) = pipe();
            let (ack_w, mut ack_r) = pipe();
            let dest = receive_with(&dst, r, ack_w, Recorder::default(), false);
            io::Write::write_all(&mut w, &bytes).unwrap();
            // The source would wait here for the verdict, no page sent.
            let reply = read_reply(&mut ack_r).unwrap();
            let Reply::Failed(text) = reply else {
                panic!("{reply:?}")
            };
            assert!(text.contains(why), "{text}");
            assert!(bytes.len() < HEADER_LEN + 64);
            drop(w);
            let (res, calls) = dest.join().unwrap();
            assert!(res.is_err());
            assert!(calls.is_empty(), "{calls:?}");
        }
    }
}
