//! Byte-difference masks: which bytes of two equal-length buffers differ,
//! one bit per byte, for the XBZRLE encoder's run search.
//!
//! `mask` picks the fastest routine the CPU supports once (AVX-512BW,
//! then AVX2 on x86_64, else a portable word-at-a-time loop) and caches the
//! choice, like [`super::zero`]. The AVX-512 routine is built only by
//! compilers that have its intrinsics (Rust 1.89+, see `build.rs`). Every routine writes the same bits: bit
//! `i % 64` of word `i / 64` is set when byte `i` differs; bits past the
//! end of the buffers are clear. The routines only read the two input
//! slices and only write the mask slice, through bounds-checked chunks.

use std::sync::OnceLock;

/// A mask routine: `(old, new, mask)`; the caller guarantees
/// `old.len() == new.len()` and `mask.len() == words(old.len())`.
pub(crate) type MaskFn = fn(&[u8], &[u8], &mut [u64]);

/// A routine and its name.
struct Routine {
    name: &'static str,
    mask: MaskFn,
}

/// The routine selected for this CPU on first use.
static SELECTED: OnceLock<Routine> = OnceLock::new();

/// Mask words needed for `len` bytes.
pub(crate) const fn words(len: usize) -> usize {
    len.div_ceil(64)
}

/// Fills `mask` (exactly [`words`]`(old.len())` words) with the bytes of
/// `old` and `new` that differ. Panics on mismatched lengths.
#[inline]
pub(crate) fn mask(old: &[u8], new: &[u8], mask: &mut [u64]) {
    assert_eq!(old.len(), new.len());
    assert_eq!(mask.len(), words(old.len()));
    (SELECTED.get_or_init(select).mask)(old, new, mask)
}

/// True when a SIMD routine was selected (otherwise the encoder's own
/// word-skipping scan is faster than building a mask).
pub(crate) fn accelerated() -> bool {
    implementation() != "scalar"
}

/// The name of the routine `mask` uses on this CPU, for logs and
/// benchmark reports: `"avx512bw"`, `"avx2"` or `"scalar"`.
pub fn implementation() -> &'static str {
    SELECTED.get_or_init(select).name
}

/// Chooses the fastest routine the running CPU supports.
fn select() -> Routine {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(livemig_avx512)]
        if is_x86_feature_detected!("avx512bw") {
            return Routine {
                name: "avx512bw",
                mask: x86::avx512,
            };
        }
        if is_x86_feature_detected!("avx2") {
            return Routine {
                name: "avx2",
                mask: x86::avx2,
            };
        }
    }
    Routine {
        name: "scalar",
        mask: scalar,
    }
}

/// Portable routine: 8 bytes at a time, the tail bytewise.
pub(crate) fn scalar(old: &[u8], new: &[u8], mask: &mut [u64]) {
    let mut o = old.chunks_exact(64);
    let mut n = new.chunks_exact(64);
    let mut words = mask.iter_mut();
    for ((o, n), m) in (&mut o).zip(&mut n).zip(&mut words) {
        *m = block64(o, n);
    }
    tail(o.remainder(), n.remainder(), words.into_slice());
}

/// The mask of one 64-byte block, portably: skips equal 8-byte words,
/// looks at the bytes of the others.
fn block64(o: &[u8], n: &[u8]) -> u64 {
    let mut m = 0u64;
    for (k, (o, n)) in o.chunks_exact(8).zip(n.chunks_exact(8)).enumerate() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(o);
        b.copy_from_slice(n);
        let x = u64::from_le_bytes(a) ^ u64::from_le_bytes(b);
        if x == 0 {
            continue;
        }
        for (j, byte) in x.to_le_bytes().iter().enumerate() {
            if *byte != 0 {
                m |= 1 << (8 * k + j);
            }
        }
    }
    m
}

/// Mask bits of a tail shorter than 64 bytes, into `mask` (0 or 1 word).
fn tail(o: &[u8], n: &[u8], mask: &mut [u64]) {
    if let Some(m) = mask.first_mut() {
        *m = o
            .iter()
            .zip(n)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .fold(0, |acc, (i, _)| acc | 1 << i);
    }
}

