//! The mapped-ram file layout: a header with the block table, then per
//! block a page bitmap, a table of chunk hashes and the pages themselves,
//! each page at a fixed offset; the vCPU and device state last.
//!
//! ```text
//! offset 0      header (little-endian)
//!               magic "LMMAPRAM", version u32 = 1, header_len u32,
//!               page_size u32 = 4096, chunk_size u32 = 2 MiB, nblocks u32,
//!               flags u32, state_offset u64, state_len u64,
//!               state_hash [32], digest [32],
//!               nblocks × (id_len u8, id, len u64, bitmap_offset u64,
//!                          hashes_offset u64, pages_offset u64),
//!               crc32 of the bytes above (at header_len)
//! per block     bitmap: one bit per page (set = the page is in the file,
//!               clear = a zero page, a hole), 64-bit words
//!               hashes: one BLAKE3 hash per 2 MiB chunk of the block's
//!               memory as saved (holes hashed as zeros)
//!               pages: page i at pages_offset + i × 4096 (4096-aligned);
//!               zero pages are never written, so the file is sparse
//! at the end    state: the VMM's vCPU and device state blob
//! ```
//!
//! The chunk hashes are those of [`crate::engine::memory_digest`], and
//! `digest` is that digest over them: a file whose chunks all check out
//! holds exactly the memory whose digest the header names.
//!
//! Everything read is checked before use ([`Header::parse`],
//! [`Header::check_regions`]): sizes are capped before allocating, every
//! region must lie inside the file and no two regions may overlap.

use std::ops::Range;

use super::SnapshotError;
use crate::engine::digest::CHUNK;
use crate::memory::PAGE_SIZE;

/// First bytes of a mapped-ram file.
pub const MAGIC: [u8; 8] = *b"LMMAPRAM";
/// The layout version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes per hashed chunk (the memory digest's chunk: 2 MiB).
pub const CHUNK_SIZE: u64 = CHUNK as u64;
/// Pages per chunk.
pub const CHUNK_PAGES: u64 = CHUNK_SIZE / PAGE;
/// Largest header accepted (block table included).
pub const MAX_HEADER: u32 = 1 << 20;
/// Most RAM blocks in a file.
pub const MAX_BLOCKS: u32 = 4096;
/// Largest RAM block accepted (64 TiB).
pub const MAX_BLOCK_LEN: u64 = 1 << 46;
/// Most memory one file may describe (4 TiB): caps what
/// [`super::MappedRamFile::open`] allocates for bitmaps (128 MiB) and
/// hash tables (64 MiB).
pub const MAX_TOTAL: u64 = 1 << 42;
/// Largest vCPU/device state blob accepted.
pub const MAX_STATE: u64 = 256 << 20;
/// Alignment of each block's pages (and of the header area).
pub const ALIGN: u64 = 4096;
/// Header flag: the file carries vCPU/device state (a VM snapshot).
pub const FLAG_VM_STATE: u32 = 1;

const PAGE: u64 = PAGE_SIZE as u64;
const FIXED: usize = 112;

/// One RAM block of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// Block id (as the memory names it).
    pub id: String,
    /// Length in bytes.
    pub len: u64,
    /// File offset of the page bitmap.
    pub bitmap_offset: u64,
    /// File offset of the chunk hash table.
    pub hashes_offset: u64,
    /// File offset of page 0.
    pub pages_offset: u64,
}

impl BlockEntry {
    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }
    /// Chunks in the block (the last may be short).
    pub fn chunks(&self) -> u64 {
        self.len.div_ceil(CHUNK_SIZE)
    }
    /// Bytes of the bitmap (whole 64-bit words).
    pub fn bitmap_len(&self) -> u64 {
        self.pages().div_ceil(64) * 8
    }
    /// Bytes of the hash table.
    pub fn hashes_len(&self) -> u64 {
        self.chunks() * 32
    }
    /// Bytes of chunk `c` (the last may be short).
    pub fn chunk_len(&self, c: u64) -> u64 {
        CHUNK_SIZE.min(self.len - c * CHUNK_SIZE)
    }
}

