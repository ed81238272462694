//! The per-page encoder: one page in, one record out.
//!
//! Every stream that carries pages (the main stream and each page channel)
//! owns one [`PageEncoder`]; it is the only place that chooses how a page
//! goes on the wire:
//!
//! 1. a page of zeros becomes a zero record;
//! 2. after the bulk stage, with XBZRLE on, a page the [`PageCache`] holds
//!    becomes a delta against that copy (or nothing, when it did not
//!    change), while [`XbzrleGate`] says the deltas pay on this link;
//! 3. otherwise it is compressed, while [`CompressChooser`] says that pays;
//! 4. otherwise it goes raw.
//!
//! The page is copied once, from guest memory into the writer's staging
//! buffer; the encodings read it there. The encoder counts what it sent.

use std::io::{self, Write};
use std::time::Instant;

use super::adapt::{CompressChooser, XbzrleGate};
use super::compress::{Algorithm, Compressor};
use super::page_cache::PageCache;
use super::{xbzrle, zero};
use crate::memory::{RawRegion, PAGE_SIZE};
use crate::stream::{crc, Encoded, StreamWriter};

/// A page of zeros, what the cache holds for a page sent as zero.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What an encoder has sent, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct EncodeCounters {
    /// Zero pages.
    pub zero: u64,
    /// Of those, pages known to be zero without reading them (never
    /// written: see `sys/residency.rs`).
    pub untouched: u64,
    /// Pages not sent: unchanged since the copy the destination holds.
    pub skipped: u64,
    /// Pages sent raw.
    pub normal: u64,
    /// Pages sent as XBZRLE deltas.
    pub xbzrle_pages: u64,
    /// Bytes of those deltas.
    pub xbzrle_bytes: u64,
    /// Cache lookups that found no copy.
    pub xbzrle_miss: u64,
    /// Deltas larger than a page (the page went otherwise).
    pub xbzrle_overflow: u64,
    /// Cache lookups.
    pub xbzrle_lookups: u64,
    /// Re-sent pages that did not try XBZRLE because it did not pay.
    pub xbzrle_skipped: u64,
    /// Pages sent compressed.
    pub compressed_pages: u64,
    /// Bytes of those pages.
    pub compressed_bytes: u64,
    /// Pages not compressed because compressing did not pay.
    pub compress_skipped: u64,
}

impl EncodeCounters {
    /// Adds `o`'s counts to these.
    pub fn add(&mut self, o: &EncodeCounters) {
        self.zero += o.zero;
        self.untouched += o.untouched;
        self.skipped += o.skipped;
        self.normal += o.normal;
        self.xbzrle_pages += o.xbzrle_pages;
        self.xbzrle_bytes += o.xbzrle_bytes;
        self.xbzrle_miss += o.xbzrle_miss;
        self.xbzrle_overflow += o.xbzrle_overflow;
        self.xbzrle_lookups += o.xbzrle_lookups;
        self.xbzrle_skipped += o.xbzrle_skipped;
        self.compressed_pages += o.compressed_pages;
        self.compressed_bytes += o.compressed_bytes;
        self.compress_skipped += o.compress_skipped;
    }
}

/// One page to encode: where it is in guest memory and in the stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Page<'a> {
    /// The RAM block's memory.
    pub region: &'a RawRegion,
    /// The block's index in the stream's block list.
    pub block: u16,
    /// Byte offset of the page in the block.
    pub offset: u64,
}

/// Whether (and how) a page may be sent as an XBZRLE delta: only pages
/// sent again after the bulk stage.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Delta {
    /// The page's key in the cache (its address across all blocks).
    pub addr: u64,
    /// The dirty sync the page was found in (the cache's generation).
    pub generation: u64,
    /// The last pass (stop-and-copy): a miss is not cached, no page will
    /// be sent again.
    pub last_pass: bool,
}

struct Compression {
    algorithm: Algorithm,
    compressor: Compressor,
    buf: Vec<u8>,
}

