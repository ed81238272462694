//! Background snapshot: a snapshot of memory as of one instant, written
//! while the guest runs on.
//!
//! ```text
//! guest running   register + write-protect all memory (userfaultfd WP);
//!                 a write now faults: the handler only notes the page
//!                 and lifts its protection (the snapshot has not begun)
//! pause           re-protect the pages noted above (few), save the
//!                 vCPU/device state, resume: this instant is the snapshot
//! guest running   worker threads save chunk after chunk: under the lock,
//!                 copy the chunk, mark it saved, lift its protection;
//!                 a write to a page of a chunk not yet saved faults: the
//!                 handler copies the page first, then lifts protection
//!                 (the saver uses that copy)
//! done            protection lifted, memory unregistered
//! ```
//!
//! The pause therefore costs what re-protecting the pages written
//! between arming and pausing costs, plus the state, not a pass over all
//! memory. Untouched memory must be protected too
//! (`UFFD_FEATURE_WP_UNPOPULATED`), else a first write to it would not
//! fault. Whether writes that KVM performs on a vCPU's behalf raise these
//! faults depends on the host kernel: see the README's snapshot section
//! for what this host does.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::format::{CHUNK_PAGES, CHUNK_SIZE};
use super::save::{write_file, ChunkOut, ChunkSource, SaveStats};
use super::SnapshotError;
use crate::memory::{GuestMemory, RamBlock, PAGE_SIZE};
use crate::sys::uffd::{
    Uffd, UffdMsg, Waker, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_WP,
};
use crate::vm::VmControl;

const PAGE: u64 = PAGE_SIZE as u64;

/// Why the write-protect fault handler of a background snapshot stopped
/// (the snapshot is lost, the guest runs on unprotected): the cause of
/// [`SnapshotError::WriteProtectHandler`].
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Reading write-protect faults failed.
    #[error("reading write-protect faults: {source}")]
    ReadFaults {
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Lifting write protection at a faulting page failed.
    #[error("lifting write protection at {addr:#x}: {source}")]
    Unprotect {
        /// The page's host address.
        addr: u64,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// How to take a background snapshot.
#[derive(Clone, Debug)]
pub struct BackgroundOptions {
    /// Worker threads writing chunks.
    pub threads: usize,
    /// Also hash all memory while the guest is paused (a check for tests
    /// and audits: it makes the pause as long as hashing all memory).
    pub instant_digest: bool,
}

impl Default for BackgroundOptions {
    fn default() -> Self {
        BackgroundOptions {
            threads: super::default_threads(),
            instant_digest: false,
        }
    }
}

/// What a background snapshot did.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackgroundStats {
    /// The file's figures (its digest is that of memory at the instant).
    pub save: SaveStats,
    /// Microseconds the guest was paused.
    pub pause_us: u64,
    /// Pages written between arming and pausing, re-protected in the pause.
    pub reprotected_pages: u64,
    /// Pages copied before the guest overwrote them.
    pub copied_pages: u64,
    /// Write-protect faults handled.
    pub faults: u64,
    /// Microseconds spent arming write protection (guest running).
    pub arm_us: u64,
    /// With [`BackgroundOptions::instant_digest`]: memory's digest hashed
    /// in the pause; equals `save.digest` when the snapshot is exact.
    #[serde(serialize_with = "opt_hex")]
    pub instant_digest: Option<[u8; 32]>,
}

fn opt_hex<S: serde::Serializer>(d: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&crate::engine::hex(d)),
        None => s.serialize_none(),
    }
}

#[derive(Default)]
struct State {
    /// Armed: the instant has passed; writes to unsaved chunks copy first.
    armed: bool,
    /// Before arming: pages whose protection a write lifted.
    written: Vec<(usize, u64)>,
    /// Per block, per chunk: saved.
    saved: Vec<Vec<bool>>,
    /// Pages copied before an overwrite, not yet taken by the saver.
    copies: HashMap<(usize, u64), Box<[u8]>>,
    copied: u64,
}

struct Shared {
    uffd: Uffd,
    blocks: Vec<RamBlock>,
    state: Mutex<State>,
    stop: AtomicBool,
    waker: Waker,
    faults: AtomicU64,
    /// Why the fault handler stopped, once it did.
    error: Mutex<Option<Arc<HandlerError>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn uffd_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Uffd { what, source }
}

