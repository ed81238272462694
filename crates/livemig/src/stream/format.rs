//! The wire format, version 1: constants both the writer and the reader use.
//!
//! ```text
//! stream  := header record*
//! header  := "LIVEMIG\0" version:u16 flags:u16 reserved:u32(=0)
//! record  := tag:u8 body                      (integers big-endian)
//!   tag bit 7 (SAME_BLOCK) on page records: the block index is omitted
//!   and is the previous page record's block.
//! BLOCK_LIST  count:u32 total:u64 (id_len:u8 id:[u8] len:u64){count}
//! ZERO        addr
//! RAW         addr page:[u8; 4096]
//! XBZRLE      addr len:u16 payload:[u8; len]        1 <= len <= 4096
//! COMPRESSED  addr algo:u8 len:u16 payload:[u8; len] 1 <= len < 4096
//! SECTION_END seq:u64 crc:u32
//! STATE       len:u32 blob:[u8; len]                 len <= MAX_STATE
//! DIGEST      algo:u8 hash:[u8; 32]
//! END         crc:u32
//! CHANNEL     index:u16 channels:u16 session:u64   first record, FLAG_CHANNELS only
//! SYNC        epoch:u64                             FLAG_CHANNELS only
//! DISCARD     block:u16 first_word:u32 nwords:u16 words:[u64; nwords]
//!                                   1 <= nwords <= MAX_DISCARD_WORDS, inside the block's bitmap
//! POSTCOPY                                          once, after the DISCARDs and STATE
//! SETUP       vcpus:u32 features:u32 [load:u32]     once, right after the block list,
//!                                                   FLAG_SETUP only (vcpus 0: not said);
//!                                                   load with FLAG_GUEST_LOAD only
//! ABORT       len:u16 reason:[u8; len]              1 <= len <= MAX_ABORT_TEXT, UTF-8;
//!                                                   the source gave up: nothing follows
//! DRAIN       mark:u64                              FLAG_SETUP only, main stream, before
//!                                                   the postcopy switch; marks 1, 2, 3...
//! ZERO_RUN    addr count:u32                        pages [offset, offset + 4096 * count)
//!                                   are zero; 1 <= count <= MAX_ZERO_RUN_PAGES, every page
//!                                   inside the block; FLAG_ZERO_RUNS only, never after
//!                                   POSTCOPY
//! RUN         addr count:u16 pages:[u8; 4096 * count]
//!                                   1 <= count <= MAX_RUN_PAGES, every page inside the
//!                                   block; FLAG_RUNS only, never after POSTCOPY
//! addr        := [block:u16] offset:u64        offset page-aligned, inside the block
//! ```
//!
//! Parallel channels (header flag [`FLAG_CHANNELS`]): one migration is
//! `channels + 1` streams, each a complete stream of its own (header,
//! checksummed sections, block list, END). Stream 0 is the main channel
//! (block list, XBZRLE pages, SYNC barriers, device state, digest); streams
//! 1..=channels are page channels (zero, raw and compressed pages, SYNC).
//! Each starts with a CHANNEL record naming its index, the channel count
//! and a session number shared by all streams of the migration. Every
//! stream carries the same SYNC epochs 0, 1, 2... in order; a page sent
//! after SYNC(e) on any stream is applied only once every stream has
//! reached SYNC(e), so a page re-sent after a dirty sync never loses to its
//! older copy on another channel. Version-1 streams without the flag are
//! unchanged; a reader without channel support refuses the flag.
//!
//! Postcopy (see `engine/postcopy/mod.rs`): at the switch the source sends
//! the pages the destination must not trust as DISCARD records (words of
//! the block's bitmap, bit i of word w = page 64w + i), the device state,
//! then POSTCOPY; page records after POSTCOPY are placed with userfaultfd.
//!
//! Setup verdict (header flag [`FLAG_SETUP`], set by a source that has a
//! return path): the main stream's first section is its header, the block
//! list and a SETUP record describing the VM (vCPU count, features). The
//! source then sends no page until the destination has checked that
//! section against its own VM and answered on the return path: ACCEPTED,
//! or FAILED with its reason (see `engine/ack.rs`). A refusal thus reaches
//! the source before any page is sent, and names the destination's reason.
//!
//! Drain marks (header flag [`FLAG_SETUP`]: the stream has a return
//! path): before it pauses the guest, the source ends a section with DRAIN
//! and waits, the guest still running, until the destination answers
//! APPLIED with the same mark on the return path (see `engine/ack.rs`).
//! The destination answers once that section checked out, every record
//! before it applied (with page channels, the source puts a SYNC barrier
//! before the mark, so every channel's pages before it are applied too).
//! So the pause starts with nothing queued between the source's writes
//! and the destination's memory: stream bytes buffered in sockets are
//! waited for while the guest runs, not in its pause. With header flag
//! [`FLAG_LOAD_REPORT`] the destination also brings its verify digest up
//! to date before it answers, and its APPLIED says what that took and
//! what is left (see `engine/ack.rs`), so its hashing backlog is waited
//! for before the pause too, and the source prices the rest at the
//! destination's own rate. A reader older than the flag refuses it.
//!
//! Guest load (header flags [`FLAG_SETUP`] and [`FLAG_GUEST_LOAD`]): the
//! SETUP record also says how busy the source's vCPUs were as the
//! migration started, in hundredths of a vCPU (0: every vCPU halted, 100
//! per vCPU running flat out; [`LOAD_UNKNOWN`]: the VMM did not say). It
//! is advice, read before any page: a destination may pick how it
//! receives by it (minivm receives an idle guest's memory into 4 KiB
//! pages, which this kind of host faults in 5-10x faster than fresh huge
//! pages, and a running guest's into huge pages, whose fewer faults leave
//! the CPU to the source on a shared host). A reader older than the field
//! refuses the header flag.
//!
//! A source that gives up after the setup (cancelled, tracker or VMM
//! failure) ends the main stream with ABORT and its reason, so the
//! destination reports `source aborted: <reason>` instead of a truncated
//! stream.
//!
//! Runs of zero pages (header flag [`FLAG_ZERO_RUNS`]): ZERO_RUN says
//! "pages `[offset, offset + 4096 * count)` of the block are zero" in 15
//! bytes, where `count` ZERO records would take 9 each: the source sends
//! it for pages it knows were never written (an idle guest's memory is
//! mostly such runs). The destination checks the whole run against the
//! block before it touches any page, skips the pages it knows are still
//! zero (never written since its load began and empty before it) and
//! zeroes the others that are not zero already, as a ZERO record would.
//! A precopy record: after POSTCOPY every page is placed one by one, so
//! the reader refuses it there. A reader older than the record refuses
//! the header flag (unknown header flags) before any page.
//!
//! Runs of raw pages (header flag [`FLAG_RUNS`]): RUN carries `count`
//! raw pages at consecutive offsets of one block, as `count` RAW records
//! would, with one header. The destination checks the whole run against
//! the block (and the run's position in the stream) before any of its
//! bytes lands, then lands the pages in guest memory (those already in
//! its receive buffer copied and checksummed in one pass, the rest read
//! from the transport straight into place); the section
//! checksum covers them as it covers every byte, so a corrupt run is
//! refused at its SECTION_END (the guest has not run: memory that failed
//! to load is never started). RUN is a precopy record: after POSTCOPY the
//! guest runs on the destination and every page must be placed whole, so
//! the reader refuses it there. A reader without run support refuses the
//! header flag by name.
//!
//! `crc` in SECTION_END is the CRC-32 (IEEE) of every byte since the end of
//! the previous SECTION_END (or since the start of the stream), up to and
//! including `seq`. It catches a transport that corrupts or drops bytes.
//! END carries the same checksum for the last stretch (up to and including
//! its tag), so the device state and digest are covered too.

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"LIVEMIG\0";
/// The version this build writes and reads.
pub const VERSION: u16 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;

