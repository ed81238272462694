//! The checks behind every fuzz target. They live in the livemig package
//! so its tests can run them: `tests/fuzz_seeds.rs` over the generated
//! seeds, `tests/fuzz_corpus.rs` over the repository's corpus; the
//! cargo-fuzz crate (`fuzz/src/lib.rs`) includes this same file, so the
//! tests replay inputs through exactly the assertions the fuzzer ran.
//!
//! Each check must never panic for any input: a panic is a finding. Besides
//! "no panic", every target carries an oracle:
//!
//! * `stream_reader`: record invariants (addresses inside their block,
//!   payload bounds), identical records when the bytes arrive in small
//!   chunks with `Interrupted` errors, and a prefix of them when the
//!   transport fails half-way.
//! * `loader` / `loader_guard`: the memory after a load, successful or not,
//!   equals a straightforward model that replays the same records; the
//!   load succeeds exactly when the model says it must; in the guard
//!   variant the blocks mapped right before and after the loader's block
//!   are byte-for-byte unchanged.
//! * `xbzrle_decode`: decode agrees with a bytewise transcription of QEMU's
//!   `xbzrle_decode_buffer`, leaves the page untouched on error; encode
//!   agrees with a bytewise transcription of QEMU's encoder and round-trips.
//! * `decompress`: both algorithms, output only inside the 4096-byte
//!   destination (canaries around it), agreement with the libraries' own
//!   allocating decoders, and compress → decompress round trips.
//! * `control`: the input is one control-socket session; every answer is
//!   one JSON object with exactly one of `return` / `error`, there is one
//!   answer per non-blank request line, a request that is not an object
//!   with an `execute` string is refused, only an accepted `migrate`
//!   starts a migration, and whatever the session did the parameters stay
//!   valid.
//! * `postcopy_messages`: the input is the return path after the postcopy
//!   switch; every request the checks accept lies inside its block (so the
//!   source never reads outside memory), every refused one names its byte
//!   offset, and an accepted request re-encodes to the bytes it came from.
//! * `mapped_ram_header`: the input is a file length (8 bytes, little
//!   endian) and the start of a mapped-ram file; a header that parses
//!   re-encodes to exactly its bytes, and every region it names lies inside
//!   the file, after the header, with no two overlapping.

use std::cell::RefCell;
use std::io::{self, Read};
use std::sync::Arc;

use livemig::codec::compress::{Algorithm, Compressor, Decompressor};
use livemig::codec::xbzrle;
use livemig::engine::{memory_digest, LoadOutcome, Loader};
use livemig::memory::{AnonMapping, RawRegion};
use livemig::memory::{GuestMemory, ProcessMemory, RamBlock, PAGE_SIZE};
use livemig::stream::format::{
    COMPRESS_LZ4, COMPRESS_ZSTD, FLAG_CHANNELS, FLAG_VERIFY, KNOWN_FEATURES, LOAD_UNKNOWN,
    MAX_ABORT_TEXT, MAX_BLOCKS, MAX_CHANNELS, MAX_ZERO_RUN_PAGES,
};
use livemig::stream::{BlockDesc, OwnedRecord, Record, StreamErrorKind, StreamReader};

/// Fuzz targets, as named under `fuzz/fuzz_targets/` and `fuzz/corpus/`.
pub const TARGETS: &[&str] = &[
    "stream_reader",
    "loader",
    "loader_guard",
    "xbzrle_decode",
    "decompress",
    "control",
    "postcopy_messages",
    "mapped_ram_header",
];

/// Runs `data` through the check of `target`; false for an unknown target.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "stream_reader" => stream_reader(data),
        "loader" => loader(data),
        "loader_guard" => loader_guard(data),
        "xbzrle_decode" => xbzrle_decode(data),
        "decompress" => decompress(data),
        "control" => control(data),
        "postcopy_messages" => postcopy_messages(data),
        "mapped_ram_header" => mapped_ram_header(data),
        _ => return false,
    }
    true
}

// ---------------------------------------------------------------------------
// Memory layouts the loader targets use
// ---------------------------------------------------------------------------

/// The `loader` target's destination: two blocks.
pub const TWO_BLOCKS: &[(&str, usize)] = &[("ram0", 64 << 10), ("ram1", 32 << 10)];
/// The `loader_guard` target's destination: the middle of three adjacent
/// blocks (the other two are the guards).
pub const GUARDED_BLOCK: (&str, usize) = ("ram0", 64 << 10);
/// Size of each guard block around [`GUARDED_BLOCK`].
pub const GUARD_LEN: usize = 32 << 10;

/// Deterministic initial contents of destination block `index` of `len`
/// bytes: every fourth page zero (so zero records hit both "already zero"
/// and "must write"), the others a pattern.
pub fn initial_block(index: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (p, page) in v.chunks_mut(PAGE_SIZE).enumerate() {
        if p % 4 == 0 {
            continue;
        }
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i.wrapping_mul(31) ^ (p * 7 + index * 131)) as u8;
        }
    }
    v
}

fn guard_fill(which: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| which ^ (i as u8)).collect()
}

