//! Parallel page channels (like QEMU's multifd): the source's sender
//! threads, and the epoch barrier both sides' ordering rule rests on.
//!
//! Ordering rule. Between two dirty syncs a page is sent at most once: its
//! bit is cleared when it is queued and only a sync sets it again. So the
//! pages sent between sync `e` and sync `e + 1` (epoch `e + 1`) are distinct,
//! and can be applied in any order, on any channel. What must not happen is
//! an older copy (epoch `e`) landing after a newer one (epoch `e + 1`). At
//! every sync the source writes `SYNC(e)` on the main channel and queues it
//! on every page channel behind the pages already queued; the destination
//! applies nothing after `SYNC(e)` on a channel until every channel has
//! reached `SYNC(e)` ([`EpochBarrier`]). The final sync is such a barrier
//! too, and the destination acknowledges only once every channel has ended.
//!
//! Scheduling. The main thread sends pages itself, on the main stream,
//! as with one stream; it hands the pages of a 2 MiB window (see
//! [`window_of`]) to a page channel only when that channel is idle (has
//! written everything it was given). So a page channel takes work only
//! when its thread got the CPU to finish the last: on a host whose cores
//! are busy (two cores, a running vCPU and the destination's receiver)
//! the channels stay mostly idle and the migration costs what one stream
//! costs, with no hand-over per batch; with cores to spare they run
//! beside the main thread. All pages of a window go to one stream (the
//! destination faults memory in by window: two streams in one window can
//! fault its huge page in twice). Pages taken from the migration bitmap
//! but not yet written by a channel are still to be sent:
//! [`SendChannels::in_flight_pages`] counts them, and the source adds them
//! to what remains, so a full queue never makes the switch-over look
//! cheaper than it is. Queues are short ([`QUEUE_DEPTH`] batches of
//! [`BATCH_PAGES`] pages, 2 MiB per channel): a page written by the guest
//! while it waits in a queue is read after the write, and also reported
//! by the next sync, so it goes twice; a short queue keeps that rare.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::params::CompressParams;
use crate::codec::adapt::{LinkCost, TimedWrite, WireClock};
use crate::codec::encoder::{EncodeCounters, Page, PageEncoder};
use crate::memory::{RamBlock, PAGE_SIZE};
use crate::stream::format::FLAG_CHANNELS;
use crate::stream::{BlockDesc, StreamWriter};

/// Pages per batch handed to a channel.
pub(super) const BATCH_PAGES: usize = 128;
/// Batches queued per channel before the main thread waits.
const QUEUE_DEPTH: usize = 4;
/// A channel ends a checksummed section after this many batches.
const BATCHES_PER_SECTION: u32 = 64;

/// A connection for one page channel.
pub type ChannelWriter = Box<dyn Write + Send>;

/// What a channel thread is asked to do, in order.
enum Job {
    /// Send these pages.
    Pages(Vec<Queued>, PageEncoding),
    /// Write the barrier of this epoch and flush.
    Sync(u64),
    /// Postcopy switch: write the POSTCOPY record and end the section;
    /// from then on every batch ends its section (flushed at once).
    Postcopy,
    /// Write the end record and stop.
    Finish,
}

/// A page handed to a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Queued {
    /// Block index.
    block: u16,
    /// Page index in the block.
    page: u64,
    /// What the source already knows of its content.
    known: Known,
}

/// What the source knows of a page it hands to a channel. Only after the
/// postcopy switch (the guest is paused here for good, so the page
/// cannot change before the channel writes it) is it ever more than
/// [`Known::Nothing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Known {
    /// The channel reads and encodes the page.
    Nothing,
    /// Never written (the kernel said so): a zero record, unread.
    Untouched,
    /// Read here and found zero: a zero record, not read again.
    Zero,
}

/// How a channel encodes the pages of a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct PageEncoding {
    /// Compression, if on.
    pub compress: Option<CompressParams>,
    /// Compress only while it pays on this channel's link.
    pub adaptive: bool,
    /// This channel's share of the bandwidth cap (bytes/s, 0 = none).
    pub max_bandwidth: u64,
}

/// What one channel has sent, readable while it runs (updated after each
/// job).
#[derive(Default)]
pub(super) struct ChannelCounters {
    /// Stream bytes written.
    bytes: AtomicU64,
    /// Pages encoded and written.
    pages: AtomicU64,
    /// The channel encoder's counts.
    encoded: Mutex<EncodeCounters>,
}

