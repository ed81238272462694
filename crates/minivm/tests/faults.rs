//! Fault injection on whole-VM migrations over TCP: a proxy cuts the
//! connection during setup, mid-iteration, before the destination's
//! LOADED reaches the source, right after LOADED and right after GO; the
//! snapshot disk fills up. In every case exactly one side keeps the guest:
//! the source runs on (or, after GO, stays paused and says why), a
//! destination that never got GO never runs it, and a retry succeeds.

mod common;

use std::io::Read;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use livemig::engine::{MigrationError, MigrationHandle, Params, Status};
use livemig::testkit::fault_proxy::{Fault, FaultProxy};
use livemig::testkit::workload::XorShift;
use livemig::transport::{connect, Listener, Uri};
use minivm::migrate::{migrate_in, migrate_out, MigrateError};
use minivm::{GuestImage, TestGuestConfig, TrackerKind, Vm, VmConfig};

/// Pages each vCPU writes: 16 MiB of the 64 MiB are the guest's.
const PAGES: u64 = 4096;

fn config() -> VmConfig {
    VmConfig {
        mem_size: 64 << 20,
        vcpus: 1,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: PAGES,
            rate_bytes_per_sec: 32 << 20,
        }),
        prefault: true,
        ..VmConfig::default()
    }
}

/// The source VM, once its guest has written its whole working set.
fn source() -> Vm {
    let vm = Vm::new(config()).unwrap();
    let s = common::wait_for(&vm, Duration::from_secs(20), |s| {
        s.pages_written() >= PAGES && s.heartbeats() > 0
    });
    assert!(s.ok() && s.pages_written() >= PAGES, "source guest: {s:?}");
    vm
}

/// A destination VM in a thread: accepts one migration and runs the
/// handshake. `Ok` = it got GO and owns the (paused) guest.
fn destination() -> (Uri, JoinHandle<Result<Vm, String>>) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = listener.local_uri();
    let t = thread::spawn(move || {
        let inc = listener
            .accept_with_timeout(Duration::from_secs(20))
            .map_err(|e| e.to_string())?;
        migrate_in(&config(), inc.reader, inc.ack)
            .map(|(vm, _)| vm)
            .map_err(|e| livemig::error_chain(&e))
    });
    (uri, t)
}

fn migrate(src: &Vm, uri: &Uri) -> Result<Status, MigrateError> {
    let out = connect(uri).unwrap();
    let mut ack = out.ack;
    let handle = MigrationHandle::new(Params {
        verify: true,
        ..Params::default()
    });
    migrate_out(
        src,
        TrackerKind::Auto,
        handle,
        out.writer,
        ack.as_deref_mut().map(|r| r as &mut dyn Read),
    )
    .map(|s| s.status)
}

/// The guest runs on `vm`: not paused, heartbeats and writes advance, no
/// self-check failure.
fn assert_runs(vm: &Vm, what: &str) {
    assert!(!vm.is_paused(), "{what}: the VM is paused");
    let a = vm.guest_status();
    let b = common::wait_for(vm, Duration::from_secs(20), |s| {
        s.heartbeats() > a.heartbeats() + 2 && s.pages_written() > a.pages_written()
    });
    assert!(
        b.heartbeats() > a.heartbeats() + 2 && b.pages_written() > a.pages_written(),
        "{what}: the guest makes no progress: {a:?} -> {b:?}"
    );
    assert_eq!(b.failures(), 0, "{what}: self-check failures: {b:?}");
    assert!(b.ok(), "{what}: {b:?}");
}

/// A paused guest does not move at all.
fn assert_frozen(vm: &Vm, what: &str) {
    assert!(vm.is_paused(), "{what}: the VM is not paused");
    let a = vm.guest_status();
    thread::sleep(Duration::from_millis(200));
    let b = vm.guest_status();
    assert_eq!(
        (a.heartbeats(), a.pages_written()),
        (b.heartbeats(), b.pages_written()),
        "{what}: a paused guest ran"
    );
}

