//! `livemig control` end to end: the binary against a control socket
//! served in this process — its error answers and exit codes, and a real
//! KVM guest migrated, steered and cancelled through it.

mod common;
use common::kvm_available;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use livemig::control::{ControlServer, MigrationStarter, MigrationTls};
use livemig::engine::{MigrationHandle, Params};
use livemig::transport::Uri;
use minivm::control::{ControlledVm, Phase};
use minivm::{GuestImage, TestGuestConfig, TrackerKind, Vm, VmConfig};
use serde_json::Value;

fn livemig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `livemig control SOCKET args...`: (exit ok, stdout JSON, stderr).
fn control(sock: &Path, args: &[&str]) -> (bool, Value, String) {
    let mut all = vec!["control", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = livemig(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.success(), v, stderr)
}

/// A VMM that starts nothing: enough for the protocol's errors.
struct Refuses;

impl MigrationStarter for Refuses {
    fn start_outgoing(
        &mut self,
        uri: &Uri,
        _: Option<&MigrationTls>,
        _: MigrationHandle,
    ) -> Result<(), String> {
        Err(format!("no VM here to send to {uri}"))
    }
    fn start_incoming(
        &mut self,
        uri: &Uri,
        _: Option<&MigrationTls>,
        _: MigrationHandle,
    ) -> Result<(), String> {
        Err(format!("no VM here to receive on {uri}"))
    }
}

#[test]
fn errors_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let _server = ControlServer::start(&sock, Params::default(), Box::new(Refuses)).unwrap();

    let (ok, v, _) = control(&sock, &["query-migrate"]);
    assert!(ok);
    assert_eq!(v, serde_json::json!({"return": {}}));

    let (ok, v, err) = control(&sock, &["frobnicate"]);
    assert!(!ok, "an error answer fails the command");
    assert_eq!(v["error"]["class"], "CommandNotFound", "{v}");
    assert!(
        err.contains("The command frobnicate has not been found"),
        "{err}"
    );

    let (ok, v, _) = control(&sock, &["--raw", "{not json"]);
    assert!(!ok);
    let desc = v["error"]["desc"].as_str().unwrap();
    assert!(desc.contains("JSON parse error"), "{v}");

    let (ok, v, _) = control(
        &sock,
        &["migrate-set-parameters", r#"{"downtime-limit": "soon"}"#],
    );
    assert!(!ok);
    assert!(
        v["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("Invalid parameter type for 'downtime-limit'"),
        "{v}"
    );
    let (ok, v, _) = control(&sock, &["migrate", r#"{"uri": "udp:x:1"}"#]);
    assert!(!ok);
    assert!(
        v["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("bad migration URI"),
        "{v}"
    );
    let (ok, v, _) = control(&sock, &["migrate", r#"{"uri": "tcp:127.0.0.1:9"}"#]);
    assert!(!ok);
    assert!(
        v["error"]["desc"].as_str().unwrap().contains("no VM here"),
        "{v}"
    );

    // Over-long line: refused, the connection closed.
    let long = format!(
        "{{\"execute\": \"query-migrate\", \"pad\": \"{}\"}}",
        "x".repeat(livemig::control::MAX_LINE)
    );
    let (ok, v, _) = control(&sock, &["--raw", &long]);
    assert!(!ok);
    assert!(
        v["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{v}"
    );

    // Caught by the client: no request is sent.
    let (ok, v, err) = control(&sock, &["migrate", "{"]);
    assert!(!ok && v.is_null());
    assert!(err.contains("ARGS-JSON is not JSON"), "{err}");
    let (ok, _, err) = control(&sock, &["migrate", "[1]"]);
    assert!(!ok && err.contains("must be a JSON object"), "{err}");
    let (ok, _, err) = control(&sock, &["query-migrate", "--wait"]);
    assert!(!ok && err.contains("--wait applies to"), "{err}");
    let (ok, _, err) = control(&dir.path().join("absent.sock"), &["query-migrate"]);
    assert!(!ok && err.contains("absent.sock"), "{err}");

    // The server still answers.
    let (ok, v, _) = control(&sock, &["query-migrate-parameters"]);
    assert!(ok);
    assert_eq!(v["return"]["downtime-limit"], 300);
}

fn status(sock: &Path) -> Value {
    let (ok, v, err) = control(sock, &["query-migrate"]);
    assert!(ok, "{err}");
    v["return"].clone()
}

fn wait_status(sock: &Path, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let s = status(sock);
        if s["status"] == want {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "waiting for {want}: {s}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn migrate_wait_steer_and_cancel_through_the_binary() {
    if !kvm_available("migrate_wait_steer_and_cancel_through_the_binary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ss, ds) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let src = ControlledVm::new(
        Vm::new(VmConfig {
            mem_size: 128 << 20,
            vcpus: 2,
            guest: GuestImage::TestGuest(TestGuestConfig {
                pages_per_vcpu: 2048,
                rate_bytes_per_sec: 32 << 20,
            }),
            prefault: true,
            ..VmConfig::default()
        })
        .unwrap(),
        TrackerKind::Auto,
    );
    let dst = ControlledVm::new(
        Vm::new(VmConfig {
            mem_size: 128 << 20,
            vcpus: 2,
            guest: GuestImage::Incoming,
            start_paused: true,
            ..VmConfig::default()
        })
        .unwrap(),
        TrackerKind::Auto,
    );
    let _s1 = src.serve(&ss, Params::default()).unwrap();
    let _s2 = dst.serve(&ds, Params::default()).unwrap();
    thread::sleep(Duration::from_millis(300));

    // A slow migration, cancelled from a second `livemig control`.
    let (ok, _, err) = control(
        &ss,
        &["migrate-set-parameters", r#"{"max-bandwidth": 1048576}"#],
    );
    assert!(ok, "{err}");
    let first = dir.path().join("first.sock");
    let listener = std::os::unix::net::UnixListener::bind(&first).unwrap();
    let sink = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Accepts the setup and the drain marks, then swallows the
        // stream (see `livemig::testkit::sink`).
        let mut back = s.try_clone().unwrap();
        livemig::testkit::sink::swallow(&mut s, Some(&mut back));
    });
    let uri = format!(r#"{{"uri": "unix:{}"}}"#, first.display());
    let waiting = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["control", ss.to_str().unwrap(), "migrate", &uri, "--wait"])
        .args(["--interval", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_status(&ss, "active");
    let (ok, v, err) = control(&ss, &["migrate-cancel", "--wait"]);
    assert!(ok, "{err}");
    assert_eq!(v["return"]["status"], "cancelled", "{v}");
    let out = waiting.wait_with_output().unwrap();
    assert!(!out.status.success(), "migrate --wait fails on a cancel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("status cancelled"), "{stderr}");
    sink.join().unwrap();
    assert_eq!(src.wait_idle(Duration::from_secs(5)), Some(Phase::Running));
    assert!(!src.vm().is_paused());

    // The real one: slow, then the limit lifted while `--wait` watches.
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let uri = format!(r#"{{"uri": "{mig}"}}"#);
    let (ok, _, err) = control(&ds, &["migrate-incoming", &uri]);
    assert!(ok, "{err}");
    let waiting = Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["control", ss.to_str().unwrap(), "migrate", &uri, "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_status(&ss, "active");
    let (ok, _, err) = control(
        &ss,
        &[
            "migrate-set-parameters",
            r#"{"max-bandwidth": 0, "downtime-limit": 400}"#,
        ],
    );
    assert!(ok, "{err}");
    let out = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["return"]["status"], "completed", "{v}");
    assert!(
        stderr.contains("status: Completed"),
        "summary on stderr: {stderr}"
    );
    let (_, p, _) = control(&ss, &["query-migrate-parameters"]);
    assert_eq!(p["return"]["downtime-limit"], 400);
    assert_eq!(
        src.wait_idle(Duration::from_secs(5)),
        Some(Phase::MigratedAway)
    );
    assert_eq!(dst.wait_idle(Duration::from_secs(10)), Some(Phase::Running));
    let before = dst.vm().guest_status();
    thread::sleep(Duration::from_millis(500));
    let after = dst.vm().guest_status();
    assert!(after.ok(), "destination self-check: {after:?}");
    assert!(
        after.pages_written() > before.pages_written(),
        "{before:?} -> {after:?}"
    );
}
