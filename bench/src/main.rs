//! `livemig-harness`: QEMU and livemig + minivm side by side — the same
//! boot-sector guests, the same scenarios, the same machine, one run, one
//! table. See README.md ("Side by side with QEMU").

mod cleanup;
mod cpu;
mod guest;
#[cfg(test)]
mod guest_tests;
mod livemig_side;
mod net;
mod progress;
mod qemu;
mod qmp;
mod report;
mod run;
mod svg;
// The harness's only unsafe code: signal masks, sigwait, kill, and the
// children's death signal (each block with its SAFETY comment).
#[allow(unsafe_code)]
mod sys;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use guest::GuestKind;
use report::{Machine, Row};
use run::{Case, Switch, Variant};

#[derive(Parser)]
#[command(
    name = "livemig-harness",
    about = "Migrates the same boot-sector guests with QEMU and with livemig + minivm, checks \
             each destination's memory, prints one table"
)]
struct Cli {
    /// Small sizes and short budgets (a smoke run, a few minutes).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Rewrite the comparison section of this Markdown file (between
    /// `<!-- qemu-comparison:begin -->` and `<!-- qemu-comparison:end -->`;
    /// a file that does not exist is created).
    #[arg(long)]
    write_benchmarks: Option<PathBuf>,
    /// The section of that file to rewrite: between `<!-- NAME:begin -->`
    /// and `<!-- NAME:end -->` (appended when absent).
    #[arg(long, default_value = report::DEFAULT_SECTION)]
    section: String,
    /// Seconds one migration may take before it is cancelled ("did not
    /// converge") [default: 30, quick 15].
    #[arg(long)]
    budget: Option<u64>,
    /// Only scenarios whose name contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave out scenarios whose name contains one of these
    /// (comma-separated; applied after `--only`, e.g. `--only incrementer
    /// --skip heavy,postcopy`).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Only variants whose label contains one of these (comma-separated,
    /// e.g. defaults,channels).
    #[arg(long, value_delimiter = ',')]
    variant: Vec<String>,
    /// Filler guest size (its ring-0 fill takes ~95 s per GiB on
    /// nested-PVM hosts) [default: 256M, quick 64M].
    #[arg(long, value_parser = parse_mib)]
    filler_size: Option<u64>,
    /// Do not build minivm and livemig first (`cargo build --release`).
    #[arg(long)]
    no_build: bool,
    /// Runs per case and system, the two systems interleaved run by run;
    /// the table shows medians and min-max.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    reps: u32,
    /// Run both systems between two network namespaces joined by a veth
    /// pair shaped by tbf to RATE (e.g. 1gbit, 10gbit) instead of loopback.
    #[arg(long, value_name = "RATE")]
    link: Option<String>,
    /// Write one SVG chart per scenario (total time and downtime, medians
    /// with min-max) into this directory.
    #[arg(long)]
    svg_dir: Option<PathBuf>,
    /// A directory holding a release build (`minivm`, `livemig`) of
    /// another commit: run it too, as system `livemig-base`, interleaved
    /// with the others in the same table (before/after in one run). Builds
    /// from before the QMP control socket are driven in their own dialect
    /// (see bench/src/livemig_side.rs) and fail the postcopy variants.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// Test hook: start a child (`sleep`) like a VM, print its pid, wait
    /// for a signal.
    #[arg(long, hide = true)]
    x_test_spawn_child: bool,
}

