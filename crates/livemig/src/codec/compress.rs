//! Compression of single raw pages (zstd or LZ4).
//!
//! The source compresses a page with a reusable [`Compressor`] and sends the
//! result only when it saves a useful share of the page (see
//! [`MIN_SAVING_DIVISOR`]); otherwise the page goes raw. The destination
//! decompresses with a reusable [`Decompressor`] straight into the target
//! page: output is bounded by the page, nothing is allocated from a size
//! read off the wire, and the page must come out exactly full.
//!
//! Formats: zstd pages are standard zstd frames (with the content size in
//! the header); LZ4 pages are raw LZ4 blocks (no frame, the size is the
//! page size both sides know).

use std::fmt;
use std::io;
use std::str::FromStr;

use crate::vm::BoxError;

/// A compressed page is sent only if it is at most
/// `page.len() - page.len() / MIN_SAVING_DIVISOR` bytes: for a 4 KiB page
/// it must save at least 512 bytes, or decompression costs more than the
/// bandwidth it saves.
pub const MIN_SAVING_DIVISOR: usize = 8;

/// Page compression algorithms, with their wire ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Zstandard: better ratio, slower (wire id 1).
    Zstd,
    /// LZ4 block format: fastest, lower ratio (wire id 2).
    Lz4,
}

impl Algorithm {
    /// The algorithm's id on the wire.
    pub const fn as_u8(self) -> u8 {
        match self {
            Algorithm::Zstd => 1,
            Algorithm::Lz4 => 2,
        }
    }

    /// The algorithm with wire id `id`, or `None` for an unknown id.
    pub const fn from_u8(id: u8) -> Option<Algorithm> {
        match id {
            1 => Some(Algorithm::Zstd),
            2 => Some(Algorithm::Lz4),
            _ => None,
        }
    }

    /// The algorithm's name as accepted by [`FromStr`]: `"zstd"` or `"lz4"`.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Zstd => "zstd",
            Algorithm::Lz4 => "lz4",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "zstd" => Ok(Algorithm::Zstd),
            "lz4" => Ok(Algorithm::Lz4),
            _ => Err(Error::UnknownAlgorithm(s.to_owned())),
        }
    }
}

/// Errors of page compression and decompression.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is not one of the supported algorithms.
    #[error("unknown compression algorithm '{0}' (expected 'zstd' or 'lz4')")]
    UnknownAlgorithm(String),
    /// The zstd level is outside what the linked zstd supports.
    #[error("zstd compression level {level} is outside {min}..={max}")]
    BadLevel {
        /// Requested level.
        level: i32,
        /// Lowest supported level.
        min: i32,
        /// Highest supported level.
        max: i32,
    },
    /// zstd could not allocate or configure a context.
    #[error("cannot create a zstd context: {0}")]
    Context(#[source] io::Error),
    /// The compressor failed (a bug or out of memory, not a data problem).
    #[error("{algo} compression of a {len}-byte page failed: {source}")]
    Compress {
        /// Algorithm.
        algo: Algorithm,
        /// Page length.
        len: usize,
        /// What the compressor reported.
        #[source]
        source: BoxError,
    },
    /// The compressed data is corrupt or not in the expected format.
    #[error("corrupt {algo} data ({len} bytes): {source}")]
    Corrupt {
        /// Algorithm.
        algo: Algorithm,
        /// Length of the compressed data.
        len: usize,
        /// What the decompressor reported.
        #[source]
        source: BoxError,
    },
    /// The data decompresses to more bytes than the page holds.
    #[error("{algo} data ({len} bytes) decompresses to more than the {expected}-byte page")]
    TooLarge {
        /// Algorithm.
        algo: Algorithm,
        /// Length of the compressed data.
        len: usize,
        /// Page length.
        expected: usize,
    },
    /// The data decompresses to fewer (or, per its header, other) bytes
    /// than the page holds.
    #[error("{algo} data ({len} bytes) decompresses to {got} bytes, expected {expected}")]
    WrongSize {
        /// Algorithm.
        algo: Algorithm,
        /// Length of the compressed data.
        len: usize,
        /// Page length.
        expected: usize,
        /// Bytes produced (or declared by a zstd frame header).
        got: u64,
    },
}

