//! The VM commands end to end, run as a user runs them: `livemig demo
//! --json`, a `vm-migrate` → `vm-incoming` pair over a Unix socket, and a
//! snapshot to a file restored by `vm-incoming file:`.

mod common;
use common::kvm_available;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// Small VM: quick to migrate, still dirtying while tracked. The rate is
/// modest because `cargo test` runs the unoptimized binary, whose engine
/// sends well under 100 MB/s: a faster guest would never converge.
const LAYOUT: &[&str] = &["--mem", "256M", "--vcpus", "2"];
const GUEST: &[&str] = &["--working-set", "8M", "--rate", "16M", "--warmup", "0.5"];

fn json_of(what: &str, out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: exactly one JSON line: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{what}: {e}: {stdout}"))
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running livemig")
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_destination_ran(d: &Value) {
    assert_eq!(d["status"], "completed", "{d}");
    let g = &d["guest"];
    assert_eq!(g["self-check"], "passed", "{d}");
    assert_eq!(g["failures"], 0, "{d}");
    assert!(g["heartbeats"].as_u64().unwrap() > 0, "{d}");
    assert!(
        g["pages-written"].as_u64().unwrap() > g["pages-written-before"].as_u64().unwrap(),
        "{d}"
    );
    assert!(
        g["pages-written-before"].as_u64().unwrap() > 0,
        "the guest had run on the source: {d}"
    );
}

#[test]
fn demo_json_reports_a_guest_that_moved_and_kept_running() {
    if !kvm_available("demo_json_reports_a_guest_that_moved_and_kept_running") {
        return;
    }
    let mut args = vec!["demo", "--json", "--seconds-after", "1"];
    args.extend_from_slice(LAYOUT);
    args.extend_from_slice(GUEST);
    let v = json_of("demo --json", &run(&args));
    assert_eq!(v["status"], "completed", "{v}");
    assert!(v["total-time"].as_u64().unwrap() > 0, "{v}");
    assert!(v["downtime"].is_u64(), "{v}");
    assert_eq!(v["ram"]["total"], 256u64 << 20, "{v}");
    // The bulk stage sends every page once, as zero or in full.
    let sent = v["ram"]["normal"].as_u64().unwrap() + v["ram"]["duplicate"].as_u64().unwrap();
    assert!(sent >= (256u64 << 20) / 4096, "{v}");
    assert!(
        v["dirty-tracker"].as_str().unwrap().starts_with("kvm-"),
        "{v}"
    );
    assert!(!v["tracker"]["why"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["passed"], true, "{v}");
    let g = &v["guest"];
    assert_eq!(g["self-check"], "passed", "{v}");
    assert_eq!(g["failures"], 0, "{v}");
    assert!(
        g["heartbeats-after"].as_u64().unwrap() > g["heartbeats-before"].as_u64().unwrap(),
        "{v}"
    );
    assert!(
        g["pages-written"].as_u64().unwrap() > g["pages-written-before"].as_u64().unwrap(),
        "{v}"
    );
    let d = &v["destination"];
    assert_destination_ran(d);
    assert_eq!(d["verified"], true, "{v}");
    assert_eq!(d["digest"], v["digest"], "both sides hold the same memory");
}

/// `vm-migrate` (with `extra` flags) into `vm-incoming` over a Unix
/// socket; returns both JSON reports after checking what every such
/// migration must show.
fn vm_pair(extra: &[&str]) -> (Value, Value) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let mut dest_args = vec!["vm-incoming", &uri, "--seconds", "1", "--json"];
    dest_args.extend_from_slice(LAYOUT);
    let dest = Command::new(BIN)
        .args(&dest_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let mut src_args = vec!["vm-migrate", &uri, "--json"];
    src_args.extend_from_slice(extra);
    src_args.extend_from_slice(LAYOUT);
    src_args.extend_from_slice(GUEST);
    let s = json_of("vm-migrate", &run(&src_args));
    let d = json_of("vm-incoming", &dest.wait_with_output().unwrap());
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["role"], "source", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["guest"]["self-check"], "passed", "{s}");
    assert_destination_ran(&d);
    assert_eq!(d["verified"], true, "{d}");
    assert_eq!(d["digest"], s["digest"], "both sides hold the same memory");
    (s, d)
}

#[test]
fn vm_migrate_to_vm_incoming_over_a_unix_socket() {
    if !kvm_available("vm_migrate_to_vm_incoming_over_a_unix_socket") {
        return;
    }
    let (s, _) = vm_pair(&["--dirty-track", "bitmap"]);
    assert_eq!(s["dirty-tracker"], "kvm-bitmap", "{s}");
}

#[test]
fn vm_migrate_with_two_page_channels() {
    if !kvm_available("vm_migrate_with_two_page_channels") {
        return;
    }
    let (_, d) = vm_pair(&["--channels", "2"]);
    assert_eq!(d["load"]["channels"], 2, "{d}");
}

#[test]
fn vm_snapshot_to_a_file_restores_and_runs() {
    if !kvm_available("vm_snapshot_to_a_file_restores_and_runs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.snap");
    let uri = format!("file:{}", file.display());
    let mut save = vec!["vm-migrate", &uri, "--json"];
    save.extend_from_slice(LAYOUT);
    save.extend_from_slice(GUEST);
    let s = json_of("vm-migrate file:", &run(&save));
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], false, "no return path on a file: {s}");
    assert!(s["digest"].is_string(), "{s}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        s["ram"]["transferred"].as_u64().unwrap(),
        "the snapshot holds exactly the stream the source sent"
    );
    let mut restore = vec!["vm-incoming", &uri, "--seconds", "1", "--json"];
    restore.extend_from_slice(LAYOUT);
    let d = json_of("vm-incoming file:", &run(&restore));
    assert_destination_ran(&d);
    assert_eq!(d["verified"], true, "the snapshot's digest checked: {d}");
    assert_eq!(d["digest"], s["digest"], "{d}");

    // A snapshot does not fit a VM of another shape: a clear error.
    let out = run(&[
        "vm-incoming",
        &uri,
        "--seconds",
        "1",
        "--mem",
        "128M",
        "--vcpus",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("livemig: error:"), "{err}");
}

