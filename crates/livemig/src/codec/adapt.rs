//! Adaptive encoding: whether compressing a page, or trying an XBZRLE
//! delta, pays on this link right now, decided from measured costs.
//!
//! A page costs the sender CPU time to encode and link time to carry its
//! bytes. Compressing saves `(1 - ratio) * 4096` bytes of link time per
//! page and costs the compressor's time per page; it pays when the saving
//! is larger. On a fast link (loopback, a fast LAN) a compressor slower
//! than the link makes the migration slower, on a slow or capped link it
//! makes it faster. The same reasoning judges XBZRLE, whose saving is the
//! bytes it keeps off the link against the page it would otherwise be sent
//! as (raw, or compressed when that is on) and whose cost is the cache
//! lookup, the delta and the cache update.
//!
//! The link's cost per byte is the time spent inside `write` on the
//! transport ([`TimedWrite`] / [`WireClock`]), never shorter than the
//! bandwidth cap allows. Estimates are exponentially weighted; while an
//! encoding is off, a sample of pages still tries it so the estimates
//! follow a guest whose memory or link changes.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::memory::PAGE_SIZE;

const PAGE: f64 = PAGE_SIZE as f64;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.05;
/// While compression is off, one page in this many is compressed anyway.
const PROBE_EVERY: u64 = 32;
/// Re-estimate the link cost after at least this many bytes went out.
const WIRE_SAMPLE_BYTES: u64 = 64 << 10;
/// Link samples the estimate starts from: 192 KiB written.
const WIRE_WARMUP: usize = 3;
/// Switch on below `1 - HYSTERESIS` of the break-even cost, off above
/// `1 + HYSTERESIS` of it.
const HYSTERESIS: f64 = 0.1;
/// XBZRLE is judged once per this many attempts.
const XBZRLE_WINDOW: u64 = 512;
/// Pages XBZRLE sits out after a losing window, doubled each time in a
/// row, up to [`XBZRLE_MAX_BACKOFF`].
const XBZRLE_MIN_BACKOFF: u64 = 4096;
const XBZRLE_MAX_BACKOFF: u64 = 1 << 20;

/// Time spent in, and bytes passed through, `write` on one transport.
#[derive(Debug, Default)]
pub struct WireClock {
    ns: AtomicU64,
    bytes: AtomicU64,
}

impl WireClock {
    /// Nanoseconds spent writing and bytes written so far.
    pub fn read(&self) -> (u64, u64) {
        (
            self.ns.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// A writer that adds the time each `write` takes to a [`WireClock`].
pub struct TimedWrite<W> {
    inner: W,
    clock: Arc<WireClock>,
}

impl<W> TimedWrite<W> {
    /// Wraps `inner`, timing into `clock`.
    pub fn new(inner: W, clock: Arc<WireClock>) -> Self {
        TimedWrite { inner, clock }
    }
}

impl<W: Write> Write for TimedWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t0 = Instant::now();
        let r = self.inner.write(buf);
        let ns = t0.elapsed().as_nanos() as u64;
        self.clock.ns.fetch_add(ns, Ordering::Relaxed);
        if let Ok(n) = r {
            self.clock.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        let t0 = Instant::now();
        let r = self.inner.flush();
        let ns = t0.elapsed().as_nanos() as u64;
        self.clock.ns.fetch_add(ns, Ordering::Relaxed);
        r
    }
}

/// Most samples an estimate starts from (their median).
const WARMUP: usize = 8;

/// An exponentially weighted moving average that ignores outliers; `None`
/// until its warm-up samples came in. It starts at their median, and later
/// samples count at most four times the current value, so one slow call (a
/// page fault, a descheduled thread) cannot flip a decision.
#[derive(Clone, Copy, Debug)]
struct Ewma {
    value: Option<f64>,
    first: [f64; WARMUP],
    n: usize,
    warmup: usize,
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma::with_warmup(WARMUP)
    }
}

impl Ewma {
    /// Starts from the median of the first `warmup` (1..=[`WARMUP`]) samples.
    fn with_warmup(warmup: usize) -> Self {
        Ewma {
            value: None,
            first: [0.0; WARMUP],
            n: 0,
            warmup: warmup.clamp(1, WARMUP),
        }
    }

