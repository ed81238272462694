//! The VM: guest memory in KVM slots, vCPU threads, pause/resume/throttle.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use livemig::dirty::kvm::{KvmDirtyLog, KvmSlot, EXIT_DIRTY_RING_FULL};
use livemig::dirty::DeviceWrites;
use livemig::engine::local::{LocalError, SharedBlock};
use livemig::engine::{pause_priority_enabled, PAUSE_NICE};
use livemig::memory::VmMemory;
use livemig::GuestMemory;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};

use crate::collapse::{CollapsePace, CollapseStats, Collapser};
use crate::devices::{ClockPage, Devices, SerialOut, CLOCK_PERIOD};
use crate::guest::{self, GuestImage, StartState};
use crate::sys;

/// Guest memory: rust-vmm's mmap backend with its dirty bitmap, so that
/// every write the VMM makes through it (device emulation) is recorded for
/// migration (KVM's dirty log sees only the guest's own writes).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// Largest batch of pages granted to the test guest per `in`.
const MAX_CREDIT: u64 = 256;
/// Throttle time slice (QEMU uses 10 ms too).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// How long `pause` waits for all vCPUs to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the vCPU stop is probed while a migration asks for it.
const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Probes the stop estimate looks back over (~2 s).
const PROBES: usize = 20;
/// How long one ask for the stop cost keeps the probes going.
const PROBE_WANTED: Duration = Duration::from_secs(3);

