//! Mapped-ram round trips, damaged files, lazy restore and background
//! snapshots of process memory.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use super::format::{Header, CHUNK_SIZE};
use super::*;
use crate::engine::memory_digest;
use crate::memory::{GuestMemory, ProcessMemory};
use crate::testkit::workload::{direct_writer, Pattern, Workload, WorkloadConfig, XorShift};

const MIB: u64 = 1 << 20;

/// Two blocks; a few scattered non-zero pages, the rest zero.
fn sparse_memory() -> ProcessMemory {
    let mem = ProcessMemory::new(&[("ram0", 6 * MIB), ("ram1", 3 * MIB + 8192)]).unwrap();
    let mut rng = XorShift::new(3);
    let mut page = vec![0u8; 4096];
    for (b, blk) in mem.blocks().iter().enumerate() {
        for i in 0..40u64 {
            let p = (i * 37 + b as u64 * 11) % blk.pages();
            rng.fill(&mut page);
            assert!(blk.region().write((p * 4096) as usize, &page));
        }
        // The very last page too (a short last chunk).
        assert!(blk.region().write((blk.len() - 4096) as usize, &[9; 4096]));
    }
    mem
}

fn blank_like(mem: &ProcessMemory) -> ProcessMemory {
    let layout: Vec<(String, u64)> = mem
        .blocks()
        .iter()
        .map(|b| (b.id().to_string(), b.len()))
        .collect();
    ProcessMemory::new(&layout).unwrap()
}

/// [`sparse_memory`] saved with `state` by `threads` threads (no direct
/// I/O) to `snap.mr` in a new temporary directory.
fn saved_sparse(
    state: &[u8],
    threads: usize,
) -> (tempfile::TempDir, std::path::PathBuf, ProcessMemory) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.mr");
    let mem = sparse_memory();
    save(
        &mem,
        &path,
        state,
        &SaveOptions {
            threads,
            direct_io: false,
        },
    )
    .unwrap();
    (dir, path, mem)
}

#[test]
fn round_trip_with_zero_page_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.mr");
    let mem = sparse_memory();
    let digest = memory_digest(&mem);
    let stats = save(
        &mem,
        &path,
        b"vcpu state",
        &SaveOptions {
            threads: 3,
            direct_io: true,
        },
    )
    .unwrap();
    assert_eq!(stats.digest, digest, "the file's digest is the memory's");
    assert!(stats.pages >= 80 && stats.pages <= 82, "{stats:?}");
    assert_eq!(stats.pages + stats.zero_pages, mem.total_bytes() / 4096);
    // Zero pages are holes: the file occupies little more than its pages.
    assert!(
        stats.disk_bytes < stats.pages * 4096 + 256 * 1024,
        "{} bytes on disk for {} pages",
        stats.disk_bytes,
        stats.pages
    );
    assert!(stats.file_len > mem.total_bytes());
    assert!(is_mapped_ram(&path));

    for threads in [1, 2, 4] {
        let f = MappedRamFile::open(&path).unwrap();
        assert_eq!(f.state().unwrap(), b"vcpu state");
        let dst = blank_like(&mem);
        let r = f
            .load(
                &dst,
                &LoadOptions {
                    threads,
                    fresh: true,
                },
            )
            .unwrap();
        assert_eq!(r.pages, stats.pages);
        assert_eq!(memory_digest(&dst), digest, "{threads} threads");
    }
    // A destination that is not blank: holes clear what is there.
    let dst = blank_like(&mem);
    for b in dst.blocks() {
        b.region().write(8192, &[0xee; 4096]);
    }
    let f = MappedRamFile::open(&path).unwrap();
    let r = f
        .load(
            &dst,
            &LoadOptions {
                threads: 2,
                fresh: false,
            },
        )
        .unwrap();
    assert_eq!(memory_digest(&dst), digest);
    assert!(r.zero_pages_written >= 1, "{r:?}");
}

