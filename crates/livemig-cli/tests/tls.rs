//! Encrypted, mutually authenticated migration end to end: certificates
//! from `livemig tls-keygen`, `migrate`/`incoming` (and `vm-migrate`/
//! `vm-incoming` where KVM is usable) with `--tls-dir`, and the refusals: a
//! plain source, a plain destination, a source of another CA.

mod common;
use common::{json_of, kvm_available, wait_for_path};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use serde_json::Value;

const MEM: &[&str] = &["--size", "64M", "--blocks", "2"];
const WORKLOAD: &[&str] = &["--dirty-rate", "32M", "--warmup", "0.2"];

fn livemig(args: &[&str]) -> Command {
    let mut c = common::livemig(args);
    c.stdin(Stdio::null());
    c
}

/// Runs `tls-keygen DIR` and returns DIR.
fn keygen(dir: &Path) -> PathBuf {
    let out = livemig(&["tls-keygen", dir.to_str().unwrap(), "--names", "src,dst"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tls-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "src/cert.pem", "src/key.pem", "dst/cert.pem"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    dir.to_path_buf()
}

/// An `incoming` process whose stderr lines arrive on a channel.
struct Incoming {
    /// `None` once finished.
    child: Option<Child>,
    lines: Receiver<String>,
    uri: String,
}

impl Incoming {
    fn start(extra: &[&str]) -> Incoming {
        let mut args = vec!["incoming", "tcp:127.0.0.1:0", "--quiet", "--json"];
        args.extend_from_slice(MEM);
        args.extend_from_slice(extra);
        let mut child = livemig(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn incoming");
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(30)).unwrap();
        let uri = first
            .strip_prefix("waiting for a migration on ")
            .unwrap_or_else(|| panic!("incoming said: {first}"))
            .to_string();
        Incoming {
            child: Some(child),
            lines,
            uri,
        }
    }

    /// The next stderr line (waits; the process is alive or has just ended).
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a line from incoming")
    }

    /// Waits for the end and returns (success, JSON on stdout if any,
    /// the rest of stderr).
    fn finish(mut self) -> (bool, Option<Value>, String) {
        let child = self.child.take().expect("not finished yet");
        let out = child.wait_with_output().unwrap();
        // The reader thread forwards the last lines after the exit: wait
        // for it to reach the end of stderr (it then drops its sender).
        let rest: Vec<String> =
            std::iter::from_fn(|| self.lines.recv_timeout(Duration::from_secs(30)).ok()).collect();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = stdout
            .lines()
            .last()
            .map(|l| serde_json::from_str(l).expect("incoming JSON"));
        (out.status.success(), json, rest.join("\n"))
    }
}

impl Drop for Incoming {
    /// A destination still waiting (it keeps listening after a refusal)
    /// is stopped with the test.
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn migrate(uri: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", uri, "--json"];
    args.extend_from_slice(MEM);
    args.extend_from_slice(WORKLOAD);
    args.extend_from_slice(extra);
    livemig(&args).output().unwrap()
}

fn tls_dir(pki: &Path, who: &str) -> String {
    pki.join(who).to_str().unwrap().to_string()
}

/// A TLS migration completes, both sides report TLS 1.3 with the preferred
/// suite, and the destination holds exactly the source's memory.
fn check_tls_pair(src: &Output, dst: (bool, Option<Value>, String)) {
    let s = json_of("migrate", src);
    assert!(
        src.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    let (ok, d, err) = dst;
    assert!(ok, "incoming failed: {err}");
    let d = d.expect("incoming JSON");
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(d["verified"], true, "{d}");
    assert_eq!(d["digest"], s["digest"], "both sides hold the same memory");
    for v in [&s, &d] {
        assert_eq!(v["tls"]["protocol"], "TLSv1_3", "{v}");
        assert_eq!(v["tls"]["cipher-suite"], "TLS13_AES_128_GCM_SHA256", "{v}");
    }
}

#[test]
fn process_migration_over_tls_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let pki = keygen(dir.path());
    let dst = Incoming::start(&["--tls-dir", &tls_dir(&pki, "dst")]);
    let uri = dst.uri.clone();
    let src = migrate(&uri, &["--tls-dir", &tls_dir(&pki, "src")]);
    check_tls_pair(&src, dst.finish());
}

/// A process-memory postcopy over TLS that `auto` must switch (256 MiB/s
/// of writes over a 16 MiB/s cap never converges), with `extra` source
/// flags; checks both sides completed with the same memory over TLS 1.3
/// and returns the destination's JSON.
fn tls_postcopy(extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let pki = keygen(dir.path());
    let dst = Incoming::start(&["--tls-dir", &tls_dir(&pki, "dst"), "--postcopy"]);
    let uri = dst.uri.clone();
    let mut args = vec!["migrate", &uri, "--json"];
    args.extend_from_slice(MEM);
    let src_tls = tls_dir(&pki, "src");
    args.extend_from_slice(&[
        "--dirty-rate",
        "256M",
        "--max-bandwidth",
        "16M",
        "--downtime-limit",
        "20",
        "--postcopy",
        "--tls-dir",
        &src_tls,
    ]);
    args.extend_from_slice(extra);
    let src = livemig(&args).output().unwrap();
    let s = json_of("migrate", &src);
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let (ok, d, err) = dst.finish();
    assert!(ok, "incoming failed: {err}");
    let d = d.expect("incoming JSON");
    assert_eq!(s["status"], "completed", "{s}");
    assert!(s["postcopy-time"].is_u64(), "switched to postcopy: {s}");
    assert_eq!(d["digest"], s["digest"], "both sides hold the same memory");
    assert_eq!(d["tls"]["protocol"], "TLSv1_3", "{d}");
    d
}

#[test]
fn postcopy_with_the_urgent_connection_over_tls() {
    // The return path is read on its own thread while pages go out: the
    // TLS halves must work concurrently; requested pages take a TLS
    // connection of their own.
    let d = tls_postcopy(&["--postcopy-preempt"]);
    let urgent = d["postcopy"]["urgent-pages"].as_u64().unwrap();
    let requests = d["postcopy"]["requests"].as_u64().unwrap();
    // A page request is answered on the urgent connection unless the page
    // was already on its way.
    assert!(urgent <= requests, "{d}");
}

#[test]
fn postcopy_over_two_page_channels_and_tls() {
    // Background pages on two TLS page channels, requested pages on the
    // main TLS connection.
    let d = tls_postcopy(&["--channels", "2"]);
    assert_eq!(d["load"]["channels"], 2, "{d}");
    assert!(
        d["postcopy"]["channel-pages"].as_u64().unwrap() > 0,
        "background pages came on the page channels: {d}"
    );
}

#[test]
fn plain_source_is_refused_and_the_destination_waits_for_a_tls_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = keygen(dir.path());
    let dst = Incoming::start(&["--tls-dir", &tls_dir(&pki, "dst")]);
    let uri = dst.uri.clone();

    let plain = migrate(&uri, &[]);
    assert!(!plain.status.success(), "a plain source must fail");
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("the destination requires TLS"), "{err}");
    let refused = dst.next_line();
    assert!(
        refused.starts_with("refused a connection: TLS handshake with 127.0.0.1:")
            && refused.contains("is the peer using TLS"),
        "{refused}"
    );

    // Still listening, nothing loaded: a proper source (two page
    // channels) migrates and the digest proves the memory is the source's.
    let src = migrate(
        &uri,
        &["--tls-dir", &tls_dir(&pki, "src"), "--channels", "2"],
    );
    check_tls_pair(&src, dst.finish());
}

