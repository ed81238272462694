//! A minimal KVM VMM that migrates itself to another process: guest memory
//! is rust-vmm's `GuestMemoryMmap<AtomicBitmap>`, vCPUs are kvm-ioctls',
//! dirty pages come from livemig's KVM tracker, and a device thread's
//! writes to guest memory are tracked through vm-memory's dirty bitmap.
//!
//! ```text
//! cargo run --example kvm_vmm --features kvm,testkit -- dest   /tmp/mig.sock   # first
//! cargo run --example kvm_vmm --features kvm,testkit -- source /tmp/mig.sock
//! ```
//!
//! The guest (64-bit, ring 3: native speed even under nested kvm_pvm)
//! increments the first u64 of every page of a 16 MiB range in order,
//! forever, counting passes; it exits to the VMM (`out`) after each page,
//! which is where the VMM pauses it. A "clock" device adds one to a tick
//! count in guest memory every millisecond. Both sides print what they
//! hold, and the destination checks the guest's memory: counters
//! consistent, the source's last tick present, then the guest runs on.

use std::error::Error;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use livemig::dirty::kvm::{KvmDirtyLog, KvmSlot, TrackerKind};
use livemig::dirty::{DeviceWrites, DirtyTracker, WithDeviceWrites};
use livemig::engine::{Destination, MigrationHandle, Params, Source};
use livemig::memory::{GuestMemory, VmMemory};
use livemig::testkit::kvm_guest::long_mode_ring3;
use livemig::transport::{connect, Listener};
use livemig::vm::{VmControl, VmError};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

type Mem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

const MEM_SIZE: usize = 64 << 20;
const PML4: u64 = 0x1000;
const CODE: u64 = 0x8000;
const PASSES: u64 = 0x9000;
const CLOCK: u64 = 0xa000;
const WORK: u64 = 0x10_0000;
const PAGES: u64 = 4096;
const PORT: u16 = 0x10;

/// The guest: rsi = first page, rdx = pages, rbx = pass counter.
/// start: mov rdi, rsi; mov rcx, rdx
/// next:  inc qword [rdi]; add rdi, 4096; out 0x10, al; dec rcx; jnz next
///        inc qword [rbx]; jmp start
const GUEST: &[u8] = &[
    0x48, 0x89, 0xf7, 0x48, 0x89, 0xd1, 0x48, 0xff, 0x07, 0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00,
    0xe6, 0x10, 0x48, 0xff, 0xc9, 0x75, 0xef, 0x48, 0xff, 0x03, 0xeb, 0xe4,
];

/// Pause/stop requests and how many vCPU threads are parked.
#[derive(Default)]
struct Ctl {
    pause: bool,
    parked: bool,
    stop: bool,
}

/// What the VMM shares between its threads.
struct Vmm {
    mem: Arc<Mem>,
    /// livemig's view of the same memory: one RAM block per region.
    blocks: VmMemory,
    /// Registers the memory slot and builds the dirty trackers.
    dirty: Arc<KvmDirtyLog>,
    vcpu: Mutex<VcpuFd>,
    ctl: Mutex<Ctl>,
    cond: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vmm {
    /// Memory, the KVM slot (through livemig) and one vCPU in long-mode
    /// ring 3. Created paused.
    fn new() -> Result<Arc<Vmm>, Box<dyn Error>> {
        let kvm = Kvm::new()?;
        let vm: Arc<VmFd> = Arc::new(kvm.create_vm()?);
        let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?);
        let blocks = VmMemory::new(mem.clone())?;
        let slot = KvmSlot {
            slot: 0,
            guest_addr: 0,
            block: blocks.blocks()[0].clone(),
        };
        let dirty = KvmDirtyLog::new(vm.clone(), vec![slot], None)?;
        let vcpu = vm.create_vcpu(0)?;
        dirty.attach_vcpus(&[&vcpu])?;
        let mut sregs = vcpu.get_sregs()?;
        long_mode_ring3(&mut sregs, PML4);
        vcpu.set_sregs(&sregs)?;
        Ok(Arc::new(Vmm {
            mem,
            blocks,
            dirty,
            vcpu: Mutex::new(vcpu),
            ctl: Mutex::new(Ctl {
                pause: true,
                ..Ctl::default()
            }),
            cond: Condvar::new(),
        }))
    }

