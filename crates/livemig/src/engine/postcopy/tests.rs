//! Postcopy: the return-path messages, and whole migrations of process
//! memory over in-memory pipes with a destination "guest" thread that
//! reads its memory while pages are still missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::*;
use crate::dirty::SoftwareTracker;
use crate::engine::{
    memory_digest, MigrationError, MigrationHandle, Params, Source, Status, Switchover,
};
use crate::memory::{GuestMemory, ProcessMemory};
use crate::stream::{BlockDesc, StreamReader, StreamWriter};
use crate::testkit::fault_proxy::{Fault, FaultProxy};
use crate::testkit::workload::{fill_random, PageWriter, Workload, WorkloadConfig, XorShift};
use crate::transport::{pipe, Outgoing, PipeReader, PipeWriter};

const MIB: u64 = 1 << 20;

fn layout() -> Vec<(&'static str, u64)> {
    vec![("ram0", 8 * MIB), ("ram1", 4 * MIB)]
}

fn blocks() -> Vec<(String, u64)> {
    layout()
        .into_iter()
        .map(|(i, l)| (i.to_string(), l))
        .collect()
}

#[test]
fn messages_round_trip() {
    let msgs = [
        Message::Request(PageRequest {
            block: 1,
            offset: 0x3000,
            len: 4096,
        }),
        Message::Complete(FaultReport {
            faults: 3,
            blocktime_us: 900,
            latency_sum_us: 800,
            p50_us: 200,
            p99_us: 400,
            threads: vec![(17, 500), (18, 400)],
            buckets: vec![0, 0, 0, 0, 0, 0, 0, 3],
            local_faults: 5,
            local_pages: 2048,
            local_us: 150,
        }),
        Message::Failed("lost".into()),
        Message::Progress {
            stream: 2,
            offset: 1 << 40,
        },
        Message::Lost {
            stream: URGENT_STREAM,
        },
        Message::Bitmap {
            block: 1,
            first_word: 1024,
            words: vec![u64::MAX, 5],
        },
        Message::BitmapEnd { blocks: 2 },
    ];
    let mut bytes = Vec::new();
    for m in &msgs {
        write_message(&mut bytes, m).unwrap();
    }
    let mut r = MessageReader::new(&bytes[..]);
    for m in &msgs {
        assert_eq!(&r.read_message().unwrap().1, m);
    }
    let e = r.read_message().unwrap_err();
    assert!(matches!(e, PostcopyError::Io { .. }), "{e}");
}

#[test]
fn bad_messages_name_their_byte() {
    let mut bytes = Vec::new();
    write_message(
        &mut bytes,
        &Message::Request(PageRequest {
            block: 0,
            offset: 0,
            len: 4096,
        }),
    )
    .unwrap();
    bytes.push(b'Z');
    let mut r = MessageReader::new(&bytes[..]);
    r.read_message().unwrap();
    let e = r.read_message().unwrap_err().to_string();
    assert!(e.contains("byte 15") && e.contains("0x5a"), "{e}");
    // A bucket count past the limit.
    let mut c = vec![b'C'];
    c.extend_from_slice(&[0u8; 40]);
    c.push(0);
    c.push(200);
    let e = MessageReader::new(&c[..])
        .read_message()
        .unwrap_err()
        .to_string();
    assert!(e.contains("latency bucket count 200"), "{e}");
    // A failure text longer than allowed.
    let f = [b'F', 0xff, 0xff];
    let e = MessageReader::new(&f[..])
        .read_message()
        .unwrap_err()
        .to_string();
    assert!(e.contains("failure text length 65535"), "{e}");
}

#[test]
fn every_message_kind_cut_short_is_an_error_naming_its_byte() {
    // Each kind, after one good request: every truncation is refused
    // with the byte where the reader stopped, never a panic or a read
    // past the input.
    let kinds = [
        Message::Request(PageRequest {
            block: 0,
            offset: 4096,
            len: 8192,
        }),
        Message::Complete(FaultReport {
            faults: 1,
            threads: vec![(3, 40)],
            buckets: vec![0, 1],
            ..FaultReport::default()
        }),
        Message::Failed("gone".into()),
        Message::Bitmap {
            block: 0,
            first_word: 0,
            words: vec![1, 2, 3],
        },
        Message::BitmapEnd { blocks: 2 },
        Message::Progress {
            stream: 1,
            offset: 99,
        },
        Message::Lost { stream: 2 },
    ];
    let mut head = Vec::new();
    write_message(
        &mut head,
        &Message::Request(PageRequest {
            block: 1,
            offset: 0,
            len: 4096,
        }),
    )
    .unwrap();
    for m in &kinds {
        let mut whole = head.clone();
        write_message(&mut whole, m).unwrap();
        for cut in head.len() + 1..whole.len() {
            let mut r = MessageReader::new(&whole[..cut]);
            r.read_message().unwrap();
            let e = r.read_message().unwrap_err();
            assert!(matches!(e, PostcopyError::Io { .. }), "{m:?} at {cut}: {e}");
            let at: u64 = e
                .to_string()
                .strip_prefix("return path byte ")
                .and_then(|t| t.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{m:?} at {cut}: no byte in '{e}'"));
            assert!(
                at >= head.len() as u64 && at <= cut as u64,
                "{m:?} cut at {cut}: byte {at}"
            );
        }
        let mut r = MessageReader::new(&whole[..]);
        r.read_message().unwrap();
        assert_eq!(&r.read_message().unwrap().1, m);
    }
}

#[test]
fn requests_outside_every_block_are_refused() {
    let b = blocks();
    let req = |block, offset, len| PageRequest { block, offset, len };
    let ok = check_request(&b, 0, &req(1, 4 * MIB - 4096, 4096)).unwrap();
    assert_eq!(ok, (1, 1023, 1));
    for (r, want) in [
        (req(2, 0, 4096), "block index 2, the stream has 2 blocks"),
        (req(1, 4 * MIB, 4096), "at 0x400000 of block 'ram1'"),
        (req(0, 8 * MIB - 4096, 8192), "8192 bytes at 0x7ff000"),
        (req(0, 100, 4096), "at 0x64"),
        (req(0, 0, 100), "100 bytes"),
        (req(0, 0, 0), "0 bytes"),
        (req(0, u64::MAX - 4095, 4096), "0xfffffffffffff000"),
        (req(0, 0, (MAX_REQUEST_PAGES + 1) * 4096), "bytes at 0x0"),
    ] {
        let e = check_request(&b, 77, &r).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains("byte 77"),
            "{e} (wanted {want})"
        );
    }
}

#[test]
fn random_messages_never_panic() {
    let b = blocks();
    let mut rng = XorShift::new(0x9c);
    for _ in 0..20_000 {
        let n = rng.below(48);
        let mut buf = vec![0u8; n];
        rng.fill(&mut buf);
        if n > 0 {
            buf[0] = [b'Q', b'C', b'F', b'B', b'E', rng.byte()][rng.below(6)];
        }
        let mut r = MessageReader::new(&buf[..]);
        let lens: Vec<u64> = b.iter().map(|x| x.1).collect();
        let mut asm = BitmapAssembler::new(&lens);
        while let Ok((at, m)) = r.read_message() {
            if let Ok(true) = asm.add(at, &m) {
                let missing = asm.missing();
                for (bm, len) in missing.iter().zip(&lens) {
                    assert_eq!(bm.len(), len / 4096);
                }
            }
            if let Message::Request(q) = m {
                if let Ok((blk, first, n)) = check_request(&b, at, &q) {
                    assert!((first + n) * 4096 <= b[blk].1);
                }
            }
        }
    }
}

/// A destination guest: on resume, a thread reads random pages of its
/// memory (faulting on the missing ones) until stopped.
struct TouchGuest {
    mem: ProcessMemory,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
    paused: bool,
    /// A pause between two reads (none: as fast as it can).
    pace: Duration,
}

impl TouchGuest {
    fn new(mem: &ProcessMemory) -> Self {
        TouchGuest {
            mem: mem.clone(),
            stop: Arc::default(),
            reads: Arc::default(),
            thread: None,
            paused: false,
            pace: Duration::ZERO,
        }
    }

    /// A guest that reads a page every `pace`: its faults leave most
    /// pages to the background push.
    fn paced(mem: &ProcessMemory, pace: Duration) -> Self {
        TouchGuest {
            pace,
            ..TouchGuest::new(mem)
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.reads.load(Ordering::SeqCst)
    }
}

impl IncomingGuest for TouchGuest {
    fn restore(&mut self, state: &[u8]) -> Result<(), crate::vm::VmError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(crate::vm::VmError::restore_state(
                "process memory carries no state",
            ))
        }
    }

    fn resume(&mut self) -> Result<(), crate::vm::VmError> {
        let (mem, stop, reads) = (self.mem.clone(), self.stop.clone(), self.reads.clone());
        let pace = self.pace;
        self.thread = Some(thread::spawn(move || {
            let mut rng = XorShift::new(5);
            let mut page = vec![0u8; 4096];
            while !stop.load(Ordering::SeqCst) {
                let b = &mem.blocks()[rng.below(2)];
                let p = rng.below(b.pages() as usize);
                b.region().read(p * 4096, &mut page);
                reads.fetch_add(1, Ordering::Relaxed);
                if !pace.is_zero() {
                    thread::sleep(pace);
                }
            }
        }));
        Ok(())
    }

    fn pause(&mut self) {
        self.paused = true;
    }
}