    fn add(&mut self, x: f64) {
        match self.value {
            Some(v) => self.value = Some(v + ALPHA * (x.min(4.0 * v) - v)),
            None => {
                self.first[self.n] = x;
                self.n += 1;
                if self.n == self.warmup {
                    let first = &mut self.first[..self.n];
                    first.sort_by(f64::total_cmp);
                    self.value = Some(first[self.n / 2]);
                }
            }
        }
    }

    fn get(&self) -> Option<f64> {
        self.value
    }
}

/// The link's cost per byte, from a [`WireClock`] and the bandwidth cap.
#[derive(Debug)]
pub struct LinkCost {
    clock: Arc<WireClock>,
    last: (u64, u64),
    measured: Ewma,
}

impl LinkCost {
    /// Follows `clock`.
    pub fn new(clock: Arc<WireClock>) -> Self {
        let last = clock.read();
        LinkCost {
            clock,
            last,
            measured: Ewma::with_warmup(WIRE_WARMUP),
        }
    }

    /// Takes a new sample from the clock when enough bytes went out.
    pub fn update(&mut self) {
        let (ns, bytes) = self.clock.read();
        let (dns, dbytes) = (ns - self.last.0, bytes - self.last.1);
        if dbytes >= WIRE_SAMPLE_BYTES {
            self.measured.add(dns as f64 / dbytes as f64);
            self.last = (ns, bytes);
        }
    }

    /// Whether the bandwidth cap (`max_bandwidth` bytes/s, 0 = none), not
    /// the writes, sets the pace: then the sender sleeps out the link
    /// time, and CPU work such as compressing overlaps it instead of
    /// adding to it.
    pub fn capped(&self, max_bandwidth: u64) -> bool {
        if max_bandwidth == 0 {
            return false;
        }
        let cap = 1e9 / max_bandwidth as f64;
        self.measured.get().is_none_or(|m| cap >= m)
    }

    /// Nanoseconds per byte on the link: what writes took, or what the
    /// bandwidth cap allows (`max_bandwidth` bytes/s, 0 = none), whichever
    /// is slower. `None` before anything was measured and without a cap.
    pub fn ns_per_byte(&self, max_bandwidth: u64) -> Option<f64> {
        let cap = (max_bandwidth > 0).then(|| 1e9 / max_bandwidth as f64);
        match (self.measured.get(), cap) {
            (Some(m), Some(c)) => Some(m.max(c)),
            (m, c) => m.or(c),
        }
    }
}

/// Whether to compress the next page.
#[derive(Debug)]
pub struct CompressChooser {
    adaptive: bool,
    on: bool,
    pages: u64,
    /// Compressor time per page, ns.
    cost: Ewma,
    /// Bytes out per page bytes in (1.0 when a page did not shrink).
    ratio: Ewma,
    skipped: u64,
}

impl CompressChooser {
    /// With `adaptive` false, every page is compressed.
    pub fn new(adaptive: bool) -> Self {
        CompressChooser {
            adaptive,
            on: true,
            pages: 0,
            cost: Ewma::default(),
            ratio: Ewma::default(),
            skipped: 0,
        }
    }

    /// Asks for the next non-zero page: compress it? Counts the pages that
    /// are not compressed (see [`Self::skipped`]).
    pub fn should_compress(&mut self) -> bool {
        self.pages += 1;
        let yes = !self.adaptive || self.on || self.pages.is_multiple_of(PROBE_EVERY);
        if !yes {
            self.skipped += 1;
        }
        yes
    }

    /// Records one compression: `ns` spent, `out` bytes it would send
    /// (`PAGE_SIZE` when the page did not shrink and went raw).
    pub fn record(&mut self, ns: u64, out: usize) {
        self.cost.add(ns as f64);
        self.ratio.add(out as f64 / PAGE);
    }

