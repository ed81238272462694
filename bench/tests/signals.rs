//! Killing the harness leaves no child behind: a child started like a VM
//! (through the same `Proc` and registry) is gone once SIGTERM/SIGINT
//! ended the harness, and after SIGKILL too (the children's death signal).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; its state is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.contains(") Z "),
        Err(_) => false,
    }
}

fn killed_by(sig: i32) {
    let mut h = Command::new(env!("CARGO_BIN_EXE_livemig-harness"))
        .arg("--x-test-spawn-child")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(h.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let child: i32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("pid: {line:?}"));
    assert!(alive(child), "the child runs before the signal");
    let st = Command::new("kill")
        .args([format!("-{sig}"), h.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = h.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "harness still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    if sig == 9 {
        // No code of the harness runs: the child's death signal acts.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(9), "{st}");
        // Nothing of the harness ran: its scratch directory is left.
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("livemig-harness-{}", h.id())),
        );
    } else {
        assert_eq!(st.code(), Some(128 + sig), "{st}");
    }
    let t0 = Instant::now();
    while alive(child) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "child {child} outlived the harness"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_kills_the_children() {
    killed_by(libc_sig("TERM"));
}

#[test]
fn sigint_kills_the_children() {
    killed_by(libc_sig("INT"));
}

#[test]
fn sigkill_kills_the_children_through_their_death_signal() {
    killed_by(libc_sig("KILL"));
}

fn libc_sig(name: &str) -> i32 {
    match name {
        "TERM" => 15,
        "INT" => 2,
        "KILL" => 9,
        _ => unreachable!(),
    }
}
