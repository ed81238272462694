//! The source side: setup, iterate, complete, cancel.
//!
//! A migration walks the migration bitmap from where it left off, sending
//! each dirty page as zero, XBZRLE delta, compressed or raw; it syncs with
//! the dirty tracker when what remains could be sent within the downtime
//! limit, and stops the guest for the last pages once that holds after the
//! sync.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ack::{self, LoadReport};
use super::channels::{ChannelSetup, ChannelWriter, Known, PageEncoding, SendChannels};
use super::converge;
use super::digest::{hash_sample, hex, memory_digest, RunningDigest, CHUNK as DIGEST_CHUNK};
use super::handle::Reconnect;
use super::handle::{MigrationHandle, SyncPoint};
use super::pacing::{Pacing, PauseInputs};
use super::params::{Params, ParamsError, Switchover};
use super::postcopy::switchover::{
    self, AutoSwitch, WireInterval, PROBE_FIRST, PROBE_FIRST_PERIOD, PROBE_PERIOD,
};
use super::postcopy::{
    check_request, BitmapAssembler, FaultReport, Message, MessageReader, PausePlan, PostcopyError,
    PushBatch, PAUSE_BYTES, PROGRESS_GRACE, PUSH_WINDOW,
};
use super::search::{PageSearch, Untouched};
use super::shrink;
use super::stats::{
    CompressionStats, Convergence, MigrationStats, PauseBreakdown, Status, XbzrleStats,
};
use super::MigrationError;
use crate::bitmap::DirtyBitmap;
use crate::codec::adapt::{LinkCost, TimedWrite, WireClock};
use crate::codec::encoder::{Delta, EncodeCounters, Page, PageEncoder};
use crate::codec::zero::is_zero;
use crate::dirty::DirtyTracker;
use crate::memory::{GuestMemory, RamBlock, PAGE_SIZE};
use crate::stream::format::{
    FLAG_CHANNELS, FLAG_GUEST_LOAD, FLAG_LOAD_REPORT, FLAG_SETUP, FLAG_VERIFY, FLAG_ZERO_RUNS,
};
use crate::stream::{BlockDesc, StreamWriter};
use crate::vm::{StateCost, VmControl};

/// How long one iteration step sends before giving control back.
const STEP: Duration = Duration::from_millis(50);
/// Most never-written pages sent as one run (one ZERO_RUN record of 15
/// bytes for up to 256 MiB of guest memory: the look-up window of
/// `search::Untouched` bounds it first), between two looks at the clock
/// and the bandwidth budget.
const UNTOUCHED_RUN: u64 = 1 << 16;
/// Dirty rate is measured over periods at least this long.
const DIRTY_RATE_PERIOD: Duration = Duration::from_secs(1);
/// Syncs without progress after which `auto` switches to postcopy.
const AUTO_STALLS: u32 = 1;
/// The index `open` gets for the postcopy urgent connection.
pub(crate) const URGENT_CONNECTION: u16 = u16::MAX;
/// Bytes hashed at setup to measure the verify digest's rate.
/// Long enough (~10 ms on a quiet host) to feel a loaded host's scheduler.
const HASH_SAMPLE: u64 = 96 << 20;
/// The hashing rate is sampled again before a switch-over at most this
/// often.
const HASH_RESAMPLE: Duration = Duration::from_millis(500);
/// Pauses one migration may cut short (see `pacing.rs`): after that many,
/// a pause that overruns goes through and its overshoot is reported (each
/// cut-short pause was one more the guest saw).
const MAX_BACKOUTS: u32 = 3;
/// In the pause, the remaining pages are checked against the limit every
/// this many pages sent (256 KiB).
const PAUSE_CHECK_PAGES: u32 = 64;
/// Consecutive high-dirty-rate periods before auto-converge throttles.
const THROTTLE_TRIGGER: u32 = 3;

/// One outgoing migration of `mem`, tracked by `tracker`, of the guest `vm`
/// controls.
pub struct Source<'a> {
    mem: &'a dyn GuestMemory,
    tracker: &'a mut dyn DirtyTracker,
    vm: &'a mut dyn VmControl,
    handle: MigrationHandle,
}

impl<'a> Source<'a> {
    /// Prepares a migration; nothing happens until [`Source::run`].
    pub fn new(
        mem: &'a dyn GuestMemory,
        tracker: &'a mut dyn DirtyTracker,
        vm: &'a mut dyn VmControl,
        handle: MigrationHandle,
    ) -> Self {
        Source {
            mem,
            tracker,
            vm,
            handle,
        }
    }

    /// Runs the migration over a transport connection, with the completion
    /// handshake (see `engine/ack.rs`) when the transport has a return path.
    pub fn run_over(
        self,
        conn: crate::transport::Outgoing,
    ) -> Result<MigrationStats, MigrationError> {
        self.run_conn(conn, &mut |_| {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this transport has one stream: channels must be 1",
            ))
        })
    }

    /// As [`Source::run_with_channels`], over a connection whose return
    /// path the engine owns: the one way that can switch to postcopy (a
    /// thread reads the destination's page requests while pages go out).
    pub fn run_conn(
        self,
        conn: crate::transport::Outgoing,
        open: &mut dyn FnMut(u16) -> io::Result<ChannelWriter>,
    ) -> Result<MigrationStats, MigrationError> {
        let crate::transport::Outgoing { writer, ack } = conn;
        let ack = match ack {
            Some(r) => AckPath::Owned(r),
            None => AckPath::None,
        };
        self.run_inner(writer, ack, open)
    }

    /// Connects to `uri` and runs the migration there, opening one more
    /// connection per page channel when [`Params::channels`] is above 1.
    pub fn run_to(self, uri: &crate::transport::Uri) -> Result<MigrationStats, MigrationError> {
        use crate::transport::{connect, Uri};
        let conn = connect(uri).map_err(|e| MigrationError::Send(io::Error::other(e)))?;
        let mut open = |_: u16| -> io::Result<ChannelWriter> {
            if matches!(uri, Uri::File(_)) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a snapshot file is one stream: channels must be 1",
                ));
            }
            Ok(connect(uri).map_err(io::Error::other)?.writer)
        };
        self.run_conn(conn, &mut open)
    }

    /// Runs the migration into `out`. With `ack` (the return path), runs
    /// the completion handshake: waits for LOADED, sends GO on `out`, waits
    /// for STARTED (see `engine/ack.rs`). Only one channel:
    /// [`Params::channels`] must be 1.
    ///
    /// On any failure or cancel the tracker is stopped, the throttle is
    /// removed and the guest resumes if it was paused — except after GO
    /// was sent ([`MigrationError::Unconfirmed`]): then it stays paused.
    /// The error is also recorded in the stats.
    pub fn run<W: Write>(
        self,
        out: W,
        ack: Option<&mut dyn Read>,
    ) -> Result<MigrationStats, MigrationError> {
        self.run_with_channels(out, ack, &mut |_| {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this transport has one stream: channels must be 1",
            ))
        })
    }

    /// As [`Source::run`], with `open(i)` opening the connection of page
    /// channel `i` (1..=channels) when [`Params::channels`] is above 1. The
    /// main stream goes to `out`; the destination must accept the channels
    /// after it (see [`super::Loader::load_channels`]).
    pub fn run_with_channels<W: Write>(
        self,
        out: W,
        ack: Option<&mut dyn Read>,
        open: &mut dyn FnMut(u16) -> io::Result<ChannelWriter>,
    ) -> Result<MigrationStats, MigrationError> {
        let ack = match ack {
            Some(r) => AckPath::Borrowed(r),
            None => AckPath::None,
        };
        self.run_inner(out, ack, open)
    }

    fn run_inner<W: Write>(
        self,
        out: W,
        ack: AckPath<'_>,
        open: &mut dyn FnMut(u16) -> io::Result<ChannelWriter>,
    ) -> Result<MigrationStats, MigrationError> {
        let Source {
            mem,
            tracker,
            vm,
            handle,
        } = self;
        let started = Instant::now();
        // Verify mode: the digest is kept up to date while precopy runs,
        // so the pause hashes only what changed (see `digest.rs`).
        let running = handle.params().verify.then(|| RunningDigest::new(mem));
        let mut saver = RamSaver::new(mem, &handle, started);
        saver.running = running.as_ref();
        let mut guest = GuestSide::default();
        let (out, abort) = super::abort::tap(out);
        let result = std::thread::scope(|s| {
            if let Some(d) = &running {
                s.spawn(|| d.refresh(mem));
            }
            let r = saver.migrate(out, ack, open, tracker, vm, &mut guest);
            if let Some(d) = &running {
                d.stop();
            }
            r
        });
        let GuestSide { paused, sent_go } = guest;
        if let (Err(e), false) = (&result, sent_go) {
            // Before the channels close: the destination hears the reason
            // first (a cancel that surfaced as another error is a cancel).
            if handle.is_cancelled() {
                abort.tell(&MigrationError::Cancelled);
            } else {
                abort.tell(e);
            }
        } else {
            drop(abort);
        }
        // Stops the channel threads (on failure, after their current batch).
        saver.close_channels();
        let stop_err = tracker.stop().err();
        match result {
            Ok(()) => {
                if let Some(e) = stop_err {
                    log::warn!("stopping the dirty tracker after success: {e}");
                }
                saver.publish(Status::Completed, tracker.name(), None);
                Ok(handle.stats())
            }
            Err(e) => {
                vm.set_throttle(0);
                let (e, status) = settle_failure(vm, &handle, paused, sent_go, e);
                saver.throttle = 0;
                saver.publish(status, tracker.name(), Some(e.to_string()));
                Err(e)
            }
        }
    }
}

/// After a failed migration (`e`): resumes the source guest if this side
/// paused it and GO never went out, and says how it ended. A cancel can
/// surface as another error (an interrupted wait for a reply): it is
/// still a cancel, unless GO went out.
pub(crate) fn settle_failure(
    vm: &mut dyn VmControl,
    handle: &MigrationHandle,
    paused: bool,
    sent_go: bool,
    e: MigrationError,
) -> (MigrationError, Status) {
    if paused && !sent_go {
        if let Err(re) = vm.resume() {
            log::error!("cannot resume the source guest after '{e}': {re}");
        }
    }
    let e = if handle.is_cancelled() && !sent_go {
        MigrationError::Cancelled
    } else {
        e
    };
    let status = if matches!(e, MigrationError::Cancelled) {
        Status::Cancelled
    } else {
        Status::Failed
    };
    (e, status)
}

/// The return path: none (a file), borrowed from the caller, or owned
/// (needed by postcopy, whose request reader runs on its own thread).
pub(crate) enum AckPath<'r> {
    None,
    Borrowed(&'r mut dyn Read),
    Owned(crate::transport::BoxRead),
}

impl AckPath<'_> {
    fn as_read(&mut self) -> Option<&mut dyn Read> {
        match self {
            AckPath::None => None,
            AckPath::Borrowed(r) => Some(&mut **r),
            AckPath::Owned(r) => Some(&mut **r),
        }
    }
}

/// Where the source guest stands, for the clean-up after a failure.
#[derive(Default)]
struct GuestSide {
    /// Paused for stop-and-copy.
    paused: bool,
    /// GO went out: the destination may run the guest, never resume here.
    sent_go: bool,
}

