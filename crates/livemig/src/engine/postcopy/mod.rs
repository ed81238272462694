//! Postcopy: the guest moves to the destination before all of its memory
//! has; missing pages are fetched on demand while the source pushes the
//! rest.
//!
//! ```text
//! source (guest running)                         destination (guest paused)
//!   ... precopy pages ...     ─────────────────▶  loads them (memcpy)
//!   switch (command, or auto): pause, final sync
//!   ZERO_RUN* (pages never written here) ──────▶  zeros (precopy records: a
//!                                                 fresh memory stays untouched)
//!   DISCARD* (dirty bitmap)   ─────────────────▶  pages not valid here
//!   STATE, POSTCOPY, SECTION  ─────────────────▶  registers guest memory with
//!                                                 userfaultfd MISSING, drops the
//!                                                 discarded pages, loads devices
//!                             ◀─────────────────  LOADED   (or FAILED: source resumes)
//!   GO                        ─────────────────▶  resumes the guest
//!                             ◀─────────────────  STARTED
//!   postcopy-active                               postcopy-active
//!                             ◀─────────────────  REQUEST(block, offset, len)   a vCPU faulted
//!   requested page first      ─────────────────▶  UFFDIO_COPY (wakes the vCPU),
//!   (urgent channel if any)                       received bit set
//!   background pages, the scan restarted just after the requested page
//!   ... every page at most once ...
//!   END                       ─────────────────▶  every page received?
//!                             ◀─────────────────  COMPLETE(fault figures)  (or FAILED)
//!   completed: stays paused                       unregisters, completed
//! ```
//!
//! With page channels (`channels` above 1), every channel writes its own
//! POSTCOPY record (and ends its section) behind the final epoch barrier;
//! after it the channels carry the background pages, each batch flushed,
//! and the destination places them on one thread per channel. Requested
//! pages never go on a page channel (the urgent connection, else the main
//! one, which then carries no bulk pages).
//!
//! After GO the guest exists only on the destination, with part of its
//! memory still on the source: losing the source loses the guest. A
//! destination whose stream breaks during postcopy keeps its missing
//! memory registered (a vCPU that touches it waits for good) and reports
//! the loss; it never lets the guest read a missing page as zeros.
//!
//! Return-path messages after STARTED (destination → source), integers
//! big-endian, every field checked by [`MessageReader::read_message`] and
//! [`check_request`] like the stream:
//!
//! ```text
//! REQUEST   'Q' block:u16 offset:u64 len:u32      offset page-aligned, len 1..=MAX_REQUEST_PAGES pages,
//!                                                 inside the block (stream block index)
//! COMPLETE  'C' faults:u64 blocktime_us:u64 latency_sum_us:u64 p50_us:u64 p99_us:u64
//!               nthreads:u8 (tid:u32 blocktime_us:u64){nthreads}
//!               nbuckets:u8 count:[u64; nbuckets]  nbuckets <= LATENCY_BUCKETS, nthreads <= MAX_THREADS
//!               local_faults:u64 local_pages:u64 local_us:u64
//!                                                 faults served here with zeros (see FaultReport)
//! FAILED    'F' len:u16 text:[u8; len]            len <= MAX_REPLY_TEXT
//! BITMAP    'B' block:u16 first_word:u32 n:u16 word:[u64; n]
//!                                                 recovery: the received bitmap, 1..=MAX_BITMAP_WORDS
//!                                                 words, each block's words in order, none past its end
//! BITMAP_END 'E' blocks:u16                       recovery: every block's bitmap was sent
//! PROGRESS  'P' stream:u16 offset:u64             bytes of background stream `stream` (0 main,
//!                                                 i page channel i) read here so far
//! LOST      'L' stream:u16                        recovery: the destination lost connection `stream`
//!                                                 (i page channel i, 0xffff the urgent one): the
//!                                                 source pauses as after a cut of its own
//! ```
//!
//! PROGRESS is flow control for the background push: the source keeps at
//! most [`PUSH_WINDOW`] bytes per stream that the destination has not read
//! yet, counted from the moment the guest resumed there (the destination
//! had read every stream up to GO by then; after a recovery, up to its
//! received bitmap). A destination that sends no PROGRESS within
//! [`PROGRESS_GRACE`] gets no window. Without it, socket buffers fill with
//! megabytes of background pages, and a requested page that was already
//! on its way (or, over one stream, every requested page) waits behind
//! them: about 10 ms per remote fault on loopback, and 3-6 ms for the
//! guest's first fault when the window waited for the first PROGRESS
//! (5 MB pushed before it came).
//!
//! ## Recovery
//!
//! When a connection fails after GO, neither side gives the guest up
//! (when the caller allowed recovery: [`receive_recoverable`] on the
//! destination, [`crate::engine::MigrationHandle::set_postcopy_recovery`]
//! on the source; a control socket's `migrate` does). Without it, both
//! sides fail as when the source dies. Both report `postcopy-paused`; the
//! destination's guest runs on, and a thread that touches a missing page
//! waits in the kernel; nothing already placed is lost. A new connection
//! ([`crate::engine::MigrationHandle::recover_postcopy`] on the
//! destination, [`crate::engine::MigrationHandle::resume_postcopy`] on the
//! source; `migrate-recover` and `migrate` with `resume: true` over QMP)
//! resumes it:
//!
//! ```text
//!   postcopy-recover                              postcopy-recover
//!   stream header, block list ─────────────────▶  same blocks as before?
//!                             ◀─────────────────  BITMAP* BITMAP_END  (received pages)
//!   to send = complement of it                    REQUEST* again for every page a thread waits for
//!   (pages lost in flight go again)
//!   postcopy-active           ─────────────────▶  pages, END as before
//! ```
//!
//! The source reopens the urgent connection and the page channels the
//! migration had, to where its caller says
//! ([`crate::engine::MigrationHandle::resume_postcopy_with`]), in the
//! order of the first connection: after the main stream's start (which
//! announces them: header flags, channel record of a new session), the
//! urgent connection, then each page channel, whose stream starts with
//! its channel record, the block list and the POSTCOPY record. The
//! destination accepts them
//! ([`crate::engine::MigrationHandle::recover_postcopy_with`]) and
//! checks each as the first time (block list, channel count, session,
//! index) before it sends its bitmap; a refusal goes back as FAILED and
//! both sides stay paused. Given no way to open or accept them,
//! requested and background pages travel on the main connection alone.
//!
//! A cut may hit one connection only. The side that sees it tells the
//! other: the source writes an ABORT record on the connections still
//! alive (their streams fail at the destination, which pauses); the
//! destination sends LOST on the return path (the source pauses).
//! If the source *process* is gone, no recovery can complete the guest:
//! the destination stays paused until its caller gives up
//! ([`crate::engine::MigrationHandle::cancel`]), then reports the loss.
//!
//! Stream records (see `stream/format.rs`): DISCARD and POSTCOPY. The
//! discard set is the source's migration bitmap at the switch: every page
//! dirtied since it was last sent, whether or not an older copy arrived.

