//! `minivm bench`: what KVM dirty tracking costs a running guest.
//!
//! Part A, the pause that *starting* a migration imposes: on a large guest
//! whose memory is populated, time what the engine does at setup (tracker
//! start, plus the first sync unless the log starts initially set) and the
//! longest stretch the guest makes no progress around it, sampled from a
//! thread every ~1 ms, against the same measure with no tracking. For
//! manual protect, also the deferred cost: clearing (re-protecting) the
//! first chunk and then every chunk, as the engine does lazily.
//!
//! Part B, whole migrations of a smaller guest writing at a set rate, per
//! tracker, in-process to a second VM: downtime, total and setup time,
//! rounds, bytes; medians over several runs.

use std::io::{BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use livemig::bitmap::DirtyBitmap;
use livemig::engine::{MigrationHandle, MigrationStats, Params, Status};
use livemig::transport::pipe;
use livemig::GuestMemory;

use crate::migrate::{migrate_in, migrate_out};
use crate::{sys, GuestImage, GuestStatus, TestGuestConfig, TrackerKind, Vm, VmConfig};

const MIB: f64 = (1u64 << 20) as f64;
/// How often the sampler reads the guest's page counter.
const SAMPLE_PERIOD: Duration = Duration::from_millis(1);

/// How the migration part moves the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// livemig's in-memory pipe between two threads.
    Pipe,
    /// A loopback TCP connection (stream one way, acknowledgement back).
    Tcp,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Part A: guest memory (bytes).
    pub stall_mem: u64,
    /// Part A: vCPUs.
    pub stall_vcpus: usize,
    /// Part A: each vCPU's working set (bytes); the guest writes it as fast
    /// as it can.
    pub stall_working_set: u64,
    /// Part A: the smaller manual-protect chunk, log2 pages (besides the
    /// default 2^14 pages = 64 MiB).
    pub small_chunk_shift: u32,
    /// Part B: guest memory (bytes).
    pub mig_mem: u64,
    /// Part B: vCPUs.
    pub mig_vcpus: usize,
    /// Part B: bytes per second the guest writes (all vCPUs together).
    pub mig_rate: u64,
    /// Part B: each vCPU's working set (bytes).
    pub mig_working_set: u64,
    /// Part B: migration bandwidth cap (bytes/s, 0 = unlimited).
    pub max_bandwidth: u64,
    /// Part B: downtime limit (ms).
    pub downtime_limit: u64,
    /// Part B: dirty ring entries per vCPU for the ring tracker.
    pub ring_entries: u32,
    /// Part B: the stream's transport.
    pub transport: Transport,
    /// Part B: runs per tracker (medians are reported).
    pub runs: usize,
    /// Part A: runs per tracker configuration (medians are reported).
    pub stall_runs: usize,
    /// Part A: clear every chunk for the small manual chunk too (the
    /// default chunk always is); costs a long recovery pass of the guest.
    pub full_clears: bool,
    /// Skip part A.
    pub skip_stall: bool,
    /// Skip part B.
    pub skip_migrate: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            stall_mem: 8 << 30,
            stall_vcpus: 2,
            stall_working_set: 0,
            small_chunk_shift: 12,
            mig_mem: 2 << 30,
            mig_vcpus: 2,
            mig_rate: 200 << 20,
            mig_working_set: 64 << 20,
            max_bandwidth: 0,
            downtime_limit: 300,
            ring_entries: 65536,
            transport: Transport::Tcp,
            runs: 3,
            stall_runs: 1,
            full_clears: false,
            skip_stall: false,
            skip_migrate: false,
        }
    }
}

