//! `livemig`: live-migrate guest memory between processes, save it to a
//! file and load it back, and run the reference VM demo.

mod bench;
mod control;
mod dirtyrate;
mod jsonout;
mod local;
mod process;
mod recovery;
mod report;
mod snapshot;
mod svg;
#[allow(unsafe_code)]
mod sys;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cmd {
        let mut argv = vec!["livemig"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("arguments parse").cmd
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The VM commands start the VM `minivm run` starts by default.
    #[test]
    fn vm_defaults_are_minivms() {
        let Cmd::VmMigrate(a) = parse(&["vm-migrate", "tcp:127.0.0.1:1"]) else {
            unreachable!()
        };
        assert_eq!(Ok(a.layout.mem), units::parse_size(minivm::defaults::MEM));
        assert_eq!(a.layout.vcpus, minivm::defaults::VCPUS);
        let rate = units::parse_size(minivm::defaults::DIRTY_RATE);
        assert_eq!(Ok(a.guest.dirty_rate), rate);
        assert_eq!(a.guest.dirty_ring, minivm::defaults::DIRTY_RING);
    }

    /// One name per setting; the old names stay as hidden aliases.
    #[test]
    fn old_spellings_still_parse() {
        let Cmd::Migrate(old) =
            parse(&["migrate", "file:/x", "--size", "32M", "--tracker", "sync"])
        else {
            unreachable!()
        };
        let Cmd::Migrate(new) =
            parse(&["migrate", "file:/x", "-m", "32M", "--dirty-track", "sync"])
        else {
            unreachable!()
        };
        assert_eq!(old.opts.mem.size, 32 << 20);
        assert_eq!(old.opts.mem.size, new.opts.mem.size);
        assert_eq!(old.opts.workload.tracker, new.opts.workload.tracker);
        let Cmd::VmMigrate(a) = parse(&["vm-migrate", "file:/x", "--size", "64M", "--rate", "8M"])
        else {
            unreachable!()
        };
        assert_eq!((a.layout.mem, a.guest.dirty_rate), (64 << 20, 8 << 20));
        let Cmd::Bench(b) = parse(&["bench", "--size", "16M", "--xbzrle-size", "8M"]) else {
            unreachable!()
        };
        assert_eq!((b.size, b.xbzrle_size), (Some(16 << 20), Some(8 << 20)));
    }
}
