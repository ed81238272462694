//! Same-host transport over shared memory (`shm:PATH`): an RX/TX pair of
//! slot rings in one sealed memfd that both processes map.
//!
//! The destination listens on a Unix socket at PATH. The source connects,
//! creates the memfd, and passes it with SCM_RIGHTS together with the
//! layout ([`Geometry`]); the destination checks the layout against its
//! own bounds and the file's seals and size, maps it and answers with one
//! byte (or a refusal with its reason). The source reads that answer
//! lazily, at its first wait, so connecting never waits for an accept
//! (page channels connect before the destination accepts them). Beyond
//! that the socket carries nothing: it only tells each side when the
//! other is gone (hang-up).
//!
//! # Rings and slots
//!
//! - **TX** carries the stream, source → destination.
//! - **RX** carries the return path (the acknowledgement), destination →
//!   source.
//!
//! Each ring is a fixed number of fixed-size slots used in order. A slot
//! has a descriptor of four 32-bit words in shared memory: `owner`
//! (producer or consumer), `holder` (a check word: who holds a guard right
//! now, set on acquire and cleared before release), `len` (bytes the
//! producer filled) and `waiters` (sleepers on `owner`, so a release only
//! makes the wake-up system call when someone sleeps).
//!
//! # One owner at a time
//!
//! A slot belongs to exactly one side: the producer while `owner` is
//! [`PRODUCER`], the consumer while it is [`CONSUMER`]. Only the owner
//! changes the word, and only to hand the slot to the other side.
//! [`Session::acquire`] waits until this side owns the slot and returns a
//! [`SlotGuard`]; dropping the guard — on every exit path, an early return
//! or a panic unwinding included — hands the slot to the peer and wakes it
//! (futex on the `owner` word). Waits are bounded: every
//! [`WAIT_SLICE`] the waiter also checks the socket, so a peer that closed
//! it or died ends the wait with [`ShmError::PeerGone`], and after the
//! session timeout with [`ShmError::TimedOut`].
//!
//! # End of stream
//!
//! The first page holds a closed flag per ring end. A producer sets its
//! flag after handing over its last slot (dropping [`ShmWriter`]): the
//! consumer reads end-of-file once every filled slot is read. A consumer
//! sets its flag when it stops reading: the producer's next wait fails
//! ([`ShmError::PeerClosed`], a broken pipe). A producer that dies
//! without setting its flag is [`ShmError::PeerGone`], never end-of-file.
//!
//! # Lock order: TX, then RX
//!
//! When one side needs a slot of each ring it takes the TX slot first.
//! [`Session::acquire_pair`] does exactly that; [`Session::acquire`]
//! refuses a TX slot while this process holds an RX guard
//! ([`ShmError::LockOrder`]), so the order cannot be broken by accident.
//!
//! # The peer is not trusted
//!
//! Everything read from shared memory is validated: an owner word other
//! than the two states, a holder mark that is not ours, a length longer
//! than the slot are errors that name the slot. Lengths are read once into
//! a local before they are checked and used, and data is only ever copied
//! out (never parsed in place), so a peer changing bytes after a check
//! cannot change what was checked.

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::sys::shm::{
    check_sealed, create_memfd, futex_wait, futex_wake, peer_hung_up, SharedMapping,
};

#[cfg(test)]
mod tests;

/// `owner` value: the producer may fill the slot.
pub const PRODUCER: u32 = 0;
/// `owner` value: the consumer may read the slot.
pub const CONSUMER: u32 = 1;

/// `holder` marks: nobody, the producer, the consumer.
const HOLDER_NONE: u32 = 0;
const HOLDER_PRODUCER: u32 = 1;
const HOLDER_CONSUMER: u32 = 2;

/// How long one futex sleep lasts before the waiter checks the socket.
pub const WAIT_SLICE: Duration = Duration::from_millis(20);

/// First bytes of the handshake.
const HELLO_MAGIC: [u8; 8] = *b"LVMGSHM1";
/// Layout version of the shared buffer.
const VERSION: u32 = 1;
/// Magic, version and the four geometry words.
const HELLO_LEN: usize = 8 + 4 + 4 * 4;
/// The destination's answer: accepted.
const REPLY_OK: u8 = b'K';
/// The destination's answer: refused, a message follows.
const REPLY_ERR: u8 = b'E';

const PAGE: usize = 4096;
/// Bytes per slot descriptor (one cache line, so neighbours do not share).
const DESC_SIZE: usize = 64;
const DESC_OWNER: usize = 0;
const DESC_HOLDER: usize = 4;
const DESC_LEN: usize = 8;
const DESC_WAITERS: usize = 12;

/// Bounds the destination enforces on a layout it is sent.
pub const MAX_SLOTS: u32 = 1024;
/// Largest slot.
pub const MAX_SLOT_SIZE: u32 = 64 << 20;
/// Largest shared buffer.
pub const MAX_TOTAL: u64 = 1 << 30;

