//! The reference VM end to end: `livemig demo` (source and destination VMs
//! in two processes over loopback TCP), `livemig vm-migrate` and
//! `livemig vm-incoming` (the same, step by step; `file:` URIs give a
//! snapshot and its restore).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use livemig::engine::ChannelWriter;
use livemig::engine::{
    hex, memory_digest, Destination, MigrationError, MigrationHandle, MigrationStats,
};
use livemig::transport::Uri;
use minivm::guest::{test_guest_bytes, MAX_VCPUS};
use minivm::migrate::migrate_out_channels;
use minivm::{GuestImage, GuestStatus, TestGuestConfig, TrackerKind, Vm, VmConfig};
use serde_json::{json, Value};

use crate::process::{IoArgs, TuneArgs};
use crate::report::{succeeded, summary, Progress};
use crate::units::{human, parse_mem_size, parse_size};

const TWO_MIB: u64 = 2 << 20;

/// What a one-shot command adds to an unconfirmed completion.
pub(crate) const UNCONFIRMED_HINT: &str = ". This command exits now and its paused copy \
     ends with it: if the destination is not running the guest, the guest is lost. A VM kept \
     under `minivm run --control` stays paused instead, for `livemig control SOCKET cont`";
pub(crate) const MIB: f64 = (1u64 << 20) as f64;

fn parse_vm_mem(s: &str) -> Result<u64, String> {
    let v = parse_mem_size(s)?;
    if v % TWO_MIB != 0 {
        return Err(format!("'{s}' must be a multiple of 2 MiB (e.g. 512M, 1G)"));
    }
    Ok(v)
}

/// The VM's shape; source and destination must agree on it.
#[derive(Args, Clone, Debug)]
pub struct LayoutArgs {
    /// Guest memory (a multiple of 2 MiB, e.g. 512M, 1G, 4G).
    #[arg(short = 'm', long, alias = "size", value_name = "SIZE", default_value = minivm::defaults::MEM, value_parser = parse_vm_mem)]
    pub mem: u64,
    /// Number of vCPUs (each runs its own copy of the test guest).
    #[arg(long, default_value_t = minivm::defaults::VCPUS, value_parser = clap::value_parser!(u16).range(1..=MAX_VCPUS as i64))]
    pub vcpus: u16,
    /// Number of RAM blocks (KVM memory slots) the memory is split into.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub blocks: u16,
}

/// Dirty tracker for a KVM guest.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyTrack {
    /// The best this host offers (manual protect with initially-set, else
    /// the classic bitmap; never the ring).
    Auto,
    /// Classic KVM dirty bitmap (GET_DIRTY_LOG re-protects everything).
    Bitmap,
    /// Manual protect: write protection armed chunk by chunk as pages go.
    Manual,
    /// Per-vCPU dirty ring.
    Ring,
}

/// The source guest: the built-in self-checking test guest.
#[derive(Args, Clone, Debug)]
pub struct GuestArgs {
    /// Bytes per second the guest writes, all vCPUs together (0 = as fast as it can).
    #[arg(long, alias = "rate", value_name = "BYTES_PER_SEC", default_value = minivm::defaults::DIRTY_RATE, value_parser = parse_size)]
    pub dirty_rate: u64,
    /// Working set of each vCPU (default: about 3/4 of --mem shared by the vCPUs, at most 384M each).
    #[arg(long, value_parser = parse_mem_size)]
    pub working_set: Option<u64>,
    /// Dirty tracker.
    #[arg(
        long,
        alias = "tracker",
        value_name = "TRACKER",
        value_enum,
        default_value = "auto"
    )]
    pub dirty_track: DirtyTrack,
    /// Manual tracker: log2 of pages per write-protect chunk (14 = 64 MiB; QEMU's 18 = 1 GiB).
    #[arg(long, default_value_t = TrackerKind::DEFAULT_CHUNK_SHIFT, value_parser = clap::value_parser!(u32).range(6..=30))]
    pub chunk_shift: u32,
    /// Ring tracker: dirty ring entries per vCPU (a power of two).
    #[arg(long, default_value_t = minivm::defaults::DIRTY_RING)]
    pub dirty_ring: u32,
    /// Do not populate the working set from the host before the guest starts.
    #[arg(long)]
    pub no_prefault: bool,
    /// Seconds the guest runs before the migration starts.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Back guest memory with memfds (sealed against shrinking, mapped
    /// shared) instead of anonymous memory (implied by --local).
    #[arg(long)]
    pub memfd: bool,
}

/// Dirty-limit and the picture of the migration.
#[derive(Args, Clone, Debug, Default)]
pub struct ConvergeArgs {
    /// Dirty-limit: the most bytes per second each vCPU may dirty while
    /// migrating (e.g. 64M); vCPUs over it wait, the others run untouched.
    /// Needs --dirty-track ring (only the ring counts pages per vCPU).
    #[arg(long, value_parser = parse_size)]
    pub dirty_limit: Option<u64>,
    /// Draw the migration into this SVG file: per sync, dirty pages, pages
    /// sent, throughput, throttle and expected downtime over time.
    #[arg(long, value_name = "FILE.svg")]
    pub report: Option<std::path::PathBuf>,
    /// Cancel the migration if it has not completed after this many
    /// seconds (the source guest runs on; the report shows why).
    #[arg(long, value_name = "SECS")]
    pub cancel_after: Option<f64>,
}

