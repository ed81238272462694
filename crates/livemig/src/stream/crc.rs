//! The stream's section checksum: CRC-32 with the IEEE 802.3 polynomial,
//! exactly as `crc32fast` computes it (the wire format does not change).
//!
//! Two helpers let the writer checksum a page while it copies it, instead
//! of reading its send buffer once more before each flush:
//! - [`append_crc`] appends bytes to a buffer and returns the CRC of what
//!   it appended, both from the same loads (AVX-512 with VPCLMULQDQ where
//!   the CPU has it: the copy and the CRC are one pass; elsewhere the copy,
//!   then a CRC of the copy while it is in L1). Guest memory may change
//!   under the copy: the CRC still covers exactly the bytes appended.
//! - [`Combine`] gives crc(A ‖ B) from crc(A) and crc(B) for a B of a
//!   fixed length, in four table look-ups (multiplying crc(A) by x^(8·len)
//!   modulo the polynomial is linear in crc(A)'s 32 bits).
//!
//! And one lets the reader land a run of pages in guest memory and
//! checksum it in the same pass, from a receive buffer that stays in
//! cache: [`copy_crc`] copies into a slice and continues a running CRC.
//! (Non-temporal stores into guest memory were tried and were slower
//! here: 0.047 against 0.041 CPU s per GiB copied and checksummed, where
//! a plain copy then a CRC costs 0.061.)

use std::sync::OnceLock;

use crate::memory::PAGE_SIZE;

/// The CRC of `bytes` continuing from `crc` (the CRC of what came before;
/// 0 for nothing): `crc32fast` as the stream has always used it.
pub fn update(crc: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(crc);
    h.update(bytes);
    h.finalize()
}

/// Appends `src` to `dst` and returns the CRC-32 of the appended bytes
/// (as `crc32fast::hash` of them), computed from the very loads that
/// copied them.
///
/// On the one-pass path it also prefetches the `src.len()` bytes that
/// follow `src` in the address space, one 256-byte step ahead of the copy:
/// the next page of a pass over guest memory, which the hardware
/// prefetcher (stopping at each 4 KiB page) would only start to fetch at
/// its first miss. A prefetch never faults; past a mapping it is dropped.
pub fn append_crc(src: &[u8], dst: &mut Vec<u8>) -> u32 {
    #[cfg(all(target_arch = "x86_64", livemig_avx512))]
    if src.len() >= x86::BLOCK && src.len().is_multiple_of(x86::BLOCK) && x86::available() {
        return x86::append_crc(src, dst);
    }
    let at = dst.len();
    dst.extend_from_slice(src);
    crc32fast::hash(&dst[at..])
}

/// Copies `src` into `dst` (of the same length) and returns the CRC of
/// what came before (`crc`, 0 for nothing) followed by the copied bytes,
/// as [`update`] of them would: one pass over `src` where the CPU allows
/// (AVX-512 with VPCLMULQDQ and a length that is a multiple of 256), else
/// the copy and then the CRC of `src` while it is in cache.
///
/// # Panics
/// If the lengths differ.
pub fn copy_crc(crc: u32, src: &[u8], dst: &mut [u8]) -> u32 {
    assert_eq!(
        src.len(),
        dst.len(),
        "copy_crc between slices of two lengths"
    );
    #[cfg(all(target_arch = "x86_64", livemig_avx512))]
    if src.len() >= x86::BLOCK && src.len().is_multiple_of(x86::BLOCK) && x86::available() {
        return x86::copy_crc_into(crc, src, dst);
    }
    dst.copy_from_slice(src);
    update(crc, src)
}

/// The routine [`append_crc`] uses for a page on this CPU, for reports:
/// `"avx512-vpclmulqdq"` (copy and CRC in one pass) or `"copy+crc32fast"`.
pub fn implementation() -> &'static str {
    #[cfg(all(target_arch = "x86_64", livemig_avx512))]
    if x86::available() {
        return "avx512-vpclmulqdq";
    }
    "copy+crc32fast"
}

/// crc(A ‖ B) from crc(A) and crc(B), for every B of one fixed length.
pub struct Combine {
    /// `tables[i][v]`: crc(A) = v << (8·i) moved past `len` zero bytes.
    tables: [[u32; 256]; 4],
}

