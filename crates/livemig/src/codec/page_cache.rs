//! The XBZRLE page cache: the last copy of each page the source sent, so
//! the next send can be a delta against it.
//!
//! Semantics follow QEMU's migration/page_cache.c:
//! * Direct-mapped: the slot of an address is `(addr / 4096) % capacity`,
//!   and the capacity is the size in pages rounded down to a power of two.
//!   A hit needs the slot to hold exactly that address.
//! * Each entry carries the generation (the dirty-sync count) in which it
//!   was last inserted or hit. An insert for another address does not evict
//!   an entry that is still fresh, i.e. stamped in the current or the
//!   previous generation (QEMU: `age + CACHED_PAGE_LIFETIME(2) > current`).
//!   An insert for the same address always overwrites.
//! * Page buffers are allocated on first insert into a slot (an allocation
//!   failure makes that insert fail, not the process); only the slot table
//!   is allocated up front, fallibly (32 bytes per slot).
//! * [`PageCache::resize`] moves every entry to its slot in the new table;
//!   when two collide, the more recently stamped one stays (QEMU's former
//!   `cache_resize`; newer QEMU drops the cache on resize instead).

use crate::memory::{PAGE_SHIFT, PAGE_SIZE};

/// Generations an entry stays fresh: the one it was stamped in and the next.
const CACHED_PAGE_LIFETIME: u64 = 2;

/// Errors of creating or resizing a [`PageCache`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The size is below one page.
    #[error("xbzrle cache size {size} is smaller than a page ({PAGE_SIZE} bytes)")]
    TooSmall {
        /// Requested size in bytes.
        size: u64,
    },
    /// The slot table for the requested size could not be allocated.
    #[error("cannot allocate an xbzrle cache of {size} bytes ({pages} pages)")]
    Alloc {
        /// Requested size in bytes.
        size: u64,
        /// Pages the cache would hold.
        pages: u64,
    },
}

/// One cache slot.
#[derive(Default)]
struct Slot {
    /// Address of the cached page; meaningful only when `data` is set.
    addr: u64,
    /// Generation of the last insert or hit.
    age: u64,
    /// The cached page, `PAGE_SIZE` bytes.
    data: Option<Box<[u8]>>,
}

/// A direct-mapped cache of page copies keyed by RAM address.
pub struct PageCache {
    slots: Vec<Slot>,
    size_bytes: u64,
    /// Slots holding a page.
    used: usize,
    /// Highest generation seen, used to stamp hits found by [`Self::get_mut`].
    generation: u64,
}

impl std::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageCache")
            .field("size_bytes", &self.size_bytes)
            .field("capacity_pages", &self.slots.len())
            .field("len", &self.used)
            .field("generation", &self.generation)
            .finish()
    }
}

impl PageCache {
    /// An empty cache of `size_bytes` (its page count rounded down to a
    /// power of two). Fails if that is below one page, or if the slot table
    /// cannot be allocated.
    pub fn new(size_bytes: u64) -> Result<PageCache, CacheError> {
        Ok(PageCache {
            slots: Self::table(size_bytes)?,
            size_bytes,
            used: 0,
            generation: 0,
        })
    }

    /// Allocates an empty slot table for `size_bytes`.
    fn table(size_bytes: u64) -> Result<Vec<Slot>, CacheError> {
        let pages = Self::pages_for(size_bytes)?;
        let alloc = CacheError::Alloc {
            size: size_bytes,
            pages,
        };
        let n = usize::try_from(pages).map_err(|_| alloc.clone())?;
        let mut slots = Vec::new();
        slots.try_reserve_exact(n).map_err(|_| alloc)?;
        slots.resize_with(n, Slot::default);
        Ok(slots)
    }

    /// Page count of a cache of `size_bytes`: a power of two.
    fn pages_for(size_bytes: u64) -> Result<u64, CacheError> {
        let pages = size_bytes >> PAGE_SHIFT;
        if pages == 0 {
            return Err(CacheError::TooSmall { size: size_bytes });
        }
        Ok(1 << pages.ilog2())
    }

