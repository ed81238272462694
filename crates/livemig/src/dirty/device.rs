//! Writes the VMM itself makes to guest memory (device emulation, DMA,
//! virtio queues): KVM's dirty log sees only the guest's own writes, so
//! these are recorded here and merged into the migration bitmap at every
//! sync.
//!
//! A VMM either marks what its devices write ([`DeviceWrites::mark_dirty`],
//! a cheap handle its device threads hold) or, with rust-vmm's vm-memory,
//! lets `GuestMemoryMmap<AtomicBitmap>` mark every write made through it
//! ([`DeviceWrites::from_vm_memory`]). Either way the tracker is wrapped:
//! `WithDeviceWrites::new(tracker, writes)`.
//!
//! A device write must be done before the VMM's pause (`VmControl::pause`)
//! returns: the final sync runs with the VM paused, and a write after it
//! would never be sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{DirtyError, DirtyTracker, TrackerStart};
use crate::bitmap::DirtyBitmap;
use crate::memory::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Where marks are kept: our own atomic bitmaps, or vm-memory's.
enum Store {
    /// One bitmap per block, `(guest address, length, words)`.
    Own(Vec<(u64, u64, Vec<AtomicU64>)>),
    #[cfg(feature = "vm-memory")]
    VmMemory(Arc<vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>>),
}

/// Pages of guest memory written by the VMM since the last sync: a handle
/// (cheap to clone) that device threads hold.
#[derive(Clone)]
pub struct DeviceWrites {
    store: Arc<Store>,
}

impl std::fmt::Debug for DeviceWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceWrites")
    }
}

impl DeviceWrites {
    /// Marks kept here, for blocks at `(guest address, length in bytes)`,
    /// in the tracker's block order.
    pub fn new(blocks: &[(u64, u64)]) -> Self {
        DeviceWrites {
            store: Arc::new(Store::Own(
                blocks
                    .iter()
                    .map(|&(gpa, len)| {
                        let words = len.div_ceil(PAGE).div_ceil(64);
                        (gpa, len, (0..words).map(|_| AtomicU64::new(0)).collect())
                    })
                    .collect(),
            )),
        }
    }

