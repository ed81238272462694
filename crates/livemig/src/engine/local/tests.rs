use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::engine::Params;
use crate::memory::ProcessMemory;
use crate::vm::VmError;

/// A source "VMM": counts pauses and resumes, returns a fixed state.
#[derive(Clone, Default)]
struct FakeVm {
    pauses: Arc<AtomicUsize>,
    resumes: Arc<AtomicUsize>,
}

impl VmControl for FakeVm {
    fn pause(&mut self) -> Result<(), VmError> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        Ok(b"vcpu state".to_vec())
    }
}

/// A destination "VMM" over process memory.
struct FakeGuest {
    mem: ProcessMemory,
    adopted: Option<Vec<u8>>,
    fail_restore: bool,
    discarded: bool,
    resumed: bool,
}

impl FakeGuest {
    fn new(layout: &[(&str, u64)]) -> Self {
        FakeGuest {
            mem: ProcessMemory::new(layout).unwrap(),
            adopted: None,
            fail_restore: false,
            discarded: false,
            resumed: false,
        }
    }
}

impl LocalGuest for FakeGuest {
    fn layout(&self) -> Vec<(String, u64)> {
        self.mem
            .blocks()
            .iter()
            .map(|b| (b.id().to_string(), b.len()))
            .collect()
    }
    fn adopt(&mut self, blocks: &[SharedBlock], state: &[u8]) -> Result<(), BoxError> {
        adopt_memory(&self.mem, blocks)?;
        if self.fail_restore {
            return Err("this vCPU state does not fit this VM".into());
        }
        self.adopted = Some(state.to_vec());
        Ok(())
    }
    fn discard(&mut self) {
        release_memory(&self.mem, self.mem.blocks().len());
        self.discarded = true;
    }
    fn resume(&mut self) -> Result<(), BoxError> {
        self.resumed = true;
        Ok(())
    }
}

const LAYOUT: [(&str, u64); 2] = [("ram0", 64 << 10), ("ram1", 32 << 10)];

fn source_memory() -> ProcessMemory {
    let m = ProcessMemory::new_memfd(&LAYOUT).unwrap();
    assert!(m.blocks()[0].region().write(4096, b"page one"));
    assert!(m.blocks()[1].region().write(0, b"page two"));
    m
}

fn read(mem: &ProcessMemory, block: usize, at: usize, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    assert!(mem.blocks()[block].region().read(at, &mut b));
    b
}

/// Runs a local migration of `src` to `guest` over a socket pair.
fn run(
    src: &ProcessMemory,
    mut guest: FakeGuest,
) -> (
    Result<LocalSent, MigrationError>,
    Result<LocalReceived, LocalError>,
    FakeGuest,
    FakeVm,
) {
    let (a, b) = UnixStream::pair().unwrap();
    let vm = FakeVm::default();
    let blocks = shared_blocks(src).unwrap();
    let handle = MigrationHandle::new(Params::default());
    let dest = std::thread::spawn(move || {
        let r = receive(&b, &mut guest);
        (r, guest)
    });
    let sent = migrate(&a, &blocks, &mut vm.clone(), &handle);
    let (received, guest) = dest.join().unwrap();
    (sent, received, guest, vm)
}

#[test]
fn memory_is_handed_over_not_copied() {
    let src = source_memory();
    let (sent, received, guest, vm) = run(&src, FakeGuest::new(&LAYOUT));
    let sent = sent.unwrap();
    let received = received.unwrap();
    assert_eq!(sent.stats.status, Status::Completed);
    assert_eq!(sent.files, 2);
    assert_eq!(received.blocks, 2);
    assert_eq!(received.memory, 96 << 10);
    assert_eq!(guest.adopted.as_deref(), Some(&b"vcpu state"[..]));
    assert!(guest.resumed && !guest.discarded);
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 1);
    assert_eq!(
        vm.resumes.load(Ordering::SeqCst),
        0,
        "the source stays paused"
    );
    // Far fewer bytes than the memory: layout, state and handshake only.
    assert!(sent.bytes_out < 200, "{} bytes sent", sent.bytes_out);
    assert_eq!(sent.bytes_out, received.socket_bytes);
    assert_eq!(sent.stats.ram.transferred, sent.bytes_out);
    assert_eq!(sent.stats.dirty_tracker, TRACKER_NAME);
    // The same pages, both ways.
    assert_eq!(read(&guest.mem, 0, 4096, 8), b"page one");
    assert_eq!(read(&guest.mem, 1, 0, 8), b"page two");
    assert!(guest.mem.blocks()[1].region().write(8192, b"dest"));
    assert_eq!(read(&src, 1, 8192, 4), b"dest");
}

