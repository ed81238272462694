//! Does `out` from long-mode ring 3 exit to the VMM on this host?
mod common;

use std::time::Duration;

use minivm::{CpuMode, GuestImage, Vm, VmConfig};

#[test]
fn ring3_out_exits_to_vmm() {
    if !common::kvm_available("ring3_out_exits_to_vmm") {
        return;
    }
    // mov eax, 0x12345678 ; out 0xe9, eax ; jmp $-7 (back to mov)
    let code = vec![0xb8, 0x78, 0x56, 0x34, 0x12, 0xe7, 0xe9, 0xeb, 0xf7];
    let vm = Vm::new(VmConfig {
        mem_size: 4 << 20,
        guest: GuestImage::Flat {
            image: code,
            load_addr: 0x1000,
            entry: 0x1000,
            mode: CpuMode::LongRing3,
        },
        ..Default::default()
    })
    .unwrap();
    let s = common::wait_for(&vm, Duration::from_secs(5), |s| s.vcpus[0].debug.1 >= 10);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.vcpus[0].debug.0, 0x1234_5678);
    assert!(s.vcpus[0].debug.1 >= 10, "{s:?}");
}
