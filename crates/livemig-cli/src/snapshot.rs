//! Snapshot files in the mapped-ram layout (`--mapped-ram`), background
//! snapshots of a running guest (`--background-snapshot`) and lazy
//! restores (`--lazy`): the CLI side of `livemig::snapshot` and
//! `minivm::snapshot`. The stream-format `file:` snapshots stay in
//! process.rs and vm.rs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use livemig::engine::{hex, memory_digest};
use livemig::memory::ProcessMemory;
use livemig::snapshot::{
    background_save, is_mapped_ram, BackgroundOptions, BackgroundStats, LazyOptions, LazyRestore,
    LazyStatus, LoadOptions, MappedRamFile, SaveOptions,
};
use livemig::transport::Uri;
use serde_json::{json, Value};

use crate::units::human;

const MIB: f64 = (1u64 << 20) as f64;

/// How a source writes a snapshot file.
#[derive(Args, Clone, Debug, Default)]
pub struct SnapshotSaveArgs {
    /// Write the file in the mapped-ram layout (capability mapped-ram):
    /// each page at a fixed offset, zero pages left as holes (an idle
    /// guest's file stays small on disk), a checksum per 2 MiB chunk,
    /// written by several threads. The guest is paused while it is
    /// written. file: only.
    #[arg(long)]
    pub mapped_ram: bool,
    /// Snapshot the running guest (capability background-snapshot): it is
    /// paused only to arm write protection and save its state, then runs
    /// while memory is written; a page it is about to overwrite is copied
    /// first. The file (mapped-ram layout) holds memory as of the pause.
    #[arg(long)]
    pub background_snapshot: bool,
    /// With --background-snapshot: also hash all memory in the pause and
    /// check the file holds exactly that (makes the pause as long as
    /// hashing all memory: a check, not for production).
    #[arg(long, requires = "background_snapshot")]
    pub check_instant: bool,
    /// Threads writing a mapped-ram file (default: the cores, at most 8).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// With --mapped-ram: write pages with O_DIRECT, bypassing the page
    /// cache (QEMU's direct-io parameter).
    #[arg(long, requires = "mapped_ram")]
    pub direct_io: bool,
}

impl SnapshotSaveArgs {
    /// True when the file is to be written in the mapped-ram layout.
    pub fn wanted(&self) -> bool {
        self.mapped_ram || self.background_snapshot
    }

    /// Refuses the flags on anything but a file.
    pub fn check(&self, uri: &Uri) -> Result<()> {
        if self.wanted() && !matches!(uri, Uri::File(_)) {
            bail!("--mapped-ram and --background-snapshot write a file: give file:PATH (the socket stream format is unchanged)");
        }
        if self.threads.is_some() && !self.wanted() {
            bail!("--threads applies to a mapped-ram file: add --mapped-ram");
        }
        Ok(())
    }

    fn threads(&self) -> usize {
        self.threads
            .map_or_else(livemig::snapshot::default_threads, usize::from)
    }
}

/// How a destination reads a mapped-ram file (recognised by its magic).
#[derive(Args, Clone, Debug, Default)]
pub struct SnapshotLoadArgs {
    /// Lazy restore of a mapped-ram file: the guest resumes as soon as its
    /// vCPU and device state are loaded; its memory is served from the
    /// file on first touch (userfaultfd) while a thread loads the rest.
    /// A chunk that fails its checksum stops the guest.
    #[arg(long)]
    pub lazy: bool,
    /// Threads reading a mapped-ram file (default: the cores, at most 8).
    #[arg(long = "threads", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub load_threads: Option<u16>,
}

impl SnapshotLoadArgs {
    fn threads(&self) -> usize {
        self.load_threads
            .map_or_else(livemig::snapshot::default_threads, usize::from)
    }

