//! Fault injection between `livemig` processes: connections cut by a proxy
//! at setup, mid-iteration and at each handshake step, a destination or a
//! source killed mid-migration, a silent peer, a full snapshot disk. The
//! surviving side must say what happened, a destination that never got GO
//! must never start, and the same migration retried must succeed.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{free_addr, json_of, spawn_listening, BIN};
use livemig::testkit::fault_proxy::{Fault, FaultProxy};
use livemig::testkit::workload::XorShift;

/// Process memory: 16 MiB of random bytes (every page goes out raw).
const MEM: &[&str] = &["--size", "16M"];
const SOURCE: &[&str] = &[
    "--fill",
    "random",
    "--dirty-rate",
    "8M",
    "--warmup",
    "0.1",
    "--json",
];

struct Dest {
    child: Child,
    stderr: JoinHandle<String>,
}

/// `livemig incoming` on `addr`, once it says it listens.
fn incoming(addr: SocketAddr, extra: &[&str]) -> Dest {
    let uri = format!("tcp:{addr}");
    let (child, stderr) = spawn_listening(
        Command::new(BIN)
            .args(["incoming", &uri, "--quiet", "--json"])
            .args(MEM)
            .args(extra)
            .stdin(Stdio::null()),
        "waiting for a migration",
    );
    Dest { child, stderr }
}

impl Dest {
    fn finish(self) -> (Output, String) {
        let out = self.child.wait_with_output().unwrap();
        (out, self.stderr.join().unwrap())
    }
}

fn migrate_cmd(uri: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["migrate", uri])
        .args(MEM)
        .args(SOURCE)
        .args(extra)
        .stdin(Stdio::null());
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `text` (what a process said) says each of `parts`.
fn says(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} not said in: {text}");
    }
}

/// A fault-free migration between fresh processes: it completes and the
/// destination proves it holds the source's memory at stop time.
fn retry_succeeds() {
    let addr = free_addr();
    let dest = incoming(addr, &[]);
    let src = migrate_cmd(&format!("tcp:{addr}"), &[]).output().unwrap();
    let (dst, derr) = dest.finish();
    assert!(src.status.success(), "retry source: {}", stderr(&src));
    assert!(dst.status.success(), "retry destination: {derr}");
    let (s, d) = (json_of("source", &src), json_of("destination", &dst));
    assert_eq!(s["status"], "completed");
    assert_eq!(d["verified"], true);
    assert_eq!(s["digest"], d["digest"], "same memory after the retry");
}

fn seeded(seed: u64, lo: u64, hi: u64) -> u64 {
    lo + XorShift::new(seed).next_u64() % (hi - lo)
}

/// One migration through a proxy with `fault`; returns the source's and
/// the destination's output.
fn through(fault: Fault) -> (Output, Output, String) {
    let addr = free_addr();
    let dest = incoming(addr, &[]);
    let proxy = FaultProxy::start(addr, fault).unwrap();
    let src = migrate_cmd(&proxy.uri(), &[]).output().unwrap();
    let (dst, derr) = dest.finish();
    assert!(proxy.has_cut(), "{fault:?} fired");
    (src, dst, derr)
}

#[test]
fn cuts_before_go_fail_both_sides_and_retry_succeeds() {
    let cases = [
        (Fault::CutForwardAt(seeded(11, 0, 4096)), "setup"),
        (
            Fault::CutForwardAt(seeded(12, 2 << 20, 12 << 20)),
            "iteration",
        ),
        (
            Fault::CutForwardAt(seeded(13, 2 << 20, 12 << 20)),
            "iteration",
        ),
        (Fault::CutBeforeReply, "reply"),
    ];
    for (fault, phase) in cases {
        let (src, dst, derr) = through(fault);
        let serr = stderr(&src);
        assert!(!src.status.success(), "{fault:?}: source must fail");
        assert_eq!(json_of("source", &src)["status"], "failed", "{fault:?}");
        assert!(
            serr.contains("sending the stream failed")
                || serr.contains("no LOADED reply")
                // A cut while the source waits, guest running, for the
                // destination to apply what was sent (the DRAIN mark
                // before the pause).
                || serr.contains("no APPLIED reply from the destination to drain mark")
                || serr.contains("no answer from the destination to the migration's setup"),
            "{fault:?}: source says: {serr}"
        );
        assert!(
            !serr.contains("stays paused"),
            "{fault:?}: no GO was sent: {serr}"
        );
        assert!(!dst.status.success(), "{fault:?}: destination must fail");
        // --json: the failure as a JSON object, no result.
        let dj = json_of("destination", &dst);
        assert_eq!(dj["status"], "failed", "{fault:?}: {dj}");
        assert!(dj["error"].as_str().is_some_and(|e| !e.is_empty()), "{dj}");
        let expect = if phase == "reply" {
            "no GO from the source"
        } else {
            "stream byte"
        };
        assert!(derr.contains(expect), "{fault:?}: destination says: {derr}");
    }
    retry_succeeds();
}