fn pipes_out() -> (Outgoing, PipeReader, PipeWriter) {
    let (w, r) = pipe();
    let (ack_w, ack_r) = pipe();
    (
        Outgoing {
            writer: Box::new(w),
            ack: Some(Box::new(ack_r)),
        },
        r,
        ack_w,
    )
}

struct Run {
    src: ProcessMemory,
    dst: ProcessMemory,
    stats: crate::engine::MigrationStats,
    received: Received,
    reads: u64,
    /// The source's postcopy progress points.
    history: Vec<crate::engine::PostcopyPoint>,
}

/// A source guest for the postcopy runs: random memory (seed `seed`)
/// that a workload writes at `rate` under a software tracker, an empty
/// destination memory of the same layout, and the migration's handle
/// (postcopy asked at once when `at_once`).
struct Guest {
    src: ProcessMemory,
    dst: ProcessMemory,
    tracker: SoftwareTracker,
    workload: Workload,
    vm: crate::testkit::workload::WorkloadControl,
    handle: MigrationHandle,
}

impl Guest {
    fn start(params: Params, at_once: bool, seed: u64, rate: u64) -> Self {
        let load = WorkloadConfig {
            rate,
            ..WorkloadConfig::default()
        };
        Self::start_with(params, at_once, seed, load)
    }

    /// As [`Guest::start`], with the workload's whole configuration.
    fn start_with(params: Params, at_once: bool, seed: u64, load: WorkloadConfig) -> Self {
        let src = ProcessMemory::new(&layout()).unwrap();
        let dst = ProcessMemory::new(&layout()).unwrap();
        let (tracker, log) = SoftwareTracker::new(&src);
        let writer: PageWriter = Arc::new(move |b, off, data| log.write(b, off, data));
        fill_random(&src.blocks()[..1], &writer, seed);
        let workload = Workload::start(src.blocks().to_vec(), writer, load);
        let vm = workload.control();
        let handle = MigrationHandle::new(params);
        if at_once {
            handle.start_postcopy().unwrap();
        }
        Guest {
            src,
            dst,
            tracker,
            workload,
            vm,
            handle,
        }
    }

    /// Runs the source over TCP to `uri`: the main connection, then every
    /// further one the source opens (urgent, page channels).
    fn run_tcp(
        &mut self,
        uri: &crate::transport::Uri,
    ) -> Result<crate::engine::MigrationStats, MigrationError> {
        use crate::transport::connect;
        Source::new(
            &self.src,
            &mut self.tracker,
            &mut self.vm,
            self.handle.clone(),
        )
        .run_conn(connect(uri).unwrap(), &mut |_| {
            Ok(connect(uri).map_err(std::io::Error::other)?.writer)
        })
    }

    /// The run once the source completed: its guest stays paused, the
    /// workload stops, the destination (`dest`: its outcome and the
    /// guest's reads) completed.
    fn finish(
        self,
        stats: crate::engine::MigrationStats,
        dest: (Result<Received, ReceiveError>, u64),
    ) -> Run {
        assert!(
            self.vm.is_paused(),
            "the source stays paused after postcopy"
        );
        drop(self.workload);
        let (res, reads) = dest;
        Run {
            src: self.src,
            dst: self.dst,
            stats,
            received: res.expect("the destination completes"),
            reads,
            history: self.handle.postcopy_history(),
        }
    }
}

/// The destination over TCP: accepts the main connection on `listener`
/// (and every further one as the source opens it), then receives into
/// `dst` with `guest`, recoverably on `recovery` when given. Yields the
/// outcome and the guest's reads.
fn tcp_destination(
    listener: crate::transport::Listener,
    dst: &ProcessMemory,
    mut guest: TouchGuest,
    recovery: Option<MigrationHandle>,
) -> thread::JoinHandle<(Result<Received, ReceiveError>, u64)> {
    let dst = dst.clone();
    thread::spawn(move || {
        let inc = listener.accept().unwrap();
        let mut accept = further_connections(&listener);
        let res = match &recovery {
            Some(h) => receive_recoverable(
                &dst,
                inc.reader,
                inc.ack,
                &mut guest,
                true,
                Some(&mut accept),
                h,
            ),
            None => receive(
                &dst,
                inc.reader,
                inc.ack,
                &mut guest,
                true,
                Some(&mut accept),
            ),
        };
        (res, guest.stop())
    })
}

/// Migrates a random guest that a workload writes, switching to postcopy
/// as `steer` decides; the destination guest reads its memory from resume.
/// With `at_once`, the switch is asked before the migration starts (pure
/// postcopy).
fn run_postcopy(
    params: Params,
    at_once: bool,
    steer: impl FnOnce(MigrationHandle) + Send + 'static,
) -> Run {
    run_postcopy_of(Guest::start(params, at_once, 7, 256 * MIB), steer)
}

/// As [`run_postcopy`], for the guest `g`.
fn run_postcopy_of(mut g: Guest, steer: impl FnOnce(MigrationHandle) + Send + 'static) -> Run {
    let (out, r, ack_w) = pipes_out();
    // The urgent connection, when postcopy-preempt asks for one.
    let (uw, ur) = pipe();
    let mut uw = Some(uw);
    let mut ur = Some(ur);
    let dst2 = g.dst.clone();
    let dest = thread::spawn(move || {
        let mut guest = TouchGuest::new(&dst2);
        let mut accept = || -> std::io::Result<Box<dyn std::io::Read + Send>> {
            ur.take()
                .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>)
                .ok_or_else(|| std::io::Error::other("one urgent connection only"))
        };
        let res = receive(
            &dst2,
            r,
            Some(Box::new(ack_w)),
            &mut guest,
            true,
            Some(&mut accept),
        );
        let reads = guest.stop();
        (res, reads)
    });
    let h2 = g.handle.clone();
    let steerer = thread::spawn(move || steer(h2));
    let stats = Source::new(&g.src, &mut g.tracker, &mut g.vm, g.handle.clone())
        .run_conn(out, &mut |i| {
            assert_eq!(i, crate::engine::source::URGENT_CONNECTION);
            uw.take()
                .map(|w| Box::new(w) as crate::engine::ChannelWriter)
                .ok_or_else(|| std::io::Error::other("one urgent connection only"))
        })
        .expect("migration succeeds");
    steerer.join().unwrap();
    g.finish(stats, dest.join().unwrap())
}

/// Pages of `mem` the kernel says hold data (the rest were never written:
/// a postcopy switch sends them as zero runs, not after it).
fn data_pages(mem: &ProcessMemory) -> u64 {
    mem.blocks()
        .iter()
        .map(|b| {
            b.data_pages(0, b.pages())
                .expect("private anonymous memory")
                .count()
        })
        .sum()
}

fn postcopy_params() -> Params {
    Params {
        postcopy_ram: true,
        ..Params::default()
    }
}

fn assert_postcopy_done(r: &Run) {
    assert_eq!(
        crate::engine::hex(&memory_digest(&r.src)),
        crate::engine::hex(&memory_digest(&r.dst)),
        "the destination's memory differs from the paused source's"
    );
    assert_eq!(r.stats.status, Status::Completed);
    let pc = r.received.postcopy.as_ref().expect("switched to postcopy");
    assert!(pc.discarded_pages > 0);
    assert_eq!(pc.faults.faults, pc.faults.buckets.iter().sum::<u64>());
    assert!(r.stats.postcopy_time.is_some());
    assert!(r.stats.postcopy_latency_dist.is_some());
    assert!(r.reads > 0, "the destination guest ran");
    let ram = &r.stats.ram;
    assert_eq!(
        ram.precopy_bytes + ram.downtime_bytes + ram.postcopy_bytes,
        ram.transferred
    );
    // The progress points: from the switch to the end, never going back;
    // at the end every page not valid at the switch went once, pushed or
    // asked for.
    let h = &r.history;
    assert!(h.len() >= 2, "{h:?}");
    for w in h.windows(2) {
        assert!(
            w[1].time_ms >= w[0].time_ms
                && w[1].pushed_pages >= w[0].pushed_pages
                && w[1].requested_pages >= w[0].requested_pages
                && w[1].requests >= w[0].requests,
            "{w:?}"
        );
    }
    let last = h.last().unwrap();
    assert_eq!(last.pushed_pages + last.requested_pages, pc.discarded_pages);
    assert_eq!(last.requests, r.stats.ram.postcopy_requests);
    assert!(last.requested_pages <= last.requests * u64::from(MAX_REQUEST_PAGES));
}