struct Sender {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<io::Result<()>>>,
    counters: Arc<ChannelCounters>,
    /// Pages handed to this channel.
    queued: u64,
}

impl Sender {
    /// Pages handed to this channel and not written yet.
    fn in_flight(&self) -> u64 {
        self.queued
            .saturating_sub(self.counters.pages.load(Ordering::Relaxed))
    }
}

/// The source's page channels: one thread and one connection each.
pub(super) struct SendChannels {
    senders: Vec<Sender>,
    batch: Vec<Queued>,
    /// Where the search for the least-loaded channel starts.
    next: usize,
    /// The window (see [`window_of`]) the last batch handed over ended
    /// in, and its channel.
    window: Option<((u16, u64), usize)>,
    /// The window [`SendChannels::offer`] last decided on, and who sends
    /// it (`None`: the main thread, on the main stream).
    owner: Option<((u16, u64), Option<usize>)>,
    stop: Arc<AtomicBool>,
}

/// Everything a channel thread needs to start its stream.
pub(super) struct ChannelSetup {
    pub flags: u16,
    pub session: u64,
    pub blocks: Vec<RamBlock>,
    pub descs: Vec<BlockDesc>,
}

impl SendChannels {
    /// Starts one thread per connection; channel `i + 1` writes to
    /// `conns[i]` (0 is the main channel).
    pub fn start(conns: Vec<ChannelWriter>, setup: &ChannelSetup) -> io::Result<SendChannels> {
        let count = u16::try_from(conns.len()).expect("channel count checked by params");
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::with_capacity(conns.len());
        for (i, conn) in conns.into_iter().enumerate() {
            let (tx, rx) = sync_channel(QUEUE_DEPTH);
            let counters = Arc::new(ChannelCounters::default());
            let worker = Worker {
                index: i as u16 + 1,
                count,
                session: setup.session,
                flags: setup.flags | FLAG_CHANNELS,
                blocks: setup.blocks.clone(),
                descs: setup.descs.clone(),
                counters: counters.clone(),
                stop: stop.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("livemig-ch{}", i + 1))
                .spawn(move || worker.run(conn, rx))?;
            senders.push(Sender {
                tx: Some(tx),
                thread: Some(thread),
                counters,
                queued: 0,
            });
        }
        Ok(SendChannels {
            senders,
            batch: Vec::with_capacity(BATCH_PAGES),
            next: 0,
            window: None,
            owner: None,
            stop,
        })
    }