/// The contents of every block of `mem`.
pub fn snapshot(mem: &dyn GuestMemory) -> Vec<Vec<u8>> {
    mem.blocks()
        .iter()
        .map(|b| {
            let mut v = vec![0u8; b.len() as usize];
            assert!(b.region().read(0, &mut v));
            v
        })
        .collect()
}

fn reset(mem: &dyn GuestMemory, init: &[Vec<u8>]) {
    for (b, data) in mem.blocks().iter().zip(init) {
        assert!(b.region().write(0, data));
    }
}

/// Three adjacent blocks carved out of one mapping; only the middle one is
/// guest memory.
struct Guarded {
    lo: RawRegion,
    hi: RawRegion,
    blocks: Vec<RamBlock>,
}

impl Guarded {
    fn new() -> Guarded {
        let (id, len) = GUARDED_BLOCK;
        let map = Arc::new(AnonMapping::new(GUARD_LEN + len + GUARD_LEN).expect("mmap"));
        let region = |off: usize, n: usize| {
            RawRegion::from_mapping_range(map.clone(), off, n).expect("range inside the mapping")
        };
        let lo = region(0, GUARD_LEN);
        let mid = region(GUARD_LEN, len);
        let hi = region(GUARD_LEN + len, GUARD_LEN);
        // Adjacency is the point: a write one byte past either end of the
        // guest block lands in a guard.
        assert_eq!(lo.host_addr() + GUARD_LEN as u64, mid.host_addr());
        assert_eq!(mid.host_addr() + len as u64, hi.host_addr());
        Guarded {
            lo,
            hi,
            blocks: vec![RamBlock::new(id, mid).expect("block")],
        }
    }
}

impl GuestMemory for Guarded {
    fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }
}

thread_local! {
    static TWO: ProcessMemory = ProcessMemory::new(
        &TWO_BLOCKS.iter().map(|&(id, len)| (id, len as u64)).collect::<Vec<_>>(),
    )
    .expect("map two-block memory");
    static TWO_INIT: Vec<Vec<u8>> =
        TWO_BLOCKS.iter().enumerate().map(|(i, &(_, len))| initial_block(i, len)).collect();
    static GUARDED: Guarded = Guarded::new();
    static DECOMPRESSOR: RefCell<Decompressor> = RefCell::new(Decompressor::new());
    static COMPRESSORS: RefCell<[Compressor; 2]> = RefCell::new([
        Compressor::new(Algorithm::Zstd, 1).expect("zstd compressor"),
        Compressor::new(Algorithm::Lz4, 0).expect("lz4 compressor"),
    ]);
}

// ---------------------------------------------------------------------------
// stream_reader
// ---------------------------------------------------------------------------

/// An owned record, to compare whole parses.
pub type Owned = OwnedRecord;

/// Asserts what the reader promises about a record it returned.
fn check_record(rec: &Record<'_>, blocks: &[BlockDesc], next_seq: &mut u64) {
    let addr = |block: u16, offset: u64| {
        let b = blocks
            .get(usize::from(block))
            .unwrap_or_else(|| panic!("record names block {block} of {}", blocks.len()));
        assert_eq!(offset % PAGE_SIZE as u64, 0, "unaligned offset {offset:#x}");
        assert!(
            offset < b.len,
            "offset {offset:#x} outside block of {:#x}",
            b.len
        );
    };
    match *rec {
        Record::BlockList(list) => {
            assert!(!list.is_empty() && list.len() <= MAX_BLOCKS as usize);
            for (i, b) in list.iter().enumerate() {
                assert!(!b.id.is_empty() && b.id.len() <= 255);
                assert!(b.len > 0 && b.len % PAGE_SIZE as u64 == 0);
                assert!(list[..i].iter().all(|o| o.id != b.id), "duplicate id");
            }
        }
        Record::Zero { block, offset } => addr(block, offset),
        Record::ZeroRun {
            block,
            offset,
            pages,
        } => {
            addr(block, offset);
            assert!((1..=MAX_ZERO_RUN_PAGES).contains(&pages), "run of {pages}");
            let end = offset + u64::from(pages) * PAGE_SIZE as u64;
            assert!(
                end <= blocks[usize::from(block)].len,
                "run to {end:#x} past its block"
            );
        }
        Record::Run {
            block,
            offset,
            pages,
        } => {
            addr(block, offset);
            assert!((1..=livemig::stream::format::MAX_RUN_PAGES).contains(&pages));
            let end = offset + u64::from(pages) * PAGE_SIZE as u64;
            assert!(end <= blocks[usize::from(block)].len, "run past its block");
        }
        Record::Raw {
            block,
            offset,
            data,
        } => {
            addr(block, offset);
            assert_eq!(data.len(), PAGE_SIZE);
        }
        Record::Xbzrle {
            block,
            offset,
            data,
        } => {
            addr(block, offset);
            assert!((1..=PAGE_SIZE).contains(&data.len()));
        }
        Record::Compressed {
            block,
            offset,
            algo,
            data,
        } => {
            addr(block, offset);
            assert!(algo == COMPRESS_ZSTD || algo == COMPRESS_LZ4);
            assert!((1..PAGE_SIZE).contains(&data.len()));
        }
        Record::SectionEnd { seq } => {
            assert_eq!(seq, *next_seq, "sections out of order");
            *next_seq += 1;
        }
        Record::State(s) => assert!(s.len() <= livemig::stream::format::MAX_STATE as usize),
        Record::Digest(_) | Record::End => {}
        Record::Channel {
            index, channels, ..
        } => {
            assert!((2..=MAX_CHANNELS).contains(&channels) && index <= channels);
        }
        Record::Sync { .. } | Record::Postcopy => {}
        Record::Drain { mark } => {
            // Marks count 1, 2, 3... (a model of the reader's order check
            // would need the marks before it: at least not 0).
            assert!(mark >= 1, "drain mark 0 accepted");
        }
        Record::Setup { features, load, .. } => {
            assert_eq!(features & !KNOWN_FEATURES, 0, "unknown features accepted");
            assert_ne!(load, Some(LOAD_UNKNOWN), "'not known' read as a load");
            assert_eq!(*next_seq, 0, "setup after the first section");
            assert!(!blocks.is_empty(), "setup before the block list");
        }
        Record::Abort(reason) => {
            // Lossy UTF-8: each byte becomes at most one U+FFFD (3 bytes).
            assert!(!reason.is_empty());
            assert!(reason.len() <= 3 * usize::from(MAX_ABORT_TEXT));
        }
        Record::Discard {
            block,
            first_word,
            words,
        } => {
            let b = blocks
                .get(usize::from(block))
                .unwrap_or_else(|| panic!("discard names block {block} of {}", blocks.len()));
            let pages = b.len / PAGE_SIZE as u64;
            assert!(!words.is_empty() && words.len() % 8 == 0);
            let n = (words.len() / 8) as u64;
            assert!(
                u64::from(first_word) + n <= pages.div_ceil(64),
                "discard words past the block"
            );
        }
    }
}

