//! Byte-difference masks (which bytes of two equal-length buffers differ,
//! one bit per byte) and the XBZRLE encoders built on them.
//!
//! Every mask holds the same bits: bit `i % 64` of word `i / 64` is set
//! when byte `i` differs; bits past the end of the buffers are clear.
//!
//! `encoder` picks the fastest XBZRLE encoder the CPU supports once
//! (AVX-512BW, then AVX2 on x86_64, else the portable word-skipping
//! encoder) and caches the choice, like [`super::zero`]. A SIMD encoder is
//! one function compiled with its target features and makes one pass over
//! the page pair, a group of four 64-byte lines (`GROUP`) at a time: the
//! XOR of the group's lines ORed together and tested once, so a group of
//! equal bytes inside an unchanged run costs eight loads and one branch;
//! only a group with a difference (or one that ends a changed run) has its
//! four line masks fed to [`super::xbzrle`]'s run writer, one group late,
//! after the next group's loads are issued. No mask array is built. The
//! lines are laid on the old page's 64-byte boundaries, not on page
//! offsets (a head and a tail read with overlapping unaligned loads), so
//! two pages at the same offset within a line (the allocator's 16-byte
//! offset, or page-aligned memory) are read without a load that spans two
//! lines, and the old page (the cold page-cache copy in the engine) never
//! is. The output is byte-identical to the portable encoder (the tests compare
//! them). The AVX-512 routines are built only by compilers that have its
//! intrinsics (Rust 1.89+, see `build.rs`).
//!
//! # Read-ahead
//!
//! The SIMD encoders prefetch the group [`READ_AHEAD`] bytes ahead of the
//! one they compare, inside the page: the hardware prefetcher does not
//! cross 4 KiB pages and needs a few misses before it starts. Prefetching past the end of the page (into
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

/// Bytes ahead of the compared group that the SIMD encoders prefetch: the
/// whole next group of both pages, inside the page (measured: 128 bytes or
/// half a group ahead, 384 or 512 bytes, or two groups were all slower;
/// BENCHMARKS.md).
pub const READ_AHEAD: usize = 256;

/// Bytes the SIMD encoders compare per step (four 64-byte lines): a
/// group with no difference inside an unchanged run costs eight loads,
/// the XORs and one test.
const GROUP: usize = 256;

/// An encoder and its name.
struct Routine {
    name: &'static str,
    encode: EncodeFn,
}

/// The encoder selected for this CPU on first use.
static SELECTED: OnceLock<Routine> = OnceLock::new();

