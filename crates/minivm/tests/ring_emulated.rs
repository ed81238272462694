//! The dirty ring's emulated-code check. On kvm_pvm hosts the host emulates
//! ring-0 and real-mode guest code and can drop dirty-ring entries when a
//! ring fills meanwhile (HOST-NOTES). livemig's ring tracker must then
//! refuse the log: the migration fails cleanly, the source guest runs on,
//! the destination never runs it — never a migration with lost pages.
//!
//! The guest is the boot-sector incrementer (real mode: emulated), which
//! dirties 32,256 distinct pages per pass: a 4096-entry ring fills within
//! every pass.
mod common;

use std::io::Read;
use std::time::Duration;

use livemig::engine::{MigrationError, MigrationHandle, Params};
use minivm::guest::boot_incrementer;
use minivm::migrate::{migrate_out, MigrateError};
use minivm::{GuestImage, TrackerKind, Vm, VmConfig};

const MEM: u64 = 128 << 20;
/// How long one pass of the incrementer may take. The host emulates it
/// (real mode): ~12 s for 128 MiB on a quiet host, over 30 s seen on a
/// loaded one; the wait ends as soon as the pass does.
const PASS_WAIT: Duration = Duration::from_secs(120);

/// Prints livemig's warnings (lost ring entries, a stopped vCPU's ring
/// released) to the test's output: what the host did in a failing run.
struct Warnings;

impl log::Log for Warnings {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn && m.target().starts_with("livemig")
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{}: {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

#[test]
fn ring_filled_while_emulated_is_refused_and_the_source_runs_on() {
    // Three attempts on the same VM: the host can overfill a ring while it
    // emulates the guest (kvm_pvm), leaving entries it never publishes; a
    // later attempt, and the guest itself, must not be stuck on them.
    refusals(
        "ring_filled_while_emulated_is_refused_and_the_source_runs_on",
        3,
    );
}

/// The same, 40 attempts in a row: a stopped vCPU's ring is released again
/// and again (run it with load on the host, where the flake showed).
#[test]
#[ignore = "a stress run: cargo test -p minivm --test ring_emulated -- --ignored"]
fn many_refusals_leave_the_source_running() {
    refusals("many_refusals_leave_the_source_running", 40);
}

fn refusals(test: &str, attempts: u32) {
    if !common::kvm_available(test) {
        return;
    }
    if log::set_logger(&Warnings).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let cfg = VmConfig {
        mem_size: MEM,
        guest: GuestImage::BootSector(boot_incrementer(MEM as u32)),
        dirty_ring_entries: Some(4096),
        ..VmConfig::default()
    };
    let src = Vm::new(cfg.clone()).unwrap();
    assert!(
        common::wait_bootinc_passes(&src, 1, PASS_WAIT) >= 1,
        "the incrementer runs"
    );
    for attempt in 1..=attempts {
        refused_attempt(&src, &cfg, attempt);
    }
    eprintln!(
        "ring entries the host lost and livemig recycled: {}",
        src.guest_status().dirty_ring_lost
    );
}

fn refused_attempt(src: &Vm, cfg: &VmConfig, attempt: u32) {
    let (w, mut ar, dest) = common::pipe_destination(cfg);
    let handle = MigrationHandle::new(Params {
        verify: true,
        // Generous limits: only the tracker's refusal may end this migration.
        downtime_limit: 3000,
        // But the bulk stage takes about 2 s: unthrottled, it once ended in
        // under 0.5 s on a loaded host, before the starved guest filled its
        // ring, and the migration completed (verified) instead.
        max_bandwidth: 64 << 20,
        auto_converge: true,
        ..Params::default()
    });
    let err = migrate_out(
        src,
        TrackerKind::Ring,
        handle,
        w,
        Some(&mut ar as &mut dyn Read),
    )
    .expect_err("a ring that filled while the host emulated the guest must be refused");
    let msg = livemig::error_chain(&err);
    eprintln!("attempt {attempt}: refused: {msg}");
    assert!(
        matches!(err, MigrateError::Migration(MigrationError::Tracker(_))),
        "the tracker refused: {err:?}"
    );
    assert!(msg.contains("emulated guest code"), "{msg}");
    // The ring did fill, in this attempt or an earlier one (a harvest that
    // finds it nearly full also counts, without either of these): the vCPU
    // exited on it, or the host overfilled it within one emulated stretch
    // and entries were lost without an exit (seen once in 25 runs).
    let s = src.guest_status();
    let exits: u64 = s.vcpus.iter().map(|v| v.ring_full_exits).sum();
    assert!(
        exits > 0 || s.dirty_ring_lost > 0,
        "the ring did fill: {exits} ring-full exits, {} entries lost",
        s.dirty_ring_lost
    );

    // The source runs on: not paused, and it keeps incrementing.
    assert!(!src.is_paused(), "the source VM was left paused");
    let p = common::bootinc_passes(src);
    if common::wait_bootinc_passes(src, p + 1, PASS_WAIT) <= p {
        // What the vCPUs do meanwhile: stopped on a full ring again and
        // again (ring-full exits climbing), or stuck elsewhere.
        let a = src.guest_status();
        std::thread::sleep(Duration::from_secs(1));
        let b = src.guest_status();
        panic!(
            "the source guest did not advance after refusal {attempt} (still at pass {p}): \
             status {a:?}; a second later {b:?}"
        );
    }
    assert!(
        src.guest_status().errors.is_empty(),
        "{:?}",
        src.guest_status()
    );

    // The destination never got a guest to run.
    let d = dest.join().unwrap();
    assert!(d.is_err(), "the destination must not accept the migration");
    eprintln!("destination: {}", livemig::error_chain(&d.err().unwrap()));
}
