//! One test suite for every dirty tracker backend.
//!
//! A backend's test passes a factory that builds its tracker over a
//! [`ProcessMemory`] together with a writer that writes guest memory the way
//! that backend needs (through a [`SoftwareLog`](super::SoftwareLog), or a
//! plain store for trackers the kernel feeds). [`run_all`] then runs every
//! check that applies; manual-clear backends are driven the way the engine
//! drives them (clear the reported chunks right after each sync), plus a
//! check of their own.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{DirtyError, DirtyTracker};
use crate::bitmap::DirtyBitmap;
use crate::memory::{GuestMemory, ProcessMemory, PAGE_SIZE};

/// Writes `data` at byte offset `offset` of block `block`.
pub(crate) type Writer = Box<dyn Fn(usize, u64, &[u8]) + Send + Sync>;
/// Builds a tracker (not started) over the memory and its writer.
pub(crate) type Factory = fn(&ProcessMemory) -> (Box<dyn DirtyTracker>, Writer);
/// A [`Writer`] several threads can hold.
type SharedWriter = Arc<dyn Fn(usize, u64, &[u8]) + Send + Sync>;

const PAGE: u64 = PAGE_SIZE as u64;

/// Runs every check that applies to the factory's backend.
pub(crate) fn run_all(f: Factory) {
    sync_before_start_fails(f);
    nothing_before_writes(f);
    reports_once(f);
    page_boundaries(f);
    multiple_blocks(f);
    concurrent_writers_lose_nothing(f);
    stop_is_idempotent(f);
    stop_and_drop_release_running_writers(f);
    manual_reports_until_cleared(f);
}

fn memory(layout: &[(&str, u64)]) -> ProcessMemory {
    let bytes: Vec<(&str, u64)> = layout
        .iter()
        .map(|&(id, pages)| (id, pages * PAGE))
        .collect();
    ProcessMemory::new(&bytes).expect("map test memory")
}

fn empty_bitmaps(mem: &ProcessMemory) -> Vec<DirtyBitmap> {
    mem.blocks()
        .iter()
        .map(|b| DirtyBitmap::new(b.pages()))
        .collect()
}

fn set_pages(bm: &DirtyBitmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut p = 0;
    while let Some(q) = bm.next_set(p) {
        out.push(q);
        p = q + 1;
    }
    out
}

/// Starts `t`; for an initially-set backend, takes the all-dirty first sync
/// and re-protects everything, so that from here on every backend logs
/// exactly the writes that follow. (An initially-set backend may leave out
/// pages that hold no data: they read as zeros.)
fn start(t: &mut dyn DirtyTracker, mem: &ProcessMemory) {
    let how = t.start().expect("start");
    if how.initially_set {
        let mut bms = empty_bitmaps(mem);
        t.sync(&mut bms).expect("first sync");
        for (i, bm) in bms.iter().enumerate() {
            let region = mem.blocks()[i].region();
            for p in 0..bm.len() {
                let zero = region
                    .scan(p as usize * PAGE_SIZE, PAGE_SIZE, |b| {
                        b.iter().all(|&x| x == 0)
                    })
                    .expect("page in range");
                assert!(
                    bm.test(p) || zero,
                    "{}: initially set, page {p} of block {i} holds data but is not dirty",
                    t.name()
                );
            }
            t.clear(i, 0, bm.len()).expect("clear all");
        }
    }
}

/// One sync the way the engine does it: sync, then (manual-clear backends)
/// clear every chunk holding a reported page. Returns the fresh bitmaps and
/// the count `sync` returned, checked against the bits it set.
fn harvest(t: &mut dyn DirtyTracker, mem: &ProcessMemory) -> Vec<DirtyBitmap> {
    let mut bms = empty_bitmaps(mem);
    let n = t.sync(&mut bms).expect("sync");
    let set: u64 = bms.iter().map(DirtyBitmap::count).sum();
    assert_eq!(
        n,
        set,
        "{}: sync's count differs from the pages it reported",
        t.name()
    );
    if let Some(shift) = t.clear_chunk_shift() {
        for (i, bm) in bms.iter().enumerate() {
            let mut last_chunk = None;
            for p in set_pages(bm) {
                let c = p >> shift;
                if last_chunk != Some(c) {
                    t.clear(i, c << shift, 1 << shift).expect("clear");
                    last_chunk = Some(c);
                }
            }
        }
    }
    bms
}