#[test]
fn a_destination_that_cannot_restore_leaves_the_guest_to_the_source() {
    let src = source_memory();
    let mut guest = FakeGuest::new(&LAYOUT);
    guest.fail_restore = true;
    let (sent, received, guest, vm) = run(&src, guest);
    let e = sent.unwrap_err();
    assert!(matches!(e, MigrationError::Destination(_)), "{e}");
    assert!(e.to_string().contains("does not fit this VM"), "{e}");
    let r = received.unwrap_err();
    assert!(matches!(r, LocalError::Guest { .. }), "{r}");
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1, "the source resumed");
    assert!(guest.discarded && !guest.resumed);
    // The destination gave the memory back without writing it.
    assert_eq!(read(&guest.mem, 0, 4096, 8), [0; 8]);
    assert!(guest.mem.blocks()[0].region().write(4096, b"XXXXXXXX"));
    assert_eq!(read(&src, 0, 4096, 8), b"page one");
}

#[test]
fn another_layout_is_refused_before_mapping() {
    let src = source_memory();
    let (sent, received, guest, vm) = run(&src, FakeGuest::new(&[("ram0", 64 << 10)]));
    let e = sent.unwrap_err().to_string();
    assert!(e.contains("the source has 2 blocks, this VM 1"), "{e}");
    assert!(matches!(received, Err(LocalError::Layout(_))));
    assert!(guest.adopted.is_none() && !guest.resumed);
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
    let (sent, _, _, _) = run(
        &src,
        FakeGuest::new(&[("ram0", 64 << 10), ("ram1", 64 << 10)]),
    );
    let e = sent.unwrap_err().to_string();
    assert!(
        e.contains("block 1 is 'ram1' of 32768 bytes at the source, 'ram1' of 65536 bytes here"),
        "{e}"
    );
}

#[test]
fn anonymous_memory_cannot_be_handed_over() {
    let m = ProcessMemory::new(&LAYOUT).unwrap();
    let e = shared_blocks(&m).unwrap_err();
    assert!(
        matches!(e, LocalError::NotShareable(ref id) if id == "ram0"),
        "{e}"
    );
    assert!(e.to_string().contains("--memfd"), "{e}");
}

#[test]
fn the_source_resumes_when_the_destination_goes_away() {
    let src = source_memory();
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        // Reads the offer, then closes without a word.
        let _ = read_offer(&b);
    });
    let vm = FakeVm::default();
    let e = migrate(
        &a,
        &shared_blocks(&src).unwrap(),
        &mut vm.clone(),
        &MigrationHandle::new(Params::default()),
    )
    .unwrap_err();
    t.join().unwrap();
    assert!(matches!(e, MigrationError::Ack(_)), "{e}");
    assert_eq!(vm.resumes.load(Ordering::SeqCst), 1);
}

#[test]
fn a_cancelled_migration_never_pauses() {
    let src = source_memory();
    let (a, _b) = UnixStream::pair().unwrap();
    let h = MigrationHandle::new(Params::default());
    h.cancel();
    let vm = FakeVm::default();
    let e = migrate(&a, &shared_blocks(&src).unwrap(), &mut vm.clone(), &h).unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled));
    assert_eq!(h.stats().status, Status::Cancelled);
    assert_eq!(vm.pauses.load(Ordering::SeqCst), 0);
}

