//! Guest memory as the engine sees it: named RAM blocks of host memory.
//!
//! A VMM hands the engine a [`GuestMemory`]; [`ProcessMemory`] is the
//! built-in one (anonymous mappings, or memfd-backed with
//! [`ProcessMemory::new_memfd`]), and with the `vm-memory` feature
//! [`VmMemory`] adapts rust-vmm's `GuestMemoryMmap`.
//!
//! A block backed by a file (a memfd: [`create_memfd`]) says so
//! ([`RamBlock::backing`]): its memory can be handed to another process
//! instead of copied (zero-copy local migration, `engine::local`).

use std::fs::File;
use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
pub use crate::sys::mmap::{AnonMapping, FileMapping, RawRegion};

/// The seals every memfd livemig creates carries, and that a received one
/// must carry: `F_SEAL_SHRINK` (no process can truncate guest memory
/// under another one's mapping, which would kill it with SIGBUS).
pub const MEMFD_SEALS: i32 = crate::sys::memfd::SEALS;

/// Creates a memfd of `len` bytes for guest memory: close-on-exec, sealed
/// against shrinking ([`MEMFD_SEALS`]); `name` labels it in
/// `/proc/PID/fd` and `/proc/PID/maps`.
pub fn create_memfd(name: &str, len: u64) -> std::io::Result<File> {
    crate::sys::memfd::create(name, len)
}

/// The seals (`F_SEAL_*` bits) of a memfd; an error for a file that is not
/// one (only shared-memory files carry seals).
pub fn memfd_seals(file: &File) -> std::io::Result<i32> {
    crate::sys::memfd::seals(file)
}

/// Where a block's memory lives in a file that another process can map.
#[derive(Clone, Debug)]
pub struct BlockBacking {
    /// The file (a memfd).
    pub file: Arc<File>,
    /// Where the block starts in it (page-aligned).
    pub offset: u64,
}

/// The target page size: the unit of dirty tracking and of the stream.
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as a shift.
pub const PAGE_SHIFT: u32 = 12;

/// Errors of guest memory set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A RAM block's length must be a non-zero multiple of the page size.
    #[error("RAM block '{id}': length {len} is not a non-zero multiple of {PAGE_SIZE}")]
    BadLength {
        /// Block id.
        id: String,
        /// Offending length.
        len: u64,
    },
    /// Two blocks carry the same id.
    #[error("RAM block id '{0}' is used twice")]
    DuplicateId(String),
    /// Ids are sent on the wire with a one-byte length.
    #[error("RAM block id '{0}' is empty or longer than 255 bytes")]
    BadId(String),
    /// Creating the memfd behind a block failed.
    #[error("cannot create a memfd of {len} bytes for RAM block '{id}': {source}")]
    Memfd {
        /// Block id.
        id: String,
        /// Requested length.
        len: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map {len} bytes for RAM block '{id}': {source}")]
    Map {
        /// Block id.
        id: String,
        /// Requested length.
        len: u64,
        /// OS error.
        source: std::io::Error,
    },
}

/// One named, contiguous range of guest memory.
#[derive(Clone, Debug)]
pub struct RamBlock {
    id: String,
    region: RawRegion,
    backing: Option<BlockBacking>,
}

