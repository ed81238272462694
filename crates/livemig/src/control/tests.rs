//! The control socket steering real migrations of process memory.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::dirty::{UffdMode, UffdTracker};
use crate::engine::{Loader, Source, Status};
use crate::memory::{GuestMemory, ProcessMemory};
use crate::testkit::workload::{
    direct_writer, fill_random, Workload, WorkloadConfig, WorkloadControl,
};
use crate::transport::pipe;

/// Starts migrations of `mem` into a fresh destination over a pipe.
struct PipeStarter {
    mem: ProcessMemory,
    control: WorkloadControl,
    threads: Vec<thread::JoinHandle<()>>,
}

impl MigrationStarter for PipeStarter {
    fn start_outgoing(&mut self, _uri: &Uri, handle: MigrationHandle) -> Result<(), String> {
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

    fn start_incoming(&mut self, uri: &Uri) -> Result<(), String> {
        Err(format!("this test VMM does not receive ({uri})"))
    }
}

/// A destination with memory only: nothing to restore or run.
struct MemoryOnly;

impl crate::engine::postcopy::IncomingGuest for MemoryOnly {
    fn restore(&mut self, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn pause(&mut self) {}
}

#[test]
fn migrate_start_postcopy_switches_a_running_migration() {
    if !uffd_usable() {
        return;
    }
    // 4 MiB/s: precopy of 32 MiB is still running when the command comes.
    let f = fixture(Params {
        max_bandwidth: 4 << 20,
        ..Params::default()
    });
    let mut c = ControlClient::connect(&f.path).unwrap();
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

fn fixture(params: Params) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let mem = ProcessMemory::single(32 << 20).unwrap();
    let writer = direct_writer(mem.blocks().to_vec());
    fill_random(mem.blocks(), &writer, 9);
    let workload = Workload::start(
        mem.blocks().to_vec(),
        writer,
        WorkloadConfig {
            rate: 16 << 20,
            ..WorkloadConfig::default()
        },
    );
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

#[test]
fn parameters_and_capabilities() {
    let f = fixture(Params::default());
    let mut c = ControlClient::connect(&f.path).unwrap();
    assert_eq!(
        c.execute("query-migrate", Value::Null).unwrap(),
        json!({"status": "none"})
    );
    c.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": 42, "max-bandwidth": 1000000}),
    )
    .unwrap();
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["downtime-limit"], 42);
    assert_eq!(p["max-bandwidth"], 1000000);
    c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
    )
    .unwrap();
    let caps = c
        .execute("query-migrate-capabilities", Value::Null)
        .unwrap();
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "xbzrle", "state": true})));

    let err = |r: Result<Value, ControlError>| match r {
        Err(ControlError::Command { class, desc }) => format!("{class}: {desc}"),
        other => panic!("expected an error answer, got {other:?}"),
    };
    assert!(
        err(c.execute("migrate-set-parameters", json!({"no-such": 1})))
            .contains("unknown parameter 'no-such'")
    );
    assert!(
        err(c.execute("migrate-set-parameters", json!({"downtime-limit": "soon"})))
            .contains("invalid parameter value")
    );
    assert!(
        err(c.execute("migrate-set-parameters", json!({"max-cpu-throttle": 100})))
            .contains("max-cpu-throttle")
    );
    assert!(err(c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "teleport", "state": true}]})
    ))
    .contains("unknown capability 'teleport'"));
    assert!(
        err(c.execute("migrate-set-capabilities", json!({"capabilities": 3})))
            .contains("must be an array")
    );
    assert!(err(c.execute("migrate", json!({"uri": "udp:x:1"}))).contains("bad migration URI"));
    assert!(err(c.execute("migrate", json!({}))).contains("'uri'"));
    assert!(
        err(c.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:1"})))
            .contains("does not receive")
    );
    assert_eq!(
        err(c.execute("frobnicate", Value::Null)),
        "CommandNotFound: unknown command 'frobnicate'"
    );
    // Parameters were not changed by the refused requests.
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["downtime-limit"], 42);
    drop(f.workload);
}

