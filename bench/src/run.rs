//! What both systems share: the case to run, the outcome, child processes
//! that die with the harness, memory dumps read through FIFOs, and polling
//! a migration to its end.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::guest::{CheckResult, DigestCheck, GuestKind, IncrementerCheck, MemCheck};
use crate::progress::{End, Event, GuestSpeed, PassClock};

/// A migration setting compared between the two systems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Variant {
    /// Nothing but the bandwidth cap raised and the downtime limit.
    Defaults,
    /// XBZRLE delta pages (same cache size on both).
    Xbzrle,
    /// Auto-converge (CPU throttling).
    AutoConverge,
    /// Parallel page channels: QEMU multifd, livemig `channels`.
    Channels(u16),
    /// A per-vCPU dirty limit in bytes/s (QEMU set-vcpu-dirty-limit with
    /// the KVM dirty ring; minivm's dirty-limit with its dirty ring).
    DirtyLimit(u64),
    /// Postcopy (issue #15): how the switch happens.
    Postcopy(Switch),
}

/// How a postcopy migration switches from precopy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Switch {
    /// `migrate-start-postcopy` once the first pass is done
    /// (`dirty-sync-count` reaches 2).
    AfterFirstPass,
    /// The same with `postcopy-preempt` (urgent pages on their own
    /// connection).
    AfterFirstPassPreempt,
    /// `migrate-start-postcopy` right after `migrate`: pure postcopy.
    Immediately,
    /// livemig's `x-livemig-postcopy-switchover: auto` (`--postcopy`): the
    /// engine switches when precopy stops making progress.
    Auto,
    /// The same with 2 page channels (background pages on them).
    AutoChannels,
    /// The same with the urgent connection (`postcopy-preempt`).
    AutoUrgent,
}

impl Switch {
    /// livemig's own switch (`auto`), whatever the connections.
    pub fn is_auto(self) -> bool {
        matches!(
            self,
            Switch::Auto | Switch::AutoChannels | Switch::AutoUrgent
        )
    }

    /// Requested pages on a connection of their own.
    pub fn preempt(self) -> bool {
        matches!(self, Switch::AfterFirstPassPreempt | Switch::AutoUrgent)
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Defaults => write!(f, "defaults"),
            Variant::Xbzrle => write!(f, "xbzrle"),
            Variant::AutoConverge => write!(f, "auto-converge"),
            Variant::Channels(n) => write!(f, "channels={n}"),
            Variant::DirtyLimit(b) => write!(f, "dirty-limit={}MiB/s", b >> 20),
            Variant::Postcopy(Switch::AfterFirstPass) => write!(f, "postcopy after pass 1"),
            Variant::Postcopy(Switch::AfterFirstPassPreempt) => {
                write!(f, "postcopy+preempt after pass 1")
            }
            Variant::Postcopy(Switch::Immediately) => write!(f, "pure postcopy"),
            Variant::Postcopy(Switch::Auto) => write!(f, "postcopy auto"),
            Variant::Postcopy(Switch::AutoChannels) => write!(f, "postcopy auto channels=2"),
            Variant::Postcopy(Switch::AutoUrgent) => write!(f, "postcopy auto+urgent"),
        }
    }
}

/// One migration to run on each system.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    /// Scenario name (guest, size, downtime limit).
    pub scenario: String,
    /// The guest.
    pub guest: GuestKind,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// End of the guest's range [1 MiB, end).
    pub end: u64,
    /// Downtime limit in ms.
    pub downtime_ms: u64,
    /// The setting compared.
    pub variant: Variant,
    /// Filler seed.
    pub seed: u32,
    /// XBZRLE cache size in bytes.
    pub xbzrle_cache: u64,
    /// Bandwidth cap in bytes/s (set high on both, except in the capped
    /// heavy-dirtier scenario).
    pub max_bandwidth: u64,
    /// Seconds the migration may take before it is cancelled.
    pub budget: Duration,
    /// Seconds to wait for the guest's ready marker.
    pub boot_budget: Duration,
    /// Migrate only once the guest has written its whole range (the
    /// incrementer's first '.'), not while its memory is still mostly zero.
    pub warm_up: bool,
    /// Auto-converge steps (cpu-throttle-initial, cpu-throttle-increment),
    /// set alike on both systems; None: each system's defaults (20, 10).
    pub throttle_steps: Option<(u8, u8)>,
}

