//! Writes the migration stream, buffering records and checksumming sections.

use std::io::{self, Write};

use super::crc;
use super::format::*;
use crate::memory::PAGE_SIZE;

/// Flush the buffer to the transport once it holds this much.
const FLUSH_AT: usize = 512 << 10;

/// A block as the block list describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDesc {
    /// Block id.
    pub id: String,
    /// Length in bytes.
    pub len: u64,
}

/// How a staged page is finally sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoded {
    /// XBZRLE delta.
    Xbzrle,
    /// Compressed with the given algorithm id.
    Compressed(u8),
}

/// Buffered writer of stream records over any `Write`.
///
/// Page data is staged straight into the output buffer
/// ([`StreamWriter::stage_page`]) so a raw page is copied once, from guest
/// memory into the buffer, and can still be turned into a smaller record.
///
/// With [`FLAG_RUNS`] in the header, raw pages at consecutive offsets of
/// one block committed one after the other share one RUN record (up to
/// [`MAX_RUN_PAGES`], and never across a flush of the buffer), which the
/// destination reads straight into guest memory.
pub struct StreamWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    /// CRC of the section's bytes handed to the transport so far.
    crc: u32,
    /// Raw pages in `buf` whose CRC was taken while they were copied in:
    /// (start of the page's bytes, their CRC), in buffer order. The
    /// section CRC folds these in instead of reading the bytes again.
    page_crcs: Vec<(usize, u32)>,
    written: u64,
    last_block: Option<u16>,
    staged: Option<Staged>,
    /// The header's flags (ZERO_RUN records need [`FLAG_ZERO_RUNS`]).
    flags: u16,
    /// Raw pages go out as RUN records (header flag [`FLAG_RUNS`], until
    /// the postcopy switch).
    runs: bool,
    /// The RUN record at the end of the buffer, while it may grow.
    run: Option<OpenRun>,
}

#[derive(Clone, Copy)]
struct Staged {
    start: usize,
    block: u16,
    offset: u64,
    data: usize,
    /// The page extends the open run (no record header of its own).
    extends: bool,
    /// The CRC of the page's bytes, when taken while copying them in.
    crc: Option<u32>,
}

/// A RUN record being written: where its count is, what page comes next.
#[derive(Clone, Copy)]
struct OpenRun {
    count_at: usize,
    block: u16,
    next: u64,
    count: u16,
}

impl<W: Write> StreamWriter<W> {
    /// Starts a stream: writes the header into the buffer.
    pub fn new(out: W, flags: u16) -> Self {
        let mut w = StreamWriter {
            out,
            buf: Vec::with_capacity(FLUSH_AT + 2 * PAGE_SIZE + 64),
            crc: 0,
            page_crcs: Vec::with_capacity(FLUSH_AT / PAGE_SIZE + 2),
            written: 0,
            last_block: None,
            staged: None,
            flags,
            runs: flags & FLAG_RUNS != 0,
            run: None,
        };
        w.buf.extend_from_slice(&MAGIC);
        w.buf.extend_from_slice(&VERSION.to_be_bytes());
        w.buf.extend_from_slice(&flags.to_be_bytes());
        w.buf.extend_from_slice(&0u32.to_be_bytes());
        w
    }

    /// Goes on with a stream whose earlier records some other writer
    /// already handed to `out` whole (no header is written): for the
    /// source's ABORT record after its stream writer is gone.
    pub fn continuing(out: W) -> Self {
        StreamWriter {
            out,
            buf: Vec::new(),
            crc: 0,
            page_crcs: Vec::new(),
            written: 0,
            last_block: None,
            staged: None,
            flags: 0,
            runs: false,
            run: None,
        }
    }

    /// Bytes handed to the transport plus bytes still buffered.
    pub fn bytes(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// The transport, e.g. to read an acknowledgement on a return path.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    fn addr(&mut self, kind: Kind, block: u16, offset: u64) {
        self.run = None;
        if self.last_block == Some(block) {
            self.buf.push(kind as u8 | SAME_BLOCK);
        } else {
            self.buf.push(kind as u8);
            self.buf.extend_from_slice(&block.to_be_bytes());
            self.last_block = Some(block);
        }
        self.buf.extend_from_slice(&offset.to_be_bytes());
    }

    /// Folds the whole buffer into the section CRC: the bytes between
    /// pages read here, each page copied in with its CRC combined from it.
    fn fold_crc(&mut self) {
        let combine = crc::page_combine();
        let mut at = 0;
        for &(start, page_crc) in &self.page_crcs {
            self.crc = combine.combine(crc::update(self.crc, &self.buf[at..start]), page_crc);
            at = start + PAGE_SIZE;
        }
        self.crc = crc::update(self.crc, &self.buf[at..]);
        self.page_crcs.clear();
    }

