//! `minivm`: run a KVM guest (the built-in test guest, a boot sector or a
//! flat binary), watch it, track its dirty pages, dump its memory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use livemig::bitmap::DirtyBitmap;
use livemig::engine::Params;
use livemig::GuestMemory;
use minivm::control::{ControlledVm, Phase};
use minivm::{CpuMode, GuestImage, SerialOut, TestGuestConfig, TrackerKind, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "minivm", version, about = "A reference KVM VMM for livemig")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Real,
    LongRing3,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a VM and prints the guest's status every second.
    Run(RunArgs),
    /// Says which dirty trackers this host offers and what `auto` picks.
    Trackers,
    /// Writes the boot-sector incrementer image (512 bytes) to a file.
    MakeBootsector {
        /// End of the incremented range (guest address, e.g. 1G); starts at 1 MiB.
        #[arg(long, value_parser = parse_size, default_value = "64M")]
        end: u64,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Measures what dirty tracking costs a running guest: the pause that
    /// starting a migration imposes (bitmap vs manual+initially-set) and
    /// downtime/total time per tracker.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Start-pause part: guest memory (populated from the host first; K/M/G suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "8G")]
    stall_mem: u64,
    /// Start-pause part: vCPUs.
    #[arg(long, default_value_t = 2)]
    stall_vcpus: usize,
    /// Start-pause part: working set per vCPU, written as fast as possible
    /// (0 = all guest memory, shared among the vCPUs).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    stall_working_set: u64,
    /// Start-pause part: the smaller manual-protect chunk, log2 pages
    /// (compared with the default 14 = 64 MiB).
    #[arg(long, default_value_t = 12)]
    small_chunk_shift: u32,
    /// Migration part: guest memory (K/M/G suffix).
    #[arg(short = 'm', long, value_name = "SIZE", value_parser = parse_size, default_value = "2G")]
    mem: u64,
    /// Migration part: vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Migration part: bytes per second the guest writes (all vCPUs).
    #[arg(long, alias = "rate", value_name = "BYTES_PER_SEC", value_parser = parse_size, default_value = "200M")]
    dirty_rate: u64,
    /// Migration part: working set per vCPU.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    working_set: u64,
    /// Migration part: bandwidth cap in bytes per second (0 = unlimited).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    max_bandwidth: u64,
    /// Migration part: downtime limit in ms.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Migration part: "tcp" (loopback) or "pipe" (in-memory).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Migration part: runs per tracker (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Start-pause part: runs per tracker configuration (medians). Each run
    /// costs a minute or more on 8 GiB: the guest must re-fault its memory
    /// writable after every tracker.
    #[arg(long, default_value_t = 1)]
    stall_runs: usize,
    /// Start-pause part: also clear every chunk with the small chunk size
    /// (adds another recovery pass).
    #[arg(long)]
    full_clears: bool,
    /// Only the start-pause part.
    #[arg(long, conflicts_with = "only_migrate")]
    only_stall: bool,
    /// Only the migration part.
    #[arg(long)]
    only_migrate: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest memory (bytes, or with K/M/G suffix; a multiple of 2 MiB).
    #[arg(short = 'm', long, alias = "size", value_name = "SIZE", value_parser = parse_size, default_value = minivm::defaults::MEM)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = usize::from(minivm::defaults::VCPUS))]
    vcpus: usize,
    /// Number of RAM blocks (KVM slots) the memory is split into.
    #[arg(long, default_value_t = 1)]
    blocks: usize,
    /// Test guest: bytes per second all vCPUs write together (K/M/G suffix; 0 = as fast as it can).
    #[arg(long, alias = "rate", value_name = "BYTES_PER_SEC", value_parser = parse_size, default_value = minivm::defaults::DIRTY_RATE)]
    dirty_rate: u64,
    /// Test guest: working set of each vCPU (K/M/G suffix; default: about
    /// 3/4 of --mem shared by the vCPUs, at most 384M each).
    #[arg(long, value_parser = parse_size)]
    working_set: Option<u64>,
    /// Boot a raw boot-sector image (real mode at 0:0x7c00) instead of the test guest.
    #[arg(long, conflicts_with_all = ["flat", "bootinc"])]
    boot_sector: Option<PathBuf>,
    /// Boot the built-in boot-sector incrementer over [1 MiB, end of memory).
    #[arg(long, conflicts_with = "flat")]
    bootinc: bool,
    /// Load a flat binary (see --load-addr, --entry, --mode).
    #[arg(long)]
    flat: Option<PathBuf>,
    /// Flat binary: guest load address.
    #[arg(long, value_parser = parse_size, default_value = "0x1000")]
    load_addr: u64,
    /// Flat binary: entry point (default: the load address).
    #[arg(long, value_parser = parse_size)]
    entry: Option<u64>,
    /// Flat binary: CPU mode to start in.
    #[arg(long, value_enum, default_value = "long-ring3")]
    mode: Mode,
    /// Serial port output: "stdout", "none" or a file path.
    #[arg(long, default_value = "stdout")]
    serial: String,
    /// Seconds to run (0 = until killed).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Dirty tracker (auto|bitmap|manual|ring): with --control, for the
    /// migrations started on the control socket [default: auto]; without,
    /// track dirty pages with it and print the dirty rate every second.
    #[arg(
        long,
        alias = "migrate-tracker",
        alias = "tracker",
        value_name = "TRACKER"
    )]
    dirty_track: Option<TrackerKind>,
    /// Dirty ring entries per vCPU (a power of two) [default: 16384 with
    /// --dirty-track ring, else no ring].
    #[arg(long)]
    dirty_ring: Option<u32>,
    /// Test guest: do not populate its working set from the host before it
    /// starts.
    #[arg(long)]
    no_prefault: bool,
    /// Populate the working set first (the default; kept for old scripts).
    #[arg(long, hide = true, conflicts_with = "no_prefault")]
    prefault: bool,
    /// Back guest memory with 4 KiB pages only (no MADV_HUGEPAGE).
    #[arg(long)]
    no_huge_pages: bool,
    /// With --incoming: receive into 4 KiB pages and ask for huge pages
    /// only once the guest resumes, collapsing them on a background
    /// thread (MADV_COLLAPSE). Faster into memory the host took back,
    /// but costs the destination CPU per 4 KiB page.
    #[arg(long, requires = "incoming")]
    receive_small_pages: bool,
    /// With --incoming: receive into huge pages even when the source says
    /// its guest is idle (by default an idle guest's memory is received
    /// into 4 KiB pages, then collapsed after the resume, as with
    /// --receive-small-pages; a running guest's into huge pages).
    #[arg(long, requires = "incoming", conflicts_with = "receive_small_pages")]
    receive_huge_pages: bool,
    /// With --incoming, when the memory was received into 4 KiB pages:
    /// after the guest resumes, leave it on 4 KiB pages until khugepaged
    /// collapses it, instead of collapsing it on a background thread.
    #[arg(long, requires = "incoming")]
    no_thp_collapse: bool,
    /// Back guest memory with memfds (sealed against shrinking, mapped
    /// shared) instead of anonymous memory: needed to migrate it out with
    /// mode local (memory handed to the destination, not copied). Huge
    /// pages then depend on the kernel's shmem THP setting.
    #[arg(long)]
    memfd: bool,
    /// At the end, pause and dump guest memory: ADDR:SIZE:FILE (K/M/G suffixes).
    #[arg(long)]
    dump: Option<String>,
    /// Serve a livemig control socket (JSON lines, QMP-style) at PATH:
    /// migrate the VM out, steer or cancel the migration. The process ends
    /// once the guest was migrated away, and outlives --seconds while a
    /// migration is in flight.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Start an empty, paused VM that waits for `migrate-incoming` on the
    /// control socket, then runs the guest it receives (--seconds counts
    /// from then). Needs --control; the layout (--mem, --vcpus, --blocks)
    /// must match the source's.
    #[arg(long, requires = "control", conflicts_with_all = ["boot_sector", "bootinc", "flat"])]
    incoming: bool,
    /// With --incoming: do not fail when the received guest sends no
    /// heartbeats (guests other than the built-in test guest, e.g. boot
    /// sectors, never do).
    #[arg(long, requires = "incoming")]
    no_progress_check: bool,
}