/// How a parse ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The header was refused.
    Header,
    /// An error after `records` records.
    Error,
    /// The end record, with the offset after it.
    End(u64),
}

/// Reads every record of `input`, checking each; returns them and how the
/// parse ended.
fn parse<R: Read>(input: R, total: usize) -> (Vec<Owned>, Ending) {
    let mut r = match StreamReader::new(input) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            assert!(e.offset <= total as u64);
            return (Vec::new(), Ending::Header);
        }
    };
    let mut out = Vec::new();
    let mut next_seq = 0;
    loop {
        let before = r.offset();
        let blocks = r.blocks().to_vec();
        match r.next_record() {
            Ok(rec) => {
                check_record(&rec, &blocks, &mut next_seq);
                let o = rec.to_owned_record();
                assert!(r.offset() > before, "record consumed no bytes");
                assert!(r.offset() <= total as u64, "offset past the input");
                let end = matches!(o, Owned::End | Owned::Abort(_));
                out.push(o);
                if end {
                    let at = r.offset();
                    match r.next_record() {
                        Err(e) => assert!(matches!(e.kind, StreamErrorKind::AfterEnd)),
                        Ok(rec) => panic!("record after End: {rec:?}"),
                    }
                    return (out, Ending::End(at));
                }
            }
            Err(e) => {
                let _ = e.to_string();
                assert!(e.offset <= total as u64, "error offset past the input");
                assert!(e.offset >= before, "error before the record started");
                return (out, Ending::Error);
            }
        }
    }
}

/// A transport that hands out at most `step` bytes per read, interrupts
/// every third call, and optionally fails for good at `fail_at`.
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
    calls: u32,
    fail_at: Option<usize>,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(3) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if self.fail_at.is_some_and(|f| self.pos >= f) {
            return Err(io::Error::other("transport failed"));
        }
        let limit = self.fail_at.unwrap_or(self.data.len()).min(self.data.len());
        let n = buf.len().min(self.step).min(limit - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `stream_reader`: parse arbitrary bytes three ways.
pub fn stream_reader(data: &[u8]) {
    let (whole, ending) = parse(data, data.len());

    // Mostly tiny reads (the reader's refill loop), sometimes large ones.
    let step = [1, 3, 7, 64, 509, 4096][data.len() % 6];
    let chunked = Chunked {
        data,
        pos: 0,
        step,
        calls: 0,
        fail_at: None,
    };
    let (records, e2) = parse(chunked, data.len());
    assert_eq!(records, whole, "chunked transport changed the records");
    assert_eq!(e2, ending, "chunked transport changed the outcome");

    let fail_at = data.len() / 2;
    let failing = Chunked {
        data,
        pos: 0,
        step,
        calls: 0,
        fail_at: Some(fail_at),
    };
    let (records, e3) = parse(failing, data.len());
    assert!(
        whole.starts_with(&records),
        "a failing transport produced records the full stream does not have"
    );
    if let Ending::End(at) = e3 {
        assert!(at as usize <= fail_at, "read past a failed transport");
        assert_eq!(e3, ending);
    }
}

// ---------------------------------------------------------------------------
// loader
// ---------------------------------------------------------------------------

/// Counters the model keeps, as the loader's stats.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    zero: u64,
    zero_written: u64,
    raw: u64,
    xbzrle: u64,
    compressed: u64,
    sections: u64,
}

