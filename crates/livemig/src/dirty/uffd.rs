//! Dirty tracking of plain process memory with userfaultfd write-protection.
//!
//! Two modes, both *returns and resets*:
//! - **async** (`uffd-wp-async`, Linux 6.7+): the kernel resolves write
//!   faults itself and marks the page written; one `PAGEMAP_SCAN` per block
//!   collects the written pages and write-protects them again, atomically.
//! - **sync** (`uffd-wp`, Linux 5.7+): each first write to a protected page
//!   stops the writer until a handler thread has logged the page and lifted
//!   the protection of that page; `sync` re-protects what it reports.
//!
//! The fd is not user-mode only, so writes KVM makes to guest memory are
//! tracked too.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::{DirtyError, DirtyTracker, TrackerStart};
use crate::bitmap::DirtyBitmap;
use crate::memory::{GuestMemory, RamBlock, PAGE_SIZE};
use crate::sys::uffd::{
    PageRegion, Pagemap, ScanRequest, Uffd, UffdMsg, UffdSource, Waker, PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, UFFD_EVENT_PAGEFAULT,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
    UFFD_PAGEFAULT_FLAG_WP,
};

const NAME_ASYNC: &str = "uffd-wp-async";
const NAME_SYNC: &str = "uffd-wp";
const PAGE: u64 = PAGE_SIZE as u64;
/// Regions per `PAGEMAP_SCAN` call; the walk resumes where a full vector stopped.
const SCAN_REGIONS: usize = 4096;
/// How often the fault handler looks at its stop flag when not woken.
const HANDLER_POLL_MS: i32 = 1000;
/// Fault messages read per `read(2)`.
const MSG_BATCH: usize = 64;
/// Retries of a protection change the kernel refused with EAGAIN (the
/// address space was changing, e.g. during fork).
const EAGAIN_RETRIES: u32 = 1000;

/// Which userfaultfd mode to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UffdMode {
    /// Async if the kernel offers it, else sync.
    #[default]
    Auto,
    /// `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` (Linux 6.7+).
    Async,
    /// Write-protect faults served by a handler thread (Linux 5.7+).
    Sync,
}

/// What this kernel offers for userfaultfd write-protection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UffdSupport {
    /// How a userfaultfd can be opened.
    pub source: UffdSource,
    /// `UFFD_FEATURE_*` bits the kernel offers.
    pub features: u64,
    /// Why `PAGEMAP_SCAN` is unusable, if it is.
    pub pagemap_scan_missing: Option<String>,
}

impl UffdSupport {
    /// Asks the kernel. `Unavailable` if no userfaultfd can be opened at all.
    pub fn probe() -> Result<Self, DirtyError> {
        let (source, features) = Uffd::probe_features().map_err(|e| DirtyError::Unavailable {
            tracker: NAME_SYNC,
            why: format!(
                "cannot open a userfaultfd ({e}); as root, or with /dev/userfaultfd access"
            ),
        })?;
        let pagemap_scan_missing = match Pagemap::open().and_then(|p| p.probe()) {
            Ok(()) => None,
            Err(e) => Some(format!(
                "PAGEMAP_SCAN on /proc/self/pagemap failed: {e} (Linux 6.7+ needed)"
            )),
        };
        Ok(UffdSupport {
            source,
            features,
            pagemap_scan_missing,
        })
    }

    /// Why async mode is unusable, or None if it is usable.
    pub fn async_missing(&self) -> Option<String> {
        if self.features & UFFD_FEATURE_WP_ASYNC == 0 {
            return Some("the kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7+ needed)".into());
        }
        if self.features & UFFD_FEATURE_WP_UNPOPULATED == 0 {
            return Some("the kernel lacks UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+ needed)".into());
        }
        self.pagemap_scan_missing.clone()
    }

    /// Why sync mode is unusable, or None if it is usable.
    pub fn sync_missing(&self) -> Option<String> {
        if self.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Some(
                "the kernel lacks userfaultfd write-protection (Linux 5.7+ needed)".into(),
            );
        }
        None
    }
}

