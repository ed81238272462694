//! The destination side: validates every record, then applies it to guest
//! memory whose layout comes from the destination's own configuration.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::channels::{BarrierError, EpochBarrier};
use super::digest::{hex, memory_digest, RunningDigest};
use super::fresh::FreshZero;
use super::prefault::Prefault;
use crate::codec::compress::{Algorithm, Decompressor};
use crate::codec::{xbzrle, zero};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::stream::format::{FLAG_CHANNELS, FLAG_LOAD_REPORT, FLAG_SETUP, FLAG_VERIFY};
use crate::stream::{Record, StreamError, StreamReader};
use crate::transport::BoxWrite;
use crate::vm::{SetupHook, SourceGuest, VmShape};

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
        #[source]
        what: LayoutMismatch,
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
        source: crate::codec::compress::Error,
    },
    /// The stream promised a digest (verify mode) but ended without one.
    #[error("stream ended without the memory digest its header promised")]
    NoDigest,
    /// A channel broke the multi-channel protocol.
    #[error("channel {channel}, stream byte {offset}: {what}")]
    Channel {
        /// Channel index (0 = main).
        channel: u16,
        /// Byte offset in that channel's stream.
        offset: u64,
        /// What was wrong.
        what: String,
    },
    /// Accepting a page channel's connection failed.
    #[error("accepting connection {n} of {channels} page channels: {source}")]
    Accept {
        /// Which connection after the main one (1-based).
        n: u16,
        /// Page channels the main stream declared.
        channels: u16,
        /// Transport error.
        source: io::Error,
    },
    /// The start of a page channel's connection was bad.
    #[error("page channel connection {n}: {source}")]
    OnConnection {
        /// Which connection after the main one (1-based).
        n: u16,
        /// What was wrong.
        source: Box<LoadError>,
    },
    /// An error on page channel `channel`.
    #[error("page channel {channel}: {source}")]
    OnChannel {
        /// Channel index (1-based).
        channel: u16,
        /// What was wrong.
        source: Box<LoadError>,
    },
    /// Stopped because another channel failed (never returned alone).
    #[error("stopped because another channel failed")]
    Aborted,
    /// A postcopy record out of place, or a postcopy this loader cannot run.
    #[error("stream byte {offset}: {cause}")]
    Postcopy {
        /// Byte offset of the record.
        offset: u64,
        /// What was wrong.
        #[source]
        cause: PostcopyLoadError,
    },
    /// The source's VM has another number of vCPUs than this destination's
    /// (checked at setup, before any page).
    #[error(
        "stream byte {offset}: the source's VM has {source_vcpus} vCPUs, this destination's {here}"
    )]
    Vcpus {
        /// Byte offset of the setup record.
        offset: u64,
        /// vCPUs of the source's VM.
        source_vcpus: u32,
        /// vCPUs of this destination's VM.
        here: u32,
    },
    /// The source gave up and said why (an ABORT record): nothing it sent
    /// may run.
    #[error("source aborted: {reason}")]
    SourceAborted {
        /// The source's reason.
        reason: String,
    },
    /// The setup was checked (or a drain mark reached) but the answer
    /// could not be sent back on the return path.
    #[error("answering the source on the return path: {0}")]
    Answer(#[source] io::Error),
    /// The memory loaded differs from the source's at stop time.
    #[error("memory digest mismatch: source {expected}, destination {actual}")]
    DigestMismatch {
        /// Source's digest (hex).
        expected: String,
        /// Destination's digest (hex).
        actual: String,
    },
}

/// What was wrong with a postcopy record or connection on the
/// destination ([`LoadError::Postcopy`]).
#[derive(Debug, thiserror::Error)]
pub enum PostcopyLoadError {
    /// The source switched to postcopy, which this destination does not
    /// run (allow it here: engine::Destination::postcopy).
    #[error(
        "the source switched to postcopy, which this destination does not run \
         (allow it here: engine::Destination::postcopy)"
    )]
    NotAllowed,
    /// A page channel and the main channel disagree about the postcopy
    /// switch.
    #[error("a page channel and the main channel disagree about the postcopy switch")]
    ChannelsDisagree,
    /// The main channel switched to postcopy, but not every page channel
    /// did.
    #[error("the main channel switched to postcopy, but not every page channel did")]
    NotEveryChannel,
    /// The postcopy switch record must end its section.
    #[error("the postcopy switch record must end its section")]
    SwitchNotLast,
    /// Postcopy switch before the block list.
    #[error("postcopy switch before the block list")]
    BeforeBlockList,
    /// Postcopy switch in a stream without a return path.
    #[error("postcopy switch in a stream without a return path")]
    NoReturnPath,
    /// Accepting the postcopy urgent connection failed.
    #[error("accepting the postcopy urgent connection: {source}")]
    AcceptUrgent {
        /// Transport error.
        #[source]
        source: io::Error,
    },
    /// The postcopy urgent connection's start was bad.
    #[error("opening the postcopy urgent connection: {source}")]
    OpenUrgent {
        /// What was wrong.
        #[source]
        source: Box<LoadError>,
    },
    /// The source wants an urgent connection (postcopy-preempt) but this
    /// destination accepts none.
    #[error(
        "the source wants an urgent connection (postcopy-preempt) but this destination accepts none"
    )]
    NoUrgent,
    /// The urgent connection's block list differs from the main stream's.
    #[error("the urgent connection's block list differs from the main stream's")]
    UrgentBlocks,
    /// The connection must start with the block list.
    #[error("the connection must start with the block list")]
    NoBlockList,
    /// Placing a run of pages into guest memory failed.
    #[error("placing pages {start:#x}..{end:#x} of block {block}: {source}")]
    Place {
        /// Block index in the stream.
        block: usize,
        /// Offset in the block of the run's first page.
        start: u64,
        /// Offset in the block after its last page.
        end: u64,
        /// The placing error.
        #[source]
        source: io::Error,
    },
    /// A page record for a page outside the guest's memory.
    #[error("page {offset:#x} of block {block}: outside the guest's memory")]
    OutsideMemory {
        /// Block index in the stream.
        block: u16,
        /// Offset in the block.
        offset: u64,
    },
    /// A raw page record whose data is not one page long.
    #[error("page {offset:#x} of block {block}: {len} bytes, not a page")]
    NotAPage {
        /// Block index in the stream.
        block: u16,
        /// Offset in the block.
        offset: u64,
        /// Its data's length.
        len: usize,
    },
    /// A record of kind `what` came after the postcopy switch, where only
    /// pages may come.
    #[error("{what} after the postcopy switch")]
    AfterSwitch {
        /// The record's kind.
        what: &'static str,
    },
}