/// Prints what the background collapse of an incoming guest's memory into
/// huge pages did, once it ended; true when printed.
fn report_collapse(vm: &Vm) -> bool {
    match vm.collapse_stats() {
        Some(c) if c.finished && c.chunks == 0 => {
            eprintln!(
                "huge pages: asked for after the resume ({} ms waiting for a userfaultfd); no collapse",
                c.uffd_wait.as_millis()
            );
            true
        }
        Some(c) if c.finished || c.gave_up.is_some() => {
            eprintln!(
                "huge pages: {} of {} 2 MiB chunks collapsed after the resume ({} sparse, {} failed{}); \
                 {:.1} ms in MADV_COLLAPSE, longest call {:.2} ms, {} ms waiting for a userfaultfd",
                c.collapsed,
                c.chunks,
                c.sparse,
                c.failed,
                c.gave_up.map(|g| format!(", gave up: {g}")).unwrap_or_default(),
                c.busy.as_secs_f64() * 1e3,
                c.longest.as_secs_f64() * 1e3,
                c.uffd_wait.as_millis()
            );
            true
        }
        _ => false,
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|e| e.to_string());
    }
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 4096, 512M, 2G, 0x1000)"))
}

fn main() {
    if let Err(e) = run_cli(Cli::parse()) {
        eprintln!("minivm: error: {}", livemig::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

fn run_cli(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Trackers => {
            let vm = Vm::new(VmConfig {
                mem_size: 4 << 20,
                guest: GuestImage::Incoming,
                start_paused: true,
                ..Default::default()
            })?;
            let (manual, initially) = minivm::dirty::manual_protect_support(&vm);
            println!("bitmap: yes");
            println!("manual: {manual} (initially-set: {initially})");
            let ring = Vm::new(VmConfig {
                mem_size: 4 << 20,
                guest: GuestImage::Incoming,
                start_paused: true,
                dirty_ring_entries: Some(4096),
                ..Default::default()
            })
            .is_ok();
            println!("ring: {ring} (never picked by auto: see HOST-NOTES integrity warning)");
            let (k, why) = vm.resolve_tracker(TrackerKind::Auto);
            println!("auto: {k:?} ({why})");
            Ok(())
        }
        Cmd::MakeBootsector { end, output } => {
            let end = u32::try_from(end).context("--end must be below 4 GiB")?;
            std::fs::write(&output, minivm::guest::boot_incrementer(end))
                .with_context(|| format!("writing {}", output.display()))?;
            Ok(())
        }
        Cmd::Bench(a) => {
            let cfg = minivm::bench::BenchConfig {
                stall_mem: a.stall_mem,
                stall_vcpus: a.stall_vcpus,
                stall_working_set: a.stall_working_set,
                small_chunk_shift: a.small_chunk_shift,
                mig_mem: a.mem,
                mig_vcpus: a.vcpus,
                mig_rate: a.dirty_rate,
                mig_working_set: a.working_set,
                max_bandwidth: a.max_bandwidth,
                downtime_limit: a.downtime_limit,
                transport: match a.transport.as_str() {
                    "tcp" => minivm::bench::Transport::Tcp,
                    "pipe" => minivm::bench::Transport::Pipe,
                    t => bail!("--transport {t}: expected tcp or pipe"),
                },
                runs: a.runs,
                stall_runs: a.stall_runs,
                full_clears: a.full_clears,
                skip_stall: a.only_migrate,
                skip_migrate: a.only_stall,
                ..Default::default()
            };
            let report = minivm::bench::run(&cfg)?;
            if a.json {
                eprint!("{}", report.table());
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
    }
}

fn run(a: RunArgs) -> Result<()> {
    let guest = if a.incoming {
        GuestImage::Incoming
    } else if let Some(p) = &a.boot_sector {
        GuestImage::BootSector(
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )
    } else if a.bootinc {
        let end = u32::try_from(a.mem.min(0xffff_f000)).unwrap_or(0xffff_f000);
        GuestImage::BootSector(minivm::guest::boot_incrementer(end))
    } else if let Some(p) = &a.flat {
        GuestImage::Flat {
            image: std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            load_addr: a.load_addr,
            entry: a.entry.unwrap_or(a.load_addr),
            mode: match a.mode {
                Mode::Real => CpuMode::Real,
                Mode::LongRing3 => CpuMode::LongRing3,
            },
        }
    } else {
        GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: a.working_set.map_or_else(
                || minivm::defaults::working_set_pages(a.mem, a.vcpus),
                |ws| (ws / 4096).max(1),
            ),
            rate_bytes_per_sec: a.dirty_rate,
        })
    };
    let serial = match a.serial.as_str() {
        "stdout" => SerialOut::Stdout,
        "none" => SerialOut::Sink,
        p => SerialOut::File(p.into()),
    };
    let vm = Vm::new(VmConfig {
        mem_size: a.mem,
        ram_blocks: a.blocks,
        vcpus: a.vcpus,
        guest,
        dirty_ring_entries: a
            .dirty_ring
            .or((a.dirty_track == Some(TrackerKind::Ring)).then_some(minivm::defaults::DIRTY_RING)),
        serial,
        start_paused: a.incoming,
        prefault: !a.no_prefault,
        huge_pages: !a.no_huge_pages,
        clock_page: None,
        memfd: a.memfd,
        receive_small_pages: a.receive_small_pages,
        small_pages_when_idle: !a.receive_huge_pages,
        thp_collapse: !a.no_thp_collapse,
    })?;
    let migrate_tracker = match (&a.control, a.dirty_track) {
        (Some(_), Some(k)) => k,
        _ => TrackerKind::Auto,
    };
    let controlled = ControlledVm::new(vm, migrate_tracker);
    let vm = controlled.vm();
    let _server = match &a.control {
        Some(p) => {
            // SIGTERM / SIGINT end the loop below, so the socket is removed.
            minivm::sys::catch_termination().context("catching SIGTERM/SIGINT")?;
            let server = controlled
                .serve(p, Params::default())
                .with_context(|| format!("control socket {}", p.display()))?;
            eprintln!("control socket: {}", p.display());
            Some(server)
        }
        None => None,
    };
    if a.incoming {
        eprintln!("waiting for migrate-incoming on the control socket");
    }
    let mut phase = controlled.phase();
    // With --incoming, --seconds counts from the resume.
    let mut resumed: Option<(Instant, u64)> = None;
    let mem = vm.memory();
    // Without a control socket, --dirty-track measures the dirty rate.
    let measure = a.dirty_track.filter(|_| a.control.is_none());
    let mut tracker = match measure {
        Some(k) => {
            let (k, why) = vm.resolve_tracker(k);
            eprintln!("dirty tracking: {k:?} ({why})");
            let mut t = vm.tracker(k)?;
            let st = t.start()?;
            if st.initially_set {
                for (i, b) in mem.blocks().iter().enumerate() {
                    t.clear(i, 0, b.pages())?;
                }
            }
            Some(t)
        }
        None => None,
    };
    let start = Instant::now();
    let mut collapse_reported = false;
    let mut last = vm.guest_status();
    let mut last_t = Instant::now();
    loop {
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(sig) = minivm::sys::termination_signal() {
                let name = if sig == libc::SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
                };
                eprintln!("{name}: stopping (the control socket is removed)");
                bail!("stopped by {name}");
            }
        }
        let s = vm.guest_status();
        let dt = last_t.elapsed().as_secs_f64();
        let mut line = format!(
            "t={:>4.0}s heartbeats={} pages_written={} ({:.1} MiB/s) self_check={}",
            start.elapsed().as_secs_f64(),
            s.heartbeats(),
            s.pages_written(),
            (s.pages_written() - last.pages_written()) as f64 * 4096.0 / dt / (1 << 20) as f64,
            if s.ok() {
                "pass".to_string()
            } else {
                format!("FAIL({})", s.failures())
            }
        );
        if let Some(t) = tracker.as_mut() {
            let mut maps: Vec<DirtyBitmap> = mem
                .blocks()
                .iter()
                .map(|b| DirtyBitmap::new(b.pages()))
                .collect();
            let t0 = Instant::now();
            let n = t.sync(&mut maps)?;
            if t.clear_chunk_shift().is_some() {
                for (i, b) in mem.blocks().iter().enumerate() {
                    t.clear(i, 0, b.pages())?;
                }
            }
            line += &format!(" dirty={n} pages/s sync+clear={:?}", t0.elapsed());
        }
        eprintln!("{line}");
        if !collapse_reported {
            collapse_reported = report_collapse(vm);
        }
        if !s.errors.is_empty() {
            bail!("guest stopped: {:?}", s.errors);
        }
        last = s;
        last_t = Instant::now();
        let now = controlled.phase();
        if now != phase {
            match &now {
                Phase::Incoming(uri) => eprintln!("waiting for the incoming migration on {uri}"),
                Phase::Outgoing => eprintln!("migrating out"),
                Phase::Running if phase == Phase::Outgoing => {
                    if controlled.outgoing_completed() {
                        eprintln!("background snapshot completed: the guest runs on")
                    } else {
                        eprintln!(
                            "the outgoing migration ended without completing: the guest runs on"
                        )
                    }
                }
                Phase::Running => {
                    if let Some(r) = controlled.incoming_report() {
                        eprintln!(
                            "incoming migration loaded {} bytes in {} ms (digest {}{}); guest resumed",
                            r.stats.bytes,
                            r.load_time,
                            if r.verified { "verified" } else { "not sent" },
                            match vm.received_into_small_pages() {
                                Some(true) => "; into 4 KiB pages: the source's guest was idle",
                                Some(false) => "; into huge pages: the source's guest was busy",
                                None => "",
                            }
                        );
                    }
                    resumed = Some((Instant::now(), last.heartbeats()));
                }
                Phase::MigratedAway => {
                    eprintln!("migration completed: the guest runs on at the destination");
                    break;
                }
                Phase::IncomingFailed(e) => bail!("incoming migration failed: {e}"),
                Phase::Unconfirmed(e) => eprintln!(
                    "{e}; if the destination is not running it: livemig control SOCKET cont"
                ),
                Phase::AwaitingIncoming => {}
            }
            phase = now;
        }
        let ran = match (a.incoming, resumed) {
            (false, _) => Some(start.elapsed()),
            (true, Some((t, _))) => Some(t.elapsed()),
            (true, None) => None,
        };
        if a.seconds > 0
            && !phase.in_flight()
            && ran.is_some_and(|r| r >= Duration::from_secs(a.seconds))
        {
            break;
        }
    }
    if let Some((_, heartbeats)) = resumed.filter(|_| !a.no_progress_check) {
        if vm.guest_status().heartbeats() <= heartbeats {
            bail!("the received guest made no progress after it resumed");
        }
    }
    if let Some(t) = tracker.as_mut() {
        t.stop()?;
    }
    if let Some(d) = &a.dump {
        let parts: Vec<&str> = d.splitn(3, ':').collect();
        let [addr, size, file] = parts[..] else {
            bail!("--dump wants ADDR:SIZE:FILE");
        };
        let (addr, size) = (
            parse_size(addr).map_err(anyhow::Error::msg)?,
            parse_size(size).map_err(anyhow::Error::msg)?,
        );
        vm.pause()?;
        vm.dump_memory(addr, size, file.as_ref())?;
        eprintln!("dumped {size} bytes at {addr:#x} to {file}");
    }
    let s = vm.guest_status();
    if !s.ok() {
        bail!("self-check failed: {s:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut argv = vec!["minivm", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).expect("arguments parse").cmd {
            Cmd::Run(a) => a,
            _ => unreachable!("run parses as Run"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_are_the_shared_ones() {
        let a = run_args(&[]);
        assert_eq!(Ok(a.mem), parse_size(minivm::defaults::MEM));
        assert_eq!(a.vcpus, usize::from(minivm::defaults::VCPUS));
        assert_eq!(Ok(a.dirty_rate), parse_size(minivm::defaults::DIRTY_RATE));
        assert_eq!(a.working_set, None);
        assert!(!a.no_prefault);
        assert_eq!(a.dirty_track, None);
    }

    #[test]
    fn old_spellings_still_parse() {
        let a = run_args(&[
            "--size",
            "64M",
            "--rate",
            "16M",
            "--prefault",
            "--control",
            "/nonexistent/ctl",
            "--migrate-tracker",
            "ring",
        ]);
        assert_eq!((a.mem, a.dirty_rate), (64 << 20, 16 << 20));
        assert_eq!(a.dirty_track, Some(TrackerKind::Ring));
        assert!(a.control.is_some());
        let b = run_args(&["-m", "64M", "--dirty-rate", "16M", "--dirty-track", "ring"]);
        assert_eq!((b.mem, b.dirty_rate), (a.mem, a.dirty_rate));
        assert_eq!(b.dirty_track, a.dirty_track);
        assert!(Cli::try_parse_from(["minivm", "run", "--prefault", "--no-prefault"]).is_err());
    }
}
