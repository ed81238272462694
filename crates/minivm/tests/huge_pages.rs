//! With `receive_small_pages`, an incoming VM receives into 4 KiB pages,
//! asks for huge pages at its first resume (whichever way the resume comes) and collapses the
//! received memory into huge pages in the background; under postcopy the
//! collapse waits until every page arrived. The guest's self-check passes
//! throughout.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use livemig::engine::{MigrationHandle, Params, Status};
use minivm::collapse::{smaps_fields, CollapseStats};
use minivm::{Vm, VmConfig};

/// The system's THP mode (`always`, `madvise` or `never`).
fn thp_mode() -> String {
    let s =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']').map(str::to_string))
        .unwrap_or_default()
}

/// The `VmFlags` and AnonHugePages (bytes) of this process's mapping of
/// `vm`'s first slot.
fn guest_mapping(vm: &Vm) -> (Vec<String>, u64) {
    let addr = vm.slots()[0].host_addr;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut flags, mut huge) = (None, None);
    for line in smaps_fields(&smaps, |a, b| (a..b).contains(&addr)) {
        if let Some(v) = line.strip_prefix("AnonHugePages:") {
            huge = Some(
                v.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    << 10,
            );
        }
        if let Some(v) = line.strip_prefix("VmFlags:") {
            flags = Some(v.split_whitespace().map(str::to_string).collect());
        }
    }
    (flags.expect("VmFlags"), huge.expect("AnonHugePages"))
}

/// A source whose guest has written its whole working set once (16 MiB
/// of data: at least 7 whole 2 MiB chunks).
fn source() -> (VmConfig, Vm) {
    let mut cfg = common::test_guest(64, 1, 4096, 64 << 20);
    cfg.prefault = true;
    // Its destinations receive into 4 KiB pages (off by default).
    cfg.receive_small_pages = true;
    let src = Vm::new(cfg.clone()).unwrap();
    let s = common::wait_for(&src, Duration::from_secs(30), |s| {
        s.pages_written() > 4096 && s.heartbeats() > 2
    });
    assert!(s.pages_written() > 4096, "the source guest runs: {s:?}");
    (cfg, src)
}