#[test]
fn flipped_byte_is_reported_with_its_chunk() {
    let (_dir, path, mem) = saved_sparse(b"", 2);
    let f = MappedRamFile::open(&path).unwrap();
    // The last page of block ram1 (chunk 1 of that block) is non-zero.
    let b = f.header().blocks[1].clone();
    let at = b.pages_offset + b.len - 4096 + 100;
    drop(f);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0x55], at).unwrap();
    let f = MappedRamFile::open(&path).unwrap();
    let dst = blank_like(&mem);
    let e = f
        .load(
            &dst,
            &LoadOptions {
                threads: 2,
                fresh: true,
            },
        )
        .unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(&e, SnapshotError::Corrupt { block, chunk: 1, .. } if block == "ram1"),
        "{text}"
    );
    assert!(text.contains("chunk 1") && text.contains("ram1"), "{text}");
    // The damaged chunk was never written: its last page is still zero.
    let mut page = vec![1u8; 4096];
    dst.blocks()[1]
        .region()
        .read((b.len - 4096) as usize, &mut page);
    assert!(page.iter().all(|&x| x == 0));

    // A bitmap bit cleared over a page that is in the file: the chunk
    // reads zeros there and fails its hash. (A bit set over a hole reads
    // the hole's zeros: the same contents, harmless.)
    let f = MappedRamFile::open(&path).unwrap();
    let mut good = vec![0u8; 4096];
    mem.blocks()[1]
        .region()
        .read((b.len - 4096) as usize, &mut good);
    file.write_all_at(&good[100..101], at).unwrap();
    let bm = f.header().blocks[0].bitmap_offset;
    drop(f);
    let mut word = [0u8; 1];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut word, bm)
        .unwrap();
    assert_eq!(word[0] & 1, 1, "page 0 of ram0 is in the file");
    file.write_all_at(&[word[0] & !1], bm).unwrap();
    let f = MappedRamFile::open(&path).unwrap();
    let e = f
        .load(&blank_like(&mem), &LoadOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("'ram0' chunk 0"), "{e}");
}

#[test]
fn hostile_headers_are_refused_with_their_field() {
    let (_dir, path, _mem) = saved_sparse(b"state", 1);
    let good = std::fs::read(&path).unwrap();
    // Truncated: regions past the end.
    std::fs::write(&path, &good[..good.len() - 1]).unwrap();
    let e = MappedRamFile::open(&path).unwrap_err();
    assert!(e.to_string().contains("state"), "{e}");
    // A hash table entry changed: the digest no longer matches.
    let f = {
        std::fs::write(&path, &good).unwrap();
        MappedRamFile::open(&path).unwrap()
    };
    let at = f.header().blocks[0].hashes_offset;
    let mut bad = good.clone();
    bad[at as usize] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(
        MappedRamFile::open(&path),
        Err(SnapshotError::Digest)
    ));
    // The state damaged.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let e = MappedRamFile::open(&path).unwrap().state().unwrap_err();
    assert!(matches!(e, SnapshotError::State { .. }), "{e}");
    // Bitmap bits past the block's end.
    let mut bad = good.clone();
    let b = f.header().blocks[1].clone();
    let last_word = b.bitmap_offset + b.bitmap_len() - 8;
    bad[last_word as usize + 7] |= 0x80;
    std::fs::write(&path, &bad).unwrap();
    let e = MappedRamFile::open(&path).unwrap_err();
    assert!(matches!(e, SnapshotError::Bitmap { .. }), "{e}");
    // A stream-format file or garbage.
    std::fs::write(&path, b"LIVEMIG stream, not mapped-ram, long enough to probe the header area; more bytes here to pass 112 bytes of probe......").unwrap();
    assert!(matches!(
        MappedRamFile::open(&path),
        Err(SnapshotError::NotMappedRam)
    ));
    // Another layout.
    std::fs::write(&path, &good).unwrap();
    let other = ProcessMemory::new(&[("ram0", 6 * MIB), ("ram1", 3 * MIB)]).unwrap();
    let e = MappedRamFile::open(&path)
        .unwrap()
        .load(&other, &LoadOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("block 'ram1'"), "{e}");
    let _ = Header::PROBE;
}