fn retry(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 1000 => {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

impl Shared {
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let start = b.region().host_addr();
            (addr >= start && addr < start + b.len()).then(|| (i, (addr - start) / PAGE))
        })
    }

    /// Lifts protection everywhere (waking every blocked writer).
    fn unprotect_all(&self) {
        for b in &self.blocks {
            let r = b.region();
            let _ = retry(|| {
                self.uffd
                    .write_protect(r.host_addr(), r.len() as u64, false, true)
            });
        }
    }

    fn fault_loop(&self) {
        let mut msgs = [UffdMsg::default(); 64];
        let mut page = vec![0u8; PAGE_SIZE];
        while !self.stop.load(Ordering::SeqCst) {
            let r = self
                .uffd
                .poll(Some(self.waker.as_fd()), 200)
                .and_then(|ready| {
                    if ready {
                        self.uffd.read_msgs(&mut msgs)
                    } else {
                        Ok(0)
                    }
                });
            self.waker.drain();
            let n = match r {
                Ok(n) => n,
                Err(source) => return self.fail(HandlerError::ReadFaults { source }),
            };
            for m in &msgs[..n] {
                if m.event != UFFD_EVENT_PAGEFAULT || m.fault_flags() & UFFD_PAGEFAULT_FLAG_WP == 0
                {
                    continue;
                }
                let addr = m.fault_address() & !(PAGE - 1);
                let Some((b, p)) = self.locate(addr) else {
                    continue;
                };
                self.faults.fetch_add(1, Ordering::Relaxed);
                let mut st = lock(&self.state);
                if !st.armed {
                    st.written.push((b, p));
                } else if !st.saved[b][(p / CHUNK_PAGES) as usize]
                    && !st.copies.contains_key(&(b, p))
                {
                    // Still protected: the page holds its value at the instant.
                    self.blocks[b].region().read((p * PAGE) as usize, &mut page);
                    st.copies.insert((b, p), page.clone().into_boxed_slice());
                    st.copied += 1;
                }
                if let Err(source) = retry(|| self.uffd.write_protect(addr, PAGE, false, true)) {
                    drop(st);
                    return self.fail(HandlerError::Unprotect { addr, source });
                }
            }
        }
    }

    fn fail(&self, why: HandlerError) {
        log::error!("background snapshot: {why}");
        lock(&self.error).get_or_insert(Arc::new(why));
        // Never leave a writer blocked: the snapshot is lost, the guest is not.
        self.unprotect_all();
    }

    /// The error to give up with once the fault handler stopped.
    fn stopped(&self) -> Result<(), SnapshotError> {
        match lock(&self.error).clone() {
            Some(cause) => Err(SnapshotError::WriteProtectHandler { cause }),
            None => Ok(()),
        }
    }
}

impl ChunkSource for Shared {
    fn with_chunk(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<ChunkOut, SnapshotError>,
    ) -> Result<ChunkOut, SnapshotError> {
        self.stopped()?;
        let region = self.blocks[block].region();
        buf.clear();
        {
            let mut st = lock(&self.state);
            region.append_to(offset as usize, len as usize, buf);
            let first = offset / PAGE;
            for p in 0..len / PAGE {
                if let Some(c) = st.copies.remove(&(block, first + p)) {
                    buf[(p * PAGE) as usize..((p + 1) * PAGE) as usize].copy_from_slice(&c);
                }
            }
            st.saved[block][(offset / CHUNK_SIZE) as usize] = true;
        }
        retry(|| {
            self.uffd
                .write_protect(region.host_addr() + offset, len, false, true)
        })
        .map_err(uffd_err(format!(
            "lifting write protection of block '{}' at {offset:#x}",
            self.blocks[block].id()
        )))?;
        f(buf)
    }
}

/// Saves `mem` as of one instant to a new mapped-ram file at `path` while
/// the guest (`vm`) runs: it is paused only to re-protect the pages
/// written since protection was armed and to save its state. On error
/// the guest runs on, unprotected.
pub fn background_save(
    mem: &dyn GuestMemory,
    path: &Path,
    vm: &mut dyn VmControl,
    opts: &BackgroundOptions,
) -> Result<BackgroundStats, SnapshotError> {
    background_save_cancellable(mem, path, vm, opts, &|| false)
}

