//! Postcopy of a running test guest between two VMs in one process: the
//! guest resumes on the destination before its memory has arrived, vCPUs
//! fault on missing pages (served through userfaultfd while KVM waits),
//! and the guest's self-check passes on the destination.

mod common;

use std::thread;
use std::time::Duration;

use livemig::engine::{MigrationHandle, Params, Status, Switchover};
use livemig::transport::{pipe, Outgoing};
use minivm::migrate::{migrate_out_conn, receive};
use minivm::{TrackerKind, Vm};

fn postcopy(params: Params, at_once: bool) {
    let cfg = common::test_guest(256, 2, 8192, 0);
    let src = Vm::new(cfg.clone()).unwrap();
    let s = common::wait_for(&src, Duration::from_secs(10), |s| s.heartbeats() > 3);
    assert!(s.heartbeats() > 3, "the guest runs on the source: {s:?}");
    let (w, r) = pipe();
    let (aw, ar) = pipe();
    let dest = thread::spawn(move || {
        receive(
            &cfg,
            r,
            Some(Box::new(aw)),
            &mut || Err(std::io::Error::other("one connection")),
            true,
        )
    });
    let handle = MigrationHandle::new(params);
    if at_once {
        handle.start_postcopy().unwrap();
    }
    let conn = Outgoing {
        writer: Box::new(w),
        ack: Some(Box::new(ar)),
    };
    let stats = migrate_out_conn(&src, TrackerKind::Auto, handle, conn, &mut |_| {
        Err(std::io::Error::other("one channel"))
    })
    .unwrap();
    assert_eq!(stats.status, Status::Completed);
    assert!(src.is_paused(), "the source stays paused");
    let (dst, received) = dest.join().unwrap().unwrap();
    let pc = received
        .postcopy
        .expect("the migration switched to postcopy");
    assert!(pc.discarded_pages > 0);
    assert!(stats.postcopy_time.is_some() && stats.postcopy_latency.is_some());
    eprintln!(
        "postcopy: downtime {} ms, total {} ms, postcopy {} ms, {} requests, {} remote faults, latency p50 {} us p99 {} us, blocktime {} ms",
        stats.downtime,
        stats.total_time,
        pc.postcopy_time,
        stats.ram.postcopy_requests,
        pc.faults.faults,
        pc.faults.p50_us,
        pc.faults.p99_us,
        pc.faults.blocktime_us / 1000
    );
    let before = dst.guest_status();
    let after = common::wait_for(&dst, Duration::from_secs(10), |s| {
        s.pages_written() > before.pages_written() + 10_000
    });
    assert!(
        after.pages_written() > before.pages_written(),
        "the guest writes on the destination: {before:?} -> {after:?}"
    );
    assert!(
        after.ok(),
        "self-check passes on the destination: {after:?}"
    );
}

#[test]
fn pure_postcopy_of_a_running_vm() {
    if !common::kvm_available("pure_postcopy_of_a_running_vm") {
        return;
    }
    postcopy(
        Params {
            postcopy_ram: true,
            ..Params::default()
        },
        true,
    );
}

#[test]
fn auto_postcopy_of_a_vm_that_does_not_converge() {
    if !common::kvm_available("auto_postcopy_of_a_vm_that_does_not_converge") {
        return;
    }
    // The guest rewrites its pages flat out; a 64 MiB/s link never catches up.
    postcopy(
        Params {
            postcopy_ram: true,
            postcopy_switchover: Switchover::Auto,
            max_bandwidth: 64 << 20,
            downtime_limit: 20,
            ..Params::default()
        },
        false,
    );
}
