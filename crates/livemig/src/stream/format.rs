//! The wire format, version 2: constants both the writer and the reader use.
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
//! SETUP       vcpus:u32                             main stream, right after BLOCK_LIST, once
//! ABORT       len:u16 why:[u8; len]                 len <= MAX_ABORT_TEXT, UTF-8; ends the stream
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
//! older copy on another channel. A reader without channel support
//! refuses the flag.
//!
//! Version 2 (version 1 had neither SETUP nor ABORT; each version refuses
//! the other) adds:
//! - SETUP: the VM's shape beyond its RAM (vCPU count, 0 when the source
//!   VMM has none to tell), sent on the main stream right after the block
//!   list. It closes the setup: on a two-way transport the source then
//!   waits for the destination's READY (or FAILED + why) on the return
//!   path before it sends any page, so a destination whose memory layout
//!   or vCPU count differs refuses the migration before any page moves
//!   (see `engine/ack.rs`). A page channel carries no SETUP.
//! - ABORT: the source gave up (cancel, tracker or VMM failure); the text
//!   says why. Nothing may follow it; the destination reports "the source
//!   aborted: why" instead of a truncated stream. It is outside any
//!   checksummed section: it is only ever the last record.
//!
//! `crc` in SECTION_END is the CRC-32 (IEEE) of every byte since the end of
//! the previous SECTION_END (or since the start of the stream), up to and
//! including `seq`. It catches a transport that corrupts or drops bytes.
//! END carries the same checksum for the last stretch (up to and including
//! its tag), so the device state and digest are covered too.

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"LIVEMIG\0";
/// The version this build writes and reads.
pub const VERSION: u16 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;

/// Header flag: the stream ends with a digest of all guest memory.
pub const FLAG_VERIFY: u16 = 1 << 0;
/// Header flag: this stream is one channel of a multi-channel migration.
pub const FLAG_CHANNELS: u16 = 1 << 1;
/// Header flags this build understands.
pub const KNOWN_FLAGS: u16 = FLAG_VERIFY | FLAG_CHANNELS;
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
    /// The VM's shape beyond its RAM; ends the setup (version 2).
    Setup = 0x0c,
    /// The source gave up (version 2).
    Abort = 0x0d,
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
            0x0c => Kind::Setup,
            0x0d => Kind::Abort,
            _ => return None,
        })
    }

    /// Whether records of this kind carry a page address.
    pub fn is_page(self) -> bool {
        matches!(
            self,
            Kind::Zero | Kind::Raw | Kind::Xbzrle | Kind::Compressed
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
            Kind::Setup => "setup",
            Kind::Abort => "abort",
        }
    }
}

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
/// Longest reason in an ABORT record.
pub const MAX_ABORT_TEXT: u16 = 4096;
/// Most vCPUs a SETUP record may declare.
pub const MAX_VCPUS: u32 = 4096;

/// Compression algorithm id: zstd.
pub const COMPRESS_ZSTD: u8 = 1;
/// Compression algorithm id: LZ4 (block format).
pub const COMPRESS_LZ4: u8 = 2;