#[test]
fn lazy_restore_serves_touches_and_loads_the_rest() {
    let (_dir, path, mem) = saved_sparse(b"", 2);
    let digest = memory_digest(&mem);
    // On demand only: a read of a page faults in its chunk.
    let dst = blank_like(&mem);
    let lazy = LazyRestore::start(
        MappedRamFile::open(&path).unwrap(),
        &dst,
        &LazyOptions { background: false },
    )
    .unwrap();
    let last = mem.blocks()[1].len() - 4096;
    let mut page = vec![0u8; 4096];
    dst.blocks()[1].region().read(last as usize, &mut page);
    assert_eq!(page, vec![9u8; 4096]);
    // The toucher is woken by the placement, before the count moves.
    let t = std::time::Instant::now();
    while lazy.status().loaded_chunks == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let s = lazy.status();
    assert_eq!(s.loaded_chunks, 1, "{s:?}");
    assert!(s.faults >= 1 && !s.done, "{s:?}");
    // Dropping it loads the rest before unregistering: never zeros.
    drop(lazy);
    assert_eq!(memory_digest(&dst), digest);
    // With the background loader: everything arrives.
    let dst = blank_like(&mem);
    let lazy = LazyRestore::start(
        MappedRamFile::open(&path).unwrap(),
        &dst,
        &LazyOptions::default(),
    )
    .unwrap();
    let s = lazy.wait();
    assert!(s.done && s.error.is_none(), "{s:?}");
    assert_eq!(s.loaded_chunks, s.total_chunks);
    assert_eq!(memory_digest(&dst), digest);
}

#[test]
fn lazy_restore_stops_on_a_damaged_chunk() {
    let (_dir, path, mem) = saved_sparse(b"", 2);
    let f = MappedRamFile::open(&path).unwrap();
    let b = f.header().blocks[0].clone();
    drop(f);
    // Damage a present page of chunk 2 of ram0 (page 37*k lands there).
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let page = (0..b.pages())
        .find(|&p| p * 4096 >= 2 * CHUNK_SIZE && p * 4096 < 3 * CHUNK_SIZE && p % 37 == 0)
        .unwrap();
    file.write_all_at(&[0xaa, 0xbb], b.pages_offset + page * 4096 + 7)
        .unwrap();
    let dst = blank_like(&mem);
    let lazy = LazyRestore::start(
        MappedRamFile::open(&path).unwrap(),
        &dst,
        &LazyOptions::default(),
    )
    .unwrap();
    let s = lazy.wait();
    assert!(!s.done, "{s:?}");
    let e = s.error.unwrap();
    assert!(e.contains("'ram0' chunk 2"), "{e}");
    // The damaged chunk's pages were never placed: a touch would block
    // (not tested: it would hang this thread for good).
    assert!(s.loaded_chunks < s.total_chunks);
}

