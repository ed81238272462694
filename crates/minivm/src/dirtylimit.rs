//! Dirty-limit: cap the rate at which each vCPU dirties guest memory.
//!
//! A gentler alternative to auto-converge's throttle (which makes every
//! vCPU sleep the same share of each time slice): only vCPUs that dirty more
//! than the target wait; vCPUs that write little or nothing run untouched.
//!
//! **Needs the KVM dirty ring** (`VmConfig::dirty_ring_entries`) and a
//! running ring tracker: the ring is the only KVM log that says *which
//! vCPU* dirtied a page. With the bitmap or manual-protect trackers there is
//! no per-vCPU count, so [`Vm::set_dirty_limit`] refuses (and a limit set
//! while no tracker runs has nothing to measure, so it does nothing).
//!
//! How it works:
//! - a reaper thread has livemig harvest every vCPU's ring each
//!   [`REAP_PERIOD`] while a limit is set and tracking runs
//!   (`KvmDirtyLog::reap`: the pages wait for the ring tracker's next sync,
//!   nothing is lost), and livemig counts each ring's entries per vCPU
//!   (`KvmDirtyLog::vcpu_dirtied`);
//! - each vCPU keeps a token bucket of pages (refilled at the limit, at most
//!   [`BURST`] worth); before re-entering KVM_RUN it takes what it dirtied
//!   since its last look, and while in debt it sleeps the debt off;
//! - a vCPU that went over its budget within a reap period is kicked out of
//!   KVM_RUN so it pays at once; a full ring also stops it until the next
//!   reap (a natural limit of the ring size per [`REAP_PERIOD`]).
//!
//! The count lags by up to one reap period, so a vCPU may overshoot for
//! that long; over a second its rate stays within the limit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig::engine::MigrationHandle;

use crate::vm::{lock, Shared, Vm, VmError};

/// Pages vCPU `i` has dirtied, as counted from its dirty ring by livemig.
fn dirtied(sh: &Shared, i: usize) -> u64 {
    sh.dirty.vcpu_dirtied_one(i)
}

/// How often the reaper harvests the rings while a limit is set.
pub const REAP_PERIOD: Duration = Duration::from_millis(20);
/// Largest credit a vCPU may save up, as time at the limit.
pub const BURST: Duration = Duration::from_millis(100);
/// Longest single wait before the vCPU looks at its flags again.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often a limit follower re-reads the migration parameters.
const FOLLOW_PERIOD: Duration = Duration::from_millis(100);

/// Per-VM dirty-limit state (part of the VM's shared state).
pub(crate) struct DirtyLimit {
    /// Pages per second each vCPU may dirty; 0 = no limit.
    limit: AtomicU64,
    /// Per vCPU: nanoseconds spent waiting to honour the limit.
    waited_ns: Vec<AtomicU64>,
}

