//! One running test guest migrated back and forth 50 times in a row, in one
//! process, through in-memory pipes and (every third hop) loopback TCP
//! with the full completion handshake. Each hop migrates the current VM
//! out into a freshly created VM, resumes the new one and drops the old
//! one.
//!
//! After every hop: the guest's self-check passes and its page counter
//! (kept in guest memory, so it travels with the guest) has moved forward.
//! At the end: no leaked file descriptors, threads or memory.
//!
//! The soak run is the same test with more hops (`LIVEMIG_SOAK_HOPS`); with
//! 100 hops or more, resident memory must end within 1 MiB of its highest
//! value over hops 20-40 (after the allocator's warm-up):
//!
//! ```sh
//! LIVEMIG_SOAK_HOPS=1000 cargo test --release -p minivm --test pingpong -- --nocapture
//! ```

mod common;

use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use livemig::engine::{MigrationHandle, Params, Status};
use livemig::transport::{connect, pipe, Listener, Uri};
use minivm::migrate::{migrate_in, migrate_out};
use minivm::{GuestImage, TestGuestConfig, TrackerKind, Vm, VmConfig};

/// Hops of the default run; `LIVEMIG_SOAK_HOPS` overrides it.
const HOPS: usize = 50;
/// Hops done before the file-descriptor, thread and memory baseline.
const WARMUP_HOPS: usize = 2;
const MEM_SIZE: u64 = 128 << 20;
/// Allowed RSS growth between the warm-up baseline and the last hop.
const RSS_SLACK: u64 = 64 << 20;
/// Resident memory climbs over the first ~20 hops while the allocator
/// warms up (glibc gives the threads of each hop per-thread arenas, which
/// keep freed buffers for reuse; with MALLOC_ARENA_MAX=1 it is flat from
/// hop 10 to the byte), then stays flat with ±1 MiB of noise. The soak's
/// baseline is the highest RSS seen over these hops...
const RSS_WINDOW: std::ops::RangeInclusive<usize> = 20..=40;
/// ... and a soak (100 hops or more) must end within this of it.
const SOAK_RSS_SLACK: u64 = 1 << 20;
/// The test guest's write rate (all vCPUs together).
const RATE: u64 = 32 << 20;

fn config() -> VmConfig {
    VmConfig {
        mem_size: MEM_SIZE,
        ram_blocks: 2,
        vcpus: 2,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: 1024,
            rate_bytes_per_sec: RATE,
        }),
        prefault: true,
        ..VmConfig::default()
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// A `kB` field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
        * 1024
}

fn hops() -> usize {
    match std::env::var("LIVEMIG_SOAK_HOPS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("LIVEMIG_SOAK_HOPS={v}: not a number")),
        Err(_) => HOPS,
    }
}

/// Migrates `src` into a new VM, resumes it and returns it; `src` is dropped.
/// Alternates the classic bitmap and the default (auto) tracker; every
/// third hop goes over loopback TCP, the others through in-memory pipes.
fn hop(src: Vm, n: usize) -> Vm {
    let kind = if n.is_multiple_of(2) {
        TrackerKind::Auto
    } else {
        TrackerKind::Bitmap
    };
    let handle = MigrationHandle::new(Params {
        verify: true,
        ..Params::default()
    });
    let cfg = config();
    let (stats, dest) = if n.is_multiple_of(3) {
        let listener = Listener::bind(&"tcp:127.0.0.1:0".parse::<Uri>().unwrap()).unwrap();
        let uri = listener.local_uri();
        let dest = thread::spawn(move || {
            let inc = listener.accept().expect("accept");
            migrate_in(&cfg, inc.reader, inc.ack)
        });
        let out = connect(&uri).unwrap_or_else(|e| panic!("hop {n}: connect: {e}"));
        let mut ack = out.ack.expect("TCP has a return path");
        let stats = migrate_out(
            &src,
            kind,
            handle,
            out.writer,
            Some(&mut ack as &mut dyn Read),
        );
        (stats, dest)
    } else {
        let (w, r) = pipe();
        let (aw, mut ar) = pipe();
        let dest = thread::spawn(move || migrate_in(&cfg, r, Some(aw)));
        let stats = migrate_out(&src, kind, handle, w, Some(&mut ar as &mut dyn Read));
        (stats, dest)
    };
    // Both sides' results before either is checked: a source failure
    // often only echoes the destination's (a closed pipe), so say both.
    let arrived = dest.join().unwrap();
    let (stats, (dst, loaded)) = match (stats, arrived) {
        (Ok(s), Ok(d)) => (s, d),
        (s, d) => panic!(
            "hop {n} ({kind:?}): migrate_out: {}; migrate_in: {}",
            s.map_or_else(|e| livemig::error_chain(&e), |_| "completed".into()),
            d.map_or_else(|e| livemig::error_chain(&e), |_| "completed".into()),
        ),
    };
    assert_eq!(stats.status, Status::Completed, "hop {n}");
    assert!(
        loaded.digest.is_some(),
        "hop {n}: verify mode proved the memory"
    );
    assert!(src.is_paused(), "hop {n}: the source stays paused");
    let rate = src.rate_pages_per_vcpu();
    drop(src);
    assert_eq!(
        dst.rate_pages_per_vcpu(),
        rate,
        "hop {n}: the guest's write rate moved with it"
    );
    assert!(rate > 0);
    dst.resume();
    dst
}

