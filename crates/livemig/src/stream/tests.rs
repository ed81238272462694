//! Tests of the migration stream: writer/reader round trips, and the
//! reader's validation of every field against hand-crafted input.

use std::io::{self, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::format::*;
use super::*;
use crate::memory::PAGE_SIZE;
use crate::testkit::workload::XorShift;

/// `PAGE_SIZE` as a stream offset.
const P: u64 = PAGE_SIZE as u64;

// ---------------------------------------------------------------------------
// Owned records and whole-stream parsing
// ---------------------------------------------------------------------------

/// An owned copy of a [`Record`], so a whole stream can be collected.
type Rec = OwnedRecord;

impl Rec {
    fn kind(&self) -> Kind {
        match self {
            Rec::BlockList(_) => Kind::BlockList,
            Rec::Zero { .. } => Kind::Zero,
            Rec::ZeroRun { .. } => Kind::ZeroRun,
            Rec::Raw { .. } => Kind::Raw,
            Rec::Xbzrle { .. } => Kind::Xbzrle,
            Rec::Compressed { .. } => Kind::Compressed,
            Rec::SectionEnd { .. } => Kind::SectionEnd,
            Rec::State(_) => Kind::State,
            Rec::Digest(_) => Kind::Digest,
            Rec::End => Kind::End,
            Rec::Channel { .. } => Kind::Channel,
            Rec::Sync { .. } => Kind::Sync,
            Rec::Discard { .. } => Kind::Discard,
            Rec::Postcopy => Kind::Postcopy,
            Rec::Drain { .. } => Kind::Drain,
            Rec::Setup { .. } => Kind::Setup,
            Rec::Abort(_) => Kind::Abort,
            Rec::Run { .. } => Kind::Run,
        }
    }
}

fn own(r: Record<'_>) -> Rec {
    r.to_owned_record()
}

/// A stream read up to its end record.
#[derive(Debug)]
struct Parsed {
    flags: u16,
    blocks: Vec<BlockDesc>,
    recs: Vec<Rec>,
    /// Reader offset after each record.
    ends: Vec<u64>,
    offset: u64,
}

/// A stream that failed: the records read before the error, and the error.
#[derive(Debug)]
struct Failed {
    recs: Vec<Rec>,
    ends: Vec<u64>,
    err: StreamError,
}

fn parse_from<R: Read>(input: R) -> Result<Parsed, Box<Failed>> {
    let mut r = StreamReader::new(input).map_err(|err| {
        Box::new(Failed {
            recs: Vec::new(),
            ends: Vec::new(),
            err,
        })
    })?;
    assert_eq!(r.offset(), HEADER_LEN as u64);
    assert!(r.blocks().is_empty());
    let mut recs = Vec::new();
    let mut ends = Vec::new();
    loop {
        match r.next_record().map(own) {
            Ok(rec) => {
                assert_eq!(r.record(), recs.len() as u64, "record index of {rec:?}");
                let done = matches!(rec, Rec::End | Rec::Abort(_));
                recs.push(rec);
                ends.push(r.offset());
                if done {
                    return Ok(Parsed {
                        flags: r.flags(),
                        blocks: r.blocks().to_vec(),
                        recs,
                        ends,
                        offset: r.offset(),
                    });
                }
            }
            Err(err) => return Err(Box::new(Failed { recs, ends, err })),
        }
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed, Box<Failed>> {
    parse_from(bytes)
}

#[track_caller]
fn parse_ok(bytes: &[u8]) -> Parsed {
    match parse(bytes) {
        Ok(p) => p,
        Err(f) => panic!("unexpected error: {} (after {:?})", f.err, f.recs),
    }
}

#[track_caller]
fn parse_err(bytes: &[u8]) -> Failed {
    match parse(bytes) {
        Ok(p) => panic!("expected an error, parsed {:?}", p.recs),
        Err(f) => *f,
    }
}

/// Asserts where an error happened.
#[track_caller]
fn assert_at(e: &StreamError, offset: u64, record: u64, what: Option<&str>) {
    assert_eq!(
        (e.offset, e.record, e.what),
        (offset, record, what),
        "wrong position for: {e}"
    );
}

// ---------------------------------------------------------------------------
// A byte builder for crafted streams
// ---------------------------------------------------------------------------

/// Builds streams byte by byte, following format.rs independently of the
/// writer. Section checksums are computed as the spec says.
struct Builder {
    buf: Vec<u8>,
    section_start: usize,
}

impl Builder {
    /// A valid header.
    fn header(flags: u16) -> Self {
        Self::custom_header(MAGIC, VERSION, flags, 0)
    }

    fn custom_header(magic: [u8; 8], version: u16, flags: u16, reserved: u32) -> Self {
        let mut b = Builder {
            buf: Vec::new(),
            section_start: 0,
        };
        b.bytes(&magic).u16(version).u16(flags).u32(reserved);
        b
    }

    /// A valid header followed by the [`BLOCKS`] block list.
    fn with_blocks() -> Self {
        let mut b = Self::header(0);
        b.blocks(BLOCKS);
        b
    }

    /// Current length, i.e. the offset of the next byte.
    fn pos(&self) -> u64 {
        self.buf.len() as u64
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }

    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    fn tag(&mut self, kind: Kind, same: bool) -> &mut Self {
        self.u8(kind as u8 | if same { SAME_BLOCK } else { 0 })
    }

    /// A block list with the correct count and total.
    fn blocks(&mut self, blocks: &[(&str, u64)]) -> &mut Self {
        let total = blocks.iter().map(|b| b.1).sum();
        let entries: Vec<(&[u8], u64)> = blocks
            .iter()
            .map(|(id, len)| (id.as_bytes(), *len))
            .collect();
        self.block_list_raw(blocks.len() as u32, total, &entries)
    }

    /// A block list with every field as given.
    fn block_list_raw(&mut self, count: u32, total: u64, entries: &[(&[u8], u64)]) -> &mut Self {
        self.tag(Kind::BlockList, false).u32(count).u64(total);
        for (id, len) in entries {
            self.u8(id.len() as u8).bytes(id).u64(*len);
        }
        self
    }

    /// Tag and page address; `block: None` sets the same-block flag.
    fn addr(&mut self, kind: Kind, block: Option<u16>, offset: u64) -> &mut Self {
        match block {
            Some(b) => self.tag(kind, false).u16(b),
            None => self.tag(kind, true),
        }
        .u64(offset)
    }

    fn zero(&mut self, block: Option<u16>, offset: u64) -> &mut Self {
        self.addr(Kind::Zero, block, offset)
    }

    fn raw(&mut self, block: Option<u16>, offset: u64, page: &[u8]) -> &mut Self {
        assert_eq!(page.len(), PAGE_SIZE);
        self.addr(Kind::Raw, block, offset).bytes(page)
    }

    fn xbzrle(&mut self, block: Option<u16>, offset: u64, payload: &[u8]) -> &mut Self {
        self.addr(Kind::Xbzrle, block, offset)
            .u16(payload.len() as u16)
            .bytes(payload)
    }

    fn compressed(
        &mut self,
        block: Option<u16>,
        offset: u64,
        algo: u8,
        payload: &[u8],
    ) -> &mut Self {
        self.addr(Kind::Compressed, block, offset)
            .u8(algo)
            .u16(payload.len() as u16)
            .bytes(payload)
    }

    /// A section end with the correct checksum.
    fn section_end(&mut self, seq: u64) -> &mut Self {
        self.tag(Kind::SectionEnd, false).u64(seq);
        let crc = crc32fast::hash(&self.buf[self.section_start..]);
        self.u32(crc);
        self.section_start = self.buf.len();
        self
    }

    fn state(&mut self, blob: &[u8]) -> &mut Self {
        self.tag(Kind::State, false)
            .u32(blob.len() as u32)
            .bytes(blob)
    }

    fn digest(&mut self, hash: &[u8; 32]) -> &mut Self {
        self.tag(Kind::Digest, false).u8(DIGEST_BLAKE3).bytes(hash)
    }

    /// The end record with the correct checksum of the last stretch.
    fn end(&mut self) -> &mut Self {
        self.tag(Kind::End, false);
        let crc = crc32fast::hash(&self.buf[self.section_start..]);
        self.u32(crc);
        self.section_start = self.buf.len();
        self
    }

    fn build(&self) -> Vec<u8> {
        self.buf.clone()
    }
}

/// Blocks most crafted streams declare.
const BLOCKS: &[(&str, u64)] = &[("ram0", 4 * P), ("ram1", 2 * P)];

/// Byte length of the [`BLOCKS`] block list record.
const BLOCKS_LEN: u64 = 1 + 4 + 8 + (1 + 4 + 8) * 2;

/// Offset of the first record after the [`BLOCKS`] block list.
const AFTER_BLOCKS: u64 = HEADER_LEN as u64 + BLOCKS_LEN;

fn descs(blocks: &[(&str, u64)]) -> Vec<BlockDesc> {
    blocks
        .iter()
        .map(|(id, len)| BlockDesc {
            id: id.to_string(),
            len: *len,
        })
        .collect()
}

/// A page of recognisable, non-zero contents.
fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------
// Streams made by the writer
// ---------------------------------------------------------------------------

/// A writer plus what a reader should see of its output.
struct Rig {
    w: StreamWriter<Vec<u8>>,
    recs: Vec<Rec>,
    /// Page records written: (tag offset, tag, block, offset).
    tags: Vec<(usize, u8, u16, u64)>,
}

impl Rig {
    fn new(flags: u16) -> Self {
        let w = StreamWriter::new(Vec::new(), flags);
        assert_eq!(w.bytes(), HEADER_LEN as u64);
        Rig {
            w,
            recs: Vec::new(),
            tags: Vec::new(),
        }
    }

    /// Writes a page record with `f`, expecting tag `kind` (| SAME_BLOCK if
    /// `same`) and the record `rec`.
    fn page(
        &mut self,
        kind: Kind,
        same: bool,
        rec: Rec,
        f: impl FnOnce(&mut StreamWriter<Vec<u8>>) -> io::Result<()>,
    ) {
        let (block, offset) = match &rec {
            Rec::Zero { block, offset }
            | Rec::ZeroRun { block, offset, .. }
            | Rec::Raw { block, offset, .. }
            | Rec::Xbzrle { block, offset, .. }
            | Rec::Compressed { block, offset, .. } => (*block, *offset),
            other => panic!("not a page record: {other:?}"),
        };
        let at = self.w.bytes() as usize;
        f(&mut self.w).unwrap();
        let tag = kind as u8 | if same { SAME_BLOCK } else { 0 };
        self.tags.push((at, tag, block, offset));
        self.recs.push(rec);
    }

    /// Writes a non-page record with `f`, expecting `rec`.
    fn other(&mut self, rec: Rec, f: impl FnOnce(&mut StreamWriter<Vec<u8>>) -> io::Result<()>) {
        f(&mut self.w).unwrap();
        self.recs.push(rec);
    }

    /// Ends the stream and returns its bytes and expected records.
    fn finish(mut self) -> Sample {
        self.w.end().unwrap();
        self.recs.push(Rec::End);
        let total = self.w.bytes();
        let bytes = std::mem::take(self.w.get_mut());
        assert_eq!(total, bytes.len() as u64, "writer's byte count");
        // The writer sets the same-block flag exactly when the block repeats,
        // and then omits the block index.
        for &(at, tag, block, offset) in &self.tags {
            assert_eq!(bytes[at], tag, "tag at byte {at}");
            let addr = if tag & SAME_BLOCK != 0 {
                &bytes[at + 1..at + 9]
            } else {
                assert_eq!(
                    bytes[at + 1..at + 3],
                    block.to_be_bytes(),
                    "block at byte {at}"
                );
                &bytes[at + 3..at + 11]
            };
            assert_eq!(
                addr,
                offset.to_be_bytes(),
                "offset of the record at byte {at}"
            );
        }
        Sample {
            bytes,
            recs: self.recs,
        }
    }
}

struct Sample {
    bytes: Vec<u8>,
    recs: Vec<Rec>,
}

fn sample_blocks() -> Vec<BlockDesc> {
    descs(&[("pc.ram", 8 * P), ("vga.vram", 2 * P), ("pc.bios", P)])
}

/// A stream with every record kind and every writer entry point.
fn full_sample(flags: u16) -> Sample {
    let blocks = sample_blocks();
    let mut s = Rig::new(flags);
    s.other(Rec::BlockList(blocks.clone()), |w| w.block_list(&blocks));

    // Section 0: direct page records.
    s.page(
        Kind::Zero,
        false,
        Rec::Zero {
            block: 0,
            offset: 0,
        },
        |w| w.zero(0, 0),
    );
    s.page(
        Kind::Zero,
        true,
        Rec::Zero {
            block: 0,
            offset: P,
        },
        |w| w.zero(0, P),
    );
    let p1 = page(1);
    let rec = Rec::Raw {
        block: 1,
        offset: 0,
        data: p1.clone(),
    };
    s.page(Kind::Raw, false, rec, |w| w.raw(1, 0, &p1));
    let x = payload(3, 2);
    let rec = Rec::Xbzrle {
        block: 1,
        offset: P,
        data: x.clone(),
    };
    s.page(Kind::Xbzrle, true, rec, |w| {
        w.encoded(Encoded::Xbzrle, 1, P, &x)
    });
    let z = payload(100, 3);
    let rec = Rec::Compressed {
        block: 0,
        offset: 2 * P,
        algo: COMPRESS_ZSTD,
        data: z.clone(),
    };
    s.page(Kind::Compressed, false, rec, |w| {
        w.encoded(Encoded::Compressed(COMPRESS_ZSTD), 0, 2 * P, &z)
    });
    let l = payload(1, 4);
    let rec = Rec::Compressed {
        block: 0,
        offset: 7 * P,
        algo: COMPRESS_LZ4,
        data: l.clone(),
    };
    s.page(Kind::Compressed, true, rec, |w| {
        w.encoded(Encoded::Compressed(COMPRESS_LZ4), 0, 7 * P, &l)
    });
    s.other(Rec::SectionEnd { seq: 0 }, |w| w.section_end(0));

    // Section 1: staged pages.
    let p2 = page(2);
    let rec = Rec::Raw {
        block: 2,
        offset: 0,
        data: p2.clone(),
    };
    s.page(Kind::Raw, false, rec, |w| {
        w.stage_page(2, 0).copy_from_slice(&p2);
        assert_eq!(w.staged(), &p2[..]);
        w.commit_raw()
    });
    s.page(
        Kind::Zero,
        true,
        Rec::Zero {
            block: 2,
            offset: 0,
        },
        |w| {
            w.stage_page(2, 0).fill(0xaa);
            w.commit_zero()
        },
    );
    // A discarded page leaves nothing behind, not even its block: the next
    // record of block 2 still uses the same-block flag.
    let before = s.w.bytes();
    s.w.stage_page(0, 3 * P).fill(0x55);
    assert_eq!(s.w.bytes(), before + 11 + P);
    s.w.discard_staged();
    assert_eq!(s.w.bytes(), before);
    s.page(
        Kind::Zero,
        true,
        Rec::Zero {
            block: 2,
            offset: 0,
        },
        |w| w.zero(2, 0),
    );
    let x = payload(PAGE_SIZE, 5);
    let rec = Rec::Xbzrle {
        block: 1,
        offset: P,
        data: x.clone(),
    };
    s.page(Kind::Xbzrle, false, rec, |w| {
        w.stage_page(1, P).fill(1);
        w.commit_encoded(Encoded::Xbzrle, &x)
    });
    let c = payload(PAGE_SIZE - 1, 6);
    let rec = Rec::Compressed {
        block: 1,
        offset: 0,
        algo: COMPRESS_LZ4,
        data: c.clone(),
    };
    s.page(Kind::Compressed, true, rec, |w| {
        w.stage_page(1, 0).fill(2);
        w.commit_encoded(Encoded::Compressed(COMPRESS_LZ4), &c)
    });
    let c = payload(17, 7);
    let rec = Rec::Compressed {
        block: 0,
        offset: 5 * P,
        algo: COMPRESS_ZSTD,
        data: c.clone(),
    };
    s.page(Kind::Compressed, false, rec, |w| {
        w.stage_page(0, 5 * P).fill(3);
        w.commit_encoded(Encoded::Compressed(COMPRESS_ZSTD), &c)
    });
    s.other(Rec::SectionEnd { seq: 1 }, |w| w.section_end(1));
    // An empty section.
    s.other(Rec::SectionEnd { seq: 2 }, |w| w.section_end(2));

    // Section 3: a page, the state, the digest.
    s.page(
        Kind::Zero,
        true,
        Rec::Zero {
            block: 0,
            offset: 0,
        },
        |w| w.zero(0, 0),
    );
    let blob = payload(1000, 8);
    s.other(Rec::State(blob.clone()), |w| w.state(&blob));
    if flags & FLAG_VERIFY != 0 {
        let hash = *blake3::hash(b"guest memory").as_bytes();
        s.other(Rec::Digest(hash), |w| w.digest(&hash));
    }
    s.other(Rec::SectionEnd { seq: 3 }, |w| w.section_end(3));
    s.finish()
}

/// A small stream with every record kind, for the exhaustive loops.
fn small_sample() -> Sample {
    let blocks = descs(&[("ram", 4 * P), ("rom", P)]);
    let mut s = Rig::new(FLAG_VERIFY);
    s.other(Rec::BlockList(blocks.clone()), |w| w.block_list(&blocks));
    s.page(
        Kind::Zero,
        false,
        Rec::Zero {
            block: 0,
            offset: 0,
        },
        |w| w.zero(0, 0),
    );
    s.page(
        Kind::Zero,
        true,
        Rec::Zero {
            block: 0,
            offset: P,
        },
        |w| w.zero(0, P),
    );
    let p = page(9);
    let rec = Rec::Raw {
        block: 1,
        offset: 0,
        data: p.clone(),
    };
    s.page(Kind::Raw, false, rec, |w| w.raw(1, 0, &p));
    let x = payload(5, 1);
    let rec = Rec::Xbzrle {
        block: 1,
        offset: 0,
        data: x.clone(),
    };
    s.page(Kind::Xbzrle, true, rec, |w| {
        w.encoded(Encoded::Xbzrle, 1, 0, &x)
    });
    let c = payload(7, 2);
    let rec = Rec::Compressed {
        block: 0,
        offset: 2 * P,
        algo: COMPRESS_ZSTD,
        data: c.clone(),
    };
    s.page(Kind::Compressed, false, rec, |w| {
        w.encoded(Encoded::Compressed(COMPRESS_ZSTD), 0, 2 * P, &c)
    });
    s.other(Rec::SectionEnd { seq: 0 }, |w| w.section_end(0));
    let c = payload(3, 3);
    let rec = Rec::Compressed {
        block: 0,
        offset: 3 * P,
        algo: COMPRESS_LZ4,
        data: c.clone(),
    };
    s.page(Kind::Compressed, true, rec, |w| {
        w.encoded(Encoded::Compressed(COMPRESS_LZ4), 0, 3 * P, &c)
    });
    s.other(Rec::SectionEnd { seq: 1 }, |w| w.section_end(1));
    let blob = b"vcpu and device state".to_vec();
    s.other(Rec::State(blob.clone()), |w| w.state(&blob));
    let hash = [0x5a; 32];
    s.other(Rec::Digest(hash), |w| w.digest(&hash));
    s.other(Rec::SectionEnd { seq: 2 }, |w| w.section_end(2));
    s.finish()
}

// ---------------------------------------------------------------------------
// Transports for the reader
// ---------------------------------------------------------------------------

/// Hands out at most `chunk` bytes per read, and fails every other read
/// with `Interrupted`, which the reader must retry.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Hands out `data`, then fails.
struct FailAfter<'a> {
    data: &'a [u8],
}

impl Read for FailAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "link down"));
        }
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// 1. Round trips
// ---------------------------------------------------------------------------

