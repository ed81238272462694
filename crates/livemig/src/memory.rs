//! Guest memory as the engine sees it: named RAM blocks of host memory.
//!
//! A VMM hands the engine a [`GuestMemory`]; [`ProcessMemory`] is the
//! built-in one (anonymous mappings), and with the `vm-memory` feature
//! [`VmMemory`] adapts rust-vmm's `GuestMemoryMmap`.

use std::sync::Arc;

pub use crate::sys::mmap::{AnonMapping, RawRegion};

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
        Ok(RamBlock { id, region })
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

/// Guest memory made of anonymous mappings in this process.
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
            if *len == 0 || len % PAGE_SIZE as u64 != 0 {
                return Err(MemoryError::BadLength {
                    id: id.to_string(),
                    len: *len,
                });
            }
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
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    /// rust-vmm's `GuestMemoryMmap` as livemig guest memory: one RAM block per
    /// region, named `ram@<guest address in hex>`.
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
            for r in mem.iter() {
                let id = format!("ram@{:x}", r.start_addr().0);
                let len = r.len() as usize;
                let ptr =
                    std::ptr::NonNull::new(r.as_ptr()).ok_or_else(|| MemoryError::BadLength {
                        id: id.clone(),
                        len: 0,
                    })?;
                let owner: Arc<dyn Send + Sync> = mem.clone();
                // SAFETY: the region is mapped read/write by GuestMemoryMmap
                // for as long as `mem` lives, and `owner` keeps it alive.
                let region = unsafe { RawRegion::from_raw(ptr, len, owner) };
                blocks.push(RamBlock::new(id, region)?);
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