/// Sync before start is a state error.
pub(crate) fn sync_before_start_fails(f: Factory) {
    let mem = memory(&[("ram", 16)]);
    let (mut t, _w) = f(&mem);
    let mut bms = empty_bitmaps(&mem);
    assert!(
        matches!(t.sync(&mut bms), Err(DirtyError::State { .. })),
        "{}: sync before start must fail",
        t.name()
    );
}

/// Nothing is reported before writes, not even pages written before start.
pub(crate) fn nothing_before_writes(f: Factory) {
    let mem = memory(&[("ram", 64)]);
    let (mut t, w) = f(&mem);
    w(0, 0, &[1; 3 * PAGE_SIZE]);
    w(0, 50 * PAGE, &[2]);
    start(&mut *t, &mem);
    for round in 0..2 {
        let bms = harvest(&mut *t, &mem);
        assert_eq!(
            set_pages(&bms[0]),
            Vec::<u64>::new(),
            "{}: round {round} reported unwritten pages",
            t.name()
        );
    }
    t.stop().unwrap();
}

/// A written page is reported once, then not again until written again;
/// pages touched before start and pages never touched behave the same.
pub(crate) fn reports_once(f: Factory) {
    let mem = memory(&[("ram", 64)]);
    let (mut t, w) = f(&mem);
    w(0, 5 * PAGE, &[9]);
    start(&mut *t, &mem);
    let name = t.name();
    // Page 5 was populated before start, page 40 never was.
    w(0, 5 * PAGE + 100, &[1]);
    w(0, 40 * PAGE, &[1]);
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        vec![5, 40],
        "{name}: first report"
    );
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        Vec::<u64>::new(),
        "{name}: reported twice"
    );
    w(0, 5 * PAGE, &[2]);
    w(0, 5 * PAGE + 8, &[3]);
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        vec![5],
        "{name}: re-protected page written again"
    );
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        Vec::<u64>::new(),
        "{name}: reported twice"
    );
    t.stop().unwrap();
}

/// Writes spanning page boundaries mark every page they touch.
pub(crate) fn page_boundaries(f: Factory) {
    let mem = memory(&[("ram", 64)]);
    let (mut t, w) = f(&mem);
    start(&mut *t, &mem);
    let name = t.name();
    w(0, 4 * PAGE - 1, &[1, 2]);
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        vec![3, 4],
        "{name}: 2-byte straddle"
    );
    w(0, 10 * PAGE + 100, &vec![7; 3 * PAGE_SIZE]);
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        vec![10, 11, 12, 13],
        "{name}: unaligned 3 pages"
    );
    w(0, 20 * PAGE, &vec![8; 2 * PAGE_SIZE]);
    w(0, 64 * PAGE - 1, &[1]);
    assert_eq!(
        set_pages(&harvest(&mut *t, &mem)[0]),
        vec![20, 21, 63],
        "{name}: aligned run and last byte"
    );
    t.stop().unwrap();
}

/// Each block's pages land in that block's bitmap; a wrong bitmap count is
/// refused.
pub(crate) fn multiple_blocks(f: Factory) {
    let mem = memory(&[("a", 16), ("b", 67), ("c", 130)]);
    let (mut t, w) = f(&mem);
    start(&mut *t, &mem);
    let name = t.name();
    w(0, 15 * PAGE, &[1]);
    w(1, 0, &[1]);
    w(1, 66 * PAGE + 5, &[1]);
    w(2, 63 * PAGE, &[1; 2 * PAGE_SIZE]);
    w(2, 129 * PAGE, &[1]);
    let bms = harvest(&mut *t, &mem);
    assert_eq!(set_pages(&bms[0]), vec![15], "{name}: block a");
    assert_eq!(set_pages(&bms[1]), vec![0, 66], "{name}: block b");
    assert_eq!(set_pages(&bms[2]), vec![63, 64, 129], "{name}: block c");
    let mut two = empty_bitmaps(&mem);
    two.pop();
    assert!(
        matches!(t.sync(&mut two), Err(DirtyError::Mismatch { .. })),
        "{name}: two bitmaps for three blocks must be refused"
    );
    t.stop().unwrap();
}