fn check_round_trip(flags: u16) {
    let s = full_sample(flags);
    let p = parse_ok(&s.bytes);
    assert_eq!(p.flags, flags);
    assert_eq!(p.blocks, sample_blocks());
    assert_eq!(p.recs, s.recs);
    assert_eq!(p.offset, s.bytes.len() as u64);
    assert_eq!(*p.ends.last().unwrap(), s.bytes.len() as u64);
}

#[test]
fn round_trip_without_verify() {
    check_round_trip(0);
}

#[test]
fn round_trip_with_verify() {
    check_round_trip(FLAG_VERIFY);
}

#[test]
fn round_trip_record_by_record() {
    let s = full_sample(FLAG_VERIFY);
    let mut r = StreamReader::new(&s.bytes[..]).unwrap();
    assert_eq!(r.flags(), FLAG_VERIFY);
    assert_eq!(r.offset(), HEADER_LEN as u64);
    assert!(r.blocks().is_empty());
    let mut seen = 0;
    for (i, want) in s.recs.iter().enumerate() {
        let got = r.next_record().unwrap();
        assert_eq!(own(got), *want, "record {i}");
        assert_eq!(r.record(), i as u64);
        if i == 0 {
            // The block list is kept once read.
            assert_eq!(r.blocks(), &sample_blocks()[..]);
        }
        seen += 1;
    }
    assert_eq!(seen, s.recs.len());
    assert_eq!(r.offset(), s.bytes.len() as u64);
    assert_eq!(r.blocks(), &sample_blocks()[..]);
}

#[test]
fn round_trip_through_a_slow_interrupted_transport() {
    let s = full_sample(FLAG_VERIFY);
    for chunk in [1, 3, 4096, 5000] {
        let t = Trickle {
            data: &s.bytes,
            chunk,
            interrupt: false,
        };
        let p = parse_from(t).unwrap_or_else(|f| panic!("chunk {chunk}: {}", f.err));
        assert_eq!(p.recs, s.recs, "chunk {chunk}");
        assert_eq!(p.offset, s.bytes.len() as u64);
    }
}

#[test]
fn round_trip_across_writer_flushes() {
    // More than the writer's flush threshold and the reader's buffer, in one
    // section: the checksum must span the writer's intermediate flushes.
    let blocks = descs(&[("big", 64 * P), ("small", 2 * P)]);
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&blocks).unwrap();
    let mut want = vec![Rec::BlockList(blocks.clone())];
    for i in 0..300u64 {
        let (block, offset) = if i % 7 == 3 {
            (1, (i % 2) * P)
        } else {
            (0, (i % 64) * P)
        };
        let data = page(i as u8);
        w.raw(block, offset, &data).unwrap();
        want.push(Rec::Raw {
            block,
            offset,
            data,
        });
        if i == 150 {
            w.section_end(0).unwrap();
            want.push(Rec::SectionEnd { seq: 0 });
        }
    }
    w.section_end(1).unwrap();
    want.push(Rec::SectionEnd { seq: 1 });
    w.end().unwrap();
    want.push(Rec::End);
    let bytes = std::mem::take(w.get_mut());
    assert!(bytes.len() > 1 << 20);
    let p = parse_ok(&bytes);
    assert_eq!(p.recs, want);
    assert_eq!(p.offset, bytes.len() as u64);
    let t = Trickle {
        data: &bytes,
        chunk: 100_000,
        interrupt: true,
    };
    assert_eq!(parse_from(t).unwrap().recs, want);
}

