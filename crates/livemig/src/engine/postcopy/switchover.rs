//! When `postcopy-switchover=auto` leaves precopy early: a prediction of
//! what precopy would still re-send, made at each dirty sync.
//!
//! Precopy pays for every page the guest writes after it was sent: the
//! page goes again. Postcopy, switched now, sends every page still to send
//! exactly once. So once precopy is known to re-send a large share of
//! guest memory before it could finish, waiting only costs time and bytes
//! (a guest that rewrites all of its memory faster than a round takes
//! never converges; one that rewrites it at a third of the link's rate
//! converges, but only after re-sending more than it had left).
//!
//! The prediction, at a sync (see [`Prediction`]):
//!
//! - the **dirty rate** `r`: pages the sync reported that the previous
//!   sync did not (the dirty set's growth), over the time between the two.
//!   A hot region rewritten again and again is reported at both and does
//!   not count after its first sync; a writer sweeping memory, or writing
//!   all over it, counts in full. (A tracker whose log starts all set
//!   reports its untouched chunks at every sync: they too count once.)
//! - the share of a round the guest dirties again while it is sent:
//!   `ρ = r · 4 KiB / B`, with `B` the average rate precopy has sent at;
//! - what precopy would still re-send before the remaining set `R` is gone:
//!   `R·ρ + R·ρ² + … = R·ρ / (1 − ρ)` pages (unbounded when `ρ ≥ 1`:
//!   precopy cannot converge).
//!
//! **Rule**: `auto` switches when the predicted re-send is at least
//! [`RESEND_SHARE`] of guest memory at [`STREAK`] syncs in a row (a single
//! sync's burst, such as a hot set's first report, is not enough), or at
//! once when one sync measured against an earlier harvest finds the guest
//! dirtying new pages at least [`FAR_RATIO`] times as fast as precopy
//! sends (`ρ ≥ FAR_RATIO`: see below). To know early, an `auto` source
//! syncs as precopy starts and then every [`PROBE_PERIOD`] during the
//! first pass (bulk stage), where precopy alone syncs only near the
//! pass's end.
//!
//! **Far below the dirty rate.** On a link much slower than the guest's
//! writes (a vCPU sweeping 1 GiB/s over a 1 Gbit/s link: `ρ ≈ 8`), every
//! millisecond of precopy turns about a megabyte of memory the guest had
//! not written yet into data that postcopy must then carry, against the
//! ~0.12 MB precopy moved meanwhile: waiting for a second confirming sync
//! costs a probe period of that. One sync is enough there because its
//! rate is measured, not guessed: the pages it reports that the previous
//! harvest did not (a hot set reported again counts nothing), against
//! what precopy really sent since it started (bytes written, which socket
//! buffers only inflate early on: that makes `ρ` smaller, never larger).
//! The first harvest, with nothing before it, never decides alone.
//! This extends "precopy stops making progress" (the remaining set does
//! not shrink over a sync, checked after the first pass) to "precopy's
//! progress is predicted to cost at least an eighth of memory again"; the
//! check at stop-and-copy time (the pause would not fit the downtime
//! limit) is unchanged.

use std::time::Duration;

use crate::bitmap::DirtyBitmap;
use crate::memory::PAGE_SIZE;