/// Part A, one tracker configuration: medians over the runs.
#[derive(Clone, Debug, Default)]
pub struct StallRow {
    /// Tracker label (`bitmap`, `manual/1GiB`, ...).
    pub tracker: String,
    /// Whether the log started initially set (first sync skipped).
    pub initially_set: bool,
    /// `tracker.start()`, ms.
    pub start_ms: f64,
    /// The first sync, ms (0 when skipped).
    pub first_sync_ms: f64,
    /// start + first sync, ms: the engine's tracker setup.
    pub setup_ms: f64,
    /// Longest guest no-progress stretch overlapping the setup, ms.
    pub setup_stall_ms: f64,
    /// Manual: CLEAR of the first chunk (before its first page is sent), ms.
    pub first_clear_ms: f64,
    /// Manual: longest guest no-progress stretch overlapping that clear, ms.
    pub first_clear_stall_ms: f64,
    /// Manual: the slowest single-chunk CLEAR over the whole memory, ms.
    pub max_chunk_clear_ms: f64,
    /// Manual: all chunk CLEARs together (spread over a real migration), ms.
    pub all_clears_ms: f64,
    /// Guest write rate in the second after setup, MiB/s.
    pub guest_mib_s_after: f64,
}

/// Part A results.
#[derive(Clone, Debug, Default)]
pub struct StallReport {
    /// Guest memory, bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Working set per vCPU, bytes.
    pub working_set: u64,
    /// Populating all guest memory from the host, ms.
    pub populate_ms: f64,
    /// Longest no-progress stretch of the untracked guest (median over
    /// 1 s windows), ms: the sampling noise floor.
    pub baseline_stall_ms: f64,
    /// Untracked guest write rate, MiB/s.
    pub baseline_mib_s: f64,
    /// One row per tracker configuration.
    pub rows: Vec<StallRow>,
}

/// Part B, one tracker: medians over the runs.
#[derive(Clone, Debug, Default)]
pub struct MigRow {
    /// Tracker label.
    pub tracker: String,
    /// Runs that completed with the self-check passing on the destination.
    pub ok_runs: usize,
    /// Runs attempted.
    pub runs: usize,
    /// Median downtime, ms.
    pub downtime_ms: f64,
    /// Median total time, ms.
    pub total_ms: f64,
    /// Median setup time, ms.
    pub setup_ms: f64,
    /// Median rounds (full passes over memory).
    pub rounds: f64,
    /// Median dirty syncs.
    pub syncs: f64,
    /// Median bytes on the wire.
    pub transferred: f64,
    /// Median bytes sent while the guest was paused.
    pub downtime_bytes: f64,
    /// Median guest write rate during the migration, MiB/s.
    pub guest_mib_s: f64,
    /// Every run's (downtime, total) in ms, in run order.
    pub each: Vec<(u64, u64)>,
}

/// Part B results.
#[derive(Clone, Debug, Default)]
pub struct MigReport {
    /// Guest memory, bytes.
    pub mem: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest write rate setting, bytes/s.
    pub rate: u64,
    /// Working set per vCPU, bytes.
    pub working_set: u64,
    /// Transport used.
    pub transport: String,
    /// One row per tracker.
    pub rows: Vec<MigRow>,
}

/// Everything measured.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    /// Part A (None when skipped).
    pub stall: Option<StallReport>,
    /// Part B (None when skipped).
    pub migrate: Option<MigReport>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads the guest's page counter every [`SAMPLE_PERIOD`] until `stop`.
fn sample(vm: &Vm, stop: &AtomicBool) -> Vec<(Instant, u64)> {
    let mut out = Vec::with_capacity(8192);
    while !stop.load(Ordering::Relaxed) {
        out.push((Instant::now(), vm.guest_status().pages_written()));
        thread::sleep(SAMPLE_PERIOD);
    }
    out
}

/// Stretches between consecutive samples at which the counter moved:
/// (last progress seen, next progress seen).
fn no_progress_spans(samples: &[(Instant, u64)]) -> Vec<(Instant, Instant)> {
    let mut spans = Vec::new();
    let mut last: Option<(Instant, u64)> = None;
    for &(t, v) in samples {
        match last {
            None => last = Some((t, v)),
            Some((lt, lv)) if v != lv => {
                spans.push((lt, t));
                last = Some((t, v));
            }
            Some(_) => {}
        }
    }
    spans
}