struct RamSaver<'a> {
    mem: &'a dyn GuestMemory,
    /// Verify mode: the digest as the dirty tracker sees memory.
    running: Option<&'a RunningDigest>,
    blocks: Vec<RamBlock>,
    handle: &'a MigrationHandle,
    params: Params,
    started: Instant,
    setup_time: u64,
    /// The migration bitmap and the walk over it (see `search.rs`).
    search: PageSearch,
    /// Bulk stage: pages never written, sent as zero without reading.
    untouched: Untouched,
    block_base: Vec<u64>,
    sync_count: u64,
    /// The main stream's page encoder (zero / XBZRLE / compressed / raw).
    encoder: PageEncoder,
    /// The main stream's link cost, which the encoder's choices weigh.
    link: LinkCost,
    wire: Arc<WireClock>,
    /// Pages sent or queued on any stream.
    pages_sent: u64,
    /// What page channels sent before they were closed.
    closed_channels: EncodeCounters,
    seq: u64,
    /// Bandwidth, rate limit and the pause estimate.
    pacing: Pacing,
    /// What the VMM says saving its state costs (asked at each decision).
    state_cost: StateCost,
    /// What the VMM says stopping the vCPUs costs (asked each step).
    stop_cost: Duration,
    /// The fixed costs of the pause alone exceed the limit (warned once).
    floor_warned: bool,
    /// When the hashing rate was last sampled.
    hash_sampled: Instant,
    // Dirty-rate measurement and auto-converge.
    rate_time: Instant,
    rate_dirty_pages: u64,
    rate_bytes: u64,
    dirty_pages_rate: u64,
    high_count: u32,
    throttle: u8,
    /// The throttle the VMM was last told (it starts unthrottled).
    throttle_set: u8,
    last_sync: Instant,
    last_sync_sent: u64,
    last_sync_bytes: u64,
    transferred: u64,
    downtime_start: Option<Instant>,
    downtime: u64,
    /// Source pause to STARTED received, ms.
    source_downtime: u64,
    /// The downtime limit in force at the switch-over.
    limit_at_switch: u64,
    /// Where the pause went (once paused for good).
    pause_breakdown: Option<PauseBreakdown>,
    downtime_bytes: u64,
    verify_time: u64,
    status: Status,
    /// Page channels, when `channels > 1`.
    channels: Option<SendChannels>,
    /// The last sync's harvest (reused from sync to sync).
    fresh: Vec<DirtyBitmap>,
    /// Next sync barrier's epoch.
    epoch: u64,
    /// Syncs after the bulk stage that left no fewer pages than the one
    /// before (postcopy `auto` switches on the first).
    stalls: u32,
    /// What the last measuring period says of convergence (see
    /// `converge.rs`), and whether "not converging" was logged.
    convergence: Option<Convergence>,
    convergence_warned: bool,
    /// Pages left after the previous sync, or sent since it.
    prev_remaining: Option<u64>,
    /// Postcopy `auto`: the prediction of what precopy would re-send
    /// (see `postcopy/switchover.rs`).
    auto_switch: AutoSwitch,
    /// Bytes per second the set left grew by at the last switch-over
    /// sync, and the link carried over the same interval (see
    /// `shrink.rs`); `None` before it.
    growth: Option<shrink::Rates>,
    /// Pages the last switch-over sync that did not lead to the pause
    /// left to send (see `shrink::sync_due`); `None` before it.
    last_found: Option<u64>,
    /// Postcopy: page requests served, bytes sent since the switch, the
    /// destination's fault figures, ms from the switch to the last page.
    postcopy_requests: u64,
    /// Pages sent after the switch: pushed in the background, and sent
    /// because the destination asked.
    pc_pushed: u64,
    pc_requested: u64,
    postcopy_from: Option<u64>,
    fault_report: Option<FaultReport>,
    postcopy_time: Option<u64>,
    /// Background push pacing: bytes and time it counts from.
    postcopy_pace_from: Option<(u64, Instant)>,
    /// The last drain mark sent (0: none yet).
    drain_mark: u64,
    /// Stream bytes (all channels) the destination confirmed applying:
    /// those written up to the last drain mark.
    applied: u64,
    /// A drain confirmed everything sent up to `applied` and no page went
    /// out since: the bytes after it are in flight, and count.
    drained: bool,
    /// How long the last drain waited (the guest running).
    drain_wait: Duration,
    /// The last empty round trip to the destination (see [`Self::ping`]).
    ping: Duration,
    /// In a stop-and-copy: what the check of the pause against the limit
    /// needs while the remaining pages go out; `overran` once it tripped.
    pause_check: Option<PauseCheck>,
    overran: bool,
    /// Pauses cut short, and the longest of them (ms).
    backouts: u32,
    backout_max: u64,
    /// Verify: bytes the destination's digest had still to re-hash at
    /// its last report (see `ack.rs`, [`LoadReport`]), besides what is
    /// sent after it.
    dest_backlog: u64,
    /// In a stop-and-copy: the digest chunks the pause's pages fall in
    /// (the destination re-hashes them after the stream's end), taken
    /// at the final sync.
    pause_chunks: u64,
    /// Postcopy `auto`: when the first page went out (after the first
    /// clear of an initially-set log), and the main stream's wire clock
    /// (time, time inside `write`, bytes) at the last probe, and what it
    /// did over the last two probe intervals, older first (see
    /// `postcopy/switchover.rs`: whether the switch may skip the drain).
    first_send: Option<Instant>,
    wire_mark: Option<(Instant, u64, u64)>,
    wire_intervals: [WireInterval; 2],
    /// Postcopy on one stream: the push's second walk, over what lies
    /// behind where the first one started (see [`Behind`]).
    behind: Option<Behind>,
    /// Postcopy `auto`, one stream, until it decides: the DRAIN marks out
    /// and the window on the bytes in flight (see `postcopy/window.rs`).
    window: super::postcopy::window::Window,
}

/// The pause under way, for the checks while its pages go out.
#[derive(Clone, Copy)]
struct PauseCheck {
    /// The guest's pause.
    pause_at: Instant,
    /// When the pages began to go, and the stream bytes written by then.
    pages_at: Instant,
    bytes_at: u64,
    limit: u64,
}

/// The outgoing streams between precopy's attempts to complete.
struct Link<'r, W: Write> {
    w: StreamWriter<TimedWrite<W>>,
    ack: AckPath<'r>,
    urgent: Option<StreamWriter<ChannelWriter>>,
}

/// How an attempt to complete ended.
enum Completion<'r, W: Write> {
    /// Completed (stop-and-copy, or postcopy to its end).
    Done,
    /// The pause was cut short: the guest runs, precopy goes on.
    BackedOut(Box<Link<'r, W>>),
}

/// Postcopy's second push walk, on one stream. The first walk starts just
/// ahead of the guest's sweep and finds mostly zero pages there (a few
/// bytes each on the wire, but each read to know it): reading them bounds
/// its pace, the link idles (1 GiB incrementer at 1 Gbit/s: ~240k zero
/// pages, 50-150 ms of reading during which the link carried a third of
/// what it could). While its batches are that cheap, batches of the second
/// walk, from the start of memory up to where the first began (the data
/// behind the sweep), keep the link busy.
struct Behind {
    /// Where the second walk goes on from, and where it stops.
    pos: (usize, u64),
    end: (usize, u64),
    /// Its own never-written look-ups (the first walk's window would be
    /// looked up again at every turn otherwise).
    untouched: Untouched,
}

impl<'a> RamSaver<'a> {
    fn new(mem: &'a dyn GuestMemory, handle: &'a MigrationHandle, started: Instant) -> Self {
        let params = handle.params();
        let adaptive = params.adaptive_encoding;
        let wire = Arc::new(WireClock::default());
        let blocks = mem.blocks().to_vec();
        let mut base = 0;
        let block_base = blocks
            .iter()
            .map(|b| {
                let o = base;
                base += b.len();
                o
            })
            .collect();
        RamSaver {
            mem,
            running: None,
            search: PageSearch::new(blocks.iter().map(RamBlock::pages)),
            untouched: Untouched::new(true),
            blocks,
            handle,
            params,
            started,
            setup_time: 0,
            block_base,
            sync_count: 0,
            encoder: PageEncoder::new(adaptive),
            link: LinkCost::new(wire.clone()),
            wire,
            pages_sent: 0,
            closed_channels: EncodeCounters::default(),
            seq: 0,
            pacing: Pacing::new(started),
            state_cost: StateCost::default(),
            stop_cost: Duration::ZERO,
            floor_warned: false,
            hash_sampled: started,
            rate_time: started,
            rate_dirty_pages: 0,
            rate_bytes: 0,
            dirty_pages_rate: 0,
            high_count: 0,
            throttle: 0,
            throttle_set: 0,
            last_sync: started,
            last_sync_sent: 0,
            last_sync_bytes: 0,
            transferred: 0,
            downtime_start: None,
            downtime: 0,
            source_downtime: 0,
            limit_at_switch: 0,
            pause_breakdown: None,
            downtime_bytes: 0,
            verify_time: 0,
            status: Status::Setup,
            channels: None,
            fresh: Vec::new(),
            epoch: 0,
            stalls: 0,
            convergence: None,
            convergence_warned: false,
            prev_remaining: None,
            auto_switch: AutoSwitch::default(),
            growth: None,
            last_found: None,
            postcopy_requests: 0,
            pc_pushed: 0,
            pc_requested: 0,
            postcopy_from: None,
            fault_report: None,
            postcopy_time: None,
            postcopy_pace_from: None,
            drain_mark: 0,
            applied: 0,
            drained: false,
            drain_wait: Duration::ZERO,
            ping: Duration::ZERO,
            pause_check: None,
            overran: false,
            backouts: 0,
            backout_max: 0,
            dest_backlog: 0,
            pause_chunks: 0,
            first_send: None,
            wire_mark: None,
            wire_intervals: [WireInterval::default(); 2],
            behind: None,
            window: Default::default(),
        }
    }

    /// How page channels encode: compression as configured, adaptive or
    /// not, each channel with its share of the bandwidth cap.
    fn encoding(&self) -> PageEncoding {
        let n = u64::from(self.params.channels.max(1));
        PageEncoding {
            compress: self.params.compress,
            adaptive: self.params.adaptive_encoding,
            max_bandwidth: self.params.max_bandwidth / n,
        }
    }

