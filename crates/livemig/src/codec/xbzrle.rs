//! XBZRLE: delta encoding of a page against its previously sent copy,
//! byte-compatible with QEMU's `xbzrle_encode_buffer` /
//! `xbzrle_decode_buffer` (migration/xbzrle.c).
//!
//! # Format
//!
//! ```text
//! encoding = { zrun nzrun }        (empty = page unchanged)
//! zrun     = length                (bytes unchanged since the old copy)
//! nzrun    = length byte{length}   (bytes changed, as in the new page)
//! length   = ULEB128, 1 or 2 bytes, at most 0x3fff
//! ```
//!
//! The first zrun may be 0 (the page starts with a change); every other run
//! is at least 1 long. A trailing unchanged run is not written.
//!
//! # What was matched against QEMU
//!
//! * Runs: QEMU's portable encoder skips word-at-a-time over equal words and
//!   over words with no equal byte (a "has zero byte" test on `old ^ new`),
//!   then finishes bytewise, so its runs are exactly the maximal runs of
//!   equal / differing bytes. It has no rule that merges short unchanged
//!   gaps into a changed run: one unchanged byte between two changes is its
//!   own zrun of 1. [`encode`] produces the same maximal runs; the tests
//!   compare it with a plain bytewise transcription of the format.
//! * Overflow: QEMU needs 2 bytes of room before writing each zrun and each
//!   nzrun length (even a 1-byte one), and fails when the nzrun bytes do not
//!   fit. The room check before a zrun is made before looking at the data,
//!   so a page whose encoding ends with fewer than 2 bytes left while
//!   unchanged bytes follow still overflows, and a `dlen` below 2 overflows
//!   even for an unchanged page. [`encode`] reports [`Error::Overflow`] in
//!   exactly those cases; pass an `out` of one page (QEMU passes
//!   `dlen = TARGET_PAGE_SIZE`) to make the same raw-or-delta choice.
//! * Lengths: `uleb128_encode_small` writes `n < 0x80` as one byte, else
//!   `(n & 0x7f) | 0x80, n >> 7`; it cannot express more than 0x3fff, so
//!   pages longer than [`MAX_PAGE_LEN`] are refused.
//!   `uleb128_decode_small` reads a second byte only if the first has bit 7
//!   set, rejects a second byte with bit 7 set, and accepts non-minimal
//!   forms (`0x81 0x00` = 1); [`decode`] does the same.
//! * Decoder checks, in QEMU's order: at least 2 bytes must remain before
//!   each zrun and before each nzrun; a zrun of 0 is allowed only at offset
//!   0; a zrun may reach but not pass the page end; an nzrun of 0 is
//!   rejected; an nzrun must fit in the page, then in the input. QEMU
//!   returns -1 for all of these; [`decode`] says which and where, and
//!   validates the whole input before writing (QEMU writes as it goes).
//!
//! QEMU's optional AVX-512 encoder looks for the same maximal runs (from
//! reading its code). The portable encoder and decoder were also compared
//! with this module on 200 000 random cases (encoding bytes, overflow
//! choice, decode result): identical.

/// The longest page [`encode`] accepts: the largest run a 2-byte ULEB128
/// length can carry.
pub const MAX_PAGE_LEN: usize = 0x3fff;

/// An `out` length with which [`encode`] never overflows for a page of
/// `page` bytes (the worst case alternates 1 changed and 1 unchanged byte,
/// 3 output bytes per 2 page bytes). With `out` this large every changed
/// page is sent as a delta, which is not what QEMU does: use one page for
/// QEMU's choice.
pub const fn max_encoded_len(page: usize) -> usize {
    page + page / 2 + 5
}

/// Errors of XBZRLE encoding and decoding. Offsets (`at`) are byte
/// offsets in the encoded input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The old and new pages differ in length.
    #[error("old page is {old} bytes but new page is {new} bytes")]
    LengthMismatch {
        /// Length of the old page.
        old: usize,
        /// Length of the new page.
        new: usize,
    },
    /// The page is longer than the format's run lengths can describe.
    #[error("page of {len} bytes is longer than XBZRLE's limit of {MAX_PAGE_LEN}")]
    PageTooLarge {
        /// Length of the page.
        len: usize,
    },
    /// The encoding does not fit the output buffer: send the page raw.
    #[error("XBZRLE encoding does not fit the output buffer")]
    Overflow,
    /// The input ends inside a run (fewer than 2 bytes left for a run, or
    /// fewer bytes than an nzrun's length).
    #[error("XBZRLE data truncated in the run at byte {at}")]
    Truncated {
        /// Offset of the run's length.
        at: usize,
    },
    /// A run length is not a ULEB128 number of at most 2 bytes.
    #[error("XBZRLE run length at byte {at} is longer than 2 bytes")]
    BadVarint {
        /// Offset of the length.
        at: usize,
    },
    /// A run of length 0 where the format forbids it (any run but the
    /// first unchanged run).
    #[error("XBZRLE run of length 0 at byte {at} (only the first unchanged run may be empty)")]
    ZeroRun {
        /// Offset of the length.
        at: usize,
    },
    /// A run goes past the end of the page.
    #[error("XBZRLE run at byte {at} ends at page offset {end}, past the {page_len}-byte page")]
    RunPastEnd {
        /// Offset of the run's length.
        at: usize,
        /// Page offset where the run would end.
        end: usize,
        /// Length of the page.
        page_len: usize,
    },
}

/// Encodes `new` against `old` into `out` and returns the encoded length;
/// `Ok(0)` means the pages are identical. [`Error::Overflow`] when the
/// encoding does not fit `out` by QEMU's rule (see the module docs).
/// `out` may be changed even on error, but never past its end.
///
/// Where the CPU has AVX-512BW or AVX2 the runs are found in one SIMD
/// pass over the page pair, 256 bytes at a time, equal stretches skipped
/// with one test each ([`super::diff`]); elsewhere by a word-skipping scan
/// ([`encode_portable`]). Both give byte-identical output (the tests
/// compare them).
#[inline]
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    check_lengths(old, new)?;
    (super::diff::encoder())(old, new, out)
}