/// Compresses pages with one algorithm, reusing its context and buffer.
pub struct Compressor {
    algo: Algorithm,
    level: i32,
    /// Present for [`Algorithm::Zstd`].
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Worst-case sized output buffer, reused across pages.
    scratch: Vec<u8>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("algo", &self.algo)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor for `algo`. `level` is the zstd level (0 = zstd's
    /// default, negative = faster); LZ4 has no levels and ignores it.
    pub fn new(algo: Algorithm, level: i32) -> Result<Compressor, Error> {
        let zstd = match algo {
            Algorithm::Zstd => {
                let range = zstd::compression_level_range();
                if !range.contains(&level) {
                    return Err(Error::BadLevel {
                        level,
                        min: *range.start(),
                        max: *range.end(),
                    });
                }
                Some(zstd::bulk::Compressor::new(level).map_err(Error::Context)?)
            }
            Algorithm::Lz4 => None,
        };
        Ok(Compressor {
            algo,
            level,
            zstd,
            scratch: Vec::new(),
        })
    }

    /// The algorithm this compressor uses.
    pub fn algorithm(&self) -> Algorithm {
        self.algo
    }

    /// The configured level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses `page`. If the result is worth sending (see
    /// [`MIN_SAVING_DIVISOR`]) it is appended to `out` and its length is
    /// returned; otherwise `out` is left as it was and `None` is returned.
    pub fn compress(&mut self, page: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, Error> {
        let fail = |source: BoxError| Error::Compress {
            algo: self.algo,
            len: page.len(),
            source,
        };
        self.scratch.clear();
        let n = match (&mut self.zstd, self.algo) {
            (Some(ctx), Algorithm::Zstd) => {
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(page.len()));
                ctx.compress_to_buffer(page, &mut self.scratch)
                    .map_err(|e| fail(e.into()))?
            }
            (_, Algorithm::Zstd) => return Err(fail("no zstd context".into())),
            (_, Algorithm::Lz4) => {
                let bound = lz4_flex::block::get_maximum_output_size(page.len());
                self.scratch.resize(bound, 0);
                lz4_flex::block::compress_into(page, &mut self.scratch)
                    .map_err(|e| fail(e.into()))?
            }
        };
        let limit = page.len() - page.len() / MIN_SAVING_DIVISOR;
        if n == 0 || n > limit || n > self.scratch.len() {
            return Ok(None);
        }
        out.extend_from_slice(&self.scratch[..n]);
        Ok(Some(n))
    }
}

/// Decompresses pages of either algorithm, reusing a zstd context.
pub struct Decompressor {
    /// Created on first zstd use.
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor").finish_non_exhaustive()
    }
}

impl Default for Decompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Decompressor {
    /// A decompressor; its zstd context is created on first use.
    pub fn new() -> Decompressor {
        Decompressor { zstd: None }
    }

    /// Decompresses `src` (compressed with `algo`) into `dst`. Succeeds only
    /// if exactly `dst.len()` bytes come out; never writes outside `dst`.
    /// On error `dst` may hold partial output: decompress into a scratch
    /// page if the target must stay intact.
    pub fn decompress(&mut self, algo: Algorithm, src: &[u8], dst: &mut [u8]) -> Result<(), Error> {
        let got = match algo {
            Algorithm::Zstd => self.zstd_into(src, dst)?,
            Algorithm::Lz4 => lz4_into(src, dst)?,
        };
        if got != dst.len() {
            return Err(Error::WrongSize {
                algo,
                len: src.len(),
                expected: dst.len(),
                got: got as u64,
            });
        }
        Ok(())
    }

    fn zstd_into(&mut self, src: &[u8], dst: &mut [u8]) -> Result<usize, Error> {
        let algo = Algorithm::Zstd;
        let corrupt = |source: BoxError| Error::Corrupt {
            algo,
            len: src.len(),
            source,
        };
        // A frame that declares another size is rejected before any work.
        match zstd::zstd_safe::get_frame_content_size(src) {
            Ok(Some(n)) if n != dst.len() as u64 => {
                return Err(Error::WrongSize {
                    algo,
                    len: src.len(),
                    expected: dst.len(),
                    got: n,
                })
            }
            Ok(_) => {}
            Err(_) => return Err(corrupt("no valid zstd frame header".into())),
        }
        let ctx = match &mut self.zstd {
            Some(ctx) => ctx,
            slot => slot.insert(zstd::bulk::Decompressor::new().map_err(Error::Context)?),
        };
        // zstd writes at most dst.len() bytes; a frame without a declared
        // size that would produce more fails with "destination too small".
        ctx.decompress_to_buffer(src, dst).map_err(|e| {
            if is_dst_too_small(&e) {
                Error::TooLarge {
                    algo,
                    len: src.len(),
                    expected: dst.len(),
                }
            } else {
                corrupt(e.into())
            }
        })
    }
}

