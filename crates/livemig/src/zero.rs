//! Zero-page detection. (Placeholder: replaced by the SIMD version.)

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}