#[test]
fn pure_postcopy_of_process_memory() {
    let r = run_postcopy(postcopy_params(), true, |_| {});
    assert_postcopy_done(&r);
    let pc = r.received.postcopy.as_ref().unwrap();
    // Everything the source ever wrote moved after the switch; the pages
    // it never wrote went as zero runs in the pause.
    assert_eq!(pc.discarded_pages, data_pages(&r.src));
    assert!(pc.discarded_pages < r.src.total_bytes() / 4096);
    assert!(r.received.load.stats.zero_pages >= r.src.total_bytes() / 4096 - pc.discarded_pages);
    assert_eq!(pc.placed_pages, pc.discarded_pages);
    assert!(
        r.stats.ram.postcopy_requests > 0,
        "the guest faulted remotely"
    );
    assert!(pc.faults.faults > 0);
    // Only the pages the source never wrote were valid here at the
    // switch: no more than those were served with local zeros.
    let untouched = r.src.total_bytes() / 4096 - pc.discarded_pages;
    assert!(pc.faults.local_pages <= untouched);
    assert_eq!(r.stats.postcopy_local_pages, Some(pc.faults.local_pages));
}

/// A destination guest that never touches its memory.
struct IdleGuest;

impl IncomingGuest for IdleGuest {
    fn restore(&mut self, state: &[u8]) -> Result<(), crate::vm::VmError> {
        assert!(state.is_empty(), "process memory carries no state");
        Ok(())
    }

    fn resume(&mut self) -> Result<(), crate::vm::VmError> {
        Ok(())
    }

    fn pause(&mut self) {}
}

#[test]
fn zero_pages_pushed_after_the_switch_are_not_placed() {
    // ram1's last 3 MiB hold pages the source wrote with zeros (written,
    // so they go after the switch, as zero records, not in the pause).
    // The destination dropped those pages at the switch: it marks them
    // received without an ioctl, and they read as zeros there.
    let load = WorkloadConfig {
        rate: 64 * MIB,
        working_set: MIB,
        ..WorkloadConfig::default()
    };
    let mut g = Guest::start_with(postcopy_params(), true, 7, load);
    let (first, pages) = (256usize, 768usize);
    assert!(g.src.blocks()[1]
        .region()
        .write(first * 4096, &vec![0u8; pages * 4096]));
    let (out, r, ack_w) = pipes_out();
    let dst2 = g.dst.clone();
    let dest = thread::spawn(move || {
        let res = receive(&dst2, r, Some(Box::new(ack_w)), &mut IdleGuest, true, None);
        (res, 0)
    });
    let stats = Source::new(&g.src, &mut g.tracker, &mut g.vm, g.handle.clone())
        .run_conn(out, &mut |_| {
            Err(std::io::Error::other("no further connection"))
        })
        .expect("migration succeeds");
    let run = g.finish(stats, dest.join().unwrap());
    assert_eq!(run.stats.status, Status::Completed);
    let pc = run
        .received
        .postcopy
        .as_ref()
        .expect("switched to postcopy");
    assert_eq!(pc.faults.faults, 0, "nothing touched the memory");
    assert_eq!(pc.placed_pages, pc.discarded_pages);
    assert!(run.received.load.stats.zero_pages >= pages as u64);
    // Checked before anything reads the destination's memory (a read maps
    // the kernel's zero page).
    let region = run.dst.blocks()[1].region();
    let placed: Vec<usize> = (first..first + pages)
        .filter(|p| region.resident(p * 4096) != Some(false))
        .collect();
    assert!(placed.is_empty(), "zero pages placed at {placed:?}");
    assert_eq!(
        crate::engine::hex(&memory_digest(&run.src)),
        crate::engine::hex(&memory_digest(&run.dst)),
        "the destination's memory differs from the paused source's"
    );
}

#[test]
fn a_memfd_destination_drops_its_stale_pages_from_the_file() {
    // Pages the destination received in precopy and the source wrote
    // again are dropped at the switch. In memfd memory they must go from
    // the file (a hole punched): unmapped only, they would map again at
    // the next touch, never fault, and keep their old bytes over what the
    // source sends after the switch.
    let params = Params {
        max_bandwidth: 16 * MIB,
        ..postcopy_params()
    };
    let mut g = Guest::start(params, false, 11, 64 * MIB);
    g.dst = ProcessMemory::new_memfd(&layout()).unwrap();
    let r = run_postcopy_of(g, |h| {
        while h.history().len() < 2 && !h.stats().status.is_final() {
            thread::sleep(Duration::from_millis(5));
        }
        h.start_postcopy().unwrap();
    });
    assert!(r.dst.blocks()[0].backing().is_some(), "memfd-backed");
    assert_postcopy_done(&r);
}

#[test]
fn local_zero_fills_of_valid_untouched_pages_are_counted() {
    // The workload writes only the first 1 MiB of each block, and ram1
    // starts empty: after the first pass its last 3 MiB are zero pages
    // the destination never wrote (known zero: it skips them), valid at
    // the switch. The destination guest's reads there fault, and the
    // destination fills them with zeros itself.
    let params = Params {
        // Capped so that precopy is still running when the command comes.
        max_bandwidth: 16 * MIB,
        downtime_limit: 5,
        ..postcopy_params()
    };
    let load = WorkloadConfig {
        rate: 64 * MIB,
        working_set: MIB,
        ..WorkloadConfig::default()
    };
    let g = Guest::start_with(params, false, 7, load);
    let ram1_pages = g.dst.blocks()[1].pages();
    // Without a way to ask the kernel which pages hold data, the loader
    // reads every zero page it is sent (mapping the kernel's zero page),
    // and then nothing faults there.
    let kernel_tells = g.dst.blocks()[1].data_pages(0, ram1_pages).is_some();
    let r = run_postcopy_of(g, |h| {
        while h.history().len() < 2 && !h.stats().status.is_final() {
            thread::sleep(Duration::from_millis(5));
        }
        h.start_postcopy().unwrap();
    });
    assert_postcopy_done(&r);
    let pc = r.received.postcopy.as_ref().unwrap();
    let f = &pc.faults;
    // The source got the destination's figures.
    assert_eq!(r.stats.postcopy_local_faults, Some(f.local_faults));
    assert_eq!(r.stats.postcopy_local_pages, Some(f.local_pages));
    assert_eq!(
        r.stats.postcopy_local_latency,
        Some(f.local_us.checked_div(f.local_faults).unwrap_or(0))
    );
    // Each fill places 1..=LOCAL_ZERO_PAGES pages, all in ram1 (ram0 is
    // all data).
    assert!(f.local_pages >= f.local_faults, "{f:?}");
    assert!(
        f.local_pages <= f.local_faults * dest::LOCAL_ZERO_PAGES,
        "{f:?}"
    );
    assert!(f.local_pages <= ram1_pages, "{f:?}");
    if !kernel_tells {
        eprintln!("SKIPPED local faults > 0: the kernel cannot say which pages hold data");
        return;
    }
    assert!(f.local_faults > 0, "no local zero fill: {f:?}");
    assert!(f.local_pages > 0, "{f:?}");
}

#[test]
fn pure_postcopy_with_the_urgent_connection() {
    // The push is capped so that the destination guest's reads come
    // before it placed everything: only the 12 MiB the source wrote go
    // after the switch (the rest went as zero runs in the pause), and
    // uncapped on a loaded host the push can win every race.
    let r = run_postcopy(
        Params {
            postcopy_preempt: true,
            max_bandwidth: 32 * MIB,
            ..postcopy_params()
        },
        true,
        |_| {},
    );
    assert_postcopy_done(&r);
    assert!(
        r.stats.ram.postcopy_requests > 0,
        "the guest faulted remotely"
    );
    let pc = r.received.postcopy.as_ref().unwrap();
    // Only requested pages use the urgent connection. How many depends on
    // timing: a request for a page the background push already sent is a
    // duplicate and sends nothing (on an idle host the push of these
    // 12 MiB can win every race), so no lower bound is asserted here.
    assert!(pc.urgent_pages < pc.placed_pages, "bulk pages did not");
}

#[test]
fn switch_by_command_after_some_precopy() {
    // Capped so that precopy is still running when the command comes.
    let params = Params {
        max_bandwidth: 16 * MIB,
        downtime_limit: 5,
        ..postcopy_params()
    };
    let r = run_postcopy(params, false, |h| {
        while h.history().len() < 2 && !h.stats().status.is_final() {
            thread::sleep(Duration::from_millis(5));
        }
        h.start_postcopy().unwrap();
    });
    assert_postcopy_done(&r);
    assert!(r.stats.ram.precopy_bytes > 0);
}