/// Longest no-progress stretch overlapping [from, to], ms. A stretch still
/// open at the end of the samples counts up to the last sample.
fn stall_over(samples: &[(Instant, u64)], from: Instant, to: Instant) -> f64 {
    let mut spans = no_progress_spans(samples);
    let open_from = spans
        .last()
        .map(|s| s.1)
        .or_else(|| samples.first().map(|s| s.0));
    if let (Some(a), Some(&(b, _))) = (open_from, samples.last()) {
        spans.push((a, b));
    }
    spans
        .iter()
        .filter(|(a, b)| *a <= to && *b >= from)
        .map(|(a, b)| ms(b.duration_since(*a)))
        .fold(0.0, f64::max)
}

/// Guest write rate between two instants, MiB/s (from the samples).
fn rate_between(samples: &[(Instant, u64)], from: Instant, to: Instant) -> f64 {
    let first = samples.iter().find(|(t, _)| *t >= from);
    let last = samples.iter().rev().find(|(t, _)| *t <= to);
    match (first, last) {
        (Some(&(t0, v0)), Some(&(t1, v1))) if t1 > t0 => {
            (v1.saturating_sub(v0)) as f64 * 4096.0 / MIB / t1.duration_since(t0).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// Runs `f` while a thread samples the guest's progress; returns f's
/// result and the samples.
fn sampled<T>(vm: &Vm, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<(Instant, u64)>)> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let h = s.spawn(|| sample(vm, &stop));
        let r = f();
        stop.store(true, Ordering::Relaxed);
        let samples = h.join().map_err(|_| anyhow!("sampler panicked"))?;
        Ok((r?, samples))
    })
}

fn check_guest(vm: &Vm, what: &str) -> Result<GuestStatus> {
    let s = vm.guest_status();
    if !s.ok() {
        bail!("{what}: guest self-check failed or vCPU stopped: {s:?}");
    }
    Ok(s)
}

