//! Migration of plain process memory: a workload writes a region while it
//! is tracked with userfaultfd write-protect and migrated.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use livemig::dirty::{UffdMode, UffdTracker};
use livemig::engine::{
    hex, memory_digest, ChannelWriter, CompressParams, Destination, DestinationError,
    MigrationHandle, Params, Source,
};
use livemig::memory::{GuestMemory, ProcessMemory};
use livemig::testkit::workload::{direct_writer, fill_random, Pattern, Workload, WorkloadConfig};
use livemig::transport::tls::TlsConfig;
use livemig::transport::Uri;
use serde_json::{json, Value};

use crate::report::{succeeded, summary, Progress};
use crate::units::{parse_mem_size, parse_size};

/// Layout of the memory region (both sides must agree).
#[derive(Args, Clone, Debug)]
pub struct MemArgs {
    /// Memory size (e.g. 1G, 512M); split evenly over the blocks.
    #[arg(short = 'm', long = "mem", alias = "size", default_value = "256M", value_parser = parse_mem_size)]
    pub size: u64,
    /// Number of RAM blocks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub blocks: u16,
}

impl MemArgs {
    /// Maps the memory: blocks `ram0`, `ram1`, ...
    pub fn map(&self) -> Result<ProcessMemory> {
        let n = u64::from(self.blocks);
        let per = self.size / n / 4096 * 4096;
        if per == 0 {
            bail!("--size {} is too small for {} blocks", self.size, n);
        }
        let layout: Vec<(String, u64)> = (0..n)
            .map(|i| {
                let len = if i == n - 1 {
                    self.size - per * (n - 1)
                } else {
                    per
                };
                (format!("ram{i}"), len)
            })
            .collect();
        Ok(ProcessMemory::new(&layout)?)
    }

    /// As [`MemArgs::map`], each block in a memfd (for local mode).
    pub fn map_memfd(&self) -> Result<ProcessMemory> {
        let layout: Vec<(String, u64)> = self
            .map()?
            .blocks()
            .iter()
            .map(|b| (b.id().to_string(), b.len()))
            .collect();
        Ok(ProcessMemory::new_memfd(&layout)?)
    }
}

/// Initial memory contents.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Pseudo-random bytes everywhere (incompressible, no zero pages).
    Random,
    /// Untouched (all zero pages).
    Zero,
    /// Half random, half zero.
    Half,
    /// Text-like, compressible pages.
    Text,
}

/// Dirty tracker for process memory.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerArg {
    /// Best available (async write-protect, else fault-driven).
    Auto,
    /// userfaultfd async write-protect with PAGEMAP_SCAN.
    Async,
    /// userfaultfd write-protect faults handled by a thread.
    Sync,
}

/// Compression choice.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressArg {
    /// No compression.
    None,
    /// LZ4 (fast).
    Lz4,
    /// zstd (better ratio).
    Zstd,
}

/// Migration parameters shared by every source command.
#[derive(Args, Clone, Debug)]
pub struct TuneArgs {
    /// Bandwidth cap (bytes/s, e.g. 256M); 0 = unlimited.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub max_bandwidth: u64,
    /// Longest acceptable guest pause at switch-over, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Send re-dirtied pages as XBZRLE deltas.
    #[arg(long)]
    pub xbzrle: bool,
    /// XBZRLE page cache size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub xbzrle_cache_size: u64,
    /// Compress raw pages.
    #[arg(long, value_enum, default_value = "none")]
    pub compress: CompressArg,
    /// zstd level.
    #[arg(long, default_value_t = 1)]
    pub compress_level: i32,
    /// Throttle the writer when it dirties faster than the link carries.
    #[arg(long)]
    pub auto_converge: bool,
    /// Do not send the memory digest at stop time (shorter downtime, but
    /// the destination can no longer prove it holds the source's memory).
    #[arg(long)]
    pub no_verify: bool,
    /// Write the per-sync history (JSON array) to this file.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Page channels: above 1, that many extra connections, each with its
    /// own sender thread (like QEMU's multifd); the destination accepts
    /// them on the same listener. Not for snapshot files.
    #[arg(long, default_value_t = 1)]
    pub channels: u16,
    /// Compress every page and try XBZRLE on every re-sent page even when
    /// the measured costs say it does not pay. By default a page is
    /// compressed only while the compressor's time per page is less than
    /// the link time its saved bytes would take, and XBZRLE sits out while
    /// its deltas save less link time than they cost.
    #[arg(long)]
    pub no_adaptive: bool,
    /// Postcopy (capability postcopy-ram, switch-over auto): when precopy
    /// stops making progress, or the last pages would not fit the downtime
    /// limit, the guest moves to the destination at once and its missing
    /// pages follow on demand. The destination needs --postcopy too. If
    /// the source dies after the switch, the guest is lost.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: requested pages travel on a connection of their
    /// own (postcopy-preempt), never behind bulk pages.
    #[arg(long, requires = "postcopy")]
    pub postcopy_preempt: bool,
    /// With --postcopy: a connection lost after the switch pauses postcopy
    /// (postcopy-paused) instead of losing the guest; this source then
    /// reconnects to URI, where the destination listens after the cut
    /// (`incoming/vm-incoming --recover-on URI`, or QMP `migrate-recover`),
    /// and postcopy goes on.
    #[arg(long, value_name = "URI", requires = "postcopy")]
    pub resume_to: Option<String>,
}

