//! A foreign guest moves live: the boot-sector incrementer (real mode, it
//! increments the first byte of every page of [1 MiB, 128 MiB) in order,
//! forever) is migrated while it runs. On the destination its memory is
//! consistent — checked on a dump taken with the guest paused, right after
//! the load and again after it ran — and it keeps advancing.
mod common;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use livemig::engine::{MigrationHandle, Params, Status};
use minivm::guest::{boot_incrementer, BOOTINC_FIRST};
use minivm::migrate::migrate_out;
use minivm::{GuestImage, TrackerKind, Vm, VmConfig};

const MEM: u64 = 128 << 20;

/// The incrementer's invariant over the counter bytes of its pages, in
/// order: all equal except one step down by one (mod 256) where the guest
/// is. Returns the index of that step (0 if none).
fn consistent(counters: &[u8]) -> Result<usize, String> {
    let mut step = None;
    for i in 1..counters.len() {
        let (a, b) = (counters[i - 1], counters[i]);
        if a == b {
            continue;
        }
        if a != b.wrapping_add(1) {
            return Err(format!("page {i}: counter {a} then {b}"));
        }
        if let Some(first) = step {
            return Err(format!("two boundaries: pages {first} and {i}"));
        }
        step = Some(i);
    }
    Ok(step.unwrap_or(0))
}

/// Pauses `vm` (if running), dumps the incremented range and checks it.
fn dump_and_check(vm: &Vm, path: &Path, what: &str) -> (usize, u8) {
    vm.pause().unwrap();
    vm.dump_memory(BOOTINC_FIRST, MEM - BOOTINC_FIRST, path)
        .unwrap();
    let dump = std::fs::read(path).unwrap();
    assert_eq!(dump.len() as u64, MEM - BOOTINC_FIRST);
    let counters: Vec<u8> = dump.chunks(4096).map(|p| p[0]).collect();
    let at = consistent(&counters).unwrap_or_else(|e| panic!("{what}: inconsistent memory: {e}"));
    (at, counters[0])
}

#[test]
fn boot_sector_incrementer_migrates_live_and_stays_consistent() {
    if !common::kvm_available("boot_sector_incrementer_migrates_live_and_stays_consistent") {
        return;
    }
    let cfg = VmConfig {
        mem_size: MEM,
        guest: GuestImage::BootSector(boot_incrementer(MEM as u32)),
        ..VmConfig::default()
    };
    let src = Vm::new(cfg.clone()).unwrap();
    let p0 = common::wait_bootinc_passes(&src, 2, Duration::from_secs(30));
    assert!(p0 >= 2, "the incrementer runs on the source: {p0} passes");
    assert!(
        src.guest_status().errors.is_empty(),
        "{:?}",
        src.guest_status()
    );

    let (w, mut ar, dest) = common::pipe_destination(&cfg);
    // The incrementer rewrites its whole range several times a second. A
    // downtime limit far below what the whole range costs forces a live
    // first pass while the guest re-dirties pages (the point of this test;
    // a multi-second limit would let the engine stop at once and send
    // everything in the pause); auto-converge makes it finish on a loaded
    // host.
    let handle = MigrationHandle::new(Params {
        verify: true,
        downtime_limit: 300,
        auto_converge: true,
        ..Params::default()
    });
    let before = common::bootinc_passes(&src);
    let stats = migrate_out(
        &src,
        TrackerKind::Auto,
        handle,
        w,
        Some(&mut ar as &mut dyn Read),
    )
    .unwrap();
    assert_eq!(stats.status, Status::Completed);
    let at_stop = common::bootinc_passes(&src);
    assert!(
        stats.ram.normal + stats.ram.duplicate > MEM / 4096,
        "the guest re-dirtied pages while it migrated (some were sent twice): {stats:?}"
    );
    let (dst, loaded) = dest.join().unwrap().unwrap();
    assert!(loaded.digest.is_some(), "verify mode proved the memory");
    assert_eq!(
        common::bootinc_passes(&dst),
        at_stop,
        "the destination starts where the source stopped"
    );
    eprintln!(
        "boot sector over {} MiB: {} total {} ms, downtime {} ms, {} rounds, {} MiB sent, throttle {}%; the guest made {} passes while migrating",
        (MEM - BOOTINC_FIRST) >> 20,
        stats.dirty_tracker,
        stats.total_time,
        stats.downtime,
        stats.ram.rounds,
        stats.ram.transferred >> 20,
        stats.cpu_throttle_percentage,
        at_stop - before
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem.bin");
    // Before the guest ever ran on the destination: exactly the source's
    // memory at the switch-over.
    let (pos0, _) = dump_and_check(&dst, &path, "destination after load");
    src.pause().unwrap();
    src.dump_memory(BOOTINC_FIRST, MEM - BOOTINC_FIRST, &path)
        .unwrap();
    let src_dump = std::fs::read(&path).unwrap();

    // Run a bit, pause, dump, check.
    dst.resume();
    let p1 = common::wait_bootinc_passes(&dst, at_stop + 2, Duration::from_secs(30));
    assert!(
        p1 >= at_stop + 2,
        "the guest advances on the destination: {at_stop} -> {p1}"
    );
    let (pos1, first1) = dump_and_check(&dst, &path, "destination after running");
    let dst_dump = std::fs::read(&path).unwrap();
    assert_ne!(src_dump, dst_dump, "the destination's memory moved on");
    let s = dst.guest_status();
    assert!(s.errors.is_empty(), "{s:?}");
    eprintln!(
        "destination: writer at page {pos0} after load, {p1} passes and writer at page {pos1} (counter {first1}) after running; memory consistent"
    );

    // Resume: still advancing.
    dst.resume();
    let p2 = common::wait_bootinc_passes(&dst, p1 + 1, Duration::from_secs(30));
    assert!(
        p2 > p1,
        "the guest still advances after the check: {p1} -> {p2}"
    );
    let (_, _) = dump_and_check(&dst, &path, "destination at the end");
    assert!(dst.guest_status().errors.is_empty());
}