#[test]
fn writer_output_matches_the_spec_byte_for_byte() {
    let hash = [0x11; 32];
    let raw = page(3);
    let mut w = StreamWriter::new(Vec::new(), FLAG_VERIFY);
    w.block_list(&descs(BLOCKS)).unwrap();
    w.zero(0, 0).unwrap();
    w.zero(0, P).unwrap();
    w.raw(1, 0, &raw).unwrap();
    w.encoded(Encoded::Xbzrle, 1, P, &[1, 2, 3]).unwrap();
    w.encoded(Encoded::Compressed(COMPRESS_ZSTD), 0, 3 * P, &[4, 5])
        .unwrap();
    w.section_end(0).unwrap();
    w.encoded(Encoded::Compressed(COMPRESS_LZ4), 0, 2 * P, &[6])
        .unwrap();
    w.section_end(1).unwrap();
    w.state(b"state").unwrap();
    w.digest(&hash).unwrap();
    w.section_end(2).unwrap();
    w.end().unwrap();
    let written = std::mem::take(w.get_mut());

    let mut b = Builder::header(FLAG_VERIFY);
    b.blocks(BLOCKS)
        .zero(Some(0), 0)
        .zero(None, P)
        .raw(Some(1), 0, &raw)
        .xbzrle(None, P, &[1, 2, 3])
        .compressed(Some(0), 3 * P, COMPRESS_ZSTD, &[4, 5])
        .section_end(0)
        .compressed(None, 2 * P, COMPRESS_LZ4, &[6])
        .section_end(1)
        .state(b"state")
        .digest(&hash)
        .section_end(2)
        .end();
    assert_eq!(written, b.build());
    assert_eq!(
        &written[..HEADER_LEN],
        b"LIVEMIG\0\x00\x01\x00\x01\x00\x00\x00\x00"
    );
}

#[test]
fn boundary_values_are_accepted() {
    // 1 and MAX_BLOCKS blocks, a 255-byte id, payload lengths at their
    // bounds, the last page of a block, an empty state blob.
    let ids: Vec<String> = (0..MAX_BLOCKS).map(|i| format!("b{i}")).collect();
    let many: Vec<(&str, u64)> = ids.iter().map(|id| (id.as_str(), P)).collect();
    let mut b = Builder::header(0);
    b.blocks(&many)
        .zero(Some(MAX_BLOCKS as u16 - 1), 0)
        .section_end(0)
        .end();
    let p = parse_ok(&b.build());
    assert_eq!(p.blocks.len(), MAX_BLOCKS as usize);
    assert_eq!(
        p.recs[1],
        Rec::Zero {
            block: MAX_BLOCKS as u16 - 1,
            offset: 0
        }
    );

    let long_id = "x".repeat(255);
    let one = [(long_id.as_str(), 3 * P)];
    let mut b = Builder::header(0);
    b.blocks(&one)
        .xbzrle(Some(0), 2 * P, &[7])
        .xbzrle(None, 2 * P, &payload(PAGE_SIZE, 1))
        .compressed(None, 0, COMPRESS_ZSTD, &[8])
        .compressed(None, 0, COMPRESS_LZ4, &payload(PAGE_SIZE - 1, 2))
        .state(&[])
        .section_end(0)
        .end();
    let p = parse_ok(&b.build());
    assert_eq!(p.blocks, descs(&one));
    assert_eq!(
        p.recs[1..],
        [
            Rec::Xbzrle {
                block: 0,
                offset: 2 * P,
                data: vec![7]
            },
            Rec::Xbzrle {
                block: 0,
                offset: 2 * P,
                data: payload(PAGE_SIZE, 1)
            },
            Rec::Compressed {
                block: 0,
                offset: 0,
                algo: COMPRESS_ZSTD,
                data: vec![8]
            },
            Rec::Compressed {
                block: 0,
                offset: 0,
                algo: COMPRESS_LZ4,
                data: payload(PAGE_SIZE - 1, 2)
            },
            Rec::State(Vec::new()),
            Rec::SectionEnd { seq: 0 },
            Rec::End,
        ]
    );
}

#[test]
fn same_block_follows_the_last_page_record_across_sections() {
    let mut b = Builder::with_blocks();
    b.zero(Some(1), P)
        .section_end(0)
        .state(b"s")
        .zero(None, 0)
        .raw(Some(0), 3 * P, &page(1))
        .xbzrle(None, 2 * P, &[1])
        .end();
    let p = parse_ok(&b.build());
    assert_eq!(
        p.recs[4],
        Rec::Zero {
            block: 1,
            offset: 0
        }
    );
    assert_eq!(
        p.recs[6],
        Rec::Xbzrle {
            block: 0,
            offset: 2 * P,
            data: vec![1]
        }
    );
}

#[test]
fn a_stream_may_end_without_sections_or_pages() {
    let mut b = Builder::header(0);
    b.end();
    let p = parse_ok(&b.build());
    assert_eq!(p.recs, [Rec::End]);
    assert!(p.blocks.is_empty());
    assert_eq!(p.offset, HEADER_LEN as u64 + 5, "end tag + its checksum");
}

#[test]
fn writer_rejects_an_oversized_state() {
    let mut w = StreamWriter::new(Vec::new(), 0);
    let before = w.bytes();
    let err = w.state(&vec![0; MAX_STATE as usize + 1]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(w.bytes(), before);
}

#[test]
#[should_panic(expected = "no staged page")]
fn writer_commit_without_a_staged_page_panics() {
    let mut w = StreamWriter::new(Vec::new(), 0);
    let _ = w.commit_raw();
}

#[test]
#[should_panic(expected = "a page is already staged")]
fn writer_staging_twice_panics() {
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.stage_page(0, 0);
    w.stage_page(0, P);
}

#[test]
#[should_panic]
fn writer_rejects_a_full_page_compressed_payload() {
    let mut w = StreamWriter::new(Vec::new(), 0);
    let _ = w.encoded(Encoded::Compressed(COMPRESS_ZSTD), 0, 0, &[0; PAGE_SIZE]);
}

// ---------------------------------------------------------------------------
// 2. Every error kind, and where it is reported
// ---------------------------------------------------------------------------

#[test]
fn truncated_at_every_cut_point() {
    let s = small_sample();
    let full = parse_ok(&s.bytes);
    assert_eq!(full.recs, s.recs);
    // Record boundaries: where each record starts.
    let mut starts = vec![HEADER_LEN as u64];
    starts.extend(&full.ends);
    for cut in 0..s.bytes.len() {
        let f = parse_err(&s.bytes[..cut]);
        let e = &f.err;
        let StreamErrorKind::Truncated(what) = e.kind else {
            panic!("cut at {cut}: not truncated: {e}");
        };
        assert_eq!(e.offset, cut as u64, "cut at {cut}: {e}");
        let cut = cut as u64;
        // Records wholly inside the prefix are all returned, unchanged.
        let n = full.ends.iter().take_while(|&&end| end <= cut).count();
        assert_eq!(f.recs, s.recs[..n], "cut at {cut}");
        if cut < HEADER_LEN as u64 {
            assert_eq!(what, "the header", "cut at {cut}");
            assert_at(e, cut, 0, Some("header"));
        } else if starts.contains(&cut) {
            assert_eq!(what, "a record tag", "cut at {cut}");
            assert_at(e, cut, n as u64, None);
        } else {
            assert_ne!(what, "a record tag", "cut at {cut}");
            assert_at(e, cut, n as u64, Some(s.recs[n].kind().name()));
        }
    }
}

#[test]
fn truncated_names_the_field() {
    let s = small_sample();
    let full = parse_ok(&s.bytes);
    let cases: Vec<(u64, &str)> = full
        .recs
        .iter()
        .zip(&full.ends)
        .filter_map(|(r, &end)| match r {
            Rec::Raw { .. } => Some((end - 1, "a raw page")),
            Rec::SectionEnd { .. } => Some((end - 1, "a section checksum")),
            Rec::State(_) => Some((end - 1, "the device state")),
            Rec::Digest(_) => Some((end - 1, "a digest")),
            _ => None,
        })
        .collect();
    assert_eq!(cases.len(), 6);
    for (cut, want) in cases {
        let e = parse_err(&s.bytes[..cut as usize]).err;
        assert!(
            matches!(e.kind, StreamErrorKind::Truncated(w) if w == want),
            "{e}"
        );
    }
    // Inside a block list and in the middle of a page address.
    let mut b = Builder::with_blocks();
    b.zero(Some(0), P);
    let bytes = b.build();
    let e = parse_err(&bytes[..HEADER_LEN + 3]).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Truncated("a block list")),
        "{e}"
    );
    let e = parse_err(&bytes[..AFTER_BLOCKS as usize + 2]).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Truncated("a block index")),
        "{e}"
    );
    let e = parse_err(&bytes[..AFTER_BLOCKS as usize + 5]).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Truncated("a page offset")),
        "{e}"
    );
    assert_at(&e, AFTER_BLOCKS + 5, 1, Some("zero page"));
}

#[test]
fn truncated_state_does_not_trust_its_length() {
    // A maximal claimed length with only a few bytes behind it.
    let mut b = Builder::header(0);
    b.tag(Kind::State, false).u32(MAX_STATE).bytes(&[1; 10]);
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Truncated("the device state")),
        "{e}"
    );
    assert_at(&e, HEADER_LEN as u64 + 5 + 10, 0, Some("device state"));
}

#[test]
fn io_error_at_every_point() {
    let s = small_sample();
    let full = parse_ok(&s.bytes);
    for n in 0..s.bytes.len() {
        let f = parse_from(FailAfter {
            data: &s.bytes[..n],
        })
        .unwrap_err();
        let e = &f.err;
        let StreamErrorKind::Io(source) = &e.kind else {
            panic!("fail after {n}: not an I/O error: {e}");
        };
        assert_eq!(source.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(e.offset, n as u64, "fail after {n}: {e}");
        let k = full.ends.iter().take_while(|&&end| end <= n as u64).count();
        assert_eq!(f.recs.len(), k, "fail after {n}");
        let want_record = if n < HEADER_LEN { 0 } else { k as u64 };
        assert_eq!(e.record, want_record, "fail after {n}");
    }
    // The error keeps the I/O error as its source chain.
    let e = parse_err_from_failing();
    let src = std::error::Error::source(&e.kind).expect("io source");
    assert_eq!(src.to_string(), "link down");
}

fn parse_err_from_failing() -> StreamError {
    match StreamReader::new(FailAfter { data: &[] }) {
        Ok(_) => panic!("header read from a failing transport"),
        Err(e) => {
            assert_at(&e, 0, 0, Some("header"));
            e
        }
    }
}

#[test]
fn bad_magic() {
    for magic in [*b"LIVEMIX\0", *b"livemig\0", [0; 8], *b"LIVEMIG1"] {
        let e = parse_err(&Builder::custom_header(magic, VERSION, 0, 0).build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BadMagic(m) if m == magic),
            "{e}"
        );
        assert_at(&e, 0, 0, Some("header"));
    }
    // Checked before anything else is read.
    let e = parse_err(b"LIVEMIX\0").err;
    assert!(matches!(e.kind, StreamErrorKind::BadMagic(_)), "{e}");
}

