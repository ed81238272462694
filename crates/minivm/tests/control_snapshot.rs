//! Snapshot files and local mode through livemig's control socket, with
//! QEMU's names: `migrate file:PATH` with the `mapped-ram` or
//! `background-snapshot` capability, `migrate-incoming file:PATH` eager
//! and lazy (`x-livemig-lazy`), a damaged chunk failing a lazy restore,
//! and local mode refusing what it cannot do. Real KVM guests, anonymous
//! and memfd-backed memory.

mod common;

use common::{exec, ok};

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use livemig::control::{ControlClient, ControlServer};
use livemig::engine::memory_digest;
use livemig::engine::Params;
use livemig::snapshot::MappedRamFile;
use minivm::control::{ControlledVm, Phase};
use minivm::{GuestImage, TrackerKind, Vm, VmConfig};

const MEM_MIB: u64 = 64;

fn source_config(memfd: bool) -> VmConfig {
    VmConfig {
        prefault: true,
        memfd,
        ram_blocks: 2,
        // 2 MiB working set per vCPU, 32 MiB/s of writes.
        ..common::test_guest(MEM_MIB, 2, 512, 32 << 20)
    }
}

/// A VM waiting for an incoming migration, prefaulted as `minivm run
/// --incoming` does (so a restore must replace what is there).
fn dest_config(memfd: bool) -> VmConfig {
    VmConfig {
        mem_size: MEM_MIB << 20,
        ram_blocks: 2,
        vcpus: 2,
        guest: GuestImage::Incoming,
        start_paused: true,
        prefault: true,
        memfd,
        ..VmConfig::default()
    }
}

/// A VM served on a control socket in `dir`.
struct Served {
    vm: ControlledVm,
    client: ControlClient,
    _server: ControlServer,
}