#[test]
fn auto_switch_when_precopy_makes_no_progress() {
    // 256 MiB/s of writes against a 32 MiB/s link never converges.
    let params = Params {
        max_bandwidth: 32 * MIB,
        downtime_limit: 5,
        postcopy_switchover: Switchover::Auto,
        ..postcopy_params()
    };
    let r = run_postcopy(params, false, |_| {});
    assert_postcopy_done(&r);
}

/// As [`run_postcopy`], over TCP on loopback with every connection the
/// source opens (urgent, page channels) accepted on one listener.
fn run_postcopy_tcp(
    params: Params,
    at_once: bool,
    steer: impl FnOnce(MigrationHandle) + Send + 'static,
) -> Run {
    let mut g = Guest::start(params, at_once, 13, 128 * MIB);
    let (listener, _) = tcp_listener();
    let uri = listener.local_uri();
    let dest = tcp_destination(listener, &g.dst, TouchGuest::new(&g.dst), None);
    let h2 = g.handle.clone();
    let steerer = thread::spawn(move || steer(h2));
    let stats = g.run_tcp(&uri).expect("migration succeeds");
    steerer.join().unwrap();
    g.finish(stats, dest.join().unwrap())
}

#[test]
fn pure_postcopy_over_page_channels() {
    let r = run_postcopy_tcp(
        Params {
            channels: 2,
            ..postcopy_params()
        },
        true,
        |_| {},
    );
    assert_postcopy_done(&r);
    let pc = r.received.postcopy.as_ref().unwrap();
    assert_eq!(pc.discarded_pages, data_pages(&r.src));
    // Each page once after the switch: nothing placed twice.
    assert_eq!(pc.placed_pages, pc.discarded_pages);
    assert_eq!(r.received.load.stats.channels, 2);
    // Background pages went on the page channels, requested ones not.
    assert!(pc.channel_pages > 0, "no page came on a page channel");
    assert!(pc.channel_pages <= pc.placed_pages);
}

#[test]
fn postcopy_over_page_channels_with_the_urgent_connection_after_precopy() {
    // Precopy is held to 1 MiB/s until the switch: its first pass over
    // 8 MiB of random pages takes about 8 s, so it can neither end nor
    // converge before the command comes, however late a loaded host runs
    // the steering thread (a workload starved of CPU dirties next to
    // nothing, and a later pass could converge). The push after the
    // switch is paced at 16 MiB/s.
    let params = Params {
        channels: 2,
        postcopy_preempt: true,
        max_bandwidth: MIB,
        downtime_limit: 5,
        ..postcopy_params()
    };
    // On a loaded host the guest's requests can take every page left at
    // the switch before the paced push sends one on a channel: each run
    // is checked, and a run with no channel page is tried again.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = run_postcopy_tcp(params.clone(), false, |h| {
            let t0 = std::time::Instant::now();
            while h.stats().ram.transferred < 256 << 10
                && !h.stats().status.is_final()
                && t0.elapsed() < Duration::from_secs(60)
            {
                thread::sleep(Duration::from_millis(5));
            }
            h.start_postcopy().unwrap();
            let mut p = h.params();
            p.max_bandwidth = 16 * MIB;
            h.set_params(p).unwrap();
        });
        assert_postcopy_done(&r);
        assert!(r.stats.ram.precopy_bytes > 0);
        let pc = r.received.postcopy.as_ref().unwrap();
        assert_eq!(pc.placed_pages, pc.discarded_pages);
        assert!(pc.urgent_pages + pc.channel_pages <= pc.placed_pages);
        if pc.channel_pages > 0 {
            return;
        }
        seen.push((pc.placed_pages, pc.urgent_pages));
    }
    panic!("no page came on a page channel in 3 runs (placed, urgent): {seen:?}");
}

#[test]
fn start_postcopy_needs_the_capability() {
    let h = MigrationHandle::new(Params::default());
    let e = h.start_postcopy().unwrap_err();
    assert!(e.contains("postcopy-ram is off"), "{e}");
}

/// The source's end of a fake destination: reads the stream to the switch,
/// answers LOADED, takes GO, answers STARTED. Returns the stream, read up
/// to GO.
fn fake_destination_to_switch<'a>(
    r: &'a mut PipeReader,
    ack: &mut PipeWriter,
) -> StreamReader<&'a mut PipeReader> {
    use crate::engine::{read_go, write_reply, Reply};
    use crate::stream::Record;
    let mut sr = StreamReader::new(&mut *r).unwrap();
    let setup = sr.flags() & crate::stream::format::FLAG_SETUP != 0;
    let mut switched = false;
    let mut drain = None;
    loop {
        match sr.next_record().unwrap() {
            // The setup verdict, before any page comes.
            Record::SectionEnd { seq: 0 } if setup => {
                write_reply(ack, &Reply::Accepted).unwrap();
            }
            // The source waits for its drain marks before it pauses.
            Record::Drain { mark } => drain = Some(mark),
            Record::SectionEnd { .. } if drain.is_some() => {
                let mark = drain.take().expect("just checked");
                write_reply(ack, &Reply::Applied(mark)).unwrap();
            }
            Record::Postcopy => switched = true,
            Record::SectionEnd { .. } if switched => break,
            _ => {}
        }
    }
    write_reply(ack, &Reply::Loaded).unwrap();
    read_go(sr.inner_if_drained().expect("nothing after the switch")).unwrap();
    write_reply(ack, &Reply::Started(None)).unwrap();
    sr
}

#[test]
fn the_push_window_counts_from_go_and_lapses_without_progress() {
    // A destination that reads every byte at once but reports no PROGRESS:
    // for PROGRESS_GRACE the source keeps at most the window (and the
    // batch under way) unread past GO; the push used to run free until
    // the first PROGRESS, filling socket buffers with megabytes. Then the
    // window lapses and the migration completes without any PROGRESS.
    use super::push::PUSH_BATCH_BYTES;
    let src = ProcessMemory::new(&layout()).unwrap();
    let (mut tracker, log) = SoftwareTracker::new(&src);
    let writer: PageWriter = Arc::new(move |b, off, data| log.write(b, off, data));
    // 8 MiB of data pages: 32 windows.
    fill_random(&src.blocks()[..1], &writer, 3);
    let mut vm = crate::vm::NoVm;
    let handle = MigrationHandle::new(postcopy_params());
    handle.start_postcopy().unwrap();
    let (out, mut r, mut ack_w) = pipes_out();
    let watch = Duration::from_millis(300);
    assert!(watch < PROGRESS_GRACE);
    let dest = thread::spawn(move || {
        let mut sr = fake_destination_to_switch(&mut r, &mut ack_w);
        let (go, t0) = (sr.offset(), std::time::Instant::now());
        let mut early = 0;
        loop {
            let end = matches!(sr.next_record().unwrap(), crate::stream::Record::End);
            if t0.elapsed() < watch {
                early = sr.offset() - go;
            }
            if end {
                break;
            }
        }
        write_message(&mut ack_w, &Message::Complete(FaultReport::default())).unwrap();
        (early, sr.offset() - go)
    });
    let stats = Source::new(&src, &mut tracker, &mut vm, handle.clone())
        .run_over(out)
        .unwrap();
    let (early, total) = dest.join().unwrap();
    assert_eq!(stats.status, Status::Completed);
    assert!(early > 0, "the push starts before any PROGRESS");
    assert!(
        early <= PUSH_WINDOW + PUSH_BATCH_BYTES + 8192,
        "{early} bytes past GO before any PROGRESS (window {PUSH_WINDOW})"
    );
    assert!(total > 4 * PUSH_WINDOW, "only {total} bytes after GO");
}

