//! End to end: each harness guest boots in minivm (real KVM) and its serial
//! output and memory are what the harness's checks expect. Seconds; skipped
//! with a `SKIPPED` line where /dev/kvm is absent. QEMU is never started
//! here (CI has none): it runs only through the harness command.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minivm::{GuestImage, SerialOut, Vm, VmConfig};

use crate::guest::{
    compare_digests, sector, DigestCheck, FillerCheck, GuestKind, GuestParams, IncrementerCheck,
    MemCheck,
};

const MEM: u64 = 16 << 20;

fn kvm(name: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIPPED {name}: /dev/kvm is absent");
    false
}

fn boot(kind: GuestKind, p: GuestParams) -> (Vm, Arc<Mutex<Vec<u8>>>) {
    let serial = Arc::new(Mutex::new(Vec::new()));
    let vm = Vm::new(VmConfig {
        mem_size: MEM,
        guest: GuestImage::BootSector(sector(kind, p).to_vec()),
        serial: SerialOut::Buffer(serial.clone()),
        ..Default::default()
    })
    .expect("minivm VM");
    (vm, serial)
}

fn serial_text(s: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&s.lock().unwrap()).to_string()
}

/// Waits until the serial output holds `want` (at least `count` times).
fn wait_serial(vm: &Vm, s: &Arc<Mutex<Vec<u8>>>, want: &str, count: usize, secs: u64) {
    let t0 = Instant::now();
    while serial_text(s).matches(want).count() < count {
        let st = vm.guest_status();
        assert!(st.errors.is_empty(), "guest stopped: {:?}", st.errors);
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no {count}x {want:?} on serial within {secs} s; got {:?}",
            serial_text(s)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Feeds [0, size) of the paused VM's memory to `feed` (through a dump
/// file, as the harness reads minivm's dumps).
fn read_memory(vm: &Vm, size: u64, mut feed: impl FnMut(u64, &[u8])) {
    let dir = std::env::temp_dir().join(format!(
        "harness-e2e-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("memory.bin");
    vm.dump_memory(0, size, &path).expect("dump");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    for (i, c) in bytes.chunks(1 << 16).enumerate() {
        feed((i << 16) as u64, c);
    }
}

#[test]
fn incrementer_boots_counts_passes_and_keeps_its_invariant() {
    if !kvm("incrementer_boots_counts_passes_and_keeps_its_invariant") {
        return;
    }
    let end = 8 << 20;
    let (vm, serial) = boot(GuestKind::Incrementer, GuestParams { end, seed: 1, n: 2 });
    wait_serial(&vm, &serial, "INC\n", 1, 30);
    wait_serial(&vm, &serial, ".", 3, 30);
    // A ',' per 16 MiB chunk (here one per pass of 7 MiB), a '.' every
    // n = 2 passes: the pass clock's marks.
    let t = serial_text(&serial);
    let after = &t[t.find("INC\n").unwrap() + 4..];
    assert!(after.chars().all(|c| c == ',' || c == '.'), "{after:?}");
    let (commas, dots) = (after.matches(',').count(), after.matches('.').count());
    assert!(commas >= 2 * dots && dots >= 3, "{after:?}");
    for _ in 0..3 {
        vm.pause().unwrap();
        let mut c: Box<dyn MemCheck> = Box::new(IncrementerCheck::new(end.into()));
        read_memory(&vm, end.into(), |a, b| c.feed(a, b));
        let r = c.finish();
        assert!(r.ok, "{}", r.detail);
        // '.' every 2 passes: at least 6 passes after 3 dots.
        let passes: u32 = r
            .detail
            .split(", ")
            .find_map(|p| p.strip_suffix(" passes")?.parse().ok())
            .expect("pass count in the detail");
        assert!(passes >= 6, "{}", r.detail);
        vm.resume();
        std::thread::sleep(Duration::from_millis(30));
    }
    // The check is not blind: a page out of step fails it.
    vm.pause().unwrap();
    let mut c: Box<dyn MemCheck> = Box::new(IncrementerCheck::new(end.into()));
    read_memory(&vm, end.into(), |a, b| {
        let mut b = b.to_vec();
        let page = 0x30_0000u64;
        if (a..a + b.len() as u64).contains(&page) {
            b[(page - a) as usize] = b[(page - a) as usize].wrapping_add(7);
        }
        c.feed(a, &b)
    });
    assert!(!c.finish().ok);
}

#[test]
fn filler_fills_its_range_from_the_seed_then_halts() {
    if !kvm("filler_fills_its_range_from_the_seed_then_halts") {
        return;
    }
    let end = 4 << 20;
    let seed = 0xdead_beef;
    let (vm, serial) = boot(GuestKind::Filler, GuestParams { end, seed, n: 1 });
    wait_serial(&vm, &serial, "DONE\n", 1, 60);
    vm.pause().unwrap();
    let mut c: Box<dyn MemCheck> = Box::new(FillerCheck::new(end.into(), seed));
    read_memory(&vm, MEM, |a, b| c.feed(a, b));
    let r = c.finish();
    assert!(r.ok, "{}", r.detail);
    let mut other: Box<dyn MemCheck> = Box::new(FillerCheck::new(end.into(), seed + 1));
    read_memory(&vm, MEM, |a, b| other.feed(a, b));
    assert!(!other.finish().ok, "another seed's data must not match");
    // Nothing past END was written.
    read_memory(&vm, MEM, |a, b| {
        for (i, &x) in b.iter().enumerate() {
            if a + i as u64 >= u64::from(end) {
                assert_eq!(x, 0, "byte at {:#x} written past END", a + i as u64);
            }
        }
    });
}

#[test]
fn idle_prints_its_marker_and_leaves_memory_alone() {
    if !kvm("idle_prints_its_marker_and_leaves_memory_alone") {
        return;
    }
    let (vm, serial) = boot(
        GuestKind::Idle,
        GuestParams {
            end: 1 << 20,
            seed: 1,
            n: 1,
        },
    );
    wait_serial(&vm, &serial, "IDLE\n", 1, 30);
    let digest = |vm: &Vm| {
        let mut d = DigestCheck::default();
        read_memory(vm, MEM, |a, b| d.feed(a, b));
        d.finish()
    };
    vm.pause().unwrap();
    let before = digest(&vm);
    vm.resume();
    std::thread::sleep(Duration::from_millis(300));
    vm.pause().unwrap();
    let after = digest(&vm);
    let r = compare_digests(&before, &after);
    assert!(r.ok, "{}", r.detail);
    assert!(vm.guest_status().errors.is_empty());
    // Its sector sits at 0x7c00, everything from 1 MiB on is untouched.
    read_memory(&vm, MEM, |a, b| {
        if a == 0 {
            let at = 0x7c00;
            assert_eq!(&b[at + 510..at + 512], &[0x55, 0xaa]);
        }
        if a >= 1 << 20 {
            assert!(b.iter().all(|&x| x == 0), "idle guest wrote at {a:#x}");
        }
    });
}