#[test]
fn bad_version() {
    for v in [0, 2, 0x0100, u16::MAX] {
        let e = parse_err(&Builder::custom_header(MAGIC, v, 0, 0).build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::Version(x) if x == v),
            "{e}"
        );
        assert_at(&e, 8, 0, Some("header"));
    }
}

#[test]
fn unknown_header_flags() {
    for flags in [1 << 8, 1 << 15, FLAG_VERIFY | 1 << 8, u16::MAX] {
        let e = parse_err(&Builder::custom_header(MAGIC, VERSION, flags, 0).build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::HeaderFlags(x) if x == flags),
            "{e}"
        );
        assert_at(&e, 10, 0, Some("header"));
    }
}

#[test]
fn reserved_header_field() {
    for v in [1, 0x100, 0x8000_0000, u32::MAX] {
        let e = parse_err(&Builder::custom_header(MAGIC, VERSION, FLAG_VERIFY, v).build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::Reserved(x) if x == v),
            "{e}"
        );
        assert_at(&e, 12, 0, Some("header"));
    }
}

#[test]
fn unknown_tag() {
    for tag in [0x00, 0x12, 0x13, 0x7f, 0x80, 0x92, 0xff] {
        let mut b = Builder::header(0);
        b.u8(tag);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::UnknownTag(t) if t == tag),
            "{e}"
        );
        assert_at(&e, 16, 0, None);

        // After two records.
        let mut b = Builder::with_blocks();
        b.zero(Some(0), 0);
        let at = b.pos();
        b.u8(tag).u64(0);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::UnknownTag(t) if t == tag),
            "{e}"
        );
        assert_at(&e, at, 2, None);
    }
}

#[test]
fn same_block_on_non_page_records() {
    for kind in [
        Kind::BlockList,
        Kind::SectionEnd,
        Kind::State,
        Kind::Digest,
        Kind::End,
    ] {
        let mut b = Builder::with_blocks();
        b.zero(Some(0), 0);
        let at = b.pos();
        b.tag(kind, true).u64(0).u64(0);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::SameBlockOnNonPage(n) if n == kind.name()),
            "{e}"
        );
        assert_at(&e, at, 2, Some(kind.name()));
    }
}

#[test]
fn same_block_on_the_first_page_record() {
    for kind in [Kind::Zero, Kind::Raw, Kind::Xbzrle, Kind::Compressed] {
        let mut b = Builder::with_blocks();
        b.section_end(0);
        let at = b.pos();
        b.addr(kind, None, 0).bytes(&[1; PAGE_SIZE]);
        let e = parse_err(&b.build()).err;
        assert!(matches!(e.kind, StreamErrorKind::SameBlockFirst), "{e}");
        assert_at(&e, at, 2, Some(kind.name()));
    }
}

#[test]
fn page_record_before_the_block_list() {
    for kind in [Kind::Zero, Kind::Raw, Kind::Xbzrle, Kind::Compressed] {
        for block in [Some(0), None] {
            let mut b = Builder::header(0);
            b.addr(kind, block, 0).bytes(&[1; PAGE_SIZE]);
            let e = parse_err(&b.build()).err;
            assert!(matches!(e.kind, StreamErrorKind::NoBlockList), "{e}");
            assert_at(&e, 17, 0, Some(kind.name()));
        }
    }
    // Also after other records.
    let mut b = Builder::header(0);
    b.section_end(0).state(b"x");
    let at = b.pos();
    b.zero(Some(0), 0).blocks(BLOCKS).end();
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::NoBlockList), "{e}");
    assert_at(&e, at + 1, 2, Some("zero page"));
}

#[test]
fn second_block_list() {
    let mut b = Builder::with_blocks();
    b.zero(Some(0), 0);
    let at = b.pos();
    b.blocks(BLOCKS).end();
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::BlockListTwice), "{e}");
    assert_at(&e, at, 2, Some("block list"));

    // Even an invalid second list is refused as a second list.
    let mut b = Builder::with_blocks();
    b.block_list_raw(0, 0, &[]);
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::BlockListTwice), "{e}");
    assert_at(&e, AFTER_BLOCKS, 1, Some("block list"));
}

#[test]
fn block_count() {
    for count in [0, MAX_BLOCKS + 1, u32::MAX] {
        let mut b = Builder::header(0);
        b.block_list_raw(count, P, &[(b"a", P)]);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BlockCount(c) if c == count),
            "{e}"
        );
        assert_at(&e, 17, 0, Some("block list"));
    }
}

#[test]
fn block_id_empty_or_not_utf8() {
    // Empty id of the first block: at its length byte, after count and total.
    let mut b = Builder::header(0);
    b.block_list_raw(1, P, &[(b"", P)]);
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(e.kind, StreamErrorKind::BlockId { index: 0 }),
        "{e}"
    );
    assert_at(&e, 29, 0, Some("block list"));

    let bad: [&[u8]; 4] = [b"\xff\xfe", b"ram\x80", b"\xe2\x82", b"\xc0\xaf"];
    for id in bad {
        let mut b = Builder::header(0);
        b.block_list_raw(3, 3 * P, &[(b"ok", P), (id, P), (b"later", P)]);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BlockId { index: 1 }),
            "{e}"
        );
        assert_at(&e, 29 + 1 + 2 + 8, 0, Some("block list"));
    }
}

#[test]
fn block_id_twice() {
    let mut b = Builder::header(0);
    b.block_list_raw(3, 3 * P, &[(b"a", P), (b"b", P), (b"a", P)]);
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(&e.kind, StreamErrorKind::BlockIdTwice(id) if id == "a"),
        "{e}"
    );
    assert_at(&e, 29 + 2 * 10, 0, Some("block list"));
}

#[test]
fn block_length() {
    for len in [0, 1, P - 1, P + 1, 4097, u64::MAX] {
        let mut b = Builder::header(0);
        b.block_list_raw(2, P.wrapping_add(len), &[(b"first", P), (b"second", len)]);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(&e.kind, StreamErrorKind::BlockLength { id, len: l } if id == "second" && *l == len),
            "{e}"
        );
        assert_at(&e, 29 + (1 + 5 + 8) + (1 + 6), 0, Some("block list"));
    }
}

#[test]
fn block_total() {
    for declared in [0, 5 * P, 7 * P, u64::MAX] {
        let mut b = Builder::header(0);
        let entries: Vec<(&[u8], u64)> = BLOCKS
            .iter()
            .map(|(id, len)| (id.as_bytes(), *len))
            .collect();
        b.block_list_raw(2, declared, &entries);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BlockTotal { declared: d, sum } if d == declared && sum == 6 * P),
            "{e}"
        );
        assert_at(&e, 21, 0, Some("block list"));
    }
}

#[test]
fn block_total_overflow() {
    // Two aligned blocks of 2^63 bytes: their sum (2^64) is not representable,
    // so no declared total can be right. The reader saturates the sum to
    // u64::MAX and accepts a declared total of u64::MAX.
    let half = 1u64 << 63;
    let mut b = Builder::header(0);
    b.block_list_raw(2, u64::MAX, &[(b"a", half), (b"b", half)])
        .end();
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::BlockTotal { .. }), "{e}");
    assert_at(&e, 21, 0, Some("block list"));
}

#[test]
fn unknown_block() {
    for index in [2, 3, 0x100, u16::MAX] {
        for kind in [Kind::Zero, Kind::Raw, Kind::Xbzrle, Kind::Compressed] {
            let mut b = Builder::with_blocks();
            b.addr(kind, Some(index), 0);
            let e = parse_err(&b.build()).err;
            assert!(
                matches!(e.kind, StreamErrorKind::UnknownBlock { index: i, count: 2 } if i == index),
                "{e}"
            );
            assert_at(&e, AFTER_BLOCKS + 1, 1, Some(kind.name()));
        }
    }
}

#[test]
fn bad_offset() {
    // (block, offset) pairs outside their block or not aligned; block 0 has
    // 4 pages, block 1 has 2.
    let cases = [
        (0, 1),
        (0, P - 1),
        (0, P + 8),
        (0, 4 * P),
        (0, 5 * P),
        (1, 2 * P),
        (1, 3 * P + 1),
        (0, u64::MAX),
        (0, u64::MAX - (P - 1)),
        (1, 1 << 63),
    ];
    for (block, offset) in cases {
        let (id, len) = BLOCKS[block as usize];
        for kind in [Kind::Zero, Kind::Raw, Kind::Xbzrle, Kind::Compressed] {
            // With the block index.
            let mut b = Builder::with_blocks();
            b.addr(kind, Some(block), offset);
            let e = parse_err(&b.build()).err;
            assert!(
                matches!(&e.kind, StreamErrorKind::BadOffset { block: bid, offset: o, len: l }
                    if bid == id && *o == offset && *l == len),
                "{e}"
            );
            assert_at(&e, AFTER_BLOCKS + 3, 1, Some(kind.name()));

            // With the same-block flag, after a valid page of that block.
            let mut b = Builder::with_blocks();
            b.zero(Some(block), P);
            let at = b.pos();
            b.addr(kind, None, offset);
            let e = parse_err(&b.build()).err;
            assert!(
                matches!(&e.kind, StreamErrorKind::BadOffset { block: bid, offset: o, .. }
                    if bid == id && *o == offset),
                "{e}"
            );
            assert_at(&e, at + 1, 2, Some(kind.name()));
        }
    }
}

#[test]
fn bad_length_xbzrle() {
    for len in [0, PAGE_SIZE as u16 + 1, u16::MAX] {
        let mut b = Builder::with_blocks();
        b.addr(Kind::Xbzrle, Some(1), P).u16(len).bytes(&[0; 10]);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BadLength { what: "xbzrle payload", len: l, min: 1, max: 4096 } if l == u64::from(len)),
            "{e}"
        );
        assert_at(&e, AFTER_BLOCKS + 11, 1, Some("xbzrle page"));
    }
}

#[test]
fn bad_length_compressed() {
    for algo in [COMPRESS_ZSTD, COMPRESS_LZ4] {
        for len in [0, PAGE_SIZE as u16, u16::MAX] {
            let mut b = Builder::with_blocks();
            b.zero(Some(0), 0);
            let at = b.pos();
            b.addr(Kind::Compressed, None, P)
                .u8(algo)
                .u16(len)
                .bytes(&[0; 10]);
            let e = parse_err(&b.build()).err;
            assert!(
                matches!(e.kind, StreamErrorKind::BadLength { what: "compressed payload", len: l, min: 1, max: 4095 } if l == u64::from(len)),
                "{e}"
            );
            assert_at(&e, at + 1 + 8 + 1, 2, Some("compressed page"));
        }
    }
}

#[test]
fn bad_length_state() {
    for len in [MAX_STATE + 1, u32::MAX] {
        let mut b = Builder::with_blocks();
        let at = b.pos();
        b.tag(Kind::State, false).u32(len).bytes(&[0; 10]);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BadLength { what: "device state", len: l, min: 0, max } if l == u64::from(len) && max == u64::from(MAX_STATE)),
            "{e}"
        );
        assert_at(&e, at + 1, 1, Some("device state"));
    }
}