    /// Loads the guest: identity page tables (2 MiB user pages), code, registers.
    fn boot(&self) -> Result<(), Box<dyn Error>> {
        self.mem
            .write_obj((PML4 + 0x1000) | 7, GuestAddress(PML4))?;
        self.mem
            .write_obj((PML4 + 0x2000) | 7, GuestAddress(PML4 + 0x1000))?;
        for i in 0..(MEM_SIZE as u64 >> 21) {
            self.mem
                .write_obj((i << 21) | 0x87, GuestAddress(PML4 + 0x2000 + i * 8))?;
        }
        self.mem.write_slice(GUEST, GuestAddress(CODE))?;
        lock(&self.vcpu).set_regs(&kvm_regs {
            rip: CODE,
            rsi: WORK,
            rdx: PAGES,
            rbx: PASSES,
            rflags: 0x3002, // IOPL 3: `out` exits to the VMM
            ..Default::default()
        })?;
        Ok(())
    }

    /// Starts the vCPU thread and the clock device thread.
    fn start(self: &Arc<Self>) -> Vec<thread::JoinHandle<()>> {
        let (a, b) = (self.clone(), self.clone());
        vec![
            thread::spawn(move || a.run_vcpu()),
            thread::spawn(move || b.run_clock()),
        ]
    }

    fn run_vcpu(&self) {
        let mut fd = lock(&self.vcpu);
        loop {
            {
                let mut ctl = lock(&self.ctl);
                if ctl.pause || ctl.stop {
                    ctl.parked = true;
                    self.cond.notify_all();
                    drop(fd);
                    while ctl.pause && !ctl.stop {
                        ctl = self.cond.wait(ctl).unwrap_or_else(|e| e.into_inner());
                    }
                    ctl.parked = false;
                    if ctl.stop {
                        return;
                    }
                    drop(ctl);
                    fd = lock(&self.vcpu);
                }
            }
            match fd.run() {
                Ok(VcpuExit::IoOut(PORT, _)) => {
                    // Complete the `out` now, so registers read while
                    // paused are those after it.
                    fd.set_kvm_immediate_exit(1);
                    let _ = fd.run();
                    fd.set_kvm_immediate_exit(0);
                }
                Err(e) if e.errno() == libc::EINTR => {}
                other => {
                    eprintln!("vCPU stopped: {other:?}");
                    let mut ctl = lock(&self.ctl);
                    ctl.stop = true;
                    ctl.parked = true;
                    self.cond.notify_all();
                    return;
                }
            }
        }
    }

