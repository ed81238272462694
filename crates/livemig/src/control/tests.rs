//! The control socket steering real migrations of process memory.

use std::thread;
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::*;
use crate::dirty::{UffdMode, UffdTracker};
use crate::engine::{Loader, MigrationHandle, Params, Source, Status};
use crate::memory::{GuestMemory, ProcessMemory};
use crate::testkit::workload::{
    direct_writer, fill_random, Workload, WorkloadConfig, WorkloadControl,
};
use crate::transport::pipe;
use crate::transport::Uri;

/// Starts migrations of `mem` into a fresh destination over a pipe.
struct PipeStarter {
    mem: ProcessMemory,
    control: WorkloadControl,
    threads: Vec<thread::JoinHandle<()>>,
}

impl MigrationStarter for PipeStarter {
    fn start_outgoing(
        &mut self,
        _uri: &Uri,
        _tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let mut tracker = UffdTracker::new(&self.mem, UffdMode::Auto).map_err(|e| e.to_string())?;
        let (w, r) = pipe();
        let dst =
            ProcessMemory::new(&[("ram", self.mem.total_bytes())]).map_err(|e| e.to_string())?;
        let (mem, mut control) = (self.mem.clone(), self.control.clone());
        if handle.params().postcopy_ram {
            // Postcopy needs the return path, owned by the engine.
            let (ack_w, ack_r) = pipe();
            self.threads.push(thread::spawn(move || {
                let _ = crate::engine::postcopy::receive(
                    &dst,
                    r,
                    Some(Box::new(ack_w)),
                    &mut MemoryOnly,
                    true,
                    None,
                );
            }));
            let conn = crate::transport::Outgoing {
                writer: Box::new(w),
                ack: Some(Box::new(ack_r)),
            };
            self.threads.push(thread::spawn(move || {
                let _ = Source::new(&mem, &mut tracker, &mut control, handle).run_over(conn);
            }));
            return Ok(());
        }
        self.threads.push(thread::spawn(move || {
            let _ = Loader::new(&dst).load(r);
        }));
        self.threads.push(thread::spawn(move || {
            let _ = Source::new(&mem, &mut tracker, &mut control, handle).run(w, None);
        }));
        Ok(())
    }

    fn start_incoming(
        &mut self,
        uri: &Uri,
        _tls: Option<&MigrationTls>,
        _handle: MigrationHandle,
    ) -> Result<(), String> {
        Err(format!("this test VMM does not receive ({uri})"))
    }
}

/// A destination with memory only: nothing to restore or run.
struct MemoryOnly;

impl crate::engine::postcopy::IncomingGuest for MemoryOnly {
    fn restore(&mut self, _: &[u8]) -> Result<(), crate::vm::VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), crate::vm::VmError> {
        Ok(())
    }
    fn pause(&mut self) {}
}

#[test]
fn migrate_start_postcopy_switches_a_running_migration() {
    // 4 MiB/s: precopy of 32 MiB is still running when the command comes.
    let Some((f, mut c)) = migrating_fixture(Params {
        max_bandwidth: 4 << 20,
        ..Params::default()
    }) else {
        return;
    };
    let e = c
        .execute("migrate-start-postcopy", Value::Null)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no migration is running"), "{e}");
    c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
    )
    .unwrap();
    let caps = c
        .execute("query-migrate-capabilities", Value::Null)
        .unwrap();
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "postcopy-ram", "state": true})));
    c.execute("migrate", json!({"uri": "tcp:127.0.0.1:1"}))
        .unwrap();
    wait_status(&mut c, &["active"]);
    c.execute("migrate-start-postcopy", Value::Null).unwrap();
    let s = wait_status(&mut c, &["completed", "failed"]);
    assert_eq!(s["status"], "completed", "{s}");
    assert!(s["postcopy-time"].is_u64(), "{s}");
    assert!(s["postcopy-latency-dist"].is_array(), "{s}");
    assert!(s["ram"]["postcopy-bytes"].as_u64().unwrap() > 0, "{s}");
    drop(f.workload);
}

fn uffd_usable() -> bool {
    match crate::dirty::UffdSupport::probe() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED control socket migration tests: {e}");
            false
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    server: ControlServer,
    workload: Workload,
}

/// Fills `mem` with random pages (seed `seed`) and starts a workload
/// writing it at 16 MiB/s.
fn random_workload(mem: &ProcessMemory, seed: u64) -> Workload {
    let writer = direct_writer(mem.blocks().to_vec());
    fill_random(mem.blocks(), &writer, seed);
    Workload::start(
        mem.blocks().to_vec(),
        writer,
        WorkloadConfig {
            rate: 16 << 20,
            ..WorkloadConfig::default()
        },
    )
}