#[test]
fn compression_algo() {
    for algo in [0, 3, 0x7f, 0xff] {
        let mut b = Builder::with_blocks();
        b.compressed(Some(0), 0, algo, &[1, 2, 3]);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::CompressionAlgo(a) if a == algo),
            "{e}"
        );
        assert_at(&e, AFTER_BLOCKS + 11, 1, Some("compressed page"));
    }
}

#[test]
fn digest_algo() {
    for algo in [0, 2, 0xff] {
        let mut b = Builder::header(FLAG_VERIFY);
        b.tag(Kind::Digest, false).u8(algo).bytes(&[0; 32]).end();
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::DigestAlgo(a) if a == algo),
            "{e}"
        );
        assert_at(&e, 17, 0, Some("digest"));
    }
}

/// Offset just past the section end records of `p`, with their numbers.
fn section_ends(p: &Parsed) -> Vec<(u64, u64)> {
    p.recs
        .iter()
        .zip(&p.ends)
        .filter_map(|(r, &end)| match r {
            Rec::SectionEnd { seq } => Some((*seq, end)),
            _ => None,
        })
        .collect()
}

#[test]
fn checksum_catches_a_flipped_raw_page_byte_at_the_section_end() {
    let s = small_sample();
    let full = parse_ok(&s.bytes);
    let raw_idx = s
        .recs
        .iter()
        .position(|r| matches!(r, Rec::Raw { .. }))
        .unwrap();
    let raw_end = full.ends[raw_idx] as usize;
    let (seq, sec_end) = section_ends(&full)[0];
    let sec_idx = full.ends.iter().position(|&e| e == sec_end).unwrap();
    assert!(
        sec_idx > raw_idx + 1,
        "records between the page and the section end"
    );
    let flip = raw_end - 100;

    let mut bad = s.bytes.clone();
    bad[flip] ^= 0x20;
    let f = parse_err(&bad);
    // Every record up to the section end is still returned, the page with
    // the corrupted byte: the corruption is only detected at the section end.
    assert_eq!(f.recs.len(), sec_idx);
    assert_eq!(f.recs[..raw_idx], s.recs[..raw_idx]);
    assert_ne!(f.recs[raw_idx], s.recs[raw_idx]);
    assert_eq!(f.recs[raw_idx + 1..], s.recs[raw_idx + 1..sec_idx]);

    let crc_at = sec_end as usize - 4;
    let found = u32::from_be_bytes(s.bytes[crc_at..sec_end as usize].try_into().unwrap());
    let computed = crc32fast::hash(&bad[..crc_at]);
    assert_ne!(found, computed);
    let e = &f.err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: s, found: fo, computed: c }
            if s == seq && fo == found && c == computed),
        "{e}"
    );
    assert_at(e, crc_at as u64, sec_idx as u64, Some("section end"));
}

#[test]
fn checksum_covers_each_section_separately() {
    // Flip a byte of the state blob, in the last section: the earlier
    // sections still verify, the last one fails.
    let s = small_sample();
    let full = parse_ok(&s.bytes);
    let secs = section_ends(&full);
    let state_idx = s
        .recs
        .iter()
        .position(|r| matches!(r, Rec::State(_)))
        .unwrap();
    let mut bad = s.bytes.clone();
    bad[full.ends[state_idx] as usize - 1] ^= 1;
    let f = parse_err(&bad);
    assert!(f.recs.contains(&Rec::SectionEnd { seq: 1 }));
    let (seq, end) = secs[2];
    let (_, start) = secs[1];
    let crc_at = end - 4;
    let computed = crc32fast::hash(&bad[start as usize..crc_at as usize]);
    assert!(
        matches!(f.err.kind, StreamErrorKind::Checksum { seq: s, computed: c, .. } if s == seq && c == computed),
        "{}",
        f.err
    );
    assert_eq!(f.err.offset, crc_at);
}

#[test]
fn checksum_field_and_seq_corruption() {
    let mut b = Builder::with_blocks();
    b.zero(Some(0), 0).section_end(0).end();
    let good = b.build();
    // Before the end record (tag + checksum) and the section checksum.
    let crc_at = good.len() - 5 - 4;
    // The checksum itself.
    let mut bad = good.clone();
    bad[crc_at + 3] ^= 0x01;
    let e = parse_err(&bad).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: 0, .. }),
        "{e}"
    );
    assert_at(&e, crc_at as u64, 2, Some("section end"));
    // The section number is covered by the checksum, which is checked first.
    let mut bad = good.clone();
    bad[crc_at - 1] ^= 0x01;
    let e = parse_err(&bad).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: 1, .. }),
        "{e}"
    );
    assert_at(&e, crc_at as u64, 2, Some("section end"));
    // A header flag too: the header belongs to the first section.
    let mut bad = good;
    bad[11] ^= FLAG_VERIFY as u8;
    let e = parse_err(&bad).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: 0, .. }),
        "{e}"
    );
}

#[test]
fn checksum_catches_a_dropped_record() {
    // Two sections; drop a whole record from the second: framing stays
    // valid, only the checksum notices.
    let mut b = Builder::with_blocks();
    b.zero(Some(0), 0).section_end(0);
    let cut_from = b.pos() as usize;
    b.zero(Some(1), 0);
    let cut_to = b.pos() as usize;
    b.zero(Some(0), P).section_end(1).end();
    let mut bytes = b.build();
    bytes.drain(cut_from..cut_to);
    let e = parse_err(&bytes).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: 1, .. }),
        "{e}"
    );
    assert_at(&e, bytes.len() as u64 - 9, 4, Some("section end"));
}

#[test]
fn end_checksum_covers_state_and_digest() {
    let mut b = Builder::with_blocks();
    b.zero(Some(0), 0)
        .section_end(0)
        .state(b"dev")
        .digest(&[7; 32])
        .end();
    let good = b.build();
    assert!(parse_ok(&good).recs.contains(&Rec::End));
    // A flipped byte in the device state passes framing but not the end checksum.
    let state_byte = good.len() - 5 - 34 - 1;
    let mut bad = good.clone();
    bad[state_byte] ^= 0x20;
    let e = parse_err(&bad).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: 1, .. }),
        "{e}"
    );
    assert_at(&e, good.len() as u64 - 4, 5, Some("end"));
    // A digest tag turned into an end tag can no longer end the stream early.
    let digest_tag = good.len() - 5 - 34;
    let mut bad = good;
    bad[digest_tag] = Kind::End as u8;
    assert!(parse_err(&bad).err.to_string().contains("checksum"));
}

#[test]
fn sequence() {
    // Skipping a number.
    let mut b = Builder::with_blocks();
    b.zero(Some(0), 0).section_end(0).zero(None, P);
    let at = b.pos() + 1;
    b.section_end(2).end();
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                found: 2,
                expected: 1
            }
        ),
        "{e}"
    );
    assert_at(&e, at, 4, Some("section end"));

    // Not starting at 0.
    let mut b = Builder::header(0);
    b.section_end(1).end();
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                found: 1,
                expected: 0
            }
        ),
        "{e}"
    );
    assert_at(&e, 17, 0, Some("section end"));

    // Repeating a number.
    let mut b = Builder::header(0);
    b.section_end(0).section_end(1);
    let at = b.pos() + 1;
    b.section_end(1).end();
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                found: 1,
                expected: 2
            }
        ),
        "{e}"
    );
    assert_at(&e, at, 2, Some("section end"));

    // Going back.
    let mut b = Builder::header(0);
    b.section_end(0).section_end(1).section_end(2);
    let at = b.pos() + 1;
    b.section_end(0).end();
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(
            e.kind,
            StreamErrorKind::Sequence {
                found: 0,
                expected: 3
            }
        ),
        "{e}"
    );
    assert_at(&e, at, 3, Some("section end"));
}

#[test]
fn after_end() {
    let s = small_sample();
    let mut bytes = s.bytes.clone();
    // Trailing bytes after the end record are never read.
    bytes.extend_from_slice(&[Kind::Zero as u8, 0xff, 0xff]);
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    let mut n = 0;
    while own(r.next_record().unwrap()) != Rec::End {
        n += 1;
    }
    assert_eq!(n + 1, s.recs.len());
    let end_record = r.record();
    for _ in 0..3 {
        let e = r.next_record().unwrap_err();
        assert!(matches!(e.kind, StreamErrorKind::AfterEnd), "{e}");
        assert_eq!(e.offset, s.bytes.len() as u64);
        assert_eq!(e.record, end_record);
        assert_eq!(r.offset(), s.bytes.len() as u64);
    }
}

#[test]
fn io_error_in_the_header_and_mid_record() {
    let e = parse_err_from_failing();
    assert!(matches!(e.kind, StreamErrorKind::Io(_)), "{e}");

    let mut b = Builder::with_blocks();
    b.raw(Some(0), 0, &page(1)).end();
    let bytes = b.build();
    let n = AFTER_BLOCKS as usize + 11 + 1000;
    let f = parse_from(FailAfter { data: &bytes[..n] }).unwrap_err();
    assert!(matches!(f.err.kind, StreamErrorKind::Io(_)), "{}", f.err);
    assert_at(&f.err, n as u64, 1, Some("raw page"));
}

// ---------------------------------------------------------------------------
// 3. Every single-byte corruption
// ---------------------------------------------------------------------------

#[test]
fn every_single_byte_corruption() {
    let s = small_sample();
    let orig = parse_ok(&s.bytes);
    let last_section_end = section_ends(&orig).last().unwrap().1;
    let mut caught = 0;
    for pos in 0..s.bytes.len() {
        for mask in [0xff, 0x01] {
            let mut bad = s.bytes.clone();
            bad[pos] ^= mask;
            let res = catch_unwind(AssertUnwindSafe(|| parse(&bad)))
                .unwrap_or_else(|_| panic!("reader panicked with byte {pos} ^ {mask:#04x}"));
            let (recs, ends) = match &res {
                Ok(p) => (&p.recs, &p.ends),
                Err(f) => (&f.recs, &f.ends),
            };
            // No section end is accepted once the corrupted byte was read.
            for (r, &end) in recs.iter().zip(ends) {
                if let Rec::SectionEnd { seq } = r {
                    assert!(
                        end <= pos as u64,
                        "byte {pos} ^ {mask:#04x}: section {seq} ending at {end} accepted"
                    );
                }
            }
            match &res {
                Ok(p) => {
                    assert!(
                        p.recs != orig.recs || p.flags != orig.flags,
                        "byte {pos} ^ {mask:#04x}: same parse"
                    );
                    assert!(p.offset <= bad.len() as u64);
                }
                Err(f) => {
                    assert!(f.err.offset <= bad.len() as u64, "byte {pos}: {}", f.err);
                    if (pos as u64) < last_section_end {
                        caught += 1;
                    }
                }
            }
        }
    }
    // Nearly every corruption inside a section is an error.
    assert!(caught as u64 >= 2 * last_section_end - 4, "{caught}");
}

// ---------------------------------------------------------------------------
// 4. Random input
// ---------------------------------------------------------------------------

