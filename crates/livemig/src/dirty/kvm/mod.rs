//! KVM dirty tracking (feature `kvm`): the classic dirty bitmap, manual
//! protect (optionally initially set, cleared chunk by chunk) and the
//! per-vCPU dirty ring, behind [`DirtyTracker`].
//!
//! A VMM builds one [`KvmDirtyLog`] per VM from kvm-ioctls' `VmFd` and its
//! memory slots, before it creates vCPUs (the dirty ring must be enabled
//! first), then hands it its vCPU fds ([`KvmDirtyLog::attach_vcpus`]) and
//! asks it for trackers ([`KvmDirtyLog::tracker`]):
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use livemig::dirty::kvm::{KvmDirtyLog, KvmSlot, TrackerKind};
//! use livemig::memory::{GuestMemory, ProcessMemory};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let memory = ProcessMemory::single(64 << 20)?;
//! // Registers the slot with KVM and keeps its memory mapped while it is.
//! let log = KvmDirtyLog::new(
//!     vm.clone(),
//!     vec![KvmSlot { slot: 0, guest_addr: 0, block: memory.blocks()[0].clone() }],
//!     None, // or Some(entries): the dirty ring, enabled before any vCPU exists
//! )?;
//! let vcpu = vm.create_vcpu(0)?;
//! log.attach_vcpus(&[&vcpu])?;
//! let (kind, why) = log.resolve(TrackerKind::Auto);
//! let tracker = log.tracker(kind)?; // hand it to engine::Source
//! # let _ = (tracker, why); Ok(()) }
//! ```
//!
//! The vCPU loop reports a full dirty ring (exit reason
//! [`EXIT_DIRTY_RING_FULL`], kvm-ioctls' `VcpuExit::Unsupported(31)`) with
//! [`KvmDirtyLog::ring_full`] and waits for the next harvest
//! ([`KvmDirtyLog::wait_harvested`]) before it enters the guest again.
//!
//! Writes the VMM itself makes to guest memory never reach KVM's log: wrap
//! the tracker with [`super::device::WithDeviceWrites`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{DirtyError, DirtyTracker, TrackerStart};
use crate::bitmap::DirtyBitmap;
use crate::memory::{RamBlock, PAGE_SIZE};
use crate::sys::kvm as sys;

#[cfg(test)]
mod tests;

/// `kvm_run.exit_reason` of a vCPU whose dirty ring is full
/// (`KVM_EXIT_DIRTY_RING_FULL`); kvm-ioctls reports it as
/// `VcpuExit::Unsupported(31)`.
pub const EXIT_DIRTY_RING_FULL: u32 = 31;

const BITMAP: &str = "kvm-bitmap";
const MANUAL: &str = "kvm-manual";
const RING: &str = "kvm-ring";
const KVM: &str = "kvm";
const PAGE: u64 = PAGE_SIZE as u64;

/// Which KVM dirty-tracking backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// The best default this host offers: manual protect with initially-set
    /// if offered, else the classic bitmap. Never the ring (on kvm_pvm hosts
    /// the ring loses entries when the host emulates guest code).
    Auto,
    /// KVM_GET_DIRTY_LOG, which returns and re-protects.
    Bitmap,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET reports, CLEAR re-protects
    /// chunks of 2^`chunk_shift` pages.
    Manual {
        /// log2 of pages per clear chunk (QEMU: 18 = 1 GiB; default here
        /// 14 = 64 MiB), 6..=30.
        chunk_shift: u32,
    },
    /// The per-vCPU dirty ring (the log must be built with ring entries).
    Ring,
}

impl TrackerKind {
    /// Default manual chunk: 2^14 pages = 64 MiB (QEMU's is 1 GiB).
    ///
    /// A chunk is write-protected just before the bulk stage sends its
    /// first page, so a write the guest makes before the bulk stage
    /// reaches its chunk is in the page when it is sent and is not
    /// reported again. With 1 GiB chunks a 1 GiB guest is protected whole
    /// at the first page, and every page written ahead of the bulk stage
    /// goes twice. On the harness incrementer (1 GiB, 2 channels, 30 ms
    /// limit) 64 MiB chunks sent 182-225 MiB where 1 GiB chunks sent
    /// 318 MiB (medians of 5). Smaller is not better: each CLEAR costs
    /// ~0.2-0.4 ms here whatever its size, and 2 MiB chunks (512 per GiB)
    /// halved the rate at which the bulk stage sends zero pages.
    pub const DEFAULT_CHUNK_SHIFT: u32 = 14;
}

