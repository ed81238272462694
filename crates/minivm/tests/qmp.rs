//! minivm driven by QEMU's own QMP client library (`qemu.qmp` from PyPI):
//! two `minivm run --control` processes migrated by
//! `tests/qmp/migrate.py`, and `qmp-shell` running `query-migrate`.
//!
//! The Python comes from `LIVEMIG_QMP_PYTHON`, else from the virtual
//! environment `.ci/run` creates at `target/qmp-venv`. Without it the tests
//! are skipped locally, and fail in CI (`CI` set).

mod common;

use common::{finish, incoming_minivm, minivm, source_minivm, Proc};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The venv's python, or `None` (skip) outside CI.
fn python(test: &str) -> Option<PathBuf> {
    let p = match std::env::var_os("LIVEMIG_QMP_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/qmp-venv/bin/python"),
    };
    let usable = Command::new(&p)
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if usable {
        return Some(p);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{test}: no Python with qemu.qmp at {} (.ci/run creates target/qmp-venv; \
         or set LIVEMIG_QMP_PYTHON)",
        p.display()
    );
    eprintln!(
        "SKIPPED {test}: no Python with qemu.qmp at {} (run .ci/run once, or set LIVEMIG_QMP_PYTHON)",
        p.display()
    );
    None
}

/// A 128 MiB, 2-vCPU minivm waiting for an incoming migration on its
/// control socket `ds`, running 2 s once it arrives.
fn incoming_vm(ds: &Path) -> Proc {
    incoming_minivm("128M", "2", "2", ds)
}

fn wait_socket(path: &Path, p: &mut Proc) {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "minivm exited early");
        assert!(t0.elapsed() < Duration::from_secs(30), "no socket {path:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A source minivm (with `src_args` more) on `dir`/src.sock and an
/// incoming one on `dir`/dst.sock, driven by `tests/qmp/{script}` with
/// the two sockets and `last` as arguments; the script must succeed and
/// see the job completed. Returns the two processes.
fn driven_by(py: &Path, dir: &Path, src_args: &[&str], script: &str, last: &str) -> (Proc, Proc) {
    let (ss, ds) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mut src = source_minivm("128M", "16M", src_args, &ss);
    let mut dst = incoming_vm(&ds);
    wait_socket(&ss, &mut src);
    wait_socket(&ds, &mut dst);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/qmp")
        .join(script);
    let out = Command::new(py)
        .arg(&path)
        .args([ss.to_str().unwrap(), ds.to_str().unwrap(), last])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    eprintln!("qemu.qmp saw: {stdout}");
    assert!(stdout.contains(r#""completed"]"#), "{stdout}");
    (src, dst)
}

#[test]
fn qemu_qmp_client_migrates_between_two_minivms() {
    let Some(py) = python("qemu_qmp_client_migrates_between_two_minivms") else {
        return;
    };
    if !common::kvm_available("qemu_qmp_client_migrates_between_two_minivms") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mig = format!("unix:{}", dir.path().join("mig.sock").display());
    let (src, dst) = driven_by(&py, dir.path(), &[], "migrate.py", &mig);
    let src_log = finish(src, "source minivm");
    assert!(src_log.contains("migration completed"), "{src_log}");
    let dst_log = finish(dst, "destination minivm");
    assert!(dst_log.contains("guest resumed"), "{dst_log}");
    assert!(dst_log.contains("self_check=pass"), "{dst_log}");
    let (ss, ds) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    assert!(!ss.exists() && !ds.exists(), "both sockets removed");
}

#[test]
fn qmp_shell_runs_query_migrate() {
    let Some(py) = python("qmp_shell_runs_query_migrate") else {
        return;
    };
    if !common::kvm_available("qmp_shell_runs_query_migrate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let mut vm = minivm(&[
        "run",
        "--mem",
        "64M",
        "--vcpus",
        "1",
        "--serial",
        "none",
        "--control",
        sock.to_str().unwrap(),
    ]);
    wait_socket(&sock, &mut vm);
    let shell = py.with_file_name("qmp-shell");
    let mut child = Command::new(&shell)
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"query-migrate\nquery-status\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qmp-shell: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"{"return": {}}"#),
        "query-migrate before any migration: {stdout}"
    );
    assert!(stdout.contains(r#""status": "running""#), "{stdout}");
}

#[test]
fn qemu_qmp_client_takes_a_background_snapshot_and_restores_it_lazily() {
    let test = "qemu_qmp_client_takes_a_background_snapshot_and_restores_it_lazily";
    let Some(py) = python(test) else {
        return;
    };
    if !common::kvm_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.mr");
    let (src, dst) = driven_by(
        &py,
        dir.path(),
        &["--memfd", "--seconds", "3"],
        "snapshot.py",
        file.to_str().unwrap(),
    );
    // The source ran on after its snapshot and ends on its own.
    let src_log = finish(src, "source minivm");
    assert!(src_log.contains("self_check=pass"), "{src_log}");
    assert!(!src_log.contains("FAIL"), "{src_log}");
    let dst_log = finish(dst, "destination minivm");
    assert!(dst_log.contains("guest resumed"), "{dst_log}");
    assert!(dst_log.contains("self_check=pass"), "{dst_log}");
    assert!(!dst_log.contains("FAIL"), "{dst_log}");
}