/// How often an `auto` source syncs during the first pass, to measure the
/// guest's dirty rate early (a sync of a 1 GiB guest's log costs well under
/// a millisecond: ~60 µs measured; after the first sync at the start, one
/// probe decides a guest far faster than the link, two any other, so the
/// switch comes one or two periods after the start).
pub(crate) const PROBE_PERIOD: Duration = Duration::from_millis(10);
/// `auto` switches when precopy is predicted to re-send at least this share
/// of guest memory.
pub(crate) const RESEND_SHARE: f64 = 1.0 / 8.0;
/// Consecutive syncs that must predict it.
pub(crate) const STREAK: u32 = 2;
/// A sync measured against an earlier harvest that finds the guest
/// dirtying new pages at least this many times as fast as precopy sends
/// switches on its own.
pub(crate) const FAR_RATIO: f64 = 2.0;
/// With a dirty log that starts all set (KVM manual-protect with
/// `INITIALLY_SET`), the first harvest worth having comes after the first
/// clear re-protected memory: this long after the first page went out
/// (the clear comes just before it). A harvest taken as precopy starts
/// would only say "everything", and the next one, measured against it,
/// "nothing new": the deciding probe came a probe period later than it
/// needed to (measured at 1 Gbit/s: the first measured probe at +28-55 ms
/// after setup, the guest writing ~1 MB a millisecond meanwhile).
pub(crate) const PROBE_FIRST: Duration = Duration::from_millis(2);
/// The first probe measured against an earlier harvest comes this long
/// after it (later ones [`PROBE_PERIOD`]): on a link far slower than the
/// guest's writes one measured probe decides (see below), and its rate
/// holds over any interval (a sweep's new pages grow with the time), so a
/// shorter first interval brings the switch forward by the difference.
pub(crate) const PROBE_FIRST_PERIOD: Duration = Duration::from_millis(5);
/// An interval between probes was paced by the link (or by a destination
/// slower than it) when the main stream spent at least this share of it
/// inside `write`: its socket buffer was full.
pub(crate) const WRITE_BOUND_SHARE: f64 = 0.5;
/// The switch skips the drain only when the pause, the bytes in flight
/// included, fits in this share of the downtime limit. The rate the bytes
/// in flight drain at is measured over one probe interval only, and on
/// loopback it is the destination's (page placement, first touches), which
/// moves several-fold under load: with 45 % of the limit, a 30 ms
/// loopback row paused up to 42 ms (load 9-10; a skipped drain suspected,
/// not traced); at 1 Gbit/s the estimate stayed above the pause it
/// predicted.
pub(crate) const SKIP_DRAIN_SHARE: f64 = 0.25;

/// What the main stream's writes did between two probes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct WireInterval {
    /// Time between the probes.
    pub wall: Duration,
    /// Stream bytes written meanwhile.
    pub bytes: u64,
    /// Time spent inside `write` meanwhile.
    pub in_write: Duration,
}

impl WireInterval {
    /// The writes waited for the link (socket buffer full) for at least
    /// [`WRITE_BOUND_SHARE`] of the interval.
    pub fn write_bound(&self) -> bool {
        !self.wall.is_zero()
            && self.in_write.as_secs_f64() >= WRITE_BOUND_SHARE * self.wall.as_secs_f64()
    }

    /// Bytes per second written.
    pub fn rate(&self) -> f64 {
        if self.wall.is_zero() {
            0.0
        } else {
            self.bytes as f64 / self.wall.as_secs_f64()
        }
    }
}

/// The rate at which bytes already written reach the destination, as
/// measured by the last two probe intervals: known only when both were
/// write-bound. Then the socket buffer was full when the last interval
/// began and when it ended, so what it took in over the interval is what
/// left it: the link's (or the destination's) rate, with no buffer fill
/// in it (a first interval of a fresh connection takes megabytes at
/// memcpy speed, and its rate says nothing of the link).
pub(crate) fn drain_rate(prev: &WireInterval, last: &WireInterval) -> Option<f64> {
    (prev.write_bound() && last.write_bound() && last.bytes > 0).then(|| last.rate())
}

/// Whether the postcopy switch may pause the guest without first waiting,
/// the guest running, for the destination to apply the `in_flight` bytes
/// already written: when those bytes at `rate` (see [`drain_rate`]; never
/// without it), on top of the pause's `fixed` costs, fit in
/// [`SKIP_DRAIN_SHARE`] of the `limit_ms` downtime limit. They then reach
/// the destination in the pause, whose device state and switch record
/// follow them. On a link far slower than the guest's writes, every
/// millisecond of drain with the guest running is about a megabyte more
/// for postcopy to carry (the drain took 7-28 ms at 1 Gbit/s).
pub(crate) fn skip_drain(
    in_flight: u64,
    rate: Option<f64>,
    fixed: Duration,
    limit_ms: u64,
) -> bool {
    if in_flight == 0 {
        return true;
    }
    let Some(rate) = rate.filter(|r| *r > 0.0) else {
        return false;
    };
    let pause = fixed.as_secs_f64() + in_flight as f64 / rate;
    pause <= limit_ms as f64 / 1e3 * SKIP_DRAIN_SHARE
}