impl DirtyLimit {
    /// State for `vcpus` vCPUs.
    pub(crate) fn new(vcpus: usize) -> Self {
        DirtyLimit {
            limit: AtomicU64::new(0),
            waited_ns: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
}

/// One vCPU's token bucket (lives on the vCPU thread).
pub(crate) struct Pacer {
    limit: u64,
    tokens: f64,
    last: Instant,
    seen: u64,
}

impl Pacer {
    pub(crate) fn new() -> Self {
        Pacer {
            limit: 0,
            tokens: 0.0,
            last: Instant::now(),
            seen: 0,
        }
    }

    /// How long vCPU `i` must wait before it runs again; `None`: run now.
    pub(crate) fn delay(&mut self, sh: &Shared, i: usize) -> Option<Duration> {
        let dl = &sh.dirty_limit;
        let limit = dl.limit();
        let dirtied = dirtied(sh, i);
        let now = Instant::now();
        let rate = limit as f64;
        let burst = rate * BURST.as_secs_f64();
        if limit != self.limit {
            // A new limit (or none): start with a full bucket.
            self.limit = limit;
            self.tokens = burst;
            self.last = now;
            self.seen = dirtied;
        }
        if limit == 0 {
            self.seen = dirtied;
            return None;
        }
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens =
            (self.tokens + dt * rate).min(burst) - dirtied.saturating_sub(self.seen) as f64;
        self.last = now;
        self.seen = dirtied;
        if self.tokens >= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(-self.tokens / rate).min(MAX_WAIT))
    }

    /// Records time vCPU `i` spent waiting.
    pub(crate) fn waited(dl: &DirtyLimit, i: usize, d: Duration) {
        if let Some(c) = dl.waited_ns.get(i) {
            c.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// The reaper: while a limit is set and tracking runs, harvests the rings
/// every [`REAP_PERIOD`] and kicks vCPUs that went over budget.
pub(crate) fn reaper_thread(sh: Arc<Shared>) {
    loop {
        {
            let ctl = lock(&sh.ctl);
            if ctl.stop {
                return;
            }
            if sh.dirty_limit.limit() == 0 || !sh.dirty.is_tracking() {
                let _ = sh.cond.wait_timeout(ctl, REAP_PERIOD);
                continue;
            }
        }
        let t0 = Instant::now();
        let n = sh.vcpus.len();
        let before: Vec<u64> = (0..n).map(|i| dirtied(&sh, i)).collect();
        if let Err(e) = sh.dirty.reap() {
            log::warn!("dirty-limit: reaping the dirty rings: {e}");
        }
        let budget = sh.dirty_limit.limit() as f64 * REAP_PERIOD.as_secs_f64();
        for (i, b) in before.into_iter().enumerate() {
            if (dirtied(&sh, i) - b) as f64 > budget {
                sh.kick(i);
            }
        }
        std::thread::sleep(REAP_PERIOD.saturating_sub(t0.elapsed()));
    }
}

impl Vm {
    /// Caps each vCPU's dirty rate at `bytes_per_sec` (rounded down to
    /// whole pages, at least one page per second); `None` removes the cap.
    ///
    /// Needs the dirty ring (the VM built with `dirty_ring_entries`); the
    /// cap acts only while a ring tracker runs (during a migration or a
    /// dirty-rate measurement): without tracking nothing is counted.
    pub fn set_dirty_limit(&self, bytes_per_sec: Option<u64>) -> Result<(), VmError> {
        let pages = match bytes_per_sec {
            None | Some(0) => 0,
            Some(_) if self.shared.dirty.ring_entries().is_none() => {
                return Err(VmError::Config(
                    "dirty-limit needs the KVM dirty ring (build the VM with dirty_ring_entries \
                     and migrate with the ring tracker): only the ring counts pages per vCPU"
                        .into(),
                ))
            }
            Some(b) => (b / 4096).max(1),
        };
        self.shared
            .dirty_limit
            .limit
            .store(pages, Ordering::Relaxed);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// The per-vCPU dirty limit in bytes per second, if one is set.
    pub fn dirty_limit(&self) -> Option<u64> {
        match self.shared.dirty_limit.limit() {
            0 => None,
            p => Some(p * 4096),
        }
    }

    /// Pages each vCPU has dirtied, as counted from its dirty ring over all
    /// harvests so far; `None` without a dirty ring (no per-vCPU log).
    pub fn vcpu_dirty_pages(&self) -> Option<Vec<u64>> {
        self.shared.dirty.vcpu_dirtied()
    }

    /// Time each vCPU has spent waiting because of the dirty limit.
    pub fn dirty_limit_waited(&self) -> Vec<Duration> {
        self.shared
            .dirty_limit
            .waited_ns
            .iter()
            .map(|c| Duration::from_nanos(c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Applies a migration's `dirty-limit` parameter to this VM for as long
    /// as the returned guard lives, following changes made while it runs;
    /// dropping the guard removes the limit. Fails at once if the parameter
    /// is set and the VM has no dirty ring.
    pub fn follow_dirty_limit(&self, handle: &MigrationHandle) -> Result<DirtyLimitGuard, VmError> {
        let apply = |vm: &Shared, bytes: u64| {
            let pages = if bytes == 0 { 0 } else { (bytes / 4096).max(1) };
            vm.dirty_limit.limit.store(pages, Ordering::Relaxed);
            vm.cond.notify_all();
        };
        let first = handle.params().dirty_limit;
        if first != 0 {
            self.set_dirty_limit(Some(first))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, h, st) = (self.shared.clone(), handle.clone(), stop.clone());
        let has_ring = sh.dirty.ring_entries().is_some();
        let thread = std::thread::Builder::new()
            .name("dirty-limit".into())
            .spawn(move || {
                let mut last = first;
                while !st.load(Ordering::Acquire) {
                    std::thread::sleep(FOLLOW_PERIOD);
                    let want = h.params().dirty_limit;
                    if want != last {
                        if has_ring {
                            apply(&sh, want);
                        } else if want != 0 {
                            log::warn!("dirty-limit ignored: this VM has no dirty ring");
                        }
                        last = want;
                    }
                }
                apply(&sh, 0);
            })
            .map_err(|source| VmError::Io {
                what: "spawning the dirty-limit follower".into(),
                source,
            })?;
        Ok(DirtyLimitGuard {
            stop,
            thread: Some(thread),
        })
    }
}

/// Keeps a migration's dirty limit applied; removes it when dropped.
#[derive(Debug)]
pub struct DirtyLimitGuard {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for DirtyLimitGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