impl Combine {
    /// A combiner for parts B of `len` bytes.
    pub fn new(len: usize) -> Self {
        // Moving a CRC register r past n zero bytes, with the register
        // neither inverted at the start nor at the end: linear in r.
        let zeros = vec![0u8; len];
        let shift = |r: u32| !update(!r, &zeros);
        let basis: Vec<u32> = (0..32).map(|bit| shift(1 << bit)).collect();
        let mut tables = [[0u32; 256]; 4];
        for (i, table) in tables.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|b| v & (1 << b) != 0)
                    .fold(0, |acc, b| acc ^ basis[8 * i + b]);
            }
        }
        Combine { tables }
    }

    /// crc(A ‖ B), B being of this combiner's length. (The standard CRC's
    /// initial value and final inversion cancel out here: crc(A ‖ B) =
    /// crc(A)·x^(8·len) ⊕ crc(B).)
    #[inline]
    pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
        let t = &self.tables;
        let a = crc_a.to_le_bytes();
        t[0][usize::from(a[0])]
            ^ t[1][usize::from(a[1])]
            ^ t[2][usize::from(a[2])]
            ^ t[3][usize::from(a[3])]
            ^ crc_b
    }
}

/// The combiner for one page ([`PAGE_SIZE`] bytes).
pub fn page_combine() -> &'static Combine {
    static PAGE: OnceLock<Combine> = OnceLock::new();
    PAGE.get_or_init(|| Combine::new(PAGE_SIZE))
}

#[cfg(all(target_arch = "x86_64", livemig_avx512))]
#[allow(unsafe_code)]
// Built only by compilers with the AVX-512 intrinsics (1.89+, build.rs).
#[clippy::msrv = "1.89"]
mod x86 {
    //! Copy and CRC in one pass: four 64-byte lanes folded with
    //! VPCLMULQDQ as they are stored. Each `unsafe` is a load from or a
    //! store into a range checked to lie inside a slice or inside spare
    //! capacity just reserved, or a call into a function whose CPU
    //! features were checked at run time.

    use std::arch::x86_64::{
        __m512i, _mm512_broadcast_i32x4, _mm512_castsi128_si512, _mm512_castsi512_si128,
        _mm512_clmulepi64_epi128, _mm512_extracti32x4_epi32, _mm512_loadu_si512, _mm512_set_epi64,
        _mm512_storeu_si512, _mm512_ternarylogic_epi64, _mm512_xor_si512, _mm_cvtsi32_si128,
        _mm_prefetch, _mm_set_epi64x, _mm_storeu_si128, _mm_xor_si128, _MM_HINT_T0,
    };
    use std::sync::OnceLock;

    /// Bytes per loop step (four 64-byte lanes).
    pub(super) const BLOCK: usize = 256;

