//! The engine over an in-memory transport, with a writer dirtying memory
//! concurrently: the destination must end up with the source's memory at
//! stop time, whatever the tracker mode and page encodings.

use std::io::Read;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::*;
use crate::dirty::{DirtyTracker, SoftwareLog, SoftwareTracker};
use crate::memory::{GuestMemory, ProcessMemory};
use crate::transport::{pipe, PipeReader};
use crate::vm::{NoVm, VmControl};
use crate::workload::{fill_random, PageWriter, Pattern, Workload, WorkloadConfig};

const MIB: u64 = 1 << 20;

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
    let handle = MigrationHandle::new(params);
    let (w, r) = pipe();
    let (mut ack_w, ack_r) = pipe();
    let dst2 = dst.clone();
    let loader = thread::spawn(move || {
        let res = Loader::new(&dst2).load(r);
        let msg = res.as_ref().map(|_| ()).map_err(|e| e.to_string());
        write_ack(&mut ack_w, msg.as_ref().map(|_| ()).map_err(String::as_str)).unwrap();
        res
    });
    let mut ack_r: PipeReader = ack_r;
    let h2 = handle.clone();
    let steerer = thread::spawn(move || steer(h2));
    let stats = Source::new(&src, &mut tracker, &mut vm, handle.clone())
        .run(w, Some(&mut ack_r as &mut dyn Read))
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
    assert!(o.stats.ram.normal > 0);
    assert!(o.stats.ram.rounds >= 1);
    assert_eq!(o.stats.dirty_tracker, "software");
    assert!(!o.history.is_empty());
}

#[test]
fn live_migration_manual_clear_initially_set() {
    // Chunks of 16 pages: many clears, each just before a chunk is sent.
    let o = migrate_live(
        |m| SoftwareTracker::manual(m, 4, true),
        verify_params(),
        live_workload(),
    );
    assert_same(&o);
}

#[test]
fn live_migration_manual_clear_not_initially_set() {
    let o = migrate_live(
        |m| SoftwareTracker::manual(m, 6, false),
        verify_params(),
        live_workload(),
    );
    assert_same(&o);
}

#[test]
fn xbzrle_sends_deltas_and_stays_exact() {
    let params = Params {
        xbzrle: true,
        xbzrle_cache_size: 16 * MIB,
        // 1 ms at 16 MiB/s lets 16 KiB go at switch-over: with the workload
        // dirtying far more per round, pages are re-sent round after round ...
        downtime_limit: 1,
        max_bandwidth: 16 * MIB,
        ..verify_params()
    };
    // ... until the limits are lifted while the migration runs.
    let steer = |h: MigrationHandle| {
        while h.history().len() < 8 && !h.stats().status.is_final() {
            thread::sleep(Duration::from_millis(10));
        }
        let mut p = h.params();
        p.downtime_limit = 2000;
        p.max_bandwidth = 0;
        h.set_params(p).unwrap();
    };
    let o = migrate_live_with(|m| SoftwareTracker::new(m), params, live_workload(), steer);
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
        crate::compress::Algorithm::Lz4,
        crate::compress::Algorithm::Zstd,
    ] {
        let params = Params {
            compress: Some(CompressParams {
                algorithm,
                level: 3,
            }),
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
    assert_eq!(
        load.stats.zero_pages_written, 0,
        "already-zero pages are not touched"
    );
    assert_eq!(memory_digest(&src), memory_digest(&dst));
}

/// A VM control that records calls, to check what the engine did to the guest.
#[derive(Default)]
struct RecordingVm {
    calls: Vec<String>,
}

impl VmControl for RecordingVm {
    fn pause(&mut self) -> Result<(), String> {
        self.calls.push("pause".into());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.calls.push("resume".into());
        Ok(())
    }
    fn set_throttle(&mut self, p: u8) {
        self.calls.push(format!("throttle {p}"));
    }
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
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
    // Destination acknowledges failure.
    let (mut aw, mut ar) = pipe();
    write_ack(&mut aw, Err("disk full")).unwrap();
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
        matches!(err, MigrationError::Destination(ref m) if m == "disk full"),
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
        fn pause(&mut self) -> Result<(), String> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), String> {
            Ok(())
        }
        fn save_state(&mut self) -> Result<Vec<u8>, String> {
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
    Source::new(&src, &mut t, &mut vm, MigrationHandle::new(verify_params()))
        .run(w, None)
        .unwrap();
    let err = loader.join().unwrap().unwrap_err();
    assert!(matches!(err, LoadError::DigestMismatch { .. }), "{err}");
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
