//! Runs the `kvm_vmm` example as two processes (destination, then source)
//! and checks the destination holds exactly the source's guest memory
//! (same digest), the device's last tick included, and that the guest runs
//! on there. Skipped (with the reason printed) where /dev/kvm is absent.
#![cfg(feature = "kvm")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The example binary, built next to this test (cargo builds examples
/// with the tests), or built now.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let bin = dir.join("kvm_vmm");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args([
                "build",
                "-p",
                "livemig",
                "--features",
                "kvm,testkit",
                "--example",
                "kvm_vmm",
            ])
            .env(
                "CARGO_TARGET_DIR",
                exe.parent().unwrap().parent().unwrap().parent().unwrap(),
            )
            .status()
            .expect("run cargo build --example kvm_vmm");
        assert!(st.success(), "building the example failed");
    }
    assert!(bin.exists(), "no example binary at {}", bin.display());
    bin
}

/// The value after `key ` in `line`.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(&format!("{key} "))
        .unwrap_or_else(|| panic!("no '{key}' in: {line}"));
    line[at + key.len() + 1..].split([' ', ',']).next().unwrap()
}

#[test]
fn example_vmm_migrates_itself_to_another_process() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("SKIPPED example_vmm_migrates_itself_to_another_process: /dev/kvm: {e}");
        return;
    }
    let bin = example();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mig.sock");
    let mut dest = Command::new(&bin)
        .arg("dest")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dest.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("dest: listening"), "{first}");
    let src = Command::new(&bin)
        .arg("source")
        .arg(&sock)
        .output()
        .unwrap();
    let src_out = String::from_utf8_lossy(&src.stdout).to_string();
    assert!(
        src.status.success(),
        "source failed: {src_out}{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let st = dest.wait().unwrap();
    assert!(Instant::now() < deadline);
    assert!(st.success(), "destination failed: {rest:?}");
    print!("{src_out}");
    rest.iter().for_each(|l| println!("{l}"));

    let migrated = src_out
        .lines()
        .find(|l| l.starts_with("source: migrated"))
        .expect("source summary");
    let loaded = rest
        .iter()
        .find(|l| l.starts_with("dest: loaded"))
        .expect("destination summary");
    assert_eq!(
        field(loaded, "digest"),
        field(migrated, "digest"),
        "the destination holds the source's memory"
    );
    assert_eq!(
        field(loaded, "tick"),
        field(migrated, "tick"),
        "the device's last write arrived"
    );
    let tick: u64 = field(migrated, "tick").parse().unwrap();
    assert!(tick > 0, "the device wrote guest memory");
    let runs = rest
        .iter()
        .find(|l| l.starts_with("dest: guest runs on"))
        .expect("the guest ran on the destination");
    let p0: u64 = field(loaded, "passes").parse().unwrap();
    let p1: u64 = field(runs, "passes").parse().unwrap();
    assert!(p1 >= p0 + 2, "{loaded} / {runs}");
    assert!(field(runs, "tick").parse::<u64>().unwrap() > tick);
}