impl ConvergeArgs {
    fn check(&self, guest: &GuestArgs) -> Result<()> {
        if self.dirty_limit.is_some_and(|l| l > 0) && guest.dirty_track != DirtyTrack::Ring {
            bail!(
                "--dirty-limit needs --dirty-track ring: only the KVM dirty ring counts the pages each vCPU dirties"
            );
        }
        Ok(())
    }
}

/// `livemig demo`. The demo starts its destination itself (with
/// --postcopy when the source has it); that destination does not listen
/// for a reconnect, so --resume-to is left out of the help.
#[derive(Args, Debug)]
#[command(
    mut_arg("postcopy", |a| a.help(
        "Postcopy (capability postcopy-ram, switch-over auto): when precopy stops making \
         progress, or the last pages would not fit the downtime limit, the guest moves to the \
         destination at once and its missing pages follow on demand (the demo's destination \
         gets --postcopy too)"
    )),
    mut_arg("resume_to", |a| a.hide(true))
)]
pub struct DemoArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub tune: TuneArgs,
    #[command(flatten)]
    pub converge: ConvergeArgs,
    /// Seconds the guest runs on the destination before it reports.
    #[arg(long, default_value_t = 3.0)]
    pub seconds_after: f64,
    /// Print exactly one JSON object (stats, guest and destination) on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `livemig vm-migrate`.
#[derive(Args, Debug)]
pub struct VmMigrateArgs {
    /// Where to: tcp:HOST:PORT, unix:PATH, or file:PATH (a snapshot).
    pub uri: String,
    #[command(flatten)]
    pub layout: LayoutArgs,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub tune: TuneArgs,
    #[command(flatten)]
    pub converge: ConvergeArgs,
    #[command(flatten)]
    pub io: IoArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsSourceArgs,
    /// Zero-copy local migration to `vm-incoming --local` on this host
    /// (unix:PATH only): the guest's memory (memfd-backed, so --memfd is
    /// implied) is handed over with its descriptors, not copied; the pause
    /// does not grow with memory size. Settings that shape how pages
    /// travel (--channels above 1, --compress, --xbzrle, --postcopy,
    /// --postcopy-preempt, TLS) are refused; --max-bandwidth and the
    /// downtime settings have nothing to act on.
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotSaveArgs,
    /// Print one JSON object of the final stats on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `livemig vm-incoming`.
#[derive(Args, Debug)]
pub struct VmIncomingArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 = any free port), unix:PATH,
    /// or file:PATH (restore a snapshot).
    pub uri: String,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Change the test guest's write rate once resumed, all vCPUs together
    /// (0 = as fast as it can). By default the guest keeps the rate it had
    /// on the source (the rate travels in the VM state).
    #[arg(long, alias = "rate", value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    pub dirty_rate: Option<u64>,
    #[command(flatten)]
    pub io: IoArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotLoadArgs,
    /// Seconds the guest runs after it resumes (0 = until interrupted).
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
    /// Print one JSON object of the result on stdout (needs --seconds).
    #[arg(long)]
    pub json: bool,
    /// No status lines.
    #[arg(long)]
    pub quiet: bool,
    /// Accept a switch to postcopy (capability postcopy-ram): the guest
    /// resumes here before all of its memory has arrived and fetches the
    /// rest from the source on demand.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: a connection lost after the switch pauses postcopy
    /// (postcopy-paused; the guest runs on, waiting for missing pages) and
    /// this destination takes the source's reconnect on URI (`vm-migrate
    /// --resume-to URI`, or QMP `migrate` with `resume: true`), with the
    /// main listener's TLS.
    #[arg(long, value_name = "URI", requires = "postcopy")]
    pub recover_on: Option<String>,
    /// Take a zero-copy local migration from `vm-migrate --local` on this
    /// host (unix:PATH only): the source's memory is mapped here, not
    /// copied.
    #[arg(long, conflicts_with = "postcopy")]
    pub local: bool,
    /// Print the URI actually listened on as the first line of stdout.
    #[arg(long, hide = true)]
    pub announce: bool,
}

/// Fails with a clear message when KVM cannot be used here.
pub(crate) fn check_kvm() -> Result<()> {
    minivm::kvm_usable().map_err(|why| {
        anyhow::anyhow!("{why}; `livemig migrate` moves plain process memory without KVM")
    })
}

impl LayoutArgs {
    pub(crate) fn dest_config(&self) -> VmConfig {
        VmConfig {
            mem_size: self.mem,
            ram_blocks: usize::from(self.blocks),
            vcpus: usize::from(self.vcpus),
            guest: GuestImage::Incoming,
            start_paused: true,
            ..VmConfig::default()
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "{} vCPU{}, {} guest RAM in {} block{}",
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            human(self.mem),
            self.blocks,
            if self.blocks == 1 { "" } else { "s" }
        )
    }
}