/// One block's host range.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    len: u64,
}

impl Span {
    fn of(b: &RamBlock) -> Self {
        Span {
            start: b.region().host_addr(),
            len: b.len(),
        }
    }

    fn end(&self) -> u64 {
        self.start + self.len
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Running,
    Stopped,
}

/// State shared with the sync-mode fault handler.
#[derive(Debug)]
struct SyncShared {
    uffd: Arc<Uffd>,
    spans: Vec<Span>,
    /// Pages written since the last sync. Lock order: the handler logs a
    /// page and lifts its protection under this lock, so a page is never
    /// writable without being in the log (or in the set a sync is busy
    /// re-protecting).
    log: Mutex<Vec<DirtyBitmap>>,
    stop: AtomicBool,
    /// Interrupts the handler's wait when `stop` is set.
    wake: Waker,
    /// The handler's fatal error, reported by the next sync.
    failed: Mutex<Option<String>>,
}

impl SyncShared {
    fn log(&self) -> MutexGuard<'_, Vec<DirtyBitmap>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Block and page of a host address inside one of the blocks.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|s| addr >= s.start && addr < s.end())
            .map(|i| (i, (addr - self.spans[i].start) / PAGE))
    }

    /// The handler thread: log each write-protect fault, lift protection of
    /// that page and wake the writer.
    fn serve(&self) {
        let mut msgs = [UffdMsg::default(); MSG_BATCH];
        while !self.stop.load(Ordering::Acquire) {
            let n = match self
                .uffd
                .poll(Some(self.wake.as_fd()), HANDLER_POLL_MS)
                .and_then(|ready| {
                    if ready {
                        self.uffd.read_msgs(&mut msgs)
                    } else {
                        Ok(0)
                    }
                }) {
                Ok(n) => n,
                Err(e) => return self.fail(format!("reading faults: {e}")),
            };
            if n == 0 {
                continue; // timeout or spurious wake-up (EAGAIN)
            }
            let mut log = self.log();
            for m in &msgs[..n] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = m.fault_address() & !(PAGE - 1);
                if m.fault_flags() & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    if let Some((b, p)) = self.locate(addr) {
                        log[b].set(p);
                    }
                }
                if let Err(e) = retry_eagain(|| self.uffd.write_protect(addr, PAGE, false, true)) {
                    drop(log);
                    return self.fail(format!("unprotecting page {addr:#x}: {e}"));
                }
            }
        }
    }

    /// Records a fatal handler error and lifts all protection, so no writer
    /// stays blocked; the next sync fails.
    fn fail(&self, why: String) {
        if self.stop.load(Ordering::Acquire) {
            // Stopping: the ranges may already be unregistered, and
            // unregistering wakes every blocked writer.
            return;
        }
        log::error!("{NAME_SYNC}: fault handler stopped: {why}");
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        for s in &self.spans {
            let _ = self.uffd.write_protect(s.start, s.len, false, true);
        }
    }
}

