//! The destination's side of postcopy: one call that loads a migration,
//! runs the completion handshake and, when the source switches to
//! postcopy, places the remaining pages with userfaultfd while the guest
//! runs.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{write_message, FaultReport, LatencyHistogram, Message, PageRequest};
use crate::bitmap::DirtyBitmap;
use crate::codec::compress::{Algorithm, Decompressor};
use crate::engine::ack::{read_go, write_reply, CommitError, Reply};
use crate::engine::loader::{LoadError, LoadOutcome, LoadStats, Loader};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::stream::format::{FLAG_URGENT, FLAG_VERIFY};
use crate::stream::{Record, StreamReader};
use crate::sys::uffd::{
    drop_pages, Uffd, UffdMsg, Waker, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_THREAD_ID,
};

const PAGE: u64 = PAGE_SIZE as u64;

/// The guest on the destination, as [`receive`] drives it.
pub trait IncomingGuest {
    /// Loads the device and vCPU state the stream carried (empty for plain
    /// process memory). Called before the guest may run.
    fn restore(&mut self, state: &[u8]) -> Result<(), String>;
    /// Starts the guest (after the source's GO).
    fn resume(&mut self) -> Result<(), String>;
    /// Stops the guest after the source was lost during postcopy. Threads
    /// waiting for a missing page stay blocked for good; the others stop.
    fn pause(&mut self);
}

/// What [`receive`] did.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// The load's figures and device state (the state is already restored).
    pub load: LoadOutcome,
    /// Postcopy figures, when the source switched to postcopy.
    pub postcopy: Option<PostcopyFigures>,
}

