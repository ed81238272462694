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
/// resetting only some of the marked entries; the rest stay marked and
/// the next run walks them.
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

    /// Frees a ring whose vCPU is stopped on it full with nothing in it
    /// published (the host overwrote what it pushed): hands over what is
    /// published anywhere in the ring, then has the kernel reset exactly
    /// `limit` of its pending entries, from its own reset index.
    ///
    /// Only for a ring whose vCPU does not run (the caller is its thread,
    /// between two KVM_RUNs) and that was not reset since the vCPU's
    /// ring-full exit: the kernel then counts at least its soft limit of
    /// entries pending, and nothing but the caller writes the ring. `limit`
    /// must not exceed the soft limit; `reset` runs KVM_RESET_DIRTY_RINGS.
    ///
    /// The kernel's reset walks from its reset index over every entry
    /// marked, past its push index if marks are there, and the ring then
    /// counts full for good. Its reset index can also lag `fetch`: an entry
    /// the host overwrote after it was harvested and before the reset is
    /// pending twice in the kernel but carries one mark, so the reset stops
    /// at its second position, where the entry is already cleared, and
    /// never moves again. So every mark is taken off first, then one
    /// candidate at a time is marked and reset: the one the kernel clears
    /// is at its reset index (the first candidates are `fetch` and the
    /// unmarked entry before the marks that end at `fetch`). Then the
    /// `limit - 1` entries after it are marked alone and reset: the kernel
    /// walks `limit` entries, no more than it counts pending, and `fetch`
    /// is set where the kernel's reset index now is.
    pub(crate) fn release_stopped(
        &mut self,
        limit: u32,
        mut f: impl FnMut(u32, u64),
        reset: &mut dyn FnMut() -> io::Result<u32>,
    ) -> io::Result<Release> {
        let n = self.entries;
        let limit = limit.clamp(1, n);
        let mut rel = Release::default();
        // Flags as found, by distance before `fetch`.
        let mut was = vec![0u32; n as usize];
        for back in 0..n {
            let pos = self.fetch.wrapping_sub(back);
            let fl = self.flags(pos).load(Ordering::Acquire);
            if fl & GFN_F_DIRTY != 0 {
                let (slot, offset) = self.entry(pos);
                f(slot, offset);
                rel.published += 1;
            }
            was[back as usize] = fl;
            if fl != 0 {
                self.flags(pos).store(0, Ordering::Release);
            }
        }
        let marked = |back: u32| was[back as usize] & GFN_F_RESET != 0;
        let gap = (1..n).find(|&b| !marked(b));
        let order = std::iter::once(0)
            .chain(gap)
            .chain((1..n).filter(|&b| Some(b) != gap && !marked(b)))
            .chain((1..n).filter(|&b| marked(b)));
        let mut hit = None;
        for back in order {
            let pos = self.fetch.wrapping_sub(back);
            self.flags(pos).store(GFN_F_RESET, Ordering::Release);
            rel.probes += 1;
            let r = reset();
            let cleared = self.flags(pos).load(Ordering::Acquire) == 0;
            if !cleared {
                self.flags(pos).store(0, Ordering::Release);
            }
            r?;
            if cleared {
                hit = Some(back);
                break;
            }
        }
        let Some(back) = hit else {
            return Ok(rel);
        };
        rel.found = true;
        rel.behind = back;
        rel.marks = (0..n).filter(|&b| marked(b)).count() as u32;
        rel.marks_after = (1..n)
            .take_while(|&k| marked(back.wrapping_sub(k) % n))
            .count() as u32;
        // Until session 13 the release marked `limit` entries from `fetch`
        // on, over the marks found: how far the kernel's reset would have
        // walked then.
        let old_mark = |b: u32| marked(b) || b == 0 || b > n - limit;
        rel.old_walk = (0..n)
            .take_while(|&k| old_mark(back.wrapping_sub(k) % n))
            .count() as u32;
        let start = self.fetch.wrapping_sub(back);
        let unpublished = |k: u32| {
            let b = back.wrapping_sub(k) % n;
            was[b as usize] & (GFN_F_DIRTY | GFN_F_RESET) == 0
        };
        for k in 1..limit {
            self.flags(start.wrapping_add(k))
                .store(GFN_F_RESET, Ordering::Release);
        }
        let r = if limit > 1 {
            reset().map(|_| ())
        } else {
            Ok(())
        };
        // The kernel walked a prefix of the marks (all of them unless a
        // reset failed); marks it left would let a later reset walk on.
        let mut done = 1;
        for k in 1..limit {
            let fl = self.flags(start.wrapping_add(k));
            if fl.load(Ordering::Acquire) == 0 && done == k {
                done += 1;
            } else {
                fl.store(0, Ordering::Release);
            }
        }
        rel.recycled = done;
        rel.lost = (0..done).filter(|&k| unpublished(k)).count() as u32;
        self.fetch = start.wrapping_add(done);
        self.suspect = true;
        r.map(|()| rel)
    }
}