    /// What each channel's encoder has sent.
    pub fn counters(&self) -> impl Iterator<Item = EncodeCounters> + '_ {
        self.senders
            .iter()
            .map(|s| *s.counters.encoded.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stream bytes all channels have produced.
    pub fn bytes(&self) -> u64 {
        self.senders
            .iter()
            .map(|s| s.counters.bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Pages taken from the migration bitmap and not yet written by a
    /// channel (the batch being filled and every channel's queue): they
    /// are still to be sent, as much as the bitmap's pages are.
    pub fn in_flight_pages(&self) -> u64 {
        self.batch.len() as u64 + self.senders.iter().map(Sender::in_flight).sum::<u64>()
    }

    /// Precopy: who sends this page. `Ok(true)`: it is queued for a
    /// page channel (a full batch is handed over); `Ok(false)`: the
    /// caller sends it on the main stream. The first page offered from a
    /// window decides for the whole window: an idle channel (one that has
    /// written everything it was given, in turn among several) takes it,
    /// otherwise the main thread does (see the module doc).
    pub fn offer(&mut self, block: u16, page: u64, enc: PageEncoding) -> io::Result<bool> {
        let q = Queued {
            block,
            page,
            known: Known::Nothing,
        };
        let w = window_of(&q);
        let owner = match self.owner {
            Some((ow, o)) if ow == w => o,
            _ => {
                // The batch being filled is the last window's: it goes
                // to that window's channel now.
                self.flush_batch(enc)?;
                let o = self.idle();
                if let Some(i) = o {
                    self.window = Some((w, i));
                }
                self.owner = Some((w, o));
                o
            }
        };
        if owner.is_none() {
            return Ok(false);
        }
        self.batch.push(q);
        if self.batch.len() >= BATCH_PAGES {
            self.flush_batch(enc)?;
        }
        Ok(true)
    }

    /// A channel that has written every page it was given (the first
    /// from [`SendChannels::next`] on, which then moves past it).
    fn idle(&mut self) -> Option<usize> {
        let n = self.senders.len();
        let i = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| self.senders[i].in_flight() == 0)?;
        self.next = (i + 1) % n;
        Some(i)
    }

    /// Postcopy: adds a page to the batch being filled, never handing it
    /// over (the caller bounds the batch and calls
    /// [`SendChannels::try_flush_batch`]). A page `known` to be zero goes
    /// as a zero record without being read by the channel.
    pub fn stage(&mut self, block: u16, page: u64, known: Known) {
        self.batch.push(Queued { block, page, known });
    }

    /// Hands the partial batch (if any) to a channel, waiting for room
    /// there if its queue is full: a batch that starts in the window the
    /// last one ended in goes to that one's channel (see [`window_of`]:
    /// [`SendChannels::offer`] never lets a batch span two windows);
    /// any other to the channel with the fewest pages in flight (in turn
    /// among equals). Keeping the channels level keeps them reaching each
    /// sync barrier together, so that the destination's channels do not
    /// wait for one another there.
    pub fn flush_batch(&mut self, enc: PageEncoding) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.check()?;
        let pages = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_PAGES));
        let n = pages.len() as u64;
        let first = pages.first().map(window_of);
        let i = match self.window {
            // The window of the last batch goes on on its channel.
            Some((w, i)) if first == Some(w) => i,
            _ => {
                let load: Vec<u64> = self.senders.iter().map(Sender::in_flight).collect();
                let i = least_loaded(&load, self.next);
                self.next = (i + 1) % self.senders.len();
                i
            }
        };
        self.window = pages.last().map(|q| (window_of(q), i));
        self.send(i, Job::Pages(pages, enc))?;
        self.senders[i].queued += n;
        Ok(())
    }

    /// Queues the barrier of `epoch` on every channel, behind their pages.
    pub fn sync(&mut self, epoch: u64, enc: PageEncoding) -> io::Result<()> {
        self.flush_batch(enc)?;
        for i in 0..self.senders.len() {
            self.send(i, Job::Sync(epoch))?;
        }
        Ok(())
    }

    /// Postcopy: hands the partial batch (if any) to a channel that has
    /// room, never waiting; `Ok(false)` when every queue is full (the
    /// batch stays pending: the caller serves page requests meanwhile).
    pub fn try_flush_batch(&mut self, enc: PageEncoding) -> io::Result<bool> {
        if self.batch.is_empty() {
            return Ok(true);
        }
        let pages = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_PAGES));
        let count = pages.len() as u64;
        let n = self.senders.len();
        let mut job = Job::Pages(pages, enc);
        for k in 0..n {
            let i = (self.next + k) % n;
            match self.tx(i)?.try_send(job) {
                Ok(()) => {
                    self.next = (i + 1) % n;
                    self.senders[i].queued += count;
                    return Ok(true);
                }
                Err(TrySendError::Full(j)) => job = j,
                Err(TrySendError::Disconnected(_)) => return Err(self.failure(i)),
            }
        }
        let Job::Pages(pages, _) = job else {
            unreachable!("the job is the batch")
        };
        self.batch = pages;
        Ok(false)
    }

    /// How many page channels.
    pub fn count(&self) -> usize {
        self.senders.len()
    }

    /// Stream bytes channel `i + 1` has produced.
    pub fn bytes_of(&self, i: usize) -> u64 {
        self.senders[i].counters.bytes.load(Ordering::Relaxed)
    }

    /// Pages queued but not yet handed to a channel.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    /// The postcopy switch: every channel writes the POSTCOPY record
    /// behind the pages it has queued (after the final barrier), then
    /// carries background pages, each batch flushed.
    pub fn postcopy(&mut self, enc: PageEncoding) -> io::Result<()> {
        self.flush_batch(enc)?;
        for i in 0..self.senders.len() {
            self.send(i, Job::Postcopy)?;
        }
        Ok(())
    }

    /// Ends every channel's stream and waits for the threads.
    pub fn finish(&mut self, enc: PageEncoding) -> io::Result<()> {
        self.flush_batch(enc)?;
        for i in 0..self.senders.len() {
            self.send(i, Job::Finish)?;
        }
        for i in 0..self.senders.len() {
            self.senders[i].tx = None;
            self.join(i)?;
        }
        Ok(())
    }

    /// Fails with a channel's error if one stopped (its thread ended
    /// before [`SendChannels::finish`]).
    pub fn check(&mut self) -> io::Result<()> {
        for i in 0..self.senders.len() {
            if self.senders[i]
                .thread
                .as_ref()
                .is_some_and(|t| t.is_finished())
            {
                return Err(self.failure(i));
            }
        }
        Ok(())
    }

    fn tx(&mut self, i: usize) -> io::Result<&SyncSender<Job>> {
        match self.senders[i].tx {
            Some(ref tx) => Ok(tx),
            None => Err(io::Error::other(format!("channel {} is closed", i + 1))),
        }
    }

    fn send(&mut self, i: usize, job: Job) -> io::Result<()> {
        if self.tx(i)?.send(job).is_err() {
            return Err(self.failure(i));
        }
        Ok(())
    }

    /// The error of a channel whose thread has stopped.
    fn failure(&mut self, i: usize) -> io::Error {
        self.senders[i].tx = None;
        match self.join(i) {
            Err(e) => e,
            Ok(()) => io::Error::other(format!("channel {} stopped early", i + 1)),
        }
    }

    fn join(&mut self, i: usize) -> io::Result<()> {
        let Some(t) = self.senders[i].thread.take() else {
            return Ok(());
        };
        match t.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("channel {}: {e}", i + 1))),
            Err(_) => Err(io::Error::other(format!("channel {} panicked", i + 1))),
        }
    }
}