/// Waits until the thread started at the resume asked for huge pages.
fn wait_advised(vm: &Vm) -> CollapseStats {
    let t0 = Instant::now();
    loop {
        if let Some(s) = vm.collapse_stats().filter(|s| s.advised) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no advice within 30 s: {:?}",
            vm.collapse_stats()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the collapse put at least `chunks` chunks on huge pages.
fn wait_collapsed(vm: &Vm, chunks: u64) -> CollapseStats {
    let t0 = Instant::now();
    loop {
        let st = vm.collapse_stats();
        if let Some(s) = &st {
            if s.collapsed >= chunks || s.gave_up.is_some() {
                return s.clone();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no collapse within 60 s: {st:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn runs_on(vm: &Vm) {
    let before = vm.guest_status();
    let s = common::wait_for(vm, Duration::from_secs(20), |s| {
        s.pages_written() > before.pages_written() + 1000
    });
    assert!(
        s.pages_written() > before.pages_written() + 1000,
        "the guest runs on the destination: {before:?} -> {s:?}"
    );
    assert!(s.ok(), "self-check on the destination: {s:?}");
}

#[test]
fn received_into_small_pages_then_collapsed_after_the_resume() {
    if !common::kvm_available("received_into_small_pages_then_collapsed_after_the_resume") {
        return;
    }
    let mode = thp_mode();
    let (cfg, src) = source();
    let dst = common::pipe_migrate(&src, &cfg);
    // Paused, every page in: no huge page asked for, none given.
    let (flags, huge) = guest_mapping(&dst);
    assert!(!flags.iter().any(|f| f == "hg"), "{flags:?}");
    if mode == "madvise" {
        assert_eq!(huge, 0, "received into 4 KiB pages");
    }
    assert!(
        dst.collapse_stats().is_none(),
        "nothing runs before the resume"
    );
    dst.resume();
    let st = wait_advised(&dst);
    let (flags, _) = guest_mapping(&dst);
    assert!(
        flags.iter().any(|f| f == "hg"),
        "asked after the resume: {flags:?} {st:?}"
    );
    if mode == "never" {
        eprintln!("THP is off here: the collapse itself is not checked");
        return;
    }
    let st = wait_collapsed(&dst, 6);
    assert!(st.gave_up.is_none(), "{st:?}");
    assert_eq!(st.chunks, 32, "{st:?}");
    assert!(st.collapsed >= 6 && st.failed == 0, "{st:?}");
    assert!(st.longest <= st.busy, "{st:?}");
    let (_, huge) = guest_mapping(&dst);
    assert!(huge >= 6 << 21, "AnonHugePages {huge} after {st:?}");
    runs_on(&dst);
    // Migrating the VM on stops its collapse first (it may still have
    // sparse chunks to look at again: 31 s of looks in all).
    let was_running = dst.collapse_running();
    let next = common::pipe_migrate(&dst, &cfg);
    if was_running {
        let t0 = Instant::now();
        while dst.collapse_running() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the collapse runs on after the migration out: {:?}",
                dst.collapse_stats()
            );
            thread::sleep(Duration::from_millis(5));
        }
        let st = dst.collapse_stats().unwrap();
        assert!(!st.finished, "stopped, not finished on its own: {st:?}");
    } else {
        eprintln!("the collapse had ended before the migration out: its stop is not checked");
    }
    next.resume();
    runs_on(&next);
    // Dropping a VM stops its collapse on the way.
    let t0 = Instant::now();
    drop(next);
    drop(dst);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_engine_resume_asks_for_huge_pages_and_collapse_can_be_off() {
    if !common::kvm_available("the_engine_resume_asks_for_huge_pages_and_collapse_can_be_off") {
        return;
    }
    let (cfg, src) = source();
    let dst_cfg = VmConfig {
        thp_collapse: false,
        ..cfg.clone()
    };
    // `receive` resumes the guest through the engine (VmHandle).
    let (stats, dest) = common::pipe_receive(
        &src,
        &dst_cfg,
        MigrationHandle::new(Params::default()),
        false,
    );
    assert_eq!(stats.unwrap().status, Status::Completed);
    let (dst, _) = dest.unwrap();
    let st = wait_advised(&dst);
    let (flags, _) = guest_mapping(&dst);
    assert!(flags.iter().any(|f| f == "hg"), "{flags:?}");
    // Collapse off: the thread only gave the advice.
    let t0 = Instant::now();
    while !dst.collapse_stats().unwrap().finished {
        assert!(t0.elapsed() < Duration::from_secs(10), "{st:?}");
        thread::sleep(Duration::from_millis(5));
    }
    let st = dst.collapse_stats().unwrap();
    assert_eq!((st.chunks, st.collapsed, st.sweeps), (0, 0, 0), "{st:?}");
    runs_on(&dst);
}

#[test]
fn postcopy_destination_collapses_once_every_page_arrived() {
    if !common::kvm_available("postcopy_destination_collapses_once_every_page_arrived") {
        return;
    }
    if thp_mode() == "never" {
        eprintln!("SKIPPED: THP is off here");
        return;
    }
    let (cfg, src) = source();
    let handle = MigrationHandle::new(Params {
        postcopy_ram: true,
        ..Params::default()
    });
    // Pure postcopy: the guest resumes on the destination before its
    // memory, with huge pages asked for while userfaultfd places pages.
    handle.start_postcopy().unwrap();
    let (stats, dest) = common::pipe_receive(&src, &cfg, handle, true);
    assert_eq!(stats.unwrap().status, Status::Completed);
    let (dst, arrival) = dest.unwrap();
    assert!(arrival.postcopy.is_some(), "switched to postcopy");
    let st = wait_collapsed(&dst, 6);
    assert!(st.gave_up.is_none() && st.failed == 0, "{st:?}");
    let (flags, huge) = guest_mapping(&dst);
    assert!(
        !flags.iter().any(|f| f == "um"),
        "userfaultfd let go: {flags:?}"
    );
    assert!(huge >= 6 << 21, "AnonHugePages {huge} after {st:?}");
    runs_on(&dst);
}

#[test]
fn by_default_an_incoming_vm_asks_for_huge_pages_at_once() {
    if !common::kvm_available("by_default_an_incoming_vm_asks_for_huge_pages_at_once") {
        return;
    }
    let vm = Vm::new(VmConfig {
        mem_size: 16 << 20,
        guest: minivm::GuestImage::Incoming,
        start_paused: true,
        ..Default::default()
    })
    .unwrap();
    let (flags, _) = guest_mapping(&vm);
    assert!(
        flags.iter().any(|f| f == "hg"),
        "advised while paused: {flags:?}"
    );
    vm.resume();
    assert!(vm.collapse_stats().is_none(), "no collapse thread");
}

/// A boot sector that halts at once, forever (`hlt; jmp $-1`), with `mem`
/// bytes of memory of which the first `data` MiB above 1 MiB hold bytes
/// written from the host.
fn halted_source(mem: u64, data: u64) -> (VmConfig, Vm) {
    let mut boot = vec![0u8; 512];
    boot[..3].copy_from_slice(&[0xf4, 0xeb, 0xfd]);
    boot[510] = 0x55;
    boot[511] = 0xaa;
    let cfg = VmConfig {
        mem_size: mem,
        guest: minivm::GuestImage::BootSector(boot),
        ..Default::default()
    };
    let vm = Vm::new(cfg.clone()).unwrap();
    use vm_memory::{Bytes, GuestAddress};
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    for p in 0..(data << 20) / 4096 {
        vm.guest_memory()
            .write_slice(&page, GuestAddress((1 << 20) + p * 4096))
            .unwrap();
    }
    (cfg, vm)
}

/// Waits until `vm`'s vCPU load reads `want`.
fn wait_load(vm: &Vm, want: u32) {
    let t0 = Instant::now();
    while vm.vcpu_load() != want {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "vCPU load {} after 20 s, want {want}",
            vm.vcpu_load()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_halted_guest_reads_idle_and_a_running_one_busy() {
    if !common::kvm_available("a_halted_guest_reads_idle_and_a_running_one_busy") {
        return;
    }
    let (_, halted) = halted_source(16 << 20, 0);
    wait_load(&halted, 0);
    // Paused: nothing runs either.
    halted.pause().unwrap();
    assert_eq!(halted.vcpu_load(), 0);
    let (_, busy) = source();
    wait_load(&busy, 100);
    busy.pause().unwrap();
    assert_eq!(busy.vcpu_load(), 0, "paused");
    busy.resume();
    wait_load(&busy, 100);
}

#[test]
fn an_idle_source_is_received_into_small_pages_and_a_busy_one_into_huge() {
    if !common::kvm_available(
        "an_idle_source_is_received_into_small_pages_and_a_busy_one_into_huge",
    ) {
        return;
    }
    let mode = thp_mode();
    // Idle: 4 KiB pages while paused, huge pages asked for at the resume.
    let (cfg, src) = halted_source(32 << 20, 8);
    wait_load(&src, 0);
    let dst = common::pipe_migrate(&src, &cfg);
    assert_eq!(dst.received_into_small_pages(), Some(true));
    let (flags, huge) = guest_mapping(&dst);
    assert!(
        flags.iter().any(|f| f == "nh") && !flags.iter().any(|f| f == "hg"),
        "{flags:?}"
    );
    if mode != "always" {
        assert_eq!(huge, 0, "received into 4 KiB pages");
    }
    assert!(dst.collapse_stats().is_none(), "nothing before the resume");
    dst.resume();
    let st = wait_advised(&dst);
    let (flags, _) = guest_mapping(&dst);
    assert!(
        flags.iter().any(|f| f == "hg") && !flags.iter().any(|f| f == "nh"),
        "asked after the resume: {flags:?} {st:?}"
    );
    drop(dst);

    // Busy: huge pages from the start, nothing at the resume.
    let (mut cfg, src) = source();
    cfg.receive_small_pages = false;
    wait_load(&src, 100);
    let dst = common::pipe_migrate(&src, &cfg);
    assert_eq!(dst.received_into_small_pages(), Some(false));
    let (flags, _) = guest_mapping(&dst);
    assert!(flags.iter().any(|f| f == "hg"), "{flags:?}");
    dst.resume();
    assert!(dst.collapse_stats().is_none(), "no collapse thread");
    runs_on(&dst);

    // Off (minivm --receive-huge-pages): an idle source changes nothing.
    let (cfg, src) = halted_source(16 << 20, 2);
    wait_load(&src, 0);
    let cfg = VmConfig {
        small_pages_when_idle: false,
        ..cfg
    };
    let dst = common::pipe_migrate(&src, &cfg);
    assert_eq!(dst.received_into_small_pages(), None);
    let (flags, _) = guest_mapping(&dst);
    assert!(flags.iter().any(|f| f == "hg"), "{flags:?}");
}