/// Parses `input`, checking invariants that hold for any input.
fn check_any(input: &[u8], what: &str) {
    let res = catch_unwind(AssertUnwindSafe(|| parse(input)))
        .unwrap_or_else(|_| panic!("reader panicked on {what}"));
    match res {
        Ok(p) => assert!(p.offset <= input.len() as u64, "{what}"),
        Err(f) => {
            let e = &f.err;
            assert!(e.offset <= input.len() as u64, "{what}: {e}");
            if let StreamErrorKind::Truncated(_) = e.kind {
                assert_eq!(e.offset, input.len() as u64, "{what}: {e}");
            }
            // Display never panics either.
            assert!(e.to_string().starts_with("stream byte "));
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
    for i in 0..2000 {
        let len = rng.below(2000);
        let mut input = Vec::with_capacity(len + 64);
        if i % 2 == 1 {
            let flags = if rng.below(2) == 0 { 0 } else { FLAG_VERIFY };
            let mut b = Builder::header(flags);
            if i % 4 == 3 {
                // A valid block list too, so page records get further.
                b.blocks(BLOCKS);
            }
            input = b.build();
        }
        input.extend((0..len).map(|_| rng.byte()));
        check_any(&input, &format!("input {i}"));
    }
}

#[test]
fn random_mutations_of_a_valid_stream_never_panic() {
    let s = small_sample();
    let mut rng = XorShift::new(0x0123_4567_89ab_cdef);
    for i in 0..600 {
        let mut input = s.bytes.clone();
        for _ in 0..1 + rng.below(6) {
            match rng.below(4) {
                0 | 1 => {
                    let at = rng.below(input.len());
                    input[at] = rng.byte();
                }
                2 => {
                    let at = rng.below(input.len());
                    let n = rng.below(8).min(input.len() - at);
                    input.drain(at..at + n);
                }
                _ => {
                    let at = rng.below(input.len() + 1);
                    let junk: Vec<u8> = (0..rng.below(8)).map(|_| rng.byte()).collect();
                    input.splice(at..at, junk);
                }
            }
            if input.is_empty() {
                break;
            }
        }
        if rng.below(4) == 0 {
            let cut = rng.below(input.len() + 1);
            input.truncate(cut);
        }
        check_any(&input, &format!("mutation {i}"));
    }
}

// ---------------------------------------------------------------------------
// 5. Error messages
// ---------------------------------------------------------------------------

#[test]
fn display_names_the_byte_and_record() {
    let mut b = Builder::header(0);
    b.zero(Some(0), 0);
    let e = parse_err(&b.build()).err;
    assert_eq!(
        e.to_string(),
        "stream byte 17, record 0 (zero page): page record before the block list"
    );

    let mut b = Builder::header(0);
    b.u8(0x7f);
    let e = parse_err(&b.build()).err;
    assert_eq!(
        e.to_string(),
        "stream byte 16, record 0: unknown record tag 0x7f"
    );

    let e = parse_err(&Builder::custom_header(MAGIC, VERSION, 256, 0).build()).err;
    assert_eq!(
        e.to_string(),
        "stream byte 10, record 0 (header): unknown header flags 0x0100"
    );

    let mut b = Builder::with_blocks();
    b.zero(Some(1), 2 * P);
    let e = parse_err(&b.build()).err;
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("stream byte {}", AFTER_BLOCKS + 3)),
        "{msg}"
    );
    assert!(msg.contains("record 1 (zero page)"), "{msg}");
    assert!(msg.contains("'ram1'"), "{msg}");

    let mut b = Builder::with_blocks();
    b.xbzrle(Some(0), 0, &[1, 2]).section_end(0);
    let mut bytes = b.build();
    let crc_at = bytes.len() - 4;
    bytes[crc_at - 10] ^= 1; // the xbzrle payload
    let msg = parse_err(&bytes).err.to_string();
    assert!(
        msg.starts_with(&format!(
            "stream byte {crc_at}, record 2 (section end): section 0 checksum "
        )),
        "{msg}"
    );

    let msg = parse_err(&small_sample().bytes[..30]).err.to_string();
    assert!(
        msg.starts_with("stream byte 30, record 0 (block list): stream ends inside "),
        "{msg}"
    );
}

#[test]
fn channel_records_need_the_channels_flag_and_come_first() {
    // A channel record in a single-channel stream.
    let mut buf = Vec::new();
    let mut w = StreamWriter::new(&mut buf, 0);
    w.channel(0, 2, 1).unwrap();
    w.end().unwrap();
    drop(w);
    let mut r = StreamReader::new(&buf[..]).unwrap();
    let e = r.next_record().unwrap_err();
    assert!(
        matches!(e.kind, StreamErrorKind::NotChannelStream("channel")),
        "{e}"
    );

    // A channel stream must start with its channel record, once.
    let mut buf = Vec::new();
    let mut w = StreamWriter::new(&mut buf, FLAG_CHANNELS);
    w.sync(0).unwrap();
    w.end().unwrap();
    drop(w);
    let mut r = StreamReader::new(&buf[..]).unwrap();
    let e = r.next_record().unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::ChannelFirst), "{e}");

    let mut buf = Vec::new();
    let mut w = StreamWriter::new(&mut buf, FLAG_CHANNELS);
    w.channel(1, 2, 7).unwrap();
    w.channel(1, 2, 7).unwrap();
    w.flush().unwrap();
    drop(w);
    let mut r = StreamReader::new(&buf[..]).unwrap();
    assert_eq!(
        own(r.next_record().unwrap()),
        Rec::Channel {
            index: 1,
            channels: 2,
            session: 7
        }
    );
    let e = r.next_record().unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::ChannelTwice), "{e}");

    // Counts and indices in range.
    for (index, channels) in [(0, 1), (3, 2), (0, MAX_CHANNELS + 1)] {
        let mut buf = Vec::new();
        let mut w = StreamWriter::new(&mut buf, FLAG_CHANNELS);
        w.channel(index, channels, 7).unwrap();
        w.flush().unwrap();
        drop(w);
        let mut r = StreamReader::new(&buf[..]).unwrap();
        let e = r.next_record().unwrap_err();
        assert!(
            matches!(e.kind, StreamErrorKind::ChannelRange { .. }),
            "{index}/{channels}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------
// SETUP and ABORT records
// ---------------------------------------------------------------------------

fn one_block() -> Vec<BlockDesc> {
    vec![BlockDesc {
        id: "ram".into(),
        len: 4 * P,
    }]
}

#[test]
fn setup_record_round_trips_right_after_the_block_list() {
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.setup(4, 0).unwrap();
    w.section_end(0).unwrap();
    w.zero(0, P).unwrap();
    w.end().unwrap();
    let bytes = w.get_mut().clone();
    let p = parse(&bytes).expect("valid stream");
    assert_eq!(p.flags, FLAG_SETUP);
    assert_eq!(
        p.recs[1],
        Rec::Setup {
            vcpus: 4,
            features: 0,
            load: None
        }
    );
}

#[test]
fn setup_record_carries_the_guest_load_under_its_flag() {
    let stream = |flags: u16, load: Option<u32>| {
        let mut w = StreamWriter::new(Vec::new(), flags);
        w.block_list(&one_block()).unwrap();
        w.setup_with_load(2, 0, load).unwrap();
        w.section_end(0).unwrap();
        w.zero(0, P).unwrap();
        w.end().unwrap();
        w.get_mut().clone()
    };
    let setup = |bytes: &[u8]| parse(bytes).expect("valid stream").recs[1].clone();
    let both = FLAG_SETUP | FLAG_GUEST_LOAD;
    for load in [0, 100, 250, LOAD_UNKNOWN - 1] {
        assert_eq!(
            setup(&stream(both, Some(load))),
            Rec::Setup {
                vcpus: 2,
                features: 0,
                load: Some(load)
            }
        );
    }
    // Not known: the field says so, and the reader gives None.
    let unknown = stream(both, None);
    assert_eq!(
        setup(&unknown),
        Rec::Setup {
            vcpus: 2,
            features: 0,
            load: None
        }
    );
    // Without the flag the field is not written (and a load is dropped):
    // four bytes shorter, and the same stream as a plain setup.
    let plain = stream(FLAG_SETUP, Some(100));
    assert_eq!(plain.len() + 4, unknown.len());
    assert_eq!(
        setup(&plain),
        Rec::Setup {
            vcpus: 2,
            features: 0,
            load: None
        }
    );
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.setup(2, 0).unwrap();
    w.section_end(0).unwrap();
    w.zero(0, P).unwrap();
    w.end().unwrap();
    assert_eq!(w.get_mut().as_slice(), plain.as_slice());
    // A load cut short is a truncated setup record.
    let mut w = StreamWriter::new(Vec::new(), both);
    w.block_list(&one_block()).unwrap();
    w.setup(2, 0).unwrap();
    w.flush().unwrap();
    let mut bytes = w.get_mut().clone();
    bytes.truncate(bytes.len() - 2);
    let e = parse(&bytes).expect_err("truncated").err;
    assert!(e.to_string().contains("setup record"), "{e}");
}

#[test]
fn setup_records_out_of_place_are_refused() {
    let kind = |bytes: &[u8]| parse(bytes).expect_err("must fail").err.kind;
    // Without the header flag.
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&one_block()).unwrap();
    w.setup(1, 0).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::SetupOutOfPlace(m) if m.contains("does not announce")),
        "{k}"
    );
    // Before the block list.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.setup(1, 0).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::SetupOutOfPlace(m) if m.contains("right after")),
        "{k}"
    );
    // Twice.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.setup(1, 0).unwrap();
    w.setup(1, 0).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::SetupOutOfPlace("twice")),
        "{k}"
    );
    // Announced, missing from the first section.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.section_end(0).unwrap();
    let k = kind(w.get_mut());
    assert!(matches!(k, StreamErrorKind::SetupMissing), "{k}");
    // After a page.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.zero(0, 0).unwrap();
    w.setup(1, 0).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::SetupOutOfPlace(m) if m.contains("right after")),
        "{k}"
    );
    // Unknown feature bits.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.setup(1, 1 << 31).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::UnknownFeatures(0x8000_0000)),
        "{k}"
    );
    assert!(k.to_string().contains("0x80000000"), "{k}");
}

#[test]
fn abort_record_ends_the_stream_with_the_reason() {
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&one_block()).unwrap();
    w.zero(0, 0).unwrap();
    w.abort("migration cancelled").unwrap();
    let bytes = w.get_mut().clone();
    let p = parse(&bytes).expect("an aborted stream parses up to its abort");
    assert_eq!(
        p.recs.last(),
        Some(&Rec::Abort("migration cancelled".into()))
    );
    // Nothing may follow.
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    while !matches!(r.next_record().unwrap(), Record::Abort(_)) {}
    assert!(matches!(
        r.next_record().unwrap_err().kind,
        StreamErrorKind::AfterEnd
    ));
    // A long reason is cut at a character boundary, an empty one named.
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.abort(&"é".repeat(2000)).unwrap();
    let p = parse(w.get_mut()).unwrap();
    let Rec::Abort(t) = &p.recs[0] else {
        panic!("{:?}", p.recs)
    };
    assert_eq!(t.len(), usize::from(MAX_ABORT_TEXT));
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.abort("").unwrap();
    let p = parse(w.get_mut()).unwrap();
    assert_eq!(p.recs[0], Rec::Abort("no reason given".into()));
    // A zero or oversized length is refused.
    for len in [0u16, MAX_ABORT_TEXT + 1] {
        let mut w = StreamWriter::new(Vec::new(), 0);
        w.flush().unwrap();
        let mut b = w.get_mut().clone();
        b.push(Kind::Abort as u8);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&vec![b'x'; usize::from(len)]);
        let k = parse(&b).expect_err("bad length").err.kind;
        assert!(
            matches!(
                k,
                StreamErrorKind::BadLength {
                    what: "abort reason",
                    ..
                }
            ),
            "{k}"
        );
    }
}