mod ahead;
pub(crate) mod dest;
mod histogram;
mod push;
mod runs;
pub(crate) mod switchover;
pub(crate) mod window;

use std::io::{self, Read, Write};

pub(crate) use ahead::{Plan as PausePlan, PAUSE_BYTES};
pub use dest::{
    receive, receive_recoverable, Connection, ConnectionError, IncomingGuest, LostCause,
    PostcopyFigures, ReceiveError, Received,
};
pub use histogram::LatencyHistogram;
pub(crate) use push::PushBatch;

use crate::bitmap::DirtyBitmap;
use crate::memory::PAGE_SIZE;
use crate::stream::format::MAX_REPLY_TEXT;

/// Most pages one request may ask for.
pub const MAX_REQUEST_PAGES: u32 = 512;
/// Power-of-two latency buckets: bucket i counts faults of `[2^i, 2^(i+1))`
/// µs (bucket 0 also counts 0 µs).
pub const LATENCY_BUCKETS: usize = 32;
/// Most faulting threads whose blocktime a COMPLETE carries.
pub const MAX_THREADS: usize = 255;
/// Most bitmap words one BITMAP message carries.
pub const MAX_BITMAP_WORDS: u16 = 1024;
/// Background-stream bytes the source may have in flight per stream
/// (sent, not yet read by the destination) once it gets PROGRESS.
pub const PUSH_WINDOW: u64 = 256 << 10;
/// How long the source keeps the window closed on a destination that has
/// sent no PROGRESS yet (an older destination sends none: it gets no
/// window after this).
pub const PROGRESS_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// The destination reports PROGRESS after at least this many bytes.
pub const PROGRESS_EVERY: u64 = 64 << 10;

