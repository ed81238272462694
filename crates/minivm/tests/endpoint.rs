//! Errors reach the side that must act, and TLS on the control socket:
//! a destination of another shape refuses at setup, before any page, and
//! the source's error carries its reason; a source that gives up tells the
//! destination why (ABORT); minivm's control socket migrates over TLS with
//! `tls-creds` / `tls-hostname` on both sides and refuses wrong creds.

mod common;

use common::{exec, ok};

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use livemig::control::ControlClient;
use livemig::engine::{DestinationError, LoadError, MigrationError, MigrationHandle, Params};
use livemig::transport::tls::Pki;
use livemig::transport::{connect, Listener, Uri};
use minivm::control::{ControlledVm, Phase};
use minivm::migrate::{migrate_out, receive_into, MigrateError};
use minivm::{GuestImage, TrackerKind, Vm, VmConfig};

/// KVM guests: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn source_vm(mem_mib: u64, vcpus: usize) -> Vm {
    let vm = Vm::new(VmConfig {
        prefault: true,
        ..common::test_guest(mem_mib, vcpus, 1024, 16 << 20)
    })
    .unwrap();
    common::wait_for(&vm, Duration::from_secs(5), |s| s.heartbeats() > 0);
    vm
}

fn incoming_config(mem_mib: u64, vcpus: usize) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        guest: GuestImage::Incoming,
        start_paused: true,
        ..VmConfig::default()
    }
}

/// Counts the bytes the source hands to the transport.
struct Counting<W>(W, Arc<AtomicU64>);

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn assert_guest_runs(vm: &Vm, when: &str) {
    assert!(!vm.is_paused(), "{when}: the guest is not paused");
    let before = vm.guest_status();
    thread::sleep(Duration::from_millis(300));
    let after = vm.guest_status();
    assert!(
        after.heartbeats() > before.heartbeats() && after.ok(),
        "{when}: the guest runs on: {before:?} -> {after:?}"
    );
}

/// A destination VM laid out as `cfg`, receiving one migration over TCP
/// (no page channels) in a thread that expects it to fail (`why`): its
/// URI, and the thread, which returns the destination's error once it
/// checked that the guest never ran there.
fn failing_destination(cfg: VmConfig, why: &'static str) -> (Uri, JoinHandle<MigrateError>) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = listener.local_uri();
    let dest = thread::spawn(move || {
        let vm = minivm::migrate::incoming_vm(&cfg).unwrap();
        let inc = listener.accept().unwrap();
        let e = receive_into(
            &vm,
            inc.reader,
            inc.ack,
            &mut || Err(io::Error::other("no channels")),
            false,
        )
        .expect_err(why);
        assert!(vm.is_paused(), "the guest never runs here ({e})");
        e
    });
    (uri, dest)
}

/// Migrates a source VM of `mem_mib` MiB and `vcpus` vCPUs into a
/// destination VM laid out as `dst`, which refuses it before any page (the
/// source's error is a refusal, after well under one page: header, block
/// list, setup), then checks that the source guest runs on. Returns the
/// source's error text and the destination's (`None` without KVM).
fn refused(test: &str, mem_mib: u64, vcpus: usize, dst: VmConfig) -> Option<(String, String)> {
    let _g = serial();
    if !common::kvm_available(test) {
        return None;
    }
    let src = source_vm(mem_mib, vcpus);
    let (uri, dest) = failing_destination(dst, "the destination refuses");
    let mut out = connect(&uri).unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let handle = MigrationHandle::new(Params::default());
    let e = migrate_out(
        &src,
        TrackerKind::Auto,
        handle,
        Counting(out.writer, sent.clone()),
        out.ack.as_deref_mut().map(|r| r as &mut dyn Read),
    )
    .expect_err("the source fails");
    let MigrateError::Migration(e) = e else {
        panic!("not a migration error: {e}")
    };
    let dest_err = livemig::error_chain(&dest.join().unwrap());
    let sent = sent.load(Ordering::Relaxed);
    eprintln!("source: {e}\nsent {sent} bytes\ndestination: {dest_err}");
    assert!(matches!(e, MigrationError::Refused(_)), "{e}");
    assert!(sent < 4096, "{sent} bytes sent before the refusal");
    assert_guest_runs(&src, "source after the refusal");
    Some((e.to_string(), dest_err))
}

