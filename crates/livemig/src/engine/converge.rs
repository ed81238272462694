//! Whether precopy is converging, as the stats tell an operator: the rate
//! the guest dirties memory at against the rate the link sends it, and
//! the time the pages left would take to shrink to what the pause allows.
//!
//! Precopy converges only while it sends faster than the guest dirties:
//! the set left then shrinks at (send − dirty) bytes/s. A guest that
//! dirties as fast as the link sends, or faster, never leaves a set small
//! enough for the downtime limit; the operator's ways out are to slow the
//! guest (auto-converge, a dirty limit) or to finish in postcopy.

use super::stats::Convergence;

/// Syncs in a row that did not shrink the set left by a tenth, after which
/// precopy is reported as not converging whatever the rates say (their
/// period may hide a guest that outruns the link).
pub(super) const STALLED_SYNCS: u32 = 3;

/// What one measuring period says.
#[derive(Clone, Copy, Debug)]
pub(super) struct Period {
    /// Bytes the guest dirtied per second (pages the syncs reported).
    pub dirty_rate: f64,
    /// Bytes sent per second over the same period.
    pub send_rate: f64,
    /// Bytes left to send now.
    pub remaining: u64,
    /// Bytes the downtime limit lets the pause send at the link's rate.
    pub pause_budget: u64,
    /// Consecutive syncs without progress.
    pub stalled_syncs: u32,
}

/// The convergence figures of `p`.
pub(super) fn assess(p: Period) -> Convergence {
    let net = p.send_rate - p.dirty_rate;
    let excess = p.remaining.saturating_sub(p.pause_budget);
    let projected_ms = if excess == 0 {
        Some(0)
    } else if net > 0.0 {
        Some((excess as f64 / net * 1e3).min(u64::MAX as f64 / 2.0) as u64)
    } else {
        None
    };
    Convergence {
        converging: projected_ms.is_some() && p.stalled_syncs < STALLED_SYNCS,
        dirty_rate: p.dirty_rate.max(0.0) as u64,
        send_rate: p.send_rate.max(0.0) as u64,
        stalled_syncs: p.stalled_syncs,
        projected_ms,
    }
}

impl Convergence {
    /// One line for a log or a progress display.
    pub fn describe(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        if self.converging {
            format!(
                "converging: dirty {:.0} MB/s, sent {:.0} MB/s, switch-over in about {} ms",
                mb(self.dirty_rate),
                mb(self.send_rate),
                self.projected_ms.unwrap_or(0)
            )
        } else {
            format!(
                "NOT converging: the guest dirties {:.0} MB/s, the link sends {:.0} MB/s{}; \
                 enable auto-converge or postcopy, or raise the downtime limit or the bandwidth",
                mb(self.dirty_rate),
                mb(self.send_rate),
                if self.stalled_syncs >= STALLED_SYNCS {
                    format!(", {} syncs without progress", self.stalled_syncs)
                } else {
                    String::new()
                }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(dirty: f64, send: f64, remaining: u64, stalls: u32) -> Period {
        Period {
            dirty_rate: dirty,
            send_rate: send,
            remaining,
            pause_budget: 100 << 20,
            stalled_syncs: stalls,
        }
    }

    #[test]
    fn a_link_faster_than_the_guest_projects_the_switch_over() {
        // 1 GiB left, 100 MiB fit the pause, the set shrinks at 1e9 B/s.
        let c = assess(period(0.5e9, 1.5e9, 1 << 30, 0));
        assert!(c.converging);
        assert_eq!((c.dirty_rate, c.send_rate), (500_000_000, 1_500_000_000));
        let want = ((1u64 << 30) - (100 << 20)) as f64 / 1e9 * 1e3;
        assert_eq!(c.projected_ms, Some(want as u64));
        assert!(c.describe().starts_with("converging"), "{}", c.describe());
        // What fits the pause already needs no time.
        assert_eq!(assess(period(2e9, 1e9, 50 << 20, 0)).projected_ms, Some(0));
    }

    #[test]
    fn a_guest_as_fast_as_the_link_does_not_converge() {
        for dirty in [1.17e9, 2e9] {
            let c = assess(period(dirty, 1.17e9, 1 << 30, 0));
            assert!(!c.converging);
            assert_eq!(c.projected_ms, None);
            let d = c.describe();
            assert!(
                d.contains("NOT converging") && d.contains("auto-converge or postcopy"),
                "{d}"
            );
            assert!(
                d.contains(&format!("dirties {:.0} MB/s", dirty / 1e6)),
                "{d}"
            );
        }
    }

    #[test]
    fn syncs_without_progress_override_rates_that_look_fine() {
        let c = assess(period(0.5e9, 1.5e9, 1 << 30, STALLED_SYNCS));
        assert!(!c.converging);
        assert!(c.projected_ms.is_some());
        assert!(c.describe().contains("3 syncs without progress"));
        assert!(assess(period(0.5e9, 1.5e9, 1 << 30, STALLED_SYNCS - 1)).converging);
    }
}
