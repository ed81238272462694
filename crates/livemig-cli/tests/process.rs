//! End to end between two `livemig` processes: a workload writes memory
//! while it migrates; the destination must hold exactly the source's memory
//! at stop time (same digest, verified in-stream by the destination).

mod common;

use common::{free_addr, json_line, json_of, livemig, migrate_pair, spawn_listening};
use serde_json::Value;

/// [`common::assert_equal_memory`], and the migration iterated and
/// reported its downtime.
fn assert_equal_memory(s: &Value, d: &Value) {
    common::assert_equal_memory(s, d);
    assert!(s["ram"]["dirty-sync-count"].as_u64().unwrap() >= 2);
    assert!(s["downtime"].is_u64());
}

#[test]
fn tcp_live_migration_between_processes() {
    let uri = format!("tcp:127.0.0.1:{}", free_addr().port());
    let (s, d) = migrate_pair(&uri, &[]);
    assert_equal_memory(&s, &d);
    assert!(
        s["ram"]["duplicate"].as_u64().unwrap() > 0,
        "half the memory is zero pages"
    );
    assert!(s["ram"]["normal"].as_u64().unwrap() > 0);
    assert_eq!(
        d["load"]["zero-pages-written"], 0,
        "fresh destination pages are already zero"
    );
}

#[test]
fn tcp_postcopy_between_processes() {
    // 256 MiB/s of writes over a 16 MiB/s link never converges: auto
    // switches to postcopy and the rest follows after the switch.
    let uri = format!("tcp:127.0.0.1:{}", free_addr().port());
    let (s, d) = common::migrate_pair_with(
        &uri,
        &["--postcopy"],
        &[
            "--postcopy",
            "--dirty-rate",
            "256M",
            "--max-bandwidth",
            "16M",
            "--downtime-limit",
            "20",
        ],
    );
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(d["status"], "completed", "{d}");
    assert!(s["postcopy-time"].is_u64(), "switched to postcopy: {s}");
    assert!(s["ram"]["postcopy-bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(d["postcopy"]["placed-pages"].as_u64().unwrap() > 0, "{d}");
    // Both sides give the destination's local-fault count; nothing runs
    // on a process destination to touch its memory, so there are none.
    assert_eq!(s["postcopy-local-faults"], d["postcopy"]["local-faults"]);
    assert_eq!(s["postcopy-local-faults"], 0, "{s}");
    assert_eq!(d["postcopy"]["local-pages"], 0, "{d}");
    assert_eq!(
        s["digest"], d["digest"],
        "destination memory == source memory at the switch"
    );
}

#[test]
fn tcp_four_channels_between_processes() {
    let uri = format!("tcp:127.0.0.1:{}", free_addr().port());
    let (s, d) = migrate_pair(&uri, &["--channels", "4", "--downtime-limit", "50"]);
    assert_equal_memory(&s, &d);
    assert!(s["ram"]["normal"].as_u64().unwrap() > 0);
    assert_eq!(
        d["load"]["raw-pages"], s["ram"]["normal"],
        "every page the channels sent was loaded"
    );
    assert_eq!(d["load"]["zero-pages"], s["ram"]["duplicate"]);
}

#[test]
fn unix_socket_with_xbzrle_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let (s, d) = migrate_pair(
        &uri,
        &[
            "--xbzrle",
            "--compress",
            "lz4",
            "--no-adaptive",
            "--downtime-limit",
            "20",
            "--fill",
            "text",
        ],
    );
    assert_equal_memory(&s, &d);
    assert!(s["xbzrle-cache"].is_object());
    assert!(
        s["compression"]["pages"].as_u64().unwrap() > 0,
        "text pages compress: {s}"
    );
    assert_eq!(s["compression"]["skipped-pages"], 0, "{s}");
    assert_eq!(s["xbzrle-cache"]["skipped-pages"], 0, "{s}");
    assert_eq!(d["load"]["compressed-pages"], s["compression"]["pages"]);
    assert_eq!(d["load"]["xbzrle-pages"], s["xbzrle-cache"]["pages"]);
}

#[test]
fn snapshot_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.lm");
    let f = file.to_str().unwrap();
    let save = livemig(&["save", f, "--size", "32M", "--dirty-rate", "16M", "--json"])
        .output()
        .unwrap();
    assert!(
        save.status.success(),
        "{}",
        String::from_utf8_lossy(&save.stderr)
    );
    let s = json_of("save", &save);
    assert_eq!(s["status"], "completed");
    let load = livemig(&["load", f, "--size", "32M", "--json"])
        .output()
        .unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let d = json_of("load", &load);
    assert_eq!(d["verified"], true);
    assert_eq!(s["digest"], d["digest"]);

    // A truncated snapshot is refused with the byte offset.
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let bad = livemig(&["load", f, "--size", "32M"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("stream byte") && err.contains("stream ends inside"),
        "{err}"
    );

    // So is a snapshot for a different layout, before anything is written.
    std::fs::write(&file, &bytes).unwrap();
    let bad = livemig(&["load", f, "--size", "64M"]).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("block list does not match"), "{err}");
}