/// The parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`FLAG_VM_STATE`] or 0.
    pub flags: u32,
    /// File offset of the state blob.
    pub state_offset: u64,
    /// Its length.
    pub state_len: u64,
    /// BLAKE3 of the state blob.
    pub state_hash: [u8; 32],
    /// The memory digest ([`crate::engine::memory_digest`]) of what the file holds.
    pub digest: [u8; 32],
    /// The block table.
    pub blocks: Vec<BlockEntry>,
}

fn align(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}

impl Header {
    /// Lays a file out for `layout` (block id, length) and a state blob of
    /// `state_len` bytes; hashes and digest are filled in later.
    pub fn plan(layout: &[(String, u64)], state_len: u64, flags: u32) -> Header {
        let mut h = Header {
            flags,
            state_offset: 0,
            state_len,
            state_hash: [0; 32],
            digest: [0; 32],
            blocks: layout
                .iter()
                .map(|(id, len)| BlockEntry {
                    id: id.clone(),
                    len: *len,
                    bitmap_offset: 0,
                    hashes_offset: 0,
                    pages_offset: 0,
                })
                .collect(),
        };
        let mut at = align(h.encoded_len() as u64 + 4);
        for b in &mut h.blocks {
            b.bitmap_offset = at;
            b.hashes_offset = at + b.bitmap_len();
            b.pages_offset = align(b.hashes_offset + b.hashes_len());
            at = b.pages_offset + b.len;
        }
        h.state_offset = at;
        h
    }

    /// The file's length.
    pub fn file_len(&self) -> u64 {
        self.state_offset + self.state_len
    }

    fn encoded_len(&self) -> usize {
        FIXED
            + self
                .blocks
                .iter()
                .map(|b| 1 + b.id.len() + 32)
                .sum::<usize>()
    }

