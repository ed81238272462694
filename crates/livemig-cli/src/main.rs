//! `livemig`: live-migrate guest memory between processes, save it to a
//! file and load it back, and run the reference VM demo.

mod bench;
mod control;
mod dirtyrate;
mod jsonout;
mod process;
mod report;
mod svg;
mod tls;
mod units;
mod vm;

use clap::{Parser, Subcommand};

/// Live migration of virtual machine memory.
#[derive(Parser)]
#[command(name = "livemig", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a workload that writes a memory region and migrate it live to an
    /// `incoming` process (tcp:HOST:PORT, unix:PATH) or a snapshot file
    /// (file:PATH).
    Migrate(process::MigrateArgs),
    /// Receive a migration into a memory region of the same layout, check
    /// it against the source's digest, and report.
    Incoming(process::IncomingArgs),
    /// Save a running workload's memory to a snapshot file (migrate to file:).
    Save(process::SaveArgs),
    /// Load a snapshot file into memory and check its digest.
    Load(process::LoadArgs),
    /// Measure livemig against memcpy and loopback sockets in one run:
    /// page codecs, idle-guest migration throughput, XBZRLE off vs on.
    Bench(bench::BenchArgs),
    /// Start a VM running the built-in self-checking guest, start a
    /// destination VM in a second process, migrate the running guest live
    /// over loopback TCP and show it running on the destination.
    Demo(vm::DemoArgs),
    /// Start a VM with the built-in guest and migrate it live to a
    /// `vm-incoming` process (tcp:HOST:PORT, unix:PATH) or save a snapshot
    /// of it (file:PATH).
    VmMigrate(vm::VmMigrateArgs),
    /// Receive a VM (or restore a file: snapshot), resume its guest, run it
    /// and report its heartbeats and self-check.
    VmIncoming(vm::VmIncomingArgs),
    /// Start a VM with the built-in guest and measure how fast it dirties
    /// memory for N seconds without migrating (per vCPU with the dirty ring).
    Dirtyrate(dirtyrate::DirtyRateArgs),
    /// Send one command to a control socket (`minivm run --control PATH`)
    /// and print the JSON answer: query-migrate, migrate, migrate-incoming,
    /// migrate-set-parameters, migrate-cancel, ... (see the README).
    Control(control::ControlArgs),
    /// Make a CA and one certificate per peer for `--tls-dir` (encrypted,
    /// mutually authenticated migration).
    TlsKeygen(tls::KeygenArgs),
}

/// Whether the command was asked for `--json`.
fn wants_json(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Migrate(a) => a.opts.json,
        Cmd::Incoming(a) => a.opts.json,
        Cmd::Save(a) => a.opts.json,
        Cmd::Load(a) => a.opts.json,
        Cmd::Bench(a) => a.json,
        Cmd::Dirtyrate(a) => a.json,
        Cmd::VmMigrate(a) => a.json,
        Cmd::VmIncoming(a) => a.json,
        Cmd::Demo(a) => a.json,
        _ => false,
    }
}

fn main() {
    let cli = Cli::parse();
    let json = wants_json(&cli.cmd);
    let result = match cli.cmd {
        Cmd::Migrate(a) => process::migrate(a),
        Cmd::Incoming(a) => process::incoming(a),
        Cmd::Save(a) => process::save(a),
        Cmd::Load(a) => process::load(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Demo(a) => vm::demo(a),
        Cmd::VmMigrate(a) => vm::vm_migrate(a),
        Cmd::VmIncoming(a) => vm::vm_incoming(a),
        Cmd::Dirtyrate(a) => dirtyrate::dirtyrate(a),
        Cmd::Control(a) => control::control(a),
        Cmd::TlsKeygen(a) => tls::keygen(a),
    };
    if let Err(e) = result {
        let chain = livemig::error_chain(e.as_ref());
        if json {
            jsonout::print_failure(&chain);
        }
        eprintln!("livemig: error: {chain}");
        std::process::exit(1);
    }
}
