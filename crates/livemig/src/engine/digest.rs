//! A digest of all guest memory, so both sides can prove they hold the same.
//!
//! Memory is cut into fixed chunks (2 MiB, the last of a block shorter),
//! each hashed with BLAKE3 on its own thread; the digest is BLAKE3 over the
//! layout (each block's id and length) and the chunk hashes in order. The
//! result depends only on the layout and contents, never on the number of
//! threads, so the two sides always agree on identical memory.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::memory::GuestMemory;

/// Bytes per hashed chunk: small, so that a destination re-hashes only
/// the chunks it wrote since it last hashed them.
pub(crate) const CHUNK: usize = 2 << 20;

/// The memory digest, computed with all available cores.
pub fn memory_digest(mem: &dyn GuestMemory) -> [u8; 32] {
    memory_digest_with(mem, threads())
}

/// The memory digest with `threads` hashing threads (same result for any count).
pub fn memory_digest_with(mem: &dyn GuestMemory, threads: usize) -> [u8; 32] {
    let chunks = chunk_list(mem);
    let all: Vec<usize> = (0..chunks.len()).collect();
    let mut hashes = vec![[0u8; 32]; chunks.len()];
    for (i, h) in hash_chunks(mem, &chunks, &all, threads) {
        hashes[i] = h;
    }
    top(mem, &hashes)
}

/// One chunk: block index, offset, length.
type Chunk = (usize, usize, usize);

/// Every chunk of memory, block by block.
fn chunk_list(mem: &dyn GuestMemory) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    for (bi, b) in mem.blocks().iter().enumerate() {
        let len = b.len() as usize;
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            chunks.push((bi, off, n));
            off += n;
        }
    }
    chunks
}

fn hash_chunk(mem: &dyn GuestMemory, &(bi, off, n): &Chunk) -> [u8; 32] {
    mem.blocks()[bi]
        .region()
        .scan(off, n, |bytes| *blake3::hash(bytes).as_bytes())
        .expect("chunk lies inside its block")
}

/// Hashes the chunks `which` on `threads` threads: (index, hash) pairs.
fn hash_chunks(
    mem: &dyn GuestMemory,
    chunks: &[Chunk],
    which: &[usize],
    threads: usize,
) -> Vec<(usize, [u8; 32])> {
    let next = AtomicUsize::new(0);
    let mut out = Vec::with_capacity(which.len());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, which.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = which.get(k) else {
                            return done;
                        };
                        done.push((i, hash_chunk(mem, &chunks[i])));
                    }
                })
            })
            .collect();
        for w in workers {
            out.extend(w.join().expect("digest thread"));
        }
    });
    out
}

/// The digest over the layout and the chunk hashes in order.
fn top(mem: &dyn GuestMemory, hashes: &[[u8; 32]]) -> [u8; 32] {
    let layout = mem.blocks().iter().map(|b| (b.id(), b.len()));
    digest_of(layout, hashes)
}

/// The digest of memory laid out as `layout` (block id, length) whose
/// chunks hash to `hashes` (chunk order, block by block): what a snapshot
/// file's chunk table proves.
pub(crate) fn digest_of<'a>(
    layout: impl Iterator<Item = (&'a str, u64)>,
    hashes: &[[u8; 32]],
) -> [u8; 32] {
    let mut top = blake3::Hasher::new();
    for (id, len) in layout {
        top.update(&(id.len() as u64).to_le_bytes());
        top.update(id.as_bytes());
        top.update(&len.to_le_bytes());
    }
    for h in hashes {
        top.update(h);
    }
    *top.finalize().as_bytes()
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
}

