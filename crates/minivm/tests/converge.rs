//! Convergence: a guest that dirties memory faster than the bandwidth cap
//! carries it never converges on its own, and does with auto-converge or
//! with dirty-limit.
//!
//! Scenario (the same in the three tests): 2 vCPUs, 64 MiB of guest RAM, the
//! test guest writing as fast as it can over 4 MiB per vCPU; bandwidth cap
//! 8 MiB/s, downtime limit 300 ms (so at most ~2.4 MiB may be left at the
//! switch-over). On this host a tracked guest pays ~100 µs for its first
//! write to each page after re-protection, so it re-dirties its whole 8 MiB
//! working set in a fraction of the ~1 s a round takes: without help every
//! sync finds all of it dirty again. Throttled at 99% (one 10 ms slice a
//! second) it still dirties ~1000 pages/s (~4 MiB/s), which is why the cap
//! must sit above that for auto-converge to win. Each test prints its
//! figures (--nocapture).
//!
//! Margin: the downtime must stay within the limit plus 500 ms (the final
//! send is not rate limited; the margin covers the pause itself, the verify
//! digest and a loaded two-core host).
mod common;

use std::io::Read;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use livemig::engine::{MigrationHandle, MigrationStats, Params, Status, SyncPoint};
use minivm::migrate::{migrate_out, MigrateError};
use minivm::{GuestImage, TestGuestConfig, TrackerKind, Vm, VmConfig};

const PAGES_PER_VCPU: u64 = 1024;
const BANDWIDTH: u64 = 8 << 20;
const DOWNTIME_LIMIT: u64 = 300;
const DOWNTIME_MARGIN: u64 = 500;
/// The unhelped migration is cancelled after this long.
const NO_HELP_SECS: u64 = 12;
/// Helped migrations must complete within this long.
const HELPED_SECS: u64 = 28;

/// One migration at a time: two cores, and figures that mean something.
static SERIAL: Mutex<()> = Mutex::new(());

fn config(ring: Option<u32>) -> VmConfig {
    VmConfig {
        mem_size: 64 << 20,
        vcpus: 2,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: PAGES_PER_VCPU,
            rate_bytes_per_sec: 0,
        }),
        dirty_ring_entries: ring,
        prefault: true,
        ..VmConfig::default()
    }
}

fn params() -> Params {
    Params {
        max_bandwidth: BANDWIDTH,
        downtime_limit: DOWNTIME_LIMIT,
        verify: true,
        ..Params::default()
    }
}

struct Outcome {
    src: Vm,
    result: Result<MigrationStats, MigrateError>,
    history: Vec<SyncPoint>,
    dest: Option<Vm>,
    secs: f64,
}

/// Migrates a fresh source VM in process; cancels it after `cancel_after`.
fn migrate(
    name: &str,
    cfg: VmConfig,
    kind: TrackerKind,
    params: Params,
    cancel_after: Duration,
) -> Outcome {
    let src = Vm::new(cfg.clone()).expect("source VM");
    let warm = common::wait_for(&src, Duration::from_secs(5), |s| {
        s.pages_written() > 4 * PAGES_PER_VCPU
    });
    assert!(
        warm.ok() && warm.heartbeats() > 0,
        "{name}: guest runs: {warm:?}"
    );
    let (w, mut ar, dest) = common::pipe_destination(&cfg);
    let handle = MigrationHandle::new(params);
    let guard = src.follow_dirty_limit(&handle).expect("dirty limit");
    let h = handle.clone();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if stop_rx.recv_timeout(cancel_after).is_err() {
            h.cancel();
        }
    });
    let t0 = Instant::now();
    let result = migrate_out(
        &src,
        kind,
        handle.clone(),
        w,
        Some(&mut ar as &mut dyn Read),
    );
    let secs = t0.elapsed().as_secs_f64();
    drop(guard);
    let _ = stop_tx.send(());
    watchdog.join().unwrap();
    let dest = dest.join().unwrap().ok().map(|(vm, _)| vm);
    let history = handle.history();
    for p in &history {
        eprintln!(
            "{name}: t={:>6} ms sync {:>3} dirty {:>5} remaining {:>5} sent {:>5} {:>5.1} MiB/s throttle {:>2}% expected {:>5} ms",
            p.time_ms,
            p.sync,
            p.dirty_pages,
            p.remaining_pages,
            p.sent_pages,
            p.throughput as f64 / (1 << 20) as f64,
            p.throttle,
            p.expected_downtime
        );
    }
    Outcome {
        src,
        result,
        history,
        dest,
        secs,
    }
}

/// A completed migration: downtime within the limit + margin, and the
/// destination guest runs with its self-check passing.
fn check_converged(name: &str, o: &Outcome) -> MigrationStats {
    let stats = match &o.result {
        Ok(s) => s.clone(),
        Err(e) => panic!("{name}: migration did not complete: {e}"),
    };
    assert_eq!(stats.status, Status::Completed, "{name}: {stats:?}");
    assert!(
        stats.downtime <= DOWNTIME_LIMIT + DOWNTIME_MARGIN,
        "{name}: downtime {} ms > limit {DOWNTIME_LIMIT} + margin {DOWNTIME_MARGIN} ms",
        stats.downtime
    );
    let dst = o.dest.as_ref().expect("destination loaded");
    let before = dst.guest_status();
    dst.resume();
    let after = common::wait_for(dst, Duration::from_secs(5), |s| {
        s.pages_written() > before.pages_written() + 2 * PAGES_PER_VCPU
    });
    assert!(after.ok(), "{name}: destination self-check: {after:?}");
    assert!(
        after.pages_written() > before.pages_written(),
        "{name}: the guest runs on the destination"
    );
    stats
}