    fn remaining_pages(&self) -> u64 {
        self.search.remaining()
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.handle.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn migrate<W: Write>(
        &mut self,
        out: W,
        mut ack: AckPath<'_>,
        open: &mut dyn FnMut(u16) -> io::Result<ChannelWriter>,
        tracker: &mut dyn DirtyTracker,
        vm: &mut dyn VmControl,
        guest: &mut GuestSide,
    ) -> Result<(), MigrationError> {
        self.params.validate()?;
        if self.params.postcopy_ram && !matches!(ack, AckPath::Owned(_)) {
            return Err(ParamsError::PostcopyNeedsReturnPath.into());
        }
        self.publish(Status::Setup, tracker.name(), None);
        self.check_cancel()?;

        // Setup: everything is to be sent; start tracking.
        let start = tracker.start()?;
        if let Some(shift) = tracker.clear_chunk_shift() {
            self.search.clear_chunks(shift, start.initially_set);
        }
        if !start.initially_set {
            // Resets whatever the log held before tracking began; with an
            // initially-set log this would only report "all dirty".
            self.sync(tracker)?;
        }
        self.apply_params();
        if self.params.verify {
            // The digest is part of the pause: measure the hashing rate.
            self.sample_hash();
        }
        let mut flags = if self.params.verify { FLAG_VERIFY } else { 0 };
        // Pages never written leave as runs (see `stream/format.rs`).
        flags |= FLAG_ZERO_RUNS;
        // Raw pages at consecutive offsets travel as RUN records, which
        // the destination reads straight into guest memory.
        flags |= crate::stream::format::FLAG_RUNS;
        if self.params.postcopy_ram && self.params.postcopy_preempt {
            flags |= crate::stream::format::FLAG_URGENT;
        }
        let urgent_flag = flags & crate::stream::format::FLAG_URGENT != 0;
        let n = self.params.channels;
        let session = session_number();
        // With a return path, the destination checks the setup (block
        // list, VM shape) and answers before any page is sent.
        let setup = !matches!(ack, AckPath::None);
        // And it reports its pending work with each drain's answer; and
        // how busy the guest is: the destination may pick how it receives
        // by it (see `stream/format.rs`, guest load).
        let main_flags = flags
            | if setup {
                FLAG_SETUP | FLAG_LOAD_REPORT | FLAG_GUEST_LOAD
            } else {
                0
            };
        let (mut w, descs) = self.start_stream(out, main_flags, n, session)?;
        if setup {
            w.setup_with_load(vm.shape().vcpus, 0, vm.vcpu_load())
                .map_err(MigrationError::send)?;
        }
        self.section_end(&mut w)?;
        // The postcopy urgent connection (postcopy-preempt), opened now,
        // long before any pause: opening it costs a connection (and a TLS
        // handshake) that the downtime must not hold.
        let mut urgent = None;
        if urgent_flag {
            let conn = open(URGENT_CONNECTION).map_err(|e| {
                MigrationError::Send(io::Error::new(
                    e.kind(),
                    format!("opening the postcopy urgent connection: {e}"),
                ))
            })?;
            let mut u = StreamWriter::new(conn, 0);
            u.block_list(&descs).map_err(MigrationError::send)?;
            u.section_end(0).map_err(MigrationError::send)?;
            urgent = Some(u);
        }
        if n > 1 {
            // After the main stream's start is on its way, so the
            // destination accepts the main connection first.
            let conns = (1..=n)
                .map(|i| {
                    open(i).map_err(|e| {
                        MigrationError::Send(io::Error::new(
                            e.kind(),
                            format!("opening channel {i}: {e}"),
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let setup = ChannelSetup {
                flags,
                session,
                blocks: self.blocks.clone(),
                descs,
            };
            self.channels = Some(SendChannels::start(conns, &setup).map_err(MigrationError::send)?);
        }
        if let (true, Some(r)) = (setup, ack.as_read()) {
            // Every connection is open (the destination accepts them all
            // before it reads the setup): now its verdict, before any page.
            ack::await_setup(r)?;
        }
        self.setup_time = self.started.elapsed().as_millis() as u64;
        // The link is measured from the first page on: the setup (tracker
        // start, connections, the destination's verdict) sent a few bytes
        // in what can be a long time on a loaded host, and a first period
        // spanning it reads as a slow link, which the conservative
        // estimate then trusts for a second (a run at load 7: 96 MB/s
        // after a 1.1 s setup, and 2.8 s of rounds instead of 0.2 s).
        self.pacing.restart_period(self.transferred, Instant::now());
        self.publish(Status::Active, tracker.name(), None);
        let mut link = Link { w, ack, urgent };
        loop {
            // A pause cut short (see `pacing.rs`) comes back with the
            // guest running again, and precopy goes on.
            match self.precopy(link, tracker, vm, guest)? {
                Completion::Done => return Ok(()),
                Completion::BackedOut(l) => link = *l,
            }
        }
    }

    /// Iterates, then completes: stop-and-copy, or the switch to postcopy.
    fn precopy<'r, W: Write>(
        &mut self,
        link: Link<'r, W>,
        tracker: &mut dyn DirtyTracker,
        vm: &mut dyn VmControl,
        guest: &mut GuestSide,
    ) -> Result<Completion<'r, W>, MigrationError> {
        let Link {
            mut w,
            mut ack,
            mut urgent,
        } = link;
        // Iterate.
        let mut switch = false;
        loop {
            self.check_cancel()?;
            self.params = self.handle.params();
            self.apply_params();
            if self.postcopy_wanted() {
                // The switch record reaches the destination only after
                // everything sent before it: wait for that now, while the
                // guest runs, not in the pause.
                // Unless the bytes in flight fit in the pause: then they
                // reach the destination there, and the guest stops now
                // instead of after the drain (see `postcopy/switchover.rs`).
                // First the answers to the window's marks still out (see
                // `postcopy/window.rs`; the request reader that takes the
                // return path after GO expects none): only what followed
                // the newest one may still be on its way then.
                let t = Instant::now();
                self.settle_window(&mut ack)?;
                let in_flight = self.in_flight(&w, &ack);
                if !self.may_skip_drain(in_flight) {
                    self.drain(&mut w, &mut ack)?;
                }
                self.drain_wait = t.elapsed();
                switch = true;
                break;
            }
            self.state_cost = vm.state_cost();
            self.stop_cost = vm.stop_cost();
            // While the set left shrinks fast, send on live instead of
            // pausing with it (see `shrink.rs`).
            let switch_due = self.pause_fits() && !self.keeps_shrinking();
            // A sync that would only find what the last one found waits
            // (see `shrink.rs`: syncs tied to progress).
            if switch_due && self.switch_sync_due() {
                // First the destination catches up with what was sent (the
                // guest runs meanwhile; what it dirties the sync finds),
                // so the decision below and the pause see nothing queued.
                self.drain(&mut w, &mut ack)?;
                // And how long a round trip takes as the host is now: the
                // handshake's price (see `pacing.rs`).
                self.ping(&mut w, &mut ack)?;
                let before = self.remaining_pages();
                let since = self.last_sync.elapsed().as_secs_f64();
                let sent = self.sent_rate(since.max(1e-3));
                self.sync(tracker)?;
                let grew = shrink::growth_rate(before, self.remaining_pages(), since);
                self.growth = Some(shrink::Rates {
                    growth: grew * PAGE_SIZE as f64,
                    sent,
                });
                self.barrier(&mut w)?;
                if self.params.verify && self.hash_sampled.elapsed() >= HASH_RESAMPLE {
                    // The host's load now, not at setup.
                    self.sample_hash();
                }
                if self.pause_fits() && !self.keeps_shrinking() {
                    break;
                }
                self.last_found = Some(self.remaining_pages());
            } else if (self.throttle > 0
                && !self.search.is_bulk()
                && self.last_sync.elapsed()
                    >= Duration::from_millis(self.params.throttle_sync_period))
                || self.probe_due()
            {
                self.sync(tracker)?;
                self.barrier(&mut w)?;
                if self.postcopy_wanted() {
                    // The sync decided the switch: no step more (each
                    // one lets the guest dirty more for postcopy to send).
                    continue;
                }
            } else if switch_due && self.remaining_bytes() == 0 {
                // Nothing to send, and the sync is not due yet: let the
                // guest run (a short nap at a time, so a cancel or new
                // parameters are seen); the nap says nothing about the
                // link.
                let wait = shrink::RESYNC_PERIOD.saturating_sub(self.last_sync.elapsed());
                std::thread::sleep(wait.min(Duration::from_millis(5)));
                self.pacing.restart_period(self.transferred, Instant::now());
            }
            if !self.params.auto_converge {
                self.throttle = 0;
            }
            if self.throttle != self.throttle_set {
                // Only a change reaches the VMM (minivm wakes its throttle,
                // probe and dirty-limit threads on every call: each step
                // paid that with nothing to change).
                vm.set_throttle(self.throttle);
                self.throttle_set = self.throttle;
            }
            self.window_turn(&mut w, &mut ack)?;
            self.step(&mut w, tracker, false)?;
            self.section_end(&mut w)?;
            self.pacing
                .measure_pages(self.transferred, self.pages_sent, Instant::now());
            self.publish(Status::Active, tracker.name(), None);
        }

        // Complete: stop the guest, final sync, everything left unlimited.
        self.check_cancel()?;
        self.publish(Status::Device, tracker.name(), None);
        self.limit_at_switch = self.params.downtime_limit;
        let pause_at = Instant::now();
        let mut clock = PauseClock::new(pause_at);
        clock.parts.drain_us = self.drain_wait.as_micros() as u64;
        clock.parts.in_flight_bytes = self.in_flight(&w, &ack);
        clock.parts.ping_us = self.ping.as_micros() as u64;
        clock.parts.handshake_estimate_us = self.pacing.handshake_estimate().as_micros() as u64;
        // This thread does the pause's work: at a raised priority until
        // STARTED, a back-out or an error (see `priority.rs`).
        let mut raised = super::priority::Raised::raise();
        vm.pause().map_err(MigrationError::Vm)?;
        clock.parts.stop_us = clock.lap();
        self.pacing.record_stop(pause_at.elapsed());
        guest.paused = true;
        self.downtime_start = Some(pause_at);
        let bytes_before = self.sent_bytes(&w);
        self.sync(tracker)?;
        self.barrier(&mut w)?;
        clock.parts.sync_us = clock.lap();
        if self.params.verify {
            // What the destination will re-hash of the pause's pages.
            self.pause_chunks = self.dirty_chunk_bytes();
        }
        // Auto: the stop-and-copy would not fit the limit, decided again
        // now that the stop and the sync are paid (measured, not
        // estimated), the rest all counted (the fixed costs too, even with
        // no page left: a verify digest that does not fit is no reason to
        // stretch the pause when postcopy can take over); postcopy's pause
        // holds only the not-valid bitmap, the device state and the
        // handshake.
        let auto = self.params.postcopy_ram
            && self.params.postcopy_switchover == Switchover::Auto
            && !self.pacing.fits_after(
                &self.pause_inputs(),
                pause_at.elapsed(),
                self.params.downtime_limit,
            );
        if switch || auto {
            self.pause_chunks = 0;
            // Postcopy's switch is its own (see `postcopy/`).
            drop(raised);
            return self
                .postcopy(w, ack, urgent, vm, guest, clock, bytes_before)
                .map(|()| Completion::Done);
        }
        // Without postcopy: a pause that no longer fits is cut short.
        let limit = self.params.downtime_limit;
        if self.may_back_out()
            && pause_at.elapsed() < Duration::from_millis(limit)
            && !self
                .pacing
                .fits_after(&self.pause_inputs(), pause_at.elapsed(), limit)
        {
            self.back_out(
                vm,
                guest,
                pause_at,
                (0, Duration::ZERO),
                "after the final sync",
            )?;
            return Ok(Completion::BackedOut(Box::new(Link { w, ack, urgent })));
        }
        let pages_at = Instant::now();
        let bytes_at = self.sent_bytes(&w);
        self.pause_check = self.may_back_out().then_some(PauseCheck {
            pause_at,
            pages_at,
            bytes_at,
            limit,
        });
        self.overran = false;
        while self.remaining_pages() > 0 && !self.overran {
            self.check_cancel()?;
            self.step(&mut w, tracker, true)?;
            self.section_end(&mut w)?;
        }
        self.pause_check = None;
        let sending = (self.sent_bytes(&w) - bytes_at, pages_at.elapsed());
        clock.parts.pages_us = clock.lap();
        // Verify: every page is out and the guest stopped, so memory holds
        // still: the digest now, before the last check (a hashing rate
        // that collapsed in the pause can still be backed out of).
        let mut digest = None;
        if self.params.verify && !self.overran {
            let t = Instant::now();
            digest = Some(match self.running {
                Some(d) => d.current(self.mem).0,
                None => memory_digest(self.mem),
            });
            self.verify_time = t.elapsed().as_millis() as u64;
            clock.parts.digest_us = clock.lap();
        }
        // Once more before the device state, past which nothing can be
        // taken back: the destination's part of the digest, and the
        // handshake as priced before the pause.
        let mut rest = self.pause_inputs();
        // The source's digest is paid; the destination's is to come.
        rest.digest_bytes = 0;
        if self.overran
            || (self.may_back_out()
                && pause_at.elapsed() < Duration::from_millis(limit)
                && self
                    .pacing
                    .overruns(&rest, pause_at.elapsed(), sending, limit))
        {
            self.back_out(vm, guest, pause_at, sending, "while its pages went out")?;
            return Ok(Completion::BackedOut(Box::new(Link { w, ack, urgent })));
        }
        if let Some(d) = self.running {
            // No more background hashing: the handshake has the CPUs.
            d.stop();
        }
        drop(urgent.take());
        let ack = ack.as_read();
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // Every channel ends its stream; the destination applies the
            // main stream's end only after all of them.
            ch.finish(enc).map_err(MigrationError::send)?;
        }
        clock.parts.pages_us += clock.lap();
        let state = vm.save_state().map_err(MigrationError::Vm)?;
        if !state.is_empty() {
            w.state(&state).map_err(MigrationError::send)?;
        }
        clock.parts.state_us = clock.lap();
        let mut sent_digest = None;
        if let Some(digest) = digest {
            w.digest(&digest).map_err(MigrationError::send)?;
            sent_digest = self.running.map(|_| digest);
        }
        self.check_cancel()?;
        // The stream's end counts with the handshake that follows it.
        let end_at = Instant::now();
        w.end().map_err(MigrationError::send)?;
        self.transferred = self.sent_bytes(&w);
        self.downtime_bytes = self.transferred - bytes_before;
        self.downtime = match ack {
            Some(r) => {
                let handle = self.handle;
                let t = ack::source_handshake(r, w.get_mut(), &mut guest.sent_go, &|| {
                    handle.is_cancelled()
                })?;
                clock.parts.loaded_us = (t.loaded - end_at).as_micros() as u64;
                clock.parts.dest_resume_us = t.resumed_after_go.map_or(0, |d| d.as_micros() as u64);
                self.pacing.record_handshake(t.started - t.go_sent);
                self.source_downtime = ms(t.started - pause_at);
                clock.parts.handshake_us = clock.lap();
                // Where the guest sees it: up to the destination's resume.
                ms(t.resumed_estimate() - pause_at)
            }
            None => {
                self.source_downtime = ms(pause_at.elapsed());
                clock.parts.handshake_us = clock.lap();
                self.source_downtime
            }
        };
        self.pause_breakdown = Some(clock.parts);
        self.pause_chunks = 0;
        // The pause is over.
        drop(raised.take());
        if let Some(sent) = sent_digest {
            // The digest in the stream was the dirty tracker's view; now,
            // outside the pause (this guest stays paused for good), check
            // it against all of memory.
            let full = memory_digest(self.mem);
            if full != sent {
                return Err(MigrationError::Verify {
                    at_stop: hex(&full),
                    sent: hex(&sent),
                });
            }
        }
        vm.set_throttle(0);
        self.throttle = 0;
        Ok(Completion::Done)
    }

    /// Whether to leave precopy for postcopy now: asked by command, or
    /// (`auto`) precopy stopped making progress: a sync after the first
    /// pass left no fewer pages than the one before, or two syncs in a row
    /// predicted that precopy would re-send at least an eighth of memory
    /// (see `postcopy/switchover.rs`).
    fn postcopy_wanted(&self) -> bool {
        let p = &self.params;
        p.postcopy_ram
            && (self.handle.postcopy_requested()
                || (p.postcopy_switchover == Switchover::Auto
                    && (self.stalls >= AUTO_STALLS || self.auto_switch.wants_switch())))
    }

    /// True for postcopy `auto`.
    fn auto_postcopy(&self) -> bool {
        self.params.postcopy_ram && self.params.postcopy_switchover == Switchover::Auto
    }

    /// Postcopy `auto` measures the guest's dirty rate during the first
    /// pass too: a first sync as precopy starts (the harvest later ones
    /// are measured against), then one every [`PROBE_PERIOD`] once
    /// precopy has sent something (precopy alone syncs only near the
    /// pass's end). The prediction needs only the average rate sent at so
    /// far, not a full bandwidth period (100 ms): a guest that precopy
    /// cannot move is known one or two probes after the start.
    fn probe_due(&self) -> bool {
        if !self.auto_postcopy() || !self.search.is_bulk() {
            return false;
        }
        if self.sync_count == 0 {
            // An initially-set log (the only one not synced at setup)
            // reports everything until its first clear: the first harvest
            // comes just after it.
            return self.first_send.is_some_and(|t| t.elapsed() >= PROBE_FIRST);
        }
        let period = if self.auto_switch.harvests() <= 1 {
            PROBE_FIRST_PERIOD
        } else {
            PROBE_PERIOD
        };
        self.last_sync.elapsed() >= period && self.average_bandwidth() > 0.0
    }

    /// Postcopy: whether the switch may pause the guest now, with
    /// `in_flight` bytes not yet confirmed applied, instead of draining
    /// them first (see [`switchover::skip_drain`]): one stream (the page
    /// channels' writes are not timed), its rate measured by the last two
    /// probes, the last one recent.
    fn may_skip_drain(&self, in_flight: u64) -> bool {
        if self.channels.is_some() {
            return false;
        }
        let recent = self
            .wire_mark
            .is_some_and(|(t, _, _)| t.elapsed() <= 2 * PROBE_PERIOD);
        let [prev, last] = self.wire_intervals;
        // Or the rate the destination confirmed the window's marks at (see
        // `postcopy/window.rs`): its waits are not inside `write`.
        let rate = switchover::drain_rate(&prev, &last)
            .filter(|_| recent)
            .or(self.window.recent_rate(Instant::now(), 2 * PROBE_PERIOD))
            .map(|r| match self.pacing.conservative_bandwidth() {
                c if c > 0.0 => r.min(c),
                _ => r,
            });
        let fixed = self
            .pacing
            .estimate(&PauseInputs {
                remaining_bytes: 0,
                dirty_pages_rate: 0,
                in_flight_bytes: 0,
                ..self.pause_inputs()
            })
            .fixed();
        switchover::skip_drain(in_flight, rate, fixed, self.params.downtime_limit)
    }

    /// Postcopy `auto`: the main stream's wire clock now, and the interval
    /// since the last mark.
    fn mark_wire(&mut self) {
        let now = Instant::now();
        let (ns, bytes) = self.wire.read();
        if let Some((t0, ns0, b0)) = self.wire_mark {
            let iv = WireInterval {
                wall: now - t0,
                bytes: bytes.saturating_sub(b0),
                in_write: Duration::from_nanos(ns.saturating_sub(ns0)),
            };
            self.wire_intervals = [self.wire_intervals[1], iv];
        }
        self.wire_mark = Some((now, ns, bytes));
    }

    /// Bytes/s precopy has sent at since the setup (0 before the first
    /// step).
    fn average_bandwidth(&self) -> f64 {
        let since = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.setup_time));
        if since.is_zero() {
            return 0.0;
        }
        self.transferred as f64 / since.as_secs_f64()
    }

    /// Pages of guest memory.
    fn guest_pages(&self) -> u64 {
        self.blocks.iter().map(RamBlock::pages).sum()
    }

    /// The switch and postcopy (see `engine/postcopy/mod.rs`): the guest is
    /// paused and synced; sends the not-valid bitmap, the device state and
    /// the switch, runs the handshake, then serves requests first and
    /// pushes the rest in the background. With recovery allowed
    /// ([`MigrationHandle::set_postcopy_recovery`]), a connection lost
    /// after GO pauses postcopy until [`MigrationHandle::resume_postcopy`]
    /// hands a new one over.
    #[allow(clippy::too_many_arguments)]
    fn postcopy<W: Write>(
        &mut self,
        mut w: StreamWriter<TimedWrite<W>>,
        mut ack: AckPath<'_>,
        urgent: Option<StreamWriter<ChannelWriter>>,
        vm: &mut dyn VmControl,
        guest: &mut GuestSide,
        mut clock: PauseClock,
        bytes_before: u64,
    ) -> Result<(), MigrationError> {
        let pause_at = clock.start;
        // The destination has no copy of the pages to come: no deltas.
        self.encoder.set_xbzrle(None);
        // Pages this host never wrote go now as zero runs (a few bytes for
        // gigabytes; a destination whose memory is fresh there touches
        // nothing): valid there, neither discarded nor pushed (the guest's
        // first touch there is a local zero fill, see `postcopy/dest.rs`).
        // Before, each was pushed as a zero record read from memory here,
        // ~9 bytes on the wire and a 4 KiB read each.
        let zeros = self.send_untouched(&mut w)?;
        log::debug!("postcopy switch: {zeros} pages never written went as zero runs");
        // The pages the guest touches first after GO (see
        // `postcopy/ahead.rs`), within the pause's budget, on one stream
        // (page channels take the background push behind the final
        // barrier; their pause carries none); the push starts just after
        // the longest sweep's.
        if self.channels.is_none() {
            if let Some((b, p)) = self.send_pause_pages(&mut w, pause_at)? {
                self.search.seek(b, p);
            }
            self.behind = Some(Behind {
                pos: (0, 0),
                end: self.search.position(),
                untouched: Untouched::new(true),
            });
        }
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // Behind the final barrier: every channel switches too, then
            // carries background pages (requested ones go elsewhere).
            ch.postcopy(enc).map_err(MigrationError::send)?;
        }
        for (b, bm) in self.search.bitmaps().iter().enumerate() {
            let words = bm.words();
            let chunk = usize::from(crate::stream::format::MAX_DISCARD_WORDS);
            for (k, part) in words.chunks(chunk).enumerate() {
                if part.iter().any(|&x| x != 0) {
                    w.discard(b as u16, (k * chunk) as u32, part)
                        .map_err(MigrationError::send)?;
                }
            }
        }
        clock.parts.pages_us = clock.lap();
        let state = vm.save_state().map_err(MigrationError::Vm)?;
        if !state.is_empty() {
            w.state(&state).map_err(MigrationError::send)?;
        }
        w.postcopy().map_err(MigrationError::send)?;
        self.section_end(&mut w)?;
        clock.parts.state_us = clock.lap();
        let AckPath::Owned(mut reader) = std::mem::replace(&mut ack, AckPath::None) else {
            return Err(ParamsError::PostcopyNeedsReturnPath.into());
        };
        let handle = self.handle;
        let hs = ack::source_handshake(&mut *reader, w.get_mut(), &mut guest.sent_go, &|| {
            handle.is_cancelled()
        });
        // A connection lost between GO and STARTED: the destination may
        // run the guest already. With recovery, that is a pause like any
        // later cut (if it never got GO, it fails and says so there; this
        // side waits for a recovery or a cancel, its guest paused).
        let mut lost = None;
        match hs {
            Ok(t) => {
                // The guest runs on the destination now.
                self.pacing.record_handshake(t.started - t.go_sent);
                self.source_downtime = ms(t.started - pause_at);
                self.downtime = ms(t.resumed_estimate() - pause_at);
            }
            Err(MigrationError::Unconfirmed(e))
                if guest.sent_go
                    && self.handle.postcopy_recovery()
                    && !matches!(e, ack::ReplyError::Unexpected { .. }) =>
            {
                self.source_downtime = ms(pause_at.elapsed());
                self.downtime = self.source_downtime;
                lost = Some(MigrationError::Unconfirmed(e));
            }
            Err(e) => return Err(e),
        }
        clock.parts.handshake_us = clock.lap();
        self.pause_breakdown = Some(clock.parts);
        self.transferred = self.sent_bytes(&w);
        self.downtime_bytes = self.transferred - bytes_before;
        self.postcopy_from = Some(self.transferred);
        let switched = Instant::now();
        let mut link = PostcopyLink {
            out: PcOut::First(w),
            urgent_wanted: urgent.is_some(),
            page_channels: self.channels.as_ref().map_or(0, |c| c.count() as u16),
            urgent: urgent.map(|u| (u, 1)),
            requests: spawn_request_reader(MessageReader::new(reader))?,
            retired_bytes: 0,
            dead: false,
            acked: None,
            progress_seen: false,
            window_from: Instant::now(),
        };
        // The destination read everything up to GO before it resumed the
        // guest: the window counts from here, not from its first PROGRESS.
        self.open_window(&mut link);
        self.postcopy_pace_from = Some((self.pc_bytes(&link), Instant::now()));
        self.publish(Status::PostcopyActive, "", None);
        self.postcopy_point();
        loop {
            let run = match lost.take() {
                Some(e) => Err(e),
                None => self.postcopy_run(&mut link),
            };
            let e = match run {
                Ok(()) => break,
                Err(e) if connection_lost(&e) && self.handle.postcopy_recovery() => e,
                Err(e) => return Err(e),
            };
            // Recovery: the guest lives on the destination; wait for a new
            // connection instead of giving it up. A connection that still
            // works (the cut was on another one) tells the destination,
            // which then pauses too instead of waiting on it.
            link.abort(&e);
            link.retire();
            self.retire_channels(&mut link);
            log::warn!("postcopy paused: {e}; waiting for a new connection (migrate with resume)");
            self.transferred = self.pc_bytes(&link);
            self.publish(Status::PostcopyPaused, "", Some(e.to_string()));
            loop {
                let (conn, mut open) = match self.handle.take_reconnect() {
                    Reconnect::Out(c, open) => (c, open),
                    _ => {
                        if self.handle.is_cancelled() {
                            return Err(MigrationError::Postcopy(PostcopyError::Abandoned(
                                Box::new(e),
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                self.publish(Status::PostcopyRecover, "", None);
                match self.resume_connection(conn, open.as_mut(), &mut link) {
                    Ok(()) => break,
                    Err(e2) => {
                        // Whatever went wrong (a cut, a destination that
                        // refused this connection), the guest lives there:
                        // stay paused for another try.
                        log::warn!("postcopy recovery failed: {e2}; still paused");
                        link.retire();
                        self.publish(Status::PostcopyPaused, "", Some(e2.to_string()));
                    }
                }
            }
            self.postcopy_pace_from = Some((self.pc_bytes(&link), Instant::now()));
            self.publish(Status::PostcopyActive, "", None);
        }
        self.transferred = self.pc_bytes(&link);
        self.postcopy_time = Some(switched.elapsed().as_millis() as u64);
        self.postcopy_point();
        vm.set_throttle(0);
        self.throttle = 0;
        Ok(())
    }

    /// At the switch, in the pause (the guest stopped, so nothing it
    /// writes can race the look-up): sends as zero runs, and takes out of
    /// the set still to send, every page the kernel says was never written
    /// here (see `sys/residency.rs`; memory for which it cannot say keeps
    /// its pages). Returns how many.
    fn send_untouched<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<u64, MigrationError> {
        let mut sent = 0;
        for b in 0..self.blocks.len() {
            let left = &self.search.bitmaps()[b];
            if left.count() == 0 {
                continue;
            }
            let Some(data) = self.blocks[b].data_pages(0, self.blocks[b].pages()) else {
                continue;
            };
            let words: Vec<u64> = left
                .words()
                .iter()
                .zip(data.words())
                .map(|(&l, &d)| l & !d)
                .collect();
            let mut zero = DirtyBitmap::new(left.len());
            if zero.or_words(0, &words) == 0 {
                continue;
            }
            let mut p = 0;
            while let Some(first) = zero.next_set(p) {
                let end = zero.next_clear(first).unwrap_or(zero.len());
                self.encoder
                    .untouched_run(w, b as u16, first * PAGE_SIZE as u64, end - first)
                    .map_err(MigrationError::send)?;
                p = end;
            }
            let n = self.search.take_all(b, &zero);
            self.pages_sent += n;
            sent += n;
        }
        Ok(sent)
    }

    /// At the switch, in the pause: sends the zero pages ahead of each
    /// sweep [`PausePlan`] finds in the final sync's harvest, in its order,
    /// each sweep's up to its first page of data, within [`PAUSE_BYTES`]
    /// stream bytes (fewer if the downtime limit leaves less after
    /// everything else the pause holds). Returns where the background
    /// push should start: the longest sweep's first page not sent.
    fn send_pause_pages<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        pause_at: Instant,
    ) -> Result<Option<(usize, u64)>, MigrationError> {
        let plan = PausePlan::new(&self.fresh, self.search.bitmaps());
        let Some(first) = plan.sweeps.first().and_then(|s| s.first()) else {
            return Ok(None);
        };
        let mut push_from = Some(*first);
        let page = PAGE_SIZE as u64;
        let mut budget = PAUSE_BYTES;
        let mut inputs = self.pause_inputs();
        // Drained or not, what is still on its way arrives first.
        inputs.in_flight_bytes = self.sent_bytes(w).saturating_sub(self.applied);
        while budget >= page {
            inputs.remaining_bytes = budget;
            if self
                .pacing
                .fits_after(&inputs, pause_at.elapsed(), self.params.downtime_limit)
            {
                break;
            }
            budget /= 2;
        }
        let start = w.bytes();
        'all: for (k, pages) in plan.sweeps.iter().enumerate() {
            for &(b, p) in pages {
                if budget < page || w.bytes() - start >= budget {
                    break 'all;
                }
                let off = (p * page) as usize;
                let region = self.blocks[b].region();
                if region.scan(off, PAGE_SIZE, is_zero) != Some(true) {
                    // Data: left to postcopy (see `postcopy/ahead.rs`).
                    break;
                }
                if self.search.take(b, p) {
                    self.send_page(w, b, p, true)
                        .map_err(MigrationError::send)?;
                }
                if k == 0 {
                    push_from = Some((b, p + 1));
                }
            }
        }
        Ok(push_from)
    }

    /// Postcopy over the current connections: requests first, the rest in
    /// the background, END, and the destination's COMPLETE.
    fn postcopy_run<W: Write>(&mut self, link: &mut PostcopyLink<W>) -> Result<(), MigrationError> {
        let blocks: Vec<(String, u64)> = self
            .blocks
            .iter()
            .map(|b| (b.id().to_string(), b.len()))
            .collect();
        let mut published = Instant::now();
        use std::sync::mpsc::RecvTimeoutError;
        // How long to wait for a request before looking at the background
        // push again: zero, unless every page channel's queue is full.
        let mut wait = Duration::ZERO;
        while self.remaining_pages() > 0 || self.channels_pending() {
            // Requested pages first, each at most once.
            loop {
                let got = if wait.is_zero() {
                    link.requests.try_recv().map_err(|e| match e {
                        std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                        std::sync::mpsc::TryRecvError::Disconnected => {
                            RecvTimeoutError::Disconnected
                        }
                    })
                } else {
                    link.requests.recv_timeout(wait)
                };
                wait = Duration::ZERO;
                match got {
                    Ok(Ok((at, Message::Request(req)))) => {
                        let (b, first, n) = check_request(&blocks, at, &req)?;
                        self.postcopy_requests += 1;
                        let mut sent = false;
                        for p in first..first + n {
                            if self.search.take(b, p) {
                                self.pc_requested += 1;
                                // Never on a page channel: behind bulk pages.
                                match &mut link.urgent {
                                    Some((u, _)) => self.send_direct(u, b, p),
                                    None => on_out!(&mut link.out, w => self.send_direct(w, b, p)),
                                }
                                .map_err(MigrationError::send)?;
                                sent = true;
                            }
                        }
                        if sent {
                            // Locality: the background scan goes on just after.
                            self.search.seek(b, first + n);
                            match &mut link.urgent {
                                Some((u, seq)) => {
                                    u.section_end(*seq).map_err(MigrationError::send)?;
                                    *seq += 1;
                                }
                                None => on_out!(&mut link.out, w => self.section_end(w))?,
                            }
                        }
                    }
                    Ok(Ok((_, Message::Progress { stream, offset }))) => {
                        self.progress(link, stream, offset)
                    }
                    Ok(Ok((at, Message::Lost { stream }))) => {
                        return Err(PostcopyError::PeerLost { offset: at, stream }.into())
                    }
                    Ok(Ok((_, Message::Complete(_)))) => {
                        return Err(PostcopyError::EarlyComplete(self.remaining_pages()).into())
                    }
                    Ok(Ok((_, Message::Failed(why)))) => {
                        return Err(MigrationError::Destination(ack::PeerReason(why)))
                    }
                    Ok(Ok((at, _))) => return Err(PostcopyError::NotRequest { offset: at }.into()),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(PostcopyError::ReturnPathClosed.into())
                    }
                }
            }
            // Then a small batch of background pages, flushed, so that a
            // request never waits behind more than one batch of ours; paced
            // by max-bandwidth like precopy, in short waits so that a
            // request that comes meanwhile is served at once.
            if let Some(d) = self.postcopy_wait(link) {
                wait = d.min(Duration::from_millis(1));
                self.refresh_postcopy_bandwidth(link, &mut published);
                continue;
            }
            if self.window_full(link) {
                // Flow control: the destination has not read what is in
                // flight; more would only queue in socket buffers, ahead
                // of pages a fault may need.
                wait = Duration::from_millis(1);
                self.refresh_postcopy_bandwidth(link, &mut published);
                continue;
            }
            let enc = self.encoding();
            if let Some(ch) = &mut self.channels {
                // Page channels carry the background push, a small batch
                // at a time; when all their queues are full, wait for a
                // request instead of blocking on a queue.
                if ch.pending() == 0 {
                    // Bounded in bytes like the one-stream batch. The
                    // channel encodes, so the bytes are not known here:
                    // a page found zero here (or never written) counts as
                    // a zero record and goes as one without the channel
                    // reading it; any other page counts as a raw page.
                    let mut batch = PushBatch::default();
                    while !batch.full() {
                        let Some(f) = self.search.take_next() else {
                            break;
                        };
                        self.pc_pushed += 1;
                        let known = if self.search.is_bulk()
                            && self
                                .untouched
                                .is_untouched(f.block, f.page, &self.blocks[f.block])
                        {
                            Known::Untouched
                        } else if self.blocks[f.block].region().scan(
                            (f.page * PAGE_SIZE as u64) as usize,
                            PAGE_SIZE,
                            is_zero,
                        ) == Some(true)
                        {
                            Known::Zero
                        } else {
                            Known::Nothing
                        };
                        ch.stage(f.block as u16, f.page, known);
                        batch.queued(known != Known::Nothing);
                    }
                }
                if !ch.try_flush_batch(enc).map_err(MigrationError::send)? {
                    wait = Duration::from_micros(200);
                }
            } else {
                // A batch is bounded in bytes (what a request may wait
                // behind), not in pages: zero pages are a few bytes each.
                let from = on_out!(&link.out, w => w.bytes());
                let mut batch = PushBatch::default();
                let mut pages = 0u64;
                while !batch.full() {
                    let Some(f) = self.search.take_next() else {
                        break;
                    };
                    self.pc_pushed += 1;
                    pages += 1;
                    on_out!(&mut link.out, w => self.send_page(w, f.block, f.page, true))
                        .map_err(MigrationError::send)?;
                    batch.sent(on_out!(&link.out, w => w.bytes()) - from);
                }
                let bytes = on_out!(&link.out, w => w.bytes()) - from;
                if pages > 0 && bytes < pages * PAGE_SIZE as u64 / 2 && !self.window_full(link) {
                    // Mostly zero pages: the link has room for data from
                    // behind (see [`Behind`]).
                    self.push_behind(link)?;
                }
                on_out!(&mut link.out, w => self.section_end(w))?;
            }
            self.transferred = self.pc_bytes(link);
            self.refresh_postcopy_bandwidth(link, &mut published);
        }
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // Every channel ends its stream (and its thread) first.
            ch.finish(enc).map_err(MigrationError::send)?;
        }
        if let Some((u, _)) = &mut link.urgent {
            u.end().map_err(MigrationError::send)?;
        }
        on_out!(&mut link.out, w => w.end()).map_err(MigrationError::send)?;
        self.transferred = self.pc_bytes(link);
        // Requests still in flight are for pages already sent; each is
        // still checked (one outside every block is an error, as before).
        let deadline = Instant::now() + crate::transport::IO_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match link.requests.recv_timeout(left) {
                Ok(Ok((at, Message::Request(req)))) => {
                    check_request(&blocks, at, &req)?;
                    self.postcopy_requests += 1;
                }
                Ok(Ok((_, Message::Progress { .. }))) => {}
                Ok(Ok((at, Message::Lost { stream }))) => {
                    return Err(PostcopyError::PeerLost { offset: at, stream }.into())
                }
                Ok(Ok((_, Message::Complete(report)))) => {
                    self.fault_report = Some(report);
                    return Ok(());
                }
                Ok(Ok((_, Message::Failed(why)))) => {
                    return Err(MigrationError::Destination(ack::PeerReason(why)))
                }
                Ok(Ok((at, _))) => return Err(PostcopyError::NotRequest { offset: at }.into()),
                Ok(Err(e)) => return Err(PostcopyError::NoComplete(Box::new(e)).into()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(PostcopyError::CompleteTimeout(crate::transport::IO_TIMEOUT).into())
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(PostcopyError::ReturnPathClosed.into())
                }
            }
        }
    }

    /// One batch of postcopy's second walk (see [`Behind`]) on the main
    /// stream, if it has pages left.
    fn push_behind<W: Write>(&mut self, link: &mut PostcopyLink<W>) -> Result<(), MigrationError> {
        let Some(mut bh) = self.behind.take() else {
            return Ok(());
        };
        std::mem::swap(&mut self.untouched, &mut bh.untouched);
        let from = on_out!(&link.out, w => w.bytes());
        let mut batch = PushBatch::default();
        let mut r = Ok(());
        while !batch.full() {
            let Some((b, p)) = self.search.take_next_before(&mut bh.pos, bh.end) else {
                break;
            };
            self.pc_pushed += 1;
            r = on_out!(&mut link.out, w => self.send_page(w, b, p, true));
            if r.is_err() {
                break;
            }
            batch.sent(on_out!(&link.out, w => w.bytes()) - from);
        }
        std::mem::swap(&mut self.untouched, &mut bh.untouched);
        if bh.pos < bh.end {
            self.behind = Some(bh);
        }
        r.map_err(MigrationError::send)
    }

    /// PROGRESS from the destination: stream `stream` was read up to
    /// `offset`. A stream this source does not have (an old page channel
    /// after a recovery) is ignored.
    fn progress<W: Write>(&self, link: &mut PostcopyLink<W>, stream: u16, offset: u64) {
        let streams = 1 + self.channels.as_ref().map_or(0, SendChannels::count);
        link.progress_seen = true;
        let acked = link.acked.get_or_insert_with(|| vec![0; streams]);
        if let Some(a) = acked.get_mut(usize::from(stream)) {
            *a = (*a).max(offset);
        }
    }

    /// Whether the background streams have [`PUSH_WINDOW`] bytes each in
    /// flight (sent, not read by the destination).
    fn window_full<W: Write>(&self, link: &PostcopyLink<W>) -> bool {
        let Some(acked) = &link.acked else {
            return false;
        };
        if !link.progress_seen && link.window_from.elapsed() >= PROGRESS_GRACE {
            // A destination that reports no progress gets no window.
            return false;
        }
        match &self.channels {
            Some(ch) => (0..ch.count()).all(|i| {
                let read = acked.get(i + 1).copied().unwrap_or(0);
                ch.bytes_of(i).saturating_sub(read) >= PUSH_WINDOW
            }),
            None => {
                if link.dead {
                    return false;
                }
                let sent = on_out!(&link.out, w => w.bytes());
                sent.saturating_sub(acked[0]) >= PUSH_WINDOW
            }
        }
    }

    /// Starts the flow-control window at the streams' current ends: what
    /// the destination has certainly read when postcopy (re)starts (it
    /// read up to GO, or up to the start of a resumed stream, before it
    /// answered). Before, the window started with the first PROGRESS,
    /// and until that came (a few ms: two threads to wake on each side)
    /// the push filled the socket buffers with megabytes that the first
    /// requested page then waited behind.
    fn open_window<W: Write>(&self, link: &mut PostcopyLink<W>) {
        let main = if link.dead {
            0
        } else {
            on_out!(&link.out, w => w.bytes())
        };
        let mut acked = vec![main];
        if let Some(ch) = &self.channels {
            acked.extend((0..ch.count()).map(|i| ch.bytes_of(i)));
        }
        link.acked = Some(acked);
        link.progress_seen = false;
        link.window_from = Instant::now();
    }

    /// Stream bytes of postcopy's connections and the page channels.
    fn pc_bytes<W: Write>(&self, link: &PostcopyLink<W>) -> u64 {
        link.bytes() + self.channels.as_ref().map_or(0, SendChannels::bytes)
    }

    /// Pages taken from the bitmap but not yet handed to a page channel.
    fn channels_pending(&self) -> bool {
        self.channels.as_ref().is_some_and(|c| c.pending() > 0)
    }

    /// Sends a page on `w` itself, never on a page channel (a requested
    /// page must not queue behind background pages).
    fn send_direct<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        block: usize,
        page: u64,
    ) -> io::Result<()> {
        let channels = self.channels.take();
        let r = self.send_page(w, block, page, true);
        self.channels = channels;
        r
    }

    /// A connection was lost during postcopy: the page channels go with it
    /// (what they sent is counted; recovery resumes over one connection).
    fn retire_channels<W: Write>(&mut self, link: &mut PostcopyLink<W>) {
        if let Some(ch) = &self.channels {
            link.retired_bytes += ch.bytes();
        }
        self.close_channels();
    }

    /// Every [`STEP`]: publishes the stats and takes a new
    /// `max-bandwidth` (it may change while postcopy runs; the other
    /// parameters were fixed at the switch).
    fn refresh_postcopy_bandwidth<W: Write>(
        &mut self,
        link: &PostcopyLink<W>,
        published: &mut Instant,
    ) {
        if published.elapsed() < STEP {
            return;
        }
        self.transferred = self.pc_bytes(link);
        self.pacing.measure(self.transferred, Instant::now());
        self.publish(Status::PostcopyActive, "", None);
        self.postcopy_point();
        *published = Instant::now();
        let limit = self.handle.params().max_bandwidth;
        if limit != self.params.max_bandwidth {
            self.params.max_bandwidth = limit;
            self.postcopy_pace_from = Some((self.pc_bytes(link), Instant::now()));
        }
    }

    /// Records postcopy's progress now (for reports).
    fn postcopy_point(&self) {
        self.handle
            .push_postcopy_point(crate::engine::PostcopyPoint {
                time_ms: self.started.elapsed().as_millis() as u64,
                pushed_pages: self.pc_pushed,
                requested_pages: self.pc_requested,
                requests: self.postcopy_requests,
            });
    }

    /// How long the background push must still wait for `max-bandwidth`
    /// (bytes since the switch, requested pages included, against the
    /// time since); `None` when it may send now.
    fn postcopy_wait<W: Write>(&self, link: &PostcopyLink<W>) -> Option<Duration> {
        let limit = self.params.max_bandwidth;
        let (from, since) = self.postcopy_pace_from?;
        if limit == 0 {
            return None;
        }
        let sent = self.pc_bytes(link).saturating_sub(from);
        let due = Duration::from_secs_f64(sent as f64 / limit as f64);
        due.checked_sub(since.elapsed()).filter(|d| !d.is_zero())
    }

    /// A main stream's start over `out`: the header with `flags`, the
    /// channel record when `n` page channels go beside it (all of
    /// migration `session`), then the block list, which it returns.
    fn start_stream<W: Write>(
        &self,
        out: W,
        flags: u16,
        n: u16,
        session: u64,
    ) -> Result<(StreamWriter<TimedWrite<W>>, Vec<BlockDesc>), MigrationError> {
        let out = TimedWrite::new(out, self.wire.clone());
        let mut w = if n > 1 {
            let mut w = StreamWriter::new(out, flags | FLAG_CHANNELS);
            w.channel(0, n, session).map_err(MigrationError::send)?;
            w
        } else {
            StreamWriter::new(out, flags)
        };
        let descs: Vec<BlockDesc> = self
            .blocks
            .iter()
            .map(|b| BlockDesc {
                id: b.id().to_string(),
                len: b.len(),
            })
            .collect();
        w.block_list(&descs).map_err(MigrationError::send)?;
        Ok((w, descs))
    }

    /// Recovery over `conn`: a new stream start, the destination's
    /// received bitmap, and postcopy goes on from its complement. With
    /// `open`, the urgent connection and the page channels the migration
    /// had are opened again (as at the first connection: after the main
    /// stream's start, urgent first; each page channel starts its stream
    /// with the POSTCOPY record); without it, everything goes on `conn`.
    fn resume_connection<W: Write>(
        &mut self,
        conn: crate::transport::Outgoing,
        open: Option<&mut super::handle::OpenConnection>,
        link: &mut PostcopyLink<W>,
    ) -> Result<(), MigrationError> {
        let crate::transport::Outgoing { writer, ack } = conn;
        let Some(ack) = ack else {
            return Err(ParamsError::RecoveryNeedsReturnPath.into());
        };
        let (urgent_wanted, n) = match &open {
            Some(_) => (link.urgent_wanted, link.page_channels),
            None => (false, 0),
        };
        let mut flags = 0;
        if urgent_wanted {
            flags |= crate::stream::format::FLAG_URGENT;
        }
        let session = session_number();
        let (mut w, descs) = self.start_stream(writer, flags, n, session)?;
        w.section_end(0).map_err(MigrationError::send)?;
        let opened = |what: String| {
            move |e: io::Error| {
                MigrationError::Send(io::Error::new(e.kind(), format!("reopening {what}: {e}")))
            }
        };
        let mut urgent = None;
        let mut channels = None;
        if let Some(open) = open {
            if urgent_wanted {
                let conn = open(URGENT_CONNECTION)
                    .map_err(opened("the postcopy urgent connection".into()))?;
                let mut u = StreamWriter::new(conn, 0);
                u.block_list(&descs).map_err(MigrationError::send)?;
                u.section_end(0).map_err(MigrationError::send)?;
                urgent = Some((u, 1));
            }
            if n > 1 {
                let conns = (1..=n)
                    .map(|i| open(i).map_err(opened(format!("page channel {i}"))))
                    .collect::<Result<Vec<_>, _>>()?;
                let setup = ChannelSetup {
                    flags: 0,
                    session,
                    blocks: self.blocks.clone(),
                    descs: descs.clone(),
                };
                let mut ch = SendChannels::start(conns, &setup).map_err(MigrationError::send)?;
                // Straight into postcopy: the destination reads up to the
                // POSTCOPY record before it answers with its bitmap.
                ch.postcopy(self.encoding()).map_err(MigrationError::send)?;
                channels = Some(ch);
            }
        }
        let mut mr = MessageReader::new(ack);
        let lens: Vec<u64> = self.blocks.iter().map(|b| b.len()).collect();
        let mut asm = BitmapAssembler::new(&lens);
        loop {
            let (at, m) = mr.read_message()?;
            if let Message::Failed(why) = m {
                return Err(MigrationError::Destination(ack::PeerReason(why)));
            }
            if asm.add(at, &m)? {
                break;
            }
        }
        // What the destination lacks: pages never sent, and those lost in
        // flight with the old connections.
        self.search.restart(asm.missing());
        self.behind = None;
        self.seq = 1;
        link.out = PcOut::Resumed(w);
        link.dead = false;
        link.urgent = urgent;
        self.channels = channels;
        // The destination read the new streams' starts (and each page
        // channel up to its POSTCOPY record) before it sent its bitmap.
        self.open_window(link);
        link.requests = spawn_request_reader(mr)?;
        log::info!(
            "postcopy resumed: {} pages left to send, {} page channels, {} urgent connection",
            self.remaining_pages(),
            n,
            if link.urgent.is_some() { "an" } else { "no" }
        );
        Ok(())
    }

    /// Measures how fast the verify digest hashes, on a sample.
    fn sample_hash(&mut self) {
        let t = Instant::now();
        let bytes = hash_sample(self.mem, HASH_SAMPLE);
        self.pacing.record_hash(bytes, t.elapsed());
        self.hash_sampled = Instant::now();
    }

    /// What the pause estimate needs, as things stand.
    fn pause_inputs(&self) -> PauseInputs {
        PauseInputs {
            remaining_bytes: self.remaining_bytes(),
            dirty_pages_rate: self.dirty_pages_rate,
            verify: self.params.verify,
            digest_bytes: self.digest_bytes(),
            dest_digest_bytes: self.dest_digest_bytes(),
            state: self.state_cost,
            stop: self.stop_cost,
            in_flight_bytes: self.confirmed_in_flight(),
        }
    }

    /// Bytes written since the last drain mark, while no page went out
    /// after it (between a drain and the pause): the destination has yet
    /// to apply them. 0 otherwise: before the drain the estimate asks
    /// whether to drain and pause, and the drain takes care of them.
    fn confirmed_in_flight(&self) -> u64 {
        if self.drained {
            self.transferred.saturating_sub(self.applied)
        } else {
            0
        }
    }

    /// Stream bytes written that the destination has not confirmed
    /// applying (0 without a return path).
    fn in_flight<W: Write>(&self, w: &StreamWriter<W>, ack: &AckPath<'_>) -> u64 {
        match ack {
            AckPath::None => 0,
            _ => self.sent_bytes(w).saturating_sub(self.applied),
        }
    }

    /// Waits, the guest still running, until the destination has applied
    /// every byte sent so far: a DRAIN mark ends a section (behind a
    /// barrier on every page channel, which the destination's main stream
    /// waits at), and the destination answers APPLIED on the return path.
    /// The pause that follows then holds only its own bytes. Nothing to
    /// wait for without a return path, or when nothing was sent since the
    /// last mark.
    fn drain<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        ack: &mut AckPath<'_>,
    ) -> Result<(), MigrationError> {
        let Some(r) = ack.as_read() else {
            return Ok(());
        };
        if self.sent_bytes(w) == self.applied {
            self.drained = true;
            return Ok(());
        }
        let t = Instant::now();
        if self.channels.is_some() {
            // Pages queued on the channels go out before the barrier.
            self.barrier(w)?;
        }
        self.mark_and_wait(w, r)?;
        self.drained = true;
        self.drain_wait = t.elapsed();
        // The wait says nothing about the link's rate.
        self.pacing.exclude(self.drain_wait);
        Ok(())
    }

