//! `livemig vm-migrate --local` and `livemig vm-incoming --local`:
//! zero-copy local migration of the reference VM. The source's guest
//! memory (memfd-backed) is handed to the destination process over a Unix
//! socket instead of copied (`livemig::engine::local`).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livemig::engine::{MigrationError, MigrationHandle, MigrationMode};
use livemig::transport::local::{connect, LocalListener};
use livemig::transport::Uri;
use minivm::migrate::{migrate_out_local, receive_local, MigrateError};
use minivm::Vm;
use serde_json::json;

use crate::units::human;
use crate::vm::{
    check_kvm, guest_json, self_check, start_source, warm_up, VmIncomingArgs, VmMigrateArgs,
    UNCONFIRMED_HINT,
};

/// Refuses, naming the flag, a setting local mode cannot honour (no page
/// travels, so nothing shapes how pages travel).
fn refuse_unsupported(params: &livemig::engine::Params, tls: bool) -> Result<()> {
    use livemig::engine::local::{check_params, LocalError, LocalUnsupported as U};
    let u = match (tls, check_params(params)) {
        (true, _) => U::Tls,
        (false, Err(u)) => u,
        (false, Ok(())) => return Ok(()),
    };
    let flag = match u {
        U::Channels(n) => format!("--channels {n}"),
        U::Compression => "--compress".into(),
        U::Xbzrle => "--xbzrle".into(),
        U::PostcopyRam => "--postcopy".into(),
        U::PostcopyPreempt => "--postcopy-preempt".into(),
        U::Tls => "--tls-dir (TLS)".into(),
    };
    bail!(
        "--local cannot be combined with {flag}: {}",
        LocalError::Unsupported(u)
    )
}

/// Whether any `--tls-*` flag was given (refused before the files are read).
fn tls_given(t: &crate::tls::TlsArgs) -> bool {
    t.tls_dir.is_some() || t.tls_ca.is_some() || t.tls_cert.is_some() || t.tls_key.is_some()
}

/// Refuses the destination flags local mode cannot honour.
fn refuse_incoming(postcopy: bool, lazy: bool, tls: bool) -> Result<()> {
    let p = livemig::engine::Params {
        postcopy_ram: postcopy,
        ..Default::default()
    };
    refuse_unsupported(&p, tls)?;
    if lazy {
        bail!("--local cannot be combined with --lazy: a local migration maps the source's memory, there is no file to restore from");
    }
    Ok(())
}

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
    let mut params = a.tune.params()?;
    refuse_unsupported(
        &params,
        tls_given(&a.tls.tls) || a.tls.tls_server_name.is_some(),
    )?;
    if a.snapshot.wanted() {
        bail!(
            "--local hands memory to a live process: the snapshot flags (file: only) do not apply"
        );
    }
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
    refuse_incoming(a.postcopy, a.snapshot.lazy, tls_given(&a.tls))?;
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
    let (after, ran) = crate::vm::run_on(&vm, &before, a.seconds, say)?;
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
            "guest": guest_json(&before, &after, ran),
        }))?;
    }
    crate::vm::judge_received(&before, &after, !a.json && !a.quiet)
}

/// Process memory as the destination of a local migration.
struct ProcessGuest<'a>(&'a livemig::ProcessMemory);

impl livemig::engine::local::LocalGuest for ProcessGuest<'_> {
    fn layout(&self) -> Vec<(String, u64)> {
        use livemig::GuestMemory;
        self.0
            .blocks()
            .iter()
            .map(|b| (b.id().to_string(), b.len()))
            .collect()
    }

    fn adopt(
        &mut self,
        blocks: &[livemig::engine::local::SharedBlock],
        _state: &[u8],
    ) -> Result<(), livemig::vm::BoxError> {
        Ok(livemig::engine::local::adopt_memory(self.0, blocks)?)
    }

    fn discard(&mut self) {
        use livemig::GuestMemory;
        livemig::engine::local::release_memory(self.0, self.0.blocks().len());
    }

    fn resume(&mut self) -> Result<(), livemig::vm::BoxError> {
        Ok(())
    }
}

