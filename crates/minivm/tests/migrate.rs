//! A running test guest migrated between two VMs in one process, through
//! an in-memory pipe: the guest continues on the destination and its
//! self-check passes.

mod common;

use std::io::Read;
use std::thread;
use std::time::Duration;

use livemig::engine::{MigrationHandle, Params, Status};
use minivm::migrate::migrate_out;
use minivm::{GuestImage, TestGuestConfig, TrackerKind, Vm, VmConfig};

fn config() -> VmConfig {
    VmConfig {
        mem_size: 256 << 20,
        ram_blocks: 2,
        vcpus: 2,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: 2048,
            rate_bytes_per_sec: 64 << 20,
        }),
        prefault: true,
        ..VmConfig::default()
    }
}

#[test]
fn running_guest_moves_and_keeps_running() {
    if !common::kvm_available("running_guest_moves_and_keeps_running") {
        return;
    }
    let src = Vm::new(config()).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(
        src.guest_status().heartbeats() > 0,
        "guest runs on the source"
    );
    let (w, mut ar, dest) = common::pipe_destination(&config());
    let handle = MigrationHandle::new(Params {
        verify: true,
        ..Params::default()
    });
    let stats = migrate_out(
        &src,
        TrackerKind::Auto,
        handle,
        w,
        Some(&mut ar as &mut dyn Read),
    )
    .unwrap();
    assert_eq!(stats.status, Status::Completed);
    let (dst, loaded) = dest.join().unwrap().unwrap();
    assert!(loaded.digest.is_some(), "verify mode proved the memory");
    let before = dst.guest_status();
    assert!(src.is_paused(), "the source stays paused");
    dst.resume();
    thread::sleep(Duration::from_millis(500));
    let after = dst.guest_status();
    assert!(
        after.pages_written() > before.pages_written(),
        "guest writes on the destination: {before:?} -> {after:?}"
    );
    assert!(
        after.ok(),
        "self-check passes on the destination: {after:?}"
    );
}