    /// The size as configured (the capacity may be smaller, see
    /// [`Self::capacity_pages`]).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Pages the cache can hold: a power of two.
    pub fn capacity_pages(&self) -> usize {
        self.slots.len()
    }

    /// Pages currently cached.
    pub fn len(&self) -> usize {
        self.used
    }

    /// True when no page is cached.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The highest generation passed to [`Self::insert`] or
    /// [`Self::get_mut_at`] so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Slot index of `addr`.
    fn slot_of(&self, addr: u64) -> usize {
        // The capacity is a power of two, so the mask keeps the index below
        // it and the cast back to usize is lossless.
        ((addr >> PAGE_SHIFT) & (self.slots.len() as u64 - 1)) as usize
    }

    /// The cached copy of the page at `addr` (one page), if the cache holds
    /// it. A hit re-stamps the entry with the highest generation seen so
    /// far; [`Self::get_mut_at`] stamps with an explicit generation, as
    /// QEMU's `cache_is_cached` does.
    pub fn get_mut(&mut self, addr: u64) -> Option<&mut [u8]> {
        self.get_mut_at(addr, self.generation)
    }

    /// Like [`Self::get_mut`], stamping a hit with `generation` (the
    /// current dirty-sync count).
    pub fn get_mut_at(&mut self, addr: u64, generation: u64) -> Option<&mut [u8]> {
        self.generation = self.generation.max(generation);
        let i = self.slot_of(addr);
        let slot = &mut self.slots[i];
        match &mut slot.data {
            Some(data) if slot.addr == addr => {
                slot.age = generation;
                Some(data)
            }
            _ => None,
        }
    }

    /// Drops the cached copy of the page at `addr`, if there is one: the
    /// page went out in a way that left the copy out of date.
    pub fn forget(&mut self, addr: u64) {
        let i = self.slot_of(addr);
        let slot = &mut self.slots[i];
        if slot.data.is_some() && slot.addr == addr {
            slot.data = None;
            self.used -= 1;
        }
    }

    /// True if the page at `addr` is cached (no stamping).
    pub fn contains(&self, addr: u64) -> bool {
        let slot = &self.slots[self.slot_of(addr)];
        slot.data.is_some() && slot.addr == addr
    }

    /// Caches a copy of `data` (one page) for `addr`, stamped with
    /// `generation`. Returns false, changing nothing, when the slot holds
    /// another address stamped in this or the previous generation, when
    /// `data` is not one page, or when a page buffer cannot be allocated.
    pub fn insert(&mut self, addr: u64, data: &[u8], generation: u64) -> bool {
        if data.len() != PAGE_SIZE {
            return false;
        }
        self.generation = self.generation.max(generation);
        let i = self.slot_of(addr);
        let slot = &mut self.slots[i];
        if slot.data.is_some()
            && slot.addr != addr
            && slot.age.saturating_add(CACHED_PAGE_LIFETIME) > generation
        {
            return false;
        }
        match &mut slot.data {
            Some(page) => page.copy_from_slice(data),
            None => {
                let mut page = Vec::new();
                if page.try_reserve_exact(PAGE_SIZE).is_err() {
                    return false;
                }
                page.extend_from_slice(data);
                slot.data = Some(page.into_boxed_slice());
                self.used += 1;
            }
        }
        slot.addr = addr;
        slot.age = generation;
        true
    }

