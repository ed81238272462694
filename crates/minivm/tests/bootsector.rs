//! The boot-sector incrementer runs from real mode and keeps its memory consistent.
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minivm::guest::{boot_incrementer, BOOTINC_FIRST, BOOTINC_PASSES};
use minivm::{GuestImage, SerialOut, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// Checks the incrementer's invariant: walking the pages in order, the
/// counter byte drops by one (mod 256) at most once (where the guest is).
pub fn consistent(bytes: &[u8]) -> Result<(), String> {
    let mut drops = 0;
    for i in 1..bytes.len() {
        let (a, b) = (bytes[i - 1], bytes[i]);
        if a == b {
            continue;
        }
        if a == b.wrapping_add(1) {
            drops += 1;
        } else {
            return Err(format!("page {i}: {a} then {b}"));
        }
    }
    if drops > 1 {
        return Err(format!("{drops} boundaries"));
    }
    Ok(())
}

#[test]
fn boot_sector_incrementer_runs() {
    if !common::kvm_available("boot_sector_incrementer_runs") {
        return;
    }
    let mem = 64u64 << 20;
    let serial = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::new(VmConfig {
        mem_size: mem,
        guest: GuestImage::BootSector(boot_incrementer(mem as u32)),
        serial: SerialOut::Buffer(serial.clone()),
        ..Default::default()
    })
    .unwrap();
    let pages = (mem - BOOTINC_FIRST) / 4096;
    let t = Instant::now();
    let passes = |vm: &Vm| {
        vm.guest_memory()
            .read_obj::<u32>(GuestAddress(BOOTINC_PASSES))
            .unwrap()
    };
    while passes(&vm) < 3 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let n = passes(&vm);
    let secs = t.elapsed().as_secs_f64();
    assert!(
        vm.guest_status().errors.is_empty(),
        "{:?}",
        vm.guest_status()
    );
    assert!(n >= 3, "only {n} passes in {secs:.1}s");
    eprintln!(
        "boot sector (ring 0, 32-bit): {n} passes over {pages} pages in {secs:.2}s = {:.0} pages/s",
        (n as u64 * pages) as f64 / secs
    );
    let out = String::from_utf8_lossy(&serial.lock().unwrap()).to_string();
    assert!(out.starts_with("OK\n..."), "serial output: {out:?}");
    vm.pause().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem.bin");
    vm.dump_memory(BOOTINC_FIRST, mem - BOOTINC_FIRST, &path)
        .unwrap();
    let dump = std::fs::read(&path).unwrap();
    let firsts: Vec<u8> = dump.chunks(4096).map(|p| p[0]).collect();
    consistent(&firsts).unwrap();
}