#[test]
fn source_refuses_a_request_outside_every_block() {
    let src = ProcessMemory::new(&layout()).unwrap();
    let (mut tracker, _log) = SoftwareTracker::new(&src);
    let mut vm = crate::vm::NoVm;
    let handle = MigrationHandle::new(postcopy_params());
    handle.start_postcopy().unwrap();
    let (out, mut r, mut ack_w) = pipes_out();
    let dest = thread::spawn(move || {
        fake_destination_to_switch(&mut r, &mut ack_w);
        let bad = Message::Request(PageRequest {
            block: 1,
            offset: 64 * MIB,
            len: 4096,
        });
        write_message(&mut ack_w, &bad).unwrap();
        // Keep reading so the source is never blocked on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let e = Source::new(&src, &mut tracker, &mut vm, handle.clone())
        .run_over(out)
        .unwrap_err();
    assert!(
        matches!(e, MigrationError::Postcopy(PostcopyError::BadRange { .. })),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("0x4000000") && text.contains("'ram1'"),
        "{text}"
    );
    assert_eq!(handle.stats().status, Status::Failed);
    dest.join().unwrap();
}

#[test]
fn destination_reports_a_source_lost_during_postcopy() {
    use crate::engine::{read_reply, write_go, Reply};
    let dst = ProcessMemory::new(&layout()).unwrap();
    let (w, r) = pipe();
    let (ack_w, mut ack_r) = pipe();
    // A source that switches at once, then dies after GO.
    let source = thread::spawn(move || {
        let mut sw = StreamWriter::new(w, 0);
        let descs: Vec<BlockDesc> = layout()
            .into_iter()
            .map(|(id, len)| BlockDesc { id: id.into(), len })
            .collect();
        sw.block_list(&descs).unwrap();
        sw.discard(0, 0, &[u64::MAX; 32]).unwrap();
        sw.postcopy().unwrap();
        sw.section_end(0).unwrap();
        assert_eq!(read_reply(&mut ack_r).unwrap(), Reply::Loaded);
        write_go(sw.get_mut()).unwrap();
        assert!(matches!(read_reply(&mut ack_r).unwrap(), Reply::Started(_)));
        // Killed: both connections close.
    });
    let mut guest = TouchGuest::new(&dst);
    // This guest must not touch memory: a missing page would wait forever.
    let res = {
        struct Still<'a>(&'a mut TouchGuest, bool);
        impl IncomingGuest for Still<'_> {
            fn restore(&mut self, s: &[u8]) -> Result<(), crate::vm::VmError> {
                self.0.restore(s)
            }
            fn resume(&mut self) -> Result<(), crate::vm::VmError> {
                self.1 = true;
                Ok(())
            }
            fn pause(&mut self) {
                self.0.pause()
            }
        }
        let mut g = Still(&mut guest, false);
        let res = receive(&dst, r, Some(Box::new(ack_w)), &mut g, true, None);
        assert!(g.1, "the guest was resumed after GO");
        res
    };
    source.join().unwrap();
    let e = res.unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(
            e,
            ReceiveError::SourceLost {
                missing: 2048,
                cause: LostCause::Stream(_)
            }
        ),
        "{text}"
    );
    assert!(text.contains("cannot continue"), "{text}");
    assert!(guest.paused, "the destination paused its guest");
}

#[test]
fn destination_without_postcopy_refuses_the_switch() {
    let src = ProcessMemory::new(&layout()).unwrap();
    let dst = ProcessMemory::new(&layout()).unwrap();
    let (mut tracker, _log) = SoftwareTracker::new(&src);
    let mut vm = crate::vm::NoVm;
    let handle = MigrationHandle::new(postcopy_params());
    handle.start_postcopy().unwrap();
    let (out, r, ack_w) = pipes_out();
    let dst2 = dst.clone();
    let dest = thread::spawn(move || {
        let mut guest = TouchGuest::new(&dst2);
        receive(&dst2, r, Some(Box::new(ack_w)), &mut guest, false, None)
    });
    let e = Source::new(&src, &mut tracker, &mut vm, handle)
        .run_over(out)
        .unwrap_err();
    assert!(e.to_string().contains("postcopy-ram is off"), "{e}");
    assert!(matches!(
        dest.join().unwrap(),
        Err(ReceiveError::PostcopyOff)
    ));
}

// ---------------------------------------------------------------------------
// Recovery: a connection cut during postcopy, then a new one.

/// Accepts a migration's further connections (urgent, page channels) on
/// `listener`, as the destination's `accept` callback.
fn further_connections(
    listener: &crate::transport::Listener,
) -> impl FnMut() -> std::io::Result<Box<dyn std::io::Read + Send>> + '_ {
    move || {
        listener
            .accept()
            .map(|i| i.reader)
            .map_err(std::io::Error::other)
    }
}

fn tcp_listener() -> (crate::transport::Listener, std::net::SocketAddr) {
    let l = crate::transport::Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let crate::transport::Uri::Tcp(a) = l.local_uri() else {
        unreachable!("a TCP listener")
    };
    (l, a.parse().unwrap())
}

struct Recovered {
    run: Run,
    src_statuses: Vec<Status>,
    dst_statuses: Vec<Status>,
    cut: bool,
    /// Bytes read on each connection reopened at the last recovery
    /// (urgent first, then the page channels).
    reopened: Vec<u64>,
}

fn statuses(h: &MigrationHandle) -> Statuses {
    let seen: Statuses = Arc::default();
    let s = seen.clone();
    h.observe(Box::new(move |e| {
        if let crate::engine::HandleEvent::Status(st) = e {
            s.lock().unwrap().push(*st);
        }
    }));
    seen
}

/// The status events a handle reported so far.
type Statuses = Arc<std::sync::Mutex<Vec<Status>>>;

/// A pure postcopy that may pause and recover: the source guest
/// ([`Guest::start`] with `params`, `seed`, `rate`; postcopy asked at once,
/// recovery allowed), the destination's handle, and the statuses each
/// side reports (source, destination).
fn recoverable(
    params: Params,
    seed: u64,
    rate: u64,
) -> (Guest, MigrationHandle, Statuses, Statuses) {
    let g = Guest::start(params, true, seed, rate);
    g.handle.set_postcopy_recovery(true);
    let dh = MigrationHandle::new(Params::default());
    let (src_seen, dst_seen) = (statuses(&g.handle), statuses(&dh));
    (g, dh, src_seen, dst_seen)
}

/// Pure postcopy over TCP through a proxy that applies `fault` to the
/// main connection; once both sides report `postcopy-paused`, a new
/// direct connection resumes them. The background push is capped so that
/// the cut lands in the middle of postcopy.
fn run_recovery(fault: Fault, preempt: bool) -> Recovered {
    run_recovery_with(fault, preempt, 1)
}

/// As [`run_recovery`], with `channels` page channels (opened through the
/// proxy, not faulted; the source closes them at the cut). The recovery
/// resumes over one connection.
fn run_recovery_with(fault: Fault, preempt: bool, channels: u16) -> Recovered {
    run_cut(Cut {
        fault,
        on: 0,
        preempt,
        channels,
        reopen: false,
        recovery_fault: None,
    })
}

/// Where a recovery test cuts postcopy, and how it mends it.
#[derive(Clone, Copy, Debug)]
struct Cut {
    /// The fault.
    fault: Fault,
    /// The connection through the proxy it hits: 0 the main one, then
    /// the urgent connection (with `preempt`), then the page channels.
    on: usize,
    /// With the urgent connection (postcopy-preempt).
    preempt: bool,
    /// Page channels.
    channels: u16,
    /// The recovery reopens the urgent connection and the page channels
    /// (`resume_postcopy_with` / `recover_postcopy_with`); else it goes
    /// on over one connection.
    reopen: bool,
    /// The first recovery goes through a proxy with this fault on its
    /// main connection (the received-bitmap exchange); the next one is
    /// direct.
    recovery_fault: Option<Fault>,
}

impl Cut {
    /// `fault` on connection `on` (see [`Cut::on`]), with 2 page channels
    /// and, with `preempt`, the urgent connection, all reopened by one
    /// direct recovery.
    fn reopening(fault: Fault, on: usize, preempt: bool) -> Cut {
        Cut {
            fault,
            on,
            preempt,
            channels: 2,
            reopen: true,
            recovery_fault: None,
        }
    }
}

/// A reader that counts the bytes read through it.
struct Counted(crate::transport::BoxRead, Arc<AtomicU64>);

impl std::io::Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Status events `s` seen so far on `seen`.
fn count(seen: &std::sync::Mutex<Vec<Status>>, s: Status) -> usize {
    seen.lock().unwrap().iter().filter(|&&x| x == s).count()
}