    /// Re-decides from the estimates and the link cost (ns per byte).
    ///
    /// When writes set the pace (`capped` false: the time in `write` is
    /// this thread's, e.g. the kernel copying into a loopback socket),
    /// compressing pays when its time per page is less than the link time
    /// the saved bytes take. Under a bandwidth cap the sender sleeps out
    /// the link time, so compressing pays whenever the page shrinks and
    /// the compressor keeps up with the link's time for the smaller page.
    pub fn decide(&mut self, link_ns_per_byte: Option<f64>, capped: bool) {
        if !self.adaptive {
            return;
        }
        let (Some(cost), Some(ratio), Some(link)) =
            (self.cost.get(), self.ratio.get(), link_ns_per_byte)
        else {
            return;
        };
        let budget = if capped {
            // Shrinking by under 5 % is not worth the CPU either way.
            if ratio < 0.95 {
                ratio * PAGE * link
            } else {
                0.0
            }
        } else {
            (1.0 - ratio).max(0.0) * PAGE * link
        };
        if self.on && cost > budget * (1.0 + HYSTERESIS) {
            self.on = false;
        } else if !self.on && cost < budget * (1.0 - HYSTERESIS) {
            self.on = true;
        }
    }

    /// Whether pages are compressed now (apart from probes).
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Expected bytes on the link for a compressed page (a page if unknown).
    pub fn expected_bytes(&self) -> f64 {
        self.ratio.get().map_or(PAGE, |r| r * PAGE)
    }

    /// Pages sent uncompressed because compressing did not pay.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

/// Whether to try XBZRLE on the next re-sent page.
#[derive(Debug, Default)]
pub struct XbzrleGate {
    /// Pages left to sit out.
    suspended: u64,
    backoff: u64,
    attempts: u64,
    /// Bytes kept off the link in this window (may be negative: a delta
    /// larger than the compressed page would have been).
    saved: f64,
    /// Time spent on XBZRLE in this window, ns.
    ns: u64,
    skipped: u64,
    windows_lost: u64,
}

impl XbzrleGate {
    /// A gate that lets every page try.
    pub fn new() -> Self {
        XbzrleGate::default()
    }

    /// Asks for the next re-sent page: try XBZRLE on it? Counts the pages
    /// that sit out (see [`Self::skipped`]).
    pub fn should_try(&mut self) -> bool {
        if self.suspended > 0 {
            self.suspended -= 1;
            self.skipped += 1;
            return false;
        }
        true
    }

    /// Records one attempt that found the page in the cache (a miss only
    /// fills the cache for later hits and is not judged): `ns` spent on
    /// the delta and the cache update, `sent` bytes it put on the link (0
    /// for an unchanged page, the delta's size, or the page when the delta
    /// overflowed), against `baseline` bytes the
    /// page would have cost without XBZRLE. At the end of a window, with
    /// the link's cost per byte, decides whether XBZRLE sits out a while.
    pub fn record(&mut self, ns: u64, sent: f64, baseline: f64, link_ns_per_byte: Option<f64>) {
        self.attempts += 1;
        self.saved += baseline - sent;
        self.ns += ns;
        if self.attempts < XBZRLE_WINDOW {
            return;
        }
        // Without a link estimate yet, bytes saved are the only measure.
        let benefit = self.saved * link_ns_per_byte.unwrap_or(f64::INFINITY);
        let lost = self.saved <= 0.0 || benefit < self.ns as f64;
        if lost {
            self.backoff = (self.backoff * 2).clamp(XBZRLE_MIN_BACKOFF, XBZRLE_MAX_BACKOFF);
            self.suspended = self.backoff;
            self.windows_lost += 1;
        } else {
            self.backoff = 0;
        }
        self.attempts = 0;
        self.saved = 0.0;
        self.ns = 0;
    }

    /// Whether XBZRLE is sitting out now.
    #[cfg(test)]
    pub fn is_suspended(&self) -> bool {
        self.suspended > 0
    }

    /// Pages that did not try XBZRLE because it did not pay.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_write_counts_time_and_bytes() {
        let clock = Arc::new(WireClock::default());
        let mut w = TimedWrite::new(Vec::new(), clock.clone());
        w.write_all(&[7u8; 1000]).unwrap();
        w.flush().unwrap();
        assert_eq!(clock.read().1, 1000);
        assert_eq!(w.inner.len(), 1000);
    }

