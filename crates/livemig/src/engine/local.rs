//! Zero-copy local migration: hand guest memory to a process on the same
//! host instead of copying it.
//!
//! Guest memory backed by memfds ([`crate::memory::create_memfd`]) can be
//! mapped by any process holding the descriptors. So to move a VM to a new
//! VMM process on the same host (an upgrade of the VMM binary, a restart),
//! the source pauses the guest and passes the memory's descriptors over a
//! Unix socket (`SCM_RIGHTS`) with the block layout and the vCPU and device
//! state; the destination maps the same memory in place of its own and
//! resumes. No page is copied and nothing is dirty-tracked, so the pause
//! does not grow with memory size.
//!
//! ```text
//! source (guest runs)                          destination (paused, its own memory)
//!   pause, save vCPU/device state
//!   OFFER + fds (SCM_RIGHTS) ─────────────────▶  checks the fds (count, memfd, seals,
//!     block layout, state                        sizes) and the layout against its own,
//!                                                maps the source's memory in place of
//!                                                its own, restores vCPU/device state
//!                          ◀─────────────────────  LOADED  (or FAILED + why; it unmaps)
//!   GO                     ─────────────────────▶  resumes the guest
//!                          ◀─────────────────────  STARTED
//!   completed: stays paused for good
//! ```
//!
//! LOADED / GO / STARTED are the completion handshake of every livemig
//! migration ([`super::Commit`], `ack.rs`), with the same guarantees: the
//! destination resumes only on GO, so if it fails before GO (bad
//! descriptors, another layout, state it cannot restore, a crash) the
//! source resumes its guest and the destination never ran it. Until GO
//! the destination only maps the memory and never writes to it; on
//! failure it maps fresh memory of its own in its place again.
//!
//! Wire format (big-endian), on a Unix stream socket:
//!
//! ```text
//! offer := "LVMGLCL1" nfds:u16 nblocks:u16 state_len:u32   16 bytes; the nfds
//!                                                          descriptors travel with them
//!          block * nblocks
//!          state: [u8; state_len]
//! block := id_len:u8 id:[u8; id_len] fd:u16 offset:u64 length:u64
//! ```
//!
//! `fd` indexes the descriptors (several blocks may share one file at
//! different offsets). Limits: 1..=[`MAX_FDS`] descriptors,
//! 1..=[`MAX_BLOCKS`] blocks, state up to [`MAX_STATE`] bytes. The
//! destination refuses, with an error naming the descriptor or block: a
//! descriptor count other than announced, a file that is not a memfd or
//! not sealed against shrinking ([`crate::memory::MEMFD_SEALS`]: a source
//! that could truncate the file could kill the destination with SIGBUS),
//! a block outside its file or not page-aligned, a descriptor no block
//! uses, and a layout other than its own (ids and lengths, in order).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ack::{self, Commit, CommitError};
use super::{MigrationError, MigrationHandle, MigrationStats, Params, Status};
use crate::memory::{memfd_seals, BlockBacking, GuestMemory, MEMFD_SEALS};
use crate::sys::scm;
use crate::vm::{BoxError, VmControl};
use crate::PAGE_SIZE;

/// Magic and version of the offer.
pub const OFFER_MAGIC: [u8; 8] = *b"LVMGLCL1";
/// Length of the offer's fixed head (magic, counts, state length).
pub const OFFER_HEAD_LEN: usize = 16;
/// Most descriptors an offer carries (one `SCM_RIGHTS` message).
pub const MAX_FDS: usize = scm::MAX_FDS;
/// Most blocks an offer describes.
pub const MAX_BLOCKS: usize = 4096;
/// Largest vCPU and device state an offer carries.
pub const MAX_STATE: u32 = 64 << 20;
/// What the source's stats name as the dirty tracker: none is needed.
pub const TRACKER_NAME: &str = "none (local: memory handed over)";

