//! KVM dirty tracking behind livemig's [`DirtyTracker`]: classic bitmap,
//! manual protect (optionally initially set), dirty ring.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use livemig::bitmap::DirtyBitmap;
use livemig::dirty::{DirtyError, DirtyTracker, TrackerStart};

use crate::sys;
use crate::vm::{lock, Shared, Vm, VmError};

/// Which KVM dirty-tracking backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerKind {
    /// The best default this host offers: manual protect with initially-set
    /// if offered, else the classic bitmap. Never the ring (see HOST-NOTES:
    /// the ring loses entries on this host when guest code is emulated).
    Auto,
    /// KVM_GET_DIRTY_LOG, which returns and re-protects.
    Bitmap,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET reports, CLEAR re-protects
    /// chunks of 2^`chunk_shift` pages.
    Manual {
        /// log2 of pages per clear chunk (QEMU: 18 = 1 GiB).
        chunk_shift: u32,
    },
    /// The per-vCPU dirty ring (the VM must be built with
    /// `dirty_ring_entries`).
    Ring,
}

impl TrackerKind {
    /// Default manual chunk: 2^18 pages = 1 GiB, as QEMU.
    pub const DEFAULT_CHUNK_SHIFT: u32 = 18;
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

fn os(tracker: &'static str, op: &'static str) -> impl FnOnce(VmError) -> DirtyError {
    move |e| DirtyError::Os {
        tracker,
        op,
        source: match e {
            VmError::Kvm { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        },
    }
}

fn kvm_os(tracker: &'static str, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DirtyError {
    move |e| DirtyError::Os {
        tracker,
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn check_bitmaps(
    tracker: &'static str,
    sh: &Shared,
    bitmaps: &[DirtyBitmap],
) -> Result<(), DirtyError> {
    if bitmaps.len() != sh.slots.len()
        || bitmaps
            .iter()
            .zip(&sh.slots)
            .any(|(b, s)| b.len() != s.size / 4096)
    {
        return Err(DirtyError::Mismatch {
            tracker,
            what: format!(
                "{} bitmaps do not match the {} memory slots",
                bitmaps.len(),
                sh.slots.len()
            ),
        });
    }
    Ok(())
}

/// Manual-protect support on this host: (offered, initially-set offered).
pub fn manual_protect_support(vm: &Vm) -> (bool, bool) {
    let v = vm
        .shared
        .vm_fd
        .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    (v > 0, v as u32 & KVM_DIRTY_LOG_INITIALLY_SET != 0)
}

impl Vm {
    /// Resolves [`TrackerKind::Auto`] to what this host offers, with a reason.
    pub fn resolve_tracker(&self, kind: TrackerKind) -> (TrackerKind, &'static str) {
        match kind {
            TrackerKind::Auto => match manual_protect_support(self) {
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

    /// A dirty tracker over this VM's memory (blocks = slots, in order).
    pub fn tracker(&self, kind: TrackerKind) -> Result<Box<dyn DirtyTracker>, DirtyError> {
        let sh = self.shared.clone();
        Ok(match self.resolve_tracker(kind).0 {
            TrackerKind::Auto | TrackerKind::Bitmap => {
                Box::new(BitmapTracker { sh, running: false })
            }
            TrackerKind::Manual { chunk_shift } => {
                let (ok, initially_set) = manual_protect_support(self);
                if !ok {
                    return Err(DirtyError::Unavailable {
                        tracker: MANUAL,
                        why: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered".into(),
                    });
                }
                if chunk_shift > 30 {
                    return Err(DirtyError::Mismatch {
                        tracker: MANUAL,
                        what: format!("chunk shift {chunk_shift} too large"),
                    });
                }
                Box::new(ManualTracker {
                    sh,
                    chunk_shift: chunk_shift.max(6),
                    initially_set,
                    reported: Vec::new(),
                    running: false,
                })
            }
            TrackerKind::Ring => {
                if sh.rings.is_none() {
                    return Err(DirtyError::Unavailable {
                        tracker: RING,
                        why: "the VM was built without a dirty ring (set dirty_ring_entries)"
                            .into(),
                    });
                }
                Box::new(RingTracker {
                    sh,
                    running: false,
                    full_emulated_at_start: 0,
                })
            }
        })
    }
}

fn begin(tracker: &'static str, sh: &Shared, running: &mut bool) -> Result<(), DirtyError> {
    if *running {
        return Err(DirtyError::State {
            tracker,
            what: "start called twice",
        });
    }
    if sh.tracking.swap(true, Ordering::AcqRel) {
        return Err(DirtyError::State {
            tracker,
            what: "another tracker is already running on this VM",
        });
    }
    *running = true;
    Ok(())
}

fn end(sh: &Shared, running: &mut bool) {
    if *running {
        *running = false;
        sh.tracking.store(false, Ordering::Release);
    }
}

const BITMAP: &str = "kvm-bitmap";
const MANUAL: &str = "kvm-manual";
const RING: &str = "kvm-ring";

/// Classic KVM dirty bitmap: GET_DIRTY_LOG returns and re-protects.
pub struct BitmapTracker {
    sh: Arc<Shared>,
    running: bool,
}

impl DirtyTracker for BitmapTracker {
    fn name(&self) -> &'static str {
        BITMAP
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        begin(BITMAP, &self.sh, &mut self.running)?;
        if let Err(e) = self.sh.set_log_dirty(true) {
            end(&self.sh, &mut self.running);
            return Err(os(BITMAP, "SET_USER_MEMORY_REGION(LOG_DIRTY)")(e));
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
        check_bitmaps(BITMAP, &self.sh, bitmaps)?;
        let mut n = 0;
        for (s, b) in self.sh.slots.iter().zip(bitmaps.iter_mut()) {
            let words = self
                .sh
                .vm_fd
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(kvm_os(BITMAP, "GET_DIRTY_LOG"))?;
            n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            b.or_words(0, &words);
        }
        Ok(n)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.running {
            let r = self.sh.set_log_dirty(false);
            end(&self.sh, &mut self.running);
            r.map_err(os(BITMAP, "SET_USER_MEMORY_REGION"))?;
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
pub struct ManualTracker {
    sh: Arc<Shared>,
    chunk_shift: u32,
    initially_set: bool,
    /// Per slot: bits reported by GET (or initially set) and not yet cleared.
    reported: Vec<DirtyBitmap>,
    running: bool,
}

impl ManualTracker {
    fn set_cap(&self, flags: u32) -> Result<(), DirtyError> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ..Default::default()
        };
        cap.args[0] = u64::from(flags);
        self.sh
            .vm_fd
            .enable_cap(&cap)
            .map_err(kvm_os(MANUAL, "ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))
    }
}

impl DirtyTracker for ManualTracker {
    fn name(&self) -> &'static str {
        MANUAL
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        begin(MANUAL, &self.sh, &mut self.running)?;
        let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        if self.initially_set {
            flags |= KVM_DIRTY_LOG_INITIALLY_SET;
        }
        let r = self.set_cap(flags).and_then(|_| {
            self.sh
                .set_log_dirty(true)
                .map_err(os(MANUAL, "SET_USER_MEMORY_REGION(LOG_DIRTY)"))
        });
        if let Err(e) = r {
            let _ = self.set_cap(0);
            end(&self.sh, &mut self.running);
            return Err(e);
        }
        self.reported = self
            .sh
            .slots
            .iter()
            .map(|s| {
                let pages = s.size / 4096;
                if self.initially_set {
                    DirtyBitmap::new_full(pages)
                } else {
                    DirtyBitmap::new(pages)
                }
            })
            .collect();
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
        check_bitmaps(MANUAL, &self.sh, bitmaps)?;
        let mut n = 0;
        for ((s, b), rep) in self
            .sh
            .slots
            .iter()
            .zip(bitmaps.iter_mut())
            .zip(&mut self.reported)
        {
            let words = self
                .sh
                .vm_fd
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(kvm_os(MANUAL, "GET_DIRTY_LOG"))?;
            n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            b.or_words(0, &words);
            rep.or_words(0, &words);
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
        let (Some(s), Some(rep)) = (self.sh.slots.get(block), self.reported.get_mut(block)) else {
            return Err(DirtyError::Mismatch {
                tracker: MANUAL,
                what: format!("no block {block}"),
            });
        };
        let pages = s.size / 4096;
        // Widen to whole words: only reported bits are cleared, so widening
        // never re-protects a page whose write was not yet reported.
        let first = (first_page / 64) * 64;
        let end = first_page.saturating_add(count).min(pages).div_ceil(64) * 64;
        if first >= end {
            return Ok(());
        }
        let w0 = (first / 64) as usize;
        let w1 = (end / 64) as usize;
        let words = &rep.words()[w0..w1];
        // Issue one CLEAR per run of words with any bit set.
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
            sys::clear_dirty_log(&self.sh.vm_fd, s.slot, (w0 + i) as u64 * 64, &mut chunk)
                .map_err(|source| DirtyError::Os {
                    tracker: MANUAL,
                    op: "CLEAR_DIRTY_LOG",
                    source,
                })?;
            i = j;
        }
        for p in first..end {
            rep.clear(p);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.running {
            let r = self.sh.set_log_dirty(false);
            let c = self.set_cap(0);
            end(&self.sh, &mut self.running);
            self.reported.clear();
            r.map_err(os(MANUAL, "SET_USER_MEMORY_REGION"))?;
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

/// KVM dirty ring: harvests every vCPU's ring, then resets them.
///
/// Not chosen by `auto`: on kvm_pvm hosts the ring was seen to lose entries
/// when the host emulates guest code (see HOST-NOTES).
pub struct RingTracker {
    sh: Arc<Shared>,
    running: bool,
    /// `Shared::ring_full_emulated` when tracking started.
    full_emulated_at_start: u64,
}

/// Harvests every vCPU's ring into `bitmaps` (`None`: drops the entries),
/// resets the rings, adds each ring's entries to its vCPU's dirtied count
/// (dirty-limit, dirty-rate) and wakes vCPUs waiting on a full ring.
/// Callers hold the dirty-limit pending lock, so a sync and a reap never
/// interleave.
fn harvest_rings(sh: &Shared, bitmaps: Option<&mut [DirtyBitmap]>) -> Result<u64, DirtyError> {
    let Some(rings) = &sh.rings else {
        return Ok(0);
    };
    let mut rings = lock(rings);
    let mut n = 0;
    let mut bad = 0u64;
    let mut bitmaps = bitmaps;
    for (i, r) in rings.iter_mut().enumerate() {
        let k = r.harvest(|slot, page| {
            // The low 16 bits are the slot, the high ones the address space.
            let slot = (slot & 0xffff) as usize;
            match bitmaps.as_deref_mut().and_then(|b| b.get_mut(slot)) {
                Some(b) if page < b.len() => {
                    b.set(page);
                }
                Some(_) => bad += 1,
                None => {}
            }
        });
        sh.dirty_limit.add_dirtied(i, k);
        n += k;
        // KVM stops a vCPU once its ring is 64 entries short of full: a
        // harvest that finds that many (a vCPU paused with a full ring)
        // counts like a ring-full exit.
        if k + 64 >= u64::from(r.entries()) && !sh.guest_runs_in_ring3() {
            sh.ring_full_emulated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    sys::reset_dirty_rings(&sh.vm_fd).map_err(|source| DirtyError::Os {
        tracker: RING,
        op: "RESET_DIRTY_RINGS",
        source,
    })?;
    drop(rings);
    sh.ring_harvested();
    if bad > 0 {
        return Err(DirtyError::Mismatch {
            tracker: RING,
            what: format!("{bad} ring entries outside their slot"),
        });
    }
    Ok(n)
}

/// Dirty-limit's reaper: harvests the rings between syncs into the pending
/// bitmaps, which the ring tracker's next sync hands over.
pub(crate) fn reap_to_pending(sh: &Shared) -> Result<u64, DirtyError> {
    let mut pending = sh.dirty_limit.pending();
    harvest_rings(sh, Some(&mut pending))
}

impl RingTracker {
    fn harvest(&self, bitmaps: Option<&mut [DirtyBitmap]>) -> Result<u64, DirtyError> {
        let mut pending = self.sh.dirty_limit.pending();
        let mut n = 0;
        match bitmaps {
            Some(bitmaps) => {
                // Pages reaped since the last sync (dirty-limit) first.
                for (b, p) in bitmaps.iter_mut().zip(pending.iter_mut()) {
                    let c = p.count();
                    if c > 0 {
                        n += c;
                        b.or_words(0, p.words());
                        p.clear_all();
                    }
                }
                n += harvest_rings(&self.sh, Some(bitmaps))?;
            }
            None => {
                pending.iter_mut().for_each(DirtyBitmap::clear_all);
                harvest_rings(&self.sh, None)?;
            }
        }
        Ok(n)
    }
}

impl DirtyTracker for RingTracker {
    fn name(&self) -> &'static str {
        RING
    }

    fn start(&mut self) -> Result<TrackerStart, DirtyError> {
        begin(RING, &self.sh, &mut self.running)?;
        // Drop anything left from an earlier tracking session.
        let r = self.harvest(None).and_then(|_| {
            self.sh
                .set_log_dirty(true)
                .map_err(os(RING, "SET_USER_MEMORY_REGION(LOG_DIRTY)"))
        });
        if let Err(e) = r {
            end(&self.sh, &mut self.running);
            return Err(e);
        }
        self.full_emulated_at_start = self
            .sh
            .ring_full_emulated
            .load(std::sync::atomic::Ordering::Relaxed);
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
        check_bitmaps(RING, &self.sh, bitmaps)?;
        let n = self.harvest(Some(bitmaps))?;
        // A ring that filled while the host emulated guest code may have
        // lost entries: this log cannot be trusted (the migration fails and
        // the guest runs on at the source).
        let full = self
            .sh
            .ring_full_emulated
            .load(std::sync::atomic::Ordering::Relaxed)
            - self.full_emulated_at_start;
        if full > 0 {
            return Err(DirtyError::Mismatch {
                tracker: RING,
                what: format!(
                    "a dirty ring filled {full} time(s) while the host emulated guest code \
                     (ring 0 or real mode); kvm_pvm can drop ring entries then, so this dirty \
                     log cannot be trusted: use the bitmap or manual tracker, or a larger ring \
                     (--dirty-ring)"
                ),
            });
        }
        Ok(n)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.running {
            let r = self.sh.set_log_dirty(false);
            let h = self.harvest(None);
            end(&self.sh, &mut self.running);
            r.map_err(os(RING, "SET_USER_MEMORY_REGION"))?;
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