/// What one dirty sync tells about precopy's future.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SyncSample {
    /// Pages of guest memory.
    pub guest_pages: u64,
    /// Pages still to send after the sync.
    pub remaining_pages: u64,
    /// Pages the sync reported that the previous one did not.
    pub new_pages: u64,
    /// Time since the previous sync.
    pub interval: Duration,
    /// Bytes/s precopy sends at (0: not measured yet).
    pub bandwidth: f64,
}

/// The prediction made from one [`SyncSample`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Prediction {
    /// The guest's dirty rate as precopy feels it, pages/s.
    pub dirty_rate: f64,
    /// Share of a round dirtied again while it is sent.
    pub ratio: f64,
    /// Pages precopy would still re-send (infinite: never converges).
    pub resend_pages: f64,
}

impl Prediction {
    /// `None` when the sample cannot tell (link or interval unmeasured).
    pub fn from(s: &SyncSample) -> Option<Prediction> {
        if s.bandwidth <= 0.0 || s.interval.is_zero() || s.guest_pages == 0 {
            return None;
        }
        let dirty_rate = s.new_pages as f64 / s.interval.as_secs_f64();
        let ratio = dirty_rate * PAGE_SIZE as f64 / s.bandwidth;
        let resend_pages = if ratio >= 1.0 {
            f64::INFINITY
        } else {
            s.remaining_pages as f64 * ratio / (1.0 - ratio)
        };
        Some(Prediction {
            dirty_rate,
            ratio,
            resend_pages,
        })
    }

    /// Precopy would re-send at least [`RESEND_SHARE`] of `guest_pages`.
    pub fn wasteful(&self, guest_pages: u64) -> bool {
        self.resend_pages >= guest_pages as f64 * RESEND_SHARE
    }

    /// The guest dirties new pages at least [`FAR_RATIO`] times as fast as
    /// precopy sends them.
    pub fn far_below(&self) -> bool {
        self.ratio >= FAR_RATIO
    }
}

/// Pages set in `fresh` and not in `prev` (per block; a block `prev` lacks
/// counts whole).
pub(crate) fn new_pages(prev: &[DirtyBitmap], fresh: &[DirtyBitmap]) -> u64 {
    fresh
        .iter()
        .enumerate()
        .map(|(b, f)| match prev.get(b).filter(|p| p.len() == f.len()) {
            Some(p) => f
                .words()
                .iter()
                .zip(p.words())
                .map(|(x, y)| u64::from((x & !y).count_ones()))
                .sum(),
            None => f.count(),
        })
        .sum()
}

/// The `auto` rule's state across syncs: the previous harvest and the
/// streak of syncs that predicted a wasteful precopy.
#[derive(Clone, Debug, Default)]
pub(crate) struct AutoSwitch {
    prev: Vec<DirtyBitmap>,
    /// Harvests seen (the first has nothing to be measured against).
    harvests: u64,
    streak: u32,
    /// A sync measured against an earlier harvest found the link far
    /// below the dirty rate ([`Prediction::far_below`]).
    far: bool,
    /// The last sync's prediction.
    last: Option<Prediction>,
}

