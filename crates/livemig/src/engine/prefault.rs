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
//! It runs on the thread that writes the page, before the write: nothing
//! touches memory after a stream's loop returns (a postcopy switch
//! registers the memory with userfaultfd, where populating would fault).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::memory::GuestMemory;
use crate::sys::mmap::RawRegion;

/// log2 bytes per window (2 MiB, one x86 huge page).
const WINDOW_SHIFT: u32 = 21;

/// Which windows of each block were faulted in.
pub(super) struct Prefault {
    /// One bit per window, per block.
    done: Vec<Vec<AtomicU64>>,
    /// Off after the kernel refused once (old kernel, odd memory).
    enabled: AtomicBool,
}

impl Prefault {
    /// For the blocks of `mem`; `enabled` false makes every call a no-op.
    pub fn new(mem: &dyn GuestMemory, enabled: bool) -> Self {
        let done = mem
            .blocks()
            .iter()
            .map(|b| {
                let windows = b.len().div_ceil(1 << WINDOW_SHIFT);
                (0..windows.div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        Prefault {
            done,
            enabled: AtomicBool::new(enabled),
        }
    }

    /// A data page is about to be written at `offset` of block `block`
    /// (backed by `region`): the first time in its window, faults the
    /// window in. Safe from several threads: a window is claimed once.
    pub fn before_write(&self, block: usize, region: &RawRegion, offset: u64) {
        if !self.enabled.load(Ordering::Relaxed) || offset >= region.len() as u64 {
            return;
        }
        let w = offset >> WINDOW_SHIFT;
        let Some(word) = self.done.get(block).and_then(|v| v.get((w / 64) as usize)) else {
            return;
        };
        let bit = 1u64 << (w % 64);
        if word.load(Ordering::Relaxed) & bit != 0
            || word.fetch_or(bit, Ordering::AcqRel) & bit != 0
        {
            return;
        }
        if region.resident(offset as usize) == Some(true) {
            // Memory faulted in before (a pre-touched destination, a
            // window the guest used): populating would only walk its
            // page tables.
            return;
        }
        let start = (w << WINDOW_SHIFT) as usize;
        let len = (1usize << WINDOW_SHIFT).min(region.len() - start);
        if let Err(e) = region.populate_write(start, len) {
            log::debug!("prefault off: MADV_POPULATE_WRITE failed: {e}");
            self.enabled.store(false, Ordering::Relaxed);
        }
    }

    /// Windows faulted in so far, over all blocks.
    #[cfg(test)]
    fn windows_done(&self) -> u32 {
        self.done
            .iter()
            .flatten()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
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
