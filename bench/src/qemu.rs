//! The QEMU side: two QEMU processes with KVM on loopback, driven over QMP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::guest::{compare_digests, DigestCheck, IncrementerCheck};
use crate::net::{self, Side};
use crate::qmp::Qmp;
use crate::run::{
    check_for, free_port, mkfifo, pass_clock, poll_migration, switch_due, wait_marker, wait_ready,
    Case, CpuWatch, DumpReader, Outcome, Proc, Switch, Variant,
};

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Installs qemu-system-x86 with apt-get when `qemu-system-x86_64` is
/// missing; returns its version line.
pub fn ensure_installed() -> Result<String> {
    let version = || -> Option<String> {
        let out = Command::new(QEMU).arg("--version").output().ok()?;
        let s = String::from_utf8_lossy(&out.stdout);
        Some(s.lines().next()?.trim().to_string())
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    eprintln!("{QEMU} not found: installing qemu-system-x86 with apt-get");
    for args in [&["update"][..], &["install", "-y", "qemu-system-x86"][..]] {
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Its progress goes to stderr: with --json stdout holds only
            // the JSON.
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
            .context("running apt-get (needed to install QEMU)")?;
        if !st.success() {
            bail!(
                "apt-get {} failed ({st}): install qemu-system-x86 by hand",
                args.join(" ")
            );
        }
    }
    version().context("qemu-system-x86 installed, but qemu-system-x86_64 --version fails")
}

/// The command line of one QEMU process.
pub fn qemu_args(
    disk: &Path,
    mem: u64,
    qmp: &Path,
    serial: &Path,
    incoming: bool,
    paused: bool,
    dirty_ring: Option<u32>,
) -> Vec<String> {
    let accel = match dirty_ring {
        Some(n) => format!("kvm,dirty-ring-size={n}"),
        None => "kvm".into(),
    };
    let mut a: Vec<String> = vec![
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        accel,
        "-cpu".into(),
        "host,-arch-capabilities".into(),
        "-m".into(),
        format!("{}M", mem >> 20),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-drive".into(),
        format!("file={},format=raw,if=ide,file.locking=off", disk.display()),
        // Threads named by role ("CPU 0/KVM", "multifdsend_0", ...): the
        // harness finds the vCPU thread's CPU time by its name.
        "-name".into(),
        "harness,debug-threads=on".into(),
    ];
    if incoming {
        // -S: stays paused after the migration, so its memory can be read
        // exactly as it arrived before the guest runs on.
        a.extend(["-incoming".into(), "defer".into()]);
    }
    if incoming && paused {
        a.push("-S".into());
    }
    a
}

/// The `pc.ram` ranges (start, size) in the flat view of
/// `info mtree -f` output, sorted and without duplicates.
pub fn ram_ranges(mtree: &str) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = mtree
        .lines()
        .filter(|l| l.contains("): pc.ram"))
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a, 16).ok()?;
            let b = u64::from_str_radix(b, 16).ok()?;
            (b >= a).then(|| (a, b - a + 1))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

struct Vm {
    proc: Proc,
    qmp: Qmp,
    qmp_path: PathBuf,
    serial: PathBuf,
}

fn start_vm(
    dir: &Path,
    name: &str,
    case: &Case,
    disk: &Path,
    incoming: bool,
    dirty_ring: Option<u32>,
) -> Result<Vm> {
    let qmp_path = dir.join(format!("{name}.qmp"));
    let serial = dir.join(format!("{name}.serial"));
    let side = if incoming { Side::Dst } else { Side::Src };
    let mut cmd = net::command(side, QEMU);
    // A postcopy destination must run during postcopy (its faults are
    // what is measured): not started paused.
    let paused = !matches!(case.variant, Variant::Postcopy(_));
    cmd.args(qemu_args(
        disk, case.mem, &qmp_path, &serial, incoming, paused, dirty_ring,
    ));
    let mut proc = Proc::spawn(
        &format!("QEMU {name}"),
        cmd,
        &dir.join(format!("{name}.log")),
    )?;
    let qmp = Qmp::connect(&qmp_path, Duration::from_secs(20)).map_err(|e| {
        let _ = proc.exited();
        anyhow::anyhow!("{e:#}; QEMU {name} log: {}", proc.log_tail())
    })?;
    Ok(Vm {
        proc,
        qmp,
        qmp_path,
        serial,
    })
}

/// Dumps `regions` of a (paused) QEMU through `pmemsave`, one FIFO each.
fn dump<T: crate::run::Feed>(
    vm: &mut Vm,
    dir: &Path,
    regions: &[(u64, u64)],
    sink: T,
) -> Result<T> {
    let name = vm
        .qmp_path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let mut list = Vec::new();
    for (i, &(addr, size)) in regions.iter().enumerate() {
        let fifo = dir.join(format!("dump-{name}-{i}.fifo"));
        if !fifo.exists() {
            mkfifo(&fifo)?;
        }
        list.push((fifo, addr, size));
    }
    let reader = DumpReader::start(list.clone(), sink);
    for (fifo, addr, size) in &list {
        vm.qmp.execute(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": fifo.display().to_string()}),
        )?;
    }
    let (sink, r) = reader.finish(Duration::from_secs(120));
    r?;
    Ok(sink)
}

