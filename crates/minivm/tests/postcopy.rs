//! Postcopy of a running test guest between two VMs in one process: the
//! guest resumes on the destination before its memory has arrived, vCPUs
//! fault on missing pages (served through userfaultfd while KVM waits),
//! and the guest's self-check passes on the destination. Over pipes, over
//! TCP with two page channels, and through a cut connection recovered
//! with `migrate-recover` / `migrate resume` (the library calls).

mod common;

use std::thread;
use std::time::Duration;

use livemig::engine::postcopy::PostcopyFigures;
use livemig::engine::{MigrationHandle, Params, Status, Switchover};
use livemig::testkit::fault_proxy::{Fault, FaultProxy};
use livemig::transport::{connect, Listener, Uri};
use minivm::migrate::{incoming_vm, migrate_out_conn, receive, receive_recoverable};
use minivm::{TrackerKind, Vm};

/// One migration of a running VM over pipes; false when it completed in
/// precopy (the guest's writes did not outrun the link on a loaded host,
/// so an automatic switch never came), after checking that outcome too.
fn postcopy(params: Params, at_once: bool) -> bool {
    let cfg = common::test_guest(256, 2, 8192, 0);
    let src = running_source(&cfg);
    let handle = MigrationHandle::new(params);
    if at_once {
        handle.start_postcopy().unwrap();
    }
    let (stats, dest) = common::pipe_receive(&src, &cfg, handle, true);
    let stats = stats.unwrap();
    assert_eq!(stats.status, Status::Completed);
    assert!(src.is_paused(), "the source stays paused");
    let (dst, received) = dest.unwrap();
    let Some(pc) = received.postcopy else {
        assert!(!at_once, "the migration switched to postcopy");
        assert!(stats.postcopy_time.is_none(), "{stats:?}");
        let after = common::wait_for(&dst, Duration::from_secs(10), |s| s.heartbeats() > 3);
        assert!(after.ok(), "self-check passes after precopy: {after:?}");
        return false;
    };
    check_destination(&stats, &pc, &dst);
    true
}

/// The figures of a completed postcopy, and the guest on the destination
/// running with its self-check passing.
fn check_destination(stats: &livemig::engine::MigrationStats, pc: &PostcopyFigures, dst: &Vm) {
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
    let after = common::wait_for(dst, Duration::from_secs(10), |s| {
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
    assert!(postcopy(
        Params {
            postcopy_ram: true,
            ..Params::default()
        },
        true,
    ));
}

#[test]
fn auto_postcopy_of_a_vm_that_does_not_converge() {
    if !common::kvm_available("auto_postcopy_of_a_vm_that_does_not_converge") {
        return;
    }
    // The guest rewrites its pages flat out; a 64 MiB/s link never catches
    // up, unless a loaded host slows the guest's writes down: then the
    // run converged in precopy, and is tried again.
    for attempt in 0..3 {
        let switched = postcopy(
            Params {
                postcopy_ram: true,
                postcopy_switchover: Switchover::Auto,
                max_bandwidth: 64 << 20,
                downtime_limit: 20,
                ..Params::default()
            },
            false,
        );
        if switched {
            return;
        }
        eprintln!("attempt {attempt}: precopy converged; again");
    }
    panic!("precopy converged in every attempt: no automatic switch to postcopy");
}

/// A VM of `cfg` whose guest runs (beat more than three times).
fn running_source(cfg: &minivm::VmConfig) -> Vm {
    let src = Vm::new(cfg.clone()).unwrap();
    let s = common::wait_for(&src, Duration::from_secs(10), |s| s.heartbeats() > 3);
    assert!(s.heartbeats() > 3, "the guest runs on the source: {s:?}");
    src
}

/// Accepts a migration's further connections (page channels) on
/// `listener`, as the destination's `accept` callback.
fn further_connections(
    listener: &Listener,
) -> impl FnMut() -> std::io::Result<livemig::transport::BoxRead> + '_ {
    move || {
        listener
            .accept()
            .map(|i| i.reader)
            .map_err(std::io::Error::other)
    }
}

fn tcp_listener() -> (Listener, std::net::SocketAddr) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let Uri::Tcp(a) = l.local_uri() else {
        unreachable!("a TCP listener")
    };
    (l, a.parse().unwrap())
}