    fn maybe_flush(&mut self) -> io::Result<()> {
        if self.buf.len() >= FLUSH_AT {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        debug_assert!(self.staged.is_none(), "flush with a staged page");
        self.run = None;
        self.fold_crc();
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes the block list.
    pub fn block_list(&mut self, blocks: &[BlockDesc]) -> io::Result<()> {
        self.buf.push(Kind::BlockList as u8);
        self.buf
            .extend_from_slice(&(blocks.len() as u32).to_be_bytes());
        let total: u64 = blocks.iter().map(|b| b.len).sum();
        self.buf.extend_from_slice(&total.to_be_bytes());
        for b in blocks {
            let id = b.id.as_bytes();
            assert!(!id.is_empty() && id.len() <= 255, "block id length");
            self.buf.push(id.len() as u8);
            self.buf.extend_from_slice(id);
            self.buf.extend_from_slice(&b.len.to_be_bytes());
        }
        self.maybe_flush()
    }

    /// Writes a zero-page record.
    pub fn zero(&mut self, block: u16, offset: u64) -> io::Result<()> {
        self.addr(Kind::Zero, block, offset);
        self.maybe_flush()
    }

    /// Says that `count` pages from `offset` of block `block` are zero:
    /// ZERO_RUN records of at most [`MAX_ZERO_RUN_PAGES`] each when the
    /// header declares [`FLAG_ZERO_RUNS`] (one ZERO record for a single
    /// page), otherwise one ZERO record per page.
    pub fn zero_run(&mut self, block: u16, offset: u64, count: u64) -> io::Result<()> {
        let ps = PAGE_SIZE as u64;
        if self.flags & FLAG_ZERO_RUNS == 0 {
            for p in 0..count {
                self.zero(block, offset + p * ps)?;
            }
            return Ok(());
        }
        let mut at = offset;
        let mut left = count;
        while left > 0 {
            let n = left.min(u64::from(MAX_ZERO_RUN_PAGES));
            if n == 1 {
                self.addr(Kind::Zero, block, at);
            } else {
                self.addr(Kind::ZeroRun, block, at);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
            self.maybe_flush()?;
            at += n * ps;
            left -= n;
        }
        Ok(())
    }

    /// Reserves a raw-page record and returns the page's bytes to fill.
    /// Follow with exactly one `commit_*` call.
    pub fn stage_page(&mut self, block: u16, offset: u64) -> &mut [u8] {
        self.stage_page_with(block, offset, |buf| buf.resize(buf.len() + PAGE_SIZE, 0));
        let data = self.staged.expect("just staged").data;
        &mut self.buf[data..]
    }

    /// Reserves a raw-page record whose bytes `fill` appends to the output
    /// buffer (exactly one page), e.g. straight from guest memory without
    /// zeroing the space first. Follow with exactly one `commit_*` call.
    pub fn stage_page_with(&mut self, block: u16, offset: u64, fill: impl FnOnce(&mut Vec<u8>)) {
        self.stage(block, offset, |buf| {
            fill(buf);
            None
        })
    }

    /// As [`StreamWriter::stage_page_with`], `fill` also returning the
    /// CRC-32 of the page bytes it appended, taken from the same loads
    /// (e.g. [`crc::append_crc`] from guest memory): the section checksum
    /// then uses it instead of reading the page again, and still covers
    /// exactly the bytes sent while a guest writes on.
    pub fn stage_page_crc(
        &mut self,
        block: u16,
        offset: u64,
        fill: impl FnOnce(&mut Vec<u8>) -> u32,
    ) {
        self.stage(block, offset, |buf| Some(fill(buf)))
    }

    fn stage(&mut self, block: u16, offset: u64, fill: impl FnOnce(&mut Vec<u8>) -> Option<u32>) {
        assert!(self.staged.is_none(), "a page is already staged");
        let start = self.buf.len();
        let extends = self.runs
            && self.run.is_some_and(|r| {
                r.block == block
                    && r.next == offset
                    && r.count < MAX_RUN_PAGES
                    && r.count_at + 2 + usize::from(r.count) * PAGE_SIZE == start
            });
        if !extends {
            let prev = self.last_block;
            if self.runs {
                self.addr(Kind::Run, block, offset);
                self.buf.extend_from_slice(&1u16.to_be_bytes());
            } else {
                self.addr(Kind::Raw, block, offset);
            }
            self.last_block = prev;
        }
        let data = self.buf.len();
        let crc = fill(&mut self.buf);
        assert_eq!(
            self.buf.len(),
            data + PAGE_SIZE,
            "staged page must be one page"
        );
        self.staged = Some(Staged {
            start,
            block,
            offset,
            data,
            extends,
            crc,
        });
    }

    /// The staged page's bytes.
    pub fn staged(&self) -> &[u8] {
        let s = self.staged.expect("no staged page");
        &self.buf[s.data..s.data + PAGE_SIZE]
    }

    /// Sends the staged page raw.
    pub fn commit_raw(&mut self) -> io::Result<()> {
        let s = self.staged.take().expect("no staged page");
        self.last_block = Some(s.block);
        if let Some(c) = s.crc {
            self.page_crcs.push((s.data, c));
        }
        if s.extends {
            let r = self.run.as_mut().expect("an extended run is open");
            r.count += 1;
            r.next += PAGE_SIZE as u64;
            self.buf[r.count_at..r.count_at + 2].copy_from_slice(&r.count.to_be_bytes());
        } else if self.runs {
            self.run = Some(OpenRun {
                count_at: s.data - 2,
                block: s.block,
                next: s.offset + PAGE_SIZE as u64,
                count: 1,
            });
        }
        self.maybe_flush()
    }

    /// Drops the staged page without sending anything.
    pub fn discard_staged(&mut self) {
        let s = self.staged.take().expect("no staged page");
        self.buf.truncate(s.start);
    }

    /// Replaces the staged page with a zero-page record.
    pub fn commit_zero(&mut self) -> io::Result<()> {
        let s = self.staged.take().expect("no staged page");
        self.buf.truncate(s.start);
        self.zero(s.block, s.offset)
    }

    /// Replaces the staged page with an encoded record carrying `payload`.
    pub fn commit_encoded(&mut self, how: Encoded, payload: &[u8]) -> io::Result<()> {
        let s = self.staged.take().expect("no staged page");
        self.buf.truncate(s.start);
        self.encoded(how, s.block, s.offset, payload)
    }

    /// Writes an encoded page record. `payload` must be 1..=4096 bytes
    /// (compressed: fewer than 4096).
    pub fn encoded(
        &mut self,
        how: Encoded,
        block: u16,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        assert!(!payload.is_empty() && payload.len() <= PAGE_SIZE);
        match how {
            Encoded::Xbzrle => self.addr(Kind::Xbzrle, block, offset),
            Encoded::Compressed(algo) => {
                assert!(payload.len() < PAGE_SIZE);
                self.addr(Kind::Compressed, block, offset);
                self.buf.push(algo);
            }
        }
        self.buf
            .extend_from_slice(&(payload.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(payload);
        self.maybe_flush()
    }

    /// Writes a raw page record from `page` (4096 bytes).
    pub fn raw(&mut self, block: u16, offset: u64, page: &[u8]) -> io::Result<()> {
        assert_eq!(page.len(), PAGE_SIZE, "a raw page is one page");
        self.stage_page_crc(block, offset, |buf| crc::append_crc(page, buf));
        self.commit_raw()
    }

    /// Ends a section: checksum of everything since the previous one, then
    /// hands all buffered bytes to the transport and flushes it.
    pub fn section_end(&mut self, seq: u64) -> io::Result<()> {
        self.buf.push(Kind::SectionEnd as u8);
        self.buf.extend_from_slice(&seq.to_be_bytes());
        self.close_checksummed()
    }

    /// Appends the CRC of everything since the last checksum (not the CRC
    /// itself), starts a new one, and hands all bytes to the transport.
    fn close_checksummed(&mut self) -> io::Result<()> {
        self.run = None;
        self.fold_crc();
        let crc = std::mem::take(&mut self.crc);
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        self.out.flush()
    }

    /// Writes the device-state blob.
    pub fn state(&mut self, blob: &[u8]) -> io::Result<()> {
        if blob.len() > MAX_STATE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("device state of {} bytes exceeds {MAX_STATE}", blob.len()),
            ));
        }
        self.buf.push(Kind::State as u8);
        self.buf
            .extend_from_slice(&(blob.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(blob);
        self.maybe_flush()
    }

    /// Writes the memory digest.
    pub fn digest(&mut self, hash: &[u8; 32]) -> io::Result<()> {
        self.buf.push(Kind::Digest as u8);
        self.buf.push(DIGEST_BLAKE3);
        self.buf.extend_from_slice(hash);
        self.maybe_flush()
    }

    /// Writes the channel record (first record of a channel stream, whose
    /// header carries [`FLAG_CHANNELS`]).
    pub fn channel(&mut self, index: u16, channels: u16, session: u64) -> io::Result<()> {
        self.buf.push(Kind::Channel as u8);
        self.buf.extend_from_slice(&index.to_be_bytes());
        self.buf.extend_from_slice(&channels.to_be_bytes());
        self.buf.extend_from_slice(&session.to_be_bytes());
        self.maybe_flush()
    }

    /// Writes a sync barrier: every page record after it belongs to epoch
    /// `epoch + 1` or later.
    pub fn sync(&mut self, epoch: u64) -> io::Result<()> {
        self.buf.push(Kind::Sync as u8);
        self.buf.extend_from_slice(&epoch.to_be_bytes());
        self.maybe_flush()
    }

    /// Writes one DISCARD record: `words` (1..=[`MAX_DISCARD_WORDS`]) of
    /// block `block`'s not-valid bitmap, starting at word `first_word`.
    pub fn discard(&mut self, block: u16, first_word: u32, words: &[u64]) -> io::Result<()> {
        if words.is_empty() || words.len() > usize::from(MAX_DISCARD_WORDS) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "discard of {} words outside 1..={MAX_DISCARD_WORDS}",
                    words.len()
                ),
            ));
        }
        self.buf.push(Kind::Discard as u8);
        self.buf.extend_from_slice(&block.to_be_bytes());
        self.buf.extend_from_slice(&first_word.to_be_bytes());
        self.buf
            .extend_from_slice(&(words.len() as u16).to_be_bytes());
        for w in words {
            self.buf.extend_from_slice(&w.to_be_bytes());
        }
        self.maybe_flush()
    }