    /// Marks kept in vm-memory's own dirty bitmaps: every write made
    /// through `mem` (its `Bytes` methods) is recorded there, and
    /// [`mark_dirty`](Self::mark_dirty) adds to the same bitmaps. Blocks
    /// are `mem`'s regions in order (as [`crate::memory::VmMemory`] lists
    /// them). Fails if a region's bitmap does not have one bit per 4 KiB page.
    #[cfg(feature = "vm-memory")]
    pub fn from_vm_memory(
        mem: Arc<vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>>,
    ) -> Result<Self, DirtyError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for r in mem.iter() {
            let pages = r.len().div_ceil(PAGE);
            if (**r).bitmap().len() as u64 != pages {
                return Err(DirtyError::Mismatch {
                    tracker: NAME,
                    what: format!(
                        "vm-memory region at {:#x}: its dirty bitmap has {} bits for {pages} pages of 4 KiB",
                        r.start_addr().0,
                        (**r).bitmap().len()
                    ),
                });
            }
        }
        Ok(DeviceWrites {
            store: Arc::new(Store::VmMemory(mem)),
        })
    }

    /// Records that `len` bytes at guest-physical `addr` were written by
    /// the VMM. Call it after the write. Returns false (and marks nothing
    /// outside memory) when part of the range is not guest RAM.
    pub fn mark_dirty(&self, addr: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = addr.checked_add(len - 1) else {
            return false;
        };
        match &*self.store {
            Store::Own(blocks) => {
                for (gpa, blen, words) in blocks {
                    if addr >= *gpa && last < gpa + blen {
                        let (p0, p1) = ((addr - gpa) / PAGE, (last - gpa) / PAGE);
                        for p in p0..=p1 {
                            words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::SeqCst);
                        }
                        return true;
                    }
                }
                false
            }
            #[cfg(feature = "vm-memory")]
            Store::VmMemory(mem) => {
                use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
                match mem.find_region(GuestAddress(addr)) {
                    Some(r) if last < r.start_addr().0 + r.len() => {
                        (**r)
                            .bitmap()
                            .set_addr_range((addr - r.start_addr().0) as usize, len as usize);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// Number of blocks.
    fn blocks(&self) -> usize {
        match &*self.store {
            Store::Own(b) => b.len(),
            #[cfg(feature = "vm-memory")]
            Store::VmMemory(mem) => vm_memory::GuestMemoryBackend::num_regions(&**mem),
        }
    }

    /// ORs the marks into `bitmaps` and resets them; returns how many
    /// pages became set.
    fn take(&self, bitmaps: &mut [DirtyBitmap]) -> u64 {
        let mut n = 0;
        match &*self.store {
            Store::Own(blocks) => {
                for ((_, _, words), b) in blocks.iter().zip(bitmaps.iter_mut()) {
                    for (i, w) in words.iter().enumerate() {
                        if w.load(Ordering::Relaxed) != 0 {
                            n += b.or_words(i, &[w.swap(0, Ordering::SeqCst)]);
                        }
                    }
                }
            }
            #[cfg(feature = "vm-memory")]
            Store::VmMemory(mem) => {
                use vm_memory::GuestMemoryBackend;
                for (r, b) in mem.iter().zip(bitmaps.iter_mut()) {
                    n += b.or_words(0, &(**r).bitmap().get_and_reset());
                }
            }
        }
        n
    }

    /// Forgets every mark.
    fn reset(&self) {
        match &*self.store {
            Store::Own(blocks) => blocks
                .iter()
                .flat_map(|(_, _, w)| w)
                .for_each(|w| w.store(0, Ordering::SeqCst)),
            #[cfg(feature = "vm-memory")]
            Store::VmMemory(mem) => {
                use vm_memory::GuestMemoryBackend;
                mem.iter().for_each(|r| (**r).bitmap().reset());
            }
        }
    }
}

const NAME: &str = "device-writes";

/// A tracker whose every sync also hands over the pages the VMM wrote
/// ([`DeviceWrites`]). Its name is the wrapped tracker's.
pub struct WithDeviceWrites<T> {
    tracker: T,
    writes: DeviceWrites,
}

impl<T: DirtyTracker> WithDeviceWrites<T> {
    /// Wraps `tracker`; `writes` must list the same blocks in the same order.
    pub fn new(tracker: T, writes: DeviceWrites) -> Self {
        WithDeviceWrites { tracker, writes }
    }

    /// The wrapped tracker.
    pub fn inner(&self) -> &T {
        &self.tracker
    }
}

impl<T: DirtyTracker> DirtyTracker for WithDeviceWrites<T> {
    fn name(&self) -> &'static str {
        self.tracker.name()
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        let st = self.tracker.start()?;
        // Writes before this point are covered by the first full pass.
        self.writes.reset();
        Ok(st)
    }

    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        if bitmaps.len() != self.writes.blocks() {
            return Err(DirtyError::Mismatch {
                tracker: NAME,
                what: format!(
                    "{} bitmaps for the {} blocks device writes are recorded in",
                    bitmaps.len(),
                    self.writes.blocks()
                ),
            });
        }
        let n = self.tracker.sync(bitmaps)?;
        Ok(n + self.writes.take(bitmaps))
    }

    fn clear_chunk_shift(&self) -> Option<u32> {
        self.tracker.clear_chunk_shift()
    }

    fn clear(&mut self, block: usize, first_page: u64, count: u64) -> Result<(), DirtyError> {
        self.tracker.clear(block, first_page, count)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        self.tracker.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SoftwareTracker;
    use crate::memory::{GuestMemory, ProcessMemory};

    #[test]
    fn marks_reach_the_next_sync_once() {
        let mem = ProcessMemory::new(&[("a", 16 * PAGE), ("b", 130 * PAGE)]).unwrap();
        let (t, log) = SoftwareTracker::new(&mem);
        let writes = DeviceWrites::new(&[(0, 16 * PAGE), (1 << 20, 130 * PAGE)]);
        let mut t = WithDeviceWrites::new(t, writes.clone());
        assert!(writes.mark_dirty(PAGE, 1), "before start: dropped at start");
        t.start().unwrap();
        log.write(0, 2 * PAGE, &[1]);
        assert!(writes.mark_dirty(2 * PAGE, 1), "same page as a guest write");
        assert!(writes.mark_dirty((1 << 20) + 63 * PAGE + 10, PAGE));
        assert!(!writes.mark_dirty(16 * PAGE, 1), "between blocks");
        assert!(
            !writes.mark_dirty((1 << 20) + 129 * PAGE, PAGE + 1),
            "past the end"
        );
        assert!(!writes.mark_dirty(u64::MAX, 2), "overflow");
        let mut bms: Vec<DirtyBitmap> = mem
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect();
        assert_eq!(t.sync(&mut bms).unwrap(), 3, "distinct pages");
        assert_eq!(bms[0].count(), 1);
        assert!(bms[0].test(2));
        assert!(bms[1].test(63) && bms[1].test(64) && bms[1].count() == 2);
        let mut again: Vec<DirtyBitmap> = mem
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect();
        assert_eq!(t.sync(&mut again).unwrap(), 0, "reset after a sync");
        assert!(t.sync(&mut again[..1]).is_err(), "block count checked");
        t.stop().unwrap();
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn vm_memory_writes_are_tracked() {
        use vm_memory::bitmap::AtomicBitmap;
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        let gm = Arc::new(
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
                (GuestAddress(0), 64 * PAGE_SIZE),
                (GuestAddress(1 << 30), 64 * PAGE_SIZE),
            ])
            .unwrap(),
        );
        let mem = crate::memory::VmMemory::new(gm.clone()).unwrap();
        let (t, _log) = SoftwareTracker::new(&mem);
        let writes = DeviceWrites::from_vm_memory(gm.clone()).unwrap();
        let mut t = WithDeviceWrites::new(t, writes.clone());
        gm.write_obj(7u64, GuestAddress(5 * PAGE)).unwrap();
        t.start().unwrap();
        gm.write_slice(&[1; 10], GuestAddress((1 << 30) + 2 * PAGE - 5))
            .unwrap();
        assert!(writes.mark_dirty(40 * PAGE, 1));
        let mut bms: Vec<DirtyBitmap> = mem
            .blocks()
            .iter()
            .map(|b| DirtyBitmap::new(b.pages()))
            .collect();
        assert_eq!(t.sync(&mut bms).unwrap(), 3);
        assert!(!bms[0].test(5), "written before start");
        assert!(bms[0].test(40));
        assert!(bms[1].test(1) && bms[1].test(2));
        let mut again = bms.clone();
        again.iter_mut().for_each(DirtyBitmap::clear_all);
        assert_eq!(t.sync(&mut again).unwrap(), 0);
    }
}
