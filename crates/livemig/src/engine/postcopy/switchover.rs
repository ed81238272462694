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
//! - the **re-dirty rate**: pages the sync reported that had been sent
//!   since their last write (`redirtied`, the bits that became set again),
//!   over the *exposure* since the previous sync: the integral over time
//!   of the clean pages (sent, not written since), in page-seconds. That
//!   is the chance per second that a clean page is written; times the
//!   guest's pages it is the guest's dirty rate `r` (pages/s) as precopy
//!   feels it, measured on the pages already sent, so it can be known
//!   early in the first pass;
//! - the share of a round the guest dirties again: `ρ = r · 4 KiB / B`,
//!   with `B` the conservative bandwidth (the lowest recent period);
//! - what precopy would still re-send before the remaining set `R` is
//!   gone: `R·ρ + R·ρ² + … = R·ρ / (1 − ρ)` pages (unbounded when
//!   `ρ ≥ 1`: precopy cannot converge).
//!
//! **Rule**: `auto` switches when the predicted re-send is at least
//! [`RESEND_SHARE`] of guest memory at [`STREAK`] syncs in a row. A
//! working set that saturates (a hot region rewritten again and again)
//! shows a burst of re-dirtied pages at one sync and none at the next (its
//! pages stay to send), so it takes two syncs that agree. To measure early,
//! an `auto` source syncs every [`PROBE_PERIOD`] during the first pass
//! (bulk stage), where precopy alone syncs only near the pass's end. This
//! extends "precopy stops making progress" (the remaining set does not
//! shrink over a sync, checked after the first pass) to "precopy's progress
//! is predicted to cost more than an eighth of memory again"; the check at
//! stop-and-copy time (the pause would not fit the downtime limit) is
//! unchanged.

use std::time::Duration;

use crate::memory::PAGE_SIZE;

/// How often an `auto` source syncs during the first pass, to measure the
/// guest's dirty rate early.
pub(crate) const PROBE_PERIOD: Duration = Duration::from_millis(50);
/// `auto` switches when precopy is predicted to re-send at least this share
/// of guest memory.
pub(crate) const RESEND_SHARE: f64 = 1.0 / 8.0;
/// Consecutive syncs that must predict it.
pub(crate) const STREAK: u32 = 2;

/// What one dirty sync tells about precopy's future.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SyncSample {
    /// Pages of guest memory.
    pub guest_pages: u64,
    /// Pages still to send after the sync.
    pub remaining_pages: u64,
    /// Pages the sync reported that had been sent since their last write.
    pub redirtied_pages: u64,
    /// Clean pages integrated over the time since the previous sync,
    /// page-seconds.
    pub exposure: f64,
    /// Conservative link bandwidth, bytes/s (0: not measured yet).
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
    /// `None` when the sample cannot tell (link or exposure unmeasured).
    pub fn from(s: &SyncSample) -> Option<Prediction> {
        if s.bandwidth <= 0.0 || s.exposure <= 0.0 || s.guest_pages == 0 {
            return None;
        }
        let dirty_rate = s.redirtied_pages as f64 / s.exposure * s.guest_pages as f64;
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
}

/// The `auto` rule's state across syncs: the exposure integral and the
/// streak of syncs that predicted a wasteful precopy.
#[derive(Clone, Debug, Default)]
pub(crate) struct AutoSwitch {
    /// Page-seconds of clean pages since the last sync.
    exposure: f64,
    /// Clean pages at the last tick.
    clean: u64,
    streak: u32,
    /// The last sync's prediction.
    last: Option<Prediction>,
}

impl AutoSwitch {
    /// `dt` passed with `clean` pages clean at its end (trapezoid with the
    /// previous tick's count).
    pub fn tick(&mut self, dt: Duration, clean: u64) {
        self.exposure += dt.as_secs_f64() * (self.clean + clean) as f64 / 2.0;
        self.clean = clean;
    }

    /// A sync reported `redirtied` pages that had been sent; `remaining`
    /// pages are to send after it (`clean` of `guest_pages` are clean).
    /// Starts a new exposure period. Returns the prediction, if any.
    pub fn sync(
        &mut self,
        guest_pages: u64,
        remaining: u64,
        redirtied: u64,
        bandwidth: f64,
    ) -> Option<Prediction> {
        let s = SyncSample {
            guest_pages,
            remaining_pages: remaining,
            redirtied_pages: redirtied,
            exposure: self.exposure,
            bandwidth,
        };
        self.exposure = 0.0;
        self.clean = guest_pages.saturating_sub(remaining);
        let p = Prediction::from(&s);
        match p {
            Some(p) if p.wasteful(guest_pages) => self.streak += 1,
            Some(_) => self.streak = 0,
            // Nothing measured: the streak neither grows nor breaks.
            None => {}
        }
        self.last = p;
        p
    }

