//! The destination's side of postcopy: one call that loads a migration,
//! runs the completion handshake and, when the source switches to
//! postcopy, places the remaining pages with userfaultfd while the guest
//! runs.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::runs::{Run, RunKind};
use super::{write_bitmap, write_message, FaultReport, LatencyHistogram, Message, PageRequest};
use crate::bitmap::DirtyBitmap;
use crate::codec::compress::{Algorithm, Decompressor};
use crate::engine::ack::{read_go, write_reply, CommitError, Reply as AckReply, ReplyError};
use crate::engine::handle::Reconnect;
use crate::engine::loader::{LoadError, LoadOutcome, LoadStats, Loader, PostcopyLoadError};
use crate::engine::{MigrationHandle, Status};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::stream::format::{FLAG_CHANNELS, FLAG_URGENT, FLAG_VERIFY};
use crate::stream::{Record, StreamReader};
use crate::sys::uffd::{
    empty_pages, Uffd, UffdMsg, Waker, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_THREAD_ID,
};
use crate::transport::{BoxRead, Incoming};
use crate::vm::VmError;

const PAGE: u64 = PAGE_SIZE as u64;

/// The guest on the destination, as [`receive`] drives it.
pub trait IncomingGuest {
    /// Loads the device and vCPU state the stream carried (empty for plain
    /// process memory). Called before the guest may run.
    fn restore(&mut self, state: &[u8]) -> Result<(), VmError>;
    /// Starts the guest (after the source's GO).
    fn resume(&mut self) -> Result<(), VmError>;
    /// Stops the guest after the source was lost during postcopy. Threads
    /// waiting for a missing page stay blocked for good; the others stop.
    fn pause(&mut self);
    /// The VM's shape, checked against the source's at setup (default:
    /// not said, not checked).
    fn shape(&self) -> crate::vm::VmShape {
        crate::vm::VmShape::default()
    }
}

/// What [`receive`] did.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// The load's figures and device state (the state is already restored).
    pub load: LoadOutcome,
    /// Postcopy figures, when the source switched to postcopy.
    pub postcopy: Option<PostcopyFigures>,
}

