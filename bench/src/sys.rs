//! The harness's only `unsafe`: signal masks, `sigwait`, and a death
//! signal set in a child between fork and exec.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The signals the harness turns into a clean exit.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the local set they are given.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in SIGNALS {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and every
/// thread it starts afterwards), so only [`wait_signal`] receives them.
/// Children started with `Command` get an empty mask again (std resets it).
pub fn block_signals() {
    let s = set();
    // SAFETY: a valid set; the old mask is not wanted (null).
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut());
    }
}

/// Waits for one of the blocked signals; returns its number.
pub fn wait_signal() -> i32 {
    let s = set();
    let mut sig: libc::c_int = 0;
    loop {
        // SAFETY: valid set and output pointer, both live for the call.
        let r = unsafe { libc::sigwait(&s, &mut sig) };
        if r == 0 {
            return sig;
        }
    }
}

/// Makes the child receive SIGKILL when the thread that started it dies
/// (the harness killed with SIGKILL, where no cleanup code runs).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls
    // prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends SIGKILL to `pid` (ignoring a process already gone).
pub fn kill(pid: u32) {
    // SAFETY: kill takes plain integers; a stale pid at worst gets ESRCH.
    // Only pids of children this harness started (and has not reaped:
    // see cleanup's registry) are passed here.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}