/// Retries `f` while it fails with EAGAIN.
fn retry_eagain(mut f: impl FnMut() -> std::io::Result<()>) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < EAGAIN_RETRIES => {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

/// Calls `f(first, count)` for each maximal run of set bits in `bm`, in order.
fn for_each_run<E>(
    bm: &DirtyBitmap,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut run: Option<u64> = None;
    for (wi, &w) in bm.words().iter().enumerate() {
        let base = wi as u64 * 64;
        let mut bit = 0u32;
        while bit < 64 {
            let rest = w >> bit;
            match run {
                Some(first) => {
                    bit += rest.trailing_ones();
                    if bit < 64 {
                        f(first, base + u64::from(bit) - first)?;
                        run = None;
                    }
                }
                None => {
                    if rest == 0 {
                        break;
                    }
                    bit += rest.trailing_zeros();
                    run = Some(base + u64::from(bit));
                }
            }
        }
    }
    if let Some(first) = run {
        // Bits past the end are always clear, so a run still open here
        // reaches the last word's end, which is the bitmap's end.
        f(first, bm.words().len() as u64 * 64 - first)?;
    }
    Ok(())
}

/// Mode-specific parts.
#[derive(Debug)]
enum Backend {
    Async {
        pagemap: Pagemap,
        regions: Vec<PageRegion>,
    },
    Sync {
        shared: Arc<SyncShared>,
        /// The log a sync swaps in; kept to avoid reallocating.
        spare: Vec<DirtyBitmap>,
        handler: Option<JoinHandle<()>>,
        /// No `WP_UNPOPULATED`: untouched pages must be mapped (read) before
        /// protecting, or their first write would not fault.
        populate: bool,
    },
}

/// userfaultfd write-protect dirty tracking over any [`GuestMemory`] whose
/// blocks are private anonymous mappings of this process (THP included).
/// shmem and hugetlb blocks are not supported yet: sync mode handles faults
/// in 4 KiB pages.
///
/// Keeps the blocks' mappings alive while it exists; stops on drop.
#[derive(Debug)]
pub struct UffdTracker {
    name: &'static str,
    uffd: Arc<Uffd>,
    blocks: Vec<RamBlock>,
    spans: Vec<Span>,
    /// Blocks currently registered with the uffd (a prefix of `spans`).
    registered: usize,
    state: State,
    backend: Backend,
}

impl UffdTracker {
    /// A tracker over `mem` in `mode`; fails with `Unavailable` (saying
    /// why) if the kernel does not offer that mode.
    pub fn new(mem: &dyn GuestMemory, mode: UffdMode) -> Result<Self, DirtyError> {
        let support = UffdSupport::probe()?;
        let use_async = match mode {
            UffdMode::Async => match support.async_missing() {
                None => true,
                Some(why) => {
                    return Err(DirtyError::Unavailable {
                        tracker: NAME_ASYNC,
                        why,
                    })
                }
            },
            UffdMode::Sync => false,
            UffdMode::Auto => support.async_missing().is_none(),
        };
        if !use_async {
            if let Some(why) = support.sync_missing() {
                let why = match mode {
                    UffdMode::Auto => format!(
                        "{why}; async: {}",
                        support.async_missing().unwrap_or_default()
                    ),
                    _ => why,
                };
                return Err(DirtyError::Unavailable {
                    tracker: NAME_SYNC,
                    why,
                });
            }
        }
        let name = if use_async { NAME_ASYNC } else { NAME_SYNC };
        let os = |op: &'static str| {
            move |source| DirtyError::Os {
                tracker: name,
                op,
                source,
            }
        };

        let unpopulated = support.features & UFFD_FEATURE_WP_UNPOPULATED;
        let features = if use_async {
            UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_ASYNC
        } else {
            UFFD_FEATURE_PAGEFAULT_FLAG_WP | unpopulated
        };
        let uffd = Uffd::open().map_err(os("open userfaultfd"))?;
        uffd.api(features).map_err(os("UFFDIO_API"))?;
        let uffd = Arc::new(uffd);

        let blocks = mem.blocks().to_vec();
        let spans: Vec<Span> = blocks.iter().map(Span::of).collect();
        let empty = || {
            blocks
                .iter()
                .map(|b| DirtyBitmap::new(b.pages()))
                .collect::<Vec<_>>()
        };
        let backend = if use_async {
            Backend::Async {
                pagemap: Pagemap::open().map_err(os("open /proc/self/pagemap"))?,
                regions: Vec::with_capacity(SCAN_REGIONS),
            }
        } else {
            Backend::Sync {
                shared: Arc::new(SyncShared {
                    uffd: uffd.clone(),
                    spans: spans.clone(),
                    log: Mutex::new(empty()),
                    stop: AtomicBool::new(false),
                    wake: Waker::new().map_err(os("eventfd"))?,
                    failed: Mutex::new(None),
                }),
                spare: empty(),
                handler: None,
                populate: unpopulated == 0,
            }
        };
        Ok(UffdTracker {
            name,
            uffd,
            blocks,
            spans,
            registered: 0,
            state: State::Idle,
            backend,
        })
    }

    /// The mode in use (never `Auto`).
    pub fn mode(&self) -> UffdMode {
        match self.backend {
            Backend::Async { .. } => UffdMode::Async,
            Backend::Sync { .. } => UffdMode::Sync,
        }
    }

    fn os(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> DirtyError {
        let tracker = self.name;
        move |source| DirtyError::Os {
            tracker,
            op,
            source,
        }
    }

    fn check_running(&self, bitmaps: &[DirtyBitmap]) -> Result<(), DirtyError> {
        if self.state != State::Running {
            return Err(DirtyError::State {
                tracker: self.name,
                what: "sync while not started",
            });
        }
        if bitmaps.len() != self.blocks.len()
            || bitmaps
                .iter()
                .zip(&self.blocks)
                .any(|(bm, b)| bm.len() != b.pages())
        {
            return Err(DirtyError::Mismatch {
                tracker: self.name,
                what: format!(
                    "{} bitmaps of {:?} pages for blocks of {:?} pages",
                    bitmaps.len(),
                    bitmaps.iter().map(DirtyBitmap::len).collect::<Vec<_>>(),
                    self.blocks.iter().map(RamBlock::pages).collect::<Vec<_>>()
                ),
            });
        }
        Ok(())
    }

    /// Registers and write-protects every block (and starts the handler).
    fn arm(&mut self) -> Result<(), DirtyError> {
        if let Backend::Sync {
            shared,
            handler,
            populate,
            ..
        } = &mut self.backend
        {
            for bm in shared.log().iter_mut() {
                bm.clear_all();
            }
            shared.stop.store(false, Ordering::Release);
            shared.wake.drain();
            *shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let s = shared.clone();
            *handler = Some(
                std::thread::Builder::new()
                    .name("livemig-uffd-wp".into())
                    .spawn(move || s.serve())
                    .map_err(|source| DirtyError::Os {
                        tracker: NAME_SYNC,
                        op: "spawn fault handler",
                        source,
                    })?,
            );
            if *populate {
                for b in &self.blocks {
                    // Reading maps the zero page, which write-protection covers.
                    b.region().scan(0, b.len() as usize, |s| {
                        s.iter().step_by(PAGE_SIZE).fold(0u8, |a, &x| a ^ x)
                    });
                }
            }
        }
        for (i, s) in self.spans.iter().enumerate() {
            self.uffd
                .register_wp(s.start, s.len)
                .map_err(self.os("UFFDIO_REGISTER"))?;
            self.registered = i + 1;
            retry_eagain(|| self.uffd.write_protect(s.start, s.len, true, false))
                .map_err(self.os("UFFDIO_WRITEPROTECT"))?;
        }
        Ok(())
    }

    /// Unregisters every block and stops the handler. Tries every step
    /// and returns the first error.
    ///
    /// Unregistering alone lifts the protection (the kernel clears the
    /// write-protect marks of the range); an explicit unprotect first would double the cost (1 GiB populated:
    /// ~38 ms unprotect + ~27 ms unregister, against ~29 ms unregister
    /// alone). Unprotecting is the fallback if unregistering fails.
    fn disarm(&mut self) -> Result<(), DirtyError> {
        let mut first: Option<DirtyError> = None;
        if let Backend::Sync { shared, .. } = &self.backend {
            shared.stop.store(true, Ordering::Release);
            if let Err(e) = shared.wake.wake() {
                first = Some(self.os("eventfd write")(e));
            }
        }
        for s in &self.spans[..self.registered] {
            if let Err(e) = self.uffd.unregister(s.start, s.len) {
                first.get_or_insert(self.os("UFFDIO_UNREGISTER")(e));
                let _ = retry_eagain(|| self.uffd.write_protect(s.start, s.len, false, true));
            }
            // Unregistering wakes blocked writers only for MISSING ranges,
            // not for write-protect ones: wake them explicitly.
            if let Err(e) = self.uffd.wake(s.start, s.len) {
                first.get_or_insert(self.os("UFFDIO_WAKE")(e));
            }
        }
        self.registered = 0;
        if let Backend::Sync { handler, .. } = &mut self.backend {
            if let Some(h) = handler.take() {
                if h.join().is_err() {
                    first.get_or_insert(DirtyError::State {
                        tracker: NAME_SYNC,
                        what: "fault handler panicked",
                    });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn sync_async(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        let Backend::Async { pagemap, regions } = &mut self.backend else {
            unreachable!("async sync on a sync backend");
        };
        let mut reported = 0;
        for (s, bm) in self.spans.iter().zip(bitmaps.iter_mut()) {
            let mut req = ScanRequest {
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: s.start,
                end: s.end(),
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            loop {
                let walk_end = pagemap
                    .scan(&req, regions)
                    .map_err(|source| DirtyError::Os {
                        tracker: NAME_ASYNC,
                        op: "PAGEMAP_SCAN",
                        source,
                    })?;
                for r in regions.iter() {
                    let (a, b) = (r.start.max(s.start), r.end.min(s.end()));
                    if a < b {
                        let count = (b - a).div_ceil(PAGE);
                        bm.set_range((a - s.start) / PAGE, count);
                        reported += count;
                    }
                }
                if walk_end >= req.end {
                    break;
                }
                if walk_end <= req.start {
                    return Err(DirtyError::Os {
                        tracker: NAME_ASYNC,
                        op: "PAGEMAP_SCAN",
                        source: std::io::Error::other(format!(
                            "walk made no progress at {walk_end:#x}"
                        )),
                    });
                }
                req.start = walk_end;
            }
        }
        Ok(reported)
    }

    fn sync_sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        let Backend::Sync { shared, spare, .. } = &mut self.backend else {
            unreachable!("sync-mode sync on an async backend");
        };
        if let Some(why) = shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(DirtyError::Os {
                tracker: NAME_SYNC,
                op: "fault handler",
                source: std::io::Error::other(why),
            });
        }
        std::mem::swap(&mut *shared.log(), spare);
        // Outside the lock: the handler only lifts protection of pages it
        // logs in the new log, so re-protecting these cannot hide a write.
        let mut reported = 0;
        for ((s, log), bm) in self
            .spans
            .iter()
            .zip(spare.iter_mut())
            .zip(bitmaps.iter_mut())
        {
            for_each_run(log, |first, count| {
                retry_eagain(|| {
                    self.uffd
                        .write_protect(s.start + first * PAGE, count * PAGE, true, false)
                })
            })
            .map_err(|source| DirtyError::Os {
                tracker: NAME_SYNC,
                op: "UFFDIO_WRITEPROTECT",
                source,
            })?;
            reported += log.count();
            bm.or_words(0, log.words());
            log.clear_all();
        }
        Ok(reported)
    }
}

impl DirtyTracker for UffdTracker {
    fn name(&self) -> &'static str {
        self.name
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        if self.state == State::Running {
            return Err(DirtyError::State {
                tracker: self.name,
                what: "started twice",
            });
        }
        self.state = State::Running;
        if let Err(e) = self.arm() {
            let _ = self.disarm();
            self.state = State::Stopped;
            return Err(e);
        }
        Ok(TrackerStart {
            initially_set: false,
        })
    }

    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        self.check_running(bitmaps)?;
        match self.backend {
            Backend::Async { .. } => self.sync_async(bitmaps),
            Backend::Sync { .. } => self.sync_sync(bitmaps),
        }
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.state != State::Running {
            return Ok(());
        }
        self.state = State::Stopped;
        self.disarm()
    }
}

impl Drop for UffdTracker {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}: stop on drop: {e}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::suite::{self, Writer};
    use crate::memory::ProcessMemory;

    fn runs(bits: u64, set: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut bm = DirtyBitmap::new(bits);
        for &(f, c) in set {
            bm.set_range(f, c);
        }
        let mut out = Vec::new();
        for_each_run(&bm, |f, c| {
            out.push((f, c));
            Ok::<(), ()>(())
        })
        .unwrap();
        out
    }

    #[test]
    fn runs_are_maximal() {
        assert_eq!(runs(10, &[]), vec![]);
        assert_eq!(runs(200, &[(0, 200)]), vec![(0, 200)]);
        assert_eq!(runs(128, &[(0, 128)]), vec![(0, 128)]);
        assert_eq!(
            runs(200, &[(3, 1), (5, 2), (63, 2), (127, 70)]),
            vec![(3, 1), (5, 2), (63, 2), (127, 70)]
        );
        assert_eq!(runs(300, &[(10, 54), (64, 64), (128, 1)]), vec![(10, 119)]);
        assert_eq!(runs(64, &[(63, 1)]), vec![(63, 1)]);
    }

    /// None (with a note) when no userfaultfd can be opened here at all.
    fn support() -> Option<UffdSupport> {
        match UffdSupport::probe() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("SKIPPED: neither /dev/userfaultfd nor userfaultfd(2) usable: {e}");
                None
            }
        }
    }

    fn plain_writer(mem: &ProcessMemory) -> Writer {
        let blocks = mem.blocks().to_vec();
        Box::new(move |b, off, data| {
            assert!(
                blocks[b].region().write(off as usize, data),
                "write outside block {b}"
            )
        })
    }

    fn async_factory(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
        let t = UffdTracker::new(mem, UffdMode::Async).expect("async uffd tracker");
        assert_eq!(t.name(), NAME_ASYNC);
        (Box::new(t), plain_writer(mem))
    }

    fn sync_factory(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
        let t = UffdTracker::new(mem, UffdMode::Sync).expect("sync uffd tracker");
        assert_eq!(t.name(), NAME_SYNC);
        (Box::new(t), plain_writer(mem))
    }

    #[test]
    fn suite_async() {
        let Some(s) = support() else { return };
        if let Some(why) = s.async_missing() {
            eprintln!("SKIPPED: uffd async mode unavailable: {why}");
            return;
        }
        suite::run_all(async_factory);
    }

    #[test]
    fn suite_sync() {
        if support().is_none() {
            return;
        }
        suite::run_all(sync_factory);
    }

    #[test]
    fn auto_prefers_async() {
        let Some(s) = support() else { return };
        let mem = ProcessMemory::single(16 * 4096).unwrap();
        let t = UffdTracker::new(&mem, UffdMode::Auto).unwrap();
        let want = if s.async_missing().is_none() {
            UffdMode::Async
        } else {
            UffdMode::Sync
        };
        assert_eq!(t.mode(), want);
    }

    #[test]
    fn sync_mode_reprotects_in_runs() {
        if support().is_none() {
            return;
        }
        let mem = ProcessMemory::single(256 * 4096).unwrap();
        let (mut t, w) = sync_factory(&mem);
        t.start().unwrap();
        let mut bm = vec![DirtyBitmap::new(256)];
        // A run across a word boundary and a lone page.
        w(0, 60 * 4096, &vec![7u8; 10 * 4096]);
        w(0, 200 * 4096, &[1]);
        assert_eq!(t.sync(&mut bm).unwrap(), 11);
        w(0, 65 * 4096, &[2]);
        let mut bm = vec![DirtyBitmap::new(256)];
        assert_eq!(t.sync(&mut bm).unwrap(), 1, "re-protected after the report");
        assert!(bm[0].test(65));
        t.stop().unwrap();
    }
}