/// What the model says about a stream.
enum Verdict {
    /// The loader must fail (bad stream, layout, page that does not decode).
    Fails,
    /// The stream ended; the load fails only on a missing or wrong digest.
    Ended {
        verify: bool,
        digest: Option<[u8; 32]>,
        state: Vec<u8>,
        counts: Counts,
        bytes: u64,
    },
}

/// Replays `data` onto `mem` (contents of the destination blocks named by
/// `ids`) the obvious way.
fn model(data: &[u8], ids: &[&str], mem: &mut [Vec<u8>]) -> Verdict {
    let Ok(mut r) = StreamReader::new(data) else {
        return Verdict::Fails;
    };
    let verify = r.flags() & FLAG_VERIFY != 0;
    if r.flags() & FLAG_CHANNELS != 0 {
        // One channel of a multi-channel migration: `Loader::load` refuses it.
        return Verdict::Fails;
    }
    // Runs come whole, as to the loader; their pages are then read one by
    // one as raw records.
    r.landing_runs(true);
    let mut map: Vec<usize> = Vec::new();
    let mut counts = Counts::default();
    let mut state = Vec::new();
    let mut digest = None;
    let mut dec = Decompressor::new();
    let mut scratch = vec![0u8; PAGE_SIZE];
    loop {
        let Ok(rec) = r.next_record() else {
            return Verdict::Fails;
        };
        let page = |map: &[usize], block: u16, offset: u64| {
            let b = map[usize::from(block)];
            let o = offset as usize;
            (b, o..o + PAGE_SIZE)
        };
        match rec {
            Record::BlockList(list) => {
                if list.len() != ids.len() {
                    return Verdict::Fails;
                }
                map.clear();
                for d in list {
                    match ids.iter().position(|id| *id == d.id) {
                        Some(i) if mem[i].len() as u64 == d.len => map.push(i),
                        _ => return Verdict::Fails,
                    }
                }
            }
            Record::Zero { block, offset } => {
                counts.zero += 1;
                let (b, range) = page(&map, block, offset);
                let p = &mut mem[b][range];
                if p.iter().any(|&x| x != 0) {
                    counts.zero_written += 1;
                    p.fill(0);
                }
            }
            Record::ZeroRun {
                block,
                offset,
                pages,
            } => {
                for i in 0..u64::from(pages) {
                    counts.zero += 1;
                    let (b, range) = page(&map, block, offset + i * PAGE_SIZE as u64);
                    let p = &mut mem[b][range];
                    if p.iter().any(|&x| x != 0) {
                        counts.zero_written += 1;
                        p.fill(0);
                    }
                }
            }
            Record::Raw {
                block,
                offset,
                data,
            } => {
                counts.raw += 1;
                let (b, range) = page(&map, block, offset);
                mem[b][range].copy_from_slice(data);
            }
            Record::Run {
                block,
                offset,
                pages,
            } => {
                counts.raw += u64::from(pages);
                let start = r.offset() as usize;
                for k in 0..u64::from(pages) {
                    let (b, range) = page(&map, block, offset + k * PAGE_SIZE as u64);
                    match r.next_record() {
                        Ok(Record::Raw { data, .. }) => mem[b][range].copy_from_slice(data),
                        _ => {
                            // Cut inside the run: the loader lands what
                            // arrived, in place, before it fails.
                            let got = &data[(start + k as usize * PAGE_SIZE).min(data.len())..];
                            assert!(got.len() < PAGE_SIZE, "only a cut stops a run");
                            mem[b][range.start..range.start + got.len()].copy_from_slice(got);
                            return Verdict::Fails;
                        }
                    }
                }
            }
            Record::Xbzrle {
                block,
                offset,
                data,
            } => {
                counts.xbzrle += 1;
                let (b, range) = page(&map, block, offset);
                scratch.copy_from_slice(&mem[b][range.clone()]);
                if xbzrle::decode(data, &mut scratch).is_err() {
                    return Verdict::Fails;
                }
                mem[b][range].copy_from_slice(&scratch);
            }
            Record::Compressed {
                block,
                offset,
                algo,
                data,
            } => {
                counts.compressed += 1;
                let (b, range) = page(&map, block, offset);
                let algo = Algorithm::from_u8(algo).expect("reader checks algorithms");
                if dec.decompress(algo, data, &mut scratch).is_err() {
                    return Verdict::Fails;
                }
                mem[b][range].copy_from_slice(&scratch);
            }
            Record::SectionEnd { .. } => counts.sections += 1,
            Record::State(s) => state = s.to_vec(),
            Record::Digest(d) => digest = Some(d),
            Record::Channel { .. } | Record::Sync { .. } => {
                unreachable!("the reader refuses them without the channels flag")
            }
            // A plain load keeps discards for a postcopy switch and refuses
            // the switch itself.
            Record::Discard { .. } => {}
            Record::Postcopy => return Verdict::Fails,
            // No VM shape is expected here: nothing to check.
            Record::Setup { .. } => {}
            Record::Abort(_) => return Verdict::Fails,
            // Answered on the return path (none here): memory unchanged.
            Record::Drain { .. } => {}
            Record::End => {
                return Verdict::Ended {
                    verify,
                    digest,
                    state,
                    counts,
                    bytes: r.offset(),
                }
            }
        }
    }
}