    /// The mapped-ram file to restore, if `uri` is one; an error for
    /// --lazy/--threads on anything else.
    pub fn file<'a>(&self, uri: &'a Uri) -> Result<Option<&'a Path>> {
        let asked = self.lazy || self.load_threads.is_some();
        match uri {
            Uri::File(p) if is_mapped_ram(p) => Ok(Some(p)),
            Uri::File(p) if asked => {
                if !p.exists() {
                    bail!("{}: no such file", p.display());
                }
                bail!("{} is not a mapped-ram file: --lazy and --threads need one (save with --mapped-ram)", p.display())
            }
            _ if asked => bail!("--lazy and --threads restore a mapped-ram file: give file:PATH"),
            _ => Ok(None),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn background_json(s: &BackgroundStats) -> Value {
    json!({
        "pause-us": s.pause_us,
        "arm-us": s.arm_us,
        "reprotected-pages": s.reprotected_pages,
        "copied-pages": s.copied_pages,
        "wp-faults": s.faults,
        "instant-digest": s.instant_digest.map(|d| hex(&d)),
    })
}

/// What a background snapshot to `path` did: said on stderr (when `say`),
/// its start-instant digest checked against the file's (when taken), and
/// as JSON.
fn background_report(path: &Path, s: &BackgroundStats, threads: usize, say: bool) -> Result<Value> {
    if say {
        say_background(s);
        say_saved(path, &s.save, threads);
    }
    if let Some(d) = s.instant_digest {
        if d != s.save.digest {
            bail!(
                "the file does not hold memory as of the pause: digest {} in the pause, {} in the file",
                hex(&d),
                hex(&s.save.digest)
            );
        }
        if say {
            eprintln!("checked: the file holds exactly the memory hashed in the pause");
        }
    }
    let mut v = json!({"mode": "background-snapshot", "downtime": s.pause_us as f64 / 1000.0});
    v["background"] = background_json(s);
    v["save"] = serde_json::to_value(&s.save)?;
    Ok(v)
}

fn say_background(s: &BackgroundStats) {
    eprintln!(
        "background snapshot: guest paused {:.2} ms (write protection armed beforehand in {:.2} ms while it ran; {} pages re-protected in the pause); {} pages copied before the guest overwrote them",
        s.pause_us as f64 / 1000.0,
        s.arm_us as f64 / 1000.0,
        s.reprotected_pages,
        s.copied_pages
    );
}

fn say_saved(path: &Path, s: &livemig::snapshot::SaveStats, threads: usize) {
    eprintln!(
        "mapped-ram file {}: {} pages written{}, {} zero pages left as holes; {} apparent, {} on disk; written in {} ms by {threads} thread{}",
        path.display(),
        s.pages,
        if s.direct_io { " (O_DIRECT)" } else { "" },
        s.zero_pages,
        human(s.file_len),
        human(s.disk_bytes),
        s.millis,
        if threads == 1 { "" } else { "s" }
    );
    eprintln!("memory digest of the file: {}", hex(&s.digest));
}

/// `vm-migrate file:PATH --mapped-ram | --background-snapshot` once the
/// guest runs.
pub fn vm_save(
    path: &Path,
    vm: &minivm::Vm,
    restore_hint: &str,
    a: &SnapshotSaveArgs,
    json_out: bool,
) -> Result<()> {
    let say = !json_out;
    let threads = a.threads();
    let before = vm.guest_status();
    let mut v = if a.background_snapshot {
        let opts = BackgroundOptions {
            threads,
            instant_digest: a.check_instant,
        };
        let s = minivm::snapshot::save_background(vm, path, &opts)
            .with_context(|| format!("background snapshot to {}", path.display()))?;
        background_report(path, &s, threads, say)?
    } else {
        let opts = SaveOptions {
            threads,
            direct_io: a.direct_io,
        };
        let saved = minivm::snapshot::save(vm, path, &opts)
            .with_context(|| format!("saving the VM to {}", path.display()))?;
        if say {
            say_saved(path, &saved.stats, threads);
            eprintln!(
                "the guest was paused for the save ({:.1} ms) and stays paused",
                ms(saved.pause)
            );
        }
        let mut v = json!({"mode": "mapped-ram", "downtime": ms(saved.pause)});
        v["save"] = serde_json::to_value(&saved.stats)?;
        v
    };
    // A background snapshot's guest ran on: show it did.
    std::thread::sleep(Duration::from_millis(if a.background_snapshot {
        300
    } else {
        0
    }));
    let after = vm.guest_status();
    if say {
        eprintln!(
            "guest: pages written {} -> {}, self-check {}",
            before.pages_written(),
            after.pages_written(),
            if after.ok() { "passed" } else { "FAILED" }
        );
        eprintln!(
            "restore: livemig vm-incoming file:{} {restore_hint}",
            path.display()
        );
    }
    if json_out {
        completed_save(&mut v, path, threads);
        v["guest"] = json!({
            "pages-written-before": before.pages_written(),
            "pages-written": after.pages_written(),
            "self-check": if after.ok() { "passed" } else { "failed" },
        });
        crate::jsonout::print(&v)?;
    }
    if !after.ok() {
        bail!("the guest's self-check failed on the source: {after:?}");
    }
    Ok(())
}

/// `vm-incoming file:PATH` of a mapped-ram file: restore (eagerly or
/// lazily), run the guest `seconds`, report.
pub fn vm_restore(
    path: &Path,
    config: &minivm::VmConfig,
    a: &SnapshotLoadArgs,
    dirty_rate: Option<u64>,
    seconds: f64,
    json_out: bool,
    quiet: bool,
) -> Result<()> {
    let say = !json_out && !quiet;
    let t0 = Instant::now();
    let (vm, lazy, mut v) = if a.lazy {
        let l = minivm::snapshot::restore_lazy(config, path)
            .with_context(|| format!("lazy restore of {}", path.display()))?;
        if say {
            eprintln!(
                "lazy restore: guest resumed {:.2} ms after opening {} (vCPU/device state loaded; memory follows on demand; creating the empty VM before took {:.1} ms)",
                ms(l.time_to_resume),
                path.display(),
                ms(l.vm_create)
            );
        }
        let v = json!({
            "mode": "lazy",
            "time-to-resume": ms(l.time_to_resume),
            "vm-create-time": ms(l.vm_create),
        });
        (l.vm, Some(l.restore), v)
    } else {
        let threads = a.threads();
        let (vm, stats) = minivm::snapshot::restore(config, path, threads)
            .with_context(|| format!("restoring {}", path.display()))?;
        let took = t0.elapsed();
        if say {
            eprintln!(
                "restored {}: {} pages read, {} holes, every chunk checked, memory loaded in {} ms by {threads} thread{} ({:.1} ms in all)",
                path.display(),
                stats.pages,
                stats.zero_pages,
                stats.millis,
                if threads == 1 { "" } else { "s" },
                ms(took)
            );
        }
        vm.resume();
        let v = json!({
            "mode": "mapped-ram",
            "threads": threads,
            "load": stats,
            "restore-time": ms(took),
            "time-to-resume": ms(took),
        });
        (vm, None, v)
    };
    if let Some(rate) = dirty_rate {
        vm.set_rate(rate);
    }
    let resumed = Instant::now();
    let before = vm.guest_status();
    let mut last = before.clone();
    let mut last_t = Instant::now();
    let mut lazy_status: Option<LazyStatus> = None;
    loop {
        let st = lazy.as_ref().map(LazyRestore::status);
        if let Some(e) = st.as_ref().and_then(|s| s.error.clone()) {
            // vCPUs that touch the missing chunk stay blocked; the process
            // ends here and the guest with it.
            if json_out {
                crate::jsonout::print(&json!({"status": "failed", "error": e, "lazy": st}))?;
            }
            bail!("lazy restore stopped, the guest is stopped and will not run on: {e}");
        }
        let loaded = st.as_ref().is_none_or(|s| s.done);
        if loaded && lazy_status.is_none() {
            if let Some(s) = st.clone() {
                if say {
                    eprintln!(
                        "lazy restore: every chunk in {} ms after the resume ({} faults served, {} chunks loaded on demand of {})",
                        s.load_millis.unwrap_or(0),
                        s.faults,
                        s.demand_chunks,
                        s.total_chunks
                    );
                }
                lazy_status = Some(s);
            }
        }
        if loaded && seconds > 0.0 && resumed.elapsed().as_secs_f64() >= seconds {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        if last_t.elapsed() >= Duration::from_secs(1) {
            let s = vm.guest_status();
            if say {
                eprintln!(
                    "t={:>5.1}s heartbeats={} pages_written={} ({:.0} MiB/s) self-check {}",
                    resumed.elapsed().as_secs_f64(),
                    s.heartbeats(),
                    s.pages_written(),
                    (s.pages_written() - last.pages_written()) as f64 * 4096.0
                        / last_t.elapsed().as_secs_f64()
                        / MIB,
                    if s.ok() { "passed" } else { "FAILED" }
                );
            }
            if !s.ok() {
                break;
            }
            last = s;
            last_t = Instant::now();
        }
    }
    vm.pause().context("pausing the restored guest")?;
    let after = vm.guest_status();
    let ran = resumed.elapsed().as_secs_f64();
    let advanced =
        after.heartbeats() > before.heartbeats() && after.pages_written() > before.pages_written();
    // With every page in, the memory digest of what the guest started
    // from was checked chunk by chunk; the guest's own check covers the rest.
    if json_out {
        v["role"] = json!("destination");
        v["status"] = json!("completed");
        v["file"] = json!(path.display().to_string());
        v["lazy"] = json!(lazy_status);
        v["ran-seconds"] = json!(ran);
        v["guest"] = json!({
            "heartbeats": after.heartbeats(),
            "pages-written-before": before.pages_written(),
            "pages-written": after.pages_written(),
            "self-check": if after.ok() { "passed" } else { "failed" },
            "failures": after.failures(),
        });
        crate::jsonout::print(&v)?;
    } else if !quiet {
        eprintln!(
            "guest after the restore: {} heartbeats, pages written {} -> {}, self-check {}",
            after.heartbeats(),
            before.pages_written(),
            after.pages_written(),
            if after.ok() { "passed" } else { "FAILED" }
        );
    }
    drop(lazy);
    if !after.ok() {
        bail!("the guest's self-check failed after the restore: {after:?}");
    }
    if !advanced {
        bail!("the guest made no progress after the restore: {before:?} -> {after:?}");
    }
    Ok(())
}

/// `migrate file:PATH --mapped-ram | --background-snapshot` (and `save`)
/// for process memory: `control` pauses the workload (None: nothing runs).
pub fn process_save(
    path: &Path,
    mem: &ProcessMemory,
    control: Option<&mut dyn livemig::vm::VmControl>,
    a: &SnapshotSaveArgs,
    json_out: bool,
) -> Result<()> {
    let say = !json_out;
    let threads = a.threads();
    let mut no_vm = livemig::vm::NoVm;
    let control = match control {
        Some(c) => c,
        None => &mut no_vm,
    };
    let mut v = if a.background_snapshot {
        let opts = BackgroundOptions {
            threads,
            instant_digest: a.check_instant,
        };
        let s = background_save(mem, path, control, &opts)
            .with_context(|| format!("background snapshot to {}", path.display()))?;
        background_report(path, &s, threads, say)?
    } else {
        let t = Instant::now();
        control.pause()?;
        let opts = SaveOptions {
            threads,
            direct_io: a.direct_io,
        };
        let s = livemig::snapshot::save(mem, path, &[], &opts)
            .with_context(|| format!("saving to {}", path.display()))?;
        let pause = t.elapsed();
        if say {
            say_saved(path, &s, threads);
        }
        let mut v = json!({"mode": "mapped-ram", "downtime": ms(pause)});
        v["save"] = serde_json::to_value(&s)?;
        v
    };
    if json_out {
        completed_save(&mut v, path, threads);
        crate::jsonout::print(&v)?;
    }
    Ok(())
}

/// The fields every completed save's JSON report has beside `save`: the
/// status, the role, the file, the threads and the memory digest.
fn completed_save(v: &mut Value, path: &Path, threads: usize) {
    v["status"] = json!("completed");
    v["role"] = json!("source");
    v["file"] = json!(path.display().to_string());
    v["threads"] = json!(threads);
    v["digest"] = v["save"]["digest"].clone();
}

/// `load FILE` / `incoming file:PATH` of a mapped-ram file into process
/// memory.
pub fn process_load(
    path: &Path,
    mem: &ProcessMemory,
    a: &SnapshotLoadArgs,
    json_out: bool,
) -> Result<()> {
    let say = !json_out;
    let t0 = Instant::now();
    let file = MappedRamFile::open_for(path, mem).map_err(|e| match e {
        // A VM's file: say so rather than only "layout does not match".
        livemig::snapshot::SnapshotError::Layout(_) => match MappedRamFile::open(path) {
            Ok(f) if f.header().flags & livemig::snapshot::format::FLAG_VM_STATE != 0 => {
                anyhow::anyhow!(
                    "{} is a VM snapshot (it carries vCPU state): restore it with `livemig vm-incoming file:{}`",
                    path.display(),
                    path.display()
                )
            }
            _ => anyhow::Error::new(e),
        },
        e => anyhow::Error::new(e),
    })?;
    let expected = file.digest();
    if !file.state().context("reading the state")?.is_empty() {
        bail!(
            "{} is a VM snapshot (it carries vCPU state): restore it with `livemig vm-incoming file:{}`",
            path.display(),
            path.display()
        );
    }
    let mut v = if a.lazy {
        let lazy = LazyRestore::start(file, mem, &LazyOptions::default())?;
        let ready = t0.elapsed();
        let s = lazy.wait();
        if let Some(e) = &s.error {
            bail!("lazy load of {} stopped: {e}", path.display());
        }
        if say {
            eprintln!(
                "lazy load: memory usable {:.2} ms after opening, every chunk in after {} ms",
                ms(ready),
                s.load_millis.unwrap_or(0)
            );
        }
        json!({"mode": "lazy", "time-to-ready": ms(ready), "lazy": s})
    } else {
        let threads = a.threads();
        let stats = file.load(
            mem,
            &LoadOptions {
                threads,
                fresh: true,
            },
        )?;
        if say {
            eprintln!(
                "loaded {}: {} pages read, {} holes, every chunk checked, in {} ms by {threads} thread{}",
                path.display(),
                stats.pages,
                stats.zero_pages,
                stats.millis,
                if threads == 1 { "" } else { "s" }
            );
        }
        json!({"mode": "mapped-ram", "threads": threads, "load": stats})
    };
    let digest = memory_digest(mem);
    let verified = digest == expected;
    if json_out {
        v["role"] = json!("destination");
        v["status"] = json!("completed");
        v["file"] = json!(path.display().to_string());
        v["total-time"] = json!(t0.elapsed().as_millis() as u64);
        v["digest"] = json!(hex(&digest));
        v["verified"] = json!(verified);
        crate::jsonout::print(&v)?;
    } else if verified {
        eprintln!(
            "memory digest verified against the file's: {}",
            hex(&digest)
        );
    }
    if !verified {
        bail!(
            "memory digest {} differs from the file's {}",
            hex(&digest),
            hex(&expected)
        );
    }
    Ok(())
}