// ---------------------------------------------------------------------------
// DRAIN records
// ---------------------------------------------------------------------------

/// A stream with the setup section, `marks` drain marks (each ending a
/// section after a page), and the end.
fn with_marks(marks: &[u64]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.setup(1, 0).unwrap();
    w.section_end(0).unwrap();
    for (i, &m) in marks.iter().enumerate() {
        w.zero(0, (i as u64 % 4) * P).unwrap();
        w.drain(m).unwrap();
        w.section_end(i as u64 + 1).unwrap();
    }
    w.end().unwrap();
    w.get_mut().clone()
}

#[test]
fn drain_marks_round_trip_in_order() {
    let p = parse_ok(&with_marks(&[1, 2, 3]));
    let marks: Vec<u64> = p
        .recs
        .iter()
        .filter_map(|r| match r {
            Rec::Drain { mark } => Some(*mark),
            _ => None,
        })
        .collect();
    assert_eq!(marks, [1, 2, 3]);
}

#[test]
fn drain_marks_out_of_order_or_out_of_place_are_refused() {
    // Marks count 1, 2, 3...: a repeat, a gap or a first mark of 0 is
    // refused, at the mark's field.
    for (marks, found, expected) in [(&[1, 1][..], 1, 2), (&[1, 3], 3, 2), (&[0], 0, 1)] {
        let f = parse_err(&with_marks(marks));
        assert!(
            matches!(f.err.kind, StreamErrorKind::DrainMark { found: a, expected: b } if a == found && b == expected),
            "{marks:?}: {}",
            f.err
        );
        assert_eq!(f.err.what, Some("drain mark"));
        assert!(f
            .err
            .to_string()
            .contains(&format!("drain mark {found} where {expected} was expected")));
    }
    let kind = |bytes: &[u8]| parse(bytes).expect_err("must fail").err.kind;
    // Without a return path (no FLAG_SETUP): nobody could answer it.
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&one_block()).unwrap();
    w.drain(1).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::DrainOutOfPlace(m) if m.contains("no return path")),
        "{k}"
    );
    // On a page channel.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP | FLAG_CHANNELS);
    w.channel(1, 2, 7).unwrap();
    w.block_list(&one_block()).unwrap();
    w.section_end(0).unwrap();
    w.drain(1).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::DrainOutOfPlace("on a page channel")),
        "{k}"
    );
    // After the postcopy switch: the source drains only before it.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&one_block()).unwrap();
    w.setup(1, 0).unwrap();
    w.section_end(0).unwrap();
    w.postcopy().unwrap();
    w.section_end(1).unwrap();
    w.drain(1).unwrap();
    w.flush().unwrap();
    let k = kind(w.get_mut());
    assert!(
        matches!(k, StreamErrorKind::DrainOutOfPlace(m) if m.contains("postcopy")),
        "{k}"
    );
    // Cut inside the mark: the stream ends END (5 bytes), SECTION_END
    // (13), DRAIN (9): keep 4 of the mark's 8 bytes.
    let b = with_marks(&[1]);
    let cut = b.len() - 5 - 13 - 4;
    let f = parse_err(&b[..cut]);
    assert!(
        matches!(f.err.kind, StreamErrorKind::Truncated(_)),
        "{}",
        f.err
    );
}

// ---------------------------------------------------------------------------
// Zero runs
// ---------------------------------------------------------------------------

/// A ZERO_RUN record: tag, address, page count.
fn zero_run(b: &mut Builder, block: Option<u16>, offset: u64, pages: u32) -> &mut Builder {
    b.addr(Kind::ZeroRun, block, offset).u32(pages)
}

#[test]
fn zero_runs_round_trip_and_split_at_the_largest_run() {
    let max = u64::from(MAX_ZERO_RUN_PAGES);
    let blocks = descs(&[("ram", (2 * max + 5) * P), ("rom", 4 * P)]);
    let mut w = StreamWriter::new(Vec::new(), FLAG_ZERO_RUNS);
    w.block_list(&blocks).unwrap();
    // One page is a ZERO record; longer runs one ZERO_RUN each, cut at
    // the largest run; the same-block flag as for any page record.
    w.zero_run(0, 0, 1).unwrap();
    w.zero_run(0, P, 3).unwrap();
    w.zero_run(1, 0, 4).unwrap();
    w.zero_run(0, 4 * P, 2 * max + 1).unwrap();
    w.zero_run(0, 0, 0).unwrap();
    w.section_end(0).unwrap();
    w.end().unwrap();
    let bytes = std::mem::take(w.get_mut());
    let p = parse_ok(&bytes);
    assert_eq!(p.flags, FLAG_ZERO_RUNS);
    let run = |block, offset, pages| Rec::ZeroRun {
        block,
        offset,
        pages,
    };
    assert_eq!(
        p.recs,
        vec![
            Rec::BlockList(blocks.clone()),
            Rec::Zero {
                block: 0,
                offset: 0
            },
            run(0, P, 3),
            run(1, 0, 4),
            run(0, 4 * P, MAX_ZERO_RUN_PAGES),
            run(0, (4 + max) * P, MAX_ZERO_RUN_PAGES),
            Rec::Zero {
                block: 0,
                offset: (4 + 2 * max) * P
            },
            Rec::SectionEnd { seq: 0 },
            Rec::End,
        ]
    );
    // Header, block list, ZERO 11 (with its block), ZERO_RUN 13 (same
    // block), 15 (block 1), 15 (block 0 again) and 13, ZERO 9, section
    // end 13, end 5.
    let list = 1 + 4 + 8 + (1 + 3 + 8) * 2;
    assert_eq!(
        bytes.len(),
        HEADER_LEN + list + 11 + 13 + 15 + 15 + 13 + 9 + 13 + 5
    );
}

#[test]
fn without_the_flag_the_writer_sends_one_zero_record_per_page() {
    let blocks = descs(&[("ram", 8 * P)]);
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&blocks).unwrap();
    w.zero_run(0, 2 * P, 3).unwrap();
    w.end().unwrap();
    let p = parse_ok(&std::mem::take(w.get_mut()));
    let zeros: Vec<Rec> = (2..5)
        .map(|i| Rec::Zero {
            block: 0,
            offset: i * P,
        })
        .collect();
    assert_eq!(&p.recs[1..4], &zeros[..]);
    assert_eq!(p.recs[4], Rec::End);
}

#[test]
fn zero_run_bounds_are_checked_before_it_is_returned() {
    // BLOCKS: ram0 of 4 pages, ram1 of 2. Up to the block's end is fine.
    let mut b = Builder::header(FLAG_ZERO_RUNS);
    b.blocks(BLOCKS);
    zero_run(&mut b, Some(0), P, 3);
    zero_run(&mut b, Some(1), 0, 2);
    zero_run(&mut b, None, P, 1);
    b.end();
    let p = parse_ok(&b.build());
    assert_eq!(
        p.recs[1..4],
        [
            Rec::ZeroRun {
                block: 0,
                offset: P,
                pages: 3
            },
            Rec::ZeroRun {
                block: 1,
                offset: 0,
                pages: 2
            },
            Rec::ZeroRun {
                block: 1,
                offset: P,
                pages: 1
            },
        ]
    );

    // Past the block's end: the error points at the count.
    for (block, offset, pages) in [(0u16, 0u64, 5u32), (0, 3 * P, 2), (1, P, 2), (1, 0, 3)] {
        let mut b = Builder::header(FLAG_ZERO_RUNS);
        b.blocks(BLOCKS);
        let at = b.pos() + 11;
        zero_run(&mut b, Some(block), offset, pages);
        let e = parse_err(&b.build()).err;
        let (id, len) = BLOCKS[usize::from(block)];
        assert!(
            matches!(&e.kind, StreamErrorKind::ZeroRunPastBlock { block: b, offset: o, pages: n, len: l }
                if b == id && *o == offset && *n == u64::from(pages) && *l == len),
            "{e}"
        );
        assert_at(&e, at, 1, Some("zero run"));
    }

    // A count of 0 or above the largest run.
    for pages in [0, MAX_ZERO_RUN_PAGES + 1, u32::MAX] {
        let mut b = Builder::header(FLAG_ZERO_RUNS);
        b.blocks(BLOCKS);
        let at = b.pos() + 11;
        zero_run(&mut b, Some(0), 0, pages);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(e.kind, StreamErrorKind::BadLength { what: "zero run", len, min: 1, max }
                if len == u64::from(pages) && max == u64::from(MAX_ZERO_RUN_PAGES)),
            "{e}"
        );
        assert_at(&e, at, 1, Some("zero run"));
    }

    // The start outside the block, as for any page record.
    let mut b = Builder::header(FLAG_ZERO_RUNS);
    b.blocks(BLOCKS);
    zero_run(&mut b, Some(1), 2 * P, 1);
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::BadOffset { .. }), "{e}");

    // Cut inside the count.
    let mut b = Builder::header(FLAG_ZERO_RUNS);
    b.blocks(BLOCKS);
    b.addr(Kind::ZeroRun, Some(0), 0).u16(0);
    let e = parse_err(&b.build()).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Truncated("a zero run")),
        "{e}"
    );
}

#[test]
fn zero_runs_need_the_flag_and_end_at_the_postcopy_switch() {
    // Without the header flag.
    let mut b = Builder::with_blocks();
    let at = b.pos();
    zero_run(&mut b, Some(0), 0, 2);
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::NotZeroRunStream), "{e}");
    assert_at(&e, at, 1, Some("zero run"));

    // After POSTCOPY: pages are placed one by one there.
    let mut b = Builder::header(FLAG_ZERO_RUNS);
    b.blocks(BLOCKS);
    zero_run(&mut b, Some(0), 0, 2);
    b.tag(Kind::Postcopy, false).section_end(0);
    let at = b.pos();
    zero_run(&mut b, Some(0), 2 * P, 2);
    let f = parse_err(&b.build());
    assert!(
        matches!(f.err.kind, StreamErrorKind::ZeroRunAfterPostcopy),
        "{}",
        f.err
    );
    assert_at(&f.err, at, 4, Some("zero run"));
    assert_eq!(f.recs.len(), 4, "the run before the switch was read");
}

// ---------------------------------------------------------------------------
// Runs of raw pages (FLAG_RUNS)
// ---------------------------------------------------------------------------

/// The RUN records of `bytes` as (block, offset, pages), read with runs
/// handed out whole and landed into `mem` (whose blocks are the stream's).
fn land_all<R: Read>(
    input: R,
    mem: &dyn crate::memory::GuestMemory,
) -> Result<Vec<(u16, u64, u16)>, StreamError> {
    let mut r = StreamReader::new(input)?;
    r.landing_runs(true);
    let mut runs = Vec::new();
    loop {
        let rec = r.next_record()?;
        match rec {
            Record::Run {
                block,
                offset,
                pages,
            } => {
                runs.push((block, offset, pages));
                let region = mem.blocks()[usize::from(block)].region().clone();
                r.land_run(&region, offset as usize)?;
            }
            Record::Raw {
                block,
                offset,
                data,
            } => {
                let region = mem.blocks()[usize::from(block)].region();
                assert!(region.write(offset as usize, data));
            }
            Record::End => return Ok(runs),
            _ => {}
        }
    }
}