/// The destination's postcopy figures.
#[derive(Clone, Debug, Default)]
pub struct PostcopyFigures {
    /// Pages the source said were not valid here at the switch.
    pub discarded_pages: u64,
    /// Pages placed after the switch.
    pub placed_pages: u64,
    /// Page requests sent.
    pub requests: u64,
    /// Fault latencies and blocktime.
    pub faults: FaultReport,
    /// Milliseconds from the switch record to the last page.
    pub postcopy_time: u64,
    /// Pages that came on the urgent connection (postcopy-preempt).
    pub urgent_pages: u64,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream failed to load before the guest ran here (the source
    /// keeps its guest).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The device state was refused (the source keeps its guest).
    #[error("restoring the device state failed: {0}")]
    Restore(String),
    /// No GO (the source keeps its guest; this copy never ran).
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The source switched to postcopy but this destination does not allow it.
    #[error("the source switched to postcopy, but postcopy-ram is off on this destination; the source keeps the guest")]
    PostcopyOff,
    /// Setting up userfaultfd failed (the source keeps its guest).
    #[error("preparing guest memory for postcopy: {0}")]
    Setup(#[source] io::Error),
    /// Resuming the guest failed after GO.
    #[error("resuming the guest after GO failed: {0}")]
    Resume(String),
    /// The migration broke during postcopy: the guest ran here with part
    /// of its memory still on the source and cannot go on. Its threads
    /// that touch a missing page wait for good; it is paused.
    #[error("postcopy failed with {missing} pages still on the source: {cause}; the guest cannot continue (it is paused here, and its missing memory stays unavailable)")]
    SourceLost {
        /// Pages that never arrived.
        missing: u64,
        /// What broke.
        cause: String,
    },
}

/// Receives one migration into `mem` from `input`, answering on `reply`
/// (the return path; `None` for a snapshot file, which cannot postcopy).
///
/// Precopy: loads everything, restores the device state, sends LOADED,
/// waits for GO, resumes the guest, sends STARTED. Postcopy (the source
/// switched, and `allow_postcopy`): at the switch registers guest memory
/// with userfaultfd, drops the pages the source marked, restores the
/// device state, runs the same handshake, resumes the guest, then places
/// every remaining page (requested ones first, by the source's choice)
/// until the stream ends; faults are served by a thread that asks the
/// source for the page.
///
/// `accept` returns the next connection on the destination's listener:
/// the urgent connection of a source with `postcopy-preempt` (header flag
/// `FLAG_URGENT`) is accepted right after the switch. `None` refuses such
/// a source.
pub fn receive<R: Read>(
    mem: &dyn GuestMemory,
    input: R,
    reply: Option<Box<dyn Write + Send>>,
    guest: &mut dyn IncomingGuest,
    allow_postcopy: bool,
    accept: Option<&mut dyn FnMut() -> io::Result<Box<dyn Read + Send>>>,
) -> Result<Received, ReceiveError> {
    let mut reply = reply;
    let fail = |reply: &mut Option<Box<dyn Write + Send>>, why: &str| {
        if let Some(w) = reply.as_mut() {
            let _ = write_reply(&mut **w, &Reply::Failed(why.to_string()));
        }
    };
    let mut loader = Loader::new(mem);
    let mut r = match StreamReader::new(input) {
        Ok(r) => r,
        Err(e) => {
            let e = LoadError::from(e);
            fail(&mut reply, &crate::error_chain(&e));
            return Err(e.into());
        }
    };
    let verify = r.flags() & FLAG_VERIFY != 0;
    let wants_urgent = r.flags() & FLAG_URGENT != 0;
    let o = match loader.load_until_switch(&mut r) {
        Ok(o) => o,
        Err(e) => {
            fail(&mut reply, &crate::error_chain(&e));
            return Err(e.into());
        }
    };
    if !o.switched {
        let out = match loader.finish_precopy(verify, o) {
            Ok(out) => out,
            Err(e) => {
                fail(&mut reply, &crate::error_chain(&e));
                return Err(e.into());
            }
        };
        if let Err(e) = guest.restore(&out.state) {
            fail(&mut reply, &e);
            return Err(ReceiveError::Restore(e));
        }
        if let Some(w) = reply.as_mut() {
            write_reply(&mut **w, &Reply::Loaded).map_err(CommitError::SendLoaded)?;
            let inner = r
                .inner_if_drained()
                .ok_or_else(|| CommitError::NoGo("bytes after the stream's end".into()))?;
            read_go(inner).map_err(CommitError::NoGo)?;
        }
        let go_at = Instant::now();
        guest.resume().map_err(ReceiveError::Resume)?;
        if let Some(w) = reply.as_mut() {
            if let Err(e) = write_reply(&mut **w, &Reply::Started(Some(go_at.elapsed()))) {
                log::warn!("GO received but STARTED could not be sent ({e}): the guest runs here, the source stays paused");
            }
        }
        return Ok(Received {
            load: out,
            postcopy: None,
        });
    }

    // The switch.
    let switched_at = Instant::now();
    let Some(mut w) = reply.take() else {
        return Err(ReceiveError::Load(LoadError::Postcopy {
            offset: r.offset(),
            what: "postcopy switch in a stream without a return path".into(),
        }));
    };
    if !allow_postcopy {
        let e = ReceiveError::PostcopyOff;
        fail(&mut Some(w), &e.to_string());
        return Err(e);
    }
    let placer = match Placer::new(mem, &o.map, &o.discard) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            let e = ReceiveError::Setup(e);
            fail(&mut Some(w), &crate::error_chain(&e));
            return Err(e);
        }
    };
    let discarded = placer.missing();
    // The urgent connection (postcopy-preempt) comes right after the switch.
    let mut urgent = None;
    if wants_urgent {
        let opened = match accept {
            None => Err("the source wants an urgent connection (postcopy-preempt) but this destination accepts none".to_string()),
            Some(accept) => accept()
                .map_err(|e| format!("accepting the postcopy urgent connection: {e}"))
                .and_then(|c| open_urgent(c, &o.map.len(), mem, &o.map).map_err(|e| crate::error_chain(&e))),
        };
        match opened {
            Ok(u) => urgent = Some(u),
            Err(why) => {
                placer.release();
                fail(&mut Some(w), &why);
                return Err(ReceiveError::Load(LoadError::Postcopy {
                    offset: r.offset(),
                    what: why,
                }));
            }
        }
    }
    if let Err(e) = guest.restore(&o.state) {
        placer.release();
        fail(&mut Some(w), &e);
        return Err(ReceiveError::Restore(e));
    }
    let go = write_reply(&mut *w, &Reply::Loaded)
        .map_err(CommitError::SendLoaded)
        .and_then(|()| {
            let inner = r.inner_if_drained().ok_or_else(|| {
                CommitError::NoGo("stream bytes after the switch before GO".into())
            })?;
            read_go(inner).map_err(CommitError::NoGo)
        });
    if let Err(e) = go {
        placer.release();
        return Err(e.into());
    }
    let go_at = Instant::now();