impl GuestArgs {
    fn guest_config(&self, layout: &LayoutArgs) -> Result<TestGuestConfig> {
        let vcpus = usize::from(layout.vcpus);
        let pages = match self.working_set {
            Some(ws) => ws / 4096,
            None => minivm::defaults::working_set_pages(layout.mem, vcpus),
        };
        let cfg = TestGuestConfig {
            pages_per_vcpu: pages.max(1),
            rate_bytes_per_sec: self.dirty_rate,
        };
        let need = test_guest_bytes(&cfg, vcpus);
        if need > layout.mem {
            bail!(
                "a working set of {} per vCPU for {} vCPUs needs {} of guest memory, more than --mem {}",
                human(cfg.pages_per_vcpu * 4096),
                vcpus,
                human(need),
                human(layout.mem)
            );
        }
        Ok(cfg)
    }

    fn tracker(&self) -> TrackerKind {
        match self.dirty_track {
            DirtyTrack::Auto => TrackerKind::Auto,
            DirtyTrack::Bitmap => TrackerKind::Bitmap,
            DirtyTrack::Manual => TrackerKind::Manual {
                chunk_shift: self.chunk_shift,
            },
            DirtyTrack::Ring => TrackerKind::Ring,
        }
    }
}

fn tracker_label(kind: TrackerKind) -> String {
    match kind {
        TrackerKind::Auto => "auto".into(),
        TrackerKind::Bitmap => "bitmap".into(),
        TrackerKind::Manual { chunk_shift } => format!(
            "manual (write-protect chunks of 2^{chunk_shift} pages = {})",
            human(4096u64 << chunk_shift)
        ),
        TrackerKind::Ring => "ring".into(),
    }
}

pub(crate) fn self_check(s: &GuestStatus) -> &'static str {
    if s.ok() {
        "passed"
    } else {
        "failed"
    }
}

/// The `guest` object of a destination's JSON: how the received guest
/// did over the `ran` seconds from `before` (its resume) to `after`.
pub(crate) fn guest_json(before: &GuestStatus, after: &GuestStatus, ran: f64) -> Value {
    json!({
        "heartbeats": after.heartbeats(),
        "pages-written-before": before.pages_written(),
        "pages-written": after.pages_written(),
        "write-rate": ((after.pages_written() - before.pages_written()) as f64 * 4096.0 / ran) as u64,
        "self-check": self_check(after),
        "failures": after.failures(),
        "errors": after.errors,
    })
}

/// The running source VM and what it was asked to do.
pub(crate) struct SourceVm {
    pub(crate) vm: Vm,
    tracker: TrackerKind,
    why: &'static str,
    total: u64,
}

pub(crate) fn start_source(layout: &LayoutArgs, guest: &GuestArgs, say: bool) -> Result<SourceVm> {
    check_kvm()?;
    let cfg = guest.guest_config(layout)?;
    let requested = guest.tracker();
    let config = VmConfig {
        mem_size: layout.mem,
        ram_blocks: usize::from(layout.blocks),
        vcpus: usize::from(layout.vcpus),
        guest: GuestImage::TestGuest(cfg.clone()),
        dirty_ring_entries: (requested == TrackerKind::Ring).then_some(guest.dirty_ring),
        prefault: !guest.no_prefault,
        memfd: guest.memfd,
        ..VmConfig::default()
    };
    if say {
        eprintln!(
            "source VM: {}{}; built-in test guest writing {}/s over {} per vCPU",
            layout.describe(),
            if guest.memfd { " (memfd)" } else { "" },
            if cfg.rate_bytes_per_sec == 0 {
                "as much as it can".to_string()
            } else {
                human(cfg.rate_bytes_per_sec)
            },
            human(cfg.pages_per_vcpu * 4096)
        );
    }
    let vm = Vm::new(config).context("starting the source VM")?;
    let (tracker, why) = vm.resolve_tracker(requested);
    Ok(SourceVm {
        vm,
        tracker,
        why,
        total: layout.mem,
    })
}

/// Lets the guest run `secs` seconds and says how it does.
pub(crate) fn warm_up(src: &SourceVm, secs: f64, say: bool) -> Result<()> {
    let s0 = src.vm.guest_status();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs.max(0.1)));
    let s1 = src.vm.guest_status();
    let rate = (s1.pages_written() - s0.pages_written()) as f64 * 4096.0
        / t0.elapsed().as_secs_f64()
        / MIB;
    if say {
        eprintln!(
            "guest running on the source: {} heartbeats, {} pages written ({rate:.0} MiB/s untracked), self-check {}",
            s1.heartbeats(),
            s1.pages_written(),
            self_check(&s1)
        );
    }
    if !s1.ok() {
        bail!("the guest failed on the source before migrating: {s1:?}");
    }
    if s1.heartbeats() == 0 {
        bail!("the guest sent no heartbeat on the source in {secs:.1} s");
    }
    Ok(())
}

/// What the source side saw.
struct SourceOutcome {
    stats: MigrationStats,
    error: Option<String>,
    /// Guest status as the migration started and at the switch-over.
    before: GuestStatus,
    at_stop: GuestStatus,
    /// Guest writes per second while tracked (bytes).
    tracked_rate: f64,
    /// Source memory digest at stop time (completed migrations only).
    digest: Option<String>,
    /// The destination acknowledged (sockets; not files).
    acked: bool,
}

/// How the source reaches the destination.
struct Link<'a> {
    uri: &'a Uri,
    /// TLS settings, when the stream is encrypted.
    tls: Option<&'a livemig::transport::tls::TlsConfig>,
    /// A peer that makes no progress for this long fails the migration.
    io_timeout: Duration,
}

