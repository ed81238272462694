//! Page search: which page the source sends next.
//!
//! [`PageSearch`] owns the migration bitmap (one per RAM block, set = must
//! be sent), the position the walk continues from, the round count and the
//! bulk stage, and — for trackers whose log is cleared chunk by chunk
//! (KVM manual protect) — the chunks whose log must be cleared before
//! their next page goes out. It knows nothing of encoders, streams or
//! timing: the saver asks it for the next page, sends it, and feeds it the
//! tracker's harvest at each sync.

use crate::bitmap::DirtyBitmap;

/// A page the search picked: its bit is already cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Found {
    /// RAM block index.
    pub block: usize,
    /// Page index inside the block.
    pub page: u64,
    /// Manual-clear trackers: the chunk `[first, first + count)` (pages of
    /// `block`) whose dirty log must be cleared (re-protected) before this
    /// page is read.
    pub clear: Option<(u64, u64)>,
}

/// Chunks of a manual-clear tracker whose log must be cleared before their
/// next page is sent.
struct ClearChunks {
    /// log2 pages per chunk.
    shift: u32,
    /// One bit per chunk, per block.
    pending: Vec<DirtyBitmap>,
}

/// The migration bitmap and the walk over it.
pub(super) struct PageSearch {
    bitmaps: Vec<DirtyBitmap>,
    clear: Option<ClearChunks>,
    /// Where the walk continues: block and page.
    block: usize,
    page: u64,
    /// Completed passes over all blocks.
    rounds: u64,
    /// The first round (bulk stage) is not over yet.
    bulk: bool,
}

impl PageSearch {
    /// Every page of blocks of `pages[i]` pages is to be sent; the walk
    /// starts at the first page of the first block, in the bulk stage.
    pub fn new(pages: impl IntoIterator<Item = u64>) -> Self {
        PageSearch {
            bitmaps: pages.into_iter().map(DirtyBitmap::new_full).collect(),
            clear: None,
            block: 0,
            page: 0,
            rounds: 0,
            bulk: true,
        }
    }

    /// Manual-clear tracker with chunks of 2^`shift` pages: with an
    /// initially-set log every chunk must be cleared before its first page
    /// goes out; otherwise only chunks a later sync reports dirty.
    pub fn clear_chunks(&mut self, shift: u32, initially_set: bool) {
        let pending = self
            .bitmaps
            .iter()
            .map(|b| {
                let n = b.len().div_ceil(1u64 << shift);
                if initially_set {
                    DirtyBitmap::new_full(n)
                } else {
                    DirtyBitmap::new(n)
                }
            })
            .collect();
        self.clear = Some(ClearChunks { shift, pending });
    }

    /// The per-block migration bitmaps.
    pub fn bitmaps(&self) -> &[DirtyBitmap] {
        &self.bitmaps
    }

    /// The per-block migration bitmaps, for a tracker's harvest; call
    /// [`PageSearch::synced`] after changing them.
    pub fn bitmaps_mut(&mut self) -> &mut [DirtyBitmap] {
        &mut self.bitmaps
    }

    /// Pages still to be sent.
    pub fn remaining(&self) -> u64 {
        self.bitmaps.iter().map(DirtyBitmap::count).sum()
    }

    /// Completed rounds.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// True during the first round, when every page is sent once.
    pub fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// After a sync set bits: chunks holding a dirty page must be cleared
    /// (re-protected) before their pages go out again.
    pub fn synced(&mut self) {
        let Some(ClearChunks { shift, pending }) = &mut self.clear else {
            return;
        };
        for (b, bm) in self.bitmaps.iter().enumerate() {
            let mut p = 0;
            while let Some(q) = bm.next_set(p) {
                let chunk = q >> *shift;
                pending[b].set(chunk);
                p = (chunk + 1) << *shift;
            }
        }
    }

