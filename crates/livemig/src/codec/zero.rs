//! Zero-page detection: the first test every page goes through.
//!
//! [`is_zero`] picks the fastest routine the CPU supports once (AVX2, then
//! SSE2 on x86_64, else a portable word-at-a-time loop) and caches the
//! choice. Every routine handles any length and alignment and stops at the
//! first non-zero block, so a non-zero page usually costs a few loads while
//! a zero page costs one pass over its bytes.

use std::sync::OnceLock;

/// A zero-check routine.
type ZeroFn = fn(&[u8]) -> bool;

/// A routine and its name.
struct Routine {
    name: &'static str,
    check: ZeroFn,
}

/// The routine selected for this CPU on first use.
static SELECTED: OnceLock<Routine> = OnceLock::new();

/// True when every byte of `buf` is zero (also for an empty `buf`).
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    (SELECTED.get_or_init(select).check)(buf)
}

/// The name of the routine [`is_zero`] uses on this CPU, for logs and
/// benchmark reports: `"avx2"`, `"sse2"` or `"scalar"`.
pub fn implementation() -> &'static str {
    SELECTED.get_or_init(select).name
}

/// Chooses the fastest routine the running CPU supports.
fn select() -> Routine {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            return Routine {
                name: "avx2",
                check: x86::avx2,
            };
        }
        if is_x86_feature_detected!("sse2") {
            return Routine {
                name: "sse2",
                check: x86::sse2,
            };
        }
    }
    Routine {
        name: "scalar",
        check: scalar,
    }
}

/// Portable routine: ORs four 8-byte words per step, then the tail bytewise.
fn scalar(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(32);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            acc |= u64::from_ne_bytes(bytes);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! SIMD routines. Each `unsafe` is a load from a slice chunk of exactly
    //! the loaded width, or a call into a function whose target feature was
    //! detected at run time before the routine was selected.

    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_loadu_si256, _mm256_or_si256, _mm256_testz_si256, _mm_cmpeq_epi8,
        _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
    };

    /// Bytes checked per step: four 32-byte AVX2 vectors (two cache lines).
    const AVX2_BLOCK: usize = 128;
    /// Bytes checked per step: four 16-byte SSE2 vectors (one cache line).
    const SSE2_BLOCK: usize = 64;

    /// AVX2 routine; selected only after `is_x86_feature_detected!("avx2")`.
    pub(super) fn avx2(buf: &[u8]) -> bool {
        debug_assert!(is_x86_feature_detected!("avx2"));
        // SAFETY: `select` (and the tests) return or call this only when
        // the CPU reports AVX2, which is all `avx2_impl` requires.
        unsafe { avx2_impl(buf) }
    }

    /// SSE2 routine; SSE2 is part of the x86_64 baseline.
    pub(super) fn sse2(buf: &[u8]) -> bool {
        // SAFETY: every x86_64 CPU has SSE2 (it is in the baseline target).
        unsafe { sse2_impl(buf) }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2_impl(buf: &[u8]) -> bool {
        let mut blocks = buf.chunks_exact(AVX2_BLOCK);
        for block in &mut blocks {
            let acc = _mm256_or_si256(
                _mm256_or_si256(load256(&block[0..32]), load256(&block[32..64])),
                _mm256_or_si256(load256(&block[64..96]), load256(&block[96..128])),
            );
            if _mm256_testz_si256(acc, acc) == 0 {
                return false;
            }
        }
        let mut vectors = blocks.remainder().chunks_exact(32);
        for v in &mut vectors {
            let x = load256(v);
            if _mm256_testz_si256(x, x) == 0 {
                return false;
            }
        }
        super::scalar(vectors.remainder())
    }

    #[target_feature(enable = "sse2")]
    unsafe fn sse2_impl(buf: &[u8]) -> bool {
        let mut blocks = buf.chunks_exact(SSE2_BLOCK);
        for block in &mut blocks {
            let acc = _mm_or_si128(
                _mm_or_si128(load128(&block[0..16]), load128(&block[16..32])),
                _mm_or_si128(load128(&block[32..48]), load128(&block[48..64])),
            );
            if !all_zero128(acc) {
                return false;
            }
        }
        let mut vectors = blocks.remainder().chunks_exact(16);
        for v in &mut vectors {
            if !all_zero128(load128(v)) {
                return false;
            }
        }
        super::scalar(vectors.remainder())
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

    /// Unaligned 16-byte load of a 16-byte chunk.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn load128(chunk: &[u8]) -> __m128i {
        assert_eq!(chunk.len(), 16);
        // SAFETY: `chunk` holds exactly 16 readable bytes and `loadu` has
        // no alignment requirement.
        unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) }
    }

    /// True when all 16 bytes of `x` are zero.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn all_zero128(x: __m128i) -> bool {
        _mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_setzero_si128())) == 0xffff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every routine usable on this CPU, with its name.
    fn routines() -> Vec<(&'static str, ZeroFn)> {
        let mut v: Vec<(&'static str, ZeroFn)> = vec![("scalar", scalar), ("is_zero", is_zero)];
        #[cfg(target_arch = "x86_64")]
        {
            v.push(("sse2", x86::sse2));
            if is_x86_feature_detected!("avx2") {
                v.push(("avx2", x86::avx2));
            }
        }
        v
    }

    #[test]
    fn empty_is_zero() {
        for (name, f) in routines() {
            assert!(f(&[]), "{name}");
        }
    }

    #[test]
    fn page_every_position() {
        for (name, f) in routines() {
            let mut page = vec![0u8; 4096];
            assert!(f(&page), "{name}");
            for pos in 0..page.len() {
                page[pos] = 0x80;
                assert!(!f(&page), "{name}: byte {pos}");
                page[pos] = 1;
                assert!(!f(&page), "{name}: byte {pos}");
                page[pos] = 0;
            }
            assert!(f(&page), "{name}");
        }
    }

    #[test]
    fn odd_lengths_and_misaligned_starts() {
        let mut buf = vec![0u8; 700];
        for (name, f) in routines() {
            for start in 0..40 {
                for len in (0..300).chain([511, 512, 513, 640, 659]) {
                    let end = start + len;
                    assert!(f(&buf[start..end]), "{name}: {start}+{len}");
                    for pos in start..end {
                        buf[pos] = 0xff;
                        assert!(!f(&buf[start..end]), "{name}: {start}+{len} at {pos}");
                        buf[pos] = 0;
                    }
                    // A non-zero byte just outside the slice is not seen.
                    if start > 0 {
                        buf[start - 1] = 1;
                    }
                    buf[end] = 1;
                    assert!(f(&buf[start..end]), "{name}: {start}+{len} neighbours");
                    buf[end] = 0;
                    if start > 0 {
                        buf[start - 1] = 0;
                    }
                }
            }
        }
    }

    #[test]
    fn implementation_is_named() {
        assert!(["avx2", "sse2", "scalar"].contains(&implementation()));
    }
}
