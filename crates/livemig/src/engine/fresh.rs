//! Destination pages known to be zero: never written since the load began
//! and empty before it, so a zero record for one needs no look at it.
//!
//! Checking that a page is zero before writing a zero record's page (so an
//! idle guest's destination stays small) reads the page: 4 GiB of reads
//! for an idle 4 GiB guest, the destination's largest cost then, and on
//! memory shared with a file each read of a hole allocates a page.
//! [`FreshZero`] asks the kernel once, when a load begins (before any of
//! its writers runs), which pages hold data (`PAGEMAP_SCAN` for private
//! anonymous memory, `SEEK_DATA` for a memory file); every other page is
//! zero. A writer clears a page's bit before it writes data there, so a
//! set bit always means the page is still zero. Writers on several
//! threads (page channels) order their writes of one page through the
//! epoch barrier, which also orders their bits.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::{GuestMemory, PAGE_SIZE};

/// One bit per page, per block: set = the page is zero and was not written
/// since the look-up.
pub(super) struct FreshZero {
    blocks: Vec<Vec<AtomicU64>>,
}

impl FreshZero {
    /// Knows nothing: every page must be looked at.
    pub fn none() -> Self {
        FreshZero { blocks: Vec::new() }
    }

    /// Asks the kernel which pages of `mem` hold data; the others are
    /// known zero. A block the kernel cannot describe gets no bits. Call
    /// it while nothing writes to `mem`.
    pub fn look_up(mem: &dyn GuestMemory) -> Self {
        let blocks = mem
            .blocks()
            .iter()
            .map(|b| match b.data_pages(0, b.pages()) {
                // Known zero: every page without data; no bit past the
                // last page.
                Some(data) => {
                    let pages = b.pages();
                    let mut words: Vec<u64> = data.words().iter().map(|w| !w).collect();
                    if pages % 64 != 0 {
                        if let Some(last) = words.last_mut() {
                            *last &= (1u64 << (pages % 64)) - 1;
                        }
                    }
                    words.into_iter().map(AtomicU64::new).collect()
                }
                None => Vec::new(),
            })
            .collect();
        FreshZero { blocks }
    }

    /// True when page `offset` (bytes) of block `block` is known zero.
    pub fn is_zero(&self, block: usize, offset: u64) -> bool {
        let p = offset / PAGE_SIZE as u64;
        self.blocks
            .get(block)
            .and_then(|w| w.get((p / 64) as usize))
            .is_some_and(|w| w.load(Ordering::Acquire) & (1u64 << (p % 64)) != 0)
    }

    /// Calls `f` with every page of `[first, first + count)` (page
    /// numbers) of block `block` that is not known zero, in order: a word
    /// of bits at a time, so a run of known-zero pages costs next to
    /// nothing.
    pub fn not_known_zero(&self, block: usize, first: u64, count: u64, mut f: impl FnMut(u64)) {
        let end = first.saturating_add(count);
        let words = self.blocks.get(block).map_or(&[][..], |w| &w[..]);
        let mut p = first;
        while p < end {
            let wi = p / 64;
            let lo = p % 64;
            let hi = (end - wi * 64).min(64);
            let span = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 } & (u64::MAX << lo);
            let known = words
                .get(wi as usize)
                .map_or(0, |w| w.load(Ordering::Acquire));
            let mut left = span & !known;
            while left != 0 {
                f(wi * 64 + u64::from(left.trailing_zeros()));
                left &= left - 1;
            }
            p = wi * 64 + hi;
        }
    }

    /// Data is about to be written at `offset` of block `block`: the page
    /// is no longer known zero. Call it before the write.
    pub fn written(&self, block: usize, offset: u64) {
        let p = offset / PAGE_SIZE as u64;
        if let Some(w) = self
            .blocks
            .get(block)
            .and_then(|w| w.get((p / 64) as usize))
        {
            let bit = 1u64 << (p % 64);
            if w.load(Ordering::Relaxed) & bit != 0 {
                w.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }

    /// Pages known zero, over all blocks.
    #[cfg(test)]
    fn count(&self) -> u64 {
        self.blocks
            .iter()
            .flatten()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ProcessMemory;

    const P: usize = PAGE_SIZE;

    fn check(mem: &ProcessMemory, pages: usize, written: &[usize]) {
        let r = mem.blocks()[0].region();
        for &p in written {
            assert!(r.write(p * P + 3, &[5]));
        }
        let f = FreshZero::look_up(mem);
        if f.count() == 0 {
            eprintln!("skipped: this kernel cannot say which pages hold data");
            return;
        }
        for p in 0..pages {
            assert_eq!(
                f.is_zero(0, (p * P) as u64),
                !written.contains(&p),
                "page {p}"
            );
        }
        // A page about to be written is no longer known zero; the others
        // stay so.
        f.written(0, (2 * P) as u64);
        assert!(!f.is_zero(0, (2 * P) as u64));
        assert!(f.is_zero(0, (3 * P) as u64));
        assert_eq!(f.count() as usize, pages - written.len() - 1);
        // Out of range: not known.
        assert!(!f.is_zero(1, 0));
        assert!(!f.is_zero(0, (pages * P) as u64));
        f.written(5, 0);
    }

    #[test]
    fn anonymous_pages_never_written_are_known_zero() {
        let pages = 200;
        // Anonymous huge pages are granted only where asked for
        // (`madvise`), and this memory does not ask: 4 KiB pages.
        let mem = ProcessMemory::single((pages * P) as u64).unwrap();
        check(&mem, pages, &[0, 70, 199]);
    }

    #[test]
    fn holes_of_a_memory_file_are_known_zero() {
        let pages = 130;
        let mem = ProcessMemory::new_memfd(&[("ram", (pages * P) as u64)]).unwrap();
        check(&mem, pages, &[1, 64, 129]);
    }

    #[test]
    fn knowing_nothing_says_nothing_is_zero() {
        let f = FreshZero::none();
        assert!(!f.is_zero(0, 0));
        f.written(0, 0);
        let mut all = Vec::new();
        f.not_known_zero(0, 62, 5, |p| all.push(p));
        assert_eq!(all, [62, 63, 64, 65, 66], "every page must be looked at");
    }

    #[test]
    fn a_run_lists_only_the_pages_not_known_zero() {
        let pages = 300;
        let mem = ProcessMemory::single((pages * P) as u64).unwrap();
        let r = mem.blocks()[0].region();
        for p in [5usize, 63, 64, 130, 299] {
            assert!(r.write(p * P + 1, &[9]));
        }
        let f = FreshZero::look_up(&mem);
        if f.count() == 0 {
            eprintln!("skipped: this kernel cannot say which pages hold data");
            return;
        }
        f.written(0, (200 * P) as u64);
        let list = |first: u64, count: u64| {
            let mut v = Vec::new();
            f.not_known_zero(0, first, count, |p| v.push(p));
            v
        };
        assert_eq!(list(0, 300), [5, 63, 64, 130, 200, 299]);
        // Runs that start and end inside words, or inside one word.
        assert_eq!(list(6, 58), [63]);
        assert_eq!(list(63, 2), [63, 64]);
        assert_eq!(list(65, 65), Vec::<u64>::new());
        assert_eq!(list(130, 1), [130]);
        assert_eq!(list(131, 0), Vec::<u64>::new());
        // Past the block's end: nothing is known there.
        assert_eq!(list(298, 4), [299, 300, 301]);
        // Another block: nothing is known.
        let mut other = Vec::new();
        f.not_known_zero(1, 0, 3, |p| other.push(p));
        assert_eq!(other, [0, 1, 2]);
    }
}