/// A digest kept up to date while memory changes, so that only what
/// changed since it was last hashed is hashed in the pause.
///
/// Whoever knows of a change calls [`RunningDigest::touch`] (or
/// [`RunningDigest::touch_pages`]) *after* it happened; a background thread
/// ([`RunningDigest::refresh`]) hashes chunks that stayed untouched for a
/// whole pass (~50 ms), noting the chunk's touch count read *before*
/// hashing. [`RunningDigest::finish`], once every change is in, re-hashes
/// every chunk whose count moved since. The result is [`memory_digest`]'s
/// as long as every change was touched:
///
/// - on the destination, the loader touches every page it writes, and
///   nothing else writes that memory before the guest resumes: always
///   exact;
/// - on the source, the changes are what the dirty tracker reports, so the
///   digest taken in the pause is the tracker's view. The engine therefore
///   also hashes all of memory once the destination has taken over (the
///   source guest stays paused for good) and compares: a write the tracker
///   missed is reported then (see `source.rs`).
pub(crate) struct RunningDigest {
    chunks: Vec<Chunk>,
    /// First chunk of each block.
    first: Vec<usize>,
    writes: Vec<AtomicU64>,
    hashed: Vec<Mutex<Option<Hashed>>>,
    stop: AtomicBool,
    /// The hasher waits out its pause between passes here, so that
    /// [`RunningDigest::stop`] ends it at once: the destination joins it
    /// at the stream's end, inside the guest's pause.
    nap: Mutex<()>,
    wake: Condvar,
}

/// A chunk's hash and its write count when it was read.
type Hashed = (u64, [u8; 32]);

/// Pause between the background hasher's passes.
pub(crate) const PASS: Duration = Duration::from_millis(50);

impl RunningDigest {
    pub fn new(mem: &dyn GuestMemory) -> Self {
        let chunks = chunk_list(mem);
        let mut first = vec![0; mem.blocks().len()];
        for (i, c) in chunks.iter().enumerate().rev() {
            first[c.0] = i;
        }
        RunningDigest {
            writes: chunks.iter().map(|_| AtomicU64::new(0)).collect(),
            hashed: chunks.iter().map(|_| Mutex::new(None)).collect(),
            chunks,
            first,
            stop: AtomicBool::new(false),
            nap: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Every chunk of block `block` holding a page set in `pages` changed.
    pub fn touch_pages(&self, block: usize, pages: &crate::DirtyBitmap) {
        let per = (CHUNK / crate::PAGE_SIZE) as u64;
        let mut p = 0;
        while let Some(q) = pages.next_set(p) {
            let i = self.first[block] + (q / per) as usize;
            self.writes[i].fetch_add(1, Ordering::Release);
            p = (q / per + 1) * per;
        }
    }

    /// The chunk of block `block` holding page `page` changed.
    pub fn touch_page(&self, block: usize, page: u64) {
        let per = (CHUNK / crate::PAGE_SIZE) as u64;
        if let Some(w) = self.writes.get(self.first[block] + (page / per) as usize) {
            w.fetch_add(1, Ordering::Release);
        }
    }

    /// Every chunk of block `block` holding a page set in `pages` within
    /// `[first, first + count)` changed.
    pub fn touch_range(&self, block: usize, pages: &crate::DirtyBitmap, first: u64, count: u64) {
        let per = (CHUNK / crate::PAGE_SIZE) as u64;
        let end = first.saturating_add(count);
        let mut p = first;
        while let Some(q) = pages.next_set(p) {
            if q >= end {
                break;
            }
            let i = self.first[block] + (q / per) as usize;
            self.writes[i].fetch_add(1, Ordering::Release);
            p = (q / per + 1) * per;
        }
    }

    /// Bytes of the chunks [`RunningDigest::finish`] would hash now.
    pub fn pending_bytes(&self) -> u64 {
        (0..self.chunks.len())
            .filter(|&i| match self.slot(i) {
                Some((at, _)) => at != self.writes[i].load(Ordering::Acquire),
                None => true,
            })
            .map(|i| self.chunks[i].2 as u64)
            .sum()
    }

    /// Ends [`RunningDigest::refresh`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Under the lock, so that a hasher between its check and its wait
        // cannot miss the wake-up.
        let _g = self.nap.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }

    /// The loader wrote block `block` at `offset` (call after the write).
    pub fn touch(&self, block: usize, offset: u64) {
        let i = self.first[block] + offset as usize / CHUNK;
        self.writes[i].fetch_add(1, Ordering::Release);
    }

    /// Hashes quiet chunks until [`RunningDigest::stop`].
    pub fn refresh(&self, mem: &dyn GuestMemory) {
        let stop = &self.stop;
        let mut seen = vec![u64::MAX; self.chunks.len()];
        while !stop.load(Ordering::Relaxed) {
            for (i, c) in self.chunks.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let n = self.writes[i].load(Ordering::Acquire);
                let quiet = std::mem::replace(&mut seen[i], n) == n;
                let current = self.slot(i).is_some_and(|(at, _)| at == n);
                if quiet && !current {
                    let h = hash_chunk(mem, c);
                    *self.hashed[i].lock().unwrap_or_else(|p| p.into_inner()) = Some((n, h));
                }
            }
            let g = self.nap.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self
                .wake
                .wait_timeout_while(g, PASS, |_| !stop.load(Ordering::Relaxed));
        }
    }

