//! Whole-VM mapped-ram snapshots: saved paused and restored eagerly and
//! lazily (the guest's self-check passes), a damaged chunk stops a lazy
//! restore with its name, and a background snapshot of a running guest.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{kvm_available, test_guest, wait_for};
use livemig::engine::memory_digest;
use livemig::snapshot::{BackgroundOptions, MappedRamFile, SaveOptions};
use minivm::snapshot::{restore, restore_lazy, save, save_background};
use minivm::{Vm, VmConfig};

fn config() -> VmConfig {
    let mut c = test_guest(64, 2, 512, 32 << 20);
    c.ram_blocks = 2;
    c.prefault = true;
    c
}

/// Lets a restored guest run until it has written more pages; checks it.
fn runs_on(vm: &Vm, what: &str) {
    let before = vm.guest_status();
    let s = wait_for(vm, Duration::from_secs(20), |s| {
        s.pages_written() > before.pages_written() + 2000 && s.heartbeats() > before.heartbeats()
    });
    assert!(s.ok(), "{what}: self-check failed: {s:?}");
    assert!(
        s.pages_written() > before.pages_written() + 2000,
        "{what}: the guest made no progress: {before:?} -> {s:?}"
    );
}

#[test]
fn saved_vm_restores_eagerly_and_lazily() {
    if !kvm_available("saved_vm_restores_eagerly_and_lazily") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.mr");
    let vm = Vm::new(config()).unwrap();
    wait_for(&vm, Duration::from_secs(20), |s| s.pages_written() > 5000);
    let saved = save(
        &vm,
        &path,
        &SaveOptions {
            threads: 2,
            direct_io: false,
        },
    )
    .unwrap();
    let digest = memory_digest(&*vm.memory());
    assert_eq!(saved.stats.digest, digest);
    // Most of 64 MiB is never touched: holes.
    assert!(
        saved.stats.zero_pages > saved.stats.pages,
        "{:?}",
        saved.stats
    );
    let at_save = vm.guest_status();
    drop(vm);

    for threads in [1, 2] {
        let (vm, stats) = restore(&config(), &path, threads).unwrap();
        assert_eq!(stats.pages, saved.stats.pages);
        assert_eq!(memory_digest(&*vm.memory()), digest);
        assert_eq!(vm.guest_status().pages_written(), at_save.pages_written());
        vm.resume();
        runs_on(&vm, "eager restore");
    }

    let lazy = restore_lazy(&config(), &path).unwrap();
    runs_on(&lazy.vm, "lazy restore, while loading");
    let s = lazy.restore.wait();
    assert!(s.done && s.error.is_none(), "{s:?}");
    runs_on(&lazy.vm, "lazy restore, all loaded");
}

#[test]
fn damaged_chunk_stops_a_lazy_restore() {
    if !kvm_available("damaged_chunk_stops_a_lazy_restore") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.mr");
    let vm = Vm::new(config()).unwrap();
    wait_for(&vm, Duration::from_secs(20), |s| s.pages_written() > 5000);
    save(
        &vm,
        &path,
        &SaveOptions {
            threads: 2,
            direct_io: false,
        },
    )
    .unwrap();
    drop(vm);
    // Damage the first page of the test guest's working set (block 0,
    // chunk 1: guest address 2 MiB).
    let f = MappedRamFile::open(&path).unwrap();
    let b = f.header().blocks[0].clone();
    drop(f);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0x5a], b.pages_offset + (2 << 20) + 17)
        .unwrap();
    let lazy = restore_lazy(&config(), &path).unwrap();
    let s = lazy.restore.wait();
    let e = s.error.expect("the damage is found");
    assert!(e.contains("chunk 1") && e.contains(&b.id), "{e}");
    // The guest never saw that chunk: no self-check failure was reported.
    assert!(lazy.vm.guest_status().failures() == 0);
    // Leave the VM (its vCPUs blocked on the missing chunk) to process exit.
    std::mem::forget(lazy);
}

#[test]
fn background_snapshot_of_a_running_vm() {
    if !kvm_available("background_snapshot_of_a_running_vm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bg.mr");
    // A guest writing as fast as it can over 8 MiB per vCPU: many of its
    // writes land on pages not yet saved.
    let mut fast = test_guest(64, 2, 2048, 0);
    fast.ram_blocks = 2;
    fast.prefault = true;
    let vm = Vm::new(fast.clone()).unwrap();
    wait_for(&vm, Duration::from_secs(20), |s| s.pages_written() > 5000);
    let stats = save_background(
        &vm,
        &path,
        &BackgroundOptions {
            threads: 2,
            instant_digest: true,
        },
    )
    .unwrap();
    eprintln!("background snapshot: {stats:?}");
    runs_on(&vm, "source after the snapshot");
    let instant = stats.instant_digest.unwrap();
    assert_eq!(
        stats.save.digest, instant,
        "the file must hold memory as of the pause"
    );
    drop(vm);
    assert!(
        stats.copied_pages > 0,
        "no write landed before its chunk was saved: {stats:?}"
    );
    let (vm, _) = restore(&fast, &path, 2).unwrap();
    assert_eq!(memory_digest(&*vm.memory()), instant);
    vm.resume();
    runs_on(&vm, "restored background snapshot");
}