/// Errors of VM set-up and control.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error from KVM.
        source: io::Error,
    },
    /// The configuration cannot work.
    #[error("bad VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be mapped.
    #[error("cannot map {size} bytes of guest memory: {why}")]
    Memory {
        /// Requested size.
        size: u64,
        /// What failed.
        why: String,
    },
    /// Registering guest memory with KVM or setting up dirty tracking
    /// (the dirty ring) failed.
    #[error("KVM dirty tracking set-up: {0}")]
    Dirty(#[from] livemig::dirty::DirtyError),
    /// Loading the guest image failed.
    #[error(transparent)]
    Guest(#[from] guest::GuestError),
    /// The vCPUs did not stop in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The operation needs the VM paused.
    #[error("{0} needs the VM paused")]
    NotPaused(&'static str),
    /// A snapshot blob was rejected.
    #[error("bad VM state: {0}")]
    BadState(String),
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// OS error.
        source: io::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm {
        op,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// How to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 2 MiB), guest-physical from 0.
    pub mem_size: u64,
    /// Number of RAM blocks (KVM memory slots) the memory is split into.
    pub ram_blocks: usize,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// What to run.
    pub guest: GuestImage,
    /// Enable the KVM dirty ring with this many entries per vCPU (a power
    /// of two). Only then is the ring tracker available.
    pub dirty_ring_entries: Option<u32>,
    /// Serial port output.
    pub serial: SerialOut,
    /// Create the vCPUs parked; [`Vm::resume`] starts them.
    pub start_paused: bool,
    /// Test guest: populate its working set from the host before it runs.
    pub prefault: bool,
    /// Ask for transparent huge pages on guest memory (`MADV_HUGEPAGE`,
    /// as QEMU does): memory the guest never touched then reads as a few
    /// huge zero pages instead of one zero page per 4 KiB, so scanning an
    /// idle guest is cheaper; KVM still logs dirty pages per 4 KiB. With
    /// `receive_small_pages`, a VM created paused gets the advice only
    /// after its first resume.
    pub huge_pages: bool,
    /// A clock page the VMM writes into guest memory every millisecond
    /// while the VM runs (see [`ClockPage`]); `None`: no such device.
    pub clock_page: Option<ClockPage>,
    /// Back each RAM block with a memfd (sealed against shrinking) mapped
    /// shared, instead of anonymous memory: the memory can then be handed
    /// to another process (zero-copy local migration,
    /// `livemig::engine::local`). Huge pages (`huge_pages`) then need the
    /// kernel's shmem THP (`/sys/kernel/mm/transparent_hugepage/
    /// shmem_enabled` not `never`).
    pub memfd: bool,
    /// With `huge_pages`, a VM created paused (`start_paused`: an
    /// incoming one) receives into 4 KiB pages and asks for huge pages
    /// only after its first resume, once no userfaultfd watches its
    /// memory. Off by default: on this kind of host it fills memory the
    /// outer host took back 5-10x faster (the 64 MiB filler in 35 ms
    /// against ~100), but each 4 KiB fault costs the destination CPU,
    /// and on 2 cores, with the source's guest running flat out, that
    /// CPU came from the migration: the 1 GiB incrementer at 300 ms took
    /// 404-649 ms against 150-219 with huge pages (BENCHMARKS.md,
    /// "Quiet host after session 10's merges").
    pub receive_small_pages: bool,
    /// With `huge_pages`, a VM created paused (an incoming one) and not
    /// `receive_small_pages`: receive into 4 KiB pages when the source
    /// says its guest is idle (no vCPU busy as the migration starts: the
    /// SETUP record's load, livemig's `SourceGuest`), then ask for huge
    /// pages and collapse at the first resume as `receive_small_pages`
    /// does; into huge pages otherwise (a running guest, or a source that
    /// does not say). On by default: a halted guest leaves both cores to
    /// the migration, and this host faults fresh 4 KiB pages in 5-10x
    /// faster than fresh huge pages; a running guest's source needs the
    /// CPU those faults would take on a shared host.
    pub small_pages_when_idle: bool,
    /// With `receive_small_pages`, after that first resume, also
    /// collapse its memory into huge pages on that background thread
    /// ([`crate::collapse`]) instead of waiting for khugepaged. Anonymous
    /// memory only.
    pub thp_collapse: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: 256 << 20,
            ram_blocks: 1,
            vcpus: 1,
            guest: GuestImage::TestGuest(guest::TestGuestConfig {
                pages_per_vcpu: 1024,
                rate_bytes_per_sec: 0,
            }),
            dirty_ring_entries: None,
            serial: SerialOut::Sink,
            start_paused: false,
            prefault: false,
            huge_pages: true,
            clock_page: None,
            memfd: false,
            receive_small_pages: false,
            small_pages_when_idle: true,
            thp_collapse: true,
        }
    }
}

/// One KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// KVM slot number (= livemig block index).
    pub slot: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Ctl {
    pub(crate) pause: bool,
    pub(crate) parked: usize,
    pub(crate) dead: usize,
    pub(crate) stop: bool,
    pub(crate) errors: Vec<String>,
    /// A stop probe is out (see [`Shared::probe_stop`]): running vCPUs
    /// answer it the way they would a pause, then run on.
    pub(crate) probing: bool,
    /// The probe's number; a vCPU answers each once.
    pub(crate) probe: u64,
    /// vCPUs that answered the current probe.
    pub(crate) probe_acks: usize,
}

/// What the stop probes measured.
#[derive(Debug, Default)]
pub(crate) struct StopProbes {
    /// Round trips of the last [`PROBES`] probes, newest last.
    samples: std::collections::VecDeque<Duration>,
    /// Probes run until then (a migration keeps asking).
    wanted_until: Option<Instant>,
}

pub(crate) struct VcpuSlot {
    pub(crate) fd: Mutex<VcpuFd>,
    /// Sets `immediate_exit` in the vCPU's `kvm_run` from other threads.
    exit: sys::ExitRequest,
    thread: Mutex<Option<libc::pthread_t>>,
    /// Its kernel thread id (0 before it started), for its priority
    /// during a pause (see [`Shared::pause`]).
    tid: std::sync::atomic::AtomicI32,
    /// False for vCPUs that never run (extra vCPUs of a boot sector).
    pub(crate) active: AtomicBool,
    heartbeats: AtomicU64,
    failures: AtomicU64,
    bad_pages: AtomicU64,
    debug_last: AtomicU64,
    debug_count: AtomicU64,
    ring_full_exits: AtomicU64,
    /// The last stop probe this vCPU answered.
    probe_answered: AtomicU64,
    /// Its halts: is it idle? (see [`crate::activity`]).
    halts: crate::activity::HaltWatch,
}

pub(crate) struct Shared {
    pub(crate) ctl: Mutex<Ctl>,
    pub(crate) cond: Condvar,
    pub(crate) vcpus: Vec<VcpuSlot>,
    pub(crate) devices: Mutex<Devices>,
    pub(crate) serial_out: SerialOut,
    /// Test guest: pages per second each vCPU may write (0 = unlimited).
    pub(crate) rate_per_vcpu: AtomicU64,
    throttle: AtomicU8,
    pub(crate) memory: Arc<GuestMemoryMmap>,
    pub(crate) slots: Vec<SlotInfo>,
    /// livemig's KVM dirty log over the slots (and the dirty rings): it
    /// registered the slots and builds the trackers.
    pub(crate) dirty: Arc<KvmDirtyLog>,
    /// Pages the VMM writes itself, read from `memory`'s dirty bitmap.
    pub(crate) device_writes: DeviceWrites,
    pub(crate) config: VmConfig,
    /// Per-vCPU dirty-limit (dirty ring only).
    pub(crate) dirty_limit: crate::dirtylimit::DirtyLimit,
    /// The memory taken over from a local migration's source, when it
    /// replaced this VM's own (see [`Vm::shared_blocks`]).
    pub(crate) handed_over: Mutex<Option<Vec<SharedBlock>>>,
    /// What stopping the vCPUs costs (see [`Shared::stop_cost`]).
    pub(crate) stop_probes: Mutex<StopProbes>,
    /// What the first resume of an incoming VM does about huge pages,
    /// whichever way it comes ([`Vm::resume`], or the migration engine
    /// through [`VmHandle`]); taken by that resume.
    huge_at_resume: Mutex<Option<HugeAtResume>>,
    /// The background collapse started by that resume.
    collapser: Mutex<Option<Collapser>>,
    /// An incoming VM that picks its page size by the source's load
    /// ([`VmConfig::small_pages_when_idle`]): its memory, until the
    /// source's setup said (taken then).
    pages_by_load: Mutex<Option<HugeAtResume>>,
    /// What that setup chose: `Some(true)` 4 KiB pages (huge pages at the
    /// first resume), `Some(false)` huge pages.
    received_small: Mutex<Option<bool>>,
    /// The time base of the vCPUs' [`crate::activity::HaltWatch`]es.
    epoch: Instant,
}

/// Below this source load (hundredths of a vCPU), an incoming VM with
/// [`VmConfig::small_pages_when_idle`] receives into 4 KiB pages.
const IDLE_LOAD: u32 = 50;

/// Huge pages for an incoming VM's memory, asked for after its first
/// resume ([`crate::collapse`]).
struct HugeAtResume {
    /// The guest memory.
    blocks: Vec<livemig::memory::RamBlock>,
    /// Collapse it into huge pages too (anonymous memory).
    collapse: bool,
}

/// vCPU threads raised to the engine's [`PAUSE_NICE`] for a pause (its
/// pause threads run at the same), and their old values, put back on
/// drop. `LIVEMIG_PAUSE_PRIORITY=0` turns it off
/// ([`pause_priority_enabled`]).
struct RaisedVcpus(Vec<(i32, i32)>);

impl RaisedVcpus {
    fn raise(sh: &Shared) -> RaisedVcpus {
        if !pause_priority_enabled() {
            return RaisedVcpus(Vec::new());
        }
        let mut raised = Vec::new();
        for v in &sh.vcpus {
            let tid = v.tid.load(Ordering::Acquire);
            if tid == 0 || !v.active.load(Ordering::Acquire) {
                continue;
            }
            match sys::nice_of(tid) {
                Ok(was) if was > PAUSE_NICE => match sys::set_nice_of(tid, PAUSE_NICE) {
                    Ok(()) => raised.push((tid, was)),
                    Err(e) => {
                        log::debug!("vCPU thread {tid} stops at normal priority ({e})");
                        break;
                    }
                },
                _ => {}
            }
        }
        RaisedVcpus(raised)
    }
}

impl Drop for RaisedVcpus {
    fn drop(&mut self) {
        for &(tid, was) in &self.0 {
            let _ = sys::set_nice_of(tid, was);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn kick(&self, i: usize) {
        let v = &self.vcpus[i];
        v.exit.set(1);
        if let Some(t) = *lock(&v.thread) {
            sys::kick_thread(t);
        }
    }

    fn kick_all(&self) {
        (0..self.vcpus.len()).for_each(|i| self.kick(i));
    }

    pub(crate) fn pause(&self) -> Result<(), VmError> {
        let start = Instant::now();
        // A kicked vCPU that waits for a CPU behind other runnable threads
        // parks only once it gets one: on a loaded host that took up to
        // hundreds of ms of the pause. Until every vCPU parked, they run
        // at the pause's priority (a refusal changes nothing).
        let _raised = RaisedVcpus::raise(self);
        let mut ctl = lock(&self.ctl);
        ctl.pause = true;
        loop {
            if ctl.parked + ctl.dead >= self.vcpus.len() {
                return Ok(());
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
            ctl = self.kick_and_wait(ctl);
        }
    }

    /// Kicks every vCPU out of the guest, then waits up to 2 ms for one
    /// of them to report (pause and stop probe alike).
    fn kick_and_wait<'a>(&'a self, ctl: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
        drop(ctl);
        self.kick_all();
        self.cond
            .wait_timeout(lock(&self.ctl), Duration::from_millis(2))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    pub(crate) fn resume(&self) {
        if let Some(h) = lock(&self.huge_at_resume).take() {
            self.huge_pages_at_resume(h);
        }
        lock(&self.ctl).pause = false;
        self.cond.notify_all();
    }

    /// How busy the vCPUs are now, in hundredths of a vCPU (see
    /// [`crate::activity`]); a paused VM's vCPUs run nothing.
    fn vcpu_load(&self) -> u32 {
        {
            let ctl = lock(&self.ctl);
            if ctl.pause && ctl.parked + ctl.dead >= self.vcpus.len() {
                return 0;
            }
        }
        let now = Instant::now();
        crate::activity::load(self.vcpus.iter().map(|v| {
            (
                v.halts.idle(self.epoch, now),
                v.active.load(Ordering::Relaxed),
            )
        }))
    }

    /// The source's setup of an incoming migration: an idle guest (load
    /// under half a vCPU) is received into 4 KiB pages, huge pages asked
    /// for at the first resume; any other keeps the huge pages asked for
    /// at creation. Once per VM; before any page lands.
    fn source_setup(&self, source: &livemig::vm::SourceGuest) {
        let Some(h) = lock(&self.pages_by_load).take() else {
            return;
        };
        let small = source.load.is_some_and(|l| l < IDLE_LOAD);
        if small {
            for b in &h.blocks {
                let r = b.region();
                if let Err(e) = sys::advise_no_huge_pages(r.host_addr(), r.len() as u64) {
                    log::debug!("MADV_NOHUGEPAGE on guest memory: {e}");
                }
            }
            *lock(&self.huge_at_resume) = Some(h);
        }
        log::info!(
            "incoming: the source's guest load is {:?} (hundredths of a vCPU): receiving into {} pages",
            source.load,
            if small { "4 KiB" } else { "huge" }
        );
        *lock(&self.received_small) = Some(small);
    }

    /// An incoming VM's first resume: huge pages asked for once no
    /// userfaultfd watches the memory, and the received memory collapsed
    /// into them, on a background thread.
    fn huge_pages_at_resume(&self, h: HugeAtResume) {
        // Memory taken over from a local migration is the source's shared
        // memory, not this VM's anonymous memory.
        let collapse = h.collapse && lock(&self.handed_over).is_none();
        let spans: Vec<(u64, u64)> = h
            .blocks
            .iter()
            .map(|b| (b.region().host_addr(), b.region().len() as u64))
            .collect();
        match Collapser::start(h.blocks, collapse, CollapsePace::default()) {
            Ok(c) => *lock(&self.collapser) = Some(c),
            Err(e) => {
                log::warn!("cannot start the huge page thread: {e}");
                for (host, len) in spans {
                    advise_huge(host, len);
                }
            }
        }
    }

    /// Times what [`Shared::pause`] would cost now, without stopping the
    /// guest: every running vCPU is kicked out of KVM_RUN the same way and
    /// answers at the point where it would park (an in/out in flight
    /// completed first), then re-enters the guest. None when the VM is
    /// paused, has no running vCPU, or a pause came meanwhile.
    pub(crate) fn probe_stop(&self) -> Option<Duration> {
        let start = Instant::now();
        let mut ctl = lock(&self.ctl);
        if ctl.pause || ctl.stop || ctl.probing {
            return None;
        }
        ctl.probing = true;
        ctl.probe += 1;
        ctl.probe_acks = 0;
        let took = loop {
            let running = self.vcpus.len().saturating_sub(ctl.parked + ctl.dead);
            if running == 0 || ctl.pause || ctl.stop || start.elapsed() > PAUSE_TIMEOUT {
                break None;
            }
            if ctl.probe_acks >= running {
                break Some(start.elapsed());
            }
            ctl = self.kick_and_wait(ctl);
        };
        ctl.probing = false;
        took
    }

    /// What stopping the vCPUs costs: the slowest of the last [`PROBES`]
    /// probes (one probe now when none ran yet). Asking keeps the probes
    /// going for [`PROBE_WANTED`].
    pub(crate) fn stop_cost(&self) -> Duration {
        let first = {
            let mut p = lock(&self.stop_probes);
            p.wanted_until = Some(Instant::now() + PROBE_WANTED);
            p.samples.is_empty()
        };
        if first {
            if let Some(d) = self.probe_stop() {
                self.record_probe(d);
            }
        }
        let p = lock(&self.stop_probes);
        p.samples.iter().copied().max().unwrap_or_default()
    }

    fn record_probe(&self, took: Duration) {
        let mut p = lock(&self.stop_probes);
        if p.samples.len() == PROBES {
            p.samples.pop_front();
        }
        p.samples.push_back(took);
    }

    fn probes_wanted(&self) -> bool {
        lock(&self.stop_probes)
            .wanted_until
            .is_some_and(|t| Instant::now() < t)
    }

    pub(crate) fn is_paused(&self) -> bool {
        let ctl = lock(&self.ctl);
        ctl.pause && ctl.parked + ctl.dead >= self.vcpus.len()
    }

    fn handle_out(&self, i: usize, port: u16, data: &[u8]) {
        let v = &self.vcpus[i];
        let mut val = [0u8; 4];
        let n = data.len().min(4);
        val[..n].copy_from_slice(&data[..n]);
        let val = u32::from_le_bytes(val);
        match port {
            guest::PORT_HEARTBEAT => {
                v.heartbeats.fetch_add(1, Ordering::Relaxed);
                v.failures.store(u64::from(val), Ordering::Relaxed);
            }
            guest::PORT_BAD_PAGE => {
                if v.bad_pages.fetch_add(1, Ordering::Relaxed) < 10 {
                    log::error!("vCPU {i}: test guest page {val} came back wrong");
                }
            }
            guest::PORT_DEBUG => {
                v.debug_last.store(u64::from(val), Ordering::Relaxed);
                v.debug_count.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                lock(&self.devices).write(port, data);
            }
        }
    }

    fn handle_in(&self, i: usize, port: u16, data: &mut [u8], bucket: &mut Bucket) {
        if port == guest::PORT_CREDIT {
            let credit = bucket.take(self, i, self.rate_per_vcpu.load(Ordering::Relaxed));
            let b = (credit as u32).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&b[..n]);
            return;
        }
        if !lock(&self.devices).read(port, data) {
            data.fill(0xff);
        }
    }

    fn wants_park(&self) -> bool {
        let ctl = lock(&self.ctl);
        ctl.pause || ctl.stop
    }

    /// [`Shared::wants_park`] for vCPU `i` waiting outside the guest (page
    /// credit, throttle, dirty limit), where a pause would reach it: a
    /// stop probe is answered right here, so probing never cuts a
    /// throttle's sleep short.
    fn wants_park_answering(&self, i: usize) -> bool {
        let mut ctl = lock(&self.ctl);
        let answered = &self.vcpus[i].probe_answered;
        if ctl.probing && ctl.probe != answered.load(Ordering::Relaxed) {
            answered.store(ctl.probe, Ordering::Relaxed);
            ctl.probe_acks += 1;
            self.cond.notify_all();
        }
        ctl.pause || ctl.stop
    }
}

/// Token bucket for the test guest's page credit.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, sh: &Shared, i: usize, rate: u64) -> u64 {
        if rate == 0 {
            return MAX_CREDIT;
        }
        // Keep up to 50 ms of credit so a descheduled vCPU thread catches up.
        let burst = (rate as f64 / 20.0).max(1.0);
        let deadline = Instant::now() + Duration::from_millis(100);
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate as f64)
                .min(burst);
            self.last = now;
            if self.tokens >= 1.0 {
                let n = self.tokens.floor().min(MAX_CREDIT as f64);
                self.tokens -= n;
                return n as u64;
            }
            if now >= deadline || sh.wants_park_answering(i) {
                return 0;
            }
            let wait = ((1.0 - self.tokens) / rate as f64).clamp(0.0005, 0.005);
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// Starts one of the VM's threads, named `name`; a failure names `what`.
fn spawn(
    name: String,
    what: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, VmError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|source| VmError::Io {
            what: format!("spawning {what}"),
            source,
        })
}

fn vcpu_thread(sh: Arc<Shared>, i: usize) {
    *lock(&sh.vcpus[i].thread) = Some(sys::current_thread());
    sh.vcpus[i].tid.store(sys::current_tid(), Ordering::Release);
    // A thread id is only this thread's while it runs.
    struct ForgetTid<'a>(&'a std::sync::atomic::AtomicI32);
    impl Drop for ForgetTid<'_> {
        fn drop(&mut self) {
            self.0.store(0, Ordering::Release);
        }
    }
    let _forget = ForgetTid(&sh.vcpus[i].tid);
    let slot = &sh.vcpus[i];
    let mut bucket = Bucket {
        tokens: 0.0,
        last: Instant::now(),
    };
    let mut pending_io = false;
    let mut ring_full: Option<livemig::dirty::kvm::RingFull> = None;
    // Releases of a stopped ring since the vCPU last ran: after one that
    // did not free it, the next goes at once (a ring the host overfilled
    // can need many, each of at most a soft limit of entries).
    let mut releases = 0u64;
    let mut last_throttle = Instant::now();
    let mut pacer = crate::dirtylimit::Pacer::new();
    let mut fd = Some(lock(&slot.fd));
    loop {
        let f = fd.get_or_insert_with(|| lock(&slot.fd));
        // Reset before looking at the flags: a kick after this point is seen
        // either in the flags or by KVM_RUN.
        f.set_kvm_immediate_exit(0);
        {
            let mut ctl = lock(&sh.ctl);
            if ctl.stop {
                return;
            }
            let active = slot.active.load(Ordering::Acquire);
            let probe_due = ctl.probing && ctl.probe != slot.probe_answered.load(Ordering::Relaxed);
            if (ctl.pause || !active || probe_due) && pending_io {
                // Complete the in/out first: a pause parks with a consistent
                // saved state, and a probe answers where a pause would park.
                drop(ctl);
                f.set_kvm_immediate_exit(1);
                let _ = f.run();
                pending_io = false;
                continue;
            }
            if ctl.pause || !active {
                fd = None;
                ctl.parked += 1;
                sh.cond.notify_all();
                while (ctl.pause || !slot.active.load(Ordering::Acquire)) && !ctl.stop {
                    ctl = sh.cond.wait(ctl).unwrap_or_else(|e| e.into_inner());
                }
                ctl.parked -= 1;
                ring_full = None;
                continue;
            }
            if probe_due {
                // Where a pause would park: answer, then run on.
                slot.probe_answered.store(ctl.probe, Ordering::Relaxed);
                ctl.probe_acks += 1;
                sh.cond.notify_all();
            }
        }
        if let Some(t) = ring_full.take() {
            // Stopped on a full dirty ring: wait for the tracker's next
            // harvest, one short step at a time so a pause is still served;
            // if none comes (no tracker runs any more, or the host lost the
            // ring's entries so no harvest can drain it), harvest it here.
            let wait = if releases > 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(10)
            };
            if !sh.dirty.wait_harvested(t, wait) {
                match sh.dirty.release_stuck(t) {
                    Ok(true) => releases += 1,
                    Ok(false) => {}
                    Err(e) => log::warn!("vCPU {i}: releasing a full dirty ring: {e}"),
                }
                if sh.wants_park() {
                    continue;
                }
            }
        }
        let pct = sh.throttle.load(Ordering::Relaxed);
        if pct > 0 && last_throttle.elapsed() >= THROTTLE_SLICE {
            let sleep = THROTTLE_SLICE.mul_f64(f64::from(pct) / f64::from(100 - pct.min(99)));
            let until = Instant::now() + sleep;
            while Instant::now() < until && !sh.wants_park_answering(i) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(5)));
            }
            last_throttle = Instant::now();
            continue;
        }
        if let Some(wait) = pacer.delay(&sh, i) {
            // Over its dirty limit: wait the debt off, then look again.
            let t = Instant::now();
            let until = t + wait;
            while Instant::now() < until && !sh.wants_park_answering(i) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(5)));
            }
            crate::dirtylimit::Pacer::waited(&sh.dirty_limit, i, t.elapsed());
            continue;
        }
        let gen = sh.dirty.generation();
        let exit = f.run();
        pending_io = false;
        if releases > 0 && !matches!(exit, Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL))) {
            if releases > 1 {
                log::warn!("vCPU {i}: runs again after {releases} releases of its full dirty ring");
            }
            releases = 0;
        }
        if matches!(exit, Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..))) {
            slot.halts.ran();
        }
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                sh.handle_out(i, port, data);
                pending_io = true;
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                sh.handle_in(i, port, data, &mut bucket);
                pending_io = true;
            }
            Ok(VcpuExit::Hlt) => {
                slot.halts.halted(sh.epoch, Instant::now());
                std::thread::sleep(Duration::from_millis(1))
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                slot.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                // livemig records whether the host was emulating the guest
                // (then the ring may have lost entries) and frees us at the
                // next harvest.
                ring_full = Some(sh.dirty.ring_full(i, f, gen));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            other => {
                let what = format!("{other:?}");
                let rip = f.get_regs().map(|r| r.rip).unwrap_or(0);
                let msg = format!("vCPU {i} stopped: {what} at rip {rip:#x}");
                log::error!("{msg}");
                drop(fd);
                let mut ctl = lock(&sh.ctl);
                ctl.errors.push(msg);
                ctl.dead += 1;
                sh.cond.notify_all();
                return;
            }
        }
    }
}

