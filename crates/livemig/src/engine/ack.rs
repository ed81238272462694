//! The completion handshake on a two-way transport: exactly one side runs
//! the guest, whatever message is lost.
//!
//! The guest must never run on both sides. A single acknowledgement cannot
//! promise that: if it is lost after the destination resumed, the source
//! would resume too. So the destination resumes only on the source's
//! explicit GO, and the source treats everything after GO as "the
//! destination may be running":
//!
//! ```text
//! source (guest paused)                         destination (guest paused)
//!   ... stream ... END  ───────────────────────▶  loads, validates all
//!                       ◀───────────────────────  LOADED  (or FAILED + why)
//!   GO                  ───────────────────────▶  resumes the guest
//!                       ◀───────────────────────  STARTED
//!   completed: stays paused for good
//! ```
//!
//! | what the source sees                  | source              | destination |
//! |---------------------------------------|---------------------|-------------|
//! | FAILED, no reply, bad reply, timeout  | resumes its guest   | never got GO: discards the VM, never runs it |
//! | LOADED, then sending GO fails         | resumes its guest   | never got a whole GO: discards |
//! | LOADED, GO sent, no STARTED           | **stays paused**, reports [`MigrationError::Unconfirmed`] | may be running (it got GO) or not |
//! | LOADED, GO sent, STARTED              | completed, paused   | runs |
//!
//! The third row is the one case a program cannot settle: the source
//! cannot tell "GO was lost" from "STARTED was lost", so it keeps the guest
//! paused rather than risk two copies; an operator who knows the
//! destination is not running the guest resumes the source. A destination
//! that got GO but cannot deliver STARTED runs on (the source stays
//! paused, so there is still one copy).
//!
//! Every wait is bounded by the transport's I/O timeout (sockets: see
//! [`crate::transport::IO_TIMEOUT`]); a snapshot file has no return path
//! and no handshake.
//!
//! Wire format, version 2 (version 1 was a single `"LVMGACK1"` reply; a
//! peer of either version refuses the other's magic):
//!
//! ```text
//! reply := "LVMGRP02" kind:u8 len:u32 text:[u8; len]   destination → source, return path
//!          kind 1 = LOADED, 2 = FAILED (text = why), 3 = STARTED,
//!          4 = ACCEPTED (the setup fits, pages may come),
//!          5 = APPLIED (text = mark:u64, a DRAIN record's; with header
//!              flag FLAG_LOAD_REPORT: mark:u64 hashed:u64 hash_us:u64
//!              backlog:u64, the destination's report); len <= 4096
//! go    := "LVMGGO02"                                  source → destination, after END
//! ```
//!
//! STARTED's text is empty or 8 bytes: a big-endian u64, the microseconds
//! from GO's arrival to the guest's resume on the destination. The source
//! places the resume on its own clock as GO sent + half the round trip
//! net of that time + that time (one-way latency taken as half the
//! round trip), and reports the downtime from its pause to that point:
//! the pause the guest sees ([`Handshake::resumed_estimate`]). A STARTED
//! without the 8 bytes is accepted (the downtime is then the source's:
//! pause to STARTED received). A source built before this addition
//! refuses a timed STARTED ("unknown reply kind"): it stays paused and
//! reports the migration unconfirmed, while the destination runs, so there
//! is still one guest.
//!
//! APPLIED answers a DRAIN record of the stream (see `stream/format.rs`)
//! during precopy: everything the source wrote before that mark is in the
//! destination's memory. The source, which sends one mark at a time and
//! waits for its answer before it pauses the guest, accepts only the mark
//! it sent ([`await_applied`]).
//!
//! With the stream header flag `FLAG_LOAD_REPORT` (a source that reads it
//! sets it; a destination older than the flag refuses it by name at the
//! header), APPLIED carries the destination's own pending work, so the
//! source prices the END-to-LOADED leg of the pause from the side that
//! does it ([`LoadReport`]): with verify on, the destination first hashes
//! every chunk of its running digest not hashed since it changed (its
//! background hasher falls behind on a loaded host: 143-186 ms END to
//! LOADED were measured where a round trip predicted 5-36), then answers
//! with the bytes and time that took (its hashing rate as the host is now)
//! and what is still unhashed. In the pause it then re-hashes only the
//! chunks the pause itself wrote, at a rate it measured.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::MigrationError;
use crate::stream::format::{GO_MAGIC, MAX_REPLY_TEXT, REPLY_MAGIC};

/// Length of a reply's fixed part (magic, kind, length).
pub const REPLY_HEAD_LEN: usize = 13;
/// Length of the GO message.
pub const GO_LEN: usize = GO_MAGIC.len();