    /// Ends a section with the next DRAIN mark and waits for its APPLIED
    /// on the return path `r`: every byte sent before the mark is applied
    /// then.
    /// Returns the destination's report, when it sent one.
    fn mark_and_wait<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        r: &mut dyn Read,
    ) -> Result<Option<LoadReport>, MigrationError> {
        self.end_with_mark(w)?;
        let sent = self.sent_bytes(w);
        // The window's marks out come first (answers come in order).
        self.settle_marks(r)?;
        let report = ack::await_applied(r, self.drain_mark)?;
        self.take_report(report.as_ref());
        self.applied = sent;
        Ok(report)
    }

    /// Keeps what the destination reported with an APPLIED: its own
    /// pending work and hashing rate.
    fn take_report(&mut self, report: Option<&LoadReport>) {
        if let Some(report) = report {
            self.dest_backlog = report.backlog;
            self.pacing.record_dest_report(report);
        }
    }

    /// Postcopy `auto`'s window is on (see `postcopy/window.rs`): one
    /// stream with a return path, the first pass, the decision open.
    fn window_active(&self) -> bool {
        self.auto_postcopy()
            && self.channels.is_none()
            && self.search.is_bulk()
            && !self.auto_switch.wants_switch()
            && self.stalls < AUTO_STALLS
            && !self.handle.postcopy_requested()
    }

    /// Before a precopy step: while the window is on, waits for the
    /// oldest DRAIN mark when the window is full (the guest running, the
    /// link busy with what followed it) and sets a new mark every half
    /// window; once it is off, waits for the marks still out.
    fn window_turn<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        ack: &mut AckPath<'_>,
    ) -> Result<(), MigrationError> {
        if !self.window_active() {
            return self.settle_window(ack);
        }
        let Some(r) = ack.as_read() else {
            return Ok(());
        };
        let sent = self.sent_bytes(w);
        if self.window.full(sent, self.applied) && self.window.outstanding() == 0 {
            // Written past the window with no mark out: one now.
            self.window_mark(w)?;
        }
        while self.window.must_wait(self.sent_bytes(w), self.applied) {
            self.confirm_oldest(r)?;
        }
        if self.window.mark_due(self.sent_bytes(w), self.applied) {
            self.window_mark(w)?;
        }
        Ok(())
    }

    /// Ends a section with a DRAIN mark the window waits for later.
    fn window_mark<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<(), MigrationError> {
        self.end_with_mark(w)?;
        self.window.marked(self.drain_mark, self.sent_bytes(w));
        Ok(())
    }

    /// Writes the next DRAIN mark and ends the section with it.
    fn end_with_mark<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<(), MigrationError> {
        self.drain_mark += 1;
        w.drain(self.drain_mark).map_err(MigrationError::send)?;
        self.section_end(w)
    }

    /// Waits for the APPLIED of the window's oldest mark on `r`.
    fn confirm_oldest(&mut self, r: &mut dyn Read) -> Result<(), MigrationError> {
        let Some((mark, _)) = self.window.oldest() else {
            return Ok(());
        };
        let report = ack::await_applied(r, mark)?;
        self.take_report(report.as_ref());
        if let Some((_, bytes)) = self.window.confirm(Instant::now()) {
            self.applied = self.applied.max(bytes);
        }
        Ok(())
    }

    /// Waits for every window mark still out on `r`.
    fn settle_marks(&mut self, r: &mut dyn Read) -> Result<(), MigrationError> {
        while self.window.outstanding() > 0 {
            self.confirm_oldest(r)?;
        }
        Ok(())
    }

    /// [`Self::settle_marks`] on the return path, if there is one.
    fn settle_window(&mut self, ack: &mut AckPath<'_>) -> Result<(), MigrationError> {
        if self.window.outstanding() == 0 {
            return Ok(());
        }
        match ack.as_read() {
            Some(r) => self.settle_marks(r),
            None => Ok(()),
        }
    }

    /// Times an empty round trip to the destination, the guest running: a
    /// DRAIN mark with nothing before it (right after [`Self::drain`]),
    /// answered once the destination's reader woke up and read it. On a
    /// loaded host this is what each leg of the completion handshake
    /// costs; the pause estimate prices the handshake from it (see
    /// `pacing.rs`). Nothing to time without a return path, or with bytes
    /// still in flight (their apply would count).
    fn ping<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        ack: &mut AckPath<'_>,
    ) -> Result<(), MigrationError> {
        let Some(r) = ack.as_read() else {
            return Ok(());
        };
        if self.sent_bytes(w) != self.applied {
            return Ok(());
        }
        let t = Instant::now();
        let report = self.mark_and_wait(w, r)?;
        // The destination's digest catch-up before its answer is priced
        // as the digest, not as the round trip.
        self.ping = t
            .elapsed()
            .saturating_sub(report.map_or(Duration::ZERO, |r| r.hash_time));
        self.pacing.record_ping(self.ping);
        self.pacing.exclude(self.ping);
        Ok(())
    }

    /// In a stop-and-copy's page sending: whether the rest of the pause
    /// would now cross the limit (see [`Pacing::overruns`]).
    fn pause_overruns(&self) -> bool {
        let Some(c) = self.pause_check else {
            return false;
        };
        if c.pause_at.elapsed() >= Duration::from_millis(c.limit) {
            // Already over: cutting it short now would only add a pause.
            return false;
        }
        let sending = (
            self.transferred.saturating_sub(c.bytes_at),
            c.pages_at.elapsed(),
        );
        self.pacing
            .overruns(&self.pause_inputs(), c.pause_at.elapsed(), sending, c.limit)
    }

    /// Whether a pause that would overrun may still be cut short: not
    /// more than [`MAX_BACKOUTS`] times, only once the link was measured
    /// (a guest with nothing left to send pauses before any measurement:
    /// no estimate to check against), and only when the limit can be
    /// kept at all (when the fixed costs alone exceed it, precopy has
    /// already settled for the overshoot, see [`Pacing::settled`]).
    fn may_back_out(&self) -> bool {
        self.backouts < MAX_BACKOUTS
            && self.pacing.conservative_bandwidth() > 0.0
            && !self
                .pacing
                .floor_exceeds(&self.pause_inputs(), self.params.downtime_limit)
    }

    /// Cuts a stop-and-copy short before anything that cannot be taken
    /// back (device state, the stream's end): resumes the guest, which
    /// then runs on under precopy. What the pause sent are ordinary
    /// precopy pages (the tracker never stopped); `sending` (bytes, time)
    /// is the pause's page rate, kept as a bandwidth period so the next
    /// decision does not expect the old one.
    fn back_out(
        &mut self,
        vm: &mut dyn VmControl,
        guest: &mut GuestSide,
        pause_at: Instant,
        sending: (u64, Duration),
        when: &str,
    ) -> Result<(), MigrationError> {
        vm.resume().map_err(MigrationError::Vm)?;
        guest.paused = false;
        let paused = ms(pause_at.elapsed());
        self.downtime_start = None;
        self.backouts += 1;
        self.backout_max = self.backout_max.max(paused);
        self.pause_chunks = 0;
        self.pacing
            .record_pause_rate(sending.0, sending.1, self.limit_at_switch);
        self.pacing.restart_period(self.transferred, Instant::now());
        self.overran = false;
        // What the pause sent is in flight again.
        self.drained = false;
        let e = self.pacing.estimate(&self.pause_inputs());
        log::warn!(
            "the pause would have crossed its limit of {} ms ({when}, after {paused} ms; {} KiB still to send); the guest runs again and precopy goes on (the next estimate: {} ms)",
            self.params.downtime_limit,
            self.remaining_bytes() >> 10,
            e.total().as_millis()
        );
        Ok(())
    }

    /// Bytes the source's verify digest hashes in the pause: all of
    /// memory, or with the running digest the chunks not hashed since they
    /// changed and those holding a remaining page (see `pacing.rs`).
    fn digest_bytes(&self) -> u64 {
        if !self.params.verify {
            return 0;
        }
        let dest = self.dest_chunks();
        match self.running {
            Some(d) => d.pending_bytes().max(dest),
            None => self.mem.total_bytes(),
        }
    }

    /// Bytes the destination's digest re-hashes after the stream's end:
    /// the chunks holding a remaining page (in the pause: those of the
    /// pages it sends), and what the destination's last report said it
    /// had still to hash.
    fn dest_digest_bytes(&self) -> u64 {
        if !self.params.verify {
            return 0;
        }
        self.dest_chunks() + self.dest_backlog
    }

    /// Bytes of the digest chunks that hold a remaining page, or in a
    /// stop-and-copy those the pause's pages fall in.
    fn dest_chunks(&self) -> u64 {
        self.dirty_chunk_bytes().max(self.pause_chunks)
    }

    /// Bytes of the digest chunks that hold a remaining page.
    fn dirty_chunk_bytes(&self) -> u64 {
        let per = (DIGEST_CHUNK / PAGE_SIZE) as u64;
        let mut chunks = 0u64;
        for bm in self.search.bitmaps() {
            let mut p = 0;
            while let Some(q) = bm.next_set(p) {
                chunks += 1;
                p = (q / per + 1) * per;
            }
        }
        chunks * DIGEST_CHUNK as u64
    }

    /// True when the guest may pause now: the pause fits the downtime
    /// limit, or nothing is left to send, or the fixed costs alone exceed
    /// the limit and the pages left add at most a tenth of it (waiting
    /// cannot shorten such a pause; that is warned about once and the
    /// overshoot is reported in the stats: [`Pacing::settled`]).
    fn pause_fits(&mut self) -> bool {
        let i = self.pause_inputs();
        let limit = self.params.downtime_limit;
        if !self.floor_warned && self.pacing.floor_exceeds(&i, limit) {
            self.floor_warned = true;
            let e = self.pacing.estimate(&i);
            log::warn!(
                "the downtime limit of {limit} ms cannot be honoured: the pause needs about {} ms whatever is left to send (vCPU stop {} ms, sync {} ms, device state {} ms, verify digest {} ms, handshake {} ms); precopy switches over once the pages left add no more than a tenth of the limit",
                e.fixed().as_millis(),
                e.stop.as_millis(),
                e.sync.as_millis(),
                e.state.as_millis(),
                e.digest.as_millis(),
                e.handshake.as_millis()
            );
        }
        i.remaining_bytes == 0 || self.pacing.settled(&i, limit)
    }

    /// Whether the switch-over sync the pause estimate asks for is worth
    /// making now: the first one always; after one that did not lead to
    /// the pause, when the set it would find fits or is clearly smaller
    /// than the last one, or [`shrink::RESYNC_PERIOD`] has passed.
    fn switch_sync_due(&self) -> bool {
        let ps = PAGE_SIZE as u64;
        let limit = self.params.downtime_limit;
        let inputs = self.pause_inputs();
        let fits = |pages: u64| {
            let i = PauseInputs {
                remaining_bytes: pages * ps,
                ..inputs
            };
            pages == 0 || self.pacing.settled(&i, limit)
        };
        shrink::sync_due(
            shrink::SyncState {
                left: self.remaining_bytes() / ps,
                growth_pages_per_sec: self.growth.map(|r| r.growth / ps as f64),
                since: self.last_sync.elapsed().as_secs_f64(),
                last_found: self.last_found,
            },
            fits,
        )
    }

    /// True when precopy should send on although the pause fits: the set
    /// left is not small and grew, at the last switch-over sync, far
    /// slower than the link sends (see `shrink.rs`).
    fn keeps_shrinking(&self) -> bool {
        shrink::keep_sending(
            self.remaining_bytes(),
            self.growth,
            self.pacing.conservative_bandwidth(),
            self.params.downtime_limit,
        )
    }

    /// Bytes still to send: the bitmap's pages and those queued on page
    /// channels but not written yet.
    fn remaining_bytes(&self) -> u64 {
        let queued = self
            .channels
            .as_ref()
            .map_or(0, SendChannels::in_flight_pages);
        (self.remaining_pages() + queued) * PAGE_SIZE as u64
    }

    fn apply_params(&mut self) {
        let p = &self.params;
        self.encoder
            .set_xbzrle(p.xbzrle.then_some(p.xbzrle_cache_size));
        self.encoder.set_compression(
            p.compress.map(|c| (c.algorithm, c.level)),
            p.adaptive_encoding,
        );
    }

    fn section_end<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<(), MigrationError> {
        w.section_end(self.seq).map_err(MigrationError::send)?;
        self.seq += 1;
        self.transferred = self.sent_bytes(w);
        Ok(())
    }

    /// Stops the page channels, keeping what they counted.
    fn close_channels(&mut self) {
        if let Some(ch) = self.channels.take() {
            for k in ch.counters() {
                self.closed_channels.add(&k);
            }
        }
    }

    /// Stream bytes produced so far, on all channels.
    fn sent_bytes<W: Write>(&self, w: &StreamWriter<W>) -> u64 {
        w.bytes() + self.channels.as_ref().map_or(0, SendChannels::bytes)
    }

    /// After a dirty sync: the epoch barrier on every channel, so that no
    /// page sent before the sync is applied after one sent after it.
    fn barrier<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<(), MigrationError> {
        let enc = self.encoding();
        let Some(ch) = &mut self.channels else {
            return Ok(());
        };
        ch.sync(self.epoch, enc).map_err(MigrationError::send)?;
        w.sync(self.epoch).map_err(MigrationError::send)?;
        self.epoch += 1;
        // Flushed at once: channels wait for the main stream's barrier.
        self.section_end(w)
    }

    /// Harvests the tracker into the migration bitmap and measures the
    /// dirty rate; may raise the throttle.
    fn sync(&mut self, tracker: &mut dyn DirtyTracker) -> Result<(), MigrationError> {
        let t = Instant::now();
        // The harvest goes into a bitmap of its own first: the page search
        // needs it to tell hot pages (see `search.rs`), the running digest
        // what this sync reported, not the pages still to send from before.
        let mut fresh = std::mem::take(&mut self.fresh);
        if fresh.len() != self.blocks.len() {
            fresh = self
                .search
                .bitmaps()
                .iter()
                .map(|b| DirtyBitmap::new(b.len()))
                .collect();
        } else {
            fresh.iter_mut().for_each(DirtyBitmap::clear_all);
        }
        let reported = tracker.sync(&mut fresh)?;
        self.search.add_report(&fresh);
        if let Some(d) = self.running {
            for (b, f) in fresh.iter().enumerate() {
                d.touch_pages(b, f);
            }
        }
        self.fresh = fresh;
        self.pacing.record_sync(t.elapsed());
        self.sync_count += 1;
        if !self.search.is_bulk() {
            // Progress: the set left now against the set the previous sync
            // left (or, first, what was sent since it).
            let left = self.remaining_pages();
            let before = self
                .prev_remaining
                .unwrap_or(self.pages_sent - self.last_sync_sent);
            if before > 0 && left * 10 >= before * 9 {
                self.stalls += 1;
            } else {
                self.stalls = 0;
            }
            self.prev_remaining = Some(left);
        }
        if self.auto_postcopy() {
            let left = self.remaining_bytes() / PAGE_SIZE as u64;
            // The first harvest (before any page went out, or just after
            // the first clear of an initially-set log) only becomes the
            // one later probes are measured against: no prediction.
            let bw = if self.pages_sent == 0 || self.auto_switch.harvests() == 0 {
                0.0
            } else {
                self.average_bandwidth()
            };
            if self.first_send.is_some() {
                self.mark_wire();
            }
            let n = self.guest_pages();
            self.auto_switch
                .sync(&self.fresh, t - self.last_sync, n, left, bw);
        }
        // Chunks with dirty pages must be cleared (re-protected) before
        // their pages go out again.
        self.search.synced();
        // The log that held writes since the last look-up is harvested:
        // look again.
        self.untouched.forget();
        self.rate_dirty_pages += reported;
        let now = Instant::now();
        let period = now - self.rate_time;
        if period >= DIRTY_RATE_PERIOD {
            let secs = period.as_secs_f64();
            self.dirty_pages_rate = (self.rate_dirty_pages as f64 / secs) as u64;
            let dirty_bytes = self.rate_dirty_pages * PAGE_SIZE as u64;
            let sent_bytes = self.transferred - self.rate_bytes;
            if !self.search.is_bulk() {
                self.assess_convergence(dirty_bytes as f64 / secs, sent_bytes as f64 / secs);
            }
            if self.params.auto_converge && !self.search.is_bulk() && dirty_bytes > sent_bytes / 2 {
                self.high_count += 1;
                if self.throttle > 0 || self.high_count >= THROTTLE_TRIGGER {
                    self.throttle = if self.throttle == 0 {
                        self.params.cpu_throttle_initial
                    } else {
                        self.throttle
                            .saturating_add(self.params.cpu_throttle_increment)
                            .min(self.params.max_cpu_throttle)
                    };
                    self.high_count = 0;
                }
            } else {
                self.high_count = 0;
            }
            self.rate_time = now;
            self.rate_dirty_pages = 0;
            self.rate_bytes = self.transferred;
        }
        let since = (now - self.last_sync).as_secs_f64().max(1e-6);
        self.handle.push_history(SyncPoint {
            time_ms: self.started.elapsed().as_millis() as u64,
            sync: self.sync_count,
            round: self.search.rounds(),
            dirty_pages: reported,
            remaining_pages: self.remaining_pages(),
            sent_pages: self.pages_sent - self.last_sync_sent,
            throughput: self.sent_rate(since) as u64,
            dirty_pages_rate: self.dirty_pages_rate,
            throttle: self.throttle,
            expected_downtime: self.expected_downtime(),
        });
        self.last_sync = now;
        self.last_sync_sent = self.pages_sent;
        self.last_sync_bytes = self.transferred;
        Ok(())
    }

    /// Updates the convergence figures from a measuring period's rates;
    /// logs once when precopy stops converging.
    fn assess_convergence(&mut self, dirty_rate: f64, send_rate: f64) {
        let bw = self.pacing.conservative_bandwidth().max(0.0);
        let c = converge::assess(converge::Period {
            dirty_rate,
            send_rate,
            remaining: self.remaining_bytes(),
            pause_budget: (bw * self.params.downtime_limit as f64 / 1e3) as u64,
            stalled_syncs: self.stalls,
        });
        if !c.converging && !self.convergence_warned && self.throttle == 0 {
            self.convergence_warned = true;
            log::warn!("precopy is {}", c.describe());
        }
        self.convergence = Some(c);
    }

    /// Bytes per second sent since the last sync, `secs` after it.
    fn sent_rate(&self, secs: f64) -> f64 {
        (self.transferred - self.last_sync_bytes) as f64 / secs
    }

    /// The pause a switch-over now would cost, in ms (everything counted:
    /// see `pacing.rs`); 0 until the link was measured.
    fn expected_downtime(&self) -> u64 {
        if self.pacing.conservative_bandwidth() <= 0.0 {
            return 0;
        }
        let e = self.pacing.estimate(&self.pause_inputs()).total();
        e.as_millis().min(u128::from(u32::MAX)) as u64
    }

    /// Sends pages for one step: ~50 ms and within the bandwidth limit,
    /// or, when completing, until nothing is left.
    fn step<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        tracker: &mut dyn DirtyTracker,
        completing: bool,
    ) -> Result<(), MigrationError> {
        let t0 = Instant::now();
        let mut n = 0u32;
        if !completing {
            // Pages go out after the last drain mark: in flight again.
            self.drained = false;
        }
        while let Some(found) = self.search.take_next() {
            let (block, page) = (found.block, found.page);
            if let Some((first, count)) = found.clear {
                tracker.clear(block, first, count)?;
                // A write before the clear may be gone from the log: what
                // was looked up before it no longer holds.
                self.untouched.forget();
                // A write between the sync that reported a page and this
                // clear is dropped from the log (the clear re-protects the
                // page) but not from the page, which is sent after it: the
                // running digest must re-read those pages too (this one
                // included), or the check after the switch-over would blame
                // the tracker for a write that did travel.
                if let Some(d) = self.running {
                    d.touch_range(block, &self.search.bitmaps()[block], first, count);
                    d.touch_page(block, page);
                }
            }
            let run = if self.search.is_bulk() {
                self.untouched
                    .untouched_run(block, page, &self.blocks[block])
            } else {
                0
            };
            if run > 0 {
                // Never written: zero records without reading them, the
                // pages that follow with it in one go (one clock reading
                // per run, not per 64 pages: reading the clock costs
                // more than a zero record here).
                let more = self
                    .search
                    .take_run(block, page + 1, (run - 1).min(UNTOUCHED_RUN - 1));
                self.encoder
                    .untouched_run(w, block as u16, page * PAGE_SIZE as u64, 1 + more)
                    .map_err(MigrationError::send)?;
                self.pages_sent += 1 + more;
            } else {
                self.send_page(w, block, page, completing)
                    .map_err(MigrationError::send)?;
            }
            n += 1;
            if self.first_send.is_none() && self.auto_postcopy() {
                // After the chunk's clear (above): probes count from here.
                self.first_send = Some(Instant::now());
                self.wire_mark = None;
                self.mark_wire();
            }
            // Under a bandwidth cap the budget is checked after every page
            // (a 100 ms window at a few MiB/s holds only ~100 pages);
            // otherwise every 64 pages is plenty.
            let capped = self.params.max_bandwidth > 0 && !completing;
            if capped || n.is_multiple_of(64) {
                self.transferred = self.sent_bytes(w);
                if completing {
                    if n.is_multiple_of(PAUSE_CHECK_PAGES) && self.pause_overruns() {
                        self.overran = true;
                        break;
                    }
                    continue;
                }
                // Postcopy `auto` probes the dirty rate every
                // PROBE_PERIOD of the first pass: the step ends for it.
                if self
                    .pacing
                    .rate_limit(self.transferred, self.params.max_bandwidth)
                    || t0.elapsed() >= STEP
                    || self.probe_due()
                    || (self.window_active() && self.window.full(self.transferred, self.applied))
                {
                    break;
                }
                if n.is_multiple_of(4096) && self.handle.is_cancelled() {
                    break;
                }
            }
        }
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // The partial batch goes now: pages held back here would count
            // as still to send while nothing sends them. A channel that
            // stopped is found here too, not only when its turn comes.
            ch.flush_batch(enc).map_err(MigrationError::send)?;
            ch.check().map_err(MigrationError::send)?;
            if n == 0 && ch.in_flight_pages() > 0 {
                // Only queued pages are left: let the channels write them.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.transferred = self.sent_bytes(w);
        Ok(())
    }

    fn send_page<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        block: usize,
        page: u64,
        completing: bool,
    ) -> io::Result<()> {
        let offset = page * PAGE_SIZE as u64;
        let b = block as u16;
        if self.pages_sent.is_multiple_of(64) {
            self.link.update();
            let mb = self.params.max_bandwidth;
            self.encoder
                .decide(self.link.ns_per_byte(mb), self.link.capped(mb));
        }
        self.pages_sent += 1;
        if self.search.is_bulk()
            && self
                .untouched
                .is_untouched(block, page, &self.blocks[block])
        {
            // Never written: zero without reading it (or faulting it in).
            return self.encoder.untouched(w, b, offset);
        }
        // XBZRLE applies to pages sent again after the bulk stage.
        let delta = (!self.search.is_bulk() && self.encoder.has_xbzrle()).then(|| Delta {
            addr: self.block_base[block] + offset,
            generation: self.sync_count,
            last_pass: completing,
        });
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // XBZRLE stays on the main stream: its cache must hold exactly
            // the bytes the destination got, so the thread that reads a page
            // for the cache also sends it. Other pages go to an idle page
            // channel, or on the main stream (see `channels.rs`).
            if delta.is_none() && ch.offer(b, page, enc)? {
                return Ok(());
            }
        }
        let page = Page {
            region: self.blocks[block].region(),
            block: b,
            offset,
        };
        self.encoder.encode(w, page, delta)
    }

    fn publish(&mut self, status: Status, tracker: &str, error: Option<String>) {
        self.status = status;
        let total_time = self.started.elapsed().as_millis() as u64;
        let remaining = if status == Status::Completed {
            0
        } else {
            self.remaining_bytes()
        };
        let expected = self.expected_downtime();
        let mut c = self.encoder.counters();
        c.add(&self.closed_channels);
        if let Some(ch) = &self.channels {
            for k in ch.counters() {
                c.add(&k);
            }
        }
        let lookups = c.xbzrle_lookups.max(1) as f64;
        let c = &c;
        let p = &self.params;
        let xb = self
            .encoder
            .xbzrle_cache_size()
            .map(|cache_size| XbzrleStats {
                cache_size,
                bytes: c.xbzrle_bytes,
                pages: c.xbzrle_pages,
                cache_miss: c.xbzrle_miss,
                cache_miss_rate: c.xbzrle_miss as f64 / lookups,
                encoding_rate: if c.xbzrle_bytes > 0 {
                    (c.xbzrle_pages * PAGE_SIZE as u64) as f64 / c.xbzrle_bytes as f64
                } else {
                    0.0
                },
                overflow: c.xbzrle_overflow,
                skipped_pages: c.xbzrle_skipped,
            });
        let comp = p.compress.map(|_| CompressionStats {
            pages: c.compressed_pages,
            compressed_size: c.compressed_bytes,
            skipped_pages: c.compress_skipped,
            compression_rate: if c.compressed_bytes > 0 {
                (c.compressed_pages * PAGE_SIZE as u64) as f64 / c.compressed_bytes as f64
            } else {
                0.0
            },
        });
        let total = self.mem.total_bytes();
        let (rounds, sync_count, dirty_rate, bw, pps) = (
            self.search.rounds(),
            self.sync_count,
            self.dirty_pages_rate,
            self.pacing.bandwidth(),
            (self.pacing.bandwidth() / PAGE_SIZE as f64) as u64,
        );
        let (transferred, downtime, downtime_bytes, setup_time, throttle) = (
            self.transferred,
            self.downtime,
            self.downtime_bytes,
            self.setup_time,
            self.throttle,
        );
        let (zero, skipped, normal, untouched) = (c.zero, c.skipped, c.normal, c.untouched);
        let verify_time = self.verify_time;
        let pc_requests = self.postcopy_requests;
        let pc_bytes = self.postcopy_from.map_or(0, |f| transferred - f);
        let pc_time = self.postcopy_time;
        let report = self.fault_report.clone();
        let source_downtime = self.source_downtime;
        let breakdown = self.pause_breakdown.clone();
        let (backouts, backout_max) = (self.backouts, self.backout_max);
        let limit = match self.limit_at_switch {
            0 => self.params.downtime_limit,
            l => l,
        };
        let done = status == Status::Completed;
        // Precopy's figures: while it runs, and as of a cancel or failure.
        let convergence = self
            .convergence
            .clone()
            .filter(|_| matches!(status, Status::Active | Status::Cancelled | Status::Failed));
        self.handle.update_stats(|s| {
            s.convergence = convergence;
            s.status = status;
            s.total_time = total_time;
            s.setup_time = setup_time;
            s.downtime = downtime;
            s.source_downtime = source_downtime;
            s.downtime_limit = limit;
            s.downtime_limit_exceeded = done && downtime > limit;
            s.pause_breakdown = breakdown;
            s.pause_backouts = backouts;
            s.backout_pause_max = backout_max;
            s.expected_downtime = expected;
            s.verify_time = verify_time;
            s.ram.transferred = transferred;
            s.ram.remaining = remaining;
            s.ram.total = total;
            s.ram.duplicate = zero;
            s.ram.untouched = untouched;
            s.ram.skipped = skipped;
            s.ram.normal = normal;
            s.ram.normal_bytes = normal * PAGE_SIZE as u64;
            s.ram.dirty_pages_rate = dirty_rate;
            s.ram.mbps = bw * 8.0 / 1e6;
            s.ram.dirty_sync_count = sync_count;
            s.ram.pages_per_second = pps;
            s.ram.precopy_bytes = transferred - downtime_bytes - pc_bytes;
            s.ram.downtime_bytes = downtime_bytes;
            s.ram.rounds = rounds;
            s.xbzrle_cache = xb;
            s.compression = comp;
            s.cpu_throttle_percentage = throttle;
            if !tracker.is_empty() {
                s.dirty_tracker = tracker.to_string();
            }
            s.error_desc = error;
            s.ram.postcopy_requests = pc_requests;
            s.ram.postcopy_bytes = pc_bytes;
            s.postcopy_time = pc_time;
            if let Some(f) = &report {
                let ms = |us: u64| us.div_ceil(1000);
                s.postcopy_blocktime = Some(ms(f.blocktime_us));
                s.postcopy_vcpu_blocktime = Some(f.threads.iter().map(|t| ms(t.1)).collect());
                s.postcopy_latency = Some(f.latency_sum_us.checked_div(f.faults).unwrap_or(0));
                s.postcopy_latency_dist = Some(f.buckets.clone());
                s.postcopy_latency_p50 = Some(f.p50_us);
                s.postcopy_latency_p99 = Some(f.p99_us);
                s.postcopy_local_faults = Some(f.local_faults);
                s.postcopy_local_pages = Some(f.local_pages);
                s.postcopy_local_latency =
                    Some(f.local_us.checked_div(f.local_faults).unwrap_or(0));
            }
        });
    }
}