/// The destination's postcopy figures.
#[derive(Clone, Debug, Default)]
pub struct PostcopyFigures {
    /// Pages the source said were not valid here at the switch.
    pub discarded_pages: u64,
    /// Pages placed after the switch.
    pub placed_pages: u64,
    /// Page requests sent.
    pub requests: u64,
    /// Fault latencies and blocktime.
    pub faults: FaultReport,
    /// Milliseconds from the switch record to the last page.
    pub postcopy_time: u64,
    /// Pages that came on the urgent connection (postcopy-preempt).
    pub urgent_pages: u64,
    /// Pages that came on the page channels (background pages of a
    /// migration with `channels` above 1).
    pub channel_pages: u64,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream failed to load before the guest ran here (the source
    /// keeps its guest).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The device state was refused (the source keeps its guest).
    #[error("the device state was refused (the source keeps its guest): {0}")]
    Restore(#[source] VmError),
    /// No GO (the source keeps its guest; this copy never ran).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The source switched to postcopy but this destination does not allow it.
    #[error("the source switched to postcopy, but postcopy-ram is off on this destination; the source keeps the guest")]
    PostcopyOff,
    /// Setting up userfaultfd failed (the source keeps its guest).
    #[error("preparing guest memory for postcopy: {0}")]
    Setup(#[source] io::Error),
    /// Resuming the guest failed after GO.
    #[error("after GO: {0}")]
    Resume(#[source] VmError),
    /// The migration broke during postcopy: the guest ran here with part
    /// of its memory still on the source and cannot go on. Its threads
    /// that touch a missing page wait for good; it is paused.
    #[error("lost the source during postcopy with {missing} pages still only there ({cause}): the guest cannot continue and cannot be saved (it is paused here, and its missing memory stays unavailable)")]
    SourceLost {
        /// Pages that never arrived.
        missing: u64,
        /// What broke.
        #[source]
        cause: LostCause,
    },
}

/// What broke a postcopy migration after the guest ran on the destination
/// ([`ReceiveError::SourceLost`]).
#[derive(Debug, thiserror::Error)]
pub enum LostCause {
    /// The main stream failed.
    #[error("the main stream failed: {0}")]
    Stream(#[source] LoadError),
    /// Postcopy was paused after a failure, then given up (cancelled)
    /// before any recovery.
    #[error("{0} (postcopy was paused, then given up before any recovery)")]
    GaveUp(#[source] Box<LostCause>),
    /// The stream ended before every page arrived (the urgent connection
    /// or a page channel failed, when one did).
    #[error("the stream ended before every page arrived{}", .0.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Incomplete(#[source] Option<ConnectionError>),
    /// Polling userfaultfd for faults failed.
    #[error("polling userfaultfd: {0}")]
    PollFaults(#[source] io::Error),
    /// Reading userfaultfd's fault messages failed.
    #[error("reading userfaultfd: {0}")]
    ReadFaults(#[source] io::Error),
    /// Placing a zero page for a fault failed.
    #[error("placing a zero page at {addr:#x}: {source}")]
    ZeroPage {
        /// The page's host address.
        addr: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A page request could not be sent to the source.
    #[error("sending a page request to the source: {0}")]
    Request(#[source] io::Error),
}

/// A connection besides the main stream: the urgent connection
/// (postcopy-preempt) or a page channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// The urgent connection.
    Urgent,
    /// Page channel `n` (1-based: the main stream is channel 0).
    Channel(usize),
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connection::Urgent => f.write_str("the urgent connection"),
            Connection::Channel(n) => write!(f, "page channel {n}"),
        }
    }
}

/// Why the urgent connection or a page channel failed during postcopy.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Its thread could not start.
    #[error("starting {0}'s thread: {1}")]
    Spawn(Connection, #[source] io::Error),
    /// Its stream failed.
    #[error("{0} failed: {1}")]
    Stream(Connection, #[source] LoadError),
    /// Its thread panicked.
    #[error("{0}'s thread panicked")]
    Panicked(Connection),
}

/// Receives one migration into `mem` from `input`, answering on `reply`
/// (the return path; `None` for a snapshot file, which cannot postcopy).
///
/// Precopy: loads everything, restores the device state, sends LOADED,
/// waits for GO, resumes the guest, sends STARTED. Postcopy (the source
/// switched, and `allow_postcopy`): at the switch registers guest memory
/// with userfaultfd, drops the pages the source marked, restores the
/// device state, runs the same handshake, resumes the guest, then places
/// every remaining page (requested ones first, by the source's choice)
/// until the stream ends; faults are served by a thread that asks the
/// source for the page.
///
/// `accept` returns the next connection on the destination's listener:
/// the urgent connection of a source with `postcopy-preempt` (header flag
/// `FLAG_URGENT`) is accepted right after the switch. `None` refuses such
/// a source.
pub fn receive<R: Read>(
    mem: &dyn GuestMemory,
    input: R,
    reply: Option<Box<dyn Write + Send>>,
    guest: &mut dyn IncomingGuest,
    allow_postcopy: bool,
    accept: Option<&mut dyn FnMut() -> io::Result<Box<dyn Read + Send>>>,
) -> Result<Received, ReceiveError> {
    let r = receive_inner(mem, input, reply, guest, allow_postcopy, accept, None);
    // A drain answer raised this thread for the pause (see
    // `engine/priority.rs`).
    crate::engine::priority::lower_this_thread();
    r
}

/// As [`receive`], and a connection lost during postcopy does not lose
/// the guest: the destination reports `postcopy-paused` on `recovery`
/// (its guest runs on; a thread that touches a missing page waits) until
/// [`MigrationHandle::recover_postcopy`] hands it the source's new
/// connection; it then sends its received bitmap and asks again for the
/// pages its threads wait for (see the module doc). While paused,
/// [`MigrationHandle::cancel`] gives the guest up
/// ([`ReceiveError::SourceLost`]). The status also shows
/// `postcopy-active` and `postcopy-recover` as postcopy goes.
pub fn receive_recoverable<R: Read>(
    mem: &dyn GuestMemory,
    input: R,
    reply: Option<Box<dyn Write + Send>>,
    guest: &mut dyn IncomingGuest,
    allow_postcopy: bool,
    accept: Option<&mut dyn FnMut() -> io::Result<Box<dyn Read + Send>>>,
    recovery: &MigrationHandle,
) -> Result<Received, ReceiveError> {
    let r = receive_inner(
        mem,
        input,
        reply,
        guest,
        allow_postcopy,
        accept,
        Some(recovery),
    );
    crate::engine::priority::lower_this_thread();
    r
}

type Reply = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

/// Most pages a fault on a page that is valid here but was never touched
/// fills with zeros at once (it and the valid pages after it): 2 MiB.
/// Before, a vCPU sweeping through such memory faulted on every page,
/// each fault waiting for this thread (~30-60 µs under load).
pub(super) const LOCAL_ZERO_PAGES: u64 = 512;

fn receive_inner<R: Read>(
    mem: &dyn GuestMemory,
    input: R,
    reply: Option<Box<dyn Write + Send>>,
    guest: &mut dyn IncomingGuest,
    allow_postcopy: bool,
    accept: Option<&mut dyn FnMut() -> io::Result<Box<dyn Read + Send>>>,
    recovery: Option<&MigrationHandle>,
) -> Result<Received, ReceiveError> {
    let mut reply = reply;
    let fail = |reply: &mut Option<Box<dyn Write + Send>>, why: &str| {
        if let Some(w) = reply.as_mut() {
            let _ = write_reply(&mut **w, &AckReply::Failed(why.to_string()));
        }
    };
    let mut loader = Loader::new(mem);
    let mut r = match StreamReader::new(input) {
        Ok(r) => r,
        Err(e) => {
            let e = LoadError::from(e);
            fail(&mut reply, &crate::error_chain(&e));
            return Err(e.into());
        }
    };
    let verify = r.flags() & FLAG_VERIFY != 0;
    let wants_urgent = r.flags() & FLAG_URGENT != 0;
    let channels = r.flags() & FLAG_CHANNELS != 0;
    let mut accept = accept;
    // The urgent connection (postcopy-preempt) comes right after the main
    // stream's start, long before any switch (and before page channels).
    let mut early_urgent = None;
    if let (true, Some(accept)) = (wants_urgent, accept.as_mut()) {
        match accept()
            .map_err(|source| PostcopyLoadError::AcceptUrgent { source })
            .and_then(|c| {
                open_urgent(c).map_err(|e| PostcopyLoadError::OpenUrgent {
                    source: Box::new(e),
                })
            }) {
            Ok(u) => early_urgent = Some(u),
            Err(cause) => {
                fail(&mut reply, &crate::error_chain(&cause));
                return Err(ReceiveError::Load(LoadError::Postcopy {
                    offset: r.offset(),
                    cause,
                }));
            }
        }
    }
    // The setup verdict goes out on the return path from inside the load.
    loader = loader.expect_shape(guest.shape());
    if let Some(w) = reply.take() {
        loader = loader.answering(w);
    }
    // Page channels (postcopy's background pages follow on them after
    // the switch).
    let mut page_streams: Vec<StreamReader<Box<dyn Read + Send>>> = Vec::new();
    let loaded = if channels {
        match accept.as_mut() {
            Some(acc) => loader
                .load_channels_until_switch(r, acc)
                .map(|(o, main, streams)| {
                    page_streams = streams;
                    (o, main)
                }),
            None => Err(LoadError::Channel {
                channel: 0,
                offset: r.offset(),
                what: "the source announced page channels, but this destination accepts no further connection".into(),
            }),
        }
    } else {
        loader.load_until_switch(&mut r).map(|o| (o, r))
    };
    reply = loader.take_answer();
    let (o, mut r) = match loaded {
        Ok(v) => v,
        Err(e) => {
            fail(&mut reply, &crate::error_chain(&e));
            return Err(e.into());
        }
    };
    if !o.switched {
        let out = match loader.finish_precopy(verify, o) {
            Ok(out) => out,
            Err(e) => {
                fail(&mut reply, &crate::error_chain(&e));
                return Err(e.into());
            }
        };
        if let Err(e) = guest.restore(&out.state) {
            fail(&mut reply, &crate::error_chain(&e));
            return Err(ReceiveError::Restore(e));
        }
        if let Some(w) = reply.as_mut() {
            write_reply(&mut **w, &AckReply::Loaded).map_err(CommitError::SendLoaded)?;
            let inner = r
                .inner_if_drained()
                .ok_or(CommitError::NoGo(ReplyError::BytesBeforeGo))?;
            read_go(inner).map_err(CommitError::NoGo)?;
        }
        let go_at = Instant::now();
        guest.resume().map_err(ReceiveError::Resume)?;
        if let Some(w) = reply.as_mut() {
            if let Err(e) = write_reply(&mut **w, &AckReply::Started(Some(go_at.elapsed()))) {
                log::warn!("GO received but STARTED could not be sent ({e}): the guest runs here, the source stays paused");
            }
        }
        return Ok(Received {
            load: out,
            postcopy: None,
        });
    }

    // The switch.
    let switched_at = Instant::now();
    let Some(mut w) = reply.take() else {
        return Err(ReceiveError::Load(LoadError::Postcopy {
            offset: r.offset(),
            cause: PostcopyLoadError::NoReturnPath,
        }));
    };
    if !allow_postcopy {
        let e = ReceiveError::PostcopyOff;
        fail(&mut Some(w), &e.to_string());
        return Err(e);
    }
    let placer = match Placer::new(mem, &o.map, &o.discard) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let e = ReceiveError::Setup(e);
            fail(&mut Some(w), &crate::error_chain(&e));
            return Err(e);
        }
    };
    let discarded = placer.missing();
    let mut urgent = None;
    if wants_urgent {
        let checked = match early_urgent {
            None => Err(PostcopyLoadError::NoUrgent),
            Some((u, list)) => same_blocks(mem, &o.map, &list)
                .map(|()| u)
                .map_err(|()| PostcopyLoadError::UrgentBlocks),
        };
        match checked {
            Ok(u) => urgent = Some(u),
            Err(cause) => {
                placer.release();
                fail(&mut Some(w), &crate::error_chain(&cause));
                return Err(ReceiveError::Load(LoadError::Postcopy {
                    offset: r.offset(),
                    cause,
                }));
            }
        }
    }
    if let Err(e) = guest.restore(&o.state) {
        placer.release();
        fail(&mut Some(w), &crate::error_chain(&e));
        return Err(ReceiveError::Restore(e));
    }
    let go = write_reply(&mut *w, &AckReply::Loaded)
        .map_err(CommitError::SendLoaded)
        .and_then(|()| {
            let inner = r
                .inner_if_drained()
                .ok_or(CommitError::NoGo(ReplyError::BytesBeforeGo))?;
            read_go(inner).map_err(CommitError::NoGo)
        });
    if let Err(e) = go {
        placer.release();
        return Err(e.into());
    }
    let go_at = Instant::now();

    // GO: the guest is ours. Requests go out only after STARTED (the
    // fault thread needs the return path's lock, held until then).
    let reply: Reply = Arc::new(Mutex::new(Some(w)));
    let stop = Arc::new(AtomicBool::new(false));
    let waker = Arc::new(Waker::new().map_err(ReceiveError::Setup)?);
    let fault_err: Arc<Mutex<Option<LostCause>>> = Arc::default();
    let gate = lock(&reply);
    let recoverable = recovery.is_some();
    let thread = {
        let (p, reply, stop, waker, err) = (
            placer.clone(),
            reply.clone(),
            stop.clone(),
            waker.clone(),
            fault_err.clone(),
        );
        std::thread::Builder::new()
            .name("livemig-postcopy-faults".into())
            .spawn(move || {
                if let Err(e) = fault_loop(&p, &stop, &waker, &reply, recoverable) {
                    *lock(&err) = Some(e);
                }
            })
            .map_err(ReceiveError::Setup)?
    };
    let mut gate = Some(gate);
    let stop_thread = |gate: &mut Option<MutexGuard<'_, Option<Box<dyn Write + Send>>>>| {
        gate.take();
        stop.store(true, Ordering::SeqCst);
        let _ = waker.wake();
    };
    if let Err(e) = guest.resume() {
        // The guest never ran: nothing was lost, the source may resume
        // (it got GO, so it stays paused and reports STARTED missing).
        stop_thread(&mut gate);
        let _ = thread.join();
        placer.release();
        return Err(ReceiveError::Resume(e));
    }
    if let Some(Some(g)) = gate.as_mut().map(|g| g.as_mut()) {
        if let Err(e) = write_reply(&mut **g, &AckReply::Started(Some(go_at.elapsed()))) {
            log::warn!("STARTED could not be sent ({e}); postcopy goes on");
        }
    }
    gate.take();
    if let Some(h) = recovery {
        h.set_status(Status::PostcopyActive, None);
    }

    let mut stats = o.stats;
    let mut urgent_pages = 0;
    let mut urgent_failed = None;
    let mut channel_failed: Option<ConnectionError> = None;
    let mut channel_pages = 0;
    let mut recoveries = 0;
    let result = {
        // Flow control: how much of each background stream was read here.
        let report = |stream: u16| {
            let reply = reply.clone();
            move |offset: u64| {
                if let Some(w) = lock(&reply).as_mut() {
                    // A broken return path is noticed by the fault thread
                    // and the streams themselves.
                    let _ = write_message(&mut **w, &Message::Progress { stream, offset });
                }
            }
        };
        // The urgent connection and the page channels, each on a thread
        // of its own (not scoped: after a recovery their old connections
        // may hang half-open, and completion does not wait for them).
        // A thread that cannot start drops its connection: the source
        // sees it fail, and the pages it would have carried are missing
        // (reported below) unless a recovery sends them again.
        // With recovery, a connection of the current generation that
        // fails tells the source (LOST): it may not notice the cut before
        // its last page, and this side would wait for pages lost with it.
        let generation = Arc::new(AtomicU64::new(0));
        let lost = |stream: u16| {
            let (reply, generation) = (reply.clone(), generation.clone());
            let born = generation.load(Ordering::SeqCst);
            move || {
                if !recoverable || generation.load(Ordering::SeqCst) != born {
                    return;
                }
                if let Some(w) = lock(&reply).as_mut() {
                    let _ = write_message(&mut **w, &Message::Lost { stream });
                }
            }
        };
        let mut t = urgent.and_then(|u| {
            match spawn_placer(u, placer.clone(), |_| {}, lost(super::URGENT_STREAM)) {
                Ok(t) => Some(t),
                Err(e) => {
                    urgent_failed = Some(ConnectionError::Spawn(Connection::Urgent, e));
                    None
                }
            }
        });
        let mut chans = Vec::new();
        for (i, c) in page_streams.into_iter().enumerate() {
            match spawn_placer(c, placer.clone(), report(i as u16 + 1), lost(i as u16 + 1)) {
                Ok(t) => chans.push((i, t)),
                Err(e) => {
                    channel_failed
                        .get_or_insert(ConnectionError::Spawn(Connection::Channel(i + 1), e));
                }
            }
        }
        let mut main =
            place_stream(&mut r, &placer, &mut stats, &report(0)).map_err(LostCause::Stream);
        // Threads of connections given up at a recovery: not waited for
        // unless they ended (every page they carried went again).
        let mut old_t = Vec::new();
        let mut old_chans = Vec::new();
        if let Some(h) = recovery {
            // Every failure of the main stream pauses; a new connection
            // resumes from the received bitmap.
            while let Err(cause) = main {
                match pause_and_recover(h, mem, &o.map, &placer, &reply, &cause) {
                    Some(Resumed {
                        main: mut resumed,
                        urgent,
                        channels,
                    }) => {
                        recoveries += 1;
                        generation.fetch_add(1, Ordering::SeqCst);
                        old_t.extend(t.take());
                        old_chans.append(&mut chans);
                        // The reopened urgent connection and page channels.
                        if let Some(u) = urgent {
                            match spawn_placer(
                                u,
                                placer.clone(),
                                |_| {},
                                lost(super::URGENT_STREAM),
                            ) {
                                Ok(h) => t = Some(h),
                                Err(e) => {
                                    urgent_failed =
                                        Some(ConnectionError::Spawn(Connection::Urgent, e))
                                }
                            }
                        }
                        for (i, c) in channels.into_iter().enumerate() {
                            match spawn_placer(
                                c,
                                placer.clone(),
                                report(i as u16 + 1),
                                lost(i as u16 + 1),
                            ) {
                                Ok(h) => chans.push((i, h)),
                                Err(e) => {
                                    channel_failed.get_or_insert(ConnectionError::Spawn(
                                        Connection::Channel(i + 1),
                                        e,
                                    ));
                                }
                            }
                        }
                        let mut rs = LoadStats::default();
                        main = place_stream(&mut resumed, &placer, &mut rs, &report(0))
                            .map_err(LostCause::Stream);
                        stats.raw_pages += rs.raw_pages;
                        stats.zero_pages += rs.zero_pages;
                        stats.compressed_pages += rs.compressed_pages;
                        stats.bytes += rs.bytes;
                    }
                    None => {
                        main = Err(LostCause::GaveUp(Box::new(cause)));
                        break;
                    }
                }
            }
        } else if main.is_err() && (t.is_some() || !chans.is_empty()) {
            // Tell the source now: it closes the urgent connection and the
            // page channels.
            if let Some(w) = lock(&reply).as_mut() {
                let _ = write_message(
                    &mut **w,
                    &Message::Failed("the destination's main stream failed".into()),
                );
            }
        }
        // After a recovery, old connections that have not ended are not
        // waited for: every page they carried went again on the new ones.
        // Nor are the current ones when the main stream failed for good.
        let detach = main.is_err();
        let urgents = old_t
            .into_iter()
            .filter_map(|t| joinable(t, true))
            .chain(t.and_then(|t| joinable(t, detach)));
        for t in urgents {
            match t.join() {
                Ok((r, us)) => {
                    urgent_pages += us.raw_pages + us.zero_pages + us.compressed_pages;
                    stats.raw_pages += us.raw_pages;
                    stats.zero_pages += us.zero_pages;
                    stats.compressed_pages += us.compressed_pages;
                    stats.bytes += us.bytes;
                    // After a recovery the old urgent connection just ends.
                    urgent_failed = r
                        .err()
                        .map(|e| ConnectionError::Stream(Connection::Urgent, e));
                }
                Err(_) => urgent_failed = Some(ConnectionError::Panicked(Connection::Urgent)),
            }
        }
        let chans = old_chans
            .into_iter()
            .map(|c| (c, true))
            .chain(chans.into_iter().map(|c| (c, detach)));
        for ((i, c), detach) in chans {
            let Some(c) = joinable(c, detach) else {
                continue;
            };
            match c.join() {
                Ok((r, cs)) => {
                    channel_pages += cs.raw_pages + cs.zero_pages + cs.compressed_pages;
                    stats.raw_pages += cs.raw_pages;
                    stats.zero_pages += cs.zero_pages;
                    stats.compressed_pages += cs.compressed_pages;
                    stats.bytes += cs.bytes;
                    // After a recovery the old page channels just end.
                    if let Err(e) = r {
                        channel_failed
                            .get_or_insert(ConnectionError::Stream(Connection::Channel(i + 1), e));
                    }
                }
                Err(_) => {
                    channel_failed
                        .get_or_insert(ConnectionError::Panicked(Connection::Channel(i + 1)));
                }
            }
        }
        main
    };
    if recoveries > 0 {
        log::info!("postcopy recovered {recoveries} time(s)");
    }
    stop_thread(&mut gate);
    let _ = thread.join();
    let fault_failed = lock(&fault_err).take();
    let missing = placer.missing();
    let cause = match (result, fault_failed) {
        (Err(e), _) => Some(e),
        (Ok(()), Some(e)) => Some(e),
        (Ok(()), None) if missing > 0 => {
            Some(LostCause::Incomplete(urgent_failed.or(channel_failed)))
        }
        (Ok(()), None) => None,
    };
    if let Some(cause) = cause {
        guest.pause();
        if let Some(w) = lock(&reply).as_mut() {
            let _ = write_message(&mut **w, &Message::Failed(crate::error_chain(&cause)));
        }
        // Keep missing memory registered for good: a guest thread must
        // never read a missing page as zeros.
        placer.abandon();
        return Err(ReceiveError::SourceLost { missing, cause });
    }
    placer.release();
    let mut figures = placer.figures(discarded, switched_at);
    figures.urgent_pages = urgent_pages;
    figures.channel_pages = channel_pages;
    let sent = match lock(&reply).as_mut() {
        Some(w) => write_message(&mut **w, &Message::Complete(figures.faults.clone())),
        None => Err(io::Error::other("the return path was lost")),
    };
    if let Err(e) = sent {
        log::warn!("every page arrived but COMPLETE could not be sent to the source: {e}");
    }
    Ok(Received {
        load: LoadOutcome {
            state: o.state,
            digest: None,
            stats,
        },
        postcopy: Some(figures),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stream's block list: (id, length) in stream order.
type BlockList = Vec<(String, u64)>;

/// Reads a connection's stream start: header and block list.
fn open_urgent<C: Read>(conn: C) -> Result<(StreamReader<C>, BlockList), LoadError> {
    let mut u = StreamReader::new(conn)?;
    let at = u.offset();
    let Record::BlockList(list) = u.next_record()? else {
        return Err(LoadError::Postcopy {
            offset: at,
            cause: PostcopyLoadError::NoBlockList,
        });
    };
    let list = list.iter().map(|d| (d.id.clone(), d.len)).collect();
    Ok((u, list))
}

/// Whether `list` is the main stream's block list (`map`: stream block →
/// memory block).
fn same_blocks(mem: &dyn GuestMemory, map: &[usize], list: &[(String, u64)]) -> Result<(), ()> {
    let blocks = mem.blocks();
    let same = list.len() == map.len()
        && list
            .iter()
            .zip(map)
            .all(|((id, len), &i)| blocks[i].id() == id && blocks[i].len() == *len);
    if same {
        Ok(())
    } else {
        Err(())
    }
}

/// Reads the block list that must come next on a reopened connection
/// and checks it against the migration's. Errors start with `at` and the
/// byte offset; `missing` says what is wrong when another record comes.
fn expect_same_blocks<R: Read>(
    r: &mut StreamReader<R>,
    mem: &dyn GuestMemory,
    map: &[usize],
    at: &str,
    missing: &str,
) -> Result<(), String> {
    let offset = r.offset();
    let record = r
        .next_record()
        .map_err(|e| crate::error_chain(&LoadError::from(e)))?;
    let Record::BlockList(list) = record else {
        return Err(format!("{at} {offset}: {missing}"));
    };
    let list: BlockList = list.iter().map(|d| (d.id.clone(), d.len)).collect();
    same_blocks(mem, map, &list)
        .map_err(|()| format!("{at} {offset}: the block list differs from the migration's"))
}

/// The connections of a resumed postcopy.
pub(super) struct Resumed {
    pub(super) main: StreamReader<BoxRead>,
    /// The urgent connection, when the source reopened it.
    pub(super) urgent: Option<StreamReader<BoxRead>>,
    /// The page channels' streams (channel i + 1 at i), past their
    /// POSTCOPY record, when the source reopened them.
    pub(super) channels: Vec<StreamReader<BoxRead>>,
}

/// Postcopy paused after `cause`: waits for a new connection on `h`,
/// then resumes over it (received bitmap out, pending requests again).
/// Returns the new streams, or `None` when the guest was given up.
fn pause_and_recover(
    h: &MigrationHandle,
    mem: &dyn GuestMemory,
    map: &[usize],
    placer: &Placer,
    reply: &Reply,
    cause: &LostCause,
) -> Option<Resumed> {
    // The old return path is dead: the fault thread stops sending on it
    // and only records which pages its threads wait for.
    lock(reply).take();
    let cause = crate::error_chain(cause);
    log::warn!(
        "postcopy paused with {} pages still on the source: {cause}; waiting for migrate-recover",
        placer.missing()
    );
    h.set_status(Status::PostcopyPaused, Some(cause));
    loop {
        let (conn, mut accept) = match h.take_reconnect() {
            Reconnect::In(c, accept) => (c, accept),
            _ => {
                if h.is_cancelled() {
                    return None;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        h.set_status(Status::PostcopyRecover, None);
        match resume_in(conn, accept.as_mut(), mem, map, placer, reply) {
            Ok(r) => {
                h.set_status(Status::PostcopyActive, None);
                log::info!(
                    "postcopy resumed: {} pages still to come, {} page channels, {} urgent connection",
                    placer.missing(),
                    r.channels.len(),
                    if r.urgent.is_some() { "an" } else { "no" }
                );
                return Some(r);
            }
            Err(e) => {
                log::warn!("postcopy recovery failed: {e}; still paused");
                h.set_status(Status::PostcopyPaused, Some(e));
            }
        }
    }
}

/// The destination's half of the recovery handshake on `conn`: the
/// stream start, the urgent connection and the page channels the source
/// announces (accepted with `accept`, each checked like the first time),
/// then the received bitmap and the requests again. A refusal goes to
/// the source as FAILED (it stays paused too).
fn resume_in(
    conn: Incoming,
    accept: Option<&mut crate::engine::handle::AcceptConnection>,
    mem: &dyn GuestMemory,
    map: &[usize],
    placer: &Placer,
    reply: &Reply,
) -> Result<Resumed, String> {
    let Incoming { reader, ack } = conn;
    let Some(mut ack) = ack else {
        return Err("the recovery connection has no return path".into());
    };
    let opened = open_resumed(reader, accept, mem, map);
    let resumed = match opened {
        Ok(r) => r,
        Err(why) => {
            let _ = write_message(&mut *ack, &Message::Failed(why.clone()));
            return Err(why);
        }
    };
    // Under the lock: no request goes out before the bitmap.
    let mut g = lock(reply);
    write_bitmap(&mut *ack, &placer.received_words())
        .map_err(|e| format!("sending the received bitmap: {e}"))?;
    for (block, page) in placer.waited_pages() {
        write_message(
            &mut *ack,
            &Message::Request(PageRequest {
                block: block as u16,
                offset: page * PAGE,
                len: PAGE as u32,
            }),
        )
        .map_err(|e| format!("asking again for the pages threads wait for: {e}"))?;
    }
    *g = Some(ack);
    Ok(resumed)
}

/// Reads a resumed migration's stream start on `reader` and accepts the
/// further connections it announces.
pub(super) fn open_resumed(
    reader: BoxRead,
    accept: Option<&mut crate::engine::handle::AcceptConnection>,
    mem: &dyn GuestMemory,
    map: &[usize],
) -> Result<Resumed, String> {
    let chain = |e: LoadError| crate::error_chain(&e);
    let mut r = StreamReader::new(reader).map_err(|e| chain(e.into()))?;
    let wants_urgent = r.flags() & FLAG_URGENT != 0;
    let mut channels = None;
    if r.flags() & FLAG_CHANNELS != 0 {
        let at = r.offset();
        match r.next_record().map_err(|e| chain(e.into()))? {
            Record::Channel {
                index: 0,
                channels: n,
                session,
            } => channels = Some((n, session)),
            Record::Channel { index, .. } => {
                return Err(format!(
                    "recovery connection byte {at}: it declares channel {index}, the first connection must be the main channel 0"
                ))
            }
            _ => unreachable!("the reader requires a channel record first"),
        }
    }
    expect_same_blocks(
        &mut r,
        mem,
        map,
        "recovery connection byte",
        "the stream must start with the block list",
    )?;
    let mut resumed = Resumed {
        main: r,
        urgent: None,
        channels: Vec::new(),
    };
    if !wants_urgent && channels.is_none() {
        return Ok(resumed);
    }
    let Some(accept) = accept else {
        return Err(
            "the source reopens its urgent connection or page channels, but this destination was given no listener to accept them (recover with an acceptor)".into(),
        );
    };
    if wants_urgent {
        let c = accept().map_err(|e| format!("accepting the reopened urgent connection: {e}"))?;
        let (u, list) = open_urgent(c).map_err(chain)?;
        if same_blocks(mem, map, &list).is_err() {
            return Err(
                "the reopened urgent connection's block list differs from the migration's".into(),
            );
        }
        resumed.urgent = Some(u);
    }
    if let Some((n, session)) = channels {
        let mut slots: Vec<Option<StreamReader<BoxRead>>> = (0..n).map(|_| None).collect();
        for k in 1..=n {
            let c = accept().map_err(|e| {
                format!("accepting reopened connection {k} of {n} page channels: {e}")
            })?;
            let (index, cr) = open_resumed_channel(c, n, session, mem, map)
                .map_err(|e| format!("reopened connection {k} of {n} page channels: {e}"))?;
            match usize::from(index).checked_sub(1).map(|i| &mut slots[i]) {
                Some(slot @ None) => *slot = Some(cr),
                _ => {
                    return Err(format!(
                        "reopened connection {k}: page channel index {index} used twice or 0"
                    ))
                }
            }
        }
        resumed.channels = slots.into_iter().flatten().collect();
    }
    Ok(resumed)
}

/// A reopened page channel: its stream start (channel record of this
/// session and count, the same block list), read up to its POSTCOPY
/// record. Returns its index.
pub(super) fn open_resumed_channel(
    conn: BoxRead,
    n: u16,
    session: u64,
    mem: &dyn GuestMemory,
    map: &[usize],
) -> Result<(u16, StreamReader<BoxRead>), String> {
    let chain = |e: LoadError| crate::error_chain(&e);
    let mut cr = StreamReader::new(conn).map_err(|e| chain(e.into()))?;
    if cr.flags() & FLAG_CHANNELS == 0 {
        return Err("not a page channel (no channel flag in its header)".into());
    }
    let at = cr.offset();
    let Record::Channel {
        index,
        channels,
        session: s,
    } = cr.next_record().map_err(|e| chain(e.into()))?
    else {
        unreachable!("the reader requires a channel record first");
    };
    if s != session {
        return Err(format!(
            "byte {at}: session {s:#x} is not this recovery's ({session:#x})"
        ));
    }
    if channels != n || index > n {
        return Err(format!(
            "byte {at}: channel {index} of {channels}, the main connection declares {n}"
        ));
    }
    expect_same_blocks(
        &mut cr,
        mem,
        map,
        "byte",
        "the block list must follow the channel record",
    )?;
    loop {
        let at = cr.offset();
        match cr.next_record().map_err(|e| chain(e.into()))? {
            Record::SectionEnd { .. } => {}
            Record::Postcopy => return Ok((index, cr)),
            _ => {
                return Err(format!(
                    "byte {at}: a reopened page channel must switch to postcopy before any page"
                ))
            }
        }
    }
}

/// Places the pages that follow the switch until END.
///
/// `progress` gets the bytes read so far at the start and after every
/// [`super::PROGRESS_EVERY`] bytes (at section ends): the source's flow
/// control for background streams (see the module doc).
fn place_stream<R: Read>(
    r: &mut StreamReader<R>,
    p: &Placer,
    stats: &mut LoadStats,
    progress: &dyn Fn(u64),
) -> Result<(), LoadError> {
    let mut reported = r.offset();
    progress(reported);
    let mut dec = Decompressor::new();
    // Consecutive pages gathered for one ioctl (see `runs.rs`), placed at
    // every section end, at a gap, and before anything else.
    let mut run = Run::default();
    let place_run = |run: &mut Run, at: u64| -> Result<(), LoadError> {
        if let Some(t) = run.take() {
            p.place_run(t.block, t.first, t.pages, t.data)
                .map_err(|source| LoadError::Postcopy {
                    offset: at,
                    cause: PostcopyLoadError::Place {
                        block: t.block,
                        start: t.first * PAGE,
                        end: (t.first + t.pages) * PAGE,
                        source,
                    },
                })?;
        }
        run.clear();
        Ok(())
    };
    loop {
        let at = r.offset();
        let record = r.next_record()?;
        let page = match &record {
            Record::Zero { block, offset } => Some((*block, *offset, RunKind::Zero)),
            Record::Raw { block, offset, .. } | Record::Compressed { block, offset, .. } => {
                Some((*block, *offset, RunKind::Data))
            }
            _ => None,
        };
        if let Some((block, offset, kind)) = page {
            let (b, pg) = (usize::from(block), offset / PAGE);
            if b >= p.spans.len() || offset >= p.spans[b].len {
                return Err(LoadError::Postcopy {
                    offset: at,
                    cause: PostcopyLoadError::OutsideMemory { block, offset },
                });
            }
            if !run.extends(b, pg, kind) {
                place_run(&mut run, at)?;
            }
            match record {
                Record::Zero { .. } => {
                    stats.zero_pages += 1;
                    run.push(b, pg, kind, |_| Ok::<(), LoadError>(()))?;
                }
                Record::Raw { data, .. } => {
                    stats.raw_pages += 1;
                    run.push(b, pg, kind, |d| {
                        if data.len() != d.len() {
                            return Err(LoadError::Postcopy {
                                offset: at,
                                cause: PostcopyLoadError::NotAPage {
                                    block,
                                    offset,
                                    len: data.len(),
                                },
                            });
                        }
                        d.copy_from_slice(data);
                        Ok(())
                    })?;
                }
                Record::Compressed { algo, data, .. } => {
                    stats.compressed_pages += 1;
                    let algo = Algorithm::from_u8(algo).expect("reader checked the algorithm id");
                    let res = run.push(b, pg, kind, |d| dec.decompress(algo, data, d));
                    if let Err(source) = res {
                        return Err(LoadError::Decompress {
                            offset: r.offset(),
                            record: r.record(),
                            block: format!("index {block}"),
                            page_offset: offset,
                            source,
                        });
                    }
                }
                _ => unreachable!("only page records have a page"),
            }
            continue;
        }
        // Anything else places what was gathered first.
        place_run(&mut run, at)?;
        match record {
            Record::SectionEnd { .. } => {
                stats.sections += 1;
                if r.offset() - reported >= super::PROGRESS_EVERY {
                    reported = r.offset();
                    progress(reported);
                }
            }
            Record::End => break,
            Record::Abort(reason) => {
                // The source pauses postcopy (recovery) or gives up.
                return Err(LoadError::SourceAborted {
                    reason: reason.to_string(),
                });
            }
            other => {
                let what = match other {
                    Record::Xbzrle { .. } => "xbzrle page (the destination has no copy to patch)",
                    Record::State(_) => "device state",
                    Record::Digest(_) => "digest",
                    Record::Discard { .. } => "discard",
                    Record::BlockList(_) => "block list",
                    _ => "record",
                };
                return Err(LoadError::Postcopy {
                    offset: at,
                    cause: PostcopyLoadError::AfterSwitch { what },
                });
            }
        }
    }
    stats.bytes = r.offset();
    Ok(())
}

type Placed = (Result<(), LoadError>, LoadStats);

/// Places the pages of one background or urgent stream on a thread.
fn spawn_placer(
    mut stream: StreamReader<Box<dyn Read + Send>>,
    placer: Arc<Placer>,
    progress: impl Fn(u64) + Send + 'static,
    lost: impl FnOnce() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<Placed>> {
    std::thread::Builder::new()
        .name("livemig-postcopy-place".into())
        .spawn(move || {
            let mut st = LoadStats::default();
            let r = place_stream(&mut stream, &placer, &mut st, &progress);
            if r.is_err() {
                lost();
            }
            (r, st)
        })
}

/// `t`, unless `detach` and it is still running (then it is left to end
/// by itself, its connection's read timeout at the latest).
fn joinable(
    t: std::thread::JoinHandle<Placed>,
    detach: bool,
) -> Option<std::thread::JoinHandle<Placed>> {
    if detach && !t.is_finished() {
        log::info!("an old postcopy connection is still open after a recovery: not waited for");
        None
    } else {
        Some(t)
    }
}

/// One stream block's memory here.
struct Span {
    host: u64,
    len: u64,
}

/// Fault bookkeeping shared by the fault thread and the placing thread.
#[derive(Default)]
struct Waits {
    /// Pages a guest thread waits for: when it faulted, which thread.
    pending: HashMap<(usize, u64), Vec<(Instant, u32)>>,
    hist: LatencyHistogram,
    per_thread: HashMap<u32, u64>,
    blocktime_us: u64,
    requests: u64,
    /// Faults served here with zeros (see [`LOCAL_ZERO_PAGES`]), the pages
    /// they filled, and the µs from reading each to waking its thread.
    local_faults: u64,
    local_pages: u64,
    local_us: u64,
}

/// Places pages with userfaultfd and tracks which have arrived.
pub(crate) struct Placer {
    uffd: Uffd,
    spans: Vec<Span>,
    /// One bit per page, per stream block: set once the page is valid here
    /// (valid at the switch, or placed since).
    received: Vec<Vec<AtomicU64>>,
    missing: AtomicU64,
    placed: AtomicU64,
    waits: Mutex<Waits>,
    released: AtomicBool,
}

impl Placer {
    /// Registers every block (stream order `map`) for missing faults, then
    /// drops the pages `discard` marks, so that they fault.
    fn new(mem: &dyn GuestMemory, map: &[usize], discard: &[DirtyBitmap]) -> io::Result<Placer> {
        let uffd = Uffd::open()?;
        if uffd.api(UFFD_FEATURE_THREAD_ID).is_err() {
            // The API call is allowed once per fd: start again without ids.
            let u = Uffd::open()?;
            u.api(0)?;
            return Self::with_uffd(u, mem, map, discard);
        }
        Self::with_uffd(uffd, mem, map, discard)
    }

    fn with_uffd(
        uffd: Uffd,
        mem: &dyn GuestMemory,
        map: &[usize],
        discard: &[DirtyBitmap],
    ) -> io::Result<Placer> {
        let blocks = mem.blocks();
        let mut spans = Vec::new();
        let mut received = Vec::new();
        let mut missing = 0;
        for (&d, bm) in map.iter().zip(discard) {
            let region = blocks[d].region();
            let span = Span {
                host: region.host_addr(),
                len: region.len() as u64,
            };
            uffd.register_missing(span.host, span.len)?;
            let bits: Vec<AtomicU64> = bm.words().iter().map(|w| AtomicU64::new(!w)).collect();
            // A stale page left in a memfd would never fault and would
            // shadow what the source sends (its copy and zero ioctls fail
            // on a page that is there, and a zero page pushed after the
            // switch is only marked received).
            let file_backed = blocks[d].backing().is_some();
            for (first, n) in runs(bm) {
                empty_pages(file_backed, span.host + first * PAGE, n * PAGE)?;
                missing += n;
            }
            spans.push(span);
            received.push(bits);
        }
        Ok(Placer {
            uffd,
            spans,
            received,
            missing: AtomicU64::new(missing),
            placed: AtomicU64::new(0),
            waits: Mutex::default(),
            released: AtomicBool::new(false),
        })
    }

    fn missing(&self) -> u64 {
        self.missing.load(Ordering::SeqCst)
    }

    fn is_received(&self, block: usize, page: u64) -> bool {
        let w = self.received[block][(page / 64) as usize].load(Ordering::Acquire);
        w & (1 << (page % 64)) != 0
    }

    /// How many pages from `page` on (at most `max`, not past the block)
    /// are received here, `page` included (which must be).
    fn received_run(&self, block: usize, page: u64, max: u64) -> u64 {
        let end = (self.spans[block].len / PAGE).min(page + max);
        let mut q = page + 1;
        while q < end && self.is_received(block, q) {
            q += 1;
        }
        q - page
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|s| addr >= s.host && addr < s.host + s.len)
            .map(|b| (b, (addr - self.spans[b].host) / PAGE))
    }

    /// Places `n` pages from `first` (`data` their `n` pages of bytes,
    /// zeros for `None`), skipping those already here: one ioctl per
    /// stretch of pages still missing (see `runs.rs`), each waking the
    /// threads that wait on its pages.
    ///
    /// Zeros need no ioctl: a page not received yet holds nothing here
    /// (dropped at the switch, and only a placement fills it, which sets
    /// its bit), so it reads as zeros already. Setting its bit is enough;
    /// a thread that touches it later gets zeros from the fault thread
    /// (as for a page that was valid and never touched), and one that
    /// already waits for it gets them here.
    fn place_run(&self, block: usize, first: u64, n: u64, data: Option<&[u8]>) -> io::Result<()> {
        let end = first + n;
        let host = self.spans[block].host;
        if let Some(d) = data {
            let mut p = first;
            while p < end {
                if self.is_received(block, p) {
                    p += 1;
                    continue;
                }
                let mut e = p + 1;
                while e < end && !self.is_received(block, e) {
                    e += 1;
                }
                // Pages already there (a fault served with zeros, or
                // another stream's copy, raced us) are skipped by the
                // ioctl's loop.
                let bytes = &d[((p - first) * PAGE) as usize..((e - first) * PAGE) as usize];
                self.uffd.copy_run(host + p * PAGE, bytes)?;
                p = e;
            }
        }
        let mut newly = Vec::new();
        let mut p = first;
        while p < end {
            // The run's bits within one word, at once.
            let word = (p / 64) as usize;
            let upto = end.min((p / 64 + 1) * 64);
            let lo = p % 64;
            let span = upto - p;
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << lo
            };
            let was = self.received[block][word].fetch_or(mask, Ordering::AcqRel);
            // Placed concurrently by another stream (after a recovery, an
            // old connection's last pages race the resent ones): once.
            let mut fresh = mask & !was;
            while fresh != 0 {
                newly.push(word as u64 * 64 + u64::from(fresh.trailing_zeros()));
                fresh &= fresh - 1;
            }
            p = upto;
        }
        if newly.is_empty() {
            return Ok(());
        }
        let k = newly.len() as u64;
        self.missing.fetch_sub(k, Ordering::SeqCst);
        self.placed.fetch_add(k, Ordering::Relaxed);
        let mut waited = Vec::new();
        let mut w = lock(&self.waits);
        if !w.pending.is_empty() {
            for page in newly {
                if let Some(waiters) = w.pending.remove(&(block, page)) {
                    if data.is_none() {
                        waited.push(page);
                    }
                    for (t, tid) in waiters {
                        let us = t.elapsed().as_micros() as u64;
                        w.hist.record(us);
                        *w.per_thread.entry(tid).or_default() += us;
                        w.blocktime_us += us;
                    }
                }
            }
        }
        drop(w);
        // Zeros for the threads that wait (the fault thread may fill the
        // same page: the second fill finds it there).
        for page in waited {
            let addr = host + page * PAGE;
            self.uffd.zero_run(addr, PAGE)?;
            self.uffd.wake(addr, PAGE)?;
        }
        Ok(())
    }

    /// The received bitmap, per stream block.
    fn received_words(&self) -> Vec<Vec<u64>> {
        self.received
            .iter()
            .map(|b| b.iter().map(|w| w.load(Ordering::Acquire)).collect())
            .collect()
    }

    /// Pages a guest thread waits for.
    fn waited_pages(&self) -> Vec<(usize, u64)> {
        let mut v: Vec<(usize, u64)> = lock(&self.waits).pending.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Unregisters every block: done, or the guest never ran.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.spans {
            if let Err(e) = self.uffd.unregister(s.host, s.len) {
                log::warn!("unregistering guest memory from userfaultfd: {e}");
            }
        }
    }

    /// Keeps the userfaultfd open for good (a leaked descriptor): the
    /// missing pages stay registered, so no thread reads them as zeros.
    fn abandon(self: Arc<Self>) {
        self.released.store(true, Ordering::SeqCst);
        std::mem::forget(self);
    }

    fn figures(&self, discarded: u64, switched_at: Instant) -> PostcopyFigures {
        let w = lock(&self.waits);
        let mut threads: Vec<(u32, u64)> = w.per_thread.iter().map(|(&t, &us)| (t, us)).collect();
        threads.sort_unstable();
        PostcopyFigures {
            discarded_pages: discarded,
            placed_pages: self.placed.load(Ordering::Relaxed),
            requests: w.requests,
            faults: FaultReport {
                faults: w.hist.count(),
                blocktime_us: w.blocktime_us,
                latency_sum_us: w.hist.sum(),
                p50_us: w.hist.quantile(0.5),
                p99_us: w.hist.quantile(0.99),
                threads,
                buckets: w.hist.buckets(),
                local_faults: w.local_faults,
                local_pages: w.local_pages,
                local_us: w.local_us,
            },
            postcopy_time: switched_at.elapsed().as_millis() as u64,
            urgent_pages: 0,
            channel_pages: 0,
        }
    }
}

/// Runs of set bits: (first page, count).
fn runs(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut p = 0;
    while let Some(first) = bm.next_set(p) {
        let mut end = first + 1;
        while end < bm.len() && bm.test(end) {
            end += 1;
        }
        out.push((first, end - first));
        p = end;
    }
    out
}

/// Reads faults and asks the source for each missing page (once).
fn fault_loop(
    p: &Placer,
    stop: &AtomicBool,
    waker: &Waker,
    reply: &Mutex<Option<Box<dyn Write + Send>>>,
    recoverable: bool,
) -> Result<(), LostCause> {
    let mut msgs = [UffdMsg::default(); 64];
    while !stop.load(Ordering::SeqCst) {
        let ready = p
            .uffd
            .poll(Some(waker.as_fd()), 200)
            .map_err(LostCause::PollFaults)?;
        if !ready {
            continue;
        }
        let n = p.uffd.read_msgs(&mut msgs).map_err(LostCause::ReadFaults)?;
        for m in &msgs[..n] {
            if m.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = m.fault_address() & !(PAGE - 1);
            let tid = m.arg[2] as u32;
            let Some((block, page)) = p.locate(addr) else {
                continue;
            };
            let now = Instant::now();
            let first = {
                let mut w = lock(&p.waits);
                let v = w.pending.entry((block, page)).or_default();
                v.push((now, tid));
                v.len() == 1
            };
            if p.is_received(block, page) {
                // Valid here but never touched (zeros), or placed just now.
                lock(&p.waits).pending.remove(&(block, page));
                // The valid pages that follow it are likely next (a vCPU
                // sweeping memory): zeros wherever none is there yet, in
                // one ioctl, instead of a fault and a wake-up per page.
                let n = p.received_run(block, page, LOCAL_ZERO_PAGES);
                match p.uffd.zero_run(addr, n * PAGE) {
                    // The faulting page may have been placed meanwhile
                    // (skipped above): wake its thread either way.
                    Ok(filled) => {
                        let _ = p.uffd.wake(addr, PAGE);
                        // A local zero fill (none when every page of the
                        // run was placed meanwhile: a plain wake-up).
                        if filled > 0 {
                            let mut w = lock(&p.waits);
                            w.local_faults += 1;
                            w.local_pages += filled;
                            w.local_us += now.elapsed().as_micros() as u64;
                        }
                    }
                    Err(source) => return Err(LostCause::ZeroPage { addr, source }),
                }
                continue;
            }
            if first {
                let req = Message::Request(PageRequest {
                    block: block as u16,
                    offset: page * PAGE,
                    len: PAGE as u32,
                });
                let mut g = lock(reply);
                // No return path (paused): the request goes out again at
                // recovery, with every page a thread waits for.
                let Some(w) = g.as_mut() else { continue };
                match write_message(&mut **w, &req) {
                    Ok(()) => lock(&p.waits).requests += 1,
                    // The main thread notices the loss on its stream too.
                    Err(e) if recoverable => {
                        log::warn!("sending a page request to the source: {e}");
                        g.take();
                    }
                    Err(e) => return Err(LostCause::Request(e)),
                }
            }
        }
    }
    Ok(())
}