    /// The header's bytes, CRC included.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.encoded_len();
        let mut v = Vec::with_capacity(len + 4);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&(len as u32).to_le_bytes());
        v.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        v.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        v.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.state_offset.to_le_bytes());
        v.extend_from_slice(&self.state_len.to_le_bytes());
        v.extend_from_slice(&self.state_hash);
        v.extend_from_slice(&self.digest);
        for b in &self.blocks {
            v.push(b.id.len() as u8);
            v.extend_from_slice(b.id.as_bytes());
            for x in [b.len, b.bitmap_offset, b.hashes_offset, b.pages_offset] {
                v.extend_from_slice(&x.to_le_bytes());
            }
        }
        debug_assert_eq!(v.len(), len);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Bytes to read first: enough for the fixed part.
    pub const PROBE: usize = FIXED;

    /// The header length the fixed part announces (CRC excluded), checked
    /// against [`MAX_HEADER`] and `file_len`.
    pub fn announced_len(fixed: &[u8], file_len: u64) -> Result<usize, SnapshotError> {
        if fixed.len() < FIXED || fixed[..8] != MAGIC {
            return Err(SnapshotError::NotMappedRam);
        }
        let version = u32_at(fixed, 8);
        if version != VERSION {
            return Err(bad(
                8,
                "version",
                format!("version {version}; this livemig reads version {VERSION}"),
            ));
        }
        let len = u32_at(fixed, 12);
        if (len as usize) < FIXED || len > MAX_HEADER || u64::from(len) + 4 > file_len {
            return Err(bad(
                12,
                "header_len",
                format!("{len} is outside {FIXED}..={MAX_HEADER} or past the file's end ({file_len} bytes)"),
            ));
        }
        Ok(len as usize)
    }

    /// Parses and checks a whole header (`bytes` = `header_len` + 4 CRC
    /// bytes) of a file `file_len` bytes long.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, SnapshotError> {
        let len = Self::announced_len(bytes, file_len)?;
        if bytes.len() != len + 4 {
            return Err(bad(12, "header_len", "header truncated".into()));
        }
        let crc = u32_at(bytes, len);
        let actual = crc32fast::hash(&bytes[..len]);
        if crc != actual {
            return Err(bad(
                len as u64,
                "header crc32",
                format!("stored {crc:#010x}, computed {actual:#010x}: the header is damaged"),
            ));
        }
        let page = u32_at(bytes, 16);
        if page as usize != PAGE_SIZE {
            return Err(bad(
                16,
                "page_size",
                format!("{page}, expected {PAGE_SIZE}"),
            ));
        }
        let chunk = u32_at(bytes, 20);
        if u64::from(chunk) != CHUNK_SIZE {
            return Err(bad(
                20,
                "chunk_size",
                format!("{chunk}, expected {CHUNK_SIZE}"),
            ));
        }
        let nblocks = u32_at(bytes, 24);
        if nblocks == 0 || nblocks > MAX_BLOCKS {
            return Err(bad(
                24,
                "nblocks",
                format!("{nblocks} is outside 1..={MAX_BLOCKS}"),
            ));
        }
        let flags = u32_at(bytes, 28);
        if flags & !FLAG_VM_STATE != 0 {
            return Err(bad(28, "flags", format!("unknown flags {flags:#x}")));
        }
        let mut h = Header {
            flags,
            state_offset: u64_at(bytes, 32),
            state_len: u64_at(bytes, 40),
            state_hash: bytes[48..80].try_into().expect("32 bytes"),
            digest: bytes[80..112].try_into().expect("32 bytes"),
            blocks: Vec::with_capacity(nblocks as usize),
        };
        let mut at = FIXED;
        for i in 0..nblocks {
            let id_len = usize::from(bytes[at.min(len - 1)]);
            if at >= len || at + 1 + id_len + 32 > len {
                return Err(bad(
                    at as u64,
                    "block table",
                    format!("block {i} runs past header_len {len}"),
                ));
            }
            let id = std::str::from_utf8(&bytes[at + 1..at + 1 + id_len]).map_err(|_| {
                bad(
                    at as u64 + 1,
                    "block id",
                    format!("block {i}: id is not UTF-8"),
                )
            })?;
            if id.is_empty() {
                return Err(bad(at as u64, "block id", format!("block {i}: empty id")));
            }
            if h.blocks.iter().any(|b| b.id == id) {
                return Err(bad(
                    at as u64 + 1,
                    "block id",
                    format!("block {i}: id '{id}' used twice"),
                ));
            }
            let p = at + 1 + id_len;
            let e = BlockEntry {
                id: id.to_string(),
                len: u64_at(bytes, p),
                bitmap_offset: u64_at(bytes, p + 8),
                hashes_offset: u64_at(bytes, p + 16),
                pages_offset: u64_at(bytes, p + 24),
            };
            if e.len == 0 || !e.len.is_multiple_of(PAGE) || e.len > MAX_BLOCK_LEN {
                return Err(bad(
                    p as u64,
                    "block length",
                    format!("block '{id}': {} is not a non-zero multiple of {PAGE} up to {MAX_BLOCK_LEN}", e.len),
                ));
            }
            if !e.pages_offset.is_multiple_of(ALIGN) {
                return Err(bad(
                    p as u64 + 24,
                    "pages_offset",
                    format!("block '{id}': {:#x} is not {ALIGN}-aligned", e.pages_offset),
                ));
            }
            h.blocks.push(e);
            at = p + 32;
        }
        let total = h.blocks.iter().map(|b| b.len).sum::<u64>();
        if total > MAX_TOTAL {
            return Err(bad(
                FIXED as u64,
                "block table",
                format!("{total} bytes of memory, more than {MAX_TOTAL}"),
            ));
        }
        if at != len {
            return Err(bad(
                at as u64,
                "block table",
                format!("{} bytes left after the last block", len - at),
            ));
        }
        if h.state_len > MAX_STATE {
            return Err(bad(
                40,
                "state_len",
                format!("{} is more than {MAX_STATE}", h.state_len),
            ));
        }
        if (flags & FLAG_VM_STATE == 0) != (h.state_len == 0) {
            return Err(bad(
                28,
                "flags",
                "the VM-state flag and state_len disagree".into(),
            ));
        }
        h.check_regions(len as u64 + 4, file_len)?;
        Ok(h)
    }

    /// Every region lies inside the file, after the header, and no two
    /// overlap.
    pub fn check_regions(&self, header_end: u64, file_len: u64) -> Result<(), SnapshotError> {
        let mut regions: Vec<(Range<u64>, String)> = Vec::new();
        let mut add = |start: u64, len: u64, what: String| -> Result<(), SnapshotError> {
            let end = start
                .checked_add(len)
                .filter(|&e| e <= file_len && start >= header_end);
            match end {
                Some(end) => {
                    regions.push((start..end, what));
                    Ok(())
                }
                None => Err(SnapshotError::Region {
                    what,
                    start,
                    len,
                    file_len,
                }),
            }
        };
        for b in &self.blocks {
            add(
                b.bitmap_offset,
                b.bitmap_len(),
                format!("block '{}' bitmap", b.id),
            )?;
            add(
                b.hashes_offset,
                b.hashes_len(),
                format!("block '{}' hash table", b.id),
            )?;
            add(b.pages_offset, b.len, format!("block '{}' pages", b.id))?;
        }
        add(self.state_offset, self.state_len, "state".into())?;
        regions.retain(|(r, _)| !r.is_empty());
        regions.sort_by_key(|(r, _)| r.start);
        for w in regions.windows(2) {
            if w[0].0.end > w[1].0.start {
                return Err(SnapshotError::Overlap {
                    first: w[0].1.clone(),
                    second: w[1].1.clone(),
                    at: w[1].0.start,
                });
            }
        }
        Ok(())
    }
}