#[test]
fn ping_pong_no_failures_no_leaks() {
    if !common::kvm_available("ping_pong_no_failures_no_leaks") {
        return;
    }
    let t0 = Instant::now();
    let fds0 = fd_count();
    let threads0 = thread_count();

    let mut vm = Vm::new(config()).unwrap();
    let s = common::wait_for(&vm, Duration::from_secs(10), |s| s.pages_written() > 0);
    assert!(s.ok() && s.pages_written() > 0, "guest runs: {s:?}");
    // One live VM: its fds and threads, on top of the baseline.
    let vm_fds = fd_count() - fds0;
    let vm_threads = thread_count() - threads0;
    assert!(vm_fds > 0 && vm_threads > 0);

    let mut last = s.pages_written();
    let mut warm: Option<(usize, usize, u64)> = None;
    // An incoming VM has one more thread for a while after its resume
    // (huge pages, `minivm::collapse`), which opens /proc files now and
    // then: stopped before counting.
    let mut rss_window = 0u64;
    let hops = hops();
    assert!(
        hops > WARMUP_HOPS,
        "LIVEMIG_SOAK_HOPS must be above {WARMUP_HOPS}"
    );
    for n in 1..=hops {
        vm = hop(vm, n);
        // What the destination restored is the source's counter at pause
        // time: never behind what we saw before the hop.
        let restored = vm.guest_status().pages_written();
        assert!(
            restored >= last,
            "hop {n}: pages_written went back from {last} to {restored}"
        );
        let s = common::wait_for(&vm, Duration::from_secs(10), |s| {
            s.pages_written() > restored
        });
        assert!(
            s.errors.is_empty(),
            "hop {n}: vCPU stopped on the destination: {s:?}"
        );
        assert_eq!(s.failures(), 0, "hop {n}: guest self-check failed: {s:?}");
        assert!(
            s.pages_written() > restored,
            "hop {n}: guest makes no progress after restore: {s:?}"
        );
        last = s.pages_written();
        if n == WARMUP_HOPS {
            vm.stop_collapse();
            assert!(!vm.collapse_running());
            warm = Some((fd_count(), thread_count(), status_bytes("VmRSS")));
        }
        if RSS_WINDOW.contains(&n) {
            rss_window = rss_window.max(status_bytes("VmRSS"));
        }
        if n % 100 == 0 || (n <= 50 && n % 10 == 0) {
            eprintln!("hop {n}: VmRSS {} KiB", status_bytes("VmRSS") >> 10);
        }
    }
    let (fds_warm, threads_warm, rss_warm) = warm.unwrap();
    vm.stop_collapse();
    let (fds_end, threads_end, rss_end) = (fd_count(), thread_count(), status_bytes("VmRSS"));
    eprintln!(
        "{hops} hops in {:.1} s; guest wrote {last} pages; fds {fds0} -> {fds_warm} -> {fds_end} \
         (one VM: {vm_fds}); threads {threads0} -> {threads_warm} -> {threads_end}; \
         VmRSS after {WARMUP_HOPS} hops {} MiB, after {hops} {} MiB; VmHWM {} MiB",
        t0.elapsed().as_secs_f64(),
        rss_warm >> 20,
        rss_end >> 20,
        status_bytes("VmHWM") >> 20,
    );
    assert!(vm.guest_status().ok(), "{:?}", vm.guest_status());
    // One live VM after the warm-up and at the end: the same fds and threads.
    assert_eq!(fds_warm, fds0 + vm_fds, "fds after warm-up");
    assert_eq!(fds_end, fds_warm, "fds leaked over {hops} hops");
    assert_eq!(threads_warm, threads0 + vm_threads, "threads after warm-up");
    assert_eq!(threads_end, threads_warm, "threads leaked over {hops} hops");
    assert!(
        rss_end < rss_warm + RSS_SLACK,
        "RSS grew from {} MiB to {} MiB over {hops} hops (VM size {} MiB)",
        rss_warm >> 20,
        rss_end >> 20,
        MEM_SIZE >> 20
    );
    if hops >= 100 {
        eprintln!(
            "VmRSS: highest over hops {RSS_WINDOW:?} {} KiB, at the end {} KiB",
            rss_window >> 10,
            rss_end >> 10
        );
        assert!(
            rss_end <= rss_window + SOAK_RSS_SLACK,
            "RSS not flat: {} KiB after hop {} (highest over hops {RSS_WINDOW:?}), {} KiB after {hops}",
            rss_window >> 10,
            RSS_WINDOW.end(),
            rss_end >> 10
        );
    }
    drop(vm);
    assert_eq!(fd_count(), fds0, "fds left after the last VM is gone");
    assert_eq!(
        thread_count(),
        threads0,
        "threads left after the last VM is gone"
    );
}
