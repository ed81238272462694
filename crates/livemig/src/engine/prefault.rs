//! The destination faults memory in a window at a time, ahead of the
//! pages that fill it.
//!
//! Writing a received page into memory that was never touched costs a page
//! fault per 4 KiB page; on a nested-virtualisation host that fault, not
//! the link, bounds the first pass. [`Prefault`] faults in the whole 2 MiB
//! window around the first data page written there with one
//! `MADV_POPULATE_WRITE` call (on memory allowed transparent huge pages,
//! that is one huge page). Only windows receiving data are populated: zero
//! records never fault anything in, so an idle guest's destination stays
//! small. A window holding one data page costs 2 MiB, as it would with
//! huge pages.
//!
//! A window whose first data page is already in memory (a pre-touched
//! destination) is left alone: populating it would only walk its page
//! tables (one `mincore` call per window tells).
//!
//! Even a huge page costs its first touch: on these hosts (nested, the
//! outer host takes back free memory) clearing a fresh 2 MiB page runs at
//! 0.2-0.5 GB/s, and that clearing was ~86% of the receiving thread's time
//! on the filler. So the clearing is spread over both cores:
//! - a helper thread ([`Prefault::run_ahead`], started and joined by the
//!   loader around the record loop) populates the [`AHEAD`] windows after
//!   the one the writers entered last, once the writers have entered two
//!   windows in a row (a stream in address order; a scattered stream gets
//!   nothing ahead, so a sparse guest's destination stays small);
//! - a writer that reaches a window the helper is still populating first
//!   populates the next free window itself, then writes without waiting
//!   for the helper (which a loaded host may have descheduled).
//!
//! A window is populated once (claimed by a writer or the helper); its
//! done bit says it is in memory, so later writes skip all of this.
//!
//! Everything runs before the writes it serves, inside the load's record
//! loop: nothing touches memory after it returns (a postcopy switch
//! registers the memory with userfaultfd next, and drops the pages not
//! received, populated ones included).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::memory::GuestMemory;
use crate::sys::mmap::RawRegion;

/// log2 bytes per window (2 MiB, one x86 huge page).
pub(super) const WINDOW_SHIFT: u32 = 21;

/// Windows the helper keeps populated after the writers' latest (16 MiB).
pub(super) const AHEAD: u64 = 8;

/// Bytes the helper populates per call, looking at its stop flag between
/// calls: the end of a load waits for at most one. A whole 2 MiB window of
/// fresh 4 KiB pages took several ms here, more on a loaded host; on
/// memory allowed huge pages the first call faults the whole huge page in
/// and the others find it there.
const STEP: usize = 256 << 10;

/// Windows entered in a row before the helper runs ahead.
const STREAK: u32 = 2;

/// Which windows of each block were claimed and populated.
pub(super) struct Prefault {
    /// One bit per window, per block: someone populates (or populated) it.
    claimed: Vec<Vec<AtomicU64>>,
    /// One bit per window, per block: in memory (populated, or found so).
    done: Vec<Vec<AtomicU64>>,
    /// Off after the kernel refused once (old kernel, odd memory).
    enabled: AtomicBool,
    /// Where the writers are, for the helper.
    front: Mutex<Front>,
    /// Wakes the helper.
    wake: Condvar,
    /// The helper stops (the load's record loop returned).
    stop: AtomicBool,
    /// The latest window key ([`key`]) a writer reported, so most writes
    /// skip the lock.
    seen: AtomicU64,
}

/// The writers' front, as the helper sees it.
#[derive(Default)]
struct Front {
    /// The latest window entered (block, window).
    latest: Option<(usize, u64)>,
    /// Windows entered in a row up to `latest`.
    streak: u32,
    /// `latest` changed since the helper last looked.
    moved: bool,
}

/// A window's key: ordered by block, then window; 0 is no window.
fn key(block: usize, w: u64) -> u64 {
    ((block as u64) << 40 | w) + 1
}

fn bit(w: u64) -> u64 {
    1u64 << (w % 64)
}