#[test]
fn page_moving_settings_are_refused_before_the_pause() {
    use crate::codec::compress::Algorithm;
    let src = source_memory();
    let cases: Vec<(Params, LocalUnsupported, &str)> = vec![
        (
            Params {
                channels: 4,
                ..Params::default()
            },
            LocalUnsupported::Channels(4),
            "page channels (channels = 4)",
        ),
        (
            Params {
                compress: Some(crate::engine::CompressParams {
                    algorithm: Algorithm::Zstd,
                    level: 1,
                }),
                ..Params::default()
            },
            LocalUnsupported::Compression,
            "compression",
        ),
        (
            Params {
                xbzrle: true,
                ..Params::default()
            },
            LocalUnsupported::Xbzrle,
            "XBZRLE",
        ),
        (
            Params {
                postcopy_ram: true,
                ..Params::default()
            },
            LocalUnsupported::PostcopyRam,
            "postcopy-ram",
        ),
        (
            Params {
                postcopy_preempt: true,
                ..Params::default()
            },
            LocalUnsupported::PostcopyPreempt,
            "postcopy-preempt",
        ),
    ];
    for (params, want, words) in cases {
        assert_eq!(check_params(&params), Err(want));
        let (a, _b) = UnixStream::pair().unwrap();
        let h = MigrationHandle::new(params);
        let vm = FakeVm::default();
        let e = migrate(&a, &shared_blocks(&src).unwrap(), &mut vm.clone(), &h).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, MigrationError::Local(LocalError::Unsupported(u)) if u == want),
            "{text}"
        );
        assert!(
            text.contains(words) && text.contains("local mode"),
            "{text}"
        );
        assert_eq!(vm.pauses.load(Ordering::SeqCst), 0, "{text}: paused");
        assert_eq!(h.stats().status, Status::Failed);
        assert!(h.stats().error_desc.unwrap().contains(words));
    }
    // Settings that only steer convergence have nothing to act on.
    let fine = Params {
        auto_converge: true,
        max_bandwidth: 1 << 20,
        verify: true,
        dirty_limit: 1 << 20,
        ..Params::default()
    };
    assert_eq!(check_params(&fine), Ok(()));
    assert_eq!(LocalUnsupported::Xbzrle.qmp_name(), "capability 'xbzrle'");
}

/// Sends a hand-made offer: `head` with `files`, then `rest`, and returns
/// what the destination makes of it.
fn offer(head: [u8; 16], files: &[&File], rest: &[u8]) -> Result<Offer, LocalError> {
    let (a, b) = UnixStream::pair().unwrap();
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    if fds.is_empty() {
        (&a).write_all(&head).unwrap();
    } else {
        scm::send_with_fds(&a, &head, &fds).unwrap();
    }
    (&a).write_all(rest).unwrap();
    drop(a);
    read_offer(&b)
}

fn head(nfds: u16, nblocks: u16, state: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&OFFER_MAGIC);
    h[8..10].copy_from_slice(&nfds.to_be_bytes());
    h[10..12].copy_from_slice(&nblocks.to_be_bytes());
    h[12..16].copy_from_slice(&state.to_be_bytes());
    h
}

