//! Whether precopy should keep going although the pause would fit.
//!
//! The switch-over rule alone ("what is left fits the downtime limit at the
//! measured bandwidth") stops as early as it may: a guest that hardly
//! writes (a VM that filled its memory and now idles) is paused with tens
//! of MiB still to send, which then go out while it waits, at the same
//! speed as they would have gone out live. While the set left shrinks fast
//! (the guest adds pages far slower than the link sends them), sending on
//! live costs nearly nothing more and leaves a pause of little more than
//! its fixed costs; once a round would not shrink the set much, or it is
//! already small, stopping is right.
//!
//! The growth rate is measured at syncs: the pages a sync added to the set
//! (not those it reported again while still unsent) over the time since
//! the previous sync. It is held against what the link really carried over
//! that same interval, not only against the link's measured bandwidth: on
//! a host where the guest's vCPUs take the CPU the sender needs, a round
//! may move little more than the guest dirties, and the set then stops
//! shrinking although it grows "slowly" against the bandwidth measured
//! earlier (a `demo` that sent on live for seconds).
//!
//! **Syncs tied to progress** ([`sync_due`]). A switch-over sync is made
//! when the pause would fit with what is left; with nothing left that is
//! always so. When the sync then finds a set that does not fit, precopy
//! sends it and, finding nothing left, syncs again at once. While that
//! shrinks the set (the guest adds fewer pages than the link sends in the
//! same time) it converges, as it should. But when the set a sync finds
//! stays the same size (a guest that adds pages as fast as the loop sends
//! them, and a pause estimate that will not take that set: a stale slow
//! bandwidth period, a vCPU stop measured slow), each round is a copy of
//! the last, microseconds apart: one run of the incrementer at 30 ms made
//! 722 syncs this way, sending ~140 pages between two of them, until the
//! estimate changed. So, after a switch-over sync that did not lead to the
//! pause, the next one comes at once only when it can change the outcome:
//! the set it would find (what is left plus the growth since the last
//! sync) fits the pause, or is clearly smaller than the last one found
//! (progress); otherwise it waits for [`RESYNC_PERIOD`] since the last
//! sync, as QEMU's iteration waits for its step.

/// The set grows slower than this share of the bandwidth: a round shrinks
/// it at least fourfold.
const SHRINK_SHARE: f64 = 0.25;

/// What is left is small when it takes at most this long to send (ms) ...
const SMALL_MS: f64 = 5.0;

/// ... or at most this share of the downtime limit, when that is shorter.
const SMALL_SHARE_OF_LIMIT: f64 = 0.25;

/// Without progress, a switch-over sync comes at most this often.
pub(super) const RESYNC_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);

/// What [`sync_due`] knows about the last switch-over sync and now.
#[derive(Clone, Copy, Debug)]
pub(super) struct SyncState {
    /// Pages left now (not yet sent).
    pub left: u64,
    /// Pages the set left grew by per second at the last switch-over sync
    /// (`None`: none since precopy began).
    pub growth_pages_per_sec: Option<f64>,
    /// Time since the last sync, seconds.
    pub since: f64,
    /// Pages the last switch-over sync that did not lead to the pause
    /// left (`None`: none yet).
    pub last_found: Option<u64>,
}

/// Whether a switch-over sync is worth making now (the pause would fit
/// with what is left, which the caller checked): see the module doc.
/// `fits(pages)` says whether a pause with that many pages left fits.
pub(super) fn sync_due(s: SyncState, fits: impl Fn(u64) -> bool) -> bool {
    let (Some(last), Some(growth)) = (s.last_found, s.growth_pages_per_sec) else {
        return true;
    };
    if s.since >= RESYNC_PERIOD.as_secs_f64() {
        return true;
    }
    let expected = s.left.saturating_add((growth.max(0.0) * s.since) as u64);
    // Progress: at least a tenth fewer pages than the last sync found.
    fits(expected) || expected.saturating_mul(10) < last.saturating_mul(9)
}

/// What a switch-over sync measured over the interval since the previous
/// sync, in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Rates {
    /// Bytes the sync added to the set left (see [`growth_rate`]).
    pub(super) growth: f64,
    /// Bytes the link carried over the same interval.
    pub(super) sent: f64,
}

/// Pages a sync added to the set left, per second: `before` and `after`
/// the sync (pages), `secs` since the previous sync.
pub(super) fn growth_rate(before: u64, after: u64, secs: f64) -> f64 {
    after.saturating_sub(before) as f64 / secs.max(1e-3)
}