/// Why a local migration could not hand memory over, or a destination
/// refused what it was handed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A block's memory is anonymous: only file-backed memory can be
    /// handed to another process.
    #[error("RAM block '{0}' is anonymous memory, which another process cannot map: local migration needs guest memory backed by memfd (minivm: --memfd)")]
    NotShareable(String),
    /// More distinct files than one message can carry.
    #[error(
        "guest memory is spread over {0} files, more than the {MAX_FDS} one message can carry"
    )]
    TooManyFiles(usize),
    /// Reading or writing the socket failed.
    #[error("{what} over the Unix socket: {source}")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The peer is not a local-mode source.
    #[error("not a local migration: the stream starts with {0:02x?}, not \"LVMGLCL1\" (is the source in local mode too, and of this livemig version?)")]
    BadMagic([u8; 8]),
    /// The offer's counts are out of range.
    #[error("bad offer: {0}")]
    BadOffer(String),
    /// The descriptors that arrived are not the ones announced.
    #[error("the source announced {announced} descriptors but {received} arrived{}", if *.truncated { " (more than the message could carry; the rest were closed)" } else { "" })]
    FdCount {
        /// How many the head announced.
        announced: usize,
        /// How many came.
        received: usize,
        /// The kernel dropped descriptors that did not fit.
        truncated: bool,
    },
    /// A descriptor is not a memfd.
    #[error("descriptor {index} is not a memfd (it carries no seals: {source}); only memfd-backed guest memory can be handed over")]
    NotMemfd {
        /// Index in the offer.
        index: usize,
        /// Why F_GET_SEALS failed.
        #[source]
        source: io::Error,
    },
    /// A memfd may shrink.
    #[error("descriptor {index} is not sealed against shrinking (seals {seals:#x}): the source could truncate it under this process's mapping")]
    NotSealed {
        /// Index in the offer.
        index: usize,
        /// The seals it has.
        seals: i32,
    },
    /// fstat failed on a descriptor.
    #[error("descriptor {index}: fstat: {source}")]
    Stat {
        /// Index in the offer.
        index: usize,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A descriptor is not a regular file, or no block lives in it.
    #[error("descriptor {index}: {why}")]
    BadFile {
        /// Index in the offer.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A block does not fit its file or is not page-aligned.
    #[error("block {index} ('{id}'): {why}")]
    BadBlock {
        /// Index in the offer.
        index: usize,
        /// Its id.
        id: String,
        /// What is wrong.
        why: String,
    },
    /// The source's blocks are not this side's.
    #[error("the source's memory layout is not this VM's: {0}")]
    Layout(String),
    /// Mapping the handed-over memory failed.
    #[error("mapping block '{id}' from the source's memfd: {source}")]
    Map {
        /// Block id.
        id: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The VMM could not take the guest (restore its state, resume it).
    #[error("{what}: {source}")]
    Guest {
        /// What failed.
        what: &'static str,
        /// The VMM's error.
        #[source]
        source: BoxError,
    },
    /// The completion handshake failed: the guest never runs here.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A setting that moves pages, which local mode does not do.
    #[error("local mode hands guest memory over instead of sending pages: {0} cannot be used with it; turn it off")]
    Unsupported(LocalUnsupported),
}

/// A setting local mode refuses: each one shapes how pages travel, and in
/// local mode no page travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalUnsupported {
    /// Page channels (`channels` above 1; QMP: capability `multifd`).
    Channels(u16),
    /// Compression of pages (QMP: `multifd-compression`).
    Compression,
    /// XBZRLE delta pages (QMP: capability `xbzrle`).
    Xbzrle,
    /// Postcopy (QMP: capability `postcopy-ram`).
    PostcopyRam,
    /// Postcopy's page-request channel (QMP: capability `postcopy-preempt`).
    PostcopyPreempt,
    /// TLS: the socket is a local Unix socket and carries descriptors.
    Tls,
}

impl LocalUnsupported {
    /// The setting's QMP name (capability or parameter).
    pub fn qmp_name(self) -> &'static str {
        match self {
            LocalUnsupported::Channels(_) => "capability 'multifd'",
            LocalUnsupported::Compression => "parameter 'multifd-compression'",
            LocalUnsupported::Xbzrle => "capability 'xbzrle'",
            LocalUnsupported::PostcopyRam => "capability 'postcopy-ram'",
            LocalUnsupported::PostcopyPreempt => "capability 'postcopy-preempt'",
            LocalUnsupported::Tls => "parameter 'tls-creds'",
        }
    }
}

