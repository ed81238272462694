//! The vCPU mode of a KVM test guest (feature `kvm`): long mode, ring 3,
//! flat segments, paging through identity page tables. Guest code in
//! ring 3 runs natively on kvm_pvm hosts, where ring-0 and real-mode code
//! is emulated (see HOST-NOTES); no GDT or IDT needs to be in guest memory.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// Sets `sregs` (a vCPU's reset state from `KVM_GET_SREGS`) to long-mode
/// ring 3 with the page tables at `cr3`: 64-bit user code (selector 0x1b),
/// flat user data (0x23) in DS, ES, FS, GS and SS, paging and write
/// protection on (CR0), PAE (CR4), long mode enabled and active (EFER).
pub fn long_mode_ring3(sregs: &mut kvm_sregs, cr3: u64) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x1b,
        type_: 11,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x23,
        type_: 3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    (sregs.cr3, sregs.cr4, sregs.cr0, sregs.efer) = (cr3, 0x20, 0x8005_0033, 0x500);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_and_data_with_paging_in_long_mode() {
        let mut s = kvm_sregs::default();
        long_mode_ring3(&mut s, 0x1000);
        assert_eq!((s.cs.dpl, s.cs.l, s.cs.db, s.cs.selector & 3), (3, 1, 0, 3));
        for d in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((d.dpl, d.type_, d.selector, d.present), (3, 3, 0x23, 1));
        }
        assert_eq!(s.cr3, 0x1000);
        // PG, WP, PE in CR0; PAE in CR4; LME and LMA in EFER.
        assert_eq!(s.cr0 & 0x8001_0001, 0x8001_0001);
        assert_eq!(s.cr4 & 0x20, 0x20);
        assert_eq!(s.efer & 0x500, 0x500);
    }
}