/// Sets its flag when dropped (on every exit path).
/// The main postcopy stream: the first connection's, or a resumed one's.
enum PcOut<W: Write> {
    First(StreamWriter<W>),
    Resumed(StreamWriter<TimedWrite<ChannelWriter>>),
}

/// Runs `$e` with `$w` bound to the current main stream writer.
macro_rules! on_out {
    ($out:expr, $w:ident => $e:expr) => {
        match $out {
            PcOut::First($w) => $e,
            PcOut::Resumed($w) => $e,
        }
    };
}
use on_out;

/// The connections postcopy runs over, replaced by recovery.
struct PostcopyLink<W: Write> {
    out: PcOut<W>,
    /// The urgent connection and its next section number.
    urgent: Option<(StreamWriter<ChannelWriter>, u64)>,
    /// The migration had an urgent connection: a recovery reopens it.
    urgent_wanted: bool,
    /// Page channels the migration had (0: none): a recovery reopens them.
    page_channels: u16,
    requests: Requests,
    /// Bytes of the connections given up.
    retired_bytes: u64,
    /// `out` belongs to a lost connection (counted in `retired_bytes`).
    dead: bool,
    /// Flow control: per background stream (0 main, i page channel i),
    /// the bytes the destination has read (from the streams' ends when
    /// postcopy starts or resumes, then from its PROGRESS reports).
    acked: Option<Vec<u64>>,
    /// A PROGRESS came since the window opened.
    progress_seen: bool,
    /// When the window opened: a destination that sends no PROGRESS
    /// within [`PROGRESS_GRACE`] gets no window.
    window_from: Instant,
}