#[test]
fn wrong_memory_size_is_refused_before_any_page_with_the_destinations_reason() {
    let Some((text, dest_err)) = refused(
        "wrong_memory_size_is_refused",
        64,
        1,
        incoming_config(32, 1),
    ) else {
        return;
    };
    assert!(
        text.starts_with("the destination refused the migration before any page was sent: ")
            && text.contains("block list does not match the destination")
            && text.contains("67108864 bytes in the stream, 33554432 here"),
        "{text}"
    );
    assert!(dest_err.contains("block list does not match"), "{dest_err}");
}

#[test]
fn vcpu_count_mismatch_is_refused_before_any_page() {
    let Some((text, dest_err)) = refused(
        "vcpu_count_mismatch_is_refused",
        32,
        2,
        incoming_config(32, 1),
    ) else {
        return;
    };
    assert!(
        text.contains("the source's VM has 2 vCPUs, this destination's 1"),
        "{text}"
    );
    assert!(dest_err.contains("2 vCPUs"), "{dest_err}");
}

#[test]
fn a_cancelled_source_tells_the_destination_why() {
    let _g = serial();
    if !common::kvm_available("a_cancelled_source_tells_the_destination_why") {
        return;
    }
    let src = source_vm(32, 1);
    let (uri, dest) = failing_destination(incoming_config(32, 1), "the migration was cancelled");
    // Cancelled before it began (the test guest's memory is mostly
    // untouched and would go in milliseconds; the engine's own tests
    // cancel mid-stream): the destination gets a header and the reason.
    let handle = MigrationHandle::new(Params::default());
    handle.cancel();
    let mut out = connect(&uri).unwrap();
    let e = migrate_out(
        &src,
        TrackerKind::Auto,
        handle,
        out.writer,
        out.ack.as_deref_mut().map(|r| r as &mut dyn Read),
    )
    .expect_err("cancelled");
    assert!(
        matches!(e, MigrateError::Migration(MigrationError::Cancelled)),
        "{e}"
    );
    let d = dest.join().unwrap();
    eprintln!("destination: {d}");
    assert!(
        matches!(
            &d,
            MigrateError::Destination(DestinationError::Load(LoadError::SourceAborted { reason }))
                if reason == "migration cancelled"
        ),
        "{d:?}"
    );
    assert_eq!(d.to_string(), "source aborted: migration cancelled");
    assert_guest_runs(&src, "source after its cancel");
}

// --- TLS through the control socket -------------------------------------

