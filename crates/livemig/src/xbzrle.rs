//! XBZRLE delta encoding. (Placeholder signatures.)

/// XBZRLE errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The encoding does not fit the output buffer.
    #[error("overflow")]
    Overflow,
}

/// Encodes `new` against `old` into `out`.
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    let _ = (old, new, out);
    Err(Error::Overflow)
}

/// Applies `encoded` to `page`.
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<usize, Error> {
    let _ = (encoded, page);
    Err(Error::Overflow)
}
