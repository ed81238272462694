//! The destination side: validates every record, then applies it to guest
//! memory whose layout comes from the destination's own configuration.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use super::digest::{hex, memory_digest};
use crate::compress::{Algorithm, Decompressor};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::stream::format::FLAG_VERIFY;
use crate::stream::{Record, StreamError, StreamReader};
use crate::{xbzrle, zero};

/// Why loading failed. Nothing outside a block was written; the guest
/// must not be started from memory that failed to load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The stream itself is bad (or the transport failed).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The stream's block list does not match this destination's memory.
    #[error("stream byte {offset}: block list does not match the destination: {what}")]
    Layout {
        /// Byte offset of the block list.
        offset: u64,
        /// What differs.
        what: String,
    },
    /// An XBZRLE delta did not decode against the destination's page.
    #[error("stream byte {offset}, record {record}: xbzrle page at {block}+{page_offset:#x} does not decode: {source}")]
    Xbzrle {
        /// Byte offset after the record.
        offset: u64,
        /// Record index.
        record: u64,
        /// Block id.
        block: String,
        /// Offset in the block.
        page_offset: u64,
        /// Decoder error.
        source: xbzrle::Error,
    },
    /// A compressed page did not decompress to exactly one page.
    #[error("stream byte {offset}, record {record}: compressed page at {block}+{page_offset:#x}: {source}")]
    Decompress {
        /// Byte offset after the record.
        offset: u64,
        /// Record index.
        record: u64,
        /// Block id.
        block: String,
        /// Offset in the block.
        page_offset: u64,
        /// Decompressor error.
        source: crate::compress::Error,
    },
    /// The stream promised a digest (verify mode) but ended without one.
    #[error("stream ended without the memory digest its header promised")]
    NoDigest,
    /// The memory loaded differs from the source's at stop time.
    #[error("memory digest mismatch: source {expected}, destination {actual}")]
    DigestMismatch {
        /// Source's digest (hex).
        expected: String,
        /// Destination's digest (hex).
        actual: String,
    },
}

/// Figures of a load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LoadStats {
    /// Stream bytes read.
    pub bytes: u64,
    /// Zero-page records.
    pub zero_pages: u64,
    /// Zero-page records that needed a write (page was not already zero).
    pub zero_pages_written: u64,
    /// Raw pages.
    pub raw_pages: u64,
    /// XBZRLE pages.
    pub xbzrle_pages: u64,
    /// Compressed pages.
    pub compressed_pages: u64,
    /// Sections.
    pub sections: u64,
    /// Milliseconds spent hashing memory to check the source's digest.
    pub verify_time: u64,
}

/// What a successful load produced.
#[derive(Clone, Debug, Default)]
pub struct LoadOutcome {
    /// The device-state blob, empty if none was sent.
    pub state: Vec<u8>,
    /// The digest both sides agreed on (verify mode).
    pub digest: Option<[u8; 32]>,
    /// Figures.
    pub stats: LoadStats,
}

/// Loads a stream into guest memory.
pub struct Loader<'a> {
    mem: &'a dyn GuestMemory,
    progress: Arc<AtomicU64>,
}

impl<'a> Loader<'a> {
    /// A loader into `mem`.
    pub fn new(mem: &'a dyn GuestMemory) -> Self {
        Loader {
            mem,
            progress: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Stream bytes read so far, readable from another thread.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// Reads the whole stream and applies it. Returns after the end record.
    pub fn load<R: Read>(&mut self, input: R) -> Result<LoadOutcome, LoadError> {
        let mut r = StreamReader::new(input)?;
        let verify = r.flags() & FLAG_VERIFY != 0;
        let blocks = self.mem.blocks();
        // Stream block index -> destination block.
        let mut map: Vec<usize> = Vec::new();
        let mut out = LoadOutcome::default();
        let mut scratch = vec![0u8; PAGE_SIZE];
        let mut dec = Decompressor::new();
        loop {
            let at = r.offset();
            let rec = r.next_record()?;
            match rec {
                Record::BlockList(list) => {
                    map = self
                        .match_layout(list)
                        .map_err(|what| LoadError::Layout { offset: at, what })?;
                }
                Record::Zero { block, offset } => {
                    out.stats.zero_pages += 1;
                    let region = blocks[map[usize::from(block)]].region();
                    let off = offset as usize;
                    if region.scan(off, PAGE_SIZE, zero::is_zero) != Some(true) {
                        region.write(off, &ZERO_PAGE);
                        out.stats.zero_pages_written += 1;
                    }
                }
                Record::Raw {
                    block,
                    offset,
                    data,
                } => {
                    out.stats.raw_pages += 1;
                    blocks[map[usize::from(block)]]
                        .region()
                        .write(offset as usize, data);
                }
                Record::Xbzrle {
                    block,
                    offset,
                    data,
                } => {
                    out.stats.xbzrle_pages += 1;
                    let b = &blocks[map[usize::from(block)]];
                    b.region().read(offset as usize, &mut scratch);
                    if let Err(source) = xbzrle::decode(data, &mut scratch) {
                        return Err(LoadError::Xbzrle {
                            offset: r.offset(),
                            record: r.record(),
                            block: b.id().to_string(),
                            page_offset: offset,
                            source,
                        });
                    }
                    b.region().write(offset as usize, &scratch);
                }
                Record::Compressed {
                    block,
                    offset,
                    algo,
                    data,
                } => {
                    out.stats.compressed_pages += 1;
                    let b = &blocks[map[usize::from(block)]];
                    let algo = Algorithm::from_u8(algo).expect("reader checked the algorithm id");
                    if let Err(source) = dec.decompress(algo, data, &mut scratch) {
                        return Err(LoadError::Decompress {
                            offset: r.offset(),
                            record: r.record(),
                            block: b.id().to_string(),
                            page_offset: offset,
                            source,
                        });
                    }
                    b.region().write(offset as usize, &scratch);
                }
                Record::SectionEnd { .. } => {
                    out.stats.sections += 1;
                    self.progress.store(r.offset(), Ordering::Relaxed);
                }
                Record::State(blob) => out.state = blob.to_vec(),
                Record::Digest(d) => out.digest = Some(d),
                Record::End => break,
            }
        }
        out.stats.bytes = r.offset();
        self.progress.store(r.offset(), Ordering::Relaxed);
        if verify {
            let Some(expected) = out.digest else {
                return Err(LoadError::NoDigest);
            };
            let t = std::time::Instant::now();
            let actual = memory_digest(self.mem);
            out.stats.verify_time = t.elapsed().as_millis() as u64;
            if actual != expected {
                return Err(LoadError::DigestMismatch {
                    expected: hex(&expected),
                    actual: hex(&actual),
                });
            }
        }
        Ok(out)
    }

    fn match_layout(&self, list: &[crate::stream::BlockDesc]) -> Result<Vec<usize>, String> {
        let blocks = self.mem.blocks();
        if list.len() != blocks.len() {
            return Err(format!(
                "stream has {} RAM blocks, destination has {}",
                list.len(),
                blocks.len()
            ));
        }
        list.iter()
            .map(|d| {
                let i = self
                    .mem
                    .find(&d.id)
                    .ok_or_else(|| format!("stream block '{}' does not exist here", d.id))?;
                if blocks[i].len() != d.len {
                    return Err(format!(
                        "block '{}' is {} bytes in the stream, {} here",
                        d.id,
                        d.len,
                        blocks[i].len()
                    ));
                }
                Ok(i)
            })
            .collect()
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