impl AutoSwitch {
    /// A sync harvested `fresh`, `interval` after the previous one; what
    /// precopy sent so far went at `bandwidth` bytes/s and `remaining` of
    /// `guest_pages` pages are to send after it. Returns the prediction.
    pub fn sync(
        &mut self,
        fresh: &[DirtyBitmap],
        interval: Duration,
        guest_pages: u64,
        remaining: u64,
        bandwidth: f64,
    ) -> Option<Prediction> {
        let s = SyncSample {
            guest_pages,
            remaining_pages: remaining,
            new_pages: new_pages(&self.prev, fresh),
            interval,
            bandwidth,
        };
        self.prev.resize_with(fresh.len(), || DirtyBitmap::new(0));
        for (p, f) in self.prev.iter_mut().zip(fresh) {
            if p.len() == f.len() {
                p.copy_from(f);
            } else {
                *p = f.clone();
            }
        }
        let measured = self.harvests > 0;
        self.harvests += 1;
        self.observe(&s, measured)
    }

    /// Counts one sample into the streak; `measured`: its new pages were
    /// counted against an earlier harvest.
    fn observe(&mut self, s: &SyncSample, measured: bool) -> Option<Prediction> {
        let p = Prediction::from(s);
        match p {
            Some(p) if p.wasteful(s.guest_pages) => {
                self.streak += 1;
                self.far |= measured && p.far_below();
            }
            Some(_) => self.streak = 0,
            // Nothing measured: the streak neither grows nor breaks.
            None => {}
        }
        self.last = p;
        p
    }

    /// True once [`STREAK`] syncs in a row predicted a wasteful precopy,
    /// or one sync measured against an earlier harvest found the link far
    /// below the guest's dirty rate.
    pub fn wants_switch(&self) -> bool {
        self.streak >= STREAK || self.far
    }

    /// Harvests seen so far.
    pub fn harvests(&self) -> u64 {
        self.harvests
    }

    /// The last sync's prediction.
    #[allow(dead_code)]
    pub fn last(&self) -> Option<Prediction> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB_PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;
    /// 3 GB/s.
    const BW: f64 = 3e9;
    const PROBE: Duration = PROBE_PERIOD;

    fn sample(new: u64, remaining: u64) -> SyncSample {
        SyncSample {
            guest_pages: GIB_PAGES,
            remaining_pages: remaining,
            new_pages: new,
            interval: PROBE,
            bandwidth: BW,
        }
    }

    /// A harvest with pages `[first, first + n)` set (one 1 GiB block).
    fn harvest(first: u64, n: u64) -> Vec<DirtyBitmap> {
        let mut b = DirtyBitmap::new(GIB_PAGES);
        for p in first..first + n {
            b.set(p % GIB_PAGES);
        }
        vec![b]
    }

    #[test]
    fn a_writer_sweeping_all_memory_at_a_third_of_the_link_switches_at_the_second_probe() {
        // 1 GiB guest writing 262144 pages/s (~1 GB/s) in order; the bulk
        // stage sends 3 GB/s.
        let per_probe = (GIB_PAGES as f64 * PROBE.as_secs_f64()) as u64;
        let mut a = AutoSwitch::default();
        let mut writer = 5000;
        let mut switched_at = None;
        for k in 1..=4u64 {
            let fresh = harvest(writer, per_probe);
            writer += per_probe;
            let sent = 36_600 * k;
            let p = a
                .sync(&fresh, PROBE, GIB_PAGES, GIB_PAGES - sent, BW)
                .unwrap();
            assert!(
                (p.dirty_rate / GIB_PAGES as f64 - 1.0).abs() < 0.01,
                "{p:?}"
            );
            assert!((p.ratio - 0.358).abs() < 0.01, "{p:?}");
            if a.wants_switch() && switched_at.is_none() {
                switched_at = Some(k);
            }
        }
        assert_eq!(switched_at, Some(2));
    }

    #[test]
    fn a_dirty_rate_above_the_link_never_converges() {
        // 2x the link's pages per second.
        let link_pages = BW / PAGE_SIZE as f64 * PROBE.as_secs_f64();
        let p = Prediction::from(&sample((2.0 * link_pages) as u64, 10)).unwrap();
        assert!((p.ratio - 2.0).abs() < 1e-3, "{p:?}");
        assert!(p.resend_pages.is_infinite());
        assert!(p.wasteful(GIB_PAGES));
    }

