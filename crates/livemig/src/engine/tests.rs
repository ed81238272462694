//! The engine over an in-memory transport, with a writer dirtying memory
//! concurrently: the destination must end up with the source's memory at
//! stop time, whatever the tracker mode and page encodings.

use std::io::Read;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::*;
use crate::dirty::{DirtyTracker, SoftwareLog, SoftwareTracker};
use crate::memory::{GuestMemory, ProcessMemory, PAGE_SIZE};
use crate::stream::{BlockDesc, StreamWriter};
use crate::testkit::workload::{fill_random, PageWriter, Pattern, Workload, WorkloadConfig};
use crate::transport::{pipe, PipeReader, PipeWriter};
use crate::vm::{NoVm, VmControl};

const MIB: u64 = 1 << 20;

type BoxRead<'a> = Box<dyn Read + Send + 'a>;

fn layout() -> Vec<(&'static str, u64)> {
    vec![("ram0", 8 * MIB), ("ram1", 4 * MIB)]
}

fn log_writer(log: SoftwareLog) -> PageWriter {
    Arc::new(move |b, off, data| log.write(b, off, data))
}

struct Outcome {
    src: ProcessMemory,
    dst: ProcessMemory,
    stats: MigrationStats,
    load: LoadOutcome,
    history: Vec<SyncPoint>,
}

/// Migrates a randomly filled guest while a workload writes it.
fn migrate_live(
    mk: impl FnOnce(&ProcessMemory) -> (SoftwareTracker, SoftwareLog),
    params: Params,
    wl: WorkloadConfig,
) -> Outcome {
    migrate_live_with(mk, params, wl, |_| {})
}

/// As [`migrate_live`], with `steer` running beside the migration (to
/// change parameters while it runs).
fn migrate_live_with(
    mk: impl FnOnce(&ProcessMemory) -> (SoftwareTracker, SoftwareLog),
    params: Params,
    wl: WorkloadConfig,
    steer: impl FnOnce(MigrationHandle) + Send + 'static,
) -> Outcome {
    let src = ProcessMemory::new(&layout()).unwrap();
    let dst = ProcessMemory::new(&layout()).unwrap();
    let (mut tracker, log) = mk(&src);
    let writer = log_writer(log);
    // Half the memory random, the rest left zero.
    fill_random(&src.blocks()[..1], &writer, 7);
    let workload = Workload::start(src.blocks().to_vec(), writer, wl);
    let mut vm = workload.control();
    let (mut ch_w, mut ch_r) = channel_pipes(params.channels);
    let handle = MigrationHandle::new(params);
    let (w, r) = pipe();
    let (ack_w, ack_r) = pipe();
    let dst2 = dst.clone();
    let loader = thread::spawn(move || {
        let mut r = r;
        let mut l = Loader::new(&dst2).answering(Box::new(ack_w));
        let res = l.load_channels(Box::new(&mut r) as BoxRead<'_>, || {
            next_conn(&mut ch_r).map(|c| Box::new(c) as BoxRead<'_>)
        });
        let commit = Commit::new(r, l.take_answer().expect("the return path"));
        match &res {
            Ok(_) => commit.wait_go().expect("GO").started().unwrap(),
            Err(e) => commit.fail(&e.to_string()),
        }
        res
    });
    let mut ack_r: PipeReader = ack_r;
    let h2 = handle.clone();
    let steerer = thread::spawn(move || steer(h2));
    let stats = Source::new(&src, &mut tracker, &mut vm, handle.clone())
        .run_with_channels(w, Some(&mut ack_r as &mut dyn Read), &mut |_| {
            Ok(Box::new(ch_w.remove(0)))
        })
        .expect("migration succeeds");
    assert!(vm.is_paused(), "source stays paused after completion");
    drop(workload);
    steerer.join().unwrap();
    let load = loader.join().unwrap().expect("load succeeds");
    Outcome {
        src,
        dst,
        stats,
        load,
        history: handle.history(),
    }
}

/// In-memory connections for `n` page channels (none for one channel).
fn channel_pipes(n: u16) -> (Vec<PipeWriter>, Vec<PipeReader>) {
    (0..if n > 1 { n } else { 0 }).map(|_| pipe()).unzip()
}

/// The destination's "accept" over pre-made pipes (in reverse order: the
/// destination must not depend on the order channels arrive in).
fn next_conn(readers: &mut Vec<PipeReader>) -> std::io::Result<PipeReader> {
    readers
        .pop()
        .ok_or_else(|| std::io::Error::other("no more connections"))
}

/// Steering for tests that hold a migration back with a tight downtime
/// limit and bandwidth cap: after 8 syncs (or once it ended), lifts both
/// so it can complete.
fn lift_limits_after_8_syncs(h: MigrationHandle) {
    while h.history().len() < 8 && !h.stats().status.is_final() {
        thread::sleep(Duration::from_millis(10));
    }
    let mut p = h.params();
    p.downtime_limit = 2000;
    p.max_bandwidth = 0;
    h.set_params(p).unwrap();
}

/// A live migration with XBZRLE (16 MiB cache) on top of `base`: 1 ms
/// at 16 MiB/s lets 16 KiB go at switch-over, so with the workload
/// dirtying far more per round, pages are re-sent round after round, until
/// [`lift_limits_after_8_syncs`] lifts the limits.
fn xbzrle_until_lifted(base: Params) -> Outcome {
    let params = Params {
        xbzrle: true,
        xbzrle_cache_size: 16 * MIB,
        downtime_limit: 1,
        max_bandwidth: 16 * MIB,
        ..base
    };
    migrate_live_with(
        |m| SoftwareTracker::new(m),
        params,
        live_workload(),
        lift_limits_after_8_syncs,
    )
}

fn verify_params() -> Params {
    Params {
        verify: true,
        downtime_limit: 50,
        ..Params::default()
    }
}

fn assert_same(o: &Outcome) {
    let (a, b) = (memory_digest(&o.src), memory_digest(&o.dst));
    assert_eq!(
        hex(&a),
        hex(&b),
        "destination memory differs from the source"
    );
    assert_eq!(
        o.load.digest,
        Some(a),
        "verify mode carries the source digest"
    );
    assert_eq!(o.stats.status, Status::Completed);
    assert_eq!(o.stats.ram.remaining, 0);
    assert!(o.stats.ram.transferred >= o.stats.ram.normal_bytes);
    assert!(
        o.stats.ram.dirty_sync_count >= 2,
        "setup sync and final sync at least"
    );
}

