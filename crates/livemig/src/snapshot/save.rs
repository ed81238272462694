//! Writing a mapped-ram file: chunks are handed to worker threads, each
//! writes the non-zero pages of its chunk at their fixed offsets and
//! hashes the chunk; the tables and the header go last, so an unfinished
//! file has no magic and is refused on load.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use super::format::{zero_hash, BlockEntry, Header, CHUNK_PAGES, CHUNK_SIZE, FLAG_VM_STATE};
use super::{io_err, SnapshotError};
use crate::codec::zero::is_zero;
use crate::engine::digest::digest_of;
use crate::memory::{GuestMemory, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// How to save.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// Worker threads writing chunks in parallel (at least 1).
    pub threads: usize,
    /// Write pages with `O_DIRECT` (bypassing the page cache) where the
    /// bytes are page-aligned in memory; tables, header and state go
    /// through the page cache.
    pub direct_io: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            threads: super::default_threads(),
            direct_io: false,
        }
    }
}

/// What a save did.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SaveStats {
    /// Pages written to the file.
    pub pages: u64,
    /// Zero pages (holes, never written).
    pub zero_pages: u64,
    /// The file's length (apparent size).
    pub file_len: u64,
    /// Bytes the file occupies on disk (`st_blocks` × 512).
    pub disk_bytes: u64,
    /// Milliseconds spent writing.
    pub millis: u64,
    /// Pages were written with `O_DIRECT`.
    pub direct_io: bool,
    /// The memory digest of what the file holds.
    #[serde(serialize_with = "hex_digest")]
    pub digest: [u8; 32],
}

fn hex_digest<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::engine::hex(d))
}

/// One chunk's result.
pub(crate) struct ChunkOut {
    /// Bitmap words of the chunk (8, fewer for a short last chunk).
    pub words: Vec<u64>,
    pub hash: [u8; 32],
    pub pages: u64,
    pub zero_pages: u64,
}

/// Where a chunk's bytes as of the snapshot instant come from.
pub(crate) trait ChunkSource: Sync {
    /// Calls `f` with the `len` bytes at `offset` of memory block `block`.
    fn with_chunk(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<ChunkOut, SnapshotError>,
    ) -> Result<ChunkOut, SnapshotError>;
}

/// Memory that does not change while it is saved (a paused guest): read
/// in place.
struct Frozen<'a>(&'a dyn GuestMemory);

impl ChunkSource for Frozen<'_> {
    fn with_chunk(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        _buf: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<ChunkOut, SnapshotError>,
    ) -> Result<ChunkOut, SnapshotError> {
        self.0.blocks()[block]
            .region()
            .scan(offset as usize, len as usize, f)
            .expect("chunk lies inside its block")
    }
}

/// Saves `mem` (which must not change meanwhile: pause the guest) and
/// `state` (the VMM's vCPU/device state; empty for process memory) to a
/// new mapped-ram file at `path` (an existing file there is replaced).
pub fn save(
    mem: &dyn GuestMemory,
    path: &Path,
    state: &[u8],
    opts: &SaveOptions,
) -> Result<SaveStats, SnapshotError> {
    write_file(mem, path, state, opts, &Frozen(mem), &|| false)
}

/// As [`save`], giving up with [`SnapshotError::Cancelled`] when
/// `cancelled` says so (it is asked before every chunk). A file the save
/// created is then removed; a file that was there before stays (its old
/// contents are gone: it was truncated, and holds no valid header).
pub fn save_cancellable(
    mem: &dyn GuestMemory,
    path: &Path,
    state: &[u8],
    opts: &SaveOptions,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<SaveStats, SnapshotError> {
    write_file(mem, path, state, opts, &Frozen(mem), cancelled)
}

/// Writes one chunk's non-zero pages at their offsets; returns its bitmap
/// words and hash.
fn write_chunk(
    file: &Files,
    path: &Path,
    b: &BlockEntry,
    c: u64,
    data: &[u8],
) -> Result<ChunkOut, SnapshotError> {
    let pages = data.len() as u64 / PAGE;
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    let mut written = 0;
    let mut run: Option<u64> = None;
    let base = b.pages_offset + c * CHUNK_SIZE;
    let flush = |from: u64, to: u64| -> Result<(), SnapshotError> {
        let bytes = &data[(from * PAGE) as usize..(to * PAGE) as usize];
        let at = base + from * PAGE;
        file.for_bytes(bytes)
            .write_all_at(bytes, at)
            .map_err(io_err(format!(
                "writing {} bytes of block '{}' at offset {at} of {}",
                bytes.len(),
                b.id,
                path.display()
            )))
    };
    for p in 0..pages {
        let page = &data[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
        if is_zero(page) {
            if let Some(from) = run.take() {
                flush(from, p)?;
            }
        } else {
            words[(p / 64) as usize] |= 1 << (p % 64);
            written += 1;
            run.get_or_insert(p);
        }
    }
    if let Some(from) = run {
        flush(from, pages)?;
    }
    let hash = if written == 0 {
        zero_hash(data.len() as u64)
    } else {
        *blake3::hash(data).as_bytes()
    };
    Ok(ChunkOut {
        words,
        hash,
        pages: written,
        zero_pages: pages - written,
    })
}

/// The file, and the same file opened with `O_DIRECT` if asked.
struct Files<'a> {
    buffered: &'a File,
    direct: Option<&'a File>,
}

impl Files<'_> {
    /// `O_DIRECT` needs the memory (and offset and length, always whole
    /// pages here) aligned to the page.
    fn for_bytes(&self, bytes: &[u8]) -> &File {
        match self.direct {
            Some(d) if (bytes.as_ptr() as usize).is_multiple_of(PAGE_SIZE) => d,
            _ => self.buffered,
        }
    }
}