    #[test]
    fn link_cost_is_the_slower_of_writes_and_the_cap() {
        let clock = Arc::new(WireClock::default());
        let mut link = LinkCost::new(clock.clone());
        assert_eq!(link.ns_per_byte(0), None);
        assert_eq!(link.ns_per_byte(1_000_000_000), Some(1.0));
        // 1 MiB written in 1 ms, three times: ~0.95 ns per byte.
        for i in 1..=WIRE_WARMUP as u64 {
            assert_eq!(link.ns_per_byte(0), None, "still warming up");
            clock.ns.store(i * 1_000_000, Ordering::Relaxed);
            clock.bytes.store(i << 20, Ordering::Relaxed);
            link.update();
        }
        let m = link.ns_per_byte(0).unwrap();
        assert!((m - 1e6 / (1u64 << 20) as f64).abs() < 1e-9, "{m}");
        // A cap of 100 MB/s (10 ns per byte) is slower than the writes.
        assert_eq!(link.ns_per_byte(100_000_000), Some(10.0));
        // Too few new bytes: no new sample.
        clock.ns.store(100_000_000, Ordering::Relaxed);
        clock.bytes.store((3 << 20) + 10, Ordering::Relaxed);
        link.update();
        assert_eq!(link.ns_per_byte(0), Some(m));
    }

    /// Feeds `pages` pages compressing at `cost` ns to `ratio` over a link
    /// of `link` ns/byte; returns whether compression ended up on and how
    /// many pages were compressed.
    fn run_chooser(adaptive: bool, cost: u64, ratio: f64, link: f64, pages: u64) -> (bool, u64) {
        let mut c = CompressChooser::new(adaptive);
        let mut compressed = 0;
        for _ in 0..pages {
            if c.should_compress() {
                compressed += 1;
                c.record(cost, (ratio * PAGE) as usize);
            }
            c.decide(Some(link), false);
        }
        assert_eq!(compressed + c.skipped(), pages);
        (c.is_on(), compressed)
    }

    #[test]
    fn compression_is_skipped_on_a_link_faster_than_the_compressor() {
        // zstd-like: 8 us per page to a third; loopback-like link:
        // 0.4 ns/byte, so a page crosses in 1.6 us and saving two thirds
        // of it is worth ~1.1 us: compressing loses.
        let (on, compressed) = run_chooser(true, 8_000, 0.33, 0.4, 10_000);
        assert!(!on);
        // Only the probes after the first few pages.
        assert!(compressed < 10_000 / PROBE_EVERY + 10, "{compressed}");
    }

    #[test]
    fn compression_stays_on_a_slow_link() {
        // 100 MB/s: 10 ns/byte, a page is 41 us on the link.
        let (on, compressed) = run_chooser(true, 8_000, 0.33, 10.0, 10_000);
        assert!(on);
        assert_eq!(compressed, 10_000);
    }

    #[test]
    fn incompressible_pages_are_not_compressed_even_on_a_slow_link() {
        let (on, _) = run_chooser(true, 3_000, 1.0, 10.0, 10_000);
        assert!(!on);
    }

    #[test]
    fn without_adaptation_every_page_is_compressed() {
        let (on, compressed) = run_chooser(false, 8_000, 1.0, 0.1, 1000);
        assert!(on);
        assert_eq!(compressed, 1000);
    }

    #[test]
    fn compression_comes_back_when_the_link_slows_down() {
        let mut c = CompressChooser::new(true);
        for _ in 0..5000 {
            if c.should_compress() {
                c.record(8_000, 1300);
            }
            c.decide(Some(0.4), false);
        }
        assert!(!c.is_on());
        for _ in 0..5000 {
            if c.should_compress() {
                c.record(8_000, 1300);
            }
            c.decide(Some(10.0), false);
        }
        assert!(c.is_on(), "probes saw the slow link");
        assert!((c.expected_bytes() - 1300.0).abs() < 1.0);
    }