fn migrate_source(
    src: &SourceVm,
    link: Link<'_>,
    tune: &TuneArgs,
    converge: &ConvergeArgs,
    quiet: bool,
    say: bool,
) -> Result<SourceOutcome> {
    let Link {
        uri,
        tls,
        io_timeout,
    } = link;
    let mut params = tune.params()?;
    params.dirty_limit = converge.dirty_limit.unwrap_or(0);
    params.validate().map_err(anyhow::Error::msg)?;
    if say {
        eprintln!(
            "dirty tracker: {} — {}",
            tracker_label(src.tracker),
            src.why
        );
        eprintln!(
            "migrating to {uri} (verify {})",
            if params.verify { "on" } else { "off" }
        );
    }
    let (out, session) = crate::tls::connect(uri, tls, io_timeout)?;
    if let (Some(s), true) = (&session, say) {
        eprintln!("encrypted: {s}");
    }
    let acked = out.ack.is_some();
    let handle = MigrationHandle::new(params.clone());
    if let Some(to) = &tune.resume_to {
        let to: Uri = to.parse().context("--resume-to")?;
        crate::recovery::source(&handle, &to, tls.cloned(), io_timeout)?;
    }
    let before = src.vm.guest_status();
    let t0 = Instant::now();
    // The dirty limit acts while the migration runs (and follows changes).
    let dirty_limit = src.vm.follow_dirty_limit(&handle)?;
    if say && params.dirty_limit > 0 {
        eprintln!(
            "dirty-limit: each vCPU may dirty at most {}/s while migrating",
            human(params.dirty_limit)
        );
    }
    let (cancel_tx, cancel_rx) = std::sync::mpsc::channel::<()>();
    let canceller = converge.cancel_after.map(|secs| {
        let h = handle.clone();
        std::thread::spawn(move || {
            if cancel_rx
                .recv_timeout(Duration::from_secs_f64(secs.max(0.0)))
                .is_err()
            {
                h.cancel();
            }
        })
    });
    let progress = Progress::source(handle.clone(), src.total, quiet);
    let mut ack = out.ack;
    let mut open = |_: u16| -> std::io::Result<ChannelWriter> {
        if matches!(uri, Uri::File(_)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a snapshot file is one stream: --channels must be 1",
            ));
        }
        let out =
            crate::tls::connect_channel(uri, tls, io_timeout).map_err(std::io::Error::other)?;
        Ok(out.writer)
    };
    let result = if params.postcopy_ram {
        // Postcopy reads page requests on a thread: the engine takes the
        // return path.
        let conn = livemig::transport::Outgoing {
            writer: out.writer,
            ack: ack.take(),
        };
        minivm::migrate::migrate_out_conn(&src.vm, src.tracker, handle.clone(), conn, &mut open)
    } else {
        migrate_out_channels(
            &src.vm,
            src.tracker,
            handle.clone(),
            out.writer,
            ack.as_deref_mut().map(|r| r as &mut dyn Read),
            &mut open,
        )
    };
    drop(progress);
    let needs_tls = match &result {
        Err(minivm::migrate::MigrateError::Migration(e)) => {
            crate::tls::plain_peer_was_tls(e, tls.is_some(), ack.as_mut())
        }
        _ => false,
    };
    drop(dirty_limit);
    drop(cancel_tx);
    if let Some(t) = canceller {
        let _ = t.join();
    }
    let at_stop = src.vm.guest_status();
    let secs = t0.elapsed().as_secs_f64();
    let stats = match &result {
        Ok(s) => s.clone(),
        Err(_) => handle.stats(),
    };
    if let Some(path) = &tune.history {
        std::fs::write(path, serde_json::to_vec_pretty(&handle.history())?)
            .with_context(|| format!("writing history to {}", path.display()))?;
    }
    if let Some(path) = &converge.report {
        let vcpus = at_stop.vcpus.len() as u64;
        let subtitle = format!(
            "{} vCPUs, {} guest RAM; tracker {}; bandwidth cap {}; auto-converge {}; dirty-limit {}",
            vcpus,
            human(src.total),
            stats.dirty_tracker,
            if params.max_bandwidth == 0 {
                "none".to_string()
            } else {
                format!("{}/s", human(params.max_bandwidth))
            },
            if params.auto_converge { "on" } else { "off" },
            if params.dirty_limit == 0 {
                "off".to_string()
            } else {
                format!("{}/s per vCPU", human(params.dirty_limit))
            },
        );
        let info = crate::svg::ReportInfo::new(&stats, &params, vcpus, subtitle)
            .with_postcopy(&stats, handle.postcopy_history());
        crate::svg::write(path, &handle.history(), &info)?;
        if say {
            eprintln!("report written to {}", path.display());
        }
    }
    let ok = result.is_ok() && succeeded(&stats);
    // The source VM stays paused after a completed migration: its memory
    // is the guest's memory at the switch-over.
    let digest = (ok && params.verify).then(|| hex(&memory_digest(&*src.vm.memory())));
    Ok(SourceOutcome {
        error: result.err().map(|e| {
            let unconfirmed = matches!(
                e,
                minivm::migrate::MigrateError::Migration(MigrationError::Unconfirmed(_))
            );
            let mut text = match needs_tls {
                true => format!("{}: {e:#}", crate::tls::DESTINATION_NEEDS_TLS),
                false => format!("{e:#}"),
            };
            if unconfirmed {
                text.push_str(UNCONFIRMED_HINT);
            }
            text
        }),
        stats,
        tracked_rate: (at_stop.pages_written() - before.pages_written()) as f64 * 4096.0
            / secs.max(1e-3),
        before,
        at_stop,
        digest,
        acked: acked && ok,
    })
}

