//! The calling thread's scheduling priority (its nice value).

use std::io;

/// The calling thread's kernel thread id.
fn current_tid() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as libc::id_t
}

/// The calling thread's nice value.
pub fn thread_nice() -> io::Result<i32> {
    let tid = current_tid();
    // SAFETY: getpriority only reads its arguments. It may legitimately
    // return -1, so errno is cleared first and read after (the location
    // is this thread's own).
    let (r, errno) = unsafe {
        *libc::__errno_location() = 0;
        let r = libc::getpriority(libc::PRIO_PROCESS, tid);
        (r, *libc::__errno_location())
    };
    if r == -1 && errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(r)
}

/// Sets the calling thread's nice value (Linux: `setpriority` on the
/// thread's id affects that thread only; threads it starts later inherit
/// it). Lowering it below the current value needs `CAP_SYS_NICE`.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    let tid = current_tid();
    // SAFETY: setpriority only reads its arguments and changes the
    // scheduling weight of this thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_reads_and_sets_its_own_nice() {
        std::thread::spawn(|| {
            let was = thread_nice().unwrap();
            // Raising the nice value (lowering the priority) needs no
            // privilege.
            set_thread_nice(was + 1).unwrap();
            assert_eq!(thread_nice().unwrap(), was + 1);
            // Only this thread changed.
            let other = std::thread::spawn(thread_nice).join().unwrap().unwrap();
            assert_eq!(other, was + 1, "a thread started now inherits it");
        })
        .join()
        .unwrap();
        assert!(thread_nice().is_ok());
    }
}