/// How a stream's block list differs from the destination's memory.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutMismatch {
    /// Another number of RAM blocks.
    #[error("stream has {stream} RAM blocks, destination has {here}")]
    BlockCount {
        /// Blocks in the stream.
        stream: usize,
        /// Blocks here.
        here: usize,
    },
    /// A block this destination does not have.
    #[error("stream block '{0}' does not exist here")]
    UnknownBlock(String),
    /// A block of another length.
    #[error("block '{id}' is {stream} bytes in the stream, {here} here")]
    Length {
        /// Block id.
        id: String,
        /// Its length in the stream.
        stream: u64,
        /// Its length here.
        here: u64,
    },
}

/// Figures of a load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LoadStats {
    /// Stream bytes read.
    pub bytes: u64,
    /// Zero pages: ZERO records and the pages of ZERO_RUN records.
    pub zero_pages: u64,
    /// Zero pages that needed a write (the page was not already zero).
    pub zero_pages_written: u64,
    /// Raw pages (those of runs included).
    pub raw_pages: u64,
    /// RUN records (raw pages read straight into guest memory).
    pub runs: u64,
    /// XBZRLE pages.
    pub xbzrle_pages: u64,
    /// Compressed pages.
    pub compressed_pages: u64,
    /// Sections.
    pub sections: u64,
    /// Milliseconds spent hashing memory to check the source's digest.
    pub verify_time: u64,
    /// Digest chunks (2 MiB) hashed for that check after the stream's
    /// end (those written since they were last hashed; all of them
    /// without a running digest).
    #[serde(default)]
    pub verify_chunks: u64,
    /// Page channels beside the main stream (0: a single stream).
    pub channels: u16,
    /// Microseconds from reading the main stream's end record to the
    /// load's return (the last channel and helper threads joined, the
    /// digest checked): the destination's part of the pause's END to
    /// LOADED leg before the device state is restored.
    #[serde(default)]
    pub end_us: u64,
}

impl LoadStats {
    fn add(&mut self, o: &LoadStats) {
        self.bytes += o.bytes;
        self.zero_pages += o.zero_pages;
        self.zero_pages_written += o.zero_pages_written;
        self.raw_pages += o.raw_pages;
        self.runs += o.runs;
        self.xbzrle_pages += o.xbzrle_pages;
        self.compressed_pages += o.compressed_pages;
        self.sections += o.sections;
    }
}

/// Names the page channel an error happened on.
fn on_channel(channel: usize, e: LoadError) -> LoadError {
    match e {
        LoadError::Aborted | LoadError::Channel { .. } => e,
        e => LoadError::OnChannel {
            channel: channel as u16,
            source: Box::new(e),
        },
    }
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
    /// Verify mode: the digest kept up to date while pages arrive.
    running: Option<RunningDigest>,
    /// Faults memory in a window at a time before data pages land.
    prefault: Prefault,
    /// Pages known zero (looked up when a load begins): zero records for
    /// them need no look at the page.
    fresh: FreshZero,
    /// The VM the stream must describe (vCPUs 0: not checked).
    shape: VmShape,
    /// Where the setup verdict goes (the return path), for a stream whose
    /// header asks for one.
    answer: Mutex<Option<BoxWrite>>,
    /// The VMM's hook, told what the source said at setup.
    on_setup: Option<SetupHook>,
    /// The caller lowers the loading thread's raised priority (see
    /// [`Loader::holding_priority`]).
    hold_priority: bool,
}

/// Which stream of a migration a record loop reads.
#[derive(Clone, Copy)]
enum Role<'b> {
    /// The only stream.
    Single,
    /// Stream `index` of a multi-channel migration (0 = main).
    Channel(usize, &'b EpochBarrier),
}

impl Role<'_> {
    fn is_page_channel(self) -> bool {
        matches!(self, Role::Channel(i, _) if i > 0)
    }
}