    /// Writes the postcopy switch record (end the section after it, so the
    /// destination checks everything it acts on at the switch).
    pub fn postcopy(&mut self) -> io::Result<()> {
        // After the switch every page is placed whole: no more runs.
        self.runs = false;
        self.run = None;
        self.buf.push(Kind::Postcopy as u8);
        self.maybe_flush()
    }

    /// Writes the end record and flushes everything.
    pub fn end(&mut self) -> io::Result<()> {
        self.buf.push(Kind::End as u8);
        self.close_checksummed()
    }

    /// Writes a DRAIN record with `mark` (1, 2, 3... in order): the
    /// destination answers APPLIED with it on the return path once the
    /// section holding it checked out and everything before it is applied
    /// (header flag [`FLAG_SETUP`] only; end the section after it).
    pub fn drain(&mut self, mark: u64) -> io::Result<()> {
        self.buf.push(Kind::Drain as u8);
        self.buf.extend_from_slice(&mark.to_be_bytes());
        self.maybe_flush()
    }

    /// Writes the SETUP record: the VM's vCPU count (0: not said) and the
    /// feature bits the migration needs (see [`FLAG_SETUP`]); with header
    /// flag [`FLAG_GUEST_LOAD`], a load the VMM did not say.
    pub fn setup(&mut self, vcpus: u32, features: u32) -> io::Result<()> {
        self.setup_with_load(vcpus, features, None)
    }