/// Whether this kernel says which anonymous pages were never written
/// (`PAGEMAP_SCAN`): then the bulk stage sends those without reading them.
fn residency_known() -> bool {
    let m = crate::sys::mmap::AnonMapping::new(1 << 16).unwrap();
    crate::sys::mmap::RawRegion::from_mapping(Arc::new(m))
        .populated(0, 1 << 16)
        .is_some()
}

fn live_workload() -> WorkloadConfig {
    WorkloadConfig {
        rate: 40 * MIB,
        bytes_per_touch: 16,
        pattern: Pattern::Random,
        working_set: 2 * MIB,
        seed: 3,
    }
}

#[test]
fn live_migration_returns_and_resets_tracker() {
    let o = migrate_live(
        |m| SoftwareTracker::new(m),
        verify_params(),
        live_workload(),
    );
    assert_same(&o);
    assert!(o.stats.ram.duplicate > 0, "zero pages sent as zero records");
    assert!(o.stats.ram.untouched <= o.stats.ram.duplicate);
    if residency_known() {
        // ram1 was never written before the migration: its pages the
        // workload had not reached when the walk got there went unread.
        assert!(o.stats.ram.untouched > 0, "untouched pages skipped");
    }
    assert!(o.stats.ram.normal > 0);
    assert!(o.stats.ram.rounds >= 1);
    assert_eq!(o.stats.dirty_tracker, "software");
    assert!(!o.history.is_empty());
}

/// A live migration tracked with manual clear in chunks of 2^`shift`
/// pages, the log initially set or not, is exact.
fn manual_clear_is_exact(shift: u32, initially_set: bool) {
    let o = migrate_live(
        |m| SoftwareTracker::manual(m, shift, initially_set),
        verify_params(),
        live_workload(),
    );
    assert_same(&o);
}

#[test]
fn live_migration_manual_clear_initially_set() {
    // Chunks of 16 pages: many clears, each just before a chunk is sent.
    manual_clear_is_exact(4, true);
}

#[test]
fn live_migration_manual_clear_not_initially_set() {
    manual_clear_is_exact(6, false);
}

#[test]
fn xbzrle_sends_deltas_and_stays_exact() {
    let o = xbzrle_until_lifted(verify_params());
    // Deltas need a page sent three times: bulk, then a cache miss (sent
    // raw and cached), then a hit.
    assert!(o.stats.ram.rounds >= 3, "{:#?}", o.history);
    assert_same(&o);
    let x = o.stats.xbzrle_cache.clone().expect("xbzrle stats present");
    assert!(x.pages > 0, "some pages went as deltas: {x:?}");
    assert!(
        x.bytes < x.pages * 4096 / 4,
        "deltas of 16-byte changes are small: {x:?}"
    );
    assert!(o.load.stats.xbzrle_pages == x.pages);
}

#[test]
fn compression_round_trips() {
    for algorithm in [
        crate::codec::compress::Algorithm::Lz4,
        crate::codec::compress::Algorithm::Zstd,
    ] {
        let params = Params {
            compress: Some(CompressParams {
                algorithm,
                level: 3,
            }),
            adaptive_encoding: false,
            ..verify_params()
        };
        // A workload that writes compressible pages (16 bytes per touch
        // into otherwise zero pages of block 1).
        let o = migrate_live(|m| SoftwareTracker::new(m), params, live_workload());
        assert_same(&o);
        let c = o.stats.compression.clone().expect("compression stats");
        assert!(c.pages > 0, "{algorithm:?}: {c:?}");
        assert_eq!(o.load.stats.compressed_pages, c.pages);
    }
}

#[test]
fn idle_guest_destination_writes_no_zero_pages() {
    let src = ProcessMemory::new(&layout()).unwrap();
    let dst = ProcessMemory::new(&layout()).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    log.write(1, 4096 * 5, b"hello");
    // Read (not written) pages map the shared zero page: still untouched.
    let mut b = [0u8; 16];
    assert!(src.blocks()[0].region().read(4096 * 9, &mut b));
    let (w, r) = pipe();
    let d2 = dst.clone();
    let loader = thread::spawn(move || Loader::new(&d2).load(r));
    let stats = Source::new(
        &src,
        &mut t,
        &mut NoVm,
        MigrationHandle::new(verify_params()),
    )
    .run(w, None)
    .unwrap();
    let load = loader.join().unwrap().unwrap();
    assert_eq!(stats.ram.duplicate, src.total_bytes() / 4096 - 1);
    if residency_known() {
        // At most the written page's 2 MiB (a transparent huge page) is
        // read; everything else is known zero unread.
        assert!(
            stats.ram.untouched >= stats.ram.duplicate - 512,
            "{} of {} zero pages unread",
            stats.ram.untouched,
            stats.ram.duplicate
        );
    }
    assert_eq!(
        load.stats.zero_pages_written, 0,
        "already-zero pages are not touched"
    );
    assert_eq!(load.stats.zero_pages, stats.ram.duplicate);
    if residency_known() {
        // Untouched pages leave as runs (ZERO_RUN, 15 bytes for up to a
        // 256 MiB window), not as a 9-byte record per page: the whole
        // stream is the written page and a handful of records.
        assert!(
            stats.ram.transferred < 64 << 10,
            "{} bytes for {} zero pages",
            stats.ram.transferred,
            stats.ram.duplicate
        );
    }
    assert_eq!(memory_digest(&src), memory_digest(&dst));
}