/// Pure postcopy of 12 MiB over TCP with the push capped at 6 MiB/s, a
/// guest that writes on the source and reads at random on the
/// destination, the fault of `cut`, then recovery (see [`Cut`]).
fn run_cut(cut: Cut) -> Recovered {
    use crate::transport::{connect, Uri};
    let params = Params {
        postcopy_preempt: cut.preempt,
        channels: cut.channels,
        max_bandwidth: 6 * MIB,
        ..postcopy_params()
    };
    let (mut g, dh, src_seen, dst_seen) = recoverable(params, 11, 64 * MIB);
    let sh = g.handle.clone();
    let (listener, addr) = tcp_listener();
    let proxy = FaultProxy::start_on(addr, cut.fault, cut.on).unwrap();
    // Paced: the background push, not the guest's requests, carries most
    // pages (on the page channels when there are some).
    let guest = TouchGuest::paced(&g.dst, Duration::from_millis(1));
    let dest = tcp_destination(listener, &g.dst, guest, Some(dh.clone()));
    // Bytes read here on each reopened connection of the last recovery.
    let reopened: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
    let (sh2, dh3, reopened2) = (sh.clone(), dh.clone(), reopened.clone());
    let (src_seen2, dst_seen2) = (src_seen.clone(), dst_seen.clone());
    let steer = thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let attempts = 1 + usize::from(cut.recovery_fault.is_some());
        let mut recovery_proxy = None;
        for round in 1..=attempts {
            // Both sides paused `round` times (a failed recovery pauses
            // them again).
            loop {
                let (s, d) = (
                    count(&src_seen2, Status::PostcopyPaused),
                    count(&dst_seen2, Status::PostcopyPaused),
                );
                if s >= round && d >= round {
                    break;
                }
                let (s, d) = (sh2.stats().status, dh3.stats().status);
                if s.is_final() || d.is_final() || t0.elapsed() > Duration::from_secs(120) {
                    return None;
                }
                thread::sleep(Duration::from_millis(5));
            }
            // migrate-recover on the destination, migrate resume on the
            // source; the first try through a faulty proxy if asked.
            let (l2, a2) = tcp_listener();
            let faulty = (round == 1).then_some(cut.recovery_fault).flatten();
            let uri: Uri = match faulty {
                Some(f) => {
                    let p = FaultProxy::start(a2, f).unwrap();
                    let u = p.uri().parse().unwrap();
                    recovery_proxy = Some(p);
                    u
                }
                None => l2.local_uri(),
            };
            let last = round == attempts;
            let acc = thread::spawn(move || {
                let inc = l2.accept().unwrap();
                (inc, l2)
            });
            // The listener reads the stream's first bytes before it
            // answers: the source must start writing first.
            let conn = connect(&uri).unwrap();
            if cut.reopen {
                let u2 = uri.clone();
                sh2.resume_postcopy_with(conn, move |_| {
                    Ok(connect(&u2).map_err(std::io::Error::other)?.writer)
                })
                .unwrap();
            } else {
                sh2.resume_postcopy(conn).unwrap();
            }
            let (inc, l2) = acc.join().unwrap();
            if cut.reopen {
                let counters = reopened2.clone();
                if last {
                    counters.lock().unwrap().clear();
                }
                dh3.recover_postcopy_with(inc, move || {
                    let i = l2.accept().map_err(std::io::Error::other)?;
                    let n = Arc::new(AtomicU64::new(0));
                    if last {
                        counters.lock().unwrap().push(n.clone());
                    }
                    Ok(Box::new(Counted(i.reader, n)) as crate::transport::BoxRead)
                })
                .unwrap();
            } else {
                dh3.recover_postcopy(inc).unwrap();
            }
        }
        Some(recovery_proxy.map(|p| p.has_cut()))
    });
    let proxy_uri: Uri = proxy.uri().parse().unwrap();
    let stats = g
        .run_tcp(&proxy_uri)
        .expect("the migration completes after recovery");
    let recovery_cut = steer.join().unwrap().expect("both sides paused");
    if let Some(c) = recovery_cut {
        assert!(c, "the recovery proxy cut the bitmap exchange");
        assert!(
            count(&src_seen, Status::PostcopyRecover) >= 2,
            "two recoveries on the source: {:?}",
            src_seen.lock().unwrap()
        );
    }
    let r = Recovered {
        run: g.finish(stats, dest.join().unwrap()),
        src_statuses: src_seen.lock().unwrap().clone(),
        dst_statuses: dst_seen.lock().unwrap().clone(),
        cut: proxy.has_cut(),
        reopened: reopened
            .lock()
            .unwrap()
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect(),
    };
    assert_recovered(&r);
    if cut.reopen {
        let want = usize::from(cut.preempt)
            + if cut.channels > 1 {
                usize::from(cut.channels)
            } else {
                0
            };
        assert_eq!(
            r.reopened.len(),
            want,
            "connections reopened at the last recovery: {:?}",
            r.reopened
        );
    }
    r
}

/// With the urgent connection and 2 page channels reopened by the
/// recovery: background pages came on the reopened channels.
fn assert_channels_reopened(r: &Recovered, preempt: bool) {
    let chans = &r.reopened[usize::from(preempt)..];
    assert_eq!(chans.len(), 2);
    // A raw page costs 4 KiB plus its record's header and a share of the
    // section ends: at most 64 bytes more (the pages are all data now that
    // pages never written go as zero runs at the switch).
    let pages: u64 = chans.iter().sum::<u64>() / (4096 + 64);
    assert!(
        pages > 0,
        "no page came on the reopened page channels: {:?} bytes",
        r.reopened
    );
    let pc = r.run.received.postcopy.as_ref().unwrap();
    assert!(pc.channel_pages >= pages, "{} < {pages}", pc.channel_pages);
}

fn assert_recovered(r: &Recovered) {
    assert!(r.cut, "the fault cut the connection");
    assert_eq!(
        crate::engine::hex(&memory_digest(&r.run.src)),
        crate::engine::hex(&memory_digest(&r.run.dst)),
        "the destination's memory differs from the paused source's"
    );
    assert_eq!(r.run.stats.status, Status::Completed);
    let pc = r
        .run
        .received
        .postcopy
        .as_ref()
        .expect("switched to postcopy");
    assert_eq!(pc.discarded_pages, data_pages(&r.run.src));
    assert!(r.run.reads > 0, "the destination guest ran");
    for (side, seen) in [
        ("source", &r.src_statuses),
        ("destination", &r.dst_statuses),
    ] {
        let at = |s: Status| seen.iter().position(|&x| x == s);
        let paused = at(Status::PostcopyPaused)
            .unwrap_or_else(|| panic!("{side} never reported postcopy-paused: {seen:?}"));
        // The last recovery (an earlier one may have failed).
        let recover = seen
            .iter()
            .rposition(|&x| x == Status::PostcopyRecover)
            .unwrap_or_else(|| panic!("{side} never reported postcopy-recover: {seen:?}"));
        assert!(paused < recover, "{side}: {seen:?}");
        assert_eq!(
            seen[recover + 1..].first(),
            Some(&Status::PostcopyActive),
            "{side}: {seen:?}"
        );
    }
    assert_eq!(r.src_statuses.last(), Some(&Status::Completed));
}

#[test]
fn recovery_after_a_cut_early_in_postcopy() {
    run_recovery(Fault::CutForwardAt(64 << 10), false);
}

#[test]
fn recovery_after_a_cut_in_the_middle_of_postcopy() {
    run_recovery(Fault::CutForwardAt(4 * MIB), false);
}

#[test]
fn recovery_after_a_cut_late_in_postcopy() {
    run_recovery(Fault::CutForwardAt(15 * MIB / 2), false);
}

#[test]
fn recovery_after_the_return_path_is_cut() {
    // LOADED, STARTED, then page requests of 15 bytes: cut among them.
    run_recovery(Fault::CutBackAt(400), false);
}

#[test]
fn recovery_with_the_urgent_connection() {
    let r = run_recovery(Fault::CutForwardAt(2 * MIB), true);
    assert!(r.run.stats.ram.postcopy_requests > 0);
}

#[test]
fn recovery_with_page_channels() {
    // The main connection carries no bulk pages here: cut its return path
    // among the page requests.
    let r = run_recovery_with(Fault::CutBackAt(400), false, 2);
    assert_eq!(r.run.received.load.stats.channels, 2);
}

#[test]
fn recovery_reopens_the_urgent_connection_and_page_channels() {
    // The main connection carries no bulk pages (page channels) and no
    // requested page (urgent connection): cut its return path among the
    // page requests and PROGRESS reports.
    let r = run_cut(Cut::reopening(Fault::CutBackAt(400), 0, true));
    assert_eq!(r.run.received.load.stats.channels, 2);
    assert_channels_reopened(&r, true);
}

#[test]
fn recovery_after_a_cut_on_the_urgent_connection_only() {
    // The urgent connection (the second one) carries only requested
    // pages: cut it after two of them.
    let r = run_cut(Cut::reopening(Fault::CutForwardAt(10_000), 1, true));
    assert!(r.run.stats.ram.postcopy_requests > 0);
    assert_channels_reopened(&r, true);
}

#[test]
fn recovery_after_a_cut_on_a_page_channel_only() {
    // Page channel 1 (the second connection): cut in the middle of the
    // background push.
    let r = run_cut(Cut::reopening(Fault::CutForwardAt(MIB), 1, false));
    assert_channels_reopened(&r, false);
}

#[test]
fn recovery_after_a_cut_during_the_received_bitmap_exchange() {
    // The first recovery's return path is cut 100 bytes into the
    // received bitmap (about 400 bytes for 12 MiB); both sides pause
    // again, and a second recovery completes.
    let r = run_cut(Cut {
        recovery_fault: Some(Fault::CutBackAt(100)),
        ..Cut::reopening(Fault::CutBackAt(400), 0, true)
    });
    assert!(count_in(&r.dst_statuses, Status::PostcopyPaused) >= 2);
    assert_channels_reopened(&r, true);
}