/// The two rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingId {
    /// Source → destination: the stream.
    Tx,
    /// Destination → source: the return path.
    Rx,
}

impl fmt::Display for RingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingId::Tx => f.write_str("TX (source to destination)"),
            RingId::Rx => f.write_str("RX (destination to source)"),
        }
    }
}

impl RingId {
    fn idx(self) -> usize {
        match self {
            RingId::Tx => 0,
            RingId::Rx => 1,
        }
    }
}

/// Which end of the session this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Produces TX, consumes RX.
    Source,
    /// Consumes TX, produces RX.
    Destination,
}

impl Side {
    fn produces(self, ring: RingId) -> bool {
        matches!(
            (self, ring),
            (Side::Source, RingId::Tx) | (Side::Destination, RingId::Rx)
        )
    }
}

/// Errors of the shared-memory transport, naming ring and slot.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// A slot index past the ring.
    #[error("slot {index} of the {ring} buffer is not available: the ring has {slots} slots")]
    NotAvailable {
        /// Ring.
        ring: RingId,
        /// Index asked for.
        index: u32,
        /// Slots in the ring.
        slots: u32,
    },
    /// This process already holds a guard on the slot.
    #[error("slot {index} of the {ring} buffer is already held by this process")]
    AlreadyHeld {
        /// Ring.
        ring: RingId,
        /// Slot.
        index: u32,
    },
    /// A TX slot asked for while an RX guard is held.
    #[error("TX slot {index} asked for while this process holds an RX slot: the lock order is TX, then RX")]
    LockOrder {
        /// TX slot asked for.
        index: u32,
    },
    /// The producer closed the ring and everything it sent has been read.
    #[error("the {ring} buffer is closed by its producer (end of stream)")]
    EndOfStream {
        /// Ring.
        ring: RingId,
    },
    /// The consumer closed the ring: nothing written would be read.
    #[error("the {ring} buffer is closed by its consumer: it reads no more")]
    PeerClosed {
        /// Ring.
        ring: RingId,
    },
    /// The peer closed its socket or died while this side waited.
    #[error(
        "the peer closed its socket or died while waiting for slot {index} of the {ring} buffer"
    )]
    PeerGone {
        /// Ring.
        ring: RingId,
        /// Slot waited for.
        index: u32,
    },
    /// The peer kept the slot too long.
    #[error("slot {index} of the {ring} buffer not handed over within {secs} s")]
    TimedOut {
        /// Ring.
        ring: RingId,
        /// Slot waited for.
        index: u32,
        /// The session timeout.
        secs: u64,
    },
    /// A control word in shared memory holds an impossible value: the peer
    /// is buggy or hostile.
    #[error("slot {index} of the {ring} buffer: {what} is {value:#x}: the peer broke the ownership protocol")]
    Corrupt {
        /// Ring.
        ring: RingId,
        /// Slot.
        index: u32,
        /// Which word.
        what: &'static str,
        /// Value found.
        value: u32,
    },
    /// A length in shared memory longer than the slot.
    #[error("slot {index} of the {ring} buffer claims {len} bytes, the slot holds {max}")]
    BadLength {
        /// Ring.
        ring: RingId,
        /// Slot.
        index: u32,
        /// Length claimed.
        len: u64,
        /// Slot capacity.
        max: u64,
    },
    /// A guard used against its role (reading a producer's unfilled slot,
    /// writing a consumer's slot) or out of its bounds.
    #[error("slot {index} of the {ring} buffer: {what}")]
    Misuse {
        /// Ring.
        ring: RingId,
        /// Slot.
        index: u32,
        /// What was wrong.
        what: String,
    },
    /// The handshake failed or the layout was refused.
    #[error("shared-memory handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// OS error.
        source: io::Error,
    },
}

impl ShmError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> ShmError {
        move |source| ShmError::Io { op, source }
    }

    /// The `io::ErrorKind` a stream user expects for this error.
    fn kind(&self) -> io::ErrorKind {
        match self {
            ShmError::PeerClosed { .. } => io::ErrorKind::BrokenPipe,
            ShmError::PeerGone { .. } => io::ErrorKind::ConnectionAborted,
            ShmError::TimedOut { .. } => io::ErrorKind::TimedOut,
            ShmError::EndOfStream { .. } => io::ErrorKind::UnexpectedEof,
            ShmError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        }
    }
}

