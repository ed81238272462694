//! Pacing of an outgoing migration: how fast the link carries pages, the
//! bandwidth cap, and what the pause at switch-over will cost.
//!
//! The downtime limit is a bound, not a hope: the switch-over happens only
//! when everything the guest waits for while paused fits in it, estimated
//! from measurements:
//!
//! - **the vCPU stop**: how long [`crate::vm::VmControl::pause`] takes,
//!   as the VMM measured it while the guest ran
//!   ([`crate::vm::VmControl::stop_cost`]: minivm kicks its vCPUs out of
//!   the guest now and then and times the round trip) or as the last
//!   pause of this migration took, whichever is longer;
//! - **the final sync**: the longest of the recent syncs;
//! - **the remaining pages**, plus what the guest may dirty between the
//!   last sync and the pause (dirty rate x the sync's cost), sent at a
//!   *conservative* bandwidth: the lowest of the recent measurement
//!   periods, never the best. On a link whose rate moves 2-3x the estimate
//!   follows the slow periods, so a fast burst does not trigger a switch
//!   that a slow period then stretches. Only periods that carried data
//!   count (at least half a page of stream bytes per page sent): a period
//!   spent scanning zero pages (the bulk stage over memory the guest
//!   zeroed) sends ~9 bytes a page, and its byte rate, tens of MB/s, says
//!   how fast the source reads zeros, not what the link carries. Priced
//!   at that rate, a pause for a few hundred MiB of data read as seconds
//!   for about a second after the scan; precopy went on with rounds
//!   the guest re-dirtied, several times the total of the runs without
//!   such a period (the 1 GiB incrementer, 300 ms: ~2.5 s against
//!   ~0.25 s). Without any data period the lowest of all counts. Nor
//!   does a period count the time its sending thread was runnable but
//!   off the CPU (the kernel's run-queue wait for that thread,
//!   `/proc/thread-self/schedstat`): on 2 shared cores one 100 ms period
//!   in which other processes held both cores read as a link several
//!   times slower, and as the lowest of the last ten it held the
//!   decision back for a second. Such a period's rate is its bytes over
//!   the time the thread could run (at most [`MAX_STARVED_SHARE`] of the
//!   period is left out). A pause that is starved in turn is caught by
//!   its own rate ([`Pacing::overruns`]); the pause's hot threads run at
//!   a raised priority (see `source.rs`);
//! - **device state**: what the VMM declares ([`crate::vm::StateCost`]):
//!   time to save plus its bytes on the link;
//! - **the verify digest** (verify mode): both sides keep a running digest
//!   during precopy (see `digest.rs`) and, in the pause, re-hash only the
//!   2 MiB chunks that changed since: those of the remaining pages and
//!   those of the pages sent in the last moments before the pause, on each
//!   side. The source's at the hashing rate it measured on a sample (at
//!   setup and again just before the decision: the host's load moves it
//!   several-fold); the destination's at the rate the destination
//!   reported (its answer to each drain mark, see `ack.rs`). That answer
//!   comes only once the destination's digest caught up with everything
//!   before the mark (the guest still running on the source), so its
//!   background hasher's backlog, which on a loaded host reached 455 ms
//!   of hashing in the END to LOADED leg, is no part of the pause; what
//!   it still reports pending is counted. The full hash of the source's
//!   memory, which checks the dirty tracker itself, runs after the
//!   destination took over, outside the pause;
//! - **the completion handshake**: two round trips (END to LOADED, GO to
//!   STARTED) with the destination's wake-ups, taken as the largest of:
//!   the handshakes measured so far in this migration,
//!   [`HANDSHAKE_ALLOWANCE`], and [`PING_LEGS`] times the slowest of the
//!   recent *pings* (an empty drain mark and its answer, sent just before
//!   each switch-over decision, the guest running; see `source.rs`; net
//!   of the destination's digest catch-up it reports, which is hashing,
//!   not a round trip). The
//!   ping is what a loaded host does to the handshake: on 2 cores at load
//!   10 an empty round trip took several ms, and the handshake, with its
//!   five wake-ups on both sides, 10-136 ms, against 5 ms assumed before;
//! - **the bytes still in flight**: stream bytes already written that the
//!   destination has not confirmed applying. The switch-over (or the
//!   postcopy switch, whose record the destination reads only after them)
//!   waits for them like for the remaining pages. The source therefore
//!   drains before it pauses: it sends a drain mark and waits, the guest
//!   still running, for the destination's answer (see `source.rs`), so
//!   that at the decision and at the pause only the few bytes written
//!   after the mark are in flight. Without the drain, loopback TCP's
//!   autotuned buffers (up to `tcp_rmem` max, 32 MiB) held tens of ms of
//!   the destination's work that no estimate saw.
//!
//! At the pause itself the decision is taken again with what the pause
//! already cost (the stop and the final sync are then measured, not
//! estimated): [`Pacing::fits_after`]. With postcopy `auto`, a
//! stop-and-copy that no longer fits goes to postcopy instead; without
//! postcopy the source *backs out*: it resumes its guest and goes on with
//! precopy (the pages sent in the pause are ordinary precopy pages; the
//! tracker never stopped). The check is taken again while the remaining
//! pages go out, at the rate the pause itself measures when that is lower
//! than the estimate's ([`Pacing::overruns`]), and once more before the
//! device state: a pause whose remainder would cross the limit is cut off
//! where it stands instead of stretching. Past the device state nothing
//! can be taken back (the running digest is finished, the stream ends), so
//! the handshake is estimated before the pause, from the pings.
//!
//! What is left of the limit once the fixed costs (stop, sync, state,
//! digest, handshake) are taken is the byte budget for the pages
//! ([`Pacing::page_budget`]): "what fits in the pause". When the fixed
//! costs alone exceed the limit, precopy cannot honour it: the engine
//! warns once, keeps iterating while that can still help, switches over
//! once the pages left add at most the limit's headroom (a tenth of it;
//! [`Pacing::settled`]), and reports the overshoot.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::vm::StateCost;

/// Bandwidth is re-measured over periods at least this long.
pub(crate) const BANDWIDTH_PERIOD: Duration = Duration::from_millis(100);
/// Before the first period closes, the period under way is trusted once
/// it is this long.
const FIRST_ESTIMATE: Duration = Duration::from_millis(20);
/// Rate-limit window.
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(100);
/// Bandwidth periods the conservative estimate looks back over (~1 s).
const PERIODS: usize = 10;
/// Syncs whose cost the estimate looks back over.
const SYNCS: usize = 4;
/// The handshake's cost before one was measured: a round trip on a local
/// network plus the destination's last writes and state restore.
pub const HANDSHAKE_ALLOWANCE: Duration = Duration::from_millis(5);
/// Round trips (each with its wake-ups) the handshake is counted as when
/// priced from a ping: END to LOADED and GO to STARTED, plus one for the
/// destination's restore and resume (its vCPU threads wake too).
pub(crate) const PING_LEGS: u32 = 3;
/// Pings the handshake estimate looks back over.
const PINGS: usize = 4;
/// The page rate measured in a pause is trusted once it covers this much
/// time, and a tenth of the downtime limit (before: the conservative
/// bandwidth alone; a first write lands in socket buffers and says
/// little, and on 2 cores a few milliseconds in which the guest's vCPU
/// or the destination held the CPU read as a collapsed link: at 2 ms
/// alone, quiet-host incrementer runs at 300 ms cut pauses short that
/// would have fitted, and the slow rate, kept as a period, held the next
/// decisions back for 5-11 syncs).
const PAUSE_RATE_AFTER: Duration = Duration::from_millis(2);