/// Runs the clock page device: a tick every [`CLOCK_PERIOD`] while the VM
/// runs. The tick is written under the control lock, so once `pause` has
/// set its flag no tick lands until the VM resumes.
fn clock_thread(sh: Arc<Shared>, clock: ClockPage) {
    loop {
        let ctl = lock(&sh.ctl);
        if ctl.stop {
            return;
        }
        if !ctl.pause {
            clock.tick(&sh.memory);
        }
        drop(ctl);
        std::thread::sleep(CLOCK_PERIOD);
    }
}

/// Probes the vCPU stop every [`PROBE_PERIOD`] while a migration asks
/// what it costs ([`Shared::stop_cost`]).
fn probe_thread(sh: Arc<Shared>) {
    let mut next = Instant::now();
    loop {
        let mut ctl = lock(&sh.ctl);
        loop {
            let now = Instant::now();
            if ctl.stop {
                return;
            }
            if now >= next {
                break;
            }
            ctl = sh
                .cond
                .wait_timeout(ctl, next - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(ctl);
        next = Instant::now() + PROBE_PERIOD;
        if sh.probes_wanted() {
            if let Some(d) = sh.probe_stop() {
                sh.record_probe(d);
            }
        }
    }
}

fn throttle_thread(sh: Arc<Shared>) {
    loop {
        let ctl = lock(&sh.ctl);
        if ctl.stop {
            return;
        }
        if sh.throttle.load(Ordering::Relaxed) == 0 {
            let _ = sh.cond.wait_timeout(ctl, Duration::from_millis(50));
            continue;
        }
        drop(ctl);
        sh.kick_all();
        std::thread::sleep(THROTTLE_SLICE);
    }
}

/// Status of one vCPU of the test guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuStatus {
    /// Heartbeats seen by this VMM instance.
    pub heartbeats: u64,
    /// The guest's own count of pages that came back wrong.
    pub failures: u64,
    /// Pages the guest has written (read from its mailbox; survives migration).
    pub pages_written: u64,
    /// Bad-page reports seen by this VMM instance.
    pub bad_page_reports: u64,
    /// Times the vCPU stopped because its dirty ring was full.
    pub ring_full_exits: u64,
    /// Last value written to the debug port 0xe9 and how many writes.
    pub debug: (u64, u64),
}

/// What the guest reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStatus {
    /// Per-vCPU status.
    pub vcpus: Vec<VcpuStatus>,
    /// vCPUs that stopped on an error, with the reason.
    pub errors: Vec<String>,
    /// Dirty-ring entries the host lost (it overwrote a full ring while
    /// emulating guest code); livemig recycled them so the vCPUs run on.
    pub dirty_ring_lost: u64,
}

