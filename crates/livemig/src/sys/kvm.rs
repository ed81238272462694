//! The KVM ioctls and mappings kvm-ioctls 0.25 lacks (CLEAR_DIRTY_LOG,
//! RESET_DIRTY_RINGS, the per-vCPU dirty-ring mapping), and memory-slot
//! registration over a [`RawRegion`].

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_gfn, kvm_userspace_memory_region, KVMIO, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use super::mmap::RawRegion;

mod nr {
    //! Request numbers kvm-ioctls does not define.
    #![allow(missing_docs)]
    use super::*;
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// A dirty-ring entry the kernel has filled and userspace not yet harvested.
const GFN_F_DIRTY: u32 = 1;
/// Userspace has harvested the entry; the next RESET_DIRTY_RINGS recycles it.
const GFN_F_RESET: u32 = 2;

/// KVM_SET_USER_MEMORY_REGION for `slot` at guest address `gpa` over all of
/// `region`, with or without dirty logging.
///
/// Callers (the KVM dirty log) keep a clone of `region` for as long as the
/// slot is registered and delete the slot ([`delete_slot`]) before letting
/// it go, so KVM never maps memory that was unmapped.
pub(crate) fn set_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    region: &RawRegion,
    log_dirty: bool,
) -> io::Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: gpa,
        memory_size: region.len() as u64,
        userspace_addr: region.host_addr(),
    };
    // SAFETY: `region` is mapped read/write for as long as its owner lives;
    // the caller holds a clone of it while the slot is registered (see the
    // function's doc) and deletes the slot before dropping it.
    unsafe { vm.set_user_memory_region(r) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Deletes `slot` (KVM_SET_USER_MEMORY_REGION with size 0).
pub(crate) fn delete_slot(vm: &VmFd, slot: u32, gpa: u64) -> io::Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a zero-sized region deletes the slot; no memory is mapped.
    unsafe { vm.set_user_memory_region(r) }.map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// KVM_CLEAR_DIRTY_LOG: re-protects the pages of `slot` whose bits are set in
/// `bitmap`, starting at `first_page` (a multiple of 64), covering
/// `num_pages` pages (a multiple of 64, or reaching the slot's end; at most
/// `64 * bitmap.len()`).
pub(crate) fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    let num_pages = u32::try_from(num_pages)
        .ok()
        .filter(|&n| n as usize <= bitmap.len() * 64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad clear range"))?;
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `vm` is a KVM VM fd; the kernel reads `num_pages` bits from the
    // bitmap, which is exactly `bitmap.len()` u64 words we own for the call.
    let r = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// KVM_RESET_DIRTY_RINGS: recycles harvested entries of all vCPU rings and
/// re-protects their pages, all of them: a reset a signal interrupted is
/// run again until it ends. Returns how many entries the last (or only)
/// run reset.
///
/// Since Linux 6.16 the reset stops with EINTR at a pending signal (a
/// vCPU thread harvesting its own full ring gets kicked, say) after
/// resetting only some of the marked entries. The rest stay marked, and
/// the harvester has already moved past them: until a reset walks them,
/// the kernel's reset index lags the harvester's, and a harvester that
/// recycles entries it counts as pending (see
/// [`DirtyRing::recycle_unpublished`]) would mark entries the kernel has
/// not pushed yet. A reset then walks past the kernel's push index, and
/// the ring counts as full for good: the vCPU never runs again.
pub(crate) fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u32> {
    loop {
        // SAFETY: `vm` is a KVM VM fd; the ioctl takes no argument.
        let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if r >= 0 {
            return Ok(r as u32);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// One vCPU's dirty ring, mapped from its fd, unmapped on drop.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    ptr: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Next entry to look at (free-running, taken modulo `entries`).
    fetch: u32,
    /// The ring was seen full: the host may have overwritten entries and
    /// left unpublished ones (holes) before `fetch`'s successors.
    suspect: bool,
}

/// What one harvest of a ring found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RingHarvest {
    /// Published entries handed to the caller.
    pub(crate) entries: u64,
    /// Entries the kernel counts as pushed that were never published (the
    /// host overwrote a full ring): skipped and recycled, their pages lost.
    pub(crate) holes: u64,
}

// SAFETY: the mapping is shared memory owned by this value; entries are
// accessed with atomic loads/stores of their flags, as the kernel expects.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `entries` entries (a power of two) of vCPU `vcpu`.
    pub(crate) fn map(vcpu: &impl AsRawFd, entries: u32) -> io::Result<Self> {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * 4096;
        // SAFETY: mapping a vCPU fd's dirty-ring area at the documented
        // offset; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(DirtyRing {
            ptr,
            entries,
            fetch: 0,
            suspect: false,
        })
    }

    /// Entries the ring holds.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// The flags word of the entry at free-running position `pos`.
    fn flags(&self, pos: u32) -> &AtomicU32 {
        let idx = (pos % self.entries) as usize;
        // SAFETY: idx < entries, inside the mapping, which lives as long as
        // `self`; `flags` is the first u32 of the entry, suitably aligned,
        // and the kernel and we only access it atomically.
        unsafe {
            let e = self.ptr.as_ptr().add(idx);
            &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32)
        }
    }

    /// Slot and page offset of the published entry at `pos`.
    fn entry(&self, pos: u32) -> (u32, u64) {
        let idx = (pos % self.entries) as usize;
        // SAFETY: idx < entries; the caller saw the entry published with an
        // acquire load of its flags, so the kernel no longer writes these
        // plain fields.
        unsafe {
            let e = self.ptr.as_ptr().add(idx);
            ((*e).slot, (*e).offset)
        }
    }

    fn published(&self, pos: u32) -> bool {
        self.flags(pos).load(Ordering::Acquire) & GFN_F_DIRTY != 0
    }

    /// Harvests every published entry in order: calls `f(slot, page)` and
    /// marks the entry for reset.
    ///
    /// A ring the host overfilled (kvm_pvm's emulator pushes into a full
    /// ring, overwriting entries) ends with the kernel counting entries as
    /// pushed that it never published: a hole at `fetch` with published
    /// entries after it. Left alone, the hole stops every harvest and every
    /// reset there and the vCPU stays stopped on a full ring for good; so
    /// holes before a published entry are recycled too and counted.
    pub(crate) fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> RingHarvest {
        let mut h = RingHarvest::default();
        loop {
            if self.published(self.fetch) {
                let (slot, offset) = self.entry(self.fetch);
                f(slot, offset);
                self.flags(self.fetch).store(GFN_F_RESET, Ordering::Release);
                self.fetch = self.fetch.wrapping_add(1);
                h.entries += 1;
                continue;
            }
            if h.entries + 64 >= u64::from(self.entries) {
                self.suspect = true;
            }
            if !self.suspect {
                return h;
            }
            // The kernel publishes entries in ring order, each with a
            // release store of its flags: once the entry `d` places on is
            // seen published (acquire), every entry pushed before it is
            // visible as published too. Those still unpublished are holes.
            let Some(d) = (1..self.entries).find(|&d| self.published(self.fetch.wrapping_add(d)))
            else {
                return h;
            };
            if (0..d).any(|k| self.published(self.fetch.wrapping_add(k))) {
                continue; // raced with a push: read again from `fetch`
            }
            for k in 0..d {
                self.flags(self.fetch.wrapping_add(k))
                    .store(GFN_F_RESET, Ordering::Release);
            }
            self.fetch = self.fetch.wrapping_add(d);
            h.holes += u64::from(d);
        }
    }

    /// Recycles `n` unpublished entries from `fetch` on, for a vCPU that is
    /// stopped on a full ring although nothing in it is published (the host
    /// lost every pending entry). Only sound when the caller knows at least
    /// `n` entries are pending (the ring was full at its last exit and no
    /// reset happened since): the kernel's reset walks every entry marked,
    /// past its own push index if told to. Returns how many were marked
    /// (it stops early at a published entry).
    pub(crate) fn recycle_unpublished(&mut self, n: u32) -> u32 {
        for k in 0..n.min(self.entries) {
            let pos = self.fetch.wrapping_add(k);
            let fl = self.flags(pos);
            let seen = fl.load(Ordering::Acquire);
            if seen & GFN_F_DIRTY != 0
                || fl
                    .compare_exchange(seen, GFN_F_RESET, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                self.fetch = pos;
                return k;
            }
        }
        let n = n.min(self.entries);
        self.fetch = self.fetch.wrapping_add(n);
        self.suspect = true;
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), len);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The harvest against a model of the kernel's side of the ring
    //! (virt/kvm/dirty_ring.c): push writes the entry at `dirty_index` and
    //! publishes it even when the ring is full (what kvm_pvm's emulator
    //! does), reset walks from `reset_index` while entries are marked reset.
    use super::*;

    struct Kernel {
        dirty_index: u32,
        reset_index: u32,
    }

    fn anon_ring(entries: u32) -> DirtyRing {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh anonymous mapping, checked for MAP_FAILED; the
        // ring unmaps exactly `len` bytes on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        DirtyRing {
            ptr: NonNull::new(p.cast()).unwrap(),
            entries,
            fetch: 0,
            suspect: false,
        }
    }

    impl Kernel {
        fn used(&self) -> u32 {
            self.dirty_index.wrapping_sub(self.reset_index)
        }
        fn push(&mut self, r: &DirtyRing, page: u64) {
            let idx = (self.dirty_index % r.entries) as usize;
            // SAFETY: idx < entries, inside the test mapping.
            unsafe {
                let e = r.ptr.as_ptr().add(idx);
                (*e).slot = 0;
                (*e).offset = page;
            }
            r.flags(self.dirty_index)
                .store(GFN_F_DIRTY, Ordering::Release);
            self.dirty_index = self.dirty_index.wrapping_add(1);
        }
        fn reset(&mut self, r: &DirtyRing) {
            while r.flags(self.reset_index).load(Ordering::Acquire) & GFN_F_RESET != 0 {
                r.flags(self.reset_index).store(0, Ordering::Release);
                self.reset_index = self.reset_index.wrapping_add(1);
            }
        }
    }

    fn collect(r: &mut DirtyRing) -> (Vec<u64>, RingHarvest) {
        let mut pages = Vec::new();
        let h = r.harvest(|_, p| pages.push(p));
        (pages, h)
    }

    #[test]
    fn a_healthy_ring_is_harvested_in_order_and_drained() {
        let mut r = anon_ring(256);
        let mut k = Kernel {
            dirty_index: 0,
            reset_index: 0,
        };
        for lap in 0..5u64 {
            for p in 0..100 {
                k.push(&r, lap * 1000 + p);
            }
            let (pages, h) = collect(&mut r);
            assert_eq!(pages, (0..100).map(|p| lap * 1000 + p).collect::<Vec<_>>());
            assert_eq!(h.holes, 0);
            k.reset(&r);
            assert_eq!(k.used(), 0, "lap {lap}");
        }
    }

    #[test]
    fn an_overfilled_ring_leaves_holes_that_are_skipped_not_a_stuck_vcpu() {
        let n = 256;
        let mut r = anon_ring(n);
        let mut k = Kernel {
            dirty_index: 0,
            reset_index: 0,
        };
        // The host pushes 100 entries past a full ring, overwriting.
        for p in 0..u64::from(n) + 100 {
            k.push(&r, p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages.len(), n as usize);
        assert_eq!(h.holes, 0);
        k.reset(&r);
        // The kernel still counts 100 entries whose slots it reset: holes.
        assert_eq!(k.used(), 100);
        // Without skipping them the next harvest would find nothing, ever.
        for p in 0..10 {
            k.push(&r, 5000 + p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, (5000..5010).collect::<Vec<_>>());
        assert_eq!(h.holes, 100);
        k.reset(&r);
        assert_eq!(k.used(), 0, "kernel and harvester agree again");
        for p in 0..20 {
            k.push(&r, 7000 + p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, (7000..7020).collect::<Vec<_>>());
        assert_eq!(h.holes, 0);
        k.reset(&r);
        assert_eq!(k.used(), 0);
    }

    #[test]
    fn a_full_ring_of_holes_is_released_without_passing_the_push_index() {
        let n = 4096;
        let mut r = anon_ring(n);
        let mut k = Kernel {
            dirty_index: 0,
            reset_index: 0,
        };
        // Two full laps past the reset: after one harvest and reset the
        // kernel counts a whole soft-full ring of unpublished entries.
        for p in 0..u64::from(n) * 2 {
            k.push(&r, p);
        }
        let (_, h) = collect(&mut r);
        assert_eq!(h.entries, u64::from(n));
        k.reset(&r);
        assert_eq!(k.used(), n, "a ring the vCPU cannot run with");
        let (pages, h) = collect(&mut r);
        assert!(
            pages.is_empty() && h.holes == 0,
            "nothing published to find"
        );
        let marked = r.recycle_unpublished(n - 64 - 512);
        assert_eq!(marked, n - 576);
        k.reset(&r);
        assert_eq!(k.used(), 576, "never reset past the kernel's push index");
        // The vCPU runs again; its new entries are found past the rest.
        for p in 0..30 {
            k.push(&r, 9000 + p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, (9000..9030).collect::<Vec<_>>());
        assert_eq!(h.holes, 576);
        k.reset(&r);
        assert_eq!(k.used(), 0);
    }
}
