//! Helpers shared by the CLI's end-to-end tests.
//!
//! Each test binary includes this module with `mod common;` and uses only
//! some of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `livemig` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_livemig");

/// True if KVM is usable; prints why the test is skipped otherwise.
pub fn kvm_available(test: &str) -> bool {
    match minivm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// `livemig ARGS`, not started yet.
pub fn livemig(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

/// The JSON on the last line of `stdout`; panics naming `what` (and
/// showing `stderr`) when there is none or it does not parse.
pub fn json_line(what: &str, stdout: &[u8], stderr: &[u8]) -> Value {
    let stdout = String::from_utf8_lossy(stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "{what}: no JSON on stdout; stderr: {}",
            String::from_utf8_lossy(stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: bad JSON {line:?}: {e}"))
}

/// [`json_line`] of a finished process.
pub fn json_of(what: &str, out: &Output) -> Value {
    json_line(what, &out.stdout, &out.stderr)
}

/// Spawns `cmd` with stdout and stderr piped, waits for its first stderr
/// line, which must start with `expect` (a destination saying it listens),
/// and keeps draining stderr on a thread (so the child never blocks on it)
/// that returns the rest.
pub fn spawn_listening(cmd: &mut Command, expect: &str) -> (Child, JoinHandle<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the destination");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with(expect), "the destination said: {first}");
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    (child, rest)
}

/// A loopback TCP address nobody listens on (just now).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits (20 s at most) until `path` exists: a destination's socket.
pub fn wait_for_path(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `livemig incoming URI` and `livemig migrate URI SRC_EXTRA` of a 64 MiB
/// process memory in 2 blocks with a workload; both must succeed. Returns
/// the source's and the destination's JSON.
pub fn migrate_pair(uri: &str, src_extra: &[&str]) -> (Value, Value) {
    migrate_pair_with(uri, &[], src_extra)
}

/// As [`migrate_pair`], with `dest_extra` arguments for the destination.
pub fn migrate_pair_with(uri: &str, dest_extra: &[&str], src_extra: &[&str]) -> (Value, Value) {
    let scheme = uri.split_once(':').map_or(uri, |(s, _)| s);
    let mut dest_args = vec![
        "incoming", uri, "--size", "64M", "--blocks", "2", "--quiet", "--json",
    ];
    dest_args.extend_from_slice(dest_extra);
    let (dest, dest_err) = spawn_listening(
        &mut livemig(&dest_args),
        &format!("waiting for a migration on {scheme}:"),
    );
    let mut args = vec![
        "migrate", uri, "--size", "64M", "--blocks", "2", "--warmup", "0.2", "--json",
    ];
    if !src_extra.contains(&"--dirty-rate") {
        args.extend_from_slice(&["--dirty-rate", "32M"]);
    }
    args.extend_from_slice(src_extra);
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
        json_of("source", &src),
        json_line("destination", &dst.stdout, dst_err.as_bytes()),
    )
}

/// Both sides of a [`migrate_pair`] completed and the destination holds
/// exactly the source's memory at stop time.
pub fn assert_equal_memory(s: &Value, d: &Value) {
    assert_eq!(s["status"], "completed");
    assert_eq!(d["status"], "completed");
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
