//! Page search: which page the source sends next.
//!
//! [`PageSearch`] owns the migration bitmap (one per RAM block, set = must
//! be sent), the position the walk continues from, the round count and the
//! bulk stage, and — for trackers whose log is cleared chunk by chunk
//! (KVM manual protect) — the chunks whose log must be cleared before
//! their next page goes out. It knows nothing of encoders, streams or
//! timing: the saver asks it for the next page, sends it, and feeds it the
//! tracker's harvest at each sync.
//!
//! Hot pages. A page the tracker reported at each of the last two syncs is
//! likely to be written again before the next one: sent early in a round,
//! it would only be sent again. So a round first sends every other page,
//! and the hot ones only once no other page is left; a sync that comes
//! before then merges them with its harvest (one send instead of two), and
//! what is still left at the switch-over goes in the pause, as every
//! remaining page does. Deferring never drops a page: the remaining count,
//! and so the switch-over decision, include the hot pages.

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
    /// The previous sync's harvest, per block (empty until the first
    /// harvest after the bulk stage).
    prev_report: Vec<DirtyBitmap>,
    /// Pages reported at each of the last two syncs, per block: sent last
    /// in a round.
    hot: Vec<DirtyBitmap>,
    /// The walk has found no other page left: hot pages go now.
    hot_turn: bool,
    /// Hot pages are deferred (on by default).
    defer_hot: bool,
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
            prev_report: Vec::new(),
            hot: Vec::new(),
            hot_turn: false,
            defer_hot: true,
        }
    }

    /// Turns deferring hot pages on or off (on by default).
    #[cfg(test)]
    pub fn set_defer_hot(&mut self, on: bool) {
        self.defer_hot = on;
        if !on {
            self.hot.clear();
            self.hot_turn = false;
        }
    }

    /// Adds a sync's harvest (`report`, one bitmap per block, the pages
    /// written since the previous sync) to the pages to send, and updates
    /// the hot pages: those in this harvest and the previous one. Returns
    /// the pages that became set. Call [`PageSearch::synced`] after.
    pub fn add_report(&mut self, report: &[DirtyBitmap]) -> u64 {
        let mut newly = 0;
        for (bm, r) in self.bitmaps.iter_mut().zip(report) {
            newly += bm.or_words(0, r.words());
        }
        // Hot pages only mean something once the bulk stage is over (it
        // sends every page once, in order).
        if self.defer_hot && !self.bulk {
            if self.prev_report.len() == report.len() {
                self.hot.resize_with(report.len(), || DirtyBitmap::new(0));
                for ((h, p), r) in self.hot.iter_mut().zip(&self.prev_report).zip(report) {
                    if h.len() != r.len() {
                        *h = DirtyBitmap::new(r.len());
                    }
                    h.assign_and(p, r);
                }
            }
            self.prev_report
                .resize_with(report.len(), || DirtyBitmap::new(0));
            for (p, r) in self.prev_report.iter_mut().zip(report) {
                p.copy_from(r);
            }
        }
        self.hot_turn = false;
        newly
    }

    /// Hot pages (reported at each of the last two syncs) still to send.
    pub fn hot_remaining(&self) -> u64 {
        self.bitmaps
            .iter()
            .zip(&self.hot)
            .map(|(b, h)| {
                let mut n = 0;
                for (x, y) in b.words().iter().zip(h.words()) {
                    n += u64::from((x & y).count_ones());
                }
                n
            })
            .sum()
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
    /// left. Does not take it. Hot pages come only once a wrap found no
    /// other page left.
    fn next_dirty(&mut self) -> Option<(usize, u64)> {
        let nblocks = self.bitmaps.len();
        if nblocks == 0 {
            return None;
        }
        // The rest of this pass, one full pass for the other pages, then
        // one for the hot ones.
        for _ in 0..3 * nblocks + 3 {
            let bm = &self.bitmaps[self.block];
            let found = match self.hot.get(self.block) {
                Some(h) if !self.hot_turn => bm.next_set_except(self.page, h),
                _ => bm.next_set(self.page),
            };
            if let Some(p) = found {
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
                if !self.hot_turn && !self.hot.is_empty() {
                    // Whatever is left now: hot pages (and, after a wrap
                    // that passed some cold ones, those too).
                    self.hot_turn = self.remaining() == self.hot_remaining();
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

    /// Bulk stage: takes the pages of `block` from `page` on that are
    /// still to be sent, while they follow one another, at most `max` of
    /// them and never into a chunk whose log must be cleared first (that
    /// chunk's first page comes from [`PageSearch::take_next`]). Moves the
    /// position past them; returns how many it took. Takes nothing after
    /// the bulk stage (hot pages and rounds order what is sent then).
    pub fn take_run(&mut self, block: usize, page: u64, max: u64) -> u64 {
        if !self.bulk || block >= self.bitmaps.len() {
            return 0;
        }
        let max = match &self.clear {
            // Up to the end of `page`'s chunk, and nothing if that chunk
            // is still to be cleared.
            Some(c) if c.pending[block].test(page >> c.shift) => 0,
            Some(c) => max.min((((page >> c.shift) + 1) << c.shift) - page),
            None => max,
        };
        let n = self.bitmaps[block].take_run(page, max);
        if n > 0 {
            self.block = block;
            self.page = page + n;
        }
        n
    }

    /// Takes page `page` of `block` out of turn (a postcopy request): true
    /// if it was still to be sent. The position does not move.
    pub fn take(&mut self, block: usize, page: u64) -> bool {
        self.bitmaps.get_mut(block).is_some_and(|b| b.clear(page))
    }

    /// Takes every page of `block` set in `pages` (one bit per page of the
    /// block) out of turn: they need not be sent (any more). Returns how
    /// many were still to be sent. The position does not move.
    pub fn take_all(&mut self, block: usize, pages: &DirtyBitmap) -> u64 {
        match self.bitmaps.get_mut(block) {
            Some(b) if b.len() == pages.len() => b.and_not_words(0, pages.words()),
            _ => 0,
        }
    }

    /// Postcopy recovery: `bitmaps` (one per block, same sizes) are what
    /// is left to send; the walk starts over at the first block. Rounds,
    /// the bulk stage and pending chunk clears stay as they were.
    pub fn restart(&mut self, bitmaps: Vec<DirtyBitmap>) {
        self.bitmaps = bitmaps;
        self.block = 0;
        self.page = 0;
    }

    /// Where the walk goes on from: block, page.
    pub fn position(&self) -> (usize, u64) {
        (self.block, self.page)
    }

    /// A second walk (postcopy's push behind the sweep): takes the next
    /// page still to send at or after `pos` (block, page) and before `end`,
    /// in address order without wrapping, and moves `pos` past it. The
    /// main walk's position, rounds and bulk stage are left as they are;
    /// a page either walk takes is gone for the other. None once nothing
    /// is left before `end` (`pos` then stays at `end`).
    pub fn take_next_before(
        &mut self,
        pos: &mut (usize, u64),
        end: (usize, u64),
    ) -> Option<(usize, u64)> {
        while *pos < end && pos.0 < self.bitmaps.len() {
            let (b, from) = *pos;
            let stop = if b == end.0 {
                end.1
            } else {
                self.bitmaps[b].len()
            };
            match self.bitmaps[b].next_set(from).filter(|&p| p < stop) {
                Some(p) => {
                    self.bitmaps[b].clear(p);
                    *pos = (b, p + 1);
                    return Some((b, p));
                }
                None if b == end.0 => *pos = end,
                None => *pos = (b + 1, 0),
            }
        }
        None
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

    /// How many pages from `page` of block number `block` (`ram`) on,
    /// within the window looked up for it, were never written (0 when
    /// `page` was), as [`Untouched::is_untouched`] would say of each.
    pub fn untouched_run(&mut self, block: usize, page: u64, ram: &crate::memory::RamBlock) -> u64 {
        if !self.is_untouched(block, page, ram) {
            return 0;
        }
        match &self.window {
            Some((_, f, bm)) => bm.next_set(page - f).unwrap_or(bm.len()) - (page - f),
            None => 0,
        }
    }

    /// True when page `page` of block number `block` (`ram`) was never
    /// written, as far as the kernel said when its window was looked up.
    pub fn is_untouched(&mut self, block: usize, page: u64, ram: &crate::memory::RamBlock) -> bool {
        if !self.enabled {
            return false;
        }
        let first = page >> WINDOW_SHIFT << WINDOW_SHIFT;
        let hit = matches!(&self.window, Some((b, f, _)) if *b == block && *f == first);
        if !hit {
            let n = ram.pages().saturating_sub(first).min(1 << WINDOW_SHIFT);
            let Some(bm) = ram.data_pages(first, n) else {
                // Not knowable for this memory: stop asking.
                self.enabled = false;
                self.window = None;
                return false;
            };
            self.window = Some((block, first, bm));
        }
        match &self.window {
            Some((_, f, bm)) => !bm.test(page - f),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_all_takes_the_pages_given() {
        let mut s = PageSearch::new([130, 10]);
        let mut give = DirtyBitmap::new(130);
        for p in [0, 5, 63, 64, 129] {
            give.set(p);
        }
        // Page 5 went already: it is not counted again.
        assert!(s.take(0, 5));
        assert_eq!(s.take_all(0, &give), 4);
        assert_eq!(s.bitmaps()[0].count(), 130 - 5);
        for p in [0, 5, 63, 64, 129] {
            assert!(!s.bitmaps()[0].test(p));
        }
        assert!(s.bitmaps()[0].test(1) && s.bitmaps()[0].test(128));
        // A bitmap of another size is no answer.
        assert_eq!(s.take_all(1, &give), 0);
        assert_eq!(s.bitmaps()[1].count(), 10);
    }

    #[test]
    fn a_second_walk_takes_pages_in_order_up_to_its_end_and_leaves_the_first_alone() {
        let mut s = PageSearch::new([100, 50]);
        s.seek(1, 10);
        let before = (s.position(), s.rounds(), s.is_bulk());
        let mut pos = (0, 95);
        let mut got = Vec::new();
        while let Some(f) = s.take_next_before(&mut pos, (1, 3)) {
            got.push(f);
        }
        assert_eq!(
            got,
            [
                (0, 95),
                (0, 96),
                (0, 97),
                (0, 98),
                (0, 99),
                (1, 0),
                (1, 1),
                (1, 2)
            ]
        );
        assert_eq!(pos, (1, 3));
        assert_eq!((s.position(), s.rounds(), s.is_bulk()), before);
        // Taken pages are gone for the main walk, and the other way round.
        assert!(!s.take(0, 97));
        assert!(s.take(0, 5));
        let mut pos = (0, 0);
        assert_eq!(s.take_next_before(&mut pos, (0, 10)), Some((0, 0)));
        assert_eq!(s.take_next_before(&mut pos, (0, 10)), Some((0, 1)));
        let mut pos = (0, 5);
        assert_eq!(
            s.take_next_before(&mut pos, (0, 7)),
            Some((0, 6)),
            "page 5 was taken"
        );
        // Nothing before the end: None, and the position stays at the end.
        let mut pos = (0, 95);
        assert_eq!(s.take_next_before(&mut pos, (1, 3)), None);
        assert_eq!(pos, (1, 3));
        // An end past the last block stops at the last block's end.
        let mut pos = (1, 48);
        assert_eq!(s.take_next_before(&mut pos, (7, 0)), Some((1, 48)));
        assert_eq!(s.take_next_before(&mut pos, (7, 0)), Some((1, 49)));
        assert_eq!(s.take_next_before(&mut pos, (7, 0)), None);
        // The main walk still finds what is left, from where it was.
        assert_eq!(s.take_next().map(|f| (f.block, f.page)), Some((1, 10)));
    }

    #[test]
    fn untouched_pages_are_those_never_written() {
        use crate::sys::mmap::{AnonMapping, RawRegion};
        const P: usize = crate::PAGE_SIZE;
        // Two windows and a bit, so the look-up moves between windows.
        let pages = (2usize << WINDOW_SHIFT) + 8;
        let m = AnonMapping::new(pages * P).unwrap();
        m.advise(0, pages * P, libc::MADV_NOHUGEPAGE).unwrap();
        let r = RawRegion::from_mapping(std::sync::Arc::new(m));
        let ram = crate::memory::RamBlock::new("ram", r.clone()).unwrap();
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
                u.is_untouched(0, p as u64, &ram),
                !written.contains(&p),
                "page {p}"
            );
        }
        // A window looked up stays as it was until forgotten (the dirty
        // tracker has the later write).
        assert!(u.is_untouched(0, 0, &ram));
        assert!(r.write(2 * P, &[1]));
        assert!(u.is_untouched(0, 2, &ram));
        u.forget();
        assert!(!u.is_untouched(0, 2, &ram));
        let mut off = Untouched::new(false);
        assert!(!off.is_untouched(0, 3, &ram));
    }

    #[test]
    fn untouched_pages_of_a_memory_file_are_its_holes() {
        use crate::memory::{GuestMemory, ProcessMemory};
        const P: usize = crate::PAGE_SIZE;
        let pages = (1usize << WINDOW_SHIFT) + 5;
        let mem = ProcessMemory::new_memfd(&[("ram", (pages * P) as u64)]).unwrap();
        let block = &mem.blocks()[0];
        assert!(block.backing().is_some(), "memfd block");
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
            assert_eq!(u.is_untouched(0, p as u64, block), !data, "page {p}");
        }
    }

    /// A harvest of `len` pages with `pages` set.
    fn report(len: u64, pages: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(len);
        for &p in pages {
            b.set(p);
        }
        b
    }

    /// Ends the bulk stage of a one-block search of `len` pages.
    fn after_bulk(len: u64) -> PageSearch {
        let mut s = PageSearch::new([len]);
        assert_eq!(drain(&mut s).len() as u64, len);
        assert!(!s.is_bulk());
        s
    }

    #[test]
    fn pages_dirty_at_the_last_two_syncs_go_last_in_the_round() {
        let mut s = after_bulk(8);
        s.add_report(&[report(8, &[1, 2, 5])]);
        // One harvest says nothing about heat: plain order.
        assert_eq!(s.hot_remaining(), 0);
        assert_eq!(drain(&mut s), vec![(0, 1), (0, 2), (0, 5)]);
        s.add_report(&[report(8, &[0, 2, 5, 7])]);
        // 2 and 5 were in both harvests: after every other page, even
        // though the walk passes them first.
        assert_eq!(s.hot_remaining(), 2);
        assert_eq!(s.remaining(), 4, "deferred pages still count");
        assert_eq!(drain(&mut s), vec![(0, 0), (0, 7), (0, 2), (0, 5)]);
        assert_eq!(s.remaining(), 0);
    }

    #[test]
    fn a_sync_before_the_hot_turn_merges_hot_pages_instead_of_resending() {
        let mut s = after_bulk(8);
        s.add_report(&[report(8, &[3, 4])]);
        assert_eq!(drain(&mut s).len(), 2);
        s.add_report(&[report(8, &[1, 3, 4, 6])]);
        // Cold pages first; the sync comes while only hot ones are left.
        assert_eq!(s.take_next().map(|f| f.page), Some(1));
        assert_eq!(s.take_next().map(|f| f.page), Some(6));
        s.add_report(&[report(8, &[3, 4, 6])]);
        // 3 and 4 were never sent twice: one copy each, after the cold 6
        // of this round... which is hot now too (in the last two).
        assert_eq!(s.remaining(), 3);
        assert_eq!(s.hot_remaining(), 3);
        assert_eq!(drain(&mut s), vec![(0, 3), (0, 4), (0, 6)]);
    }

    #[test]
    fn a_page_cools_down_when_a_sync_misses_it_and_bulk_has_no_hot_pages() {
        let mut s = PageSearch::new([6]);
        // A sync during the bulk stage: nothing is hot, order stays.
        assert_eq!(s.take_next().map(|f| f.page), Some(0));
        s.add_report(&[report(6, &[0, 4])]);
        s.add_report(&[report(6, &[0, 4])]);
        assert_eq!(s.hot_remaining(), 0);
        assert_eq!(
            drain(&mut s),
            vec![(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 0)]
        );
        s.add_report(&[report(6, &[2, 3])]);
        s.add_report(&[report(6, &[3, 5])]);
        assert_eq!(drain(&mut s), vec![(0, 2), (0, 5), (0, 3)]);
        s.add_report(&[report(6, &[1, 2])]);
        // 3 was missed by this harvest: no longer hot.
        assert_eq!(s.hot_remaining(), 0);
        assert_eq!(drain(&mut s), vec![(0, 1), (0, 2)]);
    }

    #[test]
    fn hot_pages_across_blocks_and_with_deferring_off() {
        let mut s = PageSearch::new([4, 4]);
        assert_eq!(drain(&mut s).len(), 8);
        let r = [report(4, &[0, 3]), report(4, &[1])];
        s.add_report(&r);
        drain(&mut s);
        s.add_report(&[report(4, &[0, 2]), report(4, &[1, 3])]);
        assert_eq!(drain(&mut s), vec![(0, 2), (1, 3), (0, 0), (1, 1)]);
        let mut s = PageSearch::new([4, 4]);
        s.set_defer_hot(false);
        drain(&mut s);
        s.add_report(&r);
        drain(&mut s);
        s.add_report(&[report(4, &[0, 2]), report(4, &[1, 3])]);
        assert_eq!(drain(&mut s), vec![(0, 0), (0, 2), (1, 1), (1, 3)]);
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
        s.add_report(&[report(4, &[0])]);
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
        s.add_report(&[report(12, &[5, 6, 11])]);
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