impl Prefault {
    /// For the blocks of `mem`; `enabled` false makes every call a no-op.
    pub fn new(mem: &dyn GuestMemory, enabled: bool) -> Self {
        let words = |b: &crate::memory::RamBlock| {
            let windows = b.len().div_ceil(1 << WINDOW_SHIFT);
            (0..windows.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect::<Vec<_>>()
        };
        Prefault {
            claimed: mem.blocks().iter().map(words).collect(),
            done: mem.blocks().iter().map(words).collect(),
            enabled: AtomicBool::new(enabled),
            front: Mutex::new(Front::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            seen: AtomicU64::new(0),
        }
    }

    fn word(bits: &[Vec<AtomicU64>], block: usize, w: u64) -> Option<&AtomicU64> {
        bits.get(block).and_then(|v| v.get((w / 64) as usize))
    }

    fn is_done(&self, block: usize, w: u64) -> bool {
        Self::word(&self.done, block, w).is_some_and(|d| d.load(Ordering::Acquire) & bit(w) != 0)
    }

    /// Claims window `w` of `block`: true for the one caller that wins.
    fn claim(&self, block: usize, w: u64) -> bool {
        let Some(word) = Self::word(&self.claimed, block, w) else {
            return false;
        };
        word.load(Ordering::Relaxed) & bit(w) == 0
            && word.fetch_or(bit(w), Ordering::AcqRel) & bit(w) == 0
    }

    /// Populates window `w` (claimed by the caller) unless it is in memory
    /// already, then marks it done. The helper (`stoppable`) populates it
    /// [`STEP`] bytes at a time and gives up between steps once stopped:
    /// the load's end waits for it (see [`Prefault::stop_ahead`]).
    fn populate(&self, block: usize, region: &RawRegion, w: u64, stoppable: bool) {
        let start = (w << WINDOW_SHIFT) as usize;
        // Memory faulted in before (a pre-touched destination, a window the
        // guest used) is left alone: populating would only walk its page
        // tables.
        if start < region.len()
            && self.enabled.load(Ordering::Relaxed)
            && region.resident(start) != Some(true)
        {
            let end = start + (1usize << WINDOW_SHIFT).min(region.len() - start);
            let step = if stoppable { STEP } else { end - start };
            let mut at = start;
            while at < end {
                if stoppable && self.stop.load(Ordering::Acquire) {
                    // Not done: a write there faults its own page in.
                    return;
                }
                let n = step.min(end - at);
                if let Err(e) = region.populate_write(at, n) {
                    log::debug!("prefault off: MADV_POPULATE_WRITE failed: {e}");
                    self.enabled.store(false, Ordering::Relaxed);
                    break;
                }
                at += n;
            }
        }
        if let Some(d) = Self::word(&self.done, block, w) {
            d.fetch_or(bit(w), Ordering::AcqRel);
        }
    }

    /// A data page is about to be written at `offset` of block `block`
    /// (backed by `region`): faults its window in the first time (or, when
    /// another thread does, the next window). Safe from several threads.
    pub fn before_write(&self, block: usize, region: &RawRegion, offset: u64) {
        if !self.enabled.load(Ordering::Relaxed) || offset >= region.len() as u64 {
            return;
        }
        let w = offset >> WINDOW_SHIFT;
        if Self::word(&self.claimed, block, w).is_none() {
            return;
        }
        self.entered(block, w);
        if self.is_done(block, w) {
            return;
        }
        if self.claim(block, w) {
            self.populate(block, region, w, false);
            return;
        }
        // Another thread populates it: help with the next window meanwhile,
        // then write without waiting (a helper descheduled on a loaded host
        // must not hold the stream up; the write's own fault is correct,
        // at worst it clears a page the helper also clears).
        let next = w + 1;
        if (next << WINDOW_SHIFT) < region.len() as u64 && self.claim(block, next) {
            self.populate(block, region, next, false);
        }
    }

    /// A writer entered window `w` of `block`: tells the helper, once per
    /// window, whether the stream moves on in address order.
    fn entered(&self, block: usize, w: u64) {
        let k = key(block, w);
        let seen = self.seen.load(Ordering::Relaxed);
        // The same window, or one just behind (another channel's batch).
        if k <= seen && k + 2 >= seen {
            return;
        }
        let mut f = self.front.lock().unwrap_or_else(|e| e.into_inner());
        let seen = self.seen.load(Ordering::Relaxed);
        if k <= seen && k + 2 >= seen {
            return;
        }
        f.streak = if k > seen && k <= seen + 2 {
            f.streak.saturating_add(1)
        } else {
            1
        };
        f.latest = Some((block, w));
        f.moved = true;
        self.seen.store(k, Ordering::Relaxed);
        if f.streak >= STREAK {
            self.wake.notify_one();
        }
    }

    /// The helper thread's loop: keeps the [`AHEAD`] windows after the
    /// writers' latest populated while they move on in address order,
    /// until [`Prefault::stop_ahead`].
    pub fn run_ahead(&self, mem: &dyn GuestMemory) {
        let blocks = mem.blocks();
        let mut front = self.front.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.stop.load(Ordering::Acquire) || !self.enabled.load(Ordering::Relaxed) {
                return;
            }
            let target = match front.latest {
                Some(at) if front.moved && front.streak >= STREAK => Some(at),
                _ => None,
            };
            front.moved = false;
            let Some((block, w)) = target else {
                front = self
                    .wake
                    .wait_timeout(front, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            };
            drop(front);
            if let Some(b) = blocks.get(block) {
                let region = b.region();
                for k in 1..=AHEAD {
                    let n = w + k;
                    if self.stop.load(Ordering::Acquire)
                        || (n << WINDOW_SHIFT) >= region.len() as u64
                    {
                        break;
                    }
                    if self.claim(block, n) {
                        self.populate(block, region, n, true);
                    }
                }
            }
            front = self.front.lock().unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Readies the helper for a load ([`Prefault::run_ahead`] returns at
    /// once after [`Prefault::stop_ahead`] otherwise).
    pub fn start_ahead(&self) {
        self.stop.store(false, Ordering::Release);
    }

    /// Stops the helper: it returns after the window it is populating.
    pub fn stop_ahead(&self) {
        self.stop.store(true, Ordering::Release);
        let _front = self.front.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    /// Stops the helper (see [`Prefault::stop_ahead`]) when dropped, also
    /// when the load panics, so a scope joining the helper never hangs.
    pub fn stopping(&self) -> StopAhead<'_> {
        StopAhead(self)
    }

    /// Windows faulted in (or found in memory) so far, over all blocks.
    #[cfg(test)]
    fn windows_done(&self) -> u32 {
        self.done
            .iter()
            .flatten()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }
}

/// Stops the prefault helper when dropped ([`Prefault::stopping`]).
pub(super) struct StopAhead<'a>(&'a Prefault);

impl Drop for StopAhead<'_> {
    fn drop(&mut self) {
        self.0.stop_ahead();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ProcessMemory;

    const MIB: u64 = 1 << 20;

    #[test]
    fn faults_each_window_in_once_without_changing_contents() {
        // 5 MiB: two whole windows and a half one.
        let mem = ProcessMemory::single(5 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        assert!(r.write(4096, &[7; 16]));
        let p = Prefault::new(&mem, true);
        p.before_write(0, &r, 0);
        p.before_write(0, &r, 8192);
        assert_eq!(p.windows_done(), 1, "one window, claimed once");
        let mut b = [0u8; 16];
        assert!(r.read(4096, &mut b));
        assert_eq!(b, [7; 16], "a page written before is kept");
        p.before_write(0, &r, 4 * MIB + 4096);
        assert_eq!(p.windows_done(), 2, "the last, partial window");
        let present = r.populated(0, 5 * MIB as usize);
        if let Some(ranges) = present {
            let bytes: usize = ranges.iter().map(|(a, b)| b - a).sum();
            assert_eq!(bytes, 3 * MIB as usize, "windows 0 and 2 faulted in, 1 not");
        }
        assert!(
            r.scan(0, 5 * MIB as usize, |s| s
                .iter()
                .filter(|&&x| x != 0)
                .count())
                == Some(16)
        );
    }

    #[test]
    fn a_stopped_helper_leaves_its_window_to_the_writers() {
        let mem = ProcessMemory::single(4 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        let p = Prefault::new(&mem, true);
        p.start_ahead();
        assert!(p.claim(0, 0));
        p.populate(0, &r, 0, true);
        assert!(p.is_done(0, 0), "populated while running");
        p.stop_ahead();
        assert!(p.claim(0, 1));
        p.populate(0, &r, 1, true);
        assert!(!p.is_done(0, 1), "stopped before its first step");
        if let Some(ranges) = r.populated(0, 4 * MIB as usize) {
            let bytes: usize = ranges.iter().map(|(a, b)| b - a).sum();
            assert_eq!(bytes, 2 * MIB as usize, "window 0 only");
        }
        // A writer's own populate is never cut short.
        p.populate(0, &r, 1, false);
        assert!(p.is_done(0, 1));
    }

    #[test]
    fn a_window_already_in_memory_is_not_populated() {
        let mem = ProcessMemory::single(4 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        assert_eq!(r.resident(0), Some(false), "fresh anonymous memory");
        assert!(r.write(0, &[9; 4096]));
        assert_eq!(r.resident(0), Some(true));
        // With transparent huge pages the write brought the whole window.
        let huge = r.resident(4096) == Some(true);
        assert_eq!(r.resident(4 * MIB as usize), None, "out of range");
        let p = Prefault::new(&mem, true);
        p.before_write(0, &r, 0);
        assert_eq!(p.windows_done(), 1, "claimed");
        if let Some(ranges) = r.populated(0, 2 * MIB as usize) {
            let bytes: usize = ranges.iter().map(|(a, b)| b - a).sum();
            assert!(huge || bytes < 2 * MIB as usize, "populated: {bytes} bytes");
        }
        // The second window is not in memory: populated whole.
        p.before_write(0, &r, 2 * MIB + 8192);
        if let Some(ranges) = r.populated(2 * MIB as usize, 2 * MIB as usize) {
            let bytes: usize = ranges.iter().map(|(a, b)| b - a).sum();
            assert_eq!(bytes, 2 * MIB as usize);
        }
        let mut b = [0u8; 4096];
        assert!(r.read(0, &mut b));
        assert_eq!(b, [9; 4096]);
    }

    /// Runs `f` beside the helper thread, stopped and joined after it.
    fn with_helper(p: &Prefault, mem: &ProcessMemory, f: impl FnOnce()) {
        p.start_ahead();
        std::thread::scope(|s| {
            s.spawn(|| p.run_ahead(mem));
            let _stop = p.stopping();
            f();
        });
    }

    /// Waits (generously: a loaded host) until `n` windows are done.
    fn wait_done(p: &Prefault, n: u32) {
        let t = std::time::Instant::now();
        while p.windows_done() < n && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn populated_bytes(r: &RawRegion, len: u64) -> Option<usize> {
        r.populated(0, len as usize)
            .map(|v| v.iter().map(|(a, b)| b - a).sum())
    }

    #[test]
    fn the_helper_runs_ahead_of_writers_in_address_order() {
        let mem = ProcessMemory::single(32 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        assert!(r.write(7 * MIB as usize, &[4; 8]));
        let p = Prefault::new(&mem, true);
        with_helper(&p, &mem, || {
            p.before_write(0, &r, 4096);
            p.before_write(0, &r, 2 * MIB + 4096);
            // Two windows in a row: the helper populates AHEAD more.
            wait_done(&p, 2 + AHEAD as u32);
        });
        assert_eq!(p.windows_done(), 2 + AHEAD as u32);
        if let Some(bytes) = populated_bytes(&r, 32 * MIB) {
            assert_eq!(bytes, (2 + AHEAD as usize) * 2 * MIB as usize);
        }
        let mut b = [0u8; 8];
        assert!(r.read(7 * MIB as usize, &mut b));
        assert_eq!(b, [4; 8], "contents kept");
        // Stopped: a helper started now returns at once.
        p.run_ahead(&mem);
    }

    #[test]
    fn scattered_writes_get_nothing_ahead() {
        let mem = ProcessMemory::single(64 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        let p = Prefault::new(&mem, true);
        with_helper(&p, &mem, || {
            for w in [0u64, 5, 11, 20, 29] {
                p.before_write(0, &r, (w << WINDOW_SHIFT) + 4096);
            }
            // Time for a helper that would wrongly run ahead.
            std::thread::sleep(Duration::from_millis(100));
        });
        assert_eq!(p.windows_done(), 5, "only the windows written");
        if let Some(bytes) = populated_bytes(&r, 64 * MIB) {
            assert_eq!(bytes, 5 * 2 * MIB as usize);
        }
    }

    #[test]
    fn writers_on_two_threads_beside_the_helper_land_every_page() {
        let mem = ProcessMemory::single(32 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        let p = Prefault::new(&mem, true);
        let pages = 32 * MIB / 4096;
        with_helper(&p, &mem, || {
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let (p, r) = (&p, &r);
                    s.spawn(move || {
                        // Batches of 16 pages alternate between the threads,
                        // as page channels take them.
                        for page in (0..pages).filter(|pg| (pg / 16) % 2 == t) {
                            let off = page * 4096;
                            p.before_write(0, r, off);
                            assert!(r.write(off as usize, &(page as u32 + 1).to_le_bytes()));
                        }
                    });
                }
            });
        });
        // Every window in memory, except at most one the helper was still
        // populating when the load's end stopped it (the writers wrote it
        // without waiting: it is complete below all the same).
        let done = p.windows_done();
        assert!((15..=16).contains(&done), "{done} windows done");
        for page in 0..pages {
            let mut b = [0u8; 4];
            assert!(r.read((page * 4096) as usize, &mut b));
            assert_eq!(u32::from_le_bytes(b), page as u32 + 1, "page {page}");
        }
    }

    #[test]
    fn disabled_or_out_of_range_does_nothing() {
        let mem = ProcessMemory::single(4 * MIB).unwrap();
        let r = mem.blocks()[0].region().clone();
        let p = Prefault::new(&mem, false);
        p.before_write(0, &r, 0);
        assert_eq!(p.windows_done(), 0);
        let p = Prefault::new(&mem, true);
        p.before_write(3, &r, 0);
        p.before_write(0, &r, 64 * MIB);
        assert_eq!(p.windows_done(), 0);
    }
}