impl std::str::FromStr for TrackerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => TrackerKind::Auto,
            "bitmap" => TrackerKind::Bitmap,
            "manual" => TrackerKind::Manual {
                chunk_shift: Self::DEFAULT_CHUNK_SHIFT,
            },
            "ring" => TrackerKind::Ring,
            _ => {
                return Err(format!(
                    "unknown dirty tracker '{s}' (auto|bitmap|manual|ring)"
                ))
            }
        })
    }
}

/// One KVM memory slot of guest RAM: its slot id, guest-physical address
/// and the host memory behind it (the livemig RAM block of the same index
/// in the tracker's block order).
#[derive(Clone, Debug)]
pub struct KvmSlot {
    /// KVM slot id (distinct per slot; need not equal the block index).
    pub slot: u32,
    /// Guest-physical start address (page aligned).
    pub guest_addr: u64,
    /// The host memory (page-aligned mapping, length a page multiple).
    pub block: RamBlock,
}

/// The dirty rings of all vCPUs and what was reaped from them.
struct Rings {
    rings: Vec<sys::DirtyRing>,
    /// Per slot: pages reaped between two tracker syncs ([`KvmDirtyLog::reap`]).
    pending: Vec<DirtyBitmap>,
}

/// One VM's dirty log: its memory slots (registered with KVM through it),
/// its optional dirty rings, and the trackers built over them.
///
/// Share it (`Arc`) between the code that migrates and the vCPU threads.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<KvmSlot>,
    ring_entries: u32,
    rings: Mutex<Rings>,
    /// Per vCPU: ring entries harvested so far (set by `attach_vcpus`).
    dirtied: OnceLock<Vec<AtomicU64>>,
    /// Bumped after every harvest; vCPUs stopped on a full ring wait on it.
    harvest_gen: Mutex<u64>,
    harvested: Condvar,
    /// Times a ring was seen full while the host may have been emulating
    /// guest code: kvm_pvm can drop ring entries then.
    full_emulated: AtomicU64,
    /// Ring entries the host counted as pushed but never published
    /// (recycled by a harvest: their pages are lost to the log).
    lost: AtomicU64,
    /// Releases of a vCPU stopped on a ring with nothing published.
    stopped_releases: AtomicU64,
    /// The VMM says its guest code runs in ring 3 (native under kvm_pvm).
    native_code: AtomicBool,
    /// Set while a tracker has log-dirty enabled (one tracker at a time).
    tracking: AtomicBool,
}

impl std::fmt::Debug for KvmDirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyLog")
            .field("slots", &self.slots)
            .field("ring_entries", &self.ring_entries)
            .finish()
    }
}