fn main() {
    // First, before any thread: SIGINT/SIGTERM/SIGHUP go to one thread
    // that kills every child and deletes every namespace of the run.
    cleanup::install();
    let cli = Cli::parse();
    match run_cli(cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("livemig-harness: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The system name of a `--baseline` build.
const BASELINE: &str = "livemig-base";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Per-migration budget of the heavy-dirtier scenario (unless `--budget`).
const HEAVY_BUDGET: Duration = Duration::from_secs(45);

fn parse_mib(s: &str) -> Result<u64, String> {
    let (n, mul) = match s.strip_suffix(['G', 'g']) {
        Some(n) => (n, GIB),
        None => (s.strip_suffix(['M', 'm']).unwrap_or(s), MIB),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|b| (4 * MIB..4 * GIB).contains(b))
        .ok_or_else(|| format!("'{s}': a size like 256M or 1G, from 4M to below 4G"))
}

fn cases(
    quick: bool,
    budget: Duration,
    heavy_budget: Duration,
    filler_size: Option<u64>,
) -> Vec<Case> {
    let base = |scenario: &str, guest, mem, end, downtime_ms, variant| Case {
        scenario: scenario.into(),
        guest,
        mem,
        end,
        downtime_ms,
        variant,
        seed: 0x2545_f491,
        xbzrle_cache: 64 * MIB,
        max_bandwidth: 100_000 * MIB,
        budget,
        boot_budget: Duration::from_secs(if quick { 120 } else { 300 }),
        warm_up: false,
        throttle_steps: None,
    };
    let std_variants = [
        Variant::Defaults,
        Variant::Xbzrle,
        Variant::AutoConverge,
        Variant::Channels(2),
    ];
    let (idle_mem, fill, inc) = if quick {
        (256 * MIB, 64 * MIB, 128 * MIB)
    } else {
        (4 * GIB, 256 * MIB, GIB)
    };
    let fill = filler_size.unwrap_or(fill);
    let mut v = Vec::new();
    let size = |b: u64| {
        if b >= GIB {
            format!("{}G", b / GIB)
        } else {
            format!("{}M", b / MIB)
        }
    };
    let name = |g: &str, b: u64, dt: u64| format!("{g}-{}-{dt}ms", size(b));
    for variant in std_variants {
        v.push(base(
            &name("idle", idle_mem, 300),
            GuestKind::Idle,
            idle_mem,
            idle_mem,
            300,
            variant,
        ));
    }
    for variant in std_variants {
        v.push(base(
            &name("filler", fill, 300),
            GuestKind::Filler,
            fill,
            fill,
            300,
            variant,
        ));
    }
    for dt in [300, 30] {
        for variant in std_variants {
            v.push(base(
                &name("incrementer", inc, dt),
                GuestKind::Incrementer,
                inc,
                inc,
                dt,
                variant,
            ));
        }
    }
    v.push(base(
        &name("incrementer", inc, 30),
        GuestKind::Incrementer,
        inc,
        inc,
        30,
        Variant::DirtyLimit(16 * MIB),
    ));
    // Issue #15: postcopy on the incrementer, livemig's automatic switch
    // beside QEMU's manual ones.
    for dt in [300, 30] {
        for sw in [
            Switch::Auto,
            Switch::AutoChannels,
            Switch::AutoUrgent,
            Switch::AfterFirstPass,
            Switch::AfterFirstPassPreempt,
            Switch::Immediately,
        ] {
            v.push(base(
                &format!("postcopy-{}", name("incrementer", inc, dt)),
                GuestKind::Incrementer,
                inc,
                inc,
                dt,
                Variant::Postcopy(sw),
            ));
        }
    }
    // Issue #4: a guest dirtying far faster than the bandwidth cap. The
    // incrementer dirties its whole range about once a second under
    // tracking (~1 GB/s at 1 GiB); capped at a quarter of that, a plain
    // precopy cannot converge, auto-converge and dirty-limit should.
    let cap = inc / 4;
    let heavy = format!("{}-cap{}M", name("heavy-incrementer", inc, 300), cap >> 20);
    for variant in [
        Variant::Defaults,
        Variant::AutoConverge,
        Variant::DirtyLimit(cap / 8),
    ] {
        let mut c = base(&heavy, GuestKind::Incrementer, inc, inc, 300, variant);
        c.max_bandwidth = cap;
        c.budget = heavy_budget;
        // Every page holds data before the migration starts.
        c.warm_up = true;
        // At a quarter of the dirty rate the throttle must reach 80-90%
        // before precopy can converge. QEMU 7.2 raises it one step per two
        // high-dirty syncs, a sync per pass (4 s here): its default steps
        // (20%, +10%) got to 50% in 35 s, so both systems start at 80%.
        if variant == Variant::AutoConverge {
            c.throttle_steps = Some((80, 10));
        }
        v.push(c);
    }
    v
}

fn machine(qemu: String, refs: &Value) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let memory = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        qemu,
        date,
        memcpy: refs["memcpy"]["bytes_per_sec"].as_f64().unwrap_or(0.0),
        tcp: refs["tcp_loopback"]["bytes_per_sec"]
            .as_f64()
            .unwrap_or(0.0),
        ..Default::default()
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the harness binary")?;
    Ok(exe
        .parent()
        .context("harness binary has no directory")?
        .to_path_buf())
}

/// memcpy and loopback TCP, measured by `livemig bench` in this run.
fn references(livemig: &Path, quick: bool) -> Result<Value> {
    let mut cmd = Command::new(livemig);
    cmd.args(["bench", "--only", "references", "--json"]);
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", livemig.display()))?;
    if !out.status.success() {
        bail!(
            "{} bench failed: {}",
            livemig.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing livemig bench --json")?;
    Ok(v["references"].clone())
}

fn run_cli(cli: Cli) -> Result<bool> {
    let started = Instant::now();
    if cli.x_test_spawn_child {
        return spawn_child_and_wait();
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: both systems need KVM");
    }
    let qemu_version = qemu::ensure_installed()?;
    if !cli.no_build {
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "minivm", "-p", "livemig-cli"])
            .current_dir(workspace())
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .context("running cargo build for minivm and livemig")?;
        if !st.success() {
            bail!("cargo build --release -p minivm -p livemig-cli failed ({st})");
        }
    }
    let bins = bin_dir()?;
    let (minivm, livemig) = (bins.join("minivm"), bins.join("livemig"));
    for b in [&minivm, &livemig] {
        if !b.exists() {
            bail!(
                "{} is missing: build it with cargo build --release",
                b.display()
            );
        }
    }
    let baseline = match &cli.baseline {
        Some(dir) => {
            let m = dir.join("minivm");
            if !m.exists() {
                bail!(
                    "--baseline {}: no minivm there (build one with cargo build --release -p minivm in a worktree of the other commit and give its target/release)",
                    dir.display()
                );
            }
            Some(m)
        }
        None => None,
    };
    let budget = Duration::from_secs(cli.budget.unwrap_or(if cli.quick { 15 } else { 30 }));
    // The capped heavy-dirtier scenario's plain precopy never converges:
    // it takes its whole budget on both systems, so it gets its own.
    let heavy_budget = cli.budget.map(Duration::from_secs).unwrap_or(HEAVY_BUDGET);
    let all = cases(cli.quick, budget, heavy_budget, cli.filler_size);
    let cases: Vec<Case> = all
        .into_iter()
        .filter(|c| cli.only.is_empty() || cli.only.iter().any(|o| c.scenario.contains(o.as_str())))
        .filter(|c| !cli.skip.iter().any(|o| c.scenario.contains(o.as_str())))
        .filter(|c| {
            cli.variant.is_empty()
                || cli
                    .variant
                    .iter()
                    .any(|v| c.variant_label().contains(v.as_str()))
        })
        .collect();
    eprintln!("measuring references (livemig bench --only references)");
    let refs = references(&livemig, cli.quick)?;
    let tmp = std::env::temp_dir().join(format!("livemig-harness-{}", std::process::id()));
    cleanup::add_dir(tmp.clone());
    let _cleanup = TempDir(tmp.clone());
    let _link = match &cli.link {
        Some(rate) => {
            let bits = net::parse_rate(rate).map_err(|e| anyhow::anyhow!("--link {e}"))?;
            net::setup(bits, rate)?;
            eprintln!("network: {}", net::describe());
            Some(LinkGuard)
        }
        None => None,
    };
    let load_start = load_average();
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        for rep in 0..cli.reps {
            // Interleaved, and the first system alternates run by run.
            let mut systems = case.systems().to_vec();
            // Every variant livemig runs, postcopy `auto` included (a
            // baseline that predates postcopy says so in its row).
            if baseline.is_some() && systems.contains(&"livemig") {
                systems.push(BASELINE);
            }
            // The first system rotates run by run.
            let n = systems.len();
            systems.rotate_left(rep as usize % n);
            for system in systems {
                let dir = tmp.join(format!("{i:02}-{rep}-{system}"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                eprintln!(
                    "[{:>4.0}s] {} / {} / {system} (run {}/{}, load {}) ...",
                    started.elapsed().as_secs_f64(),
                    case.scenario,
                    case.variant_label(),
                    rep + 1,
                    cli.reps,
                    load_average(),
                );
                let outcome = match system {
                    "qemu" => qemu::run(case, &dir),
                    BASELINE => livemig_side::run(
                        case,
                        &dir,
                        baseline.as_deref().expect("baseline given"),
                        BASELINE,
                    ),
                    _ => livemig_side::run(case, &dir, &minivm, "livemig"),
                };
                eprintln!(
                    "        {} converged={} total={} ms downtime={} ms check={}{}",
                    outcome.status,
                    outcome.converged,
                    outcome.total_ms,
                    outcome.downtime_ms,
                    outcome
                        .check
                        .as_ref()
                        .map(|c| format!("{} ({})", if c.ok { "pass" } else { "FAIL" }, c.detail))
                        .unwrap_or_else(|| "-".into()),
                    if outcome.note.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", outcome.note)
                    }
                );
                let _ = std::fs::remove_dir_all(&dir);
                rows.push(Row {
                    case: case.clone(),
                    rep,
                    outcome,
                });
            }
        }
    }
    let mut m = machine(qemu_version, &refs);
    m.network = net::describe();
    m.reps = cli.reps;
    m.load = format!("{load_start} at the start, {} at the end", load_average());
    let aggs = report::aggregate(&rows);
    let table = report::text_table(&aggs, &rows);
    if cli.json {
        eprint!("{table}");
        println!(
            "{}",
            json!({"machine": m, "references": refs, "rows": rows, "aggregates": aggs,
                   "elapsed_secs": started.elapsed().as_secs_f64()})
        );
    } else {
        print!("{table}");
    }
    if let Some(dir) = &cli.svg_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (scenario, svg) in svg::charts(&aggs, &m) {
            let path = dir.join(format!("{}.svg", svg::file_stem(&scenario, &m)));
            std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    if let Some(path) = &cli.write_benchmarks {
        // A file that does not exist yet starts empty: the section is
        // appended to it (not an error found only after the whole run).
        let doc = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            r => r.with_context(|| format!("reading {}", path.display()))?,
        };
        let mut command = "cargo run --release -p livemig-harness --".to_string();
        if cli.quick {
            command += " --quick";
        }
        if let Some(f) = cli.filler_size {
            command += &format!(" --filler-size {}M", f >> 20);
        }
        command += &format!(" --write-benchmarks {}", path.display());
        if cli.section != report::DEFAULT_SECTION {
            command += &format!(" --section {}", cli.section);
        }
        if cli.reps != 3 {
            command += &format!(" --reps {}", cli.reps);
        }
        if let Some(l) = &cli.link {
            command += &format!(" --link {l}");
        }
        if !cli.only.is_empty() {
            command += &format!(" --only {}", cli.only.join(","));
        }
        if !cli.skip.is_empty() {
            command += &format!(" --skip {}", cli.skip.join(","));
        }
        if !cli.variant.is_empty() {
            command += &format!(" --variant {}", cli.variant.join(","));
        }
        if let Some(b) = &cli.baseline {
            command += &format!(" --baseline {}", b.display());
        }
        let new = report::replace_section(
            &doc,
            &report::section(&aggs, &rows, &m, &command, &cli.section),
            &cli.section,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote the comparison section of {}", path.display());
    }
    eprintln!(
        "harness finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // livemig's destination must pass its memory check in every case it ran.
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| r.outcome.system.starts_with("livemig") && r.outcome.ran)
        // Not converging within the budget is a result (in the table); a
        // run that broke or a destination that fails its check is not.
        .filter(|r| r.outcome.status != "cancelled" && !r.outcome.check_ok())
        .map(|r| {
            format!(
                "{} / {}: {}",
                r.case.scenario,
                r.case.variant_label(),
                match &r.outcome.check {
                    Some(c) if !c.ok => format!("DESTINATION MEMORY CHECK FAILED: {}", c.detail),
                    _ if !r.outcome.converged =>
                        format!("did not complete ({}) {}", r.outcome.status, r.outcome.note),
                    _ => format!("no memory check ({})", r.outcome.note),
                }
            )
        })
        .collect();
    if !bad.is_empty() {
        eprintln!("livemig-harness: FAILED: livemig's destination is not proven correct in:");
        for b in &bad {
            eprintln!("  {b}");
        }
        return Ok(false);
    }
    Ok(true)
}

/// The 1, 5 and 15 minute load averages (/proc/loadavg).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Deletes the `--link` namespaces when the run ends.
struct LinkGuard;

impl Drop for LinkGuard {
    fn drop(&mut self) {
        net::teardown();
    }
}

/// Test hook (`--x-test-spawn-child`): a child started like a VM; its
/// pid on stdout; then waits until a signal ends the harness.
fn spawn_child_and_wait() -> Result<bool> {
    let dir = std::env::temp_dir().join(format!("livemig-harness-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    cleanup::add_dir(dir.clone());
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let p = run::Proc::spawn("sleep", cmd, &dir.join("sleep.log"))?;
    println!("{}", p.pid());
    use std::io::Write;
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(600));
    Ok(true)
}

/// Removes the run's temporary directory (FIFOs, serial logs) on exit.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