struct Xbzrle {
    cache: PageCache,
    gate: XbzrleGate,
    buf: Vec<u8>,
}

/// Chooses and applies the encoding of each page of one stream.
pub(crate) struct PageEncoder {
    adaptive: bool,
    /// The compression asked for last (kept when its compressor could not
    /// be made, so that the failure is reported once).
    compress_setting: Option<(Algorithm, i32)>,
    compression: Option<Compression>,
    chooser: CompressChooser,
    /// Pages the choosers of earlier settings skipped.
    compress_skipped_before: u64,
    xbzrle: Option<Xbzrle>,
    /// Gate skips of caches since dropped.
    xbzrle_skipped_before: u64,
    /// The link's cost per byte at the last [`Self::decide`].
    link_ns_per_byte: Option<f64>,
    c: EncodeCounters,
}

impl PageEncoder {
    /// An encoder sending zero and raw pages; `adaptive` makes compression
    /// (once set) pay its way on the link.
    pub fn new(adaptive: bool) -> Self {
        PageEncoder {
            adaptive,
            compress_setting: None,
            compression: None,
            chooser: CompressChooser::new(adaptive),
            compress_skipped_before: 0,
            xbzrle: None,
            xbzrle_skipped_before: 0,
            link_ns_per_byte: None,
            c: EncodeCounters::default(),
        }
    }

    /// Compresses with `algorithm` at `level` from now on, or stops
    /// compressing (`None`); `adaptive`: only while it pays on the link. A
    /// compressor that cannot be made leaves pages raw, with a warning.
    pub fn set_compression(&mut self, setting: Option<(Algorithm, i32)>, adaptive: bool) {
        if adaptive != self.adaptive {
            self.adaptive = adaptive;
            self.compress_skipped_before += self.chooser.skipped();
            self.chooser = CompressChooser::new(adaptive);
        }
        if self.compress_setting == setting {
            return;
        }
        self.compress_setting = setting;
        self.compression = None;
        let Some((algorithm, level)) = setting else {
            return;
        };
        match Compressor::new(algorithm, level) {
            Ok(compressor) => {
                self.compression = Some(Compression {
                    algorithm,
                    compressor,
                    buf: Vec::with_capacity(PAGE_SIZE),
                });
            }
            Err(e) => log::warn!("compressor {algorithm:?}: {e}; sending raw"),
        }
    }

    /// Keeps an XBZRLE cache of `size` bytes from now on (resizing the one
    /// it has), or drops it (`None`): the cache must mirror what the
    /// destination holds, so once off a later "on" starts empty.
    pub fn set_xbzrle(&mut self, size: Option<u64>) {
        match (&mut self.xbzrle, size) {
            (None, Some(size)) => match PageCache::new(size) {
                Ok(cache) => {
                    self.xbzrle = Some(Xbzrle {
                        cache,
                        gate: XbzrleGate::new(),
                        buf: vec![0; PAGE_SIZE],
                    })
                }
                Err(e) => log::warn!("xbzrle cache of {size} bytes: {e}; xbzrle stays off"),
            },
            (Some(x), Some(size)) if x.cache.size_bytes() != size => {
                if let Err(e) = x.cache.resize(size) {
                    log::warn!("xbzrle cache resize to {size}: {e}");
                }
            }
            (Some(x), None) => {
                self.xbzrle_skipped_before += x.gate.skipped();
                self.xbzrle = None;
            }
            _ => {}
        }
    }

    /// Whether XBZRLE is on (its pages must then go through this encoder's
    /// stream: the cache holds exactly what that stream delivered).
    pub fn has_xbzrle(&self) -> bool {
        self.xbzrle.is_some()
    }

    /// The XBZRLE cache's size in bytes, when XBZRLE is on.
    pub fn xbzrle_cache_size(&self) -> Option<u64> {
        self.xbzrle.as_ref().map(|x| x.cache.size_bytes())
    }