impl Drop for SendChannels {
    /// On failure or cancel: threads stop after their current batch and
    /// close their connections, which tells the destination.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &mut self.senders {
            s.tx = None;
        }
        for i in 0..self.senders.len() {
            let _ = self.join(i);
        }
    }
}

/// One channel thread's state.
struct Worker {
    index: u16,
    count: u16,
    session: u64,
    flags: u16,
    blocks: Vec<RamBlock>,
    descs: Vec<BlockDesc>,
    counters: Arc<ChannelCounters>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(self, conn: ChannelWriter, rx: Receiver<Job>) -> io::Result<()> {
        let wire = Arc::new(WireClock::default());
        let mut link = LinkCost::new(wire.clone());
        let mut w = StreamWriter::new(TimedWrite::new(conn, wire), self.flags);
        w.channel(self.index, self.count, self.session)?;
        w.block_list(&self.descs)?;
        let mut seq = 0u64;
        w.section_end(seq)?;
        seq += 1;
        let mut encoder: Option<PageEncoder> = None;
        let mut batches = 0u32;
        let mut postcopy = false;
        // Ends when the main thread drops its sender (failure or cancel).
        while let Ok(job) = rx.recv() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            match job {
                Job::Pages(pages, enc) => {
                    let count = pages.len() as u64;
                    let e = encoder.get_or_insert_with(|| PageEncoder::new(enc.adaptive));
                    e.set_compression(enc.compress.map(|p| (p.algorithm, p.level)), enc.adaptive);
                    link.update();
                    let mb = enc.max_bandwidth;
                    e.decide(link.ns_per_byte(mb), link.capped(mb));
                    for Queued { block, page, known } in pages {
                        let offset = page * PAGE_SIZE as u64;
                        match known {
                            Known::Untouched => e.untouched(&mut w, block, offset)?,
                            Known::Zero => e.known_zero(&mut w, block, offset)?,
                            Known::Nothing => {
                                let page = Page {
                                    region: self.blocks[usize::from(block)].region(),
                                    block,
                                    offset,
                                };
                                e.encode(&mut w, page, None)?;
                            }
                        }
                    }
                    batches += 1;
                    if postcopy || batches.is_multiple_of(BATCHES_PER_SECTION) {
                        w.section_end(seq)?;
                        seq += 1;
                    }
                    self.counters.pages.fetch_add(count, Ordering::Relaxed);
                }
                Job::Sync(epoch) => {
                    w.sync(epoch)?;
                    w.section_end(seq)?;
                    seq += 1;
                }
                Job::Postcopy => {
                    w.postcopy()?;
                    w.section_end(seq)?;
                    seq += 1;
                    postcopy = true;
                }
                Job::Finish => {
                    w.end()?;
                    self.publish(&w, encoder.as_ref());
                    return Ok(());
                }
            }
            self.publish(&w, encoder.as_ref());
        }
        Err(io::Error::other("stopped before the end of the migration"))
    }
}