/// The name of the run search [`encode`] uses on this CPU: the SIMD mask
/// (`"avx512bw"`, `"avx2"`) or `"scalar"` ([`encode_portable`]).
pub fn implementation() -> &'static str {
    super::diff::implementation()
}

fn check_lengths(old: &[u8], new: &[u8]) -> Result<(), Error> {
    if old.len() != new.len() {
        return Err(Error::LengthMismatch {
            old: old.len(),
            new: new.len(),
        });
    }
    if new.len() > MAX_PAGE_LEN {
        return Err(Error::PageTooLarge { len: new.len() });
    }
    Ok(())
}

/// The portable encoder: runs found by skipping equal words and words with
/// no equal byte. Same output as [`encode`] (the reference its SIMD path is
/// tested against); public for benchmarks that compare the two.
pub fn encode_portable(old: &[u8], new: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    check_lengths(old, new)?;
    emit_runs(new, out, |i, changed| {
        if changed {
            i + equal_run(&old[i..], &new[i..])
        } else {
            i + changed_run(&old[i..], &new[i..])
        }
    })
}

/// The run writer of the SIMD encoders: fed the byte-difference mask of
/// the page one 64-byte line at a time, in page order (bit `k` of a
/// line's mask set when byte `base + k` differs), it writes each run as
/// soon as the line where it ends is seen, with the same room checks, in
/// the same order, as [`emit_runs`] (so the same bytes and the same
/// [`Error::Overflow`] cases). A line that continues the current run (no
/// changed byte inside an unchanged run, or no unchanged byte inside a
/// changed run) costs one test: the encoders skip whole groups of equal
/// lines without calling it at all.
pub(crate) struct Runs<'a> {
    new: &'a [u8],
    out: &'a mut [u8],
    /// Bytes written to `out`.
    d: usize,
    /// Page offset where the current run started.
    start: usize,
    /// Whether the current run is of changed bytes.
    changed: bool,
}

impl<'a> Runs<'a> {
    /// A writer for the runs of `new` (whose old copy the caller compares)
    /// into `out`.
    #[inline(always)]
    pub(crate) fn new(new: &'a [u8], out: &'a mut [u8]) -> Self {
        Runs {
            new,
            out,
            d: 0,
            start: 0,
            changed: false,
        }
    }

    /// Whether the run in progress is of changed bytes (then a line of
    /// equal bytes ends it and must be fed).
    #[inline(always)]
    pub(crate) fn in_changed_run(&self) -> bool {
        self.changed
    }

    /// Feeds the mask `m` of the bytes `base..end` (`end - base <= 64`;
    /// bits at and past `end - base` are ignored).
    #[inline(always)]
    pub(crate) fn line(&mut self, base: usize, m: u64, end: usize) -> Result<(), Error> {
        // Bits where the byte is not of the current run's kind.
        let flips = if self.changed { !m } else { m };
        let valid = end - base;
        let flips = if valid >= 64 {
            flips
        } else {
            flips & ((1u64 << valid) - 1)
        };
        if flips == 0 {
            return Ok(());
        }
        self.switch(base, m, flips, valid)
    }

    /// The runs that end inside one line: `flips` is non-zero.
    #[inline(never)]
    fn switch(&mut self, base: usize, m: u64, mut flips: u64, valid: usize) -> Result<(), Error> {
        while flips != 0 {
            let at = flips.trailing_zeros() as usize;
            if self.changed {
                self.end_changed(base + at)?;
            } else {
                self.start_changed(base + at)?;
            }
            // The bits past `at` that differ from the new run's kind.
            let kind = if self.changed { !m } else { m };
            let above = if at >= 63 { 0 } else { !0u64 << (at + 1) };
            let limit = if valid >= 64 {
                !0u64
            } else {
                (1u64 << valid) - 1
            };
            flips = kind & above & limit;
        }
        Ok(())
    }

    /// An unchanged run ends (a changed one starts) at page offset `at`.
    #[inline(always)]
    fn start_changed(&mut self, at: usize) -> Result<(), Error> {
        let dlen = self.out.len();
        if self.d + 2 > dlen {
            return Err(Error::Overflow);
        }
        self.d += put_length(&mut self.out[self.d..], at - self.start);
        if self.d + 2 > dlen {
            return Err(Error::Overflow);
        }
        self.start = at;
        self.changed = true;
        Ok(())
    }

    /// A changed run ends at page offset `at`: its length and bytes.
    #[inline(always)]
    fn end_changed(&mut self, at: usize) -> Result<(), Error> {
        let n = at - self.start;
        self.d += put_length(&mut self.out[self.d..], n);
        if self.d + n > self.out.len() {
            return Err(Error::Overflow);
        }
        let (d, start) = (self.d, self.start);
        if n <= 16 && d + 16 <= self.out.len() && start + 16 <= self.new.len() {
            // A short run (the common case): one fixed 16-byte copy instead
            // of a call to `memcpy`. The bytes past `n` are overwritten by
            // what follows or lie past the encoding's end, inside `out`.
            self.out[d..d + 16].copy_from_slice(&self.new[start..start + 16]);
        } else {
            self.out[d..d + n].copy_from_slice(&self.new[start..at]);
        }
        self.d += n;
        self.start = at;
        self.changed = false;
        Ok(())
    }

