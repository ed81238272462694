//! Reads and validates the migration stream.
//!
//! Every field is checked before it is used: lengths against fixed bounds,
//! blocks against the block list, offsets against the block's length,
//! section checksums against the bytes read. Payloads land in buffers of
//! fixed size, so no allocation follows a length the stream claims (the
//! device-state blob grows only as its bytes actually arrive).

use std::io::{self, BufReader, Read};

use super::format::*;
use super::writer::BlockDesc;
use crate::memory::PAGE_SIZE;

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

/// One validated record. Slices borrow the reader's buffers.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The block list (also kept by the reader).
    BlockList(&'a [BlockDesc]),
    /// A zero page.
    Zero {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
    },
    /// A raw page (4096 bytes).
    Raw {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
        /// Page contents.
        data: &'a [u8],
    },
    /// An XBZRLE delta (not yet decoded).
    Xbzrle {
        /// Block index.
        block: u16,
        /// Byte offset in the block.
        offset: u64,
        /// Encoded delta.
        data: &'a [u8],
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
        data: &'a [u8],
    },
    /// End of a section whose checksum matched.
    SectionEnd {
        /// Section number.
        seq: u64,
    },
    /// Device-state blob.
    State(&'a [u8]),
    /// BLAKE3 digest of guest memory.
    Digest([u8; 32]),
    /// End of migration.
    End,
}

/// Reads records from any `Read`, validating each.
pub struct StreamReader<R: Read> {
    inner: BufReader<R>,
    offset: u64,
    record: u64,
    what: Option<&'static str>,
    crc: crc32fast::Hasher,
    flags: u16,
    blocks: Vec<BlockDesc>,
    have_blocks: bool,
    last_block: Option<u16>,
    next_seq: u64,
    ended: bool,
    page: Vec<u8>,
    blob: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(inner: R) -> Result<Self, StreamError> {
        let mut r = StreamReader {
            inner: BufReader::with_capacity(1 << 20, inner),
            offset: 0,
            record: 0,
            what: Some("header"),
            crc: crc32fast::Hasher::new(),
            flags: 0,
            blocks: Vec::new(),
            have_blocks: false,
            last_block: None,
            next_seq: 0,
            ended: false,
            page: vec![0; PAGE_SIZE],
            blob: Vec::new(),
        };
        let mut magic = [0u8; 8];
        r.fill(&mut magic, "the header")?;
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

    /// Header flags (see [`FLAG_VERIFY`]).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Index of the record last read (0 = first after the header).
    pub fn record(&self) -> u64 {
        self.record
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

    fn fill_raw(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        let at = self.offset;
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(self.err_at(at + done as u64, StreamErrorKind::Truncated(what)))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err_at(at + done as u64, StreamErrorKind::Io(e))),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), StreamError> {
        self.fill_raw(buf, what)?;
        self.crc.update(buf);
        Ok(())
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, StreamError> {
        let mut b = [0u8; 1];
        self.fill(&mut b, what)?;
        Ok(b[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, StreamError> {
        let mut b = [0u8; 2];
        self.fill(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
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
        if kind.is_page() {
            let (block, offset) = self.page_addr(same)?;
            return self.page_record(kind, block, offset);
        }
        match kind {
            Kind::BlockList => {
                self.block_list(tag_at)?;
                Ok(Record::BlockList(&self.blocks))
            }
            Kind::SectionEnd => {
                let at = self.offset;
                let seq = self.u64("a section end")?;
                let computed = std::mem::take(&mut self.crc).finalize();
                let mut b = [0u8; 4];
                self.fill_raw(&mut b, "a section checksum")?;
                let found = u32::from_be_bytes(b);
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
                self.blob.clear();
                let mut chunk = [0u8; 8192];
                let mut left = len as usize;
                while left > 0 {
                    let n = left.min(chunk.len());
                    self.fill(&mut chunk[..n], "the device state")?;
                    self.blob.extend_from_slice(&chunk[..n]);
                    left -= n;
                }
                Ok(Record::State(&self.blob))
            }
            Kind::Digest => {
                let at = self.offset;
                let algo = self.u8("a digest")?;
                if algo != DIGEST_BLAKE3 {
                    return Err(self.err_at(at, StreamErrorKind::DigestAlgo(algo)));
                }
                let mut h = [0u8; 32];
                self.fill(&mut h, "a digest")?;
                Ok(Record::Digest(h))
            }
            Kind::End => {
                let at = self.offset;
                let computed = std::mem::take(&mut self.crc).finalize();
                let mut b = [0u8; 4];
                self.fill_raw(&mut b, "the end checksum")?;
                let found = u32::from_be_bytes(b);
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
            Kind::Zero | Kind::Raw | Kind::Xbzrle | Kind::Compressed => {
                unreachable!("page kinds handled above")
            }
        }
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

    fn page_record(
        &mut self,
        kind: Kind,
        block: u16,
        offset: u64,
    ) -> Result<Record<'_>, StreamError> {
        let mut page = std::mem::take(&mut self.page);
        let r = self.page_payload(kind, &mut page);
        self.page = page;
        let (n, algo) = r?;
        let data = &self.page[..n];
        Ok(match kind {
            Kind::Zero => Record::Zero { block, offset },
            Kind::Raw => Record::Raw {
                block,
                offset,
                data,
            },
            Kind::Xbzrle => Record::Xbzrle {
                block,
                offset,
                data,
            },
            _ => Record::Compressed {
                block,
                offset,
                algo,
                data,
            },
        })
    }

    /// Reads a page record's payload into `page`; returns its length and,
    /// for compressed pages, the algorithm id.
    fn page_payload(&mut self, kind: Kind, page: &mut [u8]) -> Result<(usize, u8), StreamError> {
        match kind {
            Kind::Zero => Ok((0, 0)),
            Kind::Raw => {
                self.fill(page, "a raw page")?;
                Ok((PAGE_SIZE, 0))
            }
            Kind::Xbzrle => {
                let n = self.len_field16("xbzrle payload", 1, PAGE_SIZE as u64)?;
                self.fill(&mut page[..n], "an xbzrle payload")?;
                Ok((n, 0))
            }
            _ => {
                let at = self.offset;
                let algo = self.u8("a compression algorithm")?;
                if algo != COMPRESS_ZSTD && algo != COMPRESS_LZ4 {
                    return Err(self.err_at(at, StreamErrorKind::CompressionAlgo(algo)));
                }
                let n = self.len_field16("compressed payload", 1, PAGE_SIZE as u64 - 1)?;
                self.fill(&mut page[..n], "a compressed payload")?;
                Ok((n, algo))
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
            let mut id = [0u8; 255];
            self.fill(&mut id[..n], "a block id")?;
            let id = match std::str::from_utf8(&id[..n]) {
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