/// What the destination tells the source on the return path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Everything is loaded and checked; the guest is paused, waiting for GO.
    Loaded,
    /// Loading failed: the guest will never run here.
    Failed(String),
    /// GO received, the guest runs here; with the time from GO's arrival
    /// to the resume, when the destination measured it.
    Started(Option<Duration>),
    /// The stream's setup (block list, VM shape) fits this destination:
    /// the source may send pages (header flag `FLAG_SETUP`).
    Accepted,
    /// Every record before the stream's DRAIN record with this mark is
    /// applied.
    Applied(u64),
    /// As `Applied`, with the destination's pending work (header flag
    /// `FLAG_LOAD_REPORT`).
    AppliedReport(u64, LoadReport),
}

/// What a destination reports with APPLIED (header flag
/// `FLAG_LOAD_REPORT`): the work its pause will still do besides the
/// pause's own bytes, and how fast it does it now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Bytes of guest memory its running verify digest hashed before
    /// answering (chunks written since they were last hashed).
    pub hashed: u64,
    /// How long that took (all its hashing threads).
    pub hash_time: Duration,
    /// Bytes its verify digest would still re-hash at the stream's end,
    /// as things stand after the answer (0 without verify).
    pub backlog: u64,
}

impl LoadReport {
    /// Text length of an APPLIED that carries a report.
    const TEXT_LEN: usize = 32;

    /// The destination's hashing rate, bytes per second, when the hashed
    /// bytes say something (at least `min` of them).
    pub fn hash_rate(&self, min: u64) -> Option<f64> {
        (self.hashed >= min && !self.hash_time.is_zero())
            .then(|| self.hashed as f64 / self.hash_time.as_secs_f64())
    }
}

impl Reply {
    fn kind(&self) -> u8 {
        match self {
            Reply::Loaded => 1,
            Reply::Failed(_) => 2,
            Reply::Started(_) => 3,
            Reply::Accepted => 4,
            Reply::Applied(_) | Reply::AppliedReport(..) => 5,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Reply::Loaded => "LOADED",
            Reply::Failed(_) => "FAILED",
            Reply::Started(_) => "STARTED",
            Reply::Accepted => "ACCEPTED",
            Reply::Applied(_) | Reply::AppliedReport(..) => "APPLIED",
        }
    }
}

/// Writes one reply (text cut to [`MAX_REPLY_TEXT`] bytes) and flushes.
pub fn write_reply(w: &mut dyn Write, reply: &Reply) -> io::Result<()> {
    let word;
    let mut report = [0u8; LoadReport::TEXT_LEN];
    let text = match reply {
        Reply::Failed(m) => m.as_bytes(),
        Reply::Started(Some(d)) => {
            word = (d.as_micros().min(u128::from(u64::MAX)) as u64).to_be_bytes();
            &word[..]
        }
        Reply::Applied(mark) => {
            word = mark.to_be_bytes();
            &word[..]
        }
        Reply::AppliedReport(mark, r) => {
            let us = r.hash_time.as_micros().min(u128::from(u64::MAX)) as u64;
            for (i, v) in [*mark, r.hashed, us, r.backlog].into_iter().enumerate() {
                report[i * 8..][..8].copy_from_slice(&v.to_be_bytes());
            }
            &report[..]
        }
        _ => &[],
    };
    let text = &text[..text.len().min(MAX_REPLY_TEXT as usize)];
    let mut buf = Vec::with_capacity(REPLY_HEAD_LEN + text.len());
    buf.extend_from_slice(&REPLY_MAGIC);
    buf.push(reply.kind());
    buf.extend_from_slice(&(text.len() as u32).to_be_bytes());
    buf.extend_from_slice(text);
    w.write_all(&buf)?;
    w.flush()
}

/// Why a reply (or GO) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The peer closed the connection.
    #[error("the connection closed")]
    Closed,
    /// Reading from the transport failed.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// Not a reply of this handshake version.
    #[error("bad reply magic {0:02x?} (expected \"LVMGRP02\": a destination of another livemig version?)")]
    BadMagic([u8; 8]),
    /// A reply text longer than allowed.
    #[error("reply text of {0} bytes exceeds {MAX_REPLY_TEXT}")]
    TooLong(u32),
    /// The reply stopped inside its text.
    #[error("truncated reply: {0}")]
    Truncated(#[source] Box<ReplyError>),
    /// A STARTED whose text is not a duration.
    #[error("STARTED with {0} bytes of text (expected 0 or 8)")]
    StartedText(u32),
    /// An APPLIED whose text is not a mark (or a mark and a report).
    #[error("APPLIED with {0} bytes of text (expected 8: the drain mark, or 32: the mark and the destination's report)")]
    AppliedText(u32),
    /// An APPLIED for another drain mark than the one sent.
    #[error("APPLIED for drain mark {got}, but mark {sent} was sent")]
    AppliedMark {
        /// Mark in the reply.
        got: u64,
        /// Mark the source sent.
        sent: u64,
    },
    /// A kind this build does not know (or LOADED/ACCEPTED with a text).
    #[error("unknown reply kind {kind} (text length {len})")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// Its text length.
        len: u32,
    },
    /// A valid reply, but not the one this step waits for.
    #[error("the destination replied {got} instead of {expected}")]
    Unexpected {
        /// What came.
        got: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// Bytes that are not GO where GO was expected.
    #[error("expected GO, got bytes {0:02x?}")]
    NotGo([u8; 8]),
    /// The source sent ABORT where GO was expected.
    #[error("source aborted: {0}")]
    SourceAborted(String),
    /// Stream bytes still unread where GO should be next.
    #[error("stream bytes arrived where GO was expected")]
    BytesBeforeGo,
}

