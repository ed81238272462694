//! How busy the guest's vCPUs are, as a migration starts: the source
//! sends it at setup (livemig's `VmControl::vcpu_load`), and an incoming
//! minivm picks the page size it receives into by it (see
//! [`crate::VmConfig::small_pages_when_idle`]).
//!
//! minivm's vCPU threads see the guest's `hlt` (no in-kernel irqchip: a
//! halted vCPU exits, sleeps a millisecond and enters again, so a halted
//! guest exits about every millisecond). A vCPU counts as idle when its
//! latest exits were halts, with no I/O since, and the latest halt is
//! recent ([`FRESH`]: a vCPU woken from `hlt` runs without exiting, and
//! stops producing halts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A halted vCPU is idle as long as its latest halt is this recent.
pub(crate) const FRESH: Duration = Duration::from_millis(50);

/// `since` while the vCPU runs guest code (its latest exit was no halt).
const RUNNING: u64 = u64::MAX;

/// One vCPU's halts, as nanoseconds since the VM's epoch.
#[derive(Debug)]
pub(crate) struct HaltWatch {
    /// When its current run of halt exits began, or [`RUNNING`].
    since: AtomicU64,
    /// Its latest halt exit.
    last: AtomicU64,
}

impl Default for HaltWatch {
    fn default() -> Self {
        HaltWatch {
            since: AtomicU64::new(RUNNING),
            last: AtomicU64::new(0),
        }
    }
}

fn ns(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(RUNNING - 1)
}

impl HaltWatch {
    /// The vCPU exited on `hlt` at `at`.
    pub(crate) fn halted(&self, epoch: Instant, at: Instant) {
        let t = ns(epoch, at);
        if self.since.load(Ordering::Relaxed) == RUNNING {
            self.since.store(t, Ordering::Relaxed);
        }
        self.last.store(t, Ordering::Relaxed);
    }

    /// The vCPU exited for the guest's own work (I/O): it runs.
    pub(crate) fn ran(&self) {
        self.since.store(RUNNING, Ordering::Relaxed);
    }

    /// Whether the vCPU is idle at `now` (see the module's rule).
    pub(crate) fn idle(&self, epoch: Instant, now: Instant) -> bool {
        if self.since.load(Ordering::Relaxed) == RUNNING {
            return false;
        }
        let last = self.last.load(Ordering::Relaxed);
        ns(epoch, now).saturating_sub(last) <= FRESH.as_nanos() as u64
    }
}

/// The load of vCPUs each (idle, active), in hundredths of a vCPU: 100
/// for every active vCPU that is not idle. A vCPU that never runs (an
/// extra vCPU of a boot sector) counts nothing.
pub(crate) fn load(vcpus: impl IntoIterator<Item = (bool, bool)>) -> u32 {
    vcpus
        .into_iter()
        .filter(|&(idle, active)| active && !idle)
        .count() as u32
        * 100
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_vcpu_is_idle_while_it_keeps_halting() {
        let epoch = Instant::now();
        let w = HaltWatch::default();
        assert!(!w.idle(epoch, epoch + 100 * MS), "never halted: running");
        w.halted(epoch, epoch + 100 * MS);
        assert!(w.idle(epoch, epoch + 101 * MS), "halted just now");
        // Halts every millisecond for 20 ms.
        for t in 101..120 {
            w.halted(epoch, epoch + t * MS);
        }
        assert!(w.idle(epoch, epoch + 150 * MS), "halted 31 ms ago");
        assert!(
            !w.idle(epoch, epoch + 200 * MS),
            "no halt for 81 ms: woken up and running"
        );
        // I/O: running, until it halts again.
        w.ran();
        assert!(!w.idle(epoch, epoch + 120 * MS));
        w.halted(epoch, epoch + 130 * MS);
        assert!(w.idle(epoch, epoch + 131 * MS));
    }

    #[test]
    fn load_counts_active_busy_vcpus() {
        assert_eq!(load([]), 0);
        assert_eq!(load([(true, true), (true, true)]), 0);
        assert_eq!(load([(false, true), (true, true)]), 100);
        assert_eq!(load([(false, true), (false, true), (false, false)]), 200);
    }
}
