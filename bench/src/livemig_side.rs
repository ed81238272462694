//! The livemig side: two minivm processes (a source running the boot
//! sector, an incoming destination) on loopback TCP, driven over livemig's
//! control socket.
//!
//! The same code drives a baseline build (`--baseline`, system
//! `livemig-base`). Builds from before the control socket spoke QMP
//! (before commit 7a7eb1b) greet with `{"livemig": ...}`, take one JSON
//! request per line without `qmp_capabilities`, and know fewer names:
//! capability `verify` (not `x-livemig-verify`), no `multifd`, `postcopy-*`
//! or `dirty-limit` capabilities, parameters `channels` and `dirty-limit`
//! (bytes/s) instead of `multifd-channels` and `vcpu-dirty-limit`, and the
//! minivm flag `--migrate-tracker` instead of `--dirty-track`. [`Control`]
//! notices the old greeting and the set-up below speaks that dialect; the
//! rest (minivm's `run` flags, `query-migrate`'s figures) is the same.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livemig::control::ControlClient;
use serde_json::{json, Value};

use crate::guest::{self, compare_digests, DigestCheck, IncrementerCheck};
use crate::net::{self, Side};
use crate::run::{
    check_for, free_port, mkfifo, pass_clock, poll_migration, switch_due, wait_marker, wait_ready,
    Case, CpuWatch, DumpReader, Outcome, Proc, Switch, Variant,
};

/// A control connection: QMP, or the line protocol of builds from before
/// QMP (a baseline).
enum Control {
    Qmp(ControlClient),
    Legacy(BufReader<UnixStream>),
}