/// The same migration again, without faults: it completes and the guest
/// runs on the new destination with its self-check passing.
fn retry_succeeds(src: &Vm) {
    let (uri, dest) = destination();
    assert_eq!(migrate(src, &uri).expect("retry"), Status::Completed);
    let dst = dest.join().unwrap().expect("retry destination");
    assert!(src.is_paused(), "the source stays paused after completing");
    dst.resume();
    assert_runs(&dst, "retry destination");
}

/// Migrates `src` to a new destination through a proxy with `fault`:
/// the source's result, the destination's thread and the proxy.
fn migrate_through(
    src: &Vm,
    fault: Fault,
) -> (
    Result<Status, MigrateError>,
    JoinHandle<Result<Vm, String>>,
    FaultProxy,
) {
    let (uri, dest) = destination();
    let up = match &uri {
        Uri::Tcp(a) => a.parse().unwrap(),
        _ => unreachable!(),
    };
    let proxy = FaultProxy::start(up, fault).unwrap();
    let r = migrate(src, &proxy.uri().parse().unwrap());
    (r, dest, proxy)
}

/// A cut before GO: the source resumes, the destination never runs.
fn cut_before_go(fault: Fault, dest_says: &[&str]) {
    let src = source();
    let (r, dest, proxy) = migrate_through(&src, fault);
    let e = r.expect_err("the cut fails it");
    assert!(proxy.has_cut(), "{fault:?} fired");
    let text = e.to_string();
    assert!(
        !matches!(e, MigrateError::Migration(MigrationError::Unconfirmed(_))),
        "{fault:?}: no GO went out, so the source must not wait: {text}"
    );
    let derr = dest.join().unwrap().expect_err("the destination fails");
    assert!(
        dest_says.iter().any(|s| derr.contains(s)),
        "{fault:?}: destination error: {derr}"
    );
    assert_runs(&src, "source after the failure");
    drop(proxy);
    retry_succeeds(&src);
}

fn seeded(seed: u64, lo: u64, hi: u64) -> u64 {
    lo + XorShift::new(seed).next_u64() % (hi - lo)
}

#[test]
fn cut_during_setup() {
    if !common::kvm_available("cut_during_setup") {
        return;
    }
    for seed in [1, 2] {
        let at = seeded(seed, 0, 4096);
        cut_before_go(Fault::CutForwardAt(at), &["stream byte", "stream ends"]);
    }
}

#[test]
fn cut_mid_iteration() {
    if !common::kvm_available("cut_mid_iteration") {
        return;
    }
    // The stream carries at least the 16 MiB the guest wrote.
    for seed in [3, 4] {
        let at = seeded(seed, 1 << 20, 12 << 20);
        cut_before_go(Fault::CutForwardAt(at), &["stream byte", "stream ends"]);
    }
}

#[test]
fn cut_before_loaded_reaches_the_source() {
    if !common::kvm_available("cut_before_loaded_reaches_the_source") {
        return;
    }
    cut_before_go(Fault::CutBeforeReply, &["no GO from the source"]);
}

#[test]
fn cut_right_after_loaded() {
    if !common::kvm_available("cut_right_after_loaded") {
        return;
    }
    let src = source();
    let (r, dest, proxy) = migrate_through(&src, Fault::CutAfterLoaded);
    let e = r.expect_err("no STARTED");
    let text = e.to_string();
    assert!(
        matches!(e, MigrateError::Migration(MigrationError::Unconfirmed(_))),
        "{text}"
    );
    assert!(text.contains("GO sent"), "{text}");
    assert!(text.contains("source guest stays paused"), "{text}");
    assert!(text.contains("resume it here only if"), "{text}");
    // GO never arrived: the destination discarded the VM.
    let derr = dest.join().unwrap().expect_err("no GO at the destination");
    assert!(derr.contains("no GO from the source"), "{derr}");
    assert!(derr.contains("never runs"), "{derr}");
    // Nobody runs the guest; the operator, knowing the destination is
    // gone, resumes the source. Its memory is intact.
    assert_frozen(&src, "source without STARTED");
    src.resume();
    assert_runs(&src, "source resumed by the operator");
    drop(proxy);
    retry_succeeds(&src);
}