/// What one stream's record loop produced.
#[derive(Default)]
pub(crate) struct StreamOutcome {
    pub(crate) state: Vec<u8>,
    pub(crate) digest: Option<[u8; 32]>,
    pub(crate) stats: LoadStats,
    /// The source switched to postcopy: the loop stopped after the switch
    /// record's section; the stream goes on with postcopy pages.
    pub(crate) switched: bool,
    /// Per stream block: pages not valid here (postcopy DISCARD records).
    pub(crate) discard: Vec<crate::bitmap::DirtyBitmap>,
    /// Stream block index -> destination block index.
    pub(crate) map: Vec<usize>,
    /// When the end record was read.
    pub(crate) end_at: Option<std::time::Instant>,
}

impl<'a> Loader<'a> {
    /// A loader into `mem`.
    pub fn new(mem: &'a dyn GuestMemory) -> Self {
        Loader {
            mem,
            progress: Arc::new(AtomicU64::new(0)),
            running: None,
            prefault: Prefault::new(mem, true),
            fresh: FreshZero::none(),
            shape: VmShape::default(),
            answer: Mutex::new(None),
            on_setup: None,
            hold_priority: false,
        }
    }

    /// Calls `hook` with what the source said at setup (its vCPU count and
    /// load), once that record checked out and before any page lands:
    /// the VMM's chance to prepare its memory ([`crate::vm::VmControl::setup_hook`]).
    pub fn on_setup(mut self, hook: Option<SetupHook>) -> Self {
        self.on_setup = hook;
        self
    }

    /// The VM the stream must describe: a source whose VM has another
    /// vCPU count is refused at setup, before any page (a count of 0 on
    /// either side is not checked).
    pub fn expect_shape(mut self, shape: VmShape) -> Self {
        self.shape = shape;
        self
    }

