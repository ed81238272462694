//! `livemig vm-migrate --local` and `livemig vm-incoming --local`:
//! zero-copy local migration of the reference VM. The source's guest
//! memory (memfd-backed) is handed to the destination process over a Unix
//! socket instead of copied (`livemig::engine::local`).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use livemig::engine::{MigrationError, MigrationHandle, MigrationMode};
use livemig::transport::local::{connect, LocalListener};
use livemig::transport::Uri;
use minivm::migrate::{migrate_out_local, receive_local, MigrateError};
use minivm::Vm;
use serde_json::json;

use crate::units::human;
use crate::vm::{
    check_kvm, self_check, start_source, warm_up, VmIncomingArgs, VmMigrateArgs, MIB,
    UNCONFIRMED_HINT,
};

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `livemig vm-migrate --local`.
pub fn vm_migrate(mut a: VmMigrateArgs) -> Result<()> {
    let uri: Uri = a.uri.parse()?;
    if !matches!(uri, Uri::Unix(_)) {
        bail!("--local hands memory descriptors to a process on this host: it needs a unix:PATH URI, not {uri}");
    }
    if a.tls.config()?.is_some() {
        bail!("--local stays on this host over a Unix socket: TLS does not apply");
    }
    let mut params = a.tune.params()?;
    params.mode = MigrationMode::Local;
    params.validate().map_err(anyhow::Error::msg)?;
    let say = !a.json;
    a.guest.memfd = true;
    let src = start_source(&a.layout, &a.guest, say)?;
    warm_up(&src, a.guest.warmup, say)?;
    if say {
        eprintln!(
            "local migration to {uri}: handing over {} of memfd-backed guest memory (nothing copied, no dirty tracking)",
            human(a.layout.mem)
        );
    }
    let sock = connect(&uri, a.io.io_timeout)?;
    let handle = MigrationHandle::new(params);
    let result = migrate_out_local(&src.vm, &handle, &sock);
    let at_stop = src.vm.guest_status();
    let sent = match result {
        Ok(s) => s,
        Err(e) => {
            let unconfirmed = matches!(e, MigrateError::Migration(MigrationError::Unconfirmed(_)));
            let mut text = livemig::error_chain(&e);
            if unconfirmed {
                text.push_str(UNCONFIRMED_HINT);
            } else if say {
                eprintln!(
                    "the guest runs on here: {} heartbeats",
                    at_stop.heartbeats()
                );
            }
            bail!("local migration failed: {text}");
        }
    };
    if a.json {
        let mut v = serde_json::to_value(&sent.stats)?;
        v["role"] = json!("source");
        v["mode"] = json!("local");
        v["uri"] = json!(uri.to_string());
        v["downtime-us"] = json!(us(sent.downtime));
        v["source-downtime-us"] = json!(us(sent.source_downtime));
        v["socket-bytes"] = json!({ "out": sent.bytes_out, "in": sent.bytes_in });
        v["files"] = json!(sent.files);
        v["guest"] = json!({
            "heartbeats-before": at_stop.heartbeats(),
            "pages-written": at_stop.pages_written(),
            "self-check": self_check(&at_stop),
            "failures": at_stop.failures(),
        });
        crate::jsonout::print(&v)?;
    } else {
        eprintln!(
            "local migration completed: downtime {:.2} ms (source's view {:.2} ms), {} of guest memory handed over in {} memfd{}, {} B through the socket ({} out, {} in), total {} ms",
            ms(sent.downtime),
            ms(sent.source_downtime),
            human(sent.stats.ram.total),
            sent.files,
            if sent.files == 1 { "" } else { "s" },
            sent.bytes_out + sent.bytes_in,
            sent.bytes_out,
            sent.bytes_in,
            sent.stats.total_time
        );
        eprintln!(
            "guest at the switch-over: {} heartbeats, {} pages written, self-check {}",
            at_stop.heartbeats(),
            at_stop.pages_written(),
            self_check(&at_stop)
        );
    }
    if !at_stop.ok() {
        bail!("the guest's self-check failed on the source: {at_stop:?}");
    }
    Ok(())
}

/// `livemig vm-incoming --local`.
pub fn vm_incoming(a: VmIncomingArgs) -> Result<()> {
    let uri: Uri = a.uri.parse()?;
    check_kvm()?;
    if a.json && a.seconds <= 0.0 {
        bail!("--json reports once the guest has run: give --seconds");
    }
    if a.tls.config()?.is_some() {
        bail!("--local stays on this host over a Unix socket: TLS does not apply");
    }
    let say = !a.json && !a.quiet;
    let listener = LocalListener::bind(&uri)?;
    // The VM exists before the source connects: creating it is not part
    // of the pause.
    let vm = Vm::new(a.layout.dest_config()).context("creating the destination VM")?;
    if a.announce {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listener.local_uri())?;
        out.flush()?;
    }
    if say {
        eprintln!(
            "destination VM ({}): waiting for a local migration on {uri}",
            a.layout.describe()
        );
    }
    let sock = listener.accept(a.io.io_timeout)?;
    // One migration: stop listening (removes the socket).
    drop(listener);
    let received =
        receive_local(&vm, &sock).with_context(|| format!("local migration from {uri}"))?;
    let resumed = Instant::now();
    if let Some(rate) = a.dirty_rate {
        vm.set_rate(rate);
    }
    let before = vm.guest_status();
    if say {
        eprintln!(
            "took over {} of guest memory in {} memfd{} (nothing copied), {} B of vCPU/device state, {} B read from the socket; guest resumed ({} pages written before the switch-over)",
            human(received.memory),
            received.files,
            if received.files == 1 { "" } else { "s" },
            received.state_bytes,
            received.socket_bytes,
            before.pages_written()
        );
    }
    let mut last = before.clone();
    let mut last_t = Instant::now();
    loop {
        let left = if a.seconds > 0.0 {
            a.seconds - resumed.elapsed().as_secs_f64()
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
    let after = vm.guest_status();
    let ran = resumed.elapsed().as_secs_f64();
    let advanced =
        after.heartbeats() > before.heartbeats() && after.pages_written() > before.pages_written();
    if a.json {
        crate::jsonout::print(&json!({
            "role": "destination",
            "status": "completed",
            "mode": "local",
            "uri": uri.to_string(),
            "load-time-us": us(received.load_time),
            "memory": received.memory,
            "files": received.files,
            "state-bytes": received.state_bytes,
            "socket-bytes": received.socket_bytes,
            "ran-seconds": ran,
            "guest": {
                "heartbeats": after.heartbeats(),
                "pages-written-before": before.pages_written(),
                "pages-written": after.pages_written(),
                "write-rate": ((after.pages_written() - before.pages_written()) as f64 * 4096.0 / ran) as u64,
                "self-check": self_check(&after),
                "failures": after.failures(),
                "errors": after.errors,
            },
        }))?;
    } else if !a.quiet {
        eprintln!(
            "guest on the destination: {} heartbeats, pages written {} -> {}, self-check {} ({} failures)",
            after.heartbeats(),
            before.pages_written(),
            after.pages_written(),
            self_check(&after),
            after.failures()
        );
    }
    if !after.ok() {
        bail!("the guest's self-check failed on the destination: {after:?}");
    }
    if !advanced {
        bail!("the guest made no progress on the destination: {before:?} -> {after:?}");
    }
    Ok(())
}