#[test]
fn cut_after_loaded_leaves_neither_running() {
    let (src, dst, derr) = through(Fault::CutAfterLoaded);
    assert!(!src.status.success());
    says(
        &stderr(&src),
        &[
            "GO sent",
            "source guest stays paused",
            "This command exits now",
        ],
    );
    assert!(
        !dst.status.success(),
        "no GO: the destination must not take over"
    );
    says(&derr, &["no GO from the source", "never runs"]);
    retry_succeeds();
}

#[test]
fn cut_after_go_leaves_the_destination_running() {
    let (src, dst, derr) = through(Fault::CutAfterGo);
    assert!(!src.status.success());
    says(&stderr(&src), &["did not confirm", "may be running it"]);
    assert!(dst.status.success(), "the destination got GO: {derr}");
    let d = json_of("destination", &dst);
    assert_eq!(d["status"], "completed");
    assert_eq!(d["verified"], true, "its memory is the source's: {d}");
}

/// Waits until the proxy has passed `bytes` forward.
fn wait_forwarded(p: &FaultProxy, bytes: u64) {
    let t = Instant::now();
    while p.forwarded() < bytes {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the migration never got going ({} bytes)",
            p.forwarded()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A migration through a fault-free proxy at 4 MiB/s (mid-stream for
/// seconds), once 2 MiB have gone through; the source's stdout and stderr
/// go to `out()`.
fn mid_stream(out: fn() -> Stdio) -> (Dest, Child, FaultProxy) {
    let addr = free_addr();
    let dest = incoming(addr, &[]);
    let proxy = FaultProxy::start(addr, Fault::None).unwrap();
    let src = migrate_cmd(&proxy.uri(), &["--max-bandwidth", "4M"])
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap();
    wait_forwarded(&proxy, 2 << 20);
    (dest, src, proxy)
}

#[test]
fn killed_destination_fails_the_source_cleanly() {
    let (mut dest, src, _proxy) = mid_stream(Stdio::piped);
    dest.child.kill().unwrap();
    let src = src.wait_with_output().unwrap();
    let _ = dest.finish();
    let serr = stderr(&src);
    assert!(!src.status.success());
    assert_eq!(json_of("source", &src)["status"], "failed");
    assert!(
        serr.contains("sending the stream failed") || serr.contains("no LOADED reply"),
        "{serr}"
    );
    retry_succeeds();
}

#[test]
fn killed_source_never_completes_the_destination() {
    let (dest, mut src, _proxy) = mid_stream(Stdio::null);
    src.kill().unwrap();
    let _ = src.wait();
    let (dst, derr) = dest.finish();
    assert!(!dst.status.success(), "{derr}");
    let dj = json_of("destination", &dst);
    assert_eq!(dj["status"], "failed", "no result, the failure: {dj}");
    assert!(
        dj["error"]
            .as_str()
            .is_some_and(|e| e.contains("stream byte")),
        "{dj}"
    );
    says(&derr, &["loading from tcp:", "stream byte"]);
    retry_succeeds();
}

#[test]
fn silent_source_times_out_naming_it() {
    let addr = free_addr();
    let dest = incoming(addr, &["--io-timeout", "1"]);
    // Connects and sends nothing.
    let _silent = std::net::TcpStream::connect(addr).unwrap();
    let (dst, derr) = dest.finish();
    assert!(!dst.status.success());
    says(
        &derr,
        &[
            "the source at tcp:127.0.0.1:",
            "sent nothing for 1 s (I/O timeout)",
        ],
    );
}

#[test]
fn announced_channels_that_never_come_time_out() {
    use livemig::stream::format::FLAG_CHANNELS;
    use livemig::stream::{BlockDesc, StreamWriter};
    use std::io::Write;
    let addr = free_addr();
    let dest = incoming(addr, &["--io-timeout", "1"]);
    // A main channel announcing two page channels that never connect.
    let mut bytes = Vec::new();
    let mut w = StreamWriter::new(&mut bytes, FLAG_CHANNELS);
    w.channel(0, 2, 7).unwrap();
    w.block_list(&[BlockDesc {
        id: "ram0".into(),
        len: 16 << 20,
    }])
    .unwrap();
    w.section_end(0).unwrap();
    drop(w);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&bytes).unwrap();
    let (dst, derr) = dest.finish();
    drop(s);
    assert!(!dst.status.success());
    says(
        &derr,
        &[
            "accepting connection 1 of 2 page channels",
            "no connection for 1 s (I/O timeout)",
        ],
    );
}

#[test]
fn silent_destination_times_out_naming_it() {
    // Accepts, reads the stream, never replies.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        // Reads until the source gives up and closes.
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let src = migrate_cmd(&format!("tcp:{addr}"), &["--io-timeout", "1"])
        .output()
        .unwrap();
    sink.join().unwrap();
    let serr = stderr(&src);
    assert!(!src.status.success());
    says(
        &serr,
        &[
            &format!("the destination at tcp:{addr} sent nothing for 1 s (I/O timeout)"),
            // It never answered the setup: no page was sent.
            "no answer from the destination to the migration's setup",
        ],
    );
}

#[test]
fn snapshot_to_a_full_disk_names_the_file() {
    let name = "snapshot_to_a_full_disk_names_the_file";
    let dir = tempfile::tempdir().unwrap();
    match Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16M", "tmpfs"])
        .arg(dir.path())
        .output()
    {
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
    let path = dir.path().join("snap.lm");
    let out = Command::new(BIN)
        .arg("save")
        .arg(&path)
        .args([
            "--size",
            "64M",
            "--fill",
            "random",
            "--dirty-rate",
            "0",
            "--quiet",
        ])
        .output()
        .unwrap();
    let _ = Command::new("umount").arg(dir.path()).status();
    let err = stderr(&out);
    assert!(!out.status.success());
    says(
        &err,
        &["No space left on device", &path.display().to_string()],
    );
}

/// `livemig vm-incoming` on a free port behind a proxy with `fault`.
fn vm_incoming_behind(fault: Fault) -> (Child, FaultProxy) {
    let (dest, uri) = vm_incoming();
    let addr: SocketAddr = uri.strip_prefix("tcp:").unwrap().parse().unwrap();
    (dest, FaultProxy::start(addr, fault).unwrap())
}

/// `livemig vm-migrate` of a 64 MiB guest writing 16 MiB/s to `proxy`
/// (more arguments to add).
fn vm_migrate_cmd(proxy: &FaultProxy) -> Command {
    let mut c = Command::new(BIN);
    c.args(["vm-migrate", &proxy.uri()])
        .args(["--mem", "64M", "--vcpus", "1", "--working-set", "16M"])
        .args(["--rate", "16M", "--warmup", "0.3"])
        .stdin(Stdio::null());
    c
}

/// `livemig vm-incoming` on a free port; returns the child and its URI.
fn vm_incoming() -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["vm-incoming", "tcp:127.0.0.1:0", "--announce"])
        .args(["--mem", "64M", "--vcpus", "1", "--seconds", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_string())
}

#[test]
fn vm_source_killed_destination_never_starts_the_guest() {
    if !common::kvm_available("vm_source_killed_destination_never_starts_the_guest") {
        return;
    }
    let (dest, proxy) = vm_incoming_behind(Fault::None);
    let mut src = vm_migrate_cmd(&proxy)
        .args(["--max-bandwidth", "4M", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_forwarded(&proxy, 2 << 20);
    src.kill().unwrap();
    let _ = src.wait();
    let out = dest.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    says(&err, &["loading the VM from tcp:", "stream byte"]);
    assert!(
        !err.contains("resuming the guest"),
        "it must never run: {err}"
    );
}

#[test]
fn vm_destination_killed_source_guest_runs_on() {
    if !common::kvm_available("vm_destination_killed_source_guest_runs_on") {
        return;
    }
    let (mut dest, proxy) = vm_incoming_behind(Fault::None);
    let src = vm_migrate_cmd(&proxy)
        .args(["--max-bandwidth", "4M", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_forwarded(&proxy, 2 << 20);
    dest.kill().unwrap();
    let _ = dest.wait();
    let out = src.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("migration failed: sending the stream failed"),
        "{err}"
    );
    let v = json_of("vm-migrate", &out);
    assert_eq!(v["status"], "failed");
    // The guest state the source saw after the failure: resumed, intact.
    assert_eq!(v["guest"]["self-check"], "passed", "{v}");
    assert_eq!(v["guest"]["failures"], 0, "{v}");
}

/// `vm-migrate` through a proxy with `fault` into `vm-incoming`.
fn vm_through(fault: Fault) -> (Output, Output) {
    let (dest, proxy) = vm_incoming_behind(fault);
    let src = vm_migrate_cmd(&proxy).arg("--quiet").output().unwrap();
    let dst = dest.wait_with_output().unwrap();
    assert!(proxy.has_cut(), "{fault:?} fired");
    (src, dst)
}

#[test]
fn vm_handshake_cuts_start_the_guest_at_most_once() {
    if !common::kvm_available("vm_handshake_cuts_start_the_guest_at_most_once") {
        return;
    }
    // LOADED delivered, GO lost: nobody runs the guest, both say why.
    let (src, dst) = vm_through(Fault::CutAfterLoaded);
    let (serr, derr) = (stderr(&src), stderr(&dst));
    assert!(!src.status.success());
    assert!(serr.contains("source guest stays paused"), "{serr}");
    assert!(!dst.status.success(), "{derr}");
    assert!(derr.contains("no GO from the source"), "{derr}");
    assert!(
        !derr.contains("resuming the guest"),
        "it must never run: {derr}"
    );
    // GO delivered, STARTED lost: the destination runs the guest, the
    // source does not.
    let (src, dst) = vm_through(Fault::CutAfterGo);
    let (serr, derr) = (stderr(&src), stderr(&dst));
    assert!(!src.status.success());
    assert!(serr.contains("may be running it"), "{serr}");
    assert!(dst.status.success(), "{derr}");
    says(
        &derr,
        &["resuming the guest", "self-check passed (0 failures)"],
    );
}

// ---------------------------------------------------------------------------
// Postcopy: a source killed after the switch, and a cut recovered with
// `--recover-on` / `--resume-to`.

/// A child whose stderr lines arrive on a channel as they are written.
struct Watched {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watched {
    fn spawn(cmd: &mut Command) -> Watched {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn livemig");
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Watched {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to `t` for a stderr line containing `what`.
    fn wait_line(&mut self, what: &str, t: Duration) -> bool {
        let end = Instant::now() + t;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(what);
                    self.seen.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Waits up to `t` for the process to end; its exit status and all of
    /// its stderr (None: still running after `t`, then killed).
    fn finish(mut self, t: Duration) -> (Option<std::process::ExitStatus>, String, String) {
        let end = Instant::now() + t;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        (status, out, self.seen.join("\n"))
    }
}

/// A source over `uri` that cannot converge (256 MiB/s of writes against
/// an 8 MiB/s cap): `--postcopy` (auto) switches after the bulk pass.
fn postcopy_source(uri: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["migrate", uri])
        .args(MEM)
        .args([
            "--fill",
            "random",
            "--dirty-rate",
            "256M",
            "--max-bandwidth",
            "8M",
            "--downtime-limit",
            "20",
            "--warmup",
            "0.1",
            "--json",
            "--postcopy",
        ])
        .args(extra)
        .stdin(Stdio::null());
    c
}

fn postcopy_dest(addr: SocketAddr, extra: &[&str]) -> Watched {
    let uri = format!("tcp:{addr}");
    let mut d = Watched::spawn(
        Command::new(BIN)
            .args(["incoming", &uri, "--json", "--postcopy"])
            .args(MEM)
            .args(extra)
            .stdin(Stdio::null()),
    );
    assert!(
        d.wait_line("waiting for a migration", Duration::from_secs(60)),
        "the destination never listened: {:?}",
        d.seen
    );
    d
}

#[test]
fn a_source_killed_during_postcopy_is_reported_by_the_destination() {
    // The kill must land after the switch: the destination says when its
    // guest takes over. A run that completes first (a very fast host) is
    // tried again.
    for attempt in 0..3 {
        let addr = free_addr();
        let mut dest = postcopy_dest(addr, &[]);
        let mut src = Watched::spawn(&mut postcopy_source(&format!("tcp:{addr}"), &[]));
        let switched = dest.wait_line(
            "resumed here after the source's GO",
            Duration::from_secs(120),
        );
        assert!(
            switched,
            "the guest never resumed on the destination: {:?}",
            dest.seen
        );
        let _ = src.child.kill();
        let (src_status, _, _) = src.finish(Duration::from_secs(30));
        // No hang: the destination ends by itself, with an error.
        let (status, out, err) = dest.finish(Duration::from_secs(60));
        let status =
            status.unwrap_or_else(|| panic!("the destination hangs after the source died: {err}"));
        if status.success() {
            eprintln!(
                "attempt {attempt}: postcopy completed before the kill ({src_status:?}); again"
            );
            continue;
        }
        assert!(
            err.contains("lost the source during postcopy")
                && err.contains("cannot continue and cannot be saved"),
            "the destination must say it lost the source: {err}"
        );
        let d: serde_json::Value = serde_json::from_str(out.trim()).expect("destination JSON");
        assert_eq!(d["status"], "failed", "{d}");
        assert!(
            d["error"]
                .as_str()
                .is_some_and(|e| e.contains("lost the source during postcopy")),
            "{d}"
        );
        return;
    }
    panic!("postcopy completed before every kill");
}

#[test]
fn postcopy_cut_with_page_channels_and_urgent_is_recovered_on_all_connections() {
    // 2 page channels and the urgent connection: the main connection's
    // return path (LOADED, STARTED, then page requests and PROGRESS) is
    // cut 600 bytes in, inside postcopy. The recovery reopens the urgent
    // connection and both page channels to --recover-on.
    let addr = free_addr();
    let rec = format!("tcp:{}", free_addr());
    let mut dest = postcopy_dest(addr, &["--recover-on", &rec]);
    let proxy = FaultProxy::start(addr, Fault::CutBackAt(600)).unwrap();
    let src = postcopy_source(
        &proxy.uri(),
        &["--resume-to", &rec, "--channels", "2", "--postcopy-preempt"],
    )
    .output()
    .unwrap();
    let _ = dest.wait_line("", Duration::ZERO);
    let (status, out, err) = dest.finish(Duration::from_secs(120));
    let status = status.unwrap_or_else(|| panic!("the destination hangs: {err}"));
    let serr = stderr(&src);
    assert!(src.status.success(), "source: {serr}");
    assert!(status.success(), "destination: {err}");
    assert!(proxy.has_cut());
    says(&err, &["the source reconnected"]);
    says(
        &serr,
        &[
            "postcopy paused",
            "reopened the urgent connection",
            "reopened page channel 1",
            "reopened page channel 2",
        ],
    );
    assert_eq!(
        err.matches("accepted a reopened connection").count(),
        3,
        "{err}"
    );
    let s = json_of("source", &src);
    let d: serde_json::Value = serde_json::from_str(out.trim()).expect("destination JSON");
    assert_eq!(s["status"], "completed", "{s}");
    assert!(s["postcopy-time"].is_u64(), "{s}");
    assert_eq!(s["digest"], d["digest"], "same memory after the recovery");
}

#[test]
fn postcopy_cut_is_recovered_with_resume_to_and_recover_on() {
    // Through a proxy that cuts the main connection during postcopy (16
    // MiB of random memory at 8 MiB/s; `auto` switches within the first
    // pass, a few hundred ms in, so the cut lands in the push); both
    // sides pause, the
    // destination listens on --recover-on, the source reconnects there
    // (--resume-to) and the migration completes with the same memory.
    // A cut that lands before the switch fails the run (no recovery in
    // precopy): tried again, later.
    for (attempt, cut) in [6u64 << 20, 9 << 20, 12 << 20].into_iter().enumerate() {
        let addr = free_addr();
        let rec = format!("tcp:{}", free_addr());
        let mut dest = postcopy_dest(addr, &["--recover-on", &rec]);
        let proxy = FaultProxy::start(addr, Fault::CutForwardAt(cut)).unwrap();
        let src = postcopy_source(&proxy.uri(), &["--resume-to", &rec])
            .output()
            .unwrap();
        let _ = dest.wait_line("", Duration::ZERO);
        let (status, out, err) = dest.finish(Duration::from_secs(120));
        let status = status.unwrap_or_else(|| panic!("the destination hangs: {err}"));
        let serr = stderr(&src);
        if !serr.contains("postcopy paused") {
            eprintln!("attempt {attempt}: the cut at {cut} did not land in postcopy: {serr}");
            continue;
        }
        assert!(src.status.success(), "source: {serr}");
        assert!(status.success(), "destination: {err}");
        assert!(proxy.has_cut());
        says(&err, &["postcopy paused", "the source reconnected"]);
        says(&serr, &["reconnected to"]);
        let s = json_of("source", &src);
        let d: serde_json::Value = serde_json::from_str(out.trim()).expect("destination JSON");
        assert_eq!(s["status"], "completed", "{s}");
        assert!(s["postcopy-time"].is_u64(), "{s}");
        assert_eq!(s["digest"], d["digest"], "same memory after the recovery");
        return;
    }
    panic!("no cut landed in postcopy");
}