/// Loads `data` into `mem` (reset to `init` first) and checks the result
/// against the model.
fn load_and_compare(data: &[u8], mem: &dyn GuestMemory, init: &[Vec<u8>]) {
    reset(mem, init);
    let result = Loader::new(mem).load(data);
    if let Err(e) = &result {
        let _ = e.to_string();
    }
    let actual = snapshot(mem);

    let ids: Vec<&str> = mem.blocks().iter().map(|b| b.id()).collect();
    let mut expected = init.to_vec();
    let verdict = model(data, &ids, &mut expected);
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        if a != e {
            let first = a.iter().zip(e).position(|(x, y)| x != y).unwrap_or(0);
            panic!(
                "block {} differs from the model at byte {first:#x} (load result: {:?})",
                ids[i],
                result.as_ref().map(|o| &o.stats)
            );
        }
    }
    match verdict {
        Verdict::Fails => assert!(result.is_err(), "load succeeded; the model says it fails"),
        Verdict::Ended {
            verify,
            digest,
            state,
            counts,
            bytes,
        } => {
            let must_pass = match (verify, digest) {
                (false, _) => true,
                (true, None) => false,
                (true, Some(d)) => d == memory_digest(mem),
            };
            match result {
                Ok(LoadOutcome {
                    state: s,
                    digest: d,
                    stats,
                }) => {
                    assert!(must_pass, "load succeeded; the model says it fails");
                    assert_eq!(s, state, "device state");
                    assert_eq!(d, digest, "digest");
                    let got = Counts {
                        zero: stats.zero_pages,
                        zero_written: stats.zero_pages_written,
                        raw: stats.raw_pages,
                        xbzrle: stats.xbzrle_pages,
                        compressed: stats.compressed_pages,
                        sections: stats.sections,
                    };
                    assert_eq!(got, counts, "load statistics");
                    assert_eq!(stats.bytes, bytes, "bytes read");
                }
                Err(e) => assert!(!must_pass, "load failed; the model says it succeeds: {e}"),
            }
        }
    }
}

/// `loader`: arbitrary bytes into the two-block memory.
pub fn loader(data: &[u8]) {
    TWO.with(|mem| TWO_INIT.with(|init| load_and_compare(data, mem, init)));
}

/// `loader_guard`: arbitrary bytes into the middle of three adjacent
/// blocks; the outer two must not change.
pub fn loader_guard(data: &[u8]) {
    GUARDED.with(|g| {
        let lo = guard_fill(0xa5, g.lo.len());
        let hi = guard_fill(0x5a, g.hi.len());
        assert!(g.lo.write(0, &lo) && g.hi.write(0, &hi));
        let init = vec![initial_block(0, GUARDED_BLOCK.1)];
        load_and_compare(data, g, &init);
        let mut buf = vec![0u8; GUARD_LEN];
        assert!(g.lo.read(0, &mut buf));
        assert!(buf == lo, "the block mapped before the guest block changed");
        assert!(g.hi.read(0, &mut buf));
        assert!(buf == hi, "the block mapped after the guest block changed");
    });
}

// ---------------------------------------------------------------------------
// xbzrle_decode
// ---------------------------------------------------------------------------

/// QEMU's `uleb128_decode_small`, transcribed.
fn qemu_uleb(src: &[u8]) -> Option<(usize, usize)> {
    if src[0] & 0x80 == 0 {
        Some((usize::from(src[0]), 1))
    } else if src[1] & 0x80 != 0 {
        None
    } else {
        Some((usize::from(src[0] & 0x7f) | usize::from(src[1]) << 7, 2))
    }
}

/// QEMU's `xbzrle_decode_buffer`, transcribed bytewise; `None` for -1.
fn qemu_decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let (slen, dlen) = (src.len(), dst.len());
    let (mut i, mut d) = (0usize, 0usize);
    while i < slen {
        if slen - i < 2 {
            return None;
        }
        let (count, ret) = qemu_uleb(&src[i..])?;
        if i != 0 && count == 0 {
            return None;
        }
        i += ret;
        d += count;
        if d > dlen {
            return None;
        }
        if slen - i < 2 {
            return None;
        }
        let (count, ret) = qemu_uleb(&src[i..])?;
        if count == 0 {
            return None;
        }
        i += ret;
        if d + count > dlen || i + count > slen {
            return None;
        }
        dst[d..d + count].copy_from_slice(&src[i..i + count]);
        d += count;
        i += count;
    }
    Some(d)
}

/// QEMU's `uleb128_encode_small`.
fn qemu_put(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        out.push((n & 0x7f) as u8 | 0x80);
        out.push((n >> 7) as u8);
    }
}

