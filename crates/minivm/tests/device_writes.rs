//! A write the VMM itself makes to guest memory during a migration reaches
//! the destination. minivm's clock page device writes a tick count into
//! guest memory every millisecond from its own thread, through vm-memory's
//! `GuestMemoryMmap<AtomicBitmap>`; KVM's dirty log never sees these
//! writes, livemig merges vm-memory's bitmap at every sync. The page is
//! sent in the bulk stage and rewritten hundreds of times afterwards: the
//! destination must hold the last tick the source wrote before it paused.
mod common;

use std::io::Read;
use std::thread;
use std::time::Duration;

use livemig::engine::{MigrationHandle, Params, Status};
use minivm::devices::CLOCK_PAGE_ADDR;
use minivm::migrate::migrate_out;
use minivm::{ClockPage, TrackerKind, Vm};

/// One migration; returns how many ticks the device wrote during it.
/// Whatever that count, the destination must hold the last one.
fn migrate_once(kind: TrackerKind) -> u64 {
    let mut cfg = common::test_guest(1024, 1, 256, 50 << 20);
    cfg.clock_page = Some(ClockPage {
        addr: CLOCK_PAGE_ADDR,
    });
    let src = Vm::new(cfg.clone()).unwrap();
    thread::sleep(Duration::from_millis(50));
    let (w, mut ar, dest) = common::pipe_destination(&cfg);
    let handle = MigrationHandle::new(Params {
        verify: true,
        ..Params::default()
    });
    let at_start = src.clock_ticks();
    let stats = migrate_out(&src, kind, handle, w, Some(&mut ar as &mut dyn Read)).unwrap();
    assert_eq!(stats.status, Status::Completed);
    assert!(src.is_paused());
    let at_stop = src.clock_ticks();
    let (dst, loaded) = dest.join().unwrap().expect("destination loads");
    assert!(loaded.digest.is_some(), "verify mode proved the memory");
    eprintln!(
        "{}: clock page ticked {} times during the {} ms migration ({} syncs); destination holds tick {}, source stopped at {}",
        stats.dirty_tracker,
        at_stop - at_start,
        stats.total_time,
        stats.ram.dirty_sync_count,
        dst.clock_ticks(),
        at_stop
    );
    assert_eq!(
        dst.clock_ticks(),
        at_stop,
        "the destination holds the device's last write"
    );
    // And the device keeps writing there once the guest runs.
    dst.resume();
    thread::sleep(Duration::from_millis(100));
    assert!(dst.clock_ticks() > at_stop);
    assert!(dst.guest_status().ok(), "{:?}", dst.guest_status());
    at_stop - at_start
}

/// The clock thread ticks every millisecond when it gets a core; on a
/// loaded 2-core host it may tick only a few times in a short migration.
/// The test needs writes made after the page's first send, so a run with
/// too few ticks is repeated (each run's destination is checked anyway).
fn check(kind: TrackerKind) {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ticks = migrate_once(kind);
        seen.push(ticks);
        if ticks >= 10 {
            return;
        }
    }
    panic!("the device barely wrote during any of 3 migrations (ticks per run: {seen:?})");
}

#[test]
fn device_write_during_migration_reaches_destination_bitmap() {
    if common::kvm_available("device_write_during_migration_reaches_destination_bitmap") {
        check(TrackerKind::Bitmap);
    }
}

#[test]
fn device_write_during_migration_reaches_destination_manual() {
    if common::kvm_available("device_write_during_migration_reaches_destination_manual") {
        check(TrackerKind::Manual { chunk_shift: 9 });
    }
}
