//! Byte-difference masks: which bytes of two equal-length buffers differ,
//! one bit per byte, and the XBZRLE encoders built on them.
//!
//! Every mask routine writes the same bits: bit `i % 64` of word `i / 64`
//! is set when byte `i` differs; bits past the end of the buffers are
//! clear. The routines only read the two input slices and only write the
//! mask slice, through bounds-checked chunks.
//!
//! `encoder` picks the fastest XBZRLE encoder the CPU supports once
//! (AVX-512BW, then AVX2 on x86_64, else the portable word-skipping
//! encoder) and caches the choice, like [`super::zero`]. A SIMD encoder is
//! one function compiled with its target features: the mask pass over the
//! page pair, then [`super::xbzrle`]'s run walk over the mask (in L1 by
//! then), with no indirect call between them. The AVX-512 routines are
//! built only by compilers that have its intrinsics (Rust 1.89+, see
//! `build.rs`).
//!
//! # Read-ahead
//!
//! The SIMD mask passes prefetch the line [`READ_AHEAD`] bytes ahead of the
//! one they compare, inside the page: the hardware prefetcher does not
//! cross 4 KiB pages and needs a few misses before it starts, and a page
//! that is not 64-byte aligned (a page-cache copy from the allocator) makes
//! every load span two lines. Prefetching past the end of the page (into
//! the next page, which helps a caller that encodes adjacent pages in
//! order) was measured and left out: it made pages encoded in scattered
//! order, as the engine does, 7-15% slower (BENCHMARKS.md).

use std::sync::OnceLock;

use super::xbzrle::Error;

/// A mask routine: `(old, new, mask)`; the caller guarantees
/// `old.len() == new.len()` and `mask.len() == words(old.len())`.
#[cfg(test)]
pub(crate) type MaskFn = fn(&[u8], &[u8], &mut [u64]);

/// An encoder: `(old, new, out)`, lengths already checked by the caller
/// (`old.len() == new.len() <= MAX_PAGE_LEN`).
pub(crate) type EncodeFn = fn(&[u8], &[u8], &mut [u8]) -> Result<usize, Error>;

/// Bytes ahead of the compared line that the SIMD mask passes prefetch
/// (two lines; 128 to 256 measured alike, 384 and more slower).
pub const READ_AHEAD: usize = 128;

/// An encoder and its name.
struct Routine {
    name: &'static str,
    encode: EncodeFn,
}

/// The encoder selected for this CPU on first use.
static SELECTED: OnceLock<Routine> = OnceLock::new();

/// Mask words needed for `len` bytes.
pub(crate) const fn words(len: usize) -> usize {
    len.div_ceil(64)
}

/// The XBZRLE encoder for this CPU.
#[inline]
pub(crate) fn encoder() -> EncodeFn {
    SELECTED.get_or_init(select).encode
}

/// The name of the routine the XBZRLE encoder uses on this CPU, for logs
/// and benchmark reports: `"avx512bw"`, `"avx2"` or `"scalar"`.
pub fn implementation() -> &'static str {
    SELECTED.get_or_init(select).name
}

/// Chooses the fastest encoder the running CPU supports.
fn select() -> Routine {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(livemig_avx512)]
        if is_x86_feature_detected!("avx512bw") {
            return Routine {
                name: "avx512bw",
                encode: x86::encode_avx512,
            };
        }
        if is_x86_feature_detected!("avx2") {
            return Routine {
                name: "avx2",
                encode: x86::encode_avx2,
            };
        }
    }
    Routine {
        name: "scalar",
        encode: super::xbzrle::encode_portable,
    }
}

/// Portable mask routine: 8 bytes at a time, the tail bytewise. Used by
/// the tests (the walk over a mask on any CPU); on CPUs without SIMD the
/// word-skipping encoder is faster than building a mask.
#[cfg(test)]
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
#[cfg(test)]
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

/// Every mask routine usable on this CPU, with its name (for tests).
#[cfg(test)]
pub(crate) fn routines() -> Vec<(&'static str, MaskFn)> {
    let mut v: Vec<(&'static str, MaskFn)> = vec![("scalar", scalar)];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            v.push(("avx2", x86::mask_avx2));
        }
        #[cfg(livemig_avx512)]
        if is_x86_feature_detected!("avx512bw") {
            v.push(("avx512bw", x86::mask_avx512));
        }
    }
    v
}

