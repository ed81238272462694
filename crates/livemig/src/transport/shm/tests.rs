//! Ownership protocol tests: two threads (and two processes) on one
//! shared buffer, release on error paths, bad indices, dead peers,
//! hostile values in shared memory.

use super::*;
use std::io::{Read, Write};

/// A connected source/destination pair in this process.
fn pair(g: Geometry) -> (Session, Session) {
    let (a, b) = UnixStream::pair().unwrap();
    let dest = std::thread::spawn(move || Session::take(b));
    let src = Session::offer(a, g).unwrap();
    let dest = dest.join().unwrap().unwrap();
    src.confirm().unwrap();
    (src, dest)
}

fn small() -> Geometry {
    Geometry {
        tx_slots: 4,
        tx_slot_size: 4096,
        rx_slots: 2,
        rx_slot_size: 4096,
    }
}

/// Writes `pattern` over the whole slot, then checks it is still all
/// there: a peer writing the slot meanwhile would change some of it.
fn stamp_and_check(g: &mut SlotGuard, pattern: u8, rounds: usize) {
    let cap = g.capacity();
    let mut back = vec![0u8; cap];
    let mine = vec![pattern; cap];
    for _ in 0..rounds {
        if g.producer {
            g.write_at(0, &mine).unwrap();
        }
        std::thread::yield_now();
        if g.producer {
            g.read_at(0, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == pattern), "slot changed under us");
        }
    }
}

#[test]
fn two_threads_never_hold_one_slot_together() {
    let (src, dst) = pair(small());
    const ROUNDS: u32 = 4000;
    // A check word per slot in local memory as well: set by whoever holds
    // a guard, cleared before the guard drops; both sides assert they
    // never find it set by the other.
    let marks: Arc<Vec<AtomicU32>> = Arc::new((0..4).map(|_| AtomicU32::new(0)).collect());
    let m2 = marks.clone();
    let consumer = std::thread::spawn(move || {
        let mut seen = 0u32;
        for i in 0..ROUNDS {
            let idx = i % 4;
            let g = dst.acquire(RingId::Tx, idx).unwrap();
            assert_eq!(
                m2[idx as usize].swap(2, Ordering::SeqCst),
                0,
                "both own slot {idx}"
            );
            let mut b = vec![0u8; g.len()];
            g.read_at(0, &mut b).unwrap();
            // The producer filled i's slot with its low byte and length.
            assert_eq!(g.len(), 100 + (i as usize % 3000));
            assert!(b.iter().all(|&x| x == i as u8), "round {i}: torn slot");
            // Hold the slot a while: a producer that did not wait for it
            // would write it now.
            for _ in 0..4 {
                std::thread::yield_now();
            }
            let mut again = vec![0u8; g.len()];
            g.read_at(0, &mut again).unwrap();
            assert_eq!(b, again, "round {i}: slot changed while we held it");
            assert_eq!(m2[idx as usize].swap(0, Ordering::SeqCst), 2);
            seen += 1;
        }
        seen
    });
    for i in 0..ROUNDS {
        let idx = i % 4;
        let mut g = src.acquire(RingId::Tx, idx).unwrap();
        assert_eq!(
            marks[idx as usize].swap(1, Ordering::SeqCst),
            0,
            "both own slot {idx}"
        );
        stamp_and_check(&mut g, i as u8, 1);
        g.set_len(100 + (i as usize % 3000)).unwrap();
        assert_eq!(marks[idx as usize].swap(0, Ordering::SeqCst), 1);
    }
    assert_eq!(consumer.join().unwrap(), ROUNDS);
}

#[test]
fn stream_round_trip_with_ack() {
    let (src, dst) = pair(small());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expect = data.clone();
    let t = std::thread::spawn(move || {
        let mut r = dst.reader();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let mut ack = dst.writer();
        ack.write_all(b"ACK!").unwrap();
        got
    });
    let mut w = src.writer();
    let mut ack = src.reader();
    w.write_all(&data).unwrap();
    drop(w); // end of stream
    let mut b = [0u8; 4];
    ack.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ACK!");
    assert_eq!(t.join().unwrap(), expect);
}

#[test]
fn bad_index_is_not_available() {
    let (src, dst) = pair(small());
    for (s, ring, idx, slots) in [
        (&src, RingId::Tx, 4, 4),
        (&src, RingId::Rx, 2, 2),
        (&dst, RingId::Tx, u32::MAX, 4),
    ] {
        let e = s.acquire(ring, idx).unwrap_err();
        assert!(
            matches!(e, ShmError::NotAvailable { index, slots: n, .. } if index == idx && n == slots),
            "{e}"
        );
        assert!(e.to_string().contains("not available"), "{e}");
    }
}