/// Writers running during syncs lose nothing: a page written after sync N
/// returned shows up in sync N+1 or later.
///
/// Epoch `e` is published after sync `e - 1` returns; each writer reads the
/// epoch before a write and records the largest epoch per page. After the
/// writers stop and a final sync, every written page's last report must be
/// at least its last write's epoch.
pub(crate) fn concurrent_writers_lose_nothing(f: Factory) {
    const ROUNDS: u64 = 25;
    const WRITERS: u64 = 2;
    let mem = memory(&[("a", 96), ("b", 160)]);
    let pages: Vec<u64> = mem.blocks().iter().map(|b| b.pages()).collect();
    let (mut t, w) = f(&mem);
    let w: SharedWriter = Arc::from(w);
    start(&mut *t, &mem);
    let name = t.name();

    let epoch = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let last_write: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        pages
            .iter()
            .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    let writes = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..WRITERS)
        .map(|id| {
            let (w, epoch, stop, last_write, writes, pages) = (
                w.clone(),
                epoch.clone(),
                stop.clone(),
                last_write.clone(),
                writes.clone(),
                pages.clone(),
            );
            std::thread::spawn(move || {
                let mut rng =
                    0x9e37_79b9_7f4a_7c15u64 ^ (id + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut counter = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let block = (rng % pages.len() as u64) as usize;
                    let page = (rng >> 8) % pages[block];
                    let off = ((rng >> 32) % (PAGE - 8)) & !7;
                    let e = epoch.load(Ordering::SeqCst);
                    counter += 1;
                    w(block, page * PAGE + off, &counter.to_le_bytes());
                    last_write[block][page as usize].fetch_max(e, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut last_report: Vec<Vec<u64>> = pages.iter().map(|&n| vec![0; n as usize]).collect();
    let mut reported_during = 0u64;
    let record = |bms: &[DirtyBitmap], round: u64, last_report: &mut Vec<Vec<u64>>| {
        let mut n = 0;
        for (b, bm) in bms.iter().enumerate() {
            for p in set_pages(bm) {
                last_report[b][p as usize] = round;
                n += 1;
            }
        }
        n
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for round in 1..=ROUNDS {
        std::thread::sleep(Duration::from_millis(4));
        let bms = harvest(&mut *t, &mem);
        reported_during += record(&bms, round, &mut last_report);
        epoch.store(round + 1, Ordering::SeqCst);
        assert!(
            Instant::now() < deadline,
            "{name}: concurrent test too slow"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("writer thread");
    }
    let bms = harvest(&mut *t, &mem);
    record(&bms, ROUNDS + 1, &mut last_report);
    t.stop().unwrap();

    assert!(
        writes.load(Ordering::Relaxed) > 100,
        "{name}: writers barely ran"
    );
    assert!(
        reported_during > 0,
        "{name}: nothing reported while writers ran"
    );
    let mut written = 0;
    for (b, per_block) in last_write.iter().enumerate() {
        for (p, lw) in per_block.iter().enumerate() {
            let lw = lw.load(Ordering::SeqCst);
            if lw == 0 {
                continue;
            }
            written += 1;
            assert!(
                last_report[b][p] >= lw,
                "{name}: block {b} page {p} written in epoch {lw} but last reported in sync {}",
                last_report[b][p]
            );
        }
    }
    assert!(written > 10, "{name}: only {written} pages written");
}

/// `stop` twice is fine, memory stays writable without a tracker behind
/// it, and a sync after stop fails.
pub(crate) fn stop_is_idempotent(f: Factory) {
    let mem = memory(&[("a", 32), ("b", 8)]);
    let (mut t, w) = f(&mem);
    start(&mut *t, &mem);
    let name = t.name();
    w(0, 3 * PAGE, &[1]);
    t.stop().expect("first stop");
    t.stop().expect("second stop");
    // From another thread with a deadline: a page left protected with no
    // handler would block the writer forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let blocks = mem.blocks().to_vec();
    std::thread::spawn(move || {
        for b in &blocks {
            for p in 0..b.pages() {
                assert!(b.region().write((p * PAGE) as usize, &[0xAB; 16]));
            }
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{name}: memory not writable after stop"));
    let mut probe = [0u8; 16];
    assert!(mem.blocks()[1].region().read(7 * PAGE_SIZE, &mut probe));
    assert_eq!(probe, [0xAB; 16]);
    let mut bms = empty_bitmaps(&mem);
    assert!(
        t.sync(&mut bms).is_err(),
        "{name}: sync after stop must fail"
    );
    drop(w);
}

/// Stopping, or dropping without stopping, while writers run leaves no
/// writer blocked: each keeps making progress afterwards.
pub(crate) fn stop_and_drop_release_running_writers(f: Factory) {
    // A writer must be caught blocked in a fault at the moment of stop, so
    // try a few times each way.
    for drop_only in [false, false, false, false, true, true, true, true] {
        let mem = memory(&[("a", 64), ("b", 64)]);
        let (mut t, w) = f(&mem);
        let w: SharedWriter = Arc::from(w);
        start(&mut *t, &mem);
        let name = t.name();
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Arc<Vec<AtomicU64>> = Arc::new((0..2).map(|_| AtomicU64::new(0)).collect());
        let handles: Vec<_> = (0..2usize)
            .map(|id| {
                let (w, stop, progress) = (w.clone(), stop.clone(), progress.clone());
                std::thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        w(id, (i % 64) * PAGE + 8 * id as u64, &i.to_le_bytes());
                        progress[id].fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
        harvest(&mut *t, &mem);
        if drop_only {
            drop(t);
        } else {
            t.stop().expect("stop with writers running");
        }
        let before: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while progress
            .iter()
            .zip(&before)
            .any(|(p, &b)| p.load(Ordering::Relaxed) < b + 1000)
        {
            assert!(
                Instant::now() < deadline,
                "{name}: writers stalled after {}",
                if drop_only { "drop" } else { "stop" }
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("writer thread");
        }
    }
}

/// Manual-clear backends: a reported page stays reported until its chunk
/// is cleared, and is logged again once written after the clear.
pub(crate) fn manual_reports_until_cleared(f: Factory) {
    let mem = memory(&[("ram", 64)]);
    let (mut t, w) = f(&mem);
    let Some(shift) = t.clear_chunk_shift() else {
        return;
    };
    start(&mut *t, &mem);
    let name = t.name();
    let sync = |t: &mut dyn DirtyTracker| {
        let mut bms = empty_bitmaps(&mem);
        t.sync(&mut bms).expect("sync");
        set_pages(&bms[0])
    };
    w(0, PAGE, &[1]);
    assert_eq!(sync(&mut *t), vec![1], "{name}: first report");
    assert_eq!(
        sync(&mut *t),
        vec![1],
        "{name}: manual backends report until cleared"
    );
    t.clear(0, 0, 1 << shift).unwrap();
    assert_eq!(
        sync(&mut *t),
        Vec::<u64>::new(),
        "{name}: clear resets the log"
    );
    w(0, PAGE, &[2]);
    assert_eq!(sync(&mut *t), vec![1], "{name}: clear re-protects");
    t.stop().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::SoftwareTracker;

    fn software(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
        let (t, log) = SoftwareTracker::new(mem);
        (Box::new(t), Box::new(move |b, o, d| log.write(b, o, d)))
    }

    fn software_manual(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
        let (t, log) = SoftwareTracker::manual(mem, 2, false);
        (Box::new(t), Box::new(move |b, o, d| log.write(b, o, d)))
    }

    fn software_manual_initially_set(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
        let (t, log) = SoftwareTracker::manual(mem, 3, true);
        (Box::new(t), Box::new(move |b, o, d| log.write(b, o, d)))
    }

    #[test]
    fn suite_software() {
        run_all(software);
    }

    #[test]
    fn suite_software_manual() {
        run_all(software_manual);
    }

    #[test]
    fn suite_software_manual_initially_set() {
        run_all(software_manual_initially_set);
    }
}