#[test]
fn heavy_dirtier_does_not_converge_without_help() {
    let name = "no-help";
    if !common::kvm_available(name) {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let o = migrate(
        name,
        config(None),
        TrackerKind::Auto,
        params(),
        Duration::from_secs(NO_HELP_SECS),
    );
    match &o.result {
        Err(MigrateError::Migration(livemig::engine::MigrationError::Cancelled)) => {}
        other => panic!(
            "{name}: expected the migration to still run after {NO_HELP_SECS} s (then be cancelled), got {:?}",
            other.as_ref().map(|s| s.status)
        ),
    }
    assert!(o.secs >= NO_HELP_SECS as f64 - 0.5);
    assert!(
        o.dest.is_none(),
        "{name}: the destination never got a whole stream"
    );
    // It did go round: several syncs, each finding far more dirty than fits.
    let threshold_pages = BANDWIDTH * DOWNTIME_LIMIT / 1000 / 4096;
    let after_bulk: Vec<_> = o.history.iter().filter(|p| p.round >= 1).collect();
    assert!(after_bulk.len() >= 2, "{name}: {:?}", o.history);
    assert!(
        after_bulk
            .iter()
            .all(|p| p.remaining_pages > threshold_pages),
        "{name}: every sync left more than the downtime allows"
    );
    assert!(o.history.iter().all(|p| p.throttle == 0));
    // Cancel: the source guest keeps running, unthrottled, self-check good.
    assert!(!o.src.is_paused());
    assert_eq!(o.src.throttle(), 0);
    let s0 = o.src.guest_status();
    let s1 = common::wait_for(&o.src, Duration::from_secs(5), |s| {
        s.pages_written() > s0.pages_written() + 2 * PAGES_PER_VCPU
            && s.heartbeats() > s0.heartbeats()
    });
    assert!(s1.ok(), "{name}: source self-check after cancel: {s1:?}");
    assert!(
        s1.pages_written() > s0.pages_written() + 2 * PAGES_PER_VCPU,
        "{name}: the source guest keeps running after cancel: {s0:?} -> {s1:?}"
    );
    eprintln!(
        "{name}: still active after {:.1} s ({} syncs, last remaining {} pages > {threshold_pages}); cancelled, source guest runs on",
        o.secs,
        o.history.len(),
        o.history.last().map(|p| p.remaining_pages).unwrap_or(0)
    );
}

#[test]
fn heavy_dirtier_converges_with_auto_converge() {
    let name = "auto-converge";
    if !common::kvm_available(name) {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Params {
        auto_converge: true,
        cpu_throttle_initial: 50,
        cpu_throttle_increment: 20,
        ..params()
    };
    let o = migrate(
        name,
        config(None),
        TrackerKind::Auto,
        p,
        Duration::from_secs(HELPED_SECS),
    );
    let stats = check_converged(name, &o);
    let max_throttle = o.history.iter().map(|p| p.throttle).max().unwrap_or(0);
    assert!(
        max_throttle > 0,
        "{name}: throttle reported: {:?}",
        o.history
    );
    assert_eq!(o.src.throttle(), 0, "{name}: throttle removed at the end");
    eprintln!(
        "{name}: converged in {} ms, downtime {} ms (limit {DOWNTIME_LIMIT}), max throttle {max_throttle}%, {} syncs",
        stats.total_time, stats.downtime, stats.ram.dirty_sync_count
    );
}

#[test]
fn heavy_dirtier_converges_with_dirty_limit() {
    let name = "dirty-limit";
    if !common::kvm_available(name) {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 256 KiB/s per vCPU: 2 × 64 pages/s against 1024 pages/s of link.
    let p = Params {
        dirty_limit: 256 << 10,
        ..params()
    };
    let o = migrate(
        name,
        config(Some(4096)),
        TrackerKind::Ring,
        p,
        Duration::from_secs(HELPED_SECS),
    );
    let stats = check_converged(name, &o);
    assert!(
        o.history.iter().all(|p| p.throttle == 0),
        "{name}: no throttle"
    );
    assert_eq!(
        o.src.dirty_limit(),
        None,
        "{name}: limit removed at the end"
    );
    let waited: Duration = o.src.dirty_limit_waited().iter().sum();
    assert!(
        waited > Duration::ZERO,
        "{name}: the vCPUs waited for the limit"
    );
    eprintln!(
        "{name}: converged in {} ms, downtime {} ms (limit {DOWNTIME_LIMIT}), vCPUs waited {:.1} s in all, {} syncs",
        stats.total_time,
        stats.downtime,
        waited.as_secs_f64(),
        stats.ram.dirty_sync_count
    );
}

#[test]
fn dirty_limit_needs_the_ring() {
    if !common::kvm_available("dirty_limit_needs_the_ring") {
        return;
    }
    let vm = Vm::new(config(None)).expect("VM");
    let e = vm.set_dirty_limit(Some(1 << 20)).unwrap_err();
    assert!(e.to_string().contains("dirty ring"), "{e}");
    assert!(vm.vcpu_dirty_pages().is_none());
    vm.set_dirty_limit(None).expect("removing is always fine");
}