impl GuestStatus {
    /// Sum of heartbeats over vCPUs.
    pub fn heartbeats(&self) -> u64 {
        self.vcpus.iter().map(|v| v.heartbeats).sum()
    }
    /// Sum of self-check failures (the guest's count and bad-page reports).
    pub fn failures(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| v.failures.max(v.bad_page_reports))
            .sum()
    }
    /// Sum of pages written.
    pub fn pages_written(&self) -> u64 {
        self.vcpus.iter().map(|v| v.pages_written).sum()
    }
    /// True when no vCPU failed and the self-check found nothing.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.failures() == 0
    }
}

/// A running KVM virtual machine.
pub struct Vm {
    pub(crate) shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    livemig_memory: Arc<VmMemory>,
}

/// Asks for transparent huge pages on `len` bytes at `host`; advice only:
/// without THP the memory works the same.
fn advise_huge(host: u64, len: u64) {
    if let Err(e) = sys::advise_huge_pages(host, len) {
        log::debug!("MADV_HUGEPAGE on guest memory: {e}");
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("slots", &self.shared.slots)
            .finish()
    }
}

impl Vm {
    /// Creates the VM, loads the guest and starts the vCPU threads (parked
    /// if `config.start_paused`).
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        const TWO_MIB: u64 = 2 << 20;
        if config.mem_size == 0 || !config.mem_size.is_multiple_of(TWO_MIB) {
            return Err(VmError::Config(format!(
                "memory size {} is not a non-zero multiple of 2 MiB",
                config.mem_size
            )));
        }
        if config.vcpus == 0 || config.vcpus > 64 {
            return Err(VmError::Config("vCPUs must be 1..=64".into()));
        }
        let nblocks = config.ram_blocks.max(1) as u64;
        let chunks = config.mem_size / TWO_MIB;
        if nblocks > chunks || nblocks > 32 {
            return Err(VmError::Config(format!(
                "cannot split memory into {nblocks} blocks"
            )));
        }
        sys::install_kick_handler().map_err(|source| VmError::Io {
            what: "installing the vCPU kick signal handler".into(),
            source,
        })?;

        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("CREATE_VM"))?);
        let _ = vm_fd.set_tss_address(0xfffb_d000);

        // Memory: `nblocks` ranges of whole 2 MiB chunks, contiguous from 0.
        let mut ranges = Vec::new();
        let mut at = 0u64;
        for b in 0..nblocks {
            let n = chunks / nblocks + u64::from(b < chunks % nblocks);
            ranges.push((GuestAddress(at), (n * TWO_MIB) as usize));
            at += n * TWO_MIB;
        }
        let mut with_files = Vec::with_capacity(ranges.len());
        for (i, (gpa, size)) in ranges.iter().enumerate() {
            let file = match config.memfd {
                true => Some(FileOffset::new(
                    livemig::memory::create_memfd(&format!("minivm-ram{i}"), *size as u64)
                        .map_err(|e| VmError::Memory {
                            size: *size as u64,
                            why: format!("creating the memfd: {e}"),
                        })?,
                    0,
                )),
                false => None,
            };
            with_files.push((*gpa, *size, file));
        }
        let memory = Arc::new(
            GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(|e| VmError::Memory {
                size: config.mem_size,
                why: e.to_string(),
            })?,
        );
        let mut slots = Vec::new();
        // An incoming VM asks for huge pages after its first resume.
        let deferred_huge = config.huge_pages && config.start_paused && config.receive_small_pages;
        for (i, (gpa, size)) in ranges.iter().enumerate() {
            let host = memory.get_host_address(*gpa).map_err(|e| VmError::Memory {
                size: *size as u64,
                why: e.to_string(),
            })?;
            // An incoming VM receives into 4 KiB pages and asks for huge
            // pages after its first resume: a fresh huge page on memory
            // this host handed back to its own host is cleared 5-10x
            // slower than the 4 KiB pages it replaces (BENCHMARKS.md, the
            // filler into a 4 KiB destination).
            if config.huge_pages && !deferred_huge {
                advise_huge(host as u64, *size as u64);
            }
            slots.push(SlotInfo {
                slot: i as u32,
                gpa: gpa.0,
                size: *size as u64,
                host_addr: host as u64,
            });
        }
        // livemig registers the slots with KVM (and keeps their memory
        // mapped while they are), and enables the dirty ring, which must
        // come before any vCPU exists.
        let livemig_memory =
            Arc::new(VmMemory::new(memory.clone()).map_err(|e| VmError::Memory {
                size: config.mem_size,
                why: e.to_string(),
            })?);
        let huge_at_resume = deferred_huge.then(|| HugeAtResume {
            blocks: livemig_memory.blocks().to_vec(),
            collapse: config.thp_collapse && !config.memfd,
        });
        // Advised huge above; the source's setup may take it back.
        let pages_by_load = (config.huge_pages
            && config.start_paused
            && !config.receive_small_pages
            && config.small_pages_when_idle)
            .then(|| HugeAtResume {
                blocks: livemig_memory.blocks().to_vec(),
                collapse: config.thp_collapse && !config.memfd,
            });
        let kvm_slots = livemig_memory
            .blocks()
            .iter()
            .zip(&slots)
            .map(|(b, s)| KvmSlot {
                slot: s.slot,
                guest_addr: s.gpa,
                block: b.clone(),
            })
            .collect();
        let ring_entries = config.dirty_ring_entries.unwrap_or(0);
        let dirty = KvmDirtyLog::new(vm_fd.clone(), kvm_slots, config.dirty_ring_entries)?;
        let device_writes = DeviceWrites::from_vm_memory(memory.clone())?;

        let starts = guest::load(&config.guest, &memory, config.mem_size, config.vcpus)?;
        if let GuestImage::TestGuest(t) = &config.guest {
            if config.prefault {
                // First touch from inside this nested guest costs ~80 us a page;
                // populating from the host first is far cheaper.
                let end = guest::test_guest_bytes(t, config.vcpus);
                for s in &slots {
                    let lo = s.gpa.max(guest::WORK_ADDR);
                    let hi = (s.gpa + s.size).min(end);
                    if lo < hi {
                        sys::populate_write(s.host_addr + (lo - s.gpa), hi - lo).map_err(
                            |source| VmError::Io {
                                what: "pre-faulting the test guest's working set".into(),
                                source,
                            },
                        )?;
                    }
                }
            }
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for (i, start) in starts.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(i as u64)
                .map_err(kvm_err("CREATE_VCPU"))?;
            let mut c = cpuid.clone();
            for e in c.as_mut_slice() {
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00ff_ffff) | ((i as u32) << 24);
                }
            }
            fd.set_cpuid2(&c).map_err(kvm_err("SET_CPUID2"))?;
            if let Some(StartState { regs, mode }) = start {
                let mut sregs = fd.get_sregs().map_err(kvm_err("GET_SREGS"))?;
                guest::setup_sregs(*mode, &mut sregs);
                fd.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))?;
                fd.set_regs(regs).map_err(kvm_err("SET_REGS"))?;
            }
            let exit = sys::ExitRequest::map(&fd).map_err(|source| VmError::Kvm {
                op: "mmap kvm_run",
                source,
            })?;
            let active = start.is_some() || config.guest == GuestImage::Incoming;
            vcpus.push(VcpuSlot {
                fd: Mutex::new(fd),
                exit,
                thread: Mutex::new(None),
                tid: std::sync::atomic::AtomicI32::new(0),
                active: AtomicBool::new(active),
                heartbeats: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                bad_pages: AtomicU64::new(0),
                debug_last: AtomicU64::new(0),
                debug_count: AtomicU64::new(0),
                ring_full_exits: AtomicU64::new(0),
                probe_answered: AtomicU64::new(0),
                halts: Default::default(),
            });
        }
        let rate = match &config.guest {
            GuestImage::TestGuest(t) if t.rate_bytes_per_sec > 0 => {
                (t.rate_bytes_per_sec / 4096 / config.vcpus as u64).max(1)
            }
            _ => 0,
        };
        let devices = Devices::new(&config.serial).map_err(|source| VmError::Io {
            what: "opening the serial output".into(),
            source,
        })?;
        let vcpus_len = vcpus.len();
        let fds: Vec<MutexGuard<'_, VcpuFd>> = vcpus.iter().map(|v| lock(&v.fd)).collect();
        dirty.attach_vcpus(&fds.iter().map(|g| &**g).collect::<Vec<_>>())?;
        drop(fds);
        // The built-in test guest and long-mode ring-3 images run natively
        // under kvm_pvm: a full ring found at a harvest is then no sign of
        // lost entries.
        dirty.set_guest_code_native(matches!(
            config.guest,
            GuestImage::TestGuest(_)
                | GuestImage::Flat {
                    mode: crate::guest::CpuMode::LongRing3,
                    ..
                }
        ));
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                pause: config.start_paused,
                ..Default::default()
            }),
            cond: Condvar::new(),
            vcpus,
            devices: Mutex::new(devices),
            serial_out: config.serial.clone(),
            rate_per_vcpu: AtomicU64::new(rate),
            throttle: AtomicU8::new(0),
            memory,
            slots,
            dirty,
            device_writes,
            dirty_limit: crate::dirtylimit::DirtyLimit::new(vcpus_len),
            handed_over: Mutex::new(None),
            stop_probes: Mutex::new(StopProbes::default()),
            huge_at_resume: Mutex::new(huge_at_resume),
            collapser: Mutex::new(None),
            pages_by_load: Mutex::new(pages_by_load),
            received_small: Mutex::new(None),
            epoch: Instant::now(),
            config,
        });
        let mut threads = Vec::new();
        for i in 0..shared.vcpus.len() {
            let sh = shared.clone();
            threads.push(spawn(format!("vcpu{i}"), "a vCPU thread", move || {
                vcpu_thread(sh, i)
            })?);
        }
        let sh = shared.clone();
        threads.push(spawn(
            "throttle".into(),
            "the throttle thread",
            move || throttle_thread(sh),
        )?);
        let sh = shared.clone();
        threads.push(spawn(
            "stop-probe".into(),
            "the vCPU stop probe",
            move || probe_thread(sh),
        )?);
        if let Some(clock) = shared.config.clock_page {
            let sh = shared.clone();
            threads.push(spawn(
                "clock-page".into(),
                "the clock page device",
                move || clock_thread(sh, clock),
            )?);
        }
        if ring_entries != 0 {
            let sh = shared.clone();
            threads.push(spawn(
                "dirty-limit-reaper".into(),
                "the dirty-limit reaper",
                move || crate::dirtylimit::reaper_thread(sh),
            )?);
        }
        let vm = Vm {
            shared,
            threads,
            livemig_memory,
        };
        if vm.shared.config.start_paused {
            vm.pause()?;
        }
        Ok(vm)
    }

    /// Guest memory as livemig sees it: one RAM block per KVM slot, in slot
    /// order, named `ram@<guest address in hex>`.
    pub fn memory(&self) -> Arc<VmMemory> {
        self.livemig_memory.clone()
    }

    /// Guest memory as it can be handed to another process: the blocks
    /// with their memfds. Fails for anonymous memory (a VM built without
    /// [`VmConfig::memfd`] that has not taken over a local migration's).
    pub fn shared_blocks(&self) -> Result<Vec<SharedBlock>, LocalError> {
        if let Some(b) = lock(&self.shared.handed_over).as_ref() {
            return Ok(b.clone());
        }
        livemig::engine::local::shared_blocks(&*self.livemig_memory)
    }

    /// Maps a local migration's memory in place of this VM's own (same
    /// layout; the VM paused). Nothing is written to it.
    pub fn adopt_memory(&self, blocks: &[SharedBlock]) -> Result<(), VmError> {
        if !self.is_paused() {
            return Err(VmError::NotPaused("taking over a local migration's memory"));
        }
        livemig::engine::local::adopt_memory(&*self.livemig_memory, blocks).map_err(|e| {
            VmError::Memory {
                size: self.shared.config.mem_size,
                why: livemig::error_chain(&e),
            }
        })?;
        *lock(&self.shared.handed_over) = Some(blocks.to_vec());
        Ok(())
    }

    /// Undoes [`Vm::adopt_memory`]: fresh memory of this VM's own in place
    /// of the source's, none of which is written.
    pub fn release_memory(&self) {
        let mem = &*self.livemig_memory;
        livemig::engine::local::release_memory(mem, mem.blocks().len());
        *lock(&self.shared.handed_over) = None;
    }

    /// Guest memory as rust-vmm's `GuestMemoryMmap`.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.shared.memory
    }

    /// The clock page device's tick count in guest memory (0 without one).
    pub fn clock_ticks(&self) -> u64 {
        self.shared
            .config
            .clock_page
            .map_or(0, |c| c.ticks(&self.shared.memory))
    }

    /// The KVM memory slots.
    pub fn slots(&self) -> &[SlotInfo] {
        &self.shared.slots
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmConfig {
        &self.shared.config
    }

    /// Stops all vCPUs; returns once none is inside KVM_RUN.
    pub fn pause(&self) -> Result<(), VmError> {
        self.shared.pause()
    }

    /// The nice value of each vCPU thread (`None` for one not running):
    /// a pause raises them while it stops them and puts them back.
    pub fn vcpu_nice(&self) -> Vec<Option<i32>> {
        self.shared
            .vcpus
            .iter()
            .map(|v| match v.tid.load(Ordering::Acquire) {
                0 => None,
                tid => sys::nice_of(tid).ok(),
            })
            .collect()
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.shared.resume()
    }

    /// For an incoming VM that picks its page size by the source's load
    /// ([`VmConfig::small_pages_when_idle`]): what the source's setup
    /// chose, `Some(true)` 4 KiB pages, `Some(false)` huge pages; `None`
    /// before a setup came (or for any other VM).
    pub fn received_into_small_pages(&self) -> Option<bool> {
        *lock(&self.shared.received_small)
    }

    /// How busy this VM's vCPUs are now, in hundredths of a vCPU (0: all
    /// halted or the VM paused), as a migration's setup sends it.
    pub fn vcpu_load(&self) -> u32 {
        self.shared.vcpu_load()
    }

    /// What the background thread that asks for huge pages on an incoming
    /// VM's memory and collapses it ([`VmConfig::thp_collapse`]) did so
    /// far; `None` before the first resume or for a VM created running.
    pub fn collapse_stats(&self) -> Option<CollapseStats> {
        lock(&self.shared.collapser).as_ref().map(Collapser::stats)
    }

    /// True while that thread runs (one thread of this VM's besides its
    /// vCPUs and devices).
    pub fn collapse_running(&self) -> bool {
        lock(&self.shared.collapser)
            .as_ref()
            .is_some_and(|c| !c.is_done())
    }

    /// Stops the background collapse of this VM's memory into huge pages,
    /// if one runs (between two 2 MiB chunks); what it did stays readable
    /// with [`Vm::collapse_stats`].
    pub fn stop_collapse(&self) {
        if let Some(c) = lock(&self.shared.collapser).as_mut() {
            c.stop();
        }
    }

    /// True when paused and every vCPU is parked.
    pub fn is_paused(&self) -> bool {
        self.shared.is_paused()
    }

    /// Each vCPU sleeps `percent`% (0..=99) of every 10 ms time slice.
    pub fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        self.shared.cond.notify_all();
    }

    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::Relaxed)
    }

    /// Test guest: total bytes per second all vCPUs may write (0 = unlimited).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let per = bytes_per_sec / 4096 / self.shared.vcpus.len() as u64;
        // A non-zero rate below one page per second per vCPU still means "slow".
        let per = if bytes_per_sec > 0 { per.max(1) } else { 0 };
        self.shared.rate_per_vcpu.store(per, Ordering::Relaxed);
    }

    /// Test guest: the write rate in pages per second per vCPU (0 = unlimited).
    /// It travels with the guest in the migrated state.
    pub fn rate_pages_per_vcpu(&self) -> u64 {
        self.shared.rate_per_vcpu.load(Ordering::Relaxed)
    }

    /// What the guest reports (heartbeats, self-check, vCPU errors).
    pub fn guest_status(&self) -> GuestStatus {
        let layout = matches!(
            &self.shared.config.guest,
            GuestImage::TestGuest(_) | GuestImage::Incoming
        );
        let vcpus = self
            .shared
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mailbox = guest::MAILBOX_ADDR + i as u64 * 4096;
                let read = |off: u64| -> u64 {
                    if !layout {
                        return 0;
                    }
                    self.shared
                        .memory
                        .read_obj::<u64>(GuestAddress(mailbox + off))
                        .unwrap_or(0)
                };
                VcpuStatus {
                    heartbeats: v.heartbeats.load(Ordering::Relaxed),
                    failures: v
                        .failures
                        .load(Ordering::Relaxed)
                        .max(read(guest::MAILBOX_FAILURES)),
                    pages_written: read(guest::MAILBOX_PAGES_WRITTEN),
                    bad_page_reports: v.bad_pages.load(Ordering::Relaxed),
                    ring_full_exits: v.ring_full_exits.load(Ordering::Relaxed),
                    debug: (
                        v.debug_last.load(Ordering::Relaxed),
                        v.debug_count.load(Ordering::Relaxed),
                    ),
                }
            })
            .collect();
        GuestStatus {
            vcpus,
            errors: lock(&self.shared.ctl).errors.clone(),
            dirty_ring_lost: self.shared.dirty.lost_entries(),
        }
    }

    /// Writes `size` bytes of guest memory from guest address `addr` to
    /// `path` (like QEMU's `pmemsave`). Works running or paused; while
    /// running, the copy is a moving picture.
    pub fn dump_memory(&self, addr: u64, size: u64, path: &Path) -> Result<(), VmError> {
        use std::io::Write;
        let io_err = |source| VmError::Io {
            what: format!("dumping guest memory to {}", path.display()),
            source,
        };
        let end = addr
            .checked_add(size)
            .filter(|e| *e <= self.shared.config.mem_size);
        if end.is_none() {
            return Err(VmError::Config(format!(
                "dump range {addr:#x}+{size:#x} is outside guest memory"
            )));
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_err)?);
        let mut buf = vec![0u8; 1 << 20];
        let mut at = addr;
        while at < addr + size {
            let n = (addr + size - at).min(buf.len() as u64) as usize;
            self.shared
                .memory
                .read_slice(&mut buf[..n], GuestAddress(at))
                .map_err(|e| VmError::Memory {
                    size,
                    why: e.to_string(),
                })?;
            f.write_all(&buf[..n]).map_err(io_err)?;
            at += n as u64;
        }
        f.flush().map_err(io_err)
    }

    /// A handle implementing livemig's `VmControl` for the migration engine.
    pub fn control(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stopped first: it works on this VM's memory.
        drop(lock(&self.shared.collapser).take());
        lock(&self.shared.ctl).stop = true;
        self.shared.cond.notify_all();
        self.shared.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The source side's control of a [`Vm`], handed to the migration engine.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmHandle")
    }
}

