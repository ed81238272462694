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

use super::ack;
use super::adapt::{CompressChooser, LinkCost, TimedWrite, WireClock, XbzrleGate};
use super::channels::{ChannelSetup, ChannelWriter, PageEncoding, SendChannels};
use super::digest::{hash_sample, hex, memory_digest, RunningDigest, CHUNK as DIGEST_CHUNK};
use super::handle::{MigrationHandle, SyncPoint};
use super::pacing::{Pacing, PauseInputs};
use super::params::Params;
use super::stats::{CompressionStats, MigrationStats, Status, XbzrleStats};
use super::MigrationError;
use crate::bitmap::DirtyBitmap;
use crate::codec::compress::Compressor;
use crate::codec::page_cache::PageCache;
use crate::codec::{xbzrle, zero};
use crate::dirty::DirtyTracker;
use crate::memory::{GuestMemory, RamBlock, PAGE_SIZE};
use crate::stream::format::{FLAG_CHANNELS, FLAG_VERIFY};
use crate::stream::{BlockDesc, Encoded, StreamWriter};
use crate::vm::{StateCost, VmControl};

/// How long one iteration step sends before giving control back.
const STEP: Duration = Duration::from_millis(50);
/// Dirty rate is measured over periods at least this long.
const DIRTY_RATE_PERIOD: Duration = Duration::from_secs(1);
/// Bytes hashed at setup to measure the verify digest's rate.
/// Long enough (~10 ms on a quiet host) to feel a loaded host's scheduler.
const HASH_SAMPLE: u64 = 96 << 20;
/// The hashing rate is sampled again before a switch-over at most this
/// often.
const HASH_RESAMPLE: Duration = Duration::from_millis(500);
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
        let crate::transport::Outgoing { writer, mut ack } = conn;
        match ack.as_mut() {
            Some(r) => self.run(writer, Some(r as &mut dyn Read)),
            None => self.run(writer, None),
        }
    }

    /// Connects to `uri` and runs the migration there, opening one more
    /// connection per page channel when [`Params::channels`] is above 1.
    pub fn run_to(self, uri: &crate::transport::Uri) -> Result<MigrationStats, MigrationError> {
        use crate::transport::{connect, Uri};
        let conn = connect(uri).map_err(|e| MigrationError::Send(io::Error::other(e)))?;
        let crate::transport::Outgoing { writer, mut ack } = conn;
        let mut open = |_: u16| -> io::Result<ChannelWriter> {
            if matches!(uri, Uri::File(_)) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a snapshot file is one stream: channels must be 1",
                ));
            }
            Ok(connect(uri).map_err(io::Error::other)?.writer)
        };
        let ack = ack.as_mut().map(|r| r as &mut dyn Read);
        self.run_with_channels(writer, ack, &mut open)
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
                if paused && !sent_go {
                    if let Err(re) = vm.resume() {
                        log::error!("cannot resume the source guest after '{e}': {re}");
                    }
                }
                // A cancel can surface as another error (an interrupted wait
                // for a reply): it is still a cancel, unless GO went out.
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
                saver.throttle = 0;
                saver.publish(status, tracker.name(), Some(e.to_string()));
                Err(e)
            }
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

