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
//! the previous sync.

/// The set grows slower than this share of the bandwidth: a round shrinks
/// it at least fourfold.
const SHRINK_SHARE: f64 = 0.25;

/// What is left is small when it takes at most this long to send (ms) ...
const SMALL_MS: f64 = 5.0;

/// ... or at most this share of the downtime limit, when that is shorter.
const SMALL_SHARE_OF_LIMIT: f64 = 0.25;

/// Pages a sync added to the set left, per second: `before` and `after`
/// the sync (pages), `secs` since the previous sync.
pub(super) fn growth_rate(before: u64, after: u64, secs: f64) -> f64 {
    after.saturating_sub(before) as f64 / secs.max(1e-3)
}

/// True when precopy should send on rather than pause, although the pause
/// fits: the set left (`remaining_bytes`) is not small at `bandwidth`
/// bytes/s, and the last measured growth (`growth_bytes_per_sec`; `None`:
/// not measured since precopy began, then stop as the plain rule says) is
/// well below the bandwidth.
pub(super) fn keep_sending(
    remaining_bytes: u64,
    growth_bytes_per_sec: Option<f64>,
    bandwidth: f64,
    limit_ms: u64,
) -> bool {
    let Some(growth) = growth_bytes_per_sec else {
        return false;
    };
    if bandwidth <= 0.0 || remaining_bytes == 0 {
        return false;
    }
    let small_ms = SMALL_MS.min(limit_ms as f64 * SMALL_SHARE_OF_LIMIT);
    let left_ms = remaining_bytes as f64 / bandwidth * 1e3;
    left_ms > small_ms && growth < bandwidth * SHRINK_SHARE
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GBS: f64 = 1e9;

    #[test]
    fn an_idle_guest_with_much_left_sends_on() {
        // 31 MiB left at 1 GB/s (~33 ms, fits 300 ms), nothing added.
        assert!(keep_sending(31 * MIB, Some(0.0), GBS, 300));
        // A slow writer: 10 MB/s against 1 GB/s.
        assert!(keep_sending(31 * MIB, Some(10e6), GBS, 300));
    }

    #[test]
    fn a_busy_guest_stops_as_the_plain_rule_says() {
        // Adds half the bandwidth: a round would not shrink the set much.
        assert!(!keep_sending(31 * MIB, Some(0.5 * GBS), GBS, 300));
        assert!(!keep_sending(31 * MIB, Some(2.0 * GBS), GBS, 300));
    }

    #[test]
    fn small_or_unmeasured_stops() {
        // 4 MiB at 1 GB/s: ~4 ms, under 5 ms.
        assert!(!keep_sending(4 * MIB, Some(0.0), GBS, 300));
        // Under a tight limit the bar is a quarter of it (10 ms: 2.5 ms):
        // 2 MiB (~2.1 ms) is small, 3 MiB (~3.1 ms) is not.
        assert!(!keep_sending(2 * MIB, Some(0.0), GBS, 10));
        assert!(keep_sending(3 * MIB, Some(0.0), GBS, 10));
        assert!(!keep_sending(0, Some(0.0), GBS, 300));
        assert!(!keep_sending(31 * MIB, None, GBS, 300));
        assert!(!keep_sending(31 * MIB, Some(0.0), 0.0, 300));
    }

    #[test]
    fn growth_counts_only_added_pages() {
        assert_eq!(growth_rate(100, 100, 1.0), 0.0);
        assert_eq!(growth_rate(100, 40, 1.0), 0.0, "the set shrank");
        assert_eq!(growth_rate(100, 300, 0.5), 400.0);
        assert!(growth_rate(0, 10, 0.0).is_finite());
    }
}
