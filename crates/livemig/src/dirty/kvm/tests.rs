//! The shared tracker suite on the KVM trackers, with a tiny KVM VM whose
//! guest makes every write the suite asks for.
//!
//! The VM: the suite's RAM blocks as tracked slots from 2 MiB up, plus an
//! untracked system slot at 0 with identity page tables, the guest code
//! and one staging buffer per vCPU. The guest runs in long-mode ring 3
//! (native speed on kvm_pvm, see HOST-NOTES): `rep movsb` from the staging
//! buffer to the target, `out` to hand back. A write is: copy the data to
//! a free vCPU's staging buffer from the host (untracked), set RSI/RDI/RCX,
//! run until the `out`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::*;
use crate::dirty::device::{DeviceWrites, WithDeviceWrites};
use crate::dirty::suite::{self, Writer};
use crate::memory::{GuestMemory, ProcessMemory};
use crate::testkit::kvm_guest::long_mode_ring3;

const PML4: u64 = 0x1000;
const CODE: u64 = 0x10000;
const STAGING: u64 = 0x20000;
const STAGING_LEN: u64 = 0x4000;
const SYS_SIZE: u64 = 2 << 20;
const VCPUS: usize = 3;
const PORT_DONE: u16 = 0x10;
/// rep movsb; out 0x10, al; jmp back to the rep movsb.
const GUEST: [u8; 6] = [0xf3, 0xa4, 0xe6, 0x10, 0xeb, 0xfa];

/// Skips (with the reason printed) where /dev/kvm cannot be opened.
fn kvm_here(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("{test}: skipped, /dev/kvm cannot be opened here: {e}");
            false
        }
    }
}

fn block_gpa(i: usize) -> u64 {
    (i as u64 + 1) * SYS_SIZE
}

/// A VM over `mem`'s blocks whose guest writes on request.
pub(crate) struct TestVm {
    pub(crate) log: Arc<KvmDirtyLog>,
    _sys_log: Arc<KvmDirtyLog>,
    sys: ProcessMemory,
    vcpus: Vec<Mutex<VcpuFd>>,
}

impl TestVm {
    pub(crate) fn new(mem: &ProcessMemory, ring: Option<u32>) -> Arc<TestVm> {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let slots = mem
            .blocks()
            .iter()
            .enumerate()
            .map(|(i, b)| KvmSlot {
                slot: i as u32 + 1,
                guest_addr: block_gpa(i),
                block: b.clone(),
            })
            .collect();
        let log = KvmDirtyLog::new(vm.clone(), slots, ring).expect("tracked slots");
        log.set_guest_code_native(true);
        let sys = ProcessMemory::single(SYS_SIZE).unwrap();
        let sys_log = KvmDirtyLog::new(
            vm.clone(),
            vec![KvmSlot {
                slot: 0,
                guest_addr: 0,
                block: sys.blocks()[0].clone(),
            }],
            None,
        )
        .expect("system slot");
        let r = sys.blocks()[0].region();
        // Identity map of the first GiB with 2 MiB user pages.
        assert!(r.write(PML4 as usize, &((PML4 + 0x1000) | 7).to_le_bytes()));
        assert!(r.write(PML4 as usize + 0x1000, &((PML4 + 0x2000) | 7).to_le_bytes()));
        for i in 0..512u64 {
            let pde = (i << 21) | 0x87;
            assert!(r.write((PML4 + 0x2000 + i * 8) as usize, &pde.to_le_bytes()));
        }
        assert!(r.write(CODE as usize, &GUEST));
        let mut vcpus = Vec::new();
        for i in 0..VCPUS {
            let fd = vm.create_vcpu(i as u64).expect("KVM_CREATE_VCPU");
            let mut sregs = fd.get_sregs().unwrap();
            long_mode_ring3(&mut sregs, PML4);
            fd.set_sregs(&sregs).unwrap();
            vcpus.push(fd);
        }
        log.attach_vcpus(&vcpus.iter().collect::<Vec<_>>()).unwrap();
        Arc::new(TestVm {
            log,
            _sys_log: sys_log,
            sys,
            vcpus: vcpus.into_iter().map(Mutex::new).collect(),
        })
    }