/// Counters of what was sent, by kind.
#[derive(Clone, Copy, Default)]
struct Counters {
    zero: u64,
    skipped: u64,
    normal: u64,
    xbzrle_pages: u64,
    xbzrle_bytes: u64,
    xbzrle_miss: u64,
    xbzrle_overflow: u64,
    xbzrle_lookups: u64,
    compressed_pages: u64,
    compressed_bytes: u64,
    /// Pages not compressed because compressing did not pay on this link.
    compress_skipped: u64,
    /// Re-sent pages that did not try XBZRLE because it did not pay.
    xbzrle_skipped: u64,
    pages_sent: u64,
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
    bitmaps: Vec<DirtyBitmap>,
    /// Manual-clear trackers: chunks whose log must be cleared before their
    /// next page is sent, and log2 pages per chunk.
    clear: Option<(u32, Vec<DirtyBitmap>)>,
    block_base: Vec<u64>,
    pos_block: usize,
    pos_page: u64,
    rounds: u64,
    bulk: bool,
    sync_count: u64,
    cache: Option<PageCache>,
    encode_buf: Vec<u8>,
    compressor: Option<(u8, Compressor)>,
    compress_buf: Vec<u8>,
    /// Adaptive encoding: the main stream's link cost, and whether
    /// compression and XBZRLE pay on it.
    link: LinkCost,
    wire: Arc<WireClock>,
    chooser: CompressChooser,
    gate: XbzrleGate,
    zero_page: Vec<u8>,
    c: Counters,
    seq: u64,
    /// Bandwidth, rate limit and the pause estimate.
    pacing: Pacing,
    /// What the VMM says saving its state costs (asked at each decision).
    state_cost: StateCost,
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
    downtime_bytes: u64,
    verify_time: u64,
    status: Status,
    /// Page channels, when `channels > 1`.
    channels: Option<SendChannels>,
    /// Next sync barrier's epoch.
    epoch: u64,
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
            bitmaps: blocks
                .iter()
                .map(|b| DirtyBitmap::new_full(b.pages()))
                .collect(),
            blocks,
            handle,
            params,
            started,
            setup_time: 0,
            clear: None,
            block_base,
            pos_block: 0,
            pos_page: 0,
            rounds: 0,
            bulk: true,
            sync_count: 0,
            cache: None,
            encode_buf: vec![0; PAGE_SIZE],
            compressor: None,
            compress_buf: Vec::with_capacity(PAGE_SIZE),
            link: LinkCost::new(wire.clone()),
            wire,
            chooser: CompressChooser::new(adaptive),
            gate: XbzrleGate::new(),
            zero_page: vec![0; PAGE_SIZE],
            c: Counters::default(),
            seq: 0,
            pacing: Pacing::new(started),
            state_cost: StateCost::default(),
            floor_warned: false,
            hash_sampled: started,
            rate_time: started,
            rate_dirty_pages: 0,
            rate_bytes: 0,
            dirty_pages_rate: 0,
            high_count: 0,
            throttle: 0,
            last_sync: started,
            last_sync_sent: 0,
            last_sync_bytes: 0,
            transferred: 0,
            downtime_start: None,
            downtime: 0,
            source_downtime: 0,
            limit_at_switch: 0,
            downtime_bytes: 0,
            verify_time: 0,
            status: Status::Setup,
            channels: None,
            epoch: 0,
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
        self.bitmaps.iter().map(DirtyBitmap::count).sum()
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
        ack: Option<&mut dyn Read>,
        open: &mut dyn FnMut(u16) -> io::Result<ChannelWriter>,
        tracker: &mut dyn DirtyTracker,
        vm: &mut dyn VmControl,
        guest: &mut GuestSide,
    ) -> Result<(), MigrationError> {
        self.params.validate().map_err(MigrationError::Params)?;
        self.publish(Status::Setup, tracker.name(), None);
        self.check_cancel()?;

        // Setup: everything is to be sent; start tracking.
        let start = tracker.start()?;
        if let Some(shift) = tracker.clear_chunk_shift() {
            let chunks: Vec<DirtyBitmap> = self
                .blocks
                .iter()
                .map(|b| {
                    let n = b.pages().div_ceil(1u64 << shift);
                    if start.initially_set {
                        DirtyBitmap::new_full(n)
                    } else {
                        DirtyBitmap::new(n)
                    }
                })
                .collect();
            self.clear = Some((shift, chunks));
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
        let flags = if self.params.verify { FLAG_VERIFY } else { 0 };
        let n = self.params.channels;
        let session = session_number();
        let w = if n > 1 {
            let mut w = StreamWriter::new(
                TimedWrite::new(out, self.wire.clone()),
                flags | FLAG_CHANNELS,
            );
            w.channel(0, n, session).map_err(MigrationError::send)?;
            w
        } else {
            StreamWriter::new(TimedWrite::new(out, self.wire.clone()), flags)
        };
        let mut w = w;
        let mut ack = ack;
        let mut ended = false;
        let r = self.send_stream(
            &mut w,
            ack.as_mut().map(|r| &mut **r as &mut dyn Read),
            open,
            tracker,
            vm,
            guest,
            &mut ended,
            (flags, session),
        );
        let Err(e) = r else { return Ok(()) };
        // The destination closed after a failure: its FAILED reply, sent
        // before closing, says why better than "Broken pipe".
        if let (MigrationError::Send(io), Some(r)) = (&e, ack) {
            if matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ) {
                if let Some(why) = ack::failure_reply(r) {
                    return Err(MigrationError::Destination(why));
                }
            }
            return Err(e);
        }
        // Giving up with the stream still open: tell the destination why,
        // so it reports the source's reason, not a truncated stream.
        let told = matches!(
            e,
            MigrationError::Send(_) | MigrationError::Refused(_) | MigrationError::Destination(_)
        );
        if !ended && !told {
            let why = crate::error_chain(&e);
            if let Err(we) = w.abort(&why) {
                log::debug!("sending the abort record: {we}");
            }
            if let Some(ch) = &mut self.channels {
                ch.abort(&why);
            }
        }
        Err(e)
    }

    /// Everything after the stream's header: setup, iterate, complete.
    /// `ended` becomes true once END is written (no abort record after it).
    #[allow(clippy::too_many_arguments)]
    fn send_stream<W: Write>(
        &mut self,
        w: &mut StreamWriter<TimedWrite<W>>,
        mut ack: Option<&mut dyn Read>,
        open: &mut dyn FnMut(u16) -> io::Result<ChannelWriter>,
        tracker: &mut dyn DirtyTracker,
        vm: &mut dyn VmControl,
        guest: &mut GuestSide,
        ended: &mut bool,
        (flags, session): (u16, u64),
    ) -> Result<(), MigrationError> {
        let n = self.params.channels;
        let descs: Vec<BlockDesc> = self
            .blocks
            .iter()
            .map(|b| BlockDesc {
                id: b.id().to_string(),
                len: b.len(),
            })
            .collect();
        w.block_list(&descs).map_err(MigrationError::send)?;
        w.setup(vm.vcpus()).map_err(MigrationError::send)?;
        self.section_end(w)?;
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
        if let Some(r) = ack.as_mut() {
            // No page before the destination accepted the setup.
            ack::source_setup(&mut **r)?;
        }
        self.setup_time = self.started.elapsed().as_millis() as u64;
        self.publish(Status::Active, tracker.name(), None);

        // Iterate.
        loop {
            self.check_cancel()?;
            self.params = self.handle.params();
            self.apply_params();
            self.state_cost = vm.state_cost();
            if self.pause_fits() {
                self.sync(tracker)?;
                self.barrier(w)?;
                if self.params.verify && self.hash_sampled.elapsed() >= HASH_RESAMPLE {
                    // The host's load now, not at setup.
                    self.sample_hash();
                }
                if self.pause_fits() {
                    break;
                }
            } else if self.throttle > 0
                && !self.bulk
                && self.last_sync.elapsed()
                    >= Duration::from_millis(self.params.throttle_sync_period)
            {
                self.sync(tracker)?;
                self.barrier(w)?;
            }
            if self.params.auto_converge {
                vm.set_throttle(self.throttle);
            } else if self.throttle > 0 {
                self.throttle = 0;
                vm.set_throttle(0);
            }
            self.step(w, tracker, false)?;
            self.section_end(w)?;
            self.pacing.measure(self.transferred, Instant::now());
            self.publish(Status::Active, tracker.name(), None);
        }

        // Complete: stop the guest, final sync, everything left unlimited.
        self.check_cancel()?;
        self.publish(Status::Device, tracker.name(), None);
        self.limit_at_switch = self.params.downtime_limit;
        let pause_at = Instant::now();
        vm.pause().map_err(MigrationError::Vm)?;
        guest.paused = true;
        self.downtime_start = Some(pause_at);
        let bytes_before = self.sent_bytes(w);
        self.sync(tracker)?;
        self.barrier(w)?;
        while self.remaining_pages() > 0 {
            self.check_cancel()?;
            self.step(w, tracker, true)?;
            self.section_end(w)?;
        }
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // Every channel ends its stream; the destination applies the
            // main stream's end only after all of them.
            ch.finish(enc).map_err(MigrationError::send)?;
        }
        let state = vm.save_state().map_err(MigrationError::Vm)?;
        if !state.is_empty() {
            w.state(&state).map_err(MigrationError::send)?;
        }
        let mut sent_digest = None;
        if self.params.verify {
            let t = Instant::now();
            let digest = match self.running {
                Some(d) => d.finish(self.mem).0,
                None => memory_digest(self.mem),
            };
            self.verify_time = t.elapsed().as_millis() as u64;
            w.digest(&digest).map_err(MigrationError::send)?;
            sent_digest = self.running.map(|_| digest);
        }
        self.check_cancel()?;
        w.end().map_err(MigrationError::send)?;
        *ended = true;
        self.transferred = self.sent_bytes(w);
        self.downtime_bytes = self.transferred - bytes_before;
        self.downtime = match ack {
            Some(r) => {
                let handle = self.handle;
                let t = ack::source_handshake(r, w.get_mut(), &mut guest.sent_go, &|| {
                    handle.is_cancelled()
                })?;
                self.pacing.record_handshake(t.started - t.go_sent);
                self.source_downtime = ms(t.started - pause_at);
                // Where the guest sees it: up to the destination's resume.
                ms(t.resumed_estimate() - pause_at)
            }
            None => {
                self.source_downtime = ms(pause_at.elapsed());
                self.source_downtime
            }
        };
        if let Some(sent) = sent_digest {
            // The digest in the stream was the dirty tracker's view; now,
            // outside the pause (this guest stays paused for good), check
            // it against all of memory.
            let full = memory_digest(self.mem);
            if full != sent {
                return Err(MigrationError::Verify(format!(
                    "memory {} at stop time, but {} was sent: the dirty tracker missed a write, and the destination runs the guest with that difference",
                    hex(&full),
                    hex(&sent)
                )));
            }
        }
        vm.set_throttle(0);
        self.throttle = 0;
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
            state: self.state_cost,
        }
    }

    /// Bytes the verify digest hashes in the pause: on the source, all of
    /// memory, or with the running digest the chunks not hashed since they
    /// changed; on the destination the chunks holding a remaining page
    /// (see `pacing.rs`).
    fn digest_bytes(&self) -> u64 {
        if !self.params.verify {
            return 0;
        }
        let dest = self.dirty_chunk_bytes();
        match self.running {
            Some(d) => d.pending_bytes().max(dest) + dest,
            None => self.mem.total_bytes() + dest,
        }
    }

    /// Bytes of the digest chunks that hold a remaining page.
    fn dirty_chunk_bytes(&self) -> u64 {
        let per = (DIGEST_CHUNK / PAGE_SIZE) as u64;
        let mut chunks = 0u64;
        for bm in &self.bitmaps {
            let mut p = 0;
            while let Some(q) = bm.next_set(p) {
                chunks += 1;
                p = (q / per + 1) * per;
            }
        }
        chunks * DIGEST_CHUNK as u64
    }

    /// True when the guest may pause now: the pause fits the downtime
    /// limit, or nothing is left to send (waiting cannot shorten a pause
    /// whose fixed costs exceed the limit; that is warned about once and
    /// the overshoot is reported in the stats).
    fn pause_fits(&mut self) -> bool {
        let i = self.pause_inputs();
        let limit = self.params.downtime_limit;
        if !self.floor_warned && self.pacing.floor_exceeds(&i, limit) {
            self.floor_warned = true;
            let e = self.pacing.estimate(&i);
            log::warn!(
                "the downtime limit of {limit} ms cannot be honoured: the pause needs about {} ms whatever is left to send (sync {} ms, device state {} ms, verify digest {} ms, handshake {} ms); precopy switches over only once nothing is left",
                e.fixed().as_millis(),
                e.sync.as_millis(),
                e.state.as_millis(),
                e.digest.as_millis(),
                e.handshake.as_millis()
            );
        }
        i.remaining_bytes == 0 || self.pacing.fits(&i, limit)
    }

    fn remaining_bytes(&self) -> u64 {
        self.remaining_pages() * PAGE_SIZE as u64
    }

    fn apply_params(&mut self) {
        let p = &self.params;
        match (&mut self.cache, p.xbzrle) {
            (None, true) => match PageCache::new(p.xbzrle_cache_size) {
                Ok(c) => self.cache = Some(c),
                Err(e) => log::warn!(
                    "xbzrle cache of {} bytes: {e}; xbzrle stays off",
                    p.xbzrle_cache_size
                ),
            },
            (Some(c), true) if c.size_bytes() != p.xbzrle_cache_size => {
                if let Err(e) = c.resize(p.xbzrle_cache_size) {
                    log::warn!("xbzrle cache resize to {}: {e}", p.xbzrle_cache_size);
                }
            }
            // The cache must mirror what the destination holds: once off,
            // drop it so a later "on" starts empty.
            (Some(_), false) => self.cache = None,
            _ => {}
        }
        match (p.compress, &self.compressor) {
            (None, Some(_)) => self.compressor = None,
            (Some(cp), cur) => {
                let id = cp.algorithm.as_u8();
                if cur.as_ref().map(|(a, _)| *a) != Some(id) {
                    match Compressor::new(cp.algorithm, cp.level) {
                        Ok(c) => self.compressor = Some((id, c)),
                        Err(e) => log::warn!("compressor {:?}: {e}; sending raw", cp.algorithm),
                    }
                }
            }
            _ => {}
        }
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
            add_channel_counters(&mut self.c, &ch);
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
        let reported = match self.running {
            // The running digest needs what this sync reported, not the
            // pages still to send from before.
            Some(d) => {
                let mut fresh: Vec<DirtyBitmap> = self
                    .bitmaps
                    .iter()
                    .map(|b| DirtyBitmap::new(b.len()))
                    .collect();
                let n = tracker.sync(&mut fresh)?;
                for (b, f) in fresh.iter().enumerate() {
                    self.bitmaps[b].or_words(0, f.words());
                    d.touch_pages(b, f);
                }
                n
            }
            None => tracker.sync(&mut self.bitmaps)?,
        };
        self.pacing.record_sync(t.elapsed());
        self.sync_count += 1;
        if let Some((shift, chunks)) = &mut self.clear {
            // Chunks with dirty pages must be cleared (re-protected) before
            // their pages go out again.
            for (b, bm) in self.bitmaps.iter().enumerate() {
                let mut p = 0;
                while let Some(q) = bm.next_set(p) {
                    let chunk = q >> *shift;
                    chunks[b].set(chunk);
                    p = (chunk + 1) << *shift;
                }
            }
        }
        self.rate_dirty_pages += reported;
        let now = Instant::now();
        let period = now - self.rate_time;
        if period >= DIRTY_RATE_PERIOD {
            let secs = period.as_secs_f64();
            self.dirty_pages_rate = (self.rate_dirty_pages as f64 / secs) as u64;
            let dirty_bytes = self.rate_dirty_pages * PAGE_SIZE as u64;
            let sent_bytes = self.transferred - self.rate_bytes;
            if self.params.auto_converge && !self.bulk && dirty_bytes > sent_bytes / 2 {
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
            round: self.rounds,
            dirty_pages: reported,
            remaining_pages: self.remaining_pages(),
            sent_pages: self.c.pages_sent - self.last_sync_sent,
            throughput: ((self.transferred - self.last_sync_bytes) as f64 / since) as u64,
            dirty_pages_rate: self.dirty_pages_rate,
            throttle: self.throttle,
            expected_downtime: self.expected_downtime(),
        });
        self.last_sync = now;
        self.last_sync_sent = self.c.pages_sent;
        self.last_sync_bytes = self.transferred;
        Ok(())
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

    /// The next dirty page at or after the current position, wrapping
    /// around (which completes a round and ends the bulk stage).
    fn next_dirty(&mut self) -> Option<(usize, u64)> {
        let nblocks = self.bitmaps.len();
        for _ in 0..=nblocks {
            if let Some(p) = self.bitmaps[self.pos_block].next_set(self.pos_page) {
                return Some((self.pos_block, p));
            }
            self.pos_page = 0;
            self.pos_block += 1;
            if self.pos_block == nblocks {
                self.pos_block = 0;
                self.rounds += 1;
                self.bulk = false;
                if self.remaining_pages() == 0 {
                    return None;
                }
            }
        }
        None
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
        while let Some((block, page)) = self.next_dirty() {
            if let Some((shift, chunks)) = &mut self.clear {
                let chunk = page >> *shift;
                if chunks[block].clear(chunk) {
                    let first = chunk << *shift;
                    // The running digest trusts the tracker here too: a
                    // clear that dropped an unreported write would be
                    // caught by the full hash after the switch-over.
                    tracker.clear(block, first, 1u64 << *shift)?;
                }
            }
            self.bitmaps[block].clear(page);
            self.pos_block = block;
            self.pos_page = page + 1;
            self.send_page(w, block, page, completing)
                .map_err(MigrationError::send)?;
            n += 1;
            // Under a bandwidth cap the budget is checked after every page
            // (a 100 ms window at a few MiB/s holds only ~100 pages);
            // otherwise every 64 pages is plenty.
            let capped = self.params.max_bandwidth > 0 && !completing;
            if capped || n.is_multiple_of(64) {
                self.transferred = self.sent_bytes(w);
                if completing {
                    continue;
                }
                if self
                    .pacing
                    .rate_limit(self.transferred, self.params.max_bandwidth)
                    || t0.elapsed() >= STEP
                {
                    break;
                }
                if n.is_multiple_of(4096) && self.handle.is_cancelled() {
                    break;
                }
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
        let off = offset as usize;
        let region = self.blocks[block].region();
        let b = block as u16;
        let addr = self.block_base[block] + offset;
        let xbzrle_on = !self.bulk && self.cache.is_some();
        if self.c.pages_sent.is_multiple_of(64) {
            self.link.update();
            let mb = self.params.max_bandwidth;
            self.chooser
                .decide(self.link.ns_per_byte(mb), self.link.capped(mb));
        }
        self.c.pages_sent += 1;
        let enc = self.encoding();
        if let Some(ch) = &mut self.channels {
            // XBZRLE stays on the main stream: its cache must hold exactly
            // the bytes the destination got, so the thread that reads a page
            // for the cache also sends it.
            if !xbzrle_on {
                return ch.push(b, page, enc);
            }
        }
        // XBZRLE sits out while it does not pay; the cache then forgets
        // the pages sent otherwise, so that it never holds a copy the
        // destination does not have.
        let xbzrle_try = xbzrle_on && self.gate.should_try();
        if region.scan(off, PAGE_SIZE, zero::is_zero) == Some(true) {
            self.c.zero += 1;
            if let Some(cache) = self.cache.as_mut().filter(|_| xbzrle_on) {
                if xbzrle_try {
                    cache.insert(addr, &self.zero_page, self.sync_count);
                } else {
                    cache.forget(addr);
                }
            }
            return w.zero(b, offset);
        }
        w.stage_page_with(b, offset, |buf| {
            region.append_to(off, PAGE_SIZE, buf);
        });
        if xbzrle_on && !xbzrle_try {
            if let Some(cache) = &mut self.cache {
                cache.forget(addr);
            }
        }
        if xbzrle_try {
            let t0 = Instant::now();
            let cache = self.cache.as_mut().expect("xbzrle_on implies a cache");
            self.c.xbzrle_lookups += 1;
            // What the page would cost without XBZRLE.
            let baseline = if self.compressor.is_some() && self.chooser.is_on() {
                self.chooser.expected_bytes()
            } else {
                PAGE_SIZE as f64
            };
            let link = self.link.ns_per_byte(self.params.max_bandwidth);
            match cache.get_mut_at(addr, self.sync_count) {
                None => {
                    self.c.xbzrle_miss += 1;
                    // A miss is what a later hit costs: not judged.
                    if !completing {
                        cache.insert(addr, w.staged(), self.sync_count);
                    }
                }
                Some(old) => match xbzrle::encode(old, w.staged(), &mut self.encode_buf) {
                    Ok(0) => {
                        self.c.skipped += 1;
                        w.discard_staged();
                        let ns = t0.elapsed().as_nanos() as u64;
                        self.gate.record(ns, 0.0, baseline, link);
                        return Ok(());
                    }
                    Ok(n) => {
                        old.copy_from_slice(w.staged());
                        self.c.xbzrle_pages += 1;
                        self.c.xbzrle_bytes += n as u64;
                        let ns = t0.elapsed().as_nanos() as u64;
                        self.gate.record(ns, n as f64, baseline, link);
                        return w.commit_encoded(Encoded::Xbzrle, &self.encode_buf[..n]);
                    }
                    Err(_) => {
                        self.c.xbzrle_overflow += 1;
                        old.copy_from_slice(w.staged());
                        let ns = t0.elapsed().as_nanos() as u64;
                        self.gate.record(ns, baseline, baseline, link);
                    }
                },
            }
        }
        if let Some((algo, comp)) = &mut self.compressor {
            if self.chooser.should_compress() {
                self.compress_buf.clear();
                let t0 = Instant::now();
                let r = comp.compress(w.staged(), &mut self.compress_buf);
                let ns = t0.elapsed().as_nanos() as u64;
                if let Ok(Some(n)) = r {
                    self.chooser.record(ns, n);
                    self.c.compressed_pages += 1;
                    self.c.compressed_bytes += n as u64;
                    return w.commit_encoded(Encoded::Compressed(*algo), &self.compress_buf[..n]);
                }
                self.chooser.record(ns, PAGE_SIZE);
            }
        }
        self.c.normal += 1;
        w.commit_raw()
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
        let lookups = self.c.xbzrle_lookups.max(1) as f64;
        let mut c = self.c;
        c.compress_skipped = self.chooser.skipped();
        c.xbzrle_skipped = self.gate.skipped();
        if let Some(ch) = &self.channels {
            add_channel_counters(&mut c, ch);
        }
        let c = &c;
        let p = &self.params;
        let xb = self.cache.as_ref().map(|cache| XbzrleStats {
            cache_size: cache.size_bytes(),
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
            self.rounds,
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
        let (zero, skipped, normal) = (c.zero, c.skipped, c.normal);
        let verify_time = self.verify_time;
        let source_downtime = self.source_downtime;
        let limit = match self.limit_at_switch {
            0 => self.params.downtime_limit,
            l => l,
        };
        let done = status == Status::Completed;
        self.handle.update_stats(|s| {
            s.status = status;
            s.total_time = total_time;
            s.setup_time = setup_time;
            s.downtime = downtime;
            s.source_downtime = source_downtime;
            s.downtime_limit = limit;
            s.downtime_limit_exceeded = done && downtime > limit;
            s.expected_downtime = expected;
            s.verify_time = verify_time;
            s.ram.transferred = transferred;
            s.ram.remaining = remaining;
            s.ram.total = total;
            s.ram.duplicate = zero;
            s.ram.skipped = skipped;
            s.ram.normal = normal;
            s.ram.normal_bytes = normal * PAGE_SIZE as u64;
            s.ram.dirty_pages_rate = dirty_rate;
            s.ram.mbps = bw * 8.0 / 1e6;
            s.ram.dirty_sync_count = sync_count;
            s.ram.pages_per_second = pps;
            s.ram.precopy_bytes = transferred - downtime_bytes;
            s.ram.downtime_bytes = downtime_bytes;
            s.ram.rounds = rounds;
            s.xbzrle_cache = xb;
            s.compression = comp;
            s.cpu_throttle_percentage = throttle;
            s.dirty_tracker = tracker.to_string();
            s.error_desc = error;
        });
    }
}

/// Adds what the page channels sent to `c`.
fn add_channel_counters(c: &mut Counters, ch: &SendChannels) {
    use std::sync::atomic::Ordering::Relaxed;
    for k in ch.counters() {
        c.zero += k.zero.load(Relaxed);
        c.normal += k.normal.load(Relaxed);
        c.compressed_pages += k.compressed_pages.load(Relaxed);
        c.compressed_bytes += k.compressed_bytes.load(Relaxed);
        c.compress_skipped += k.compress_skipped.load(Relaxed);
    }
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

/// Whole milliseconds.
fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