impl Case {
    /// The boot sector of this case's guest (both systems boot the same
    /// one).
    pub fn sector(&self) -> [u8; 512] {
        crate::guest::sector(
            self.guest,
            crate::guest::GuestParams {
                end: self.end as u32,
                seed: self.seed,
                n: 1,
            },
        )
    }

    /// The systems that run this case: QEMU has no automatic postcopy
    /// switch, and livemig's postcopy is measured with its own (auto)
    /// switch against QEMU's manual ones.
    pub fn systems(&self) -> &'static [&'static str] {
        match self.variant {
            Variant::Postcopy(s) if s.is_auto() => &["livemig"],
            Variant::Postcopy(_) => &["qemu"],
            _ => &["qemu", "livemig"],
        }
    }

    /// The serial output to wait for before migrating (then, for the
    /// incrementer, [`wait_ready`]: its warm-up pass and the marks that
    /// time it).
    pub fn ready_marker(&self) -> String {
        self.guest.ready_marker().to_string()
    }

    /// The variant as the table shows it (with non-default throttle steps).
    pub fn variant_label(&self) -> String {
        match (self.variant, self.throttle_steps) {
            (Variant::AutoConverge, Some((i, s))) => format!("auto-converge {i}%+{s}%"),
            _ => self.variant.to_string(),
        }
    }

    /// Migration parameters both systems take under the same names.
    pub fn throttle_params(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        if let Some((i, s)) = self.throttle_steps {
            m.insert("cpu-throttle-initial".into(), i.into());
            m.insert("cpu-throttle-increment".into(), s.into());
        }
        m
    }
}

/// What one system did with one case.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// "qemu" or "livemig".
    pub system: String,
    /// False when this system does not offer the variant (see `note`).
    pub ran: bool,
    /// Final status: completed, cancelled (did not converge), failed.
    pub status: String,
    /// Completed within the time budget.
    pub converged: bool,
    /// query-migrate total-time, ms.
    pub total_ms: u64,
    /// query-migrate downtime, ms.
    pub downtime_ms: u64,
    /// query-migrate setup-time, ms.
    pub setup_ms: u64,
    /// ram.transferred, bytes, from the final answer (at completion: the
    /// postcopy push included, on both systems).
    pub bytes: u64,
    /// Of those, ram.postcopy-bytes: sent after the switch to postcopy
    /// (None when the answer has no such figure).
    pub postcopy_bytes: Option<u64>,
    /// ram.mbps as reported (megabits/s, last period).
    pub mbps: f64,
    /// ram.dirty-sync-count.
    pub dirty_syncs: u64,
    /// Highest cpu-throttle-percentage (auto-converge) seen while polling:
    /// both systems drop the throttle once the migration ends.
    pub throttle_pct: u64,
    /// The destination's memory check (None when not reached).
    pub check: Option<CheckResult>,
    /// Why something is missing or odd.
    pub note: String,
    /// Postcopy: ms guest threads waited for pages (QEMU's
    /// `postcopy-blocktime`, livemig's equivalent).
    pub blocktime_ms: Option<u64>,
    /// Postcopy: the highest `postcopy-vcpu-blocktime` entry, ms.
    pub vcpu_blocktime_ms: Option<u64>,
    /// Postcopy: fault latency median, µs (livemig only: QEMU 7.2 has
    /// no latency figures).
    pub fault_p50_us: Option<u64>,
    /// Postcopy: fault latency 99th percentile, µs.
    pub fault_p99_us: Option<u64>,
    /// Incrementer (precopy): its passes per second during the migration
    /// and just before it (see `progress`).
    pub guest_speed: Option<GuestSpeed>,
    /// `guest_speed` as a percentage: the rate during over the rate before.
    pub guest_speed_pct: Option<f64>,
    /// Incrementer (precopy): the source's vCPU thread and other threads
    /// over the passes timed before the migration (see `cpu`).
    pub cpu_before: Option<crate::cpu::Window>,
    /// The same during the migration (to its last active poll).
    pub cpu_during: Option<crate::cpu::Window>,
}

