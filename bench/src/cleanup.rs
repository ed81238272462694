//! Nothing outlives the harness: every child process and network
//! namespace it creates is registered here, and SIGINT/SIGTERM/SIGHUP
//! (received by one thread, see [`install`]) kill and remove them before
//! the harness exits. Children also get a death signal (SIGKILL when the
//! harness dies without running any code, e.g. killed with SIGKILL).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use crate::sys;

static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The registry of live child pids, locked: hold it while reaping a child
/// so a reaped (reusable) pid is never killed by the signal thread.
pub fn pids() -> MutexGuard<'static, Vec<u32>> {
    lock(&PIDS)
}

/// Forgets a child pid (call with the registry held, see [`pids`]).
pub fn remove_pid(pids: &mut Vec<u32>, pid: u32) {
    pids.retain(|&p| p != pid);
}

/// Records a network namespace this harness created.
pub fn add_namespace(name: &str) {
    lock(&NAMESPACES).push(name.to_string());
}

/// Forgets a namespace (after deleting it).
pub fn remove_namespace(name: &str) {
    lock(&NAMESPACES).retain(|n| n != name);
}

/// Records a scratch directory this harness created.
pub fn add_dir(dir: PathBuf) {
    lock(&DIRS).push(dir);
}

/// Sets up a command so its child dies with the harness.
pub fn prepare(cmd: &mut Command) {
    sys::die_with_parent(cmd);
}

/// Kills every registered child (SIGKILL); returns how many.
pub fn kill_children() -> usize {
    let p = pids();
    for &pid in p.iter() {
        sys::kill(pid);
    }
    p.len()
}

/// Kills the children, deletes the namespaces and directories.
pub fn everything() {
    let n = kill_children();
    let ns: Vec<String> = lock(&NAMESPACES).drain(..).collect();
    for name in &ns {
        crate::net::delete_namespace(name);
    }
    for d in lock(&DIRS).drain(..) {
        let _ = std::fs::remove_dir_all(d);
    }
    if n + ns.len() > 0 {
        eprintln!(
            "livemig-harness: killed {n} child process(es), deleted {} namespace(s)",
            ns.len()
        );
    }
}

/// Blocks the exit signals in this thread (call first in `main`, before
/// any thread starts) and starts the thread that waits for them.
pub fn install() {
    sys::block_signals();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let sig = sys::wait_signal();
            eprintln!("livemig-harness: signal {sig}: cleaning up");
            everything();
            std::process::exit(128 + sig);
        })
        .expect("starting the signal thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_children_are_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("300");
        prepare(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        pids().push(child.id());
        assert!(kill_children() >= 1);
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
        remove_pid(&mut pids(), child.id());
        assert!(!pids().contains(&child.id()));
    }
}