#[test]
fn recovery_after_a_cut_between_go_and_started() {
    // GO reaches the destination (its guest runs), STARTED is lost: the
    // source cannot know, and pauses like after any later cut.
    let r = run_cut(Cut::reopening(Fault::CutAfterGo, 0, true));
    assert_channels_reopened(&r, true);
}

#[test]
fn recovery_after_a_cut_mid_push_with_page_channels_reopened() {
    // One page channel is cut mid-push, then the recovery reopens both;
    // no urgent connection: requested pages share the main connection.
    let r = run_cut(Cut::reopening(Fault::CutForwardAt(3 * MIB), 2, false));
    assert_channels_reopened(&r, false);
}

fn count_in(seen: &[Status], s: Status) -> usize {
    seen.iter().filter(|&&x| x == s).count()
}

/// A cut before GO, with recovery allowed: no pause anywhere; the
/// source resumes its guest and reports the failure, the destination's
/// copy never ran.
fn cut_before_go(fault: Fault) {
    use crate::transport::Uri;
    let params = Params {
        postcopy_preempt: true,
        channels: 2,
        ..postcopy_params()
    };
    let (mut g, dh, src_seen, dst_seen) = recoverable(params, 17, 16 * MIB);
    let sh = g.handle.clone();
    let (listener, addr) = tcp_listener();
    let proxy = FaultProxy::start(addr, fault).unwrap();
    let dest = tcp_destination(listener, &g.dst, TouchGuest::new(&g.dst), Some(dh.clone()));
    let proxy_uri: Uri = proxy.uri().parse().unwrap();
    let e = g.run_tcp(&proxy_uri).unwrap_err();
    assert!(!g.vm.is_paused(), "the source resumed its guest after: {e}");
    assert_eq!(sh.stats().status, Status::Failed, "{e}");
    drop(g);
    let (res, reads) = dest.join().unwrap();
    let d = res.unwrap_err();
    assert!(
        !matches!(d, ReceiveError::SourceLost { .. }),
        "the destination's copy never ran: {d}"
    );
    assert_eq!(reads, 0, "the destination guest never ran ({d})");
    for seen in [&src_seen, &dst_seen] {
        assert_eq!(count(seen, Status::PostcopyPaused), 0, "{:?}", seen);
    }
    assert!(proxy.has_cut());
}

#[test]
fn a_cut_before_the_switch_record_fails_cleanly_with_recovery_on() {
    // 200 bytes: the stream start and block list, long before DISCARD and
    // POSTCOPY.
    cut_before_go(Fault::CutForwardAt(200));
}

#[test]
fn a_cut_right_after_the_switch_record_fails_cleanly_with_recovery_on() {
    // The whole stream, POSTCOPY included, arrives; the cut takes LOADED.
    cut_before_go(Fault::CutBeforeReply);
}

/// The stream start of a resumed connection: `flags`, a channel record
/// (index, count, session) when given, the block list `list`, then
/// `tail` (records written by the closure).
fn resumed_stream(
    flags: u16,
    channel: Option<(u16, u16, u64)>,
    list: &[(&str, u64)],
    tail: impl FnOnce(&mut StreamWriter<Vec<u8>>),
) -> crate::transport::BoxRead {
    let mut w = StreamWriter::new(Vec::new(), flags);
    if let Some((i, n, s)) = channel {
        w.channel(i, n, s).unwrap();
    }
    let descs: Vec<BlockDesc> = list
        .iter()
        .map(|&(id, len)| BlockDesc { id: id.into(), len })
        .collect();
    w.block_list(&descs).unwrap();
    w.section_end(0).unwrap();
    tail(&mut w);
    Box::new(std::io::Cursor::new(w.get_mut().clone()))
}