    #[test]
    fn under_a_cap_compression_overlaps_the_link_time() {
        // 12 us a page to 62 %, link capped at 200 MiB/s (4.8 ns/byte):
        // the saved 38 % take 7.4 us of link time (serial rule: no), but
        // the compressed page's 12.1 us of link time hides the compressor.
        let run = |capped: bool| {
            let mut c = CompressChooser::new(true);
            for _ in 0..10_000 {
                if c.should_compress() {
                    c.record(10_000, 2540);
                }
                c.decide(Some(4.77), capped);
            }
            c.is_on()
        };
        assert!(!run(false));
        assert!(run(true));
        // A compressor slower than the capped link loses even so.
        let mut c = CompressChooser::new(true);
        for _ in 0..10_000 {
            if c.should_compress() {
                c.record(30_000, 2540);
            }
            c.decide(Some(4.77), true);
        }
        assert!(!c.is_on());
    }

    #[test]
    fn capped_is_when_the_cap_is_slower_than_the_writes() {
        let clock = Arc::new(WireClock::default());
        let mut link = LinkCost::new(clock.clone());
        assert!(!link.capped(0));
        assert!(link.capped(100 << 20), "no measurement yet: the cap");
        for i in 1..=WIRE_WARMUP as u64 {
            // 1 ns per byte.
            clock.ns.store(i << 20, Ordering::Relaxed);
            clock.bytes.store(i << 20, Ordering::Relaxed);
            link.update();
        }
        assert!(link.capped(100 << 20), "10 ns/byte cap");
        assert!(
            !link.capped(4 << 30),
            "0.23 ns/byte cap: the writes are slower"
        );
    }

    #[test]
    fn xbzrle_that_saves_bytes_keeps_going() {
        let mut g = XbzrleGate::new();
        for _ in 0..10 * XBZRLE_WINDOW {
            assert!(g.should_try());
            // 2 us for a 100-byte delta instead of a 4 KiB page at 1 ns/B.
            g.record(2_000, 100.0, PAGE, Some(1.0));
        }
        assert!(!g.is_suspended());
        assert_eq!(g.skipped(), 0);
    }

    #[test]
    fn xbzrle_that_only_overflows_sits_out_with_growing_backoff() {
        let mut g = XbzrleGate::new();
        let mut tried = 0u64;
        for _ in 0..XBZRLE_WINDOW {
            assert!(g.should_try());
            g.record(500, PAGE, PAGE, Some(1.0));
            tried += 1;
        }
        assert!(g.is_suspended());
        let mut sat_out = 0;
        while !g.should_try() {
            sat_out += 1;
        }
        assert_eq!(sat_out, XBZRLE_MIN_BACKOFF);
        // Another losing window: twice as long.
        g.record(500, PAGE, PAGE, Some(1.0));
        for _ in 1..XBZRLE_WINDOW {
            assert!(g.should_try());
            g.record(500, PAGE, PAGE, Some(1.0));
            tried += 1;
        }
        let mut sat_out2 = 0;
        while !g.should_try() {
            sat_out2 += 1;
        }
        assert_eq!(sat_out2, 2 * XBZRLE_MIN_BACKOFF);
        assert_eq!(g.skipped(), sat_out + sat_out2);
        assert!(tried > 0);
    }

    #[test]
    fn xbzrle_loses_to_compression_when_deltas_are_larger() {
        let mut g = XbzrleGate::new();
        for _ in 0..XBZRLE_WINDOW {
            // Deltas of 2000 bytes where the compressed page is 1200.
            g.record(1_000, 2000.0, 1200.0, Some(10.0));
        }
        assert!(g.is_suspended());
    }

    #[test]
    fn xbzrle_slower_than_the_link_saves_sits_out() {
        let mut g = XbzrleGate::new();
        for _ in 0..XBZRLE_WINDOW {
            // Saves 96 bytes at 0.3 ns/byte (29 ns) for 3 us of work.
            g.record(3_000, 4000.0, PAGE, Some(0.3));
        }
        assert!(g.is_suspended());
    }
}