impl Worker {
    /// Makes what this channel sent so far readable by the main thread.
    fn publish<W: Write>(&self, w: &StreamWriter<W>, encoder: Option<&PageEncoder>) {
        self.counters.bytes.store(w.bytes(), Ordering::Relaxed);
        if let Some(e) = encoder {
            *self
                .counters
                .encoded
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = e.counters();
        }
    }
}

/// Pages of a window: the destination faults memory in 2 MiB windows
/// (`prefault.rs`; one huge page where allowed).
const WINDOW_PAGES: u64 = (1 << super::prefault::WINDOW_SHIFT) / PAGE_SIZE as u64;

/// The (block, window) a queued page falls in. All pages of a window go
/// to one channel ([`SendChannels::flush_batch`]): two destination
/// channels writing into one window at once can both fault its huge page
/// in, and the kernel then clears two for it (each faulting thread clears
/// its own before it takes the page table lock) and throws one away.
fn window_of(q: &Queued) -> (u16, u64) {
    (q.block, q.page / WINDOW_PAGES)
}

/// The channel to hand the next batch to: the fewest pages in flight;
/// among equals the first from `start` on (the caller moves `start` on
/// after each batch, so channels that keep up take turns).
fn least_loaded(load: &[u64], start: usize) -> usize {
    let n = load.len();
    let mut best = start % n.max(1);
    for k in 1..n {
        let i = (start + k) % n;
        if load[i] < load[best] {
            best = i;
        }
    }
    best
}

/// Why waiting at the barrier failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BarrierError {
    /// Another channel failed; its error is the one to report.
    Aborted,
    /// A channel ended before reaching the epoch.
    Ended {
        /// The channel that ended.
        channel: usize,
        /// Syncs it had passed.
        passed: u64,
    },
}

#[derive(Default)]
struct BarrierState {
    /// Syncs each channel has passed.
    passed: Vec<u64>,
    /// Channels that have read their end record.
    ended: Vec<bool>,
    aborted: bool,
}

/// The destination's barrier: a channel that passed sync `n` waits until
/// every channel has.
pub(super) struct EpochBarrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
}

