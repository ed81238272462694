//! Zero-copy local migration of real KVM guests: memfd-backed memory
//! handed to the destination over a Unix socket (`livemig::engine::local`),
//! in one process and between two `minivm run` processes.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{connect_when_up, finish, incoming_minivm, ok, source_minivm};
use livemig::engine::{MigrationError, MigrationHandle, MigrationMode, Params, Status};
use livemig::transport::local::{connect, LocalListener};
use livemig::transport::{Uri, IO_TIMEOUT};
use minivm::migrate::{migrate_out_local, receive_local, MigrateError};
use minivm::{GuestImage, Vm, VmConfig};

const MEM_MIB: u64 = 128;

fn source(memfd: bool) -> Vm {
    let vm = Vm::new(VmConfig {
        prefault: true,
        memfd,
        // 8 MiB working set per vCPU, 32 MiB/s of writes.
        ..common::test_guest(MEM_MIB, 2, 2048, 32 << 20)
    })
    .unwrap();
    let s = common::wait_for(&vm, Duration::from_secs(10), |s| {
        s.vcpus.iter().all(|v| v.heartbeats > 0)
    });
    assert!(s.ok() && s.heartbeats() > 0, "source guest runs: {s:?}");
    vm
}

fn destination(vcpus: usize, mem_mib: u64) -> Vm {
    Vm::new(VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        guest: GuestImage::Incoming,
        start_paused: true,
        ..VmConfig::default()
    })
    .unwrap()
}

/// The guest makes progress and its self-check passes.
fn assert_runs(vm: &Vm, when: &str) {
    assert!(!vm.is_paused(), "{when}: not paused");
    let before = vm.guest_status();
    let after = common::wait_for(vm, Duration::from_secs(10), |s| {
        s.heartbeats() > before.heartbeats() + 2 && s.pages_written() > before.pages_written()
    });
    assert!(
        after.heartbeats() > before.heartbeats() + 2
            && after.pages_written() > before.pages_written(),
        "{when}: the guest makes progress: {before:?} -> {after:?}"
    );
    assert!(after.ok(), "{when}: self-check passes: {after:?}");
}

/// Runs a local migration of `src` to `dst` over a socket in `dir`.
fn migrate(
    src: &Vm,
    dst: &Vm,
    dir: &Path,
) -> (
    Result<livemig::engine::local::LocalSent, MigrateError>,
    Result<livemig::engine::local::LocalReceived, MigrateError>,
) {
    let uri = Uri::Unix(dir.join("local.sock"));
    let listener = LocalListener::bind(&uri).unwrap();
    let handle = MigrationHandle::new(Params {
        mode: MigrationMode::Local,
        ..Params::default()
    });
    thread::scope(|s| {
        let d = s.spawn(|| {
            let sock = listener.accept(IO_TIMEOUT).unwrap();
            receive_local(dst, &sock)
        });
        let sock = connect(&uri, IO_TIMEOUT).unwrap();
        let sent = migrate_out_local(src, &handle, &sock);
        (sent, d.join().unwrap())
    })
}

#[test]
fn local_migration_hands_memory_over() {
    if !common::kvm_available("local_migration_hands_memory_over") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(true);
    let dst = destination(2, MEM_MIB);
    let before = src.guest_status();
    let (sent, received) = migrate(&src, &dst, dir.path());
    let sent = sent.unwrap();
    let received = received.unwrap();
    assert_eq!(sent.stats.status, Status::Completed);
    assert!(src.is_paused(), "the source stays paused for good");
    assert_eq!(received.memory, MEM_MIB << 20);
    assert_eq!(received.blocks, 1);
    // Layout, vCPU/device state and the handshake: far below 1 MiB.
    assert!(
        sent.bytes_out + sent.bytes_in < 1 << 20,
        "{} + {} bytes through the socket",
        sent.bytes_out,
        sent.bytes_in
    );
    assert_eq!(sent.bytes_out, received.socket_bytes);
    // The guest goes on where it was, with every page it wrote.
    let at = dst.guest_status();
    assert!(at.pages_written() >= before.pages_written(), "{at:?}");
    assert_runs(&dst, "after a local migration");
    // One memory, two mappings: the paused source sees the destination's
    // writes.
    let (a, b) = (
        src.guest_status().pages_written(),
        dst.guest_status().pages_written(),
    );
    assert_eq!(
        a, b,
        "the source's view of the guest's counters is the destination's"
    );
    // The destination can hand the same memory on again.
    let next = destination(2, MEM_MIB);
    let (sent, received) = migrate(&dst, &next, dir.path());
    sent.unwrap();
    received.unwrap();
    assert!(dst.is_paused());
    assert_runs(&next, "after a second local migration");
}