const TAG_REQUEST: u8 = b'Q';
const TAG_COMPLETE: u8 = b'C';
const TAG_FAILED: u8 = b'F';
const TAG_BITMAP: u8 = b'B';
const TAG_BITMAP_END: u8 = b'E';
const TAG_PROGRESS: u8 = b'P';
const TAG_LOST: u8 = b'L';
/// The stream index LOST gives the urgent connection.
pub const URGENT_STREAM: u16 = u16::MAX;

/// A page request as it came off the return path (not yet checked
/// against the block list: see [`check_request`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Stream block index.
    pub block: u16,
    /// Byte offset in the block.
    pub offset: u64,
    /// Bytes asked for.
    pub len: u32,
}

/// What the destination measured during postcopy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// Remote faults (a guest thread waited for a page from the source).
    pub faults: u64,
    /// Sum over faulting threads of the time they waited, µs.
    pub blocktime_us: u64,
    /// Sum of fault → placement latencies, µs.
    pub latency_sum_us: u64,
    /// Median fault latency, µs.
    pub p50_us: u64,
    /// 99th percentile fault latency, µs.
    pub p99_us: u64,
    /// Per faulting thread (vCPU threads of a VM): (thread id, µs waited).
    pub threads: Vec<(u32, u64)>,
    /// Fault latencies per power-of-two µs bucket.
    pub buckets: Vec<u64>,
    /// Local faults: a guest thread touched a page that was valid here but
    /// never written, and the destination filled it (and the valid pages
    /// after it) with zeros itself, asking the source for nothing. Not
    /// counted in `faults`, the latencies or the blocktime above. A fault
    /// on a page placed meanwhile (nothing left to fill) is not one.
    pub local_faults: u64,
    /// Pages those local faults filled with zeros.
    pub local_pages: u64,
    /// Sum over local faults of the µs from reading the fault to waking
    /// its thread.
    pub local_us: u64,
}

/// One message on the return path after STARTED.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A guest thread waits for these pages.
    Request(PageRequest),
    /// Every page arrived; the destination's figures.
    Complete(FaultReport),
    /// The destination failed (its guest cannot go on).
    Failed(String),
    /// Recovery: part of the destination's received bitmap (a set bit is
    /// a page valid there).
    Bitmap {
        /// Stream block index.
        block: u16,
        /// Index of the first word in the block's bitmap.
        first_word: u32,
        /// The words.
        words: Vec<u64>,
    },
    /// Recovery: the received bitmap is complete (`blocks` blocks sent).
    BitmapEnd {
        /// Blocks whose bitmap was sent.
        blocks: u16,
    },
    /// Flow control: the destination has read `offset` bytes of stream
    /// `stream` (0 the main stream, i page channel i).
    Progress {
        /// Which stream.
        stream: u16,
        /// Bytes read from it so far.
        offset: u64,
    },
    /// Recovery: the destination lost the connection of stream `stream`
    /// (i page channel i, [`URGENT_STREAM`] the urgent connection); the
    /// source pauses postcopy.
    Lost {
        /// Which connection.
        stream: u16,
    },
}