/// A ZERO_RUN over pages the destination holds data in and pages it
/// never wrote: the data pages are zeroed, the others are not touched
/// (not even faulted in), and the counts say so.
#[test]
fn zero_run_zeroes_data_pages_and_leaves_fresh_ones_alone() {
    use crate::stream::format::FLAG_ZERO_RUNS;
    const P: u64 = 4096;
    let dst = ProcessMemory::new(&[("ram0", 256 * P), ("ram1", 8 * P)]).unwrap();
    let r = dst.blocks()[0].region();
    for p in [3u64, 64, 65, 200] {
        assert!(r.write((p * P + 7) as usize, &[0xaa]));
    }
    let mut w = StreamWriter::new(Vec::new(), FLAG_ZERO_RUNS);
    w.block_list(&[
        BlockDesc {
            id: "ram0".into(),
            len: 256 * P,
        },
        BlockDesc {
            id: "ram1".into(),
            len: 8 * P,
        },
    ])
    .unwrap();
    // Data then a run over it: the run wins (later in the stream).
    w.raw(1, 2 * P, &[0x55; 4096]).unwrap();
    w.zero_run(1, 0, 8).unwrap();
    w.zero_run(0, 0, 100).unwrap();
    w.zero_run(0, 100 * P, 156).unwrap();
    w.section_end(0).unwrap();
    w.end().unwrap();
    let bytes = std::mem::take(w.get_mut());
    let out = Loader::new(&dst).load(&bytes[..]).expect("load");
    assert_eq!(out.stats.zero_pages, 8 + 100 + 156);
    // ram0's four data pages, and ram1's page 2, which this load wrote
    // before its run: no longer known zero.
    assert_eq!(out.stats.zero_pages_written, 4 + 1);
    if residency_known() {
        // Pages the destination never wrote stay unallocated (ram0
        // received no data, so nothing prefaulted it either).
        let data = dst.blocks()[0].data_pages(0, 256).unwrap();
        let held: Vec<u64> = (0..256).filter(|&p| data.test(p)).collect();
        assert_eq!(held, [3, 64, 65, 200], "only pages that held data");
    }
    let zero = |b: usize, pages: u64| {
        let mut buf = vec![1u8; (pages * P) as usize];
        assert!(dst.blocks()[b].region().read(0, &mut buf));
        buf.iter().all(|&x| x == 0)
    };
    assert!(
        zero(0, 256) && zero(1, 8),
        "every page of both runs is zero"
    );
}

/// A guest that no longer writes (it filled its memory and idles) goes
/// out live: the pause fits the limit half-way through the first pass,
/// but the set left shrinks at the link's rate, so precopy sends on and
/// the pause carries next to no pages (see `shrink.rs`).
#[test]
fn a_guest_that_stopped_writing_is_sent_live_not_paused() {
    let src = ProcessMemory::new(&layout()).unwrap();
    let dst = ProcessMemory::new(&layout()).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    fill_random(src.blocks(), &log_writer(log), 11);
    let (w, r) = pipe();
    let d2 = dst.clone();
    let loader = thread::spawn(move || Loader::new(&d2).load(r));
    // 12 MiB at 24 MiB/s: the 300 ms limit holds with ~7 MiB left.
    let params = Params {
        max_bandwidth: 24 * MIB,
        downtime_limit: 300,
        ..Params::default()
    };
    let stats = Source::new(&src, &mut t, &mut NoVm, MigrationHandle::new(params))
        .run(w, None)
        .unwrap();
    loader.join().unwrap().unwrap();
    assert_eq!(memory_digest(&src), memory_digest(&dst));
    assert!(
        stats.ram.downtime_bytes < MIB,
        "{} bytes sent paused",
        stats.ram.downtime_bytes
    );
}

/// A VM control that records calls, to check what the engine did to the guest.
#[derive(Default)]
struct RecordingVm {
    calls: Vec<String>,
}

impl VmControl for RecordingVm {
    fn pause(&mut self) -> Result<(), crate::vm::VmError> {
        self.calls.push("pause".into());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), crate::vm::VmError> {
        self.calls.push("resume".into());
        Ok(())
    }
    fn set_throttle(&mut self, p: u8) {
        self.calls.push(format!("throttle {p}"));
    }
    fn save_state(&mut self) -> Result<Vec<u8>, crate::vm::VmError> {
        Ok(b"device-state".to_vec())
    }
}

#[test]
fn device_state_travels_after_ram() {
    let src = ProcessMemory::single(MIB).unwrap();
    let dst = ProcessMemory::single(MIB).unwrap();
    let (mut t, _log) = SoftwareTracker::new(&src);
    let (w, r) = pipe();
    let d2 = dst.clone();
    let loader = thread::spawn(move || Loader::new(&d2).load(r));
    let mut vm = RecordingVm::default();
    Source::new(
        &src,
        &mut t,
        &mut vm,
        MigrationHandle::new(Params::default()),
    )
    .run(w, None)
    .unwrap();
    assert_eq!(loader.join().unwrap().unwrap().state, b"device-state");
    assert!(vm.calls.contains(&"pause".to_string()));
    assert!(
        !vm.calls.contains(&"resume".to_string()),
        "a completed source stays paused"
    );
}

/// Auto-converge that never engages tells the VMM nothing while precopy
/// runs (minivm wakes three threads per call): a capped link makes the
/// migration take several steps, and only the clean-up at the end may set
/// the throttle (to 0).
#[test]
fn an_idle_auto_converge_does_not_call_the_vmm_every_step() {
    let src = ProcessMemory::single(4 * MIB).unwrap();
    let dst = ProcessMemory::single(4 * MIB).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    fill_random(src.blocks(), &log_writer(log), 3);
    let (w, r) = pipe();
    let d2 = dst.clone();
    let loader = thread::spawn(move || Loader::new(&d2).load(r));
    let mut vm = RecordingVm::default();
    let params = Params {
        auto_converge: true,
        // 4 MiB at 16 MiB/s: a quarter of a second, several steps.
        max_bandwidth: 16 * MIB,
        ..Params::default()
    };
    let handle = MigrationHandle::new(params);
    Source::new(&src, &mut t, &mut vm, handle.clone())
        .run(w, None)
        .unwrap();
    loader.join().unwrap().unwrap();
    assert!(vm.calls.contains(&"pause".to_string()), "{:?}", vm.calls);
    let throttles: Vec<&String> = vm
        .calls
        .iter()
        .filter(|c| c.starts_with("throttle"))
        .collect();
    assert!(throttles.len() <= 1, "{throttles:?}");
    assert!(
        throttles.iter().all(|c| *c == "throttle 0"),
        "{throttles:?}"
    );
    assert_eq!(hex(&memory_digest(&src)), hex(&memory_digest(&dst)));
}