#[test]
fn a_destination_failing_before_go_leaves_the_guest_on_the_source() {
    if !common::kvm_available("a_destination_failing_before_go_leaves_the_guest_on_the_source") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(true);

    // Another memory size: refused before anything is mapped.
    let dst = destination(2, MEM_MIB * 2);
    let (sent, received) = migrate(&src, &dst, dir.path());
    let e = sent.unwrap_err();
    assert!(
        matches!(e, MigrateError::Migration(MigrationError::Destination(_))),
        "{e}"
    );
    assert!(e.to_string().contains("memory layout"), "{e}");
    assert!(received.is_err());
    assert_runs(&src, "after a refused layout");
    assert_eq!(dst.guest_status().heartbeats(), 0, "never ran");

    // Same memory, another vCPU count: the memory is mapped, then the
    // state does not restore; the destination gives the memory back.
    let dst = destination(3, MEM_MIB);
    let (sent, received) = migrate(&src, &dst, dir.path());
    let e = sent.unwrap_err().to_string();
    assert!(e.contains("state is for 2 vCPUs"), "{e}");
    let r = received.unwrap_err().to_string();
    assert!(r.contains("taking over the guest"), "{r}");
    assert_runs(&src, "after a destination that could not restore");
    assert!(dst.is_paused() && dst.guest_status().heartbeats() == 0);
    // The destination's memory is its own again: the source guest's pages
    // are not there.
    let (a, b) = (
        src.guest_status().pages_written(),
        dst.guest_status().pages_written(),
    );
    assert!(a > 0 && b == 0, "source {a}, destination {b}");

    // And the guest can still leave for a good destination.
    let good = destination(2, MEM_MIB);
    let (sent, received) = migrate(&src, &good, dir.path());
    sent.unwrap();
    received.unwrap();
    assert_runs(&good, "after the failed attempts");
}

#[test]
fn anonymous_memory_is_refused_and_the_guest_runs_on() {
    if !common::kvm_available("anonymous_memory_is_refused_and_the_guest_runs_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(false);
    let dst = destination(2, MEM_MIB);
    let uri = Uri::Unix(dir.path().join("local.sock"));
    let _listener = LocalListener::bind(&uri).unwrap();
    let sock = connect(&uri, IO_TIMEOUT).unwrap();
    let h = MigrationHandle::new(Params::default());
    let e = migrate_out_local(&src, &h, &sock).unwrap_err().to_string();
    assert!(e.contains("memfd"), "{e}");
    assert_runs(&src, "after the refusal");
    drop(dst);
}

/// Runs `cmd` with `args` (a JSON object as text), which must succeed.
#[test]
fn two_minivm_processes_in_local_mode() {
    if !common::kvm_available("two_minivm_processes_in_local_mode") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ss, ds) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let mem = format!("{MEM_MIB}M");
    let src = source_minivm(&mem, "32M", &["--memfd"], &ss);
    let dst = incoming_minivm(&mem, "2", "2", &ds);
    let mut sc = connect_when_up(&ss);
    let mut dc = connect_when_up(&ds);
    let local = r#"{"mode": "local"}"#;
    ok(&mut dc, "migrate-set-parameters", local);
    ok(&mut sc, "migrate-set-parameters", local);
    let p = sc
        .raw(b"{\"execute\":\"query-migrate-parameters\"}\n")
        .unwrap();
    assert_eq!(p["return"]["mode"].as_str(), Some("local"), "{p}");
    let uri = format!("{{\"uri\":\"{mig}\"}}");
    ok(&mut dc, "migrate-incoming", &uri);
    // Let the source guest run a moment first.
    thread::sleep(Duration::from_millis(500));
    ok(&mut sc, "migrate", &uri);
    let t0 = Instant::now();
    let q = loop {
        let v = sc.raw(b"{\"execute\":\"query-migrate\"}\n").unwrap();
        let st = v["return"]["status"].as_str().unwrap_or("").to_string();
        if ["completed", "failed", "cancelled"].contains(&st.as_str()) {
            break v["return"].clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{v}");
        thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(q["status"].as_str(), Some("completed"), "{q}");
    let transferred = q["ram"]["transferred"].as_u64().unwrap();
    assert!(
        transferred < 1 << 20,
        "{transferred} bytes through the socket"
    );
    assert_eq!(
        q["dirty-tracker"].as_str(),
        Some(livemig::engine::local::TRACKER_NAME),
        "{q}"
    );
    let src_log = finish(src, "source minivm");
    assert!(src_log.contains("migration completed"), "{src_log}");
    let dst_log = finish(dst, "destination minivm");
    assert!(dst_log.contains("guest resumed"), "{dst_log}");
    assert!(dst_log.contains("self_check=pass"), "{dst_log}");
    assert!(!dst_log.contains("FAIL"), "{dst_log}");
}