#[test]
fn pure_postcopy_of_a_vm_over_two_page_channels() {
    if !common::kvm_available("pure_postcopy_of_a_vm_over_two_page_channels") {
        return;
    }
    let cfg = common::test_guest(128, 2, 4096, 0);
    let src = running_source(&cfg);
    let (listener, _) = tcp_listener();
    let uri = listener.local_uri();
    let dest = thread::spawn(move || {
        let inc = listener.accept().unwrap();
        receive(
            &cfg,
            inc.reader,
            inc.ack,
            &mut further_connections(&listener),
            true,
        )
    });
    let handle = MigrationHandle::new(Params {
        postcopy_ram: true,
        channels: 2,
        ..Params::default()
    });
    handle.start_postcopy().unwrap();
    let stats = migrate_out_conn(
        &src,
        TrackerKind::Auto,
        handle,
        connect(&uri).unwrap(),
        &mut |_| Ok(connect(&uri).map_err(std::io::Error::other)?.writer),
    )
    .unwrap();
    assert_eq!(stats.status, Status::Completed);
    assert!(src.is_paused(), "the source stays paused");
    let (dst, arrival) = dest.join().unwrap().unwrap();
    assert_eq!(arrival.load.stats.channels, 2);
    let pc = arrival
        .postcopy
        .expect("the migration switched to postcopy");
    assert!(
        pc.channel_pages > 0,
        "background pages came on the page channels"
    );
    assert_eq!(pc.placed_pages, pc.discarded_pages, "each page once");
    check_destination(&stats, &pc, &dst);
}

/// Pure postcopy of a VM through a proxy that cuts the main connection
/// after `cut` bytes; once both sides report `postcopy-paused`, the
/// destination listens again (`migrate-recover`) and the source
/// reconnects (`migrate` with `resume: true`). The push is capped so the
/// cut lands mid-postcopy.
fn recovered_vm(cut: u64) -> bool {
    let cfg = common::test_guest(64, 2, 4096, 0);
    let src = running_source(&cfg);
    let (listener, addr) = tcp_listener();
    let proxy = FaultProxy::start(addr, Fault::CutForwardAt(cut)).unwrap();
    let dh = MigrationHandle::new(Params::default());
    let dh2 = dh.clone();
    let dest = thread::spawn(move || {
        let vm = incoming_vm(&cfg).unwrap();
        let inc = listener.accept().unwrap();
        let r = receive_recoverable(
            &vm,
            inc.reader,
            inc.ack,
            &mut further_connections(&listener),
            true,
            Some(&dh2),
        );
        (vm, r)
    });
    let sh = MigrationHandle::new(Params {
        postcopy_ram: true,
        max_bandwidth: 16 << 20,
        ..Params::default()
    });
    sh.start_postcopy().unwrap();
    sh.set_postcopy_recovery(true);
    let (sh2, dh3) = (sh.clone(), dh.clone());
    let steer = thread::spawn(move || {
        let t0 = std::time::Instant::now();
        loop {
            let (s, d) = (sh2.stats().status, dh3.stats().status);
            if s == Status::PostcopyPaused && d == Status::PostcopyPaused {
                break;
            }
            if s.is_final() || d.is_final() || t0.elapsed() > Duration::from_secs(120) {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        let (l2, _) = tcp_listener();
        let uri = l2.local_uri();
        let acc = thread::spawn(move || l2.accept().unwrap());
        // The listener reads the stream's first bytes before it answers:
        // the source writes first.
        sh2.resume_postcopy(connect(&uri).unwrap()).unwrap();
        dh3.recover_postcopy(acc.join().unwrap()).unwrap();
        true
    });
    let proxy_uri: Uri = proxy.uri().parse().unwrap();
    let stats = migrate_out_conn(
        &src,
        TrackerKind::Auto,
        sh,
        connect(&proxy_uri).unwrap(),
        &mut |_| Err(std::io::Error::other("one connection")),
    )
    .expect("the migration completes");
    assert_eq!(stats.status, Status::Completed);
    assert!(src.is_paused(), "the source stays paused");
    let recovered = steer.join().unwrap();
    let (dst, arrival) = dest.join().unwrap();
    let arrival = arrival.expect("the destination completes");
    let pc = arrival
        .postcopy
        .expect("the migration switched to postcopy");
    check_destination(&stats, &pc, &dst);
    if recovered {
        assert!(proxy.has_cut(), "the proxy cut the connection");
    }
    recovered
}

#[test]
fn postcopy_of_a_vm_recovers_after_a_cut() {
    if !common::kvm_available("postcopy_of_a_vm_recovers_after_a_cut") {
        return;
    }
    // The cut must land after the switch and before the last page: the
    // guest's pages go in about a second at 16 MiB/s. On a host so fast
    // that the cut misses postcopy, try an earlier cut.
    for cut in [2 << 20, 256 << 10, 64 << 10] {
        if recovered_vm(cut) {
            return;
        }
        eprintln!("the cut at {cut} bytes missed postcopy; again, earlier");
    }
    panic!("no run was cut during postcopy");
}