#[test]
fn cut_right_after_go() {
    if !common::kvm_available("cut_right_after_go") {
        return;
    }
    let src = source();
    let (r, dest, _proxy) = migrate_through(&src, Fault::CutAfterGo);
    let e = r.expect_err("no STARTED");
    assert!(
        matches!(e, MigrateError::Migration(MigrationError::Unconfirmed(_))),
        "{e}"
    );
    // The destination got GO: the guest is its, and it runs there only.
    let dst = dest.join().unwrap().expect("GO reached the destination");
    dst.resume();
    assert_runs(&dst, "destination after GO");
    assert_frozen(&src, "source after GO");
}

#[test]
fn snapshot_to_a_full_disk_keeps_the_guest_running() {
    let name = "snapshot_to_a_full_disk_keeps_the_guest_running";
    if !common::kvm_available(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16M", "tmpfs"])
        .arg(dir.path())
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED {name}: mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED {name}: cannot run mount: {e}");
            return;
        }
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let path = dir.path().join("vm.snap");
    let src = source();
    let e = migrate(&src, &Uri::File(path.clone())).expect_err("16 MiB cannot hold the VM");
    let text = livemig::error_chain(&e);
    assert!(text.contains("No space left on device"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert_runs(&src, "source after the full disk");
    std::fs::remove_file(&path).unwrap();
    retry_succeeds(&src);
}

/// Sends one request line; the answer's "return" as text, or its error.
fn exec(c: &mut livemig::control::ControlClient, line: &str) -> Result<String, String> {
    let v = c.raw(format!("{line}\n").as_bytes()).unwrap();
    match v.get("error") {
        Some(e) => Err(e["desc"].as_str().unwrap_or("?").to_string()),
        None => Ok(v["return"].to_string()),
    }
}

#[test]
fn unconfirmed_source_stays_paused_until_cont() {
    use livemig::control::ControlClient;
    use minivm::control::{ControlledVm, Phase};
    if !common::kvm_available("unconfirmed_source_stays_paused_until_cont") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = ControlledVm::new(source(), TrackerKind::Auto);
    let sock = dir.path().join("src.sock");
    let _server = vm.serve(&sock, Params::default()).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    // `cont` of a running guest does nothing (as in QEMU).
    assert_eq!(exec(&mut c, r#"{"execute":"cont"}"#).unwrap(), "{}");

    let (uri, dest) = destination();
    let up = match &uri {
        Uri::Tcp(a) => a.parse().unwrap(),
        _ => unreachable!(),
    };
    let proxy = FaultProxy::start(up, Fault::CutAfterLoaded).unwrap();
    let line = format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"{}"}}}}"#,
        proxy.uri()
    );
    exec(&mut c, &line).unwrap();
    let phase = vm
        .wait_for(
            |p| matches!(p, Phase::Unconfirmed(_)),
            Duration::from_secs(60),
        )
        .expect("the migration ends unconfirmed");
    let Phase::Unconfirmed(why) = phase else {
        unreachable!()
    };
    assert!(why.contains("stays paused"), "{why}");
    assert!(
        dest.join().unwrap().is_err(),
        "no GO: the destination discards"
    );
    assert_frozen(vm.vm(), "unconfirmed source");
    let status = exec(&mut c, r#"{"execute":"query-migrate"}"#).unwrap();
    assert!(status.contains(r#""status":"failed""#), "{status}");
    // A new migration is refused until the operator decides.
    let e = exec(&mut c, &line).unwrap_err();
    assert!(e.contains("send 'cont' first"), "{e}");
    exec(&mut c, r#"{"execute":"cont"}"#).unwrap();
    assert_eq!(vm.phase(), Phase::Running);
    assert_runs(vm.vm(), "source after cont");
    drop(proxy);
    retry_succeeds(vm.vm());
}