#[test]
fn bad_input_gets_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["migrate", "udp:1.2.3.4:5"],
            "bad migration URI 'udp:1.2.3.4:5'",
        ),
        (&["load", "/nonexistent/snap.lm"], "/nonexistent/snap.lm"),
        (
            &["migrate", "tcp:127.0.0.1:1", "--size", "5X"],
            "unknown size suffix",
        ),
        (
            &["migrate", "tcp:127.0.0.1:1", "--size", "1000"],
            "multiple of 4 KiB",
        ),
        (
            &[
                "migrate",
                "tcp:127.0.0.1:1",
                "--size",
                "4M",
                "--downtime-limit",
                "0",
            ],
            "downtime-limit",
        ),
        (
            &[
                "migrate",
                "tcp:127.0.0.1:1",
                "--size",
                "4M",
                "--dirty-rate",
                "0",
            ],
            "connect to tcp:127.0.0.1:1",
        ),
        (&["migrate", "--no-such-flag"], "unexpected argument"),
    ];
    for (args, want) in cases {
        let out = livemig(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
}

#[test]
fn source_survives_a_destination_that_hangs_up() {
    // A "destination" that accepts, reads a little and closes.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = std::io::Read::read(&mut s, &mut buf);
    });
    let out = livemig(&[
        "migrate", &uri, "--size", "64M", "--fill", "random", "--json",
    ])
    .output()
    .unwrap();
    t.join().unwrap();
    assert!(!out.status.success());
    let s = json_of("migrate", &out);
    assert_eq!(s["status"], "failed");
    // It closed before answering the setup: the source says so, and that
    // no page was sent.
    assert!(
        s["error-desc"].as_str().unwrap().contains(
            "no answer from the destination to the migration's setup (the connection closed); \
             no page was sent"
        ),
        "{s}"
    );
}

#[test]
fn help_on_every_subcommand() {
    for sub in [
        "migrate",
        "incoming",
        "save",
        "load",
        "bench",
        "demo",
        "vm-migrate",
        "vm-incoming",
        "dirtyrate",
        "control",
        "tls-keygen",
    ] {
        let out = livemig(&[sub, "--help"]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: livemig"), "{sub}: {text}");
    }
}

#[test]
fn flags_a_file_or_the_demo_cannot_use_are_out_of_their_help_but_accepted() {
    let help = |sub: &str| {
        let out = livemig(&[sub, "--help"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (sub, hidden) in [
        ("save", &["--postcopy", "--resume-to", "--io-timeout"][..]),
        ("load", &["--postcopy", "--recover-on", "--io-timeout"][..]),
        ("demo", &["--resume-to"][..]),
    ] {
        let text = help(sub);
        for flag in hidden {
            assert!(!text.contains(flag), "{sub} --help lists {flag}: {text}");
        }
    }
    assert!(help("migrate").contains("--resume-to"));
    assert!(help("incoming").contains("--recover-on"));
    // Still parsed: the failure is the missing file's, not the flags'.
    let out = livemig(&[
        "load",
        "/nonexistent/livemig-hidden-flags",
        "--postcopy",
        "--recover-on",
        "tcp:127.0.0.1:1",
        "--io-timeout",
        "5",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn json_reports_every_failure_as_an_object() {
    // Failures before any stream: a refused connection, a bad URI, an
    // address in use.
    let addr = free_addr();
    let refused = livemig(&["migrate", &format!("tcp:{addr}"), "--size", "4M", "--json"])
        .output()
        .unwrap();
    let bad = livemig(&["incoming", "udp:x:1", "--size", "4M", "--json"])
        .output()
        .unwrap();
    for (what, out) in [("refused connect", refused), ("bad URI", bad)] {
        assert!(!out.status.success(), "{what}");
        let v = json_of(what, &out);
        assert_eq!(v["status"], "failed", "{what}: {v}");
        let e = v["error"].as_str().unwrap_or("");
        assert!(!e.is_empty(), "{what}: {v}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(e),
            "{what}: the same error on stderr: {stderr}"
        );
    }
}

#[test]
fn a_bare_connect_and_close_does_not_end_incoming() {
    let addr = free_addr();
    let uri = format!("tcp:{addr}");
    let (dest, dest_err) = spawn_listening(
        &mut livemig(&["incoming", &uri, "--size", "16M", "--quiet", "--json"]),
        "waiting for a migration on tcp:",
    );
    // A port scan: connect, close. Twice.
    for _ in 0..2 {
        drop(std::net::TcpStream::connect(addr).unwrap());
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let src = livemig(&["migrate", &uri, "--size", "16M", "--json"])
        .output()
        .unwrap();
    let dst = dest.wait_with_output().unwrap();
    let dst_err = dest_err.join().unwrap();
    assert!(
        src.status.success(),
        "source: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(dst.status.success(), "destination: {dst_err}");
    assert_eq!(
        dst_err.matches("refused a connection").count(),
        2,
        "{dst_err}"
    );
    assert!(
        dst_err.contains("closed without sending anything"),
        "{dst_err}"
    );
    let d = json_line("destination", &dst.stdout, dst_err.as_bytes());
    assert_eq!(d["status"], "completed", "{d}");
    assert_eq!(d["digest"], json_of("source", &src)["digest"], "{d}");
}