/// Every routine usable on this CPU, with its name (for tests here and in
/// the encoder).
#[cfg(test)]
pub(crate) fn routines() -> Vec<(&'static str, MaskFn)> {
    let mut v: Vec<(&'static str, MaskFn)> = vec![("scalar", scalar), ("mask", mask)];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            v.push(("avx2", x86::avx2));
        }
        #[cfg(livemig_avx512)]
        if is_x86_feature_detected!("avx512bw") {
            v.push(("avx512bw", x86::avx512));
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! SIMD routines. Each `unsafe` is a load from a slice chunk of exactly
    //! the loaded width, or a call into a function whose target features
    //! were detected at run time before the routine was selected.

    use std::arch::x86_64::{__m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8};
    #[cfg(livemig_avx512)]
    use std::arch::x86_64::{__m512i, _mm512_cmpneq_epi8_mask, _mm512_loadu_si512};

    #[cfg(livemig_avx512)]
    /// AVX-512BW routine; selected only after
    /// `is_x86_feature_detected!("avx512bw")`.
    pub(super) fn avx512(old: &[u8], new: &[u8], mask: &mut [u64]) {
        debug_assert!(is_x86_feature_detected!("avx512bw"));
        // SAFETY: `select` (and the tests) return or call this only when
        // the CPU reports AVX-512BW (which implies AVX-512F), all that
        // `avx512_impl` requires.
        unsafe { avx512_impl(old, new, mask) }
    }

    /// AVX2 routine; selected only after `is_x86_feature_detected!("avx2")`.
    pub(super) fn avx2(old: &[u8], new: &[u8], mask: &mut [u64]) {
        debug_assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: `select` (and the tests) return or call this only when
        // the CPU reports AVX2, all that `avx2_impl` requires.
        unsafe { avx2_impl(old, new, mask) }
    }

    // Built only by Rust 1.89+ (build.rs), where these intrinsics are stable.
    #[cfg(livemig_avx512)]
    #[clippy::msrv = "1.89"]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn avx512_impl(old: &[u8], new: &[u8], mask: &mut [u64]) {
        let mut o = old.chunks_exact(64);
        let mut n = new.chunks_exact(64);
        let mut words = mask.iter_mut();
        for ((o, n), m) in (&mut o).zip(&mut n).zip(&mut words) {
            *m = _mm512_cmpneq_epi8_mask(load512(o), load512(n));
        }
        super::tail(o.remainder(), n.remainder(), words.into_slice());
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2_impl(old: &[u8], new: &[u8], mask: &mut [u64]) {
        let mut o = old.chunks_exact(64);
        let mut n = new.chunks_exact(64);
        let mut words = mask.iter_mut();
        for ((o, n), m) in (&mut o).zip(&mut n).zip(&mut words) {
            let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(load256(&o[..32]), load256(&n[..32])));
            let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(load256(&o[32..]), load256(&n[32..])));
            // movemask gives the equal bytes; the mask wants the others.
            *m = !(u64::from(lo as u32) | u64::from(hi as u32) << 32);
        }
        super::tail(o.remainder(), n.remainder(), words.into_slice());
    }

    #[cfg(livemig_avx512)]
    /// Unaligned 64-byte load of a 64-byte chunk.
    #[clippy::msrv = "1.89"]
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load512(chunk: &[u8]) -> __m512i {
        assert_eq!(chunk.len(), 64);
        // SAFETY: `chunk` holds exactly 64 readable bytes and `loadu` has
        // no alignment requirement.
        unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
    }

    /// Unaligned 32-byte load of a 32-byte chunk.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load256(chunk: &[u8]) -> __m256i {
        assert_eq!(chunk.len(), 32);
        // SAFETY: `chunk` holds exactly 32 readable bytes and `loadu` has
        // no alignment requirement.
        unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::workload::XorShift;

    /// The mask, byte by byte.
    fn reference(old: &[u8], new: &[u8]) -> Vec<u64> {
        let mut m = vec![0u64; words(old.len())];
        for i in 0..old.len() {
            if old[i] != new[i] {
                m[i / 64] |= 1 << (i % 64);
            }
        }
        m
    }

    #[test]
    fn every_single_byte_position_and_value() {
        let old = vec![0u8; 4096];
        for (name, f) in routines() {
            let mut new = old.clone();
            for pos in 0..new.len() {
                for v in [1u8, 0x80, 0xff] {
                    new[pos] = v;
                    let mut m = vec![0u64; 64];
                    f(&old, &new, &mut m);
                    assert_eq!(m, reference(&old, &new), "{name}: byte {pos} = {v:#x}");
                }
                new[pos] = 0;
            }
        }
    }

    #[test]
    fn random_buffers_every_length_and_offset() {
        let mut rng = XorShift::new(0x5DEE_CE66_D1CE_4E5B);
        let mut buf_o = vec![0u8; 400];
        let mut buf_n = vec![0u8; 400];
        for (name, f) in routines() {
            for len in 0..=260 {
                let start = rng.below(64);
                for b in buf_o.iter_mut() {
                    *b = rng.byte() & 3;
                }
                for b in buf_n.iter_mut() {
                    *b = rng.byte() & 3;
                }
                let (o, n) = (&buf_o[start..start + len], &buf_n[start..start + len]);
                let mut m = vec![!0u64; words(len)];
                f(o, n, &mut m);
                assert_eq!(m, reference(o, n), "{name}: {start}+{len}");
            }
        }
    }

    #[test]
    fn implementation_is_named() {
        assert!(["avx512bw", "avx2", "scalar"].contains(&implementation()));
    }
}