impl Control {
    fn connect(path: &Path) -> Result<Control> {
        match ControlClient::connect(path) {
            Ok(c) => Ok(Control::Qmp(c)),
            Err(livemig::control::ControlError::Protocol(g)) if g.contains("\"livemig\"") => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut r = BufReader::new(s);
                let mut greeting = String::new();
                r.read_line(&mut greeting)?;
                Ok(Control::Legacy(r))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn legacy(&self) -> bool {
        matches!(self, Control::Legacy(_))
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let r = match self {
            Control::Qmp(c) => return Ok(c.execute(cmd, args)?),
            Control::Legacy(r) => r,
        };
        let mut req = json!({ "execute": cmd });
        if !args.is_null() {
            req["arguments"] = args;
        }
        writeln!(r.get_mut(), "{req}")?;
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("the control socket closed");
        }
        let mut ans: Value = serde_json::from_str(&line)?;
        if let Some(v) = ans.get_mut("return") {
            return Ok(v.take());
        }
        bail!("{}", ans["error"]["desc"].as_str().unwrap_or(line.trim()))
    }
}

fn connect(path: &Path, proc: &mut Proc) -> Result<Control> {
    let t0 = std::time::Instant::now();
    loop {
        match Control::connect(path) {
            Ok(c) => return Ok(c),
            Err(e) => {
                if let Some(st) = proc.exited() {
                    bail!(
                        "minivm exited ({st}) before serving {}: {}",
                        path.display(),
                        proc.log_tail()
                    );
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    bail!("control socket {}: {e}", path.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn exec(c: &mut Control, path: &Path, cmd: &str, args: Value) -> Result<Value> {
    c.execute(cmd, args)
        .with_context(|| format!("control command {cmd} on {}", path.display()))
}

/// Runs `case` with livemig + minivm (binary `minivm`) in `dir`, as
/// `system` ("livemig", or "livemig-base" for a baseline build).
pub fn run(case: &Case, dir: &Path, minivm: &Path, system: &str) -> Outcome {
    let mut out = Outcome {
        system: system.into(),
        ran: true,
        ..Default::default()
    };
    if let Err(e) = run_inner(case, dir, minivm, &mut out) {
        out.record_error(&e);
    }
    out
}

fn run_inner(case: &Case, dir: &Path, minivm: &Path, out: &mut Outcome) -> Result<()> {
    let sector_path = dir.join("sector.bin");
    let sector = case.sector();
    std::fs::write(&sector_path, sector)?;
    let mem = format!("{}M", case.mem >> 20);
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let (src_serial, dst_serial) = (dir.join("src.serial"), dir.join("dst.serial"));
    let (src_fifo, dst_fifo) = (dir.join("src.fifo"), dir.join("dst.fifo"));
    mkfifo(&dst_fifo)?;
    let idle = check_for(case).is_none();
    // Idle: both memories are compared whole; others: [0, end).
    let dump_size = if idle { case.mem } else { case.end };

    let mut cmd = net::command(Side::Dst, minivm);
    cmd.args(["run", "--incoming", "--no-progress-check", "--mem", &mem])
        .args(["--vcpus", "1", "--seconds", "1"])
        .arg("--control")
        .arg(&dst_sock)
        .arg("--serial")
        .arg(&dst_serial)
        .arg("--dump")
        .arg(format!("0:{dump_size}:{}", dst_fifo.display()));
    let mut dst = Proc::spawn("minivm destination", cmd, &dir.join("dst.log"))?;

    let mut cmd = net::command(Side::Src, minivm);
    cmd.args(["run", "--mem", &mem, "--vcpus", "1"])
        .arg("--boot-sector")
        .arg(&sector_path)
        .arg("--control")
        .arg(&src_sock)
        .arg("--serial")
        .arg(&src_serial);
    if let Variant::DirtyLimit(_) = case.variant {
        // The flag's name before #11 (a baseline build) was --migrate-tracker.
        let flag = if legacy_minivm(minivm) {
            "--migrate-tracker"
        } else {
            "--dirty-track"
        };
        cmd.args(["--dirty-ring", "65536", flag, "ring"]);
    }
    let clock = pass_clock(case, &src_serial);
    if idle || clock.is_some() {
        // Idle: the source's memory is compared whole; the incrementer:
        // where its writer stopped (the guest's speed).
        mkfifo(&src_fifo)?;
        cmd.arg("--dump")
            .arg(format!("0:{dump_size}:{}", src_fifo.display()));
    }
    let mut src = Proc::spawn("minivm source", cmd, &dir.join("src.log"))?;
    let src_reader = idle.then(|| {
        DumpReader::start(
            vec![(src_fifo.clone(), 0, dump_size)],
            DigestCheck::default(),
        )
    });
    let src_position = clock.is_some().then(|| {
        DumpReader::start(
            vec![(src_fifo.clone(), 0, dump_size)],
            IncrementerCheck::new(case.end),
        )
    });

    let mut dc = connect(&dst_sock, &mut dst)?;
    let mut sc = connect(&src_sock, &mut src)?;
    wait_marker(
        &src_serial,
        &case.ready_marker(),
        &mut src,
        case.boot_budget,
    )?;
    let mut cpu = CpuWatch::new(
        src.pid(),
        clock.is_some() && !matches!(case.variant, Variant::Postcopy(_)),
    );
    cpu.ready();
    wait_ready(case, clock.as_ref(), case.boot_budget)?;

    let postcopy = matches!(case.variant, Variant::Postcopy(_));
    if sc.legacy() {
        if postcopy {
            bail!("this baseline build predates postcopy");
        }
        legacy_setup(case, &mut sc, &src_sock)?;
    } else {
        setup(case, &mut sc, &src_sock, &mut dc, &dst_sock)?;
    }
    let uri = format!("tcp:{}:{}", net::dest_addr(), free_port()?);
    exec(
        &mut dc,
        &dst_sock,
        "migrate-incoming",
        json!({"uri": uri.clone()}),
    )?;
    let dst_reader = DumpReader::start(
        vec![(dst_fifo.clone(), 0, dump_size)],
        check_for(case).ok_or_else(DigestCheck::default),
    );
    cpu.start();
    let start = clock.as_ref().map(|c| c.now());
    exec(&mut sc, &src_sock, "migrate", json!({"uri": uri}))?;
    let (q, converged) = {
        let c = std::cell::RefCell::new(&mut sc);
        let mut switched = false;
        // minivm's source exits within a second of completing (its
        // socket with it): polling often keeps the chance of missing
        // "completed" in that window, and losing the final figures, small.
        poll_migration(
            case.budget,
            Duration::from_millis(10),
            || {
                let q = exec(&mut c.borrow_mut(), &src_sock, "query-migrate", Value::Null)?;
                if !switched && switch_due(case.variant, &q) {
                    exec(
                        &mut c.borrow_mut(),
                        &src_sock,
                        "migrate-start-postcopy",
                        Value::Null,
                    )?;
                    switched = true;
                }
                cpu.poll(&q);
                Ok(q)
            },
            || {
                exec(
                    &mut c.borrow_mut(),
                    &src_sock,
                    "migrate-cancel",
                    Value::Null,
                )
                .map(|_| ())
            },
        )
        .map_err(|e| match src.exited() {
            Some(st) => e.context(format!(
                "the source minivm exited ({st}) before the harness saw the migration end: {}",
                src.log_tail()
            )),
            None => e,
        })?
    };
    out.take_stats(&q);
    cpu.finish(out);
    if let Some(path) = std::env::var_os("LIVEMIG_HARNESS_TRACE") {
        // Diagnostics: the last query-migrate of every livemig run, one
        // JSON line each (scenario, variant, system, reply).
        use std::io::Write as _;
        let line = json!({
            "scenario": case.scenario,
            "variant": case.variant_label(),
            "system": out.system,
            "query": q,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    out.converged = converged;
    if let (Some(c), Some(start)) = (&clock, start) {
        // A source that completed pauses and dumps its memory, then exits.
        let position = src_position.filter(|_| converged).and_then(|r| {
            let (check, res) = r.finish(Duration::from_secs(120));
            res.ok().and_then(|()| check.position())
        });
        let end = out.guest_end(start, position);
        out.take_guest_speed(case, &c.events(), start, end);
    }
    if !converged {
        if out.status == "cancelled" {
            out.note = format!(
                "did not converge within {:?} (figures as of the cancel)",
                case.budget
            );
        }
        return Ok(());
    }
    // The destination resumes the guest, runs it for a second, pauses it
    // and dumps its memory, then exits.
    let (sink, r) = dst_reader.finish(Duration::from_secs(120));
    r.with_context(|| format!("destination dump; minivm log: {}", dst.log_tail()))?;
    let st = dst.wait_exit(Duration::from_secs(60))?;
    if !st.success() {
        bail!("minivm destination failed ({st}): {}", dst.log_tail());
    }
    let check = match sink {
        Ok(c) => c.finish(),
        Err(d) => {
            let (s, r) = src_reader
                .expect("idle dumps the source")
                .finish(Duration::from_secs(120));
            r.with_context(|| format!("source dump; minivm log: {}", src.log_tail()))?;
            compare_digests(&s.finish(), &d.finish())
        }
    };
    out.check = Some(check);
    Ok(())
}

/// Capabilities and parameters, in QMP's names.
fn setup(
    case: &Case,
    sc: &mut Control,
    src_sock: &Path,
    dc: &mut Control,
    dst_sock: &Path,
) -> Result<()> {
    let postcopy = matches!(case.variant, Variant::Postcopy(_));
    let preempt = matches!(case.variant, Variant::Postcopy(s) if s.preempt());
    let pc_channels = case.variant == Variant::Postcopy(Switch::AutoChannels);
    if postcopy {
        exec(
            dc,
            dst_sock,
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "postcopy-ram", "state": true},
                {"capability": "postcopy-preempt", "state": preempt},
            ]}),
        )?;
    }
    exec(
        sc,
        src_sock,
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "postcopy-ram", "state": postcopy},
            {"capability": "postcopy-preempt", "state": preempt},
            {"capability": "xbzrle", "state": case.variant == Variant::Xbzrle},
            {"capability": "auto-converge", "state": case.variant == Variant::AutoConverge},
            {"capability": "x-livemig-verify", "state": false},
            {"capability": "multifd", "state": matches!(case.variant, Variant::Channels(_)) || pc_channels},
            {"capability": "dirty-limit", "state": matches!(case.variant, Variant::DirtyLimit(_))},
        ]}),
    )?;
    // QMP's units: vcpu-dirty-limit in MB/s.
    let dirty_limit_mb = match case.variant {
        Variant::DirtyLimit(b) => (b >> 20).max(1),
        _ => 1,
    };
    let channels = match case.variant {
        Variant::Channels(n) => n,
        _ => 2,
    };
    let mut params = json!({
        "max-bandwidth": case.max_bandwidth,
        "downtime-limit": case.downtime_ms,
        "xbzrle-cache-size": case.xbzrle_cache,
        "vcpu-dirty-limit": dirty_limit_mb,
        "multifd-channels": channels,
    });
    if let Some(p) = params.as_object_mut() {
        p.extend(case.throttle_params());
        if matches!(case.variant, Variant::Postcopy(s) if s.is_auto()) {
            p.insert("x-livemig-postcopy-switchover".into(), "auto".into());
        }
    }
    exec(sc, src_sock, "migrate-set-parameters", params)?;
    Ok(())
}

/// Capabilities and parameters in the names of a build from before QMP
/// (see the module doc).
fn legacy_setup(case: &Case, sc: &mut Control, src_sock: &Path) -> Result<()> {
    exec(
        sc,
        src_sock,
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "xbzrle", "state": case.variant == Variant::Xbzrle},
            {"capability": "auto-converge", "state": case.variant == Variant::AutoConverge},
            {"capability": "verify", "state": false},
        ]}),
    )?;
    let dirty_limit = match case.variant {
        Variant::DirtyLimit(b) => b,
        _ => 0,
    };
    let channels = match case.variant {
        Variant::Channels(n) => n,
        _ => 1,
    };
    let mut params = json!({
        "max-bandwidth": case.max_bandwidth,
        "downtime-limit": case.downtime_ms,
        "xbzrle-cache-size": case.xbzrle_cache,
        "dirty-limit": dirty_limit,
        "channels": channels,
    });
    if let Some(p) = params.as_object_mut() {
        p.extend(case.throttle_params());
    }
    exec(sc, src_sock, "migrate-set-parameters", params)?;
    Ok(())
}

/// True for a minivm from before #11's flag names (`--migrate-tracker`).
fn legacy_minivm(minivm: &Path) -> bool {
    std::process::Command::new(minivm)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--migrate-tracker"))
}

impl crate::run::Feed for std::result::Result<Box<dyn guest::MemCheck>, DigestCheck> {
    fn feed(&mut self, addr: u64, chunk: &[u8]) {
        match self {
            Ok(c) => c.feed(addr, chunk),
            Err(d) => d.feed(addr, chunk),
        }
    }
}
