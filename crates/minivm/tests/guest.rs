//! The built-in ring-3 test guest: runs, heartbeats, self-check, pause/resume.
mod common;

use std::time::{Duration, Instant};

use minivm::guest::{test_guest_layout, TestGuestConfig};
use minivm::Vm;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn test_guest_runs_and_self_check_passes() {
    if !common::kvm_available("test_guest_runs_and_self_check_passes") {
        return;
    }
    let vm = Vm::new(common::test_guest(64, 2, 2048, 0)).unwrap();
    let t = Instant::now();
    let s = common::wait_for(&vm, Duration::from_secs(10), |s| {
        s.vcpus.iter().all(|v| v.pages_written > 3 * 2048)
    });
    let secs = t.elapsed().as_secs_f64();
    assert!(s.ok(), "{s:?}");
    assert!(s.vcpus.iter().all(|v| v.pages_written > 3 * 2048), "{s:?}");
    assert!(s.heartbeats() > 0);
    eprintln!(
        "unthrottled: {:.0} pages/s over 2 vCPUs, {} heartbeats in {secs:.2}s",
        s.pages_written() as f64 / secs,
        s.heartbeats()
    );
}

#[test]
fn rate_limit_holds() {
    if !common::kvm_available("rate_limit_holds") {
        return;
    }
    // 8 MiB/s = 2048 pages/s in total.
    let vm = Vm::new(common::test_guest(64, 2, 1024, 8 << 20)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let a = vm.guest_status().pages_written();
    std::thread::sleep(Duration::from_secs(1));
    let b = vm.guest_status().pages_written();
    let rate = b - a;
    eprintln!("rate-limited to 2048 pages/s: measured {rate} pages/s");
    assert!((1500..=2600).contains(&rate), "measured {rate} pages/s");
    vm.set_rate(0);
    std::thread::sleep(Duration::from_millis(100));
    let c = vm.guest_status().pages_written();
    std::thread::sleep(Duration::from_millis(500));
    let d = vm.guest_status().pages_written();
    assert!(d - c > 2 * rate, "unlimited rate not faster: {}", d - c);
    assert!(vm.guest_status().ok());
}

#[test]
fn pause_stops_writes_and_resume_continues() {
    if !common::kvm_available("pause_stops_writes_and_resume_continues") {
        return;
    }
    let vm = Vm::new(common::test_guest(64, 2, 1024, 0)).unwrap();
    common::wait_for(&vm, Duration::from_secs(5), |s| s.pages_written() > 10_000);
    // Every vCPU thread started (on a loaded host one may not have run
    // yet when the other wrote 10000 pages).
    let t = Instant::now();
    let mut nice = vm.vcpu_nice();
    while !nice.iter().all(Option::is_some) && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
        nice = vm.vcpu_nice();
    }
    assert!(nice.iter().all(Option::is_some), "{nice:?}");
    let t = Instant::now();
    vm.pause().unwrap();
    eprintln!("pause took {:?}", t.elapsed());
    assert!(vm.is_paused());
    // The pause raises the vCPU threads only while it stops them.
    assert_eq!(vm.vcpu_nice(), nice, "the vCPUs' priority is put back");
    let a = vm.guest_status();
    std::thread::sleep(Duration::from_millis(200));
    let b = vm.guest_status();
    assert_eq!(
        a.pages_written(),
        b.pages_written(),
        "guest wrote while paused"
    );
    vm.resume();
    let c = common::wait_for(&vm, Duration::from_secs(5), |s| {
        s.pages_written() > b.pages_written() + 10_000
    });
    assert!(c.pages_written() > b.pages_written() + 10_000);
    assert!(c.ok(), "{c:?}");
    // Throttle 90%: the write rate drops (to about a tenth on a quiet host;
    // a loaded host starves the unthrottled windows too, so the check only
    // asks for a clear drop: below three quarters).
    let rate = |vm: &Vm| {
        let a = vm.guest_status().pages_written();
        std::thread::sleep(Duration::from_millis(500));
        vm.guest_status().pages_written() - a
    };
    // On a loaded host one window can be starved either way: up to three
    // tries, each with its own unthrottled reference just before.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let full = rate(&vm);
        vm.set_throttle(90);
        std::thread::sleep(Duration::from_millis(100));
        let slow = rate(&vm);
        vm.set_throttle(0);
        eprintln!("throttle 90%: {full} -> {slow} pages per 0.5 s");
        seen.push((full, slow));
        if slow * 4 < full * 3 {
            break;
        }
    }
    assert!(
        seen.iter().any(|&(full, slow)| slow * 4 < full * 3),
        "throttle had no effect (unthrottled -> throttled pages per 0.5 s): {seen:?}"
    );
}

#[test]
fn guest_detects_a_corrupted_page() {
    if !common::kvm_available("guest_detects_a_corrupted_page") {
        return;
    }
    let cfg = TestGuestConfig {
        pages_per_vcpu: 256,
        rate_bytes_per_sec: 0,
    };
    let mut vc = common::test_guest(16, 1, 256, 0);
    vc.guest = minivm::GuestImage::TestGuest(cfg.clone());
    let vm = Vm::new(vc).unwrap();
    common::wait_for(&vm, Duration::from_secs(5), |s| s.pages_written() > 1024);
    vm.pause().unwrap();
    let slot = test_guest_layout(&cfg, 1)[0];
    let addr = GuestAddress(slot.data + 7 * 4096 + 100 * 8);
    let v: u64 = vm.guest_memory().read_obj(addr).unwrap();
    vm.guest_memory().write_obj(v ^ 1, addr).unwrap();
    vm.resume();
    let s = common::wait_for(&vm, Duration::from_secs(5), |s| s.failures() > 0);
    assert_eq!(s.failures(), 1, "{s:?}");
}

#[test]
fn stop_probe_measures_the_stop_without_stopping_the_guest() {
    if !common::kvm_available("stop_probe_measures_the_stop_without_stopping_the_guest") {
        return;
    }
    use livemig::vm::VmControl;
    // Rate-limited: the vCPUs spend their time in the VMM waiting for
    // page credit, where a pause (and a probe) must reach them too.
    let vm = Vm::new(common::test_guest(64, 2, 1024, 8 << 20)).unwrap();
    common::wait_for(&vm, Duration::from_secs(5), |s| s.pages_written() > 1_000);
    let control = vm.control();
    // The first ask probes at once: both vCPUs answered.
    let first = control.stop_cost();
    assert!(first > Duration::ZERO, "no probe answered");
    // Asking keeps probes going in the background (one every 100 ms);
    // the guest runs on through them and its self-check holds.
    let a = vm.guest_status().pages_written();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            control.stop_cost() >= first,
            "the slowest recent probe counts"
        );
    }
    let s = common::wait_for(&vm, Duration::from_secs(5), |s| {
        s.pages_written() > a + 1_000
    });
    assert!(s.pages_written() > a + 1_000, "the guest stopped: {s:?}");
    assert!(s.ok(), "{s:?}");
    assert!(!vm.is_paused());
    // Paused, probes wanted: none runs a vCPU.
    vm.pause().unwrap();
    let _ = control.stop_cost();
    let b = vm.guest_status().pages_written();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vm.guest_status().pages_written(),
        b,
        "guest wrote while paused"
    );
    assert!(vm.is_paused());
    vm.resume();
    let c = common::wait_for(&vm, Duration::from_secs(5), |s| {
        s.pages_written() > b + 1_000
    });
    assert!(c.ok() && c.pages_written() > b + 1_000, "{c:?}");
}