fn block(id: &str, fd: u16, offset: u64, len: u64) -> Vec<u8> {
    let mut v = vec![id.len() as u8];
    v.extend_from_slice(id.as_bytes());
    v.extend_from_slice(&fd.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn memfd(len: u64) -> File {
    crate::sys::memfd::create("livemig-test", len).unwrap()
}

#[test]
fn what_arrives_is_checked() {
    let f = memfd(1 << 20);
    let good = block("ram", 0, 0, 1 << 20);
    let o = offer(head(1, 1, 2), &[&f], &[&good[..], b"st"].concat()).unwrap();
    assert_eq!(
        (o.blocks.len(), o.state.as_slice(), o.files),
        (1, &b"st"[..], 1)
    );

    let mut bad_magic = head(1, 1, 0);
    bad_magic[..8].copy_from_slice(b"LVMGSTR3");
    let e = offer(bad_magic, &[&f], &good).unwrap_err();
    assert!(matches!(e, LocalError::BadMagic(_)), "{e}");
    assert!(e.to_string().contains("local mode too"), "{e}");

    let e = offer(head(2, 1, 0), &[&f], &good).unwrap_err();
    assert!(
        matches!(
            e,
            LocalError::FdCount {
                announced: 2,
                received: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = offer(head(1, 1, 0), &[], &good).unwrap_err();
    assert!(matches!(e, LocalError::FdCount { received: 0, .. }), "{e}");

    let plain = tempfile::tempfile().unwrap();
    plain.set_len(1 << 20).unwrap();
    let e = offer(head(1, 1, 0), &[&plain], &good).unwrap_err();
    assert!(matches!(e, LocalError::NotMemfd { index: 0, .. }), "{e}");

    let unsealed = crate::sys::memfd::create_with_seals("livemig-test", 1 << 20, 0).unwrap();
    let e = offer(head(1, 1, 0), &[&unsealed], &good).unwrap_err();
    assert!(matches!(e, LocalError::NotSealed { index: 0, .. }), "{e}");
    assert!(e.to_string().contains("shrinking"), "{e}");

    let e = offer(head(1, 1, 0), &[&f], &block("ram", 0, 4096, 1 << 20)).unwrap_err();
    assert!(
        e.to_string().contains("beyond the end of descriptor 0"),
        "{e}"
    );
    let e = offer(head(1, 1, 0), &[&f], &block("ram", 0, 100, 4096)).unwrap_err();
    assert!(e.to_string().contains("page-aligned"), "{e}");
    let e = offer(head(1, 1, 0), &[&f], &block("ram", 3, 0, 4096)).unwrap_err();
    assert!(e.to_string().contains("descriptor 3 of 1"), "{e}");
    let e = offer(
        head(1, 1, 0),
        &[&f],
        &block("ram", 0, u64::MAX - 4095, 4096),
    )
    .unwrap_err();
    assert!(matches!(e, LocalError::BadBlock { .. }), "{e}");

    let g = memfd(4096);
    let e = offer(head(2, 1, 0), &[&f, &g], &good).unwrap_err();
    assert!(
        e.to_string().contains("descriptor 1: no block lives in it"),
        "{e}"
    );

    let e = offer(head(1, 1, MAX_STATE + 1), &[&f], &good).unwrap_err();
    assert!(matches!(e, LocalError::BadOffer(_)), "{e}");
    let e = offer(head(1, 0, 0), &[&f], &[]).unwrap_err();
    assert!(matches!(e, LocalError::BadOffer(_)), "{e}");
    // Truncated block list and state.
    let e = offer(head(1, 1, 0), &[&f], &good[..5]).unwrap_err();
    assert!(e.to_string().contains("reading the block list"), "{e}");
    let e = offer(head(1, 1, 10), &[&f], &good).unwrap_err();
    assert!(
        e.to_string().contains("reading the vCPU and device state"),
        "{e}"
    );
}

#[test]
fn blocks_sharing_a_file_send_it_once() {
    let f = Arc::new(memfd(3 * 4096));
    let blocks: Vec<SharedBlock> = (0..3)
        .map(|i| SharedBlock {
            id: format!("b{i}"),
            len: 4096,
            backing: BlockBacking {
                file: f.clone(),
                offset: i * 4096,
            },
        })
        .collect();
    let (bytes, files) = encode_offer(&blocks, b"s").unwrap();
    assert_eq!(files.len(), 1);
    let (a, b) = UnixStream::pair().unwrap();
    send_offer(&a, &bytes, &files).unwrap();
    let o = read_offer(&b).unwrap();
    assert_eq!(o.files, 1);
    assert_eq!(o.blocks[2].backing.offset, 8192);
    assert_eq!(o.bytes, bytes.len() as u64);
}

#[test]
fn a_memfd_destination_gets_its_own_memory_back() {
    let src = source_memory();
    let own = ProcessMemory::new_memfd(&LAYOUT).unwrap();
    assert!(own.blocks()[0].region().write(4096, b"its own!"));
    let blocks = shared_blocks(&src).unwrap();
    adopt_memory(&own, &blocks).unwrap();
    assert_eq!(read(&own, 0, 4096, 8), b"page one");
    release_memory(&own, own.blocks().len());
    assert_eq!(
        read(&own, 0, 4096, 8),
        b"its own!",
        "its own memfd, mapped again"
    );
    assert_eq!(
        read(&src, 0, 4096, 8),
        b"page one",
        "the source's untouched"
    );
}