    /// True once [`STREAK`] syncs in a row predicted a wasteful precopy.
    pub fn wants_switch(&self) -> bool {
        self.streak >= STREAK
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

    /// Feeds a sync after `secs` during which `clean` pages (constant)
    /// were exposed.
    fn sync_after(a: &mut AutoSwitch, secs: f64, clean: u64, redirtied: u64, remaining: u64) {
        a.clean = clean;
        a.tick(Duration::from_secs_f64(secs), clean);
        a.sync(GIB_PAGES, remaining, redirtied, BW);
    }

    #[test]
    fn a_guest_rewriting_all_memory_at_a_third_of_the_link_is_predicted_early() {
        // 1 GiB guest writing 262144 pages/s (~1 GB/s) uniformly; the bulk
        // stage sends 750k pages/s. After 50 ms: ~37k pages sent.
        let rate = GIB_PAGES as f64; // pages/s
        let mut a = AutoSwitch::default();
        let mut sent = 0u64;
        let mut redirtied_total = 0u64;
        let mut switched_at = None;
        for k in 1..=6 {
            // Exposure over 50 ms while `sent` grows linearly.
            let before = sent;
            sent = (750_000.0 * 0.05 * k as f64) as u64;
            let clean_mid = (before + sent) / 2 - redirtied_total;
            let exposure = clean_mid as f64 * 0.05;
            let redirtied = (rate / GIB_PAGES as f64 * exposure) as u64;
            redirtied_total += redirtied;
            a.clean = before - redirtied_total.min(before);
            a.exposure = exposure;
            let remaining = GIB_PAGES - sent + redirtied_total;
            let p = a.sync(GIB_PAGES, remaining, redirtied, BW).unwrap();
            // The rate is recovered from the sent pages alone.
            assert!((p.dirty_rate / rate - 1.0).abs() < 0.05, "{p:?}");
            if a.wants_switch() && switched_at.is_none() {
                switched_at = Some(k);
            }
        }
        // Two probes agree: switched at the second, ~100 ms into pass 1.
        assert_eq!(switched_at, Some(2));
    }

    #[test]
    fn a_dirty_rate_above_the_link_never_converges() {
        let p = Prediction::from(&SyncSample {
            guest_pages: GIB_PAGES,
            remaining_pages: 10,
            redirtied_pages: 1000,
            exposure: 1000.0 / (BW / PAGE_SIZE as f64 * 2.0) * GIB_PAGES as f64,
            bandwidth: BW,
        })
        .unwrap();
        assert!((p.ratio - 2.0).abs() < 1e-6, "{p:?}");
        assert!(p.resend_pages.is_infinite());
        assert!(p.wasteful(GIB_PAGES));
    }

    #[test]
    fn an_idle_or_slow_guest_stays_in_precopy() {
        let mut a = AutoSwitch::default();
        for _ in 0..10 {
            // 1000 pages/s over 100k clean pages of a 1 GiB guest: ~4 MB/s.
            let clean = 100_000;
            let redirtied = (1000.0 / GIB_PAGES as f64 * clean as f64 * 0.05) as u64;
            sync_after(&mut a, 0.05, clean, redirtied.max(1), GIB_PAGES - clean);
            assert!(!a.wants_switch(), "{:?}", a.last());
        }
    }

    #[test]
    fn a_saturating_hot_set_is_not_taken_for_a_fast_writer() {
        // A 100 MB region rewritten every 10 ms in a 4 GiB guest: the
        // first probe sees all of it re-dirtied (a huge apparent rate),
        // the next ones none (its pages are still to send).
        let guest = 4 * GIB_PAGES;
        let hot = 25_600;
        let mut a = AutoSwitch::default();
        a.tick(Duration::from_millis(50), 37_000);
        let p = a.sync(guest, guest - 37_000 + hot, hot, BW).unwrap();
        assert!(p.wasteful(guest), "{p:?}");
        assert!(!a.wants_switch());
        for k in 2..20u64 {
            let clean = 37_000 * k - hot;
            a.tick(Duration::from_millis(50), clean);
            a.sync(guest, guest - clean, 0, BW);
            assert!(!a.wants_switch(), "sync {k}: {:?}", a.last());
        }
    }

    #[test]
    fn nothing_is_predicted_before_the_link_or_exposure_is_measured() {
        let mut a = AutoSwitch::default();
        // No exposure yet (nothing sent).
        assert_eq!(a.sync(GIB_PAGES, GIB_PAGES, 0, BW), None);
        a.tick(Duration::from_millis(50), 1000);
        // No bandwidth: unknown, and the streak is kept as it was.
        a.streak = 1;
        assert_eq!(a.sync(GIB_PAGES, GIB_PAGES, 500, 0.0), None);
        assert_eq!(a.streak, 1);
    }

    #[test]
    fn the_streak_breaks_on_a_sync_that_predicts_convergence() {
        let mut a = AutoSwitch::default();
        // Wasteful, then calm, then wasteful: no two in a row.
        sync_after(&mut a, 0.05, 100_000, 10_000, GIB_PAGES / 2);
        assert!(!a.wants_switch());
        sync_after(&mut a, 0.05, 100_000, 0, GIB_PAGES / 2);
        assert!(!a.wants_switch());
        sync_after(&mut a, 0.05, 100_000, 10_000, GIB_PAGES / 2);
        assert!(!a.wants_switch());
        sync_after(&mut a, 0.05, 100_000, 10_000, GIB_PAGES / 2);
        assert!(a.wants_switch());
    }

    #[test]
    fn the_predicted_resend_is_the_geometric_sum_of_rounds() {
        // ρ = 0.5: R·ρ/(1-ρ) = R.
        let bw_pages = BW / PAGE_SIZE as f64;
        let p = Prediction::from(&SyncSample {
            guest_pages: GIB_PAGES,
            remaining_pages: 1000,
            redirtied_pages: (bw_pages * 0.5 / GIB_PAGES as f64 * 1e4) as u64,
            exposure: 1e4,
            bandwidth: BW,
        })
        .unwrap();
        assert!((p.ratio - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.resend_pages - 1000.0).abs() < 20.0, "{p:?}");
        // 1000 pages are far from an eighth of 1 GiB.
        assert!(!p.wasteful(GIB_PAGES));
    }
}