    /// Hashes now, on all cores, every chunk not hashed since it last
    /// changed, and keeps the hashes: the destination does this at a
    /// drain mark (the guest still runs on the source), so that its
    /// digest in the pause re-hashes only what the pause itself sent,
    /// whatever its background hasher could not keep up with (see
    /// `loader.rs`). Returns the bytes hashed and how long it took.
    pub fn catch_up(&self, mem: &dyn GuestMemory) -> (u64, Duration) {
        let t = std::time::Instant::now();
        // Each chunk's count before it is hashed: a write after that
        // leaves it stale, as in `refresh`.
        let mut stale = Vec::new();
        let mut at = vec![0u64; self.chunks.len()];
        for (i, count) in at.iter_mut().enumerate() {
            let n = self.writes[i].load(Ordering::Acquire);
            if self.slot(i).is_none_or(|(was, _)| was != n) {
                stale.push(i);
                *count = n;
            }
        }
        let mut bytes = 0;
        for (i, h) in hash_chunks(mem, &self.chunks, &stale, threads()) {
            *self.hashed[i].lock().unwrap_or_else(|p| p.into_inner()) = Some((at[i], h));
            bytes += self.chunks[i].2 as u64;
        }
        (bytes, t.elapsed())
    }

    fn slot(&self, i: usize) -> Option<Hashed> {
        *self.hashed[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The digest, once every change is in: re-hashes what moved (and
    /// stops the background hashing). Returns it and the number of chunks
    /// hashed now.
    pub fn finish(&self, mem: &dyn GuestMemory) -> ([u8; 32], usize) {
        self.stop();
        self.current(mem)
    }

    /// As [`RunningDigest::finish`], the background hashing going on: the
    /// source computes the digest in the pause before the point past which
    /// the pause cannot be cut short (see `source.rs`). Like `finish`, it
    /// marks nothing current: what it re-hashed is left to the background
    /// hasher.
    pub fn current(&self, mem: &dyn GuestMemory) -> ([u8; 32], usize) {
        let mut hashes = vec![[0u8; 32]; self.chunks.len()];
        let mut stale = Vec::new();
        for (i, h) in hashes.iter_mut().enumerate() {
            match self.slot(i) {
                Some((at, v)) if at == self.writes[i].load(Ordering::Acquire) => *h = v,
                _ => stale.push(i),
            }
        }
        for (i, h) in hash_chunks(mem, &self.chunks, &stale, threads()) {
            hashes[i] = h;
        }
        (top(mem, &hashes), stale.len())
    }
}

/// Hashes up to `max` bytes of memory the way the digest does (same
/// threads, same chunks), to measure the hashing rate; returns the bytes
/// hashed.
pub(crate) fn hash_sample(mem: &dyn GuestMemory, max: u64) -> u64 {
    let chunks = chunk_list(mem);
    let mut which = Vec::new();
    let mut bytes = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        if bytes >= max {
            break;
        }
        which.push(i);
        bytes += c.2 as u64;
    }
    std::hint::black_box(hash_chunks(mem, &chunks, &which, threads()));
    bytes
}

/// Hex form of a digest, for logs and JSON.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ProcessMemory;

    #[test]
    fn independent_of_threads_and_sensitive_to_every_part() {
        let m = ProcessMemory::new(&[("a", 130 << 20), ("b", 4096)]).unwrap();
        m.blocks()[0].region().write((100 << 20) + 5, b"x");
        let d1 = memory_digest_with(&m, 1);
        assert_eq!(d1, memory_digest_with(&m, 3));
        assert_eq!(d1, memory_digest(&m));
        // A byte in the last chunk of a block changes it.
        m.blocks()[0].region().write((130 << 20) - 1, b"y");
        let d2 = memory_digest(&m);
        assert_ne!(d1, d2);
        // So does the layout: same bytes, other block names.
        let n = ProcessMemory::new(&[("a", 4096)]).unwrap();
        let o = ProcessMemory::new(&[("z", 4096)]).unwrap();
        assert_ne!(memory_digest(&n), memory_digest(&o));
    }

    #[test]
    fn running_digest_equals_the_full_one_and_rehashes_only_what_moved() {
        let m = ProcessMemory::new(&[("a", 9 << 20), ("b", 3 << 20)]).unwrap();
        let r = RunningDigest::new(&m);
        // Nothing hashed yet: everything is hashed at the end.
        assert_eq!(r.pending_bytes(), 12 << 20);
        let (d, n) = r.finish(&m);
        assert_eq!(d, memory_digest(&m));
        assert_eq!(n, 5 + 2);
        // The background hasher covers quiet chunks...
        std::thread::scope(|s| {
            s.spawn(|| r.refresh(&m));
            std::thread::sleep(Duration::from_millis(400));
            // ... then writes land (touched after the write).
            m.blocks()[0].region().write((4 << 20) + 7, b"late");
            r.touch(0, (4 << 20) + 7);
            m.blocks()[1].region().write(1 << 20, b"x");
            r.touch(1, 1 << 20);
            r.stop();
        });
        assert!(r.pending_bytes() >= 4 << 20, "the two written chunks");
        let (d, n) = r.finish(&m);
        assert_eq!(d, memory_digest(&m), "same digest as a full hash");
        // At most the two written chunks (and any the 400 ms did not
        // reach on a very slow host) are hashed at the end.
        assert!(n >= 2, "the written chunks are re-hashed: {n}");
        let (_, n2) = r.finish(&m);
        assert_eq!(n, n2, "finish does not mark chunks current by itself");
        let (d3, n3) = r.current(&m);
        assert_eq!((d3, n3), (d, n), "nor does current, which gives the same");
    }

    #[test]
    fn catching_up_leaves_only_later_writes_to_the_end() {
        let m = ProcessMemory::new(&[("a", 8 << 20)]).unwrap();
        let r = RunningDigest::new(&m);
        m.blocks()[0].region().write(5, b"early");
        r.touch(0, 5);
        let (bytes, _) = r.catch_up(&m);
        assert_eq!(bytes, 8 << 20, "nothing was hashed before");
        assert_eq!(r.pending_bytes(), 0);
        assert_eq!(r.catch_up(&m).0, 0, "nothing moved since");
        // A write after the catch-up: only its chunk is left.
        m.blocks()[0].region().write((6 << 20) + 1, b"late");
        r.touch(0, (6 << 20) + 1);
        assert_eq!(r.pending_bytes(), CHUNK as u64);
        let (d, n) = r.finish(&m);
        assert_eq!(n, 1, "only the chunk written after the catch-up");
        assert_eq!(d, memory_digest(&m));
    }

    #[test]
    fn touching_pages_marks_their_chunks_once_each() {
        let m = ProcessMemory::new(&[("a", 6 << 20), ("b", 3 << 20)]).unwrap();
        let r = RunningDigest::new(&m);
        let per = (CHUNK / crate::PAGE_SIZE) as u64;
        let mut bm = crate::DirtyBitmap::new((6 << 20) / 4096);
        bm.set(per + 3);
        bm.set(per + 7);
        r.touch_pages(0, &bm);
        let mut bm = crate::DirtyBitmap::new((3 << 20) / 4096);
        bm.set(per - 1);
        bm.set(per);
        r.touch_pages(1, &bm);
        let counts: Vec<u64> = r.writes.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        // Block a: chunks 0..3; block b: chunks 3, 4.
        assert_eq!(counts, vec![0, 1, 0, 1, 1]);
    }

    #[test]
    fn touching_a_range_marks_only_its_set_pages_chunks() {
        // What a manual-protect clear re-protects: the pages set in the
        // migration bitmap inside the cleared range, nothing outside it.
        let m = ProcessMemory::new(&[("a", 8 << 20)]).unwrap();
        let r = RunningDigest::new(&m);
        let per = (CHUNK / crate::PAGE_SIZE) as u64;
        let mut bm = crate::DirtyBitmap::new((8 << 20) / 4096);
        bm.set(1); // before the range
        bm.set(per + 5); // inside
        bm.set(2 * per + 1); // inside, next chunk
        bm.set(3 * per + 2); // after the range
        r.touch_range(0, &bm, per, 2 * per);
        let counts: Vec<u64> = r.writes.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, vec![0, 1, 1, 0]);
    }
}