#[test]
fn tls_source_is_refused_by_a_plain_destination() {
    let dir = tempfile::tempdir().unwrap();
    let pki = keygen(dir.path());
    let dst = Incoming::start(&[]);
    let uri = dst.uri.clone();
    let src = migrate(&uri, &["--tls-dir", &tls_dir(&pki, "src")]);
    assert!(!src.status.success());
    let err = String::from_utf8_lossy(&src.stderr);
    assert!(
        err.contains("TLS handshake with 127.0.0.1:") && err.contains("is the peer using TLS"),
        "{err}"
    );
    let (ok, json, err) = dst.finish();
    assert!(!ok, "the plain destination must fail");
    // --json: the failure, no result.
    let json = json.expect("a failure object");
    assert_eq!(json["status"], "failed", "{json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("the source is using TLS")),
        "{json}"
    );
    assert!(err.contains("the source is using TLS"), "{err}");
}

#[test]
fn source_of_another_ca_is_refused() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ours, theirs) = (keygen(d1.path()), keygen(d2.path()));
    let dst = Incoming::start(&["--tls-dir", &tls_dir(&ours, "dst")]);
    let uri = dst.uri.clone();

    // Another PKI altogether: the source refuses the destination first.
    let src = migrate(&uri, &["--tls-dir", &tls_dir(&theirs, "src")]);
    assert!(!src.status.success());
    let err = String::from_utf8_lossy(&src.stderr);
    assert!(
        err.contains("TLS handshake with 127.0.0.1:")
            && err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    let refused = dst.next_line();
    assert!(
        refused.starts_with("refused a connection: TLS handshake with")
            && refused.contains("refused this side's certificate"),
        "{refused}"
    );

    // Trusting the destination's CA is not enough: its own certificate is
    // from another CA, and the destination refuses it.
    let ca = ours.join("ca.pem");
    let src = migrate(
        &uri,
        &[
            "--tls-dir",
            &tls_dir(&theirs, "src"),
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
    );
    assert!(!src.status.success());
    let err = String::from_utf8_lossy(&src.stderr);
    assert!(
        err.contains("TLS handshake with") && err.contains("refused this side's certificate"),
        "{err}"
    );
    let refused = dst.next_line();
    assert!(
        refused.starts_with("refused a connection: TLS handshake with")
            && refused.contains("invalid peer certificate: UnknownIssuer"),
        "{refused}"
    );
}

#[test]
fn missing_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let m = missing.to_str().unwrap();
    let out = livemig(&["migrate", "tcp:127.0.0.1:9", "--tls-dir", m])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("CA certificate file {m}/ca.pem")),
        "{err}"
    );
    let out = livemig(&["incoming", "tcp:127.0.0.1:0", "--tls-ca", m])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("go together"),
        "{err}"
    );
}