    // GO: the guest is ours. Requests go out only after STARTED (the
    // fault thread needs the return path's lock, held until then).
    let reply = Arc::new(Mutex::new(w));
    let stop = Arc::new(AtomicBool::new(false));
    let waker = Arc::new(Waker::new().map_err(ReceiveError::Setup)?);
    let fault_err: Arc<Mutex<Option<String>>> = Arc::default();
    let gate = lock(&reply);
    let thread = {
        let (p, reply, stop, waker, err) = (
            placer.clone(),
            reply.clone(),
            stop.clone(),
            waker.clone(),
            fault_err.clone(),
        );
        std::thread::Builder::new()
            .name("livemig-postcopy-faults".into())
            .spawn(move || {
                if let Err(e) = fault_loop(&p, &stop, &waker, &reply) {
                    *lock(&err) = Some(e);
                }
            })
            .map_err(ReceiveError::Setup)?
    };
    let mut gate = Some(gate);
    let stop_thread = |gate: &mut Option<MutexGuard<'_, Box<dyn Write + Send>>>| {
        gate.take();
        stop.store(true, Ordering::SeqCst);
        let _ = waker.wake();
    };
    if let Err(e) = guest.resume() {
        // The guest never ran: nothing was lost, the source may resume
        // (it got GO, so it stays paused and reports STARTED missing).
        stop_thread(&mut gate);
        let _ = thread.join();
        placer.release();
        return Err(ReceiveError::Resume(e));
    }
    if let Some(g) = gate.as_mut() {
        if let Err(e) = write_reply(&mut ***g, &Reply::Started(Some(go_at.elapsed()))) {
            log::warn!("STARTED could not be sent ({e}); postcopy goes on");
        }
    }
    gate.take();

    let mut stats = o.stats;
    let mut urgent_pages = 0;
    let result = match urgent.as_mut() {
        None => place_stream(&mut r, &placer, &mut stats),
        Some(u) => std::thread::scope(|s| {
            let p = &placer;
            let t = s.spawn(move || {
                let mut us = LoadStats::default();
                place_stream(u, p, &mut us).map(|()| us)
            });
            let main = place_stream(&mut r, &placer, &mut stats);
            if main.is_err() {
                // Tell the source now: it closes the urgent connection.
                let _ = write_message(
                    &mut **lock(&reply),
                    &Message::Failed("the destination's main stream failed".into()),
                );
            }
            let urgent = t.join().unwrap_or_else(|_| {
                Err(LoadError::Postcopy {
                    offset: 0,
                    what: "the urgent connection's thread panicked".into(),
                })
            });
            main.and_then(|()| {
                let us = urgent.map_err(|e| LoadError::Postcopy {
                    offset: 0,
                    what: format!("urgent connection: {}", crate::error_chain(&e)),
                })?;
                urgent_pages = us.raw_pages + us.zero_pages + us.compressed_pages;
                stats.raw_pages += us.raw_pages;
                stats.zero_pages += us.zero_pages;
                stats.compressed_pages += us.compressed_pages;
                stats.bytes += us.bytes;
                Ok(())
            })
        }),
    };
    stop_thread(&mut gate);
    let _ = thread.join();
    let fault_failed = lock(&fault_err).take();
    let missing = placer.missing();
    let cause = match (result, fault_failed) {
        (Err(e), _) => Some(crate::error_chain(&e)),
        (Ok(()), Some(e)) => Some(e),
        (Ok(()), None) if missing > 0 => Some("the stream ended before every page arrived".into()),
        (Ok(()), None) => None,
    };
    if let Some(cause) = cause {
        guest.pause();
        let _ = write_message(&mut **lock(&reply), &Message::Failed(cause.clone()));
        // Keep missing memory registered for good: a guest thread must
        // never read a missing page as zeros.
        placer.abandon();
        return Err(ReceiveError::SourceLost { missing, cause });
    }
    placer.release();
    let mut figures = placer.figures(discarded, switched_at);
    figures.urgent_pages = urgent_pages;
    if let Err(e) = write_message(
        &mut **lock(&reply),
        &Message::Complete(figures.faults.clone()),
    ) {
        log::warn!("every page arrived but COMPLETE could not be sent to the source: {e}");
    }
    Ok(Received {
        load: LoadOutcome {
            state: o.state,
            digest: None,
            stats,
        },
        postcopy: Some(figures),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the urgent connection's start: a stream with the same block list.
fn open_urgent(
    conn: Box<dyn Read + Send>,
    _n: &usize,
    mem: &dyn GuestMemory,
    map: &[usize],
) -> Result<StreamReader<Box<dyn Read + Send>>, LoadError> {
    let mut u = StreamReader::new(conn)?;
    let at = u.offset();
    let Record::BlockList(list) = u.next_record()? else {
        return Err(LoadError::Postcopy {
            offset: at,
            what: "the urgent connection must start with the block list".into(),
        });
    };
    let blocks = mem.blocks();
    let same = list.len() == map.len()
        && list
            .iter()
            .zip(map)
            .all(|(d, &i)| blocks[i].id() == d.id && blocks[i].len() == d.len);
    if !same {
        return Err(LoadError::Postcopy {
            offset: at,
            what: "the urgent connection's block list differs from the main stream's".into(),
        });
    }
    Ok(u)
}

/// Places the pages that follow the switch until END.
fn place_stream<R: Read>(
    r: &mut StreamReader<R>,
    p: &Placer,
    stats: &mut LoadStats,
) -> Result<(), LoadError> {
    let mut scratch = vec![0u8; PAGE_SIZE];
    let mut dec = Decompressor::new();
    let place_err = |at: u64, block: u16, offset: u64, e: io::Error| LoadError::Postcopy {
        offset: at,
        what: format!("placing page {offset:#x} of block {block}: {e}"),
    };
    loop {
        let at = r.offset();
        match r.next_record()? {
            Record::Zero { block, offset } => {
                stats.zero_pages += 1;
                p.place(usize::from(block), offset / PAGE, None)
                    .map_err(|e| place_err(at, block, offset, e))?;
            }
            Record::Raw {
                block,
                offset,
                data,
            } => {
                stats.raw_pages += 1;
                p.place(usize::from(block), offset / PAGE, Some(data))
                    .map_err(|e| place_err(at, block, offset, e))?;
            }
            Record::Compressed {
                block,
                offset,
                algo,
                data,
            } => {
                stats.compressed_pages += 1;
                let algo = Algorithm::from_u8(algo).expect("reader checked the algorithm id");
                if let Err(source) = dec.decompress(algo, data, &mut scratch) {
                    return Err(LoadError::Decompress {
                        offset: r.offset(),
                        record: r.record(),
                        block: format!("index {block}"),
                        page_offset: offset,
                        source,
                    });
                }
                p.place(usize::from(block), offset / PAGE, Some(&scratch))
                    .map_err(|e| place_err(at, block, offset, e))?;
            }
            Record::SectionEnd { .. } => stats.sections += 1,
            Record::End => break,
            other => {
                let what = match other {
                    Record::Xbzrle { .. } => "xbzrle page (the destination has no copy to patch)",
                    Record::State(_) => "device state",
                    Record::Digest(_) => "digest",
                    Record::Discard { .. } => "discard",
                    Record::BlockList(_) => "block list",
                    _ => "record",
                };
                return Err(LoadError::Postcopy {
                    offset: at,
                    what: format!("{what} after the postcopy switch"),
                });
            }
        }
    }
    stats.bytes = r.offset();
    Ok(())
}

/// One stream block's memory here.
struct Span {
    host: u64,
    len: u64,
}

/// Fault bookkeeping shared by the fault thread and the placing thread.
#[derive(Default)]
struct Waits {
    /// Pages a guest thread waits for: when it faulted, which thread.
    pending: HashMap<(usize, u64), Vec<(Instant, u32)>>,
    hist: LatencyHistogram,
    per_thread: HashMap<u32, u64>,
    blocktime_us: u64,
    requests: u64,
}

/// Places pages with userfaultfd and tracks which have arrived.
pub(crate) struct Placer {
    uffd: Uffd,
    spans: Vec<Span>,
    /// One bit per page, per stream block: set once the page is valid here
    /// (valid at the switch, or placed since).
    received: Vec<Vec<AtomicU64>>,
    missing: AtomicU64,
    placed: AtomicU64,
    waits: Mutex<Waits>,
    released: AtomicBool,
}

impl Placer {
    /// Registers every block (stream order `map`) for missing faults, then
    /// drops the pages `discard` marks, so that they fault.
    fn new(mem: &dyn GuestMemory, map: &[usize], discard: &[DirtyBitmap]) -> io::Result<Placer> {
        let uffd = Uffd::open()?;
        if uffd.api(UFFD_FEATURE_THREAD_ID).is_err() {
            // The API call is allowed once per fd: start again without ids.
            let u = Uffd::open()?;
            u.api(0)?;
            return Self::with_uffd(u, mem, map, discard);
        }
        Self::with_uffd(uffd, mem, map, discard)
    }

    fn with_uffd(
        uffd: Uffd,
        mem: &dyn GuestMemory,
        map: &[usize],
        discard: &[DirtyBitmap],
    ) -> io::Result<Placer> {
        let blocks = mem.blocks();
        let mut spans = Vec::new();
        let mut received = Vec::new();
        let mut missing = 0;
        for (&d, bm) in map.iter().zip(discard) {
            let region = blocks[d].region();
            let span = Span {
                host: region.host_addr(),
                len: region.len() as u64,
            };
            uffd.register_missing(span.host, span.len)?;
            let bits: Vec<AtomicU64> = bm.words().iter().map(|w| AtomicU64::new(!w)).collect();
            for (first, n) in runs(bm) {
                drop_pages(span.host + first * PAGE, n * PAGE)?;
                missing += n;
            }
            spans.push(span);
            received.push(bits);
        }
        Ok(Placer {
            uffd,
            spans,
            received,
            missing: AtomicU64::new(missing),
            placed: AtomicU64::new(0),
            waits: Mutex::default(),
            released: AtomicBool::new(false),
        })
    }

    fn missing(&self) -> u64 {
        self.missing.load(Ordering::SeqCst)
    }

    fn is_received(&self, block: usize, page: u64) -> bool {
        let w = self.received[block][(page / 64) as usize].load(Ordering::Acquire);
        w & (1 << (page % 64)) != 0
    }

    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.spans
            .iter()
            .position(|s| addr >= s.host && addr < s.host + s.len)
            .map(|b| (b, (addr - self.spans[b].host) / PAGE))
    }

    /// Places one page (zeros for `None`) unless it is already here.
    fn place(&self, block: usize, page: u64, data: Option<&[u8]>) -> io::Result<()> {
        if self.is_received(block, page) {
            return Ok(());
        }
        let addr = self.spans[block].host + page * PAGE;
        let r = match data {
            Some(d) => self.uffd.copy(addr, d),
            None => self.uffd.zeropage(addr, PAGE),
        };
        match r {
            Ok(()) => {}
            // Already placed (a fault served with zeros raced us): fine.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.received[block][(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        self.missing.fetch_sub(1, Ordering::SeqCst);
        self.placed.fetch_add(1, Ordering::Relaxed);
        let mut w = lock(&self.waits);
        if let Some(waiters) = w.pending.remove(&(block, page)) {
            for (t, tid) in waiters {
                let us = t.elapsed().as_micros() as u64;
                w.hist.record(us);
                *w.per_thread.entry(tid).or_default() += us;
                w.blocktime_us += us;
            }
        }
        Ok(())
    }

    /// Unregisters every block: done, or the guest never ran.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in &self.spans {
            if let Err(e) = self.uffd.unregister(s.host, s.len) {
                log::warn!("unregistering guest memory from userfaultfd: {e}");
            }
        }
    }

    /// Keeps the userfaultfd open for good (a leaked descriptor): the
    /// missing pages stay registered, so no thread reads them as zeros.
    fn abandon(self: Arc<Self>) {
        self.released.store(true, Ordering::SeqCst);
        std::mem::forget(self);
    }

    fn figures(&self, discarded: u64, switched_at: Instant) -> PostcopyFigures {
        let w = lock(&self.waits);
        let mut threads: Vec<(u32, u64)> = w.per_thread.iter().map(|(&t, &us)| (t, us)).collect();
        threads.sort_unstable();
        PostcopyFigures {
            discarded_pages: discarded,
            placed_pages: self.placed.load(Ordering::Relaxed),
            requests: w.requests,
            faults: FaultReport {
                faults: w.hist.count(),
                blocktime_us: w.blocktime_us,
                latency_sum_us: w.hist.sum(),
                p50_us: w.hist.quantile(0.5),
                p99_us: w.hist.quantile(0.99),
                threads,
                buckets: w.hist.buckets(),
            },
            postcopy_time: switched_at.elapsed().as_millis() as u64,
            urgent_pages: 0,
        }
    }
}

