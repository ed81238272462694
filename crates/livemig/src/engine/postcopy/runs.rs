//! Runs of pages placed with one ioctl on the destination.
//!
//! After the switch the background push goes through memory in order, so
//! its pages come as runs: page p of a block, then p+1, ... Placing each
//! page with its own `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` costs one ioctl per
//! page (most of the postcopy phase on a nested-virtualization host, where
//! a system call costs microseconds); a [`Run`] gathers consecutive pages
//! of one kind and the placer places them with one ioctl. The stream's
//! section end (the source ends one after every batch, and right after
//! each requested page) places whatever is gathered, so a page a guest
//! thread waits for is never held back longer than its section.

use crate::memory::PAGE_SIZE;

/// Most pages one run gathers (1 MiB of page data).
pub(crate) const MAX_RUN_PAGES: u64 = 256;

/// What a run holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Zero pages: no data.
    Zero,
    /// Pages with data (raw, or decompressed).
    Data,
}

/// Consecutive pages of one block and one kind, not placed yet.
#[derive(Debug)]
pub(crate) struct Run {
    block: usize,
    first: u64,
    pages: u64,
    kind: RunKind,
    /// The data pages' bytes, `pages * PAGE_SIZE` of them (Data only).
    data: Vec<u8>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            block: 0,
            first: 0,
            pages: 0,
            kind: RunKind::Zero,
            data: Vec::with_capacity(MAX_RUN_PAGES as usize * PAGE_SIZE),
        }
    }
}

/// A gathered run handed to the placer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Placed<'a> {
    /// Stream block index.
    pub block: usize,
    /// First page.
    pub first: u64,
    /// Pages.
    pub pages: u64,
    /// The pages' bytes (`None`: zeros).
    pub data: Option<&'a [u8]>,
}

impl Run {
    /// True when nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Whether page `page` of `block`, of `kind`, extends the run (it
    /// follows the last page, same block and kind, and the run is not
    /// full). An empty run takes any page.
    pub fn extends(&self, block: usize, page: u64, kind: RunKind) -> bool {
        self.is_empty()
            || (self.block == block
                && self.kind == kind
                && self.first + self.pages == page
                && self.pages < MAX_RUN_PAGES)
    }

    /// Adds a page; the caller checked [`Run::extends`] (or emptied the
    /// run). For a data page, `fill` writes its `PAGE_SIZE` bytes into the
    /// slice it gets (a decompressor, or a copy) and may fail: the run is
    /// then left as it was.
    pub fn push<E>(
        &mut self,
        block: usize,
        page: u64,
        kind: RunKind,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        debug_assert!(self.extends(block, page, kind));
        if kind == RunKind::Data {
            let at = self.data.len();
            self.data.resize(at + PAGE_SIZE, 0);
            if let Err(e) = fill(&mut self.data[at..]) {
                self.data.truncate(at);
                return Err(e);
            }
        }
        if self.is_empty() {
            self.block = block;
            self.first = page;
            self.kind = kind;
        }
        self.pages += 1;
        Ok(())
    }

    /// The run gathered so far (`None` when empty); [`Run::clear`] after
    /// placing it.
    pub fn take(&self) -> Option<Placed<'_>> {
        (!self.is_empty()).then(|| Placed {
            block: self.block,
            first: self.first,
            pages: self.pages,
            data: (self.kind == RunKind::Data).then_some(&self.data[..]),
        })
    }

    /// Empties the run (keeps its buffer).
    pub fn clear(&mut self) {
        self.pages = 0;
        self.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: u8) -> impl FnOnce(&mut [u8]) -> Result<(), ()> {
        move |d: &mut [u8]| {
            d.fill(v);
            Ok(())
        }
    }

    #[test]
    fn consecutive_pages_of_one_kind_make_one_run() {
        let mut r = Run::default();
        assert!(r.take().is_none());
        for p in 10..14 {
            assert!(r.extends(1, p, RunKind::Data));
            r.push(1, p, RunKind::Data, ok(p as u8)).unwrap();
        }
        let t = r.take().unwrap();
        assert_eq!((t.block, t.first, t.pages), (1, 10, 4));
        let d = t.data.unwrap();
        assert_eq!(d.len(), 4 * PAGE_SIZE);
        assert_eq!(d[0], 10);
        assert_eq!(d[3 * PAGE_SIZE], 13);
        r.clear();
        assert!(r.is_empty() && r.take().is_none());
    }

    #[test]
    fn a_gap_another_block_or_another_kind_ends_a_run() {
        let mut r = Run::default();
        r.push(0, 5, RunKind::Zero, ok(0)).unwrap();
        assert!(r.extends(0, 6, RunKind::Zero));
        assert!(!r.extends(0, 7, RunKind::Zero), "a gap");
        assert!(!r.extends(0, 4, RunKind::Zero), "backwards");
        assert!(!r.extends(1, 6, RunKind::Zero), "another block");
        assert!(!r.extends(0, 6, RunKind::Data), "another kind");
        // Zero runs carry no data.
        r.push(0, 6, RunKind::Zero, ok(0)).unwrap();
        assert_eq!(
            r.take(),
            Some(Placed {
                block: 0,
                first: 5,
                pages: 2,
                data: None
            })
        );
    }

    #[test]
    fn a_run_stops_at_its_size_cap() {
        let mut r = Run::default();
        for p in 0..MAX_RUN_PAGES {
            assert!(r.extends(0, p, RunKind::Zero));
            r.push(0, p, RunKind::Zero, ok(0)).unwrap();
        }
        assert!(!r.extends(0, MAX_RUN_PAGES, RunKind::Zero));
        assert_eq!(r.take().unwrap().pages, MAX_RUN_PAGES);
    }

    #[test]
    fn a_page_that_fails_to_fill_leaves_the_run_as_it_was() {
        let mut r = Run::default();
        r.push(2, 0, RunKind::Data, ok(7)).unwrap();
        let e = r.push(2, 1, RunKind::Data, |_: &mut [u8]| Err("corrupt"));
        assert_eq!(e, Err("corrupt"));
        let t = r.take().unwrap();
        assert_eq!(t.pages, 1);
        assert_eq!(t.data.unwrap().len(), PAGE_SIZE);
        // A failed first page leaves it empty.
        let mut r = Run::default();
        assert!(r.push(0, 9, RunKind::Data, |_: &mut [u8]| Err(())).is_err());
        assert!(r.is_empty());
    }
}