impl RamBlock {
    /// A block named `id` over `region`. The length must be a multiple of
    /// [`PAGE_SIZE`] and the id 1..=255 bytes.
    pub fn new(id: impl Into<String>, region: RawRegion) -> Result<Self, MemoryError> {
        let id = id.into();
        if id.is_empty() || id.len() > 255 {
            return Err(MemoryError::BadId(id));
        }
        let len = region.len() as u64;
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(MemoryError::BadLength { id, len });
        }
        Ok(RamBlock {
            id,
            region,
            backing: None,
        })
    }

    /// Says the block's memory is `backing` (a file range mapped shared at
    /// the region), so it can be handed over instead of copied.
    pub fn with_backing(mut self, backing: BlockBacking) -> Self {
        self.backing = Some(backing);
        self
    }

    /// The file behind the block, when it has one (memfd-backed memory).
    pub fn backing(&self) -> Option<&BlockBacking> {
        self.backing.as_ref()
    }

    /// The block's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.region.len() as u64
    }

    /// Always false: blocks are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE as u64
    }

    /// The host memory behind the block.
    pub fn region(&self) -> &RawRegion {
        &self.region
    }

    /// Byte ranges (offsets in the block) of `[offset, offset + len)` that
    /// may hold data; every other page there was never written and reads
    /// as zeros. `None` when that cannot be known.
    ///
    /// The method follows the backing: a file-backed block (memfd) asks
    /// the file for its holes (`SEEK_DATA`/`SEEK_HOLE`), anonymous memory
    /// asks the page tables (`PAGEMAP_SCAN`, private anonymous memory
    /// only). The answer is a snapshot: pages written after the call are
    /// not in it, so a caller tracks writes from before the call.
    pub(crate) fn populated(&self, offset: u64, len: u64) -> Option<Vec<(usize, usize)>> {
        match &self.backing {
            Some(bk) => file_data(bk, offset, len),
            None => self.region.populated(offset as usize, len as usize),
        }
    }

    /// Pages `[first, first + count)` that may hold data, as a bitmap of
    /// `count` bits (bit `p` for page `first + p`): [`RamBlock::populated`]
    /// rounded out to whole pages. `None` when that cannot be known.
    ///
    /// The one look-up every "which pages hold data" question goes
    /// through: the source's bulk stage (pages never written leave as
    /// zero without being read), the destination's known-zero pages, and
    /// the KVM manual tracker's pages without data.
    pub(crate) fn data_pages(&self, first: u64, count: u64) -> Option<DirtyBitmap> {
        let ps = PAGE_SIZE as u64;
        let end = first.saturating_add(count).min(self.pages());
        let first = first.min(end);
        let mut bm = DirtyBitmap::new(count);
        if first == end {
            return Some(bm);
        }
        let ranges = self.populated(first * ps, (end - first) * ps)?;
        for (a, b) in ranges {
            let pa = (a as u64 / ps).max(first);
            let pb = (b as u64).div_ceil(ps).min(end);
            if pb > pa {
                bm.set_range(pa - first, pb - pa);
            }
        }
        Some(bm)
    }
}

/// [`RamBlock::populated`] of a file-backed block: the file's holes were
/// never written.
fn file_data(bk: &BlockBacking, offset: u64, len: u64) -> Option<Vec<(usize, usize)>> {
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

/// Guest memory: an ordered list of RAM blocks with distinct ids.
///
/// Implement it for a VMM's memory; the engine only copies pages in and out
/// through [`RawRegion`].
pub trait GuestMemory: Send + Sync {
    /// The RAM blocks, in a stable order.
    fn blocks(&self) -> &[RamBlock];

    /// Total bytes of all blocks.
    fn total_bytes(&self) -> u64 {
        self.blocks().iter().map(RamBlock::len).sum()
    }

    /// Index of the block named `id`.
    fn find(&self, id: &str) -> Option<usize> {
        self.blocks().iter().position(|b| b.id() == id)
    }
}

/// Checks that block ids are distinct.
pub fn check_distinct(blocks: &[RamBlock]) -> Result<(), MemoryError> {
    for (i, b) in blocks.iter().enumerate() {
        if blocks[..i].iter().any(|o| o.id() == b.id()) {
            return Err(MemoryError::DuplicateId(b.id().to_string()));
        }
    }
    Ok(())
}

fn check_len(id: &str, len: u64) -> Result<(), MemoryError> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
        return Err(MemoryError::BadLength {
            id: id.to_string(),
            len,
        });
    }
    Ok(())
}

/// Guest memory made of mappings in this process: anonymous, or shared
/// mappings of memfds.
#[derive(Clone, Debug)]
pub struct ProcessMemory {
    blocks: Vec<RamBlock>,
}

