//! Reads and validates the migration stream.
//!
//! Every field is checked before it is used: lengths against fixed bounds,
//! blocks against the block list, offsets against the block's length,
//! section checksums against the bytes read. Input lands in one buffer of
//! fixed size, so no allocation follows a length the stream claims (the
//! device-state blob grows only as its bytes actually arrive).

use std::io::{self, Read};

use super::crc;
use super::format::*;
use super::writer::BlockDesc;
use crate::memory::{RawRegion, PAGE_SIZE};

/// What was wrong with a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamErrorKind {
    /// The transport failed.
    #[error("read failed: {0}")]
    Io(#[source] io::Error),
    /// The stream stopped in the middle of a field.
    #[error("stream ends inside {0}")]
    Truncated(&'static str),
    /// Not a livemig stream.
    #[error("bad magic {0:02x?}: not a livemig stream")]
    BadMagic([u8; 8]),
    /// A version this build cannot read.
    #[error("stream version {0} is not supported (this build reads version {VERSION})")]
    Version(u16),
    /// Header flags this build does not know.
    #[error("unknown header flags {0:#06x}")]
    HeaderFlags(u16),
    /// Reserved header bytes not zero.
    #[error("reserved header field is {0:#x}, must be 0")]
    Reserved(u32),
    /// Unknown record tag.
    #[error("unknown record tag {0:#04x}")]
    UnknownTag(u8),
    /// The same-block flag on a record that has no block.
    #[error("same-block flag set on a {0} record")]
    SameBlockOnNonPage(&'static str),
    /// The same-block flag before any page record named a block.
    #[error("same-block flag on the first page record")]
    SameBlockFirst,
    /// A page record before the block list.
    #[error("page record before the block list")]
    NoBlockList,
    /// A second block list.
    #[error("second block list")]
    BlockListTwice,
    /// Block list with a bad count.
    #[error("block list declares {0} blocks (1..={MAX_BLOCKS} allowed)")]
    BlockCount(u32),
    /// Bad block id.
    #[error("block {index}: id is empty or not UTF-8")]
    BlockId {
        /// Position in the list.
        index: u32,
    },
    /// Two blocks with one id.
    #[error("block id '{0}' appears twice")]
    BlockIdTwice(String),
    /// Block length zero or not page-aligned.
    #[error("block '{id}': length {len} is not a non-zero multiple of {PAGE_SIZE}")]
    BlockLength {
        /// Block id.
        id: String,
        /// Length claimed.
        len: u64,
    },
    /// Declared total differs from the sum of the blocks.
    #[error("block list total {declared} differs from the sum of its blocks {sum}")]
    BlockTotal {
        /// Total in the record.
        declared: u64,
        /// Sum of lengths.
        sum: u64,
    },
    /// A block index past the list.
    #[error("block index {index} is not in the block list ({count} blocks)")]
    UnknownBlock {
        /// Index in the record.
        index: u16,
        /// Blocks in the list.
        count: usize,
    },
    /// Offset outside the block or not page-aligned.
    #[error("offset {offset:#x} is not a page inside block '{block}' of {len:#x} bytes")]
    BadOffset {
        /// Block id.
        block: String,
        /// Offset claimed.
        offset: u64,
        /// Block length.
        len: u64,
    },
    /// A payload length outside its bounds.
    #[error("{what} length {len} outside {min}..={max}")]
    BadLength {
        /// Which length.
        what: &'static str,
        /// Length claimed.
        len: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// Unknown compression algorithm.
    #[error("unknown compression algorithm {0}")]
    CompressionAlgo(u8),
    /// Unknown digest algorithm.
    #[error("unknown digest algorithm {0}")]
    DigestAlgo(u8),
    /// Section checksum mismatch: bytes were corrupted or lost.
    #[error("section {seq} checksum {found:#010x} but the bytes read give {computed:#010x}")]
    Checksum {
        /// Section number.
        seq: u64,
        /// Checksum in the stream.
        found: u32,
        /// Checksum of what was read.
        computed: u32,
    },
    /// Section numbers out of order.
    #[error("section number {found} where {expected} was expected")]
    Sequence {
        /// Number in the stream.
        found: u64,
        /// Number expected.
        expected: u64,
    },
    /// A record after the end record.
    #[error("read past the end record")]
    AfterEnd,
    /// A channel or sync record in a single-channel stream.
    #[error("{0} record in a stream whose header does not declare channels")]
    NotChannelStream(&'static str),
    /// A channel stream whose first record is not its channel record.
    #[error("a channel stream must start with its channel record")]
    ChannelFirst,
    /// A channel record that is not the first record.
    #[error("channel record after the first record")]
    ChannelTwice,
    /// Channel index or count out of range.
    #[error("channel {index} of {channels}: the count must be 2..={MAX_CHANNELS} and the index at most the count")]
    ChannelRange {
        /// Index claimed (0 = main).
        index: u16,
        /// Page channels claimed.
        channels: u16,
    },
    /// A DISCARD record whose words fall outside its block's bitmap, or
    /// that marks pages past the block's end.
    #[error("discard of words {first}..{end} in block '{block}': the block's bitmap has {words} words ({pages} pages)")]
    DiscardRange {
        /// Block id.
        block: String,
        /// First word claimed.
        first: u64,
        /// One past the last word claimed.
        end: u64,
        /// Words in the block's bitmap.
        words: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A second postcopy switch record.
    #[error("a second postcopy switch record")]
    PostcopyTwice,
    /// A SETUP record out of place: without the header flag, twice, on a
    /// page channel, or not right after the block list.
    #[error("setup record {0}")]
    SetupOutOfPlace(&'static str),
    /// The header promises a SETUP record and the first section has none.
    #[error("the header announces a setup record but the first section ends without one")]
    SetupMissing,
    /// SETUP feature bits this build does not know.
    #[error("the source needs features {0:#010x} this build does not know")]
    UnknownFeatures(u32),
    /// A DRAIN record out of place: without a return path (the header
    /// flag), on a page channel, or after the postcopy switch.
    #[error("drain mark {0}")]
    DrainOutOfPlace(&'static str),
    /// Drain marks out of order (1, 2, 3... expected).
    #[error("drain mark {found} where {expected} was expected")]
    DrainMark {
        /// Mark in the stream.
        found: u64,
        /// Mark expected.
        expected: u64,
    },
    /// A ZERO_RUN record in a stream whose header does not declare them.
    #[error("zero run record in a stream whose header does not declare zero runs")]
    NotZeroRunStream,
    /// A ZERO_RUN record after the postcopy switch (pages are placed one
    /// by one once the guest runs here).
    #[error("zero run record after the postcopy switch")]
    ZeroRunAfterPostcopy,
    /// A ZERO_RUN record whose pages go past the end of its block.
    #[error("zero run of {pages} pages at {offset:#x} goes past the end of block '{block}' of {len:#x} bytes")]
    ZeroRunPastBlock {
        /// Block id.
        block: String,
        /// Offset of the run's first page.
        offset: u64,
        /// Pages in the run.
        pages: u64,
        /// Block length.
        len: u64,
    },
    /// A RUN record in a stream whose header does not declare runs.
    #[error("run record in a stream whose header does not declare runs")]
    NotRunStream,
    /// A RUN record after the postcopy switch (pages must be placed whole
    /// once the guest runs here).
    #[error("run record after the postcopy switch")]
    RunAfterPostcopy,
    /// A RUN record whose pages go past the end of its block (or of the
    /// memory it was to land in).
    #[error("run of {pages} pages at {offset:#x} goes past the end of block '{block}' of {len:#x} bytes")]
    RunPastBlock {
        /// Block id.
        block: String,
        /// Offset of the run's first page.
        offset: u64,
        /// Pages in the run.
        pages: u64,
        /// Block length.
        len: u64,
    },
    /// Sync epochs out of order.
    #[error("sync epoch {found} where {expected} was expected")]
    SyncEpoch {
        /// Epoch in the stream.
        found: u64,
        /// Epoch expected.
        expected: u64,
    },
}

/// A stream error with where it happened.
#[derive(Debug, thiserror::Error)]
#[error("stream byte {offset}, record {record}{}: {kind}", what.map(|w| format!(" ({w})")).unwrap_or_default())]
pub struct StreamError {
    /// Byte offset in the stream of the field that failed.
    pub offset: u64,
    /// Index of the record (0 = first after the header).
    pub record: u64,
    /// Kind of the record, once known.
    pub what: Option<&'static str>,
    /// What was wrong.
    pub kind: StreamErrorKind,
}

/// One validated record, holding its bytes as `B` (pages, state,
/// discard words), the block list as `L` and the abort reason as `T`:
/// the reader hands out [`Record`]s, which borrow its buffers;
/// [`Record::to_owned_record`] copies one into an [`OwnedRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordOf<B, L, T> {
    /// The block list (also kept by the reader).
    BlockList(L),
    /// A zero page.
    Zero {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
    },
    /// A run of zero pages, checked to lie inside the block.
    ZeroRun {
        /// Block index.
        block: u16,
        /// Byte offset of the run's first page in the block.
        offset: u64,
        /// Pages in the run (1..=[`MAX_ZERO_RUN_PAGES`]).
        pages: u32,
    },
    /// A raw page (4096 bytes).
    Raw {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
        /// Page contents.
        data: B,
    },
    /// An XBZRLE delta (not yet decoded).
    Xbzrle {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
        /// Encoded delta.
        data: B,
    },
    /// A compressed page (not yet decompressed).
    Compressed {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
        /// Algorithm id.
        algo: u8,
        /// Compressed bytes.
        data: B,
    },
    /// End of a section whose checksum matched.
    SectionEnd {
        /// Section number.
        seq: u64,
    },
    /// Device-state blob.
    State(B),
    /// BLAKE3 digest of guest memory.
    Digest([u8; 32]),
    /// End of migration.
    End,
    /// Which channel this stream is (first record of a channel stream).
    Channel {
        /// 0 = main channel, 1..=channels = page channels.
        index: u16,
        /// Number of page channels.
        channels: u16,
        /// Number shared by all streams of one migration.
        session: u64,
    },
    /// Barrier: records after it belong to later epochs.
    Sync {
        /// Epoch number, 0, 1, 2... on every stream.
        epoch: u64,
    },
    /// Pages the destination must drop at the postcopy switch: `words`
    /// (big-endian u64s) of block `block`'s bitmap from word `first_word`,
    /// checked to lie inside the block.
    Discard {
        /// Block index.
        block: u16,
        /// First bitmap word.
        first_word: u32,
        /// The words, 8 big-endian bytes each.
        words: B,
    },
    /// The switch to postcopy.
    Postcopy,
    /// The VM's shape (header flag `FLAG_SETUP`): checked by the
    /// destination before any page.
    Setup {
        /// vCPU count (0: not said).
        vcpus: u32,
        /// Feature bits, all known to this build.
        features: u32,
        /// How busy the source's vCPUs were as the migration started, in
        /// hundredths of a vCPU (header flag `FLAG_GUEST_LOAD`; `None`
        /// without it or when the source did not know).
        load: Option<u32>,
    },
    /// The source gave up; its reason (UTF-8, lossily decoded). Nothing
    /// follows: a further read fails.
    Abort(T),
    /// A run of raw pages whose bytes have not been read yet (only with
    /// [`StreamReader::landing_runs`]; otherwise a run comes as one
    /// [`Record::Raw`] per page). Checked: every page lies inside the
    /// block. Land it with [`StreamReader::land_run`]; a further
    /// [`StreamReader::next_record`] instead hands its pages out as
    /// [`Record::Raw`] records.
    Run {
        /// Block index.
        block: u16,
        /// Byte offset of the first page in the block.
        offset: u64,
        /// Pages in the run (1..=[`MAX_RUN_PAGES`]).
        pages: u16,
    },
    /// The source waits for the destination to apply everything before
    /// this record (header flag `FLAG_SETUP`, main stream, before the
    /// postcopy switch): the destination answers APPLIED with `mark` on
    /// the return path once the section holding it checked out.
    Drain {
        /// 1, 2, 3... in order.
        mark: u64,
    },
}

/// A record as the reader hands it out: slices of its buffers.
pub type Record<'a> = RecordOf<&'a [u8], &'a [BlockDesc], &'a str>;

/// A record that owns its bytes, to keep after the reader moved on.
pub type OwnedRecord = RecordOf<Vec<u8>, Vec<BlockDesc>, String>;

impl Record<'_> {
    /// A copy that owns its bytes.
    pub fn to_owned_record(&self) -> OwnedRecord {
        match *self {
            Record::BlockList(b) => RecordOf::BlockList(b.to_vec()),
            Record::Zero { block, offset } => RecordOf::Zero { block, offset },
            Record::ZeroRun {
                block,
                offset,
                pages,
            } => RecordOf::ZeroRun {
                block,
                offset,
                pages,
            },
            Record::Raw {
                block,
                offset,
                data,
            } => RecordOf::Raw {
                block,
                offset,
                data: data.to_vec(),
            },
            Record::Xbzrle {
                block,
                offset,
                data,
            } => RecordOf::Xbzrle {
                block,
                offset,
                data: data.to_vec(),
            },
            Record::Compressed {
                block,
                offset,
                algo,
                data,
            } => RecordOf::Compressed {
                block,
                offset,
                algo,
                data: data.to_vec(),
            },
            Record::SectionEnd { seq } => RecordOf::SectionEnd { seq },
            Record::State(b) => RecordOf::State(b.to_vec()),
            Record::Digest(h) => RecordOf::Digest(h),
            Record::End => RecordOf::End,
            Record::Channel {
                index,
                channels,
                session,
            } => RecordOf::Channel {
                index,
                channels,
                session,
            },
            Record::Sync { epoch } => RecordOf::Sync { epoch },
            Record::Discard {
                block,
                first_word,
                words,
            } => RecordOf::Discard {
                block,
                first_word,
                words: words.to_vec(),
            },
            Record::Postcopy => RecordOf::Postcopy,
            Record::Setup {
                vcpus,
                features,
                load,
            } => RecordOf::Setup {
                vcpus,
                features,
                load,
            },
            Record::Abort(t) => RecordOf::Abort(t.to_string()),
            Record::Run {
                block,
                offset,
                pages,
            } => RecordOf::Run {
                block,
                offset,
                pages,
            },
            Record::Drain { mark } => RecordOf::Drain { mark },
        }
    }
}

/// The record kinds that may not stand anywhere, one row each: the header
/// flag its stream must carry, which streams may carry it, and whether it
/// may follow the postcopy switch. Runs land straight in guest memory,
/// which postcopy fills page by page once the guest runs here; SETUP and
/// DRAIN talk to a return path, which only the main stream has. Checked on
/// the record's tag, before any of its fields.
const PLACES: [(Kind, u16, Streams, Switch); 4] = [
    (Kind::ZeroRun, FLAG_ZERO_RUNS, Streams::Any, Switch::Before),
    (Kind::Run, FLAG_RUNS, Streams::Any, Switch::Before),
    (Kind::Setup, FLAG_SETUP, Streams::Main, Switch::Either),
    (Kind::Drain, FLAG_SETUP, Streams::Main, Switch::Before),
];

/// Which streams of a migration may carry a record (see [`PLACES`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Streams {
    Any,
    /// The main stream, not a page channel.
    Main,
}

/// Whether a record may follow the postcopy switch (see [`PLACES`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Switch {
    Either,
    Before,
}

/// Why a record is out of its place (see [`PLACES`]).
#[derive(Clone, Copy)]
enum Misplaced {
    /// The stream's header does not carry the flag.
    Unannounced,
    /// A page channel carries a main-stream record.
    OnPageChannel,
    /// The record follows the postcopy switch.
    AfterSwitch,
}

/// The error for a record of `kind` out of its place.
fn misplaced_error(kind: Kind, m: Misplaced) -> StreamErrorKind {
    use Misplaced::*;
    match (kind, m) {
        (Kind::ZeroRun, AfterSwitch) => StreamErrorKind::ZeroRunAfterPostcopy,
        (Kind::ZeroRun, _) => StreamErrorKind::NotZeroRunStream,
        (Kind::Run, AfterSwitch) => StreamErrorKind::RunAfterPostcopy,
        (Kind::Run, _) => StreamErrorKind::NotRunStream,
        (Kind::Setup, Unannounced) => {
            StreamErrorKind::SetupOutOfPlace("in a stream whose header does not announce one")
        }
        (Kind::Setup, _) => StreamErrorKind::SetupOutOfPlace("on a page channel"),
        (Kind::Drain, Unannounced) => {
            StreamErrorKind::DrainOutOfPlace("in a stream whose header announces no return path")
        }
        (Kind::Drain, OnPageChannel) => StreamErrorKind::DrainOutOfPlace("on a page channel"),
        (Kind::Drain, AfterSwitch) => StreamErrorKind::DrainOutOfPlace("after the postcopy switch"),
        (other, _) => unreachable!("no row in PLACES for {}", other.name()),
    }
}

/// A RUN record whose pages are still to be read.
#[derive(Clone, Copy, Debug)]
struct PendingRun {
    block: u16,
    /// Offset of the next page.
    next: u64,
    /// Pages left.
    left: u16,
}

/// The input buffer's size, and the most one refill reads from the
/// transport: large enough that a socket read takes whatever the kernel
/// has queued (many records and their headers in one call, so the source
/// is told of a wide-open window at once rather than a little at a time),
/// small enough to stay in the core's cache between the kernel's copy and
/// ours.
const INPUT_BUF: usize = 512 << 10;

/// A run's pages leave the input buffer in steps that are multiples of
/// this (the one-pass copy and checksum's unit; a run's destination stays
/// aligned to it).
const RUN_STEP: usize = 256;

/// Reads records from any `Read`, validating each.
///
/// Input lands in one buffer of fixed size; records are parsed in place and
/// page payloads are handed out as slices of that buffer, so a raw page is
/// copied once on its way from the transport to guest memory. The section
/// checksum is computed over whole stretches of the buffer, not field by
/// field, and over a run's pages by the copy that lands them.
pub struct StreamReader<R: Read> {
    inner: R,
    buf: Box<[u8]>,
    /// Next unconsumed byte in `buf`.
    pos: usize,
    /// End of the bytes read into `buf`.
    end: usize,
    /// Start of the consumed bytes not yet folded into `crc`.
    crc_from: usize,
    offset: u64,
    record: u64,
    what: Option<&'static str>,
    /// CRC of the section's bytes up to `crc_from` (0: none yet).
    crc: u32,
    flags: u16,
    blocks: Vec<BlockDesc>,
    have_blocks: bool,
    last_block: Option<u16>,
    next_seq: u64,
    next_epoch: u64,
    next_mark: u64,
    channel: Option<(u16, u16, u64)>,
    postcopy: bool,
    ended: bool,
    blob: Vec<u8>,
    /// A SETUP record was read.
    setup: bool,
    /// A page record was read.
    paged: bool,
    /// The reason of an ABORT record.
    abort: String,
    /// The RUN record whose pages are still to be read.
    run: Option<PendingRun>,
    /// Runs are handed out whole, to land in place.
    landing: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(inner: R) -> Result<Self, StreamError> {
        let mut r = StreamReader {
            inner,
            buf: vec![0u8; INPUT_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
            crc_from: 0,
            offset: 0,
            record: 0,
            what: Some("header"),
            crc: 0,
            flags: 0,
            blocks: Vec::new(),
            have_blocks: false,
            last_block: None,
            next_seq: 0,
            next_epoch: 0,
            next_mark: 1,
            channel: None,
            postcopy: false,
            ended: false,
            blob: Vec::new(),
            setup: false,
            paged: false,
            abort: String::new(),
            run: None,
            landing: false,
        };
        let magic: [u8; 8] = r.array("the header")?;
        if magic != MAGIC {
            return Err(r.err_at(0, StreamErrorKind::BadMagic(magic)));
        }
        let at = r.offset;
        let version = r.u16("the header")?;
        if version != VERSION {
            return Err(r.err_at(at, StreamErrorKind::Version(version)));
        }
        let at = r.offset;
        let flags = r.u16("the header")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(r.err_at(at, StreamErrorKind::HeaderFlags(flags)));
        }
        let at = r.offset;
        let reserved = r.u32("the header")?;
        if reserved != 0 {
            return Err(r.err_at(at, StreamErrorKind::Reserved(reserved)));
        }
        r.flags = flags;
        r.what = None;
        Ok(r)
    }

    /// The transport, when every byte read from it has been consumed as
    /// records (nothing buffered): for a message outside the record
    /// framing, such as the source's GO at the postcopy switch.
    pub fn inner_if_drained(&mut self) -> Option<&mut R> {
        (self.pos == self.end && self.run.is_none()).then_some(&mut self.inner)
    }

    /// Hands RUN records out whole ([`Record::Run`]) for
    /// [`StreamReader::land_run`] to read into place, instead of one
    /// [`Record::Raw`] per page.
    pub fn landing_runs(&mut self, on: bool) {
        self.landing = on;
    }

    /// Lands the pages of the [`Record::Run`] just returned in `region` at
    /// byte `at`, checksumming them as every stream byte is: the bytes
    /// already in the input buffer (a refill takes whatever the transport
    /// has queued, up to the buffer's size) are copied into place and
    /// checksummed in one pass (see [`crc::copy_crc`]); once the buffer is
    /// drained, the rest is read from the transport straight into place
    /// and checksummed while in cache. (Landing everything through the
    /// buffer costs the destination less CPU, but on loopback it moves the
    /// TCP receive work onto the source's thread, which shares its CPU with
    /// the running guest: the harness's incrementer then converged later.)
    /// The range is checked against `region` before any byte lands. The
    /// section checksum is only checked at the section's end: until then
    /// the landed bytes are not known good.
    ///
    /// # Panics
    /// If no run is pending.
    pub fn land_run(&mut self, region: &RawRegion, at: usize) -> Result<(), StreamError> {
        let run = self.run.take().expect("land_run without a pending run");
        let len = usize::from(run.left) * PAGE_SIZE;
        if at.checked_add(len).is_none_or(|e| e > region.len()) {
            let block = self.blocks[usize::from(run.block)].id.clone();
            return Err(self.err_at(
                self.offset,
                StreamErrorKind::RunPastBlock {
                    block,
                    offset: run.next,
                    pages: run.left.into(),
                    len: region.len() as u64,
                },
            ));
        }
        self.fold_crc();
        let mut done = 0;
        while done < len {
            let have = self.end - self.pos;
            // Whole steps where the buffer allows (the one-pass copy's
            // unit), the last few bytes before reading in place otherwise.
            let step = if have >= len - done {
                len - done
            } else if have >= RUN_STEP {
                have - have % RUN_STEP
            } else {
                have
            };
            if step > 0 {
                let src = &self.buf[self.pos..self.pos + step];
                let before = self.crc;
                self.crc = region
                    .fill(at + done, step, |dst| crc::copy_crc(before, src, dst))
                    .expect("the run was checked against the region");
                self.pos += step;
                self.offset += step as u64;
                self.crc_from = self.pos;
                done += step;
                continue;
            }
            // Nothing buffered: the reader is waiting on the transport.
            // Read the rest of the run straight into place (the kernel's
            // copy is the only one), then checksum what landed while it is
            // in cache.
            match region.read_from(at + done, len - done, &mut self.inner) {
                Ok(0) => {
                    return Err(self.err_at(
                        self.offset,
                        StreamErrorKind::Truncated("a run of raw pages"),
                    ))
                }
                Ok(k) => {
                    let before = self.crc;
                    self.crc = region
                        .scan(at + done, k, |s| crc::update(before, s))
                        .expect("the run was checked against the region");
                    done += k;
                    self.offset += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err_at(self.offset, StreamErrorKind::Io(e))),
            }
        }
        Ok(())
    }

    /// The next page of the pending run, as a raw page record.
    fn run_page(&mut self) -> Result<Record<'_>, StreamError> {
        let mut run = self.run.take().expect("a run is pending");
        let offset = run.next;
        run.left -= 1;
        run.next += PAGE_SIZE as u64;
        if run.left > 0 {
            self.run = Some(run);
        }
        let data = self.take(PAGE_SIZE, "a run of raw pages")?;
        Ok(Record::Raw {
            block: run.block,
            offset,
            data,
        })
    }

    /// Header flags (see [`FLAG_VERIFY`]).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether this stream must carry a SETUP record: the header says so
    /// and it is the main stream (not a page channel).
    fn wants_setup(&self) -> bool {
        self.flags & FLAG_SETUP != 0 && !self.on_page_channel()
    }

    /// Whether this stream is a page channel (not the main stream).
    fn on_page_channel(&self) -> bool {
        self.channel.is_some_and(|(index, _, _)| index != 0)
    }

    /// What, if anything, puts a record out of its place here (see
    /// [`PLACES`]).
    fn misplaced(&self, flag: u16, streams: Streams, switch: Switch) -> Option<Misplaced> {
        if self.flags & flag == 0 {
            Some(Misplaced::Unannounced)
        } else if streams == Streams::Main && self.on_page_channel() {
            Some(Misplaced::OnPageChannel)
        } else if switch == Switch::Before && self.postcopy {
            Some(Misplaced::AfterSwitch)
        } else {
            None
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Index of the record last read (0 = first after the header).
    pub fn record(&self) -> u64 {
        self.record
    }

    /// (index, channels, session) of a channel stream, once read.
    pub fn channel(&self) -> Option<(u16, u16, u64)> {
        self.channel
    }

    /// The block list, once read.
    pub fn blocks(&self) -> &[BlockDesc] {
        &self.blocks
    }

    /// An error at byte `at` of the current record.
    pub fn err_at(&self, at: u64, kind: StreamErrorKind) -> StreamError {
        StreamError {
            offset: at,
            record: self.record,
            what: self.what,
            kind,
        }
    }

    /// Folds the consumed bytes not yet checksummed into the CRC.
    fn fold_crc(&mut self) {
        if self.crc_from < self.pos {
            self.crc = crc::update(self.crc, &self.buf[self.crc_from..self.pos]);
        }
        self.crc_from = self.pos;
    }

    /// Makes at least `n` (at most [`INPUT_BUF`]) unconsumed bytes
    /// available in the buffer, reading from the transport as needed. Each
    /// refill first moves the unconsumed tail (fewer than `n` bytes) to the
    /// front, so every read may take up to the whole buffer.
    fn need(&mut self, n: usize, what: &'static str) -> Result<(), StreamError> {
        debug_assert!(n <= INPUT_BUF);
        if self.end - self.pos >= n {
            return Ok(());
        }
        if self.pos > 0 {
            // Checksum what is consumed, then keep only the tail.
            self.fold_crc();
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            self.crc_from = 0;
        }
        while self.end - self.pos < n {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    let at = self.offset + (self.end - self.pos) as u64;
                    return Err(self.err_at(at, StreamErrorKind::Truncated(what)));
                }
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let at = self.offset + (self.end - self.pos) as u64;
                    return Err(self.err_at(at, StreamErrorKind::Io(e)));
                }
            }
        }
        Ok(())
    }

    /// Consumes `n` bytes (at most [`INPUT_BUF`]) and returns them; they
    /// count towards the section checksum.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], StreamError> {
        self.need(n, what)?;
        let at = self.pos;
        self.pos += n;
        self.offset += n as u64;
        Ok(&self.buf[at..at + n])
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], StreamError> {
        let b = self.take(N, what)?;
        Ok(b.try_into().expect("take returns N bytes"))
    }

    /// Reads a stored checksum: the bytes before it are folded into the
    /// running CRC, which is finished and restarted; the checksum itself is
    /// not part of any checksum. Returns (computed, found).
    fn checksum(&mut self, what: &'static str) -> Result<(u32, u32), StreamError> {
        self.fold_crc();
        let computed = std::mem::take(&mut self.crc);
        let found = u32::from_be_bytes(self.array(what)?);
        self.crc_from = self.pos;
        Ok((computed, found))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, StreamError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, StreamError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn len_field16(
        &mut self,
        what: &'static str,
        min: u64,
        max: u64,
    ) -> Result<usize, StreamError> {
        let at = self.offset;
        let len = u64::from(self.u16(what)?);
        if len < min || len > max {
            return Err(self.err_at(
                at,
                StreamErrorKind::BadLength {
                    what,
                    len,
                    min,
                    max,
                },
            ));
        }
        Ok(len as usize)
    }

    /// Reads the next record. After [`Record::End`] any further call fails.
    pub fn next_record(&mut self) -> Result<Record<'_>, StreamError> {
        if self.ended {
            return Err(self.err_at(self.offset, StreamErrorKind::AfterEnd));
        }
        if self.run.is_some() {
            // Each page of a run handed out alone counts as a record.
            self.record += 1;
            return self.run_page();
        }
        if self.what.is_some() {
            self.record += 1;
        }
        self.what = None;
        let tag_at = self.offset;
        let tag = self.u8("a record tag")?;
        let Some(kind) = Kind::from_u8(tag & !SAME_BLOCK) else {
            return Err(self.err_at(tag_at, StreamErrorKind::UnknownTag(tag)));
        };
        self.what = Some(kind.name());
        let same = tag & SAME_BLOCK != 0;
        if same && !kind.is_page() {
            return Err(self.err_at(tag_at, StreamErrorKind::SameBlockOnNonPage(kind.name())));
        }
        let channels = self.flags & FLAG_CHANNELS != 0;
        if matches!(kind, Kind::Channel | Kind::Sync) && !channels {
            return Err(self.err_at(tag_at, StreamErrorKind::NotChannelStream(kind.name())));
        }
        if channels && self.channel.is_none() && kind != Kind::Channel {
            return Err(self.err_at(tag_at, StreamErrorKind::ChannelFirst));
        }
        if let Some(&(_, flag, streams, switch)) = PLACES.iter().find(|p| p.0 == kind) {
            if let Some(m) = self.misplaced(flag, streams, switch) {
                return Err(self.err_at(tag_at, misplaced_error(kind, m)));
            }
        }
        if kind.is_page() {
            self.paged = true;
            let (block, offset) = self.page_addr(same)?;
            return self.page_record(kind, block, offset);
        }
        match kind {
            Kind::Channel => {
                if self.channel.is_some() {
                    return Err(self.err_at(tag_at, StreamErrorKind::ChannelTwice));
                }
                let at = self.offset;
                let index = self.u16("a channel record")?;
                let count = self.u16("a channel record")?;
                let session = self.u64("a channel record")?;
                if !(2..=MAX_CHANNELS).contains(&count) || index > count {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::ChannelRange {
                            index,
                            channels: count,
                        },
                    ));
                }
                self.channel = Some((index, count, session));
                Ok(Record::Channel {
                    index,
                    channels: count,
                    session,
                })
            }
            Kind::Sync => {
                let at = self.offset;
                let epoch = self.u64("a sync record")?;
                if epoch != self.next_epoch {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::SyncEpoch {
                            found: epoch,
                            expected: self.next_epoch,
                        },
                    ));
                }
                self.next_epoch += 1;
                Ok(Record::Sync { epoch })
            }
            Kind::BlockList => {
                self.block_list(tag_at)?;
                Ok(Record::BlockList(&self.blocks))
            }
            Kind::SectionEnd => {
                let at = self.offset;
                if self.next_seq == 0 && self.wants_setup() && !self.setup {
                    return Err(self.err_at(tag_at, StreamErrorKind::SetupMissing));
                }
                let seq = self.u64("a section end")?;
                let (computed, found) = self.checksum("a section checksum")?;
                if found != computed {
                    return Err(self.err_at(
                        at + 8,
                        StreamErrorKind::Checksum {
                            seq,
                            found,
                            computed,
                        },
                    ));
                }
                if seq != self.next_seq {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::Sequence {
                            found: seq,
                            expected: self.next_seq,
                        },
                    ));
                }
                self.next_seq += 1;
                Ok(Record::SectionEnd { seq })
            }
            Kind::State => {
                let at = self.offset;
                let len = self.u32("a state length")?;
                if len > MAX_STATE {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::BadLength {
                            what: "device state",
                            len: len.into(),
                            min: 0,
                            max: MAX_STATE.into(),
                        },
                    ));
                }
                let mut blob = std::mem::take(&mut self.blob);
                blob.clear();
                let mut left = len as usize;
                while left > 0 {
                    let n = left.min(64 << 10);
                    match self.take(n, "the device state") {
                        Ok(chunk) => blob.extend_from_slice(chunk),
                        Err(e) => {
                            self.blob = blob;
                            return Err(e);
                        }
                    }
                    left -= n;
                }
                self.blob = blob;
                Ok(Record::State(&self.blob))
            }
            Kind::Digest => {
                let at = self.offset;
                let algo = self.u8("a digest")?;
                if algo != DIGEST_BLAKE3 {
                    return Err(self.err_at(at, StreamErrorKind::DigestAlgo(algo)));
                }
                let h: [u8; 32] = self.array("a digest")?;
                Ok(Record::Digest(h))
            }
            Kind::End => {
                let at = self.offset;
                let (computed, found) = self.checksum("the end checksum")?;
                if found != computed {
                    let seq = self.next_seq;
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::Checksum {
                            seq,
                            found,
                            computed,
                        },
                    ));
                }
                self.ended = true;
                Ok(Record::End)
            }
            Kind::Discard => self.discard(),
            Kind::Postcopy => {
                if self.postcopy {
                    return Err(self.err_at(tag_at, StreamErrorKind::PostcopyTwice));
                }
                self.postcopy = true;
                Ok(Record::Postcopy)
            }
            Kind::Setup => {
                let out_of_place = if self.setup {
                    Some("twice")
                } else if !self.have_blocks || self.paged || self.next_seq > 0 {
                    Some("not right after the block list")
                } else {
                    None
                };
                if let Some(why) = out_of_place {
                    return Err(self.err_at(tag_at, StreamErrorKind::SetupOutOfPlace(why)));
                }
                let vcpus = self.u32("a setup record")?;
                let at = self.offset;
                let features = self.u32("a setup record")?;
                if features & !KNOWN_FEATURES != 0 {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::UnknownFeatures(features & !KNOWN_FEATURES),
                    ));
                }
                let load = if self.flags & FLAG_GUEST_LOAD != 0 {
                    Some(self.u32("a setup record")?).filter(|&l| l != LOAD_UNKNOWN)
                } else {
                    None
                };
                self.setup = true;
                Ok(Record::Setup {
                    vcpus,
                    features,
                    load,
                })
            }
            Kind::Drain => {
                let at = self.offset;
                let mark = self.u64("a drain mark")?;
                if mark != self.next_mark {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::DrainMark {
                            found: mark,
                            expected: self.next_mark,
                        },
                    ));
                }
                self.next_mark += 1;
                Ok(Record::Drain { mark })
            }
            Kind::Abort => {
                let len = self.len_field16("abort reason", 1, u64::from(MAX_ABORT_TEXT))?;
                let text = String::from_utf8_lossy(self.take(len, "an abort reason")?).into_owned();
                self.abort = text;
                self.ended = true;
                Ok(Record::Abort(&self.abort))
            }
            Kind::Zero
            | Kind::Raw
            | Kind::Xbzrle
            | Kind::Compressed
            | Kind::ZeroRun
            | Kind::Run => {
                unreachable!("page kinds handled above")
            }
        }
    }

    /// Reads a DISCARD record, checking that its words lie inside the
    /// block's bitmap and mark no page past the block's end.
    fn discard(&mut self) -> Result<Record<'_>, StreamError> {
        let at = self.offset;
        if !self.have_blocks {
            return Err(self.err_at(at, StreamErrorKind::NoBlockList));
        }
        let block = self.u16("a block index")?;
        if usize::from(block) >= self.blocks.len() {
            return Err(self.err_at(
                at,
                StreamErrorKind::UnknownBlock {
                    index: block,
                    count: self.blocks.len(),
                },
            ));
        }
        let wat = self.offset;
        let first = self.u32("a discard record")?;
        let n = self.len_field16("discard words", 1, u64::from(MAX_DISCARD_WORDS))?;
        let desc = &self.blocks[usize::from(block)];
        let pages = desc.len / PAGE_SIZE as u64;
        let words = pages.div_ceil(64);
        let end = u64::from(first) + n as u64;
        let range_err = |id: String| StreamErrorKind::DiscardRange {
            block: id,
            first: first.into(),
            end,
            words,
            pages,
        };
        if end > words {
            let kind = range_err(desc.id.clone());
            return Err(self.err_at(wat, kind));
        }
        // Bits past the last page of the block's last word must be clear.
        let tail_bits = pages % 64;
        let id = desc.id.clone();
        let data_at = self.offset;
        let data = self.take(n * 8, "discard words")?;
        if end == words && tail_bits != 0 {
            let last: [u8; 8] = data[(n - 1) * 8..].try_into().expect("8 bytes");
            if u64::from_be_bytes(last) >> tail_bits != 0 {
                let at = data_at + (n as u64 - 1) * 8;
                return Err(self.err_at(at, range_err(id)));
            }
        }
        let data = &self.buf[self.pos - n * 8..self.pos];
        Ok(Record::Discard {
            block,
            first_word: first,
            words: data,
        })
    }

    fn page_addr(&mut self, same: bool) -> Result<(u16, u64), StreamError> {
        let at = self.offset;
        if !self.have_blocks {
            return Err(self.err_at(at, StreamErrorKind::NoBlockList));
        }
        let block = if same {
            match self.last_block {
                Some(b) => b,
                None => return Err(self.err_at(at - 1, StreamErrorKind::SameBlockFirst)),
            }
        } else {
            let b = self.u16("a block index")?;
            if usize::from(b) >= self.blocks.len() {
                return Err(self.err_at(
                    at,
                    StreamErrorKind::UnknownBlock {
                        index: b,
                        count: self.blocks.len(),
                    },
                ));
            }
            b
        };
        let oat = self.offset;
        let offset = self.u64("a page offset")?;
        let desc = &self.blocks[usize::from(block)];
        if offset % PAGE_SIZE as u64 != 0 || offset >= desc.len {
            return Err(self.err_at(
                oat,
                StreamErrorKind::BadOffset {
                    block: desc.id.clone(),
                    offset,
                    len: desc.len,
                },
            ));
        }
        self.last_block = Some(block);
        Ok((block, offset))
    }

    /// Reads a page record's payload; the slices borrow the input buffer.
    fn page_record(
        &mut self,
        kind: Kind,
        block: u16,
        offset: u64,
    ) -> Result<Record<'_>, StreamError> {
        match kind {
            Kind::Zero => Ok(Record::Zero { block, offset }),
            Kind::ZeroRun => {
                let at = self.offset;
                let pages = self.u32("a zero run")?;
                let max = u64::from(MAX_ZERO_RUN_PAGES);
                if pages == 0 || u64::from(pages) > max {
                    return Err(self.err_at(
                        at,
                        StreamErrorKind::BadLength {
                            what: "zero run",
                            len: pages.into(),
                            min: 1,
                            max,
                        },
                    ));
                }
                // The first page is inside the block (checked with the
                // address); the last one must be too.
                let desc = &self.blocks[usize::from(block)];
                let len = u64::from(pages) * PAGE_SIZE as u64;
                if offset.checked_add(len).is_none_or(|e| e > desc.len) {
                    let kind = StreamErrorKind::ZeroRunPastBlock {
                        block: desc.id.clone(),
                        offset,
                        pages: pages.into(),
                        len: desc.len,
                    };
                    return Err(self.err_at(at, kind));
                }
                Ok(Record::ZeroRun {
                    block,
                    offset,
                    pages,
                })
            }
            Kind::Raw => {
                let data = self.take(PAGE_SIZE, "a raw page")?;
                Ok(Record::Raw {
                    block,
                    offset,
                    data,
                })
            }
            Kind::Run => {
                let at = self.offset;
                let pages = self.len_field16("run pages", 1, MAX_RUN_PAGES.into())?;
                let desc = &self.blocks[usize::from(block)];
                if offset + (pages * PAGE_SIZE) as u64 > desc.len {
                    let kind = StreamErrorKind::RunPastBlock {
                        block: desc.id.clone(),
                        offset,
                        pages: pages as u64,
                        len: desc.len,
                    };
                    return Err(self.err_at(at, kind));
                }
                self.run = Some(PendingRun {
                    block,
                    next: offset,
                    left: pages as u16,
                });
                if self.landing {
                    return Ok(Record::Run {
                        block,
                        offset,
                        pages: pages as u16,
                    });
                }
                self.run_page()
            }
            Kind::Xbzrle => {
                let n = self.len_field16("xbzrle payload", 1, PAGE_SIZE as u64)?;
                let data = self.take(n, "an xbzrle payload")?;
                Ok(Record::Xbzrle {
                    block,
                    offset,
                    data,
                })
            }
            _ => {
                let at = self.offset;
                let algo = self.u8("a compression algorithm")?;
                if algo != COMPRESS_ZSTD && algo != COMPRESS_LZ4 {
                    return Err(self.err_at(at, StreamErrorKind::CompressionAlgo(algo)));
                }
                let n = self.len_field16("compressed payload", 1, PAGE_SIZE as u64 - 1)?;
                let data = self.take(n, "a compressed payload")?;
                Ok(Record::Compressed {
                    block,
                    offset,
                    algo,
                    data,
                })
            }
        }
    }

    fn block_list(&mut self, tag_at: u64) -> Result<(), StreamError> {
        if self.have_blocks {
            return Err(self.err_at(tag_at, StreamErrorKind::BlockListTwice));
        }
        let at = self.offset;
        let count = self.u32("a block list")?;
        if count == 0 || count > MAX_BLOCKS {
            return Err(self.err_at(at, StreamErrorKind::BlockCount(count)));
        }
        let tat = self.offset;
        let declared = self.u64("a block list")?;
        let mut blocks: Vec<BlockDesc> = Vec::new();
        let mut sum: u64 = 0;
        for index in 0..count {
            let iat = self.offset;
            let n = self.u8("a block id")? as usize;
            let id = match std::str::from_utf8(self.take(n, "a block id")?) {
                Ok(s) if !s.is_empty() => s.to_string(),
                _ => return Err(self.err_at(iat, StreamErrorKind::BlockId { index })),
            };
            if blocks.iter().any(|b| b.id == id) {
                return Err(self.err_at(iat, StreamErrorKind::BlockIdTwice(id)));
            }
            let lat = self.offset;
            let len = self.u64("a block length")?;
            if len == 0 || len % PAGE_SIZE as u64 != 0 {
                return Err(self.err_at(lat, StreamErrorKind::BlockLength { id, len }));
            }
            // Lengths that overflow u64 can match no declared total.
            sum = match sum.checked_add(len) {
                Some(s) => s,
                None => {
                    return Err(self.err_at(
                        tat,
                        StreamErrorKind::BlockTotal {
                            declared,
                            sum: u64::MAX,
                        },
                    ))
                }
            };
            blocks.push(BlockDesc { id, len });
        }
        if sum != declared {
            return Err(self.err_at(tat, StreamErrorKind::BlockTotal { declared, sum }));
        }
        self.blocks = blocks;
        self.have_blocks = true;
        Ok(())
    }
}