impl From<ShmError> for io::Error {
    fn from(e: ShmError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Sizes of the two rings. The source chooses; the destination checks
/// them against [`MAX_SLOTS`], [`MAX_SLOT_SIZE`] and [`MAX_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Slots in TX.
    pub tx_slots: u32,
    /// Bytes per TX slot (a multiple of 4096).
    pub tx_slot_size: u32,
    /// Slots in RX.
    pub rx_slots: u32,
    /// Bytes per RX slot (a multiple of 4096).
    pub rx_slot_size: u32,
}

impl Default for Geometry {
    /// TX: 4 slots of 256 KiB: 1 MiB in flight, a size caches hold, so
    /// the consumer mostly reads bytes still in cache (8 x 1 MiB measured
    /// the same within this host's noise, BENCHMARKS.md section shm). RX:
    /// 2 slots of 8 KiB (an acknowledgement is at most 4 KiB and 13 bytes).
    fn default() -> Self {
        Geometry {
            tx_slots: 4,
            tx_slot_size: 256 << 10,
            rx_slots: 2,
            rx_slot_size: 8 << 10,
        }
    }
}

/// Why the shared-memory handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A ring with no slots, or too many.
    #[error("layout refused: {ring} has {slots} slots (1..={MAX_SLOTS})")]
    SlotCount {
        /// "TX" or "RX".
        ring: &'static str,
        /// Slots announced.
        slots: u32,
    },
    /// A slot size out of bounds or not page-aligned.
    #[error("layout refused: {ring} slot size {size} is not a multiple of {PAGE} in {PAGE}..={MAX_SLOT_SIZE}")]
    SlotSize {
        /// "TX" or "RX".
        ring: &'static str,
        /// Slot size announced.
        size: u32,
    },
    /// The whole buffer would be too large.
    #[error("layout refused: {0} bytes in all (at most {MAX_TOTAL})")]
    TooLarge(u64),
    /// The destination refused the offer, in its words.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// An answer byte that is neither OK nor a refusal.
    #[error("unknown answer byte {0:#04x}")]
    UnknownAnswer(u8),
    /// The offer did not go out whole.
    #[error("sent {sent} of {len} handshake bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes of the offer.
        len: usize,
    },
    /// No answer came.
    #[error("no answer from the destination: {0}")]
    NoAnswer(#[source] io::Error),
    /// An offer of the wrong length.
    #[error("{0} handshake bytes, expected {HELLO_LEN}")]
    HelloLength(usize),
    /// Not a livemig shared-memory source.
    #[error("bad magic {0:02x?}: not a livemig shared-memory source")]
    BadMagic([u8; 8]),
    /// A layout version this build does not map.
    #[error("layout version {0} (this build maps version {VERSION})")]
    Version(u32),
    /// The offer came without the buffer's descriptor.
    #[error("no file descriptor came with the handshake")]
    NoFile,
    /// The buffer is not a sealed memfd of the announced size.
    #[error("{0}")]
    NotSealed(#[source] io::Error),
}

/// Where each part lives in the shared buffer, computed by each side from
/// the (checked) geometry, never read from shared memory.
///
/// ```text
/// page 0:        control words: closed flags (producer, consumer) of TX, RX
/// page 1..:      TX descriptors, RX descriptors (64 bytes each)
/// page-aligned:  TX slot data, RX slot data
/// ```
#[derive(Clone, Copy, Debug)]
struct Layout {
    geometry: Geometry,
    desc: [usize; 2],
    data: [usize; 2],
    total: usize,
}

impl Layout {
    fn new(g: Geometry) -> Result<Layout, ShmError> {
        for (ring, slots, size) in [
            ("TX", g.tx_slots, g.tx_slot_size),
            ("RX", g.rx_slots, g.rx_slot_size),
        ] {
            if slots == 0 || slots > MAX_SLOTS {
                return Err(HandshakeError::SlotCount { ring, slots }.into());
            }
            if size == 0 || size > MAX_SLOT_SIZE || !(size as usize).is_multiple_of(PAGE) {
                return Err(HandshakeError::SlotSize { ring, size }.into());
            }
        }
        let round = |n: u64| n.div_ceil(PAGE as u64) * PAGE as u64;
        let descs = round(u64::from(g.tx_slots + g.rx_slots) * DESC_SIZE as u64);
        let tx_data = u64::from(g.tx_slots) * u64::from(g.tx_slot_size);
        let rx_data = u64::from(g.rx_slots) * u64::from(g.rx_slot_size);
        let total = PAGE as u64 + descs + tx_data + rx_data;
        if total > MAX_TOTAL {
            return Err(HandshakeError::TooLarge(total).into());
        }
        let desc_tx = PAGE;
        let desc_rx = desc_tx + g.tx_slots as usize * DESC_SIZE;
        let data_tx = PAGE + descs as usize;
        let data_rx = data_tx + tx_data as usize;
        Ok(Layout {
            geometry: g,
            desc: [desc_tx, desc_rx],
            data: [data_tx, data_rx],
            total: total as usize,
        })
    }

    fn slots(&self, ring: RingId) -> u32 {
        match ring {
            RingId::Tx => self.geometry.tx_slots,
            RingId::Rx => self.geometry.rx_slots,
        }
    }

    fn slot_size(&self, ring: RingId) -> usize {
        match ring {
            RingId::Tx => self.geometry.tx_slot_size as usize,
            RingId::Rx => self.geometry.rx_slot_size as usize,
        }
    }

    /// Offset of the closed flag set by the producer (or consumer) of `ring`.
    fn closed_word(ring: RingId, by_producer: bool) -> usize {
        ring.idx() * 8 + if by_producer { 0 } else { 4 }
    }
}

/// What both ends' guards and streams share in one process.
struct Shared {
    map: SharedMapping,
    layout: Layout,
    side: Side,
    sock: UnixStream,
    /// Slots this process holds a guard on, per ring (local memory).
    held: [Vec<AtomicBool>; 2],
    /// RX guards this process holds (for the lock order).
    rx_held: AtomicUsize,
    timeout: Duration,
    spin: u32,
    /// Source: the destination's answer to the handshake is not read yet.
    /// It is read when the socket first becomes readable, so connecting
    /// never waits for the destination to accept (page channels connect
    /// before the destination accepts them).
    reply_pending: std::sync::Mutex<bool>,
}

/// The four words of one slot's descriptor.
struct Desc<'a> {
    owner: &'a AtomicU32,
    holder: &'a AtomicU32,
    len: &'a AtomicU32,
    waiters: &'a AtomicU32,
}