fn bad(offset: u64, field: &'static str, why: String) -> SnapshotError {
    SnapshotError::BadHeader { offset, field, why }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// BLAKE3 of `len` zero bytes (cached for a whole chunk).
pub fn zero_hash(len: u64) -> [u8; 32] {
    static FULL: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let compute = |len: u64| {
        let zeros = vec![0u8; len as usize];
        *blake3::hash(&zeros).as_bytes()
    };
    if len == CHUNK_SIZE {
        *FULL.get_or_init(|| compute(CHUNK_SIZE))
    } else {
        compute(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::plan(
            &[("ram@0".into(), 6 << 20), ("ram@600000".into(), 4096 * 3)],
            100,
            FLAG_VM_STATE,
        );
        h.digest = [7; 32];
        h
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        let bytes = h.encode();
        let back = Header::parse(&bytes, h.file_len()).unwrap();
        assert_eq!(back, h);
        assert!(h.blocks.iter().all(|b| b.pages_offset % ALIGN == 0));
        assert!(h.blocks[0].bitmap_offset >= bytes.len() as u64);
    }

    #[test]
    fn every_damaged_byte_is_refused() {
        let h = sample();
        let bytes = h.encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let r = Header::parse(&b, h.file_len());
            assert!(r.is_err(), "flipped byte {i} was accepted");
        }
    }

    #[test]
    fn hostile_fields_are_named() {
        let h = sample();
        // A block whose pages run past the file's end.
        let mut evil = h.clone();
        evil.blocks[1].pages_offset = align(h.file_len());
        let e = Header::parse(&evil.encode(), h.file_len()).unwrap_err();
        assert!(e.to_string().contains("block 'ram@600000' pages"), "{e}");
        // Two regions that overlap.
        let mut evil = h.clone();
        evil.blocks[1].hashes_offset = evil.blocks[0].pages_offset;
        let e = Header::parse(&evil.encode(), h.file_len()).unwrap_err();
        assert!(matches!(e, SnapshotError::Overlap { .. }), "{e}");
        // An unaligned page area.
        let mut evil = h.clone();
        evil.blocks[0].pages_offset += 1;
        let e = Header::parse(&evil.encode(), h.file_len()).unwrap_err();
        assert!(e.to_string().contains("pages_offset"), "{e}");
        // A huge state.
        let mut evil = h.clone();
        evil.state_len = MAX_STATE + 1;
        let e = Header::parse(&evil.encode(), u64::MAX).unwrap_err();
        assert!(e.to_string().contains("state_len"), "{e}");
        // Not this format at all.
        assert!(matches!(
            Header::parse(b"LIVEMIG\0 something else entirely", 100),
            Err(SnapshotError::NotMappedRam)
        ));
        // Truncated file.
        let e = Header::parse(&h.encode(), 50).unwrap_err();
        assert!(e.to_string().contains("header_len"), "{e}");
    }

    #[test]
    fn zero_hash_matches_blake3() {
        assert_eq!(zero_hash(4096), *blake3::hash(&[0u8; 4096]).as_bytes());
        assert_eq!(
            zero_hash(CHUNK_SIZE),
            *blake3::hash(&vec![0u8; CHUNK]).as_bytes()
        );
    }
}