/// True for zstd's "destination buffer is too small" error.
fn is_dst_too_small(e: &io::Error) -> bool {
    let want = zstd::zstd_safe::get_error_name(zstd_dst_too_small_code());
    e.to_string() == want
}

/// zstd's error code for "destination buffer is too small".
fn zstd_dst_too_small_code() -> usize {
    // ZSTD_error_dstSize_tooSmall = 70; error codes are returned as -code.
    0usize.wrapping_sub(70)
}

fn lz4_into(src: &[u8], dst: &mut [u8]) -> Result<usize, Error> {
    let algo = Algorithm::Lz4;
    lz4_flex::block::decompress_into(src, dst).map_err(|e| match e {
        lz4_flex::block::DecompressError::OutputTooSmall { .. } => Error::TooLarge {
            algo,
            len: src.len(),
            expected: dst.len(),
        },
        other => Error::Corrupt {
            algo,
            len: src.len(),
            source: other.into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::workload::XorShift;

    const PAGE: usize = 4096;

    /// A page that compresses well: short records with small varying fields.
    fn compressible(seed: u32) -> Vec<u8> {
        let mut page = vec![0u8; PAGE];
        for (i, chunk) in page.chunks_mut(64).enumerate() {
            chunk[..16].copy_from_slice(b"livemig-record: ");
            chunk[16..20].copy_from_slice(&(i as u32 ^ seed).to_le_bytes());
        }
        page
    }

    /// A page that does not compress: xorshift noise.
    fn noise(seed: u64) -> Vec<u8> {
        let mut page = vec![0u8; PAGE];
        XorShift::new(seed).fill(&mut page);
        page
    }

    fn both() -> [Algorithm; 2] {
        [Algorithm::Zstd, Algorithm::Lz4]
    }

    fn compress(algo: Algorithm, page: &[u8]) -> Vec<u8> {
        let mut c = Compressor::new(algo, 3).unwrap();
        let mut out = Vec::new();
        let n = c.compress(page, &mut out).unwrap().expect("compressible");
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn wire_ids_and_names() {
        for algo in both() {
            assert_eq!(Algorithm::from_u8(algo.as_u8()), Some(algo));
            assert_eq!(algo.name().parse::<Algorithm>().unwrap(), algo);
            assert_eq!(algo.to_string(), algo.name());
        }
        assert_eq!(Algorithm::Zstd.as_u8(), 1);
        assert_eq!(Algorithm::Lz4.as_u8(), 2);
        assert_eq!(Algorithm::from_u8(0), None);
        assert_eq!(Algorithm::from_u8(3), None);
        assert_eq!("ZSTD".parse::<Algorithm>().unwrap(), Algorithm::Zstd);
        assert!(matches!(
            "gzip".parse::<Algorithm>(),
            Err(Error::UnknownAlgorithm(s)) if s == "gzip"
        ));
        assert_eq!(serde_json::to_string(&Algorithm::Lz4).unwrap(), "\"lz4\"");
        assert_eq!(
            serde_json::from_str::<Algorithm>("\"zstd\"").unwrap(),
            Algorithm::Zstd
        );
    }

    #[test]
    fn round_trip_reusing_contexts() {
        let mut d = Decompressor::new();
        for algo in both() {
            let mut c = Compressor::new(algo, 1).unwrap();
            for seed in 0..20 {
                let page = compressible(seed);
                let mut out = vec![0xAA]; // existing content is kept
                let n = c.compress(&page, &mut out).unwrap().unwrap();
                assert_eq!(out.len(), 1 + n);
                assert_eq!(out[0], 0xAA);
                assert!(n <= PAGE - PAGE / MIN_SAVING_DIVISOR);
                let mut back = vec![0u8; PAGE];
                d.decompress(algo, &out[1..], &mut back).unwrap();
                assert_eq!(back, page, "{algo} seed {seed}");
            }
        }
    }

    #[test]
    fn zero_page_compresses() {
        for algo in both() {
            let out = compress(algo, &[0u8; PAGE]);
            assert!(out.len() < 64, "{algo}: {}", out.len());
        }
    }

    #[test]
    fn incompressible_page_is_left_raw() {
        for algo in both() {
            let mut c = Compressor::new(algo, 3).unwrap();
            let mut out = vec![1, 2, 3];
            assert_eq!(c.compress(&noise(7), &mut out).unwrap(), None);
            assert_eq!(out, [1, 2, 3]);
        }
    }

    #[test]
    fn bad_level_rejected() {
        assert!(matches!(
            Compressor::new(Algorithm::Zstd, 1000),
            Err(Error::BadLevel { level: 1000, .. })
        ));
        // LZ4 ignores the level.
        assert!(Compressor::new(Algorithm::Lz4, 1000).is_ok());
    }

    #[test]
    fn truncated_input_rejected() {
        let page = compressible(1);
        let mut d = Decompressor::new();
        for algo in both() {
            let out = compress(algo, &page);
            for cut in 0..out.len() {
                let mut dst = vec![0u8; PAGE];
                let r = d.decompress(algo, &out[..cut], &mut dst);
                assert!(r.is_err(), "{algo}: cut at {cut} accepted");
            }
        }
    }

    #[test]
    fn wrong_page_size_rejected() {
        let page = compressible(2);
        let mut d = Decompressor::new();
        for algo in both() {
            let out = compress(algo, &page);
            let mut small = vec![0u8; PAGE / 2];
            let e = d.decompress(algo, &out, &mut small).unwrap_err();
            assert!(
                matches!(e, Error::TooLarge { .. } | Error::WrongSize { .. }),
                "{algo}: {e}"
            );
            let mut big = vec![0u8; PAGE * 2];
            let e = d.decompress(algo, &out, &mut big).unwrap_err();
            assert!(
                matches!(e, Error::WrongSize { expected, .. } if expected == 2 * PAGE),
                "{algo}: {e}"
            );
        }
    }

    #[test]
    fn zstd_frame_declaring_huge_size_rejected_without_work() {
        // A frame compressed from 1 MiB: its header declares 1 MiB.
        let big = vec![0u8; 1 << 20];
        let frame = zstd::bulk::compress(&big, 3).unwrap();
        let mut dst = vec![0u8; PAGE];
        let e = Decompressor::new()
            .decompress(Algorithm::Zstd, &frame, &mut dst)
            .unwrap_err();
        assert!(
            matches!(e, Error::WrongSize { got, .. } if got == 1 << 20),
            "{e}"
        );
    }

    #[test]
    fn zstd_frame_without_size_too_large() {
        // A streamed frame carries no content size; the bound is dst.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &[7u8; 3 * PAGE]).unwrap();
        let frame = enc.finish().unwrap();
        let mut dst = vec![0u8; PAGE];
        let e = Decompressor::new()
            .decompress(Algorithm::Zstd, &frame, &mut dst)
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[test]
    fn lz4_oversized_output_rejected() {
        let block = lz4_flex::block::compress(&[5u8; 3 * PAGE]);
        let mut dst = vec![0u8; PAGE];
        let e = Decompressor::new()
            .decompress(Algorithm::Lz4, &block, &mut dst)
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[test]
    fn wrong_algorithm_and_garbage_rejected() {
        let page = compressible(3);
        let mut d = Decompressor::new();
        let z = compress(Algorithm::Zstd, &page);
        let l = compress(Algorithm::Lz4, &page);
        let mut dst = vec![0u8; PAGE];
        assert!(d.decompress(Algorithm::Lz4, &z, &mut dst).is_err());
        assert!(matches!(
            d.decompress(Algorithm::Zstd, &l, &mut dst),
            Err(Error::Corrupt { .. })
        ));
        // Random garbage and bit flips never panic and never succeed with a
        // wrong page (zstd has no checksum here, so a flip in a literal may
        // decode to other bytes of the right size: that is allowed).
        let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);
        for round in 0..2000 {
            let x = rng.next_u64();
            let len = (x % 300) as usize;
            let garbage = noise(x);
            for algo in both() {
                let _ = d.decompress(algo, &garbage[..len], &mut dst);
            }
            for (algo, good) in [(Algorithm::Zstd, &z), (Algorithm::Lz4, &l)] {
                let mut bad = good.clone();
                let at = (x >> 20) as usize % bad.len();
                bad[at] ^= 1 << (round % 8);
                let _ = d.decompress(algo, &bad, &mut dst);
            }
        }
    }

    #[test]
    fn empty_input_rejected() {
        let mut dst = vec![0u8; PAGE];
        let mut d = Decompressor::new();
        for algo in both() {
            assert!(d.decompress(algo, &[], &mut dst).is_err(), "{algo}");
        }
    }
}