impl std::fmt::Display for LocalUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalUnsupported::Channels(n) => write!(f, "page channels (channels = {n})"),
            LocalUnsupported::Compression => f.write_str("compression"),
            LocalUnsupported::Xbzrle => f.write_str("XBZRLE"),
            LocalUnsupported::PostcopyRam => f.write_str("postcopy (postcopy-ram)"),
            LocalUnsupported::PostcopyPreempt => f.write_str("postcopy-preempt"),
            LocalUnsupported::Tls => f.write_str("TLS"),
        }
    }
}

/// The first setting of `p` that local mode cannot honour (see
/// [`LocalUnsupported`]; TLS is not a [`Params`] field: the caller checks
/// it). Settings that only steer convergence (bandwidth, downtime limit,
/// auto-converge, dirty-limit, verify) are accepted and have nothing to
/// act on: nothing is sent and the guest is paused once.
pub fn check_params(p: &Params) -> Result<(), LocalUnsupported> {
    if p.channels > 1 {
        return Err(LocalUnsupported::Channels(p.channels));
    }
    if p.compress.is_some() {
        return Err(LocalUnsupported::Compression);
    }
    if p.xbzrle {
        return Err(LocalUnsupported::Xbzrle);
    }
    if p.postcopy_ram {
        return Err(LocalUnsupported::PostcopyRam);
    }
    if p.postcopy_preempt {
        return Err(LocalUnsupported::PostcopyPreempt);
    }
    Ok(())
}

fn socket(what: &'static str) -> impl FnOnce(io::Error) -> LocalError {
    move |source| LocalError::Socket { what, source }
}

/// A block of guest memory as it is handed over: its id, length and file.
#[derive(Clone, Debug)]
pub struct SharedBlock {
    /// Block id.
    pub id: String,
    /// Length in bytes.
    pub len: u64,
    /// The file and offset holding it.
    pub backing: BlockBacking,
}

/// The blocks of `mem` with their files; fails naming the first block
/// that has none (anonymous memory).
pub fn shared_blocks(mem: &dyn GuestMemory) -> Result<Vec<SharedBlock>, LocalError> {
    mem.blocks()
        .iter()
        .map(|b| match b.backing() {
            Some(bk) => Ok(SharedBlock {
                id: b.id().to_string(),
                len: b.len(),
                backing: bk.clone(),
            }),
            None => Err(LocalError::NotShareable(b.id().to_string())),
        })
        .collect()
}