fn fixture(params: Params) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let mem = ProcessMemory::single(32 << 20).unwrap();
    let workload = random_workload(&mem, 9);
    let starter = PipeStarter {
        mem,
        control: workload.control(),
        threads: Vec::new(),
    };
    let server = ControlServer::start(&path, params, Box::new(starter)).unwrap();
    Fixture {
        _dir: dir,
        path,
        server,
        workload,
    }
}

/// For the tests that migrate (userfaultfd tracking): a [`fixture`] and a
/// client connected to it, or None (the test skipped) without
/// userfaultfd.
fn migrating_fixture(params: Params) -> Option<(Fixture, ControlClient)> {
    if !uffd_usable() {
        return None;
    }
    let f = fixture(params);
    let c = ControlClient::connect(&f.path).unwrap();
    Some((f, c))
}

fn wait_status(c: &mut ControlClient, want: &[&str]) -> Value {
    let t0 = Instant::now();
    loop {
        let s = c.execute("query-migrate", Value::Null).unwrap();
        if want.contains(&s["status"].as_str().unwrap_or("")) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "status stuck at {s}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn err(r: Result<Value, ControlError>) -> String {
    match r {
        Err(ControlError::Command { class, desc }) => format!("{class}: {desc}"),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[test]
fn parameters_and_capabilities_with_qemu_names() {
    let f = fixture(Params::default());
    let mut c = ControlClient::connect(&f.path).unwrap();
    assert_eq!(c.execute("query-migrate", Value::Null).unwrap(), json!({}));
    c.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": 42, "max-bandwidth": 1000000, "multifd-channels": 3,
               "vcpu-dirty-limit": 8, "multifd-compression": "zstd", "multifd-zstd-level": 3,
               "tls-hostname": "dst.example"}),
    )
    .unwrap();
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["downtime-limit"], 42);
    assert_eq!(p["max-bandwidth"], 1000000);
    assert_eq!(p["multifd-channels"], 3);
    assert_eq!(p["vcpu-dirty-limit"], 8);
    assert_eq!(p["multifd-compression"], "zstd");
    assert_eq!(p["tls-creds"], "");
    assert_eq!(p["tls-hostname"], "dst.example");
    assert_eq!(p["mode"], "normal");
    c.execute("migrate-set-parameters", json!({"mode": "local"}))
        .unwrap();
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["mode"], "local");
    assert!(
        err(c.execute("migrate-set-parameters", json!({"mode": "cpr-transfer"})))
            .contains("'mode' does not accept value 'cpr-transfer' (normal, local)")
    );
    c.execute("migrate-set-parameters", json!({"mode": "normal"}))
        .unwrap();
    c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true},
                                {"capability": "multifd", "state": true},
                                {"capability": "dirty-limit", "state": true},
                                {"capability": "events", "state": true},
                                {"capability": "return-path", "state": true}]}),
    )
    .unwrap();
    let caps = c
        .execute("query-migrate-capabilities", Value::Null)
        .unwrap();
    for name in ["xbzrle", "multifd", "dirty-limit", "events", "return-path"] {
        assert!(
            caps.as_array()
                .unwrap()
                .contains(&json!({"capability": name, "state": true})),
            "{name}: {caps}"
        );
    }

    assert_eq!(
        err(c.execute("migrate-set-parameters", json!({"no-such": 1}))),
        "GenericError: Parameter 'no-such' is unexpected"
    );
    assert_eq!(
        err(c.execute("migrate-set-parameters", json!({"downtime-limit": "soon"}))),
        "GenericError: Invalid parameter type for 'downtime-limit', expected: integer"
    );
    assert!(
        err(c.execute("migrate-set-parameters", json!({"max-cpu-throttle": 100})))
            .contains("'max-cpu-throttle' expects an integer in the range of 1 to 99")
    );
    assert!(err(c.execute(
        "migrate-set-parameters",
        json!({"multifd-compression": "zlib"})
    ))
    .contains("does not accept value 'zlib'"));
    assert!(err(c.execute(
        "migrate-set-parameters",
        json!({"tls-creds": "/no/such/dir"})
    ))
    .contains("not a directory"));
    assert!(err(c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "teleport", "state": true}]})
    ))
    .contains("does not accept value 'teleport'"));
    assert!(err(c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "return-path", "state": false}]})
    ))
    .contains("always uses the return path"));
    assert!(
        err(c.execute("migrate-set-capabilities", json!({"capabilities": 3})))
            .contains("expected: array")
    );
    assert!(err(c.execute("migrate", json!({"uri": "udp:x:1"}))).contains("bad migration URI"));
    assert!(err(c.execute("migrate", json!({}))).contains("need either 'uri' or 'channels'"));
    assert!(
        err(c.execute("migrate", json!({"uri": "tcp:127.0.0.1:9", "blk": true})))
            .contains("Parameter 'blk' is unexpected")
    );
    assert!(err(c.execute("query-migrate", json!({"verbose": true})))
        .contains("Parameter 'verbose' is unexpected"));
    assert!(
        err(c.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:1"})))
            .contains("does not receive")
    );
    assert_eq!(
        err(c.execute("frobnicate", Value::Null)),
        "CommandNotFound: The command frobnicate has not been found"
    );
    // Refused requests changed nothing.
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["downtime-limit"], 42);
    // What the next migration uses, in livemig's units.
    let (d, _) = dispatcher();
    let mut out = Vec::new();
    let input = br#"{"execute":"qmp_capabilities"}
        {"execute":"migrate-set-parameters","arguments":{"multifd-channels":3,"vcpu-dirty-limit":8,"multifd-compression":"lz4"}}
        {"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"dirty-limit","state":true}]}}"#;
    d.serve(&input[..], &mut out, &AtomicBool::new(false))
        .unwrap();
    let p = d.params();
    assert_eq!(
        p.channels, 1,
        "multifd-channels counts only with multifd on"
    );
    assert_eq!(p.dirty_limit, 8 << 20, "MB/s per vCPU");
    assert_eq!(
        p.compress.map(|c| c.algorithm),
        Some(crate::codec::compress::Algorithm::Lz4)
    );
    drop(f.workload);
}