impl TuneArgs {
    /// Engine parameters.
    pub fn params(&self) -> Result<Params> {
        let p = Params {
            max_bandwidth: self.max_bandwidth,
            downtime_limit: self.downtime_limit,
            xbzrle: self.xbzrle,
            xbzrle_cache_size: self.xbzrle_cache_size,
            compress: match self.compress {
                CompressArg::None => None,
                CompressArg::Lz4 => Some(CompressParams {
                    algorithm: livemig::codec::compress::Algorithm::Lz4,
                    level: 1,
                }),
                CompressArg::Zstd => Some(CompressParams {
                    algorithm: livemig::codec::compress::Algorithm::Zstd,
                    level: self.compress_level,
                }),
            },
            verify: !self.no_verify,
            auto_converge: self.auto_converge,
            channels: self.channels,
            adaptive_encoding: !self.no_adaptive,
            postcopy_ram: self.postcopy,
            postcopy_preempt: self.postcopy_preempt,
            postcopy_switchover: if self.postcopy {
                livemig::engine::Switchover::Auto
            } else {
                livemig::engine::Switchover::Manual
            },
            ..Params::default()
        };
        p.validate().map_err(anyhow::Error::msg)?;
        Ok(p)
    }
}

/// The workload that writes memory while it migrates.
#[derive(Args, Clone, Debug)]
pub struct WorkloadArgs {
    /// Bytes of pages dirtied per second (e.g. 200M); 0 = idle.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value = "64M", value_parser = parse_size)]
    pub dirty_rate: u64,
    /// Bytes written into each page touched (8 = XBZRLE-friendly, 4096 = whole page).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub touch_bytes: u16,
    /// Only this much of each block is written (0 = all).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub working_set: u64,
    /// Write pages in order instead of at random.
    #[arg(long)]
    pub sequential: bool,
    /// Initial contents.
    #[arg(long, value_enum, default_value = "half")]
    pub fill: Fill,
    /// Run the workload this many seconds before migrating.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Dirty tracker.
    #[arg(
        long = "dirty-track",
        alias = "tracker",
        value_enum,
        default_value = "auto"
    )]
    pub tracker: TrackerArg,
}

impl WorkloadArgs {
    /// Starts the workload writing `mem` (none at `--dirty-rate 0`) and
    /// lets it warm up for `--warmup` seconds.
    pub(crate) fn start(&self, mem: &ProcessMemory) -> Option<Workload> {
        let workload = (self.dirty_rate > 0).then(|| {
            Workload::start(
                mem.blocks().to_vec(),
                direct_writer(mem.blocks().to_vec()),
                WorkloadConfig {
                    rate: self.dirty_rate,
                    bytes_per_touch: usize::from(self.touch_bytes),
                    pattern: if self.sequential {
                        Pattern::Sequential
                    } else {
                        Pattern::Random
                    },
                    working_set: self.working_set,
                    seed: 42,
                },
            )
        });
        if self.warmup > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(self.warmup));
        }
        workload
    }
}

/// How long a connected peer may stay silent.
#[derive(Args, Clone, Debug)]
pub struct IoArgs {
    /// Seconds a connected peer may send (or take) nothing before the
    /// migration fails with an error naming it (e.g. 60, 2.5).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    pub io_timeout: Duration,
}

/// Parses a positive number of seconds.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 86_400.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a number of seconds in (0, 86400]")),
    }
}

