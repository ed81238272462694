//! Lazy restore: the guest runs before its memory is loaded.
//!
//! Guest memory is emptied (`MADV_DONTNEED`; memfd-backed memory with
//! `MADV_REMOVE`, which frees the file's pages) and registered with
//! userfaultfd for missing pages; the VMM then restores the vCPU/device
//! state and resumes at once. A fault thread serves each first touch by
//! loading the whole 2 MiB chunk around it from the file (checked against
//! its hash, then placed with `UFFDIO_COPY`; holes with `UFFDIO_ZEROPAGE`
//! when touched), while a background thread loads every other chunk in
//! order. Once every chunk is in, the memory is unregistered (untouched
//! holes are then plain zero memory).
//!
//! A chunk that fails its check is never placed: the fault and background
//! threads stop, the memory stays registered for good (the descriptor is
//! kept open even after [`LazyRestore`] is dropped), so a guest thread
//! touching a page that is not in stays blocked instead of reading
//! zeros; [`LazyStatus::error`] names the chunk and the VMM must stop the
//! guest.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::format::CHUNK_SIZE;
use super::{MappedRamFile, SnapshotError};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::sys::uffd::{empty_pages, Uffd, UffdMsg, Waker, UFFD_EVENT_PAGEFAULT};

const PAGE: u64 = PAGE_SIZE as u64;
const LOADED: u8 = 2;
const STRIPES: usize = 64;

/// How to restore lazily.
#[derive(Clone, Debug)]
pub struct LazyOptions {
    /// Load the chunks nobody touched in the background (false: only on
    /// demand, for tests; memory then stays registered until dropped).
    pub background: bool,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions { background: true }
    }
}

/// Where a lazy restore stands.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LazyStatus {
    /// Chunks loaded (checked and placed).
    pub loaded_chunks: u64,
    /// All chunks.
    pub total_chunks: u64,
    /// Missing-page faults served.
    pub faults: u64,
    /// Chunks loaded because a fault needed them.
    pub demand_chunks: u64,
    /// Every chunk is in and the memory unregistered.
    pub done: bool,
    /// Milliseconds from start until every chunk was in.
    pub load_millis: Option<u64>,
    /// Why the restore stopped (a damaged chunk, an I/O error): the guest
    /// must not run on.
    pub error: Option<String>,
}

struct Span {
    host: u64,
    len: u64,
}

struct Inner {
    file: MappedRamFile,
    uffd: Uffd,
    spans: Vec<Span>,
    /// First global chunk index of each file block.
    first_chunk: Vec<u64>,
    chunks: Vec<(usize, u64)>,
    state: Vec<AtomicU8>,
    locks: Vec<Mutex<()>>,
    loaded: AtomicU64,
    faults: AtomicU64,
    demand: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    stop: AtomicBool,
    released: AtomicBool,
    started: Instant,
    done_ms: Mutex<Option<u64>>,
    waker: Waker,
}

/// A lazy restore in progress; see the module doc. Dropping it loads
/// every chunk still missing first (serving faults meanwhile), then
/// unregisters; after a failure it keeps the memory registered for good.
pub struct LazyRestore {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRestore")
            .field("status", &self.status())
            .finish()
    }
}

fn uffd_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Uffd { what, source }
}