/// QEMU's `xbzrle_encode_buffer`, bytewise (its word-at-a-time loops only
/// find the same maximal runs faster); `None` for -1 (overflow).
fn qemu_encode(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
    let slen = new.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < slen {
        if out.len() + 2 > dlen {
            return None;
        }
        let start = i;
        while i < slen && old[i] == new[i] {
            i += 1;
        }
        let zrun = i - start;
        if zrun == slen {
            return Some(Vec::new());
        }
        if i == slen {
            return Some(out);
        }
        qemu_put(&mut out, zrun);
        if out.len() + 2 > dlen {
            return None;
        }
        let start = i;
        while i < slen && old[i] != new[i] {
            i += 1;
        }
        let nzrun = i - start;
        qemu_put(&mut out, nzrun);
        if out.len() + nzrun > dlen {
            return None;
        }
        out.extend_from_slice(&new[start..i]);
    }
    Some(out)
}

fn cycle_fill(dst: &mut [u8], src: &[u8]) {
    if src.is_empty() {
        return;
    }
    for (d, s) in dst.iter_mut().zip(src.iter().cycle()) {
        *d = *s;
    }
}

/// Old and new pages chosen by the fuzzer: `data[0]` picks the page length
/// (4096, or another length up to [`xbzrle::MAX_PAGE_LEN`] from
/// `data[1..3]`), the first half of the rest fills the old page, the second
/// half is a list of 4-byte edits `(offset:u16le, len:u8, value:u8)`.
fn page_pair(data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mode = data.first().copied().unwrap_or(0);
    let len = if mode & 1 == 0 || data.len() < 3 {
        PAGE_SIZE
    } else {
        usize::from(u16::from_le_bytes([data[1], data[2]])) % (xbzrle::MAX_PAGE_LEN + 1)
    };
    let rest = data.get(3..).unwrap_or(&[]);
    let (seed, edits) = rest.split_at(rest.len() / 2);
    let mut old = vec![0u8; len];
    if mode & 2 != 0 {
        cycle_fill(&mut old, seed);
    }
    let mut new = old.clone();
    if len > 0 {
        for e in edits.chunks_exact(4) {
            let off = usize::from(u16::from_le_bytes([e[0], e[1]])) % len;
            let n = usize::from(e[2]).min(len - off);
            for (k, b) in new[off..off + n].iter_mut().enumerate() {
                // Alternate between "set to value" and "flip with value" so
                // the edits can produce both changed and unchanged bytes.
                *b = if mode & 4 != 0 {
                    *b ^ e[3]
                } else {
                    e[3] ^ (k as u8 & mode)
                };
            }
        }
    }
    (old, new)
}

/// `xbzrle_decode`: arbitrary bytes as a delta, and as an old/new pair.
pub fn xbzrle_decode(data: &[u8]) {
    // Decode against a patterned page; compare with QEMU's decoder.
    let init = initial_block(1, 2 * PAGE_SIZE)[PAGE_SIZE..].to_vec();
    let mut page = init.clone();
    let mut reference = init.clone();
    let got = xbzrle::decode(data, &mut page);
    let want = qemu_decode(data, &mut reference);
    match (got, want) {
        (Ok(end), Some(d)) => {
            assert_eq!(end, d, "decode end differs from QEMU");
            assert!(page == reference, "decoded page differs from QEMU");
        }
        (Err(_), None) => assert!(page == init, "page changed by a failed decode"),
        (got, want) => panic!("decode {got:?}, QEMU {want:?}"),
    }

    // Encode a fuzzer-chosen pair; compare with QEMU's encoder; round-trip.
    let (old, new) = page_pair(data);
    let len = new.len();
    let small = data.get(3).map_or(0, |&b| usize::from(b) * 16);
    for dlen in [len, xbzrle::max_encoded_len(len), small] {
        let mut out = vec![0u8; dlen];
        let got = xbzrle::encode(&old, &new, &mut out);
        let want = qemu_encode(&old, &new, dlen);
        match (got, &want) {
            (Ok(n), Some(w)) => {
                assert!(
                    out[..n] == w[..],
                    "encoding differs from QEMU (dlen {dlen})"
                );
                let mut back = old.clone();
                assert_eq!(xbzrle::decode(&out[..n], &mut back).map(|_| ()), Ok(()));
                assert!(back == new, "round trip does not give the new page");
                if n == 0 {
                    assert!(old == new, "empty encoding of a changed page");
                }
            }
            (Err(xbzrle::Error::Overflow), None) => assert!(
                dlen < xbzrle::max_encoded_len(len),
                "overflow with a worst-case buffer"
            ),
            (got, want) => panic!("encode {got:?}, QEMU {want:?} (dlen {dlen})"),
        }
    }
}

// ---------------------------------------------------------------------------
// decompress
// ---------------------------------------------------------------------------

const CANARY: usize = 256;