/// True when precopy should send on rather than pause, although the pause
/// fits: the set left (`remaining_bytes`) is not small at `bandwidth`
/// bytes/s, and the last measured growth (`rates`; `None`: not measured
/// since precopy began, then stop as the plain rule says) is well below
/// both the bandwidth and what the link carried while the set grew.
pub(super) fn keep_sending(
    remaining_bytes: u64,
    rates: Option<Rates>,
    bandwidth: f64,
    limit_ms: u64,
) -> bool {
    let Some(rates) = rates else {
        return false;
    };
    if bandwidth <= 0.0 || remaining_bytes == 0 {
        return false;
    }
    let small_ms = SMALL_MS.min(limit_ms as f64 * SMALL_SHARE_OF_LIMIT);
    let left_ms = remaining_bytes as f64 / bandwidth * 1e3;
    let carried = bandwidth.min(rates.sent);
    left_ms > small_ms && rates.growth < carried * SHRINK_SHARE
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GBS: f64 = 1e9;

    /// Growth `g` while the link carried the full 1 GB/s.
    fn at_full_rate(g: f64) -> Option<Rates> {
        Some(Rates {
            growth: g,
            sent: GBS,
        })
    }

    #[test]
    fn an_idle_guest_with_much_left_sends_on() {
        // 31 MiB left at 1 GB/s (~33 ms, fits 300 ms), nothing added.
        assert!(keep_sending(31 * MIB, at_full_rate(0.0), GBS, 300));
        // A slow writer: 10 MB/s against 1 GB/s.
        assert!(keep_sending(31 * MIB, at_full_rate(10e6), GBS, 300));
    }

    #[test]
    fn a_busy_guest_stops_as_the_plain_rule_says() {
        // Adds half the bandwidth: a round would not shrink the set much.
        assert!(!keep_sending(31 * MIB, at_full_rate(0.5 * GBS), GBS, 300));
        assert!(!keep_sending(31 * MIB, at_full_rate(2.0 * GBS), GBS, 300));
    }

    #[test]
    fn small_or_unmeasured_stops() {
        // 4 MiB at 1 GB/s: ~4 ms, under 5 ms.
        assert!(!keep_sending(4 * MIB, at_full_rate(0.0), GBS, 300));
        // Under a tight limit the bar is a quarter of it (10 ms: 2.5 ms):
        // 2 MiB (~2.1 ms) is small, 3 MiB (~3.1 ms) is not.
        assert!(!keep_sending(2 * MIB, at_full_rate(0.0), GBS, 10));
        assert!(keep_sending(3 * MIB, at_full_rate(0.0), GBS, 10));
        assert!(!keep_sending(0, at_full_rate(0.0), GBS, 300));
        assert!(!keep_sending(31 * MIB, None, GBS, 300));
        assert!(!keep_sending(31 * MIB, at_full_rate(0.0), 0.0, 300));
    }

    #[test]
    fn a_round_that_carries_little_more_than_the_guest_writes_stops() {
        // The guest adds 460 MB/s: under a quarter of the 2 GB/s measured
        // earlier, but the last round carried only 500 MB/s (the vCPUs
        // took the sender's CPU), so the set is not shrinking.
        let starved = Some(Rates {
            growth: 460e6,
            sent: 500e6,
        });
        assert!(!keep_sending(300 * MIB, starved, 2.0 * GBS, 300));
        // The same growth while the round carried the full 2 GB/s.
        let fed = Some(Rates {
            growth: 460e6,
            sent: 2.0 * GBS,
        });
        assert!(keep_sending(300 * MIB, fed, 2.0 * GBS, 300));
        // Nothing carried since the previous sync: no evidence of shrinking.
        let idle_link = Some(Rates {
            growth: 0.0,
            sent: 0.0,
        });
        assert!(!keep_sending(300 * MIB, idle_link, 2.0 * GBS, 300));
    }

    /// The loop seen at 30 ms: each sync finds ~140 pages (the guest adds
    /// ~175 k pages/s, a round takes ~0.8 ms) and the estimate will not
    /// take more than 100: syncing again at once cannot change that.
    #[test]
    fn a_sync_that_cannot_change_the_outcome_waits_for_the_period() {
        let fits = |pages: u64| pages <= 100;
        let looping = SyncState {
            left: 0,
            growth_pages_per_sec: Some(175_000.0),
            since: 0.0008,
            last_found: Some(140),
        };
        assert!(!sync_due(looping, fits));
        // Still not due a little later (the set only grows meanwhile) ...
        let later = SyncState {
            since: 0.030,
            ..looping
        };
        assert!(!sync_due(later, fits));
        // ... and due once the period has passed.
        let period = SyncState {
            since: RESYNC_PERIOD.as_secs_f64(),
            ..looping
        };
        assert!(sync_due(period, fits));
        // An estimate that now takes the set: at once.
        assert!(sync_due(looping, |pages| pages <= 200));
    }

    #[test]
    fn a_shrinking_set_syncs_at_once() {
        let never = |_: u64| false;
        // The last sync found 10 000 pages; sending them took 20 ms, in
        // which the guest added ~3 000: progress, sync again now.
        let converging = SyncState {
            left: 0,
            growth_pages_per_sec: Some(150_000.0),
            since: 0.020,
            last_found: Some(10_000),
        };
        assert!(sync_due(converging, never));
        // About as many as last time (within a tenth): no progress.
        let stalled = SyncState {
            growth_pages_per_sec: Some(480_000.0),
            ..converging
        };
        assert!(!sync_due(stalled, never));
        // Pages still left count too.
        let with_left = SyncState {
            left: 6_000,
            ..converging
        };
        assert!(!sync_due(with_left, never));
    }

    #[test]
    fn the_first_switch_over_sync_is_always_due() {
        let never = |_: u64| false;
        let s = SyncState {
            left: 0,
            growth_pages_per_sec: None,
            since: 0.0,
            last_found: None,
        };
        assert!(sync_due(s, never));
        assert!(sync_due(
            SyncState {
                growth_pages_per_sec: Some(1e6),
                ..s
            },
            never
        ));
        assert!(sync_due(
            SyncState {
                last_found: Some(5),
                ..s
            },
            never
        ));
    }

    #[test]
    fn growth_counts_only_added_pages() {
        assert_eq!(growth_rate(100, 100, 1.0), 0.0);
        assert_eq!(growth_rate(100, 40, 1.0), 0.0, "the set shrank");
        assert_eq!(growth_rate(100, 300, 0.5), 400.0);
        assert!(growth_rate(0, 10, 0.0).is_finite());
    }
}