/// Header flag: the stream ends with a digest of all guest memory.
pub const FLAG_VERIFY: u16 = 1 << 0;
/// Header flag: this stream is one channel of a multi-channel migration.
pub const FLAG_CHANNELS: u16 = 1 << 1;
/// Header flag: if the migration switches to postcopy, requested pages
/// travel on a connection of their own (postcopy-preempt), opened by the
/// source right after the switch record's section.
pub const FLAG_URGENT: u16 = 1 << 2;
/// Header flag: the main stream's first section ends with a SETUP record,
/// and the source waits for the destination's verdict on it (ACCEPTED or
/// FAILED on the return path) before it sends any page.
pub const FLAG_SETUP: u16 = 1 << 3;
/// Header flag: raw pages may travel as RUN records (several pages at
/// consecutive offsets of one block behind one header).
pub const FLAG_RUNS: u16 = 1 << 4;
/// Header flag: zero pages may travel as ZERO_RUN records (a run of
/// pages at consecutive offsets of one block, all zero, in one record).
pub const FLAG_ZERO_RUNS: u16 = 1 << 5;
/// Header flag (with [`FLAG_SETUP`]): the source reads the destination's
/// report of its pending work in APPLIED (see `engine/ack.rs`), and the
/// destination with verify on catches its running digest up before it
/// answers a drain mark.
pub const FLAG_LOAD_REPORT: u16 = 1 << 6;
/// Header flag (with [`FLAG_SETUP`]): the SETUP record carries the
/// source guest's vCPU load.
pub const FLAG_GUEST_LOAD: u16 = 1 << 7;
/// Header flags this build understands.
pub const KNOWN_FLAGS: u16 = FLAG_VERIFY
    | FLAG_CHANNELS
    | FLAG_URGENT
    | FLAG_SETUP
    | FLAG_RUNS
    | FLAG_ZERO_RUNS
    | FLAG_LOAD_REPORT
    | FLAG_GUEST_LOAD;
