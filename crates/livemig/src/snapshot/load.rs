//! Reading a mapped-ram file: the header, bitmaps and hash tables are
//! read and checked once ([`MappedRamFile::open`]); then each chunk is
//! read (`pread` of its page runs), checked against its hash and only
//! then written to memory, by several threads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::format::{zero_hash, BlockEntry, Header, CHUNK_SIZE};
use super::{io_err, SnapshotError};
use crate::codec::zero::is_zero;
use crate::engine::digest::digest_of;
use crate::memory::{GuestMemory, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Reads `len` bytes at `offset` of `file`; an error says it was reading
/// `what` (the region, and the file).
fn read_at(file: &File, len: u64, offset: u64, what: String) -> Result<Vec<u8>, SnapshotError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(io_err(format!("reading {what}")))?;
    Ok(buf)
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Worker threads reading chunks in parallel (at least 1).
    pub threads: usize,
    /// The destination memory was just mapped and never written: holes
    /// need no check (otherwise a non-zero destination page under a hole
    /// is cleared, and a zero one left untouched).
    pub fresh: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: super::default_threads(),
            fresh: false,
        }
    }
}

/// What a load did.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreStats {
    /// Pages read from the file.
    pub pages: u64,
    /// Zero pages (holes).
    pub zero_pages: u64,
    /// Holes whose destination page had to be cleared.
    pub zero_pages_written: u64,
    /// Milliseconds spent loading memory.
    pub millis: u64,
    /// Microseconds, summed over threads, spent reading the file.
    pub read_us: u64,
    /// ... checking chunk hashes.
    pub hash_us: u64,
    /// ... writing memory.
    pub write_us: u64,
}

/// Time spent per phase (µs), summed over threads.
#[derive(Default)]
pub(crate) struct Phases {
    pub read: AtomicU64,
    pub hash: AtomicU64,
    pub write: AtomicU64,
}

fn add(a: &AtomicU64, since: Instant) -> Instant {
    a.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    Instant::now()
}

/// An open, checked mapped-ram file.
#[derive(Debug)]
pub struct MappedRamFile {
    file: File,
    path: PathBuf,
    header: Header,
    /// Per block, the page bitmap.
    bitmaps: Vec<Vec<u64>>,
    /// Per block, the chunk hashes.
    hashes: Vec<Vec<[u8; 32]>>,
}

impl MappedRamFile {
    /// Opens `path` and checks its header, bitmaps and hash tables (the
    /// pages are checked chunk by chunk as they are read).
    pub fn open(path: &Path) -> Result<MappedRamFile, SnapshotError> {
        Self::open_checked(path, None)
    }

    /// As [`MappedRamFile::open`], checking the file's blocks against the
    /// destination's `mem` ([`MappedRamFile::check_layout`]) before its
    /// tables are read: what a destination reads is then sized by its own
    /// memory, never by the file.
    pub fn open_for(path: &Path, mem: &dyn GuestMemory) -> Result<MappedRamFile, SnapshotError> {
        Self::open_checked(path, Some(mem))
    }