    /// The guest writes `data` at `offset` of block `block`.
    pub(crate) fn guest_write(&self, block: usize, offset: u64, data: &[u8]) {
        assert!(data.len() as u64 <= STAGING_LEN, "test write too long");
        let (i, mut fd) = loop {
            if let Some(got) = self
                .vcpus
                .iter()
                .enumerate()
                .find_map(|(i, v)| v.try_lock().ok().map(|g| (i, g)))
            {
                break got;
            }
            std::thread::yield_now();
        };
        let staging = STAGING + i as u64 * STAGING_LEN;
        assert!(self.sys.blocks()[0].region().write(staging as usize, data));
        fd.set_regs(&kvm_regs {
            rip: CODE,
            rsi: staging,
            rdi: block_gpa(block) + offset,
            rcx: data.len() as u64,
            rflags: 0x3002,
            rsp: 0x8000,
            ..Default::default()
        })
        .unwrap();
        loop {
            let gen = self.log.generation();
            match fd.run() {
                Ok(VcpuExit::IoOut(PORT_DONE, _)) => {
                    // Complete the instruction before the next SET_REGS.
                    fd.set_kvm_immediate_exit(1);
                    let _ = fd.run();
                    fd.set_kvm_immediate_exit(0);
                    return;
                }
                Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                    let t = self.log.ring_full(i, &fd, gen);
                    assert!(
                        self.log.wait_harvested(t, Duration::from_secs(20)),
                        "vCPU {i}: ring full and never harvested"
                    );
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                other => panic!("vCPU {i}: unexpected exit {other:?}"),
            }
        }
    }
}

fn factory(
    mem: &ProcessMemory,
    kind: TrackerKind,
    ring: Option<u32>,
) -> (Box<dyn DirtyTracker>, Writer) {
    let vm = TestVm::new(mem, ring);
    let t = vm.log.tracker(kind).expect("tracker");
    (t, Box::new(move |b, o, d| vm.guest_write(b, o, d)))
}

fn bitmap(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
    factory(mem, TrackerKind::Bitmap, None)
}

fn manual(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
    factory(mem, TrackerKind::Manual { chunk_shift: 6 }, None)
}

fn ring(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
    factory(mem, TrackerKind::Ring, Some(4096))
}

/// Host writes (a VMM's device) through `mark_dirty`, over the KVM bitmap
/// tracker that never sees them.
fn device_writes(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, Writer) {
    let vm = TestVm::new(mem, None);
    let layout: Vec<(u64, u64)> = mem
        .blocks()
        .iter()
        .enumerate()
        .map(|(i, b)| (block_gpa(i), b.len()))
        .collect();
    let writes = DeviceWrites::new(&layout);
    let t = WithDeviceWrites::new(vm.log.tracker(TrackerKind::Bitmap).unwrap(), writes.clone());
    let blocks = mem.blocks().to_vec();
    (
        Box::new(t),
        Box::new(move |b, o, d| {
            let _keep = &vm;
            assert!(blocks[b].region().write(o as usize, d));
            assert!(writes.mark_dirty(block_gpa(b) + o, d.len() as u64));
        }),
    )
}

#[test]
fn suite_kvm_bitmap() {
    if kvm_here("suite_kvm_bitmap") {
        suite::run_all(bitmap);
    }
}

#[test]
fn suite_kvm_manual() {
    if kvm_here("suite_kvm_manual") {
        suite::run_all(manual);
    }
}

#[test]
fn suite_kvm_ring() {
    if kvm_here("suite_kvm_ring") {
        suite::run_all(ring);
    }
}

#[test]
fn suite_device_writes_over_kvm_bitmap() {
    if kvm_here("suite_device_writes_over_kvm_bitmap") {
        suite::run_all(device_writes);
    }
}

#[test]
fn host_writes_are_invisible_to_kvm() {
    // Why device writes need their own log: KVM never sees them.
    if !kvm_here("host_writes_are_invisible_to_kvm") {
        return;
    }
    let mem = ProcessMemory::single(64 * PAGE).unwrap();
    let vm = TestVm::new(&mem, None);
    let mut t = vm.log.tracker(TrackerKind::Bitmap).unwrap();
    t.start().unwrap();
    assert!(mem.blocks()[0].region().write(5 * PAGE_SIZE, &[1]));
    vm.guest_write(0, 9 * PAGE, &[1]);
    let mut bm = [DirtyBitmap::new(64)];
    assert_eq!(t.sync(&mut bm).unwrap(), 1);
    assert!(bm[0].test(9) && !bm[0].test(5));
}

#[test]
fn ring_reap_keeps_pages_for_the_next_sync() {
    if !kvm_here("ring_reap_keeps_pages_for_the_next_sync") {
        return;
    }
    let mem = ProcessMemory::new(&[("a", 64 * PAGE), ("b", 64 * PAGE)]).unwrap();
    let vm = TestVm::new(&mem, Some(4096));
    assert_eq!(vm.log.reap().unwrap(), 0, "no tracker: nothing reaped");
    let mut t = vm.log.tracker(TrackerKind::Ring).unwrap();
    t.start().unwrap();
    vm.guest_write(1, 3 * PAGE, &[1; 2 * PAGE_SIZE]);
    assert_eq!(vm.log.reap().unwrap(), 2);
    vm.guest_write(0, 0, &[1]);
    let mut bms = [DirtyBitmap::new(64), DirtyBitmap::new(64)];
    assert_eq!(t.sync(&mut bms).unwrap(), 3);
    assert!(bms[0].test(0) && bms[1].test(3) && bms[1].test(4));
    let counted: u64 = vm.log.vcpu_dirtied().unwrap().iter().sum();
    assert_eq!(counted, 3, "per-vCPU counts cover reaps and syncs");
    t.stop().unwrap();
}