fn print_source(o: &SourceOutcome) {
    eprintln!("{}", summary(&o.stats));
    eprintln!(
        "guest during migration: {} pages written ({:.0} MiB/s while tracked), {} heartbeats at the switch-over, self-check {}",
        o.at_stop.pages_written() - o.before.pages_written(),
        o.tracked_rate / MIB,
        o.at_stop.heartbeats(),
        self_check(&o.at_stop)
    );
    if let Some(d) = &o.digest {
        eprintln!("source memory digest at the switch-over: {d}");
    }
}

fn source_json(o: &SourceOutcome, src: &SourceVm, uri: &Uri) -> Result<Value> {
    let mut v = serde_json::to_value(&o.stats)?;
    v["uri"] = json!(uri.to_string());
    v["tracker"] = json!({
        "used": o.stats.dirty_tracker,
        "kind": tracker_label(src.tracker),
        "why": src.why,
    });
    v["digest"] = json!(o.digest);
    v["tracked-dirty-rate"] = json!(o.tracked_rate as u64);
    Ok(v)
}

/// `livemig vm-migrate`.
pub fn vm_migrate(a: VmMigrateArgs) -> Result<()> {
    if a.local {
        return crate::local::vm_migrate(a);
    }
    let uri: Uri = a.uri.parse()?;
    let say = !a.json;
    a.converge.check(&a.guest)?;
    a.snapshot.check(&uri)?;
    let src = start_source(&a.layout, &a.guest, say)?;
    warm_up(&src, a.guest.warmup, say)?;
    if let (true, Uri::File(path)) = (a.snapshot.wanted(), &uri) {
        let hint = format!(
            "--mem {}M --vcpus {} --blocks {} --seconds 5 [--lazy]",
            a.layout.mem >> 20,
            a.layout.vcpus,
            a.layout.blocks
        );
        return crate::snapshot::vm_save(path, &src.vm, &hint, &a.snapshot, a.json);
    }
    let tls = a.tls.config()?;
    let link = Link {
        uri: &uri,
        tls: tls.as_ref(),
        io_timeout: a.io.io_timeout,
    };
    let o = migrate_source(&src, link, &a.tune, &a.converge, a.quiet || a.json, say)?;
    if a.json {
        let mut v = source_json(&o, &src, &uri)?;
        v["role"] = json!("source");
        v["verified"] = json!(o.acked && !a.tune.no_verify);
        v["guest"] = json!({
            "heartbeats-before": o.at_stop.heartbeats(),
            "pages-written": o.at_stop.pages_written(),
            "self-check": self_check(&o.at_stop),
            "failures": o.at_stop.failures(),
        });
        crate::jsonout::print(&v)?;
    } else {
        print_source(&o);
        match &uri {
            Uri::File(p) => eprintln!(
                "snapshot written to {} (restore: livemig vm-incoming {uri} --mem {}M --vcpus {} --blocks {} --seconds 5)",
                p.display(),
                a.layout.mem >> 20,
                a.layout.vcpus,
                a.layout.blocks
            ),
            _ if o.acked && !a.tune.no_verify => {
                eprintln!("the destination loaded the stream and confirmed the same digest")
            }
            _ => {}
        }
    }
    if let Some(e) = o.error {
        bail!("migration failed: {e}");
    }
    if !succeeded(&o.stats) {
        bail!("migration ended with status {:?}", o.stats.status);
    }
    if !o.at_stop.ok() {
        bail!(
            "the guest's self-check failed on the source: {:?}",
            o.at_stop
        );
    }
    Ok(())
}