    #[test]
    fn the_predicted_resend_is_the_geometric_sum_of_rounds() {
        // ρ = 0.5: R·ρ/(1-ρ) = R.
        let link_pages = BW / PAGE_SIZE as f64 * PROBE.as_secs_f64();
        let p = Prediction::from(&sample((0.5 * link_pages) as u64, 1000)).unwrap();
        assert!((p.ratio - 0.5).abs() < 1e-3, "{p:?}");
        assert!((p.resend_pages - 1000.0).abs() < 5.0, "{p:?}");
        // 1000 pages are far from an eighth of 1 GiB...
        assert!(!p.wasteful(GIB_PAGES));
        // ...half of it is not.
        let p = Prediction::from(&sample((0.5 * link_pages) as u64, GIB_PAGES / 2)).unwrap();
        assert!(p.wasteful(GIB_PAGES));
    }

    #[test]
    fn an_idle_or_slow_guest_stays_in_precopy() {
        let mut a = AutoSwitch::default();
        for k in 0..20 {
            // 50 new pages per 20 ms probe: 10 MB/s against 3 GB/s.
            let fresh = harvest(k * 50, 50);
            a.sync(&fresh, PROBE, GIB_PAGES, GIB_PAGES / 2, BW);
            assert!(!a.wants_switch(), "{:?}", a.last());
        }
    }

    #[test]
    fn a_hot_set_counts_once_and_does_not_switch() {
        // A 100 MB region rewritten every 10 ms: every probe reports all
        // of it; only the first sees it as new.
        let hot = 25_600;
        let mut a = AutoSwitch::default();
        let p = a
            .sync(&harvest(1000, hot), PROBE, GIB_PAGES, GIB_PAGES, BW)
            .unwrap();
        assert!(p.wasteful(GIB_PAGES), "{p:?}");
        for k in 2..20 {
            let p = a
                .sync(&harvest(1000, hot), PROBE, GIB_PAGES, GIB_PAGES, BW)
                .unwrap();
            assert_eq!(p.dirty_rate, 0.0, "sync {k}");
            assert!(!a.wants_switch(), "sync {k}: {p:?}");
        }
    }

    #[test]
    fn nothing_is_predicted_before_the_link_is_measured() {
        let mut a = AutoSwitch {
            streak: 1,
            ..AutoSwitch::default()
        };
        let fresh = harvest(0, 10_000);
        assert_eq!(a.sync(&fresh, PROBE, GIB_PAGES, GIB_PAGES, 0.0), None);
        assert_eq!(
            a.sync(&fresh, Duration::ZERO, GIB_PAGES, GIB_PAGES, BW),
            None
        );
        // Unknown: the streak is kept as it was.
        assert_eq!(a.streak, 1);
        assert!(!a.wants_switch());
    }

    #[test]
    fn the_streak_breaks_on_a_sync_that_predicts_convergence() {
        let mut a = AutoSwitch::default();
        let fast = sample(20_000, GIB_PAGES / 2);
        let calm = sample(0, GIB_PAGES / 2);
        a.observe(&fast, false);
        assert!(!a.wants_switch());
        a.observe(&calm, false);
        a.observe(&fast, false);
        assert!(!a.wants_switch());
        a.observe(&fast, false);
        assert!(a.wants_switch());
    }

    /// 1 Gbit/s as precopy measures it (bytes written per second).
    const GBIT: f64 = 117e6;

    /// `k` probes of a writer sweeping `per_probe` pages per probe from
    /// page 5000 on a link of `bw` bytes/s: the probe (1-based) at which
    /// the rule first wants the switch.
    fn first_switch(per_probe: u64, bw: f64, probes: u64) -> Option<u64> {
        let mut a = AutoSwitch::default();
        let mut writer = 5000;
        for k in 1..=probes {
            let fresh = harvest(writer, per_probe);
            writer += per_probe;
            let sent = (bw * PROBE.as_secs_f64() * k as f64) as u64 / PAGE_SIZE as u64;
            a.sync(&fresh, PROBE, GIB_PAGES, GIB_PAGES - sent, bw);
            if a.wants_switch() {
                return Some(k);
            }
        }
        None
    }