/// A guest that dirties its working set faster than a 2 MiB/s link sends
/// it: after the first pass the stats say precopy is not converging, with
/// the rates, and keep saying so as of the cancel.
#[test]
fn stats_say_when_precopy_does_not_converge() {
    let src = ProcessMemory::single(4 * MIB).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    let writer = log_writer(log.clone());
    fill_random(src.blocks(), &writer, 5);
    let workload = Workload::start(src.blocks().to_vec(), writer, live_workload());
    let mut vm = workload.control();
    let handle = MigrationHandle::new(Params {
        max_bandwidth: 2 * MIB,
        downtime_limit: 30,
        ..Params::default()
    });
    let (w, mut r) = pipe();
    let drain = thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    let h2 = handle.clone();
    let watcher = thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let mut seen = None;
        while t0.elapsed() < Duration::from_secs(120) {
            if let Some(c) = h2.stats().convergence.filter(|c| !c.converging) {
                seen = Some(c);
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        h2.cancel();
        seen
    });
    let err = Source::new(&src, &mut t, &mut vm, handle.clone())
        .run(w, None)
        .unwrap_err();
    let seen = watcher.join().unwrap().expect("a NOT converging report");
    drain.join().unwrap().unwrap();
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert!(seen.dirty_rate > 0 && seen.send_rate > 0, "{seen:?}");
    assert!(
        seen.dirty_rate >= seen.send_rate || seen.stalled_syncs >= 3,
        "{seen:?}"
    );
    assert!(seen.describe().contains("NOT converging"));
    let end = handle.stats();
    assert_eq!(end.status, Status::Cancelled);
    let c = end.convergence.expect("figures as of the cancel");
    assert!(!c.converging, "{c:?}");
}

#[test]
fn cancel_keeps_source_running_and_stops_tracking() {
    let src = ProcessMemory::single(64 * MIB).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    let writer = log_writer(log.clone());
    fill_random(src.blocks(), &writer, 1);
    let workload = Workload::start(src.blocks().to_vec(), writer, live_workload());
    let mut vm = workload.control();
    // 1 MiB/s: the migration cannot finish before the cancel.
    let handle = MigrationHandle::new(Params {
        max_bandwidth: MIB,
        ..Params::default()
    });
    let (w, mut r) = pipe();
    let drain = thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    let h2 = handle.clone();
    let canceller = thread::spawn(move || {
        while h2.stats().status != Status::Active {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(200));
        h2.cancel();
    });
    let err = Source::new(&src, &mut t, &mut vm, handle.clone())
        .run(w, None)
        .unwrap_err();
    canceller.join().unwrap();
    drain.join().unwrap().unwrap();
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert_eq!(handle.stats().status, Status::Cancelled);
    assert!(!vm.is_paused(), "the source guest runs on");
    let before = workload.pages_written();
    thread::sleep(Duration::from_millis(100));
    assert!(
        workload.pages_written() > before,
        "the workload still writes"
    );
    // Tracking stopped: a sync is refused.
    let mut bm = vec![crate::DirtyBitmap::new(src.blocks()[0].pages())];
    assert!(t.sync(&mut bm).is_err());
}

#[test]
fn dropped_destination_fails_cleanly_and_resumes() {
    let src = ProcessMemory::single(32 * MIB).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    let writer = log_writer(log);
    fill_random(src.blocks(), &writer, 2);
    let (w, mut r) = pipe();
    // The destination reads 1 MiB and hangs up.
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; MIB as usize];
        r.read_exact(&mut buf).unwrap();
    });
    let mut vm = RecordingVm::default();
    let err = Source::new(
        &src,
        &mut t,
        &mut vm,
        MigrationHandle::new(Params::default()),
    )
    .run(w, None)
    .unwrap_err();
    reader.join().unwrap();
    assert!(matches!(err, MigrationError::Send(_)), "{err}");
    assert!(
        err.to_string().contains("sending the stream failed"),
        "{err}"
    );
}

#[test]
fn failure_during_completion_resumes_the_guest() {
    let src = ProcessMemory::single(MIB).unwrap();
    let (mut t, _log) = SoftwareTracker::new(&src);
    let (w, r) = pipe();
    let loader_mem = ProcessMemory::single(MIB).unwrap();
    let loader = thread::spawn(move || Loader::new(&loader_mem).load(r));
    // Destination acknowledges failure (after the drain mark that comes
    // before the pause and the ping that follows it: nothing writes this
    // guest, so the first pass leaves nothing to send and the source
    // drains and pings once).
    let (mut aw, mut ar) = pipe();
    write_reply(&mut aw, &Reply::Accepted).unwrap();
    write_reply(&mut aw, &Reply::Applied(1)).unwrap();
    write_reply(&mut aw, &Reply::Applied(2)).unwrap();
    write_reply(&mut aw, &Reply::Failed("disk full".into())).unwrap();
    let mut vm = RecordingVm::default();
    let err = Source::new(
        &src,
        &mut t,
        &mut vm,
        MigrationHandle::new(Params::default()),
    )
    .run(w, Some(&mut ar as &mut dyn Read))
    .unwrap_err();
    loader.join().unwrap().unwrap();
    assert!(
        matches!(err, MigrationError::Destination(ref m) if m.0 == "disk full"),
        "{err}"
    );
    assert_eq!(vm.calls.last().map(String::as_str), Some("resume"));
}

#[test]
fn layout_mismatch_is_refused_before_any_write() {
    let src = ProcessMemory::new(&[("ram0", MIB)]).unwrap();
    for dst_layout in [
        vec![("ram0", 2 * MIB)],
        vec![("other", MIB)],
        vec![("ram0", MIB), ("x", MIB)],
    ] {
        let dst = ProcessMemory::new(&dst_layout).unwrap();
        dst.blocks()[0].region().write(0, b"keep");
        let (mut t, log) = SoftwareTracker::new(&src);
        log.write(0, 0, b"data");
        let (w, r) = pipe();
        let d2 = dst.clone();
        let loader = thread::spawn(move || Loader::new(&d2).load(r));
        let _ = Source::new(
            &src,
            &mut t,
            &mut NoVm,
            MigrationHandle::new(Params::default()),
        )
        .run(w, None);
        let err = loader.join().unwrap().unwrap_err();
        assert!(matches!(err, LoadError::Layout { .. }), "{err}");
        let mut b = [0u8; 4];
        dst.blocks()[0].region().read(0, &mut b);
        assert_eq!(&b, b"keep", "destination memory untouched");
    }
}