#[test]
fn a_slot_is_held_once_per_process() {
    let (src, _dst) = pair(small());
    let g = src.acquire(RingId::Tx, 1).unwrap();
    let e = src.acquire(RingId::Tx, 1).unwrap_err();
    assert!(matches!(e, ShmError::AlreadyHeld { index: 1, .. }), "{e}");
    drop(g);
}

#[test]
fn guard_dropped_on_early_return_goes_to_peer() {
    let (src, dst) = pair(small());
    fn fails_half_way(s: &Session) -> Result<(), ShmError> {
        let mut g = s.acquire(RingId::Tx, 0)?;
        g.write_at(0, b"half")?;
        g.set_len(4)?;
        // An error after the slot was taken: `?` returns, the guard drops.
        g.write_at(4096, b"past the end")?;
        unreachable!("the write above fails");
    }
    let e = fails_half_way(&src).unwrap_err();
    assert!(matches!(e, ShmError::Misuse { .. }), "{e}");
    // The destination now owns slot 0 with what was set before the error.
    let g = dst.acquire(RingId::Tx, 0).unwrap();
    let mut b = [0u8; 4];
    g.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"half");
    drop(g);
    // And gave it back: the source can take it again at once.
    drop(src.acquire(RingId::Tx, 0).unwrap());
}

#[test]
fn guard_dropped_while_unwinding_goes_to_peer() {
    let (src, dst) = pair(small());
    let s2 = src.clone();
    let r = std::thread::spawn(move || {
        let mut g = s2.acquire(RingId::Tx, 2).unwrap();
        g.set_len(0).unwrap();
        panic!("worker failed while holding slot 2");
    })
    .join();
    assert!(r.is_err(), "the worker panicked");
    let dst = dst.with_wait(Duration::from_secs(5), 0);
    let g = dst.acquire(RingId::Tx, 2).unwrap();
    assert_eq!(g.len(), 0);
}

#[test]
fn lock_order_is_tx_then_rx() {
    let (src, dst) = pair(small());
    // Destination: TX (to consume) needs a filled slot first.
    let mut w = src.acquire(RingId::Tx, 0).unwrap();
    w.set_len(1).unwrap();
    drop(w);
    let rx = dst.acquire(RingId::Rx, 0).unwrap();
    let e = dst.acquire(RingId::Tx, 0).unwrap_err();
    assert!(matches!(e, ShmError::LockOrder { index: 0 }), "{e}");
    drop(rx);
    let both = dst.acquire_pair(0, 1).unwrap();
    assert_eq!((both.tx.ring(), both.rx.ring()), (RingId::Tx, RingId::Rx));
    drop(both);
    // Both went back: the source owns TX 0 again, and consumes RX 0.
    drop(src.acquire(RingId::Tx, 0).unwrap());
    assert_eq!(src.acquire(RingId::Rx, 0).unwrap().len(), 0);
}

#[test]
fn peer_death_ends_a_wait() {
    let (src, dst) = pair(small());
    let dst = dst.with_wait(Duration::from_secs(30), 0);
    let t = std::thread::spawn(move || dst.acquire(RingId::Tx, 0).map(|_| ()));
    std::thread::sleep(Duration::from_millis(100));
    // The source goes away without closing anything: its socket closes.
    drop(src);
    // PeerGone, not TimedOut: the hang-up ended the wait, not the clock.
    let e = t.join().unwrap().unwrap_err();
    assert!(matches!(e, ShmError::PeerGone { index: 0, .. }), "{e}");
}

#[test]
fn reader_and_writer_see_peer_death_as_errors() {
    let (src, dst) = pair(small());
    let mut r = dst.reader();
    // The source fills one slot, then goes away without closing the ring
    // (as a killed process would): only its socket closes.
    let mut g = src.acquire(RingId::Tx, 0).unwrap();
    g.write_at(0, b"some").unwrap();
    g.set_len(4).unwrap();
    drop(g);
    drop(src);
    let mut b = [0u8; 4];
    r.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"some");
    let e = r.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("died"), "{e}");
}