/// How long a pause's page sending must have run before its rate is
/// trusted, for a downtime limit of `limit_ms`.
fn pause_rate_window(limit_ms: u64) -> Duration {
    PAUSE_RATE_AFTER.max(Duration::from_millis(limit_ms / 10))
}
/// At most this share of a bandwidth period is left out as the sending
/// thread's run-queue wait (its rate is read at most 4x faster than its
/// bytes over the whole period).
pub(crate) const MAX_STARVED_SHARE: f64 = 0.75;

/// The calling thread's total run-queue wait: how long it was runnable
/// but not running since it started (the second field of
/// `/proc/thread-self/schedstat`, ns). `None` where the kernel does not
/// keep it.
pub(crate) fn thread_cpu_wait() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Bytes a destination's report must have hashed for its rate to count.
const DEST_HASH_MIN: u64 = 8 << 20;

/// Safety share of the limit kept free for what no estimate sees (the
/// scheduler on a loaded host): the estimate must fit in 90 % of it.
const HEADROOM: f64 = 0.9;

/// What the pause at switch-over is expected to cost, part by part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PauseEstimate {
    /// Stopping the vCPUs.
    pub stop: Duration,
    /// The final dirty sync.
    pub sync: Duration,
    /// The remaining pages (and those dirtied until the pause) on the link.
    pub pages: Duration,
    /// Saving device state and sending it.
    pub state: Duration,
    /// Hashing memory for verify mode (0 without verify).
    pub digest: Duration,
    /// The completion handshake.
    pub handshake: Duration,
}

impl PauseEstimate {
    /// The whole pause.
    pub fn total(&self) -> Duration {
        self.fixed() + self.pages
    }

    /// What the pause costs whatever is left to send.
    pub fn fixed(&self) -> Duration {
        self.stop + self.sync + self.state + self.digest + self.handshake
    }

    /// What is still to come once the guest is stopped and synced.
    pub fn after_sync(&self) -> Duration {
        self.pages + self.state + self.digest + self.handshake
    }
}

/// What the estimate needs to know about the migration now.
#[derive(Clone, Copy, Debug, Default)]
pub struct PauseInputs {
    /// Bytes of pages still to send (4 KiB per dirty page).
    pub remaining_bytes: u64,
    /// Pages the guest dirties per second (last measurement).
    pub dirty_pages_rate: u64,
    /// Verify mode: the digest is part of the pause.
    pub verify: bool,
    /// Verify mode: bytes the source hashes in the pause, as things stand
    /// (without what arrives in the last moments, which is added here).
    pub digest_bytes: u64,
    /// Verify mode: bytes the destination hashes after the stream's end
    /// (the same way), priced at its own rate when it reported one.
    pub dest_digest_bytes: u64,
    /// What the VMM's device state costs.
    pub state: StateCost,
    /// What stopping the vCPUs costs, as the VMM measured it
    /// ([`crate::vm::VmControl::stop_cost`]).
    pub stop: Duration,
    /// Stream bytes written that the destination has not confirmed
    /// applying (after a drain: only what followed its mark).
    pub in_flight_bytes: u64,
}

/// One closed bandwidth measurement period.
#[derive(Clone, Copy, Debug)]
struct Period {
    /// Stream bytes per second.
    rate: f64,
    /// It carried data: at least [`DATA_SHARE`] of a page of stream bytes
    /// per page sent (or its pages were not counted).
    data: bool,
}

/// A period carried data when its stream bytes were at least this share
/// of a page per page sent.
const DATA_SHARE: f64 = 0.5;

/// Bandwidth measurement, rate limiting and the pause estimate of one
/// outgoing migration.
#[derive(Debug)]
pub struct Pacing {
    period_start: Instant,
    period_bytes: u64,
    /// Pages sent when the period under way began, and at the last
    /// measurement (see [`Self::measure_pages`]).
    period_pages: u64,
    last_pages: u64,
    /// The last [`PERIODS`] periods, newest last.
    periods: VecDeque<Period>,
    window_start: Instant,
    window_bytes: u64,
    /// The period under way at the last measurement: bytes, time.
    partial: (u64, Duration),
    syncs: VecDeque<Duration>,
    /// Bytes per second of the last two hashing samples, newest last.
    hash_rates: VecDeque<f64>,
    /// The same, as the destination measured it (its reports), newest
    /// last.
    dest_hash_rates: VecDeque<f64>,
    handshake: Option<Duration>,
    /// The last [`PINGS`] empty round trips, newest last.
    pings: VecDeque<Duration>,
    /// The longest vCPU stop this migration paid (a postcopy recovery or
    /// a cancelled completion can pause more than once).
    stopped: Option<Duration>,
    /// Reads the sending thread's total run-queue wait
    /// ([`thread_cpu_wait`]; tests give their own).
    cpu_wait: fn() -> Option<Duration>,
    /// That total when the period under way began.
    period_wait: Option<Duration>,
}

impl Pacing {
    /// Starts measuring at `now`, with nothing sent.
    pub fn new(now: Instant) -> Self {
        Pacing {
            period_start: now,
            period_bytes: 0,
            period_pages: 0,
            last_pages: 0,
            periods: VecDeque::with_capacity(PERIODS),
            window_start: now,
            window_bytes: 0,
            partial: (0, Duration::ZERO),
            syncs: VecDeque::with_capacity(SYNCS),
            hash_rates: VecDeque::with_capacity(2),
            dest_hash_rates: VecDeque::with_capacity(2),
            handshake: None,
            pings: VecDeque::with_capacity(PINGS),
            stopped: None,
            cpu_wait: thread_cpu_wait,
            period_wait: thread_cpu_wait(),
        }
    }

    /// As [`Pacing::new`], the sending thread's run-queue wait read by
    /// `cpu_wait` (called on the thread that measures).
    #[cfg(test)]
    fn with_cpu_wait(now: Instant, cpu_wait: fn() -> Option<Duration>) -> Self {
        Pacing {
            cpu_wait,
            period_wait: cpu_wait(),
            ..Pacing::new(now)
        }
    }