    /// The return path: a stream whose header asks for a setup verdict
    /// (`FLAG_SETUP`) gets ACCEPTED there once its first section (block
    /// list, VM shape) checked out. (A refusal is the caller's to send:
    /// FAILED with the load error, see [`crate::engine::Commit::fail`].)
    /// [`Loader::take_answer`] gives it back.
    pub fn answering(self, reply: BoxWrite) -> Self {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply);
        self
    }

    /// The return path given to [`Loader::answering`].
    pub fn take_answer(&mut self) -> Option<BoxWrite> {
        self.answer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Sends ACCEPTED on the return path, when there is one.
    fn accept_setup(&self) -> Result<(), LoadError> {
        let mut a = self.answer.lock().unwrap_or_else(|e| e.into_inner());
        match a.as_mut() {
            Some(w) => super::ack::write_reply(&mut **w, &super::ack::Reply::Accepted)
                .map_err(LoadError::Answer),
            None => Ok(()),
        }
    }

    /// Sends APPLIED with a DRAIN record's `mark` on the return path, when
    /// there is one: every record before it is applied. With `report`
    /// (header flag `FLAG_LOAD_REPORT`) the running verify digest first
    /// catches up (the source's guest still runs: what the background
    /// hasher fell behind by is hashed now, not in the pause), and the
    /// answer says what that took (see `ack.rs`).
    fn answer_drain(&self, mark: u64, report: bool) -> Result<(), LoadError> {
        if self
            .answer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Ok(());
        }
        let reply = if report {
            // A source that reads the report pauses soon after a drain:
            // this thread (it also restores and resumes the guest) runs
            // at the pause's priority from now on (see `priority.rs`).
            super::priority::raise_this_thread();
            let mut r = super::ack::LoadReport::default();
            if let Some(d) = &self.running {
                (r.hashed, r.hash_time) = d.catch_up(self.mem);
                r.backlog = d.pending_bytes();
            }
            super::ack::Reply::AppliedReport(mark, r)
        } else {
            super::ack::Reply::Applied(mark)
        };
        let mut a = self.answer.lock().unwrap_or_else(|e| e.into_inner());
        match a.as_mut() {
            Some(w) => super::ack::write_reply(&mut **w, &reply).map_err(LoadError::Answer),
            None => Ok(()),
        }
    }

    /// Counts the stream bytes read into `progress` (shared with whoever
    /// reports them) instead of a counter of its own.
    pub fn sharing_progress(mut self, progress: Arc<AtomicU64>) -> Self {
        self.progress = progress;
        self
    }

    /// Stream bytes read so far (all channels), readable from another
    /// thread.
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// Keeps the raised priority a drain answer gave the loading thread
    /// after the load returns: the caller lowers it once the guest
    /// resumed (see `priority.rs`). Without it the load lowers it itself.
    pub(crate) fn holding_priority(mut self) -> Self {
        self.hold_priority = true;
        self
    }

    /// Reads the whole stream and applies it. Returns after the end record.
    /// A multi-channel migration needs [`Loader::load_channels`].
    pub fn load<R: Read>(&mut self, input: R) -> Result<LoadOutcome, LoadError> {
        let r = self.load_one(input);
        if !self.hold_priority {
            super::priority::lower_this_thread();
        }
        r
    }

    fn load_one<R: Read>(&mut self, input: R) -> Result<LoadOutcome, LoadError> {
        let mut r = StreamReader::new(input)?;
        if r.flags() & FLAG_CHANNELS != 0 {
            return Err(LoadError::Channel {
                channel: 0,
                offset: r.offset(),
                what: "the stream is one channel of a multi-channel migration; \
                       its other connections must be accepted too"
                    .into(),
            });
        }
        let verify = r.flags() & FLAG_VERIFY != 0;
        self.running = verify.then(|| RunningDigest::new(self.mem));
        self.fresh = FreshZero::look_up(self.mem);
        let o = self.hashing(|| self.run_stream(&mut r, Role::Single))?;
        refuse_switch(&r, &o)?;
        self.finish(verify, o)
    }

    /// Reads the stream up to its end or to the postcopy switch (see
    /// `engine/postcopy`), applying every record (with the running verify
    /// digest when the header asks for one).
    pub(crate) fn load_until_switch<R: Read>(
        &mut self,
        r: &mut StreamReader<R>,
    ) -> Result<StreamOutcome, LoadError> {
        if r.flags() & FLAG_CHANNELS != 0 {
            return Err(LoadError::Channel {
                channel: 0,
                offset: r.offset(),
                what: "postcopy runs over one stream; page channels are not supported with it yet"
                    .into(),
            });
        }
        let verify = r.flags() & FLAG_VERIFY != 0;
        self.running = verify.then(|| RunningDigest::new(self.mem));
        self.fresh = FreshZero::look_up(self.mem);
        self.hashing(|| self.run_stream(r, Role::Single))
    }

    /// Checks the digest (verify mode) of a precopy load; see [`Loader::finish`].
    pub(crate) fn finish_precopy(
        &self,
        verify: bool,
        o: StreamOutcome,
    ) -> Result<LoadOutcome, LoadError> {
        self.finish(verify, o)
    }

    /// Runs `f` (the load) beside the verify digest's background hasher,
    /// when there is one (see [`RunningDigest`]), and beside the
    /// destination prefault's helper ([`Prefault::run_ahead`]), which is
    /// joined before this returns: nothing touches guest memory after the
    /// record loop (a postcopy switch registers it with userfaultfd next).
    fn hashing<T>(&self, f: impl FnOnce() -> T) -> T {
        self.prefault.start_ahead();
        std::thread::scope(|s| {
            if let Some(d) = &self.running {
                s.spawn(|| d.refresh(self.mem));
            }
            std::thread::Builder::new()
                .name("prefault".into())
                .spawn_scoped(s, || self.prefault.run_ahead(self.mem))
                .map_err(|e| log::debug!("no prefault helper thread: {e}"))
                .ok();
            let _stop = self.prefault.stopping();
            let r = f();
            if let Some(d) = &self.running {
                d.stop();
            }
            r
        })
    }

    /// Block `block` was written at `offset` (for the running digest).
    fn touched(&self, block: usize, offset: u64) {
        if let Some(d) = &self.running {
            d.touch(block, offset);
        }
    }

    /// Loads a migration whose main stream is `main`; when its header
    /// declares channels, `accept` is called once per page channel for the
    /// next connection. Each channel is read and applied on its own thread,
    /// straight into guest memory, under the epoch barrier (see
    /// `channels.rs`). A stream without channels loads as with
    /// [`Loader::load`].
    ///
    /// The first connection must be the main channel (the source opens it
    /// first); the others may come in any order.
    pub fn load_channels<R: Read + Send>(
        &mut self,
        main: R,
        accept: impl FnMut() -> io::Result<R>,
    ) -> Result<LoadOutcome, LoadError> {
        let r = self.load_channels_inner(main, accept);
        if !self.hold_priority {
            super::priority::lower_this_thread();
        }
        r
    }

    fn load_channels_inner<R: Read + Send>(
        &mut self,
        main: R,
        accept: impl FnMut() -> io::Result<R>,
    ) -> Result<LoadOutcome, LoadError> {
        let mut r = StreamReader::new(main)?;
        let verify = r.flags() & FLAG_VERIFY != 0;
        self.running = verify.then(|| RunningDigest::new(self.mem));
        self.fresh = FreshZero::look_up(self.mem);
        if r.flags() & FLAG_CHANNELS == 0 {
            let o = self.hashing(|| self.run_stream(&mut r, Role::Single))?;
            refuse_switch(&r, &o)?;
            return self.finish(verify, o);
        }
        let (total, main, _) = self.run_channels(r, accept)?;
        drop(main);
        if total.switched {
            return Err(LoadError::Postcopy {
                offset: total.stats.bytes,
                cause: PostcopyLoadError::NotAllowed,
            });
        }
        self.finish(verify, total)
    }

    /// Postcopy over page channels: loads a multi-channel migration (main
    /// stream `r`, its header already read) up to its end or to the
    /// postcopy switch, which every channel reaches behind the final
    /// barrier. Returns the main stream (the completion handshake and,
    /// after a switch, postcopy follow on it) and, after a switch, the
    /// page channels' streams (background postcopy pages follow on them).
    #[allow(clippy::type_complexity)]
    pub(crate) fn load_channels_until_switch<R: Read, C: Read + Send>(
        &mut self,
        r: StreamReader<R>,
        accept: impl FnMut() -> io::Result<C>,
    ) -> Result<(StreamOutcome, StreamReader<R>, Vec<StreamReader<C>>), LoadError> {
        let verify = r.flags() & FLAG_VERIFY != 0;
        self.running = verify.then(|| RunningDigest::new(self.mem));
        self.fresh = FreshZero::look_up(self.mem);
        self.run_channels(r, accept)
    }

    /// Accepts the page channels of the multi-channel migration whose main
    /// stream is `r` and runs every channel to its end (or to the postcopy
    /// switch) under the epoch barrier. The main stream comes back; the
    /// page channels' streams only after a switch.
    #[allow(clippy::type_complexity)]
    fn run_channels<R: Read, C: Read + Send>(
        &self,
        mut r: StreamReader<R>,
        mut accept: impl FnMut() -> io::Result<C>,
    ) -> Result<(StreamOutcome, StreamReader<R>, Vec<StreamReader<C>>), LoadError> {
        let at = r.offset();
        let (index, n, session) = match r.next_record()? {
            Record::Channel {
                index,
                channels,
                session,
            } => (index, channels, session),
            _ => unreachable!("the reader requires a channel record first"),
        };
        if index != 0 {
            return Err(LoadError::Channel {
                channel: index,
                offset: at,
                what: "the first connection must be the main channel 0".into(),
            });
        }
        let mut chans: Vec<Option<StreamReader<C>>> = (0..n).map(|_| None).collect();
        for k in 1..=n {
            let conn = accept().map_err(|source| LoadError::Accept {
                n: k,
                channels: n,
                source,
            })?;
            let in_conn = |e: LoadError| LoadError::OnConnection {
                n: k,
                source: Box::new(e),
            };
            let mut cr = StreamReader::new(conn).map_err(|e| in_conn(e.into()))?;
            let at = cr.offset();
            let rec = cr.next_record().map_err(|e| in_conn(e.into()))?;
            let Record::Channel {
                index,
                channels,
                session: s,
            } = rec
            else {
                unreachable!("the reader requires a channel record first");
            };
            let bad = |what: String| {
                in_conn(LoadError::Channel {
                    channel: index,
                    offset: at,
                    what,
                })
            };
            if s != session {
                return Err(bad(format!(
                    "session {s:#x} is not this migration's ({session:#x})"
                )));
            }
            if channels != n {
                return Err(bad(format!(
                    "declares {channels} channels, the main channel {n}"
                )));
            }
            let slot = usize::from(index).checked_sub(1).map(|i| &mut chans[i]);
            match slot {
                Some(slot @ None) => *slot = Some(cr),
                _ => return Err(bad("channel index used twice or 0".into())),
            }
        }
        let barrier = EpochBarrier::new(usize::from(n) + 1);
        let first_err: Mutex<Option<LoadError>> = Mutex::new(None);
        // The first error is the cause; the others follow from the
        // teardown it starts (aborted barrier, closed connections).
        let fail = |e: LoadError| {
            {
                let mut f = first_err.lock().unwrap_or_else(|p| p.into_inner());
                // The source's own reason beats the cut its leaving caused
                // on another connection.
                let aborted = matches!(e, LoadError::SourceAborted { .. });
                if (f.is_none() || (aborted && f.as_ref().is_some_and(is_cut)))
                    && !matches!(e, LoadError::Aborted)
                {
                    *f = Some(e);
                }
            }
            barrier.abort();
        };
        let this = self;
        let mut total = StreamOutcome::default();
        let mut main_stream = None;
        let mut streams = Vec::new();
        this.hashing(|| {
            std::thread::scope(|s| {
                let threads: Vec<_> = chans
                    .into_iter()
                    .enumerate()
                    .map(|(i, cr)| {
                        let mut cr = cr.expect("every channel accepted");
                        let (barrier, fail) = (&barrier, &fail);
                        s.spawn(move || {
                            let r = this.run_stream(&mut cr, Role::Channel(i + 1, barrier));
                            // Record the cause before closing the connection:
                            // closing tells the source, whose reaction (ending
                            // the main stream) must not be taken for the cause.
                            let r = r.map_err(|e| fail(on_channel(i + 1, e))).ok();
                            // After the postcopy switch the stream goes on.
                            match r {
                                Some(o) if o.switched => (Some(o), Some(cr)),
                                r => {
                                    drop(cr);
                                    (r, None)
                                }
                            }
                        })
                    })
                    .collect();
                let mut main = this.run_stream(&mut r, Role::Channel(0, &barrier));
                let cut = || {
                    first_err
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .is_some_and(is_cut)
                };
                if matches!(main, Err(LoadError::Aborted)) && cut() {
                    // A page channel ended mid-stream while the main
                    // channel waited at a barrier: a source that gave up
                    // put its reason on the main stream. Read on (applying
                    // nothing) to find it; the source closes after it.
                    if let Some(reason) = abort_reason(&mut r) {
                        main = Err(LoadError::SourceAborted { reason });
                    }
                }
                match main {
                    Ok(o) => {
                        total = o;
                        main_stream = Some(r);
                    }
                    Err(e) => {
                        drop(r);
                        fail(e)
                    }
                }
                for t in threads {
                    match t.join() {
                        Ok((Some(o), cr)) => {
                            if o.switched != total.switched {
                                fail(LoadError::Postcopy {
                                    offset: o.stats.bytes,
                                    cause: PostcopyLoadError::ChannelsDisagree,
                                });
                            }
                            total.stats.add(&o.stats);
                            streams.extend(cr);
                        }
                        Ok((None, _)) => {}
                        Err(_) => fail(LoadError::Channel {
                            channel: 0,
                            offset: 0,
                            what: "a channel thread panicked".into(),
                        }),
                    }
                }
            })
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        total.stats.channels = n;
        let main = main_stream.expect("the main stream succeeded");
        if total.switched && streams.len() != usize::from(n) {
            return Err(LoadError::Postcopy {
                offset: total.stats.bytes,
                cause: PostcopyLoadError::NotEveryChannel,
            });
        }
        Ok((total, main, streams))
    }

    /// Checks the digest (verify mode) once everything is loaded.
    fn finish(&self, verify: bool, o: StreamOutcome) -> Result<LoadOutcome, LoadError> {
        let mut out = LoadOutcome {
            state: o.state,
            digest: o.digest,
            stats: o.stats,
        };
        if verify {
            let Some(expected) = out.digest else {
                return Err(LoadError::NoDigest);
            };
            let t = std::time::Instant::now();
            let actual = match &self.running {
                Some(d) => {
                    let (digest, chunks) = d.finish(self.mem);
                    out.stats.verify_chunks = chunks as u64;
                    digest
                }
                None => memory_digest(self.mem),
            };
            out.stats.verify_time = t.elapsed().as_millis() as u64;
            if actual != expected {
                return Err(LoadError::DigestMismatch {
                    expected: hex(&expected),
                    actual: hex(&actual),
                });
            }
        }
        if let Some(t) = o.end_at {
            out.stats.end_us = t.elapsed().as_micros() as u64;
        }
        Ok(out)
    }

    /// Reads one stream up to its end record, applying every record.
    fn run_stream<R: Read>(
        &self,
        r: &mut StreamReader<R>,
        role: Role<'_>,
    ) -> Result<StreamOutcome, LoadError> {
        let blocks = self.mem.blocks();
        // Stream block index -> destination block.
        let mut map: Vec<usize> = Vec::new();
        let mut out = StreamOutcome::default();
        let mut scratch = vec![0u8; PAGE_SIZE];
        let mut dec = Decompressor::new();
        let mut reported = r.offset();
        let mut syncs = 0u64;
        // A DRAIN record read, answered once its section checked out.
        let mut drain = None;
        let page_channel = role.is_page_channel();
        // Runs of raw pages land in place (precopy: the guest does not run
        // here yet, and every byte is checked at the section's end before
        // the load can succeed).
        r.landing_runs(true);
        loop {
            let at = r.offset();
            let rec = r.next_record()?;
            if out.switched && !matches!(rec, Record::SectionEnd { .. }) {
                return Err(LoadError::Postcopy {
                    offset: at,
                    cause: PostcopyLoadError::SwitchNotLast,
                });
            }
            let refuse = |what: &str| {
                let channel = match role {
                    Role::Channel(i, _) => i as u16,
                    Role::Single => 0,
                };
                Err(LoadError::Channel {
                    channel,
                    offset: at,
                    what: format!("{what} on a page channel"),
                })
            };
            match rec {
                Record::BlockList(list) => {
                    map = self
                        .match_layout(list)
                        .map_err(|what| LoadError::Layout { offset: at, what })?;
                    out.discard = list
                        .iter()
                        .map(|d| crate::bitmap::DirtyBitmap::new(d.len / PAGE_SIZE as u64))
                        .collect();
                }
                Record::Discard { .. } if role.is_page_channel() => {
                    return refuse("postcopy discard record")
                }
                Record::Discard {
                    block,
                    first_word,
                    words,
                } => {
                    let bm = &mut out.discard[usize::from(block)];
                    let w: Vec<u64> = words
                        .chunks_exact(8)
                        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                        .collect();
                    bm.or_words(first_word as usize, &w);
                }
                Record::Postcopy => {
                    // On a page channel: behind the final barrier, the
                    // pages that follow are postcopy's background pages.
                    if map.is_empty() {
                        return Err(LoadError::Postcopy {
                            offset: at,
                            cause: PostcopyLoadError::BeforeBlockList,
                        });
                    }
                    out.switched = true;
                }
                Record::Zero { block, offset } => {
                    out.stats.zero_pages += 1;
                    let bi = map[usize::from(block)];
                    // A page known zero needs no look (before the switch
                    // only: after it the guest runs here, and its writes
                    // do not clear the known-zero bits).
                    if out.switched || !self.fresh.is_zero(bi, offset) {
                        self.zero_page(bi, offset, &mut out.stats);
                    }
                }
                Record::ZeroRun {
                    block,
                    offset,
                    pages,
                } => {
                    // The reader checked the whole run against the block
                    // and refuses it after the switch.
                    out.stats.zero_pages += u64::from(pages);
                    let bi = map[usize::from(block)];
                    let ps = PAGE_SIZE as u64;
                    self.fresh
                        .not_known_zero(bi, offset / ps, pages.into(), |p| {
                            self.zero_page(bi, p * ps, &mut out.stats)
                        });
                }
                Record::Raw {
                    block,
                    offset,
                    data,
                } => {
                    out.stats.raw_pages += 1;
                    let bi = map[usize::from(block)];
                    self.fresh.written(bi, offset);
                    self.prefault.before_write(bi, blocks[bi].region(), offset);
                    blocks[bi].region().write(offset as usize, data);
                    self.touched(bi, offset);
                }
                Record::Run {
                    block,
                    offset,
                    pages,
                } => {
                    out.stats.raw_pages += u64::from(pages);
                    out.stats.runs += 1;
                    let bi = map[usize::from(block)];
                    let region = blocks[bi].region();
                    let end = offset + u64::from(pages) * PAGE_SIZE as u64;
                    for o in (offset..end).step_by(PAGE_SIZE) {
                        self.fresh.written(bi, o);
                        self.prefault.before_write(bi, region, o);
                    }
                    // The reader checked the run against the block list and
                    // checks it against `region` before any byte lands.
                    r.land_run(region, offset as usize)?;
                    for o in (offset..end).step_by(PAGE_SIZE) {
                        self.touched(bi, o);
                    }
                }
                Record::Xbzrle { .. } if page_channel => return refuse("xbzrle page"),
                Record::Xbzrle {
                    block,
                    offset,
                    data,
                } => {
                    out.stats.xbzrle_pages += 1;
                    let bi = map[usize::from(block)];
                    let b = &blocks[bi];
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
                    self.fresh.written(bi, offset);
                    b.region().write(offset as usize, &scratch);
                    self.touched(bi, offset);
                }
                Record::Compressed {
                    block,
                    offset,
                    algo,
                    data,
                } => {
                    out.stats.compressed_pages += 1;
                    let bi = map[usize::from(block)];
                    let b = &blocks[bi];
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
                    self.prefault.before_write(bi, b.region(), offset);
                    self.fresh.written(bi, offset);
                    b.region().write(offset as usize, &scratch);
                    self.touched(bi, offset);
                }
                Record::Setup { vcpus, load, .. } => {
                    let here = self.shape.vcpus;
                    if vcpus != 0 && here != 0 && vcpus != here {
                        return Err(LoadError::Vcpus {
                            offset: at,
                            source_vcpus: vcpus,
                            here,
                        });
                    }
                    if let Some(hook) = &self.on_setup {
                        hook(&SourceGuest { vcpus, load });
                    }
                }
                Record::Abort(reason) => {
                    return Err(LoadError::SourceAborted {
                        reason: reason.to_string(),
                    })
                }
                // The reader allows it only on the main stream (or the only
                // one), before the postcopy switch.
                Record::Drain { mark } => drain = Some(mark),
                Record::SectionEnd { seq } => {
                    if let Some(mark) = drain.take() {
                        // Every record before the mark is applied (with
                        // page channels, those before the barrier that
                        // precedes it too: this stream waited there).
                        self.answer_drain(mark, r.flags() & FLAG_LOAD_REPORT != 0)?;
                    }
                    if seq == 0 && r.flags() & FLAG_SETUP != 0 && !page_channel {
                        // The reader checked that this section held the
                        // block list and the VM's shape; both match.
                        self.accept_setup()?;
                    }
                    out.stats.sections += 1;
                    self.progress
                        .fetch_add(r.offset() - reported, Ordering::Relaxed);
                    reported = r.offset();
                    if out.switched {
                        r.landing_runs(false);
                        out.stats.bytes = r.offset();
                        out.map = map;
                        return Ok(out);
                    }
                }
                Record::State(_) if page_channel => return refuse("device state"),
                Record::State(blob) => out.state = blob.to_vec(),
                Record::Digest(_) if page_channel => return refuse("digest"),
                Record::Digest(d) => out.digest = Some(d),
                Record::Sync { .. } => {
                    let Role::Channel(i, barrier) = role else {
                        unreachable!("the reader refuses sync records without channels")
                    };
                    syncs += 1;
                    barrier.reach(i, syncs).map_err(|e| match e {
                        BarrierError::Aborted => LoadError::Aborted,
                        BarrierError::Ended { channel, passed } => LoadError::Channel {
                            channel: channel as u16,
                            offset: at,
                            what: format!(
                                "ended after {passed} syncs while channel {i} reached sync {}",
                                syncs - 1
                            ),
                        },
                    })?;
                }
                Record::Channel { .. } => {
                    unreachable!("the reader allows a channel record only first")
                }
                Record::End => {
                    out.end_at = Some(std::time::Instant::now());
                    break;
                }
            }
        }
        if let Role::Channel(i, barrier) = role {
            barrier.end(i);
        }
        out.stats.bytes = r.offset();
        self.progress
            .fetch_add(r.offset() - reported, Ordering::Relaxed);
        Ok(out)
    }

    /// Makes page `offset` of block `bi` zero: writes zeros unless it
    /// reads as zero already (a write would fault in memory the guest
    /// never used).
    fn zero_page(&self, bi: usize, offset: u64, stats: &mut LoadStats) {
        let region = self.mem.blocks()[bi].region();
        let off = offset as usize;
        if region.scan(off, PAGE_SIZE, zero::is_zero) != Some(true) {
            region.write(off, &ZERO_PAGE);
            self.touched(bi, offset);
            stats.zero_pages_written += 1;
        }
    }

    fn match_layout(
        &self,
        list: &[crate::stream::BlockDesc],
    ) -> Result<Vec<usize>, LayoutMismatch> {
        let blocks = self.mem.blocks();
        if list.len() != blocks.len() {
            return Err(LayoutMismatch::BlockCount {
                stream: list.len(),
                here: blocks.len(),
            });
        }
        list.iter()
            .map(|d| {
                let i = self
                    .mem
                    .find(&d.id)
                    .ok_or_else(|| LayoutMismatch::UnknownBlock(d.id.clone()))?;
                if blocks[i].len() != d.len {
                    return Err(LayoutMismatch::Length {
                        id: d.id.clone(),
                        stream: d.len,
                        here: blocks[i].len(),
                    });
                }
                Ok(i)
            })
            .collect()
    }
}

/// Reads the rest of a stream, applying nothing, for an ABORT record.
fn abort_reason<R: Read>(r: &mut StreamReader<R>) -> Option<String> {
    loop {
        match r.next_record() {
            Ok(Record::Abort(reason)) => return Some(reason.to_string()),
            Ok(Record::End) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Whether `e` is a connection that ended or failed mid-stream (what a
/// source that leaves causes), on any channel.
fn is_cut(e: &LoadError) -> bool {
    use crate::stream::StreamErrorKind::{Io, Truncated};
    match e {
        LoadError::Stream(s) => matches!(s.kind, Truncated(_) | Io(_)),
        LoadError::OnChannel { source, .. } | LoadError::OnConnection { source, .. } => {
            is_cut(source)
        }
        _ => false,
    }
}

/// A stream that switched to postcopy cannot be loaded by a plain load.
fn refuse_switch<R: Read>(r: &StreamReader<R>, o: &StreamOutcome) -> Result<(), LoadError> {
    if o.switched {
        return Err(LoadError::Postcopy {
            offset: r.offset(),
            cause: PostcopyLoadError::NotAllowed,
        });
    }
    Ok(())
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

#[cfg(test)]
mod run_tests {
    //! RUN records through the loader: landed in place, refused whole when
    //! they point outside a block, refused at their checksum when corrupt.
    use super::*;
    use crate::memory::ProcessMemory;
    use crate::stream::format::{Kind, FLAG_RUNS};
    use crate::stream::{BlockDesc, StreamErrorKind, StreamWriter};

    const P: u64 = PAGE_SIZE as u64;

    fn page(seed: u64) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (i as u64 * 131 + seed * 7 + 1) as u8)
            .collect()
    }

    fn blocks() -> Vec<BlockDesc> {
        vec![
            BlockDesc {
                id: "ram".into(),
                len: 96 * P,
            },
            BlockDesc {
                id: "rom".into(),
                len: 2 * P,
            },
        ]
    }

    /// Destination memory; "rom" holds 0x5a everywhere, to see it kept.
    fn dest() -> ProcessMemory {
        let m = ProcessMemory::new(&[("ram", 96 * P), ("rom", 2 * P)]).unwrap();
        assert!(m.blocks()[1].region().write(0, &[0x5a; 2 * PAGE_SIZE]));
        m
    }

    fn contents(m: &ProcessMemory, b: usize) -> Vec<u8> {
        let r = m.blocks()[b].region();
        let mut v = vec![0u8; r.len()];
        assert!(r.read(0, &mut v));
        v
    }

    /// Pages 0..80 of "ram" as raw pages (two runs, 64 + 16), page 90 too.
    fn stream() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), FLAG_RUNS);
        w.block_list(&blocks()).unwrap();
        for i in 0..80 {
            w.raw(0, i * P, &page(i)).unwrap();
        }
        w.raw(0, 90 * P, &page(90)).unwrap();
        w.section_end(0).unwrap();
        w.end().unwrap();
        std::mem::take(w.get_mut())
    }

    #[test]
    fn runs_land_in_guest_memory() {
        let m = dest();
        let out = Loader::new(&m).load(&stream()[..]).unwrap();
        assert_eq!(out.stats.runs, 3);
        assert_eq!(out.stats.raw_pages, 81);
        let ram = contents(&m, 0);
        for i in (0..80).chain([90]) {
            let o = i as usize * PAGE_SIZE;
            assert_eq!(&ram[o..o + PAGE_SIZE], &page(i)[..], "page {i}");
        }
        assert!(ram[80 * PAGE_SIZE..90 * PAGE_SIZE].iter().all(|&x| x == 0));
        assert!(contents(&m, 1).iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn a_corrupt_run_fails_the_load_and_writes_nothing_outside_its_pages() {
        let mut bytes = stream();
        let first = bytes.len() - (81 * PAGE_SIZE + 13 + 11 + 11 + 13 + 5);
        bytes[first + 70 * PAGE_SIZE + 5] ^= 1;
        let m = dest();
        let e = Loader::new(&m).load(&bytes[..]).unwrap_err();
        match &e {
            LoadError::Stream(s) => {
                assert!(
                    matches!(s.kind, StreamErrorKind::Checksum { seq: 0, .. }),
                    "{e}"
                )
            }
            other => panic!("{other}"),
        }
        assert!(contents(&m, 1).iter().all(|&x| x == 0x5a), "rom untouched");
        let ram = contents(&m, 0);
        assert!(
            ram[80 * PAGE_SIZE..90 * PAGE_SIZE]
                .iter()
                .chain(&ram[91 * PAGE_SIZE..])
                .all(|&x| x == 0),
            "nothing outside the pages the stream named"
        );
    }

    #[test]
    fn a_run_past_its_block_is_refused_before_it_lands() {
        let mut w = StreamWriter::new(Vec::new(), FLAG_RUNS);
        w.block_list(&blocks()).unwrap();
        w.flush().unwrap();
        let mut bytes = std::mem::take(w.get_mut());
        // "rom" has 2 pages: a run of 3 from page 0.
        bytes.push(Kind::Run as u8);
        bytes.extend_from_slice(&1u16.to_be_bytes());
        bytes.extend_from_slice(&0u64.to_be_bytes());
        bytes.extend_from_slice(&3u16.to_be_bytes());
        for i in 0..3 {
            bytes.extend_from_slice(&page(i));
        }
        let m = dest();
        let e = Loader::new(&m).load(&bytes[..]).unwrap_err();
        let msg = e.to_string();
        match &e {
            LoadError::Stream(s) => assert!(
                matches!(s.kind, StreamErrorKind::RunPastBlock { pages: 3, .. }),
                "{msg}"
            ),
            other => panic!("{other}"),
        }
        assert!(msg.contains("'rom'"), "{msg}");
        assert!(contents(&m, 1).iter().all(|&x| x == 0x5a), "rom untouched");
        assert!(contents(&m, 0).iter().all(|&x| x == 0), "ram untouched");
    }
}