impl ReplyError {
    fn read(e: io::Error) -> ReplyError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReplyError::Closed
        } else {
            ReplyError::Io(e)
        }
    }

    /// The first bytes the peer sent, when they were not a reply: a
    /// plain source can tell whether its peer speaks TLS.
    pub fn bad_magic(&self) -> Option<&[u8; 8]> {
        match self {
            ReplyError::BadMagic(m) => Some(m),
            _ => None,
        }
    }
}

/// Reads one reply. Errors say what was wrong; they never allocate more
/// than [`MAX_REPLY_TEXT`] bytes whatever the peer claims.
pub fn read_reply(r: &mut dyn Read) -> Result<Reply, ReplyError> {
    let mut head = [0u8; REPLY_HEAD_LEN];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReplyError::read(e)),
        }
        // What a peer of another protocol sent first is enough to say so
        // (a TLS alert is 7 bytes, then the peer closes).
        if got >= 3 && head[..3] != REPLY_MAGIC[..3] {
            let mut m = [0u8; 8];
            m[..got.min(8)].copy_from_slice(&head[..got.min(8)]);
            return Err(ReplyError::BadMagic(m));
        }
    }
    if got < head.len() {
        return Err(ReplyError::Closed);
    }
    if head[..8] != REPLY_MAGIC {
        let mut m = [0u8; 8];
        m.copy_from_slice(&head[..8]);
        return Err(ReplyError::BadMagic(m));
    }
    let len = u32::from_be_bytes([head[9], head[10], head[11], head[12]]);
    if len > MAX_REPLY_TEXT {
        return Err(ReplyError::TooLong(len));
    }
    let mut text = vec![0u8; len as usize];
    r.read_exact(&mut text)
        .map_err(|e| ReplyError::Truncated(Box::new(ReplyError::read(e))))?;
    if head[8] == 3 {
        return match <[u8; 8]>::try_from(&text[..]) {
            Ok(b) => Ok(Reply::Started(Some(Duration::from_micros(
                u64::from_be_bytes(b),
            )))),
            Err(_) if text.is_empty() => Ok(Reply::Started(None)),
            Err(_) => Err(ReplyError::StartedText(len)),
        };
    }
    if head[8] == 5 {
        let word = |i: usize| u64::from_be_bytes(text[i * 8..][..8].try_into().expect("8 bytes"));
        return match text.len() {
            8 => Ok(Reply::Applied(word(0))),
            LoadReport::TEXT_LEN => Ok(Reply::AppliedReport(
                word(0),
                LoadReport {
                    hashed: word(1),
                    hash_time: Duration::from_micros(word(2)),
                    backlog: word(3),
                },
            )),
            _ => Err(ReplyError::AppliedText(len)),
        };
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    match head[8] {
        1 if text.is_empty() => Ok(Reply::Loaded),
        4 if text.is_empty() => Ok(Reply::Accepted),
        2 => Ok(Reply::Failed(text)),
        kind => Err(ReplyError::UnknownKind { kind, len }),
    }
}

/// Sends GO: the destination may start the guest.
pub fn write_go(w: &mut dyn Write) -> io::Result<()> {
    w.write_all(&GO_MAGIC)?;
    w.flush()
}

/// Waits for GO after the stream's end.
pub fn read_go(r: &mut dyn Read) -> Result<(), ReplyError> {
    let mut b = [0u8; GO_LEN];
    r.read_exact(&mut b).map_err(ReplyError::read)?;
    if b[0] == crate::stream::format::Kind::Abort as u8 {
        // The source gave up after its stream's end (e.g. cancelled).
        let len = usize::from(u16::from_be_bytes([b[1], b[2]]))
            .min(usize::from(crate::stream::format::MAX_ABORT_TEXT));
        let mut text = b[3..].to_vec();
        if len > text.len() {
            let mut rest = vec![0u8; len - text.len()];
            if r.read_exact(&mut rest).is_ok() {
                text.extend_from_slice(&rest);
            }
        }
        text.truncate(len);
        return Err(ReplyError::SourceAborted(
            String::from_utf8_lossy(&text).into_owned(),
        ));
    }
    if b != GO_MAGIC {
        return Err(ReplyError::NotGo(b));
    }
    Ok(())
}

