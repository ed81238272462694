//! Real KVM guests migrated and cancelled through livemig's control socket
//! (`minivm::control::ControlledVm`), in one process and between two
//! `minivm run --control` processes.

mod common;

use common::{
    connect_when_up, ended, exec, finish, incoming_minivm, minivm, ok, source_minivm, Proc,
};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use livemig::control::{ControlClient, ControlServer};
use livemig::engine::{Params, Status};
use livemig::transport::{Listener, Uri};
use minivm::control::{ControlledVm, Phase};
use minivm::migrate::migrate_in;
use minivm::{GuestImage, TrackerKind, Vm, VmConfig};

// minivm has no serde_json: requests are written as text and answers read
// through the client's parsed value without naming its type.

/// The tests count this process's file descriptors: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MEM_MIB: u64 = 128;

fn source_config() -> VmConfig {
    VmConfig {
        prefault: true,
        // 8 MiB working set per vCPU, 32 MiB/s of writes.
        ..common::test_guest(MEM_MIB, 2, 2048, 32 << 20)
    }
}

fn dest_config() -> VmConfig {
    VmConfig {
        mem_size: MEM_MIB << 20,
        vcpus: 2,
        guest: GuestImage::Incoming,
        start_paused: true,
        ..VmConfig::default()
    }
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn uri_arg(uri: &str) -> String {
    format!("{{\"uri\":\"{uri}\"}}")
}

/// What the tests read of query-migrate.
#[derive(Debug)]
struct Q {
    status: String,
    transferred: u64,
    rounds: u64,
    setup_time: u64,
    error: String,
}

fn query(c: &mut ControlClient) -> Q {
    let v = c.raw(b"{\"execute\":\"query-migrate\"}\n").unwrap();
    let r = &v["return"];
    Q {
        status: r["status"].as_str().unwrap_or("").to_string(),
        transferred: r["ram"]["transferred"].as_u64().unwrap_or(0),
        rounds: r["ram"]["rounds"].as_u64().unwrap_or(0),
        setup_time: r["setup-time"].as_u64().unwrap_or(0),
        error: r["error-desc"].as_str().unwrap_or("").to_string(),
    }
}

/// (max-bandwidth, downtime-limit) from query-migrate-parameters.
fn params(c: &mut ControlClient) -> (u64, u64) {
    let v = c
        .raw(b"{\"execute\":\"query-migrate-parameters\"}\n")
        .unwrap();
    let r = &v["return"];
    (
        r["max-bandwidth"].as_u64().unwrap(),
        r["downtime-limit"].as_u64().unwrap(),
    )
}

fn wait_status(c: &mut ControlClient, want: &[&str], timeout: Duration) -> Q {
    common::poll_until(
        &format!("status not in {want:?}"),
        timeout,
        || query(c),
        |s| want.contains(&s.status.as_str()),
    )
}

/// The guest runs: not paused, no throttle, heartbeats and writes advance,
/// self-check passes.
fn assert_guest_runs(vm: &Vm, when: &str) {
    assert!(!vm.is_paused(), "{when}: the guest is not paused");
    assert_eq!(vm.throttle(), 0, "{when}: no throttle left");
    let before = vm.guest_status();
    thread::sleep(Duration::from_millis(300));
    let after = vm.guest_status();
    assert!(
        after.heartbeats() > before.heartbeats() && after.pages_written() > before.pages_written(),
        "{when}: the guest makes progress: {before:?} -> {after:?}"
    );
    assert!(after.ok(), "{when}: self-check passes: {after:?}");
}

/// A destination that reads and discards the stream and never
/// acknowledges its end (it answers the setup and the drain marks, as a
/// destination that applies pages does); returns the bytes it read once
/// the source hangs up.
fn sink(uri: &Uri) -> JoinHandle<u64> {
    let listener = Listener::bind(uri).unwrap();
    thread::spawn(move || {
        let inc = match listener.accept() {
            Ok(inc) => inc,
            // Cancelled before the source sent anything.
            Err(livemig::transport::TransportError::EmptyConnection { .. }) => return 0,
            Err(e) => panic!("sink: {e}"),
        };
        drop(listener);
        swallow(inc)
    })
}

/// Reads the stream record by record, answering the setup verdict the
/// source waits for before any page (ACCEPTED) and each drain mark it
/// waits for before it pauses (APPLIED), never LOADED; returns the bytes
/// read once the source leaves.
fn swallow(mut inc: livemig::transport::Incoming) -> u64 {
    let ack = inc
        .ack
        .as_mut()
        .map(|a| &mut **a as &mut dyn std::io::Write);
    livemig::testkit::sink::swallow(&mut inc.reader, ack)
}

/// A real destination VM in a thread: loads, acknowledges, runs the guest
/// 500 ms and returns whether its self-check passed with progress.
fn destination(uri: &Uri) -> JoinHandle<Result<(), String>> {
    let listener = Listener::bind(uri).unwrap();
    thread::spawn(move || {
        let inc = listener.accept().map_err(|e| e.to_string())?;
        drop(listener);
        let (vm, _) = migrate_in(&dest_config(), inc.reader, inc.ack).map_err(|e| e.to_string())?;
        let before = vm.guest_status();
        vm.resume();
        thread::sleep(Duration::from_millis(500));
        let after = vm.guest_status();
        if !after.ok() || after.pages_written() <= before.pages_written() {
            return Err(format!("destination guest: {before:?} -> {after:?}"));
        }
        Ok(())
    })
}

struct Source {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    vm: ControlledVm,
    server: ControlServer,
    client: ControlClient,
}

fn source(name: &str) -> Option<Source> {
    if !common::kvm_available(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = ControlledVm::new(Vm::new(source_config()).unwrap(), TrackerKind::Auto);
    let sock = dir.path().join("src.sock");
    let server = vm.serve(&sock, Params::default()).unwrap();
    let client = ControlClient::connect(&sock).unwrap();
    common::wait_for(vm.vm(), Duration::from_secs(5), |s| s.heartbeats() > 0);
    Some(Source {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        vm,
        server,
        client,
    })
}

#[test]
fn migrate_and_steer_through_the_socket() {
    let _g = serial();
    let Some(mut src) = source("migrate_and_steer_through_the_socket") else {
        return;
    };
    // The destination: an empty VM with its own control socket.
    let dst = ControlledVm::new(Vm::new(dest_config()).unwrap(), TrackerKind::Auto);
    assert_eq!(dst.phase(), Phase::AwaitingIncoming);
    let dst_sock = src.dir.join("dst.sock");
    let dst_server = dst.serve(&dst_sock, Params::default()).unwrap();
    let mut dc = ControlClient::connect(&dst_sock).unwrap();
    let mig = format!("unix:{}", src.dir.join("mig.sock").display());
    ok(&mut dc, "migrate-incoming", &uri_arg(&mig));
    assert!(
        matches!(dst.phase(), Phase::Incoming(_)),
        "{:?}",
        dst.phase()
    );
    let err = exec(&mut dc, "migrate-incoming", &uri_arg(&mig)).unwrap_err();
    assert!(err.contains("migration process in progress"), "{err}");
    let err = exec(&mut dc, "migrate", &uri_arg(&mig)).unwrap_err();
    assert!(err.contains("migration process in progress"), "{err}");
    assert_eq!(query(&mut dc).status, "active", "the destination's status");

    // The source refuses to receive: it runs its own guest.
    let c = &mut src.client;
    let err = exec(c, "migrate-incoming", &uri_arg("unix:/nonexistent/x")).unwrap_err();
    assert!(err.contains("runs its own guest"), "{err}");

    // Slow at first: 2 MiB/s.
    ok(c, "migrate-set-parameters", r#"{"max-bandwidth": 2097152}"#);
    ok(
        c,
        "migrate-set-capabilities",
        r#"{"capabilities": [{"capability": "x-livemig-verify", "state": true}]}"#,
    );
    ok(c, "migrate", &uri_arg(&mig));
    wait_status(c, &["active"], Duration::from_secs(10));
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(1000));
    let s = query(c);
    let slow_bytes = s.transferred;
    let secs = t0.elapsed().as_secs_f64() + s.setup_time as f64 / 1e3;
    assert_eq!(s.status, "active", "still going at 2 MiB/s: {s:?}");
    // Zero pages cost a few bytes each: allow for them and a burst.
    assert!(
        (slow_bytes as f64) < (2u64 << 20) as f64 * (secs + 1.0) + (4u64 << 20) as f64,
        "the rate limit holds: {slow_bytes} bytes in {secs:.1} s"
    );
    // Steer: another downtime limit, then no bandwidth limit.
    ok(c, "migrate-set-parameters", r#"{"downtime-limit": 700}"#);
    let running = src.server.current().unwrap();
    assert_eq!(running.params().downtime_limit, 700);
    assert_eq!(running.params().max_bandwidth, 2 << 20);
    ok(c, "migrate-set-parameters", r#"{"max-bandwidth": 0}"#);
    assert_eq!(running.params().max_bandwidth, 0);
    assert_eq!(params(c), (0, 700));
    let t1 = Instant::now();
    let s = wait_status(
        c,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(30),
    );
    assert_eq!(s.status, "completed", "{s:?}");
    eprintln!(
        "2 MiB/s for 1 s: {slow_bytes} bytes; unlimited: the rest ({} bytes) in {:?}",
        s.transferred - slow_bytes,
        t1.elapsed()
    );
    assert!(
        t1.elapsed() < Duration::from_secs(10),
        "lifting the limit took effect"
    );
    assert_eq!(running.stats().status, Status::Completed);
    // The source stays paused: the guest lives on at the destination.
    assert_eq!(
        src.vm.wait_idle(Duration::from_secs(5)),
        Some(Phase::MigratedAway)
    );
    assert!(src.vm.vm().is_paused());
    let err = exec(c, "migrate", &uri_arg(&mig)).unwrap_err();
    assert!(err.contains("migrated away"), "{err}");

    // The destination runs the guest; its self-check passes.
    assert_eq!(dst.wait_idle(Duration::from_secs(10)), Some(Phase::Running));
    let report = dst.incoming_report().unwrap();
    assert!(report.verified, "the digest was checked");
    assert_guest_runs(dst.vm(), "destination");
    // And it can move on, to a fresh VM.
    let back = format!("unix:{}", src.dir.join("back.sock").display());
    let d2 = destination(&back.parse().unwrap());
    ok(&mut dc, "migrate", &uri_arg(&back));
    let s = wait_status(
        &mut dc,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(30),
    );
    assert_eq!(s.status, "completed", "{s:?}");
    d2.join().unwrap().unwrap();
    drop(dst_server);
}

#[test]
fn cancel_at_setup_mid_round_and_completion() {
    let _g = serial();
    let Some(mut src) = source("cancel_at_setup_mid_round_and_completion") else {
        return;
    };
    let baseline = fds();
    let dir = src.dir.clone();
    let check_released = |what: &str| {
        let t0 = Instant::now();
        // At most the baseline: a descriptor an earlier test's lagging
        // thread held at baseline time may close meanwhile.
        while fds() > baseline && t0.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(20));
        }
        let now = fds();
        assert!(
            now <= baseline,
            "{what}: {now} file descriptors open, {baseline} before the migration"
        );
    };
    let finals = ["cancelled", "failed", "completed"];

    // 1. At setup: migrate and cancel in one write, so the cancel lands
    //    before the migration thread got going.
    let uri = format!("unix:{}", dir.join("m1.sock").display());
    let s1 = sink(&uri.parse().unwrap());
    let c = &mut src.client;
    ok(c, "migrate-set-parameters", r#"{"max-bandwidth": 1048576}"#);
    let both = format!(
        "{{\"execute\":\"migrate\",\"arguments\":{}}}\n{{\"execute\":\"migrate-cancel\"}}\n",
        uri_arg(&uri)
    );
    let a1 = c.raw(both.as_bytes()).unwrap();
    assert!(a1.get("return").is_some(), "{a1}");
    let a2 = c.raw(b"").unwrap();
    assert!(a2.get("return").is_some(), "{a2}");
    let s = wait_status(c, &finals, Duration::from_secs(10));
    assert_eq!(s.status, "cancelled", "{s:?}");
    assert_eq!(s.rounds, 0, "cancelled before a first round: {s:?}");
    eprintln!("setup cancel: {s:?}");
    assert_eq!(
        src.vm.wait_idle(Duration::from_secs(5)),
        Some(Phase::Running)
    );
    assert_guest_runs(src.vm.vm(), "after cancel at setup");
    s1.join().unwrap();
    check_released("cancel at setup");

    // 2. Mid-round: 2 MiB/s, cancel once a few MiB went.
    let uri = format!("unix:{}", dir.join("m2.sock").display());
    let s2 = sink(&uri.parse().unwrap());
    ok(c, "migrate-set-parameters", r#"{"max-bandwidth": 2097152}"#);
    ok(c, "migrate", &uri_arg(&uri));
    let t0 = Instant::now();
    loop {
        let s = wait_status(c, &["active"], Duration::from_secs(10));
        if s.transferred > 2 << 20 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{s:?}");
        thread::sleep(Duration::from_millis(50));
    }
    let t_cancel = Instant::now();
    ok(c, "migrate-cancel", "");
    let s = wait_status(c, &finals, Duration::from_secs(5));
    assert_eq!(s.status, "cancelled", "{s:?}");
    eprintln!(
        "mid-round cancel: took effect in {:?}: {s:?}",
        t_cancel.elapsed()
    );
    assert_eq!(
        src.vm.wait_idle(Duration::from_secs(5)),
        Some(Phase::Running)
    );
    assert_guest_runs(src.vm.vm(), "after cancel mid-round");
    let got = s2.join().unwrap();
    assert!(
        got > 2 << 20,
        "the sink got the stream so far ({got} bytes)"
    );
    check_released("cancel mid-round");

    // 3. During completion: the destination takes the whole stream but
    //    never acknowledges; the source sits in "device" (guest paused)
    //    until the cancel.
    let uri = format!("unix:{}", dir.join("m3.sock").display());
    let s3 = sink(&uri.parse().unwrap());
    ok(c, "migrate-set-parameters", r#"{"max-bandwidth": 0}"#);
    ok(c, "migrate", &uri_arg(&uri));
    let s = wait_status(
        c,
        &["device", "completed", "failed", "cancelled"],
        Duration::from_secs(30),
    );
    assert_eq!(s.status, "device", "{s:?}");
    thread::sleep(Duration::from_millis(300));
    let s = query(c);
    assert_eq!(s.status, "device", "waiting for the acknowledgement: {s:?}");
    assert!(src.vm.vm().is_paused(), "paused for the switch-over");
    let t_cancel = Instant::now();
    ok(c, "migrate-cancel", "");
    let s = wait_status(c, &finals, Duration::from_secs(5));
    let took = t_cancel.elapsed();
    // The cancel-aware socket ends the wait for the acknowledgement; the
    // engine reports that as the cancel it is.
    assert_eq!(s.status, "cancelled", "{s:?}");
    assert_eq!(s.error, "migration cancelled", "{s:?}");
    assert!(took < Duration::from_secs(2), "cancel took {took:?}");
    eprintln!("completion cancel in {took:?}: {s:?}");
    assert_eq!(
        src.vm.wait_idle(Duration::from_secs(5)),
        Some(Phase::Running)
    );
    assert_guest_runs(src.vm.vm(), "after cancel during completion");
    s3.join().unwrap();
    check_released("cancel during completion");

    // 4. Tracking stopped and all released: a new migration right away
    //    completes into a real destination.
    let uri = format!("unix:{}", dir.join("m4.sock").display());
    let d = destination(&uri.parse().unwrap());
    ok(c, "migrate", &uri_arg(&uri));
    let s = wait_status(c, &finals, Duration::from_secs(30));
    assert_eq!(s.status, "completed", "{s:?}");
    d.join().unwrap().unwrap();
    assert_eq!(
        src.vm.wait_idle(Duration::from_secs(5)),
        Some(Phase::MigratedAway)
    );
}

#[test]
fn two_minivm_processes() {
    let _g = serial();
    if !common::kvm_available("two_minivm_processes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ss, ds) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let mem = format!("{MEM_MIB}M");
    let src = source_minivm(&mem, "32M", &["--prefault"], &ss);
    let dst = incoming_minivm(&mem, "2", "2", &ds);
    let mut sc = connect_when_up(&ss);
    let mut dc = connect_when_up(&ds);
    ok(&mut dc, "migrate-incoming", &uri_arg(&mig));
    ok(
        &mut sc,
        "migrate-set-parameters",
        r#"{"max-bandwidth": 4194304}"#,
    );
    ok(&mut sc, "migrate", &uri_arg(&mig));
    wait_status(&mut sc, &["active"], Duration::from_secs(10));
    ok(
        &mut sc,
        "migrate-set-parameters",
        r#"{"max-bandwidth": 0, "downtime-limit": 500}"#,
    );
    assert_eq!(params(&mut sc), (0, 500));
    let s = wait_status(
        &mut sc,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(30),
    );
    assert_eq!(s.status, "completed", "{s:?}");
    let src_log = finish(src, "source minivm");
    assert!(src_log.contains("migration completed"), "{src_log}");
    let dst_log = finish(dst, "destination minivm");
    assert!(dst_log.contains("guest resumed"), "{dst_log}");
    assert!(dst_log.contains("self_check=pass"), "{dst_log}");
}

#[test]
fn migrate_with_page_channels_between_controlled_vms() {
    let _g = serial();
    let Some(mut src) = source("migrate_with_page_channels_between_controlled_vms") else {
        return;
    };
    let dst = ControlledVm::new(Vm::new(dest_config()).unwrap(), TrackerKind::Auto);
    let dsock = src.dir.join("dst.sock");
    let _dserver = dst.serve(&dsock, Params::default()).unwrap();
    let mut dc = ControlClient::connect(&dsock).unwrap();
    ok(&mut dc, "migrate-incoming", &uri_arg("tcp:127.0.0.1:0"));
    let Phase::Incoming(uri) = dst.phase() else {
        panic!("destination not waiting: {:?}", dst.phase());
    };
    // Before channels were wired into the control socket's VM migrations,
    // this failed with "this transport has one stream".
    ok(
        &mut src.client,
        "migrate-set-parameters",
        "{\"multifd-channels\":2}",
    );
    ok(
        &mut src.client,
        "migrate-set-capabilities",
        "{\"capabilities\":[{\"capability\":\"x-livemig-verify\",\"state\":true},\
         {\"capability\":\"multifd\",\"state\":true}]}",
    );
    ok(&mut src.client, "migrate", &uri_arg(&uri));
    let q = wait_status(
        &mut src.client,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(60),
    );
    assert_eq!(q.status, "completed", "{q:?}");
    assert_eq!(
        dst.wait_for(|p| *p == Phase::Running, Duration::from_secs(10)),
        Some(Phase::Running)
    );
    let report = dst.incoming_report().expect("incoming report");
    assert!(report.verified, "the destination checked the memory digest");
    assert_guest_runs(dst.vm(), "destination after a 2-channel migration");
}

#[test]
fn stop_cont_and_query_status() {
    let _g = serial();
    if !common::kvm_available("stop_cont_and_query_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = ControlledVm::new(Vm::new(source_config()).unwrap(), TrackerKind::Auto);
    let sock = dir.path().join("ctl.sock");
    let _server = vm.serve(&sock, Params::default()).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    let status = |c: &mut ControlClient| exec(c, "query-status", "").unwrap();
    assert_eq!(status(&mut c), r#"{"running":true,"status":"running"}"#);
    ok(&mut c, "stop", "");
    assert!(vm.vm().is_paused());
    assert_eq!(status(&mut c), r#"{"running":false,"status":"paused"}"#);
    // A stopped guest is not migrated (livemig differs from QEMU here).
    let err = exec(&mut c, "migrate", &uri_arg("unix:/nonexistent/x")).unwrap_err();
    assert!(err.contains("send 'cont'"), "{err}");
    let e = c.next_event(Duration::from_secs(5)).unwrap().expect("STOP");
    assert_eq!(e["event"].as_str(), Some("STOP"), "{e}");
    ok(&mut c, "cont", "");
    let e = c
        .next_event(Duration::from_secs(5))
        .unwrap()
        .expect("RESUME");
    assert_eq!(e["event"].as_str(), Some("RESUME"), "{e}");
    assert!(!vm.vm().is_paused());
    assert_eq!(status(&mut c), r#"{"running":true,"status":"running"}"#);

    // An incoming VM: inmigrate; it cannot be started by hand.
    let dst = ControlledVm::new(Vm::new(dest_config()).unwrap(), TrackerKind::Auto);
    let dsock = dir.path().join("dst.sock");
    let _ds = dst.serve(&dsock, Params::default()).unwrap();
    let mut dc = ControlClient::connect(&dsock).unwrap();
    assert_eq!(status(&mut dc), r#"{"running":false,"status":"inmigrate"}"#);
    let err = exec(&mut dc, "cont", "").unwrap_err();
    assert!(err.contains("waits for an incoming migration"), "{err}");
}

/// Waits until `path` exists (the process created its socket).
fn wait_exists(path: &Path, p: &mut Proc) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(p.0.try_wait().unwrap().is_none(), "minivm exited early");
        assert!(t0.elapsed() < Duration::from_secs(20), "no {path:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn run_with_control(sock: &Path) -> Proc {
    minivm(&[
        "run",
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--serial",
        "none",
        "--control",
        sock.to_str().unwrap(),
    ])
}

#[test]
fn control_socket_path_is_never_taken_and_removed_on_sigterm() {
    let _g = serial();
    if !common::kvm_available("control_socket_path_is_never_taken_and_removed_on_sigterm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A regular file: refused, left alone.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep").unwrap();
    let (status, err) = ended(run_with_control(&file), "minivm");
    assert!(!status.success());
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

    // A live socket (another VM's): refused, still served.
    let sock = dir.path().join("vm.sock");
    let mut first = run_with_control(&sock);
    wait_exists(&sock, &mut first);
    let (status, err) = ended(run_with_control(&sock), "minivm");
    assert!(!status.success());
    assert!(err.contains("another process is listening"), "{err}");
    connect_when_up(&sock);

    // SIGTERM: the first VM stops and removes its socket.
    let pid = first.0.id() as i32;
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, err) = ended(first, "minivm");
    assert!(!status.success(), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(!sock.exists(), "the socket is removed on SIGTERM");

    // SIGINT likewise; and a stale socket left by a killed VM is reused.
    let mut second = run_with_control(&sock);
    wait_exists(&sock, &mut second);
    second.0.kill().unwrap();
    second.0.wait().unwrap();
    assert!(sock.exists(), "SIGKILL leaves a stale socket");
    let mut third = run_with_control(&sock);
    let t0 = Instant::now();
    while ControlClient::connect(&sock).is_err() {
        assert!(
            third.0.try_wait().unwrap().is_none(),
            "the stale socket was not replaced"
        );
        assert!(t0.elapsed() < Duration::from_secs(20));
        thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &third.0.id().to_string()])
        .status()
        .unwrap();
    let (_, err) = ended(third, "minivm");
    assert!(err.contains("SIGINT"), "{err}");
    assert!(!sock.exists());
}