    /// Ends the page: the encoded length, `Ok(0)` when nothing changed.
    #[inline(always)]
    pub(crate) fn finish(mut self) -> Result<usize, Error> {
        let len = self.new.len();
        if len == 0 {
            return Ok(0);
        }
        if self.changed {
            self.end_changed(len)?;
            return Ok(self.d);
        }
        // A trailing unchanged run is not written, but QEMU checks for
        // room before looking at it (also when the whole page is
        // unchanged, with `d == 0`).
        if self.d + 2 > self.out.len() {
            return Err(Error::Overflow);
        }
        Ok(self.d)
    }
}

/// The encoder over a byte-difference mask that `fill(old, new, mask)`
/// builds (bit `i % 64` of word `i / 64` set when byte `i` differs, bits
/// past the end clear), walked through [`Runs`]: tests the run writer on
/// any CPU with the portable mask routine. The caller has checked the
/// lengths.
#[cfg(test)]
pub(crate) fn encode_masked(
    old: &[u8],
    new: &[u8],
    out: &mut [u8],
    fill: impl FnOnce(&[u8], &[u8], &mut [u64]),
) -> Result<usize, Error> {
    let len = new.len();
    let mut mask = vec![0u64; super::diff::words(len)];
    fill(old, new, &mut mask);
    let mut runs = Runs::new(new, out);
    for (w, &m) in mask.iter().enumerate() {
        runs.line(w * 64, m, (w * 64 + 64).min(len))?;
    }
    runs.finish()
}

/// Writes the runs of `new` into `out` with QEMU's room checks;
/// `next(i, true)` / `next(i, false)` give the first page offset at or
/// after `i` whose byte is changed / unchanged (`new.len()` when none is),
/// so the run starting at `i` ends there.
#[inline(always)]
fn emit_runs(
    new: &[u8],
    out: &mut [u8],
    mut next: impl FnMut(usize, bool) -> usize,
) -> Result<usize, Error> {
    let len = new.len();
    let dlen = out.len();
    let (mut i, mut d) = (0, 0);
    while i < len {
        if d + 2 > dlen {
            return Err(Error::Overflow);
        }
        let zrun = next(i, true) - i;
        if zrun == len {
            return Ok(0);
        }
        i += zrun;
        if i == len {
            return Ok(d);
        }
        d += put_length(&mut out[d..], zrun);

        if d + 2 > dlen {
            return Err(Error::Overflow);
        }
        let nzrun = next(i, false) - i;
        d += put_length(&mut out[d..], nzrun);
        if d + nzrun > dlen {
            return Err(Error::Overflow);
        }
        out[d..d + nzrun].copy_from_slice(&new[i..i + nzrun]);
        d += nzrun;
        i += nzrun;
    }
    Ok(d)
}

/// Applies `encoded` to `page` in place and returns the page offset where
/// the last run ends. The whole input is checked first: on error `page` is
/// untouched.
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<usize, Error> {
    let end = walk(encoded, page.len(), |_, _| {})?;
    walk(encoded, page.len(), |at, bytes| {
        page[at..at + bytes.len()].copy_from_slice(bytes)
    })?;
    Ok(end)
}

/// Checks `encoded` against a page of `page_len` bytes, calling `changed`
/// with each nzrun's page offset and bytes, and returns where the last
/// run ends. Never indexes out of bounds: every range is checked first.
fn walk(
    encoded: &[u8],
    page_len: usize,
    mut changed: impl FnMut(usize, &[u8]),
) -> Result<usize, Error> {
    let slen = encoded.len();
    let (mut i, mut d) = (0, 0);
    while i < slen {
        // zrun
        let at = i;
        let (zrun, used) = get_length(encoded, at)?;
        if zrun == 0 && at != 0 {
            return Err(Error::ZeroRun { at });
        }
        i += used;
        d += zrun;
        if d > page_len {
            return Err(Error::RunPastEnd {
                at,
                end: d,
                page_len,
            });
        }

        // nzrun
        let at = i;
        let (nzrun, used) = get_length(encoded, at)?;
        if nzrun == 0 {
            return Err(Error::ZeroRun { at });
        }
        i += used;
        if d + nzrun > page_len {
            return Err(Error::RunPastEnd {
                at,
                end: d + nzrun,
                page_len,
            });
        }
        let bytes = encoded.get(i..i + nzrun).ok_or(Error::Truncated { at })?;
        changed(d, bytes);
        d += nzrun;
        i += nzrun;
    }
    Ok(d)
}

/// Reads a run length at `at`. Like QEMU, requires 2 bytes to remain
/// (the shortest run is 2 bytes) and accepts at most 2 length bytes.
fn get_length(encoded: &[u8], at: usize) -> Result<(usize, usize), Error> {
    let (b0, b1) = match encoded.get(at..at + 2) {
        Some(&[b0, b1]) => (b0, b1),
        _ => return Err(Error::Truncated { at }),
    };
    if b0 & 0x80 == 0 {
        Ok((usize::from(b0), 1))
    } else if b1 & 0x80 == 0 {
        Ok((usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2))
    } else {
        Err(Error::BadVarint { at })
    }
}

/// Writes `n` (at most 0x3fff) as ULEB128 at the start of `out`, which the
/// caller guarantees has at least 2 bytes; returns the bytes written.
fn put_length(out: &mut [u8], n: usize) -> usize {
    debug_assert!(n <= MAX_PAGE_LEN);
    if n < 0x80 {
        out[0] = n as u8;
        1
    } else {
        out[0] = (n & 0x7f) as u8 | 0x80;
        out[1] = (n >> 7) as u8;
        2
    }
}