impl livemig::vm::VmControl for VmHandle {
    fn pause(&mut self) -> Result<(), livemig::vm::VmError> {
        self.shared.pause().map_err(livemig::vm::VmError::pause)
    }
    fn resume(&mut self) -> Result<(), livemig::vm::VmError> {
        self.shared.resume();
        Ok(())
    }
    fn set_throttle(&mut self, percent: u8) {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        self.shared.cond.notify_all();
    }
    fn save_state(&mut self) -> Result<Vec<u8>, livemig::vm::VmError> {
        crate::state::save(&self.shared).map_err(livemig::vm::VmError::save_state)
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), livemig::vm::VmError> {
        if state.is_empty() {
            return Err(livemig::vm::VmError::restore_state(
                crate::migrate::MigrateError::NoState,
            ));
        }
        crate::state::restore(&self.shared, state).map_err(livemig::vm::VmError::restore_state)
    }
    fn shape(&self) -> livemig::vm::VmShape {
        livemig::vm::VmShape {
            vcpus: u32::try_from(self.shared.vcpus.len()).unwrap_or(u32::MAX),
        }
    }
    fn stop_cost(&self) -> Duration {
        self.shared.stop_cost()
    }
    fn vcpu_load(&self) -> Option<u32> {
        Some(self.shared.vcpu_load())
    }
    fn setup_hook(&self) -> Option<livemig::vm::SetupHook> {
        let sh = self.shared.clone();
        Some(Box::new(move |source| sh.source_setup(source)))
    }
}