impl<W: Write> PostcopyLink<W> {
    fn bytes(&self) -> u64 {
        let out = if self.dead {
            0
        } else {
            on_out!(&self.out, w => w.bytes())
        };
        self.retired_bytes + out + self.urgent.as_ref().map_or(0, |(u, _)| u.bytes())
    }

    /// Tells the destination on each connection still alive why postcopy
    /// pauses (an ABORT record: its stream fails there and it pauses
    /// too); a connection that is gone just fails the write.
    fn abort(&mut self, e: &MigrationError) {
        let why = format!("postcopy paused, a connection was lost: {e}");
        if !self.dead {
            let _ = on_out!(&mut self.out, w => w.abort(&why));
        }
        if let Some((u, _)) = &mut self.urgent {
            let _ = u.abort(&why);
        }
    }

    /// Gives the current connections up (they failed).
    fn retire(&mut self) {
        if !self.dead {
            self.retired_bytes += on_out!(&self.out, w => w.bytes());
            self.dead = true;
        }
        if let Some((u, _)) = self.urgent.take() {
            self.retired_bytes += u.bytes();
        }
        // The reader thread of the old return path stops at its next
        // timeout or at the connection's end.
        self.requests.stop();
    }
}

type Incoming = Result<(u64, Message), PostcopyError>;