fn wait_pages(vm: &Vm, pages: u64, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while vm.guest_status().pages_written() < pages {
        check_guest(vm, "waiting for the guest")?;
        if t0.elapsed() > timeout {
            bail!(
                "guest wrote only {} of {pages} pages in {timeout:?}",
                vm.guest_status().pages_written()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn stall_label(kind: TrackerKind) -> String {
    match kind {
        TrackerKind::Manual { chunk_shift } => {
            let bytes = 4096u64 << chunk_shift;
            if bytes >= 1 << 30 {
                format!("manual/{}GiB", bytes >> 30)
            } else {
                format!("manual/{}MiB", bytes >> 20)
            }
        }
        TrackerKind::Bitmap => "bitmap".into(),
        TrackerKind::Ring => "ring".into(),
        TrackerKind::Auto => "auto".into(),
    }
}

/// One part-A measurement of `kind` on `vm`.
fn stall_once(vm: &Vm, kind: TrackerKind, all_clears: bool) -> Result<StallRow> {
    let mem = vm.memory();
    let mut t = vm.tracker(kind)?;
    let settle = Duration::from_millis(150);
    let mut row = StallRow {
        tracker: stall_label(kind),
        max_chunk_clear_ms: f64::NAN,
        all_clears_ms: f64::NAN,
        ..Default::default()
    };
    let mut marks = (Instant::now(), Instant::now(), None::<(Instant, Instant)>);
    let ((), samples) = sampled(vm, || {
        thread::sleep(settle);
        let t0 = Instant::now();
        let st = t.start()?;
        let t1 = Instant::now();
        if !st.initially_set {
            let mut maps: Vec<DirtyBitmap> = mem
                .blocks()
                .iter()
                .map(|b| DirtyBitmap::new(b.pages()))
                .collect();
            t.sync(&mut maps)?;
        }
        let t2 = Instant::now();
        row.initially_set = st.initially_set;
        row.start_ms = ms(t1 - t0);
        row.first_sync_ms = if st.initially_set { 0.0 } else { ms(t2 - t1) };
        row.setup_ms = ms(t2 - t0);
        marks.0 = t0;
        marks.1 = t2;
        thread::sleep(Duration::from_millis(1000));
        if let (Some(shift), true) = (t.clear_chunk_shift(), st.initially_set) {
            // What the engine does just before the first page of the first
            // chunk, then (spread over the migration) every other chunk.
            let c0 = Instant::now();
            t.clear(0, 0, 1 << shift)?;
            let c1 = Instant::now();
            marks.2 = Some((c0, c1));
            row.first_clear_ms = ms(c1 - c0);
            thread::sleep(settle);
            if !all_clears {
                return Ok(());
            }
            let mut max = row.first_clear_ms;
            let mut all = row.first_clear_ms;
            for (i, b) in mem.blocks().iter().enumerate() {
                let mut p = if i == 0 { 1 << shift } else { 0 };
                while p < b.pages() {
                    let c = Instant::now();
                    t.clear(i, p, 1 << shift)?;
                    let d = ms(c.elapsed());
                    max = max.max(d);
                    all += d;
                    p += 1 << shift;
                }
            }
            row.max_chunk_clear_ms = max;
            row.all_clears_ms = all;
        }
        Ok(())
    })?;
    t.stop()?;
    drop(t);
    let (t0, t2, clear) = marks;
    row.setup_stall_ms = stall_over(&samples, t0, t2);
    row.guest_mib_s_after = rate_between(&samples, t2, t2 + Duration::from_millis(1000));
    if let Some((c0, c1)) = clear {
        row.first_clear_stall_ms = stall_over(&samples, c0, c1);
    }
    check_guest(vm, &row.tracker)?;
    Ok(row)
}

/// Pages per vCPU for a working set of `ws` bytes; 0 = all guest memory
/// above the test guest's fixed area, shared among the vCPUs.
fn working_set_pages(mem: u64, vcpus: usize, ws: u64) -> u64 {
    if ws > 0 {
        return (ws / 4096).max(1);
    }
    let per_vcpu = mem.saturating_sub(crate::guest::WORK_ADDR) / vcpus as u64;
    // Each page also takes 8 bytes of sequence table (rounded up to a page).
    (per_vcpu.saturating_sub(4096) / (4096 + 8)).max(1)
}

fn stall_part(cfg: &BenchConfig) -> Result<StallReport> {
    let pages = working_set_pages(cfg.stall_mem, cfg.stall_vcpus, cfg.stall_working_set);
    let all_pages = pages * cfg.stall_vcpus as u64;
    let vm = Vm::new(VmConfig {
        mem_size: cfg.stall_mem,
        ram_blocks: 1,
        vcpus: cfg.stall_vcpus,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: pages,
            rate_bytes_per_sec: 0,
        }),
        start_paused: true,
        prefault: false,
        ..VmConfig::default()
    })
    .context("creating the part-A VM")?;
    // Populate every page from the host: a never-touched guest has nothing
    // for the tracker to protect.
    let t0 = Instant::now();
    for s in vm.slots() {
        sys::populate_write(s.host_addr, s.size).context("populating guest memory")?;
    }
    let populate_ms = ms(t0.elapsed());
    eprintln!(
        "part A: {} GiB guest populated in {populate_ms:.0} ms; warming up",
        cfg.stall_mem >> 30
    );
    vm.resume();
    // One pass over each working set: every page the guest writes is
    // mapped (and writable) before anything is measured.
    let t0 = Instant::now();
    wait_pages(&vm, all_pages, Duration::from_secs(300))?;
    eprintln!(
        "part A: guest wrote its {} MiB once in {:.1} s",
        (all_pages * 4096) >> 20,
        t0.elapsed().as_secs_f64()
    );

    let mut base_stall = Vec::new();
    let mut base_rate = Vec::new();
    // Manual variants first: with only their first chunk cleared they
    // leave little write-protected, so the guest recovers fast. Clearing
    // every chunk (and the bitmap's start) protects all memory, after which
    // the guest needs a long pass of write faults to recover.
    let variants = [
        (
            TrackerKind::Manual {
                chunk_shift: cfg.small_chunk_shift,
            },
            cfg.full_clears,
        ),
        (
            TrackerKind::Manual {
                chunk_shift: TrackerKind::DEFAULT_CHUNK_SHIFT,
            },
            true,
        ),
        (TrackerKind::Bitmap, false),
    ];
    let mut per: Vec<Vec<StallRow>> = vec![Vec::new(); variants.len()];
    let runs = cfg.stall_runs.max(1);
    for run in 0..runs {
        let ((), samples) = sampled(&vm, || {
            thread::sleep(Duration::from_millis(1000));
            Ok(())
        })?;
        let (a, b) = (samples[0].0, samples[samples.len() - 1].0);
        base_stall.push(stall_over(&samples, a, b));
        base_rate.push(rate_between(&samples, a, b));
        for (i, (k, all_clears)) in variants.iter().enumerate() {
            let row = stall_once(&vm, *k, *all_clears)?;
            eprintln!(
                "part A run {}: {:<12} setup {:>7.2} ms, stall {:>6.1} ms, first clear {:>6.2} ms (stall {:.1} ms), all clears {:.1} ms",
                run + 1,
                row.tracker,
                row.setup_ms,
                row.setup_stall_ms,
                row.first_clear_ms,
                row.first_clear_stall_ms,
                row.all_clears_ms
            );
            per[i].push(row);
            if run + 1 == runs && i + 1 == variants.len() {
                break;
            }
            // Let the guest write its whole working set once more (each
            // first write to a protected page faults) so the next tracker
            // starts from the same state.
            let t0 = Instant::now();
            let now = vm.guest_status().pages_written();
            wait_pages(&vm, now + all_pages, Duration::from_secs(300))?;
            eprintln!(
                "part A: guest re-wrote its working set in {:.1} s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let rows = per
        .into_iter()
        .map(|rs| {
            let m = |f: fn(&StallRow) -> f64| median(rs.iter().map(f).collect());
            StallRow {
                tracker: rs[0].tracker.clone(),
                initially_set: rs[0].initially_set,
                start_ms: m(|r| r.start_ms),
                first_sync_ms: m(|r| r.first_sync_ms),
                setup_ms: m(|r| r.setup_ms),
                setup_stall_ms: m(|r| r.setup_stall_ms),
                first_clear_ms: m(|r| r.first_clear_ms),
                first_clear_stall_ms: m(|r| r.first_clear_stall_ms),
                max_chunk_clear_ms: m(|r| r.max_chunk_clear_ms),
                all_clears_ms: m(|r| r.all_clears_ms),
                guest_mib_s_after: m(|r| r.guest_mib_s_after),
            }
        })
        .collect();
    Ok(StallReport {
        mem: cfg.stall_mem,
        vcpus: cfg.stall_vcpus,
        working_set: pages * 4096,
        populate_ms,
        baseline_stall_ms: median(base_stall),
        baseline_mib_s: median(base_rate),
        rows,
    })
}

struct MigRun {
    stats: MigrationStats,
    guest_mib_s: f64,
    ok: bool,
}

/// Migrates `src` into a new VM over the configured transport; returns the
/// source stats and the destination VM (paused).
fn migrate_to_new(
    src: &Vm,
    config: &VmConfig,
    kind: TrackerKind,
    params: Params,
    transport: Transport,
) -> Result<(MigrationStats, Vm)> {
    let handle = MigrationHandle::new(params);
    match transport {
        Transport::Pipe => {
            let (w, r) = pipe();
            let (aw, mut ar) = pipe();
            let cfg = config.clone();
            let dest = thread::spawn(move || migrate_in(&cfg, r, Some(aw)));
            let out = migrate_out(src, kind, handle, w, Some(&mut ar as &mut dyn Read));
            let dst = dest.join().map_err(|_| anyhow!("destination panicked"))?;
            let stats = out?;
            Ok((stats, dst?.0))
        }
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let cfg = config.clone();
            let dest = thread::spawn(move || -> Result<Vm> {
                let (sock, _) = listener.accept()?;
                let ack = sock.try_clone()?;
                let (vm, _) = migrate_in(&cfg, BufReader::with_capacity(1 << 20, sock), Some(ack))?;
                Ok(vm)
            });
            let sock = TcpStream::connect(addr)?;
            sock.set_nodelay(true)?;
            let mut ack = sock.try_clone()?;
            let out = migrate_out(src, kind, handle, sock, Some(&mut ack as &mut dyn Read));
            let dst = dest.join().map_err(|_| anyhow!("destination panicked"))?;
            let stats = out?;
            Ok((stats, dst?))
        }
    }
}

fn mig_once(cfg: &BenchConfig, kind: TrackerKind) -> Result<MigRun> {
    let pages = (cfg.mig_working_set / 4096).max(1);
    let config = VmConfig {
        mem_size: cfg.mig_mem,
        ram_blocks: 1,
        vcpus: cfg.mig_vcpus,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: pages,
            rate_bytes_per_sec: cfg.mig_rate,
        }),
        dirty_ring_entries: (kind == TrackerKind::Ring).then_some(cfg.ring_entries),
        prefault: true,
        ..VmConfig::default()
    };
    let src = Vm::new(config.clone())?;
    // One pass over every working set, then a second of steady writing.
    wait_pages(&src, pages * cfg.mig_vcpus as u64, Duration::from_secs(60))?;
    thread::sleep(Duration::from_millis(1000));
    let params = Params {
        max_bandwidth: cfg.max_bandwidth,
        downtime_limit: cfg.downtime_limit,
        ..Params::default()
    };
    let p0 = src.guest_status().pages_written();
    let (stats, dst) = migrate_to_new(&src, &config, kind, params, cfg.transport)?;
    let p1 = src.guest_status().pages_written();
    let guest_mib_s = (p1 - p0) as f64 * 4096.0 / MIB / (stats.total_time.max(1) as f64 / 1000.0);
    drop(src);
    dst.resume();
    let restored = dst.guest_status().pages_written();
    let moved = wait_pages(&dst, restored + 1, Duration::from_secs(10)).is_ok();
    thread::sleep(Duration::from_millis(200));
    let s = dst.guest_status();
    let ok = stats.status == Status::Completed && moved && s.ok();
    if !ok {
        eprintln!("  destination guest not healthy: moved={moved} {s:?}");
    }
    Ok(MigRun {
        stats,
        guest_mib_s,
        ok,
    })
}

fn mig_part(cfg: &BenchConfig) -> Result<MigReport> {
    let kinds = [
        TrackerKind::Bitmap,
        TrackerKind::Manual {
            chunk_shift: TrackerKind::DEFAULT_CHUNK_SHIFT,
        },
        TrackerKind::Ring,
    ];
    let mut per: Vec<Vec<MigRun>> = (0..kinds.len()).map(|_| Vec::new()).collect();
    let mut failed = vec![0usize; kinds.len()];
    for run in 0..cfg.runs.max(1) {
        for (i, k) in kinds.iter().enumerate() {
            match mig_once(cfg, *k) {
                Ok(r) => {
                    eprintln!(
                        "part B run {}: {:<12} downtime {:>4} ms, total {:>5} ms, setup {:>3} ms, rounds {}, {:.0} MiB sent, guest {:.0} MiB/s{}",
                        run + 1,
                        stall_label(*k),
                        r.stats.downtime,
                        r.stats.total_time,
                        r.stats.setup_time,
                        r.stats.ram.rounds,
                        r.stats.ram.transferred as f64 / MIB,
                        r.guest_mib_s,
                        if r.ok { "" } else { " SELF-CHECK FAILED" }
                    );
                    per[i].push(r);
                }
                Err(e) => {
                    eprintln!("part B run {}: {}: failed: {e:#}", run + 1, stall_label(*k));
                    failed[i] += 1;
                }
            }
        }
    }
    let rows = kinds
        .iter()
        .zip(per)
        .zip(failed)
        .map(|((k, rs), failed)| {
            let m = |f: &dyn Fn(&MigRun) -> f64| median(rs.iter().map(f).collect());
            MigRow {
                tracker: stall_label(*k),
                ok_runs: rs.iter().filter(|r| r.ok).count(),
                runs: rs.len() + failed,
                downtime_ms: m(&|r| r.stats.downtime as f64),
                total_ms: m(&|r| r.stats.total_time as f64),
                setup_ms: m(&|r| r.stats.setup_time as f64),
                rounds: m(&|r| r.stats.ram.rounds as f64),
                syncs: m(&|r| r.stats.ram.dirty_sync_count as f64),
                transferred: m(&|r| r.stats.ram.transferred as f64),
                downtime_bytes: m(&|r| r.stats.ram.downtime_bytes as f64),
                guest_mib_s: m(&|r| r.guest_mib_s),
                each: rs
                    .iter()
                    .map(|r| (r.stats.downtime, r.stats.total_time))
                    .collect(),
            }
        })
        .collect();
    Ok(MigReport {
        mem: cfg.mig_mem,
        vcpus: cfg.mig_vcpus,
        rate: cfg.mig_rate,
        working_set: cfg.mig_working_set,
        transport: format!("{:?}", cfg.transport).to_lowercase(),
        rows,
    })
}

/// Runs the benchmark; progress goes to stderr.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    let mut report = BenchReport::default();
    if !cfg.skip_stall {
        report.stall = Some(stall_part(cfg)?);
    }
    if !cfg.skip_migrate {
        report.migrate = Some(mig_part(cfg)?);
    }
    Ok(report)
}

impl BenchReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if let Some(a) = &self.stall {
            s += &format!(
                "A. Pause imposed by starting migration: {} GiB guest (populated), {} vCPU(s), {} MiB working set each, unlimited writes\n",
                a.mem >> 30,
                a.vcpus,
                a.working_set >> 20
            );
            s += &format!(
                "   untracked guest: longest no-progress gap {:.1} ms per 1 s, {:.0} MiB/s\n",
                a.baseline_stall_ms, a.baseline_mib_s
            );
            s += &format!(
                "   {:<12} {:>9} {:>10} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10} {:>11}\n",
                "tracker",
                "start ms",
                "1st sync",
                "setup ms",
                "stall ms",
                "1st clear",
                "clr stall",
                "max clear",
                "all clrs",
                "guest MiB/s"
            );
            for r in &a.rows {
                let sync = if r.initially_set {
                    "skipped".to_string()
                } else {
                    format!("{:.2}", r.first_sync_ms)
                };
                let opt = |v: f64| {
                    if r.initially_set && v.is_finite() {
                        format!("{v:.2}")
                    } else {
                        "-".into()
                    }
                };
                s += &format!(
                    "   {:<12} {:>9.2} {:>10} {:>9.2} {:>9.1} {:>11} {:>11} {:>10} {:>10} {:>11.0}\n",
                    r.tracker,
                    r.start_ms,
                    sync,
                    r.setup_ms,
                    r.setup_stall_ms,
                    opt(r.first_clear_ms),
                    opt(r.first_clear_stall_ms),
                    opt(r.max_chunk_clear_ms),
                    opt(r.all_clears_ms),
                    r.guest_mib_s_after
                );
            }
        }
        if let Some(b) = &self.migrate {
            s += &format!(
                "B. Migration: {} GiB guest, {} vCPUs, writing {} MiB/s over {} MiB per vCPU, {} (medians)\n",
                b.mem >> 30,
                b.vcpus,
                b.rate >> 20,
                b.working_set >> 20,
                b.transport
            );
            s += &format!(
                "   {:<12} {:>6} {:>11} {:>9} {:>9} {:>7} {:>6} {:>9} {:>10} {:>11}\n",
                "tracker",
                "ok",
                "downtime ms",
                "total ms",
                "setup ms",
                "rounds",
                "syncs",
                "sent MiB",
                "final MiB",
                "guest MiB/s"
            );
            for r in &b.rows {
                s += &format!(
                    "   {:<12} {:>6} {:>11.0} {:>9.0} {:>9.0} {:>7.0} {:>6.0} {:>9.0} {:>10.1} {:>11.0}\n",
                    r.tracker,
                    format!("{}/{}", r.ok_runs, r.runs),
                    r.downtime_ms,
                    r.total_ms,
                    r.setup_ms,
                    r.rounds,
                    r.syncs,
                    r.transferred / MIB,
                    r.downtime_bytes / MIB,
                    r.guest_mib_s
                );
            }
        }
        s
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let num = |v: f64| {
            if v.is_finite() {
                format!("{}", (v * 1000.0).round() / 1000.0)
            } else {
                "null".into()
            }
        };
        let mut parts = Vec::new();
        if let Some(a) = &self.stall {
            let rows: Vec<String> = a
                .rows
                .iter()
                .map(|r| {
                    format!(
                        "{{\"tracker\":\"{}\",\"initially-set\":{},\"start-ms\":{},\"first-sync-ms\":{},\"setup-ms\":{},\"setup-stall-ms\":{},\"first-clear-ms\":{},\"first-clear-stall-ms\":{},\"max-chunk-clear-ms\":{},\"all-clears-ms\":{},\"guest-mib-s-after\":{}}}",
                        r.tracker,
                        r.initially_set,
                        num(r.start_ms),
                        if r.initially_set { "null".into() } else { num(r.first_sync_ms) },
                        num(r.setup_ms),
                        num(r.setup_stall_ms),
                        num(r.first_clear_ms),
                        num(r.first_clear_stall_ms),
                        num(r.max_chunk_clear_ms),
                        num(r.all_clears_ms),
                        num(r.guest_mib_s_after)
                    )
                })
                .collect();
            parts.push(format!(
                "\"start-pause\":{{\"mem\":{},\"vcpus\":{},\"working-set\":{},\"populate-ms\":{},\"baseline-stall-ms\":{},\"baseline-mib-s\":{},\"trackers\":[{}]}}",
                a.mem,
                a.vcpus,
                a.working_set,
                num(a.populate_ms),
                num(a.baseline_stall_ms),
                num(a.baseline_mib_s),
                rows.join(",")
            ));
        }
        if let Some(b) = &self.migrate {
            let rows: Vec<String> = b
                .rows
                .iter()
                .map(|r| {
                    let each: Vec<String> = r
                        .each
                        .iter()
                        .map(|(d, t)| format!("{{\"downtime\":{d},\"total-time\":{t}}}"))
                        .collect();
                    format!(
                        "{{\"tracker\":\"{}\",\"ok-runs\":{},\"runs\":{},\"downtime\":{},\"total-time\":{},\"setup-time\":{},\"rounds\":{},\"dirty-sync-count\":{},\"transferred\":{},\"downtime-bytes\":{},\"guest-mib-s\":{},\"each\":[{}]}}",
                        r.tracker,
                        r.ok_runs,
                        r.runs,
                        num(r.downtime_ms),
                        num(r.total_ms),
                        num(r.setup_ms),
                        num(r.rounds),
                        num(r.syncs),
                        num(r.transferred),
                        num(r.downtime_bytes),
                        num(r.guest_mib_s),
                        each.join(",")
                    )
                })
                .collect();
            parts.push(format!(
                "\"migration\":{{\"mem\":{},\"vcpus\":{},\"rate\":{},\"working-set\":{},\"transport\":\"{}\",\"trackers\":[{}]}}",
                b.mem,
                b.vcpus,
                b.rate,
                b.working_set,
                b.transport,
                rows.join(",")
            ));
        }
        format!("{{{}}}", parts.join(","))
    }
}
