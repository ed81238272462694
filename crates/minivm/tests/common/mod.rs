//! Shared helpers for the KVM integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use livemig::control::ControlClient;
use minivm::{GuestImage, GuestStatus, TestGuestConfig, Vm, VmConfig};

/// True if /dev/kvm can be used; prints why a test is skipped otherwise.
pub fn kvm_available(test: &str) -> bool {
    match minivm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// A test-guest VM config.
pub fn test_guest(mem_mib: u64, vcpus: usize, pages: u64, rate: u64) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: pages,
            rate_bytes_per_sec: rate,
        }),
        ..Default::default()
    }
}

/// Waits until `f(status)` holds or `timeout` passes; returns the last status.
pub fn wait_for(vm: &Vm, timeout: Duration, f: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
    let start = Instant::now();
    loop {
        let s = vm.guest_status();
        if f(&s) || start.elapsed() > timeout || !s.errors.is_empty() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Passes the boot-sector incrementer has completed (its own counter).
pub fn bootinc_passes(vm: &Vm) -> u32 {
    use vm_memory::{Bytes, GuestAddress};
    vm.guest_memory()
        .read_obj::<u32>(GuestAddress(minivm::guest::BOOTINC_PASSES))
        .unwrap()
}

/// Waits up to `timeout` for the incrementer to reach `n` passes; returns
/// the count reached.
pub fn wait_bootinc_passes(vm: &Vm, n: u32, timeout: Duration) -> u32 {
    let t = Instant::now();
    while bootinc_passes(vm) < n && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(10));
    }
    bootinc_passes(vm)
}