    #[test]
    fn a_sweep_far_faster_than_the_link_switches_at_the_first_measured_probe() {
        // 1 GiB/s of new pages over 1 Gbit/s: ρ ≈ 9. The first harvest has
        // nothing before it and never decides alone; the second does.
        let per_probe = (GIB_PAGES as f64 * PROBE.as_secs_f64()) as u64;
        let mut a = AutoSwitch::default();
        let p = a
            .sync(&harvest(5000, per_probe), PROBE, GIB_PAGES, GIB_PAGES, GBIT)
            .unwrap();
        assert!(p.far_below(), "{p:?}");
        assert!(!a.wants_switch(), "a first harvest alone: {p:?}");
        let p = a
            .sync(
                &harvest(5000 + per_probe, per_probe),
                PROBE,
                GIB_PAGES,
                GIB_PAGES,
                GBIT,
            )
            .unwrap();
        assert!((p.ratio - 9.18).abs() < 0.05, "{p:?}");
        assert!(a.wants_switch(), "{p:?}");
        assert_eq!(first_switch(per_probe, GBIT, 5), Some(2));
    }

    #[test]
    fn the_same_sweep_on_a_fast_link_still_needs_two_wasteful_probes() {
        // Loopback (3 GB/s, ρ ≈ 0.36): the streak rule, as before.
        let per_probe = (GIB_PAGES as f64 * PROBE.as_secs_f64()) as u64;
        assert_eq!(first_switch(per_probe, BW, 5), Some(2));
        // 10 Gbit/s as measured (1.17 GB/s, ρ ≈ 0.92): not far below.
        let mut a = AutoSwitch::default();
        for k in 0..2 {
            let fresh = harvest(5000 + k * per_probe, per_probe);
            let p = a.sync(&fresh, PROBE, GIB_PAGES, GIB_PAGES, 1.17e9).unwrap();
            assert!(!p.far_below(), "{p:?}");
        }
        assert!(a.wants_switch(), "{:?}", a.last());
    }

    #[test]
    fn a_ratio_between_one_and_far_needs_the_streak() {
        // ρ = 1.5: precopy cannot converge, but one sync is not enough.
        let link_pages = BW / PAGE_SIZE as f64 * PROBE.as_secs_f64();
        let per_probe = (1.5 * link_pages) as u64;
        let mut a = AutoSwitch::default();
        // A calm first harvest, then the fast ones.
        a.sync(&harvest(0, 10), PROBE, GIB_PAGES, GIB_PAGES, BW);
        let p = a
            .sync(&harvest(100, per_probe), PROBE, GIB_PAGES, GIB_PAGES, BW)
            .unwrap();
        assert!((p.ratio - 1.5).abs() < 0.01, "{p:?}");
        assert!(!p.far_below() && !a.wants_switch(), "{p:?}");
        a.sync(
            &harvest(100 + per_probe, per_probe),
            PROBE,
            GIB_PAGES,
            GIB_PAGES,
            BW,
        );
        assert!(a.wants_switch(), "{:?}", a.last());
    }

    #[test]
    fn a_hot_set_far_above_the_link_does_not_switch() {
        // 100 MB rewritten again and again on a 1 Gbit/s link: the first
        // harvest looks far above it, the later ones see nothing new.
        let hot = 25_600;
        let mut a = AutoSwitch::default();
        for k in 1..20 {
            let p = a
                .sync(&harvest(1000, hot), PROBE, GIB_PAGES, GIB_PAGES, GBIT)
                .unwrap();
            assert!(!a.wants_switch(), "sync {k}: {p:?}");
        }
    }