/// Why a postcopy message or request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The return path broke or ended.
    #[error("return path byte {offset}: {source}")]
    Io {
        /// Byte offset in the postcopy part of the return path.
        offset: u64,
        /// Transport error.
        #[source]
        source: io::Error,
    },
    /// A message whose tag is unknown.
    #[error("return path byte {offset}: unknown postcopy message tag {tag:#04x}")]
    UnknownTag {
        /// Byte offset of the tag.
        offset: u64,
        /// The tag.
        tag: u8,
    },
    /// A length field out of bounds.
    #[error("return path byte {offset}: {what} {value} outside 0..={max}")]
    BadCount {
        /// Byte offset of the field.
        offset: u64,
        /// Which field.
        what: &'static str,
        /// Value found.
        value: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A request for a block the stream does not have.
    #[error("return path byte {offset}: page request for block index {block}, the stream has {count} blocks")]
    UnknownBlock {
        /// Byte offset of the message.
        offset: u64,
        /// Block index asked for.
        block: u16,
        /// Blocks in the stream.
        count: usize,
    },
    /// A request that is not whole pages inside its block.
    #[error("return path byte {offset}: page request for {len} bytes at {offset_in_block:#x} of block '{id}' ({block_len:#x} bytes): not whole pages inside the block")]
    BadRange {
        /// Byte offset of the message.
        offset: u64,
        /// Block id.
        id: String,
        /// Offset asked for.
        offset_in_block: u64,
        /// Length asked for.
        len: u32,
        /// Block length.
        block_len: u64,
    },
    /// The destination said COMPLETE while pages were still to be sent.
    #[error("the destination reported COMPLETE with {0} pages not yet sent")]
    EarlyComplete(u64),
    /// The destination did not confirm the end of postcopy: its return
    /// path failed.
    #[error("no COMPLETE from the destination after the last page: {0}")]
    NoComplete(#[source] Box<PostcopyError>),
    /// The return path closed during postcopy, before COMPLETE.
    #[error("no COMPLETE from the destination: the return path closed during postcopy")]
    ReturnPathClosed,
    /// The destination did not confirm the end of postcopy in time.
    #[error("no COMPLETE from the destination within {0:?} after the last page")]
    CompleteTimeout(std::time::Duration),
    /// Postcopy was paused by a lost connection and given up (cancel)
    /// before any recovery: the destination cannot complete the guest.
    #[error("postcopy given up while paused after a lost connection ({0}): the destination cannot complete the guest")]
    Abandoned(#[source] Box<crate::engine::MigrationError>),
    /// A recovery message where a page request was expected.
    #[error("return path byte {offset}: a received-bitmap message outside recovery")]
    NotRequest {
        /// Byte offset of the message.
        offset: u64,
    },
    /// A received bitmap (recovery) that does not fit the blocks.
    #[error("return path byte {offset}: received bitmap: {what}")]
    BadBitmap {
        /// Byte offset of the message.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The destination lost one of its postcopy connections (LOST): a cut
    /// on a connection this side may not have noticed yet.
    #[error("return path byte {offset}: the destination lost postcopy connection {stream} (65535: the urgent one)")]
    PeerLost {
        /// Byte offset of the message.
        offset: u64,
        /// Which connection.
        stream: u16,
    },
    /// Recovery: the destination sent something else than its bitmap.
    #[error("return path byte {offset}: expected the received bitmap, got {got}")]
    NotBitmap {
        /// Byte offset of the message.
        offset: u64,
        /// What came instead.
        got: &'static str,
    },
}

/// Writes one message and flushes.
pub fn write_message(w: &mut dyn Write, m: &Message) -> io::Result<()> {
    let mut b = Vec::with_capacity(32);
    match m {
        Message::Request(r) => {
            b.push(TAG_REQUEST);
            b.extend_from_slice(&r.block.to_be_bytes());
            b.extend_from_slice(&r.offset.to_be_bytes());
            b.extend_from_slice(&r.len.to_be_bytes());
        }
        Message::Complete(f) => {
            b.push(TAG_COMPLETE);
            for v in [
                f.faults,
                f.blocktime_us,
                f.latency_sum_us,
                f.p50_us,
                f.p99_us,
            ] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            let threads = &f.threads[..f.threads.len().min(MAX_THREADS)];
            b.push(threads.len() as u8);
            for (tid, us) in threads {
                b.extend_from_slice(&tid.to_be_bytes());
                b.extend_from_slice(&us.to_be_bytes());
            }
            let buckets = &f.buckets[..f.buckets.len().min(LATENCY_BUCKETS)];
            b.push(buckets.len() as u8);
            for c in buckets {
                b.extend_from_slice(&c.to_be_bytes());
            }
            for v in [f.local_faults, f.local_pages, f.local_us] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        Message::Failed(text) => {
            let t = &text.as_bytes()[..text.len().min(MAX_REPLY_TEXT as usize)];
            b.push(TAG_FAILED);
            b.extend_from_slice(&(t.len() as u16).to_be_bytes());
            b.extend_from_slice(t);
        }
        Message::Bitmap {
            block,
            first_word,
            words,
        } => {
            b.push(TAG_BITMAP);
            b.extend_from_slice(&block.to_be_bytes());
            b.extend_from_slice(&first_word.to_be_bytes());
            let words = &words[..words.len().min(usize::from(MAX_BITMAP_WORDS))];
            b.extend_from_slice(&(words.len() as u16).to_be_bytes());
            for x in words {
                b.extend_from_slice(&x.to_be_bytes());
            }
        }
        Message::BitmapEnd { blocks } => {
            b.push(TAG_BITMAP_END);
            b.extend_from_slice(&blocks.to_be_bytes());
        }
        Message::Progress { stream, offset } => {
            b.push(TAG_PROGRESS);
            b.extend_from_slice(&stream.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
        }
        Message::Lost { stream } => {
            b.push(TAG_LOST);
            b.extend_from_slice(&stream.to_be_bytes());
        }
    }
    w.write_all(&b)?;
    w.flush()
}

/// Reads postcopy messages, counting bytes so errors name where.
pub struct MessageReader<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> MessageReader<R> {
    /// Reads messages from `inner` (the return path after STARTED).
    pub fn new(inner: R) -> Self {
        MessageReader { inner, offset: 0 }
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], PostcopyError> {
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|source| PostcopyError::Io {
                offset: self.offset,
                source,
            })?;
        self.offset += N as u64;
        Ok(b)
    }

    fn u64(&mut self) -> Result<u64, PostcopyError> {
        Ok(u64::from_be_bytes(self.bytes()?))
    }

    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, PostcopyError> {
        let at = self.offset;
        let n = usize::from(self.bytes::<1>()?[0]);
        if n > max {
            return Err(PostcopyError::BadCount {
                offset: at,
                what,
                value: n as u64,
                max: max as u64,
            });
        }
        Ok(n)
    }

    /// Reads one message; never allocates more than the bounds above.
    pub fn read_message(&mut self) -> Result<(u64, Message), PostcopyError> {
        self.read_message_waiting(&|| false)
    }

    /// As [`MessageReader::read_message`], but a transport timeout before
    /// the first byte of a message is retried while `keep_waiting()` holds:
    /// the destination is silent while no guest thread faults, which may
    /// last longer than the transport's I/O timeout.
    pub fn read_message_waiting(
        &mut self,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<(u64, Message), PostcopyError> {
        let at = self.offset;
        let mut first = [0u8; 1];
        loop {
            match self.inner.read(&mut first) {
                Ok(1) => break,
                Ok(_) => {
                    return Err(PostcopyError::Io {
                        offset: at,
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::WouldBlock
                    ) && (e.kind() == io::ErrorKind::Interrupted || keep_waiting()) => {}
                Err(source) => return Err(PostcopyError::Io { offset: at, source }),
            }
        }
        self.offset += 1;
        let tag = first[0];
        let m = match tag {
            TAG_REQUEST => {
                let block = u16::from_be_bytes(self.bytes()?);
                let offset = self.u64()?;
                let len = u32::from_be_bytes(self.bytes()?);
                Message::Request(PageRequest { block, offset, len })
            }
            TAG_COMPLETE => {
                let mut f = FaultReport {
                    faults: self.u64()?,
                    blocktime_us: self.u64()?,
                    latency_sum_us: self.u64()?,
                    p50_us: self.u64()?,
                    p99_us: self.u64()?,
                    ..FaultReport::default()
                };
                let n = self.count("thread count", MAX_THREADS)?;
                for _ in 0..n {
                    let tid = u32::from_be_bytes(self.bytes()?);
                    f.threads.push((tid, self.u64()?));
                }
                let n = self.count("latency bucket count", LATENCY_BUCKETS)?;
                for _ in 0..n {
                    f.buckets.push(self.u64()?);
                }
                f.local_faults = self.u64()?;
                f.local_pages = self.u64()?;
                f.local_us = self.u64()?;
                Message::Complete(f)
            }
            TAG_FAILED => {
                let lat = self.offset;
                let len = u16::from_be_bytes(self.bytes()?);
                if u32::from(len) > MAX_REPLY_TEXT {
                    return Err(PostcopyError::BadCount {
                        offset: lat,
                        what: "failure text length",
                        value: len.into(),
                        max: MAX_REPLY_TEXT.into(),
                    });
                }
                let mut t = vec![0u8; usize::from(len)];
                self.inner
                    .read_exact(&mut t)
                    .map_err(|source| PostcopyError::Io {
                        offset: self.offset,
                        source,
                    })?;
                self.offset += u64::from(len);
                Message::Failed(String::from_utf8_lossy(&t).into_owned())
            }
            TAG_BITMAP => {
                let block = u16::from_be_bytes(self.bytes()?);
                let first_word = u32::from_be_bytes(self.bytes()?);
                let nat = self.offset;
                let n = u16::from_be_bytes(self.bytes()?);
                if n == 0 || n > MAX_BITMAP_WORDS {
                    return Err(PostcopyError::BadCount {
                        offset: nat,
                        what: "bitmap word count",
                        value: n.into(),
                        max: MAX_BITMAP_WORDS.into(),
                    });
                }
                let mut words = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    words.push(self.u64()?);
                }
                Message::Bitmap {
                    block,
                    first_word,
                    words,
                }
            }
            TAG_BITMAP_END => Message::BitmapEnd {
                blocks: u16::from_be_bytes(self.bytes()?),
            },
            TAG_PROGRESS => Message::Progress {
                stream: u16::from_be_bytes(self.bytes()?),
                offset: self.u64()?,
            },
            TAG_LOST => Message::Lost {
                stream: u16::from_be_bytes(self.bytes()?),
            },
            tag => return Err(PostcopyError::UnknownTag { offset: at, tag }),
        };
        Ok((at, m))
    }
}

/// Checks a request against the stream's blocks (`(id, length)` in stream
/// order); returns (block index, first page, page count). `at` is the
/// message's byte offset, for the error.
pub fn check_request(
    blocks: &[(String, u64)],
    at: u64,
    r: &PageRequest,
) -> Result<(usize, u64, u64), PostcopyError> {
    let b = usize::from(r.block);
    let Some((id, block_len)) = blocks.get(b) else {
        return Err(PostcopyError::UnknownBlock {
            offset: at,
            block: r.block,
            count: blocks.len(),
        });
    };
    let page = PAGE_SIZE as u64;
    let len = u64::from(r.len);
    let whole = len > 0
        && len.is_multiple_of(page)
        && len / page <= u64::from(MAX_REQUEST_PAGES)
        && r.offset.is_multiple_of(page)
        && r.offset.checked_add(len).is_some_and(|e| e <= *block_len);
    if !whole {
        return Err(PostcopyError::BadRange {
            offset: at,
            id: id.clone(),
            offset_in_block: r.offset,
            len: r.len,
            block_len: *block_len,
        });
    }
    Ok((b, r.offset / page, len / page))
}

/// Writes the received bitmap (one bitmap per stream block, a set bit a
/// page valid here) as BITMAP messages and BITMAP_END, then flushes.
pub fn write_bitmap(w: &mut dyn Write, blocks: &[Vec<u64>]) -> io::Result<()> {
    for (b, words) in blocks.iter().enumerate() {
        for (k, part) in words.chunks(usize::from(MAX_BITMAP_WORDS)).enumerate() {
            write_message(
                w,
                &Message::Bitmap {
                    block: b as u16,
                    first_word: (k * usize::from(MAX_BITMAP_WORDS)) as u32,
                    words: part.to_vec(),
                },
            )?;
        }
    }
    write_message(
        w,
        &Message::BitmapEnd {
            blocks: blocks.len() as u16,
        },
    )
}

/// The source's side of recovery: assembles the destination's received
/// bitmap from BITMAP messages, checking each against the blocks.
pub struct BitmapAssembler {
    /// Pages per block.
    pages: Vec<u64>,
    /// Words per block, as received so far.
    words: Vec<Vec<u64>>,
}

impl BitmapAssembler {
    /// For blocks of these lengths in bytes (stream order).
    pub fn new(block_lens: &[u64]) -> Self {
        let pages: Vec<u64> = block_lens.iter().map(|l| l / PAGE_SIZE as u64).collect();
        BitmapAssembler {
            words: pages.iter().map(|_| Vec::new()).collect(),
            pages,
        }
    }

    /// Takes one message (at byte `at`); `Ok(true)` once BITMAP_END came
    /// and every block is complete.
    pub fn add(&mut self, at: u64, m: &Message) -> Result<bool, PostcopyError> {
        let bad = |what: String| PostcopyError::BadBitmap { offset: at, what };
        match m {
            Message::Bitmap {
                block,
                first_word,
                words,
            } => {
                let b = usize::from(*block);
                let Some(have) = self.words.get_mut(b) else {
                    return Err(bad(format!(
                        "block index {block}, the stream has {} blocks",
                        self.pages.len()
                    )));
                };
                let want = self.pages[b].div_ceil(64);
                if u64::from(*first_word) != have.len() as u64 {
                    return Err(bad(format!(
                        "block {block} word {first_word}, expected word {} next",
                        have.len()
                    )));
                }
                if have.len() as u64 + words.len() as u64 > want {
                    return Err(bad(format!(
                        "block {block}: words {first_word}..{} past its {want} words",
                        u64::from(*first_word) + words.len() as u64
                    )));
                }
                have.extend_from_slice(words);
                Ok(false)
            }
            Message::BitmapEnd { blocks } => {
                if usize::from(*blocks) != self.pages.len() {
                    return Err(bad(format!(
                        "end after {blocks} blocks, the stream has {}",
                        self.pages.len()
                    )));
                }
                for (b, have) in self.words.iter().enumerate() {
                    let want = self.pages[b].div_ceil(64);
                    if have.len() as u64 != want {
                        return Err(bad(format!(
                            "block {b}: {} of its {want} words before the end",
                            have.len()
                        )));
                    }
                }
                Ok(true)
            }
            Message::Request(_) => Err(PostcopyError::NotBitmap {
                offset: at,
                got: "a page request",
            }),
            Message::Complete(_) => Err(PostcopyError::NotBitmap {
                offset: at,
                got: "COMPLETE",
            }),
            Message::Failed(_) => Err(PostcopyError::NotBitmap {
                offset: at,
                got: "FAILED",
            }),
            Message::Progress { .. } => Err(PostcopyError::NotBitmap {
                offset: at,
                got: "PROGRESS",
            }),
            Message::Lost { .. } => Err(PostcopyError::NotBitmap {
                offset: at,
                got: "LOST",
            }),
        }
    }

    /// After the end: per block, the pages the destination lacks (the
    /// complement of what it received).
    pub fn missing(&self) -> Vec<DirtyBitmap> {
        self.words
            .iter()
            .zip(&self.pages)
            .map(|(words, &pages)| {
                let mut bm = DirtyBitmap::new(pages);
                let inv: Vec<u64> = words.iter().map(|w| !w).collect();
                bm.or_words(0, &inv);
                bm
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
