//! A digest of all guest memory, so both sides can prove they hold the same.
//!
//! Memory is cut into fixed chunks (64 MiB, the last of a block shorter),
//! each hashed with BLAKE3 on its own thread; the digest is BLAKE3 over the
//! layout (each block's id and length) and the chunk hashes in order. The
//! result depends only on the layout and contents, never on the number of
//! threads, so the two sides always agree on identical memory.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::memory::{GuestMemory, RawRegion};

const CHUNK: usize = 64 << 20;

/// The memory digest, computed with all available cores.
pub fn memory_digest(mem: &dyn GuestMemory) -> [u8; 32] {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    memory_digest_with(mem, threads)
}

/// The memory digest with `threads` hashing threads (same result for any count).
pub fn memory_digest_with(mem: &dyn GuestMemory, threads: usize) -> [u8; 32] {
    let mut chunks: Vec<(&RawRegion, usize, usize)> = Vec::new();
    for b in mem.blocks() {
        let len = b.len() as usize;
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            chunks.push((b.region(), off, n));
            off += n;
        }
    }
    let next = AtomicUsize::new(0);
    let mut hashes = vec![[0u8; 32]; chunks.len()];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, chunks.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(region, off, n)) = chunks.get(i) else {
                            return done;
                        };
                        let h = region
                            .scan(off, n, |bytes| *blake3::hash(bytes).as_bytes())
                            .expect("chunk lies inside its block");
                        done.push((i, h));
                    }
                })
            })
            .collect();
        for w in workers {
            for (i, h) in w.join().expect("digest thread") {
                hashes[i] = h;
            }
        }
    });
    let mut top = blake3::Hasher::new();
    for b in mem.blocks() {
        top.update(&(b.id().len() as u64).to_le_bytes());
        top.update(b.id().as_bytes());
        top.update(&b.len().to_le_bytes());
    }
    for h in &hashes {
        top.update(h);
    }
    *top.finalize().as_bytes()
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
}