#[test]
fn greeting_negotiation_ids_and_malformed_requests() {
    let f = fixture(Params::default());
    let mut c = ControlClient::connect_raw(&f.path).unwrap();
    let g = c.greeting().clone();
    assert_eq!(g["QMP"]["capabilities"], json!([]), "{g}");
    assert!(g["QMP"]["version"]["qemu"]["major"].is_u64(), "{g}");
    assert!(g["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("livemig"));
    // Before negotiation: refused as QEMU refuses.
    assert_eq!(
        err(c.execute("query-migrate", Value::Null)),
        "CommandNotFound: Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    assert!(
        err(c.execute("qmp_capabilities", json!({"enable": ["oob"]}))).contains("not available")
    );
    c.execute("qmp_capabilities", Value::Null).unwrap();
    assert!(err(c.execute("qmp_capabilities", Value::Null)).contains("already complete"));
    // The id comes back, whatever its type.
    let a = c
        .raw(br#"{"execute": "query-version", "id": {"n": [1, "x"]}}"#)
        .unwrap();
    assert_eq!(a["id"], json!({"n": [1, "x"]}), "{a}");
    assert_eq!(a["return"]["package"], g["QMP"]["version"]["package"]);
    let a = c.raw(br#"{"execute": "frob", "id": 17}"#).unwrap();
    assert_eq!(
        (a["id"].clone(), a["error"]["class"].clone()),
        (json!(17), json!("CommandNotFound"))
    );
    let a = c.raw(br#"{"exec-oob": "query-status", "id": 1}"#).unwrap();
    assert_eq!(
        a["error"]["desc"], "QMP input member 'exec-oob' is unexpected",
        "{a}"
    );
    let a = c.raw(b"{not json\n").unwrap();
    assert!(
        a["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("JSON parse error"),
        "{a}"
    );
    let a = c.raw(b"[1,2]").unwrap();
    assert_eq!(a["error"]["desc"], "QMP input must be a JSON object", "{a}");
    let a = c.raw(br#"{"id": 3}"#).unwrap();
    assert_eq!(
        a["error"]["desc"], "QMP input lacks member 'execute'",
        "{a}"
    );
    let a = c
        .raw(b"{\"execute\": \"query-migrate\", \"arguments\": 5}\n")
        .unwrap();
    assert_eq!(
        a["error"]["desc"], "QMP input member 'arguments' must be an object",
        "{a}"
    );
    // `stop` on a VMM that does not implement it is a clear error; `cont`
    // of a running guest does nothing, as in QEMU.
    let a = c.raw(b"{\"execute\": \"stop\"}").unwrap();
    assert!(
        a["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("cannot pause its guest from the control socket"),
        "{a}"
    );
    assert_eq!(c.execute("cont", Value::Null).unwrap(), json!({}));
    let cmds = c.execute("query-commands", Value::Null).unwrap();
    assert!(cmds
        .as_array()
        .unwrap()
        .contains(&json!({"name": "migrate"})));
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap(),
        json!({"running": true, "status": "running"})
    );
    // An over-long request is refused and the connection closed.
    let mut long = b"{\"execute\": \"query-migrate\", \"x\": \"".to_vec();
    long.extend(std::iter::repeat_n(b'x', MAX_LINE));
    long.extend(b"\"}");
    let a = c.raw(&long).unwrap();
    assert!(
        a["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{a}"
    );
    assert!(
        c.execute("query-migrate", Value::Null).is_err(),
        "closed after an over-long request"
    );
    // Other clients are unaffected.
    let mut c2 = ControlClient::connect(&f.path).unwrap();
    assert_eq!(c2.execute("query-migrate", Value::Null).unwrap(), json!({}));
}

#[test]
fn requests_need_no_newline() {
    let f = fixture(Params::default());
    let mut s = UnixStream::connect(&f.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // Two requests in one write, no newline, the connection left open:
    // both are answered.
    s.write_all(br#"{"execute":"qmp_capabilities","id":1}{"execute":"query-status","id":2}"#)
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.iter().filter(|&&b| b == b'\n').count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(got).unwrap();
    let lines: Vec<Value> = text
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0].get("QMP").is_some());
    assert_eq!(lines[1], json!({"return": {}, "id": 1}));
    assert_eq!(lines[2]["id"], 2);
    assert_eq!(lines[2]["return"]["status"], "running");
}

#[test]
fn migration_events_reach_negotiated_clients() {
    let Some((_f, mut c)) = migrating_fixture(Params::default()) else {
        return;
    };
    c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .unwrap();
    // The channels form of migrate.
    c.execute(
        "migrate",
        json!({"channels": [{"channel-type": "main",
            "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "9"}}]}),
    )
    .unwrap();
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while !seen.contains(&"MIGRATION completed".to_string()) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "events so far: {seen:?}"
        );
        let Some(e) = c.next_event(Duration::from_secs(1)).unwrap() else {
            continue;
        };
        assert!(e["timestamp"]["seconds"].is_u64(), "{e}");
        let name = e["event"].as_str().unwrap().to_string();
        seen.push(match name.as_str() {
            "MIGRATION" => format!("MIGRATION {}", e["data"]["status"].as_str().unwrap()),
            "MIGRATION_PASS" => format!("MIGRATION_PASS {}", e["data"]["pass"]),
            _ => name,
        });
    }
    let pos = |s: &str| seen.iter().position(|x| x == s);
    let (setup, active, stop, device, done) = (
        pos("MIGRATION setup"),
        pos("MIGRATION active"),
        pos("STOP"),
        pos("MIGRATION device"),
        pos("MIGRATION completed"),
    );
    assert!(
        setup < active && active < stop && stop < device && device < done && setup.is_some(),
        "{seen:?}"
    );
    assert!(pos("MIGRATION_PASS 1").is_some(), "{seen:?}");
    assert!(pos("RESUME").is_none(), "{seen:?}");
    assert_eq!(
        c.execute("query-migrate", Value::Null).unwrap()["status"],
        "completed"
    );
}

/// Starts nothing outgoing; incoming: reports `active` then `completed`
/// through the handle, as a VMM does.
struct RecordingStarter(std::sync::Arc<Mutex<Vec<String>>>);

impl MigrationStarter for RecordingStarter {
    fn start_outgoing(
        &mut self,
        uri: &Uri,
        tls: Option<&MigrationTls>,
        _handle: MigrationHandle,
    ) -> Result<(), String> {
        let tls = tls
            .map(|t| format!(" tls {}", t.dir.display()))
            .unwrap_or_default();
        self.0.lock().unwrap().push(format!("out {uri}{tls}"));
        Ok(())
    }
    fn start_incoming(
        &mut self,
        uri: &Uri,
        _tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("in {uri}"));
        if uri.to_string().contains("refuse") {
            return Err("no incoming here".into());
        }
        handle.set_status(Status::Active, None);
        handle.set_status(Status::Completed, None);
        Ok(())
    }
}

fn dispatcher() -> (Dispatcher, std::sync::Arc<Mutex<Vec<String>>>) {
    let calls = std::sync::Arc::new(Mutex::new(Vec::new()));
    let d = Dispatcher::new(Params::default(), Box::new(RecordingStarter(calls.clone())));
    (d, calls)
}

fn session(d: &Dispatcher, input: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    d.serve(input, &mut out, &AtomicBool::new(false)).unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn session_answers_each_request_and_the_last_one_without_newline() {
    let (d, calls) = dispatcher();
    let dir = tempfile::tempdir().unwrap();
    let input = format!(
        "{{\"execute\":\"qmp_capabilities\"}}{{\"execute\":\"query-migrate\"}}\n\n   \n{{\"execute\":\"nope\"}}\r\n\
         {{\"execute\":\"migrate-set-parameters\",\"arguments\":{{\"tls-creds\":\"{}\"}}}}\
         {{\"execute\":\"migrate\",\"arguments\":{{\"channels\":[{{\"channel-type\":\"main\",\"addr\":{{\"transport\":\"socket\",\"type\":\"unix\",\"path\":\"/tmp/x.sock\"}}}}]}}}}",
        dir.path().display()
    );
    let answers = session(&d, input.as_bytes());
    assert_eq!(answers.len(), 6, "greeting + 5 answers: {answers:?}");
    assert!(answers[0].get("QMP").is_some());
    assert_eq!(answers[2]["return"], json!({}));
    assert_eq!(answers[3]["error"]["class"], "CommandNotFound");
    assert_eq!(answers[5]["return"], json!({}));
    assert_eq!(
        *calls.lock().unwrap(),
        vec![format!("out unix:/tmp/x.sock tls {}", dir.path().display())]
    );
    assert!(d.current().is_some());
}

#[test]
fn the_destination_reports_its_status_and_events() {
    let (d, _) = dispatcher();
    let input = br#"{"execute":"qmp_capabilities"}
        {"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}
        {"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}
        {"execute":"query-migrate"}"#;
    let answers = session(&d, input);
    let events: Vec<&Value> = answers
        .iter()
        .filter(|a| a.get("event").is_some())
        .collect();
    assert_eq!(events.len(), 2, "{answers:?}");
    assert_eq!(events[0]["data"]["status"], "active");
    assert_eq!(events[1]["data"]["status"], "completed");
    let last = answers.last().unwrap();
    assert_eq!(
        last["return"],
        json!({"status": "completed"}),
        "{answers:?}"
    );
}

#[test]
fn session_ends_on_an_over_long_request_with_an_error() {
    let (d, _) = dispatcher();
    let mut input = b"{\"a\":\"".to_vec();
    input.extend(std::iter::repeat_n(b'y', MAX_LINE + 10));
    input.extend_from_slice(b"\"}\n{\"execute\":\"query-migrate\"}\n");
    let answers = session(&d, &input);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let desc = answers[1]["error"]["desc"].as_str().unwrap();
    assert!(desc.contains("longer than"), "{desc}");
}

#[test]
fn a_capability_cannot_make_the_parameters_invalid() {
    let (d, _) = dispatcher();
    let answers = session(
        &d,
        br#"{"execute":"qmp_capabilities"}
        {"execute":"migrate-set-parameters","arguments":{"xbzrle-cache-size":0}}
        {"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-livemig-verify","state":true},{"capability":"xbzrle","state":true}]}}"#,
    );
    assert_eq!(answers[2]["return"], json!({}), "{answers:?}");
    let desc = answers[3]["error"]["desc"].as_str().expect("refused");
    assert!(desc.contains("xbzrle-cache-size"), "{desc}");
    // Nothing changed, not even the capability listed before the bad one.
    let p = d.params();
    assert!(!p.xbzrle);
    assert!(!p.verify);
    p.validate().unwrap();
}

#[test]
fn the_socket_path_is_never_taken_from_someone_else() {
    let dir = tempfile::tempdir().unwrap();
    let starter = || Box::new(RecordingStarter(Default::default())) as Box<dyn MigrationStarter>;
    // A regular file: an error, the file untouched.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let e = ControlServer::start(&file, Params::default(), starter())
        .err()
        .unwrap();
    assert!(matches!(e, ControlError::NotASocket { .. }), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    // A live socket: an error, the socket still served.
    let live = dir.path().join("live.sock");
    let first = ControlServer::start(&live, Params::default(), starter()).unwrap();
    let e = ControlServer::start(&live, Params::default(), starter())
        .err()
        .unwrap();
    assert!(matches!(e, ControlError::InUse { .. }), "{e}");
    assert!(
        e.to_string().contains("another process is listening"),
        "{e}"
    );
    ControlClient::connect(&live).unwrap();
    drop(first);
    assert!(!live.exists(), "the server removes its own socket");
    // A stale socket (nobody listens): replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let s = ControlServer::start(&stale, Params::default(), starter()).unwrap();
    ControlClient::connect(&stale).unwrap();
    // Someone else's file put in its place is not removed on drop.
    std::fs::remove_file(&stale).unwrap();
    std::fs::write(&stale, b"other").unwrap();
    drop(s);
    assert_eq!(std::fs::read(&stale).unwrap(), b"other");
}

#[test]
fn migrate_steer_cancel_and_migrate_again() {
    // 2 MiB/s: slow enough to steer and cancel mid-round.
    let Some((f, mut c)) = migrating_fixture(Params {
        max_bandwidth: 2 << 20,
        ..Params::default()
    }) else {
        return;
    };
    c.execute("migrate", json!({"uri": "tcp:127.0.0.1:9"}))
        .unwrap();
    wait_status(&mut c, &["active"]);
    let err = c
        .execute("migrate", json!({"uri": "tcp:127.0.0.1:9"}))
        .unwrap_err();
    assert!(
        err.to_string().contains("migration process in progress"),
        "{err}"
    );
    // A parameter change reaches the running migration.
    c.execute("migrate-set-parameters", json!({"max-bandwidth": 3 << 20}))
        .unwrap();
    let running = f.server.current().unwrap();
    assert_eq!(running.params().max_bandwidth, 3 << 20);
    // Cancel: the guest runs on.
    c.execute("migrate-cancel", Value::Null).unwrap();
    let s = wait_status(&mut c, &["cancelled", "failed"]);
    assert_eq!(s["status"], "cancelled", "{s}");
    let before = f.workload.pages_written();
    thread::sleep(Duration::from_millis(100));
    assert!(
        f.workload.pages_written() > before,
        "the workload still writes after cancel"
    );
    // A new migration right after, unlimited: completes.
    c.execute("migrate-set-parameters", json!({"max-bandwidth": 0}))
        .unwrap();
    c.execute("migrate", json!({"uri": "tcp:127.0.0.1:9"}))
        .unwrap();
    let s = wait_status(&mut c, &["completed", "failed", "cancelled"]);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(
        f.server.current().unwrap().stats().status,
        Status::Completed
    );
}

/// Migrations over TCP: outgoing from `mem`, or incoming into it with
/// postcopy recovery allowed.
struct TcpStarter {
    mem: ProcessMemory,
    control: Option<WorkloadControl>,
}

impl MigrationStarter for TcpStarter {
    fn start_outgoing(
        &mut self,
        uri: &Uri,
        _tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let mut tracker = UffdTracker::new(&self.mem, UffdMode::Auto).map_err(|e| e.to_string())?;
        let (mem, mut control, uri) =
            (self.mem.clone(), self.control.clone().unwrap(), uri.clone());
        thread::spawn(move || {
            let conn = crate::transport::connect(&uri).unwrap();
            let _ =
                Source::new(&mem, &mut tracker, &mut control, handle).run_conn(conn, &mut |_| {
                    Ok(crate::transport::connect(&uri)
                        .map_err(std::io::Error::other)?
                        .writer)
                });
        });
        Ok(())
    }

    fn start_incoming(
        &mut self,
        uri: &Uri,
        _tls: Option<&MigrationTls>,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        let l = crate::transport::Listener::bind(uri).map_err(|e| e.to_string())?;
        handle.set_status(Status::Active, None);
        let mem = self.mem.clone();
        thread::spawn(move || {
            let inc = l.accept().unwrap();
            let mut accept = || -> std::io::Result<Box<dyn Read + Send>> {
                l.accept().map(|i| i.reader).map_err(std::io::Error::other)
            };
            let r = crate::engine::postcopy::receive_recoverable(
                &mem,
                inc.reader,
                inc.ack,
                &mut MemoryOnly,
                true,
                Some(&mut accept),
                &handle,
            );
            match r {
                Ok(_) => handle.set_status(Status::Completed, None),
                Err(e) => handle.set_status(Status::Failed, Some(e.to_string())),
            }
        });
        Ok(())
    }
}

fn free_tcp_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("tcp:{}", l.local_addr().unwrap())
}

#[test]
fn postcopy_recovers_over_qmp_after_a_cut() {
    use crate::testkit::fault_proxy::{Fault, FaultProxy};
    if !uffd_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mem = ProcessMemory::single(16 << 20).unwrap();
    let dst = ProcessMemory::single(16 << 20).unwrap();
    let workload = random_workload(&mem, 3);
    let (sp, dp) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    // 4 MiB/s: the 16 MiB postcopy push is under way when the cut comes.
    let params = Params {
        max_bandwidth: 4 << 20,
        ..Params::default()
    };
    let src_starter = TcpStarter {
        mem: mem.clone(),
        control: Some(workload.control()),
    };
    let dst_starter = TcpStarter {
        mem: dst.clone(),
        control: None,
    };
    let _s = ControlServer::start(&sp, params.clone(), Box::new(src_starter)).unwrap();
    let _d = ControlServer::start(&dp, params, Box::new(dst_starter)).unwrap();
    let (mut sc, mut dc) = (
        ControlClient::connect(&sp).unwrap(),
        ControlClient::connect(&dp).unwrap(),
    );
    let caps = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]});
    sc.execute("migrate-set-capabilities", caps.clone())
        .unwrap();
    dc.execute("migrate-set-capabilities", caps).unwrap();
    // Nothing to recover yet.
    let e = err(dc.execute("migrate-recover", json!({"uri": free_tcp_port()})));
    assert!(e.contains("no incoming migration to recover"), "{e}");
    let dst_uri = free_tcp_port();
    dc.execute("migrate-incoming", json!({"uri": dst_uri}))
        .unwrap();
    let Uri::Tcp(addr) = dst_uri.parse::<Uri>().unwrap() else {
        unreachable!()
    };
    let proxy = FaultProxy::start(addr.parse().unwrap(), Fault::CutForwardAt(2 << 20)).unwrap();
    sc.execute("migrate", json!({"uri": proxy.uri()})).unwrap();
    sc.execute("migrate-start-postcopy", Value::Null).unwrap();
    wait_status(&mut sc, &["postcopy-paused"]);
    wait_status(&mut dc, &["postcopy-paused"]);
    assert!(proxy.has_cut());
    let e = err(sc.execute("migrate", json!({"uri": free_tcp_port(), "resume": "yes"})));
    assert!(e.contains("resume"), "{e}");
    let again = free_tcp_port();
    dc.execute("migrate-recover", json!({"uri": again}))
        .unwrap();
    sc.execute("migrate", json!({"uri": again, "resume": true}))
        .unwrap();
    let s = wait_status(&mut sc, &["completed", "failed"]);
    assert_eq!(s["status"], "completed", "{s}");
    let d = wait_status(&mut dc, &["completed", "failed"]);
    assert_eq!(d["status"], "completed", "{d}");
    drop(workload);
    assert_eq!(
        crate::engine::hex(&crate::engine::memory_digest(&mem)),
        crate::engine::hex(&crate::engine::memory_digest(&dst)),
    );
}

/// Records snapshot saves and restores with their options.
struct FileStarter(std::sync::Arc<Mutex<Vec<String>>>);

impl MigrationStarter for FileStarter {
    fn start_outgoing(
        &mut self,
        uri: &Uri,
        _tls: Option<&MigrationTls>,
        _handle: MigrationHandle,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("stream out {uri}"));
        Ok(())
    }
    fn start_incoming(
        &mut self,
        uri: &Uri,
        _tls: Option<&MigrationTls>,
        _handle: MigrationHandle,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("stream in {uri}"));
        Ok(())
    }
    fn start_snapshot(
        &mut self,
        path: &std::path::Path,
        o: &super::FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push(format!(
            "save {} bg={} threads={} direct={}",
            path.display(),
            o.background_snapshot,
            o.threads,
            o.direct_io
        ));
        handle.set_status(Status::Completed, None);
        Ok(())
    }
    fn start_restore(
        &mut self,
        path: &std::path::Path,
        o: &super::FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push(format!("restore {} lazy={}", path.display(), o.lazy));
        handle.set_status(Status::PostcopyActive, None);
        Ok(())
    }
}

#[test]
fn snapshot_capabilities_reach_the_vmm_and_a_vmm_without_them_refuses() {
    let calls = std::sync::Arc::new(Mutex::new(Vec::new()));
    let d = Dispatcher::new(Params::default(), Box::new(FileStarter(calls.clone())));
    let (dir, mr) = saved_snapshot();
    let input = format!(
        r#"{{"execute":"qmp_capabilities"}}
        {{"execute":"migrate-set-capabilities","arguments":{{"capabilities":[{{"capability":"background-snapshot","state":true}},{{"capability":"multifd","state":true}}]}}}}
        {{"execute":"migrate-set-parameters","arguments":{{"multifd-channels":3,"direct-io":true,"x-livemig-lazy":true}}}}
        {{"execute":"query-migrate-parameters"}}
        {{"execute":"migrate","arguments":{{"uri":"file:{0}/bg.mr"}}}}
        {{"execute":"query-migrate"}}
        {{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:1"}}}}
        {{"execute":"migrate-incoming","arguments":{{"uri":"file:{1}"}}}}
        {{"execute":"query-migrate"}}
        {{"execute":"migrate","arguments":{{"uri":"file:{0}/again.mr"}}}}"#,
        dir.path().display(),
        mr.display()
    );
    let a = session(&d, input.as_bytes());
    let answers: Vec<&Value> = a.iter().filter(|v| v.get("event").is_none()).collect();
    // answers[0] is the greeting.
    assert_eq!(answers[4]["return"]["direct-io"], true, "{answers:?}");
    assert_eq!(answers[4]["return"]["x-livemig-lazy"], true);
    assert_eq!(answers[5]["return"], json!({}), "{answers:?}");
    assert_eq!(answers[6]["return"]["status"], "completed");
    let e = answers[7]["error"]["desc"].as_str().unwrap();
    assert!(
        e.contains("'background-snapshot'") && e.contains("file: URI"),
        "{e}"
    );
    assert_eq!(answers[8]["return"], json!({}), "{answers:?}");
    assert_eq!(answers[9]["return"]["status"], "postcopy-active");
    // A lazy restore still loading is a migration in progress.
    let e = answers[10]["error"]["desc"].as_str().unwrap();
    assert!(e.contains("in progress"), "{e}");
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            format!(
                "save {}/bg.mr bg=true threads=3 direct=true",
                dir.path().display()
            ),
            format!("restore {} lazy=true", mr.display()),
        ]
    );
    // A VMM that does not implement them says so.
    let (d, calls) = dispatcher();
    let input = format!(
        r#"{{"execute":"qmp_capabilities"}}
        {{"execute":"migrate-set-capabilities","arguments":{{"capabilities":[{{"capability":"mapped-ram","state":true}}]}}}}
        {{"execute":"migrate","arguments":{{"uri":"file:{0}/x.mr"}}}}
        {{"execute":"migrate-incoming","arguments":{{"uri":"file:{1}"}}}}"#,
        dir.path().display(),
        mr.display()
    );
    let a = session(&d, input.as_bytes());
    let n = a.len();
    assert!(
        a[n - 2]["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("does not write mapped-ram"),
        "{a:?}"
    );
    assert!(
        a[n - 1]["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("does not restore mapped-ram"),
        "{a:?}"
    );
    assert!(calls.lock().unwrap().is_empty());
}

/// A temporary directory holding `vm.mr`, a snapshot of 1 MiB of memory.
fn saved_snapshot() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mr = dir.path().join("vm.mr");
    let mem = crate::memory::ProcessMemory::new(&[("ram", 1 << 20)]).unwrap();
    crate::snapshot::save(&mem, &mr, b"state", &Default::default()).unwrap();
    (dir, mr)
}

/// Keeps the handles of the saves and restores it starts, left active.
struct HoldingStarter(std::sync::Arc<Mutex<Vec<MigrationHandle>>>);

impl MigrationStarter for HoldingStarter {
    fn start_outgoing(
        &mut self,
        _uri: &Uri,
        _tls: Option<&MigrationTls>,
        _handle: MigrationHandle,
    ) -> Result<(), String> {
        Err("no streams here".into())
    }
    fn start_incoming(
        &mut self,
        _uri: &Uri,
        _tls: Option<&MigrationTls>,
        _handle: MigrationHandle,
    ) -> Result<(), String> {
        Err("no streams here".into())
    }
    fn start_snapshot(
        &mut self,
        _path: &std::path::Path,
        _o: &super::FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        handle.set_status(Status::Active, None);
        self.0.lock().unwrap().push(handle);
        Ok(())
    }
    fn start_restore(
        &mut self,
        _path: &std::path::Path,
        o: &super::FileOptions,
        handle: MigrationHandle,
    ) -> Result<(), String> {
        // A lazy restore's guest runs at once.
        let status = if o.lazy {
            Status::PostcopyActive
        } else {
            Status::Active
        };
        handle.set_status(status, None);
        self.0.lock().unwrap().push(handle);
        Ok(())
    }
}

#[test]
fn migrate_cancel_reaches_a_file_save_and_a_restore_still_loading() {
    let (dir, mr) = saved_snapshot();
    let run = |lines: String| {
        let held = std::sync::Arc::new(Mutex::new(Vec::new()));
        let d = Dispatcher::new(Params::default(), Box::new(HoldingStarter(held.clone())));
        let a = session(&d, lines.as_bytes());
        let errors: Vec<&Value> = a.iter().filter(|v| v.get("error").is_some()).collect();
        assert!(errors.is_empty(), "{errors:?}");
        let h = held.lock().unwrap();
        assert_eq!(h.len(), 1);
        h[0].is_cancelled()
    };
    let caps = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}"#;
    let save = format!(
        "{{\"execute\":\"qmp_capabilities\"}}\n{caps}\n\
         {{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"file:{}/out.mr\"}}}}\n\
         {{\"execute\":\"migrate-cancel\"}}",
        dir.path().display()
    );
    assert!(run(save), "the save is cancelled");
    let restore = |lazy: bool| {
        format!(
            "{{\"execute\":\"qmp_capabilities\"}}\n\
             {{\"execute\":\"migrate-set-parameters\",\"arguments\":{{\"x-livemig-lazy\":{lazy}}}}}\n\
             {{\"execute\":\"migrate-incoming\",\"arguments\":{{\"uri\":\"file:{}\"}}}}\n\
             {{\"execute\":\"migrate-cancel\"}}",
            mr.display()
        )
    };
    assert!(run(restore(false)), "a restore still loading is cancelled");
    assert!(
        !run(restore(true)),
        "a lazy restore whose guest runs is not cancelled"
    );
}