/// Runs of set bits: (first page, count).
fn runs(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut p = 0;
    while let Some(first) = bm.next_set(p) {
        let mut end = first + 1;
        while end < bm.len() && bm.test(end) {
            end += 1;
        }
        out.push((first, end - first));
        p = end;
    }
    out
}

/// Reads faults and asks the source for each missing page (once).
fn fault_loop(
    p: &Placer,
    stop: &AtomicBool,
    waker: &Waker,
    reply: &Mutex<Box<dyn Write + Send>>,
) -> Result<(), String> {
    let mut msgs = [UffdMsg::default(); 64];
    while !stop.load(Ordering::SeqCst) {
        let ready = p
            .uffd
            .poll(Some(waker.as_fd()), 200)
            .map_err(|e| format!("polling userfaultfd: {e}"))?;
        if !ready {
            continue;
        }
        let n = p
            .uffd
            .read_msgs(&mut msgs)
            .map_err(|e| format!("reading userfaultfd: {e}"))?;
        for m in &msgs[..n] {
            if m.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = m.fault_address() & !(PAGE - 1);
            let tid = m.arg[2] as u32;
            let Some((block, page)) = p.locate(addr) else {
                continue;
            };
            let now = Instant::now();
            let first = {
                let mut w = lock(&p.waits);
                let v = w.pending.entry((block, page)).or_default();
                v.push((now, tid));
                v.len() == 1
            };
            if p.is_received(block, page) {
                // Valid here but never touched (zeros), or placed just now.
                lock(&p.waits).pending.remove(&(block, page));
                match p.uffd.zeropage(addr, PAGE) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let _ = p.uffd.wake(addr, PAGE);
                    }
                    Err(e) => return Err(format!("placing a zero page at {addr:#x}: {e}")),
                }
                continue;
            }
            if first {
                let req = Message::Request(PageRequest {
                    block: block as u16,
                    offset: page * PAGE,
                    len: PAGE as u32,
                });
                write_message(&mut **lock(reply), &req)
                    .map_err(|e| format!("sending a page request to the source: {e}"))?;
                lock(&p.waits).requests += 1;
            }
        }
    }
    Ok(())
}