#[test]
fn vm_migration_over_tls() {
    if !kvm_available("vm_migration_over_tls") {
        return;
    }
    const LAYOUT: &[&str] = &["--mem", "256M", "--vcpus", "2"];
    const GUEST: &[&str] = &["--working-set", "8M", "--rate", "16M", "--warmup", "0.5"];
    let dir = tempfile::tempdir().unwrap();
    let pki = keygen(&dir.path().join("pki"));
    let sock = dir.path().join("mig.sock");
    let uri = format!("unix:{}", sock.display());
    let (dst_tls, src_tls) = (tls_dir(&pki, "dst"), tls_dir(&pki, "src"));
    let mut dest_args = vec![
        "vm-incoming",
        &uri,
        "--seconds",
        "1",
        "--json",
        "--tls-dir",
        &dst_tls,
    ];
    dest_args.extend_from_slice(LAYOUT);
    let dest = livemig(&dest_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&sock);
    let mut src_args = vec!["vm-migrate", &uri, "--json", "--tls-dir", &src_tls];
    src_args.extend_from_slice(LAYOUT);
    src_args.extend_from_slice(GUEST);
    let src = livemig(&src_args).output().unwrap();
    let d_out = dest.wait_with_output().unwrap();
    assert!(
        src.status.success(),
        "vm-migrate: {}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        d_out.status.success(),
        "vm-incoming: {}",
        String::from_utf8_lossy(&d_out.stderr)
    );
    let s = json_of("vm-migrate", &src);
    let d = json_of("vm-incoming", &d_out);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(d["verified"], true, "{d}");
    assert_eq!(d["digest"], s["digest"], "both sides hold the same memory");
    assert_eq!(d["guest"]["self-check"], "passed", "{d}");
    assert_eq!(d["tls"]["protocol"], "TLSv1_3", "{d}");
    assert_eq!(d["tls"]["cipher-suite"], "TLS13_AES_128_GCM_SHA256", "{d}");
}

/// `livemig bench --only tls`: the rows BENCHMARKS.md quotes exist, both
/// sides of each comparison moved the whole guest, every ratio is positive.
/// (The figures themselves mean something only from a release build on an
/// idle machine.)
#[test]
fn bench_reports_the_tls_cost() {
    let out = livemig(&[
        "bench",
        "--quick",
        "--json",
        "--only",
        "tls",
        "--size",
        "8M",
        "--memcpy-size",
        "8M",
        "--link-bytes",
        "16M",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of("bench", &out);
    let t = &v["tls"];
    assert_eq!(t["protocol"], "TLSv1_3", "{t}");
    assert_eq!(t["cipher_suite"], "TLS13_AES_128_GCM_SHA256", "{t}");
    let pos = |x: &Value| x.as_f64().is_some_and(|f| f > 0.0 && f.is_finite());
    assert!(pos(&t["stream"]["bytes_per_sec"]), "{t}");
    assert!(pos(&t["stream_ratio_to_tcp_loopback"]), "{t}");
    let rows = t["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "incompressible, 1ch, plain",
            "incompressible, 1ch, TLS",
            "incompressible, 2ch, plain",
            "incompressible, 2ch, TLS"
        ]
    );
    for r in rows {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["guest_bytes"], 8 << 20, "{r}");
        for k in [
            "guest_bytes_per_sec",
            "stream_ratio_to_tcp_loopback",
            "ratio_to_plain",
            "cpu_secs_per_gib",
        ] {
            assert!(pos(&r[k]), "{k} in {r}");
        }
        // An incompressible guest: the stream carries every page in full.
        let sent = r["runs"][0]["stream_bytes"].as_u64().unwrap();
        assert!(sent >= 8 << 20, "{r}");
    }
}