/// As [`background_save`], giving up with [`SnapshotError::Cancelled`]
/// when `cancelled` says so (asked before every chunk); the guest runs
/// on, unprotected, and a file the save created is removed.
pub fn background_save_cancellable(
    mem: &dyn GuestMemory,
    path: &Path,
    vm: &mut dyn VmControl,
    opts: &BackgroundOptions,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<BackgroundStats, SnapshotError> {
    let (_, features) = Uffd::probe_features().map_err(uffd_err("probing features"))?;
    if features & UFFD_FEATURE_WP_UNPOPULATED == 0 {
        return Err(SnapshotError::Uffd {
            what: "a background snapshot needs UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4+)".into(),
            source: io::Error::from(io::ErrorKind::Unsupported),
        });
    }
    let uffd = Uffd::open().map_err(uffd_err("opening"))?;
    uffd.api(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED)
        .map_err(uffd_err("UFFDIO_API"))?;
    let blocks = mem.blocks().to_vec();
    for b in &blocks {
        uffd.register_wp(b.region().host_addr(), b.len())
            .map_err(uffd_err(format!(
                "registering block '{}' for write protection",
                b.id()
            )))?;
    }
    let shared = Arc::new(Shared {
        uffd,
        state: Mutex::new(State {
            saved: blocks
                .iter()
                .map(|b| vec![false; b.len().div_ceil(CHUNK_SIZE) as usize])
                .collect(),
            ..State::default()
        }),
        blocks,
        stop: AtomicBool::new(false),
        waker: Waker::new().map_err(uffd_err("creating the wake-up eventfd"))?,
        faults: AtomicU64::new(0),
        error: Mutex::new(None),
    });
    let s = shared.clone();
    let handler = std::thread::Builder::new()
        .name("livemig-bgsnap-wp".into())
        .spawn(move || s.fault_loop())
        .map_err(uffd_err("spawning the fault handler"))?;
    let result = run(&shared, mem, path, vm, opts, cancelled);
    shared.stop.store(true, Ordering::SeqCst);
    let _ = shared.waker.wake();
    let _ = handler.join();
    shared.unprotect_all();
    for b in &shared.blocks {
        let _ = shared.uffd.unregister(b.region().host_addr(), b.len());
    }
    let mut stats = result?;
    shared.stopped()?;
    let st = lock(&shared.state);
    stats.copied_pages = st.copied;
    stats.faults = shared.faults.load(Ordering::Relaxed);
    Ok(stats)
}

fn run(
    shared: &Shared,
    mem: &dyn GuestMemory,
    path: &Path,
    vm: &mut dyn VmControl,
    opts: &BackgroundOptions,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<BackgroundStats, SnapshotError> {
    let mut stats = BackgroundStats::default();
    let t = Instant::now();
    for b in &shared.blocks {
        let r = b.region();
        retry(|| {
            shared
                .uffd
                .write_protect(r.host_addr(), r.len() as u64, true, false)
        })
        .map_err(uffd_err(format!("write-protecting block '{}'", b.id())))?;
    }
    stats.arm_us = t.elapsed().as_micros() as u64;

    // The instant.
    let paused = Instant::now();
    vm.pause()?;
    let armed = (|| -> Result<Vec<u8>, SnapshotError> {
        if opts.instant_digest {
            stats.instant_digest = Some(crate::engine::memory_digest(mem));
        }
        {
            let mut st = lock(&shared.state);
            let mut written = std::mem::take(&mut st.written);
            written.sort_unstable();
            written.dedup();
            stats.reprotected_pages = written.len() as u64;
            let mut i = 0;
            while i < written.len() {
                let (b, first) = written[i];
                let mut n = 1;
                while i + (n as usize) < written.len() && written[i + n as usize] == (b, first + n)
                {
                    n += 1;
                }
                let addr = shared.blocks[b].region().host_addr() + first * PAGE;
                retry(|| shared.uffd.write_protect(addr, n * PAGE, true, false)).map_err(
                    uffd_err(format!(
                        "re-protecting {n} pages of block '{}'",
                        shared.blocks[b].id()
                    )),
                )?;
                i += n as usize;
            }
            st.armed = true;
        }
        Ok(vm.save_state()?)
    })();
    let resumed = vm.resume();
    stats.pause_us = paused.elapsed().as_micros() as u64;
    let state = armed?;
    resumed?;

    let save = super::SaveOptions {
        threads: opts.threads,
        direct_io: false,
    };
    stats.save = write_file(mem, path, &state, &save, shared, cancelled)?;
    Ok(stats)
}