/// `decompress`: arbitrary bytes through both algorithms into one page,
/// then the same bytes as a page through compress → decompress.
pub fn decompress(data: &[u8]) {
    DECOMPRESSOR.with(|dec| {
        let mut dec = dec.borrow_mut();
        for algo in [Algorithm::Zstd, Algorithm::Lz4] {
            let mut buf = vec![0xc3u8; CANARY + PAGE_SIZE + CANARY];
            let (head, rest) = buf.split_at_mut(CANARY);
            let (dst, tail) = rest.split_at_mut(PAGE_SIZE);
            let got = dec.decompress(algo, data, dst);
            if let Err(e) = &got {
                let _ = e.to_string();
            }
            assert!(
                head.iter().chain(tail.iter()).all(|&b| b == 0xc3),
                "{algo} wrote outside the destination page"
            );
            // The libraries' own allocating decoders, with room to spare.
            let reference: Option<Vec<u8>> = match algo {
                Algorithm::Zstd => {
                    if got.is_ok() {
                        zstd::bulk::decompress(data, 2 * PAGE_SIZE).ok()
                    } else {
                        None
                    }
                }
                Algorithm::Lz4 => {
                    let mut big = vec![0u8; 2 * PAGE_SIZE];
                    lz4_flex::block::decompress_into(data, &mut big)
                        .ok()
                        .map(|n| big[..n].to_vec())
                }
            };
            match (&got, reference) {
                (Ok(()), Some(r)) => assert!(r == dst, "{algo} output differs from the library"),
                (Ok(()), None) => panic!("{algo}: accepted data the library rejects"),
                (Err(e), Some(r)) if r.len() == PAGE_SIZE => {
                    panic!("{algo}: rejected a page the library decodes: {e}")
                }
                _ => {}
            }
        }

        // Round trip with the data as (the start of) a page.
        let mut page = vec![0u8; PAGE_SIZE];
        let n = data.len().min(PAGE_SIZE);
        page[..n].copy_from_slice(&data[..n]);
        COMPRESSORS.with(|cs| {
            for c in cs.borrow_mut().iter_mut() {
                let mut out = Vec::new();
                let Some(len) = c.compress(&page, &mut out).expect("compress") else {
                    continue;
                };
                assert_eq!(len, out.len());
                assert!(len < PAGE_SIZE);
                let mut back = vec![0u8; PAGE_SIZE];
                dec.decompress(c.algorithm(), &out, &mut back)
                    .expect("decompress what was compressed");
                assert!(back == page, "{} round trip", c.algorithm());
            }
        });
    });
}

// ---------------------------------------------------------------------------
// control
// ---------------------------------------------------------------------------

/// Counts what the control protocol asked it to start; starts nothing.
struct CountingStarter(Arc<std::sync::Mutex<(usize, usize)>>);

impl livemig::control::MigrationStarter for CountingStarter {
    fn start_outgoing(
        &mut self,
        _uri: &livemig::transport::Uri,
        _tls: Option<&livemig::control::MigrationTls>,
        _handle: livemig::engine::MigrationHandle,
    ) -> Result<(), String> {
        self.0.lock().unwrap().0 += 1;
        Ok(())
    }
    fn start_incoming(
        &mut self,
        _uri: &livemig::transport::Uri,
        _tls: Option<&livemig::control::MigrationTls>,
        _handle: livemig::engine::MigrationHandle,
    ) -> Result<(), String> {
        self.0.lock().unwrap().1 += 1;
        Err("this fuzz VMM does not receive".into())
    }
}

/// The `control` target: `data` is one control-socket (QMP) session.
pub fn control(data: &[u8]) {
    use livemig::control::Dispatcher;
    use serde_json::Value;

    let calls = Arc::new(std::sync::Mutex::new((0usize, 0usize)));
    let d = Dispatcher::new(
        livemig::engine::Params::default(),
        Box::new(CountingStarter(calls.clone())),
    );
    let mut out = Vec::new();
    d.serve(data, &mut out, &std::sync::atomic::AtomicBool::new(false))
        .expect("a session into memory cannot fail");

    let text = String::from_utf8(out).expect("answers are UTF-8");
    let answers: Vec<Value> = text
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).expect("every answer line is JSON"))
        .collect();
    assert!(answers[0].get("QMP").is_some(), "greeting first");
    // Without negotiation nothing but errors (and no events).
    let negotiates = data
        .windows(b"qmp_capabilities".len())
        .any(|w| w == b"qmp_capabilities");
    let mut returns = 0usize;
    for a in &answers[1..] {
        let obj = a.as_object().expect("an answer is an object");
        if obj.contains_key("event") {
            assert!(negotiates, "an event before negotiation: {a}");
            assert!(obj["timestamp"]["seconds"].is_u64(), "{a}");
            continue;
        }
        let keys = obj.keys().filter(|k| *k != "id").count();
        assert_eq!(keys, 1, "exactly one of return/error (besides id): {a}");
        if let Some(e) = obj.get("error") {
            let class = e["class"].as_str().expect("error class is a string");
            assert!(
                class == "GenericError" || class == "CommandNotFound",
                "unknown error class {class}"
            );
            assert!(e["desc"].as_str().is_some_and(|d| !d.is_empty()));
            continue;
        }
        assert!(obj.contains_key("return"), "neither return nor error: {a}");
        assert!(negotiates, "a command ran before negotiation: {a}");
        returns += 1;
    }
    let (out_calls, _) = *calls.lock().unwrap();
    assert!(
        out_calls <= returns.saturating_sub(1),
        "{out_calls} migrations started but only {returns} commands succeeded"
    );
    if !negotiates {
        assert_eq!(out_calls, 0);
    }
    d.params()
        .validate()
        .expect("no session can leave the parameters invalid");
}