impl Outcome {
    /// Notes why a run stopped early (after any note it already has) and
    /// marks it an error unless it already has a status.
    pub fn record_error(&mut self, e: &anyhow::Error) {
        let note = format!("{e:#}");
        self.note = if self.note.is_empty() {
            note
        } else {
            format!("{}; {note}", self.note)
        };
        if self.status.is_empty() {
            self.status = "error".into();
        }
    }
}

impl Outcome {
    /// Takes the figures from a final `query-migrate` answer (QEMU's and
    /// livemig's use the same names).
    pub fn take_stats(&mut self, q: &Value) {
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        self.status = q["status"].as_str().unwrap_or("?").to_string();
        self.total_ms = u(&q["total-time"]);
        self.downtime_ms = u(&q["downtime"]);
        self.setup_ms = u(&q["setup-time"]);
        self.bytes = u(&q["ram"]["transferred"]);
        self.postcopy_bytes = q["ram"]["postcopy-bytes"].as_u64();
        self.mbps = q["ram"]["mbps"].as_f64().unwrap_or(0.0);
        self.dirty_syncs = u(&q["ram"]["dirty-sync-count"]);
        self.throttle_pct = u(&q["cpu-throttle-percentage"]).max(u(&q[MAX_THROTTLE]));
        if let Some(d) = q["error-desc"].as_str() {
            self.note = d.to_string();
        }
        self.take_postcopy(q);
    }

    /// Takes the postcopy figures (blocktime, fault latency) where `q`
    /// has them: livemig's source, QEMU's destination.
    pub fn take_postcopy(&mut self, q: &Value) {
        if let Some(b) = q["postcopy-blocktime"].as_u64() {
            self.blocktime_ms = Some(b);
        }
        if let Some(v) = q["postcopy-vcpu-blocktime"].as_array() {
            self.vcpu_blocktime_ms = v.iter().filter_map(|x| x.as_u64()).max();
        }
        if let Some(p) = q["postcopy-latency-p50"].as_u64() {
            self.fault_p50_us = Some(p);
        }
        if let Some(p) = q["postcopy-latency-p99"].as_u64() {
            self.fault_p99_us = Some(p);
        }
    }

    /// Takes the guest's speed over a migration started at `start` (seconds
    /// on the pass clock that gave `events`); nothing when it cannot be
    /// measured (see [`crate::progress::guest_speed`]).
    pub fn take_guest_speed(&mut self, case: &Case, events: &[Event], start: f64, end: End) {
        if matches!(case.variant, Variant::Postcopy(_)) {
            // The guest moves to the destination at the switch: not
            // measured.
            return;
        }
        let range = case.end.saturating_sub(crate::guest::FIRST);
        self.guest_speed = crate::progress::guest_speed(events, start, end, range);
        self.guest_speed_pct = self.guest_speed.map(|g| g.pct());
    }

    /// Where the guest's migration ended on the pass clock, given when it
    /// started and, for a completed one, the writer's position in the
    /// source's final memory: the source stopped it `downtime` before the
    /// end of `total-time`.
    pub fn guest_end(&self, start: f64, position: Option<f64>) -> End {
        match position.filter(|_| self.converged) {
            Some(position) => End::Stopped {
                at: start + self.total_ms.saturating_sub(self.downtime_ms) as f64 / 1e3,
                position,
            },
            None => End::Open {
                at: start + self.total_ms as f64 / 1e3,
            },
        }
    }

    /// True when the destination's memory check ran and passed.
    pub fn check_ok(&self) -> bool {
        self.check.as_ref().is_some_and(|c| c.ok)
    }
}