/// The SETUP record's load when the source's VMM did not say.
pub const LOAD_UNKNOWN: u32 = u32::MAX;
/// Most pages in one RUN record (256 KiB of pages behind one header).
pub const MAX_RUN_PAGES: u16 = 64;
/// Most pages in one ZERO_RUN record (1 GiB of zeros).
pub const MAX_ZERO_RUN_PAGES: u32 = 1 << 18;
/// SETUP feature bits this build understands (none yet: a source that
/// needs a feature the destination lacks sets its bit and is refused).
pub const KNOWN_FEATURES: u32 = 0;
/// Longest reason in an ABORT record.
pub const MAX_ABORT_TEXT: u16 = 1024;
/// Most page channels a migration may use.
pub const MAX_CHANNELS: u16 = 64;

/// Tag bit: the record's block is the previous page record's block.
pub const SAME_BLOCK: u8 = 0x80;

/// Record kinds (the tag without [`SAME_BLOCK`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The RAM block list.
    BlockList = 0x01,
    /// A page of zeros.
    Zero = 0x02,
    /// A page sent as is.
    Raw = 0x03,
    /// A page as an XBZRLE delta against the previous copy sent.
    Xbzrle = 0x04,
    /// A compressed page.
    Compressed = 0x05,
    /// End of a section, with a checksum.
    SectionEnd = 0x06,
    /// Device and vCPU state.
    State = 0x07,
    /// Digest of all guest memory at stop time.
    Digest = 0x08,
    /// End of the migration.
    End = 0x09,
    /// Which channel of a multi-channel migration this stream is.
    Channel = 0x0a,
    /// A barrier between dirty-sync epochs on every channel.
    Sync = 0x0b,
    /// Pages the destination must drop (postcopy switch).
    Discard = 0x0c,
    /// The switch to postcopy: the guest may run on the destination.
    Postcopy = 0x0d,
    /// The VM's shape, for the destination's setup check.
    Setup = 0x0e,
    /// The source gave up, with its reason.
    Abort = 0x0f,
    /// The source waits for the destination to apply everything before
    /// this record (answered on the return path).
    Drain = 0x1d,
    /// Zero pages at consecutive offsets of one block.
    ZeroRun = 0x11,
    /// Raw pages at consecutive offsets of one block.
    Run = 0x10,
}

impl Kind {
    /// The kind for a tag byte with [`SAME_BLOCK`] removed.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::BlockList,
            0x02 => Kind::Zero,
            0x03 => Kind::Raw,
            0x04 => Kind::Xbzrle,
            0x05 => Kind::Compressed,
            0x06 => Kind::SectionEnd,
            0x07 => Kind::State,
            0x08 => Kind::Digest,
            0x09 => Kind::End,
            0x0a => Kind::Channel,
            0x0b => Kind::Sync,
            0x0c => Kind::Discard,
            0x0d => Kind::Postcopy,
            0x0e => Kind::Setup,
            0x0f => Kind::Abort,
            0x1d => Kind::Drain,
            0x11 => Kind::ZeroRun,
            0x10 => Kind::Run,
            _ => return None,
        })
    }

    /// Whether records of this kind carry a page address.
    pub fn is_page(self) -> bool {
        matches!(
            self,
            Kind::Zero | Kind::Raw | Kind::Xbzrle | Kind::Compressed | Kind::ZeroRun | Kind::Run
        )
    }

    /// Name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::BlockList => "block list",
            Kind::Zero => "zero page",
            Kind::Raw => "raw page",
            Kind::Xbzrle => "xbzrle page",
            Kind::Compressed => "compressed page",
            Kind::SectionEnd => "section end",
            Kind::State => "device state",
            Kind::Digest => "digest",
            Kind::End => "end",
            Kind::Channel => "channel",
            Kind::Sync => "sync",
            Kind::Discard => "discard",
            Kind::Postcopy => "postcopy switch",
            Kind::Setup => "setup",
            Kind::Abort => "abort",
            Kind::Drain => "drain mark",
            Kind::ZeroRun => "zero run",
            Kind::Run => "run of raw pages",
        }
    }
}

/// Most bitmap words in one DISCARD record (4096 words: 1 GiB of pages).
pub const MAX_DISCARD_WORDS: u16 = 4096;

/// Most RAM blocks a stream may declare.
pub const MAX_BLOCKS: u32 = 4096;
/// Largest device-state blob accepted (64 MiB).
pub const MAX_STATE: u32 = 64 << 20;
/// Digest algorithm id: BLAKE3, 32 bytes.
pub const DIGEST_BLAKE3: u8 = 1;

/// Replies the destination sends on the return path (LOADED, FAILED,
/// STARTED), handshake version 2 (see `engine/ack.rs`).
pub const REPLY_MAGIC: [u8; 8] = *b"LVMGRP02";
/// The source's GO, sent on the stream's connection after END.
pub const GO_MAGIC: [u8; 8] = *b"LVMGGO02";
/// Longest text in a reply.
pub const MAX_REPLY_TEXT: u32 = 4096;

/// Compression algorithm id: zstd.
pub const COMPRESS_ZSTD: u8 = 1;
/// Compression algorithm id: LZ4 (block format).
pub const COMPRESS_LZ4: u8 = 2;
