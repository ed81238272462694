//! The CLI's only system call that needs `unsafe`.

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