#[test]
fn verify_detects_a_wrong_destination() {
    // A source whose memory changes after stop without being tracked
    // (a tracker bug) must be caught by the digest.
    let src = ProcessMemory::single(MIB).unwrap();
    let (mut t, _log) = SoftwareTracker::new(&src);
    struct Sneaky(ProcessMemory);
    impl VmControl for Sneaky {
        fn pause(&mut self) -> Result<(), crate::vm::VmError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), crate::vm::VmError> {
            Ok(())
        }
        fn save_state(&mut self) -> Result<Vec<u8>, crate::vm::VmError> {
            // An untracked write after the last page went out.
            self.0.blocks()[0].region().write(8192, b"untracked");
            Ok(Vec::new())
        }
    }
    let (w, r) = pipe();
    let dst = ProcessMemory::single(MIB).unwrap();
    let d2 = dst.clone();
    let loader = thread::spawn(move || Loader::new(&d2).load(r));
    let mut vm = Sneaky(src.clone());
    let sent =
        Source::new(&src, &mut t, &mut vm, MigrationHandle::new(verify_params())).run(w, None);
    let loaded = loader.join().unwrap();
    // The stream's digest is the running digest's: the chunk with the
    // write is re-hashed in the pause unless the background hasher
    // hashed it before and saw no touch since (a migration that took
    // longer than its pass, as on a loaded host). Re-hashed, the digest
    // holds the write the pages lack: the destination refuses. Cached,
    // it is the tracker's view, which the destination matches: the
    // source's full hash after the pause catches the write.
    match (&sent, &loaded) {
        (Ok(_), Err(LoadError::DigestMismatch { .. })) => eprintln!("the destination caught it"),
        (Err(e @ MigrationError::Verify { .. }), Ok(_)) => {
            eprintln!("the source caught it: {e}");
            assert!(e.to_string().contains("missed a write"), "{e}");
        }
        _ => panic!("the untracked write went unnoticed: source {sent:?}, destination {loaded:?}"),
    }
    assert_ne!(
        memory_digest(&src),
        memory_digest(&dst),
        "the destination lacks the untracked write"
    );
}

#[test]
fn bad_params_are_refused() {
    let src = ProcessMemory::single(MIB).unwrap();
    let (mut t, _log) = SoftwareTracker::new(&src);
    let (w, _r) = pipe();
    let err = Source::new(
        &src,
        &mut t,
        &mut NoVm,
        MigrationHandle::new(Params {
            downtime_limit: 0,
            ..Params::default()
        }),
    )
    .run(w, None)
    .unwrap_err();
    assert!(err.to_string().contains("downtime-limit"), "{err}");
    assert!(MigrationHandle::default()
        .set_params(Params {
            max_cpu_throttle: 100,
            ..Params::default()
        })
        .is_err());
}

// ------------------------------------------------------- parallel channels

#[test]
fn channels_2_and_4_live_migration_is_exact() {
    for channels in [2, 4] {
        let o = migrate_live(
            |m| SoftwareTracker::new(m),
            Params {
                channels,
                ..verify_params()
            },
            live_workload(),
        );
        assert_same(&o);
        assert_eq!(o.load.stats.channels, channels);
        assert!(o.stats.ram.normal > 0 && o.stats.ram.duplicate > 0);
        assert_eq!(o.load.stats.raw_pages, o.stats.ram.normal, "{channels}");
        assert_eq!(o.load.stats.zero_pages, o.stats.ram.duplicate);
        assert!(
            o.stats.ram.dirty_sync_count >= 2,
            "barriers at several syncs"
        );
    }
}

#[test]
fn channels_with_manual_clear_compression_and_xbzrle() {
    let o = migrate_live(
        |m| SoftwareTracker::manual(m, 4, true),
        Params {
            channels: 3,
            compress: Some(CompressParams {
                algorithm: crate::codec::compress::Algorithm::Lz4,
                level: 1,
            }),
            adaptive_encoding: false,
            ..verify_params()
        },
        live_workload(),
    );
    assert_same(&o);
    let c = o.stats.compression.clone().expect("compression stats");
    assert!(c.pages > 0);
    assert_eq!(o.load.stats.compressed_pages, c.pages);

    // XBZRLE pages travel on the main channel beside the page channels.
    let o = xbzrle_until_lifted(Params {
        channels: 2,
        ..verify_params()
    });
    assert_same(&o);
    let x = o.stats.xbzrle_cache.clone().expect("xbzrle stats");
    assert!(x.pages > 0, "{x:?}");
    assert_eq!(o.load.stats.xbzrle_pages, x.pages);
}

#[test]
fn channel_dying_midway_fails_cleanly_and_resumes() {
    let src = ProcessMemory::single(32 * MIB).unwrap();
    let dst = ProcessMemory::single(32 * MIB).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    fill_random(src.blocks(), &log_writer(log), 4);
    let (w, r) = pipe();
    let (mut ch_w, ch_r) = channel_pipes(3);
    // Channel connection 2 (in accept order) delivers 256 KiB, then breaks.
    let mut readers: Vec<Box<dyn Read + Send>> = Vec::new();
    for (i, cr) in ch_r.into_iter().enumerate() {
        if i == 1 {
            readers.push(Box::new(cr.take(256 << 10)));
        } else {
            readers.push(Box::new(cr));
        }
    }
    readers.reverse();
    let d2 = dst.clone();
    let loader = thread::spawn(move || {
        Loader::new(&d2).load_channels(Box::new(r) as Box<dyn Read + Send>, || {
            readers
                .pop()
                .ok_or_else(|| std::io::Error::other("no more connections"))
        })
    });
    let mut vm = RecordingVm::default();
    let err = Source::new(
        &src,
        &mut t,
        &mut vm,
        MigrationHandle::new(Params {
            channels: 3,
            downtime_limit: 1,
            ..Params::default()
        }),
    )
    .run_with_channels(w, None, &mut |_| Ok(Box::new(ch_w.remove(0))))
    .unwrap_err();
    let load_err = loader.join().unwrap().unwrap_err();
    assert!(matches!(err, MigrationError::Send(_)), "{err}");
    assert!(
        load_err.to_string().contains("page channel 2"),
        "the destination names the channel: {load_err}"
    );
    assert!(
        load_err.to_string().contains("stream ends inside"),
        "{load_err}"
    );
    assert!(
        !vm.calls.contains(&"pause".to_string())
            || vm.calls.last().map(String::as_str) == Some("resume"),
        "the source guest runs on: {:?}",
        vm.calls
    );
}

const SESSION: u64 = 0x5e55;

/// One hand-made channel stream over a single 64 KiB block "ram": header,
/// channel record, block list, first section, `body`, end.
fn channel_stream(
    index: u16,
    session: u64,
    body: impl FnOnce(&mut StreamWriter<&mut Vec<u8>>),
) -> Vec<u8> {
    use crate::stream::format::FLAG_CHANNELS;
    let mut buf = Vec::new();
    let mut w = StreamWriter::new(&mut buf, FLAG_CHANNELS);
    w.channel(index, 2, session).unwrap();
    w.block_list(&[BlockDesc {
        id: "ram".into(),
        len: 64 << 10,
    }])
    .unwrap();
    w.section_end(0).unwrap();
    body(&mut w);
    w.end().unwrap();
    drop(w);
    buf
}

