//! A digest of all guest memory, so both sides can prove they hold the same.

use crate::memory::GuestMemory;

const CHUNK: usize = 1 << 20;

/// BLAKE3 over every block: id, length, then contents, in block order.
pub fn memory_digest(mem: &dyn GuestMemory) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for b in mem.blocks() {
        h.update(&(b.id().len() as u64).to_le_bytes());
        h.update(b.id().as_bytes());
        h.update(&b.len().to_le_bytes());
        let len = b.len() as usize;
        let mut off = 0;
        while off < len {
            let n = CHUNK.min(len - off);
            b.region().scan(off, n, |s| {
                h.update(s);
            });
            off += n;
        }
    }
    *h.finalize().as_bytes()
}

/// Hex form of a digest, for logs and JSON.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
