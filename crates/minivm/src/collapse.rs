//! Huge pages for an incoming guest's memory after it resumed.
//!
//! An incoming VM receives into 4 KiB pages (clearing fresh huge pages on
//! this host is what bounds a destination's first pass) and asks for huge
//! pages once it runs: at its first resume a thread starts that gives the
//! advice (`MADV_HUGEPAGE`) as soon as no userfaultfd watches the memory
//! any more. Not before: under postcopy (or a lazy restore) a write fault
//! on a 2 MiB range that has no page table yet, in memory advised for huge
//! pages, makes the kernel allocate and clear a whole huge page before it
//! sees the userfaultfd and hands the fault to it, then free the page
//! (mm/huge_memory.c, the anonymous huge page fault): 2 MiB cleared for
//! nothing on every such fault, 10-30 ms each on this host's cold memory.
//!
//! The advice alone leaves the received memory
//! on 4 KiB pages until khugepaged gets to it, and khugepaged scans 4096
//! pages (16 MiB) every 10 s by default, shared by every process that
//! asked: a 1 GiB guest would wait minutes. So after the resume a
//! background thread collapses the guest's memory itself with
//! `MADV_COLLAPSE` (Linux 6.1+), one 2 MiB chunk per call:
//!
//! - only chunks whose every page holds data (`PAGEMAP_SCAN`: present or
//!   swapped, not the shared zero page): collapsing a sparse chunk would
//!   allocate the whole 2 MiB, and a chunk with a page still missing under
//!   postcopy's userfaultfd must wait for it. Chunks left out are looked
//!   at again a few times (postcopy fills them in), then left to
//!   khugepaged;
//! - at most half of the time (after each call the thread sleeps as long
//!   as the call took), so the vCPUs keep their CPU, and at a lower
//!   priority (nice [`NICE`]) while it looks at the page tables; but at
//!   the normal priority ([`CALL_NICE`], where the process may raise it
//!   back) during each `MADV_COLLAPSE` call: the kernel holds the address
//!   space's lock while it copies a chunk, and a thread preempted while
//!   holding it stalls the vCPU faults meanwhile (at nice 10 under load
//!   9-11 one call took 298 ms; not `SCHED_IDLE` for the same reason);
//! - not while a userfaultfd watches the memory (`VmFlags` `um`, `uw` or
//!   `ui` in /proc/self/smaps: postcopy or a lazy restore still placing
//!   pages, a background snapshot write-protecting them): it waits until
//!   the memory is its own again, so it never competes with the page
//!   placement for the address space's lock;
//! - stoppable between chunks (dropping the [`Collapser`], or the VM);
//! - it gives up when the kernel has no `MADV_COLLAPSE` or keeps finding
//!   no free huge page.
//!
//! A vCPU touching the chunk being collapsed waits for that one call
//! (its [`CollapseStats::longest`] bounds the wait); other chunks stay
//! mapped.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livemig::memory::RamBlock;

use crate::sys;
use crate::vm::lock;

/// Size of a transparent huge page (x86-64 PMD).
pub const CHUNK: u64 = 2 << 20;
/// Nice value of the collapse thread.
pub const NICE: i32 = 10;
/// Nice value of the collapse thread inside a `MADV_COLLAPSE` call.
pub const CALL_NICE: i32 = 0;
/// Consecutive chunks the kernel found no free huge page for before the
/// thread gives up.
const NOMEM_LIMIT: u32 = 16;
/// Shortest pause between two calls.
const MIN_GAP: Duration = Duration::from_micros(200);
/// How often a userfaultfd's hold on the memory is looked at while it
/// lasts, and at most during a sweep (reading /proc/self/smaps walks the
/// page tables).
const UFFD_CHECK: Duration = Duration::from_millis(500);

/// When the collapse runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollapsePace {
    /// Wait after the resume before the first chunk (the migration's
    /// completion handshake runs then).
    pub start_delay: Duration,
    /// Waits before each further look at the chunks left out for not
    /// holding data in every page; after the last, they are left to
    /// khugepaged.
    pub resweeps: Vec<Duration>,
}

impl Default for CollapsePace {
    fn default() -> Self {
        CollapsePace {
            start_delay: Duration::from_millis(500),
            resweeps: [1, 2, 4, 8, 16]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        }
    }
}