/// `livemig vm-incoming`.
pub fn vm_incoming(a: VmIncomingArgs) -> Result<()> {
    if a.local {
        return crate::local::vm_incoming(a);
    }
    let uri: Uri = a.uri.parse()?;
    check_kvm()?;
    if a.json && a.seconds <= 0.0 {
        bail!("--json reports once the guest has run: give --seconds");
    }
    if let Some(path) = a.snapshot.file(&uri)? {
        let config = a.layout.dest_config();
        return crate::snapshot::vm_restore(
            path,
            &config,
            &a.snapshot,
            a.dirty_rate,
            a.seconds,
            a.json,
            a.quiet,
        );
    }
    let say = !a.json && !a.quiet;
    let tls = a.tls.config()?;
    let listener = crate::tls::Endpoint::bind(&uri, tls.as_ref(), a.io.io_timeout)?;
    if a.announce {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listener.local_uri())?;
        out.flush()?;
    }
    let snapshot = matches!(uri, Uri::File(_));
    if say && !snapshot {
        eprintln!(
            "destination VM ({}): waiting for a migration on {}",
            a.layout.describe(),
            listener.local_uri()
        );
    }
    let (inc, session) = listener.accept_source()?;
    if let (Some(s), true) = (&session, say) {
        eprintln!("encrypted: {s}");
    }
    let vm = minivm::migrate::incoming_vm(&a.layout.dest_config())?;
    let mut starting = Starting {
        vm: vm.control(),
        status: &vm,
        rate: a.dirty_rate,
        postcopy: a.postcopy && !snapshot,
        before: None,
    };
    // Page channels and the postcopy urgent connection arrive on the same
    // listener after the main connection.
    let mut accept = || listener.accept().map(|i| i.reader);
    let mem = vm.memory();
    let recovery = MigrationHandle::new(livemig::engine::Params::default());
    let mut dest = Destination::new(&*mem, &mut starting).postcopy(a.postcopy && !snapshot);
    if let (Some(on), false) = (&a.recover_on, snapshot) {
        let on: Uri = on.parse().context("--recover-on")?;
        crate::recovery::destination(&recovery, &on, tls.as_ref(), a.io.io_timeout)?;
        dest = dest.recovery(&recovery);
    }
    let arrived = dest
        .run_with(inc.reader, inc.ack, &mut accept)
        .with_context(|| format!("loading the VM from {uri}"))?;
    drop(mem);
    let before = starting.before.take().unwrap_or_else(|| vm.guest_status());
    let load_ms = arrived.load_time.as_millis() as u64;
    if let Some(e) = &arrived.unconfirmed {
        eprintln!(
            "warning: the guest runs here, but STARTED did not reach the source ({e}); it stays paused"
        );
    }
    if say {
        match &arrived.postcopy {
            Some(pc) => eprintln!(
                "postcopy: {} pages fetched or pushed after the switch in {} ms, {} requests, {} remote faults, fault latency p50 {} us p99 {} us, blocktime {} ms; {} local faults ({} never-written pages zero-filled here)",
                pc.placed_pages,
                pc.postcopy_time,
                pc.requests,
                pc.faults.faults,
                pc.faults.p50_us,
                pc.faults.p99_us,
                pc.faults.blocktime_us / 1000,
                pc.faults.local_faults,
                pc.faults.local_pages,
            ),
            None if a.postcopy => {
                eprintln!("loaded in {load_ms} ms (precopy: the source did not switch)")
            }
            None => {}
        }
    }
    let postcopy = arrived.postcopy.as_ref().map(|pc| {
        json!({
            "discarded-pages": pc.discarded_pages,
            "placed-pages": pc.placed_pages,
            "requests": pc.requests,
            "faults": pc.faults.faults,
            "latency-p50": pc.faults.p50_us,
            "latency-p99": pc.faults.p99_us,
            "blocktime-us": pc.faults.blocktime_us,
            "local-faults": pc.faults.local_faults,
            "local-pages": pc.faults.local_pages,
            "local-latency": pc.faults.local_us.checked_div(pc.faults.local_faults).unwrap_or(0),
            "postcopy-time": pc.postcopy_time,
            "urgent-pages": pc.urgent_pages,
            "channel-pages": pc.channel_pages,
        })
    });
    run_received(
        &a,
        &listener,
        &session,
        vm,
        arrived.load,
        load_ms,
        before,
        postcopy,
    )
}

/// Lets a guest that just resumed here run for `seconds` (at least one
/// look if 0), printing its progress each second when `say`, stopping
/// early if its self-check fails; then pauses it. Returns its status then
/// and the seconds it ran.
pub(crate) fn run_on(
    vm: &Vm,
    before: &GuestStatus,
    seconds: f64,
    say: bool,
) -> Result<(GuestStatus, f64)> {
    let resumed = Instant::now();
    let mut last = before.clone();
    let mut last_t = Instant::now();
    loop {
        let left = if seconds > 0.0 {
            seconds - resumed.elapsed().as_secs_f64()
        } else {
            1.0
        };
        if left <= 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_secs_f64(left.min(1.0)));
        let s = vm.guest_status();
        if say {
            let dt = last_t.elapsed().as_secs_f64();
            eprintln!(
                "t={:>5.1}s heartbeats={} pages_written={} ({:.0} MiB/s) self-check {}",
                resumed.elapsed().as_secs_f64(),
                s.heartbeats(),
                s.pages_written(),
                (s.pages_written() - last.pages_written()) as f64 * 4096.0 / dt / MIB,
                self_check(&s)
            );
        }
        if !s.ok() {
            break;
        }
        last = s;
        last_t = Instant::now();
    }
    vm.pause().context("pausing the destination guest")?;
    Ok((vm.guest_status(), resumed.elapsed().as_secs_f64()))
}

/// The end of a received guest's run here: says what it did (when `say`)
/// and fails if its self-check failed or it made no progress.
pub(crate) fn judge_received(before: &GuestStatus, after: &GuestStatus, say: bool) -> Result<()> {
    if say {
        eprintln!(
            "guest on the destination: {} heartbeats, pages written {} -> {}, self-check {} ({} failures)",
            after.heartbeats(),
            before.pages_written(),
            after.pages_written(),
            self_check(after),
            after.failures()
        );
    }
    if !after.ok() {
        bail!("the guest's self-check failed on the destination: {after:?}");
    }
    if !advanced(before, after) {
        bail!("the guest made no progress on the destination: {before:?} -> {after:?}");
    }
    Ok(())
}

/// The guest ran here: heartbeats and written pages both went up.
fn advanced(before: &GuestStatus, after: &GuestStatus) -> bool {
    after.heartbeats() > before.heartbeats() && after.pages_written() > before.pages_written()
}