/// Creates the file, writes every chunk from `source` on `threads`
/// threads, then the tables, the state and the header. Cancelled (see
/// [`save_cancellable`]), it removes the file if it created it.
pub(crate) fn write_file(
    mem: &dyn GuestMemory,
    path: &Path,
    state: &[u8],
    opts: &SaveOptions,
    source: &dyn ChunkSource,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<SaveStats, SnapshotError> {
    // Created here, or replacing a file that was there: only the first is
    // removed when cancelled.
    let (file, created) = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(io_err(format!("creating {}", path.display())))?,
            false,
        ),
        Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
    };
    let r = write_file_inner(mem, path, file, state, opts, source, cancelled);
    if created && matches!(r, Err(SnapshotError::Cancelled)) {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("removing the cancelled snapshot {}: {e}", path.display());
        }
    }
    r
}

fn write_file_inner(
    mem: &dyn GuestMemory,
    path: &Path,
    file: File,
    state: &[u8],
    opts: &SaveOptions,
    source: &dyn ChunkSource,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<SaveStats, SnapshotError> {
    let threads = opts.threads;
    let t0 = Instant::now();
    let layout: Vec<(String, u64)> = mem
        .blocks()
        .iter()
        .map(|b| (b.id().to_string(), b.len()))
        .collect();
    let flags = if state.is_empty() { 0 } else { FLAG_VM_STATE };
    let mut h = Header::plan(&layout, state.len() as u64, flags);
    file.set_len(h.file_len()).map_err(io_err(format!(
        "sizing {} to {} bytes",
        path.display(),
        h.file_len()
    )))?;
    let direct = if opts.direct_io {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            // tmpfs and some other file systems refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: O_DIRECT refused ({e}); writing through the page cache",
                    path.display()
                );
                None
            }
            Err(e) => {
                return Err(io_err(format!("opening {} with O_DIRECT", path.display()))(
                    e,
                ))
            }
        }
    } else {
        None
    };
    let files = Files {
        buffered: &file,
        direct: direct.as_ref(),
    };

    let chunks: Vec<(usize, u64)> = h
        .blocks
        .iter()
        .enumerate()
        .flat_map(|(bi, b)| (0..b.chunks()).map(move |c| (bi, c)))
        .collect();
    let results: Mutex<Vec<Option<ChunkOut>>> =
        Mutex::new((0..chunks.len()).map(|_| None).collect());
    super::each_chunk(chunks.len(), threads, cancelled, Vec::new, |buf, k| {
        let (bi, c) = chunks[k];
        let b = &h.blocks[bi];
        let len = b.chunk_len(c);
        let out = source.with_chunk(bi, c * CHUNK_SIZE, len, buf, &mut |data| {
            write_chunk(&files, path, b, c, data)
        })?;
        results.lock().expect("results")[k] = Some(out);
        Ok(())
    })?;
    let results = results.into_inner().expect("results");
    let mut stats = SaveStats::default();
    let mut hashes = Vec::with_capacity(results.len());
    let mut k = 0;
    for b in &h.blocks {
        let mut bitmap = Vec::with_capacity(b.bitmap_len() as usize);
        let mut table = Vec::with_capacity(b.hashes_len() as usize);
        for _ in 0..b.chunks() {
            let out = results[k].as_ref().ok_or(SnapshotError::Panicked)?;
            k += 1;
            for w in &out.words {
                bitmap.extend_from_slice(&w.to_le_bytes());
            }
            table.extend_from_slice(&out.hash);
            hashes.push(out.hash);
            stats.pages += out.pages;
            stats.zero_pages += out.zero_pages;
        }
        debug_assert_eq!(bitmap.len() as u64, b.bitmap_len());
        debug_assert_eq!(bitmap.len() as u64 * 8, b.pages().div_ceil(64) * 64);
        file.write_all_at(&bitmap, b.bitmap_offset)
            .map_err(io_err(format!(
                "writing the bitmap of block '{}' to {}",
                b.id,
                path.display()
            )))?;
        file.write_all_at(&table, b.hashes_offset)
            .map_err(io_err(format!(
                "writing the hash table of block '{}' to {}",
                b.id,
                path.display()
            )))?;
    }
    file.write_all_at(state, h.state_offset)
        .map_err(io_err(format!("writing the state to {}", path.display())))?;
    h.state_hash = *blake3::hash(state).as_bytes();
    h.digest = digest_of(layout.iter().map(|(id, len)| (id.as_str(), *len)), &hashes);
    file.write_all_at(&h.encode(), 0)
        .map_err(io_err(format!("writing the header of {}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(io_err(format!("reading the size of {}", path.display())))?;
    stats.file_len = meta.len();
    stats.disk_bytes = meta.blocks() * 512;
    stats.millis = t0.elapsed().as_millis() as u64;
    stats.digest = h.digest;
    stats.direct_io = direct.is_some();
    debug_assert_eq!(CHUNK_PAGES % 64, 0);
    Ok(stats)
}