#[test]
fn one_tracker_at_a_time_and_bad_setups_refused() {
    if !kvm_here("one_tracker_at_a_time_and_bad_setups_refused") {
        return;
    }
    let mem = ProcessMemory::single(64 * PAGE).unwrap();
    let vm = TestVm::new(&mem, None);
    let mut a = vm.log.tracker(TrackerKind::Bitmap).unwrap();
    let mut b = vm.log.tracker(TrackerKind::Bitmap).unwrap();
    a.start().unwrap();
    assert!(matches!(b.start(), Err(DirtyError::State { .. })));
    a.stop().unwrap();
    b.start().unwrap();
    b.stop().unwrap();
    assert!(matches!(
        vm.log.tracker(TrackerKind::Ring),
        Err(DirtyError::Unavailable { .. })
    ));
    assert!(matches!(
        vm.log.tracker(TrackerKind::Manual { chunk_shift: 31 }),
        Err(DirtyError::Mismatch { .. })
    ));
    let (kind, why) = vm.log.resolve(TrackerKind::Auto);
    assert_ne!(kind, TrackerKind::Ring, "{why}");
    // The same slot twice, and an unaligned guest address, are refused.
    let kvm = Kvm::new().unwrap();
    let vm2 = Arc::new(kvm.create_vm().unwrap());
    let s = KvmSlot {
        slot: 3,
        guest_addr: 0,
        block: mem.blocks()[0].clone(),
    };
    assert!(KvmDirtyLog::new(vm2.clone(), vec![s.clone(), s.clone()], None).is_err());
    let odd = KvmSlot {
        guest_addr: 100,
        ..s
    };
    assert!(KvmDirtyLog::new(vm2, vec![odd], None).is_err());
}

#[test]
fn manual_initially_set_leaves_pages_without_data_alone() {
    if !kvm_here("manual_initially_set_leaves_pages_without_data_alone") {
        return;
    }
    let len = 256 * PAGE;
    for mem in [
        ProcessMemory::single(len).unwrap(),
        ProcessMemory::new_memfd(&[("ram", len)]).unwrap(),
    ] {
        let vm = TestVm::new(&mem, None);
        if !vm.log.manual_protect_support().1 {
            eprintln!("skipped: initially-set manual protect not offered");
            return;
        }
        if mem.blocks()[0].data_pages(0, 256).is_none() {
            eprintln!("skipped: this kernel cannot say which pages hold data");
            return;
        }
        vm.guest_write(0, 3 * PAGE, &[1]);
        let mut t = vm
            .log
            .tracker(TrackerKind::Manual { chunk_shift: 6 })
            .unwrap();
        assert!(t.start().unwrap().initially_set);
        let sync = |t: &mut Box<dyn DirtyTracker>| {
            let mut bm = [DirtyBitmap::new(256)];
            let n = t.sync(&mut bm).unwrap();
            let pages: Vec<u64> = (0..256).filter(|&p| bm[0].test(p)).collect();
            assert_eq!(n, pages.len() as u64);
            pages
        };
        // The written page is dirty (initially set); pages without data
        // are left out.
        let first = sync(&mut t);
        assert!(first.contains(&3), "{first:?}");
        assert!(!first.contains(&100) && !first.contains(&200), "{first:?}");
        t.clear(0, 0, 256).unwrap();
        assert_eq!(
            sync(&mut t),
            Vec::<u64>::new(),
            "everything with data cleared"
        );
        // A page never cleared is reported once it holds data, until its
        // chunk is cleared; then it is protected like any other.
        vm.guest_write(0, 100 * PAGE, &[2]);
        assert_eq!(sync(&mut t), vec![100]);
        assert_eq!(sync(&mut t), vec![100], "reported until cleared");
        t.clear(0, 64, 64).unwrap();
        assert_eq!(sync(&mut t), Vec::<u64>::new());
        vm.guest_write(0, 100 * PAGE, &[3]);
        vm.guest_write(0, 3 * PAGE, &[3]);
        assert_eq!(sync(&mut t), vec![3, 100], "both re-protected");
        // A page that gains data between a sync (which left it out) and
        // a clear of its chunk: the clear must not re-protect it
        // unreported, or its write is lost.
        t.clear(0, 0, 256).unwrap();
        assert_eq!(sync(&mut t), Vec::<u64>::new());
        vm.guest_write(0, 200 * PAGE, &[4]);
        t.clear(0, 192, 64).unwrap();
        assert_eq!(sync(&mut t), vec![200], "the write after the sync");
        t.stop().unwrap();
    }
}
