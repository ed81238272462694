//! The CLI's only system calls that need `unsafe`.

/// CPU time this process has used so far, user + system, in seconds.
pub fn cpu_secs() -> f64 {
    // SAFETY: a zeroed rusage is a valid value; getrusage only fills the
    // struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time the calling thread has used so far, in seconds: what a
/// single-threaded loop costs, without the time it waited for a CPU.
pub fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call only writes; the clock id
    // is a constant every Linux kernel since 2.6.12 knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