#[test]
fn writer_fails_when_reader_closed() {
    let (src, dst) = pair(small());
    drop(dst.reader()); // closes TX for the producer
    let mut w = src.writer();
    let chunk = [1u8; 4096];
    // The ring has 4 free slots; the fifth write waits and must fail.
    let mut err = None;
    for _ in 0..5 {
        if let Err(e) = w.write(&chunk) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("a write into a closed ring fails");
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
}

#[test]
fn hostile_length_is_rejected_and_slot_released() {
    let (src, dst) = pair(small());
    let mut g = src.acquire(RingId::Tx, 0).unwrap();
    g.set_len(10).unwrap();
    drop(g);
    // A buggy or hostile producer raises the length after the handover.
    src.0
        .desc(RingId::Tx, 0)
        .len
        .store(1 << 30, Ordering::SeqCst);
    let e = dst.acquire(RingId::Tx, 0).unwrap_err();
    assert!(
        matches!(e, ShmError::BadLength { len, max: 4096, .. } if len == 1 << 30),
        "{e}"
    );
    // The slot went back to the producer on that error path.
    assert_eq!(
        src.0.desc(RingId::Tx, 0).owner.load(Ordering::SeqCst),
        PRODUCER
    );
    // The reader turns it into an InvalidData error.
    let mut g = src.acquire(RingId::Tx, 0).unwrap();
    g.set_len(10).unwrap();
    drop(g);
    src.0.desc(RingId::Tx, 0).len.store(4097, Ordering::SeqCst);
    let e = dst.reader().read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
}

#[test]
fn hostile_owner_and_holder_words_are_rejected() {
    let (src, dst) = pair(small());
    src.0.desc(RingId::Tx, 1).owner.store(7, Ordering::SeqCst);
    let e = dst.acquire(RingId::Tx, 1).unwrap_err();
    assert!(matches!(e, ShmError::Corrupt { value: 7, .. }), "{e}");
    // A slot handed over with the peer's holder mark still set: both
    // would hold it.
    let mut g = src.acquire(RingId::Tx, 2).unwrap();
    g.set_len(1).unwrap();
    drop(g);
    src.0
        .desc(RingId::Tx, 2)
        .holder
        .store(HOLDER_PRODUCER, Ordering::SeqCst);
    let e = dst.acquire(RingId::Tx, 2).unwrap_err();
    assert!(matches!(e, ShmError::Corrupt { index: 2, .. }), "{e}");
}

#[test]
fn hostile_handshakes_are_refused() {
    use std::os::fd::AsRawFd;
    let hello = |w: [u32; 5]| {
        let mut h = HELLO_MAGIC.to_vec();
        for x in w {
            h.extend_from_slice(&x.to_be_bytes());
        }
        h
    };
    let try_take = |bytes: Vec<u8>, file: Option<File>| -> String {
        let (a, b) = UnixStream::pair().unwrap();
        match &file {
            Some(f) => a.send_with_fd(&bytes[..], f.as_raw_fd()).unwrap(),
            None => (&a).write(&bytes).unwrap(),
        };
        let e = Session::take(b).unwrap_err().to_string();
        // The source is told why.
        let mut reply = Vec::new();
        (&a).read_to_end(&mut reply).unwrap();
        assert_eq!(reply.first(), Some(&REPLY_ERR), "{e}");
        e
    };
    let good = Layout::new(small()).unwrap().total as u64;
    let memfd = |len| Some(create_memfd(c"t", len).unwrap());
    let e = try_take(hello([1, 4, 4096, 2, 4096]), None);
    assert!(e.contains("no file descriptor"), "{e}");
    let e = try_take(hello([2, 4, 4096, 2, 4096]), memfd(good));
    assert!(e.contains("version 2"), "{e}");
    let e = try_take(hello([1, 0, 4096, 2, 4096]), memfd(good));
    assert!(e.contains("0 slots"), "{e}");
    let e = try_take(hello([1, 4, 4097, 2, 4096]), memfd(good));
    assert!(e.contains("slot size 4097"), "{e}");
    let e = try_take(hello([1, 1024, 64 << 20, 2, 4096]), memfd(good));
    assert!(e.contains("at most"), "{e}");
    // The announced layout is larger than the file: mapping it would fault.
    let e = try_take(hello([1, 8, 4096, 2, 4096]), memfd(good));
    assert!(e.contains("needs"), "{e}");
    let mut bad_magic = hello([1, 4, 4096, 2, 4096]);
    bad_magic[0] = b'X';
    let e = try_take(bad_magic, memfd(good));
    assert!(e.contains("magic"), "{e}");
    // An ordinary file (not sealed) is refused.
    let f = tempfile::tempfile().unwrap();
    f.set_len(good).unwrap();
    let e = try_take(hello([1, 4, 4096, 2, 4096]), Some(f));
    assert!(e.contains("memfd"), "{e}");
}

#[test]
fn refusal_reaches_the_source_at_its_first_wait() {
    let (a, b) = UnixStream::pair().unwrap();
    // The source checks its own layout against the same bounds.
    let g = Geometry {
        rx_slots: MAX_SLOTS + 1,
        ..small()
    };
    assert!(Session::offer(a.try_clone().unwrap(), g).is_err());
    let src = Session::offer(a, small()).unwrap();
    // A destination refusing the offer, by hand (it keeps its socket open).
    (&b).write_all(b"Eno room").unwrap();
    let mut w = src.writer();
    let mut err = None;
    for _ in 0..8 {
        if let Err(e) = w.write(&[0u8; 4096]) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the ring fills, then the refusal is read");
    assert!(e.to_string().contains("refused: no room"), "{e}");
    drop(b);
}

/// Environment variable naming the socket the child process of
/// [`two_processes_share_slots_one_owner_at_a_time`] connects to.
const PEER_ENV: &str = "LIVEMIG_SHM_TEST_PEER";
/// Rounds of the two-process test.
const PROC_ROUNDS: u32 = 3000;

/// The child half of the two-process test (run by it, not on its own):
/// the source, filling each TX slot with the round's byte and checking
/// the slot stays as it wrote it while it holds the guard.
#[test]
#[ignore = "helper process of two_processes_share_slots_one_owner_at_a_time"]
fn two_process_child() {
    let path = std::env::var(PEER_ENV).expect("run by the two-process test");
    let sock = UnixStream::connect(path).unwrap();
    let src = Session::offer(sock, small()).unwrap();
    let slots = src.slots(RingId::Tx);
    for i in 0..PROC_ROUNDS {
        let mut g = src.acquire(RingId::Tx, i % slots).unwrap();
        stamp_and_check(&mut g, i as u8, 1);
        g.set_len(4096).unwrap();
    }
    src.confirm().unwrap();
    // Wait for the parent's verdict on RX.
    let g = src.acquire(RingId::Rx, 0).unwrap();
    let mut b = [0u8; 2];
    g.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"ok");
}

fn spawn_child(test: &str, path: &Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PEER_ENV, path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn two_processes_share_slots_one_owner_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let l = bind(&path).unwrap();
    let mut child = spawn_child("transport::shm::tests::two_process_child", &path);
    let (sock, _) = l.accept().unwrap();
    let dst = Session::take(sock).unwrap();
    let slots = dst.slots(RingId::Tx);
    let mut b = vec![0u8; 4096];
    for i in 0..PROC_ROUNDS {
        let g = dst.acquire(RingId::Tx, i % slots).unwrap();
        assert_eq!(g.len(), 4096);
        g.read_at(0, &mut b).unwrap();
        // Hold the slot a while: a child that did not wait for it would
        // write it now.
        for _ in 0..4 {
            std::thread::yield_now();
        }
        let mut again = vec![0u8; 4096];
        g.read_at(0, &mut again).unwrap();
        // Whole and stable while we hold it: the child never wrote it
        // during our ownership, and had finished before handing it over.
        assert!(b.iter().all(|&x| x == i as u8), "round {i}: torn slot");
        assert_eq!(b, again, "round {i}: slot changed while we held it");
    }
    let mut g = dst.acquire(RingId::Rx, 0).unwrap();
    g.write_at(0, b"ok").unwrap();
    g.set_len(2).unwrap();
    drop(g);
    let status = child.wait().unwrap();
    assert!(status.success(), "child: {status}");
}

/// The child of [`killed_peer_process_ends_the_wait`]: connects, then
/// sleeps until it is killed.
#[test]
#[ignore = "helper process of killed_peer_process_ends_the_wait"]
fn sleeping_child() {
    let path = std::env::var(PEER_ENV).expect("run by the kill test");
    let sock = UnixStream::connect(path).unwrap();
    let src = Session::offer(sock, small()).unwrap();
    src.confirm().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn killed_peer_process_ends_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.sock");
    let l = bind(&path).unwrap();
    let mut child = spawn_child("transport::shm::tests::sleeping_child", &path);
    let (sock, _) = l.accept().unwrap();
    let dst = Session::take(sock).unwrap();
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        child.kill().unwrap();
        child.wait().unwrap()
    });
    let e = dst.reader().read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "pid {pid}: {e}");
    assert!(!killer.join().unwrap().success());
}