#[test]
fn load_of_a_vm_snapshot_says_so_and_names_vm_incoming() {
    if !common::kvm_available("load_of_a_vm_snapshot_says_so_and_names_vm_incoming") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("vm.snap");
    let uri = format!("file:{}", snap.display());
    let saved = common::livemig(&[
        "vm-migrate",
        &uri,
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--warmup",
        "0.2",
        "--no-verify",
    ])
    .output()
    .unwrap();
    assert!(
        saved.status.success(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );
    let out = common::livemig(&["load", snap.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a VM snapshot"), "{err}");
    assert!(
        err.contains(&format!("livemig vm-incoming {uri} --mem 64M")),
        "{err}"
    );
    let v = common::json_of("load", &out);
    assert!(v["error"].as_str().unwrap().contains("VM snapshot"), "{v}");
}

#[test]
fn vm_postcopy_cut_is_recovered_with_resume_to_and_recover_on() {
    if !kvm_available("vm_postcopy_cut_is_recovered_with_resume_to_and_recover_on") {
        return;
    }
    // A guest rewriting 16 MiB per vCPU flat out over a 16 MiB/s cap never
    // converges: auto switches to postcopy. A proxy cuts the return path
    // once the page requests of postcopy flow (LOADED and STARTED are
    // the only replies before the switch); both sides pause, vm-incoming
    // listens on --recover-on, vm-migrate reconnects there (--resume-to),
    // and the guest's self-check passes on the destination.
    use livemig::testkit::fault_proxy::{Fault, FaultProxy};
    let addr = common::free_addr();
    let rec = format!("tcp:{}", common::free_addr());
    let layout: &[&str] = &["--mem", "64M", "--vcpus", "2"];
    let uri = format!("tcp:{addr}");
    let mut dest_args = vec![
        "vm-incoming",
        &uri,
        "--seconds",
        "1",
        "--json",
        "--announce",
        "--postcopy",
        "--recover-on",
        &rec,
    ];
    dest_args.extend_from_slice(layout);
    let mut dest = Command::new(BIN)
        .args(&dest_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // --announce: the first stdout line says it listens.
    let mut out = std::io::BufReader::new(dest.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(first.starts_with("tcp:"), "vm-incoming said: {first}");
    let dest_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let mut err = dest.stderr.take().unwrap();
    let dest_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let proxy = FaultProxy::start(addr, Fault::CutBackAt(300)).unwrap();
    let puri = proxy.uri();
    let mut src_args = vec![
        "vm-migrate",
        &puri,
        "--json",
        "--postcopy",
        "--resume-to",
        &rec,
        "--max-bandwidth",
        "16M",
        "--downtime-limit",
        "20",
        "--working-set",
        "16M",
        "--rate",
        "0",
        "--warmup",
        "0.5",
    ];
    src_args.extend_from_slice(layout);
    let src = run(&src_args);
    let status = dest.wait().unwrap();
    let stdout = dest_out.join().unwrap();
    let derr = dest_err.join().unwrap();
    let serr = String::from_utf8_lossy(&src.stderr).into_owned();
    assert!(proxy.has_cut(), "the return path was cut: {serr}");
    assert!(serr.contains("postcopy paused"), "{serr}");
    assert!(derr.contains("the source reconnected"), "{derr}");
    let s = json_of("vm-migrate", &src);
    assert_eq!(s["status"], "completed", "{s}");
    assert!(s["postcopy-time"].is_u64(), "switched to postcopy: {s}");
    assert!(status.success(), "vm-incoming: {derr}");
    let d: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_destination_ran(&d);
}