    /// The run-queue wait of the sending thread since the period under
    /// way began, and the total now (to start the next period from).
    fn starved(&self) -> (Duration, Option<Duration>) {
        let now = (self.cpu_wait)();
        let waited = match (self.period_wait, now) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        };
        (waited, now)
    }

    /// Closes a measurement period once it is [`BANDWIDTH_PERIOD`] long;
    /// `transferred` is every stream byte sent so far. The period counts
    /// as one that carried data (see [`Self::measure_pages`]).
    pub fn measure(&mut self, transferred: u64, now: Instant) {
        self.close_period(transferred, None, now);
    }

    /// As [`Self::measure`], with `pages` the pages sent so far (zero
    /// records included): a period whose bytes are under half a page per
    /// page sent was spent on zero pages and is not a measurement of the
    /// link (see the module doc).
    pub fn measure_pages(&mut self, transferred: u64, pages: u64, now: Instant) {
        self.close_period(transferred, Some(pages), now);
    }

    fn close_period(&mut self, transferred: u64, pages: Option<u64>, now: Instant) {
        if let Some(p) = pages {
            self.last_pages = p;
        }
        let el = now.saturating_duration_since(self.period_start);
        let bytes = transferred.saturating_sub(self.period_bytes);
        if el >= BANDWIDTH_PERIOD {
            let data = pages.is_none_or(|p| {
                let n = p.saturating_sub(self.period_pages);
                n == 0 || bytes as f64 >= n as f64 * crate::PAGE_SIZE as f64 * DATA_SHARE
            });
            // The time the sender could not run says nothing about the
            // link (see the module doc).
            let (starved, wait_now) = self.starved();
            let ran = el.as_secs_f64()
                - starved
                    .as_secs_f64()
                    .min(el.as_secs_f64() * MAX_STARVED_SHARE);
            self.push(Period {
                rate: bytes as f64 / ran,
                data,
            });
            self.period_wait = wait_now;
            self.period_start = now;
            self.period_bytes = transferred;
            if let Some(p) = pages {
                self.period_pages = p;
            }
            self.partial = (0, Duration::ZERO);
        } else {
            self.partial = (bytes, el);
        }
    }

    fn push(&mut self, p: Period) {
        if self.periods.len() == PERIODS {
            self.periods.pop_front();
        }
        self.periods.push_back(p);
    }

    #[cfg(test)]
    fn push_period(&mut self, rate: f64) {
        self.push(Period { rate, data: true });
    }

    /// The last period's bandwidth, bytes per second (0 before the first).
    pub fn bandwidth(&self) -> f64 {
        self.periods.back().map_or(0.0, |p| p.rate)
    }

    /// The bandwidth the switch-over decision trusts: the lowest of the
    /// recent periods; before the first closed, the period under way
    /// once it is [`FIRST_ESTIMATE`] long (0 before). A migration that is
    /// nearly done within its first period (an idle guest) need not wait
    /// for a whole period to pause for a last few pages.
    pub fn conservative_bandwidth(&self) -> f64 {
        let lowest = |data_only: bool| {
            self.periods
                .iter()
                .filter(|p| p.data || !data_only)
                .map(|p| p.rate)
                .reduce(f64::min)
        };
        match lowest(true).or_else(|| lowest(false)) {
            Some(r) => r,
            None if self.partial.1 >= FIRST_ESTIMATE => {
                self.partial.0 as f64 / self.partial.1.as_secs_f64()
            }
            None => 0.0,
        }
    }

    /// Leaves `wait` out of the period under way (and of the rate
    /// window): the source waited (for the destination to drain) and
    /// sent nothing, which says nothing about the link. The bytes sent
    /// before the wait still count, over the time it took to send them.
    pub fn exclude(&mut self, wait: Duration) {
        self.period_start += wait;
        self.window_start += wait;
    }

    /// Starts a new measurement period at `now` without closing the one
    /// under way: the source waited (for the destination to drain) and
    /// sent nothing, which says nothing about the link.
    pub fn restart_period(&mut self, transferred: u64, now: Instant) {
        self.period_wait = (self.cpu_wait)();
        self.period_start = now;
        self.period_bytes = transferred;
        self.period_pages = self.last_pages;
        self.window_start = now;
        self.window_bytes = transferred;
    }

    /// Under a cap of `limit` bytes per second (0 = none), sleeps out the
    /// rest of the window once its budget is spent. Returns true when it
    /// slept (the sending step should end).
    pub fn rate_limit(&mut self, transferred: u64, limit: u64) -> bool {
        let now = Instant::now();
        if now - self.window_start >= RATE_WINDOW {
            self.window_start = now;
            self.window_bytes = transferred;
        }
        if limit == 0 {
            return false;
        }
        let budget = (limit as f64 * RATE_WINDOW.as_secs_f64()) as u64;
        if transferred.saturating_sub(self.window_bytes) >= budget {
            let end = self.window_start + RATE_WINDOW;
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            self.window_start = Instant::now();
            self.window_bytes = transferred;
            return true;
        }
        false
    }

    /// A dirty sync took `took`.
    pub fn record_sync(&mut self, took: Duration) {
        if self.syncs.len() == SYNCS {
            self.syncs.pop_front();
        }
        self.syncs.push_back(took);
    }

    /// The digest hashed `bytes` in `took` (a sample). The estimate uses
    /// the slower of the last two samples: the host's load moves the rate
    /// several-fold, so the engine samples again just before it decides.
    pub fn record_hash(&mut self, bytes: u64, took: Duration) {
        let rate = bytes as f64 / took.as_secs_f64().max(1e-6);
        if self.hash_rates.len() == 2 {
            self.hash_rates.pop_front();
        }
        self.hash_rates.push_back(rate);
    }

    fn hash_rate(&self) -> Option<f64> {
        self.hash_rates.iter().copied().reduce(f64::min)
    }

    /// The destination reported its pending work (see `ack.rs`): its
    /// hashing rate counts once it hashed [`DEST_HASH_MIN`] or more (the
    /// slower of its last two such reports).
    pub fn record_dest_report(&mut self, r: &super::ack::LoadReport) {
        if let Some(rate) = r.hash_rate(DEST_HASH_MIN) {
            if self.dest_hash_rates.len() == 2 {
                self.dest_hash_rates.pop_front();
            }
            self.dest_hash_rates.push_back(rate);
        }
    }

    /// The destination's hashing rate: its own when it reported one,
    /// else the source's (the same code on a host alike).
    fn dest_hash_rate(&self) -> Option<f64> {
        self.dest_hash_rates
            .iter()
            .copied()
            .reduce(f64::min)
            .or_else(|| self.hash_rate())
    }

    /// A completion handshake round trip took `took`.
    pub fn record_handshake(&mut self, took: Duration) {
        self.handshake = Some(self.handshake.map_or(took, |h| h.max(took)));
    }

    /// An empty round trip to the destination (a drain mark with nothing
    /// before it) took `took`, the guest running.
    pub fn record_ping(&mut self, took: Duration) {
        if self.pings.len() == PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back(took);
    }

    /// The handshake as the estimate counts it (see the module doc).
    pub fn handshake_estimate(&self) -> Duration {
        let ping = self.pings.iter().copied().max().unwrap_or_default() * PING_LEGS;
        self.handshake
            .unwrap_or(HANDSHAKE_ALLOWANCE)
            .max(HANDSHAKE_ALLOWANCE)
            .max(ping)
    }

    /// Stopping the vCPUs took `took`.
    pub fn record_stop(&mut self, took: Duration) {
        self.stopped = Some(self.stopped.map_or(took, |s| s.max(took)));
    }

    /// What a pause now would cost.
    pub fn estimate(&self, i: &PauseInputs) -> PauseEstimate {
        self.estimate_at(i, self.conservative_bandwidth())
    }

    /// As [`Self::estimate`], the link carrying `bw` bytes per second.
    fn estimate_at(&self, i: &PauseInputs, bw: f64) -> PauseEstimate {
        let sync = self.syncs.iter().copied().max().unwrap_or_default();
        let on_link = |bytes: u64| {
            if bytes == 0 {
                Duration::ZERO
            } else if bw <= 0.0 {
                // Nothing measured yet: it cannot be said to fit.
                Duration::MAX / 4
            } else {
                Duration::from_secs_f64(bytes as f64 / bw)
            }
        };
        // Pages the guest dirties until it is paused: at most about one
        // sync's worth of time after the last sync.
        let extra =
            (i.dirty_pages_rate as f64 * sync.as_secs_f64()) as u64 * crate::PAGE_SIZE as u64;
        // Both sides also re-hash what changed in their hasher's last two
        // passes: at most what the link carried meanwhile (sent in address
        // order: contiguous). Each side at its own rate.
        let recent = (bw * 2.0 * super::digest::PASS.as_secs_f64()) as u64;
        let hash = |bytes: u64, rate: Option<f64>| match rate {
            Some(r) => Duration::from_secs_f64(bytes as f64 / r.max(1.0)),
            None => Duration::MAX / 4,
        };
        let digest = if i.verify {
            hash(i.digest_bytes + recent, self.hash_rate())
                .saturating_add(hash(i.dest_digest_bytes + recent, self.dest_hash_rate()))
        } else {
            Duration::ZERO
        };
        PauseEstimate {
            stop: i.stop.max(self.stopped.unwrap_or_default()),
            sync,
            pages: on_link(i.remaining_bytes + extra + i.in_flight_bytes),
            state: i.state.save_time + on_link(i.state.bytes),
            digest,
            handshake: self.handshake_estimate(),
        }
    }

    /// The pause as a share of the limit it must fit in (with headroom).
    fn usable(limit_ms: u64) -> Duration {
        Duration::from_secs_f64(limit_ms as f64 / 1000.0 * HEADROOM)
    }

    /// True when a pause now would fit in `limit_ms`.
    pub fn fits(&self, i: &PauseInputs, limit_ms: u64) -> bool {
        self.estimate(i).total() <= Self::usable(limit_ms)
    }

    /// At the pause, with the guest stopped and synced `spent` ago: true
    /// when what is still to come (pages and the bytes still in flight,
    /// device state, digest, handshake) fits in what is left of
    /// `limit_ms`. The stop and the
    /// sync are measured by then, so they count as they were.
    /// The guest dirties nothing more by then (`i.dirty_pages_rate` is not
    /// counted).
    pub fn fits_after(&self, i: &PauseInputs, spent: Duration, limit_ms: u64) -> bool {
        let stopped = PauseInputs {
            dirty_pages_rate: 0,
            ..*i
        };
        spent.saturating_add(self.estimate(&stopped).after_sync()) <= Self::usable(limit_ms)
    }

    /// In the pause, while the remaining pages go out: true when what is
    /// still to come would cross `limit_ms` (with its headroom), the
    /// guest stopped `spent` ago. `sending` is the pause's own page
    /// sending so far (bytes written, time taken): once it covers
    /// [`pause_rate_window`], its rate prices the rest when it is lower
    /// than the conservative bandwidth (a host whose load rose since the
    /// last period). `i.remaining_bytes` is what is still to write,
    /// `i.in_flight_bytes` what the pause wrote and the link may still
    /// hold; the guest dirties nothing more.
    pub fn overruns(
        &self,
        i: &PauseInputs,
        spent: Duration,
        sending: (u64, Duration),
        limit_ms: u64,
    ) -> bool {
        let mut bw = self.conservative_bandwidth();
        let (bytes, took) = sending;
        if took >= pause_rate_window(limit_ms) && bytes > 0 {
            bw = bw.min(bytes as f64 / took.as_secs_f64());
        }
        if bw <= 0.0 {
            return true;
        }
        // Everything after the pages, at that rate.
        let rest = PauseInputs {
            remaining_bytes: 0,
            dirty_pages_rate: 0,
            in_flight_bytes: 0,
            ..*i
        };
        let after_pages = self.estimate_at(&rest, bw).after_sync();
        // The pages: what is in flight (the pause's own writes included)
        // and still to write reach the destination `took` after they began
        // at the earliest, the rest at least at its own pace.
        let secs = |b: u64| Duration::from_secs_f64(b as f64 / bw);
        let pages = secs(i.remaining_bytes + i.in_flight_bytes)
            .saturating_sub(took)
            .max(secs(i.remaining_bytes));
        spent.saturating_add(pages).saturating_add(after_pages) > Self::usable(limit_ms)
    }

    /// The rate a pause's page sending measured, `bytes` in `took`,
    /// counted as a bandwidth period when it is long enough to say
    /// something (a pause backed out because the link slowed: the next
    /// decision must not expect the old rate).
    pub fn record_pause_rate(&mut self, bytes: u64, took: Duration, limit_ms: u64) {
        if took >= pause_rate_window(limit_ms) && bytes > 0 {
            self.push(Period {
                rate: bytes as f64 / took.as_secs_f64(),
                data: true,
            });
        }
    }

    /// True when the pause cannot fit `limit_ms` whatever is left to send.
    pub fn floor_exceeds(&self, i: &PauseInputs, limit_ms: u64) -> bool {
        let mut none = *i;
        none.remaining_bytes = 0;
        none.dirty_pages_rate = 0;
        self.estimate(&none).fixed() > Self::usable(limit_ms)
    }

    /// True when a pause now is as good as waiting can make it: it fits
    /// `limit_ms`, or the fixed costs alone exceed the limit (the
    /// overshoot is certain) and the pages left add no more than the
    /// limit's headroom (10 %) to it. Waiting longer could not honour
    /// the limit, and a guest that never stops writing (a throttled one,
    /// or one that a slow vCPU stop on a loaded host keeps from fitting)
    /// would never leave nothing to send.
    pub fn settled(&self, i: &PauseInputs, limit_ms: u64) -> bool {
        if self.fits(i, limit_ms) {
            return true;
        }
        if !self.floor_exceeds(i, limit_ms) {
            return false;
        }
        let slack = Duration::from_secs_f64(limit_ms as f64 / 1000.0 * (1.0 - HEADROOM));
        self.estimate(i).pages <= slack
    }

    /// What fits in the pause: the bytes of pages that can still go within
    /// `limit_ms` once the fixed costs are paid and the bytes still in
    /// flight have reached the destination (0 when they exceed it).
    #[allow(dead_code)] // the question postcopy asks at its switch-over
    pub fn page_budget(&self, i: &PauseInputs, limit_ms: u64) -> u64 {
        let mut none = *i;
        none.remaining_bytes = 0;
        none.dirty_pages_rate = 0;
        none.in_flight_bytes = 0;
        let fixed = self.estimate(&none).fixed();
        let left = Self::usable(limit_ms).saturating_sub(fixed);
        let bytes = (left.as_secs_f64() * self.conservative_bandwidth()) as u64;
        bytes.saturating_sub(i.in_flight_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A pacing that saw `rates` (bytes per second), one per period.
    fn with_periods(rates: &[f64]) -> Pacing {
        let mut p = Pacing::new(Instant::now());
        for &r in rates {
            p.push_period(r);
        }
        p
    }

    fn inputs(remaining: u64) -> PauseInputs {
        PauseInputs {
            remaining_bytes: remaining,
            ..PauseInputs::default()
        }
    }

    #[test]
    fn periods_are_measured_from_bytes_and_time() {
        let t0 = Instant::now();
        let mut p = Pacing::new(t0);
        p.measure(50 * MIB, t0 + Duration::from_millis(50));
        assert_eq!(
            p.bandwidth(),
            0.0,
            "a period shorter than 100 ms is not closed"
        );
        p.measure(100 * MIB, t0 + Duration::from_millis(200));
        assert!((p.bandwidth() - 500.0 * MIB as f64).abs() < 1.0);
        p.measure(120 * MIB, t0 + Duration::from_millis(400));
        assert!((p.bandwidth() - 100.0 * MIB as f64).abs() < 1.0);
        assert!((p.conservative_bandwidth() - 100.0 * MIB as f64).abs() < 1.0);
    }

    #[test]
    fn the_decision_trusts_the_slow_periods_of_a_moving_link() {
        // A link alternating 300 and 100 MiB/s: 20 MiB fits 300 ms at the
        // fast rate (67 ms) and at the slow one (200 ms); 40 MiB fits only
        // at the fast one (133 ms vs 400 ms).
        let fast = 300.0 * MIB as f64;
        let slow = 100.0 * MIB as f64;
        let p = with_periods(&[fast, slow, fast, slow, fast]);
        assert_eq!(p.bandwidth(), fast, "the last period was fast");
        assert_eq!(p.conservative_bandwidth(), slow);
        assert!(p.fits(&inputs(20 * MIB), 300));
        assert!(!p.fits(&inputs(40 * MIB), 300));
        // The slow period ages out after PERIODS fast ones.
        let mut p = p;
        for _ in 0..PERIODS {
            p.push_period(fast);
        }
        assert!(p.fits(&inputs(40 * MIB), 300));
    }

    #[test]
    fn every_part_of_the_pause_counts() {
        let mut p = with_periods(&[100.0 * MIB as f64]);
        let base = inputs(10 * MIB);
        let e = p.estimate(&base);
        assert_eq!(e.pages, Duration::from_millis(100));
        assert_eq!(e.handshake, HANDSHAKE_ALLOWANCE);
        assert_eq!(e.digest, Duration::ZERO, "verify off");
        assert!(p.fits(&base, 300));
        // A 150 ms sync.
        p.record_sync(Duration::from_millis(150));
        assert_eq!(p.estimate(&base).sync, Duration::from_millis(150));
        assert!(p.fits(&base, 300), "100 + 150 + 5 ms <= 270 ms");
        assert!(!p.fits(&base, 250), "255 ms > 225 ms");
        // Pages dirtied while syncing: 10000 pages/s x 150 ms = 1500
        // pages, ~5.9 MiB, ~59 ms more.
        let busy = PauseInputs {
            dirty_pages_rate: 10_000,
            ..base
        };
        assert!(p.estimate(&busy).pages > Duration::from_millis(155));
        assert!(!p.fits(&busy, 330));
        // Device state: 100 ms to save plus 5 MiB on the link.
        let p = with_periods(&[100.0 * MIB as f64]);
        let st = PauseInputs {
            state: StateCost {
                bytes: 5 * MIB,
                save_time: Duration::from_millis(100),
            },
            ..base
        };
        assert_eq!(p.estimate(&st).state, Duration::from_millis(150));
        assert!(p.fits(&base, 150) && !p.fits(&st, 150));
        // The digest: 1 GiB hashed in the pause (a full hash) at a
        // measured 2 GiB/s is 500 ms, plus what both sides got in their
        // hashers' last two passes (100 ms at 100 MiB/s: 2 x 10 MiB,
        // 9.8 ms).
        let mut p = with_periods(&[100.0 * MIB as f64]);
        let v = PauseInputs {
            verify: true,
            digest_bytes: 1 << 30,
            ..base
        };
        assert!(
            !p.fits(&v, 10_000),
            "verify without a measured hash rate never fits"
        );
        p.record_hash(256 * MIB, Duration::from_millis(125));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        assert!((ms(p.estimate(&v).digest) - 509.8).abs() < 0.1);
        assert!(!p.fits(&v, 300));
        assert!(p.floor_exceeds(&v, 300), "the digest alone is over 300 ms");
        assert!(!p.floor_exceeds(&v, 700));
        assert!(p.fits(&v, 700));
        // A running digest re-hashes only changed chunks: 100 MiB.
        let running = PauseInputs {
            digest_bytes: 100 * MIB,
            ..v
        };
        assert!((ms(p.estimate(&running).digest) - 58.6).abs() < 0.1);
        assert!(p.fits(&running, 300));
        // The slower of the last two samples counts.
        p.record_hash(256 * MIB, Duration::from_millis(250));
        assert!((ms(p.estimate(&v).digest) - 1019.5).abs() < 0.1);
        p.record_hash(256 * MIB, Duration::from_millis(125));
        assert!((ms(p.estimate(&v).digest) - 1019.5).abs() < 0.1);
        p.record_hash(256 * MIB, Duration::from_millis(125));
        assert!((ms(p.estimate(&v).digest) - 509.8).abs() < 0.1);
    }

    #[test]
    fn the_destinations_digest_is_priced_at_the_rate_it_reported() {
        // The source hashes at 2 GiB/s; the destination, on a loaded
        // host, reports 256 MiB hashed in 1 s. 64 MiB for each side
        // (plus 10 MiB each from the hashers' last passes at 100 MiB/s).
        let mut p = with_periods(&[100.0 * MIB as f64]);
        p.record_hash(256 * MIB, Duration::from_millis(125));
        let i = PauseInputs {
            verify: true,
            digest_bytes: 64 * MIB,
            dest_digest_bytes: 64 * MIB,
            ..inputs(0)
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // Before any report: both at the source's rate, 2 x 74 MiB.
        assert!((ms(p.estimate(&i).digest) - 72.3).abs() < 0.1);
        assert!(p.fits(&i, 300));
        let slow = super::super::ack::LoadReport {
            hashed: 256 * MIB,
            hash_time: Duration::from_secs(1),
            backlog: 0,
        };
        p.record_dest_report(&slow);
        // 74 MiB at 2 GiB/s + 74 MiB at 256 MiB/s: 36.1 + 289.1 ms.
        assert!((ms(p.estimate(&i).digest) - 325.2).abs() < 0.1);
        assert!(!p.fits(&i, 300));
        // A report of a few bytes says nothing about the rate.
        let mut q = with_periods(&[100.0 * MIB as f64]);
        q.record_hash(256 * MIB, Duration::from_millis(125));
        q.record_dest_report(&super::super::ack::LoadReport {
            hashed: 4096,
            hash_time: Duration::from_millis(5),
            backlog: 0,
        });
        assert!((ms(q.estimate(&i).digest) - 72.3).abs() < 0.1);
        // Without verify nothing is hashed, whatever was reported.
        let off = PauseInputs { verify: false, ..i };
        assert_eq!(p.estimate(&off).digest, Duration::ZERO);
    }

    #[test]
    fn page_budget_is_what_the_fixed_costs_leave() {
        let mut p = with_periods(&[100.0 * MIB as f64]);
        let i = inputs(0);
        // 300 ms x 0.9 - 5 ms handshake = 265 ms at 100 MiB/s.
        let b = p.page_budget(&i, 300);
        assert!(
            (b as f64 - 26.5 * MIB as f64).abs() < 0.01 * MIB as f64,
            "{b}"
        );
        p.record_sync(Duration::from_millis(265));
        assert_eq!(p.page_budget(&i, 300), 0);
        assert!(p.floor_exceeds(&i, 294) && !p.floor_exceeds(&i, 310));
    }

    #[test]
    fn the_vcpu_stop_counts_before_the_pause() {
        // 1 MiB left at 100 MiB/s (10 ms) + 5 ms handshake: 15 ms fits a
        // 20 ms limit (18 ms usable) until the VMM says its vCPUs take
        // 4 ms to stop.
        let mut p = with_periods(&[100.0 * MIB as f64]);
        let mut i = inputs(MIB);
        assert!(p.fits(&i, 20));
        i.stop = Duration::from_millis(4);
        assert_eq!(p.estimate(&i).stop, Duration::from_millis(4));
        assert!(!p.fits(&i, 20));
        assert!(p.fits(&i, 30));
        // A stop this migration paid counts as well, the longer of both.
        p.record_stop(Duration::from_millis(9));
        p.record_stop(Duration::from_millis(2));
        assert_eq!(p.estimate(&i).stop, Duration::from_millis(9));
        i.stop = Duration::from_millis(12);
        assert_eq!(p.estimate(&i).stop, Duration::from_millis(12));
        // The stop is a fixed cost: nothing left to send does not help.
        let none = PauseInputs {
            stop: Duration::from_millis(30),
            ..inputs(0)
        };
        assert!(p.floor_exceeds(&none, 20));
        assert!(!p.floor_exceeds(&none, 100));
    }

    #[test]
    fn a_floor_over_the_limit_settles_once_the_pages_are_small() {
        // A 300 ms limit, a 400 ms vCPU stop: nothing can honour it.
        let p = with_periods(&[100.0 * MIB as f64]);
        let stop = Duration::from_millis(400);
        let at = |bytes: u64| PauseInputs {
            stop,
            ..inputs(bytes)
        };
        assert!(p.floor_exceeds(&at(0), 300));
        // 100 MiB/s: 2 MiB = 20 ms of pages <= 30 ms (10 % of the limit).
        assert!(p.settled(&at(2 * MIB), 300));
        assert!(!p.settled(&at(4 * MIB), 300), "40 ms of pages: wait");
        assert!(p.settled(&at(0), 300));
        // Below the floor, only a pause that fits settles.
        assert!(p.settled(&inputs(20 * MIB), 300));
        assert!(!p.settled(&inputs(40 * MIB), 300));
        // A 1 ms limit leaves 0.1 ms: not even one page at 32 MiB/s.
        let slow = with_periods(&[32.0 * MIB as f64]);
        let one = PauseInputs {
            stop,
            ..inputs(4096)
        };
        assert!(!slow.settled(&one, 1));
    }

    #[test]
    fn at_the_pause_what_was_spent_counts_as_measured() {
        // After the stop and the sync: 1 MiB (10 ms) + 5 ms handshake to
        // come against 18 ms usable of a 20 ms limit.
        let mut p = with_periods(&[100.0 * MIB as f64]);
        // Estimates of the stop and the sync no longer count: they are
        // paid, and `spent` says what they cost.
        p.record_sync(Duration::from_millis(50));
        let i = PauseInputs {
            stop: Duration::from_millis(40),
            ..inputs(MIB)
        };
        assert!(!p.fits(&i, 20), "before the pause: 105 ms estimated");
        assert!(
            p.fits_after(&i, Duration::from_millis(2), 20),
            "2 + 15 <= 18"
        );
        assert!(
            !p.fits_after(&i, Duration::from_millis(4), 20),
            "4 + 15 > 18"
        );
        // A stop that took the whole limit: nothing fits any more, not
        // even with nothing left to send (postcopy then takes over).
        assert!(!p.fits_after(&inputs(0), Duration::from_millis(19), 20));
        assert!(p.fits_after(&inputs(0), Duration::from_millis(12), 20));
        // The device state and the digest still to come count too.
        let st = PauseInputs {
            state: StateCost {
                bytes: 0,
                save_time: Duration::from_millis(5),
            },
            ..inputs(0)
        };
        assert!(
            !p.fits_after(&st, Duration::from_millis(9), 20),
            "9 + 5 + 5 > 18"
        );
        assert!(p.fits_after(&st, Duration::from_millis(8), 20));
        // The guest is stopped: its dirty rate no longer adds pages.
        let busy = PauseInputs {
            dirty_pages_rate: 1_000_000,
            ..inputs(MIB)
        };
        assert!(p.fits_after(&busy, Duration::from_millis(2), 20));
    }

    #[test]
    fn bytes_still_in_flight_count_like_pages() {
        // 1 MiB left at 100 MiB/s (10 ms) + 5 ms handshake fits a 20 ms
        // limit (18 ms usable); with 1 MiB the destination has not
        // applied yet ahead of it, 25 ms does not.
        let p = with_periods(&[100.0 * MIB as f64]);
        let i = inputs(MIB);
        let behind = PauseInputs {
            in_flight_bytes: MIB,
            ..i
        };
        assert!(p.fits(&i, 20));
        assert_eq!(p.estimate(&behind).pages, Duration::from_millis(20));
        assert!(!p.fits(&behind, 20));
        assert!(p.fits(&behind, 30));
        // At the pause as well: the stop and the sync measured (2 ms).
        let spent = Duration::from_millis(2);
        assert!(p.fits_after(&i, spent, 20));
        assert!(!p.fits_after(&behind, spent, 20));
        // Only bytes in flight: 0.5 MiB fits, 1.5 MiB does not.
        let only = |b: u64| PauseInputs {
            in_flight_bytes: b,
            ..inputs(0)
        };
        assert!(p.fits(&only(MIB / 2), 20));
        assert!(!p.fits(&only(3 * MIB / 2), 20));
        // They are no fixed cost: waiting (the drain) removes them, so a
        // backlog does not settle for an overshoot.
        let backlog = only(64 * MIB);
        assert!(!p.floor_exceeds(&backlog, 20));
        assert!(!p.settled(&backlog, 20));
        // They take their share of what fits in the pause: 300 ms x 0.9
        // - 5 ms handshake = 26.5 MiB, less 4 MiB.
        let all = p.page_budget(&inputs(0), 300);
        assert_eq!(all - p.page_budget(&only(4 * MIB), 300), 4 * MIB);
        assert_eq!(p.page_budget(&backlog, 20), 0);
    }

    #[test]
    fn a_wait_is_not_a_slow_period() {
        // 10 MiB in the first 50 ms; then the source waits 500 ms for the
        // destination (sending nothing); then 20 MiB more by 750 ms: 30 MiB
        // in the 250 ms of sending, not in 750 ms.
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut p = Pacing::new(t0);
        p.measure(10 * MIB, ms(50));
        p.exclude(Duration::from_millis(500));
        p.measure(30 * MIB, ms(750));
        assert!(
            (p.bandwidth() - 120.0 * MIB as f64).abs() < 1.0,
            "{}",
            p.bandwidth()
        );
        assert_eq!(p.bandwidth(), p.conservative_bandwidth());
        // Without leaving the wait out it would read as a slow period.
        let mut q = Pacing::new(t0);
        q.measure(10 * MIB, ms(50));
        q.measure(30 * MIB, ms(750));
        assert!(q.bandwidth() < 50.0 * MIB as f64);
    }

    #[test]
    fn the_first_period_counts_once_it_is_long_enough() {
        // 2 MiB in 10 ms: too short to say; 4 MiB in 40 ms: 100 MiB/s,
        // until the first whole period closes.
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut p = Pacing::new(t0);
        p.measure(2 * MIB, ms(10));
        assert_eq!(p.conservative_bandwidth(), 0.0);
        assert!(!p.fits(&inputs(4096), 1000));
        p.measure(4 * MIB, ms(40));
        assert!((p.conservative_bandwidth() - 100.0 * MIB as f64).abs() < 1.0);
        assert!(p.fits(&inputs(4096), 1000));
        assert_eq!(p.bandwidth(), 0.0, "no period closed yet");
        p.measure(5 * MIB, ms(125));
        assert!((p.conservative_bandwidth() - 40.0 * MIB as f64).abs() < 1.0);
    }

    #[test]
    fn a_period_of_zero_pages_is_not_a_slow_link() {
        // 100 ms of raw pages at ~2 GB/s, then 100 ms scanning 90000 zero
        // pages (9 bytes each on the stream: ~8 MB/s), then 100 ms of raw
        // pages again.
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let page = crate::PAGE_SIZE as u64;
        let mut p = Pacing::new(t0);
        let raw = 50_000;
        p.measure_pages(raw * page, raw, ms(100));
        p.measure_pages(raw * page + 90_000 * 9, raw + 90_000, ms(200));
        assert!(
            p.bandwidth() < 10e6,
            "the scan's byte rate: {}",
            p.bandwidth()
        );
        let fast = raw as f64 * page as f64 / 0.1;
        assert!((p.conservative_bandwidth() - fast).abs() < 1.0);
        // 400 MiB left: ~200 ms at the data rate, ~50 s at the scan's.
        assert!(p.fits(&inputs(400 * MIB), 300));
        // A slower data period still counts.
        let n = raw + 90_000;
        p.measure_pages(
            raw * page + 90_000 * 9 + raw / 2 * page,
            n + raw / 2,
            ms(300),
        );
        assert!((p.conservative_bandwidth() - fast / 2.0).abs() < 1.0);
        // Half a page per page is data (a mix of raw and zero pages).
        let mut q = Pacing::new(t0);
        q.measure_pages(1000 * page / 2, 1000, ms(100));
        assert!((q.conservative_bandwidth() - q.bandwidth()).abs() < 1.0);
        // Only zero pages so far: their rate is all there is.
        let mut z = Pacing::new(t0);
        z.measure_pages(9 * 90_000, 90_000, ms(100));
        assert!((z.conservative_bandwidth() - 8.1e6).abs() < 1.0);
        // A nap restarts the period without counting earlier pages in it.
        z.measure_pages(9 * 90_000, 90_000, ms(150));
        z.restart_period(9 * 90_000, ms(400));
        z.measure_pages(9 * 90_000 + 100 * page, 90_100, ms(500));
        assert!((z.conservative_bandwidth() - 100.0 * page as f64 / 0.1).abs() < 1.0);
    }

    thread_local! {
        /// The fake run-queue wait of `starved_clock`.
        static WAITED: std::cell::Cell<Duration> = const { std::cell::Cell::new(Duration::ZERO) };
    }

    fn starved_clock() -> Option<Duration> {
        Some(WAITED.with(|w| w.get()))
    }

    fn starve(d: Duration) {
        WAITED.with(|w| w.set(w.get() + d));
    }

    #[test]
    fn time_off_the_cpu_is_not_a_slow_link() {
        // 100 MiB/s while the sender runs; in the second period other
        // processes hold the CPU for 75 of its 100 ms: 2.5 MiB sent.
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut p = Pacing::with_cpu_wait(t0, starved_clock);
        p.measure(10 * MIB, ms(100));
        starve(Duration::from_millis(75));
        p.measure(10 * MIB + 5 * MIB / 2, ms(200));
        let rate = 100.0 * MIB as f64;
        assert!((p.bandwidth() - rate).abs() < 1.0, "{}", p.bandwidth());
        assert!((p.conservative_bandwidth() - rate).abs() < 1.0);
        // 20 MiB fits 300 ms at 100 MiB/s; at the starved period's
        // whole-period rate (25 MiB/s) it would take 800 ms.
        assert!(p.fits(&inputs(20 * MIB), 300));
        // A period in which the sender ran but the link was slow still
        // counts as slow.
        p.measure(10 * MIB + 5 * MIB / 2 + 2 * MIB, ms(300));
        assert!((p.conservative_bandwidth() - 20.0 * MIB as f64).abs() < 1.0);
        // At most MAX_STARVED_SHARE of a period is left out: a sender off
        // the CPU for the whole period reads at most 4x its bytes over it.
        let mut q = Pacing::with_cpu_wait(t0, starved_clock);
        starve(Duration::from_millis(100));
        q.measure(MIB, ms(100));
        assert!(
            (q.bandwidth() - 40.0 * MIB as f64).abs() < 1.0,
            "{}",
            q.bandwidth()
        );
        // A wait before a restart is not counted in the next period.
        let mut r = Pacing::with_cpu_wait(t0, starved_clock);
        starve(Duration::from_millis(50));
        r.restart_period(0, ms(50));
        r.measure(10 * MIB, ms(150));
        assert!((r.bandwidth() - rate).abs() < 1.0, "{}", r.bandwidth());
    }

    #[test]
    fn this_threads_cpu_wait_is_read_when_the_kernel_keeps_it() {
        // Where schedstat exists it only grows; where it does not, the
        // periods are taken whole.
        if let (Some(a), Some(b)) = (thread_cpu_wait(), thread_cpu_wait()) {
            assert!(b >= a);
        }
    }

    #[test]
    fn nothing_fits_before_the_link_was_measured() {
        let p = Pacing::new(Instant::now());
        assert!(!p.fits(&inputs(4096), 1000));
        assert!(p.fits(&inputs(0), 1000), "nothing to send fits");
        assert_eq!(p.page_budget(&inputs(0), 1000), 0);
    }

    #[test]
    fn rate_limit_sleeps_out_a_spent_window() {
        let mut p = Pacing::new(Instant::now());
        assert!(!p.rate_limit(u64::MAX / 2, 0), "no cap, never sleeps");
        let mut p2 = Pacing::new(Instant::now());
        // 10 MiB/s: 1 MiB per 100 ms window.
        assert!(!p2.rate_limit(MIB / 2, 10 * MIB));
        assert!(p2.rate_limit(MIB, 10 * MIB));
    }

    #[test]
    fn a_slow_round_trip_prices_the_handshake() {
        let mut p = with_periods(&[100.0 * MIB as f64]);
        assert_eq!(p.handshake_estimate(), HANDSHAKE_ALLOWANCE);
        // A quick ping leaves the allowance.
        p.record_ping(Duration::from_micros(200));
        assert_eq!(p.handshake_estimate(), HANDSHAKE_ALLOWANCE);
        // A loaded host's: each leg of the handshake costs as much.
        p.record_ping(Duration::from_millis(40));
        assert_eq!(
            p.handshake_estimate(),
            Duration::from_millis(40) * PING_LEGS
        );
        assert_eq!(p.estimate(&inputs(0)).handshake, p.handshake_estimate());
        // 16 MiB (160 ms) fits 300 ms with a 5 ms handshake, not with 120.
        assert!(!p.fits(&inputs(16 * MIB), 300));
        let quick = with_periods(&[100.0 * MIB as f64]);
        assert!(quick.fits(&inputs(16 * MIB), 300));
        // The slowest of the last PINGS counts, then it ages out.
        for _ in 0..PINGS {
            p.record_ping(Duration::from_millis(1));
        }
        assert_eq!(p.handshake_estimate(), HANDSHAKE_ALLOWANCE);
        // A measured handshake longer than the pings' price counts too.
        p.record_handshake(Duration::from_millis(30));
        assert_eq!(p.handshake_estimate(), Duration::from_millis(30));
    }

    #[test]
    fn a_pause_whose_rate_collapses_overruns() {
        let p = with_periods(&[100.0 * MIB as f64]);
        let left = |remaining: u64, in_flight: u64| PauseInputs {
            remaining_bytes: remaining,
            in_flight_bytes: in_flight,
            ..PauseInputs::default()
        };
        let spent = Duration::from_millis(20);
        // Before any page: 10 MiB at 100 MiB/s = 100 ms, fits 300 ms.
        assert!(!p.overruns(&left(10 * MIB, 0), spent, (0, Duration::ZERO), 300));
        // 1 MiB went in 100 ms (10 MiB/s): the 9 MiB left take 900 ms.
        let slow = (MIB, Duration::from_millis(100));
        assert!(p.overruns(&left(9 * MIB, MIB), spent + slow.1, slow, 300));
        // A rate measured over less than PAUSE_RATE_AFTER is not trusted.
        let blip = (MIB, Duration::from_millis(1));
        assert!(!p.overruns(&left(9 * MIB, MIB), spent, blip, 300));
        // Nor one over less than a tenth of the limit: 64 KiB in 10 ms
        // (6.4 MiB/s) says nothing yet against 300 ms, but against 30 ms
        // it is a third of the pause.
        let hiccup = (64 << 10, Duration::from_millis(10));
        let early = Duration::from_millis(2);
        assert!(!p.overruns(&left(512 << 10, 64 << 10), early, hiccup, 300));
        assert!(!p.overruns(&left(512 << 10, 64 << 10), early, blip, 30));
        assert!(p.overruns(&left(512 << 10, 64 << 10), early, hiccup, 30));
        // Faster than the estimate: the estimate's rate still prices it.
        let fast = (5 * MIB, Duration::from_millis(10));
        assert!(!p.overruns(&left(5 * MIB, 5 * MIB), spent, fast, 300));
    }

    #[test]
    fn bytes_the_pause_wrote_count_once() {
        // 100 MiB/s; 20 MiB written in the pause in 200 ms (the link's
        // rate): they are through, nothing left. Counting them again as
        // still to go would add 200 ms and overrun 300 ms.
        let p = with_periods(&[100.0 * MIB as f64]);
        let i = PauseInputs {
            remaining_bytes: 0,
            in_flight_bytes: 20 * MIB,
            ..PauseInputs::default()
        };
        let sending = (20 * MIB, Duration::from_millis(200));
        assert!(!p.overruns(&i, Duration::from_millis(210), sending, 300));
        // Written into buffers in 20 ms (faster than the link): 180 ms of
        // them still to reach the destination.
        let buffered = (20 * MIB, Duration::from_millis(20));
        assert!(!p.overruns(&i, Duration::from_millis(30), buffered, 300));
        assert!(p.overruns(&i, Duration::from_millis(100), buffered, 300));
    }

    #[test]
    fn a_pause_rate_counts_as_a_period() {
        let mut p = with_periods(&[100.0 * MIB as f64]);
        p.record_pause_rate(MIB, Duration::from_millis(100), 300);
        assert!((p.conservative_bandwidth() - 10.0 * MIB as f64).abs() < 1.0);
        // Too short to say anything: under PAUSE_RATE_AFTER, or under a
        // tenth of the limit.
        let mut q = with_periods(&[100.0 * MIB as f64]);
        q.record_pause_rate(MIB, Duration::from_micros(500), 20);
        q.record_pause_rate(MIB, Duration::from_millis(20), 300);
        assert!((q.conservative_bandwidth() - 100.0 * MIB as f64).abs() < 1.0);
    }
}