/// The destination's own words: why it refused or failed (the text of
/// its FAILED reply).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PeerReason(pub String);

/// Why the source could not complete the handshake with the destination;
/// in every case the destination was not told to start, and the source
/// guest runs on.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// No usable LOADED came after the stream's end.
    #[error("no LOADED reply from the destination ({0}); it was not told to start, the guest runs on here")]
    NoLoaded(#[source] ReplyError),
    /// GO could not be handed to the transport.
    #[error("sending GO failed ({0}); the destination never got it and will not start, the guest runs on here")]
    SendGo(#[source] io::Error),
    /// No verdict on the setup came (header flag `FLAG_SETUP`).
    #[error("no answer from the destination to the migration's setup ({0}); no page was sent, the guest runs on here")]
    NoSetupVerdict(#[source] ReplyError),
    /// No usable APPLIED came for a drain mark (before the pause: the
    /// guest still runs here).
    #[error("no APPLIED reply from the destination to drain mark {mark} ({source}); the guest runs on here")]
    NoApplied {
        /// The mark sent.
        mark: u64,
        /// What was read instead.
        #[source]
        source: ReplyError,
    },
    /// The destination answered the setup with TLS: it wants an encrypted
    /// migration.
    #[error("the destination requires TLS (it answered the setup with a TLS record); give this side TLS settings too, with a certificate from the destination's CA")]
    DestinationNeedsTls,
}

/// The source's wait, after the stream's first section, for the
/// destination's verdict on the setup (header flag `FLAG_SETUP`).
pub(crate) fn await_setup(reply: &mut dyn Read) -> Result<(), MigrationError> {
    match read_reply(reply) {
        Ok(Reply::Accepted) => Ok(()),
        Ok(Reply::Failed(why)) => Err(MigrationError::Refused(PeerReason(why))),
        Ok(other) => Err(AckError::NoSetupVerdict(ReplyError::Unexpected {
            got: other.name(),
            expected: "ACCEPTED",
        })
        .into()),
        Err(e)
            if e.bad_magic()
                .is_some_and(|m| crate::transport::tls::looks_like_tls(m)) =>
        {
            Err(AckError::DestinationNeedsTls.into())
        }
        Err(e) => Err(AckError::NoSetupVerdict(e).into()),
    }
}

/// The source's wait, after a section that ends with the DRAIN record
/// `mark`, for the destination's APPLIED with that mark: everything sent
/// before it is then in the destination's memory. FAILED is the
/// destination's error.
/// The destination's report comes back when it sent one.
pub(crate) fn await_applied(
    reply: &mut dyn Read,
    mark: u64,
) -> Result<Option<LoadReport>, MigrationError> {
    let bad = |source| AckError::NoApplied { mark, source }.into();
    match read_reply(reply) {
        Ok(Reply::Applied(m)) if m == mark => Ok(None),
        Ok(Reply::AppliedReport(m, r)) if m == mark => Ok(Some(r)),
        Ok(Reply::Applied(got) | Reply::AppliedReport(got, _)) => {
            Err(bad(ReplyError::AppliedMark { got, sent: mark }))
        }
        Ok(Reply::Failed(why)) => Err(MigrationError::Destination(PeerReason(why))),
        Ok(other) => Err(bad(ReplyError::Unexpected {
            got: other.name(),
            expected: "APPLIED",
        })),
        Err(e) => Err(bad(e)),
    }
}

/// When the source's half of the handshake saw what, for the downtime.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Handshake {
    /// LOADED read (the end of the destination's load, checks and
    /// restore, as the source sees it).
    pub loaded: Instant,
    /// GO handed to the transport.
    pub go_sent: Instant,
    /// STARTED read.
    pub started: Instant,
    /// GO's arrival to the guest's resume, as the destination measured it.
    pub resumed_after_go: Option<Duration>,
}

impl Handshake {
    /// The destination's resume on the source's clock: GO sent, plus the
    /// one-way latency (half the round trip net of the destination's own
    /// time), plus the destination's time from GO to resume. Without the
    /// destination's figure: STARTED's arrival.
    pub fn resumed_estimate(&self) -> Instant {
        let Some(d) = self.resumed_after_go else {
            return self.started;
        };
        let rtt = self.started.saturating_duration_since(self.go_sent);
        // A figure beyond the round trip cannot be right: capped.
        let d = d.min(rtt);
        self.go_sent + (rtt - d) / 2 + d
    }
}

/// The source's half: after END, waits for LOADED, sends GO on `go`, waits
/// for STARTED. `sent_go` becomes true once GO is handed to the transport:
/// from then on the source guest must stay paused whatever happens.
pub(crate) fn source_handshake(
    reply: &mut dyn Read,
    go: &mut dyn Write,
    sent_go: &mut bool,
    cancelled: &dyn Fn() -> bool,
) -> Result<Handshake, MigrationError> {
    match read_reply(reply) {
        Ok(Reply::Loaded) => {}
        Ok(Reply::Failed(m)) => return Err(MigrationError::Destination(PeerReason(m))),
        Ok(other) => {
            return Err(AckError::NoLoaded(ReplyError::Unexpected {
                got: other.name(),
                expected: "LOADED",
            })
            .into())
        }
        Err(e) => return Err(AckError::NoLoaded(e).into()),
    }
    let loaded = Instant::now();
    if cancelled() {
        return Err(MigrationError::Cancelled);
    }
    // A write that fails hands no byte of GO to the transport, so the
    // destination can never see a whole GO: resuming here is safe.
    write_go(go).map_err(AckError::SendGo)?;
    *sent_go = true;
    let go_sent = Instant::now();
    match read_reply(reply) {
        Ok(Reply::Started(resumed_after_go)) => Ok(Handshake {
            loaded,
            go_sent,
            started: Instant::now(),
            resumed_after_go,
        }),
        Ok(other) => Err(MigrationError::Unconfirmed(ReplyError::Unexpected {
            got: other.name(),
            expected: "STARTED",
        })),
        Err(e) => Err(MigrationError::Unconfirmed(e)),
    }
}

/// Why the destination must not start the guest, or could not confirm it.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// LOADED could not be sent: the source will resume its own guest.
    #[error("loaded, but sending LOADED to the source failed ({0}); the source keeps the guest, this copy is discarded and never runs")]
    SendLoaded(#[source] io::Error),
    /// No GO came: the source keeps (or resumes) the guest.
    #[error("loaded, but no GO from the source ({0}); the source keeps the guest, this copy is discarded and never runs")]
    NoGo(#[source] ReplyError),
}

/// The destination's half of the handshake, for a VMM: after the load,
/// [`Commit::wait_go`] (or [`Commit::fail`]); resume the guest only once
/// it returns `Ok`, and call [`Go::started`] right after the resume (or
/// [`Go::started_at`] with the resume's instant). STARTED means "GO taken:
/// the guest is this side's now", and carries the time from GO to the
/// resume so the source reports the pause the guest saw.
///
/// Dropping a `Commit` unanswered closes nothing by itself but never
/// starts the guest; the source, getting no LOADED, resumes its own.
pub struct Commit<'a> {
    link: Option<(Box<dyn Read + 'a>, Box<dyn Write + 'a>)>,
}

impl<'a> Commit<'a> {
    /// The handshake over `go` (the stream's connection, read after END)
    /// and `reply` (the return path).
    pub fn new(go: impl Read + 'a, reply: impl Write + 'a) -> Self {
        Commit {
            link: Some((Box::new(go), Box::new(reply))),
        }
    }

    /// No return path (a snapshot file): nothing to wait for.
    pub fn none() -> Self {
        Commit { link: None }
    }

    /// True when there is a source to answer.
    pub fn has_return_path(&self) -> bool {
        self.link.is_some()
    }

    /// Tells the source the load failed (FAILED + `why`). Best effort: if
    /// the source is gone, its own error says why.
    pub fn fail(self, why: &str) {
        if let Some((_, mut w)) = self.link {
            let _ = write_reply(&mut *w, &Reply::Failed(why.to_string()));
        }
    }

    /// Sends LOADED and waits (bounded by the transport's I/O timeout) for
    /// GO. `Ok` means the guest may be resumed now; an error means it must
    /// never run here.
    pub fn wait_go(self) -> Result<Go<'a>, CommitError> {
        let Some((mut r, mut w)) = self.link else {
            return Ok(Go {
                reply: None,
                at: Instant::now(),
            });
        };
        write_reply(&mut *w, &Reply::Loaded).map_err(CommitError::SendLoaded)?;
        read_go(&mut *r).map_err(CommitError::NoGo)?;
        Ok(Go {
            reply: Some(w),
            at: Instant::now(),
        })
    }
}