impl EpochBarrier {
    /// A barrier for `n` streams (main channel included).
    pub fn new(n: usize) -> Self {
        EpochBarrier {
            state: Mutex::new(BarrierState {
                passed: vec![0; n],
                ended: vec![false; n],
                aborted: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Channel `ch` has read the barrier record of its `n`th sync; returns
    /// once every channel has.
    pub fn reach(&self, ch: usize, n: u64) -> Result<(), BarrierError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.passed[ch] = n;
        self.cv.notify_all();
        loop {
            if st.aborted {
                return Err(BarrierError::Aborted);
            }
            let mut behind = false;
            for c in 0..st.passed.len() {
                if st.passed[c] < n {
                    if st.ended[c] {
                        return Err(BarrierError::Ended {
                            channel: c,
                            passed: st.passed[c],
                        });
                    }
                    behind = true;
                }
            }
            if !behind {
                return Ok(());
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Channel `ch` has read its end record.
    pub fn end(&self, ch: usize) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.ended[ch] = true;
        self.cv.notify_all();
    }

    /// A channel failed: every waiter returns.
    pub fn abort(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.aborted = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_go_to_the_channel_with_the_fewest_pages_in_flight() {
        assert_eq!(least_loaded(&[], 0), 0);
        assert_eq!(least_loaded(&[256, 128, 384], 0), 1);
        assert_eq!(least_loaded(&[128, 128, 0], 0), 2);
        assert_eq!(least_loaded(&[5, 3, 3], 0), 1);
        // Among equals, turns: channels that keep up all get batches.
        assert_eq!(least_loaded(&[0, 0, 0], 0), 0);
        assert_eq!(least_loaded(&[0, 0, 0], 1), 1);
        assert_eq!(least_loaded(&[0, 0, 0], 2), 2);
        assert_eq!(least_loaded(&[5, 3, 3], 2), 2);
        assert_eq!(least_loaded(&[0, 7, 0], 1), 2);
    }

    /// A channel connection that holds every write until released.
    #[derive(Clone)]
    struct Gate(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut open = m.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Two page channels over [`Gate`]s (`open`: writes pass at once)
    /// for the one block of `mem`, and a plain page encoding.
    fn gated_channels(
        mem: &crate::memory::ProcessMemory,
        open: bool,
        session: u64,
    ) -> (Vec<Gate>, SendChannels, PageEncoding) {
        use crate::memory::GuestMemory;
        let gates: Vec<Gate> = (0..2)
            .map(|_| {
                Gate(
                    Arc::new((Mutex::new(open), Condvar::new())),
                    Default::default(),
                )
            })
            .collect();
        let conns: Vec<ChannelWriter> = gates
            .iter()
            .map(|g| Box::new(g.clone()) as ChannelWriter)
            .collect();
        let setup = ChannelSetup {
            flags: 0,
            session,
            blocks: mem.blocks().to_vec(),
            descs: vec![BlockDesc {
                id: "ram".into(),
                len: mem.blocks()[0].len(),
            }],
        };
        let ch = SendChannels::start(conns, &setup).unwrap();
        let enc = PageEncoding {
            compress: None,
            adaptive: false,
            max_bandwidth: 0,
        };
        (gates, ch, enc)
    }

    /// Opens every gate: held writes go through.
    fn open(gates: &[Gate]) {
        for g in gates {
            let (m, cv) = &*g.0;
            *m.lock().unwrap() = true;
            cv.notify_all();
        }
    }

    #[test]
    fn only_idle_channels_take_a_window_and_its_pages_count_in_flight() {
        use crate::memory::ProcessMemory;
        let mem = ProcessMemory::new(&[("ram", 16 << 20)]).unwrap();
        let (gates, mut ch, enc) = gated_channels(&mem, false, 7);
        // Both connections are closed: nothing gets written. Three
        // windows of pages and 5 more.
        let window = WINDOW_PAGES as usize;
        assert!(window.is_multiple_of(BATCH_PAGES) && window / BATCH_PAGES <= QUEUE_DEPTH);
        let n = 3 * window as u64 + 5;
        let taken: Vec<bool> = (0..n).map(|p| ch.offer(0, p, enc).unwrap()).collect();
        // The first two windows went to the two idle channels, one each;
        // then no channel was idle: the main thread keeps the rest.
        let w = WINDOW_PAGES as usize;
        assert!(taken[..2 * w].iter().all(|&t| t));
        assert!(taken[2 * w..].iter().all(|&t| !t));
        assert_eq!(ch.in_flight_pages(), 2 * WINDOW_PAGES);
        assert!(ch.senders.iter().all(|s| s.queued == WINDOW_PAGES));
        open(&gates);
        // Once a channel has written its window it is idle again, and
        // takes the next window offered.
        let t = std::time::Instant::now();
        while ch.senders[0].in_flight() > 0 {
            assert!(t.elapsed() < std::time::Duration::from_secs(60));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        ch.next = 0;
        assert!(ch.offer(0, n + w as u64, enc).unwrap());
        ch.finish(enc).unwrap();
        assert_eq!(ch.in_flight_pages(), 0);
        let pages: u64 = ch
            .senders
            .iter()
            .map(|s| s.counters.pages.load(Ordering::Relaxed))
            .sum();
        assert_eq!(pages, 2 * WINDOW_PAGES + 1);
        assert!(gates.iter().all(|g| !g.1.lock().unwrap().is_empty()));
    }

    /// The windows (see [`window_of`]) whose pages each gate's stream
    /// carries.
    fn windows_per_channel(gates: &[Gate]) -> Vec<std::collections::BTreeSet<u64>> {
        use crate::stream::{Record, StreamReader};
        gates
            .iter()
            .map(|g| {
                let bytes = g.1.lock().unwrap().clone();
                let mut r = StreamReader::new(&bytes[..]).unwrap();
                let mut set = std::collections::BTreeSet::new();
                loop {
                    match r.next_record().unwrap() {
                        Record::Raw { offset, .. } | Record::Zero { offset, .. } => {
                            set.insert(offset / PAGE_SIZE as u64 / WINDOW_PAGES);
                        }
                        Record::End => return set,
                        _ => {}
                    }
                }
            })
            .collect()
    }

    #[test]
    fn the_pages_of_a_window_go_to_one_channel() {
        use crate::memory::{GuestMemory, ProcessMemory};
        let mem = ProcessMemory::new(&[("ram", 16 << 20)]).unwrap();
        for p in 0..(16 << 20) / PAGE_SIZE {
            assert!(mem.blocks()[0].region().write(p * PAGE_SIZE, &[1]));
        }
        let (gates, mut ch, enc) = gated_channels(&mem, false, 3);
        // Batches that do not start at a window's first page: a batch
        // that would span two windows is cut at the boundary. The gates
        // open once each channel holds a window: from then on who takes
        // a window depends on timing, and the main thread's windows are
        // the pages `offer` gave back.
        let start = 100;
        let end = 6 * WINDOW_PAGES + 30;
        let mut epoch = 0;
        let mut main = std::collections::BTreeSet::new();
        for p in start..end {
            if p == WINDOW_PAGES + 1 {
                open(&gates);
            }
            if !ch.offer(0, p, enc).unwrap() {
                main.insert(p / WINDOW_PAGES);
            }
            if p % 1000 == 999 {
                // A sync in the middle of a window: the partial batch
                // goes, the window stays on its channel.
                ch.sync(epoch, enc).unwrap();
                epoch += 1;
            }
        }
        ch.finish(enc).unwrap();
        let mut sets = windows_per_channel(&gates);
        assert!(
            sets.iter().all(|s| !s.is_empty()),
            "both channels used: {sets:?}"
        );
        sets.push(main);
        for i in 0..3 {
            for j in i + 1..3 {
                assert!(
                    sets[i].is_disjoint(&sets[j]),
                    "a window on two streams: {sets:?}"
                );
            }
        }
        let all: std::collections::BTreeSet<u64> = sets.iter().flatten().copied().collect();
        assert_eq!(all, (0..=6).collect());
    }

    #[test]
    fn postcopy_pages_known_zero_go_as_zero_records_unread() {
        use crate::memory::{GuestMemory, ProcessMemory};
        use crate::stream::{Record, StreamReader};
        let mem = ProcessMemory::new(&[("ram", 1 << 20)]).unwrap();
        let region = mem.blocks()[0].region();
        // Pages 0-2 hold data; page 3 is zero.
        for p in 0..3 {
            assert!(region.write(p * PAGE_SIZE + 7, &[0xab]));
        }
        let (gates, mut ch, enc) = gated_channels(&mem, true, 9);
        ch.postcopy(enc).unwrap();
        // What the source says it knows is what goes: pages 0 and 1 (data
        // here) as zero records, so the channel did not read them.
        ch.stage(0, 0, Known::Zero);
        ch.stage(0, 1, Known::Untouched);
        ch.stage(0, 2, Known::Nothing);
        ch.stage(0, 3, Known::Nothing);
        assert_eq!(ch.pending(), 4);
        assert!(ch.try_flush_batch(enc).unwrap());
        assert_eq!(ch.pending(), 0);
        ch.finish(enc).unwrap();
        let mut c = EncodeCounters::default();
        for k in ch.counters() {
            c.add(&k);
        }
        assert_eq!((c.zero, c.untouched, c.normal), (3, 1, 1));
        // The one batch went to one channel, whole.
        let mut pages = Vec::new();
        for g in &gates {
            let bytes = g.1.lock().unwrap().clone();
            let mut r = StreamReader::new(&bytes[..]).unwrap();
            loop {
                match r.next_record().unwrap() {
                    Record::Zero { offset, .. } => pages.push((offset, None)),
                    Record::Raw { offset, data, .. } => pages.push((offset, Some(data[7]))),
                    Record::End => break,
                    _ => {}
                }
            }
        }
        let ps = PAGE_SIZE as u64;
        assert_eq!(
            pages,
            vec![(0, None), (ps, None), (2 * ps, Some(0xab)), (3 * ps, None)]
        );
    }

    #[test]
    fn barrier_waits_for_every_channel() {
        let b = Arc::new(EpochBarrier::new(3));
        let b1 = b.clone();
        let b2 = b.clone();
        let t1 = std::thread::spawn(move || b1.reach(1, 1));
        let t2 = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            b2.reach(2, 1)
        });
        assert_eq!(b.reach(0, 1), Ok(()));
        assert_eq!(t1.join().unwrap(), Ok(()));
        assert_eq!(t2.join().unwrap(), Ok(()));
    }

    #[test]
    fn barrier_fails_when_a_channel_ended_early_or_aborts() {
        let b = EpochBarrier::new(2);
        b.end(1);
        assert_eq!(
            b.reach(0, 1),
            Err(BarrierError::Ended {
                channel: 1,
                passed: 0
            })
        );
        let b = Arc::new(EpochBarrier::new(2));
        let b1 = b.clone();
        let t = std::thread::spawn(move || b1.reach(0, 1));
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.abort();
        assert_eq!(t.join().unwrap(), Err(BarrierError::Aborted));
    }
}