/// Loads a two-channel migration whose page channel 2 is `hostile`.
fn load_with_hostile_channel(hostile: Vec<u8>) -> (Result<LoadOutcome, LoadError>, ProcessMemory) {
    let synced = |w: &mut StreamWriter<&mut Vec<u8>>| {
        w.sync(0).unwrap();
        w.section_end(1).unwrap();
    };
    let main = channel_stream(0, SESSION, synced);
    let ch1 = channel_stream(1, SESSION, |w| {
        w.raw(0, 0, &[0x11; 4096]).unwrap();
        synced(w);
        w.raw(0, 4096, &[0x12; 4096]).unwrap();
    });
    let dst = ProcessMemory::single(64 << 10).unwrap();
    let mut conns = vec![&hostile[..], &ch1[..]];
    let res = Loader::new(&dst).load_channels(&main[..], || {
        conns
            .pop()
            .ok_or_else(|| std::io::Error::other("no more connections"))
    });
    (res, dst)
}

#[test]
fn hand_made_two_channel_stream_loads() {
    let (res, dst) = load_with_hostile_channel(channel_stream(2, SESSION, |w| {
        w.zero(0, 8192).unwrap();
        w.sync(0).unwrap();
        w.section_end(1).unwrap();
        w.raw(0, 8192, &[0x22; 4096]).unwrap();
    }));
    let out = res.expect("a well-formed two-channel stream loads");
    assert_eq!(out.stats.raw_pages, 3);
    assert_eq!(out.stats.zero_pages, 1);
    let mut b = [0u8; 1];
    for (off, v) in [(0, 0x11), (4096, 0x12), (8192, 0x22)] {
        dst.blocks()[0].region().read(off, &mut b);
        assert_eq!(b[0], v, "page at {off:#x}");
    }
}

#[test]
fn hostile_page_channel_is_refused() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "is not a page inside block",
            channel_stream(2, SESSION, |w| {
                w.raw(0, 64 << 10, &[0x66; 4096]).unwrap();
            }),
        ),
        (
            "xbzrle page on a page channel",
            channel_stream(2, SESSION, |w| {
                w.encoded(crate::stream::Encoded::Xbzrle, 0, 0, &[0, 1, 0x66])
                    .unwrap();
            }),
        ),
        (
            "device state on a page channel",
            channel_stream(2, SESSION, |w| w.state(b"x").unwrap()),
        ),
        (
            "is not this migration's",
            channel_stream(2, SESSION + 1, |_| {}),
        ),
        ("used twice", channel_stream(1, SESSION, |_| {})),
        ("ended after 0 syncs", channel_stream(2, SESSION, |_| {})),
        (
            "sync epoch 1 where 0 was expected",
            channel_stream(2, SESSION, |w| {
                w.sync(1).unwrap();
                w.section_end(1).unwrap();
            }),
        ),
        ("checksum", {
            let mut s = channel_stream(2, SESSION, |w| {
                w.raw(0, 0, &[0x66; 4096]).unwrap();
                w.sync(0).unwrap();
                w.section_end(1).unwrap();
            });
            let n = s.len();
            s[n - 200] ^= 1;
            s
        }),
    ];
    for (want, stream) in cases {
        let (res, dst) = load_with_hostile_channel(stream);
        let err = res.err().unwrap_or_else(|| panic!("accepted: {want}"));
        let msg = err.to_string();
        assert!(msg.contains(want), "want '{want}', got: {msg}");
        assert!(
            msg.contains("channel") || msg.contains("connection"),
            "the error names the channel: {msg}"
        );
        // Nothing of the hostile channel's pattern past its refusal.
        let mut page = vec![0u8; 4096];
        for p in 1..16 {
            dst.blocks()[0].region().read(p * 4096, &mut page);
            assert!(!page.contains(&0x66), "{want}: page {p} written");
        }
    }
}

/// Migrates a still guest (4 MiB of compressible text-like pages) with
/// `params` into memory (a link that only costs a memcpy, whatever else
/// the machine does), loads it and checks the copy; returns the stats.
fn migrate_compressible(params: Params) -> MigrationStats {
    let layout = [("ram", 4 * MIB)];
    let src = ProcessMemory::new(&layout).unwrap();
    let dst = ProcessMemory::new(&layout).unwrap();
    let words: [&[u8]; 6] = [
        b"migrate ",
        b"page ",
        b"dirty ",
        b"guest ",
        b"the ",
        b"bitmap ",
    ];
    let mut rng = crate::testkit::workload::XorShift::new(11);
    let mut page = Vec::with_capacity(PAGE_SIZE);
    let region = src.blocks()[0].region();
    for p in 0..(4 * MIB as usize / PAGE_SIZE) {
        page.clear();
        while page.len() < PAGE_SIZE {
            page.extend_from_slice(words[rng.below(words.len())]);
        }
        page.truncate(PAGE_SIZE);
        assert!(region.write(p * PAGE_SIZE, &page));
    }
    let (mut tracker, _log) = SoftwareTracker::new(&src);
    let mut stream = Vec::with_capacity(16 << 20);
    let stats = Source::new(&src, &mut tracker, &mut NoVm, MigrationHandle::new(params))
        .run(&mut stream, None)
        .expect("migration succeeds");
    Loader::new(&dst).load(&stream[..]).expect("load succeeds");
    assert_eq!(hex(&memory_digest(&src)), hex(&memory_digest(&dst)));
    stats
}

#[test]
fn adaptive_compression_compresses_for_a_capped_link() {
    // 32 MiB/s: a page takes ~120 us on the link; lz4 saves most of it
    // in a few microseconds.
    let stats = migrate_compressible(Params {
        compress: Some(CompressParams {
            algorithm: crate::codec::compress::Algorithm::Lz4,
            level: 1,
        }),
        max_bandwidth: 32 * MIB,
        ..Params::default()
    });
    let c = stats.compression.expect("compression stats");
    assert_eq!(c.skipped_pages, 0, "{c:?}");
    assert_eq!(c.pages, 1024, "{c:?}");
    assert!(c.compression_rate > 2.0, "{c:?}");
}