/// Mask words needed for `len` bytes.
#[cfg(test)]
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

    use super::{Error, GROUP, READ_AHEAD};
    use crate::codec::xbzrle::Runs;
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_movemask_epi8, _mm256_or_si256,
        _mm256_testz_si256, _mm256_xor_si256, _mm_prefetch, _MM_HINT_T0,
    };
    #[cfg(livemig_avx512)]
    use std::arch::x86_64::{
        __m512i, _mm512_cmpneq_epi8_mask, _mm512_loadu_si512, _mm512_or_si512,
        _mm512_test_epi64_mask, _mm512_xor_si512,
    };

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

    /// The SIMD encoders' loop. The lines are laid on `old`'s 64-byte
    /// cache lines, not on page offsets: first the head up to `old`'s
    /// first line boundary (one unaligned load of the first 64 bytes, its
    /// mask cut to the head), then the rest in groups of [`GROUP`] bytes,
    /// `group(o, n)` giving the four 64-byte lines' difference masks, or
    /// `None` when the whole group is equal, then the full lines left
    /// with `line`, then the tail under 64 bytes (one unaligned load of
    /// the last 64 bytes, its mask shifted down). So when `old` and `new`
    /// share their offset within a line (the bench's buffers; guest pages
    /// and page-aligned copies) no load spans two lines, and otherwise the
    /// old copy (the cold side in the engine: the page cache) still is
    /// read line by line. A group of equal bytes inside an unchanged run
    /// is skipped without touching [`Runs`]. Pages under 64 bytes are
    /// compared bytewise.
    #[inline(always)]
    fn encode_groups(
        old: &[u8],
        new: &[u8],
        out: &mut [u8],
        mut group: impl FnMut(&[u8; GROUP], &[u8; GROUP]) -> Option<[u64; 4]>,
        mut line: impl FnMut(&[u8; 64], &[u8; 64]) -> u64,
    ) -> Result<usize, Error> {
        let len = new.len();
        let mut runs = Runs::new(new, out);
        if len < 64 {
            let mut m = [0u64; 1];
            super::tail(old, new, &mut m);
            runs.line(0, m[0], len)?;
            return runs.finish();
        }
        // Bytes before `old`'s first 64-byte boundary (0..=63).
        let head = (64 - old.as_ptr() as usize % 64) % 64;
        if head > 0 {
            // `Runs::line` ignores the mask bits at and past `head`.
            let m = line(as_line(&old[..64]), as_line(&new[..64]));
            runs.line(0, m, head)?;
        }
        let groups = old[head..]
            .chunks_exact(GROUP)
            .zip(new[head..].chunks_exact(GROUP));
        // The masks of the group before: handled after the next group's
        // loads are issued, so a mispredicted branch in the run walk does
        // not hold them back.
        let mut pending: Option<(usize, [u64; 4])> = None;
        for (g, (o, n)) in groups.enumerate() {
            let at = head + g * GROUP;
            for line in (0..GROUP).step_by(64) {
                read_ahead(old, at + READ_AHEAD + line);
                read_ahead(new, at + READ_AHEAD + line);
            }
            let (o, n) = (as_group(o), as_group(n));
            let this = group(o, n);
            if let Some((before, m)) = pending.take() {
                for (k, m) in m.into_iter().enumerate() {
                    let base = before + 64 * k;
                    runs.line(base, m, base + 64)?;
                }
            }
            match this {
                None if !runs.in_changed_run() => {}
                None => runs.line(at, 0, at + 64)?,
                Some(m) => pending = Some((at, m)),
            }
        }
        if let Some((before, m)) = pending {
            for (k, m) in m.into_iter().enumerate() {
                let base = before + 64 * k;
                runs.line(base, m, base + 64)?;
            }
        }
        let body = len - head;
        let full = head + body / 64 * 64;
        let mut at = head + body / GROUP * GROUP;
        while at < full {
            let m = line(as_line(&old[at..at + 64]), as_line(&new[at..at + 64]));
            runs.line(at, m, at + 64)?;
            at += 64;
        }
        if full < len {
            // The last `len - full` (1..=63) bytes are the top bits of the
            // mask of the page's last 64 bytes (`len >= 64` here).
            let m = line(as_line(&old[len - 64..]), as_line(&new[len - 64..]));
            runs.line(full, m >> (64 - (len - full)), len)?;
        }
        runs.finish()
    }

    /// A `GROUP`-byte chunk as an array.
    #[inline(always)]
    fn as_group(chunk: &[u8]) -> &[u8; GROUP] {
        chunk.try_into().expect("a chunk of GROUP bytes")
    }

    /// A 64-byte chunk as an array.
    #[inline(always)]
    fn as_line(chunk: &[u8]) -> &[u8; 64] {
        chunk.try_into().expect("a chunk of 64 bytes")
    }

    #[cfg(livemig_avx512)]
    #[clippy::msrv = "1.89"]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn encode_avx512_impl(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        encode_groups(
            old,
            new,
            out,
            |o, n| {
                let l = |k: usize| {
                    (
                        load512(&o[64 * k..64 * k + 64]),
                        load512(&n[64 * k..64 * k + 64]),
                    )
                };
                let (a, b, c, d) = (l(0), l(1), l(2), l(3));
                let x = _mm512_or_si512(
                    _mm512_or_si512(_mm512_xor_si512(a.0, a.1), _mm512_xor_si512(b.0, b.1)),
                    _mm512_or_si512(_mm512_xor_si512(c.0, c.1), _mm512_xor_si512(d.0, d.1)),
                );
                if _mm512_test_epi64_mask(x, x) == 0 {
                    return None;
                }
                Some([
                    _mm512_cmpneq_epi8_mask(a.0, a.1),
                    _mm512_cmpneq_epi8_mask(b.0, b.1),
                    _mm512_cmpneq_epi8_mask(c.0, c.1),
                    _mm512_cmpneq_epi8_mask(d.0, d.1),
                ])
            },
            |o, n| _mm512_cmpneq_epi8_mask(load512(o), load512(n)),
        )
    }

    #[target_feature(enable = "avx2")]
    fn encode_avx2_impl(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        encode_groups(
            old,
            new,
            out,
            |o, n| {
                let l = |k: usize| {
                    (
                        load256(&o[32 * k..32 * k + 32]),
                        load256(&n[32 * k..32 * k + 32]),
                    )
                };
                let v = [l(0), l(1), l(2), l(3), l(4), l(5), l(6), l(7)];
                let x = |k: usize| _mm256_xor_si256(v[k].0, v[k].1);
                let any = _mm256_or_si256(
                    _mm256_or_si256(_mm256_or_si256(x(0), x(1)), _mm256_or_si256(x(2), x(3))),
                    _mm256_or_si256(_mm256_or_si256(x(4), x(5)), _mm256_or_si256(x(6), x(7))),
                );
                if _mm256_testz_si256(any, any) != 0 {
                    return None;
                }
                let eq = |k: usize| _mm256_movemask_epi8(_mm256_cmpeq_epi8(v[k].0, v[k].1)) as u32;
                // movemask gives the equal bytes; the mask wants the others.
                let m = |k: usize| !(u64::from(eq(2 * k)) | u64::from(eq(2 * k + 1)) << 32);
                Some([m(0), m(1), m(2), m(3)])
            },
            |o, n| {
                let eq = |k: usize| {
                    _mm256_movemask_epi8(_mm256_cmpeq_epi8(
                        load256(&o[32 * k..32 * k + 32]),
                        load256(&n[32 * k..32 * k + 32]),
                    )) as u32
                };
                !(u64::from(eq(0)) | u64::from(eq(1)) << 32)
            },
        )
    }

    /// The mask with AVX-512BW, one compare per line (tests).
    #[cfg(all(test, livemig_avx512))]
    #[clippy::msrv = "1.89"]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn fill_avx512(old: &[u8], new: &[u8], mask: &mut [u64]) {
        let full = old.len() / 64;
        for (w, m) in mask[..full].iter_mut().enumerate() {
            let at = w * 64;
            *m = _mm512_cmpneq_epi8_mask(load512(&old[at..at + 64]), load512(&new[at..at + 64]));
        }
        super::tail(&old[full * 64..], &new[full * 64..], &mut mask[full..]);
    }

    /// The mask with AVX2, two compares per line (tests).
    #[cfg(test)]
    #[target_feature(enable = "avx2")]
    fn fill_avx2(old: &[u8], new: &[u8], mask: &mut [u64]) {
        let full = old.len() / 64;
        for (w, m) in mask[..full].iter_mut().enumerate() {
            let at = w * 64;
            let eq = |k: usize| {
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(
                    load256(&old[at + 32 * k..at + 32 * k + 32]),
                    load256(&new[at + 32 * k..at + 32 * k + 32]),
                )) as u32
            };
            *m = !(u64::from(eq(0)) | u64::from(eq(1)) << 32);
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