/// Everything a source command takes besides where to send.
#[derive(Args, Debug)]
pub struct SourceOpts {
    #[command(flatten)]
    pub mem: MemArgs,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub tune: TuneArgs,
    #[command(flatten)]
    pub io: IoArgs,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotSaveArgs,
    /// Draw the migration into this SVG file: per sync, dirty pages, pages
    /// sent, throughput, throttle and expected downtime over time.
    #[arg(long, value_name = "FILE.svg")]
    pub report: Option<PathBuf>,
    /// Print one JSON object of the final stats on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Everything a destination command takes besides where from.
#[derive(Args, Debug)]
pub struct DestOpts {
    #[command(flatten)]
    pub mem: MemArgs,
    #[command(flatten)]
    pub io: IoArgs,
    #[command(flatten)]
    pub snapshot: crate::snapshot::SnapshotLoadArgs,
    /// Print one JSON object of the result on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Accept a switch to postcopy (capability postcopy-ram): pages still
    /// missing after the switch are placed with userfaultfd as they come.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: a connection lost after the switch pauses postcopy
    /// (postcopy-paused; the guest is kept) and this destination takes the
    /// source's reconnect on URI (`migrate --resume-to URI`, or QMP
    /// `migrate` with `resume: true`), with the main listener's TLS.
    #[arg(long, value_name = "URI", requires = "postcopy")]
    pub recover_on: Option<String>,
}

/// `livemig migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Where to: tcp:HOST:PORT, unix:PATH or file:PATH.
    pub uri: String,
    #[command(flatten)]
    pub opts: SourceOpts,
    #[command(flatten)]
    pub tls: crate::tls::TlsSourceArgs,
    /// Zero-copy local migration to `incoming --local` on this host
    /// (unix:PATH only): the memory, in memfds, is handed over instead of
    /// copied; the workload pauses only for the hand-over. Settings that
    /// shape how pages travel (--channels above 1, --compress, --xbzrle,
    /// --postcopy, --postcopy-preempt, TLS) are refused.
    #[arg(long)]
    pub local: bool,
}

/// `livemig save`. The flags of a live peer (postcopy, its recovery, the
/// I/O timeout) are accepted as by `migrate` but left out of the help: a
/// file has no peer.
#[derive(Args, Debug)]
#[command(
    mut_arg("postcopy", |a| a.hide(true)),
    mut_arg("postcopy_preempt", |a| a.hide(true)),
    mut_arg("resume_to", |a| a.hide(true)),
    mut_arg("io_timeout", |a| a.hide(true))
)]
pub struct SaveArgs {
    /// Snapshot file to write.
    pub file: PathBuf,
    #[command(flatten)]
    pub opts: SourceOpts,
}

/// `livemig incoming`.
#[derive(Args, Debug)]
pub struct IncomingArgs {
    /// Where to listen: tcp:HOST:PORT, unix:PATH (or file:PATH to load).
    pub uri: String,
    #[command(flatten)]
    pub opts: DestOpts,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Take a zero-copy local migration from `migrate --local` on this
    /// host (unix:PATH only): the source's memory is mapped here.
    #[arg(long, conflicts_with = "postcopy")]
    pub local: bool,
}

/// `livemig load`. As for `save`, the flags of a live peer are accepted
/// (as by `incoming`) but left out of the help.
#[derive(Args, Debug)]
#[command(
    mut_arg("postcopy", |a| a.hide(true)),
    mut_arg("recover_on", |a| a.hide(true)),
    mut_arg("io_timeout", |a| a.hide(true))
)]
pub struct LoadArgs {
    /// Snapshot file to read.
    pub file: PathBuf,
    #[command(flatten)]
    pub opts: DestOpts,
}

pub(crate) fn fill(mem: &ProcessMemory, how: Fill) {
    let blocks = mem.blocks().to_vec();
    let writer = direct_writer(blocks.clone());
    match how {
        Fill::Zero => {}
        Fill::Random => fill_random(&blocks, &writer, 0x5eed),
        Fill::Half => {
            for (b, blk) in blocks.iter().enumerate() {
                let half = blk.len() / 2 / 4096 * 4096;
                let mut rng = livemig::testkit::workload::XorShift::new(b as u64 + 7);
                let mut chunk = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < half {
                    let n = (chunk.len() as u64).min(half - off) as usize;
                    rng.fill(&mut chunk[..n]);
                    writer(b, off, &chunk[..n]);
                    off += n as u64;
                }
            }
        }
        Fill::Text => {
            let words = b"live migration moves a running guest while it keeps running; ";
            let mut page = vec![0u8; 4096];
            for (i, b) in page.iter_mut().enumerate() {
                *b = words[i % words.len()];
            }
            for (b, blk) in blocks.iter().enumerate() {
                let mut off = 0;
                while off < blk.len() {
                    page[..8].copy_from_slice(&off.to_le_bytes());
                    writer(b, off, &page);
                    off += 4096;
                }
            }
        }
    }
}

