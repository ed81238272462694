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

/// The set grows slower than this share of the bandwidth: a round shrinks
/// it at least fourfold.
const SHRINK_SHARE: f64 = 0.25;

/// What is left is small when it takes at most this long to send (ms) ...
const SMALL_MS: f64 = 5.0;

/// ... or at most this share of the downtime limit, when that is shorter.
const SMALL_SHARE_OF_LIMIT: f64 = 0.25;

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

    #[test]
    fn growth_counts_only_added_pages() {
        assert_eq!(growth_rate(100, 100, 1.0), 0.0);
        assert_eq!(growth_rate(100, 40, 1.0), 0.0, "the set shrank");
        assert_eq!(growth_rate(100, 300, 0.5), 400.0);
        assert!(growth_rate(0, 10, 0.0).is_finite());
    }
}
