//! Guest images and the CPU state they start in.
//!
//! - the built-in ring-3 test guest ([`TestGuestConfig`]), one program per
//!   vCPU, with its own working set and self-check;
//! - foreign images: a raw boot sector (real mode at 0x7c00) or a flat
//!   binary at a given address, started in real mode or in long-mode ring 3.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::GuestMemoryMmap;

pub mod code;

/// I/O port: `in` returns how many pages the test guest may write now.
pub const PORT_CREDIT: u16 = 0xe0;
/// I/O port: the test guest's heartbeat; the value is its failure count.
pub const PORT_HEARTBEAT: u16 = 0xe1;
/// I/O port: the test guest found a page that came back wrong (its index).
pub const PORT_BAD_PAGE: u16 = 0xe2;
/// I/O port: a debug/probe port; the VMM records the last value written.
pub const PORT_DEBUG: u16 = 0xe9;

/// Guest address of the test guest's code (and of ring-3 flat images by default).
pub const CODE_ADDR: u64 = 0x1000;
/// Guest address of the PML4 (identity map, 2 MiB pages, user bit set).
pub const PML4_ADDR: u64 = 0x10000;
/// Most guest memory the identity map covers (one page directory per GiB).
pub const MAX_IDENTITY_GIB: u64 = 64;
/// Guest address of vCPU 0's mailbox page; vCPU i's is `+ i * 4096`.
pub const MAILBOX_ADDR: u64 = 0x60000;
/// Most vCPUs the test guest layout supports.
pub const MAX_VCPUS: usize = 32;
/// Where the test guests' working sets begin.
pub const WORK_ADDR: u64 = 0x20_0000;
/// Mailbox offset: pages written so far (u64, written by the guest).
pub const MAILBOX_PAGES_WRITTEN: u64 = 8;
/// Mailbox offset: self-check failures so far (u64, written by the guest).
pub const MAILBOX_FAILURES: u64 = 16;

/// Boot-sector incrementer: first page it increments.
pub const BOOTINC_FIRST: u64 = 0x10_0000;
/// Boot-sector incrementer: guest address of its pass counter (u32).
pub const BOOTINC_PASSES: u64 = 0x7e00;
/// Boot-sector incrementer: offset in the sector of its end address (u32).
const BOOTINC_END_OFFSET: usize = 0x1f8;

/// The built-in test guest's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestGuestConfig {
    /// Pages each vCPU cycles through (its working set).
    pub pages_per_vcpu: u64,
    /// Total bytes per second all vCPUs together write; 0 = as fast as they can.
    pub rate_bytes_per_sec: u64,
}

/// The CPU mode a flat image starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode, CS base 0.
    Real,
    /// 64-bit long mode, ring 3, IOPL 3, identity-mapped memory.
    LongRing3,
}

/// What the VM runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestImage {
    /// The built-in ring-3 test guest on every vCPU.
    TestGuest(TestGuestConfig),
    /// A raw boot sector: loaded at 0x7c00, started in real mode at 0:0x7c00
    /// on vCPU 0 (other vCPUs stay halted).
    BootSector(Vec<u8>),
    /// A flat binary loaded at `load_addr`, started at `entry` on vCPU 0.
    Flat {
        /// The image bytes.
        image: Vec<u8>,
        /// Guest address to load it at.
        load_addr: u64,
        /// Guest address of the first instruction.
        entry: u64,
        /// Mode to start in.
        mode: CpuMode,
    },
    /// Nothing loaded: memory and vCPU state come from a migration or snapshot.
    Incoming,
}

/// Errors of guest set-up.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The image or layout does not fit in guest memory.
    #[error("guest does not fit: {0}")]
    DoesNotFit(String),
    /// Writing guest memory failed.
    #[error("cannot write guest memory at {addr:#x}: {why}")]
    Write {
        /// Guest address.
        addr: u64,
        /// What failed.
        why: String,
    },
}

/// Where vCPU `i` of the test guest keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestGuestSlot {
    /// Mailbox page.
    pub mailbox: u64,
    /// Sequence table (u64 per page).
    pub seq_table: u64,
    /// First data page.
    pub data: u64,
    /// Number of data pages.
    pub pages: u64,
}

/// The test guest's memory layout for `vcpus` vCPUs.
pub fn test_guest_layout(cfg: &TestGuestConfig, vcpus: usize) -> Vec<TestGuestSlot> {
    let table_bytes = (cfg.pages_per_vcpu * 8).div_ceil(4096) * 4096;
    let mut at = WORK_ADDR;
    (0..vcpus)
        .map(|i| {
            let slot = TestGuestSlot {
                mailbox: MAILBOX_ADDR + i as u64 * 4096,
                seq_table: at,
                data: at + table_bytes,
                pages: cfg.pages_per_vcpu,
            };
            at += table_bytes + cfg.pages_per_vcpu * 4096;
            slot
        })
        .collect()
}

/// Guest memory the test guest needs for `vcpus` vCPUs.
pub fn test_guest_bytes(cfg: &TestGuestConfig, vcpus: usize) -> u64 {
    test_guest_layout(cfg, vcpus)
        .last()
        .map_or(WORK_ADDR, |s| s.data + s.pages * 4096)
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), GuestError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| GuestError::Write {
            addr,
            why: e.to_string(),
        })
}