fn serve(dir: &Path, name: &str, config: VmConfig) -> Served {
    let vm = ControlledVm::new(Vm::new(config).unwrap(), TrackerKind::Auto);
    let sock = dir.join(format!("{name}.sock"));
    let server = vm.serve(&sock, Params::default()).unwrap();
    let mut client = ControlClient::connect(&sock).unwrap();
    client.raw(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
    Served {
        vm,
        client,
        _server: server,
    }
}

fn caps(c: &mut ControlClient, list: &[(&str, bool)]) {
    let items: Vec<String> = list
        .iter()
        .map(|(n, s)| format!("{{\"capability\":\"{n}\",\"state\":{s}}}"))
        .collect();
    ok(
        c,
        "migrate-set-capabilities",
        &format!("{{\"capabilities\":[{}]}}", items.join(",")),
    );
}

fn file_uri(p: &Path) -> String {
    format!("{{\"uri\":\"file:{}\"}}", p.display())
}

/// What the tests read of query-migrate.
#[derive(Debug)]
struct Q {
    status: String,
    downtime: u64,
    total: u64,
    normal: u64,
    duplicate: u64,
    tracker: String,
    error: String,
}

fn query(c: &mut ControlClient) -> Q {
    let v = c.raw(b"{\"execute\":\"query-migrate\"}\n").unwrap();
    let r = &v["return"];
    Q {
        status: r["status"].as_str().unwrap_or("").to_string(),
        downtime: r["downtime"].as_u64().unwrap_or(u64::MAX),
        total: r["ram"]["total"].as_u64().unwrap_or(0),
        normal: r["ram"]["normal"].as_u64().unwrap_or(0),
        duplicate: r["ram"]["duplicate"].as_u64().unwrap_or(0),
        tracker: r["dirty-tracker"].as_str().unwrap_or("").to_string(),
        error: r["error-desc"].as_str().unwrap_or("").to_string(),
    }
}

fn wait_status(c: &mut ControlClient, want: &[&str], timeout: Duration) -> Q {
    common::poll_until(
        &format!("status not in {want:?}"),
        timeout,
        || query(c),
        |s| want.contains(&s.status.as_str()),
    )
}

fn run_state(c: &mut ControlClient) -> String {
    let v = c.raw(b"{\"execute\":\"query-status\"}\n").unwrap();
    v["return"]["status"].as_str().unwrap_or("").to_string()
}

/// The guest runs on and its self-check passes.
fn runs_on(vm: &Vm, what: &str) {
    let before = vm.guest_status();
    let s = common::wait_for(vm, Duration::from_secs(30), |s| {
        s.pages_written() > before.pages_written() + 1000 && s.heartbeats() > before.heartbeats()
    });
    assert!(s.ok(), "{what}: self-check failed: {s:?}");
    assert!(
        s.pages_written() > before.pages_written() + 1000,
        "{what}: the guest made no progress: {before:?} -> {s:?}"
    );
}

/// Restores `path` into a new waiting VM through `migrate-incoming`
/// (`lazy`: with x-livemig-lazy); checks the guest runs on from the
/// saved memory.
fn restore_through_socket(dir: &Path, path: &Path, lazy: bool, memfd: bool) {
    let mut d = serve(dir, if lazy { "lazy" } else { "eager" }, dest_config(memfd));
    assert_eq!(run_state(&mut d.client), "inmigrate");
    if lazy {
        ok(
            &mut d.client,
            "migrate-set-parameters",
            "{\"x-livemig-lazy\":true}",
        );
    }
    ok(&mut d.client, "migrate-incoming", &file_uri(path));
    let phase =
        d.vm.wait_for(|p| *p == Phase::Running, Duration::from_secs(30))
            .expect("the restored guest resumes");
    assert_eq!(phase, Phase::Running);
    let q = wait_status(&mut d.client, &["completed"], Duration::from_secs(60));
    assert!(q.error.is_empty(), "{q:?}");
    let report = d.vm.incoming_report().expect("a report");
    assert!(report.verified, "every chunk checked: {report:?}");
    assert!(report.uri.starts_with("file:"), "{report:?}");
    runs_on(d.vm.vm(), if lazy { "lazy restore" } else { "restore" });
    assert_eq!(run_state(&mut d.client), "running");
}

fn mapped_ram_round_trip(memfd: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.mr");
    let mut s = serve(dir.path(), "src", source_config(memfd));
    common::wait_for(s.vm.vm(), Duration::from_secs(20), |g| {
        g.pages_written() > 3000
    });
    caps(&mut s.client, &[("mapped-ram", true), ("multifd", true)]);
    ok(
        &mut s.client,
        "migrate-set-parameters",
        "{\"multifd-channels\":2}",
    );
    let v = s
        .client
        .raw(b"{\"execute\":\"query-migrate-capabilities\"}\n")
        .unwrap();
    assert!(
        v["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "mapped-ram" && c["state"] == true),
        "{v}"
    );
    ok(&mut s.client, "migrate", &file_uri(&path));
    let q = wait_status(
        &mut s.client,
        &["completed", "failed"],
        Duration::from_secs(60),
    );
    assert_eq!(q.status, "completed", "{q:?}");
    assert_eq!(q.total, MEM_MIB << 20, "{q:?}");
    assert!(
        q.normal > 0 && q.duplicate > q.normal,
        "mostly holes: {q:?}"
    );
    assert!(q.tracker.contains("paused"), "{q:?}");
    // The guest stays paused for good, as after any migration.
    let phase = s.vm.wait_idle(Duration::from_secs(10)).unwrap();
    assert_eq!(phase, Phase::MigratedAway);
    assert_eq!(run_state(&mut s.client), "postmigrate");
    let digest = memory_digest(&*s.vm.vm().memory());
    let file = MappedRamFile::open(&path).unwrap();
    assert_eq!(file.digest(), digest, "the file holds the paused memory");
    drop(file);
    let e = exec(
        &mut s.client,
        "migrate",
        &file_uri(&dir.path().join("again")),
    )
    .unwrap_err();
    assert!(e.contains("migrated away"), "{e}");
    drop(s);
    restore_through_socket(dir.path(), &path, false, memfd);
    restore_through_socket(dir.path(), &path, true, memfd);
}

#[test]
fn mapped_ram_save_and_restores_through_the_socket() {
    if !common::kvm_available("mapped_ram_save_and_restores_through_the_socket") {
        return;
    }
    mapped_ram_round_trip(false);
}

#[test]
fn mapped_ram_save_and_restores_of_memfd_memory() {
    if !common::kvm_available("mapped_ram_save_and_restores_of_memfd_memory") {
        return;
    }
    mapped_ram_round_trip(true);
}

#[test]
fn background_snapshot_through_the_socket_and_lazy_restore() {
    if !common::kvm_available("background_snapshot_through_the_socket_and_lazy_restore") {
        return;
    }
    for memfd in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bg.mr");
        let mut s = serve(dir.path(), "src", source_config(memfd));
        common::wait_for(s.vm.vm(), Duration::from_secs(20), |g| {
            g.pages_written() > 3000
        });
        caps(
            &mut s.client,
            &[("background-snapshot", true), ("events", true)],
        );
        ok(&mut s.client, "migrate", &file_uri(&path));
        let q = wait_status(
            &mut s.client,
            &["completed", "failed"],
            Duration::from_secs(60),
        );
        assert_eq!(q.status, "completed", "memfd {memfd}: {q:?}");
        assert!(q.tracker.contains("write-protect"), "{q:?}");
        assert!(q.downtime < 5_000, "{q:?}");
        // The guest runs on.
        let phase = s.vm.wait_idle(Duration::from_secs(10)).unwrap();
        assert_eq!(phase, Phase::Running);
        runs_on(s.vm.vm(), "after the background snapshot");
        assert_eq!(run_state(&mut s.client), "running");
        // STOP and RESUME went out around the pause.
        let mut names = Vec::new();
        while let Some(e) = s.client.next_event(Duration::from_millis(200)).unwrap() {
            names.push(e["event"].as_str().unwrap_or("").to_string());
        }
        let stop = names.iter().position(|n| n == "STOP");
        let resume = names.iter().rposition(|n| n == "RESUME");
        assert!(
            matches!((stop, resume), (Some(a), Some(b)) if a < b),
            "{names:?}"
        );
        // It may snapshot again.
        let again = dir.path().join("bg2.mr");
        ok(&mut s.client, "migrate", &file_uri(&again));
        let q = wait_status(
            &mut s.client,
            &["completed", "failed"],
            Duration::from_secs(60),
        );
        assert_eq!(q.status, "completed", "{q:?}");
        s.vm.wait_idle(Duration::from_secs(10)).unwrap();
        drop(s);
        restore_through_socket(dir.path(), &path, true, memfd);
    }
}

#[test]
fn a_damaged_chunk_fails_the_lazy_restore_and_the_guest_stops() {
    if !common::kvm_available("a_damaged_chunk_fails_the_lazy_restore_and_the_guest_stops") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.mr");
    let vm = Vm::new(source_config(false)).unwrap();
    common::wait_for(&vm, Duration::from_secs(20), |g| g.pages_written() > 3000);
    minivm::snapshot::save(&vm, &path, &Default::default()).unwrap();
    drop(vm);
    // Flip a byte of the first page the file holds in the first block.
    let f = MappedRamFile::open(&path).unwrap();
    let b = f.header().blocks[0].clone();
    drop(f);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut bitmap = vec![0u8; b.bitmap_len() as usize];
    file.read_exact_at(&mut bitmap, b.bitmap_offset).unwrap();
    let page = (0..b.pages())
        .find(|p| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .expect("the guest wrote pages of the first block");
    let chunk = page * 4096 / (2 << 20);
    let at = b.pages_offset + page * 4096 + 100;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    drop(file);
    let mut d = serve(dir.path(), "dst", dest_config(false));
    ok(
        &mut d.client,
        "migrate-set-parameters",
        "{\"x-livemig-lazy\":true}",
    );
    ok(&mut d.client, "migrate-incoming", &file_uri(&path));
    let q = wait_status(
        &mut d.client,
        &["failed", "completed"],
        Duration::from_secs(60),
    );
    assert_eq!(q.status, "failed", "{q:?}");
    assert!(
        q.error.contains(&format!("'{}' chunk {chunk}", b.id))
            && q.error.contains("will not run on"),
        "{q:?}"
    );
    let phase =
        d.vm.wait_for(
            |p| matches!(p, Phase::IncomingFailed(_)),
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(matches!(phase, Phase::IncomingFailed(e) if e.contains("chunk")));
    // No second try on this VM, and no migration out of it.
    let e = exec(&mut d.client, "migrate-incoming", &file_uri(&path)).unwrap_err();
    assert!(e.contains("already failed"), "{e}");
    let e = exec(&mut d.client, "migrate", &file_uri(&dir.path().join("x"))).unwrap_err();
    assert!(!e.is_empty());
}

#[test]
fn refusals_name_the_setting() {
    if !common::kvm_available("refusals_name_the_setting") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = format!(
        "{{\"uri\":\"unix:{}\"}}",
        dir.path().join("m.sock").display()
    );
    let mut s = serve(dir.path(), "src", source_config(true));
    let mut d = serve(dir.path(), "dst", dest_config(true));
    for c in [&mut s.client, &mut d.client] {
        ok(c, "migrate-set-parameters", "{\"mode\":\"local\"}");
    }
    // Local mode: each page-moving setting is refused by its QMP name,
    // on both sides, before anything starts.
    let cases: &[(&str, &str, &str)] = &[
        ("caps", "xbzrle", "capability 'xbzrle'"),
        ("caps", "multifd", "capability 'multifd'"),
        ("caps", "postcopy-ram", "capability 'postcopy-ram'"),
        (
            "params",
            "{\"multifd-compression\":\"zstd\"}",
            "parameter 'multifd-compression'",
        ),
        ("caps", "mapped-ram", "capability 'mapped-ram'"),
    ];
    for (kind, what, named) in cases {
        for (c, cmd) in [
            (&mut s.client, "migrate"),
            (&mut d.client, "migrate-incoming"),
        ] {
            let (set, unset) = match *kind {
                "caps" => (
                    format!("{{\"capabilities\":[{{\"capability\":\"{what}\",\"state\":true}}]}}"),
                    format!("{{\"capabilities\":[{{\"capability\":\"{what}\",\"state\":false}}]}}"),
                ),
                _ => (
                    what.to_string(),
                    "{\"multifd-compression\":\"none\"}".to_string(),
                ),
            };
            let setter = if *kind == "caps" {
                "migrate-set-capabilities"
            } else {
                "migrate-set-parameters"
            };
            ok(c, setter, &set);
            let e = exec(c, cmd, &sock).unwrap_err();
            assert!(
                e.contains(named) && e.contains("mode 'local'"),
                "{cmd} with {what}: {e}"
            );
            ok(c, setter, &unset);
        }
    }
    let e = exec(
        &mut d.client,
        "migrate-set-parameters",
        "{\"x-livemig-lazy\":true}",
    );
    assert!(e.is_ok());
    let e = exec(&mut d.client, "migrate-incoming", &sock).unwrap_err();
    assert!(e.contains("x-livemig-lazy"), "{e}");
    // Nothing started: both still where they were.
    assert_eq!(s.vm.phase(), Phase::Running);
    assert_eq!(d.vm.phase(), Phase::AwaitingIncoming);
    assert!(!dir.path().join("m.sock").exists());
    // mapped-ram outside local mode needs a file.
    ok(
        &mut s.client,
        "migrate-set-parameters",
        "{\"mode\":\"normal\"}",
    );
    caps(&mut s.client, &[("mapped-ram", true)]);
    let e = exec(&mut s.client, "migrate", &sock).unwrap_err();
    assert!(e.contains("file: URI"), "{e}");
    assert_eq!(s.vm.phase(), Phase::Running);
}

#[test]
fn migrate_cancel_stops_a_file_save_and_a_restore() {
    if !common::kvm_available("migrate_cancel_stops_a_file_save_and_a_restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.mr");
    let mut s = serve(dir.path(), "src", source_config(false));
    common::wait_for(s.vm.vm(), Duration::from_secs(20), |g| {
        g.pages_written() > 3000
    });
    caps(&mut s.client, &[("mapped-ram", true)]);
    ok(
        &mut s.client,
        "migrate-set-parameters",
        "{\"multifd-channels\":1}",
    );
    // The cancel follows at once: the save pauses the guest and saves its
    // state before its first chunk, where it looks for the cancel.
    ok(&mut s.client, "migrate", &file_uri(&path));
    ok(&mut s.client, "migrate-cancel", "");
    let q = wait_status(
        &mut s.client,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(60),
    );
    if q.status == "completed" {
        // Not a failure of the cancel: the whole save won the race.
        eprintln!("SKIPPED the save half: the save completed before the cancel arrived");
    } else {
        assert_eq!(q.status, "cancelled", "{q:?}");
        assert!(!path.exists(), "the file the save created is removed");
        let phase = s.vm.wait_idle(Duration::from_secs(10)).unwrap();
        assert_eq!(phase, Phase::Running, "the guest runs on");
        runs_on(s.vm.vm(), "after a cancelled save");
        // And a save after it completes.
        ok(&mut s.client, "migrate", &file_uri(&path));
        let q = wait_status(
            &mut s.client,
            &["completed", "failed", "cancelled"],
            Duration::from_secs(60),
        );
        assert_eq!(q.status, "completed", "{q:?}");
    }
    drop(s);

    // A restore cancelled while it loads: the VM never runs; the file stays.
    let before = std::fs::read(&path).unwrap();
    let mut d = serve(dir.path(), "dst", dest_config(false));
    ok(&mut d.client, "migrate-incoming", &file_uri(&path));
    ok(&mut d.client, "migrate-cancel", "");
    let q = wait_status(
        &mut d.client,
        &["completed", "failed", "cancelled"],
        Duration::from_secs(60),
    );
    if q.status == "completed" {
        eprintln!("SKIPPED the restore half: the restore completed before the cancel arrived");
    } else {
        assert_eq!(q.status, "cancelled", "{q:?}");
        let phase = d.vm.wait_idle(Duration::from_secs(10)).unwrap();
        assert!(matches!(phase, Phase::IncomingFailed(_)), "{phase:?}");
        assert_ne!(run_state(&mut d.client), "running");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is untouched"
    );
}