impl Shared {
    fn word(&self, offset: usize) -> &AtomicU32 {
        self.map
            .word(offset)
            .expect("layout offsets are aligned and inside the mapping")
    }

    fn desc(&self, ring: RingId, index: u32) -> Desc<'_> {
        let base = self.layout.desc[ring.idx()] + index as usize * DESC_SIZE;
        Desc {
            owner: self.word(base + DESC_OWNER),
            holder: self.word(base + DESC_HOLDER),
            len: self.word(base + DESC_LEN),
            waiters: self.word(base + DESC_WAITERS),
        }
    }

    fn data_offset(&self, ring: RingId, index: u32) -> usize {
        self.layout.data[ring.idx()] + index as usize * self.layout.slot_size(ring)
    }

    /// True when the other side has closed its end of `ring`.
    fn peer_closed(&self, ring: RingId) -> bool {
        let peer_is_producer = !self.side.produces(ring);
        self.word(Layout::closed_word(ring, peer_is_producer))
            .load(Ordering::Acquire)
            != 0
    }

    /// Waits until `owner` of the slot is `want`.
    fn wait_for(&self, ring: RingId, index: u32, want: u32) -> Result<(), ShmError> {
        let d = self.desc(ring, index);
        let start = Instant::now();
        let mut checked = start;
        let mut spins = 0u32;
        let corrupt = |value| ShmError::Corrupt {
            ring,
            index,
            what: "the owner word",
            value,
        };
        let ended = || {
            if self.side.produces(ring) {
                ShmError::PeerClosed { ring }
            } else {
                ShmError::EndOfStream { ring }
            }
        };
        loop {
            let v = d.owner.load(Ordering::Acquire);
            if v == want {
                return Ok(());
            }
            if v != PRODUCER && v != CONSUMER {
                return Err(corrupt(v));
            }
            // The peer hands over its last slot before it sets its closed
            // flag, so once the flag is seen, one more look at the owner
            // word is the final answer.
            if self.peer_closed(ring) {
                return match d.owner.load(Ordering::Acquire) {
                    v if v == want => Ok(()),
                    _ => Err(ended()),
                };
            }
            if spins < self.spin {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            d.waiters.fetch_add(1, Ordering::SeqCst);
            let v = d.owner.load(Ordering::SeqCst);
            let r = if v != want {
                futex_wait(d.owner, v, WAIT_SLICE)
            } else {
                Ok(())
            };
            d.waiters.fetch_sub(1, Ordering::SeqCst);
            r.map_err(ShmError::io("futex wait"))?;
            let now = Instant::now();
            if now.duration_since(checked) >= WAIT_SLICE {
                checked = now;
                if self.peer_gone()? {
                    // It may have handed the slot over, or closed, just
                    // before it went.
                    return match d.owner.load(Ordering::Acquire) {
                        v if v == want => Ok(()),
                        _ if self.peer_closed(ring) => Err(ended()),
                        _ => Err(ShmError::PeerGone { ring, index }),
                    };
                }
            }
            if now.duration_since(start) >= self.timeout {
                return Err(ShmError::TimedOut {
                    ring,
                    index,
                    secs: self.timeout.as_secs(),
                });
            }
        }
    }

    /// True when the peer closed the socket or died. On the source, the
    /// destination's handshake answer arrives on the socket first: an
    /// acceptance is consumed, a refusal is an error with its reason.
    fn peer_gone(&self) -> Result<bool, ShmError> {
        let poll = || peer_hung_up(&self.sock).map_err(ShmError::io("poll the session socket"));
        if !poll()? {
            return Ok(false);
        }
        let mut pending = self.reply_pending.lock().unwrap_or_else(|e| e.into_inner());
        if !*pending {
            return Ok(true);
        }
        let mut b = [0u8; 1];
        match (&self.sock).read(&mut b) {
            Ok(1) if b[0] == REPLY_OK => {
                *pending = false;
                drop(pending);
                poll()
            }
            Ok(1) if b[0] == REPLY_ERR => {
                // The reason came in the same write: one read, never a
                // wait on a peer that keeps the socket open.
                let mut msg = [0u8; 1024];
                let n = (&self.sock).read(&mut msg).unwrap_or(0);
                Err(HandshakeError::Refused(String::from_utf8_lossy(&msg[..n]).into_owned()).into())
            }
            Ok(1) => Err(HandshakeError::UnknownAnswer(b[0]).into()),
            _ => Ok(true),
        }
    }

    /// Marks this side's end of `ring` closed and wakes the peer's waiters.
    fn close(&self, ring: RingId) {
        let by_producer = self.side.produces(ring);
        self.word(Layout::closed_word(ring, by_producer))
            .store(1, Ordering::SeqCst);
        for i in 0..self.layout.slots(ring) {
            let d = self.desc(ring, i);
            if d.waiters.load(Ordering::SeqCst) != 0 {
                futex_wake(d.owner);
            }
        }
    }
}