/// What the collapse did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollapseStats {
    /// 2 MiB chunks of guest memory (aligned, whole).
    pub chunks: u64,
    /// Chunks now on a huge page (`MADV_COLLAPSE` succeeded; a chunk that
    /// already was one counts too).
    pub collapsed: u64,
    /// Chunks left out at the last look: not every page held data.
    pub sparse: u64,
    /// Chunks the kernel could not collapse.
    pub failed: u64,
    /// Looks over the chunks so far.
    pub sweeps: u32,
    /// Time spent inside `MADV_COLLAPSE` calls.
    pub busy: Duration,
    /// The longest single call: what a vCPU touching that chunk waited at
    /// most.
    pub longest: Duration,
    /// Time spent waiting for a userfaultfd to let go of the memory.
    pub uffd_wait: Duration,
    /// The memory was advised for huge pages (`MADV_HUGEPAGE`).
    pub advised: bool,
    /// The thread ended on its own (not stopped).
    pub finished: bool,
    /// Why it stopped early, if it did (an old kernel, no huge pages).
    pub gave_up: Option<String>,
}

struct Stop {
    stopped: Mutex<bool>,
    cond: Condvar,
}

impl Stop {
    /// Sleeps `d` unless stopped first; true when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut s = lock(&self.stopped);
        loop {
            if *s {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            s = self
                .cond
                .wait_timeout(s, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn is_set(&self) -> bool {
        *lock(&self.stopped)
    }
}

/// The background collapse of some blocks' memory; dropping it stops
/// the thread (between two chunks) and waits for it.
pub struct Collapser {
    stop: Arc<Stop>,
    stats: Arc<Mutex<CollapseStats>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Collapser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collapser")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Collapser {
    /// Starts a thread named `thp-collapse` that asks for huge pages on
    /// the memory of `blocks` once no userfaultfd watches it, then, with
    /// `collapse`, collapses it (private anonymous memory; other blocks
    /// are left alone).
    pub fn start(
        blocks: Vec<RamBlock>,
        collapse: bool,
        pace: CollapsePace,
    ) -> io::Result<Collapser> {
        let stop = Arc::new(Stop {
            stopped: Mutex::new(false),
            cond: Condvar::new(),
        });
        let stats = Arc::new(Mutex::new(CollapseStats::default()));
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("thp-collapse".into())
            .spawn(move || run(&blocks, collapse, &pace, &s, &st))?;
        Ok(Collapser {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// What it did so far.
    pub fn stats(&self) -> CollapseStats {
        lock(&self.stats).clone()
    }

    /// True once the thread ended (finished, gave up or stopped).
    pub fn is_done(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread between two chunks and waits for it.
    pub fn stop(&mut self) {
        *lock(&self.stop.stopped) = true;
        self.stop.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Collapser {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The whole, aligned 2 MiB chunks of `[host, host + len)`, as host
/// addresses.
fn chunks_of(host: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = host.next_multiple_of(CHUNK);
    let end = (host + len) / CHUNK * CHUNK;
    (first..end.max(first)).step_by(CHUNK as usize)
}

/// The chunks (host addresses) of `block` whose every page holds data,
/// or `None` when that cannot be known (not private anonymous memory, or
/// a kernel without `PAGEMAP_SCAN`).
fn full_chunks(block: &RamBlock) -> Option<Vec<u64>> {
    let r = block.region();
    let host = r.host_addr();
    let ranges = r.populated(0, r.len())?;
    let mut out = Vec::new();
    for (a, b) in ranges {
        out.extend(chunks_of(host + a as u64, (b - a) as u64));
    }
    Some(out)
}

/// The field lines (`AnonHugePages: ...`, `VmFlags: ...`) of the
/// mappings in `smaps` (the text of /proc/self/smaps) whose range
/// `[start, end)` satisfies `wanted(start, end)`.
pub fn smaps_fields<'a>(
    smaps: &'a str,
    wanted: impl Fn(u64, u64) -> bool + 'a,
) -> impl Iterator<Item = &'a str> + 'a {
    let mut inside = false;
    smaps.lines().filter(move |line| {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = wanted(a, b);
                return false;
            }
        }
        inside
    })
}

/// True when a mapping of `smaps` (the text of /proc/self/smaps) that
/// overlaps one of `spans` (host address, length) is registered with a
/// userfaultfd (`VmFlags` `um`, `uw` or `ui`).
fn uffd_armed_in(smaps: &str, spans: &[(u64, u64)]) -> bool {
    smaps_fields(smaps, |a, b| spans.iter().any(|&(h, l)| a < h + l && h < b))
        .filter_map(|line| line.strip_prefix("VmFlags:"))
        .any(|flags| {
            flags
                .split_whitespace()
                .any(|f| matches!(f, "um" | "uw" | "ui"))
        })
}

/// Waits while a userfaultfd holds the memory of `spans`; true when
/// stopped meanwhile.
fn wait_for_uffd(spans: &[(u64, u64)], stop: &Stop, stats: &Mutex<CollapseStats>) -> bool {
    loop {
        let armed = match std::fs::read_to_string("/proc/self/smaps") {
            Ok(s) => uffd_armed_in(&s, spans),
            Err(e) => {
                log::debug!("collapse: reading /proc/self/smaps: {e}");
                false
            }
        };
        if !armed {
            return false;
        }
        let t = Instant::now();
        if stop.sleep(UFFD_CHECK) {
            return true;
        }
        lock(stats).uffd_wait += t.elapsed();
    }
}

fn run(
    blocks: &[RamBlock],
    collapse: bool,
    pace: &CollapsePace,
    stop: &Stop,
    stats: &Mutex<CollapseStats>,
) {
    if let Err(e) = sys::set_thread_nice(NICE) {
        log::debug!("collapse thread: cannot lower its priority: {e}");
    }
    let spans: Vec<(u64, u64)> = blocks
        .iter()
        .map(|b| (b.region().host_addr(), b.region().len() as u64))
        .collect();
    if wait_for_uffd(&spans, stop, stats) {
        return;
    }
    for &(host, len) in &spans {
        if let Err(e) = sys::advise_huge_pages(host, len) {
            log::debug!("MADV_HUGEPAGE on guest memory: {e}");
        }
    }
    lock(stats).advised = true;
    if !collapse {
        lock(stats).finished = true;
        return;
    }
    let mut pending: Vec<u64> = blocks
        .iter()
        .flat_map(|b| chunks_of(b.region().host_addr(), b.region().len() as u64))
        .collect();
    lock(stats).chunks = pending.len() as u64;
    if stop.sleep(pace.start_delay) {
        return;
    }
    let mut resweeps = pace.resweeps.iter();
    let mut nomem = 0u32;
    // Back to the normal priority for each call, if this process may.
    let mut boost = true;
    loop {
        if wait_for_uffd(&spans, stop, stats) {
            return;
        }
        let mut checked = Instant::now();
        lock(stats).sweeps += 1;
        // One look at the page tables per block and sweep.
        let mut full = std::collections::HashSet::new();
        for b in blocks {
            match full_chunks(b) {
                Some(c) => full.extend(c),
                None => log::debug!(
                    "collapse: cannot tell which pages of {} hold data; left to khugepaged",
                    b.id()
                ),
            }
        }
        let mut left = Vec::new();
        for &chunk in &pending {
            if stop.is_set() {
                return;
            }
            if !full.contains(&chunk) {
                left.push(chunk);
                continue;
            }
            if checked.elapsed() >= UFFD_CHECK {
                if wait_for_uffd(&spans, stop, stats) {
                    return;
                }
                checked = Instant::now();
            }
            boost = boost && sys::set_thread_nice(CALL_NICE).is_ok();
            let t = Instant::now();
            let mut r = sys::collapse_huge_pages(chunk, CHUNK);
            if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EAGAIN)) {
                // A transient conflict (a page locked, on its way to the
                // LRU): once more.
                std::thread::sleep(MIN_GAP);
                r = sys::collapse_huge_pages(chunk, CHUNK);
            }
            let took = t.elapsed();
            if boost {
                let _ = sys::set_thread_nice(NICE);
            }
            let mut st = lock(stats);
            st.busy += took;
            st.longest = st.longest.max(took);
            match r {
                Ok(()) => {
                    st.collapsed += 1;
                    nomem = 0;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && st.collapsed == 0 => {
                    st.failed += 1;
                    st.gave_up = Some(format!("MADV_COLLAPSE refused ({e}): Linux 6.1+ needed"));
                    log::info!("collapse: MADV_COLLAPSE refused ({e}); left to khugepaged");
                    return;
                }
                Err(e) => {
                    st.failed += 1;
                    if e.raw_os_error() == Some(libc::ENOMEM) {
                        nomem += 1;
                        if nomem >= NOMEM_LIMIT {
                            st.gave_up =
                                Some(format!("{nomem} chunks in a row found no free huge page"));
                            log::info!("collapse: no free huge pages; left to khugepaged");
                            return;
                        }
                    }
                    log::debug!("collapse: chunk at {chunk:#x}: {e}");
                }
            }
            drop(st);
            // At most half of the time: sleep as long as the call took.
            if stop.sleep(took.max(MIN_GAP)) {
                return;
            }
        }
        lock(stats).sparse = left.len() as u64;
        pending = left;
        if pending.is_empty() {
            break;
        }
        match resweeps.next() {
            Some(&d) => {
                if stop.sleep(d) {
                    return;
                }
            }
            None => break,
        }
    }
    let mut st = lock(stats);
    st.finished = true;
    log::info!(
        "collapse: {} of {} chunks on huge pages ({} left sparse, {} failed) in {} sweeps; \
         {:.1} ms in MADV_COLLAPSE, longest call {:.2} ms",
        st.collapsed,
        st.chunks,
        st.sparse,
        st.failed,
        st.sweeps,
        st.busy.as_secs_f64() * 1e3,
        st.longest.as_secs_f64() * 1e3
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig::memory::ProcessMemory;
    use livemig::GuestMemory;

    /// AnonHugePages (bytes) of this process's mapping that contains
    /// `addr`, from /proc/self/smaps.
    fn anon_huge_bytes(addr: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let kb = smaps_fields(&smaps, |a, b| (a..b).contains(&addr))
            .find_map(|line| line.strip_prefix("AnonHugePages:"))
            .unwrap_or_else(|| panic!("no mapping at {addr:#x}"));
        kb.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap()
            << 10
    }

    fn quick() -> CollapsePace {
        CollapsePace {
            start_delay: Duration::ZERO,
            resweeps: vec![Duration::from_millis(10)],
        }
    }

    fn wait_done(c: &Collapser) -> CollapseStats {
        let t0 = Instant::now();
        while !c.is_done() {
            assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", c.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        c.stats()
    }

    #[test]
    fn a_userfaultfd_on_the_memory_is_seen_in_smaps() {
        let smaps = "\
7f0000000000-7f0040000000 rw-p 00000000 00:00 0
Size:            1048576 kB
VmFlags: rd wr mr mw me ac sd hg um
7f0040000000-7f0040200000 rw-p 00000000 00:00 0
Size:               2048 kB
VmFlags: rd wr mr mw me ac sd hg
7f0050000000-7f0050200000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac sd uw
";
        let gib = 1 << 30;
        assert!(uffd_armed_in(smaps, &[(0x7f00_0000_0000, gib)]));
        // Overlapping the armed mapping by one page is enough.
        assert!(uffd_armed_in(smaps, &[(0x7f00_3fff_f000, 4096 * 2)]));
        assert!(!uffd_armed_in(smaps, &[(0x7f00_4000_0000, 2 << 20)]));
        // Write-protect mode counts too.
        assert!(uffd_armed_in(smaps, &[(0x7f00_5000_0000, 2 << 20)]));
        // Memory in no listed mapping.
        assert!(!uffd_armed_in(smaps, &[(0x1000_0000, 2 << 20)]));
        // Two spans, the second armed.
        assert!(uffd_armed_in(
            smaps,
            &[(0x7f00_4000_0000, 2 << 20), (0x7f00_5000_0000, 4096)]
        ));
    }

    #[test]
    fn chunks_are_whole_and_aligned() {
        let c: Vec<u64> = chunks_of(CHUNK - 4096, 3 * CHUNK + 8192).collect();
        assert_eq!(c, vec![CHUNK, 2 * CHUNK, 3 * CHUNK]);
        assert_eq!(chunks_of(CHUNK, CHUNK - 4096).count(), 0);
        assert_eq!(chunks_of(4096, 4096).count(), 0);
        assert_eq!(chunks_of(0, 4 * CHUNK).count(), 4);
    }

    #[test]
    fn full_chunks_collapse_sparse_ones_stay_small() {
        // 5 chunks of room: at least 4 whole aligned chunks inside.
        let m = ProcessMemory::single(5 * CHUNK).unwrap();
        let block = m.blocks()[0].clone();
        let region = block.region();
        let host = region.host_addr();
        let chunks: Vec<u64> = chunks_of(host, region.len() as u64).collect();
        assert!(chunks.len() >= 4);
        // Chunks 0 and 2 full of data, chunk 1 one page only, chunk 3
        // untouched; a pattern to check afterwards.
        let byte = |a: u64| (a / 4096 % 251) as u8 + 1;
        for (i, &c) in chunks.iter().enumerate() {
            let pages = match i {
                0 | 2 => 512,
                1 => 1,
                _ => 0,
            };
            for p in 0..pages {
                let a = c + p * 4096;
                assert!(region.write((a - host) as usize + 7, &[byte(a)]));
            }
        }
        let mut c = Collapser::start(vec![block.clone()], true, quick()).unwrap();
        let st = wait_done(&c);
        if st.gave_up.is_some() {
            eprintln!("skipped: {:?}", st.gave_up);
            return;
        }
        assert!(st.finished, "{st:?}");
        assert_eq!(st.chunks, chunks.len() as u64);
        assert_eq!(st.collapsed, 2, "{st:?}");
        assert_eq!(st.sparse, chunks.len() as u64 - 2, "{st:?}");
        assert_eq!(st.sweeps, 2, "{st:?}");
        assert_eq!(st.failed, 0, "{st:?}");
        assert!(st.longest <= st.busy && st.busy > Duration::ZERO);
        // Huge pages in the mapping (at least these two: the kernel may
        // merge another test's mapping next to it into the same VMA),
        // and the contents unchanged.
        assert!(anon_huge_bytes(host) >= 2 * CHUNK);
        for &ch in &[chunks[0], chunks[2]] {
            for p in 0..512 {
                let a = ch + p * 4096;
                let mut b = [0u8; 8];
                assert!(region.read((a - host) as usize, &mut b));
                assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, byte(a)], "page {a:#x}");
            }
        }
        // The sparse chunk did not grow to 2 MiB, the untouched one
        // stayed empty.
        let pages = region.populated((chunks[1] - host) as usize, CHUNK as usize);
        assert_eq!(
            pages,
            Some(vec![(
                (chunks[1] - host) as usize,
                (chunks[1] - host) as usize + 4096
            )])
        );
        let pages = region.populated((chunks[3] - host) as usize, CHUNK as usize);
        assert_eq!(pages, Some(vec![]));
        c.stop();
    }

    #[test]
    fn a_chunk_filled_later_is_collapsed_at_a_later_look() {
        let m = ProcessMemory::single(3 * CHUNK).unwrap();
        let block = m.blocks()[0].clone();
        let region = block.region();
        let host = region.host_addr();
        let first = chunks_of(host, region.len() as u64).next().unwrap();
        // Half full at the first look, full before the next.
        for p in 0..256u64 {
            assert!(region.write((first - host + p * 4096) as usize, &[1]));
        }
        let pace = CollapsePace {
            start_delay: Duration::ZERO,
            resweeps: vec![Duration::from_millis(300)],
        };
        let c = Collapser::start(vec![block.clone()], true, pace).unwrap();
        let t0 = Instant::now();
        while c.stats().sweeps < 1 {
            assert!(t0.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(1));
        }
        for p in 256..512u64 {
            assert!(region.write((first - host + p * 4096) as usize, &[2]));
        }
        let st = wait_done(&c);
        if st.gave_up.is_some() {
            eprintln!("skipped: {:?}", st.gave_up);
            return;
        }
        // The filled chunk was collapsed at the second look (unless the
        // first look came after the fill, on a very slow machine).
        assert_eq!(st.collapsed, 1, "{st:?}");
        assert!(anon_huge_bytes(host) >= CHUNK);
    }

    #[test]
    fn stopping_ends_the_thread_between_chunks() {
        let m = ProcessMemory::single(9 * CHUNK).unwrap();
        let block = m.blocks()[0].clone();
        let region = block.region();
        for p in 0..(region.len() / 4096) {
            assert!(region.write(p * 4096, &[3]));
        }
        let pace = CollapsePace {
            start_delay: Duration::from_secs(600),
            resweeps: vec![],
        };
        let mut c = Collapser::start(vec![block.clone()], true, pace).unwrap();
        let t0 = Instant::now();
        c.stop();
        // Stopped during its start delay: nothing collapsed, not finished,
        // and the stop did not wait out the delay.
        let st = c.stats();
        assert!(t0.elapsed() < Duration::from_secs(300));
        assert!(!st.finished);
        assert_eq!(st.collapsed + st.failed, 0);
        assert!(c.is_done());
    }
}