/// Loads 8 bytes as a little-endian word, so byte k is bits 8k..8k+8.
#[inline]
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// Length of the run of equal bytes at the start of `old` and `new`.
fn equal_run(old: &[u8], new: &[u8]) -> usize {
    // Skip 32 equal bytes at a time, then find the difference by word.
    let blocks = old
        .chunks_exact(32)
        .zip(new.chunks_exact(32))
        .take_while(|(o, w)| differ32(o, w) == 0)
        .count()
        * 32;
    let (old, new) = (&old[blocks..], &new[blocks..]);
    let mut n = 0;
    for (o, w) in old.chunks_exact(8).zip(new.chunks_exact(8)) {
        let x = word(o) ^ word(w);
        if x != 0 {
            return blocks + n + (x.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    blocks
        + n
        + old[n..]
            .iter()
            .zip(&new[n..])
            .take_while(|(o, w)| o == w)
            .count()
}

/// Non-zero when the 32-byte blocks `o` and `w` differ.
#[inline]
fn differ32(o: &[u8], w: &[u8]) -> u64 {
    (0..32)
        .step_by(8)
        .fold(0, |acc, k| acc | (word(&o[k..k + 8]) ^ word(&w[k..k + 8])))
}

/// Length of the run of differing bytes at the start of `old` and `new`.
fn changed_run(old: &[u8], new: &[u8]) -> usize {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut n = 0;
    for (o, w) in old.chunks_exact(8).zip(new.chunks_exact(8)) {
        let x = word(o) ^ word(w);
        // Flags the zero bytes of x (equal bytes). Borrows only run towards
        // higher bytes, so the lowest flag is exactly the first zero byte.
        let zero = x.wrapping_sub(LOW) & !x & HIGH;
        if zero != 0 {
            return n + (zero.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n + old[n..]
        .iter()
        .zip(&new[n..])
        .take_while(|(o, w)| o != w)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::workload::XorShift;

    const PAGE: usize = 4096;

    /// Bytewise transcription of the format and of QEMU's overflow checks,
    /// without word skipping: the oracle for [`encode`].
    fn reference(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
        let len = new.len();
        let mut out = Vec::new();
        let mut i = 0;
        let push_len = |out: &mut Vec<u8>, n: usize| {
            if n < 0x80 {
                out.push(n as u8);
            } else {
                out.push((n & 0x7f) as u8 | 0x80);
                out.push((n >> 7) as u8);
            }
        };
        while i < len {
            if out.len() + 2 > dlen {
                return None;
            }
            let start = i;
            while i < len && old[i] == new[i] {
                i += 1;
            }
            if i - start == len {
                return Some(Vec::new());
            }
            if i == len {
                return Some(out);
            }
            push_len(&mut out, i - start);
            if out.len() + 2 > dlen {
                return None;
            }
            let start = i;
            while i < len && old[i] != new[i] {
                i += 1;
            }
            push_len(&mut out, i - start);
            if out.len() + (i - start) > dlen {
                return None;
            }
            out.extend_from_slice(&new[start..i]);
        }
        Some(out)
    }

    fn enc(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; PAGE];
        let n = encode(old, new, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn zero_page() -> Vec<u8> {
        vec![0u8; PAGE]
    }

    #[test]
    fn identical_pages_encode_to_nothing() {
        let page: Vec<u8> = (0..PAGE).map(|i| i as u8).collect();
        assert_eq!(enc(&page, &page), b"");
        assert_eq!(encode(&[], &[], &mut []), Ok(0));
    }

    #[test]
    fn one_changed_byte_at_start() {
        let mut new = zero_page();
        new[0] = 0xAB;
        assert_eq!(enc(&zero_page(), &new), [0x00, 0x01, 0xAB]);
    }

    #[test]
    fn one_changed_byte_at_end() {
        let mut new = zero_page();
        new[4095] = 0xAB;
        // zrun 4095 = 0x0fff -> 0xff 0x1f; nzrun 1; the byte.
        assert_eq!(enc(&zero_page(), &new), [0xFF, 0x1F, 0x01, 0xAB]);
    }

    #[test]
    fn two_hundred_changed_bytes_use_a_two_byte_length() {
        let mut new = zero_page();
        for b in &mut new[10..210] {
            *b = 0x5A;
        }
        let mut want = vec![0x0A, 0xC8, 0x01]; // zrun 10; nzrun 200 = 0xc8 0x01
        want.extend_from_slice(&[0x5A; 200]);
        assert_eq!(enc(&zero_page(), &new), want);
    }

    #[test]
    fn alternating_runs() {
        let old = zero_page();
        let mut new = zero_page();
        new[0] = 1;
        new[1] = 2;
        new[5] = 3;
        for b in &mut new[4000..] {
            *b = 9;
        }
        let mut want = vec![
            0x00, 0x02, 1, 2, // zrun 0, nzrun 2
            0x03, 0x01, 3, // zrun 3 (bytes 2..5), nzrun 1
            0x9A, 0x1F, 0x60, // zrun 3994 = 0x0f9a, nzrun 96
        ];
        want.extend_from_slice(&[9; 96]);
        assert_eq!(enc(&old, &new), want);
    }

    #[test]
    fn single_unchanged_byte_between_changes_is_its_own_run() {
        let old = zero_page();
        let mut new = zero_page();
        new[100] = 1;
        new[102] = 2;
        assert_eq!(enc(&old, &new), [100, 1, 1, 1, 1, 2]);
    }

    #[test]
    fn words_with_some_equal_bytes_split_the_changed_run() {
        // Changed bytes 8..24 except byte 13, which equals the old byte:
        // a word-skipping scan must still stop exactly there.
        let old = zero_page();
        let mut new = zero_page();
        for (k, b) in new[8..24].iter_mut().enumerate() {
            *b = if k == 5 { 0 } else { 0x80 };
        }
        let mut want = vec![8, 5];
        want.extend_from_slice(&[0x80; 5]);
        want.extend_from_slice(&[1, 10]);
        want.extend_from_slice(&[0x80; 10]);
        assert_eq!(enc(&old, &new), want);
    }

    #[test]
    fn whole_page_changed_overflows_one_page() {
        let new = vec![0xEEu8; PAGE];
        let mut out = vec![0u8; PAGE];
        assert_eq!(encode(&zero_page(), &new, &mut out), Err(Error::Overflow));
        // 1 (zrun 0) + 2 (nzrun 4096 = 0x80 0x20) + 4096.
        let mut out = vec![0u8; PAGE + 3];
        assert_eq!(encode(&zero_page(), &new, &mut out), Ok(PAGE + 3));
        assert_eq!(out[..3], [0x00, 0x80, 0x20]);
        let mut out = vec![0u8; PAGE + 2];
        assert_eq!(encode(&zero_page(), &new, &mut out), Err(Error::Overflow));
    }

    #[test]
    fn overflow_at_exact_boundaries() {
        let old = zero_page();
        // Change at the end: 4 bytes, nothing follows: fits exactly 4.
        let mut new = zero_page();
        new[4095] = 1;
        assert_eq!(encode(&old, &new, &mut [0; 4]), Ok(4));
        assert_eq!(encode(&old, &new, &mut [0; 3]), Err(Error::Overflow));
        // Change at the start: 3 bytes, but unchanged bytes follow and QEMU
        // wants 2 bytes of room before looking at them: needs 5.
        let mut new = zero_page();
        new[0] = 1;
        assert_eq!(encode(&old, &new, &mut [0; 5]), Ok(3));
        assert_eq!(encode(&old, &new, &mut [0; 4]), Err(Error::Overflow));
        assert_eq!(encode(&old, &new, &mut [0; 3]), Err(Error::Overflow));
        // Unchanged page: QEMU's first room check comes before the scan.
        assert_eq!(encode(&old, &old, &mut [0; 2]), Ok(0));
        assert_eq!(encode(&old, &old, &mut [0; 1]), Err(Error::Overflow));
        // nzrun bytes one short of fitting.
        let mut new = zero_page();
        for b in &mut new[4090..] {
            *b = 7;
        }
        // zrun 4090 (2) + nzrun 6 (1) + 6 bytes = 9.
        assert_eq!(encode(&old, &new, &mut [0; 9]), Ok(9));
        assert_eq!(encode(&old, &new, &mut [0; 8]), Err(Error::Overflow));
    }

    #[test]
    fn length_checks() {
        assert_eq!(
            encode(&[0; 8], &[0; 16], &mut [0; 64]),
            Err(Error::LengthMismatch { old: 8, new: 16 })
        );
        let big = vec![0u8; MAX_PAGE_LEN + 1];
        assert_eq!(
            encode(&big, &big, &mut [0; 64]),
            Err(Error::PageTooLarge {
                len: MAX_PAGE_LEN + 1
            })
        );
        let max = vec![0u8; MAX_PAGE_LEN];
        let mut new = max.clone();
        new[MAX_PAGE_LEN - 1] = 1;
        let mut out = [0u8; 8];
        assert_eq!(encode(&max, &new, &mut out), Ok(4));
        assert_eq!(out[..4], [0xFE, 0x7F, 0x01, 0x01]);
    }

    /// Random page pairs with changes of varied density and run lengths.
    fn random_pair(rng: &mut XorShift, len: usize) -> (Vec<u8>, Vec<u8>) {
        let old: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        let mut new = old.clone();
        let style = rng.below(5);
        let mut i = 0;
        while i < len {
            let run = match style {
                0 => 1 + rng.below(4),
                1 => 1 + rng.below(40),
                2 => 1 + rng.below(300),
                3 => 1 + rng.below(9),
                _ => 1 + rng.below(len),
            };
            let change = rng.below(100) < [50, 30, 50, 70, 20][style];
            for b in new[i..(i + run).min(len)].iter_mut() {
                if change {
                    // Mostly a real change; sometimes an equal byte.
                    *b = if rng.below(16) == 0 {
                        *b
                    } else {
                        *b ^ (1 + rng.byte() % 255)
                    };
                }
            }
            i += run;
        }
        (old, new)
    }

    #[test]
    fn matches_bytewise_reference_including_overflow() {
        let mut rng = XorShift::new(0x2545_F491_4F6C_DD1D);
        for round in 0..3000 {
            let len = if round % 3 == 0 {
                1 + rng.below(200)
            } else {
                PAGE
            };
            let (old, new) = random_pair(&mut rng, len);
            let dlen = match round % 4 {
                0 => len,
                1 => rng.below(len + 10),
                2 => max_encoded_len(len),
                _ => reference(&old, &new, usize::MAX).map_or(0, |v| v.len()) + rng.below(3),
            };
            let mut out = vec![0u8; dlen];
            let got = encode(&old, &new, &mut out).map(|n| out[..n].to_vec());
            let want = reference(&old, &new, dlen).ok_or(Error::Overflow);
            assert_eq!(got, want, "round {round}, len {len}, dlen {dlen}");
        }
    }

    /// Every encoder: the public one, the word scan, and each block-mask
    /// encoder this CPU can run (portable, AVX2, AVX-512BW).
    type Encoder = Box<dyn Fn(&[u8], &[u8], &mut [u8]) -> Result<usize, Error>>;

    fn encoders() -> Vec<(String, Encoder)> {
        let mut v: Vec<(String, Encoder)> = vec![
            ("encode".into(), Box::new(encode)),
            ("words".into(), Box::new(encode_portable)),
        ];
        for (name, f) in crate::codec::diff::encoders() {
            v.push((format!("diff/{name}"), Box::new(f)));
        }
        v
    }

    #[test]
    fn simd_encoders_match_scalar_on_random_pairs() {
        let mut rng = XorShift::new(0x0DDB_1A5E_5BAD_5EED);
        let encoders = encoders();
        assert!(
            encoders.len() >= 4,
            "the mask encoder runs at least scalar and selected"
        );
        for round in 0..4000 {
            let len = match round % 5 {
                0 => rng.below(200),
                1 => 4096 - rng.below(130),
                2 => 1 + rng.below(MAX_PAGE_LEN),
                _ => PAGE,
            };
            let (old, new) = random_pair(&mut rng, len);
            let dlen = match round % 3 {
                0 => len,
                1 => rng.below(max_encoded_len(len)),
                _ => max_encoded_len(len),
            };
            let mut want = vec![0u8; dlen];
            let want = encode_portable(&old, &new, &mut want).map(|n| want[..n].to_vec());
            for (name, f) in &encoders {
                let mut out = vec![0u8; dlen];
                let got = f(&old, &new, &mut out).map(|n| out[..n].to_vec());
                assert_eq!(got, want, "{name}: round {round}, len {len}, dlen {dlen}");
            }
        }
    }

    #[test]
    fn simd_encoders_match_reference_at_every_dlen() {
        // Sparse, dense, run-boundary-at-64 and all-changed pages; every
        // output length from 0 to past the full encoding; a guard after
        // the output that must stay untouched.
        let mut rng = XorShift::new(0x1234_5678_9ABC_DEF1);
        let mut pages = Vec::new();
        let old: Vec<u8> = (0..PAGE).map(|_| rng.byte()).collect();
        let mut sparse = old.clone();
        for at in [0, 8, 9, 63, 64, 127, 128, 1000, 2048, 4031, 4032, 4095] {
            sparse[at] ^= 0x5a;
        }
        pages.push(sparse);
        let mut long = old.clone();
        for b in &mut long[60..700] {
            *b ^= 0xff;
        }
        pages.push(long);
        pages.push(old.iter().map(|b| !b).collect());
        pages.push(
            random_pair(&mut rng, PAGE)
                .1
                .iter()
                .zip(&old)
                .map(|(_, o)| o ^ 1)
                .collect(),
        );
        for _ in 0..6 {
            let (o, n) = random_pair(&mut rng, PAGE);
            let shifted: Vec<u8> = old
                .iter()
                .zip(o.iter().zip(&n))
                .map(|(b, (x, y))| b ^ x ^ y)
                .collect();
            pages.push(shifted);
        }
        let encoders = encoders();
        for (p, new) in pages.iter().enumerate() {
            let full = reference(&old, new, usize::MAX).unwrap().len();
            for dlen in 0..=(full + 3).min(max_encoded_len(PAGE)) {
                let want = reference(&old, new, dlen).ok_or(Error::Overflow);
                for (name, f) in &encoders {
                    let mut buf = vec![0xA5u8; dlen + 16];
                    let got = f(&old, new, &mut buf[..dlen]).map(|n| buf[..n].to_vec());
                    assert_eq!(got, want, "{name}: page {p}, dlen {dlen}");
                    assert!(
                        buf[dlen..].iter().all(|&b| b == 0xA5),
                        "{name}: wrote past dlen {dlen}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_encoders_runs_across_block_boundaries() {
        // One changed run, then two runs with a gap, at every start in the
        // first 130 bytes and near the page end, for lengths that cross the
        // 32-byte (AVX2 half) and 64-byte (mask word) boundaries; at the
        // exact output length, one byte less, and with a guard after it.
        let mut rng = XorShift::new(0xB10C_B0DE_0F5E_ED01);
        let old: Vec<u8> = (0..PAGE).map(|_| rng.byte()).collect();
        let encoders = encoders();
        let lens = [1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 200];
        let mut cases = 0;
        for start in (0..130).chain(PAGE - 200..PAGE) {
            for &len in &lens {
                for gap in [0usize, 1, 31, 64] {
                    let mut new = old.clone();
                    let end = (start + len).min(PAGE);
                    for b in &mut new[start..end] {
                        *b ^= 0xA5;
                    }
                    if gap > 0 {
                        // A second run of `len` bytes after `gap` unchanged.
                        for b in new.iter_mut().skip(end + gap).take(len) {
                            *b = !*b;
                        }
                    }
                    let full = reference(&old, &new, usize::MAX).unwrap().len();
                    for dlen in [full, full.saturating_sub(1)] {
                        let want = reference(&old, &new, dlen).ok_or(Error::Overflow);
                        for (name, f) in &encoders {
                            let mut buf = vec![0x5Au8; dlen + 8];
                            let got = f(&old, &new, &mut buf[..dlen]).map(|n| buf[..n].to_vec());
                            assert_eq!(
                                got, want,
                                "{name}: run {start}+{len}, gap {gap}, dlen {dlen}"
                            );
                            assert!(
                                buf[dlen..].iter().all(|&b| b == 0x5A),
                                "{name}: wrote past dlen {dlen}"
                            );
                        }
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 10_000, "{cases}");
    }

    #[test]
    fn simd_encoders_group_boundaries_odd_lengths_and_offsets() {
        // The SIMD encoders step 256 bytes (four lines) at a time, then
        // single lines, then a tail under 64 bytes: runs that start, end or
        // stop just around those boundaries, pages of lengths that leave
        // each kind of remainder, slices at unaligned offsets, with the
        // exact output length, one byte less and a few tiny ones, and a
        // guard after the output.
        let mut rng = XorShift::new(0x6A09_E667_F3BC_C908);
        let encoders = encoders();
        let base: Vec<u8> = (0..MAX_PAGE_LEN + 64).map(|_| rng.byte()).collect();
        let lens = [
            1,
            63,
            64,
            65,
            255,
            256,
            257,
            319,
            320,
            321,
            511,
            512,
            575,
            4095,
            4096,
            4097,
            MAX_PAGE_LEN,
        ];
        let mut cases = 0;
        for &len in &lens {
            for offset in [0, 1, 17, 63] {
                let old = &base[offset..offset + len];
                let mut starts = vec![0, 1, 63, 64, 191, 192, 255, 256, 257, 511, 512];
                starts.extend([len.saturating_sub(65), len.saturating_sub(64)]);
                starts.extend([len.saturating_sub(1), len / 256 * 256]);
                starts.retain(|&s| s < len);
                for &start in &starts {
                    for run in [1, 2, 64, 65, 192, 256, 257, 700] {
                        let mut new = old.to_vec();
                        let end = (start + run).min(len);
                        for b in &mut new[start..end] {
                            *b = !*b;
                        }
                        let full = reference(old, &new, usize::MAX).unwrap().len();
                        for dlen in [full, full.saturating_sub(1), 0, 1, 2, 3] {
                            let want = reference(old, &new, dlen).ok_or(Error::Overflow);
                            for (name, f) in &encoders {
                                let mut buf = vec![0xC3u8; dlen + 8];
                                let got = f(old, &new, &mut buf[..dlen]).map(|n| buf[..n].to_vec());
                                assert_eq!(
                                    got, want,
                                    "{name}: len {len}+{offset}, run {start}+{run}, dlen {dlen}"
                                );
                                assert!(
                                    buf[dlen..].iter().all(|&b| b == 0xC3),
                                    "{name}: wrote past dlen {dlen}"
                                );
                            }
                            cases += 1;
                        }
                    }
                }
                // The unchanged page too, at every tiny output length.
                for dlen in 0..4 {
                    let want = reference(old, old, dlen).ok_or(Error::Overflow);
                    for (name, f) in &encoders {
                        let mut buf = vec![0u8; dlen];
                        assert_eq!(
                            f(old, old, &mut buf),
                            want.clone().map(|v| v.len()),
                            "{name}"
                        );
                    }
                }
            }
        }
        assert!(cases > 5_000, "{cases}");
    }

    #[test]
    fn simd_encoders_every_alignment_of_both_pages() {
        // The SIMD encoders lay their lines on the old page's 64-byte
        // boundaries: a head before the first boundary, groups and lines
        // from there, a tail read with an overlapping load of the last 64
        // bytes. Every offset of `old` within a line, `new` at the same
        // offset and at others, runs that start or end around the head,
        // the first group and line boundaries after it and the tail; the
        // exact output length, one byte less, and a guard after it.
        let mut rng = XorShift::new(0x3C6E_F372_FE94_F82B);
        let encoders = encoders();
        let old_base: Vec<u8> = (0..PAGE + 128).map(|_| rng.byte()).collect();
        let mut new_base = vec![0u8; PAGE + 128];
        let mut cases = 0;
        for o_off in 0..64 {
            for n_off in [o_off, (o_off + 16) % 64, 63 - o_off] {
                for len in [64, 65, 127, 130, 300, 577, PAGE] {
                    let old = &old_base[o_off..o_off + len];
                    let head = (64 - old.as_ptr() as usize % 64) % 64;
                    let body_end = head + (len - head) / 64 * 64;
                    let mut starts = vec![0, head.saturating_sub(1), head, head + 1, head + 63];
                    starts.extend([head + 64, head + 255, head + 256, head + 257]);
                    starts.extend([body_end.saturating_sub(1), body_end, len - 1]);
                    starts.extend([len.saturating_sub(64), len.saturating_sub(65)]);
                    starts.sort_unstable();
                    starts.dedup();
                    starts.retain(|&s| s < len);
                    for &start in &starts {
                        for run in [1, 2, 64, 200] {
                            let new = &mut new_base[n_off..n_off + len];
                            new.copy_from_slice(old);
                            for b in &mut new[start..(start + run).min(len)] {
                                *b ^= 0x81;
                            }
                            let new = &new_base[n_off..n_off + len];
                            let full = reference(old, new, usize::MAX).unwrap().len();
                            for dlen in [full, full.saturating_sub(1)] {
                                let want = reference(old, new, dlen).ok_or(Error::Overflow);
                                for (name, f) in &encoders {
                                    let mut buf = vec![0x96u8; dlen + 8];
                                    let got =
                                        f(old, new, &mut buf[..dlen]).map(|n| buf[..n].to_vec());
                                    assert_eq!(
                                        got, want,
                                        "{name}: old +{o_off}, new +{n_off}, len {len}, \
                                         run {start}+{run}, dlen {dlen}"
                                    );
                                    assert!(
                                        buf[dlen..].iter().all(|&b| b == 0x96),
                                        "{name}: wrote past dlen {dlen}"
                                    );
                                }
                                cases += 1;
                            }
                        }
                    }
                    // The unchanged page at this alignment.
                    let new = &mut new_base[n_off..n_off + len];
                    new.copy_from_slice(old);
                    let new = &new_base[n_off..n_off + len];
                    for (name, f) in &encoders {
                        assert_eq!(f(old, new, &mut [0u8; 2]), Ok(0), "{name}");
                    }
                }
            }
        }
        assert!(cases > 20_000, "{cases}");
    }

    #[test]
    fn simd_encoders_every_single_change_position() {
        let old = vec![0x33u8; PAGE];
        let encoders = encoders();
        for at in 0..PAGE {
            let mut new = old.clone();
            new[at] = 0x34;
            let want = reference(&old, &new, PAGE).ok_or(Error::Overflow);
            for (name, f) in &encoders {
                let mut out = vec![0u8; PAGE];
                let got = f(&old, &new, &mut out).map(|n| out[..n].to_vec());
                assert_eq!(got, want, "{name}: change at {at}");
            }
        }
    }

    #[test]
    fn implementation_is_named() {
        assert!(["avx512bw", "avx2", "scalar"].contains(&implementation()));
    }

    #[test]
    fn round_trip_random_pages() {
        let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let len = if round % 4 == 0 {
                1 + rng.below(300)
            } else {
                PAGE
            };
            let (old, new) = random_pair(&mut rng, len);
            let mut out = vec![0u8; max_encoded_len(len)];
            let n = encode(&old, &new, &mut out).expect("max_encoded_len is enough");
            let mut page = old.clone();
            let end = decode(&out[..n], &mut page).unwrap();
            assert_eq!(page, new, "round {round}");
            let last_change = (0..len).rev().find(|&i| old[i] != new[i]);
            assert_eq!(end, last_change.map_or(0, |i| i + 1), "round {round}");
            // With one page of room the result is a delta or an overflow.
            let mut out = vec![0u8; len];
            match encode(&old, &new, &mut out) {
                Ok(m) => assert_eq!(out[..m], *reference(&old, &new, usize::MAX).unwrap()),
                Err(e) => assert_eq!(e, Error::Overflow),
            }
        }
    }

    #[test]
    fn worst_case_fits_max_encoded_len() {
        for len in [1, 2, 3, 7, 8, 255, 256, 4095, 4096, MAX_PAGE_LEN] {
            let old = vec![0u8; len];
            for first_changed in [0, 1] {
                let new: Vec<u8> = (0..len).map(|i| u8::from(i % 2 == first_changed)).collect();
                let mut out = vec![0u8; max_encoded_len(len)];
                assert!(encode(&old, &new, &mut out).is_ok(), "len {len}");
            }
        }
    }

    #[test]
    fn decode_hand_vectors() {
        let mut page = zero_page();
        assert_eq!(decode(&[], &mut page), Ok(0));
        assert_eq!(decode(&[0x00, 0x01, 0xAB], &mut page), Ok(1));
        assert_eq!(page[0], 0xAB);
        assert_eq!(decode(&[0xFF, 0x1F, 0x01, 0xCD], &mut page), Ok(4096));
        assert_eq!(page[4095], 0xCD);
        // Non-minimal 2-byte lengths are accepted, as QEMU does.
        assert_eq!(decode(&[0x82, 0x00, 0x81, 0x00, 0xEF], &mut page), Ok(3));
        assert_eq!(page[2], 0xEF);
        // Runs after the first are applied at the right offsets.
        assert_eq!(decode(&[0x00, 0x02, 1, 2, 0x01, 0x01, 3], &mut page), Ok(4));
        assert_eq!(page[..4], [1, 2, 0xEF, 3]);
    }

    #[test]
    fn decode_rejects_hostile_input() {
        let cases: &[(&[u8], Error)] = &[
            (&[0x00], Error::Truncated { at: 0 }),
            (&[0x05], Error::Truncated { at: 0 }),
            (&[0x00, 0x01], Error::Truncated { at: 1 }),
            (&[0x00, 0x05, 1, 2, 3], Error::Truncated { at: 1 }),
            (&[0x00, 0x81, 0x01, 1], Error::Truncated { at: 1 }),
            (&[0x00, 0x01, 0xAA, 0x05], Error::Truncated { at: 3 }),
            (&[0x00, 0x01, 0xAA, 0x05, 0x01], Error::Truncated { at: 4 }),
            (&[0x80, 0x80, 0x01, 0x01], Error::BadVarint { at: 0 }),
            (&[0x00, 0xFF, 0xFF, 0x01], Error::BadVarint { at: 1 }),
            (&[0x00, 0x00, 0x01], Error::ZeroRun { at: 1 }),
            (&[0x00, 0x80, 0x00, 0x01], Error::ZeroRun { at: 1 }),
            (
                &[0x00, 0x01, 0xAA, 0x00, 0x01, 0xBB],
                Error::ZeroRun { at: 3 },
            ),
            (
                &[0x00, 0x01, 0xAA, 0x80, 0x00, 0x01, 0xBB],
                Error::ZeroRun { at: 3 },
            ),
            (
                &[0xFF, 0x7F, 0x01, 0x01],
                Error::RunPastEnd {
                    at: 0,
                    end: 0x3fff,
                    page_len: PAGE,
                },
            ),
            (
                // zrun to exactly the end is allowed; the nzrun then is not.
                &[0x80, 0x20, 0x01, 0x01],
                Error::RunPastEnd {
                    at: 2,
                    end: PAGE + 1,
                    page_len: PAGE,
                },
            ),
            (
                &[0xFF, 0x1F, 0x02, 1, 2],
                Error::RunPastEnd {
                    at: 2,
                    end: PAGE + 1,
                    page_len: PAGE,
                },
            ),
        ];
        for (input, want) in cases {
            let mut page = vec![0x11u8; PAGE];
            assert_eq!(decode(input, &mut page), Err(*want), "input {input:02x?}");
            assert!(
                page.iter().all(|&b| b == 0x11),
                "page touched by {input:02x?}"
            );
        }
    }

    #[test]
    fn decode_error_leaves_page_untouched_after_valid_runs() {
        let mut page = vec![0u8; PAGE];
        let input = [0x00, 0x01, 0xAA, 0x00, 0x01, 0xBB];
        assert!(decode(&input, &mut page).is_err());
        assert!(page.iter().all(|&b| b == 0));
    }

    #[test]
    fn decode_random_garbage_never_panics() {
        let mut rng = XorShift::new(0xD1B5_4A32_D192_ED03);
        let mut page = vec![0u8; PAGE];
        for round in 0..20_000 {
            let len = rng.below(64) + if round % 10 == 0 { 4000 } else { 0 };
            let mut input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            // Bias some inputs towards plausible lengths.
            if round % 2 == 0 {
                for b in input.iter_mut().step_by(3) {
                    *b &= 0x0f;
                }
            }
            let page_len = [PAGE, 0, 1, 17][round % 4];
            if let Ok(end) = decode(&input, &mut page[..page_len]) {
                assert!(end <= page_len);
            }
        }
    }

    #[test]
    fn error_messages_say_where() {
        let e = decode(&[0x00, 0x00, 0x01], &mut [0; 16]).unwrap_err();
        assert!(e.to_string().contains("byte 1"), "{e}");
    }
}