// ---------------------------------------------------------------------------
// postcopy_messages

/// The blocks requests are checked against: two blocks, one of an odd size.
const POSTCOPY_BLOCKS: &[(&str, u64)] = &[
    ("ram0", 64 * PAGE_SIZE as u64),
    ("ram1", 3 * PAGE_SIZE as u64),
];

/// One return path of postcopy messages (see the module doc).
pub fn postcopy_messages(data: &[u8]) {
    use livemig::engine::postcopy::{
        check_request, write_message, BitmapAssembler, Message, MessageReader,
    };
    let blocks: Vec<(String, u64)> = POSTCOPY_BLOCKS
        .iter()
        .map(|&(id, len)| (id.to_string(), len))
        .collect();
    let lens: Vec<u64> = blocks.iter().map(|b| b.1).collect();
    // Recovery: BITMAP / BITMAP_END messages assembled as the source does.
    let mut bitmap = Some(BitmapAssembler::new(&lens));
    let mut r = MessageReader::new(data);
    loop {
        let at = r.offset();
        let (start, m) = match r.read_message() {
            Ok(v) => v,
            Err(e) => {
                assert!(
                    e.to_string().starts_with("return path byte "),
                    "error without its offset: {e}"
                );
                break;
            }
        };
        assert_eq!(start, at);
        assert!(r.offset() as usize <= data.len());
        if let Some(asm) = bitmap.as_mut() {
            match asm.add(start, &m) {
                Ok(false) => {}
                Ok(true) => {
                    for (bm, len) in asm.missing().iter().zip(&lens) {
                        assert_eq!(bm.len(), len / PAGE_SIZE as u64, "bitmap of the wrong size");
                    }
                    bitmap = None;
                }
                Err(e) => {
                    assert!(
                        e.to_string().contains(&format!("byte {start}")),
                        "bitmap refusal without its offset: {e}"
                    );
                    bitmap = None;
                }
            }
        }
        if matches!(
            m,
            Message::Bitmap { .. }
                | Message::BitmapEnd { .. }
                | Message::Progress { .. }
                | Message::Lost { .. }
        ) {
            let mut again = Vec::new();
            write_message(&mut again, &m).expect("into memory");
            assert_eq!(&data[start as usize..r.offset() as usize], &again[..]);
        }
        if let Message::Request(q) = &m {
            let mut again = Vec::new();
            write_message(&mut again, &m).expect("into memory");
            assert_eq!(&data[start as usize..r.offset() as usize], &again[..]);
            match check_request(&blocks, start, q) {
                Ok((b, first, n)) => {
                    assert!(n >= 1);
                    assert!(
                        (first + n) * PAGE_SIZE as u64 <= blocks[b].1,
                        "request past its block"
                    );
                    assert_eq!(first * PAGE_SIZE as u64, q.offset);
                }
                Err(e) => assert!(
                    e.to_string().contains(&format!("byte {start}")),
                    "refusal without its offset: {e}"
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// mapped_ram_header

/// A mapped-ram file's header (see the module doc).
pub fn mapped_ram_header(data: &[u8]) {
    use livemig::snapshot::format::Header;
    use livemig::snapshot::SnapshotError;
    if data.len() < 8 {
        return;
    }
    let file_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let bytes = &data[8..];
    // As MappedRamFile::open reads it: the fixed part, then the announced length.
    let len = match bytes
        .get(..Header::PROBE)
        .ok_or(SnapshotError::NotMappedRam)
        .and_then(|fixed| Header::announced_len(fixed, file_len))
    {
        Ok(len) => len,
        Err(_) => return,
    };
    let Some(all) = bytes.get(..len + 4) else {
        return;
    };
    let Ok(h) = Header::parse(all, file_len) else {
        return;
    };
    assert_eq!(h.encode(), all, "a parsed header re-encodes to its bytes");
    let header_end = all.len() as u64;
    let mut regions = vec![(h.state_offset, h.state_len)];
    for b in &h.blocks {
        assert!(b.len > 0 && b.len % PAGE_SIZE as u64 == 0);
        regions.push((b.bitmap_offset, b.bitmap_len()));
        regions.push((b.hashes_offset, b.hashes_len()));
        regions.push((b.pages_offset, b.len));
    }
    regions.retain(|&(_, n)| n > 0);
    for &(at, n) in &regions {
        assert!(at >= header_end, "a region inside the header");
        assert!(
            at.checked_add(n).is_some_and(|e| e <= file_len),
            "a region past the file's end"
        );
    }
    regions.sort_unstable();
    for w in regions.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping regions");
    }
}