/// One end of a shared-memory session. Cheap to clone; the mapping and
/// the socket live until the last clone and the last guard are gone.
#[derive(Clone)]
pub struct Session(Arc<Shared>);

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("side", &self.0.side)
            .field("geometry", &self.0.layout.geometry)
            .finish()
    }
}

impl Session {
    fn new(map: SharedMapping, layout: Layout, side: Side, sock: UnixStream) -> Session {
        let reply_pending = std::sync::Mutex::new(side == Side::Source);
        let flags = |n: u32| (0..n).map(|_| AtomicBool::new(false)).collect();
        Session(Arc::new(Shared {
            map,
            held: [
                flags(layout.slots(RingId::Tx)),
                flags(layout.slots(RingId::Rx)),
            ],
            layout,
            side,
            sock,
            rx_held: AtomicUsize::new(0),
            timeout: crate::transport::IO_TIMEOUT,
            spin: DEFAULT_SPIN,
            reply_pending,
        }))
    }

    /// Source side of the handshake over a connected socket: creates the
    /// shared buffer and sends it. Does not wait for the destination's
    /// answer: a refusal ends the first wait for a slot
    /// ([`ShmError::Handshake`]), see [`Session::confirm`].
    pub fn offer(sock: UnixStream, geometry: Geometry) -> Result<Session, ShmError> {
        let layout = Layout::new(geometry)?;
        let file = create_memfd(MEMFD_NAME, layout.total as u64)
            .map_err(ShmError::io("create the shared buffer (memfd)"))?;
        let map = SharedMapping::map(&file, layout.total)
            .map_err(ShmError::io("map the shared buffer"))?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&HELLO_MAGIC);
        for w in [
            VERSION,
            geometry.tx_slots,
            geometry.tx_slot_size,
            geometry.rx_slots,
            geometry.rx_slot_size,
        ] {
            hello.extend_from_slice(&w.to_be_bytes());
        }
        let sent = sock
            .send_with_fd(&hello[..], file.as_raw_fd())
            .map_err(|e| ShmError::io("send the shared buffer")(io::Error::from(e)))?;
        if sent != hello.len() {
            return Err(HandshakeError::ShortSend {
                sent,
                len: hello.len(),
            }
            .into());
        }
        drop(file);
        sock.set_read_timeout(Some(crate::transport::IO_TIMEOUT))
            .map_err(ShmError::io("configure the session socket"))?;
        Ok(Session::new(map, layout, Side::Source, sock))
    }

    /// Source: waits for the destination's answer to the handshake (at
    /// most the session timeout). Optional: the first wait for a slot
    /// reads it too.
    pub fn confirm(&self) -> Result<(), ShmError> {
        let s = &*self.0;
        let mut pending = s.reply_pending.lock().unwrap_or_else(|e| e.into_inner());
        if !*pending {
            return Ok(());
        }
        let mut b = [0u8; 1];
        (&s.sock)
            .read_exact(&mut b)
            .map_err(HandshakeError::NoAnswer)?;
        match b[0] {
            REPLY_OK => {
                *pending = false;
                Ok(())
            }
            REPLY_ERR => {
                let mut msg = [0u8; 1024];
                let n = (&s.sock).read(&mut msg).unwrap_or(0);
                Err(HandshakeError::Refused(String::from_utf8_lossy(&msg[..n]).into_owned()).into())
            }
            b => Err(HandshakeError::UnknownAnswer(b).into()),
        }
    }

    /// Destination side of the handshake: receives the shared buffer,
    /// checks the layout, seals and size, maps it and answers.
    pub fn take(sock: UnixStream) -> Result<Session, ShmError> {
        sock.set_read_timeout(Some(crate::transport::IO_TIMEOUT))
            .map_err(ShmError::io("configure the session socket"))?;
        let mut hello = [0u8; HELLO_LEN + 1];
        let (n, file) = sock
            .recv_with_fd(&mut hello)
            .map_err(|e| ShmError::io("receive the shared buffer")(io::Error::from(e)))?;
        let result = Self::check_hello(&hello[..n], file);
        let mut s = &sock;
        match result {
            Ok((map, layout)) => {
                // A source that has already written all it had (a short
                // page channel) may have closed its socket before this
                // answer: what it wrote is in the shared buffer, and its
                // closed flag tells a finished stream from a dead peer.
                if let Err(e) = s.write_all(&[REPLY_OK]) {
                    log::debug!("shm: handshake answer not delivered: {e}");
                }
                Ok(Session::new(map, layout, Side::Destination, sock))
            }
            Err(e) => {
                let mut msg = vec![REPLY_ERR];
                msg.extend_from_slice(e.to_string().as_bytes());
                let _ = s.write_all(&msg);
                Err(e)
            }
        }
    }

    fn check_hello(hello: &[u8], file: Option<File>) -> Result<(SharedMapping, Layout), ShmError> {
        if hello.len() != HELLO_LEN {
            return Err(HandshakeError::HelloLength(hello.len()).into());
        }
        if hello[..8] != HELLO_MAGIC {
            let mut m = [0u8; 8];
            m.copy_from_slice(&hello[..8]);
            return Err(HandshakeError::BadMagic(m).into());
        }
        let w = |i: usize| {
            let at = 8 + 4 * i;
            u32::from_be_bytes([hello[at], hello[at + 1], hello[at + 2], hello[at + 3]])
        };
        if w(0) != VERSION {
            return Err(HandshakeError::Version(w(0)).into());
        }
        let layout = Layout::new(Geometry {
            tx_slots: w(1),
            tx_slot_size: w(2),
            rx_slots: w(3),
            rx_slot_size: w(4),
        })?;
        let file = file.ok_or(HandshakeError::NoFile)?;
        check_sealed(&file, layout.total as u64).map_err(HandshakeError::NotSealed)?;
        let map = SharedMapping::map(&file, layout.total)
            .map_err(ShmError::io("map the shared buffer"))?;
        Ok((map, layout))
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.0.side
    }

    /// The layout in use.
    pub fn geometry(&self) -> Geometry {
        self.0.layout.geometry
    }

    /// Slots in `ring`.
    pub fn slots(&self, ring: RingId) -> u32 {
        self.0.layout.slots(ring)
    }

    /// Sets how long a wait for one slot may last (default
    /// [`crate::transport::IO_TIMEOUT`]) and how many spins precede each
    /// futex sleep. Only before the session is shared.
    pub fn with_wait(mut self, timeout: Duration, spin: u32) -> Session {
        if let Some(s) = Arc::get_mut(&mut self.0) {
            s.timeout = timeout;
            s.spin = spin;
        }
        self
    }

    /// Waits until this side owns slot `index` of `ring` and returns the
    /// guard that releases it. The producer of a ring gets a slot to fill,
    /// the consumer a filled slot (whose length is checked).
    pub fn acquire(&self, ring: RingId, index: u32) -> Result<SlotGuard, ShmError> {
        let s = &*self.0;
        let slots = s.layout.slots(ring);
        if index >= slots {
            return Err(ShmError::NotAvailable { ring, index, slots });
        }
        if ring == RingId::Tx && s.rx_held.load(Ordering::SeqCst) != 0 {
            return Err(ShmError::LockOrder { index });
        }
        let flag = &s.held[ring.idx()][index as usize];
        if flag.swap(true, Ordering::AcqRel) {
            return Err(ShmError::AlreadyHeld { ring, index });
        }
        let producer = s.side.produces(ring);
        let want = if producer { PRODUCER } else { CONSUMER };
        if let Err(e) = s.wait_for(ring, index, want) {
            // Not ours: nothing to hand over, only the local mark to clear.
            flag.store(false, Ordering::Release);
            return Err(e);
        }
        if ring == RingId::Rx {
            s.rx_held.fetch_add(1, Ordering::SeqCst);
        }
        let me = if producer {
            HOLDER_PRODUCER
        } else {
            HOLDER_CONSUMER
        };
        let d = s.desc(ring, index);
        let before = d.holder.swap(me, Ordering::AcqRel);
        // From here the slot is ours: the guard hands it back on every
        // path, the error paths below included.
        let mut guard = SlotGuard {
            session: self.clone(),
            ring,
            index,
            producer,
            len: 0,
        };
        if before != HOLDER_NONE {
            return Err(ShmError::Corrupt {
                ring,
                index,
                what: "the holder mark on a slot handed to us",
                value: before,
            });
        }
        if !producer {
            // Read once, then check the local copy.
            let len = d.len.load(Ordering::Acquire);
            let max = s.layout.slot_size(ring);
            if len as usize > max {
                return Err(ShmError::BadLength {
                    ring,
                    index,
                    len: u64::from(len),
                    max: max as u64,
                });
            }
            guard.len = len as usize;
        }
        Ok(guard)
    }

    /// Takes a TX slot and then an RX slot: the one order in which both
    /// may be held. If the RX slot cannot be had, the TX slot is released.
    pub fn acquire_pair(&self, tx_index: u32, rx_index: u32) -> Result<PairGuard, ShmError> {
        let tx = self.acquire(RingId::Tx, tx_index)?;
        let rx = self.acquire(RingId::Rx, rx_index)?;
        Ok(PairGuard { rx, tx })
    }

    /// Closes this side's end of `ring`: a consumer sees the end of the
    /// stream once it has read every filled slot; a producer's next wait
    /// fails. Idempotent.
    pub fn close(&self, ring: RingId) {
        self.0.close(ring);
    }

    /// The writer of the ring this side produces, starting at slot 0.
    pub fn writer(&self) -> ShmWriter {
        let ring = if self.0.side == Side::Source {
            RingId::Tx
        } else {
            RingId::Rx
        };
        ShmWriter {
            session: self.clone(),
            ring,
            next: 0,
        }
    }

    /// The reader of the ring this side consumes, starting at slot 0.
    pub fn reader(&self) -> ShmReader {
        let ring = if self.0.side == Side::Source {
            RingId::Rx
        } else {
            RingId::Tx
        };
        ShmReader {
            session: self.clone(),
            ring,
            next: 0,
            cur: None,
            pos: 0,
            eof: false,
        }
    }
}