/// `livemig migrate --local`: process memory (memfds) written by the
/// workload, handed over instead of copied.
pub fn migrate(a: crate::process::MigrateArgs) -> Result<()> {
    let uri: Uri = a.uri.parse()?;
    let o = &a.opts;
    let wl = &o.workload;
    let mut params = o.tune.params()?;
    refuse_unsupported(
        &params,
        tls_given(&a.tls.tls) || a.tls.tls_server_name.is_some(),
    )?;
    params.mode = MigrationMode::Local;
    let mem = o.mem.map_memfd()?;
    crate::process::fill(&mem, wl.fill);
    let workload = wl.start(&mem);
    let blocks = livemig::engine::local::shared_blocks(&mem)?;
    let sock = connect(&uri, o.io.io_timeout)?;
    let handle = MigrationHandle::new(params);
    let mut no_vm = livemig::vm::NoVm;
    let mut control = workload
        .as_ref()
        .map(livemig::testkit::workload::Workload::control);
    let vm: &mut dyn livemig::vm::VmControl = match control.as_mut() {
        Some(c) => c,
        None => &mut no_vm,
    };
    let result = livemig::engine::local::migrate(&sock, &blocks, vm, &handle);
    // Paused for good after success: the memory as handed over.
    let digest = result
        .as_ref()
        .ok()
        .map(|_| livemig::engine::hex(&livemig::engine::memory_digest(&mem)));
    drop(workload);
    let sent = match result {
        Ok(s) => s,
        Err(e @ MigrationError::Unconfirmed(_)) => bail!("{e}{UNCONFIRMED_HINT}"),
        Err(e) => bail!("local migration failed: {}", livemig::error_chain(&e)),
    };
    if o.json {
        let mut v = serde_json::to_value(&sent.stats)?;
        v["role"] = json!("source");
        v["mode"] = json!("local");
        v["uri"] = json!(uri.to_string());
        v["digest"] = json!(digest);
        v["downtime-us"] = json!(us(sent.downtime));
        v["socket-bytes"] = json!({ "out": sent.bytes_out, "in": sent.bytes_in });
        crate::jsonout::print(&v)?;
    } else {
        eprintln!(
            "local migration completed: downtime {:.2} ms, {} handed over in {} memfd{}, {} B through the socket",
            ms(sent.downtime),
            human(sent.stats.ram.total),
            sent.files,
            if sent.files == 1 { "" } else { "s" },
            sent.bytes_out + sent.bytes_in
        );
        if let Some(d) = &digest {
            eprintln!("memory digest at the hand-over: {d}");
        }
    }
    Ok(())
}

/// `livemig incoming --local`: maps the source's memory and reports its
/// digest (the same memory: the same digest as the source's).
pub fn incoming(a: crate::process::IncomingArgs) -> Result<()> {
    let uri: Uri = a.uri.parse()?;
    let o = &a.opts;
    refuse_incoming(o.postcopy, o.snapshot.lazy, tls_given(&a.tls))?;
    let mem = o.mem.map()?;
    let listener = LocalListener::bind(&uri)?;
    // On stderr even with --json: scripts wait for this line.
    eprintln!("waiting for a local migration on {uri}");
    let sock = listener.accept(o.io.io_timeout)?;
    drop(listener);
    let r = livemig::engine::local::receive(&sock, &mut ProcessGuest(&mem))
        .with_context(|| format!("local migration from {uri}"))?;
    let digest = livemig::engine::hex(&livemig::engine::memory_digest(&mem));
    if o.json {
        crate::jsonout::print(&json!({
            "role": "destination",
            "status": "completed",
            "mode": "local",
            "uri": uri.to_string(),
            "memory": r.memory,
            "files": r.files,
            "socket-bytes": r.socket_bytes,
            "load-time-us": us(r.load_time),
            "digest": digest,
        }))?;
    } else {
        eprintln!(
            "took over {} in {} memfd{} ({} B read from the socket, nothing copied); memory digest {digest}",
            human(r.memory),
            r.files,
            if r.files == 1 { "" } else { "s" },
            r.socket_bytes
        );
    }
    Ok(())
}