/// The offer's bytes and the files it carries (distinct, in index order).
fn encode_offer<'a>(
    blocks: &'a [SharedBlock],
    state: &[u8],
) -> Result<(Vec<u8>, Vec<&'a File>), LocalError> {
    let mut files: Vec<&File> = Vec::new();
    let mut body = Vec::new();
    for b in blocks {
        let fd = b.backing.file.as_raw_fd();
        let index = match files.iter().position(|f| f.as_raw_fd() == fd) {
            Some(i) => i,
            None => {
                files.push(&b.backing.file);
                files.len() - 1
            }
        };
        body.push(b.id.len() as u8);
        body.extend_from_slice(b.id.as_bytes());
        body.extend_from_slice(&(index as u16).to_be_bytes());
        body.extend_from_slice(&b.backing.offset.to_be_bytes());
        body.extend_from_slice(&b.len.to_be_bytes());
    }
    if files.len() > MAX_FDS {
        return Err(LocalError::TooManyFiles(files.len()));
    }
    if blocks.is_empty() || blocks.len() > MAX_BLOCKS {
        return Err(LocalError::BadOffer(format!(
            "{} blocks (1..={MAX_BLOCKS})",
            blocks.len()
        )));
    }
    let state_len = u32::try_from(state.len())
        .ok()
        .filter(|n| *n <= MAX_STATE)
        .ok_or_else(|| {
            LocalError::BadOffer(format!(
                "vCPU and device state of {} bytes exceeds {MAX_STATE}",
                state.len()
            ))
        })?;
    let mut out = Vec::with_capacity(OFFER_HEAD_LEN + body.len() + state.len());
    out.extend_from_slice(&OFFER_MAGIC);
    out.extend_from_slice(&(files.len() as u16).to_be_bytes());
    out.extend_from_slice(&(blocks.len() as u16).to_be_bytes());
    out.extend_from_slice(&state_len.to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(state);
    Ok((out, files))
}

/// Sends the offer: its head with the descriptors, then the rest.
fn send_offer(sock: &UnixStream, offer: &[u8], files: &[&File]) -> io::Result<()> {
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    let n = scm::send_with_fds(sock, &offer[..OFFER_HEAD_LEN], &fds)?;
    let mut w = sock;
    w.write_all(&offer[n..])?;
    w.flush()
}

/// What a destination received, checked.
#[derive(Debug)]
pub struct Offer {
    /// The blocks, with the files they live in.
    pub blocks: Vec<SharedBlock>,
    /// vCPU and device state.
    pub state: Vec<u8>,
    /// Bytes read from the socket.
    pub bytes: u64,
    /// Distinct files received.
    pub files: usize,
}

/// Reads one offer and checks everything in it that does not depend on
/// the destination's layout (see the module doc).
pub fn read_offer(sock: &UnixStream) -> Result<Offer, LocalError> {
    let mut head = [0u8; OFFER_HEAD_LEN];
    let got = scm::recv_with_fds(sock, &mut head, MAX_FDS)
        .map_err(socket("receiving the offer's descriptors"))?;
    if got.len == 0 {
        return Err(LocalError::Socket {
            what: "receiving the offer",
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the source closed the connection",
            ),
        });
    }
    let mut r = sock;
    r.read_exact(&mut head[got.len..])
        .map_err(socket("reading the offer"))?;
    if head[..8] != OFFER_MAGIC {
        return Err(LocalError::BadMagic(head[..8].try_into().unwrap_or([0; 8])));
    }
    let nfds = usize::from(u16::from_be_bytes([head[8], head[9]]));
    let nblocks = usize::from(u16::from_be_bytes([head[10], head[11]]));
    let state_len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
    if got.fds.len() != nfds || got.truncated {
        return Err(LocalError::FdCount {
            announced: nfds,
            received: got.fds.len(),
            truncated: got.truncated,
        });
    }
    if nfds == 0 || nblocks == 0 || nblocks > MAX_BLOCKS {
        return Err(LocalError::BadOffer(format!(
            "{nfds} descriptors and {nblocks} blocks (at least one of each, at most {MAX_BLOCKS} blocks)"
        )));
    }
    if state_len > MAX_STATE {
        return Err(LocalError::BadOffer(format!(
            "vCPU and device state of {state_len} bytes exceeds {MAX_STATE}"
        )));
    }
    let files: Vec<Arc<File>> = got
        .fds
        .into_iter()
        .map(|fd| Arc::new(File::from(fd)))
        .collect();
    let mut sizes = Vec::with_capacity(files.len());
    for (index, f) in files.iter().enumerate() {
        let meta = f
            .metadata()
            .map_err(|source| LocalError::Stat { index, source })?;
        if !meta.file_type().is_file() {
            return Err(LocalError::BadFile {
                index,
                why: format!("not a regular file ({:?})", meta.file_type()),
            });
        }
        let seals = memfd_seals(f).map_err(|source| LocalError::NotMemfd { index, source })?;
        if seals & MEMFD_SEALS != MEMFD_SEALS {
            return Err(LocalError::NotSealed { index, seals });
        }
        sizes.push(meta.len());
    }
    let mut bytes = OFFER_HEAD_LEN as u64;
    let mut used = vec![false; files.len()];
    let mut blocks = Vec::with_capacity(nblocks);
    for index in 0..nblocks {
        let mut len = [0u8; 1];
        r.read_exact(&mut len)
            .map_err(socket("reading the block list"))?;
        let mut id = vec![0u8; usize::from(len[0])];
        let mut fixed = [0u8; 18];
        r.read_exact(&mut id)
            .map_err(socket("reading the block list"))?;
        r.read_exact(&mut fixed)
            .map_err(socket("reading the block list"))?;
        bytes += 1 + id.len() as u64 + 18;
        let id = String::from_utf8_lossy(&id).into_owned();
        let fd = usize::from(u16::from_be_bytes([fixed[0], fixed[1]]));
        let offset = u64::from_be_bytes(fixed[2..10].try_into().unwrap_or_default());
        let length = u64::from_be_bytes(fixed[10..18].try_into().unwrap_or_default());
        let bad = |why: String| LocalError::BadBlock {
            index,
            id: id.clone(),
            why,
        };
        if id.is_empty() {
            return Err(bad("empty id".into()));
        }
        if fd >= files.len() {
            return Err(bad(format!("descriptor {fd} of {} received", files.len())));
        }
        let page = PAGE_SIZE as u64;
        if length == 0 || length % page != 0 || offset % page != 0 {
            return Err(bad(format!(
                "offset {offset:#x} and length {length:#x} must be page-aligned, length non-zero"
            )));
        }
        if offset.checked_add(length).is_none_or(|end| end > sizes[fd]) {
            return Err(bad(format!(
                "offset {offset:#x} + length {length:#x} is beyond the end of descriptor {fd} ({:#x} bytes)",
                sizes[fd]
            )));
        }
        used[fd] = true;
        blocks.push(SharedBlock {
            id,
            len: length,
            backing: BlockBacking {
                file: files[fd].clone(),
                offset,
            },
        });
    }
    if let Some(index) = used.iter().position(|u| !u) {
        return Err(LocalError::BadFile {
            index,
            why: "no block lives in it".into(),
        });
    }
    let mut state = vec![0u8; state_len as usize];
    r.read_exact(&mut state)
        .map_err(socket("reading the vCPU and device state"))?;
    bytes += u64::from(state_len);
    Ok(Offer {
        blocks,
        state,
        bytes,
        files: files.len(),
    })
}