#[test]
fn reopened_connections_are_checked_like_the_first_ones() {
    use crate::stream::format::{FLAG_CHANNELS, FLAG_URGENT};
    let mem = ProcessMemory::new(&layout()).unwrap();
    let map = [0usize, 1];
    let good = layout();
    let session = 0x5e55;
    let main = || {
        resumed_stream(
            FLAG_URGENT | FLAG_CHANNELS,
            Some((0, 2, session)),
            &good,
            |_| {},
        )
    };
    let urgent = || resumed_stream(0, None, &good, |_| {});
    let channel = |i: u16, n: u16, s: u64, list: &[(&str, u64)], switch: bool| {
        resumed_stream(FLAG_CHANNELS, Some((i, n, s)), list, |w| {
            if !switch {
                w.zero(0, 0).unwrap();
            }
            w.postcopy().unwrap();
            w.section_end(1).unwrap();
        })
    };
    let open = |conns: Vec<crate::transport::BoxRead>, with_accept: bool| {
        let mut it = conns.into_iter();
        let mut accept: crate::engine::handle::AcceptConnection = Box::new(move || {
            it.next()
                .ok_or_else(|| std::io::Error::other("no more connections"))
        });
        dest::open_resumed(main(), with_accept.then_some(&mut accept), &mem, &map)
    };
    // All of them, in the first connection's order.
    let r = open(
        vec![
            urgent(),
            channel(2, 2, session, &good, true),
            channel(1, 2, session, &good, true),
        ],
        true,
    )
    .map_err(|e| e.to_string())
    .unwrap();
    assert!(r.urgent.is_some());
    assert_eq!(r.channels.len(), 2);
    // Refusals, each saying what is wrong.
    let other = [("ram0", 8 * MIB), ("ram1", 8 * MIB)];
    for (conns, with_accept, want) in [
        (vec![], false, "given no listener"),
        (vec![], true, "accepting the reopened urgent connection"),
        (
            vec![resumed_stream(0, None, &other, |_| {})],
            true,
            "urgent connection's block list differs",
        ),
        (
            vec![urgent(), channel(1, 2, 7, &good, true)],
            true,
            "session 0x7 is not this recovery's (0x5e55)",
        ),
        (
            vec![urgent(), channel(1, 3, session, &good, true)],
            true,
            "channel 1 of 3, the main connection declares 2",
        ),
        (
            vec![
                urgent(),
                channel(1, 2, session, &good, true),
                channel(1, 2, session, &good, true),
            ],
            true,
            "page channel index 1 used twice",
        ),
        (
            vec![urgent(), channel(1, 2, session, &other, true)],
            true,
            "block list differs",
        ),
        (
            vec![urgent(), channel(1, 2, session, &good, false)],
            true,
            "must switch to postcopy before any page",
        ),
        (vec![urgent(), urgent()], true, "not a page channel"),
    ] {
        let e = match open(conns, with_accept) {
            Ok(_) => panic!("accepted (wanted: {want})"),
            Err(e) => e,
        };
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    // The main connection's own block list is checked first.
    let e = dest::open_resumed(resumed_stream(0, None, &other, |_| {}), None, &mem, &map)
        .err()
        .unwrap();
    assert!(e.contains("block list differs from the migration's"), "{e}");
}

#[test]
fn bitmap_messages_are_checked_against_the_blocks() {
    let lens = [8 * MIB, 4 * MIB];
    // A whole bitmap round-trips; its complement is what is missing.
    let mut bytes = Vec::new();
    let mut recv = vec![vec![u64::MAX; 32], vec![0u64; 16]];
    recv[0][3] = !0b1010;
    write_bitmap(&mut bytes, &recv).unwrap();
    let mut r = MessageReader::new(&bytes[..]);
    let mut asm = BitmapAssembler::new(&lens);
    loop {
        let (at, m) = r.read_message().unwrap();
        if asm.add(at, &m).unwrap() {
            break;
        }
    }
    let missing = asm.missing();
    assert_eq!(missing[0].count(), 2);
    assert!(missing[0].test(3 * 64 + 1) && missing[0].test(3 * 64 + 3));
    assert_eq!(missing[1].count(), 1024);
    // Refusals name their byte and what is wrong.
    let bm = |block, first_word, n| Message::Bitmap {
        block,
        first_word,
        words: vec![0; n],
    };
    for (msgs, want) in [
        (vec![bm(2, 0, 1)], "block index 2, the stream has 2 blocks"),
        (vec![bm(0, 5, 1)], "block 0 word 5, expected word 0"),
        (vec![bm(1, 0, 17)], "past its 16 words"),
        (
            vec![bm(0, 0, 32), Message::BitmapEnd { blocks: 2 }],
            "block 1: 0 of its 16 words",
        ),
        (vec![Message::BitmapEnd { blocks: 3 }], "end after 3 blocks"),
        (
            vec![Message::Request(PageRequest {
                block: 0,
                offset: 0,
                len: 4096,
            })],
            "expected the received bitmap, got a page request",
        ),
    ] {
        let mut asm = BitmapAssembler::new(&lens);
        let mut err = None;
        for (k, m) in msgs.iter().enumerate() {
            if let Err(e) = asm.add(100 + k as u64, m) {
                err = Some(e.to_string());
                break;
            }
        }
        let e = err.unwrap_or_else(|| panic!("accepted: {msgs:?}"));
        assert!(
            e.contains(want) && e.contains("byte 10"),
            "{e} (wanted {want})"
        );
    }
    // A word count of 0 or past the limit is refused by the reader.
    let mut b = vec![b'B', 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&(MAX_BITMAP_WORDS + 1).to_be_bytes());
    let e = MessageReader::new(&b[..])
        .read_message()
        .unwrap_err()
        .to_string();
    assert!(e.contains("bitmap word count 1025"), "{e}");
    let b = [b'B', 0, 0, 0, 0, 0, 0, 0, 0];
    let e = MessageReader::new(&b[..])
        .read_message()
        .unwrap_err()
        .to_string();
    assert!(e.contains("bitmap word count 0"), "{e}");
}

#[test]
fn resume_needs_a_paused_migration() {
    let h = MigrationHandle::new(postcopy_params());
    let (out, _r, _a) = pipes_out();
    let e = h.resume_postcopy(out).unwrap_err();
    assert!(e.contains("not paused in postcopy"), "{e}");
}

#[test]
fn without_recovery_a_cut_fails_both_sides() {
    use crate::transport::{connect, Uri};
    let src = ProcessMemory::new(&layout()).unwrap();
    let dst = ProcessMemory::new(&layout()).unwrap();
    let (mut tracker, log) = SoftwareTracker::new(&src);
    let writer: PageWriter = Arc::new(move |b, off, data| log.write(b, off, data));
    fill_random(&src.blocks()[..1], &writer, 13);
    let mut vm = crate::vm::NoVm;
    let sh = MigrationHandle::new(Params {
        max_bandwidth: 6 * MIB,
        ..postcopy_params()
    });
    sh.start_postcopy().unwrap();
    let (listener, addr) = tcp_listener();
    let proxy = FaultProxy::start(addr, Fault::CutForwardAt(MIB)).unwrap();
    let dst2 = dst.clone();
    let dest = thread::spawn(move || {
        let inc = listener.accept().unwrap();
        // A guest that never touches memory: after the loss a missing
        // page would keep a reader waiting for good.
        struct Idle;
        impl IncomingGuest for Idle {
            fn restore(&mut self, _: &[u8]) -> Result<(), crate::vm::VmError> {
                Ok(())
            }
            fn resume(&mut self) -> Result<(), crate::vm::VmError> {
                Ok(())
            }
            fn pause(&mut self) {}
        }
        receive(&dst2, inc.reader, inc.ack, &mut Idle, true, None)
    });
    let conn = connect(&proxy.uri().parse::<Uri>().unwrap()).unwrap();
    let e = Source::new(&src, &mut tracker, &mut vm, sh.clone())
        .run_over(conn)
        .unwrap_err();
    assert!(
        matches!(e, MigrationError::Send(_) | MigrationError::Postcopy(_)),
        "{e}"
    );
    assert_eq!(sh.stats().status, Status::Failed);
    let d = dest.join().unwrap().unwrap_err();
    assert!(matches!(d, ReceiveError::SourceLost { .. }), "{d}");
    assert!(proxy.has_cut());
}

#[test]
fn requested_pages_travel_on_the_urgent_connection() {
    // The background push is held to 256 KiB/s until the guest has faulted
    // a few times, so the pages it asks for have not been pushed yet: each
    // must come on the urgent connection. Then the push runs free.
    let params = Params {
        postcopy_preempt: true,
        max_bandwidth: 256 << 10,
        ..postcopy_params()
    };
    let r = run_postcopy(params, true, |h| {
        let t0 = std::time::Instant::now();
        while h.stats().ram.postcopy_requests < 5
            && !h.stats().status.is_final()
            && t0.elapsed() < Duration::from_secs(60)
        {
            thread::sleep(Duration::from_millis(5));
        }
        let mut p = h.params();
        p.max_bandwidth = 0;
        h.set_params(p).unwrap();
    });
    assert_postcopy_done(&r);
    let pc = r.received.postcopy.as_ref().unwrap();
    assert!(r.stats.ram.postcopy_requests >= 5);
    assert!(
        pc.urgent_pages >= 1,
        "no requested page came on the urgent connection ({} requests)",
        r.stats.ram.postcopy_requests
    );
    assert!(pc.urgent_pages <= r.stats.ram.postcopy_requests);
    assert!(pc.urgent_pages < pc.placed_pages, "bulk pages did not");
}

#[test]
fn the_background_push_honours_max_bandwidth() {
    // 12 MiB (8 MiB of random pages) at 4 MiB/s: at least about 2 s, which
    // an unpaced loopback push never takes. A lower bound on time from the
    // limit itself, not a speed assertion.
    let params = Params {
        max_bandwidth: 4 * MIB,
        ..postcopy_params()
    };
    let r = run_postcopy(params, true, |_| {});
    assert_postcopy_done(&r);
    let bytes = r.stats.ram.postcopy_bytes;
    let ms = r.stats.postcopy_time.unwrap();
    // Requested pages are never held back, so allow them on top.
    let floor =
        (bytes.saturating_sub(r.stats.ram.postcopy_requests * 4096 + 16 * 4096)) * 1000 / (4 * MIB);
    assert!(
        ms + 50 >= floor,
        "{bytes} bytes after the switch in {ms} ms: faster than 4 MiB/s allows ({floor} ms)"
    );
}

/// A link with a deep queue (a shaped link's qdisc, a fresh socket's
/// buffers): a write never blocks, a thread forwards what was written to
/// the real transport at a set rate. Records the most bytes it ever held.
struct QueueLink {
    tx: std::sync::mpsc::Sender<Vec<u8>>,
    queued: Arc<AtomicU64>,
    most: Arc<AtomicU64>,
}

impl QueueLink {
    /// `inner` behind a queue that drains at `rate` bytes/s; returns the
    /// link and the most bytes it held at once (shared).
    fn start(
        mut inner: impl std::io::Write + Send + 'static,
        rate: u64,
    ) -> (QueueLink, Arc<AtomicU64>) {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let queued = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let q = queued.clone();
        thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let mut sent = 0u64;
            for chunk in rx {
                for part in chunk.chunks(16 << 10) {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(d) = due.checked_sub(t0.elapsed()) {
                        thread::sleep(d);
                    }
                    if inner.write_all(part).and_then(|()| inner.flush()).is_err() {
                        return;
                    }
                    sent += part.len() as u64;
                    q.fetch_sub(part.len() as u64, Ordering::SeqCst);
                }
            }
        });
        (
            QueueLink {
                tx,
                queued,
                most: most.clone(),
            },
            most,
        )
    }
}

impl std::io::Write for QueueLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = self.queued.fetch_add(buf.len() as u64, Ordering::SeqCst) + buf.len() as u64;
        self.most.fetch_max(now, Ordering::SeqCst);
        self.tx
            .send(buf.to_vec())
            .map_err(|_| std::io::Error::other("the queue link's forwarder stopped"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn auto_keeps_the_bytes_in_flight_within_its_window_until_it_decides() {
    // A guest writing 256 MiB/s against a link that carries 16 MiB/s
    // behind a queue that takes any write at once: without the window
    // (`postcopy/window.rs`), precopy's first writes fill the queue with
    // megabytes at memcpy speed, all of which must reach the destination
    // before the switch. With it, no more than the window (plus the last
    // step's few pages) is ever on its way, before the switch or after.
    use super::window::MIN_WINDOW;
    let params = Params {
        downtime_limit: 30,
        postcopy_switchover: Switchover::Auto,
        ..postcopy_params()
    };
    let mut g = Guest::start(params, false, 17, 256 * MIB);
    let (w, r) = pipe();
    let (ack_w, ack_r) = pipe();
    let (link, most) = QueueLink::start(w, 16 * MIB);
    let out = Outgoing {
        writer: Box::new(link),
        ack: Some(Box::new(ack_r)),
    };
    let dst2 = g.dst.clone();
    let dest = thread::spawn(move || {
        let mut guest = TouchGuest::new(&dst2);
        let res = receive(&dst2, r, Some(Box::new(ack_w)), &mut guest, true, None);
        (res, guest.stop())
    });
    let stats = Source::new(&g.src, &mut g.tracker, &mut g.vm, g.handle.clone())
        .run_conn(out, &mut |_| {
            Err(std::io::Error::other("one connection only"))
        })
        .expect("migration succeeds");
    let r = g.finish(stats, dest.join().unwrap());
    assert_postcopy_done(&r);
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= MIN_WINDOW + MIN_WINDOW / 2,
        "{most} bytes queued at once (window {MIN_WINDOW})"
    );
    // Precopy did send: the window paced it, it did not stop it.
    assert!(r.stats.ram.precopy_bytes > 0);
}