/// Migrates to `uri` and waits for a final status: (status, error).
fn migrate_and_wait(c: &mut ControlClient, uri: &Uri) -> (String, String) {
    ok(c, "migrate", &format!("{{\"uri\":\"{uri}\"}}"));
    let t0 = Instant::now();
    loop {
        let v = c.raw(b"{\"execute\":\"query-migrate\"}\n").unwrap();
        let r = &v["return"];
        let status = r["status"].as_str().unwrap_or("").to_string();
        if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
            return (status, r["error-desc"].as_str().unwrap_or("").to_string());
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{v}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn tls_params(dir: &Path, hostname: Option<&str>) -> String {
    match hostname {
        Some(h) => format!(
            "{{\"tls-creds\":\"{}\",\"tls-hostname\":\"{h}\"}}",
            dir.display()
        ),
        None => format!(
            "{{\"tls-creds\":\"{}\",\"tls-hostname\":\"\"}}",
            dir.display()
        ),
    }
}

/// Waits for the source VM to be idle again (its migration thread ended).
fn idle(vm: &ControlledVm) -> Phase {
    vm.wait_idle(Duration::from_secs(10)).expect("idle")
}

#[test]
fn control_socket_migrates_over_tls_and_refuses_wrong_creds() {
    let _g = serial();
    if !common::kvm_available("control_socket_migrates_over_tls") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    Pki::generate(&["src", "dst"], &["localhost", "127.0.0.1"])
        .unwrap()
        .write_to(&ours)
        .unwrap();
    Pki::generate(&["src"], &["localhost", "127.0.0.1"])
        .unwrap()
        .write_to(&theirs)
        .unwrap();

    let src = ControlledVm::new(source_vm(32, 1), TrackerKind::Auto);
    let dst = ControlledVm::new(Vm::new(incoming_config(32, 1)).unwrap(), TrackerKind::Auto);
    let _ss = src
        .serve(&dir.path().join("src.sock"), Params::default())
        .unwrap();
    let _ds = dst
        .serve(&dir.path().join("dst.sock"), Params::default())
        .unwrap();
    let mut sc = ControlClient::connect(&dir.path().join("src.sock")).unwrap();
    let mut dc = ControlClient::connect(&dir.path().join("dst.sock")).unwrap();

    // A creds directory without certificates: migrate-incoming says which
    // file is missing, and the VM still waits for a proper command.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    ok(&mut dc, "migrate-set-parameters", &tls_params(&empty, None));
    let e = exec(&mut dc, "migrate-incoming", "{\"uri\":\"tcp:127.0.0.1:0\"}")
        .expect_err("no certificates");
    assert!(
        e.starts_with(&format!("GenericError: tls-creds {}: ", empty.display()))
            && e.contains("ca.pem"),
        "{e}"
    );
    assert_eq!(dst.phase(), Phase::AwaitingIncoming);

    // The destination: TLS with its certificates, from tls-creds.
    ok(
        &mut dc,
        "migrate-set-parameters",
        &tls_params(&ours.join("dst"), None),
    );
    ok(&mut dc, "migrate-incoming", "{\"uri\":\"tcp:127.0.0.1:0\"}");
    let Phase::Incoming(uri) = dst.phase() else {
        panic!("destination not waiting: {:?}", dst.phase());
    };
    let uri: Uri = uri.parse().unwrap();

    // 1. No creds on the source: it learns the destination wants TLS.
    let (status, error) = migrate_and_wait(&mut sc, &uri);
    assert_eq!(status, "failed", "{error}");
    assert!(error.contains("the destination requires TLS"), "{error}");
    assert_eq!(idle(&src), Phase::Running);

    // 2. Creds from another CA: the source refuses the destination's
    //    certificate during the handshake, and says so.
    ok(
        &mut sc,
        "migrate-set-parameters",
        &tls_params(&theirs.join("src"), None),
    );
    let (status, error) = migrate_and_wait(&mut sc, &uri);
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("TLS handshake with") && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert_eq!(idle(&src), Phase::Running);
    // The destination refused those peers and waits on.
    assert!(
        matches!(dst.phase(), Phase::Incoming(_)),
        "{:?}",
        dst.phase()
    );

    // 3. A tls-hostname the destination's certificate does not carry.
    ok(
        &mut sc,
        "migrate-set-parameters",
        &tls_params(&ours.join("src"), Some("elsewhere.example")),
    );
    let (status, error) = migrate_and_wait(&mut sc, &uri);
    assert_eq!(status, "failed", "{error}");
    assert!(error.contains("TLS handshake with"), "{error}");
    assert!(
        matches!(dst.phase(), Phase::Incoming(_)),
        "{:?}",
        dst.phase()
    );

    // 4. The right creds and host name: the guest moves, encrypted.
    ok(
        &mut sc,
        "migrate-set-parameters",
        &tls_params(&ours.join("src"), Some("localhost")),
    );
    let (status, error) = migrate_and_wait(&mut sc, &uri);
    assert_eq!(status, "completed", "{error}");
    assert_eq!(idle(&src), Phase::MigratedAway);
    assert_eq!(
        dst.wait_for(|p| *p == Phase::Running, Duration::from_secs(10)),
        Some(Phase::Running)
    );
    assert_guest_runs(dst.vm(), "destination after the TLS migration");
    let report = dst.incoming_report().expect("a report");
    assert!(report.stats.bytes > 1 << 20, "{report:?}");
}