/// A child process killed (and reaped) when dropped, with its output in a
/// log file.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        crate::cleanup::prepare(&mut cmd);
        // Registered before the lock is released: the signal thread never
        // misses a child that exists.
        let mut pids = crate::cleanup::pids();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        pids.push(child.id());
        drop(pids);
        Ok(Proc {
            name: name.into(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        // Reaped under the registry's lock, and forgotten there: a reaped
        // pid may be reused, the signal thread must never kill it.
        let mut pids = crate::cleanup::pids();
        let st = self.child.try_wait().ok().flatten();
        if st.is_some() {
            crate::cleanup::remove_pid(&mut pids, self.child.id());
        }
        st
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{} did not exit within {timeout:?}; its log ends: {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the process's output.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(4)..].join(" | ")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut pids = crate::cleanup::pids();
        let _ = self.child.kill();
        let _ = self.child.wait();
        crate::cleanup::remove_pid(&mut pids, self.child.id());
    }
}

/// Waits until the file at `serial` contains `marker`, failing early when
/// `proc` exits.
pub fn wait_marker(serial: &Path, marker: &str, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read(serial).unwrap_or_default();
        if String::from_utf8_lossy(&s).contains(marker) {
            return Ok(());
        }
        if let Some(st) = proc.exited() {
            bail!(
                "{} exited ({st}) before the guest printed {marker:?}; log: {}",
                proc.name,
                proc.log_tail()
            );
        }
        if t0.elapsed() > timeout {
            bail!(
                "the guest did not print {marker:?} on {} within {timeout:?}",
                serial.display()
            );
        }
        // Often: a guest that starts writing with its marker (the
        // incrementer) dirties ~1 GB/s meanwhile, and what it wrote
        // before the migration starts is what postcopy carries (each
        // 100 ms of it ~0.8 s at 1 Gbit/s).
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pass clock of an incrementer case (None for other guests), started
/// before its guest boots.
pub fn pass_clock(case: &Case, serial: &Path) -> Option<PassClock> {
    (case.guest == GuestKind::Incrementer)
        .then(|| PassClock::start(serial, GuestKind::Incrementer.ready_marker(), case.end))
}

/// Once the guest printed its ready marker: waits, up to `timeout`, for the
/// rest of what the case migrates after (its first full pass with a
/// warm-up) and for the marks that give its rate before the migration.
pub fn wait_ready(case: &Case, clock: Option<&PassClock>, timeout: Duration) -> Result<()> {
    let Some(c) = clock else { return Ok(()) };
    let range = case.end.saturating_sub(crate::guest::FIRST).max(1) as f64;
    // Postcopy's guest speed is not measured: it migrates at once (what
    // the guest wrote before is what postcopy carries).
    let marks = if matches!(case.variant, Variant::Postcopy(_)) {
        0
    } else {
        crate::progress::MARKS_BEFORE
    };
    if marks == 0 && !case.warm_up {
        return Ok(());
    }
    let warm = if case.warm_up { 1.0 } else { 0.0 };
    let target = warm + (marks as u64 * crate::progress::MARK_BYTES) as f64 / range;
    if !c.wait(target.min(warm + 1.0), marks, timeout) && case.warm_up {
        bail!("the incrementer did not finish its first pass within {timeout:?}");
    }
    Ok(())
}

/// Samples a source VM's threads (see `cpu`) for the cases with a pass
/// clock: when it is ready, when the migration starts, and at every poll
/// that finds it active.
pub struct CpuWatch {
    pid: Option<u32>,
    ready: Option<crate::cpu::Sample>,
    start: Option<crate::cpu::Sample>,
    last: Option<crate::cpu::Sample>,
}

impl CpuWatch {
    /// Watches `pid` when `on`.
    pub fn new(pid: u32, on: bool) -> CpuWatch {
        CpuWatch {
            pid: on.then_some(pid),
            ready: None,
            start: None,
            last: None,
        }
    }

    fn sample(&self) -> Option<crate::cpu::Sample> {
        self.pid.and_then(crate::cpu::sample)
    }

    /// The guest printed its ready marker.
    pub fn ready(&mut self) {
        self.ready = self.sample();
    }

    /// The migration starts.
    pub fn start(&mut self) {
        self.start = self.sample();
    }

    /// A poll answered `q`.
    pub fn poll(&mut self, q: &Value) {
        if q["status"] == "active" {
            if let Some(s) = self.sample() {
                self.last = Some(s);
            }
        }
    }

    /// Puts the windows into `out`.
    pub fn finish(&self, out: &mut Outcome) {
        use crate::cpu::window;
        if let (Some(a), Some(b)) = (&self.ready, &self.start) {
            out.cpu_before = window(a, b);
        }
        if let (Some(a), Some(b)) = (&self.start, &self.last) {
            out.cpu_during = window(a, b);
        }
    }
}

/// Creates a FIFO at `path`.
pub fn mkfifo(path: &Path) -> Result<()> {
    let st = Command::new("mkfifo")
        .arg(path)
        .status()
        .context("running mkfifo")?;
    if !st.success() {
        bail!("mkfifo {} failed: {st}", path.display());
    }
    Ok(())
}

/// Something a memory dump is fed to.
pub trait Feed: Send + 'static {
    /// Memory at `addr`.
    fn feed(&mut self, addr: u64, chunk: &[u8]);
}

impl Feed for Box<dyn MemCheck> {
    fn feed(&mut self, addr: u64, chunk: &[u8]) {
        MemCheck::feed(self.as_mut(), addr, chunk)
    }
}

impl Feed for IncrementerCheck {
    fn feed(&mut self, addr: u64, chunk: &[u8]) {
        MemCheck::feed(self, addr, chunk)
    }
}

impl Feed for DigestCheck {
    fn feed(&mut self, addr: u64, chunk: &[u8]) {
        DigestCheck::feed(self, addr, chunk)
    }
}

/// One memory dump to read: the FIFO it arrives on, its guest address
/// and size. A FIFO per dump: a writer that reopens one FIFO before the
/// reader saw the previous writer's end would merge two dumps.
pub type Region = (PathBuf, u64, u64);

/// Reads memory dumps, one after the other, in a thread, feeding `sink`.
pub struct DumpReader<T: Feed> {
    fifos: Vec<PathBuf>,
    thread: Option<JoinHandle<(T, Result<()>)>>,
}

impl<T: Feed> DumpReader<T> {
    /// Starts reading `regions` in order.
    pub fn start(regions: Vec<Region>, mut sink: T) -> DumpReader<T> {
        let fifos = regions.iter().map(|r| r.0.clone()).collect();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            for (path, addr, size) in regions {
                let r = (|| -> Result<()> {
                    let mut f = File::open(&path)
                        .with_context(|| format!("opening FIFO {}", path.display()))?;
                    let mut at = addr;
                    loop {
                        let n = f.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        let n = n.min((addr + size).saturating_sub(at) as usize);
                        sink.feed(at, &buf[..n]);
                        at += n as u64;
                    }
                    if at != addr + size {
                        bail!(
                            "memory dump of {addr:#x}+{size:#x} on {} ended after {} bytes",
                            path.display(),
                            at - addr
                        );
                    }
                    Ok(())
                })();
                if let Err(e) = r {
                    return (sink, Err(e));
                }
            }
            (sink, Ok(()))
        });
        DumpReader {
            fifos,
            thread: Some(thread),
        }
    }

    /// Waits up to `timeout` for the dumps; on timeout (a writer that never
    /// came), unblocks the reader and returns what was fed with an error.
    pub fn finish(mut self, timeout: Duration) -> (T, Result<()>) {
        let t = self.thread.take().expect("finished once");
        let t0 = Instant::now();
        while !t.is_finished() {
            if t0.elapsed() > timeout {
                self.unblock_until(&t);
                let (sink, _) = t.join().expect("dump reader panicked");
                return (
                    sink,
                    Err(anyhow::anyhow!(
                        "no complete memory dump arrived on {} within {timeout:?}",
                        self.fifos
                            .iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().expect("dump reader panicked")
    }

    /// Opens the FIFOs for writing (non-blocking) and closes them until
    /// the reader ends: a reader waiting on one then sees a short dump.
    fn unblock_until(&self, t: &JoinHandle<(T, Result<()>)>) {
        use std::os::unix::fs::OpenOptionsExt;
        while !t.is_finished() {
            for f in &self.fifos {
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(f);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl<T: Feed> Drop for DumpReader<T> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.unblock_until(&t);
            let _ = t.join();
        }
    }
}

/// The field [`poll_migration`] adds to the final answer: the highest
/// `cpu-throttle-percentage` any poll saw.
pub const MAX_THROTTLE: &str = "harness-max-cpu-throttle-percentage";

/// How long [`poll_migration`] asks again for the times of an answer that
/// says `completed` without them.
const SETTLE: Duration = Duration::from_secs(2);

/// Whether a `completed` answer holds its total time (QEMU's is missing
/// or 0 for a moment after the status changes).
fn has_final_times(q: &Value) -> bool {
    q["total-time"].as_u64().is_some_and(|t| t > 0)
}

/// Polls `query` (a `query-migrate`) every `every` until a final status; at
/// `budget` calls `cancel` and waits for the cancel to land. Returns the
/// final answer (with [`MAX_THROTTLE`] added) and whether it completed in
/// time.
pub fn poll_migration(
    budget: Duration,
    every: Duration,
    mut query: impl FnMut() -> Result<Value>,
    mut cancel: impl FnMut() -> Result<()>,
) -> Result<(Value, bool)> {
    let t0 = Instant::now();
    let mut cancelled_at: Option<Instant> = None;
    let mut completed_at: Option<Instant> = None;
    let mut last_active: Option<Value> = None;
    let mut max_throttle = 0;
    let with_max = |mut q: Value, m: u64| {
        if let Some(o) = q.as_object_mut() {
            o.insert(MAX_THROTTLE.into(), m.into());
        }
        q
    };
    loop {
        let q = query()?;
        max_throttle = q["cpu-throttle-percentage"]
            .as_u64()
            .unwrap_or(0)
            .max(max_throttle);
        match q["status"].as_str().unwrap_or("") {
            // QEMU 7.2 sets `completed` before it computes `total-time`
            // and `downtime` (both read 0 in that window; seen once in 18
            // multifd runs: "total 0 ms" for 304 MiB sent): ask again.
            "completed"
                if !has_final_times(&q)
                    && completed_at.get_or_insert_with(Instant::now).elapsed() < SETTLE =>
            {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            "completed" => return Ok((with_max(q, max_throttle), cancelled_at.is_none())),
            "failed" | "cancelled" => {
                // QEMU drops the figures once cancelled: keep those of the
                // last poll before, with the final status.
                let q = match last_active {
                    Some(mut a) if q.get("ram").is_none() => {
                        a["status"] = q["status"].clone();
                        a
                    }
                    _ => q,
                };
                return Ok((with_max(q, max_throttle), false));
            }
            _ => {}
        }
        if q.get("ram").is_some() {
            last_active = Some(q.clone());
        }
        match cancelled_at {
            None if t0.elapsed() > budget => {
                cancel()?;
                cancelled_at = Some(Instant::now());
            }
            Some(c) if c.elapsed() > Duration::from_secs(30) => {
                bail!("the migration did not end within 30 s of migrate-cancel: {q}")
            }
            _ => {}
        }
        std::thread::sleep(every);
    }
}

/// With a manual postcopy switch: true once `migrate-start-postcopy`
/// is due, given the source's latest `query-migrate` answer.
pub fn switch_due(variant: Variant, q: &Value) -> bool {
    match variant {
        Variant::Postcopy(Switch::Immediately) => true,
        Variant::Postcopy(Switch::AfterFirstPass | Switch::AfterFirstPassPreempt) => {
            q["status"] == "active" && q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
        }
        _ => false,
    }
}

/// A free TCP port on 127.0.0.1 (bound then released); in the fresh
/// namespaces of `--link` any port is free, this one too.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The check a case's destination memory gets, as a boxed stream check.
pub fn check_for(case: &Case) -> Option<Box<dyn MemCheck>> {
    use crate::guest::{FillerCheck, IncrementerCheck};
    match case.guest {
        GuestKind::Incrementer => Some(Box::new(IncrementerCheck::new(case.end))),
        GuestKind::Filler => Some(Box::new(FillerCheck::new(case.end, case.seed))),
        GuestKind::Idle => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stats_come_from_query_migrate_names() {
        let mut o = Outcome::default();
        o.take_stats(&json!({
            "status": "completed", "total-time": 1200, "downtime": 31, "setup-time": 4,
            "ram": {"transferred": 1073741824u64, "mbps": 8123.5, "dirty-sync-count": 5},
            "cpu-throttle-percentage": 70
        }));
        assert_eq!(o.throttle_pct, 70);
        assert_eq!(o.status, "completed");
        assert_eq!(
            (o.total_ms, o.downtime_ms, o.setup_ms, o.dirty_syncs),
            (1200, 31, 4, 5)
        );
        assert_eq!(o.bytes, 1 << 30);
        assert_eq!(o.mbps, 8123.5);
    }

    #[test]
    fn sent_bytes_of_a_postcopy_run_are_the_final_figure() {
        // The answers of one postcopy migration (QEMU's names, livemig's
        // alike): at the switch, then at completion. Polling returns the
        // one at completion, and the sent bytes include the push.
        let answers = [
            json!({"status": "active", "ram": {"transferred": 40 << 20, "dirty-sync-count": 2}}),
            json!({"status": "postcopy-active",
                   "ram": {"transferred": 41 << 20, "postcopy-bytes": 1 << 20}}),
            json!({"status": "completed", "total-time": 900,
                   "ram": {"transferred": 300 << 20, "precopy-bytes": 39 << 20,
                           "downtime-bytes": 1 << 20, "postcopy-bytes": 260 << 20}}),
        ];
        let mut it = answers.into_iter();
        let (q, converged) = poll_migration(
            Duration::from_secs(60),
            Duration::ZERO,
            || Ok(it.next().expect("polled past completion")),
            || panic!("not cancelled"),
        )
        .unwrap();
        assert!(converged);
        let mut o = Outcome::default();
        o.take_stats(&q);
        assert_eq!(o.status, "completed");
        assert_eq!(o.bytes, 300 << 20);
        assert_eq!(o.postcopy_bytes, Some(260 << 20));
    }

    #[test]
    fn heavy_cases_wait_for_a_full_pass_and_set_throttle_steps() {
        let mut c = Case {
            scenario: "s".into(),
            guest: GuestKind::Incrementer,
            mem: 1 << 30,
            end: 1 << 30,
            downtime_ms: 300,
            variant: Variant::AutoConverge,
            seed: 1,
            xbzrle_cache: 64 << 20,
            max_bandwidth: 256 << 20,
            budget: Duration::from_secs(35),
            boot_budget: Duration::from_secs(60),
            warm_up: false,
            throttle_steps: None,
        };
        assert_eq!(c.ready_marker(), "INC\n");
        assert_eq!(c.variant_label(), "auto-converge");
        assert!(c.throttle_params().is_empty());
        c.warm_up = true;
        c.throttle_steps = Some((50, 20));
        assert_eq!(c.ready_marker(), "INC\n");
        assert_eq!(c.variant_label(), "auto-converge 50%+20%");
        assert_eq!(
            Value::Object(c.throttle_params()),
            json!({"cpu-throttle-initial": 50, "cpu-throttle-increment": 20})
        );
        c.variant = Variant::Defaults;
        assert_eq!(c.variant_label(), "defaults");
    }

    #[test]
    fn guest_speed_ends_where_the_source_stopped_the_guest() {
        let case = Case {
            scenario: "s".into(),
            guest: GuestKind::Incrementer,
            mem: 1 << 30,
            end: crate::guest::FIRST + (64 << 20),
            downtime_ms: 300,
            variant: Variant::Channels(2),
            seed: 1,
            xbzrle_cache: 0,
            max_bandwidth: 0,
            budget: Duration::from_secs(20),
            boot_budget: Duration::from_secs(60),
            warm_up: false,
            throttle_steps: None,
        };
        // 1 pass/s before (a quarter pass every 0.25 s), migrated from 1.0.
        let ev = [
            (0.0, 0.0),
            (0.25, 0.25),
            (0.5, 0.5),
            (0.75, 0.75),
            (1.0, 1.0),
        ];
        let mut o = Outcome {
            converged: true,
            total_ms: 2300,
            downtime_ms: 300,
            ..Default::default()
        };
        // Stopped 2 s after the start (total minus downtime), half a pass
        // further: a quarter of its speed.
        let end = o.guest_end(1.0, Some(1.5));
        assert_eq!(
            end,
            End::Stopped {
                at: 3.0,
                position: 1.5
            }
        );
        o.take_guest_speed(&case, &ev, 1.0, end);
        assert_eq!(o.guest_speed_pct, Some(25.0));
        // Cancelled: the window is open until the end of total-time.
        o.converged = false;
        assert_eq!(o.guest_end(1.0, Some(1.5)), End::Open { at: 3.3 });
        // Postcopy moves the guest away: no figure.
        let mut o = Outcome::default();
        let pc = Case {
            variant: Variant::Postcopy(Switch::Auto),
            ..case
        };
        o.take_guest_speed(&pc, &ev, 1.0, end);
        assert_eq!((o.guest_speed, o.guest_speed_pct), (None, None));
    }

    #[test]
    fn poll_cancels_at_the_budget() {
        let mut n = 0;
        let mut cancelled = false;
        let c = std::cell::Cell::new(false);
        let (q, ok) = poll_migration(
            Duration::from_millis(250),
            Duration::from_millis(100),
            || {
                n += 1;
                Ok(if c.get() {
                    json!({"status": "cancelled"})
                } else {
                    json!({"status": "active", "total-time": n, "ram": {"transferred": 7},
                           "cpu-throttle-percentage": if n == 1 { 30 } else { 20 }})
                })
            },
            || {
                cancelled = true;
                c.set(true);
                Ok(())
            },
        )
        .unwrap();
        assert!(!ok && cancelled);
        assert_eq!(q["status"], "cancelled");
        // The figures of the last poll before the cancel are kept.
        assert_eq!(q["ram"]["transferred"], 7);
        assert!(q["total-time"].as_u64().unwrap() >= 2);
        // The highest throttle any poll saw, not the last one.
        assert_eq!(q[MAX_THROTTLE], 30);
        assert!(n >= 3);
    }

    #[test]
    fn poll_asks_again_for_the_times_of_a_completed_answer() {
        // Asked again until the times are there (for up to `SETTLE`), then
        // taken as it is.
        let mut n = 0;
        let (q, ok) = poll_migration(
            Duration::from_secs(5),
            Duration::from_millis(100),
            || {
                n += 1;
                Ok(if n < 3 {
                    json!({"status": "completed", "total-time": 0, "downtime": 0})
                } else {
                    json!({"status": "completed", "total-time": 812, "downtime": 14})
                })
            },
            || panic!("no cancel"),
        )
        .unwrap();
        assert!(ok);
        assert_eq!(
            (n, &q["total-time"], &q["downtime"]),
            (3, &json!(812), &json!(14))
        );
        let t = Instant::now();
        let (q, ok) = poll_migration(
            Duration::from_secs(5),
            Duration::from_millis(100),
            || Ok(json!({"status": "completed"})),
            || panic!("no cancel"),
        )
        .unwrap();
        assert!(ok);
        assert_eq!(q["status"], "completed");
        assert!(t.elapsed() >= SETTLE, "asked again for {:?}", t.elapsed());
    }

    #[test]
    fn dump_reader_reads_regions_and_reports_short_dumps() {
        let dir = std::env::temp_dir().join(format!("dump-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.fifo"), dir.join("b.fifo"));
        mkfifo(&a).unwrap();
        mkfifo(&b).unwrap();
        let r = DumpReader::start(
            vec![(a.clone(), 0, 10), (b.clone(), 100, 5)],
            DigestCheck::default(),
        );
        std::fs::write(&a, [1u8; 10]).unwrap();
        std::fs::write(&b, [2u8; 3]).unwrap();
        let (d, res) = r.finish(Duration::from_secs(5));
        assert!(res.unwrap_err().to_string().contains("ended after 3 bytes"));
        assert_eq!(d.finish().bytes, 13);
        // A writer that never comes: finish unblocks and says so.
        let r = DumpReader::start(vec![(a.clone(), 0, 10)], DigestCheck::default());
        let (_, res) = r.finish(Duration::from_millis(200));
        assert!(res.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