/// Spins before each futex sleep. None by default: on these 2-core hosts
/// a spinning side takes the core its peer needs to finish the slot, and
/// `livemig bench` measured the transport slower with spinning (2000
/// spins) than with an immediate futex sleep (BENCHMARKS.md, section shm).
/// With 256 KiB slots a handover costs at most one wake-up per 256 KiB.
pub const DEFAULT_SPIN: u32 = 0;

/// Exclusive use of one slot. Dropping it hands the slot to the peer (a
/// producer's slot with the length set so far, zero if none) and wakes
/// the peer if it sleeps.
pub struct SlotGuard {
    session: Session,
    ring: RingId,
    index: u32,
    producer: bool,
    len: usize,
}

impl fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotGuard")
            .field("ring", &self.ring)
            .field("index", &self.index)
            .field("producer", &self.producer)
            .field("len", &self.len)
            .finish()
    }
}

impl SlotGuard {
    /// The ring.
    pub fn ring(&self) -> RingId {
        self.ring
    }

    /// The slot index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Bytes the slot can hold.
    pub fn capacity(&self) -> usize {
        self.session.0.layout.slot_size(self.ring)
    }

    /// Filled bytes: for a consumer the checked length the producer set,
    /// for a producer what [`SlotGuard::set_len`] set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the slot carries no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn misuse(&self, what: String) -> ShmError {
        ShmError::Misuse {
            ring: self.ring,
            index: self.index,
            what,
        }
    }

    /// Copies `src` into the slot at `offset` (producer only).
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), ShmError> {
        if !self.producer {
            return Err(self.misuse("the consumer may not write".into()));
        }
        if offset
            .checked_add(src.len())
            .is_none_or(|e| e > self.capacity())
        {
            return Err(self.misuse(format!(
                "{} bytes at {offset} do not fit {} bytes",
                src.len(),
                self.capacity()
            )));
        }
        let at = self.session.0.data_offset(self.ring, self.index) + offset;
        let ok = self.session.0.map.copy_in(at, src);
        debug_assert!(ok, "slot data lies inside the mapping");
        Ok(())
    }

    /// Sets how many bytes the consumer will get (producer only).
    pub fn set_len(&mut self, len: usize) -> Result<(), ShmError> {
        if !self.producer || len > self.capacity() {
            return Err(self.misuse(format!(
                "length {len} refused (producer: {}, capacity {})",
                self.producer,
                self.capacity()
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Copies bytes at `offset` out of the slot into `dst`, within the
    /// filled length for a consumer, the capacity for a producer.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), ShmError> {
        let limit = if self.producer {
            self.capacity()
        } else {
            self.len
        };
        if offset.checked_add(dst.len()).is_none_or(|e| e > limit) {
            return Err(self.misuse(format!(
                "{} bytes at {offset} are past the {limit} readable",
                dst.len()
            )));
        }
        let at = self.session.0.data_offset(self.ring, self.index) + offset;
        let ok = self.session.0.map.copy_out(at, dst);
        debug_assert!(ok, "slot data lies inside the mapping");
        Ok(())
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let s = &*self.session.0;
        let d = s.desc(self.ring, self.index);
        let me = if self.producer {
            HOLDER_PRODUCER
        } else {
            HOLDER_CONSUMER
        };
        if self.producer {
            d.len.store(self.len as u32, Ordering::Relaxed);
        }
        if let Err(v) =
            d.holder
                .compare_exchange(me, HOLDER_NONE, Ordering::AcqRel, Ordering::Acquire)
        {
            log::warn!(
                "slot {} of the {} buffer: holder mark {v:#x} changed while we held it",
                self.index,
                self.ring
            );
            d.holder.store(HOLDER_NONE, Ordering::Release);
        }
        let to = if self.producer { CONSUMER } else { PRODUCER };
        d.owner.store(to, Ordering::SeqCst);
        if d.waiters.load(Ordering::SeqCst) != 0 {
            futex_wake(d.owner);
        }
        if self.ring == RingId::Rx {
            s.rx_held.fetch_sub(1, Ordering::SeqCst);
        }
        s.held[self.ring.idx()][self.index as usize].store(false, Ordering::Release);
    }
}

/// A TX slot and an RX slot, taken in that order; dropped RX first.
#[derive(Debug)]
pub struct PairGuard {
    /// The RX slot (declared first: released first).
    pub rx: SlotGuard,
    /// The TX slot.
    pub tx: SlotGuard,
}

/// The stream into the ring this side produces: each `write` fills the
/// next slot with as much as fits and hands it over. Dropping it closes
/// the ring (the consumer reads end-of-file after the last slot).
pub struct ShmWriter {
    session: Session,
    ring: RingId,
    next: u32,
}

impl Write for ShmWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut g = self.session.acquire(self.ring, self.next)?;
        self.next = (self.next + 1) % self.session.slots(self.ring);
        let n = buf.len().min(g.capacity());
        g.write_at(0, &buf[..n])?;
        g.set_len(n)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ShmWriter {
    fn drop(&mut self) {
        self.session.close(self.ring);
    }
}

/// The stream out of the ring this side consumes. Holds the current slot
/// between reads and hands it back once read to its end; end-of-file once
/// the producer has closed the ring and every slot is read. Dropping it
/// closes the ring for the producer.
pub struct ShmReader {
    session: Session,
    ring: RingId,
    next: u32,
    cur: Option<SlotGuard>,
    pos: usize,
    eof: bool,
}

impl Read for ShmReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let g = match self.cur.take() {
                Some(g) => g,
                None => {
                    if self.eof {
                        return Ok(0);
                    }
                    match self.session.acquire(self.ring, self.next) {
                        Ok(g) => {
                            self.next = (self.next + 1) % self.session.slots(self.ring);
                            self.pos = 0;
                            if g.is_empty() {
                                continue;
                            }
                            g
                        }
                        Err(ShmError::EndOfStream { .. }) => {
                            self.eof = true;
                            return Ok(0);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let n = buf.len().min(g.len() - self.pos);
            g.read_at(self.pos, &mut buf[..n])?;
            self.pos += n;
            if self.pos < g.len() {
                self.cur = Some(g);
            }
            return Ok(n);
        }
    }
}

impl Drop for ShmReader {
    fn drop(&mut self) {
        self.cur = None;
        self.session.close(self.ring);
    }
}

/// Binds the Unix socket a destination listens on, replacing a stale
/// socket file from an earlier run.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
}

/// Source: connects to the destination at `path` and sets up a session
/// with the default geometry; returns (stream writer, return-path reader).
pub fn connect(path: &Path) -> Result<(ShmWriter, ShmReader), ShmError> {
    let sock = UnixStream::connect(path).map_err(ShmError::io("connect"))?;
    let s = Session::offer(sock, Geometry::default())?;
    Ok((s.writer(), s.reader()))
}

/// Destination: accepts one source on `l`; returns (stream reader,
/// return-path writer).
pub fn accept(l: &UnixListener) -> Result<(ShmReader, ShmWriter), ShmError> {
    let (sock, _) = l.accept().map_err(ShmError::io("accept"))?;
    take(sock)
}

/// Destination: sets up a session over `sock`, a source's connection
/// already accepted; returns (stream reader, return-path writer).
pub fn take(sock: UnixStream) -> Result<(ShmReader, ShmWriter), ShmError> {
    let s = Session::take(sock)?;
    Ok((s.reader(), s.writer()))
}

/// Name of the memfd as /proc shows it.
pub const MEMFD_NAME: &CStr = c"livemig-shm";
