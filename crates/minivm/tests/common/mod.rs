//! Shared helpers for the KVM integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use minivm::{GuestImage, GuestStatus, TestGuestConfig, Vm, VmConfig};

/// True if /dev/kvm can be used; prints why a test is skipped otherwise.
pub fn kvm_available(test: &str) -> bool {
    match minivm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// A test-guest VM config.
pub fn test_guest(mem_mib: u64, vcpus: usize, pages: u64, rate: u64) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        guest: GuestImage::TestGuest(TestGuestConfig {
            pages_per_vcpu: pages,
            rate_bytes_per_sec: rate,
        }),
        ..Default::default()
    }
}

/// Waits until `f(status)` holds or `timeout` passes; returns the last status.
pub fn wait_for(vm: &Vm, timeout: Duration, f: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
    let start = Instant::now();
    loop {
        let s = vm.guest_status();
        if f(&s) || start.elapsed() > timeout || !s.errors.is_empty() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Passes the boot-sector incrementer has completed (its own counter).
pub fn bootinc_passes(vm: &Vm) -> u32 {
    use vm_memory::{Bytes, GuestAddress};
    vm.guest_memory()
        .read_obj::<u32>(GuestAddress(minivm::guest::BOOTINC_PASSES))
        .unwrap()
}

/// Waits up to `timeout` for the incrementer to reach `n` passes; returns
/// the count reached.
pub fn wait_bootinc_passes(vm: &Vm, n: u32, timeout: Duration) -> u32 {
    let t = Instant::now();
    while bootinc_passes(vm) < n && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(10));
    }
    bootinc_passes(vm)
}

/// A `minivm` process of this package, killed and reaped on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts this package's `minivm` with `args` (stderr piped, for errors).
pub fn minivm(args: &[&str]) -> Proc {
    use std::process::{Command, Stdio};
    Proc(
        Command::new(env!("CARGO_BIN_EXE_minivm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}