/// The destination VM as the engine starts it: restores the state the
/// stream carried, and at the source's GO notes the guest's status before
/// it resumes (what it had written before the switch-over) and applies
/// `--dirty-rate`.
struct Starting<'v> {
    vm: minivm::VmHandle,
    status: &'v Vm,
    rate: Option<u64>,
    postcopy: bool,
    before: Option<GuestStatus>,
}

impl livemig::vm::VmControl for Starting<'_> {
    fn pause(&mut self) -> Result<(), livemig::vm::VmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), livemig::vm::VmError> {
        // Not with postcopy: part of guest memory may be missing, and a
        // read here would wait for a page nobody asks for before STARTED.
        if !self.postcopy {
            self.before = Some(self.status.guest_status());
        }
        if let Some(rate) = self.rate {
            self.status.set_rate(rate);
        }
        self.vm.resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, livemig::vm::VmError> {
        self.vm.save_state()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), livemig::vm::VmError> {
        self.vm.restore_state(state)
    }
    fn shape(&self) -> livemig::vm::VmShape {
        livemig::vm::VmControl::shape(&self.vm)
    }
}

/// The rest of `vm-incoming` once the guest is ours: resume it (unless
/// postcopy already did), let it run, report.
#[allow(clippy::too_many_arguments)]
fn run_received(
    a: &VmIncomingArgs,
    listener: &crate::tls::Endpoint,
    session: &Option<livemig::transport::tls::TlsSession>,
    vm: minivm::Vm,
    loaded: livemig::engine::LoadOutcome,
    load_ms: u64,
    before: GuestStatus,
    postcopy: Option<Value>,
) -> Result<()> {
    let say = !a.json && !a.quiet;
    let digest = loaded.digest.map(|d| hex(&d));
    if say {
        eprintln!(
            "loaded {} of stream in {load_ms} ms: {} raw, {} zero, {} xbzrle, {} compressed pages",
            human(loaded.stats.bytes),
            loaded.stats.raw_pages,
            loaded.stats.zero_pages,
            loaded.stats.xbzrle_pages,
            loaded.stats.compressed_pages,
        );
        match &digest {
            Some(d) => eprintln!("memory digest verified against the source's: {d}"),
            None if postcopy.is_some() => {
                eprintln!("no digest after postcopy (the guest ran before its memory was whole)")
            }
            None => eprintln!("no digest in the stream (the source ran with --no-verify)"),
        }
        eprintln!(
            "resuming the guest ({} pages written before the switch-over): it runs here",
            before.pages_written()
        );
    }
    let (after, ran) = run_on(&vm, &before, a.seconds, say)?;
    if a.json {
        let v = json!({
            "role": "destination",
            "status": "completed",
            "uri": listener.local_uri().to_string(),
            "load-time": load_ms,
            "tls": crate::tls::session_json(session),
            "postcopy": postcopy,
            "load": loaded.stats,
            "verified": digest.is_some(),
            "digest": digest,
            "ran-seconds": ran,
            "guest": guest_json(&before, &after, ran),
        });
        crate::jsonout::print(&v)?;
    }
    judge_received(&before, &after, !a.json && !a.quiet)
}

/// The destination process of the demo; killed if the demo stops early.
struct DestProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    done: bool,
}

impl DestProcess {
    fn spawn(layout: &LayoutArgs, seconds: f64, postcopy: bool) -> Result<DestProcess> {
        let exe = std::env::current_exe().context("finding the livemig executable")?;
        let mut child = Command::new(&exe)
            .arg("vm-incoming")
            .arg("tcp:127.0.0.1:0")
            .args(postcopy.then_some("--postcopy"))
            .args(["--mem", &format!("{}M", layout.mem >> 20)])
            .args(["--vcpus", &layout.vcpus.to_string()])
            .args(["--blocks", &layout.blocks.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--json", "--announce"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the destination process {}", exe.display()))?;
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Ok(DestProcess {
            child,
            stdout,
            done: false,
        })
    }

    fn line(&mut self, what: &str) -> Result<Option<String>> {
        let mut s = String::new();
        let n = self
            .stdout
            .read_line(&mut s)
            .with_context(|| format!("reading the destination's {what}"))?;
        Ok((n > 0).then(|| s.trim().to_string()))
    }

    /// The URI the destination listens on.
    fn uri(&mut self) -> Result<Uri> {
        match self.line("address")? {
            Some(l) => l
                .parse()
                .with_context(|| format!("the destination announced '{l}'")),
            None => {
                let status = self.child.wait()?;
                self.done = true;
                bail!("the destination process exited before listening ({status})")
            }
        }
    }

    /// The destination's report (one JSON line) and whether it exited well.
    fn report(&mut self) -> Result<(Option<Value>, bool)> {
        let line = self.line("report")?;
        let status = self.child.wait()?;
        self.done = true;
        let v = match line {
            Some(l) => Some(
                serde_json::from_str(&l)
                    .with_context(|| format!("the destination reported '{l}'"))?,
            ),
            None => None,
        };
        Ok((v, status.success()))
    }
}