    /// The device: a tick every millisecond while running, written through
    /// vm-memory (so its dirty bitmap records it). Written under the
    /// control lock: once `pause` returns, no tick lands.
    fn run_clock(&self) {
        loop {
            let ctl = lock(&self.ctl);
            if ctl.stop {
                return;
            }
            if !ctl.pause {
                let t: u64 = self.mem.read_obj(GuestAddress(CLOCK)).unwrap_or(0);
                let _ = self.mem.write_obj(t + 1, GuestAddress(CLOCK));
            }
            drop(ctl);
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn pause(&self) -> Result<(), VmError> {
        let mut ctl = lock(&self.ctl);
        ctl.pause = true;
        while !ctl.parked {
            let (c, timeout) = self
                .cond
                .wait_timeout(ctl, Duration::from_secs(10))
                .unwrap_or_else(|e| e.into_inner());
            ctl = c;
            if timeout.timed_out() && !ctl.parked {
                return Err(VmError::pause("the vCPU did not stop within 10 s"));
            }
        }
        Ok(())
    }

    fn resume(&self) {
        lock(&self.ctl).pause = false;
        self.cond.notify_all();
    }

    fn stop(&self, threads: Vec<thread::JoinHandle<()>>) {
        lock(&self.ctl).stop = true;
        self.cond.notify_all();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }

    /// vCPU state: the registers this guest uses (the special registers
    /// are the same fixed long-mode set on both sides).
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        let r = lock(&self.vcpu).get_regs().map_err(VmError::save_state)?;
        let v = [r.rip, r.rsi, r.rdi, r.rdx, r.rcx, r.rbx, r.rflags];
        Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn restore_state(&self, b: &[u8]) -> Result<(), Box<dyn Error>> {
        if b.len() != 7 * 8 {
            return Err(format!("vCPU state of {} bytes, expected 56", b.len()).into());
        }
        let v: Vec<u64> = b
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        lock(&self.vcpu).set_regs(&kvm_regs {
            rip: v[0],
            rsi: v[1],
            rdi: v[2],
            rdx: v[3],
            rcx: v[4],
            rbx: v[5],
            rflags: v[6],
            ..Default::default()
        })?;
        Ok(())
    }

    fn read(&self, addr: u64) -> u64 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// Checks the guest's counters (all equal except a step of one where
    /// the guest is) and returns a digest of all guest memory.
    fn check_and_digest(&self) -> Result<String, String> {
        let counters: Vec<u64> = (0..PAGES).map(|p| self.read(WORK + p * 4096)).collect();
        let steps = counters.windows(2).filter(|w| w[0] != w[1]).count();
        let ok = counters
            .windows(2)
            .all(|w| w[0] == w[1] || w[0] == w[1] + 1);
        if !ok || steps > 1 {
            return Err(format!("inconsistent counters ({steps} steps)"));
        }
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        for at in (0..MEM_SIZE).step_by(buf.len()) {
            self.mem
                .read_slice(&mut buf, GuestAddress(at as u64))
                .map_err(|e| e.to_string())?;
            h.update(&buf);
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

/// The engine's view of the VMM: pause, resume, state.
struct Control(Arc<Vmm>);

impl VmControl for Control {
    fn pause(&mut self) -> Result<(), VmError> {
        self.0.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.0.resume();
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        self.0.save_state()
    }
    /// On the destination, before it answers LOADED: restore, then check
    /// the guest's memory. A guest that does not check out never runs
    /// here, and the source is told why and resumes its own.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.0
            .restore_state(state)
            .map_err(|e| VmError::restore_state(e.to_string()))?;
        let digest = self.0.check_and_digest().map_err(VmError::restore_state)?;
        println!(
            "dest: loaded passes {} tick {} digest {digest}",
            self.0.read(PASSES),
            self.0.read(CLOCK)
        );
        Ok(())
    }
}

fn source(path: &str) -> Result<(), Box<dyn Error>> {
    let vmm = Vmm::new()?;
    vmm.boot()?;
    let threads = vmm.start();
    vmm.resume();
    while vmm.read(PASSES) < 2 {
        thread::sleep(Duration::from_millis(5));
    }
    // The tracker: KVM's log for the guest's writes, vm-memory's bitmap
    // for the device's.
    let (kind, why) = vmm.dirty.resolve(TrackerKind::Auto);
    let tracker = vmm.dirty.tracker(kind)?;
    let writes = DeviceWrites::from_vm_memory(vmm.mem.clone())?;
    let mut tracker = WithDeviceWrites::new(tracker, writes);
    println!("source: tracker {} ({why})", tracker.name());
    let out = connect(&format!("unix:{path}").parse()?)?;
    let mut control = Control(vmm.clone());
    let handle = MigrationHandle::new(Params::default());
    let stats = Source::new(&vmm.blocks, &mut tracker, &mut control, handle).run_over(out)?;
    // Migrated: the source stays paused; its memory is what was sent.
    let digest = vmm.check_and_digest()?;
    println!(
        "source: migrated in {} ms, downtime {} ms, {} syncs; passes {} tick {} digest {digest}",
        stats.total_time,
        stats.downtime,
        stats.ram.dirty_sync_count,
        vmm.read(PASSES),
        vmm.read(CLOCK)
    );
    vmm.stop(threads);
    Ok(())
}

fn dest(path: &str) -> Result<(), Box<dyn Error>> {
    let vmm = Vmm::new()?;
    let listener = Listener::bind(&format!("unix:{path}").parse()?)?;
    println!("dest: listening on {path}");
    // vCPU and device threads start parked: the guest runs only when the
    // engine resumes it, after the source's GO.
    let threads = vmm.start();
    // The whole destination in one call: accept, load (page channels
    // too), restore_state, LOADED, wait for GO, resume, STARTED.
    let arrived = Destination::new(&vmm.blocks, &mut Control(vmm.clone())).accept_on(&listener)?;
    println!(
        "dest: {} bytes of stream, guest resumed {} ms after the first byte",
        arrived.load.stats.bytes,
        arrived.load_time.as_millis()
    );
    let (p0, t0) = (vmm.read(PASSES), vmm.read(CLOCK));
    while vmm.read(PASSES) < p0 + 2 || vmm.read(CLOCK) <= t0 {
        thread::sleep(Duration::from_millis(5));
    }
    vmm.pause()?;
    vmm.check_and_digest()?;
    println!(
        "dest: guest runs on: passes {} tick {}, counters consistent",
        vmm.read(PASSES),
        vmm.read(CLOCK)
    );
    vmm.stop(threads);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("source"), Some(p)) => source(p),
        (Some("dest"), Some(p)) => dest(p),
        _ => Err("usage: kvm_vmm source|dest SOCKET_PATH".into()),
    };
    if let Err(e) = r {
        eprintln!("kvm_vmm: {}", livemig::error_chain(&*e));
        std::process::exit(1);
    }
}