#[test]
fn adaptive_compression_skips_a_compressor_slower_than_the_link() {
    // zstd level 19 takes tens of microseconds a page; memory takes a
    // page in well under one.
    let params = Params {
        compress: Some(CompressParams {
            algorithm: crate::codec::compress::Algorithm::Zstd,
            level: 19,
        }),
        ..Params::default()
    };
    let stats = migrate_compressible(params.clone());
    let c = stats.compression.expect("compression stats");
    assert_eq!(c.pages + c.skipped_pages, 1024, "{c:?}");
    assert!(
        c.skipped_pages > 512,
        "most pages skip the compressor: {c:?}"
    );
    assert_eq!(stats.ram.normal, c.skipped_pages, "skipped pages went raw");
    // Without adaptation every page is compressed.
    let stats = migrate_compressible(Params {
        adaptive_encoding: false,
        ..params
    });
    let c = stats.compression.expect("compression stats");
    assert_eq!((c.pages, c.skipped_pages), (1024, 0), "{c:?}");
}

/// How a scripted destination answers at the end of the stream.
#[derive(Clone, Copy, Debug)]
enum DestScript {
    /// LOADED, GO, STARTED.
    Normal,
    /// Loads, then closes without a reply.
    NoReply,
    /// LOADED, reads GO, closes without STARTED.
    NoStarted,
    /// LOADED, then closes before GO arrives (so GO is written into a
    /// closed pipe).
    CloseAfterLoaded,
    /// LOADED, reads GO, then the user cancels; no STARTED.
    CancelAfterGo,
}

/// The source engine against a scripted destination: the last VM call and
/// the source's result, plus whether the destination got GO.
fn handshake_run(
    script: DestScript,
) -> (Result<MigrationStats, MigrationError>, Vec<String>, bool) {
    let src = ProcessMemory::single(MIB).unwrap();
    src.blocks()[0].region().write(0, b"guest");
    let (mut t, _log) = SoftwareTracker::new(&src);
    let (w, r) = pipe();
    let (aw, mut ar) = pipe();
    let handle = MigrationHandle::new(Params::default());
    let h = handle.clone();
    let dest = thread::spawn(move || {
        let dst = ProcessMemory::single(MIB).unwrap();
        let mut r = r;
        let mut l = Loader::new(&dst).answering(Box::new(aw));
        l.load(&mut r).expect("stream loads");
        let mut aw = l.take_answer().expect("the return path");
        match script {
            DestScript::Normal => {
                let go = Commit::new(r, aw).wait_go().expect("GO");
                go.started().unwrap();
                true
            }
            DestScript::NoReply => false,
            DestScript::NoStarted => {
                write_reply(&mut aw, &Reply::Loaded).unwrap();
                read_go(&mut r).is_ok()
            }
            DestScript::CloseAfterLoaded => {
                write_reply(&mut aw, &Reply::Loaded).unwrap();
                false
            }
            DestScript::CancelAfterGo => {
                write_reply(&mut aw, &Reply::Loaded).unwrap();
                let got = read_go(&mut r).is_ok();
                h.cancel();
                got
            }
        }
    });
    let mut vm = RecordingVm::default();
    let res = Source::new(&src, &mut t, &mut vm, handle).run(w, Some(&mut ar as &mut dyn Read));
    let got_go = dest.join().unwrap();
    (res, vm.calls, got_go)
}

#[test]
fn handshake_completes_and_source_stays_paused() {
    let (res, calls, got_go) = handshake_run(DestScript::Normal);
    assert_eq!(res.unwrap().status, Status::Completed);
    assert!(got_go);
    assert!(calls.contains(&"pause".to_string()));
    assert!(!calls.contains(&"resume".to_string()), "{calls:?}");
}

#[test]
fn no_loaded_reply_resumes_the_source() {
    let (res, calls, _) = handshake_run(DestScript::NoReply);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrationError::Ack(_)), "{e}");
    assert!(e.to_string().contains("no LOADED reply"), "{e}");
    assert_eq!(calls.last().map(String::as_str), Some("resume"));
}

#[test]
fn missing_started_keeps_the_source_paused() {
    let (res, calls, got_go) = handshake_run(DestScript::NoStarted);
    assert!(got_go, "the destination got GO");
    let e = res.unwrap_err();
    assert!(matches!(e, MigrationError::Unconfirmed(_)), "{e}");
    assert!(e.to_string().contains("stays paused"), "{e}");
    assert!(!calls.contains(&"resume".to_string()), "{calls:?}");
}