    /// As [`StreamWriter::setup`], with the source guest's vCPU load in
    /// hundredths of a vCPU (`None`: not known), written when the header
    /// declares [`FLAG_GUEST_LOAD`] (and dropped otherwise: a reader
    /// without the flag expects no such field).
    pub fn setup_with_load(
        &mut self,
        vcpus: u32,
        features: u32,
        load: Option<u32>,
    ) -> io::Result<()> {
        self.buf.push(Kind::Setup as u8);
        self.buf.extend_from_slice(&vcpus.to_be_bytes());
        self.buf.extend_from_slice(&features.to_be_bytes());
        if self.flags & FLAG_GUEST_LOAD != 0 {
            // LOAD_UNKNOWN itself is never a load (it says "not known").
            let load = load.map_or(LOAD_UNKNOWN, |l| l.min(LOAD_UNKNOWN - 1));
            self.buf.extend_from_slice(&load.to_be_bytes());
        }
        self.maybe_flush()
    }

    /// Ends the stream with an ABORT record carrying `reason` (cut to
    /// [`MAX_ABORT_TEXT`] bytes at a character boundary; an empty reason
    /// is sent as "no reason given") and hands everything to the
    /// transport. A page staged but not committed is dropped first.
    pub fn abort(&mut self, reason: &str) -> io::Result<()> {
        if let Some(st) = self.staged.take() {
            self.buf.truncate(st.start);
        }
        let reason = if reason.is_empty() {
            "no reason given"
        } else {
            reason
        };
        let mut end = reason.len().min(usize::from(MAX_ABORT_TEXT));
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let text = &reason.as_bytes()[..end];
        self.buf.push(Kind::Abort as u8);
        self.buf
            .extend_from_slice(&(text.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(text);
        self.flush()
    }

    /// Hands buffered bytes to the transport and flushes it.
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()?;
        self.out.flush()
    }
}