    #[test]
    fn a_far_sample_before_the_link_is_measured_decides_nothing() {
        // No bandwidth yet (nothing sent): no prediction, whatever the
        // guest dirtied, and the next sync is still the first measured one.
        let mut a = AutoSwitch::default();
        let fresh = harvest(0, 50_000);
        assert_eq!(a.sync(&fresh, PROBE, GIB_PAGES, GIB_PAGES, 0.0), None);
        assert!(!a.wants_switch());
        let p = a
            .sync(&harvest(50_000, 50_000), PROBE, GIB_PAGES, GIB_PAGES, GBIT)
            .unwrap();
        assert!(p.far_below(), "{p:?}");
        assert!(a.wants_switch());
    }

    fn interval(ms: u64, bytes: u64, in_write_ms: u64) -> WireInterval {
        WireInterval {
            wall: Duration::from_millis(ms),
            bytes,
            in_write: Duration::from_millis(in_write_ms),
        }
    }

    #[test]
    fn the_drain_rate_needs_two_write_bound_intervals() {
        // 1 Gbit/s: 1.17 MB in 10 ms, 9 of them inside write.
        let link = interval(10, 1_170_000, 9);
        let r = drain_rate(&link, &link).unwrap();
        assert!((r - 117e6).abs() < 1.0, "{r}");
        // A first interval that filled the socket buffer at memcpy speed
        // (4 MB in 2 ms, 0.5 ms in write): the next one's rate may still
        // hold part of the fill, so nothing is known.
        let fill = interval(2, 4_000_000, 0);
        assert_eq!(drain_rate(&fill, &link), None);
        // A sender that never waited on the link (CPU-bound): unknown.
        let cpu = interval(10, 20_000_000, 2);
        assert_eq!(drain_rate(&link, &cpu), None);
        assert_eq!(drain_rate(&cpu, &cpu), None);
        // Nothing written: nothing measured.
        assert_eq!(drain_rate(&link, &interval(10, 0, 10)), None);
        assert_eq!(drain_rate(&link, &interval(0, 10, 0)), None);
    }

    #[test]
    fn the_drain_is_skipped_only_when_the_bytes_in_flight_fit_the_limit() {
        let fixed = Duration::from_millis(5);
        let gbit = Some(117e6);
        // 3 MB in flight at 1 Gbit/s: ~26 ms + 5 ms fit a quarter of
        // 300 ms...
        assert!(skip_drain(3_000_000, gbit, fixed, 300));
        // ...not a quarter of 30 ms.
        assert!(!skip_drain(3_000_000, gbit, fixed, 30));
        // 10 MB (85 ms) do not fit 75 ms.
        assert!(!skip_drain(10_000_000, gbit, fixed, 300));
        // On loopback (1 GB/s): 1 MB + 5 ms fit 7.5 ms, 3 MB do not.
        assert!(skip_drain(1_000_000, Some(1e9), fixed, 30));
        assert!(!skip_drain(3_000_000, Some(1e9), fixed, 30));
        // The same 3 MB over 100 Mbit/s: 240 ms.
        assert!(!skip_drain(3_000_000, Some(12.5e6), fixed, 300));
        // No measured rate: never skipped (unless nothing is in flight).
        assert!(!skip_drain(1, None, Duration::ZERO, 10_000));
        assert!(!skip_drain(1, Some(0.0), Duration::ZERO, 10_000));
        assert!(skip_drain(0, None, fixed, 30));
        // Fixed costs that alone exceed the share: not skipped.
        assert!(!skip_drain(1000, gbit, Duration::from_millis(80), 300));
    }

    #[test]
    fn new_pages_are_those_the_previous_harvest_lacks() {
        let prev = harvest(0, 100);
        let fresh = harvest(50, 100);
        assert_eq!(new_pages(&prev, &fresh), 50);
        // No previous harvest: all of it.
        assert_eq!(new_pages(&[], &fresh), 100);
        // A block whose size changed counts whole.
        let other = vec![DirtyBitmap::new(64)];
        assert_eq!(new_pages(&other, &fresh), 100);
    }
}