    /// Re-decides whether compressing pays from the link's current cost
    /// per byte (`None`: not measured yet) and whether a bandwidth cap
    /// sets its pace.
    pub fn decide(&mut self, link_ns_per_byte: Option<f64>, capped: bool) {
        self.link_ns_per_byte = link_ns_per_byte;
        self.chooser.decide(link_ns_per_byte, capped);
    }

    /// What this encoder has sent so far.
    pub fn counters(&self) -> EncodeCounters {
        let mut c = self.c;
        c.compress_skipped = self.compress_skipped_before + self.chooser.skipped();
        c.xbzrle_skipped =
            self.xbzrle_skipped_before + self.xbzrle.as_ref().map_or(0, |x| x.gate.skipped());
        c
    }

    /// Writes a zero record for a page known to be zero without reading
    /// it (never written). Only for pages the XBZRLE cache does not hold
    /// (the bulk stage).
    pub fn untouched<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        block: u16,
        offset: u64,
    ) -> io::Result<()> {
        self.untouched_run(w, block, offset, 1)
    }

    /// Writes that `count` pages from `offset` are zero, known without
    /// reading them (never written): one ZERO_RUN record where the stream
    /// allows it. Only for pages the XBZRLE cache does not hold (the bulk
    /// stage).
    pub fn untouched_run<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        block: u16,
        offset: u64,
        count: u64,
    ) -> io::Result<()> {
        self.c.zero += count;
        self.c.untouched += count;
        w.zero_run(block, offset, count)
    }

    /// Writes a zero record for a page the caller read and found zero
    /// (postcopy's background push with page channels: the source's main
    /// thread looks, the channel writes). Only where no XBZRLE cache
    /// holds the page.
    pub fn known_zero<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        block: u16,
        offset: u64,
    ) -> io::Result<()> {
        self.c.zero += 1;
        w.zero(block, offset)
    }

    /// Writes `page` to `w` as one record (or none: an XBZRLE page that did
    /// not change). `delta` is `Some` for a page the cache may hold.
    pub fn encode<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        page: Page<'_>,
        delta: Option<Delta>,
    ) -> io::Result<()> {
        let Page {
            region,
            block,
            offset,
        } = page;
        let off = offset as usize;
        let delta = delta.filter(|_| self.xbzrle.is_some());
        // XBZRLE sits out while it does not pay (adaptive encoding only:
        // without it every re-sent page tries); the cache then forgets
        // the pages sent otherwise, so that it never holds a copy the
        // destination does not have.
        let try_delta = match (&mut self.xbzrle, delta) {
            (Some(x), Some(_)) => !self.adaptive || x.gate.should_try(),
            _ => false,
        };
        if region.scan(off, PAGE_SIZE, zero::is_zero) == Some(true) {
            self.c.zero += 1;
            if let (Some(x), Some(d)) = (&mut self.xbzrle, delta) {
                if try_delta {
                    x.cache.insert(d.addr, &ZERO_PAGE, d.generation);
                } else {
                    x.cache.forget(d.addr);
                }
            }
            return w.zero(block, offset);
        }
        // Copied once into the send buffer, checksummed in the same pass:
        // the section CRC covers exactly these bytes while the guest
        // writes on.
        w.stage_page_crc(block, offset, |buf| {
            region
                .scan(off, PAGE_SIZE, |page| crc::append_crc(page, buf))
                .unwrap_or_default()
        });
        if let (Some(x), Some(d)) = (&mut self.xbzrle, delta) {
            if !try_delta {
                x.cache.forget(d.addr);
            } else if let Some(r) = self.try_xbzrle(w, d) {
                return r;
            }
        }
        if let Some(comp) = &mut self.compression {
            if self.chooser.should_compress() {
                comp.buf.clear();
                let t0 = Instant::now();
                let r = comp.compressor.compress(w.staged(), &mut comp.buf);
                let ns = t0.elapsed().as_nanos() as u64;
                if let Ok(Some(n)) = r {
                    self.chooser.record(ns, n);
                    self.c.compressed_pages += 1;
                    self.c.compressed_bytes += n as u64;
                    let algo = comp.algorithm.as_u8();
                    return w.commit_encoded(Encoded::Compressed(algo), &comp.buf[..n]);
                }
                self.chooser.record(ns, PAGE_SIZE);
            }
        }
        self.c.normal += 1;
        w.commit_raw()
    }

    /// The XBZRLE step for the staged page: `Some` when it settled the
    /// page (a delta went out, or nothing changed), `None` to send it
    /// otherwise.
    fn try_xbzrle<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        d: Delta,
    ) -> Option<io::Result<()>> {
        let x = self.xbzrle.as_mut()?;
        let t0 = Instant::now();
        self.c.xbzrle_lookups += 1;
        // What the page would cost without XBZRLE.
        let baseline = if self.compression.is_some() && self.chooser.is_on() {
            self.chooser.expected_bytes()
        } else {
            PAGE_SIZE as f64
        };
        let link = self.link_ns_per_byte;
        let Some(old) = x.cache.get_mut_at(d.addr, d.generation) else {
            self.c.xbzrle_miss += 1;
            // A miss is what a later hit costs: not judged.
            if !d.last_pass {
                x.cache.insert(d.addr, w.staged(), d.generation);
            }
            return None;
        };
        match xbzrle::encode(old, w.staged(), &mut x.buf) {
            Ok(0) => {
                self.c.skipped += 1;
                w.discard_staged();
                let ns = t0.elapsed().as_nanos() as u64;
                x.gate.record(ns, 0.0, baseline, link);
                Some(Ok(()))
            }
            Ok(n) => {
                // The cached copy becomes the new page by applying the delta
                // just made: only the changed bytes are written, not a
                // whole page into a copy that is usually out of cache.
                if xbzrle::decode(&x.buf[..n], old).is_err() {
                    old.copy_from_slice(w.staged());
                }
                self.c.xbzrle_pages += 1;
                self.c.xbzrle_bytes += n as u64;
                let ns = t0.elapsed().as_nanos() as u64;
                x.gate.record(ns, n as f64, baseline, link);
                Some(w.commit_encoded(Encoded::Xbzrle, &x.buf[..n]))
            }
            Err(_) => {
                self.c.xbzrle_overflow += 1;
                old.copy_from_slice(w.staged());
                let ns = t0.elapsed().as_nanos() as u64;
                x.gate.record(ns, baseline, baseline, link);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, ProcessMemory};
    use crate::stream::{BlockDesc, Record, StreamReader};

    const P: u64 = PAGE_SIZE as u64;

    /// The kind of each page record in `bytes`, with its offset.
    fn kinds(bytes: &[u8]) -> Vec<(&'static str, u64, Vec<u8>)> {
        let mut r = StreamReader::new(bytes).expect("header");
        let mut out = Vec::new();
        loop {
            match r.next_record().expect("valid stream") {
                Record::End => return out,
                Record::Zero { offset, .. } => out.push(("zero", offset, Vec::new())),
                Record::Raw { offset, data, .. } => out.push(("raw", offset, data.to_vec())),
                Record::Xbzrle { offset, data, .. } => out.push(("xbzrle", offset, data.to_vec())),
                Record::Compressed { offset, data, .. } => {
                    out.push(("compressed", offset, data.to_vec()))
                }
                _ => {}
            }
        }
    }

    fn noise(seed: u64) -> Vec<u8> {
        crate::stream::crc::tests::bytes(PAGE_SIZE, seed)
    }

    fn memory(pages: &[Vec<u8>]) -> ProcessMemory {
        let mem = ProcessMemory::single(pages.len() as u64 * P).unwrap();
        for (i, p) in pages.iter().enumerate() {
            assert!(mem.blocks()[0].region().write(i * PAGE_SIZE, p));
        }
        mem
    }

    /// Runs `f` with a writer whose block list names `mem`'s block, and
    /// returns the finished stream.
    fn stream(mem: &ProcessMemory, f: impl FnOnce(&mut StreamWriter<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = StreamWriter::new(&mut out, 0);
        let b = &mem.blocks()[0];
        w.block_list(&[BlockDesc {
            id: b.id().to_string(),
            len: b.len(),
        }])
        .unwrap();
        f(&mut w);
        w.end().unwrap();
        drop(w);
        out
    }

    fn page(mem: &ProcessMemory, i: u64) -> Page<'_> {
        Page {
            region: mem.blocks()[0].region(),
            block: 0,
            offset: i * P,
        }
    }

    #[test]
    fn zero_raw_and_compressed_pages() {
        let text: Vec<u8> = b"live migration "
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect();
        let mem = memory(&[vec![0; PAGE_SIZE], noise(7), text.clone()]);
        let mut e = PageEncoder::new(false);
        let bytes = stream(&mem, |w| {
            e.encode(w, page(&mem, 0), None).unwrap();
            e.encode(w, page(&mem, 1), None).unwrap();
            e.set_compression(Some((Algorithm::Lz4, 1)), false);
            e.encode(w, page(&mem, 1), None).unwrap();
            e.encode(w, page(&mem, 2), None).unwrap();
            // Off again: raw.
            e.set_compression(None, false);
            e.encode(w, page(&mem, 2), None).unwrap();
        });
        let k = kinds(&bytes);
        let names: Vec<_> = k.iter().map(|(n, o, _)| (*n, *o)).collect();
        // Noise does not shrink: raw even with compression on.
        assert_eq!(
            names,
            [
                ("zero", 0),
                ("raw", P),
                ("raw", P),
                ("compressed", 2 * P),
                ("raw", 2 * P)
            ]
        );
        assert_eq!(k[1].2, noise(7));
        let c = e.counters();
        assert_eq!((c.zero, c.normal, c.compressed_pages), (1, 3, 1));
        assert_eq!(c.compressed_bytes, k[3].2.len() as u64);
        assert!(c.compressed_bytes < P / 4, "{c:?}");
    }

    #[test]
    fn xbzrle_deltas_after_a_cached_copy() {
        let mem = memory(&[noise(1), noise(2)]);
        let mut e = PageEncoder::new(false);
        e.set_xbzrle(Some(1 << 20));
        assert!(e.has_xbzrle());
        let d = |generation, last_pass| {
            Some(Delta {
                addr: 0,
                generation,
                last_pass,
            })
        };
        let mut changed = noise(1);
        changed[100..108].copy_from_slice(b"changed!");
        let bytes = stream(&mem, |w| {
            // Miss: sent raw and cached.
            e.encode(w, page(&mem, 0), d(1, false)).unwrap();
            // Unchanged: nothing sent.
            e.encode(w, page(&mem, 0), d(2, false)).unwrap();
            // Changed: a delta against the cached copy.
            assert!(mem.blocks()[0].region().write(0, &changed));
            e.encode(w, page(&mem, 0), d(3, false)).unwrap();
            // Without a delta key (bulk stage, page channels) the cache is
            // not consulted.
            e.encode(w, page(&mem, 1), None).unwrap();
            // A miss in the last pass is not cached: a second look misses.
            let last = Some(Delta {
                addr: P,
                generation: 4,
                last_pass: true,
            });
            e.encode(w, page(&mem, 1), last).unwrap();
            e.encode(w, page(&mem, 1), last).unwrap();
        });
        let k = kinds(&bytes);
        let names: Vec<_> = k.iter().map(|(n, o, _)| (*n, *o)).collect();
        assert_eq!(
            names,
            [
                ("raw", 0),
                ("xbzrle", 0),
                ("raw", P),
                ("raw", P),
                ("raw", P)
            ]
        );
        let mut decoded = noise(1);
        xbzrle::decode(&k[1].2, &mut decoded).unwrap();
        assert_eq!(decoded, changed);
        let c = e.counters();
        assert_eq!(c.skipped, 1);
        assert_eq!(c.xbzrle_pages, 1);
        assert_eq!(c.xbzrle_bytes, k[1].2.len() as u64);
        assert_eq!((c.xbzrle_lookups, c.xbzrle_miss), (5, 3));
        assert_eq!(c.normal, 4);
        assert_eq!(e.xbzrle_cache_size(), Some(1 << 20));
        e.set_xbzrle(None);
        assert!(!e.has_xbzrle());
    }

    #[test]
    fn xbzrle_sits_out_a_losing_window_only_when_adaptive() {
        for adaptive in [true, false] {
            let mem = memory(&[noise(1)]);
            let mut e = PageEncoder::new(adaptive);
            e.set_xbzrle(Some(1 << 20));
            stream(&mem, |w| {
                for generation in 0..600u64 {
                    // Every byte changes: each delta overflows and saves
                    // nothing, so every window of attempts loses.
                    let fill = vec![(generation % 255) as u8 + 1; PAGE_SIZE];
                    assert!(mem.blocks()[0].region().write(0, &fill));
                    let d = Delta {
                        addr: 0,
                        generation,
                        last_pass: false,
                    };
                    e.encode(w, page(&mem, 0), Some(d)).unwrap();
                }
            });
            let c = e.counters();
            if adaptive {
                assert!(c.xbzrle_skipped > 0, "{c:?}");
                assert_eq!(c.xbzrle_overflow + c.xbzrle_skipped, 599, "{c:?}");
            } else {
                // `--no-adaptive`: every re-sent page tries.
                assert_eq!((c.xbzrle_skipped, c.xbzrle_overflow), (0, 599), "{c:?}");
            }
        }
    }

    #[test]
    fn cached_copy_follows_each_delta() {
        let mem = memory(&[noise(1)]);
        let mut e = PageEncoder::new(false);
        e.set_xbzrle(Some(1 << 20));
        let d = |generation| {
            Some(Delta {
                addr: 0,
                generation,
                last_pass: false,
            })
        };
        let mut first = noise(1);
        first[100..108].copy_from_slice(b"changed!");
        // The second version undoes the first change and makes another:
        // its delta is right only against an updated cached copy.
        let mut second = noise(1);
        second[4000..4004].copy_from_slice(b"next");
        let bytes = stream(&mem, |w| {
            e.encode(w, page(&mem, 0), d(1)).unwrap();
            assert!(mem.blocks()[0].region().write(0, &first));
            e.encode(w, page(&mem, 0), d(2)).unwrap();
            assert!(mem.blocks()[0].region().write(0, &second));
            e.encode(w, page(&mem, 0), d(3)).unwrap();
            // Unchanged since: the cached copy is the page.
            e.encode(w, page(&mem, 0), d(4)).unwrap();
        });
        let k = kinds(&bytes);
        let names: Vec<_> = k.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(names, ["raw", "xbzrle", "xbzrle"]);
        let mut page0 = noise(1);
        xbzrle::decode(&k[1].2, &mut page0).unwrap();
        assert_eq!(page0, first);
        xbzrle::decode(&k[2].2, &mut page0).unwrap();
        assert_eq!(page0, second);
        let c = e.counters();
        assert_eq!((c.xbzrle_pages, c.skipped), (2, 1));
    }

    #[test]
    fn counters_add_up() {
        let a = EncodeCounters {
            zero: 1,
            normal: 2,
            compressed_pages: 3,
            compress_skipped: 4,
            ..Default::default()
        };
        let mut b = a;
        b.add(&a);
        assert_eq!(
            (b.zero, b.normal, b.compressed_pages, b.compress_skipped),
            (2, 4, 6, 8)
        );
    }
}