impl ProcessMemory {
    /// Maps one zeroed block per `(id, length)`.
    pub fn new<S: AsRef<str>>(layout: &[(S, u64)]) -> Result<Self, MemoryError> {
        let mut blocks = Vec::with_capacity(layout.len());
        for (id, len) in layout {
            let id = id.as_ref();
            check_len(id, *len)?;
            let map = AnonMapping::new(*len as usize).map_err(|source| MemoryError::Map {
                id: id.to_string(),
                len: *len,
                source,
            })?;
            blocks.push(RamBlock::new(id, RawRegion::from_mapping(Arc::new(map)))?);
        }
        check_distinct(&blocks)?;
        Ok(ProcessMemory { blocks })
    }

    /// One block named `ram` of `len` bytes.
    pub fn single(len: u64) -> Result<Self, MemoryError> {
        Self::new(&[("ram", len)])
    }

    /// As [`ProcessMemory::new`], each block in a memfd of its own
    /// ([`create_memfd`]) mapped shared, with transparent huge pages asked
    /// for (`MADV_HUGEPAGE`: granted only where the kernel's
    /// `shmem_enabled` allows). Such memory can be handed to another
    /// process ([`RamBlock::backing`]).
    pub fn new_memfd<S: AsRef<str>>(layout: &[(S, u64)]) -> Result<Self, MemoryError> {
        let mut files = Vec::with_capacity(layout.len());
        for (id, len) in layout {
            let id = id.as_ref();
            check_len(id, *len)?;
            let file = create_memfd(&format!("livemig:{id}"), *len).map_err(|source| {
                MemoryError::Memfd {
                    id: id.to_string(),
                    len: *len,
                    source,
                }
            })?;
            files.push((
                id.to_string(),
                *len,
                BlockBacking {
                    file: Arc::new(file),
                    offset: 0,
                },
            ));
        }
        Self::from_files(&files)
    }

    /// Maps each `(id, length, backing)` shared: memory another process
    /// handed over (its blocks' files), or files made with
    /// [`create_memfd`]. Nothing is written to the files.
    pub fn from_files<S: AsRef<str>>(
        blocks: &[(S, u64, BlockBacking)],
    ) -> Result<Self, MemoryError> {
        let mut out = Vec::with_capacity(blocks.len());
        for (id, len, backing) in blocks {
            let id = id.as_ref();
            check_len(id, *len)?;
            let map = FileMapping::new(backing.file.clone(), backing.offset, *len as usize)
                .map_err(|source| MemoryError::Map {
                    id: id.to_string(),
                    len: *len,
                    source,
                })?;
            // Advice only: without shmem THP the memory works the same.
            if let Err(e) = map.advise(libc::MADV_HUGEPAGE) {
                log::debug!("MADV_HUGEPAGE on memfd block '{id}': {e}");
            }
            let region = RawRegion::from_file_mapping(Arc::new(map));
            out.push(RamBlock::new(id, region)?.with_backing(backing.clone()));
        }
        check_distinct(&out)?;
        Ok(ProcessMemory { blocks: out })
    }

    /// Wraps blocks made elsewhere.
    pub fn from_blocks(blocks: Vec<RamBlock>) -> Result<Self, MemoryError> {
        check_distinct(&blocks)?;
        Ok(ProcessMemory { blocks })
    }
}

impl GuestMemory for ProcessMemory {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }
}

#[cfg(feature = "vm-memory")]
mod vm_memory_adapter {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryMmap;

    /// rust-vmm's `GuestMemoryMmap` as livemig guest memory: one RAM block per
    /// region, named `ram@<guest address in hex>`.
    ///
    /// A region mapped from a file (`GuestMemoryMmap::from_ranges_with_files`
    /// with a memfd) gives a block with [`RamBlock::backing`] set.
    ///
    /// Any bitmap backend works; with `GuestMemoryMmap<AtomicBitmap>` the
    /// VMM's own writes through vm-memory are recorded there and
    /// [`crate::dirty::DeviceWrites::from_vm_memory`] hands them to the
    /// tracker at every sync.
    #[derive(Clone, Debug)]
    pub struct VmMemory {
        blocks: Vec<RamBlock>,
    }