    /// The next dirty page at or after the position, wrapping around (which
    /// completes a round and ends the bulk stage); None when nothing is
    /// left. Does not take it.
    fn next_dirty(&mut self) -> Option<(usize, u64)> {
        let nblocks = self.bitmaps.len();
        if nblocks == 0 {
            return None;
        }
        for _ in 0..=nblocks {
            if let Some(p) = self.bitmaps[self.block].next_set(self.page) {
                return Some((self.block, p));
            }
            self.page = 0;
            self.block += 1;
            if self.block == nblocks {
                self.block = 0;
                self.rounds += 1;
                self.bulk = false;
                if self.remaining() == 0 {
                    return None;
                }
            }
        }
        None
    }

    /// Takes the next page to send: clears its bit, moves the position
    /// past it, and says which chunk's log to clear first, if any.
    pub fn take_next(&mut self) -> Option<Found> {
        let (block, page) = self.next_dirty()?;
        let clear = self.clear.as_mut().and_then(|c| {
            let chunk = page >> c.shift;
            c.pending[block]
                .clear(chunk)
                .then(|| (chunk << c.shift, 1u64 << c.shift))
        });
        self.bitmaps[block].clear(page);
        self.block = block;
        self.page = page + 1;
        Some(Found { block, page, clear })
    }

    /// Takes page `page` of `block` out of turn (a postcopy request): true
    /// if it was still to be sent. The position does not move.
    pub fn take(&mut self, block: usize, page: u64) -> bool {
        self.bitmaps.get_mut(block).is_some_and(|b| b.clear(page))
    }

    /// Postcopy recovery: `bitmaps` (one per block, same sizes) are what
    /// is left to send; the walk starts over at the first block. Rounds,
    /// the bulk stage and pending chunk clears stay as they were.
    pub fn restart(&mut self, bitmaps: Vec<DirtyBitmap>) {
        self.bitmaps = bitmaps;
        self.block = 0;
        self.page = 0;
    }

    /// Continues the walk at `page` of `block` (locality after a request).
    pub fn seek(&mut self, block: usize, page: u64) {
        if block < self.bitmaps.len() {
            self.block = block;
            self.page = page;
        }
    }
}

/// log2 pages per window of [`Untouched`] (2^16 pages = 256 MiB).
const WINDOW_SHIFT: u32 = 16;

/// Which pages of the bulk stage were never written, looked up window by
/// window as the walk reaches them: those are zero and need not be read.
///
/// Sound because a window is looked up after the dirty tracker started
/// (and after any manual clear of its pages, see [`Untouched::forget`]):
/// a page written after the look-up is in the tracker's log, so it is sent
/// again after the next sync, exactly as if it had been read before the
/// write.
pub(super) struct Untouched {
    /// Off: the memory is not private anonymous or the kernel cannot say.
    enabled: bool,
    /// The window looked up last: block, first page, pages that may hold
    /// data (bit set).
    window: Option<(usize, u64, DirtyBitmap)>,
}

impl Untouched {
    /// Looks pages up only when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Untouched {
            enabled,
            window: None,
        }
    }

    /// Drops what was looked up (a manual clear re-protected pages: a write
    /// before it may be missing from the log, so look again after it).
    pub fn forget(&mut self) {
        self.window = None;
    }

    /// True when page `page` of `block` (of `region`) was never written,
    /// as far as the kernel said when its window was looked up.
    pub fn is_untouched(
        &mut self,
        block: usize,
        page: u64,
        region: &crate::sys::mmap::RawRegion,
        backing: Option<&crate::memory::BlockBacking>,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let first = page >> WINDOW_SHIFT << WINDOW_SHIFT;
        let hit = matches!(&self.window, Some((b, f, _)) if *b == block && *f == first);
        if !hit {
            let total = region.len() as u64 / crate::PAGE_SIZE as u64;
            let n = (total.saturating_sub(first)).min(1 << WINDOW_SHIFT);
            let ps = crate::PAGE_SIZE as u64;
            let ranges = match backing {
                Some(bk) => file_data(bk, first * ps, n * ps),
                None => region.populated((first * ps) as usize, (n * ps) as usize),
            };
            let Some(ranges) = ranges else {
                // Not knowable for this memory: stop asking.
                self.enabled = false;
                self.window = None;
                return false;
            };
            let mut bm = DirtyBitmap::new(n);
            for (a, b) in ranges {
                let (a, b) = (a as u64 / ps, (b as u64).div_ceil(ps));
                bm.set_range(a - first, b - a);
            }
            self.window = Some((block, first, bm));
        }
        match &self.window {
            Some((_, f, bm)) => !bm.test(page - f),
            None => false,
        }
    }
}