    fn open_checked(
        path: &Path,
        mem: Option<&dyn GuestMemory>,
    ) -> Result<MappedRamFile, SnapshotError> {
        let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let file_len = file
            .metadata()
            .map_err(io_err(format!("reading the size of {}", path.display())))?
            .len();
        if file_len < Header::PROBE as u64 {
            return Err(SnapshotError::NotMappedRam);
        }
        let header_of = || format!("the header of {}", path.display());
        let fixed = read_at(&file, Header::PROBE as u64, 0, header_of())?;
        let len = Header::announced_len(&fixed, file_len)?;
        let bytes = read_at(&file, len as u64 + 4, 0, header_of())?;
        let header = Header::parse(&bytes, file_len)?;
        if let Some(mem) = mem {
            check_layout(&header, mem)?;
        }
        let mut bitmaps = Vec::new();
        let mut hashes = Vec::new();
        let mut all = Vec::new();
        for b in &header.blocks {
            let raw = read_at(
                &file,
                b.bitmap_len(),
                b.bitmap_offset,
                format!("the bitmap of block '{}' in {}", b.id, path.display()),
            )?;
            let words: Vec<u64> = raw
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect();
            let tail = b.pages() % 64;
            if tail != 0 {
                let last = words.len() - 1;
                if words[last] >> tail != 0 {
                    return Err(SnapshotError::Bitmap {
                        block: b.id.clone(),
                        offset: b.bitmap_offset + last as u64 * 8,
                    });
                }
            }
            let raw = read_at(
                &file,
                b.hashes_len(),
                b.hashes_offset,
                format!("the hash table of block '{}' in {}", b.id, path.display()),
            )?;
            let table: Vec<[u8; 32]> = raw
                .chunks_exact(32)
                .map(|h| h.try_into().expect("32 bytes"))
                .collect();
            all.extend_from_slice(&table);
            bitmaps.push(words);
            hashes.push(table);
        }
        let digest = digest_of(header.blocks.iter().map(|b| (b.id.as_str(), b.len)), &all);
        if digest != header.digest {
            return Err(SnapshotError::Digest);
        }
        Ok(MappedRamFile {
            file,
            path: path.to_path_buf(),
            header,
            bitmaps,
            hashes,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The memory digest of what the file holds (checked against its hash
    /// tables; every chunk is checked against its hash as it is read).
    pub fn digest(&self) -> [u8; 32] {
        self.header.digest
    }

    /// Total bytes of memory the file describes.
    pub fn memory_bytes(&self) -> u64 {
        self.header.blocks.iter().map(|b| b.len).sum()
    }

    /// Reads the vCPU/device state (empty for process memory), checked
    /// against its hash.
    pub fn state(&self) -> Result<Vec<u8>, SnapshotError> {
        let h = &self.header;
        let s = read_at(
            &self.file,
            h.state_len,
            h.state_offset,
            format!("the state in {}", self.path.display()),
        )?;
        if *blake3::hash(&s).as_bytes() != h.state_hash {
            return Err(SnapshotError::State {
                offset: h.state_offset,
                len: h.state_len,
            });
        }
        Ok(s)
    }

    /// For each block of the file, the index of the same block (same id,
    /// same length) in `mem`; `mem` must have no other block.
    pub fn check_layout(&self, mem: &dyn GuestMemory) -> Result<Vec<usize>, SnapshotError> {
        check_layout(&self.header, mem)
    }

    /// True when page `page` of file block `block` is in the file (not a hole).
    pub(crate) fn present(&self, block: usize, page: u64) -> bool {
        self.bitmaps[block][(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// The block table entry `block`.
    pub(crate) fn block(&self, block: usize) -> &BlockEntry {
        &self.header.blocks[block]
    }

    /// Runs of pages present in chunk `c` of `block`, relative to the chunk.
    pub(crate) fn runs(&self, block: usize, c: u64) -> Vec<(u64, u64)> {
        let b = &self.header.blocks[block];
        let first = c * CHUNK_SIZE / PAGE;
        let n = b.chunk_len(c) / PAGE;
        let mut out = Vec::new();
        let mut p = 0;
        while p < n {
            if !self.present(block, first + p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < n && self.present(block, first + p) {
                p += 1;
            }
            out.push((start, p - start));
        }
        out
    }

    /// Reads chunk `c` of file block `block` into `buf` (holes as zeros)
    /// and checks it against its hash; returns the present runs.
    pub(crate) fn read_chunk(
        &self,
        block: usize,
        c: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Vec<(u64, u64)>, SnapshotError> {
        self.read_chunk_timed(block, c, buf, None)
    }

    fn read_chunk_timed(
        &self,
        block: usize,
        c: u64,
        buf: &mut Vec<u8>,
        phases: Option<&Phases>,
    ) -> Result<Vec<(u64, u64)>, SnapshotError> {
        let t = Instant::now();
        let b = &self.header.blocks[block];
        let len = b.chunk_len(c);
        let runs = self.runs(block, c);
        let corrupt = || SnapshotError::Corrupt {
            block: b.id.clone(),
            chunk: c,
            mem_offset: c * CHUNK_SIZE,
            file_offset: b.pages_offset + c * CHUNK_SIZE,
        };
        if runs.is_empty() {
            return match self.hashes[block][c as usize] == zero_hash(len) {
                true => Ok(runs),
                false => Err(corrupt()),
            };
        }
        buf.clear();
        buf.resize(len as usize, 0);
        for &(first, n) in &runs {
            let at = b.pages_offset + c * CHUNK_SIZE + first * PAGE;
            let dst = &mut buf[(first * PAGE) as usize..((first + n) * PAGE) as usize];
            self.file.read_exact_at(dst, at).map_err(io_err(format!(
                "reading block '{}' chunk {c} at offset {at} of {}",
                b.id,
                self.path.display()
            )))?;
        }
        let t = match phases {
            Some(p) => add(&p.read, t),
            None => t,
        };
        let ok = *blake3::hash(buf).as_bytes() == self.hashes[block][c as usize];
        if let Some(p) = phases {
            add(&p.hash, t);
        }
        if !ok {
            return Err(corrupt());
        }
        Ok(runs)
    }

    /// Every chunk: (file block, chunk index).
    pub(crate) fn chunks(&self) -> Vec<(usize, u64)> {
        self.header
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(bi, b)| (0..b.chunks()).map(move |c| (bi, c)))
            .collect()
    }

    /// Loads every page into `mem` (laid out as the file, see
    /// [`MappedRamFile::check_layout`]). A chunk is written to memory
    /// only after its hash checked out; on error the memory holds a mix
    /// and must not be used.
    pub fn load(
        &self,
        mem: &dyn GuestMemory,
        opts: &LoadOptions,
    ) -> Result<RestoreStats, SnapshotError> {
        self.load_cancellable(mem, opts, &|| false)
    }

    /// As [`MappedRamFile::load`], giving up with
    /// [`SnapshotError::Cancelled`] when `cancelled` says so (asked before
    /// every chunk): the memory is then partly loaded and the guest must
    /// not run. The file is never changed.
    pub fn load_cancellable(
        &self,
        mem: &dyn GuestMemory,
        opts: &LoadOptions,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<RestoreStats, SnapshotError> {
        let t0 = Instant::now();
        let map = self.check_layout(mem)?;
        let chunks = self.chunks();
        let pages = AtomicU64::new(0);
        let zero_written = AtomicU64::new(0);
        let phases = Phases::default();
        super::each_chunk(
            chunks.len(),
            opts.threads,
            cancelled,
            || (Vec::new(), vec![0u8; PAGE_SIZE]),
            |(buf, zero), k| {
                let (bi, c) = chunks[k];
                let (p, z) =
                    self.load_chunk(mem, map[bi], bi, c, opts.fresh, buf, zero, &phases)?;
                pages.fetch_add(p, Ordering::Relaxed);
                zero_written.fetch_add(z, Ordering::Relaxed);
                Ok(())
            },
        )?;
        let pages = pages.into_inner();
        let total: u64 = self.header.blocks.iter().map(BlockEntry::pages).sum();
        Ok(RestoreStats {
            pages,
            zero_pages: total - pages,
            zero_pages_written: zero_written.into_inner(),
            millis: t0.elapsed().as_millis() as u64,
            read_us: phases.read.into_inner(),
            hash_us: phases.hash.into_inner(),
            write_us: phases.write.into_inner(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn load_chunk(
        &self,
        mem: &dyn GuestMemory,
        mb: usize,
        bi: usize,
        c: u64,
        fresh: bool,
        buf: &mut Vec<u8>,
        zero: &mut [u8],
        phases: &Phases,
    ) -> Result<(u64, u64), SnapshotError> {
        let runs = self.read_chunk_timed(bi, c, buf, Some(phases))?;
        let t = Instant::now();
        let region = mem.blocks()[mb].region();
        let base = (c * CHUNK_SIZE) as usize;
        let mut pages = 0;
        let mut cleared = 0;
        let mut p = 0;
        let n = self.header.blocks[bi].chunk_len(c) / PAGE;
        let mut clear_holes = |from: u64, to: u64| {
            if fresh {
                return;
            }
            for q in from..to {
                let at = base + (q * PAGE) as usize;
                if region.scan(at, PAGE_SIZE, |s| !is_zero(s)) == Some(true) {
                    region.write(at, zero);
                    cleared += 1;
                }
            }
        };
        for &(first, len) in &runs {
            clear_holes(p, first);
            let from = (first * PAGE) as usize;
            let to = ((first + len) * PAGE) as usize;
            let ok = region.write(base + from, &buf[from..to]);
            debug_assert!(ok, "checked layout: the chunk lies inside the block");
            pages += len;
            p = first + len;
        }
        clear_holes(p, n);
        add(&phases.write, t);
        Ok((pages, cleared))
    }
}

/// For each block of `header`, the index of the same block (same id, same
/// length) in `mem`; `mem` must have no other block.
fn check_layout(header: &Header, mem: &dyn GuestMemory) -> Result<Vec<usize>, SnapshotError> {
    let blocks = mem.blocks();
    if blocks.len() != header.blocks.len() {
        return Err(SnapshotError::Layout(format!(
            "the file has {} RAM block(s) ({}), this memory {} ({})",
            header.blocks.len(),
            describe(header.blocks.iter().map(|b| (b.id.as_str(), b.len))),
            blocks.len(),
            describe(blocks.iter().map(|b| (b.id(), b.len())))
        )));
    }
    let mut map = Vec::new();
    for b in &header.blocks {
        match mem.find(&b.id) {
            Some(i) if blocks[i].len() == b.len => map.push(i),
            Some(i) => {
                return Err(SnapshotError::Layout(format!(
                    "block '{}' is {} bytes in the file and {} here",
                    b.id,
                    b.len,
                    blocks[i].len()
                )))
            }
            None => {
                return Err(SnapshotError::Layout(format!(
                    "block '{}' of the file does not exist here (here: {})",
                    b.id,
                    describe(blocks.iter().map(|b| (b.id(), b.len())))
                )))
            }
        }
    }
    Ok(map)
}

fn describe<'a>(blocks: impl Iterator<Item = (&'a str, u64)>) -> String {
    blocks
        .map(|(id, len)| format!("'{id}' {len} bytes"))
        .collect::<Vec<_>>()
        .join(", ")
}