#[test]
fn malformed_requests() {
    let f = fixture(Params::default());
    let mut c = ControlClient::connect(&f.path).unwrap();
    let a = c.raw(b"{not json\n").unwrap();
    assert!(
        a["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{a}"
    );
    let a = c.raw(b"[1,2]\n").unwrap();
    assert!(
        a["error"]["desc"].as_str().unwrap().contains("'execute'"),
        "{a}"
    );
    let a = c
        .raw(b"{\"execute\": \"query-migrate\", \"arguments\": 5}\n")
        .unwrap();
    assert!(
        a["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("'arguments' must be an object"),
        "{a}"
    );
    // `cont` on a VMM that does not implement it is a clear error.
    let a = c.raw(b"{\"execute\": \"cont\"}\n").unwrap();
    assert!(
        a["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("cannot resume a guest from the control socket"),
        "{a}"
    );
    // The connection still works after errors.
    assert_eq!(
        c.execute("query-migrate", Value::Null).unwrap()["status"],
        "none"
    );
    // An over-long line is refused and the connection closed.
    let mut long = vec![b' '; MAX_LINE + 10];
    long.push(b'\n');
    let a = c.raw(&long).unwrap();
    assert!(
        a["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{a}"
    );
    assert!(
        c.execute("query-migrate", Value::Null).is_err(),
        "closed after an over-long line"
    );
    // Other clients are unaffected.
    let mut c2 = ControlClient::connect(&f.path).unwrap();
    assert_eq!(
        c2.execute("query-migrate", Value::Null).unwrap()["status"],
        "none"
    );
}

#[test]
fn migrate_steer_cancel_and_migrate_again() {
    if !uffd_usable() {
        return;
    }
    // 2 MiB/s: slow enough to steer and cancel mid-round.
    let f = fixture(Params {
        max_bandwidth: 2 << 20,
        ..Params::default()
    });
    let mut c = ControlClient::connect(&f.path).unwrap();
    c.execute("migrate", json!({"uri": "tcp:127.0.0.1:9"}))
        .unwrap();
    wait_status(&mut c, &["active"]);
    let err = c
        .execute("migrate", json!({"uri": "tcp:127.0.0.1:9"}))
        .unwrap_err();
    assert!(err.to_string().contains("already running"), "{err}");
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

/// Starts nothing; records what it was asked.
struct RecordingStarter(std::sync::Arc<Mutex<Vec<String>>>);

impl MigrationStarter for RecordingStarter {
    fn start_outgoing(&mut self, uri: &Uri, _handle: MigrationHandle) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("out {uri}"));
        Ok(())
    }
    fn start_incoming(&mut self, uri: &Uri) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("in {uri}"));
        Err("no incoming here".into())
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
fn session_answers_each_line_and_the_last_one_without_newline() {
    let (d, calls) = dispatcher();
    let input = b"{\"execute\":\"query-migrate\"}\n\n   \n{\"execute\":\"nope\"}\r\n{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:9\"}}";
    let answers = session(&d, input);
    assert_eq!(answers.len(), 4, "greeting + 3 answers: {answers:?}");
    assert!(answers[0].get("livemig").is_some());
    assert_eq!(answers[1]["return"]["status"], "none");
    assert_eq!(answers[2]["error"]["class"], "CommandNotFound");
    assert_eq!(answers[3]["return"], json!({}));
    assert_eq!(
        *calls.lock().unwrap(),
        vec!["out tcp:127.0.0.1:9".to_string()]
    );
    assert!(d.current().is_some());
}

#[test]
fn session_ends_on_an_over_long_line_with_an_error() {
    let (d, _) = dispatcher();
    let mut input = vec![b' '; MAX_LINE + 10];
    input.extend_from_slice(b"\n{\"execute\":\"query-migrate\"}\n");
    let answers = session(&d, &input);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let desc = answers[1]["error"]["desc"].as_str().unwrap();
    assert!(desc.contains("longer than"), "{desc}");
}

#[test]
fn a_capability_cannot_make_the_parameters_invalid() {
    let (d, _) = dispatcher();
    let a = d.answer(r#"{"execute":"migrate-set-parameters","arguments":{"xbzrle-cache-size":0}}"#);
    assert_eq!(a["return"], json!({}), "{a}");
    let a = d.answer(
        r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"verify","state":true},{"capability":"xbzrle","state":true}]}}"#,
    );
    let desc = a["error"]["desc"].as_str().expect("refused");
    assert!(desc.contains("xbzrle-cache-size"), "{desc}");
    // Nothing changed, not even the capability listed before the bad one.
    let p = d.params();
    assert!(!p.xbzrle);
    assert!(!p.verify);
    p.validate().unwrap();
}