/// Writes identity page tables covering `mem_size` bytes (2 MiB pages,
/// present + writable + user).
pub fn write_page_tables(mem: &GuestMemoryMmap, mem_size: u64) -> Result<(), GuestError> {
    let gib = mem_size.div_ceil(1 << 30).clamp(1, MAX_IDENTITY_GIB);
    let pdpt = PML4_ADDR + 0x1000;
    let pd0 = PML4_ADDR + 0x2000;
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    write(mem, PML4_ADDR, &(pdpt | P_RW_US).to_le_bytes())?;
    let mut pdpt_entries = Vec::with_capacity(gib as usize * 8);
    for g in 0..gib {
        pdpt_entries.extend_from_slice(&((pd0 + g * 0x1000) | P_RW_US).to_le_bytes());
    }
    write(mem, pdpt, &pdpt_entries)?;
    let mut pd = Vec::with_capacity(gib as usize * 4096);
    for i in 0..gib * 512 {
        pd.extend_from_slice(&((i << 21) | P_RW_US | PS).to_le_bytes());
    }
    write(mem, pd0, &pd)
}

/// Loads `image` into `mem` (of `mem_size` bytes, `vcpus` vCPUs) and returns
/// the initial registers of each vCPU (`None` = leave it halted).
pub fn load(
    image: &GuestImage,
    mem: &GuestMemoryMmap,
    mem_size: u64,
    vcpus: usize,
) -> Result<Vec<Option<StartState>>, GuestError> {
    let mut starts = vec![None; vcpus];
    match image {
        GuestImage::Incoming => {}
        GuestImage::TestGuest(cfg) => {
            if vcpus > MAX_VCPUS {
                return Err(GuestError::DoesNotFit(format!("at most {MAX_VCPUS} vCPUs")));
            }
            if cfg.pages_per_vcpu == 0 {
                return Err(GuestError::DoesNotFit("working set of 0 pages".into()));
            }
            let need = test_guest_bytes(cfg, vcpus);
            if need > mem_size || need > MAX_IDENTITY_GIB << 30 {
                return Err(GuestError::DoesNotFit(format!(
                    "{vcpus} vCPUs x {} pages need {} MiB of guest memory, have {} MiB",
                    cfg.pages_per_vcpu,
                    need.div_ceil(1 << 20),
                    mem_size >> 20
                )));
            }
            write_page_tables(mem, mem_size)?;
            write(mem, CODE_ADDR, code::TEST_GUEST)?;
            for (i, slot) in test_guest_layout(cfg, vcpus).into_iter().enumerate() {
                let mut regs = ring3_regs(CODE_ADDR);
                regs.rdi = slot.mailbox;
                regs.rsi = slot.data;
                regs.rdx = slot.pages;
                regs.rcx = slot.seq_table;
                regs.r8 = i as u64;
                starts[i] = Some(StartState {
                    regs,
                    mode: CpuMode::LongRing3,
                });
            }
        }
        GuestImage::BootSector(bytes) => {
            if bytes.len() > 512 {
                return Err(GuestError::DoesNotFit(
                    "a boot sector is at most 512 bytes".into(),
                ));
            }
            write(mem, 0x7c00, bytes)?;
            starts[0] = Some(StartState {
                regs: real_regs(0x7c00),
                mode: CpuMode::Real,
            });
        }
        GuestImage::Flat {
            image,
            load_addr,
            entry,
            mode,
        } => {
            if load_addr.saturating_add(image.len() as u64) > mem_size {
                return Err(GuestError::DoesNotFit(format!(
                    "{} bytes at {load_addr:#x} exceed guest memory",
                    image.len()
                )));
            }
            if *mode == CpuMode::LongRing3 {
                write_page_tables(mem, mem_size)?;
            }
            write(mem, *load_addr, image)?;
            let regs = match mode {
                CpuMode::Real => real_regs(*entry),
                CpuMode::LongRing3 => ring3_regs(*entry),
            };
            starts[0] = Some(StartState { regs, mode: *mode });
        }
    }
    Ok(starts)
}

/// The boot-sector incrementer image: increments the first byte of every
/// page in `[1 MiB, end)` in order, forever (`end` page-aligned, < 4 GiB).
pub fn boot_incrementer(end: u32) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..code::BOOT_INCREMENTER.len()].copy_from_slice(code::BOOT_INCREMENTER);
    s[BOOTINC_END_OFFSET..BOOTINC_END_OFFSET + 4].copy_from_slice(&end.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Initial CPU state of one vCPU.
#[derive(Clone, Copy, Debug)]
pub struct StartState {
    /// General registers.
    pub regs: kvm_regs,
    /// Mode, which decides the special registers.
    pub mode: CpuMode,
}

fn ring3_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        // IOPL = 3 so `in`/`out` exit to the VMM instead of faulting; bit 1 is reserved-one.
        rflags: 0x3002,
        rsp: 0x8000,
        ..Default::default()
    }
}

fn real_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 0x2,
        rsp: 0x7000,
        ..Default::default()
    }
}

/// Special registers for `mode`, starting from the vCPU's reset state.
pub fn setup_sregs(mode: CpuMode, sregs: &mut kvm_sregs) {
    match mode {
        CpuMode::Real => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        CpuMode::LongRing3 => {
            // Values that work on kvm_pvm (see HOST-NOTES): no GDT/IDT in memory.
            livemig::testkit::kvm_guest::long_mode_ring3(sregs, PML4_ADDR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_does_not_overlap() {
        let cfg = TestGuestConfig {
            pages_per_vcpu: 100,
            rate_bytes_per_sec: 0,
        };
        let l = test_guest_layout(&cfg, 3);
        for w in l.windows(2) {
            assert!(w[0].data + w[0].pages * 4096 <= w[1].seq_table);
            assert!(w[0].seq_table + 800 <= w[0].data);
        }
        assert_eq!(test_guest_bytes(&cfg, 3), l[2].data + 100 * 4096);
    }

    #[test]
    fn boot_sector_is_signed_and_patched() {
        let s = boot_incrementer(0x4000_0000);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(&s[0x1f8..0x1fc], &0x4000_0000u32.to_le_bytes());
    }
}