/// GO received: resume the guest, then call [`Go::started`].
pub struct Go<'a> {
    reply: Option<Box<dyn Write + 'a>>,
    /// When GO arrived.
    at: Instant,
}

impl Go<'_> {
    /// When GO arrived.
    pub fn arrived(&self) -> Instant {
        self.at
    }

    /// Sends STARTED, with the time since GO arrived as the resume's (call
    /// it right after resuming the guest). An error only means the source
    /// did not hear it: it stays paused and says so; the guest rightly
    /// runs on here.
    pub fn started(self) -> io::Result<()> {
        self.started_at(Instant::now())
    }

    /// Sends STARTED, telling the source the guest resumed at `resumed`.
    pub fn started_at(self, resumed: Instant) -> io::Result<()> {
        let d = resumed.saturating_duration_since(self.at);
        match self.reply {
            Some(mut w) => write_reply(&mut *w, &Reply::Started(Some(d))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::pipe;

    fn reply_bytes(r: &Reply) -> Vec<u8> {
        let mut v = Vec::new();
        write_reply(&mut v, r).unwrap();
        v
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Loaded,
            Reply::Started(None),
            Reply::Started(Some(Duration::from_micros(1234))),
            Reply::Failed("disk full".into()),
            Reply::Accepted,
            Reply::Applied(1),
            Reply::Applied(u64::MAX),
            Reply::AppliedReport(
                3,
                LoadReport {
                    hashed: 96 << 20,
                    hash_time: Duration::from_micros(41_250),
                    backlog: 2 << 20,
                },
            ),
            Reply::AppliedReport(u64::MAX, LoadReport::default()),
        ] {
            let b = reply_bytes(&r);
            assert_eq!(&b[..8], b"LVMGRP02");
            assert_eq!(read_reply(&mut &b[..]).unwrap(), r);
        }
        let mut go = Vec::new();
        write_go(&mut go).unwrap();
        assert_eq!(go, b"LVMGGO02");
        read_go(&mut &go[..]).unwrap();
    }

    #[test]
    fn bad_replies_are_refused() {
        let old = b"LVMGACK1\0\0\0\0\0";
        let e = read_reply(&mut &old[..]).unwrap_err();
        assert!(e.to_string().contains("bad reply magic"), "{e}");
        let mut huge = reply_bytes(&Reply::Loaded);
        huge[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = read_reply(&mut &huge[..]).unwrap_err();
        assert!(e.to_string().contains("exceeds 4096"), "{e}");
        let mut kind = reply_bytes(&Reply::Loaded);
        kind[8] = 9;
        let e = read_reply(&mut &kind[..]).unwrap_err();
        assert!(e.to_string().contains("unknown reply kind 9"), "{e}");
        let e = read_reply(&mut &b"LVMG"[..]).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        let e = read_go(&mut &b"LVMGGO01"[..]).unwrap_err();
        assert!(e.to_string().contains("expected GO"), "{e}");
        let long = reply_bytes(&Reply::Failed("x".repeat(10_000)));
        assert_eq!(long.len(), REPLY_HEAD_LEN + 4096, "text is cut");
    }

    #[test]
    fn random_replies_never_panic_and_only_valid_ones_pass() {
        let mut rng = crate::testkit::workload::XorShift::new(0xac4);
        let valid = [
            reply_bytes(&Reply::Loaded),
            reply_bytes(&Reply::Started(Some(Duration::from_millis(3)))),
            reply_bytes(&Reply::Failed("x".into())),
            reply_bytes(&Reply::Accepted),
            reply_bytes(&Reply::Applied(7)),
            reply_bytes(&Reply::AppliedReport(7, LoadReport::default())),
        ];
        for i in 0..25_000 {
            // Mutations of valid replies, and plain noise.
            let mut b = valid[i % valid.len()].clone();
            if i % 2 == 0 {
                let at = rng.below(b.len());
                b[at] ^= rng.byte() | 1;
            } else {
                b.resize(rng.below(24), 0);
                rng.fill(&mut b);
            }
            if let Ok(r) = read_reply(&mut &b[..]) {
                assert_eq!(&b[..8], b"LVMGRP02", "accepted {b:02x?} as {r:?}");
                assert!(valid.iter().any(|v| v[8] == b[8]));
            }
            let _ = read_go(&mut &b[..]);
        }
    }

    #[test]
    fn applied_must_carry_the_mark_sent() {
        let wait = |replies: &[Reply], mark| {
            let mut back = Vec::new();
            for r in replies {
                write_reply(&mut back, r).unwrap();
            }
            await_applied(&mut &back[..], mark)
        };
        assert_eq!(wait(&[Reply::Applied(3)], 3).expect("the mark sent"), None);
        let r = LoadReport {
            hashed: 64 << 20,
            hash_time: Duration::from_millis(50),
            backlog: 0,
        };
        assert_eq!(wait(&[Reply::AppliedReport(3, r)], 3).unwrap(), Some(r));
        assert_eq!(r.hash_rate(1 << 20), Some((64u64 << 20) as f64 / 0.05));
        assert_eq!(r.hash_rate(128 << 20), None, "too few bytes to say");
        let e = wait(&[Reply::AppliedReport(2, r)], 3).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("APPLIED for drain mark 2, but mark 3 was sent"),
            "{e}"
        );
        let e = wait(&[Reply::Applied(2)], 3).unwrap_err();
        assert!(matches!(e, MigrationError::Ack(_)), "{e}");
        let text = e.to_string();
        assert!(text.contains("drain mark 3"), "{text}");
        assert!(
            crate::error_chain(&e).contains("APPLIED for drain mark 2, but mark 3 was sent"),
            "{}",
            crate::error_chain(&e)
        );
        // The destination's failure is its reason.
        let e = wait(&[Reply::Failed("bad page".into())], 1).unwrap_err();
        assert!(matches!(e, MigrationError::Destination(ref m) if m.0 == "bad page"));
        // Another reply, nothing, a mark of another length.
        let e = wait(&[Reply::Loaded], 1).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("replied LOADED instead of APPLIED"),
            "{e}"
        );
        let e = wait(&[], 1).unwrap_err();
        assert!(crate::error_chain(&e).contains("closed"), "{e}");
        let mut b = reply_bytes(&Reply::Applied(1));
        b[9..13].copy_from_slice(&4u32.to_be_bytes());
        b.truncate(REPLY_HEAD_LEN + 4);
        let e = read_reply(&mut &b[..]).unwrap_err();
        assert!(matches!(e, ReplyError::AppliedText(4)), "{e}");
        assert!(e.to_string().contains("expected 8"), "{e}");
        // A report cut short is refused, not read as a mark.
        let mut b = reply_bytes(&Reply::AppliedReport(1, LoadReport::default()));
        b[9..13].copy_from_slice(&24u32.to_be_bytes());
        b.truncate(REPLY_HEAD_LEN + 24);
        let e = read_reply(&mut &b[..]).unwrap_err();
        assert!(matches!(e, ReplyError::AppliedText(24)), "{e}");
    }

    /// Runs the source's handshake against a scripted destination.
    fn source_with(
        replies: &[Reply],
        go_fails: bool,
    ) -> (Result<Handshake, MigrationError>, bool, Vec<u8>) {
        let mut back = Vec::new();
        for r in replies {
            write_reply(&mut back, r).unwrap();
        }
        struct FailWrite;
        impl Write for FailWrite {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut fwd = Vec::new();
        let mut sent = false;
        let r = if go_fails {
            source_handshake(&mut &back[..], &mut FailWrite, &mut sent, &|| false)
        } else {
            source_handshake(&mut &back[..], &mut fwd, &mut sent, &|| false)
        };
        (r, sent, fwd)
    }

    #[test]
    fn the_resume_is_placed_on_the_source_clock() {
        let go_sent = Instant::now();
        let h = |rtt_ms: u64, d: Option<u64>| Handshake {
            loaded: go_sent,
            go_sent,
            started: go_sent + Duration::from_millis(rtt_ms),
            resumed_after_go: d.map(Duration::from_millis),
        };
        // 10 ms round trip, 4 of them on the destination before the
        // resume: 3 ms each way, resumed 3 + 4 ms after GO left.
        assert_eq!(
            h(10, Some(4)).resumed_estimate(),
            go_sent + Duration::from_millis(7)
        );
        // No figure from the destination: STARTED's arrival.
        assert_eq!(
            h(10, None).resumed_estimate(),
            go_sent + Duration::from_millis(10)
        );
        // A figure beyond the round trip is capped to it.
        assert_eq!(
            h(10, Some(50)).resumed_estimate(),
            go_sent + Duration::from_millis(10)
        );
    }

    #[test]
    fn source_completes_on_loaded_then_started() {
        let (r, sent, fwd) = source_with(
            &[
                Reply::Loaded,
                Reply::Started(Some(Duration::from_micros(1500))),
            ],
            false,
        );
        let h = r.unwrap();
        assert_eq!(h.resumed_after_go, Some(Duration::from_micros(1500)));
        assert!(sent);
        assert_eq!(fwd, GO_MAGIC);
    }

    #[test]
    fn source_resumes_on_failed_or_missing_loaded() {
        let (r, sent, fwd) = source_with(&[Reply::Failed("bad block".into())], false);
        assert!(matches!(r, Err(MigrationError::Destination(ref m)) if m.0 == "bad block"));
        assert!(!sent && fwd.is_empty(), "no GO after FAILED");
        let (r, sent, fwd) = source_with(&[], false);
        let e = r.unwrap_err();
        assert!(matches!(e, MigrationError::Ack(_)), "{e}");
        assert!(e.to_string().contains("no LOADED reply"), "{e}");
        assert!(!sent && fwd.is_empty());
        let (r, sent, _) = source_with(&[Reply::Started(None)], false);
        assert!(matches!(r, Err(MigrationError::Ack(_))));
        assert!(!sent);
    }

    #[test]
    fn source_resumes_when_go_cannot_be_sent() {
        let (r, sent, _) = source_with(&[Reply::Loaded, Reply::Started(None)], true);
        let e = r.unwrap_err();
        assert!(matches!(e, MigrationError::Ack(_)), "{e}");
        assert!(e.to_string().contains("sending GO failed"), "{e}");
        assert!(!sent);
    }

    #[test]
    fn source_stays_paused_without_started() {
        for replies in [vec![Reply::Loaded], vec![Reply::Loaded, Reply::Loaded]] {
            let (r, sent, fwd) = source_with(&replies, false);
            let e = r.unwrap_err();
            assert!(matches!(e, MigrationError::Unconfirmed(_)), "{e}");
            assert!(sent && fwd == GO_MAGIC);
            let text = e.to_string();
            assert!(text.contains("stays paused"), "{text}");
            assert!(text.contains("may be running"), "{text}");
        }
    }

    #[test]
    fn cancel_before_go_sends_no_go() {
        let mut back = Vec::new();
        write_reply(&mut back, &Reply::Loaded).unwrap();
        let mut fwd = Vec::new();
        let mut sent = false;
        let r = source_handshake(&mut &back[..], &mut fwd, &mut sent, &|| true);
        assert!(matches!(r, Err(MigrationError::Cancelled)));
        assert!(!sent && fwd.is_empty());
    }

    #[test]
    fn destination_starts_only_after_go() {
        let (mut go_w, go_r) = pipe();
        let (back_w, mut back_r) = pipe();
        let t = std::thread::spawn(move || {
            let go = Commit::new(go_r, back_w).wait_go().expect("GO arrives");
            go.started().unwrap();
        });
        assert_eq!(read_reply(&mut back_r).unwrap(), Reply::Loaded);
        write_go(&mut go_w).unwrap();
        match read_reply(&mut back_r).unwrap() {
            Reply::Started(Some(d)) => assert!(d < Duration::from_secs(60), "{d:?}"),
            r => panic!("expected a timed STARTED, got {r:?}"),
        }
        t.join().unwrap();
    }

    #[test]
    fn destination_without_go_never_starts() {
        // The source closes after LOADED.
        let (go_w, go_r) = pipe();
        let (back_w, mut back_r) = pipe();
        drop(go_w);
        let e = Commit::new(go_r, back_w).wait_go().err().expect("no GO");
        assert!(matches!(e, CommitError::NoGo(_)), "{e}");
        assert!(e.to_string().contains("never runs"), "{e}");
        assert_eq!(read_reply(&mut back_r).unwrap(), Reply::Loaded);
        // Garbage instead of GO.
        let (mut go_w, go_r) = pipe();
        let (back_w, _back_r) = pipe();
        go_w.write_all(b"LVMGACK1").unwrap();
        let e = Commit::new(go_r, back_w).wait_go().err().expect("bad GO");
        assert!(e.to_string().contains("expected GO"), "{e}");
        // LOADED cannot be sent.
        let (_go_w, go_r) = pipe();
        let (back_w, back_r) = pipe();
        drop(back_r);
        let e = Commit::new(go_r, back_w)
            .wait_go()
            .err()
            .expect("no return path");
        assert!(matches!(e, CommitError::SendLoaded(_)), "{e}");
    }

    #[test]
    fn destination_waits_for_go_only_as_long_as_the_transport_allows() {
        // The source neither sends GO nor closes: the read timeout ends it.
        let (_go_w, mut go_r) = pipe();
        go_r.set_read_timeout(Some(std::time::Duration::from_millis(100)));
        let (back_w, _back_r) = pipe();
        let e = Commit::new(go_r, back_w)
            .wait_go()
            .err()
            .expect("times out");
        assert!(matches!(e, CommitError::NoGo(_)), "{e}");
        assert!(e.to_string().contains("nothing for 0.1 s"), "{e}");
    }

    #[test]
    fn destination_reports_failure() {
        let (_go_w, go_r) = pipe();
        let (back_w, mut back_r) = pipe();
        Commit::new(go_r, back_w).fail("block list does not match");
        assert_eq!(
            read_reply(&mut back_r).unwrap(),
            Reply::Failed("block list does not match".into())
        );
    }

    #[test]
    fn snapshot_has_nothing_to_wait_for() {
        let c = Commit::none();
        assert!(!c.has_return_path());
        c.wait_go().unwrap().started().unwrap();
    }
}