    /// Changes the size to `new_size_bytes`, keeping cached pages: each
    /// moves to its slot in the new table and, when two land in one slot,
    /// the more recently stamped stays. If the capacity does not change only
    /// the recorded size does. On error the cache is unchanged.
    pub fn resize(&mut self, new_size_bytes: u64) -> Result<(), CacheError> {
        let pages = Self::pages_for(new_size_bytes)?;
        if pages == self.slots.len() as u64 {
            self.size_bytes = new_size_bytes;
            return Ok(());
        }
        let old = std::mem::replace(&mut self.slots, Self::table(new_size_bytes)?);
        self.size_bytes = new_size_bytes;
        self.used = 0;
        for slot in old {
            if slot.data.is_none() {
                continue;
            }
            let i = self.slot_of(slot.addr);
            let target = &mut self.slots[i];
            match &target.data {
                Some(_) if target.age >= slot.age => {}
                Some(_) => *target = slot,
                None => {
                    *target = slot;
                    self.used += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    #[test]
    fn sizes_round_down_to_a_power_of_two() {
        assert_eq!(
            PageCache::new(0).unwrap_err(),
            CacheError::TooSmall { size: 0 }
        );
        assert_eq!(
            PageCache::new(P - 1).unwrap_err(),
            CacheError::TooSmall { size: P - 1 }
        );
        for (size, cap) in [
            (P, 1),
            (2 * P, 2),
            (3 * P, 2),
            (5 * P - 1, 4),
            (64 << 20, 16384),
        ] {
            let c = PageCache::new(size).unwrap();
            assert_eq!(c.capacity_pages(), cap, "size {size}");
            assert_eq!(c.size_bytes(), size);
            assert_eq!(c.len(), 0);
            assert!(c.is_empty());
        }
    }

    #[test]
    fn forget_drops_only_that_page() {
        let mut c = PageCache::new(4 * P).unwrap();
        assert!(c.insert(0, &page(1), 0));
        assert!(c.insert(P, &page(2), 0));
        // Another address in the same slot as page 0: not cached, no-op.
        c.forget(4 * P);
        assert_eq!(c.len(), 2);
        c.forget(0);
        assert_eq!(c.len(), 1);
        assert!(!c.contains(0));
        assert!(c.get_mut(0).is_none());
        assert_eq!(c.get_mut(P).unwrap()[0], 2);
        c.forget(0);
        assert_eq!(c.len(), 1);
        // The slot can be filled again.
        assert!(c.insert(0, &page(3), 1));
        assert_eq!(c.get_mut(0).unwrap()[0], 3);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn huge_size_fails_cleanly() {
        let e = PageCache::new(u64::MAX).unwrap_err();
        assert!(matches!(e, CacheError::Alloc { .. }), "{e}");
        let mut c = PageCache::new(4 * P).unwrap();
        assert!(c.insert(0, &page(1), 0));
        assert!(c.resize(u64::MAX).is_err());
        assert_eq!(c.capacity_pages(), 4);
        assert_eq!(c.get_mut(0).unwrap()[0], 1);
    }

    #[test]
    fn insert_then_hit_and_miss() {
        let mut c = PageCache::new(4 * P).unwrap();
        assert!(c.get_mut(0x1000).is_none());
        assert!(c.insert(0x1000, &page(7), 1));
        assert_eq!(c.len(), 1);
        assert!(c.contains(0x1000));
        let data = c.get_mut(0x1000).unwrap();
        assert_eq!(data.len(), PAGE_SIZE);
        assert!(data.iter().all(|&b| b == 7));
        data[0] = 9; // the engine refreshes the copy in place
        assert_eq!(c.get_mut(0x1000).unwrap()[0], 9);
        // Same slot (4 slots: page 1 and page 5), other address: a miss.
        assert!(c.get_mut(0x5000).is_none());
        assert!(!c.contains(0x5000));
        // Same address overwrites regardless of age.
        assert!(c.insert(0x1000, &page(8), 1));
        assert_eq!(c.get_mut(0x1000).unwrap()[0], 8);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn fresh_entries_are_not_replaced() {
        let mut c = PageCache::new(4 * P).unwrap();
        assert!(c.insert(0x1000, &page(1), 5));
        // Current generation and the next: still fresh.
        assert!(!c.insert(0x5000, &page(2), 5));
        assert!(!c.insert(0x5000, &page(2), 6));
        assert_eq!(c.get_mut_at(0x1000, 5).unwrap()[0], 1);
        assert!(c.get_mut(0x5000).is_none());
        // Two generations later: replaced.
        assert!(c.insert(0x5000, &page(2), 7));
        assert!(c.get_mut(0x1000).is_none());
        assert_eq!(c.get_mut(0x5000).unwrap()[0], 2);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_hit_refreshes_the_age() {
        let mut c = PageCache::new(P).unwrap();
        assert!(c.insert(0, &page(1), 0));
        assert!(c.get_mut_at(0, 3).is_some());
        // Stamped 3: fresh in 3 and 4, not in 5.
        assert!(!c.insert(P, &page(2), 4));
        assert!(c.insert(P, &page(2), 5));
        // get_mut stamps with the highest generation seen (5 here).
        assert!(c.get_mut(P).is_some());
        assert!(!c.insert(0, &page(3), 6));
        assert_eq!(c.generation(), 6);
    }

    #[test]
    fn wrong_length_is_not_inserted() {
        let mut c = PageCache::new(P).unwrap();
        assert!(!c.insert(0, &[0; 100], 0));
        assert!(c.is_empty());
    }

    #[test]
    fn direct_mapping_by_page_number() {
        let mut c = PageCache::new(8 * P).unwrap();
        for k in 0..8u64 {
            assert!(c.insert(k * P, &page(k as u8), 0));
        }
        assert_eq!(c.len(), 8);
        for k in 0..8u64 {
            assert_eq!(c.get_mut(k * P).unwrap()[0], k as u8);
            assert!(c.get_mut((k + 8) * P).is_none());
        }
        // Addresses far apart with equal low page bits share a slot.
        assert!(!c.insert((1 << 40) + 3 * P, &page(0xAA), 1));
        assert!(c.insert((1 << 40) + 3 * P, &page(0xAA), 2));
        assert!(c.get_mut(3 * P).is_none());
        assert_eq!(c.len(), 8);
    }

    #[test]
    fn resize_keeps_entries_that_still_map() {
        let mut c = PageCache::new(8 * P).unwrap();
        for k in 0..8u64 {
            assert!(c.insert(k * P, &page(k as u8), k));
        }
        // Same capacity: nothing moves, the configured size is recorded.
        c.resize(9 * P).unwrap();
        assert_eq!(c.size_bytes(), 9 * P);
        assert_eq!((c.capacity_pages(), c.len()), (8, 8));

        // Shrink to 2 slots: pages 0,2,4,6 collide in slot 0, 1,3,5,7 in
        // slot 1; the most recently stamped (6 and 7) stay.
        c.resize(2 * P).unwrap();
        assert_eq!((c.capacity_pages(), c.len()), (2, 2));
        assert_eq!(c.get_mut(6 * P).unwrap()[0], 6);
        assert_eq!(c.get_mut(7 * P).unwrap()[0], 7);
        for k in 0..6 {
            assert!(c.get_mut(k * P).is_none());
        }

        // Grow: both survivors keep their data at their new slots.
        c.resize(64 * P).unwrap();
        assert_eq!((c.capacity_pages(), c.len()), (64, 2));
        assert_eq!(c.get_mut(6 * P).unwrap()[0], 6);
        assert_eq!(c.get_mut(7 * P).unwrap()[0], 7);
        assert!(c.insert(8 * P, &page(8), 0));
        assert_eq!(c.len(), 3);

        assert_eq!(c.resize(10).unwrap_err(), CacheError::TooSmall { size: 10 });
        assert_eq!(c.capacity_pages(), 64);
    }

    #[test]
    fn resize_collision_keeps_newer_even_if_seen_first() {
        let mut c = PageCache::new(2 * P).unwrap();
        assert!(c.insert(0, &page(1), 9)); // slot 0, newer
        assert!(c.insert(P, &page(2), 3)); // slot 1, older
        c.resize(P).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.get_mut(0).unwrap()[0], 1);
        assert!(c.get_mut(P).is_none());
    }
}
