//! End to end over the shared-memory transport (`shm:PATH`) between two
//! `livemig` processes: a workload writes memory while it migrates; the
//! destination must hold exactly the source's memory at stop time (its
//! digest, sent in the stream, is checked by the destination and compared
//! here with the source's).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

fn livemig(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

fn json_of(stdout: &[u8], stderr: &[u8]) -> Value {
    let stdout = String::from_utf8_lossy(stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no JSON on stdout; stderr: {}",
            String::from_utf8_lossy(stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

/// Starts `incoming` on `uri` and waits until it says it listens.
fn start_incoming(uri: &str) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = livemig(&[
        "incoming", uri, "--size", "64M", "--blocks", "2", "--quiet", "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn incoming");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(
        first.starts_with("waiting for a migration on shm:"),
        "incoming said: {first}"
    );
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    (child, rest)
}

fn migrate_over_shm(extra: &[&str]) -> (Value, Value) {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("shm:{}", dir.path().join("mig.sock").display());
    let (dest, dest_err) = start_incoming(&uri);
    let mut args = vec![
        "migrate",
        &uri,
        "--size",
        "64M",
        "--blocks",
        "2",
        "--dirty-rate",
        "32M",
        "--warmup",
        "0.2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let src = livemig(&args).output().unwrap();
    let dst = dest.wait_with_output().unwrap();
    let dst_err = dest_err.join().unwrap();
    assert!(
        src.status.success(),
        "source failed: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dst.status.success(), "destination failed: {dst_err}");
    (
        json_of(&src.stdout, &src.stderr),
        json_of(&dst.stdout, dst_err.as_bytes()),
    )
}

fn assert_equal_memory(s: &Value, d: &Value) {
    assert_eq!(s["status"], "completed");
    assert_eq!(d["status"], "completed");
    assert!(s["uri"].as_str().unwrap().starts_with("shm:"), "{s}");
    assert_eq!(s["verified"], true, "the source got the destination's ack");
    assert_eq!(
        d["verified"], true,
        "destination checked the in-stream digest"
    );
    assert!(s["digest"].is_string());
    assert_eq!(
        s["digest"], d["digest"],
        "destination memory == source memory at stop time"
    );
    assert!(
        s["workload-pages-written"].as_u64().unwrap() > 0,
        "the workload ran"
    );
    assert!(s["ram"]["transferred"].as_u64().unwrap() > 0);
    assert_eq!(s["ram"]["remaining"], 0);
}

#[test]
fn shm_live_migration_between_processes() {
    let (s, d) = migrate_over_shm(&[]);
    assert_equal_memory(&s, &d);
    assert!(d["load"]["raw-pages"].as_u64().unwrap() > 0, "{d}");
}

#[test]
fn shm_live_migration_with_two_channels() {
    // Each page channel is a session of its own (its own memfd).
    let (s, d) = migrate_over_shm(&["--channels", "2"]);
    assert_equal_memory(&s, &d);
}

#[test]
fn shm_source_without_destination_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("shm:{}", dir.path().join("nobody.sock").display());
    let out = livemig(&["migrate", &uri, "--size", "4M", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connect to shm:"), "{err}");
}

#[test]
fn vm_migrate_to_vm_incoming_over_shm() {
    if !common::kvm_available("vm_migrate_to_vm_incoming_over_shm") {
        return;
    }
    const LAYOUT: &[&str] = &["--mem", "256M", "--vcpus", "2"];
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let uri = format!("shm:{}", sock.display());
    let mut dest_args = vec!["vm-incoming", &uri, "--seconds", "1", "--json"];
    dest_args.extend_from_slice(LAYOUT);
    let dest = livemig(&dest_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut src_args = vec!["vm-migrate", &uri, "--json", "--dirty-track", "bitmap"];
    src_args.extend_from_slice(LAYOUT);
    src_args.extend_from_slice(&["--working-set", "8M", "--rate", "16M", "--warmup", "0.5"]);
    let src = livemig(&src_args).stdin(Stdio::null()).output().unwrap();
    let dst = dest.wait_with_output().unwrap();
    assert!(
        src.status.success(),
        "vm-migrate failed: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        dst.status.success(),
        "vm-incoming failed: {}",
        String::from_utf8_lossy(&dst.stderr)
    );
    let s = json_of(&src.stdout, &src.stderr);
    let d = json_of(&dst.stdout, &dst.stderr);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["guest"]["self-check"], "passed", "{s}");
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["verified"], true, "{d}");
    assert_eq!(d["guest"]["self-check"], "passed", "{d}");
    assert_eq!(d["guest"]["failures"], 0, "{d}");
    assert_eq!(d["digest"], s["digest"], "both sides hold the same memory");
}