/// A background snapshot of `mem` while a writer rewrites it at 64 MiB/s:
/// the writer runs on after the pause, and the file (loaded back) holds
/// memory exactly as of the pause.
fn background_snapshot_while_a_writer_runs(mem: ProcessMemory, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bg.mr");
    let writer = Workload::start(
        mem.blocks().to_vec(),
        direct_writer(mem.blocks().to_vec()),
        WorkloadConfig {
            rate: 64 * MIB,
            bytes_per_touch: 64,
            pattern: Pattern::Random,
            working_set: 0,
            seed,
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    let mut control = writer.control();
    let stats = background_save(
        &mem,
        &path,
        &mut control,
        &BackgroundOptions {
            threads: 2,
            instant_digest: true,
        },
    )
    .unwrap();
    eprintln!("background snapshot: {stats:?}");
    // The writer runs on (given up to 5 s: a loaded host may not run it
    // at once).
    let before = writer.pages_written();
    let t0 = std::time::Instant::now();
    while writer.pages_written() == before && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        writer.pages_written() > before,
        "the writer runs on after the snapshot"
    );
    writer.stop();
    let instant = stats.instant_digest.unwrap();
    assert_eq!(
        stats.save.digest, instant,
        "the file holds memory as of the pause: {stats:?}"
    );
    assert_ne!(
        memory_digest(&mem),
        instant,
        "memory moved on after the pause"
    );
    let dst = blank_like(&mem);
    MappedRamFile::open(&path)
        .unwrap()
        .load(&dst, &LoadOptions::default())
        .unwrap();
    assert_eq!(memory_digest(&dst), instant);
}

#[test]
fn background_snapshot_is_the_start_instant_while_a_writer_runs() {
    let mem = ProcessMemory::new(&[("ram0", 16 * MIB), ("ram1", 8 * MIB)]).unwrap();
    background_snapshot_while_a_writer_runs(mem, 9);
}

/// Random damage anywhere in the header, tables and first pages: opening
/// and loading never panic, and a load that succeeds gives exactly the
/// saved memory (the damage hit padding, a hole or a harmless bitmap bit).
#[test]
fn random_damage_never_panics_or_loads_wrong_memory() {
    let (_dir, path, mem) = saved_sparse(b"state", 2);
    let digest = memory_digest(&mem);
    let good = std::fs::read(&path).unwrap();
    let f = MappedRamFile::open(&path).unwrap();
    // Header, tables and the first chunk of each block's pages.
    let header_end = f.header().blocks[0].pages_offset as usize;
    let mut spans = Vec::new();
    spans.push(0..header_end);
    for b in &f.header().blocks {
        let at = b.pages_offset as usize;
        spans.push(at..at + (CHUNK_SIZE as usize).min(b.len as usize));
    }
    spans.push(f.header().state_offset as usize..good.len());
    drop(f);
    let mut rng = XorShift::new(77);
    let dst = blank_like(&mem);
    let (mut refused, mut loaded) = (0, 0);
    for _ in 0..300 {
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(3) {
            let span = &spans[rng.below(spans.len())];
            let at = span.start + rng.below(span.len());
            bad[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&path, &bad).unwrap();
        let r = MappedRamFile::open_for(&path, &dst).and_then(|f| {
            f.state()?;
            f.load(
                &dst,
                &LoadOptions {
                    threads: 2,
                    fresh: false,
                },
            )
        });
        match r {
            Ok(_) => {
                loaded += 1;
                assert_eq!(
                    memory_digest(&dst),
                    digest,
                    "a damaged file loaded other memory"
                );
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 100, "{refused} refused, {loaded} loaded");
}

/// Like `blank_like`, in memfds (shared mappings), every byte set to
/// `fill` first: a restore must replace all of it, holes included.
fn memfd_like(mem: &ProcessMemory, fill: u8) -> ProcessMemory {
    let layout: Vec<(String, u64)> = mem
        .blocks()
        .iter()
        .map(|b| (b.id().to_string(), b.len()))
        .collect();
    let m = ProcessMemory::new_memfd(&layout).unwrap();
    for b in m.blocks() {
        assert!(b.backing().is_some());
        let junk = vec![fill; b.len() as usize];
        assert!(b.region().write(0, &junk));
    }
    m
}

#[test]
fn lazy_restore_into_memfd_memory_replaces_what_the_file_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.mr");
    let mem = sparse_memory();
    let digest = memory_digest(&mem);
    save(&mem, &path, b"", &SaveOptions::default()).unwrap();
    // On demand: the memfd's old pages are gone from the file, so a read
    // faults and gets the snapshot's page (or zeros for a hole), never
    // the 0xee left in the memfd.
    let dst = memfd_like(&mem, 0xee);
    let lazy = LazyRestore::start(
        MappedRamFile::open(&path).unwrap(),
        &dst,
        &LazyOptions { background: false },
    )
    .unwrap();
    let mut page = vec![0u8; 4096];
    let last = dst.blocks()[1].len() - 4096;
    assert!(dst.blocks()[1].region().read(last as usize, &mut page));
    assert!(page == [9u8; 4096], "read {:?}...", &page[..8]);
    // A hole in a chunk nobody touched yet: the first page of ram0 is
    // zero in the source unless the sparse fill hit it.
    let mut want = vec![0u8; 4096];
    assert!(mem.blocks()[0].region().read(4096 * 5, &mut want));
    assert!(dst.blocks()[0].region().read(4096 * 5, &mut page));
    assert!(
        page == want,
        "read {:?}..., want {:?}...",
        &page[..8],
        &want[..8]
    );
    drop(lazy);
    assert_eq!(memory_digest(&dst), digest);
    // With the background loader, through the memfd's own file too.
    let dst = memfd_like(&mem, 0x5a);
    let lazy = LazyRestore::start(
        MappedRamFile::open(&path).unwrap(),
        &dst,
        &LazyOptions::default(),
    )
    .unwrap();
    let s = lazy.wait();
    assert!(s.done && s.error.is_none(), "{s:?}");
    assert_eq!(memory_digest(&dst), digest);
    let bk = dst.blocks()[0].backing().unwrap();
    let mut via_file = vec![0u8; 4096];
    bk.file
        .read_exact_at(&mut via_file, bk.offset + last.min(4096 * 3))
        .unwrap();
    let mut via_map = vec![0u8; 4096];
    assert!(dst.blocks()[0]
        .region()
        .read(last.min(4096 * 3) as usize, &mut via_map));
    assert!(via_file == via_map, "the memfd holds what the guest sees");
}

#[test]
fn eager_restore_into_memfd_memory_clears_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.mr");
    let mem = sparse_memory();
    save(&mem, &path, b"", &SaveOptions::default()).unwrap();
    let dst = memfd_like(&mem, 0x11);
    MappedRamFile::open(&path)
        .unwrap()
        .load(&dst, &LoadOptions::default())
        .unwrap();
    assert_eq!(memory_digest(&dst), memory_digest(&mem));
}

#[test]
fn background_snapshot_of_memfd_memory_is_the_start_instant() {
    let mem = ProcessMemory::new_memfd(&[("ram0", 16 * MIB), ("ram1", 8 * MIB)]).unwrap();
    background_snapshot_while_a_writer_runs(mem, 11);
}

#[test]
fn a_cancelled_save_removes_only_a_file_it_created() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let mem = sparse_memory();
    let opts = SaveOptions {
        threads: 1,
        direct_io: false,
    };
    // Cancelled after two chunks: the file it created is gone.
    let path = dir.path().join("new.mr");
    let asked = AtomicU32::new(0);
    let after_two = || asked.fetch_add(1, Ordering::SeqCst) >= 2;
    let e = save_cancellable(&mem, &path, b"state", &opts, &after_two).unwrap_err();
    assert!(matches!(e, SnapshotError::Cancelled), "{e}");
    assert!(
        asked.load(Ordering::SeqCst) >= 3,
        "asked before every chunk"
    );
    assert!(!path.exists(), "the partial file it created is removed");

    // A file that was there stays (truncated: no valid header).
    let old = dir.path().join("old.mr");
    std::fs::write(&old, b"someone else's file").unwrap();
    let e = save_cancellable(&mem, &old, b"state", &opts, &|| true).unwrap_err();
    assert!(matches!(e, SnapshotError::Cancelled), "{e}");
    assert!(old.exists(), "a file it did not create is never deleted");
    assert!(!is_mapped_ram(&old));

    // Never cancelled: the same file as save's.
    let whole = dir.path().join("whole.mr");
    let s = save_cancellable(&mem, &whole, b"state", &opts, &|| false).unwrap();
    assert_eq!(s.digest, memory_digest(&mem));
}

#[test]
fn a_cancelled_load_stops_and_leaves_the_file_alone() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.mr");
    let mem = sparse_memory();
    save(&mem, &path, b"state", &SaveOptions::default()).unwrap();
    let before = std::fs::read(&path).unwrap();
    let dst = blank_like(&mem);
    let f = MappedRamFile::open_for(&path, &dst).unwrap();
    let opts = LoadOptions {
        threads: 1,
        fresh: true,
    };
    let asked = AtomicU32::new(0);
    let after_one = || asked.fetch_add(1, Ordering::SeqCst) >= 1;
    let e = f.load_cancellable(&dst, &opts, &after_one).unwrap_err();
    assert!(matches!(e, SnapshotError::Cancelled), "{e}");
    assert_ne!(
        memory_digest(&dst),
        memory_digest(&mem),
        "only part of the memory was loaded"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is untouched"
    );
    // Not cancelled: the whole memory.
    f.load_cancellable(&dst, &opts, &|| false).unwrap();
    assert_eq!(memory_digest(&dst), memory_digest(&mem));
}

#[test]
fn a_stopped_fault_handler_is_a_typed_cause_with_its_message() {
    use std::error::Error as _;
    let e = SnapshotError::WriteProtectHandler {
        cause: std::sync::Arc::new(HandlerError::Unprotect {
            addr: 0x7f00_0000_1000,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }),
    };
    let text = crate::error_chain(&e);
    assert!(
        text.starts_with(
            "userfaultfd: the write-protect handler stopped: \
             lifting write protection at 0x7f0000001000: "
        ),
        "{text}"
    );
    // Each part once, however the chain is printed.
    assert_eq!(
        text.matches("lifting write protection").count(),
        1,
        "{text}"
    );
    let cause = e.source().expect("the handler's error is the source");
    assert!(
        matches!(
            cause
                .downcast_ref::<std::sync::Arc<HandlerError>>()
                .map(|c| &**c),
            Some(HandlerError::Unprotect {
                addr: 0x7f00_0000_1000,
                ..
            })
        ),
        "{cause}"
    );
    let os = cause.source().expect("the OS error is kept");
    assert!(os.downcast_ref::<std::io::Error>().is_some(), "{os}");
}