/// Ranges (offsets in the block) of `[offset, offset + len)` of a
/// file-backed block that may hold data: the file's holes were never
/// written. `None` when the file cannot say.
fn file_data(
    bk: &crate::memory::BlockBacking,
    offset: u64,
    len: u64,
) -> Option<Vec<(usize, usize)>> {
    match crate::sys::residency::file_data(&bk.file, bk.offset + offset, len) {
        Ok(Some(v)) => Some(
            v.into_iter()
                .map(|(a, b)| ((a - bk.offset) as usize, (b - bk.offset) as usize))
                .collect(),
        ),
        Ok(None) => None,
        Err(e) => {
            log::debug!("cannot tell which pages of the memory file were written: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_pages_are_those_never_written() {
        use crate::sys::mmap::{AnonMapping, RawRegion};
        const P: usize = crate::PAGE_SIZE;
        // Two windows and a bit, so the look-up moves between windows.
        let pages = (2usize << WINDOW_SHIFT) + 8;
        let m = AnonMapping::new(pages * P).unwrap();
        m.advise(0, pages * P, libc::MADV_NOHUGEPAGE).unwrap();
        let r = RawRegion::from_mapping(std::sync::Arc::new(m));
        if r.populated(0, P).is_none() {
            eprintln!("skipped: this kernel cannot say which pages were written");
            return;
        }
        let written = [1usize, 7, (1 << WINDOW_SHIFT) + 3, pages - 1];
        for &p in &written {
            assert!(r.write(p * P + 5, &[9]));
        }
        let mut u = Untouched::new(true);
        for p in 0..pages {
            assert_eq!(
                u.is_untouched(0, p as u64, &r, None),
                !written.contains(&p),
                "page {p}"
            );
        }
        // A window looked up stays as it was until forgotten (the dirty
        // tracker has the later write).
        assert!(u.is_untouched(0, 0, &r, None));
        assert!(r.write(2 * P, &[1]));
        assert!(u.is_untouched(0, 2, &r, None));
        u.forget();
        assert!(!u.is_untouched(0, 2, &r, None));
        let mut off = Untouched::new(false);
        assert!(!off.is_untouched(0, 3, &r, None));
    }

    #[test]
    fn untouched_pages_of_a_memory_file_are_its_holes() {
        use crate::memory::{GuestMemory, ProcessMemory};
        const P: usize = crate::PAGE_SIZE;
        let pages = (1usize << WINDOW_SHIFT) + 5;
        let mem = ProcessMemory::new_memfd(&[("ram", (pages * P) as u64)]).unwrap();
        let block = &mem.blocks()[0];
        let bk = block.backing().expect("memfd block");
        let r = block.region();
        let written = [0usize, 9, 1 << WINDOW_SHIFT, pages - 1];
        for &p in &written {
            assert!(r.write(p * P + 100, &[7]));
        }
        // Reading a hole through the shared mapping allocates a page in
        // the file: a page only read counts as data (never wrongly zero).
        let mut b = [0u8; 1];
        assert!(r.read(4 * P, &mut b));
        let mut u = Untouched::new(true);
        for p in 0..pages {
            let data = written.contains(&p) || p == 4;
            assert_eq!(u.is_untouched(0, p as u64, r, Some(bk)), !data, "page {p}");
        }
    }

    fn drain(s: &mut PageSearch) -> Vec<(usize, u64)> {
        std::iter::from_fn(|| s.take_next().map(|f| (f.block, f.page))).collect()
    }

    #[test]
    fn bulk_sends_every_page_once_in_order_then_ends() {
        let mut s = PageSearch::new([3, 2]);
        assert_eq!(s.remaining(), 5);
        assert!(s.is_bulk());
        assert_eq!(drain(&mut s), vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
        assert_eq!(s.remaining(), 0);
        assert!(!s.is_bulk(), "wrapping around ends the bulk stage");
        assert_eq!(s.rounds(), 1);
        assert_eq!(s.take_next(), None);
    }

    #[test]
    fn continues_from_the_position_and_wraps_for_pages_behind_it() {
        let mut s = PageSearch::new([4]);
        assert_eq!(s.take_next().map(|f| f.page), Some(0));
        assert_eq!(s.take_next().map(|f| f.page), Some(1));
        // A sync reports page 0 dirty again, behind the position.
        s.bitmaps_mut()[0].set(0);
        s.synced();
        assert_eq!(drain(&mut s), vec![(0, 2), (0, 3), (0, 0)]);
        // Wrapped once to reach page 0, once more to find nothing left.
        assert_eq!(s.rounds(), 2);
    }

    #[test]
    fn empty_layout_and_out_of_range_requests() {
        let mut s = PageSearch::new(std::iter::empty());
        assert_eq!(s.take_next(), None);
        assert!(!s.take(0, 0));
        let mut s = PageSearch::new([2]);
        assert!(!s.take(1, 0), "no block 1");
        assert!(!s.take(0, 2), "no page 2");
        assert!(s.take(0, 1));
        assert!(!s.take(0, 1), "a page is taken once");
        assert_eq!(drain(&mut s), vec![(0, 0)]);
    }

    #[test]
    fn restart_walks_what_is_left_from_the_start() {
        let mut s = PageSearch::new([4, 4]);
        assert_eq!(s.take_next().map(|f| f.page), Some(0));
        s.seek(1, 2);
        let mut left = vec![DirtyBitmap::new(4), DirtyBitmap::new(4)];
        left[0].set(3);
        left[1].set(1);
        s.restart(left);
        assert_eq!(s.remaining(), 2);
        assert_eq!(drain(&mut s), vec![(0, 3), (1, 1)]);
    }

    #[test]
    fn seek_moves_the_walk_after_a_request() {
        let mut s = PageSearch::new([8]);
        assert!(s.take(0, 5));
        s.seek(0, 6);
        assert_eq!(
            drain(&mut s),
            vec![(0, 6), (0, 7), (0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
        );
    }

    #[test]
    fn initially_set_chunks_are_cleared_once_before_their_first_page() {
        let mut s = PageSearch::new([10]);
        s.clear_chunks(2, true);
        let found: Vec<Found> = std::iter::from_fn(|| s.take_next()).collect();
        let clears: Vec<(u64, Option<(u64, u64)>)> =
            found.iter().map(|f| (f.page, f.clear)).collect();
        assert_eq!(
            clears,
            vec![
                (0, Some((0, 4))),
                (1, None),
                (2, None),
                (3, None),
                (4, Some((4, 4))),
                (5, None),
                (6, None),
                (7, None),
                (8, Some((8, 4))),
                (9, None),
            ]
        );
    }

    #[test]
    fn a_sync_marks_only_chunks_with_dirty_pages() {
        let mut s = PageSearch::new([12]);
        s.clear_chunks(2, false);
        assert!(drain(&mut s).len() == 12);
        s.bitmaps_mut()[0].set(5);
        s.bitmaps_mut()[0].set(6);
        s.bitmaps_mut()[0].set(11);
        s.synced();
        let found: Vec<Found> = std::iter::from_fn(|| s.take_next()).collect();
        let clears: Vec<(u64, Option<(u64, u64)>)> =
            found.iter().map(|f| (f.page, f.clear)).collect();
        assert_eq!(
            clears,
            vec![(5, Some((4, 4))), (6, None), (11, Some((8, 4)))]
        );
    }
}