impl LazyRestore {
    /// Empties `mem` (laid out as the file), registers it for missing
    /// faults and starts serving it from `file`. Call before the guest
    /// (or anything else) touches `mem`; resume the guest afterwards.
    pub fn start(
        file: MappedRamFile,
        mem: &dyn GuestMemory,
        opts: &LazyOptions,
    ) -> Result<LazyRestore, SnapshotError> {
        let map = file.check_layout(mem)?;
        let uffd = Uffd::open().map_err(uffd_err("opening"))?;
        uffd.api(0).map_err(uffd_err("UFFDIO_API"))?;
        let mut spans = Vec::new();
        for &mb in &map {
            let r = mem.blocks()[mb].region();
            let span = Span {
                host: r.host_addr(),
                len: r.len() as u64,
            };
            let file_backed = mem.blocks()[mb].backing().is_some();
            empty_pages(file_backed, span.host, span.len).map_err(uffd_err(format!(
                "emptying block '{}'",
                mem.blocks()[mb].id()
            )))?;
            uffd.register_missing(span.host, span.len)
                .map_err(uffd_err(format!(
                    "registering block '{}' for missing pages",
                    mem.blocks()[mb].id()
                )))?;
            spans.push(span);
        }
        let chunks = file.chunks();
        let mut first_chunk = Vec::new();
        let mut at = 0;
        for b in &file.header().blocks {
            first_chunk.push(at);
            at += b.chunks();
        }
        let inner = Arc::new(Inner {
            state: (0..chunks.len()).map(|_| AtomicU8::new(0)).collect(),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            chunks,
            file,
            uffd,
            spans,
            first_chunk,
            loaded: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            stop: AtomicBool::new(false),
            released: AtomicBool::new(false),
            started: Instant::now(),
            done_ms: Mutex::new(None),
            waker: Waker::new().map_err(uffd_err("creating the wake-up eventfd"))?,
        });
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("livemig-lazy-faults".into())
                .spawn(move || i.fault_loop())
                .map_err(uffd_err("spawning the fault thread"))?,
        );
        if opts.background {
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("livemig-lazy-load".into())
                    .spawn(move || i.background())
                    .map_err(uffd_err("spawning the background loader"))?,
            );
        }
        Ok(LazyRestore { inner, threads })
    }

    /// Where the restore stands.
    pub fn status(&self) -> LazyStatus {
        let i = &self.inner;
        LazyStatus {
            loaded_chunks: i.loaded.load(Ordering::SeqCst),
            total_chunks: i.chunks.len() as u64,
            faults: i.faults.load(Ordering::Relaxed),
            demand_chunks: i.demand.load(Ordering::Relaxed),
            done: i.released.load(Ordering::SeqCst) && !i.failed.load(Ordering::SeqCst),
            load_millis: *lock(&i.done_ms),
            error: lock(&i.error).clone(),
        }
    }

    /// Waits until every chunk is in (or the restore failed).
    pub fn wait(&self) -> LazyStatus {
        loop {
            let s = self.status();
            if s.done || s.error.is_some() {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        let i = &self.inner;
        // Never unregister with chunks still missing (the guest would read
        // zeros there): finish loading first, faults still served.
        if !i.failed.load(Ordering::SeqCst) && !i.released.load(Ordering::SeqCst) {
            let mut buf = Vec::new();
            for g in 0..i.chunks.len() {
                if i.ensure(g, &mut buf).is_err() {
                    break;
                }
            }
        }
        i.stop.store(true, Ordering::SeqCst);
        let _ = i.waker.wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if i.failed.load(Ordering::SeqCst) {
            // Keep the memory registered for good: closing the descriptor
            // would let blocked guest threads read missing pages as zeros.
            std::mem::forget(self.inner.clone());
        } else {
            i.release();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn fail(&self, e: &SnapshotError) {
        let mut err = lock(&self.error);
        if err.is_none() {
            *err = Some(crate::error_chain(e));
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Loads global chunk `g` unless it is in already.
    fn ensure(&self, g: usize, buf: &mut Vec<u8>) -> Result<bool, SnapshotError> {
        if self.state[g].load(Ordering::Acquire) == LOADED {
            return Ok(false);
        }
        let _guard = lock(&self.locks[g % STRIPES]);
        if self.state[g].load(Ordering::Acquire) == LOADED {
            return Ok(false);
        }
        if self.failed.load(Ordering::SeqCst) {
            return Err(SnapshotError::Uffd {
                what: "the restore stopped".into(),
                source: io::Error::other(lock(&self.error).clone().unwrap_or_default()),
            });
        }
        let (b, c) = self.chunks[g];
        let runs = match self.file.read_chunk(b, c, buf) {
            Ok(r) => r,
            Err(e) => {
                self.fail(&e);
                return Err(e);
            }
        };
        let base = self.spans[b].host + c * CHUNK_SIZE;
        for (first, n) in runs {
            let data = &buf[(first * PAGE) as usize..((first + n) * PAGE) as usize];
            let dst = base + first * PAGE;
            if let Err(e) = place(&self.uffd, dst, data) {
                let e = SnapshotError::Uffd {
                    what: format!(
                        "placing {} pages of block '{}' at offset {:#x}",
                        n,
                        self.file.block(b).id,
                        c * CHUNK_SIZE + first * PAGE
                    ),
                    source: e,
                };
                self.fail(&e);
                return Err(e);
            }
        }
        self.state[g].store(LOADED, Ordering::Release);
        let n = self.loaded.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.chunks.len() as u64 {
            *lock(&self.done_ms) = Some(self.started.elapsed().as_millis() as u64);
        }
        Ok(true)
    }

    fn background(&self) {
        let mut buf = Vec::new();
        for g in 0..self.chunks.len() {
            if self.stop.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst) {
                return;
            }
            if self.ensure(g, &mut buf).is_err() {
                return;
            }
        }
        // Every chunk is in: holes nobody touched become plain memory.
        self.release();
        let _ = self.waker.wake();
    }

    fn release(&self) {
        if self.failed.load(Ordering::SeqCst) || self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.spans {
            if let Err(e) = self.uffd.unregister(s.host, s.len) {
                log::warn!("unregistering restored memory from userfaultfd: {e}");
            }
        }
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|s| addr >= s.host && addr < s.host + s.len)
            .map(|b| (b, (addr - self.spans[b].host) / PAGE))
    }

    fn fault_loop(&self) {
        let mut msgs = [UffdMsg::default(); 64];
        let mut buf = Vec::new();
        while !self.stop.load(Ordering::SeqCst) && !self.released.load(Ordering::SeqCst) {
            let ready = match self.uffd.poll(Some(self.waker.as_fd()), 200) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(&SnapshotError::Uffd {
                        what: "polling".into(),
                        source: e,
                    });
                    return;
                }
            };
            self.waker.drain();
            if !ready {
                continue;
            }
            let n = match self.uffd.read_msgs(&mut msgs) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(&SnapshotError::Uffd {
                        what: "reading faults".into(),
                        source: e,
                    });
                    return;
                }
            };
            for m in &msgs[..n] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = m.fault_address() & !(PAGE - 1);
                let Some((b, page)) = self.locate(addr) else {
                    continue;
                };
                self.faults.fetch_add(1, Ordering::Relaxed);
                let g = self.first_chunk[b] + page * PAGE / CHUNK_SIZE;
                match self.ensure(g as usize, &mut buf) {
                    Ok(true) => {
                        self.demand.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    // The faulting thread stays blocked: it never sees
                    // memory that failed its check.
                    Err(_) => return,
                }
                let served = if self.file.present(b, page) {
                    self.uffd.wake(addr, PAGE)
                } else {
                    match self.uffd.zeropage(addr, PAGE) {
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            self.uffd.wake(addr, PAGE)
                        }
                        r => r,
                    }
                };
                if let Err(e) = served {
                    if self.released.load(Ordering::SeqCst) {
                        // Unregistered meanwhile: the fault retried as a
                        // plain one.
                        continue;
                    }
                    self.fail(&SnapshotError::Uffd {
                        what: format!(
                            "serving a fault at block '{}' offset {:#x}",
                            self.file.block(b).id,
                            page * PAGE
                        ),
                        source: e,
                    });
                    return;
                }
            }
        }
    }
}

/// Places `data` at `dst`; pages already there (`EEXIST`) are skipped
/// one by one.
fn place(uffd: &Uffd, dst: u64, data: &[u8]) -> io::Result<()> {
    match uffd.copy(dst, data) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
                match uffd.copy(dst + i as u64 * PAGE, page) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        }
        r => r,
    }
}