fn tracker(mem: &ProcessMemory, t: TrackerArg) -> Result<UffdTracker> {
    let mode = match t {
        TrackerArg::Auto => UffdMode::Auto,
        TrackerArg::Async => UffdMode::Async,
        TrackerArg::Sync => UffdMode::Sync,
    };
    UffdTracker::new(mem, mode).context("starting userfaultfd dirty tracking")
}

/// Runs a source: maps and fills memory, starts the workload, migrates.
fn run_source(uri: &Uri, o: &SourceOpts, tls: Option<&TlsConfig>) -> Result<()> {
    let (mem_args, wl, tune, json, quiet) = (&o.mem, &o.workload, &o.tune, o.json, o.quiet);
    let params = tune.params()?;
    o.snapshot.check(uri)?;
    let mem = mem_args.map()?;
    fill(&mem, wl.fill);
    let mut tracker = tracker(&mem, wl.tracker)?;
    let workload = wl.start(&mem);
    if let (true, Uri::File(path)) = (o.snapshot.wanted(), uri) {
        let mut control = workload.as_ref().map(Workload::control);
        let control = control
            .as_mut()
            .map(|c| c as &mut dyn livemig::vm::VmControl);
        return crate::snapshot::process_save(path, &mem, control, &o.snapshot, json);
    }
    if params.channels > 1 && matches!(uri, Uri::File(_)) {
        bail!("a snapshot file is one stream: --channels must be 1");
    }
    let (out, session) = crate::tls::connect(uri, tls, o.io.io_timeout)?;
    let handle = MigrationHandle::new(params.clone());
    if let Some(to) = &tune.resume_to {
        let to: Uri = to.parse().context("--resume-to")?;
        crate::recovery::source(&handle, &to, tls.cloned(), o.io.io_timeout)?;
    }
    let progress = Progress::source(handle.clone(), mem.total_bytes(), quiet || json);
    let mut no_vm = livemig::vm::NoVm;
    let mut control = workload.as_ref().map(Workload::control);
    let vm: &mut dyn livemig::vm::VmControl = match control.as_mut() {
        Some(c) => c,
        None => &mut no_vm,
    };
    let mut ack = out.ack;
    let mut open = |_: u16| -> std::io::Result<ChannelWriter> {
        let out = crate::tls::connect_channel(uri, tls, o.io.io_timeout)
            .map_err(std::io::Error::other)?;
        Ok(out.writer)
    };
    let source = Source::new(&mem, &mut tracker, vm, handle.clone());
    let result = if params.postcopy_ram {
        // Postcopy reads page requests on a thread: the engine takes the
        // return path.
        let conn = livemig::transport::Outgoing {
            writer: out.writer,
            ack: ack.take(),
        };
        source.run_conn(conn, &mut open)
    } else {
        source.run_with_channels(
            out.writer,
            ack.as_deref_mut().map(|r| r as &mut dyn std::io::Read),
            &mut open,
        )
    };
    drop(progress);
    let stats = handle.stats();
    // Memory is frozen now (workload paused at stop-and-copy): this is the
    // source's memory at stop time.
    let digest = result.is_ok().then(|| hex(&memory_digest(&mem)));
    let written = workload.as_ref().map(Workload::pages_written).unwrap_or(0);
    drop(workload);
    if let Some(path) = &tune.history {
        std::fs::write(path, serde_json::to_vec_pretty(&handle.history())?)
            .with_context(|| format!("writing history to {}", path.display()))?;
    }
    if let Some(path) = &o.report {
        let subtitle = format!(
            "process memory {}; workload {}/s; tracker {}; bandwidth cap {}; auto-converge {}",
            crate::units::human(mem.total_bytes()),
            crate::units::human(wl.dirty_rate),
            stats.dirty_tracker,
            if params.max_bandwidth == 0 {
                "none".to_string()
            } else {
                format!("{}/s", crate::units::human(params.max_bandwidth))
            },
            if params.auto_converge { "on" } else { "off" },
        );
        let info = crate::svg::ReportInfo::new(&stats, &params, 1, subtitle)
            .with_postcopy(&stats, handle.postcopy_history());
        crate::svg::write(path, &handle.history(), &info)?;
    }
    if json {
        let mut v = serde_json::to_value(&stats)?;
        v["role"] = json!("source");
        v["uri"] = json!(uri.to_string());
        v["digest"] = json!(digest);
        // After postcopy no digest goes in the stream.
        let checked = params.verify && uri_has_ack(uri) && stats.postcopy_time.is_none();
        v["verified"] = json!(checked && result.is_ok());
        v["workload-pages-written"] = json!(written);
        v["tls"] = crate::tls::session_json(&session);
        crate::jsonout::print(&v)?;
    } else {
        if let Some(s) = &session {
            eprintln!("encrypted: {s}");
        }
        eprintln!("{}", summary(&stats));
        if let Some(d) = &digest {
            eprintln!("source memory digest at stop time: {d}");
            if params.verify && uri_has_ack(uri) && stats.postcopy_time.is_none() {
                eprintln!("destination confirmed the same digest");
            }
        }
    }
    if let Err(e @ livemig::engine::MigrationError::Unconfirmed(_)) = result {
        bail!("{e}{}", crate::vm::UNCONFIRMED_HINT);
    }
    crate::tls::explain_plain_source_failure(result.map(|_| ()), tls.is_some(), ack.as_mut())?;
    if !succeeded(&stats) {
        bail!("migration ended with status {:?}", stats.status);
    }
    Ok(())
}

