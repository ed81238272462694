//! A tracker fed by the writer itself: writes go through [`SoftwareLog`],
//! which marks pages the way a write-protect fault would.
//!
//! It exists to test the engine without KVM or userfaultfd, and models both
//! backend families exactly, including KVM manual-protect's rule that a
//! page is logged only when written while protected.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{DirtyError, DirtyTracker, TrackerStart};
use crate::bitmap::DirtyBitmap;
use crate::memory::{GuestMemory, RamBlock, PAGE_SIZE};

const NAME: &str = "software";

#[derive(Debug)]
struct LogState {
    running: bool,
    /// Pages written while protected (the kernel's dirty log).
    log: Vec<DirtyBitmap>,
    /// Pages currently write-protected.
    protected: Vec<DirtyBitmap>,
    /// Manual mode: the log as the last sync saw it (what clear may reset).
    reported: Vec<DirtyBitmap>,
}

/// The writer's side: writes guest memory and records them.
#[derive(Clone, Debug)]
pub struct SoftwareLog {
    blocks: Vec<RamBlock>,
    state: Arc<Mutex<LogState>>,
}

impl SoftwareLog {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `data` at `offset` of block `block`, logging every touched page
    /// that is protected. Panics on an out-of-range write (a test bug).
    pub fn write(&self, block: usize, offset: u64, data: &[u8]) {
        let mut st = self.lock();
        if st.running && !data.is_empty() {
            let first = offset / PAGE_SIZE as u64;
            let last = (offset + data.len() as u64 - 1) / PAGE_SIZE as u64;
            for p in first..=last {
                let LogState { log, protected, .. } = &mut *st;
                if protected[block].clear(p) {
                    log[block].set(p);
                }
            }
        }
        assert!(
            self.blocks[block].region().write(offset as usize, data),
            "software log: write outside block {block}"
        );
    }
}

/// The tracker side of a [`SoftwareLog`].
#[derive(Debug)]
pub struct SoftwareTracker {
    manual_shift: Option<u32>,
    initially_set: bool,
    state: Arc<Mutex<LogState>>,
}

impl SoftwareTracker {
    /// A returns-and-resets tracker over `mem` and the log writers must use.
    pub fn new(mem: &dyn GuestMemory) -> (Self, SoftwareLog) {
        Self::build(mem, None, false)
    }

    /// A manual-clear tracker with chunks of 2^`shift` pages, optionally
    /// initially set (everything dirty, nothing protected at start).
    pub fn manual(mem: &dyn GuestMemory, shift: u32, initially_set: bool) -> (Self, SoftwareLog) {
        Self::build(mem, Some(shift), initially_set)
    }

    fn build(
        mem: &dyn GuestMemory,
        manual_shift: Option<u32>,
        initially_set: bool,
    ) -> (Self, SoftwareLog) {
        let blocks = mem.blocks().to_vec();
        let empty = || {
            blocks
                .iter()
                .map(|b| DirtyBitmap::new(b.pages()))
                .collect::<Vec<_>>()
        };
        let state = Arc::new(Mutex::new(LogState {
            running: false,
            log: empty(),
            protected: empty(),
            reported: empty(),
        }));
        (
            SoftwareTracker {
                manual_shift,
                initially_set,
                state: state.clone(),
            },
            SoftwareLog { blocks, state },
        )
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DirtyTracker for SoftwareTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        let initially_set = self.manual_shift.is_some() && self.initially_set;
        let mut st = self.lock();
        if st.running {
            return Err(DirtyError::State {
                tracker: NAME,
                what: "started twice",
            });
        }
        st.running = true;
        for i in 0..st.log.len() {
            if initially_set {
                st.log[i].set_all();
                st.reported[i].set_all();
                st.protected[i].clear_all();
            } else {
                st.log[i].clear_all();
                st.protected[i].set_all();
            }
        }
        Ok(TrackerStart { initially_set })
    }

    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        let manual = self.manual_shift.is_some();
        let mut st = self.lock();
        if !st.running {
            return Err(DirtyError::State {
                tracker: NAME,
                what: "sync before start",
            });
        }
        if bitmaps.len() != st.log.len() {
            return Err(DirtyError::Mismatch {
                tracker: NAME,
                what: format!("{} bitmaps for {} blocks", bitmaps.len(), st.log.len()),
            });
        }
        let mut reported = 0;
        let LogState {
            log,
            protected,
            reported: last,
            ..
        } = &mut *st;
        for (i, bm) in bitmaps.iter_mut().enumerate() {
            reported += log[i].count();
            bm.or_words(0, log[i].words());
            if manual {
                last[i] = log[i].clone();
            } else {
                // Returns and resets: everything reported is protected again.
                let words: Vec<u64> = log[i].words().to_vec();
                protected[i].or_words(0, &words);
                log[i].clear_all();
            }
        }
        Ok(reported)
    }

    fn clear_chunk_shift(&self) -> Option<u32> {
        self.manual_shift
    }

    fn clear(&mut self, block: usize, first_page: u64, count: u64) -> Result<(), DirtyError> {
        let mut st = self.lock();
        let LogState {
            log,
            protected,
            reported,
            ..
        } = &mut *st;
        let Some(rep) = reported.get_mut(block) else {
            return Err(DirtyError::Mismatch {
                tracker: NAME,
                what: format!("clear of unknown block {block}"),
            });
        };
        let end = first_page.saturating_add(count).min(rep.len());
        let mut p = first_page;
        while let Some(q) = rep.next_set(p).filter(|&q| q < end) {
            rep.clear(q);
            log[block].clear(q);
            protected[block].set(q);
            p = q + 1;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        let mut st = self.lock();
        st.running = false;
        for b in st.protected.iter_mut() {
            b.clear_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ProcessMemory;

    #[test]
    fn returns_and_resets() {
        let mem = ProcessMemory::single(16 * 4096).unwrap();
        let (mut t, log) = SoftwareTracker::new(&mem);
        assert!(!t.start().unwrap().initially_set);
        log.write(0, 4096 * 3 + 10, &[1; 4096]);
        let mut bm = vec![DirtyBitmap::new(16)];
        assert_eq!(t.sync(&mut bm).unwrap(), 2);
        assert!(bm[0].test(3) && bm[0].test(4));
        let mut bm2 = vec![DirtyBitmap::new(16)];
        assert_eq!(t.sync(&mut bm2).unwrap(), 0, "reset after report");
    }

    #[test]
    fn manual_initially_set_logs_only_after_clear() {
        let mem = ProcessMemory::single(16 * 4096).unwrap();
        let (mut t, log) = SoftwareTracker::manual(&mem, 2, true);
        assert!(t.start().unwrap().initially_set);
        // Not protected yet: the write is not logged beyond the initial set.
        t.clear(0, 0, 4).unwrap();
        log.write(0, 0, &[1]);
        log.write(0, 5 * 4096, &[1]);
        let mut bm = vec![DirtyBitmap::new(16)];
        // Page 0 was re-protected then written: logged. Pages 4.. were never
        // cleared: still set from the start.
        t.sync(&mut bm).unwrap();
        assert!(bm[0].test(0));
        assert!(!bm[0].test(1));
        assert!(bm[0].test(4) && bm[0].test(15));
    }
}
