//! Where a VM process's CPU time goes: its vCPU thread's time on a CPU and
//! waiting for one (the kernel's per-thread schedstat, in ns), against the
//! rest of its threads (the migration's), over a window.
//!
//! On a host with fewer cores than runnable threads, a guest can only run
//! as fast as its vCPU thread gets a CPU: this tells a guest slowed by its
//! own VMM's migration threads (the vCPU waits while they run) from one
//! slowed by dirty tracking (the vCPU runs, but does less).

use std::time::Instant;

use serde::Serialize;

/// A process's threads' CPU times at one instant.
#[derive(Clone, Debug)]
pub struct Sample {
    at: Instant,
    /// ns on a CPU and ns runnable but waiting, of the vCPU thread.
    vcpu: (u64, u64),
    /// ns on a CPU of all threads.
    total: u64,
}

/// Names a vCPU thread has: minivm's `vcpu0`, QEMU's `CPU 0/KVM`.
fn is_vcpu(name: &str) -> bool {
    name == "vcpu0" || name == "CPU 0/KVM"
}

/// Parses a schedstat line: ns on a CPU, ns waiting to run.
fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// The threads of `pid` now (None when the process is gone or has no vCPU
/// thread).
pub fn sample(pid: u32) -> Option<Sample> {
    sample_in(std::path::Path::new("/proc"), pid)
}

/// [`sample`] under `proc` (a procfs, or a copy of its layout).
fn sample_in(proc: &std::path::Path, pid: u32) -> Option<Sample> {
    let at = Instant::now();
    let mut vcpu = None;
    let mut total = 0;
    for t in std::fs::read_dir(proc.join(pid.to_string()).join("task"))
        .ok()?
        .flatten()
    {
        let p = t.path();
        let (Ok(name), Ok(st)) = (
            std::fs::read_to_string(p.join("comm")),
            std::fs::read_to_string(p.join("schedstat")),
        ) else {
            continue;
        };
        let Some((run, wait)) = parse_schedstat(&st) else {
            continue;
        };
        total += run;
        if is_vcpu(name.trim_end()) {
            vcpu = Some((run, wait));
        }
    }
    Some(Sample {
        at,
        vcpu: vcpu?,
        total,
    })
}

/// Shares of a window's wall time, in %.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Window {
    /// The vCPU thread on a CPU.
    pub vcpu_run_pct: f64,
    /// The vCPU thread runnable but waiting for a CPU.
    pub vcpu_wait_pct: f64,
    /// The process's other threads on a CPU (can pass 100 with several).
    pub others_pct: f64,
}

/// The window from `a` to `b` (None when no time passed).
pub fn window(a: &Sample, b: &Sample) -> Option<Window> {
    let ns = b.at.checked_duration_since(a.at)?.as_nanos() as f64;
    if ns <= 0.0 {
        return None;
    }
    let pct = |x: u64, y: u64| 100.0 * y.saturating_sub(x) as f64 / ns;
    let (vr, vw) = (pct(a.vcpu.0, b.vcpu.0), pct(a.vcpu.1, b.vcpu.1));
    Some(Window {
        vcpu_run_pct: vr,
        vcpu_wait_pct: vw,
        others_pct: pct(a.total - a.vcpu.0, b.total - b.vcpu.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn schedstat_lines_parse() {
        assert_eq!(
            parse_schedstat("291498533 4114627703 831\n"),
            Some((291498533, 4114627703))
        );
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn window_shares_the_wall_time() {
        let t = Instant::now();
        let a = Sample {
            at: t,
            vcpu: (1_000, 0),
            total: 5_000,
        };
        let b = Sample {
            at: t + Duration::from_secs(1),
            vcpu: (250_001_000, 500_000_000),
            total: 5_000 + 250_000_000 + 1_500_000_000,
        };
        let w = window(&a, &b).unwrap();
        assert_eq!((w.vcpu_run_pct, w.vcpu_wait_pct), (25.0, 50.0));
        assert_eq!(w.others_pct, 150.0);
        assert_eq!(window(&b, &a), None);
    }

    #[test]
    fn samples_find_the_vcpu_thread_by_name_and_sum_all_threads() {
        let root = std::env::temp_dir().join(format!("cpu-test-{}", std::process::id()));
        let thread = |tid: u32, comm: &str, stat: &str| {
            let d = root.join("7/task").join(tid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(d.join("schedstat"), stat).unwrap();
        };
        thread(7, "qemu-system-x86", "100 5 1\n");
        thread(8, "multifdsend_0", "1000 7 2\n");
        // No vCPU thread yet: no sample.
        assert!(sample_in(&root, 7).is_none());
        thread(9, "CPU 0/KVM", "50000 9000 3\n");
        let s = sample_in(&root, 7).unwrap();
        assert_eq!((s.vcpu, s.total), ((50000, 9000), 51100));
        // minivm's name too; an unreadable line is skipped.
        std::fs::remove_dir_all(root.join("7/task/9")).unwrap();
        thread(9, "vcpu0", "70 1 1\n");
        thread(10, "livemig-ch1", "garbage\n");
        let s = sample_in(&root, 7).unwrap();
        assert_eq!((s.vcpu, s.total), ((70, 1), 1170));
        assert!(sample_in(&root, 8).is_none());
        std::fs::remove_dir_all(&root).unwrap();
        // The real procfs: no such process.
        assert!(sample(u32::MAX).is_none());
    }
}