fn kvm_os(tracker: &'static str, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DirtyError {
    move |e| DirtyError::Os {
        tracker,
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn io_os(tracker: &'static str, op: &'static str) -> impl FnOnce(std::io::Error) -> DirtyError {
    move |source| DirtyError::Os {
        tracker,
        op,
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KvmDirtyLog {
    /// Registers `slots` with the VM (KVM_SET_USER_MEMORY_REGION) and, with
    /// `ring_entries` (a power of two), enables the dirty ring: call it
    /// before creating any vCPU. The log keeps the slots' memory mapped and
    /// deletes the slots when dropped.
    pub fn new(
        vm: Arc<VmFd>,
        slots: Vec<KvmSlot>,
        ring_entries: Option<u32>,
    ) -> Result<Arc<Self>, DirtyError> {
        for (i, s) in slots.iter().enumerate() {
            if slots[..i].iter().any(|o| o.slot == s.slot) {
                return Err(DirtyError::Mismatch {
                    tracker: KVM,
                    what: format!("KVM slot {} is given twice", s.slot),
                });
            }
            if s.guest_addr % PAGE != 0 {
                return Err(DirtyError::Mismatch {
                    tracker: KVM,
                    what: format!(
                        "KVM slot {}: guest address {:#x} is not page aligned",
                        s.slot, s.guest_addr
                    ),
                });
            }
        }
        let ring_entries = ring_entries.unwrap_or(0);
        if ring_entries != 0 {
            enable_dirty_ring(&vm, ring_entries)?;
        }
        let mut registered: Vec<&KvmSlot> = Vec::new();
        for s in &slots {
            if let Err(e) = sys::set_slot(&vm, s.slot, s.guest_addr, s.block.region(), false) {
                for r in registered {
                    let _ = sys::delete_slot(&vm, r.slot, r.guest_addr);
                }
                return Err(io_os(KVM, "SET_USER_MEMORY_REGION")(e));
            }
            registered.push(s);
        }
        let pending = if ring_entries != 0 {
            slots
                .iter()
                .map(|s| DirtyBitmap::new(s.block.pages()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Arc::new(KvmDirtyLog {
            vm,
            slots,
            ring_entries,
            rings: Mutex::new(Rings {
                rings: Vec::new(),
                pending,
            }),
            dirtied: OnceLock::new(),
            harvest_gen: Mutex::new(0),
            harvested: Condvar::new(),
            full_emulated: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            stopped_releases: AtomicU64::new(0),
            native_code: AtomicBool::new(false),
            tracking: AtomicBool::new(false),
        }))
    }

    /// Maps the dirty ring of each vCPU (index = position in `vcpus`, the
    /// index [`ring_full`](Self::ring_full) takes). Call once, after
    /// creating every vCPU; without a ring it only records the count.
    pub fn attach_vcpus(&self, vcpus: &[&VcpuFd]) -> Result<(), DirtyError> {
        let mut rings = Vec::new();
        if self.ring_entries != 0 {
            for v in vcpus {
                rings.push(
                    sys::DirtyRing::map(*v, self.ring_entries)
                        .map_err(io_os(RING, "mmap of the vCPU dirty ring"))?,
                );
            }
        }
        if self
            .dirtied
            .set(vcpus.iter().map(|_| AtomicU64::new(0)).collect())
            .is_err()
        {
            return Err(DirtyError::State {
                tracker: KVM,
                what: "attach_vcpus called twice",
            });
        }
        lock(&self.rings).rings = rings;
        Ok(())
    }

    /// The VM fd.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The memory slots, in block order.
    pub fn slots(&self) -> &[KvmSlot] {
        &self.slots
    }

    /// Dirty-ring entries per vCPU, if the ring is enabled.
    pub fn ring_entries(&self) -> Option<u32> {
        (self.ring_entries != 0).then_some(self.ring_entries)
    }

    /// Declares that the guest's code runs in ring 3, natively under
    /// kvm_pvm: a harvest that finds a ring full is then a vCPU that filled
    /// it and stopped, not a sign that the host's emulator dropped entries.
    /// Off by default (the safe answer for unknown guests).
    pub fn set_guest_code_native(&self, native: bool) {
        self.native_code.store(native, Ordering::Relaxed);
    }

    /// Manual-protect support on this host: (offered, initially-set offered).
    pub fn manual_protect_support(&self) -> (bool, bool) {
        let v = self
            .vm
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        (v > 0, v as u32 & KVM_DIRTY_LOG_INITIALLY_SET != 0)
    }

    /// Resolves [`TrackerKind::Auto`] to what this host offers, with a reason.
    pub fn resolve(&self, kind: TrackerKind) -> (TrackerKind, &'static str) {
        match kind {
            TrackerKind::Auto => match self.manual_protect_support() {
                (true, true) => (
                    TrackerKind::Manual {
                        chunk_shift: TrackerKind::DEFAULT_CHUNK_SHIFT,
                    },
                    "manual protect with initially-set is offered: no up-front write-protect pause",
                ),
                _ => (
                    TrackerKind::Bitmap,
                    "manual protect not offered: classic bitmap",
                ),
            },
            k => (k, "chosen explicitly"),
        }
    }

    /// A dirty tracker of `kind` over this VM's slots (blocks in slot-list
    /// order). Only one tracker may run at a time.
    pub fn tracker(
        self: &Arc<Self>,
        kind: TrackerKind,
    ) -> Result<Box<dyn DirtyTracker>, DirtyError> {
        let log = self.clone();
        Ok(match self.resolve(kind).0 {
            TrackerKind::Auto | TrackerKind::Bitmap => Box::new(BitmapTracker {
                log,
                running: false,
            }),
            TrackerKind::Manual { chunk_shift } => {
                let (ok, initially_set) = self.manual_protect_support();
                if !ok {
                    return Err(DirtyError::Unavailable {
                        tracker: MANUAL,
                        why: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered".into(),
                    });
                }
                if chunk_shift > 30 {
                    return Err(DirtyError::Mismatch {
                        tracker: MANUAL,
                        what: format!("chunk shift {chunk_shift} too large (at most 30)"),
                    });
                }
                Box::new(ManualTracker {
                    log,
                    chunk_shift: chunk_shift.max(6),
                    initially_set,
                    reported: Vec::new(),
                    initial: Vec::new(),
                    running: false,
                })
            }
            TrackerKind::Ring => {
                if self.ring_entries == 0 {
                    return Err(DirtyError::Unavailable {
                        tracker: RING,
                        why: "the VM was built without a dirty ring (give KvmDirtyLog::new ring entries)"
                            .into(),
                    });
                }
                if self.dirtied.get().is_none() {
                    return Err(DirtyError::State {
                        tracker: RING,
                        what: "the vCPUs' rings are not mapped yet (call attach_vcpus)",
                    });
                }
                Box::new(RingTracker {
                    log,
                    running: false,
                    full_at_start: 0,
                })
            }
        })
    }

    /// Whether a tracker is running on this VM.
    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    /// The harvest generation: read it from a vCPU's thread just before
    /// each KVM_RUN and give it to [`ring_full`](Self::ring_full) if that
    /// run exits on a full ring.
    pub fn generation(&self) -> u64 {
        *lock(&self.harvest_gen)
    }

    /// From vCPU `vcpu`'s thread, on exit [`EXIT_DIRTY_RING_FULL`] of a
    /// KVM_RUN entered when the harvest generation was `before_run`: records
    /// the event and returns a token for [`wait_harvested`](Self::wait_harvested)
    /// and [`release_stuck`](Self::release_stuck). Do not enter the guest
    /// again before the rings were harvested: KVM would exit at once.
    ///
    /// A vCPU not at CPL 3 was being emulated by the host (kvm_pvm emulates
    /// ring 0 and real mode), which can drop ring entries: the running ring
    /// tracker's next sync then fails rather than hand over a log that may
    /// have lost pages.
    pub fn ring_full(&self, vcpu: usize, fd: &VcpuFd, before_run: u64) -> RingFull {
        let emulated = fd.get_sregs().map_or(true, |s| s.cs.dpl != 3);
        if emulated {
            self.full_emulated.fetch_add(1, Ordering::Relaxed);
        }
        RingFull {
            vcpu,
            gen: before_run,
        }
    }

    /// From the vCPU's thread, when no harvest came after its ring-full
    /// event `t` (see [`wait_harvested`](Self::wait_harvested)): harvests
    /// the rings now (pages kept for the running tracker's next sync,
    /// dropped without one) so the vCPU can run again. A ring the host
    /// overfilled can hold nothing published while KVM counts it full;
    /// its lost entries are recycled, and a running ring tracker then
    /// refuses its log. Returns false if a harvest came meanwhile (nothing
    /// done).
    pub fn release_stuck(&self, t: RingFull) -> Result<bool, DirtyError> {
        if self.ring_entries == 0 {
            return Ok(false);
        }
        let mut guard = lock(&self.rings);
        // Under the rings lock no harvest can start: an unchanged
        // generation means no reset since the vCPU entered the run that
        // exited full, so its ring is still full now.
        if self.generation() != t.gen {
            return Ok(false);
        }
        let Rings { rings, pending } = &mut *guard;
        let into = self.is_tracking().then_some(pending);
        self.harvest_locked(rings, into, Some(t.vcpu))?;
        Ok(true)
    }

    /// True once the rings were harvested after the ring-full event `t`.
    pub fn harvested_since(&self, t: RingFull) -> bool {
        *lock(&self.harvest_gen) != t.gen
    }

    /// Waits up to `timeout` for a harvest after the ring-full event `t`;
    /// true if one happened. Wait in short steps to stay responsive to a
    /// pause request.
    pub fn wait_harvested(&self, t: RingFull, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.harvest_gen);
        while *g == t.gen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .harvested
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Ring entries the host counted as pushed but never published, over
    /// this log's life: the kvm_pvm emulator overwrote a full ring. Each
    /// also makes a running ring tracker refuse its log.
    pub fn lost_entries(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Ring entries harvested from each vCPU's ring so far (every harvest:
    /// syncs and reaps), or `None` without a ring: the per-vCPU dirty
    /// counts a dirty-limit or dirty-rate policy needs.
    pub fn vcpu_dirtied(&self) -> Option<Vec<u64>> {
        if self.ring_entries == 0 {
            return None;
        }
        Some(
            self.dirtied
                .get()?
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        )
    }

    /// Ring entries harvested so far from vCPU `vcpu`'s ring (0 without one).
    pub fn vcpu_dirtied_one(&self, vcpu: usize) -> u64 {
        self.dirtied
            .get()
            .and_then(|d| d.get(vcpu))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Harvests every vCPU's ring now, between syncs (a dirty-limit reaper,
    /// or to free vCPUs stopped on a full ring): the pages are kept and the
    /// running ring tracker's next sync hands them over. Returns the
    /// entries harvested. Without a running ring tracker, does nothing.
    pub fn reap(&self) -> Result<u64, DirtyError> {
        if self.ring_entries == 0 || !self.is_tracking() {
            return Ok(0);
        }
        let mut rings = lock(&self.rings);
        let Rings { rings, pending } = &mut *rings;
        self.harvest_locked(rings, Some(pending), None)
    }

    /// Records `n` entries of vCPU `i`'s ring the host counted as pushed
    /// but never published (it overwrote a full ring while emulating).
    fn lost_entries_of(&self, i: usize, n: u64) {
        if n == 0 {
            return;
        }
        log::warn!(
            "dirty ring of vCPU {i}: {n} entries were never published by the host \
             (ring overfilled while guest code was emulated); recycled, pages lost"
        );
        self.full_emulated.fetch_add(1, Ordering::Relaxed);
        self.lost.fetch_add(n, Ordering::Relaxed);
    }

    /// Harvests every ring into `into` (`None`: drops the entries), resets
    /// the rings and wakes vCPUs waiting on a full ring. Returns how many
    /// pages became set in `into` (entries, when dropped).
    fn harvest_locked(
        &self,
        rings: &mut [sys::DirtyRing],
        mut into: Option<&mut Vec<DirtyBitmap>>,
        stuck: Option<usize>,
    ) -> Result<u64, DirtyError> {
        let mut newly = 0;
        let mut bad = 0u64;
        let mut entries = 0;
        let native = self.native_code.load(Ordering::Relaxed);
        let keep = into.is_some();
        let mut take = |slot: u32, page: u64| {
            // The low 16 bits are the slot, the high ones the address space.
            let slot = slot & 0xffff;
            let Some(bms) = into.as_deref_mut() else {
                return;
            };
            match self.slots.iter().position(|s| s.slot == slot) {
                Some(b) if page < bms[b].len() => newly += u64::from(bms[b].set(page)),
                _ => bad += 1,
            }
        };
        let mut stopped = None;
        for (i, r) in rings.iter_mut().enumerate() {
            let h = r.harvest(&mut take);
            if stuck == Some(i) && h.entries == 0 && h.holes == 0 {
                // The vCPU is stopped on a full ring with nothing published
                // in it: released below, after the reset.
                stopped = Some(i);
            }
            self.lost_entries_of(i, h.holes);
            let k = h.entries;
            if let Some(c) = self.dirtied.get().and_then(|d| d.get(i)) {
                c.fetch_add(k, Ordering::Relaxed);
            }
            entries += k;
            // KVM stops a vCPU once its ring is 64 entries short of full; a
            // harvest that finds that many, in a guest not known to run
            // natively, counts like a ring-full exit while emulated.
            if k + 64 >= u64::from(r.entries()) && !native {
                self.full_emulated.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut reset = sys::reset_dirty_rings(&*self.vm).map_err(io_os(RING, "RESET_DIRTY_RINGS"));
        if let (Some(i), Ok(_)) = (stopped, &reset) {
            // KVM stops a vCPU at `entries - 64 - PML log size (512 at
            // most)` used: that many are surely pending.
            let r = &mut rings[i];
            let limit = r.entries().saturating_sub(64 + 512).max(1);
            let rel =
                r.release_stopped(limit, &mut take, &mut || sys::reset_dirty_rings(&*self.vm));
            match rel {
                Ok(rel) if rel.found => {
                    // A ring the host overfilled can need thousands in a
                    // row: the 1st, 2nd, 4th, ... of this VM are logged.
                    let nth = self.stopped_releases.fetch_add(1, Ordering::Relaxed) + 1;
                    if nth.is_power_of_two() {
                        log::warn!(
                            "dirty ring of vCPU {i}: stopped full with nothing published \
                             (release {nth} of this VM); the kernel's reset index was {} \
                             entries before the harvester's ({} probe resets; {} entries \
                             marked, {} in a row after it; the old release would have reset \
                             {}); {} entries reset from there, {} of them never published, {} \
                             published entries found elsewhere",
                            rel.behind,
                            rel.probes,
                            rel.marks,
                            rel.marks_after,
                            rel.old_walk,
                            rel.recycled,
                            rel.lost,
                            rel.published
                        );
                    }
                    self.full_emulated.fetch_add(1, Ordering::Relaxed);
                    self.lost.fetch_add(u64::from(rel.lost), Ordering::Relaxed);
                    entries += rel.published;
                    if let Some(c) = self.dirtied.get().and_then(|d| d.get(i)) {
                        c.fetch_add(rel.published, Ordering::Relaxed);
                    }
                }
                Ok(rel) => {
                    let nth = self.stopped_releases.fetch_add(1, Ordering::Relaxed) + 1;
                    if nth.is_power_of_two() {
                        log::error!(
                            "dirty ring of vCPU {i}: stopped full, and no entry is at the \
                             kernel's reset index ({} probe resets): the vCPU cannot be \
                             released",
                            rel.probes
                        );
                    }
                }
                Err(e) => reset = Err(io_os(RING, "RESET_DIRTY_RINGS")(e)),
            }
        }
        *lock(&self.harvest_gen) += 1;
        self.harvested.notify_all();
        reset?;
        if bad > 0 {
            return Err(DirtyError::Mismatch {
                tracker: RING,
                what: format!("{bad} ring entries outside the tracked slots"),
            });
        }
        Ok(if keep { newly } else { entries })
    }

    fn set_log_dirty(&self, on: bool) -> Result<(), DirtyError> {
        for s in &self.slots {
            sys::set_slot(&self.vm, s.slot, s.guest_addr, s.block.region(), on)
                .map_err(io_os(KVM, "SET_USER_MEMORY_REGION(LOG_DIRTY_PAGES)"))?;
        }
        Ok(())
    }

    fn check_bitmaps(
        &self,
        tracker: &'static str,
        bitmaps: &[DirtyBitmap],
    ) -> Result<(), DirtyError> {
        if bitmaps.len() != self.slots.len()
            || bitmaps
                .iter()
                .zip(&self.slots)
                .any(|(b, s)| b.len() != s.block.pages())
        {
            return Err(DirtyError::Mismatch {
                tracker,
                what: format!(
                    "{} bitmaps do not match the {} memory slots",
                    bitmaps.len(),
                    self.slots.len()
                ),
            });
        }
        Ok(())
    }

    fn begin(&self, tracker: &'static str, running: &mut bool) -> Result<(), DirtyError> {
        if *running {
            return Err(DirtyError::State {
                tracker,
                what: "start called twice",
            });
        }
        if self.tracking.swap(true, Ordering::AcqRel) {
            return Err(DirtyError::State {
                tracker,
                what: "another tracker is already running on this VM",
            });
        }
        *running = true;
        Ok(())
    }

    fn end(&self, running: &mut bool) {
        if *running {
            *running = false;
            self.tracking.store(false, Ordering::Release);
        }
    }

    /// GET_DIRTY_LOG of every slot, ORed into `bitmaps` (and `also`).
    fn get_logs(
        &self,
        tracker: &'static str,
        bitmaps: &mut [DirtyBitmap],
        mut also: Option<&mut [DirtyBitmap]>,
    ) -> Result<u64, DirtyError> {
        let mut n = 0;
        for (i, (s, b)) in self.slots.iter().zip(bitmaps.iter_mut()).enumerate() {
            let words = self
                .vm
                .get_dirty_log(s.slot, s.block.len() as usize)
                .map_err(kvm_os(tracker, "GET_DIRTY_LOG"))?;
            n += b.or_words(0, &words);
            if let Some(a) = also.as_deref_mut() {
                a[i].or_words(0, &words);
            }
        }
        Ok(n)
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        // The slots' memory may be unmapped once this log is gone.
        for s in &self.slots {
            let _ = sys::delete_slot(&self.vm, s.slot, s.guest_addr);
        }
    }
}

/// Enables the KVM dirty ring with `entries` per vCPU (a power of two);
/// only before any vCPU exists.
fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<(), DirtyError> {
    if !entries.is_power_of_two() {
        return Err(DirtyError::Mismatch {
            tracker: RING,
            what: format!("dirty ring entries {entries} is not a power of two"),
        });
    }
    let bytes = u64::from(entries) * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u64;
    let max = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING));
    if max <= 0 || bytes > max as u64 {
        return Err(DirtyError::Unavailable {
            tracker: RING,
            why: format!(
                "a dirty ring of {entries} entries is not offered (at most {} entries)",
                max.max(0) / 16
            ),
        });
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = bytes;
    vm.enable_cap(&cap).map_err(kvm_os(
        RING,
        "ENABLE_CAP(DIRTY_LOG_RING) (before any vCPU exists)",
    ))
}

/// A vCPU's ring-full event, to wait for the harvest that frees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull {
    vcpu: usize,
    /// Harvest generation when the vCPU entered the run that exited full.
    gen: u64,
}

/// Classic KVM dirty bitmap: GET_DIRTY_LOG returns and re-protects.
pub struct BitmapTracker {
    log: Arc<KvmDirtyLog>,
    running: bool,
}

impl DirtyTracker for BitmapTracker {
    fn name(&self) -> &'static str {
        BITMAP
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        self.log.begin(BITMAP, &mut self.running)?;
        if let Err(e) = self.log.set_log_dirty(true) {
            let _ = self.log.set_log_dirty(false);
            self.log.end(&mut self.running);
            return Err(e);
        }
        Ok(TrackerStart {
            initially_set: false,
        })
    }

    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        if !self.running {
            return Err(DirtyError::State {
                tracker: BITMAP,
                what: "sync before start",
            });
        }
        self.log.check_bitmaps(BITMAP, bitmaps)?;
        self.log.get_logs(BITMAP, bitmaps, None)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.running {
            let r = self.log.set_log_dirty(false);
            self.log.end(&mut self.running);
            r?;
        }
        Ok(())
    }
}

impl Drop for BitmapTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// KVM manual protect: GET reports without re-protecting; `clear` re-protects
/// exactly the pages the last GETs reported (initially: all).
///
/// Initially set, pages never written are left alone: a clear re-protects
/// only the pages the kernel says may hold data (`PAGEMAP_SCAN` for
/// private anonymous memory, `SEEK_DATA` for a memory file); the others
/// keep their log bit set from the start, which costs KVM nothing to keep
/// (no write-protect, no per-page work in CLEAR), and a sync leaves out
/// those of them that still hold no data, asked after the GET: a write
/// before that look-up shows as data, a later one at the next sync (its
/// bit is still set: a page left out is not cleared until a sync reported
/// it). An idle guest's clears and syncs then cost what it
/// wrote, not what it has. (As with any dirty log, memory that loses its
/// data under the migration — a discard — is not reported.)
pub struct ManualTracker {
    log: Arc<KvmDirtyLog>,
    chunk_shift: u32,
    initially_set: bool,
    /// Per slot: bits reported by GET (or initially set) and not yet cleared.
    reported: Vec<DirtyBitmap>,
    /// Per slot: bits still set from the initially-set start (never
    /// cleared); all clear when not initially set.
    initial: Vec<DirtyBitmap>,
    running: bool,
}

impl ManualTracker {
    fn set_cap(&self, flags: u32) -> Result<(), DirtyError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(flags);
        self.log
            .vm
            .enable_cap(&cap)
            .map_err(kvm_os(MANUAL, "ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))
    }
}

impl DirtyTracker for ManualTracker {
    fn name(&self) -> &'static str {
        MANUAL
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        self.log.begin(MANUAL, &mut self.running)?;
        let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if self.initially_set {
            flags |= KVM_DIRTY_LOG_INITIALLY_SET;
        }
        let r = self
            .set_cap(flags)
            .and_then(|_| self.log.set_log_dirty(true));
        if let Err(e) = r {
            let _ = self.log.set_log_dirty(false);
            let _ = self.set_cap(0);
            self.log.end(&mut self.running);
            return Err(e);
        }
        self.reported = self
            .log
            .slots
            .iter()
            .map(|s| {
                let pages = s.block.pages();
                if self.initially_set {
                    DirtyBitmap::new_full(pages)
                } else {
                    DirtyBitmap::new(pages)
                }
            })
            .collect();
        self.initial = self.reported.clone();
        Ok(TrackerStart {
            initially_set: self.initially_set,
        })
    }

    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        if !self.running {
            return Err(DirtyError::State {
                tracker: MANUAL,
                what: "sync before start",
            });
        }
        self.log.check_bitmaps(MANUAL, bitmaps)?;
        let mut n = 0;
        for (i, (s, b)) in self.log.slots.iter().zip(bitmaps.iter_mut()).enumerate() {
            let mut words = self
                .log
                .vm
                .get_dirty_log(s.slot, s.block.len() as usize)
                .map_err(kvm_os(MANUAL, "GET_DIRTY_LOG"))?;
            let init = &self.initial[i];
            let mut left_out = Vec::new();
            if init.count() > 0 {
                // Asked after the GET: see the type's comment.
                if let Some(data) = s.block.data_pages(0, s.block.pages()) {
                    left_out = init
                        .words()
                        .iter()
                        .zip(data.words())
                        .map(|(i, d)| i & !d)
                        .collect();
                    for (w, m) in words.iter_mut().zip(&left_out) {
                        *w &= !m;
                    }
                }
            }
            // Only what the caller hears of may be cleared: a page left out
            // here that gains data before a clear of its chunk must keep
            // its bit for the next sync, not be re-protected unreported.
            let rep = &mut self.reported[i];
            rep.and_not_words(0, &left_out);
            rep.or_words(0, &words);
            n += b.or_words(0, &words);
        }
        Ok(n)
    }

    fn clear_chunk_shift(&self) -> Option<u32> {
        Some(self.chunk_shift)
    }

    fn clear(&mut self, block: usize, first_page: u64, count: u64) -> Result<(), DirtyError> {
        if !self.running {
            return Err(DirtyError::State {
                tracker: MANUAL,
                what: "clear before start",
            });
        }
        let (Some(s), Some(rep)) = (self.log.slots.get(block), self.reported.get_mut(block)) else {
            return Err(DirtyError::Mismatch {
                tracker: MANUAL,
                what: format!("no block {block}"),
            });
        };
        let pages = s.block.pages();
        // Widen to whole words (KVM wants multiples of 64): only reported
        // bits are cleared, so widening never re-protects a page whose
        // write was not yet reported.
        let first = (first_page / 64) * 64;
        let end = first_page.saturating_add(count).min(pages).div_ceil(64) * 64;
        if first >= end {
            return Ok(());
        }
        let w0 = (first / 64) as usize;
        let w1 = (end / 64) as usize;
        let mut words = rep.words()[w0..w1].to_vec();
        let init = &mut self.initial[block];
        if init.any_in(first, end - first) {
            // Bits still set from the start stay set on pages that hold no
            // data (see the type's comment).
            if let Some(data) = s.block.data_pages(first, end.min(pages) - first) {
                for ((w, i), d) in words
                    .iter_mut()
                    .zip(&init.words()[w0..w1])
                    .zip(data.words())
                {
                    *w &= !(i & !d);
                }
            }
        }
        // One CLEAR per run of words with any bit to clear.
        let mut i = 0;
        while i < words.len() {
            if words[i] == 0 {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < words.len() && words[j] != 0 {
                j += 1;
            }
            let mut chunk = words[i..j].to_vec();
            let at = (w0 + i) as u64 * 64;
            // A multiple of 64 pages, or up to the slot's end exactly.
            let num = (chunk.len() as u64 * 64).min(pages - at);
            sys::clear_dirty_log(&*self.log.vm, s.slot, at, num, &mut chunk)
                .map_err(io_os(MANUAL, "CLEAR_DIRTY_LOG"))?;
            i = j;
        }
        rep.and_not_words(w0, &words);
        init.and_not_words(w0, &words);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.running {
            let r = self.log.set_log_dirty(false);
            let c = self.set_cap(0);
            self.log.end(&mut self.running);
            self.reported.clear();
            self.initial.clear();
            r?;
            c?;
        }
        Ok(())
    }
}

impl Drop for ManualTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// KVM dirty ring: harvests every vCPU's ring (and what
/// [`KvmDirtyLog::reap`] kept), then resets them.
///
/// Not chosen by [`TrackerKind::Auto`]: on kvm_pvm hosts the ring loses
/// entries when the host emulates guest code. A sync after a ring filled
/// while guest code was emulated fails instead of handing over a log that
/// may have lost pages.
pub struct RingTracker {
    log: Arc<KvmDirtyLog>,
    running: bool,
    /// `full_emulated` when tracking started.
    full_at_start: u64,
}

impl RingTracker {
    fn harvest(&self, bitmaps: Option<&mut [DirtyBitmap]>) -> Result<u64, DirtyError> {
        let mut guard = lock(&self.log.rings);
        let Rings { rings, pending } = &mut *guard;
        match bitmaps {
            Some(bitmaps) => {
                let mut n = 0;
                // Pages reaped since the last sync first.
                for (b, p) in bitmaps.iter_mut().zip(pending.iter_mut()) {
                    if p.count() > 0 {
                        n += b.or_words(0, p.words());
                        p.clear_all();
                    }
                }
                let mut fresh: Vec<DirtyBitmap> =
                    bitmaps.iter().map(|b| DirtyBitmap::new(b.len())).collect();
                self.log.harvest_locked(rings, Some(&mut fresh), None)?;
                for (b, f) in bitmaps.iter_mut().zip(&fresh) {
                    n += b.or_words(0, f.words());
                }
                Ok(n)
            }
            None => {
                pending.iter_mut().for_each(DirtyBitmap::clear_all);
                self.log.harvest_locked(rings, None, None)
            }
        }
    }
}

impl DirtyTracker for RingTracker {
    fn name(&self) -> &'static str {
        RING
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        self.log.begin(RING, &mut self.running)?;
        // Drop anything left from an earlier tracking session.
        let r = self
            .harvest(None)
            .and_then(|_| self.log.set_log_dirty(true));
        if let Err(e) = r {
            let _ = self.log.set_log_dirty(false);
            self.log.end(&mut self.running);
            return Err(e);
        }
        self.full_at_start = self.log.full_emulated.load(Ordering::Relaxed);
        Ok(TrackerStart {
            initially_set: false,
        })
    }

    fn sync(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<u64, DirtyError> {
        if !self.running {
            return Err(DirtyError::State {
                tracker: RING,
                what: "sync before start",
            });
        }
        self.log.check_bitmaps(RING, bitmaps)?;
        let n = self.harvest(Some(bitmaps))?;
        let full = self.log.full_emulated.load(Ordering::Relaxed) - self.full_at_start;
        if full > 0 {
            return Err(DirtyError::Mismatch {
                tracker: RING,
                what: format!(
                    "a dirty ring filled {full} time(s) while the host emulated guest code \
                     (ring 0 or real mode); kvm_pvm can drop ring entries then, so this dirty \
                     log cannot be trusted: use the bitmap or manual tracker, or a larger ring"
                ),
            });
        }
        Ok(n)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.running {
            let r = self.log.set_log_dirty(false);
            let h = self.harvest(None);
            self.log.end(&mut self.running);
            r?;
            h?;
        }
        Ok(())
    }
}

impl Drop for RingTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