/// Runs `case` on QEMU in `dir`.
pub fn run(case: &Case, dir: &Path) -> Outcome {
    let mut out = Outcome {
        system: "qemu".into(),
        ran: true,
        ..Default::default()
    };
    if let Err(e) = run_inner(case, dir, &mut out) {
        out.record_error(&e);
    }
    out
}

fn run_inner(case: &Case, dir: &Path, out: &mut Outcome) -> Result<()> {
    let disk = dir.join("disk.img");
    let sector = case.sector();
    // A raw disk of 1 MiB: the boot sector, then zeros.
    let mut img = sector.to_vec();
    img.resize(1 << 20, 0);
    std::fs::write(&disk, &img).with_context(|| format!("writing {}", disk.display()))?;
    let ring = match case.variant {
        Variant::DirtyLimit(_) => Some(65536),
        _ => None,
    };
    let mut dst = start_vm(dir, "dst", case, &disk, true, ring)?;
    let clock = pass_clock(case, &dir.join("src.serial"));
    let mut src = start_vm(dir, "src", case, &disk, false, ring)?;
    wait_marker(
        &src.serial,
        &case.ready_marker(),
        &mut src.proc,
        case.boot_budget,
    )?;
    let mut cpu = CpuWatch::new(
        src.proc.pid(),
        clock.is_some() && !matches!(case.variant, Variant::Postcopy(_)),
    );
    cpu.ready();
    wait_ready(case, clock.as_ref(), case.boot_budget)?;

    let postcopy = matches!(case.variant, Variant::Postcopy(_));
    let preempt = case.variant == Variant::Postcopy(Switch::AfterFirstPassPreempt);
    let caps = |multifd: bool| {
        json!({"capabilities": [
            {"capability": "postcopy-ram", "state": postcopy},
            {"capability": "postcopy-preempt", "state": preempt},
            {"capability": "xbzrle", "state": case.variant == Variant::Xbzrle},
            {"capability": "auto-converge", "state": case.variant == Variant::AutoConverge},
            {"capability": "multifd", "state": multifd},
        ]})
    };
    let channels = match case.variant {
        Variant::Channels(n) => Some(n),
        _ => None,
    };
    for vm in [&mut src, &mut dst] {
        vm.qmp
            .execute("migrate-set-capabilities", caps(channels.is_some()))?;
        if let Some(n) = channels {
            vm.qmp
                .execute("migrate-set-parameters", json!({"multifd-channels": n}))?;
        }
    }
    let mut params = json!({
        "max-bandwidth": case.max_bandwidth,
        "downtime-limit": case.downtime_ms,
        "xbzrle-cache-size": case.xbzrle_cache,
    });
    if let Some(p) = params.as_object_mut() {
        p.extend(case.throttle_params());
    }
    src.qmp.execute("migrate-set-parameters", params)?;
    if let Variant::DirtyLimit(bytes) = case.variant {
        // QEMU 7.2 limits vCPUs outside the migration parameters, in MB/s.
        src.qmp.execute(
            "set-vcpu-dirty-limit",
            json!({"dirty-rate": (bytes >> 20).max(1)}),
        )?;
    }
    if postcopy {
        dst.qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "postcopy-blocktime", "state": true}]}),
        )?;
    }
    let uri = format!("tcp:{}:{}", net::dest_addr(), free_port()?);
    dst.qmp
        .execute("migrate-incoming", json!({"uri": uri.clone()}))?;
    cpu.start();
    let start = clock.as_ref().map(|c| c.now());
    src.qmp.execute("migrate", json!({"uri": uri}))?;
    let (q, converged) = {
        let q = std::cell::RefCell::new(&mut src.qmp);
        let mut switched = false;
        poll_migration(
            case.budget,
            Duration::from_millis(if postcopy { 20 } else { 100 }),
            || {
                let a = q.borrow_mut().execute("query-migrate", Value::Null)?;
                if !switched && switch_due(case.variant, &a) {
                    q.borrow_mut()
                        .execute("migrate-start-postcopy", Value::Null)?;
                    switched = true;
                }
                cpu.poll(&a);
                Ok(a)
            },
            || {
                q.borrow_mut()
                    .execute("migrate_cancel", Value::Null)
                    .map(|_| ())
            },
        )?
    };
    out.take_stats(&q);
    cpu.finish(out);
    out.converged = converged;
    if let (Some(c), Some(start)) = (&clock, start) {
        // A source that completed is paused (postmigrate): where its
        // writer stopped is in its memory.
        let position = if converged {
            dump(
                &mut src,
                dir,
                &[(0, case.end)],
                IncrementerCheck::new(case.end),
            )
            .ok()
            .and_then(|c| c.position())
        } else {
            None
        };
        let end = out.guest_end(start, position);
        out.take_guest_speed(case, &c.events(), start, end);
    }
    if postcopy {
        // QEMU's blocktime is the destination's figure.
        if let Ok(d) = dst.qmp.execute("query-migrate", Value::Null) {
            out.take_postcopy(&d);
        }
    }
    if let Variant::DirtyLimit(_) = case.variant {
        // QEMU 7.2's query-migrate says nothing of the dirty limit: its own
        // query gives the vCPU's measured dirty rate (MB/s).
        if let Ok(l) = src.qmp.execute("query-vcpu-dirty-limit", Value::Null) {
            let rates: Vec<String> = l
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "vCPU {} dirty rate {} MB/s (limit {})",
                        c["cpu-index"], c["current-rate"], c["limit-rate"]
                    )
                })
                .collect();
            if !rates.is_empty() {
                let at_end = format!("at the end: {}", rates.join(", "));
                out.note = if out.note.is_empty() {
                    at_end
                } else {
                    format!("{}; {at_end}", out.note)
                };
            }
        }
    }
    if !converged {
        if out.status == "cancelled" {
            let limit = std::mem::take(&mut out.note);
            out.note = format!(
                "did not converge within {:?} (figures as of the cancel)",
                case.budget
            );
            if !limit.is_empty() {
                out.note += &format!("; {limit}");
            }
        }
        return Ok(());
    }
    // The destination is paused (-S). Idle: compare its memory as it
    // arrived with the source's (SeaBIOS code that runs once the guest is
    // resumed changes a few bytes of its own data). Others: resume the
    // guest, let it run a second, pause it, check its invariant.
    let resume = |dst: &mut Vm| -> Result<()> {
        dst.qmp.execute("cont", Value::Null)?;
        std::thread::sleep(Duration::from_secs(1));
        let st = dst.qmp.execute("query-status", Value::Null)?;
        if st["status"] != "running" {
            bail!(
                "destination QEMU is {} after the migration, not running",
                st["status"]
            );
        }
        Ok(())
    };
    let check = match check_for(case) {
        Some(c) => {
            resume(&mut dst)?;
            dst.qmp.execute("stop", Value::Null)?;
            let regions = [(0, case.end)];
            let c = dump(&mut dst, dir, &regions, c)?;
            c.finish()
        }
        None => {
            let mtree = dst.qmp.execute(
                "human-monitor-command",
                json!({"command-line": "info mtree -f"}),
            )?;
            let regions = ram_ranges(mtree.as_str().unwrap_or(""));
            if regions.is_empty() {
                bail!("no pc.ram ranges in the destination's `info mtree -f`");
            }
            let d = dump(&mut dst, dir, &regions, DigestCheck::default())?.finish();
            let s = dump(&mut src, dir, &regions, DigestCheck::default())?.finish();
            resume(&mut dst)?;
            compare_digests(&s, &d)
        }
    };
    out.check = Some(check);
    let _ = src.qmp.execute("quit", Value::Null);
    let _ = dst.qmp.execute("quit", Value::Null);
    let _ = src.proc.wait_exit(Duration::from_secs(10));
    let _ = dst.proc.wait_exit(Duration::from_secs(10));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_come_from_the_flat_view() {
        let mtree = "\
FlatView #0
 AS \"memory\", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): pc.ram @00000000000c0000 KVM
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios KVM
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000 KVM
FlatView #1
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
";
        assert_eq!(
            ram_ranges(mtree),
            vec![
                (0, 0xa0000),
                (0xc0000, 0x20000),
                (0x100000, 0xbff0_0000),
                (0x1_0000_0000, 0x4000_0000)
            ]
        );
        assert!(ram_ranges("nothing here").is_empty());
    }

    #[test]
    fn command_line_has_kvm_the_cpu_fix_and_incoming() {
        let a = qemu_args(
            Path::new("/d.img"),
            1 << 30,
            Path::new("/q"),
            Path::new("/s"),
            true,
            true,
            Some(4096),
        )
        .join(" ");
        assert!(a.contains("-accel kvm,dirty-ring-size=4096"), "{a}");
        assert!(a.contains("-cpu host,-arch-capabilities"), "{a}");
        assert!(
            a.contains("-m 1024M") && a.contains("-incoming defer -S"),
            "{a}"
        );
        assert!(a.contains("-qmp unix:/q,server=on,wait=off"), "{a}");
        assert!(a.contains("-name harness,debug-threads=on"), "{a}");
        let b = qemu_args(
            Path::new("/d"),
            1 << 30,
            Path::new("/q"),
            Path::new("/s"),
            false,
            true,
            None,
        )
        .join(" ");
        assert!(!b.contains("incoming") && b.contains("-accel kvm "), "{b}");
    }
}
