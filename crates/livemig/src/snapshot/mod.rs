//! Snapshot files laid out for fast, parallel save and restore
//! (capability `mapped-ram`, QEMU's name), restores that resume the guest
//! before its memory is loaded (lazy restore), and snapshots of a running
//! guest (capability `background-snapshot`).
//!
//! - [`format`](mod@format): the file layout (header, block table, page bitmaps,
//!   per-chunk hashes, each page at a fixed offset, holes for zero pages).
//! - [`save()`]: writes memory that does not change meanwhile (a paused
//!   guest) with several threads (`pwrite` at each page's offset).
//! - [`MappedRamFile`]: opens and checks a file; [`MappedRamFile::load`]
//!   reads it back with several threads, checking every chunk's hash
//!   before its pages are written to memory.
//! - [`LazyRestore`]: registers guest memory with userfaultfd (missing
//!   pages) and serves each chunk from the file on first touch while a
//!   background thread loads the rest; a chunk that fails its check is
//!   never placed.
//! - [`background`]: a snapshot of running memory: write protection
//!   (userfaultfd) is armed while the guest runs, the pause only
//!   re-protects what was written meanwhile and saves the state; a page
//!   the guest is about to overwrite is copied first.
//!
//! The socket stream format ([`crate::stream`]) is untouched: these files
//! are their own format, recognised by their magic ([`is_mapped_ram`]).

pub mod background;
pub mod format;
mod lazy;
mod load;
mod save;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use background::{
    background_save, background_save_cancellable, BackgroundOptions, BackgroundStats, HandlerError,
};
pub use lazy::{LazyOptions, LazyRestore, LazyStatus};
pub use load::{LoadOptions, MappedRamFile, RestoreStats};
pub use save::{save, save_cancellable, SaveOptions, SaveStats};

/// Why a snapshot could not be written, read or served.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Cancelled (`migrate-cancel`) before it completed.
    #[error("cancelled")]
    Cancelled,
    /// The file does not start with the mapped-ram magic.
    #[error("not a mapped-ram snapshot file (no LMMAPRAM magic at offset 0)")]
    NotMappedRam,
    /// A header field is out of range or damaged.
    #[error("mapped-ram header, field {field} at byte {offset}: {why}")]
    BadHeader {
        /// Byte offset of the field in the file.
        offset: u64,
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A region the header names lies outside the file or in the header.
    #[error("mapped-ram file: {what} ({len} bytes at offset {start}) lies outside the file ({file_len} bytes) or inside the header")]
    Region {
        /// Which region.
        what: String,
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Two regions of the file overlap.
    #[error("mapped-ram file: {second} (at offset {at}) overlaps {first}")]
    Overlap {
        /// The region that comes first.
        first: String,
        /// The one that starts inside it.
        second: String,
        /// Where the second starts.
        at: u64,
    },
    /// A page bitmap marks pages past its block's end.
    #[error("mapped-ram file: block '{block}' bitmap (offset {offset}) marks pages past the block's end")]
    Bitmap {
        /// Block id.
        block: String,
        /// File offset of the offending word.
        offset: u64,
    },
    /// A chunk's contents do not match its stored hash.
    #[error("mapped-ram file: block '{block}' chunk {chunk} (memory offset {mem_offset:#x}, file offset {file_offset}) fails its checksum: the file is damaged")]
    Corrupt {
        /// Block id.
        block: String,
        /// Chunk index in the block (2 MiB chunks).
        chunk: u64,
        /// The chunk's offset in the block.
        mem_offset: u64,
        /// The chunk's first byte in the file.
        file_offset: u64,
    },
    /// The chunk hash table does not give the header's digest.
    #[error("mapped-ram file: the chunk hash tables do not give the header's memory digest: the file is damaged")]
    Digest,
    /// The state blob does not match its hash.
    #[error("mapped-ram file: the vCPU/device state ({len} bytes at offset {offset}) fails its checksum: the file is damaged")]
    State {
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The file's blocks are not this memory's.
    #[error("the snapshot's memory layout does not match this destination: {0}")]
    Layout(String),
    /// Reading or writing the file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (file and offset).
        what: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up or using userfaultfd failed.
    #[error("userfaultfd: {what}: {source}")]
    Uffd {
        /// What was being done.
        what: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A background snapshot's write-protect fault handler stopped: the
    /// snapshot is lost, the guest runs on.
    #[error("userfaultfd: the write-protect handler stopped: {cause}")]
    WriteProtectHandler {
        /// Why it stopped.
        #[source]
        cause: Arc<HandlerError>,
    },
    /// The VMM could not pause, resume or save its state.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// A worker thread panicked.
    #[error("a snapshot worker thread panicked")]
    Panicked,
}

/// Runs `work(state, k)` for every chunk index `k` in `0..n`, taken in
/// order by up to `threads` threads, each with its own `state()`. The
/// first error stops every thread and is returned, as is
/// [`SnapshotError::Cancelled`] when `cancelled` says so (it is asked
/// before every chunk): the one worker pool of saving and loading.
pub(crate) fn each_chunk<S>(
    n: usize,
    threads: usize,
    cancelled: &(dyn Fn() -> bool + Sync),
    state: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, usize) -> Result<(), SnapshotError> + Sync,
) -> Result<(), SnapshotError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_err: std::sync::Mutex<Option<SnapshotError>> = std::sync::Mutex::new(None);
    let fail = |e: SnapshotError| {
        failed.store(true, Ordering::Relaxed);
        first_err.lock().expect("error").get_or_insert(e);
    };
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            s.spawn(|| {
                let mut st = state();
                while !failed.load(Ordering::Relaxed) {
                    if cancelled() {
                        return fail(SnapshotError::Cancelled);
                    }
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        return;
                    }
                    if let Err(e) = work(&mut st, k) {
                        return fail(e);
                    }
                }
            });
        }
    });
    match first_err.into_inner().expect("error") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// True if the file at `path` starts with the mapped-ram magic.
pub fn is_mapped_ram(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == format::MAGIC
}

/// Shows a finished snapshot save's figures on `handle` the way
/// `query-migrate` shows a migration's (for a VMM serving the control
/// socket's `migrate file:PATH` with `mapped-ram` or
/// `background-snapshot`); the VMM then sets the status `completed`, once
/// its guest is where it stays (running on, or paused for good), so a
/// client that sees `completed` finds it there. `downtime` = the guest's
/// pause, `ram.total` =
/// `memory`, pages written as `normal`, holes as `duplicate` (zero
/// pages), `transferred` = the bytes of pages written, `dirty-tracker` =
/// `how` (e.g. "none (paused)", "userfaultfd write-protect").
pub fn record_save(
    handle: &crate::engine::MigrationHandle,
    memory: u64,
    save: &SaveStats,
    pause: std::time::Duration,
    total: std::time::Duration,
    how: &str,
) {
    let page = crate::PAGE_SIZE as u64;
    handle.update_stats(|s| {
        s.total_time = total.as_millis() as u64;
        s.downtime = pause.as_millis() as u64;
        s.source_downtime = s.downtime;
        s.ram.total = memory;
        s.ram.remaining = 0;
        s.ram.normal = save.pages;
        s.ram.normal_bytes = save.pages * page;
        s.ram.duplicate = save.zero_pages;
        s.ram.transferred = save.pages * page;
        s.dirty_tracker = how.to_string();
    });
}

/// A default worker count: the cores this process may use, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
}

#[cfg(test)]
mod tests;