impl Drop for DestProcess {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `livemig demo`.
pub fn demo(a: DemoArgs) -> Result<()> {
    check_kvm()?;
    // Check the arguments before starting anything.
    a.tune.params()?;
    a.guest.guest_config(&a.layout)?;
    a.converge.check(&a.guest)?;
    let say = !a.json;
    let started = Instant::now();
    let mut dest = DestProcess::spawn(&a.layout, a.seconds_after.max(0.5), a.tune.postcopy)?;
    let src = start_source(&a.layout, &a.guest, say)?;
    let uri = dest.uri()?;
    if say {
        eprintln!(
            "destination VM: process {} listening on {uri}",
            dest.child.id()
        );
    }
    warm_up(&src, a.guest.warmup, say)?;
    let link = Link {
        uri: &uri,
        tls: None,
        io_timeout: livemig::transport::IO_TIMEOUT,
    };
    let o = migrate_source(&src, link, &a.tune, &a.converge, a.quiet || a.json, say)?;
    if say {
        print_source(&o);
    }
    if say && o.error.is_none() {
        eprintln!(
            "guest resumed on the destination; letting it run {:.1} s",
            a.seconds_after
        );
    }
    let (report, dest_ok) = dest.report()?;
    let report = report.unwrap_or(Value::Null);
    let g = &report["guest"];
    let dest_heartbeats = g["heartbeats"].as_u64().unwrap_or(0);
    let dest_failures = g["failures"].as_u64().unwrap_or(u64::MAX);
    let dest_pages = g["pages-written"].as_u64().unwrap_or(0);
    let dest_digest = report["digest"].as_str().map(str::to_string);
    // A migration that did not complete (failed, cancelled) leaves the
    // guest on the source: its self-check is the source's.
    let moved = o.error.is_none() && succeeded(&o.stats);
    let passed_check = o.at_stop.ok() && (!moved || g["self-check"] == "passed");
    let guest_failures = match moved {
        true => o.at_stop.failures().saturating_add(dest_failures),
        false => o.at_stop.failures(),
    };
    let heartbeats_before = o.at_stop.heartbeats();
    // The guest's heartbeats over its life: those sent on the source, then
    // those sent on the destination.
    let heartbeats_after = heartbeats_before + dest_heartbeats;
    // After postcopy no digest can be checked (the guest ran before its
    // memory was whole): its self-check is the proof.
    let verify = !a.tune.no_verify && o.stats.postcopy_time.is_none();
    let verified =
        verify && report["verified"] == true && dest_digest.is_some() && dest_digest == o.digest;
    let mut failures = Vec::new();
    if let Some(e) = &o.error {
        failures.push(format!("migration failed: {e}"));
    } else if !succeeded(&o.stats) {
        failures.push(format!("migration status {:?}", o.stats.status));
    }
    if !passed_check {
        failures.push("the guest's self-check failed".to_string());
    }
    if moved {
        if !dest_ok || report.is_null() {
            failures.push("the destination process failed".to_string());
        }
        if dest_heartbeats == 0 || dest_pages <= o.at_stop.pages_written() {
            failures.push("the guest made no progress on the destination".to_string());
        }
        if verify && !verified {
            failures.push("the destination's memory digest was not verified".to_string());
        }
    }
    if a.json {
        let mut v = source_json(&o, &src, &uri)?;
        v["verified"] = json!(verified);
        v["guest"] = json!({
            "heartbeats-before": heartbeats_before,
            "heartbeats-after": heartbeats_after,
            "heartbeats-destination": dest_heartbeats,
            "pages-written-before": o.at_stop.pages_written(),
            "pages-written": dest_pages,
            "runs-on": if moved { "destination" } else { "source" },
            "self-check": if passed_check { "passed" } else { "failed" },
            "failures": guest_failures,
        });
        v["destination"] = report;
        v["passed"] = json!(failures.is_empty());
        v["demo-time"] = json!(started.elapsed().as_millis() as u64);
        crate::jsonout::print(&v)?;
    } else if !moved {
        eprintln!(
            "the migration did not complete: the guest runs on the source ({} heartbeats, {} pages written), self-check {} ({guest_failures} failures)",
            heartbeats_before,
            o.at_stop.pages_written(),
            if passed_check { "passed" } else { "FAILED" },
        );
    } else {
        let d = &report;
        eprintln!(
            "destination: loaded {} of stream in {} ms; {}",
            human(d["load"]["bytes"].as_u64().unwrap_or(0)),
            d["load-time"].as_u64().unwrap_or(0),
            if verified {
                "memory digest verified: it holds exactly the source's memory at the switch-over"
            } else if verify {
                "memory digest NOT verified"
            } else if o.stats.postcopy_time.is_some() {
                "no digest after postcopy (the guest ran before its memory was whole): its self-check is the proof"
            } else {
                "no digest (--no-verify)"
            }
        );
        eprintln!(
            "guest on the destination: heartbeats {heartbeats_before} -> {heartbeats_after} (+{dest_heartbeats}), pages written {} -> {dest_pages} ({:.0} MiB/s), self-check {} ({} failures)",
            o.at_stop.pages_written(),
            g["write-rate"].as_u64().unwrap_or(0) as f64 / MIB,
            if passed_check { "passed" } else { "FAILED" },
            guest_failures,
        );
        if failures.is_empty() {
            eprintln!(
                "demo passed in {:.1} s: the guest moved live and kept running",
                started.elapsed().as_secs_f64()
            );
        }
    }
    if !failures.is_empty() {
        bail!("demo failed: {}", failures.join("; "));
    }
    Ok(())
}