/// Every encoder usable on this CPU, with its name (for tests here and in
/// the encoder): the selected one, the walk over the portable mask, and
/// each SIMD encoder the CPU has.
#[cfg(test)]
pub(crate) fn encoders() -> Vec<(&'static str, EncodeFn)> {
    fn masked_scalar(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        super::xbzrle::encode_masked(old, new, out, scalar)
    }
    let mut v: Vec<(&'static str, EncodeFn)> =
        vec![("selected", encoder()), ("masked/scalar", masked_scalar)];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            v.push(("avx2", x86::encode_avx2));
        }
        #[cfg(livemig_avx512)]
        if is_x86_feature_detected!("avx512bw") {
            v.push(("avx512bw", x86::encode_avx512));
        }
    }
    v
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! SIMD mask passes and the encoders over them. Each `unsafe` is a
    //! load from a slice chunk of exactly the loaded width, a prefetch of
    //! a byte inside a slice, or a call into a function whose target
    //! features were checked at run time just before.

    use super::{Error, READ_AHEAD};
    use crate::codec::xbzrle::encode_masked;
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm_prefetch,
        _MM_HINT_T0,
    };
    #[cfg(livemig_avx512)]
    use std::arch::x86_64::{__m512i, _mm512_cmpneq_epi8_mask, _mm512_loadu_si512};

    /// AVX-512BW encoder; selected only after
    /// `is_x86_feature_detected!("avx512bw")`.
    #[cfg(livemig_avx512)]
    pub(super) fn encode_avx512(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        assert!(is_x86_feature_detected!("avx512bw"));
        // SAFETY: the assert above checked that the CPU has AVX-512BW
        // (which implies AVX-512F), all that `encode_avx512_impl` needs.
        // The check is a load and a test of a cached word.
        unsafe { encode_avx512_impl(old, new, out) }
    }

    /// AVX2 encoder; selected only after `is_x86_feature_detected!("avx2")`.
    pub(super) fn encode_avx2(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: the assert above checked that the CPU has AVX2, all that
        // `encode_avx2_impl` needs.
        unsafe { encode_avx2_impl(old, new, out) }
    }

    /// AVX-512BW mask routine (tests); checks the feature first.
    #[cfg(all(test, livemig_avx512))]
    pub(super) fn mask_avx512(old: &[u8], new: &[u8], mask: &mut [u64]) {
        assert!(is_x86_feature_detected!("avx512bw"));
        // SAFETY: the CPU has AVX-512BW (checked above).
        unsafe { fill_avx512(old, new, mask) }
    }

    /// AVX2 mask routine (tests); checks the feature first.
    #[cfg(test)]
    pub(super) fn mask_avx2(old: &[u8], new: &[u8], mask: &mut [u64]) {
        assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { fill_avx2(old, new, mask) }
    }

    // `encode_masked` is `inline(always)`: compiled here, inside the
    // target-feature function, with the mask pass inlined into it.
    #[cfg(livemig_avx512)]
    #[clippy::msrv = "1.89"]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn encode_avx512_impl(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        encode_masked(old, new, out, |o, n, m| fill_avx512(o, n, m))
    }

    #[target_feature(enable = "avx2")]
    fn encode_avx2_impl(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        encode_masked(old, new, out, |o, n, m| fill_avx2(o, n, m))
    }

    /// The mask with AVX-512BW: one compare per 64 bytes.
    #[cfg(livemig_avx512)]
    #[clippy::msrv = "1.89"]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn fill_avx512(old: &[u8], new: &[u8], mask: &mut [u64]) {
        let full = old.len() / 64;
        let (o, n) = (&old[..full * 64], &new[..full * 64]);
        for (w, m) in mask[..full].iter_mut().enumerate() {
            let at = w * 64;
            read_ahead(o, at + READ_AHEAD);
            read_ahead(n, at + READ_AHEAD);
            *m = _mm512_cmpneq_epi8_mask(load512(&o[at..at + 64]), load512(&n[at..at + 64]));
        }
        super::tail(&old[full * 64..], &new[full * 64..], &mut mask[full..]);
    }

    /// The mask with AVX2: two compares per 64 bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn fill_avx2(old: &[u8], new: &[u8], mask: &mut [u64]) {
        let full = old.len() / 64;
        let (o, n) = (&old[..full * 64], &new[..full * 64]);
        for (w, m) in mask[..full].iter_mut().enumerate() {
            let at = w * 64;
            read_ahead(o, at + READ_AHEAD);
            read_ahead(n, at + READ_AHEAD);
            let lo = _mm256_movemask_epi8(_mm256_cmpeq_epi8(
                load256(&o[at..at + 32]),
                load256(&n[at..at + 32]),
            ));
            let hi = _mm256_movemask_epi8(_mm256_cmpeq_epi8(
                load256(&o[at + 32..at + 64]),
                load256(&n[at + 32..at + 64]),
            ));
            // movemask gives the equal bytes; the mask wants the others.
            *m = !(u64::from(lo as u32) | u64::from(hi as u32) << 32);
        }
        super::tail(&old[full * 64..], &new[full * 64..], &mut mask[full..]);
    }

    /// Prefetches the line holding `buf[at]`, if `at` is inside `buf`.
    #[inline(always)]
    fn read_ahead(buf: &[u8], at: usize) {
        if at < buf.len() {
            // SAFETY: `at` is inside `buf` (checked above), so the address
            // is valid; a prefetch is only a hint to the cache and does not
            // change memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(buf.as_ptr().add(at).cast()) }
        }
    }

    /// Unaligned 64-byte load of a 64-byte chunk.
    #[cfg(livemig_avx512)]
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
        let names: Vec<_> = encoders().iter().map(|(n, _)| *n).collect();
        if implementation() != "scalar" {
            assert!(names.contains(&implementation()), "{names:?}");
        }
    }
}