/// Checks that the offered blocks are `layout` (ids and lengths, in
/// order), the destination's own.
pub fn check_layout(blocks: &[SharedBlock], layout: &[(String, u64)]) -> Result<(), LocalError> {
    if blocks.len() != layout.len() {
        return Err(LocalError::Layout(format!(
            "the source has {} blocks, this VM {}",
            blocks.len(),
            layout.len()
        )));
    }
    for (i, (b, (id, len))) in blocks.iter().zip(layout).enumerate() {
        if &b.id != id || b.len != *len {
            return Err(LocalError::Layout(format!(
                "block {i} is '{}' of {} bytes at the source, '{id}' of {len} bytes here",
                b.id, b.len
            )));
        }
    }
    Ok(())
}

/// Maps each offered block in place of the block of `mem` at the same
/// index (the layouts must match: [`check_layout`]). Writes nothing. On
/// failure, the blocks already taken over get fresh memory again.
pub fn adopt_memory(mem: &dyn GuestMemory, blocks: &[SharedBlock]) -> Result<(), LocalError> {
    for (i, b) in blocks.iter().enumerate() {
        let own = &mem.blocks()[i];
        if let Err(source) = own
            .region()
            .replace_with_file(&b.backing.file, b.backing.offset)
        {
            release_memory(mem, i);
            return Err(LocalError::Map {
                id: b.id.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// Undoes [`adopt_memory`] for the first `count` blocks of `mem`: each
/// gets its own memory back (its own file when it has one,
/// [`crate::RamBlock::backing`], else fresh zeroed memory); nothing is
/// written to the source's files.
pub fn release_memory(mem: &dyn GuestMemory, count: usize) {
    for b in mem.blocks().iter().take(count) {
        let r = match b.backing() {
            Some(own) => b.region().replace_with_file(&own.file, own.offset),
            None => b.region().replace_with_anonymous(),
        };
        if let Err(e) = r {
            log::error!(
                "giving back block '{}' after a failed local migration: {e}",
                b.id()
            );
        }
    }
}

/// The destination VMM's side of a local migration.
pub trait LocalGuest {
    /// The blocks this VM has: (id, length), in order.
    fn layout(&self) -> Vec<(String, u64)>;

    /// Takes the offered memory in place of its own (e.g. with
    /// [`adopt_memory`]) and restores the vCPU and device state. The guest
    /// stays paused, and nothing may write guest memory until
    /// [`LocalGuest::resume`]: the source may still resume it.
    fn adopt(&mut self, blocks: &[SharedBlock], state: &[u8]) -> Result<(), BoxError>;

    /// Undoes [`LocalGuest::adopt`] (no GO came): maps memory of its own
    /// again (e.g. [`release_memory`]), never writing the source's.
    fn discard(&mut self);

    /// Runs the guest (GO came).
    fn resume(&mut self) -> Result<(), BoxError>;
}

/// What the destination of a local migration saw.
#[derive(Clone, Debug, Default)]
pub struct LocalReceived {
    /// Blocks taken over.
    pub blocks: usize,
    /// Distinct files (descriptors) received.
    pub files: usize,
    /// Bytes of guest memory taken over (none of them copied).
    pub memory: u64,
    /// Bytes of vCPU and device state.
    pub state_bytes: u64,
    /// Bytes read from the socket (offer and GO).
    pub socket_bytes: u64,
    /// From the offer's first byte to LOADED sent.
    pub load_time: Duration,
}

/// The destination of a local migration, in one call: reads the offer
/// from `sock`, checks it and the layout, lets `guest` take the memory and
/// state, replies LOADED and resumes the guest on GO, then STARTED. On
/// any failure before GO it replies FAILED where it can, `guest` gives
/// the memory back, and the guest never runs here (the source resumes
/// its own).
pub fn receive(sock: &UnixStream, guest: &mut dyn LocalGuest) -> Result<LocalReceived, LocalError> {
    let t0 = Instant::now();
    let fail = |e: LocalError| {
        let _ = ack::write_reply(&mut &*sock, &ack::Reply::Failed(crate::error_chain(&e)));
        e
    };
    let offer = read_offer(sock).map_err(fail)?;
    check_layout(&offer.blocks, &guest.layout()).map_err(fail)?;
    if let Err(source) = guest.adopt(&offer.blocks, &offer.state) {
        guest.discard();
        return Err(fail(LocalError::Guest {
            what: "taking over the guest",
            source,
        }));
    }
    let load_time = t0.elapsed();
    let go = match Commit::new(sock, sock).wait_go() {
        Ok(go) => go,
        Err(e) => {
            guest.discard();
            return Err(e.into());
        }
    };
    guest.resume().map_err(|source| LocalError::Guest {
        what: "GO received, but resuming the guest failed (the source stays paused)",
        source,
    })?;
    if let Err(e) = go.started() {
        log::warn!(
            "the guest runs here, but STARTED did not reach the source ({e}): it stays paused"
        );
    }
    Ok(LocalReceived {
        blocks: offer.blocks.len(),
        files: offer.files,
        memory: offer.blocks.iter().map(|b| b.len).sum(),
        state_bytes: offer.state.len() as u64,
        socket_bytes: offer.bytes + ack::GO_LEN as u64,
        load_time,
    })
}

/// What the source of a completed local migration saw.
#[derive(Clone, Debug)]
pub struct LocalSent {
    /// The stats, as `query-migrate` shows them (`downtime` in ms).
    pub stats: MigrationStats,
    /// The pause the guest saw, from the source's pause to the
    /// destination's resume (see `ack.rs` for how the resume is placed on
    /// the source's clock).
    pub downtime: Duration,
    /// From the source's pause to STARTED received.
    pub source_downtime: Duration,
    /// Bytes written to the socket (offer, GO).
    pub bytes_out: u64,
    /// Bytes read from it (LOADED, STARTED).
    pub bytes_in: u64,
    /// Distinct files handed over.
    pub files: usize,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The source of a local migration, in one call: pauses the guest through
/// `vm`, hands `blocks` and the saved state over `sock`, runs the
/// completion handshake. `handle` reports the status (`query-migrate`)
/// and carries the cancel flag and the downtime limit (reported against,
/// not enforced: the pause is what it is).
///
/// Settings local mode cannot honour ([`check_params`]) are refused
/// before the guest pauses.
///
/// On success the guest stays paused here for good. On failure it runs on
/// here, except after [`MigrationError::Unconfirmed`] (GO sent, STARTED
/// never came), as for any migration.
pub fn migrate(
    sock: &UnixStream,
    blocks: &[SharedBlock],
    vm: &mut dyn VmControl,
    handle: &MigrationHandle,
) -> Result<LocalSent, MigrationError> {
    let t0 = Instant::now();
    let total: u64 = blocks.iter().map(|b| b.len).sum();
    let limit = handle.params().downtime_limit;
    handle.update_stats(|s| {
        s.status = Status::Setup;
        s.ram.total = total;
        s.dirty_tracker = TRACKER_NAME.into();
        s.downtime_limit = limit;
    });
    let mut paused = false;
    let mut sent_go = false;
    let mut out = 0u64;
    let result = (|| {
        if handle.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        check_params(&handle.params()).map_err(LocalError::Unsupported)?;
        // Refuse what cannot be sent before the guest pauses.
        encode_offer(blocks, &[])?;
        vm.pause()?;
        paused = true;
        let pause_at = Instant::now();
        handle.update_stats(|s| {
            s.status = Status::Device;
            s.setup_time = ms(t0.elapsed());
        });
        let state = vm.save_state()?;
        let (offer, files) = encode_offer(blocks, &state)?;
        send_offer(sock, &offer, &files).map_err(MigrationError::send)?;
        out = offer.len() as u64;
        let nfiles = files.len();
        let t = ack::source_handshake(&mut &*sock, &mut &*sock, &mut sent_go, &|| {
            handle.is_cancelled()
        })?;
        out += ack::GO_LEN as u64;
        Ok((t, pause_at, nfiles))
    })();
    match result {
        Ok((t, pause_at, files)) => {
            let downtime = t.resumed_estimate() - pause_at;
            let source_downtime = t.started - pause_at;
            // LOADED (head only) and a timed STARTED (head + 8 bytes).
            let bytes_in = 2 * ack::REPLY_HEAD_LEN as u64 + 8;
            handle.update_stats(|s| {
                s.status = Status::Completed;
                s.total_time = ms(t0.elapsed());
                s.downtime = ms(downtime);
                s.source_downtime = ms(source_downtime);
                s.downtime_limit_exceeded = ms(downtime) > limit;
                s.ram.transferred = out;
                s.ram.downtime_bytes = out;
                s.ram.remaining = 0;
            });
            Ok(LocalSent {
                stats: handle.stats(),
                downtime,
                source_downtime,
                bytes_out: out,
                bytes_in,
                files,
            })
        }
        Err(e) => {
            let (e, status) = super::source::settle_failure(vm, handle, paused, sent_go, e);
            handle.update_stats(|s| {
                s.status = status;
                s.total_time = ms(t0.elapsed());
                s.ram.transferred = out;
                s.error_desc = Some(e.to_string());
            });
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests;