fn runs_mem() -> crate::memory::ProcessMemory {
    crate::memory::ProcessMemory::new(&[("ram0", 4 * P), ("ram1", 2 * P)]).unwrap()
}

fn mem_bytes(mem: &dyn crate::memory::GuestMemory, block: usize) -> Vec<u8> {
    let r = mem.blocks()[block].region();
    let mut v = vec![0u8; r.len()];
    assert!(r.read(0, &mut v));
    v
}

/// A stream with runs: block 0 pages 0..=2 raw (one run), page 3 zero,
/// block 1 pages 0..=1 (one run), a staged page dropped in between.
fn runs_stream() -> (Vec<u8>, Vec<Rec>) {
    let mut w = StreamWriter::new(Vec::new(), FLAG_RUNS);
    w.block_list(&descs(BLOCKS)).unwrap();
    let mut want = vec![Rec::BlockList(descs(BLOCKS))];
    for i in 0..3u64 {
        w.raw(0, i * P, &page(i as u8)).unwrap();
        want.push(Rec::Raw {
            block: 0,
            offset: i * P,
            data: page(i as u8),
        });
    }
    w.zero(0, 3 * P).unwrap();
    want.push(Rec::Zero {
        block: 0,
        offset: 3 * P,
    });
    w.raw(1, 0, &page(10)).unwrap();
    // A page staged and dropped does not end the run.
    w.stage_page(1, P).fill(0xee);
    w.discard_staged();
    w.raw(1, P, &page(11)).unwrap();
    want.push(Rec::Raw {
        block: 1,
        offset: 0,
        data: page(10),
    });
    want.push(Rec::Raw {
        block: 1,
        offset: P,
        data: page(11),
    });
    w.section_end(0).unwrap();
    want.push(Rec::SectionEnd { seq: 0 });
    w.end().unwrap();
    want.push(Rec::End);
    (std::mem::take(w.get_mut()), want)
}

#[test]
fn runs_read_as_raw_pages_by_a_reader_not_landing_them() {
    let (bytes, want) = runs_stream();
    let p = parse_ok(&bytes);
    assert_eq!(p.flags, FLAG_RUNS);
    assert_eq!(p.recs, want);
    // Two RUN headers instead of five RAW ones: 5 pages, 2 * (addr + count).
    let blocks_len = BLOCKS_LEN as usize;
    let run_hdr = 1 + 2 + 8 + 2;
    let expected = HEADER_LEN
        + blocks_len
        + run_hdr
        + 3 * PAGE_SIZE
        + (1 + 8)
        + run_hdr
        + 2 * PAGE_SIZE
        + 13
        + 5;
    assert_eq!(bytes.len(), expected);
    // Through a trickle too (runs split across reads).
    for chunk in [1, 7, 4096, 5000] {
        let t = Trickle {
            data: &bytes,
            chunk,
            interrupt: false,
        };
        let p = parse_from(t).unwrap_or_else(|f| panic!("chunk {chunk}: {}", f.err));
        assert_eq!(p.recs, want, "chunk {chunk}");
    }
}

#[test]
fn runs_land_in_place_through_any_transport() {
    let (bytes, _) = runs_stream();
    for chunk in [1, 13, 4095, 5000, 1 << 20] {
        let mem = runs_mem();
        let t = Trickle {
            data: &bytes,
            chunk,
            interrupt: false,
        };
        let runs = land_all(t, &mem).unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
        assert_eq!(runs, vec![(0, 0, 3), (1, 0, 2)], "chunk {chunk}");
        let b0 = mem_bytes(&mem, 0);
        for i in 0..3 {
            assert_eq!(&b0[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], &page(i as u8)[..]);
        }
        assert!(b0[3 * PAGE_SIZE..].iter().all(|&x| x == 0));
        let b1 = mem_bytes(&mem, 1);
        assert_eq!(&b1[..PAGE_SIZE], &page(10)[..]);
        assert_eq!(&b1[PAGE_SIZE..], &page(11)[..]);
    }
}

#[test]
fn writer_caps_runs_and_cuts_them_at_gaps_blocks_and_other_records() {
    let big = descs(&[("big", 200 * P), ("b", 4 * P)]);
    let mut w = StreamWriter::new(Vec::new(), FLAG_RUNS);
    w.block_list(&big).unwrap();
    for i in 0..70u64 {
        w.raw(0, i * P, &page(i as u8)).unwrap();
    }
    // A gap, then another block, then back.
    w.raw(0, 80 * P, &page(1)).unwrap();
    w.raw(1, P, &page(2)).unwrap();
    w.raw(0, 81 * P, &page(3)).unwrap();
    // An encoded record ends the run.
    w.encoded(Encoded::Xbzrle, 0, 82 * P, &[0, 1, 7]).unwrap();
    w.raw(0, 83 * P, &page(4)).unwrap();
    // The postcopy switch ends runs for good: RAW records after it.
    w.postcopy().unwrap();
    w.section_end(0).unwrap();
    w.raw(0, 84 * P, &page(5)).unwrap();
    w.raw(0, 85 * P, &page(6)).unwrap();
    w.section_end(1).unwrap();
    w.end().unwrap();
    let bytes = std::mem::take(w.get_mut());
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.landing_runs(true);
    let mut runs = Vec::new();
    let mut raws = Vec::new();
    let mut scratch = vec![0u8; 200 * PAGE_SIZE];
    loop {
        match r.next_record().unwrap() {
            Record::Run {
                block,
                offset,
                pages,
            } => {
                runs.push((block, offset / P, pages));
                // Not landing: the pages come as raw records instead.
                for k in 0..u64::from(pages) {
                    match r.next_record().unwrap() {
                        Record::Raw {
                            block: b,
                            offset: o,
                            data,
                        } => {
                            assert_eq!((b, o), (block, offset + k * P));
                            if b == 0 {
                                scratch[o as usize..o as usize + PAGE_SIZE].copy_from_slice(data);
                            }
                        }
                        other => panic!("page {k} of a run: {other:?}"),
                    }
                }
            }
            Record::Raw { block, offset, .. } => raws.push((block, offset / P)),
            Record::End => break,
            _ => {}
        }
    }
    assert_eq!(
        runs,
        vec![
            (0, 0, MAX_RUN_PAGES),
            (0, 64, 70 - MAX_RUN_PAGES),
            (0, 80, 1),
            (1, 1, 1),
            (0, 81, 1),
            (0, 83, 1)
        ]
    );
    assert_eq!(raws, vec![(0, 84), (0, 85)], "no runs after the switch");
    for i in 0..70 {
        assert!(
            scratch[i * PAGE_SIZE..(i + 1) * PAGE_SIZE] == page(i as u8)[..],
            "page {i}"
        );
    }
}

/// A crafted RUN record (tag, address, count, pages).
fn run_rec(b: &mut Builder, block: Option<u16>, offset: u64, pages: &[Vec<u8>]) {
    b.addr(Kind::Run, block, offset).u16(pages.len() as u16);
    for p in pages {
        b.bytes(p);
    }
}

#[test]
fn runs_are_checked_before_any_byte_lands() {
    // Past the block's end: block 1 has 2 pages, a run of 2 at page 1.
    let mut b = Builder::header(FLAG_RUNS);
    b.blocks(BLOCKS);
    let at = b.pos();
    run_rec(&mut b, Some(1), P, &[page(1), page(2)]);
    b.section_end(0).end();
    let mem = runs_mem();
    let e = land_all(&b.build()[..], &mem).unwrap_err();
    assert!(
        matches!(e.kind, StreamErrorKind::RunPastBlock { pages: 2, offset, len, .. } if offset == P && len == 2 * P),
        "{e}"
    );
    assert_at(&e, at + 11, 1, Some("run of raw pages"));
    assert!(mem_bytes(&mem, 1).iter().all(|&x| x == 0), "nothing landed");
    assert!(e.to_string().contains("'ram1'"), "{e}");

    // Counts 0 and MAX_RUN_PAGES + 1.
    for count in [0u16, MAX_RUN_PAGES + 1] {
        let mut b = Builder::header(FLAG_RUNS);
        b.blocks(BLOCKS);
        b.addr(Kind::Run, Some(0), 0).u16(count);
        let e = parse_err(&b.build()).err;
        assert!(
            matches!(
                e.kind,
                StreamErrorKind::BadLength {
                    what: "run pages",
                    ..
                }
            ),
            "{e}"
        );
    }

    // Without the header flag.
    let mut b = Builder::with_blocks();
    let at = b.pos();
    run_rec(&mut b, Some(0), 0, &[page(1)]);
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::NotRunStream), "{e}");
    assert_at(&e, at, 1, Some("run of raw pages"));

    // After the postcopy switch.
    let mut b = Builder::header(FLAG_RUNS);
    b.blocks(BLOCKS);
    b.tag(Kind::Postcopy, false).section_end(0);
    let at = b.pos();
    run_rec(&mut b, Some(0), 0, &[page(1)]);
    let e = parse_err(&b.build()).err;
    assert!(matches!(e.kind, StreamErrorKind::RunAfterPostcopy), "{e}");
    assert_eq!(e.offset, at);

    // Landing into memory smaller than the run (a caller's mismatch).
    let mut b = Builder::header(FLAG_RUNS);
    b.blocks(BLOCKS);
    run_rec(&mut b, Some(0), 0, &[page(1), page(2), page(3)]);
    let bytes = b.build();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    r.landing_runs(true);
    r.next_record().unwrap();
    assert!(matches!(
        r.next_record().unwrap(),
        Record::Run { pages: 3, .. }
    ));
    use crate::memory::GuestMemory;
    let small = crate::memory::ProcessMemory::single(2 * P).unwrap();
    let e = r.land_run(small.blocks()[0].region(), 0).unwrap_err();
    assert!(
        matches!(e.kind, StreamErrorKind::RunPastBlock { .. }),
        "{e}"
    );
    assert!(
        mem_bytes(&small, 0).iter().all(|&x| x == 0),
        "nothing landed"
    );
}

#[test]
fn a_corrupt_or_cut_run_fails_at_its_checksum_or_its_end() {
    let (bytes, _) = runs_stream();
    // A byte inside the first run's second page.
    let first_page = HEADER_LEN + BLOCKS_LEN as usize + 13;
    let mut bad = bytes.clone();
    bad[first_page + PAGE_SIZE + 100] ^= 0x40;
    for chunk in [1 << 20, 4096] {
        let t = Trickle {
            data: &bad,
            chunk,
            interrupt: false,
        };
        let e = land_all(t, &runs_mem()).unwrap_err();
        assert!(
            matches!(e.kind, StreamErrorKind::Checksum { seq: 0, .. }),
            "chunk {chunk}: {e}"
        );
    }
    // Cut inside the run.
    let cut = &bytes[..first_page + PAGE_SIZE + 100];
    let e = land_all(cut, &runs_mem()).unwrap_err();
    assert!(
        matches!(e.kind, StreamErrorKind::Truncated("a run of raw pages")),
        "{e}"
    );
    assert_eq!(e.offset, cut.len() as u64);
    // A failing transport inside the run.
    let e = land_all(FailAfter { data: cut }, &runs_mem()).unwrap_err();
    assert!(matches!(e.kind, StreamErrorKind::Io(_)), "{e}");
    // Not landing: the same errors.
    let e = parse_err(&bad).err;
    assert!(
        matches!(e.kind, StreamErrorKind::Checksum { seq: 0, .. }),
        "{e}"
    );
}
