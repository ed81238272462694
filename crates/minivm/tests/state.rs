//! save_state -> restore into a second VM: the guest continues, self-check passes.
mod common;

use std::time::Duration;

use livemig::GuestMemory;
use minivm::{GuestImage, Vm};

fn copy_ram(src: &Vm, dst: &Vm) {
    let (s, d) = (src.memory(), dst.memory());
    let mut buf = vec![0u8; 1 << 20];
    for (a, b) in s.blocks().iter().zip(d.blocks()) {
        assert_eq!(a.id(), b.id());
        let mut off = 0usize;
        while off < a.len() as usize {
            let n = buf.len().min(a.len() as usize - off);
            assert!(a.region().read(off, &mut buf[..n]));
            assert!(b.region().write(off, &buf[..n]));
            off += n;
        }
    }
}

#[test]
fn save_restore_continues_the_guest() {
    if !common::kvm_available("save_restore_continues_the_guest") {
        return;
    }
    let mut cfg = common::test_guest(64, 2, 2048, 0);
    cfg.ram_blocks = 2;
    let src = Vm::new(cfg.clone()).unwrap();
    common::wait_for(&src, Duration::from_secs(5), |s| s.pages_written() > 20_000);
    src.pause().unwrap();
    let blob = src.save_state().unwrap();
    let before = src.guest_status();
    assert!(before.ok(), "{before:?}");

    let mut dcfg = cfg.clone();
    dcfg.guest = GuestImage::Incoming;
    dcfg.start_paused = true;
    let dst = Vm::new(dcfg).unwrap();
    copy_ram(&src, &dst);
    drop(src);
    dst.restore_state(&blob).unwrap();
    dst.resume();
    let after = common::wait_for(&dst, Duration::from_secs(5), |s| {
        s.pages_written() > before.pages_written() + 20_000 && s.heartbeats() > 10
    });
    assert!(after.ok(), "{after:?}");
    assert!(
        after.pages_written() > before.pages_written() + 20_000,
        "{after:?}"
    );
    eprintln!(
        "state blob {} bytes; guest continued from {} to {} pages",
        blob.len(),
        before.pages_written(),
        after.pages_written()
    );
}

#[test]
fn stale_ram_is_detected_after_restore() {
    // Restoring vCPU state over RAM from an older moment must trip the
    // guest's self-check (proves the check would catch a bad migration).
    if !common::kvm_available("stale_ram_is_detected_after_restore") {
        return;
    }
    let cfg = common::test_guest(16, 1, 256, 0);
    let src = Vm::new(cfg.clone()).unwrap();
    common::wait_for(&src, Duration::from_secs(5), |s| s.pages_written() > 2_000);
    let mut dcfg = cfg.clone();
    dcfg.guest = GuestImage::Incoming;
    dcfg.start_paused = true;
    let dst = Vm::new(dcfg).unwrap();
    src.pause().unwrap();
    copy_ram(&src, &dst);
    // Enough writes after the copy that every one of the 256 pages changes
    // (relative to now: the guest writes thousands of pages per poll).
    let copied_at = src.guest_status().pages_written();
    src.resume();
    let st = common::wait_for(&src, Duration::from_secs(5), |s| {
        s.pages_written() > copied_at + 4_000
    });
    assert!(
        st.pages_written() > copied_at + 4_000,
        "source guest stalled: {st:?}"
    );
    src.pause().unwrap();
    // Seq table from now, data pages from before: copy only the seq table page.
    let blob = src.save_state().unwrap();
    let slot = minivm::guest::test_guest_layout(
        &minivm::TestGuestConfig {
            pages_per_vcpu: 256,
            rate_bytes_per_sec: 0,
        },
        1,
    )[0];
    let mut page = vec![0u8; 4096];
    let (s, d) = (src.memory(), dst.memory());
    assert!(s.blocks()[0]
        .region()
        .read(slot.seq_table as usize, &mut page));
    assert!(d.blocks()[0].region().write(slot.seq_table as usize, &page));
    dst.restore_state(&blob).unwrap();
    dst.resume();
    let st = common::wait_for(&dst, Duration::from_secs(5), |s| s.failures() > 0);
    assert!(st.failures() > 0, "stale pages not detected: {st:?}");
}

#[test]
fn bad_blobs_are_rejected_without_panic() {
    if !common::kvm_available("bad_blobs_are_rejected_without_panic") {
        return;
    }
    let cfg = common::test_guest(16, 1, 16, 0);
    let src = Vm::new(cfg.clone()).unwrap();
    src.pause().unwrap();
    let blob = src.save_state().unwrap();
    let mut dcfg = cfg.clone();
    dcfg.guest = GuestImage::Incoming;
    dcfg.start_paused = true;
    let dst = Vm::new(dcfg).unwrap();
    for cut in [0, 7, 12, 20, blob.len() / 2, blob.len() - 1] {
        assert!(
            dst.restore_state(&blob[..cut]).is_err(),
            "truncated at {cut} accepted"
        );
    }
    let mut b = blob.clone();
    b[8] = 9; // version
    assert!(dst.restore_state(&b).is_err());
    // Flip bytes in length fields and elsewhere: error or success, never a panic.
    for i in (0..blob.len()).step_by(97) {
        let mut b = blob.clone();
        b[i] ^= 0xff;
        let _ = dst.restore_state(&b);
    }
    // A 2-vCPU VM refuses a 1-vCPU blob.
    let mut c2 = common::test_guest(16, 2, 16, 0);
    c2.guest = GuestImage::Incoming;
    c2.start_paused = true;
    let dst2 = Vm::new(c2).unwrap();
    assert!(dst2.restore_state(&blob).is_err());
}