fn uri_has_ack(uri: &Uri) -> bool {
    !matches!(uri, Uri::File(_))
}

/// `livemig migrate`.
pub fn migrate(a: MigrateArgs) -> Result<()> {
    if a.local {
        return crate::local::migrate(a);
    }
    let uri: Uri = a.uri.parse()?;
    run_source(&uri, &a.opts, a.tls.config()?.as_ref())
}

/// `livemig save`.
pub fn save(a: SaveArgs) -> Result<()> {
    let uri = Uri::File(a.file.clone());
    run_source(&uri, &a.opts, None)
}

/// The process destination's "guest": nothing to restore or run; with
/// postcopy it says on stderr when it takes over (from then on, pages
/// still on the source are fetched on demand, and losing the source
/// loses them).
struct Takeover {
    say: bool,
}

impl livemig::vm::VmControl for Takeover {
    fn pause(&mut self) -> Result<(), livemig::vm::VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::vm::VmError> {
        if self.say {
            eprintln!("resumed here after the source's GO");
        }
        Ok(())
    }
}

fn run_dest(uri: &Uri, o: &DestOpts, tls: Option<&TlsConfig>) -> Result<()> {
    let (mem_args, json, quiet) = (&o.mem, o.json, o.quiet);
    let mem = mem_args.map()?;
    if let Some(path) = o.snapshot.file(uri)? {
        return crate::snapshot::process_load(path, &mem, &o.snapshot, json);
    }
    let listener = crate::tls::Endpoint::bind(uri, tls, o.io.io_timeout)?;
    if !matches!(uri, Uri::File(_)) {
        // On stderr even with --json: scripts wait for this line.
        eprintln!("waiting for a migration on {}", listener.local_uri());
    }
    let (inc, session) = listener.accept_source()?;
    let started = std::time::Instant::now();
    // Page channels and the postcopy urgent connection arrive on the same
    // listener after the main connection.
    let mut accept = || listener.accept().map(|i| i.reader);
    let mut guest = Takeover {
        say: o.postcopy && !quiet,
    };
    let recovery = MigrationHandle::new(Params::default());
    let mut dest = Destination::new(&mem, &mut guest).postcopy(o.postcopy && uri_has_ack(uri));
    if let (Some(on), true) = (&o.recover_on, uri_has_ack(uri)) {
        let on: Uri = on.parse().context("--recover-on")?;
        crate::recovery::destination(&recovery, &on, tls, o.io.io_timeout)?;
        dest = dest.recovery(&recovery);
    }
    let progress = Progress::counter(
        dest.progress(),
        mem.total_bytes(),
        quiet || json || o.postcopy,
    );
    let arrived = dest.run_with(inc.reader, inc.ack, &mut accept);
    drop(progress);
    let arrived = match arrived {
        Ok(a) => a,
        Err(DestinationError::Load(e)) => {
            return Err(crate::tls::explain_plain_dest_failure(
                e,
                uri,
                tls.is_some(),
            ))
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)).with_context(|| format!("migration from {uri}"))
        }
    };
    if let Some(e) = &arrived.unconfirmed {
        eprintln!("warning: GO received but STARTED did not reach the source ({e}); the source stays paused");
    }
    let out = &arrived.load;
    let digest = hex(&memory_digest(&mem));
    let verified = out.digest.is_some();
    let pc = arrived.postcopy.as_ref();
    if json {
        let v: Value = json!({
            "role": "destination",
            "status": "completed",
            "uri": uri.to_string(),
            "total-time": started.elapsed().as_millis() as u64,
            "load": out.stats,
            "digest": digest,
            "verified": verified,
            "tls": crate::tls::session_json(&session),
            "postcopy": pc.map(|pc| json!({
                "discarded-pages": pc.discarded_pages,
                "placed-pages": pc.placed_pages,
                "postcopy-time": pc.postcopy_time,
                "urgent-pages": pc.urgent_pages,
                "channel-pages": pc.channel_pages,
                "requests": pc.requests,
                "faults": pc.faults.faults,
                "local-faults": pc.faults.local_faults,
                "local-pages": pc.faults.local_pages,
            })),
        });
        crate::jsonout::print(&v)?;
    } else {
        if let Some(s) = &session {
            eprintln!("encrypted: {s}");
        }
        eprintln!(
            "loaded {} bytes of stream: {} raw, {} zero ({} written), {} xbzrle, {} compressed pages in {} ms",
            out.stats.bytes,
            out.stats.raw_pages,
            out.stats.zero_pages,
            out.stats.zero_pages_written,
            out.stats.xbzrle_pages,
            out.stats.compressed_pages,
            started.elapsed().as_millis()
        );
        match pc {
            Some(pc) => eprintln!(
                "postcopy: {} pages were stale at the switch, {} placed after it in {} ms; {} remote faults, {} local faults ({} never-written pages zero-filled here)",
                pc.discarded_pages,
                pc.placed_pages,
                pc.postcopy_time,
                pc.faults.faults,
                pc.faults.local_faults,
                pc.faults.local_pages
            ),
            None if o.postcopy => {
                eprintln!("the source did not switch to postcopy")
            }
            None => {}
        }
        if verified {
            eprintln!("memory digest verified against the source's: {digest}");
        } else if pc.is_some() {
            eprintln!("memory digest: {digest} (no digest after postcopy: memory changed before it was whole)");
        } else {
            eprintln!("memory digest: {digest} (the source sent none to compare: it ran with --no-verify)");
        }
    }
    Ok(())
}