/// The destination's messages, read on a thread of their own.
struct Requests {
    rx: std::sync::mpsc::Receiver<Incoming>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Requests {
    fn try_recv(&self) -> Result<Incoming, std::sync::mpsc::TryRecvError> {
        self.rx.try_recv()
    }

    fn recv_timeout(&self, t: Duration) -> Result<Incoming, std::sync::mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(t)
    }

    fn stop(&self) {
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the thread that reads the destination's messages; it waits out
/// quiet spells (no faults) until postcopy ends here, whichever way.
fn spawn_request_reader(
    mut mr: MessageReader<crate::transport::BoxRead>,
) -> Result<Requests, MigrationError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let e = ended.clone();
    std::thread::Builder::new()
        .name("livemig-postcopy-requests".into())
        .spawn(move || loop {
            let waiting = || !e.load(std::sync::atomic::Ordering::SeqCst);
            let m = mr.read_message_waiting(&waiting);
            let more = matches!(m, Ok((_, Message::Request(_) | Message::Progress { .. })));
            if tx.send(m).is_err() || !more {
                break;
            }
        })
        .map_err(MigrationError::send)?;
    Ok(Requests { rx, ended })
}

/// Whether postcopy failed because a connection was lost (recoverable),
/// not because a peer misbehaved.
fn connection_lost(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::Send(_)
            | MigrationError::Unconfirmed(_)
            | MigrationError::Postcopy(
                PostcopyError::Io { .. }
                    | PostcopyError::NoComplete(_)
                    | PostcopyError::ReturnPathClosed
                    | PostcopyError::CompleteTimeout(_)
                    | PostcopyError::PeerLost { .. }
            )
    )
}

/// A number shared by all channels of one migration, so the destination
/// does not mix connections of two migrations.
fn session_number() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Time stamps through the pause, for [`PauseBreakdown`].
struct PauseClock {
    /// The guest's pause.
    start: Instant,
    last: Instant,
    parts: PauseBreakdown,
}

impl PauseClock {
    fn new(start: Instant) -> Self {
        PauseClock {
            start,
            last: start,
            parts: PauseBreakdown::default(),
        }
    }

    /// Microseconds since the previous lap (or the pause).
    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let us = now.saturating_duration_since(self.last).as_micros() as u64;
        self.last = now;
        us
    }
}

/// Whole milliseconds.
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