    /// Whether the CPU has what [`append_crc`] needs.
    pub(super) fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("vpclmulqdq")
                && is_x86_feature_detected!("pclmulqdq")
        })
    }

    /// x^n modulo the CRC-32 polynomial (0x04C11DB7, normal bit order).
    pub(super) const fn xpow_mod(n: u32) -> u32 {
        let mut r: u32 = 1;
        let mut i = 0;
        while i < n {
            let carry = r & 0x8000_0000 != 0;
            r <<= 1;
            if carry {
                r ^= 0x04C1_1DB7;
            }
            i += 1;
        }
        r
    }

    /// A folding constant in the reflected domain (33 bits):
    /// x^n mod P, bit-reversed, shifted left by one.
    pub(super) const fn key(n: u32) -> u64 {
        (xpow_mod(n).reverse_bits() as u64) << 1
    }

    /// The constants that move a 128-bit lane `bits` further on: the low
    /// half is multiplied by x^(bits+32), the high half by x^(bits-32).
    const fn fold_keys(bits: u32) -> (i64, i64) {
        (key(bits + 32) as i64, key(bits - 32) as i64)
    }

    const K2048: (i64, i64) = fold_keys(2048);
    const K512: (i64, i64) = fold_keys(512);
    const K384: (i64, i64) = fold_keys(384);
    const K256: (i64, i64) = fold_keys(256);
    const K128: (i64, i64) = fold_keys(128);

    /// Appends `src` (a non-zero multiple of [`BLOCK`] bytes) to `dst`,
    /// returning the CRC of the appended bytes.
    pub(super) fn append_crc(src: &[u8], dst: &mut Vec<u8>) -> u32 {
        assert!(src.len() >= BLOCK && src.len().is_multiple_of(BLOCK));
        assert!(available());
        dst.reserve(src.len());
        let at = dst.len();
        let spare = &mut dst.spare_capacity_mut()[..src.len()];
        // SAFETY: the CPU has AVX-512F/VL and VPCLMULQDQ (asserted above);
        // `src` is a slice and `spare` spare capacity of `dst` of the same
        // length, which cannot overlap a shared slice.
        let crc = unsafe {
            copy_crc::<true>(src.as_ptr(), spare.as_mut_ptr().cast::<u8>(), src.len(), 0)
        };
        // SAFETY: `copy_crc` wrote every one of the `src.len()` bytes
        // after `at` (reserved above), so they are initialised.
        unsafe { dst.set_len(at + src.len()) };
        crc
    }

    /// Copies `src` (a non-zero multiple of [`BLOCK`] bytes) into `dst` of
    /// the same length, returning the CRC continued from `crc`. No
    /// prefetch: `src` is a receive buffer in cache, and what follows it is
    /// not read next.
    pub(super) fn copy_crc_into(crc: u32, src: &[u8], dst: &mut [u8]) -> u32 {
        assert!(src.len() >= BLOCK && src.len().is_multiple_of(BLOCK));
        assert_eq!(src.len(), dst.len());
        assert!(available());
        // SAFETY: the CPU has AVX-512F/VL and VPCLMULQDQ (asserted above);
        // `src` and `dst` are slices of `len` bytes, one shared and one
        // exclusive, so they do not overlap.
        unsafe { copy_crc::<false>(src.as_ptr(), dst.as_mut_ptr(), src.len(), crc) }
    }

    /// One 512-bit register of four 128-bit lanes, each moved on by the
    /// distance of `k` and xored into `d`.
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq")]
    fn fold(x: __m512i, d: __m512i, k: __m512i) -> __m512i {
        let lo = _mm512_clmulepi64_epi128(x, k, 0x00);
        let hi = _mm512_clmulepi64_epi128(x, k, 0x11);
        // Three-way xor.
        _mm512_ternarylogic_epi64(lo, hi, d, 0x96)
    }

    /// Copies `len` bytes (a non-zero multiple of [`BLOCK`]) from `src` to
    /// `dst` and returns the CRC of what came before (`init`, 0 for
    /// nothing) followed by them. With `PREFETCH`, prefetches the `len`
    /// bytes after `src` as it goes (the last step's are not: 256 bytes of
    /// the next page stay to the hardware).
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for `len` bytes, not
    /// overlapping; the CPU must have AVX-512F/VL and VPCLMULQDQ.
    #[target_feature(enable = "avx512f,avx512vl,vpclmulqdq,pclmulqdq,sse2")]
    unsafe fn copy_crc<const PREFETCH: bool>(
        src: *const u8,
        dst: *mut u8,
        len: usize,
        init: u32,
    ) -> u32 {
        let k2048 = _mm512_broadcast_i32x4(_mm_set_epi64x(K2048.1, K2048.0));
        let k512 = _mm512_broadcast_i32x4(_mm_set_epi64x(K512.1, K512.0));
        // Every offset passed below is at most `len - 64` (the loop runs
        // while `at + 256 <= len`).
        macro_rules! load {
            ($at:expr) => {
                // SAFETY: 64 bytes at an offset of at most `len - 64` of
                // `src`, readable for `len` bytes (the caller's promise).
                unsafe { _mm512_loadu_si512(src.add($at).cast()) }
            };
        }
        macro_rules! store {
            ($at:expr, $v:expr) => {
                // SAFETY: 64 bytes at an offset of at most `len - 64` of
                // `dst`, writable for `len` bytes (the caller's promise).
                unsafe { _mm512_storeu_si512(dst.add($at).cast(), $v) }
            };
        }
        let mut x0 = load!(0);
        let mut x1 = load!(64);
        let mut x2 = load!(128);
        let mut x3 = load!(192);
        store!(0, x0);
        store!(64, x1);
        store!(128, x2);
        store!(192, x3);
        // The register before these bytes (the inverse of the CRC so far:
        // all ones for nothing) enters as the first four bytes xored
        // with it.
        x0 = _mm512_xor_si512(x0, _mm512_castsi128_si512(_mm_cvtsi32_si128(!init as i32)));
        let mut at = BLOCK;
        while at < len {
            // The same 256 bytes of the next `len` bytes (see
            // `append_crc`): only an address, never dereferenced.
            if PREFETCH {
                let ahead = src.wrapping_add(at + len - BLOCK).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(192));
            }
            let d0 = load!(at);
            let d1 = load!(at + 64);
            let d2 = load!(at + 128);
            let d3 = load!(at + 192);
            store!(at, d0);
            store!(at + 64, d1);
            store!(at + 128, d2);
            store!(at + 192, d3);
            x0 = fold(x0, d0, k2048);
            x1 = fold(x1, d1, k2048);
            x2 = fold(x2, d2, k2048);
            x3 = fold(x3, d3, k2048);
            at += BLOCK;
        }
        let x = fold(x0, x1, k512);
        let x = fold(x, x2, k512);
        let x = fold(x, x3, k512);
        // The four lanes into the last one: lane 0 moves 384 bits on,
        // lane 1 256, lane 2 128.
        let kv = _mm512_set_epi64(0, 0, K128.1, K128.0, K256.1, K256.0, K384.1, K384.0);
        let lo = _mm512_clmulepi64_epi128(x, kv, 0x00);
        let hi = _mm512_clmulepi64_epi128(x, kv, 0x11);
        let p = _mm512_xor_si512(lo, hi);
        let last = _mm_xor_si128(
            _mm_xor_si128(_mm512_castsi512_si128(p), _mm512_extracti32x4_epi32(p, 1)),
            _mm_xor_si128(
                _mm512_extracti32x4_epi32(p, 2),
                _mm512_extracti32x4_epi32(x, 3),
            ),
        );
        // 128 bits left whose CRC (register from zero) is the answer:
        // crc32fast finishes those 16 bytes.
        let mut bytes = [0u8; 16];
        // SAFETY: a 16-byte store into a 16-byte array.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr().cast(), last) };
        super::update(!0, &bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `len` bytes of xorshift noise from `seed` (other modules' tests
    /// use it too).
    pub(crate) fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn append_crc_is_crc32fast_of_what_it_appended() {
        for len in [0, 1, 7, 255, 256, 512, 1000, 4096, 8192, 4096 + 256] {
            let src = bytes(len, len as u64 + 1);
            let mut dst = b"head".to_vec();
            let crc = append_crc(&src, &mut dst);
            assert_eq!(&dst[..4], b"head");
            assert_eq!(&dst[4..], &src[..], "len {len}");
            assert_eq!(crc, crc32fast::hash(&src), "len {len}");
        }
        // All zeros and all ones: the initial value's handling shows.
        for fill in [0u8, 0xff] {
            let src = vec![fill; PAGE_SIZE];
            let mut dst = Vec::new();
            assert_eq!(append_crc(&src, &mut dst), crc32fast::hash(&src));
        }
    }

    #[test]
    fn copy_crc_continues_the_crc_and_copies_exactly() {
        let head = bytes(999, 7);
        let start = crc32fast::hash(&head);
        for len in [0, 1, 255, 256, 512, 4096, 4096 * 3, 4096 + 256, 8192 + 100] {
            let src = bytes(len, len as u64 + 5);
            // 64-byte aligned and not.
            let mut backing = vec![0xa5u8; len + 64 + 1];
            let aligned = backing.as_ptr().align_offset(64);
            for at in [aligned, aligned + 1] {
                backing.fill(0xa5);
                let crc = copy_crc(start, &src, &mut backing[at..at + len]);
                let mut all = head.clone();
                all.extend_from_slice(&src);
                assert_eq!(crc, crc32fast::hash(&all), "len {len} at {at}");
                assert_eq!(&backing[at..at + len], &src[..], "len {len} at {at}");
                assert!(
                    backing[..at].iter().all(|&b| b == 0xa5),
                    "before, len {len}"
                );
                assert!(
                    backing[at + len..].iter().all(|&b| b == 0xa5),
                    "after, len {len}"
                );
            }
        }
        // From nothing, all zeros and all ones.
        for fill in [0u8, 0xff] {
            let src = vec![fill; PAGE_SIZE];
            let mut dst = vec![0u8; PAGE_SIZE];
            assert_eq!(copy_crc(0, &src, &mut dst), crc32fast::hash(&src));
            assert_eq!(dst, src);
        }
    }

    #[test]
    fn combine_is_the_crc_of_the_concatenation() {
        let c = page_combine();
        for seed in 1..20u64 {
            let a = bytes(seed as usize * 37, seed);
            let b = bytes(PAGE_SIZE, seed + 100);
            let mut ab = a.clone();
            ab.extend_from_slice(&b);
            assert_eq!(
                c.combine(crc32fast::hash(&a), crc32fast::hash(&b)),
                crc32fast::hash(&ab)
            );
        }
        let small = Combine::new(5);
        assert_eq!(
            small.combine(crc32fast::hash(b"abc"), crc32fast::hash(b"defgh")),
            crc32fast::hash(b"abcdefgh")
        );
    }

    #[test]
    fn update_continues_a_crc() {
        let a = bytes(1000, 3);
        assert_eq!(update(update(0, &a[..400]), &a[400..]), crc32fast::hash(&a));
    }

    #[cfg(all(target_arch = "x86_64", livemig_avx512))]
    #[test]
    fn folding_constants_match_the_known_ones() {
        // The 128-bit fold constants of the PCLMULQDQ CRC-32 literature
        // (fold by 512 and by 128 bits).
        assert_eq!(x86::key(544), 0x1_5444_2bd4);
        assert_eq!(x86::key(480), 0x1_c6e4_1596);
        assert_eq!(x86::key(160), 0x1_7519_97d0);
        assert_eq!(x86::key(96), 0x0_ccaa_009e);
    }
}