/// `livemig incoming`.
pub fn incoming(a: IncomingArgs) -> Result<()> {
    if a.local {
        return crate::local::incoming(a);
    }
    let uri: Uri = a.uri.parse()?;
    run_dest(&uri, &a.opts, a.tls.config()?.as_ref())
}

/// `livemig load`.
pub fn load(a: LoadArgs) -> Result<()> {
    let file = a.file.clone();
    run_dest(&Uri::File(a.file), &a.opts, None).map_err(|e| match vm_snapshot(&file) {
        Some(hint) => e.context(hint),
        None => e,
    })
}

/// When `file` is a whole-VM snapshot (its blocks are minivm's `ram@GPA`
/// ranges), what to say instead of only "block list does not match".
fn vm_snapshot(file: &std::path::Path) -> Option<String> {
    let f = std::fs::File::open(file).ok()?;
    let mut r = livemig::stream::StreamReader::new(std::io::BufReader::new(f)).ok()?;
    let blocks = match r.next_record().ok()? {
        livemig::stream::Record::BlockList(b) => b.to_vec(),
        _ => return None,
    };
    if blocks.is_empty() || !blocks.iter().all(|b| b.id.starts_with("ram@")) {
        return None;
    }
    let total: u64 = blocks.iter().map(|b| b.len).sum();
    Some(format!(
        "{} is a VM snapshot ({} RAM block(s), {} MiB, with vCPU and device state), not a \
         process-memory one: restore it with `livemig vm-incoming file:{} --mem {}M --blocks {}` \
         (and the source's --vcpus)",
        file.display(),
        blocks.len(),
        total >> 20,
        file.display(),
        total >> 20,
        blocks.len()
    ))
}