#[test]
fn go_into_a_closed_connection_is_never_a_resume_race() {
    // GO may or may not reach the pipe before the destination drops it;
    // either way the source's choice must match what the destination saw:
    // GO refused → resumed; GO accepted (buffered) → paused.
    let (res, calls, got_go) = handshake_run(DestScript::CloseAfterLoaded);
    assert!(!got_go);
    let e = res.unwrap_err();
    let resumed = calls.contains(&"resume".to_string());
    match e {
        MigrationError::Ack(ref m) => {
            assert!(m.to_string().contains("sending GO failed"), "{m}");
            assert!(resumed, "{calls:?}");
        }
        MigrationError::Unconfirmed(_) => assert!(!resumed, "{calls:?}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_cancel_after_go_does_not_resume_the_source() {
    let (res, calls, got_go) = handshake_run(DestScript::CancelAfterGo);
    assert!(got_go);
    let e = res.unwrap_err();
    assert!(matches!(e, MigrationError::Unconfirmed(_)), "{e}");
    assert!(!calls.contains(&"resume".to_string()), "{calls:?}");
}

#[test]
fn a_cancelled_source_with_page_channels_tells_the_destination() {
    let src = ProcessMemory::single(16 * MIB).unwrap();
    let dst = ProcessMemory::single(16 * MIB).unwrap();
    let (mut t, log) = SoftwareTracker::new(&src);
    fill_random(src.blocks(), &log_writer(log), 8);
    let (w, r) = pipe();
    let (ack_w, ack_r) = pipe();
    let (mut ch_w, mut ch_r) = channel_pipes(2);
    let d2 = dst.clone();
    let loader = thread::spawn(move || {
        let mut r = r;
        Loader::new(&d2)
            .answering(Box::new(ack_w))
            .load_channels(Box::new(&mut r) as BoxRead<'_>, || {
                next_conn(&mut ch_r).map(|c| Box::new(c) as BoxRead<'_>)
            })
    });
    // 2 MiB/s: 16 MiB cannot go before the cancel.
    let handle = MigrationHandle::new(Params {
        channels: 2,
        max_bandwidth: 2 * MIB,
        ..Params::default()
    });
    let h = handle.clone();
    let canceller = thread::spawn(move || {
        while h.stats().ram.transferred < 512 << 10 {
            thread::sleep(Duration::from_millis(5));
        }
        h.cancel();
    });
    let mut ack_r: PipeReader = ack_r;
    let mut vm = RecordingVm::default();
    let err = Source::new(&src, &mut t, &mut vm, handle)
        .run_with_channels(w, Some(&mut ack_r as &mut dyn Read), &mut |_| {
            Ok(Box::new(ch_w.remove(0)))
        })
        .unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    let e = loader.join().unwrap().unwrap_err();
    assert_eq!(e.to_string(), "source aborted: migration cancelled");
}

#[test]
fn a_destination_asked_for_its_report_catches_its_digest_up_at_a_drain() {
    use crate::engine::digest::CHUNK;
    use crate::stream::format::{FLAG_LOAD_REPORT, FLAG_SETUP, FLAG_VERIFY};
    // 8 MiB (four digest chunks); pages in chunks 0 and 2 before the
    // mark, one in chunk 3 after it.
    let len = 8 * MIB;
    let chunk = CHUNK as u64;
    let src = ProcessMemory::single(len).unwrap();
    let dst = ProcessMemory::single(len).unwrap();
    let page = |seed: u8| vec![seed; PAGE_SIZE];
    for (off, seed) in [(0, 1u8), (2 * chunk + 8192, 2), (3 * chunk, 3)] {
        src.blocks()[0].region().write(off as usize, &page(seed));
    }
    let stream = |flags: u16| {
        let mut w = StreamWriter::new(Vec::new(), flags);
        w.block_list(&[BlockDesc {
            id: "ram".into(),
            len,
        }])
        .unwrap();
        w.setup(0, 0).unwrap();
        w.section_end(0).unwrap();
        w.raw(0, 0, &page(1)).unwrap();
        w.raw(0, 2 * chunk + 8192, &page(2)).unwrap();
        w.drain(1).unwrap();
        w.section_end(1).unwrap();
        w.raw(0, 3 * chunk, &page(3)).unwrap();
        if flags & FLAG_VERIFY != 0 {
            w.digest(&memory_digest(&src)).unwrap();
        }
        w.end().unwrap();
        w.get_mut().clone()
    };
    let (ack_w, mut ack_r) = pipe();
    let mut l = Loader::new(&dst).answering(Box::new(ack_w));
    let out = l
        .load(&stream(FLAG_SETUP | FLAG_VERIFY | FLAG_LOAD_REPORT)[..])
        .expect("loads and verifies");
    assert!(out.digest.is_some());
    // After the end only chunk 3 (written after the mark) was left to
    // hash: chunks 0 and 2 were hashed at the mark.
    assert!(out.stats.verify_chunks <= 1, "{:?}", out.stats);
    drop(l);
    let got = replies(&mut ack_r);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], Reply::Accepted);
    let Reply::AppliedReport(1, report) = got[1] else {
        panic!("expected APPLIED with a report, got {:?}", got[1]);
    };
    // Whatever the background hasher had done by then, the answer came
    // with nothing left to hash: the pause re-hashes only chunk 3.
    assert_eq!(report.backlog, 0, "{report:?}");
    assert!(report.hashed <= len, "{report:?}");
    assert_eq!(memory_digest(&src), memory_digest(&dst));
    // Without the flag: the plain answer, as before.
    let dst2 = ProcessMemory::single(len).unwrap();
    let (ack_w, mut ack_r) = pipe();
    let mut l = Loader::new(&dst2).answering(Box::new(ack_w));
    l.load(&stream(FLAG_SETUP | FLAG_VERIFY)[..])
        .expect("loads and verifies");
    drop(l);
    assert_eq!(replies(&mut ack_r), [Reply::Accepted, Reply::Applied(1)]);
    // Without verify the report says there is nothing to hash.
    let dst3 = ProcessMemory::single(len).unwrap();
    let (ack_w, mut ack_r) = pipe();
    let mut l = Loader::new(&dst3).answering(Box::new(ack_w));
    l.load(&stream(FLAG_SETUP | FLAG_LOAD_REPORT)[..])
        .expect("loads");
    drop(l);
    assert_eq!(
        replies(&mut ack_r),
        [
            Reply::Accepted,
            Reply::AppliedReport(1, LoadReport::default())
        ]
    );
}

#[test]
fn the_loader_answers_a_drain_mark_once_its_section_checked_out() {
    use crate::stream::format::FLAG_SETUP;
    let dst = ProcessMemory::single(4 * PAGE_SIZE as u64).unwrap();
    let page = vec![0x5au8; PAGE_SIZE];
    let stream = |corrupt: bool| {
        let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
        w.block_list(&[BlockDesc {
            id: "ram".into(),
            len: 4 * PAGE_SIZE as u64,
        }])
        .unwrap();
        w.setup(0, 0).unwrap();
        w.section_end(0).unwrap();
        w.raw(0, 0, &page).unwrap();
        w.drain(1).unwrap();
        w.section_end(1).unwrap();
        let at = w.bytes() as usize;
        w.raw(0, PAGE_SIZE as u64, &page).unwrap();
        w.drain(2).unwrap();
        w.section_end(2).unwrap();
        w.end().unwrap();
        let mut b = w.get_mut().clone();
        if corrupt {
            // A byte of the second section's page: its checksum fails.
            b[at + 20] ^= 1;
        }
        b
    };
    let (ack_w, mut ack_r) = pipe();
    let mut l = Loader::new(&dst).answering(Box::new(ack_w));
    l.load(&stream(false)[..]).expect("loads");
    drop(l);
    assert_eq!(
        replies(&mut ack_r),
        [Reply::Accepted, Reply::Applied(1), Reply::Applied(2)]
    );
    let mut first = vec![0u8; PAGE_SIZE];
    dst.blocks()[0].region().read(0, &mut first);
    assert_eq!(first, page);
    // A mark whose section does not check out is never answered: the
    // source hears the failure instead.
    let (ack_w, mut ack_r) = pipe();
    let mut l = Loader::new(&dst).answering(Box::new(ack_w));
    let e = l.load(&stream(true)[..]).expect_err("bad checksum");
    assert!(e.to_string().contains("checksum"), "{e}");
    drop(l);
    assert_eq!(replies(&mut ack_r), [Reply::Accepted, Reply::Applied(1)]);
}

/// Every reply on the return path `r` until it ends.
fn replies(r: &mut PipeReader) -> Vec<Reply> {
    let mut got = Vec::new();
    while let Ok(x) = read_reply(r) {
        got.push(x);
    }
    got
}