    impl VmMemory {
        /// Adapts `mem`; the regions stay mapped as long as any block lives.
        pub fn new<B: Bitmap + Send + Sync + 'static>(
            mem: Arc<GuestMemoryMmap<B>>,
        ) -> Result<Self, MemoryError> {
            let mut blocks = Vec::new();
            for (addr, region, file) in crate::sys::mmap::vm_memory_regions(&mem) {
                let mut block = RamBlock::new(format!("ram@{:x}", addr.0), region)?;
                if let Some((file, offset)) = file {
                    block = block.with_backing(BlockBacking { file, offset });
                }
                blocks.push(block);
            }
            Ok(VmMemory { blocks })
        }
    }

    impl GuestMemory for VmMemory {
        fn blocks(&self) -> &[RamBlock] {
            &self.blocks
        }
    }
}
#[cfg(feature = "vm-memory")]
pub use vm_memory_adapter::VmMemory;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populated_asks_the_file_of_a_file_backed_block() {
        const P: u64 = PAGE_SIZE as u64;
        // The block starts 8 pages into its file: ranges are block offsets.
        let file = Arc::new(create_memfd("populated", 16 * P).unwrap());
        let backing = BlockBacking {
            file: file.clone(),
            offset: 8 * P,
        };
        let m = ProcessMemory::from_files(&[("ram", 8 * P, backing)]).unwrap();
        let block = &m.blocks()[0];
        assert!(block.region().write(P as usize + 3, &[1]));
        assert!(block.region().write(6 * P as usize, &[2]));
        let Some(all) = block.populated(0, 8 * P) else {
            eprintln!("skipped: this file system cannot say where its holes are");
            return;
        };
        let p = P as usize;
        assert_eq!(all, vec![(p, 2 * p), (6 * p, 7 * p)]);
        assert_eq!(block.populated(4 * P, 4 * P).unwrap(), vec![(6 * p, 7 * p)]);
        assert_eq!(block.populated(2 * P, 4 * P).unwrap(), vec![]);
    }

    #[test]
    fn populated_asks_the_page_tables_of_anonymous_memory() {
        const P: usize = PAGE_SIZE;
        let m = ProcessMemory::single(8 * P as u64).unwrap();
        let block = &m.blocks()[0];
        assert!(block.backing().is_none());
        assert!(block.region().write(3 * P + 9, &[1]));
        let Some(all) = block.populated(0, 8 * P as u64) else {
            eprintln!("skipped: this kernel cannot say which pages were written");
            return;
        };
        assert_eq!(all, vec![(3 * P, 4 * P)]);
        // The same answer as the region's own look-up.
        assert_eq!(
            block.populated(2 * P as u64, 4 * P as u64),
            block.region().populated(2 * P, 4 * P)
        );
    }

    #[test]
    fn data_pages_are_the_populated_ranges_in_whole_pages() {
        const P: u64 = PAGE_SIZE as u64;
        let written = [0u64, 5, 63, 64, 130, 199];
        let anon = ProcessMemory::single(200 * P).unwrap();
        // A memfd block that starts 3 pages into its file.
        let file = Arc::new(create_memfd("data-pages", 203 * P).unwrap());
        let backing = BlockBacking {
            file,
            offset: 3 * P,
        };
        let memfd = ProcessMemory::from_files(&[("ram", 200 * P, backing)]).unwrap();
        for mem in [&anon, &memfd] {
            let block = &mem.blocks()[0];
            for &p in &written {
                // A byte inside the page, not at its start: whole pages.
                assert!(block.region().write((p * P + 100) as usize, &[1]));
            }
            let Some(all) = block.data_pages(0, 200) else {
                eprintln!("skipped: this kernel cannot say which pages hold data");
                continue;
            };
            assert_eq!(all.len(), 200);
            let set: Vec<u64> = (0..200).filter(|&p| all.test(p)).collect();
            assert_eq!(set, written, "backing: {:?}", block.backing().is_some());
            // A window: bit p is page first + p.
            let w = block.data_pages(60, 10).unwrap();
            assert_eq!(w.len(), 10);
            assert_eq!((0..10).filter(|&p| w.test(p)).collect::<Vec<_>>(), [3, 4]);
            // A window past the end holds only the block's pages.
            let tail = block.data_pages(190, 64).unwrap();
            assert_eq!(tail.len(), 64);
            assert_eq!((0..64).filter(|&p| tail.test(p)).collect::<Vec<_>>(), [9]);
            assert_eq!(block.data_pages(400, 8).unwrap().count(), 0);
        }
    }

    #[test]
    fn process_memory_blocks() {
        let m = ProcessMemory::new(&[("a", 8192), ("b", 4096)]).unwrap();
        assert_eq!(m.total_bytes(), 12288);
        assert_eq!(m.find("b"), Some(1));
        let r = m.blocks()[0].region();
        assert!(r.write(4095, &[1, 2]));
        let mut buf = [0u8; 2];
        assert!(r.read(4095, &mut buf));
        assert_eq!(buf, [1, 2]);
        assert!(!r.read(8191, &mut buf), "read past the end is refused");
        assert!(!r.write(usize::MAX, &buf), "overflowing offset is refused");
    }

    #[test]
    fn memfd_memory_is_shared_through_its_files() {
        let a = ProcessMemory::new_memfd(&[("a", 8192), ("b", 4096)]).unwrap();
        let anon = ProcessMemory::single(4096).unwrap();
        assert!(anon.blocks()[0].backing().is_none());
        let files: Vec<_> = a
            .blocks()
            .iter()
            .map(|b| {
                let bk = b.backing().expect("memfd block has a file").clone();
                assert_eq!(bk.offset, 0);
                assert_eq!(bk.file.metadata().unwrap().len(), b.len());
                let seals = memfd_seals(&bk.file).unwrap();
                assert_eq!(seals & MEMFD_SEALS, MEMFD_SEALS);
                (b.id().to_string(), b.len(), bk)
            })
            .collect();
        // A second mapping of the same files sees the same bytes, both ways.
        let b = ProcessMemory::from_files(&files).unwrap();
        assert!(a.blocks()[0].region().write(4096, b"shared"));
        let mut buf = [0u8; 6];
        assert!(b.blocks()[0].region().read(4096, &mut buf));
        assert_eq!(&buf, b"shared");
        assert!(b.blocks()[1].region().write(0, b"back"));
        let mut buf = [0u8; 4];
        assert!(a.blocks()[1].region().read(0, &mut buf));
        assert_eq!(&buf, b"back");
    }

    #[test]
    fn a_region_can_take_over_a_file_and_give_it_back() {
        let src = ProcessMemory::new_memfd(&[("ram", 8192)]).unwrap();
        assert!(src.blocks()[0].region().write(0, b"guest"));
        let dst = ProcessMemory::single(8192).unwrap();
        let r = dst.blocks()[0].region();
        assert!(r.write(0, b"local"));
        let bk = src.blocks()[0].backing().unwrap();
        r.replace_with_file(&bk.file, bk.offset).unwrap();
        let mut buf = [0u8; 5];
        assert!(r.read(0, &mut buf));
        assert_eq!(&buf, b"guest", "the region now shows the file");
        // Giving it back writes nothing to the file.
        r.replace_with_anonymous().unwrap();
        assert!(r.read(0, &mut buf));
        assert_eq!(buf, [0; 5]);
        assert!(r.write(0, b"other"));
        assert!(src.blocks()[0].region().read(0, &mut buf));
        assert_eq!(&buf, b"guest");
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(matches!(
            ProcessMemory::new(&[("a", 100)]),
            Err(MemoryError::BadLength { .. })
        ));
        assert!(matches!(
            ProcessMemory::new(&[("a", 4096), ("a", 4096)]),
            Err(MemoryError::DuplicateId(_))
        ));
        assert!(matches!(
            ProcessMemory::new(&[("", 4096)]),
            Err(MemoryError::BadId(_))
        ));
    }
}
