//! The source's background push after the switch: how much one batch
//! holds between two looks at the page requests.
//!
//! A requested page waits behind at most the batch being written when it
//! came (the source serves requests between batches), so a batch is
//! bounded in stream bytes: [`PUSH_BATCH_BYTES`], sixteen raw pages. Zero
//! pages are a record header each: bounded only in bytes, a batch of them
//! would hold thousands of pages, so [`PUSH_BATCH_PAGES`] bounds it too
//! (the time to find and read them). Before, a batch was sixteen pages of
//! any kind: a guest whose memory is mostly zeros paid a flush, a look at
//! the requests and (on the destination) a placement per sixteen tiny
//! records.
//!
//! With page channels, the source's main thread fills a batch for a
//! channel to encode, so it cannot count the bytes written: it looks at
//! each page first and counts it at the most its record may take
//! ([`PushBatch::queued`]): a page found zero (or never written) as a
//! zero record, which the channel then writes without reading the page
//! again, any other page as a raw page. Before, a channel batch was
//! sixteen pages of any kind: the 1 GiB incrementer's ~240k zero pages
//! cost a channel job, a flush, a section and a placement on the
//! destination per sixteen pages (postcopy took ~3x as long as on one
//! stream).
//!

use crate::memory::PAGE_SIZE;

/// Most stream bytes one background batch holds.
pub const PUSH_BATCH_BYTES: u64 = 64 << 10;
/// Most pages one background batch holds.
pub const PUSH_BATCH_PAGES: u64 = 512;

/// Most stream bytes a zero page record takes (tag, block, offset).
pub const ZERO_RECORD_MAX: u64 = 11;
/// Most stream bytes a raw page record takes.
pub const PAGE_RECORD_MAX: u64 = PAGE_SIZE as u64 + ZERO_RECORD_MAX;

/// One background batch being written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushBatch {
    pages: u64,
    bytes: u64,
}

impl PushBatch {
    /// One more page written; `bytes` is what the batch holds now.
    pub fn sent(&mut self, bytes: u64) {
        self.pages += 1;
        self.bytes = bytes;
    }

    /// One more page handed to a page channel, which encodes it later:
    /// counted at the most its record may take (`known_zero`: a page
    /// that goes as a zero record without being read).
    pub fn queued(&mut self, known_zero: bool) {
        let more = if known_zero {
            ZERO_RECORD_MAX
        } else {
            PAGE_RECORD_MAX
        };
        self.sent(self.bytes + more);
    }

    /// The batch holds its share: end it (section end, flush).
    pub fn full(&self) -> bool {
        self.pages >= PUSH_BATCH_PAGES || self.bytes >= PUSH_BATCH_BYTES
    }

    /// Pages written into the batch.
    #[cfg(test)]
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stream bytes of a raw page record and of a zero page record (an
    /// upper bound on the header, a lower one on the zero record).
    const RAW: u64 = PAGE_SIZE as u64 + 16;
    const ZERO: u64 = 12;

    fn fill(per_page: impl Fn(u64) -> u64) -> PushBatch {
        let mut b = PushBatch::default();
        let mut bytes = 0;
        while !b.full() {
            bytes += per_page(b.pages());
            b.sent(bytes);
        }
        b
    }

    #[test]
    fn raw_pages_fill_a_batch_at_sixteen() {
        assert_eq!(fill(|_| RAW).pages(), 16);
    }

    #[test]
    fn zero_pages_fill_a_batch_at_the_page_bound() {
        let b = fill(|_| ZERO);
        assert_eq!(b.pages(), PUSH_BATCH_PAGES);
        assert!(b.bytes < PUSH_BATCH_BYTES);
    }

    #[test]
    fn a_mix_stops_at_the_byte_bound() {
        // One raw page in four: 16 raw pages' bytes come after ~64 pages.
        let b = fill(|k| if k % 4 == 0 { RAW } else { ZERO });
        assert!((60..=64).contains(&b.pages()), "{b:?}");
        assert!(b.bytes >= PUSH_BATCH_BYTES);
    }

    #[test]
    fn queued_pages_count_at_their_largest_record() {
        let mut b = PushBatch::default();
        while !b.full() {
            b.queued(false);
        }
        assert_eq!(b.pages(), 16, "data pages: sixteen, as raw pages written");
        let mut b = PushBatch::default();
        while !b.full() {
            b.queued(true);
        }
        assert_eq!(b.pages(), PUSH_BATCH_PAGES, "known zeros: the page bound");
    }

    #[test]
    fn an_empty_batch_is_not_full() {
        assert!(!PushBatch::default().full());
    }
}
