//! End to end over the shared-memory transport (`shm:PATH`) between two
//! `livemig` processes: a workload writes memory while it migrates; the
//! destination must hold exactly the source's memory at stop time (its
//! digest, sent in the stream, is checked by the destination and compared
//! here with the source's).

mod common;

use std::process::Stdio;

use common::{json_of, livemig, migrate_pair, wait_for_path};
use serde_json::Value;

fn migrate_over_shm(extra: &[&str]) -> (Value, Value) {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("shm:{}", dir.path().join("mig.sock").display());
    migrate_pair(&uri, extra)
}

/// [`common::assert_equal_memory`], over shared memory.
fn assert_equal_memory(s: &Value, d: &Value) {
    assert!(s["uri"].as_str().unwrap().starts_with("shm:"), "{s}");
    common::assert_equal_memory(s, d);
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
    wait_for_path(&sock);
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
    let s = json_of("vm-migrate", &src);
    let d = json_of("vm-incoming", &dst);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["guest"]["self-check"], "passed", "{s}");
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["verified"], true, "{d}");
    assert_eq!(d["guest"]["self-check"], "passed", "{d}");
    assert_eq!(d["guest"]["failures"], 0, "{d}");
    assert_eq!(d["digest"], s["digest"], "both sides hold the same memory");
}