/// A `minivm` process of this package, killed and reaped on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this package's `minivm` with `args` (stderr piped, for errors).
pub fn minivm(args: &[&str]) -> Proc {
    use std::process::{Command, Stdio};
    Proc(
        Command::new(env!("CARGO_BIN_EXE_minivm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Waits up to 60 s for `p` to exit; its status and stderr.
pub fn ended(mut p: Proc, what: &str) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = p.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

/// Waits for `p` to exit, asserting success; its stderr.
pub fn finish(p: Proc, what: &str) -> String {
    let (status, err) = ended(p, what);
    assert!(status.success(), "{what} failed ({status}):\n{err}");
    err
}

/// An incoming `minivm` of `mem` and `vcpus` with its control socket at
/// `control`, running `seconds` after the migration, no serial output.
pub fn incoming_minivm(mem: &str, vcpus: &str, seconds: &str, control: &Path) -> Proc {
    minivm(&[
        "run",
        "--mem",
        mem,
        "--vcpus",
        vcpus,
        "--incoming",
        "--serial",
        "none",
        "--seconds",
        seconds,
        "--control",
        control.to_str().unwrap(),
    ])
}

/// Connects to the control socket at `path` once it is up (20 s at most).
pub fn connect_when_up(path: &Path) -> ControlClient {
    let t0 = Instant::now();
    loop {
        if let Ok(c) = ControlClient::connect(path) {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no control socket {path:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with `args` (a JSON object as text, or ""): the "return"
/// value as text, or "Class: desc".
pub fn exec(c: &mut ControlClient, cmd: &str, args: &str) -> Result<String, String> {
    let line = if args.is_empty() {
        format!("{{\"execute\":\"{cmd}\"}}\n")
    } else {
        format!("{{\"execute\":\"{cmd}\",\"arguments\":{args}}}\n")
    };
    let v = c.raw(line.as_bytes()).unwrap();
    match v.get("error") {
        Some(e) => Err(format!(
            "{}: {}",
            e["class"].as_str().unwrap_or("?"),
            e["desc"].as_str().unwrap_or("?")
        )),
        None => Ok(v["return"].to_string()),
    }
}

/// [`exec`] that must succeed.
pub fn ok(c: &mut ControlClient, cmd: &str, args: &str) {
    if let Err(e) = exec(c, cmd, args) {
        panic!("{cmd} {args}: {e}");
    }
}

/// Polls `poll` every 5 ms until `done` holds of its answer, asserting
/// that happens within `timeout` (`what` names the wait); the last answer.
pub fn poll_until<Q: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut poll: impl FnMut() -> Q,
    done: impl Fn(&Q) -> bool,
) -> Q {
    let t0 = Instant::now();
    loop {
        let q = poll();
        if done(&q) {
            return q;
        }
        assert!(t0.elapsed() < timeout, "{what} after {timeout:?}: {q:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A source `minivm` of `mem` with 2 vCPUs, the test guest writing `rate`
/// over an 8 MiB working set per vCPU, no serial output, its control
/// socket at `control`; `extra` flags added.
pub fn source_minivm(mem: &str, rate: &str, extra: &[&str], control: &Path) -> Proc {
    let mut args = vec![
        "run",
        "--mem",
        mem,
        "--vcpus",
        "2",
        "--dirty-rate",
        rate,
        "--working-set",
        "8M",
        "--serial",
        "none",
    ];
    args.extend_from_slice(extra);
    args.extend(["--control", control.to_str().unwrap()]);
    minivm(&args)
}

/// The stream's writer, the return path's reader and the thread of a
/// destination ([`minivm::migrate::migrate_in`]) over in-process pipes.
pub type PipeDestination = (
    livemig::transport::PipeWriter,
    livemig::transport::PipeReader,
    std::thread::JoinHandle<
        Result<(Vm, livemig::engine::LoadOutcome), minivm::migrate::MigrateError>,
    >,
);

/// Starts a destination VM of `cfg` receiving over pipes on a thread.
pub fn pipe_destination(cfg: &VmConfig) -> PipeDestination {
    let (w, r) = livemig::transport::pipe();
    let (aw, ar) = livemig::transport::pipe();
    let cfg = cfg.clone();
    let dest = std::thread::spawn(move || minivm::migrate::migrate_in(&cfg, r, Some(aw)));
    (w, ar, dest)
}

/// Migrates `src` over in-process pipes, on one connection with its return
/// path, into a destination of `dst_cfg` received through the engine
/// ([`minivm::migrate::receive`]: the engine resumes the guest, and with
/// `postcopy` the destination accepts a switch to postcopy). Returns the
/// source's statistics and the destination's outcome.
pub fn pipe_receive(
    src: &Vm,
    dst_cfg: &VmConfig,
    handle: livemig::engine::MigrationHandle,
    postcopy: bool,
) -> (
    Result<livemig::engine::MigrationStats, minivm::migrate::MigrateError>,
    Result<(Vm, livemig::engine::Arrival), minivm::migrate::MigrateError>,
) {
    let (w, r) = livemig::transport::pipe();
    let (aw, ar) = livemig::transport::pipe();
    let cfg = dst_cfg.clone();
    let dest = std::thread::spawn(move || {
        minivm::migrate::receive(
            &cfg,
            r,
            Some(Box::new(aw)),
            &mut || Err(std::io::Error::other("one connection")),
            postcopy,
        )
    });
    let conn = livemig::transport::Outgoing {
        writer: Box::new(w),
        ack: Some(Box::new(ar)),
    };
    let stats = minivm::migrate::migrate_out_conn(
        src,
        minivm::TrackerKind::Auto,
        handle,
        conn,
        &mut |_| Err(std::io::Error::other("one channel")),
    );
    (stats, dest.join().expect("destination thread"))
}

/// Migrates `src` with default parameters over in-process pipes into a
/// destination of `cfg` ([`pipe_destination`]); checks that it completed
/// and returns the paused destination VM.
pub fn pipe_migrate(src: &Vm, cfg: &VmConfig) -> Vm {
    let (w, mut ar, dest) = pipe_destination(cfg);
    let stats = minivm::migrate::migrate_out(
        src,
        minivm::TrackerKind::Auto,
        livemig::engine::MigrationHandle::new(livemig::engine::Params::default()),
        w,
        Some(&mut ar as &mut dyn std::io::Read),
    )
    .expect("migration out");
    assert_eq!(stats.status, livemig::engine::Status::Completed);
    dest.join()
        .expect("destination thread")
        .expect("migration in")
        .0
}