/// What [`DirtyRing::release_stopped`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Release {
    /// Published entries handed over.
    pub(crate) published: u64,
    /// The kernel's reset index was found (if not, nothing was recycled).
    pub(crate) found: bool,
    /// How many entries before `fetch` it was.
    pub(crate) behind: u32,
    /// Resets run to find it.
    pub(crate) probes: u32,
    /// Entries found marked for reset (harvested, not yet reset).
    pub(crate) marks: u32,
    /// Of those, how many followed the kernel's reset index in a row: what
    /// a reset walks once that index is marked.
    pub(crate) marks_after: u32,
    /// How many entries the reset would have walked had the release marked
    /// `limit` entries from `fetch` on, as it did before: more than `limit`
    /// can pass the kernel's push index.
    pub(crate) old_walk: u32,
    /// Entries the kernel reset from there.
    pub(crate) recycled: u32,
    /// Of those, entries never published: their pages are lost.
    pub(crate) lost: u32,
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
    //! (virt/kvm/dirty_ring.c, Linux 6.18): `push` writes the entry at
    //! `dirty_index` and publishes it even when the ring is full (what
    //! kvm_pvm's emulator does: the kernel only warns), `reset` walks from
    //! `reset_index` while entries are marked reset, whatever `dirty_index`
    //! is, and the vCPU exits on a full ring while `dirty_index -
    //! reset_index` (a wrapping u32) is at least the soft limit.
    use super::*;

    /// The kernel's side of one vCPU's ring.
    struct Kernel {
        base: NonNull<kvm_dirty_gfn>,
        size: u32,
        soft_limit: u32,
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
        /// The kernel side of `r`, with x86's reserve (64 entries and a
        /// 512-entry PML log; small test rings keep only the 64).
        fn of(r: &DirtyRing) -> Kernel {
            let rsvd = if r.entries >= 1024 { 64 + 512 } else { 64 };
            Kernel {
                base: r.ptr,
                size: r.entries,
                soft_limit: r.entries - rsvd,
                dirty_index: 0,
                reset_index: 0,
            }
        }
        fn flags(&self, pos: u32) -> &AtomicU32 {
            let idx = (pos % self.size) as usize;
            // SAFETY: idx < size, inside the test mapping, which outlives
            // the model; `flags` is only accessed atomically.
            unsafe {
                let e = self.base.as_ptr().add(idx);
                &*(std::ptr::addr_of_mut!((*e).flags) as *const AtomicU32)
            }
        }
        fn used(&self) -> u32 {
            self.dirty_index.wrapping_sub(self.reset_index)
        }
        /// Whether KVM_RUN enters the guest (it exits on a soft-full ring).
        fn runs(&self) -> bool {
            self.used() < self.soft_limit
        }
        fn push(&mut self, page: u64) {
            let idx = (self.dirty_index % self.size) as usize;
            // SAFETY: idx < size, inside the test mapping.
            unsafe {
                let e = self.base.as_ptr().add(idx);
                (*e).slot = 0;
                (*e).offset = page;
            }
            self.flags(self.dirty_index)
                .store(GFN_F_DIRTY, Ordering::Release);
            self.dirty_index = self.dirty_index.wrapping_add(1);
        }
        /// The vCPU runs and dirties `pages` pages, as far as the ring lets
        /// it; returns how many it dirtied.
        fn run(&mut self, pages: std::ops::Range<u64>) -> u64 {
            let mut n = 0;
            for p in pages {
                if !self.runs() {
                    break;
                }
                self.push(p);
                n += 1;
            }
            n
        }
        /// KVM_RESET_DIRTY_RINGS on this ring: returns the entries reset.
        fn reset(&mut self) -> u32 {
            let mut n = 0;
            while self.flags(self.reset_index).load(Ordering::Acquire) & GFN_F_RESET != 0 {
                self.flags(self.reset_index).store(0, Ordering::Release);
                self.reset_index = self.reset_index.wrapping_add(1);
                n += 1;
            }
            n
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
        let mut k = Kernel::of(&r);
        for lap in 0..5u64 {
            for p in 0..100 {
                k.push(lap * 1000 + p);
            }
            let (pages, h) = collect(&mut r);
            assert_eq!(pages, (0..100).map(|p| lap * 1000 + p).collect::<Vec<_>>());
            assert_eq!(h.holes, 0);
            k.reset();
            assert_eq!(k.used(), 0, "lap {lap}");
        }
    }

    #[test]
    fn an_overfilled_ring_leaves_holes_that_are_skipped_not_a_stuck_vcpu() {
        let n = 256;
        let mut r = anon_ring(n);
        let mut k = Kernel::of(&r);
        // The host pushes 100 entries past a full ring, overwriting.
        for p in 0..u64::from(n) + 100 {
            k.push(p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages.len(), n as usize);
        assert_eq!(h.holes, 0);
        k.reset();
        // The kernel still counts 100 entries whose slots it reset: holes.
        assert_eq!(k.used(), 100);
        // Without skipping them the next harvest would find nothing, ever.
        for p in 0..10 {
            k.push(5000 + p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, (5000..5010).collect::<Vec<_>>());
        assert_eq!(h.holes, 100);
        k.reset();
        assert_eq!(k.used(), 0, "kernel and harvester agree again");
        for p in 0..20 {
            k.push(7000 + p);
        }
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, (7000..7020).collect::<Vec<_>>());
        assert_eq!(h.holes, 0);
        k.reset();
        assert_eq!(k.used(), 0);
    }

    /// The stopped-vCPU release of `r` against the model, as the KVM log
    /// runs it: pages handed over, the model's reset as the ioctl.
    fn release(r: &mut DirtyRing, k: &mut Kernel) -> (Vec<u64>, Release) {
        let mut pages = Vec::new();
        let rel = r
            .release_stopped(r.entries - 64 - 512, |_, p| pages.push(p), &mut || {
                Ok(k.reset())
            })
            .unwrap();
        (pages, rel)
    }

    #[test]
    fn a_full_ring_of_holes_is_released_without_passing_the_push_index() {
        let n = 4096;
        let mut r = anon_ring(n);
        let mut k = Kernel::of(&r);
        // Two full laps past the reset: after one harvest and reset the
        // kernel counts a whole ring of unpublished entries.
        for p in 0..u64::from(n) * 2 {
            k.push(p);
        }
        let (_, h) = collect(&mut r);
        assert_eq!(h.entries, u64::from(n));
        k.reset();
        assert_eq!(k.used(), n, "a ring the vCPU cannot run with");
        let (pages, h) = collect(&mut r);
        assert!(
            pages.is_empty() && h.holes == 0,
            "nothing published to find"
        );
        let (pages, rel) = release(&mut r, &mut k);
        assert!(pages.is_empty());
        assert!(rel.found && rel.behind == 0, "{rel:?}");
        assert_eq!((rel.marks, rel.marks_after), (0, 0));
        assert_eq!(rel.old_walk, n - 576);
        assert_eq!(rel.recycled, n - 576);
        assert_eq!(rel.lost, n - 576);
        assert_eq!(k.used(), 576, "never reset past the kernel's push index");
        assert!(k.runs());
        // The vCPU runs again; its new entries are found past the rest.
        k.run(9000..9030);
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, (9000..9030).collect::<Vec<_>>());
        assert_eq!(h.holes, 576);
        k.reset();
        assert_eq!(k.used(), 0);
    }

    /// The flake of ring_emulated (2 runs in 22): the host overfills the
    /// ring, and one more push lands on an entry the harvester has marked
    /// but the kernel not yet reset. The kernel then counts that entry
    /// twice (its old position and the new one) while its flags word can
    /// carry one reset mark: the reset stops at the second position with
    /// the entry already cleared, one entry behind the harvester, and
    /// never moves again. Recycling a soft-full ring's worth from the
    /// harvester's position then reached round to that entry and let the
    /// reset walk the whole ring, 576 past the push index: `used` wrapped
    /// and the vCPU stayed stopped for good.
    #[test]
    fn a_reset_stuck_behind_the_harvester_is_found_and_never_overshot() {
        let n = 4096;
        let mut r = anon_ring(n);
        let mut k = Kernel::of(&r);
        let x = 10;
        for p in 0..u64::from(n) + x {
            k.push(p);
        }
        let (pages, _) = collect(&mut r);
        assert_eq!(pages.len(), n as usize);
        // Between harvest and reset the emulator pushes once more, onto a
        // harvested entry.
        k.push(50_000);
        k.reset();
        assert_eq!(k.reset_index, x as u32, "stopped at the overwritten entry");
        let (pages, h) = collect(&mut r);
        assert_eq!(pages, vec![50_000]);
        assert_eq!(h.holes, x);
        k.reset();
        assert_eq!(k.used(), 1, "the kernel still counts the pushed entry");
        assert_eq!(k.flags(k.reset_index).load(Ordering::Relaxed), 0);
        assert_eq!(r.fetch, k.reset_index + 1, "one behind the harvester");

        // The guest runs on (natively, nothing overfilled): every entry is
        // harvested, none reset, until the vCPU stops.
        let mut page = 100_000;
        while k.runs() {
            page += k.run(page..page + 300);
            let (got, h) = collect(&mut r);
            assert_eq!(h.holes, 0);
            assert!(!got.is_empty() || !k.runs());
            k.reset();
        }
        assert_eq!(k.used(), k.soft_limit);
        let (got, h) = collect(&mut r);
        assert!(got.is_empty() && h.holes == 0);

        let before = k.used();
        let (pages, rel) = release(&mut r, &mut k);
        assert!(pages.is_empty());
        assert!(
            k.used() < before,
            "the reset passed the push index: used {} (was {before})",
            k.used()
        );
        assert!(rel.found, "{rel:?}");
        assert_eq!(rel.behind, k.soft_limit, "{rel:?}");
        // What the old release let the kernel walk: these and the 576
        // after them it marked, a whole ring.
        assert_eq!(rel.marks_after, k.soft_limit - 1, "{rel:?}");
        assert_eq!(rel.old_walk, n, "{rel:?}");
        assert_eq!(rel.lost, 1, "only the overwritten entry was lost");
        assert!(k.runs(), "the vCPU runs again: used {}", k.used());
        assert_eq!(r.fetch, k.reset_index, "harvester and kernel agree again");

        // And it keeps running, harvested and reset as if nothing happened.
        for lap in 0..10u64 {
            let base = 1_000_000 + lap * 1000;
            assert_eq!(k.run(base..base + 1000), 1000);
            let (got, _) = collect(&mut r);
            assert!(got.ends_with(&(base..base + 1000).collect::<Vec<_>>()));
            k.reset();
            assert!(k.used() < k.soft_limit, "lap {lap}: used {}", k.used());
        }
        let (_, h) = collect(&mut r);
        assert_eq!(h.entries, 0);
        k.reset();
        assert_eq!(k.used(), 0);
    }

    #[test]
    fn a_ring_overfilled_by_more_than_a_lap_is_released_in_steps() {
        let n = 1024;
        let mut r = anon_ring(n);
        let mut k = Kernel::of(&r);
        let limit = n - 576;
        // Nothing harvested yet, three laps pushed: the kernel counts 3n.
        for p in 0..u64::from(n) * 3 {
            k.push(p);
        }
        let mut total = 0;
        let mut releases = 0;
        while !k.runs() {
            let before = k.used();
            let (pages, rel) = release(&mut r, &mut k);
            total += pages.len();
            assert!(rel.found, "{rel:?}");
            assert!(rel.recycled <= limit);
            assert!(k.used() < before && before - k.used() <= limit);
            releases += 1;
            assert!(releases < 10);
        }
        assert_eq!(total, n as usize, "the last lap's entries were handed over");
        k.run(7..9);
        let (pages, _) = collect(&mut r);
        assert_eq!(pages, vec![7, 8]);
        k.reset();
        assert_eq!(k.used(), 0);
    }
}
