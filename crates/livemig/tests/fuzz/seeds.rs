//! Grammar-aware seed corpus: valid streams written by the real
//! [`StreamWriter`] for the layouts the loader targets use, plus truncated
//! and mutated variants, XBZRLE deltas and compressed pages.
//!
//! Regenerate with
//! `cargo test -p livemig --test fuzz_corpus -- --ignored generate_seed_corpus`
//! (writes `fuzz/corpus/<target>/seed-*`).

use livemig::codec::compress::{Algorithm, Compressor};
use livemig::codec::xbzrle;
use livemig::engine::{memory_digest, Loader};
use livemig::memory::{GuestMemory, ProcessMemory, PAGE_SIZE};
use livemig::stream::format::{FLAG_VERIFY, MAGIC, MAX_STATE, VERSION};
use livemig::stream::{BlockDesc, Encoded, StreamWriter};

use crate::checks::{initial_block, GUARDED_BLOCK, TWO_BLOCKS};

/// One seed file.
pub struct Seed {
    /// Target directory under `fuzz/corpus/`.
    pub target: &'static str,
    /// File name (without the `seed-` prefix).
    pub name: String,
    /// Contents.
    pub data: Vec<u8>,
}

const P: u64 = PAGE_SIZE as u64;

/// A page with a recognisable, compressible pattern.
fn pattern(seed: u8) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, chunk) in page.chunks_mut(64).enumerate() {
        chunk[..12].copy_from_slice(b"livemig-page");
        chunk[12] = seed;
        chunk[13] = i as u8;
    }
    page
}

/// The destination's initial page at `offset` of destination block `dest`.
fn dest_page(dest: usize, len: usize, offset: u64) -> Vec<u8> {
    let o = offset as usize;
    initial_block(dest, len)[o..o + PAGE_SIZE].to_vec()
}

fn compressed(algo: Algorithm, page: &[u8]) -> Vec<u8> {
    let mut c = Compressor::new(algo, 3).expect("compressor");
    let mut out = Vec::new();
    c.compress(page, &mut out)
        .expect("compress")
        .expect("pattern pages compress");
    out
}

fn delta(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; xbzrle::max_encoded_len(old.len())];
    let n = xbzrle::encode(old, new, &mut out).expect("encode");
    out.truncate(n);
    out
}

/// How to finish a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// No digest, verify flag clear.
    Plain,
    /// Verify flag and the right digest.
    Verify,
    /// Verify flag and a wrong digest.
    WrongDigest,
    /// Verify flag, no digest record.
    NoDigest,
}

/// A stream for `layout` (destination blocks, in destination order) whose
/// block list lists them in `order`. Covers every record kind, both
/// compression algorithms, the same-block flag and two sections.
fn stream(layout: &[(&str, usize)], order: &[usize], tail: Tail) -> Vec<u8> {
    let body = |flags: u16, digest: Option<[u8; 32]>| -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), flags);
        let list: Vec<BlockDesc> = order
            .iter()
            .map(|&d| BlockDesc {
                id: layout[d].0.to_string(),
                len: layout[d].1 as u64,
            })
            .collect();
        w.block_list(&list).unwrap();
        // Section 0: every page kind in every block.
        for (s, &d) in order.iter().enumerate() {
            let (s, len) = (s as u16, layout[d].1);
            w.zero(s, 0).unwrap();
            w.raw(s, P, &pattern(s as u8)).unwrap();
            w.zero(s, 2 * P).unwrap();
            let old = dest_page(d, len, 3 * P);
            let mut new = old.clone();
            new[10..20].fill(0xee);
            new[300..600].copy_from_slice(&pattern(9)[300..600]);
            new[4090] ^= 1;
            w.encoded(Encoded::Xbzrle, s, 3 * P, &delta(&old, &new))
                .unwrap();
            let algo = if s % 2 == 0 {
                Algorithm::Zstd
            } else {
                Algorithm::Lz4
            };
            let c = compressed(algo, &pattern(0x40 + s as u8));
            w.encoded(Encoded::Compressed(algo.as_u8()), s, 5 * P, &c)
                .unwrap();
            let c = compressed(Algorithm::Lz4, &pattern(0x50 + s as u8));
            w.encoded(Encoded::Compressed(Algorithm::Lz4.as_u8()), s, 6 * P, &c)
                .unwrap();
        }
        w.section_end(0).unwrap();
        // Section 1: pages staged and turned into other records, last page
        // of each block, and an XBZRLE delta against the section-0 page.
        for (s, &d) in order.iter().enumerate() {
            let (s, len) = (s as u16, layout[d].1 as u64);
            w.stage_page(s, len - P).copy_from_slice(&pattern(0x70));
            w.commit_raw().unwrap();
            w.stage_page(s, P).fill(0);
            w.commit_zero().unwrap();
            let old = pattern(0x40 + s as u8);
            let mut new = old.clone();
            for i in (0..PAGE_SIZE).step_by(97) {
                new[i] = !new[i];
            }
            w.stage_page(s, 5 * P).copy_from_slice(&new);
            w.commit_encoded(Encoded::Xbzrle, &delta(&old, &new))
                .unwrap();
            let page = pattern(0x60);
            w.stage_page(s, 7 * P).copy_from_slice(&page);
            let c = compressed(Algorithm::Zstd, &page);
            w.commit_encoded(Encoded::Compressed(Algorithm::Zstd.as_u8()), &c)
                .unwrap();
        }
        w.section_end(1).unwrap();
        w.state(b"vcpu0: rip=0xfff0 rflags=0x2; devices: serial, rtc")
            .unwrap();
        if let Some(d) = digest {
            w.digest(&d).unwrap();
        }
        w.end().unwrap();
        w.get_mut().clone()
    };
    match tail {
        Tail::Plain => body(0, None),
        Tail::NoDigest => body(FLAG_VERIFY, None),
        Tail::WrongDigest => body(FLAG_VERIFY, Some([0x11; 32])),
        Tail::Verify => {
            let mem = ProcessMemory::new(
                &layout
                    .iter()
                    .map(|&(id, len)| (id, len as u64))
                    .collect::<Vec<_>>(),
            )
            .expect("map");
            for (i, b) in mem.blocks().iter().enumerate() {
                assert!(b.region().write(0, &initial_block(i, layout[i].1)));
            }
            Loader::new(&mem).load(&body(0, None)[..]).expect("load");
            body(FLAG_VERIFY, Some(memory_digest(&mem)))
        }
    }
}

/// Streams with the setup verdict's SETUP record (as a source with a
/// return path sends them), with drain marks, and streams a source ended
/// with ABORT.
fn setup_and_abort(list: &[(&str, u64)]) -> Vec<(String, Vec<u8>)> {
    use livemig::stream::format::FLAG_SETUP;
    let mut out = Vec::new();
    for (name, vcpus) in [("setup", 2u32), ("setup-unsaid", 0)] {
        let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
        w.block_list(&descs(list)).unwrap();
        w.setup(vcpus, 0).unwrap();
        w.section_end(0).unwrap();
        w.raw(0, 0, &pattern(0x21)).unwrap();
        w.section_end(1).unwrap();
        w.end().unwrap();
        out.push((name.to_string(), w.get_mut().clone()));
    }
    // With the source guest's load (header flag GUEST_LOAD), said or not.
    for (name, load) in [("setup-load", Some(0u32)), ("setup-load-unsaid", None)] {
        let flags = FLAG_SETUP | livemig::stream::format::FLAG_GUEST_LOAD;
        let mut w = StreamWriter::new(Vec::new(), flags);
        w.block_list(&descs(list)).unwrap();
        w.setup_with_load(1, 0, load).unwrap();
        w.section_end(0).unwrap();
        w.raw(0, 0, &pattern(0x23)).unwrap();
        w.end().unwrap();
        out.push((name.to_string(), w.get_mut().clone()));
    }
    // Drain marks before a pause: each ends a section; then out of order,
    // and in a stream without a return path.
    let drained = |marks: &[u64], flags: u16| {
        let mut w = StreamWriter::new(Vec::new(), flags);
        w.block_list(&descs(list)).unwrap();
        if flags & FLAG_SETUP != 0 {
            w.setup(1, 0).unwrap();
        }
        w.section_end(0).unwrap();
        for (i, &m) in marks.iter().enumerate() {
            w.raw(0, i as u64 * P, &pattern(0x30 + i as u8)).unwrap();
            w.drain(m).unwrap();
            w.section_end(i as u64 + 1).unwrap();
        }
        w.zero(0, 0).unwrap();
        w.end().unwrap();
        w.get_mut().clone()
    };
    out.push(("drain".into(), drained(&[1, 2], FLAG_SETUP)));
    out.push(("drain-order".into(), drained(&[2], FLAG_SETUP)));
    out.push(("drain-no-return-path".into(), drained(&[1], 0)));
    // Cancelled after a page: the reason, then nothing.
    let mut w = StreamWriter::new(Vec::new(), FLAG_SETUP);
    w.block_list(&descs(list)).unwrap();
    w.setup(1, 0).unwrap();
    w.section_end(0).unwrap();
    w.raw(0, P, &pattern(0x22)).unwrap();
    w.abort("migration cancelled").unwrap();
    out.push(("abort-mid".into(), w.get_mut().clone()));
    // Gave up before sending anything: a bare header and the reason.
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.abort("the dirty tracker failed: no userfaultfd").unwrap();
    out.push(("abort-first".into(), w.get_mut().clone()));
    out
}

/// Streams with RUN records (header flag `FLAG_RUNS`): a valid one, one
/// cut inside a run, one with a byte of a run flipped, a run past its
/// block's end, and a run in a stream whose header does not allow runs.
fn run_seeds(list: &[(&str, u64)]) -> Vec<(String, Vec<u8>)> {
    use livemig::stream::format::{Kind, FLAG_RUNS};
    let mut w = StreamWriter::new(Vec::new(), FLAG_RUNS);
    w.block_list(&descs(list)).unwrap();
    for i in 0..6u64 {
        w.raw(0, i * P, &pattern(0x30 + i as u8)).unwrap();
    }
    w.zero(0, 6 * P).unwrap();
    w.raw(0, 7 * P, &pattern(0x37)).unwrap();
    w.section_end(0).unwrap();
    let last = list.len() as u16 - 1;
    let len = list[usize::from(last)].1;
    w.raw(last, len - 2 * P, &pattern(0x38)).unwrap();
    w.raw(last, len - P, &pattern(0x39)).unwrap();
    w.section_end(1).unwrap();
    w.end().unwrap();
    let good = w.get_mut().clone();
    let mut out = vec![("runs".to_string(), good.clone())];
    let first_run = 16 + 1 + 4 + 8 + list.iter().map(|(id, _)| 1 + id.len() + 8).sum::<usize>();
    out.push((
        "runs-cut".into(),
        good[..first_run + 13 + 2 * PAGE_SIZE + 77].to_vec(),
    ));
    let mut flipped = good.clone();
    flipped[first_run + 13 + 3 * PAGE_SIZE + 5] ^= 0x10;
    out.push(("runs-flip".into(), flipped));
    let mut w = StreamWriter::new(Vec::new(), FLAG_RUNS);
    w.block_list(&descs(list)).unwrap();
    w.flush().unwrap();
    let mut past = w.get_mut().clone();
    past.push(Kind::Run as u8);
    past.extend_from_slice(&last.to_be_bytes());
    past.extend_from_slice(&(len - P).to_be_bytes());
    past.extend_from_slice(&2u16.to_be_bytes());
    past.extend_from_slice(&pattern(0x3a));
    past.extend_from_slice(&pattern(0x3b));
    out.push(("runs-past-block".into(), past));
    let mut noflag = good;
    noflag[10..12].copy_from_slice(&0u16.to_be_bytes());
    out.push(("runs-no-flag".into(), noflag));
    out
}

/// Block descriptors of `(id, length)` pairs.
fn descs(list: &[(&str, u64)]) -> Vec<BlockDesc> {
    list.iter()
        .map(|&(id, len)| BlockDesc {
            id: id.to_string(),
            len,
        })
        .collect()
}

/// A stream with just a block list and the end record.
fn minimal(list: &[(&str, u64)]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&descs(list)).unwrap();
    w.end().unwrap();
    w.get_mut().clone()
}

/// A stream whose single page record carries `payload` as `how`.
fn one_page(list: &[(&str, u64)], how: Encoded, payload: &[u8]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&descs(list)).unwrap();
    w.encoded(how, 0, P, payload).unwrap();
    w.section_end(0).unwrap();
    w.end().unwrap();
    w.get_mut().clone()
}

fn header(version: u16, flags: u16) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}

/// Streams for one destination layout: valid ones and broken variants.
fn streams(layout: &[(&str, usize)], orders: &[&[usize]]) -> Vec<(String, Vec<u8>)> {
    let list: Vec<(&str, u64)> = layout.iter().map(|&(id, l)| (id, l as u64)).collect();
    let mut out = Vec::new();
    let full = stream(layout, orders[0], Tail::Verify);
    for (i, order) in orders.iter().enumerate() {
        out.push((
            format!("verify-order{i}"),
            stream(layout, order, Tail::Verify),
        ));
    }
    out.push(("plain".into(), stream(layout, orders[0], Tail::Plain)));
    out.push((
        "wrong-digest".into(),
        stream(layout, orders[0], Tail::WrongDigest),
    ));
    out.push((
        "no-digest".into(),
        stream(layout, orders[0], Tail::NoDigest),
    ));
    out.push(("minimal".into(), minimal(&list)));
    out.extend(setup_and_abort(&list));
    out.extend(run_seeds(&list));
    let mut wrong = list.clone();
    wrong[0].1 += P;
    out.push(("layout-length".into(), minimal(&wrong)));
    let mut wrong = list.clone();
    wrong[0].0 = "rom";
    out.push(("layout-id".into(), minimal(&wrong)));
    out.push((
        "xbzrle-bad".into(),
        one_page(&list, Encoded::Xbzrle, &[0x05, 0x00, 0x01]),
    ));
    out.push((
        "xbzrle-past-end".into(),
        one_page(&list, Encoded::Xbzrle, &[0xff, 0x1f, 0x02, 0xaa, 0xbb]),
    ));
    out.push((
        "zstd-bad".into(),
        one_page(&list, Encoded::Compressed(1), b"\x28\xb5\x2f\xfd garbage"),
    ));
    out.push((
        "lz4-short".into(),
        one_page(
            &list,
            Encoded::Compressed(2),
            &compressed(Algorithm::Lz4, &pattern(1))[..40],
        ),
    ));
    // Truncations, inside the header, the block list and later records.
    for cut in [
        7,
        16,
        17,
        30,
        full.len() / 3,
        full.len() / 2,
        full.len() - 1,
    ] {
        out.push((format!("cut{cut}"), full[..cut].to_vec()));
    }
    // Single-byte mutations spread over the stream.
    for k in 1..8 {
        let at = full.len() * k / 8;
        let mut m = full.clone();
        m[at] ^= 0x01 << k;
        out.push((format!("flip{at}"), m));
    }
    out
}

/// Streams with ZERO_RUN records (header flag `FLAG_ZERO_RUNS`) for one
/// destination layout: runs over pages the destination holds data in and
/// pages it does not, a run to a block's last page, the same-block flag;
/// a run past its block's end, a run without the header flag, and a run
/// after the postcopy switch.
fn zero_run_streams(layout: &[(&str, usize)]) -> Vec<(String, Vec<u8>)> {
    use livemig::stream::format::FLAG_ZERO_RUNS;
    let list: Vec<(&str, u64)> = layout.iter().map(|&(id, l)| (id, l as u64)).collect();
    let pages = |b: usize| list[b].1 / P;
    let mut w = StreamWriter::new(Vec::new(), FLAG_ZERO_RUNS);
    w.block_list(&descs(&list)).unwrap();
    for b in 0..list.len() {
        let s = b as u16;
        // Every page of the block zero, then data in two, then a run
        // over one of them again, up to the last page.
        w.zero_run(s, 0, pages(b)).unwrap();
        w.raw(s, P, &pattern(0x30 + s as u8)).unwrap();
        w.raw(s, 3 * P, &pattern(0x38 + s as u8)).unwrap();
        w.section_end(2 * b as u64).unwrap();
        w.zero_run(s, 2 * P, pages(b) - 2).unwrap();
        w.zero_run(s, 0, 1).unwrap();
        w.section_end(2 * b as u64 + 1).unwrap();
    }
    w.end().unwrap();
    let good = w.get_mut().clone();
    let run = |flags: u16, first: u64, count: u64| {
        let mut w = StreamWriter::new(Vec::new(), flags);
        w.block_list(&descs(&list)).unwrap();
        w.raw(0, 0, &pattern(0x41)).unwrap();
        w.zero_run(0, first, count).unwrap();
        w.section_end(0).unwrap();
        w.end().unwrap();
        w.get_mut().clone()
    };
    // Built by hand: the writer turns a run into ZERO records without the
    // flag.
    let mut no_flag = run(0, 0, 1);
    let at = no_flag.len() - 13 - 5 - 9;
    no_flag.truncate(at);
    no_flag.extend_from_slice(&[0x11 | 0x80]);
    no_flag.extend_from_slice(&P.to_be_bytes());
    no_flag.extend_from_slice(&2u32.to_be_bytes());
    let mut w = StreamWriter::new(Vec::new(), FLAG_ZERO_RUNS);
    w.block_list(&descs(&list)).unwrap();
    w.postcopy().unwrap();
    w.section_end(0).unwrap();
    w.zero_run(0, 0, 2).unwrap();
    w.section_end(1).unwrap();
    w.end().unwrap();
    let after_switch = w.get_mut().clone();
    vec![
        ("zero-runs".into(), good),
        (
            "zero-run-past-block".into(),
            run(FLAG_ZERO_RUNS, 2 * P, pages(0) - 1),
        ),
        ("zero-run-no-flag".into(), no_flag),
        ("zero-run-after-postcopy".into(), after_switch),
    ]
}

/// Hand-made streams for the reader: header errors, huge claims.
fn reader_only() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("empty".to_string(), Vec::new()),
        ("version2".into(), header(VERSION + 1, 0)),
        ("flags".into(), header(VERSION, 0x8000)),
    ];
    // Device state claiming 64 MiB, then 64 MiB + 1, with no bytes behind.
    for len in [MAX_STATE, MAX_STATE + 1] {
        let mut v = header(VERSION, 0);
        v.push(0x07);
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(b"short");
        out.push((format!("state{len}"), v));
    }
    // Block list claiming the maximum count and a huge total.
    let mut v = header(VERSION, 0);
    v.push(0x01);
    v.extend_from_slice(&4096u32.to_be_bytes());
    v.extend_from_slice(&u64::MAX.to_be_bytes());
    v.extend_from_slice(&[1, b'a', 0x80, 0, 0, 0, 0, 0, 0, 0]);
    out.push(("blocks-huge".into(), v));
    // A same-block page record right after the list.
    let mut v = minimal(&[("ram0", 8 * P)]);
    v.truncate(v.len() - 5);
    v.push(0x82);
    v.extend_from_slice(&0u64.to_be_bytes());
    out.push(("same-block-first".into(), v));
    out
}

fn xbzrle_seeds() -> Vec<(String, Vec<u8>)> {
    let old = pattern(3);
    let mut out = Vec::new();
    let mut change = |name: &str, f: &dyn Fn(&mut [u8])| {
        let mut new = old.clone();
        f(&mut new);
        out.push((name.to_string(), delta(&old, &new)));
    };
    change("first-byte", &|p| p[0] ^= 0xff);
    change("last-byte", &|p| p[PAGE_SIZE - 1] ^= 0xff);
    change("run200", &|p| p[1000..1200].fill(0xee));
    change("alternate", &|p| {
        for i in (0..300).step_by(2) {
            p[i] = !p[i];
        }
    });
    change("whole-page", &|p| {
        for b in p.iter_mut() {
            *b = !*b;
        }
    });
    out.push(("unchanged".into(), Vec::new()));
    for (name, bytes) in [
        ("varint3", &[0x80u8, 0x80, 0x01][..]),
        ("zero-nzrun", &[0x05, 0x00]),
        ("zero-zrun-later", &[0x00, 0x01, 0xaa, 0x00, 0x01, 0xbb]),
        ("one-byte", &[0x05]),
        ("zrun-to-end", &[0x80, 0x20, 0x01, 0xaa]),
        ("nzrun-short", &[0x00, 0x05, 0xaa, 0xbb]),
        ("max-varint", &[0xff, 0x7f, 0x01, 0xaa]),
    ] {
        out.push((name.into(), bytes.to_vec()));
    }
    // Page-pair specifications (see `checks::page_pair`).
    let mut spec = vec![0x02, 0, 0];
    spec.extend_from_slice(b"an old page pattern.......");
    spec.extend_from_slice(&[0x10, 0x00, 0x08, 0x41, 0xf0, 0x0f, 0xff, 0x00]);
    out.push(("pair-4k".into(), spec.clone()));
    spec[0] = 0x07;
    spec[1] = 0x35;
    spec[2] = 0x01;
    out.push(("pair-odd-len".into(), spec));
    out
}

fn decompress_seeds() -> Vec<(String, Vec<u8>)> {
    let page = pattern(5);
    let mut out = vec![
        ("zstd-page".to_string(), compressed(Algorithm::Zstd, &page)),
        ("lz4-page".into(), compressed(Algorithm::Lz4, &page)),
        (
            "zstd-no-size".into(),
            zstd::stream::encode_all(&page[..], 3).expect("zstd"),
        ),
        (
            "zstd-half".into(),
            zstd::bulk::compress(&page[..2048], 3).expect("zstd"),
        ),
        (
            "zstd-double-no-size".into(),
            zstd::stream::encode_all(&[&page[..], &page[..]].concat()[..], 3).expect("zstd"),
        ),
        ("lz4-half".into(), lz4_flex::block::compress(&page[..2048])),
        (
            "lz4-double".into(),
            lz4_flex::block::compress(&[&page[..], &page[..]].concat()),
        ),
        (
            "zeros-lz4".into(),
            lz4_flex::block::compress(&[0u8; PAGE_SIZE]),
        ),
    ];
    let z = compressed(Algorithm::Zstd, &page);
    out.push(("zstd-cut".into(), z[..z.len() / 2].to_vec()));
    let l = compressed(Algorithm::Lz4, &page);
    out.push(("lz4-cut".into(), l[..l.len() - 3].to_vec()));
    out
}

/// Every seed, for every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, items: Vec<(String, Vec<u8>)>| {
        for (name, data) in items {
            seeds.push(Seed { target, name, data });
        }
    };
    let mut two = streams(TWO_BLOCKS, &[&[0, 1], &[1, 0]]);
    two.extend(zero_run_streams(TWO_BLOCKS));
    let mut one = streams(&[GUARDED_BLOCK], &[&[0]]);
    one.extend(zero_run_streams(&[GUARDED_BLOCK]));
    let tagged = |prefix: &str, v: &[(String, Vec<u8>)]| -> Vec<(String, Vec<u8>)> {
        v.iter()
            .map(|(n, d)| (format!("{prefix}-{n}"), d.clone()))
            .collect()
    };
    add("stream_reader", tagged("two", &two));
    add("stream_reader", reader_only());
    add("loader", two.clone());
    add("loader_guard", one);
    add("xbzrle_decode", xbzrle_seeds());
    add("decompress", decompress_seeds());
    add("control", control_seeds());
    add("stream_reader", postcopy_streams());
    add("postcopy_messages", postcopy_message_seeds());
    add("mapped_ram_header", mapped_ram_header_seeds());
    seeds
}

/// Streams that switch to postcopy: discards, the switch, pages after it;
/// and a discard past its block.
fn postcopy_streams() -> Vec<(String, Vec<u8>)> {
    let list = [("ram0", 130 * P), ("ram1", 8 * P)];
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&descs(&list)).unwrap();
    w.raw(0, 0, &pattern(1)).unwrap();
    w.discard(0, 0, &[u64::MAX, 0, 0b11]).unwrap();
    w.discard(1, 0, &[0xff]).unwrap();
    w.state(b"devices").unwrap();
    w.postcopy().unwrap();
    w.section_end(0).unwrap();
    w.raw(0, 129 * P, &pattern(2)).unwrap();
    w.zero(1, 7 * P).unwrap();
    w.section_end(1).unwrap();
    w.end().unwrap();
    let good = w.get_mut().clone();
    let mut w = StreamWriter::new(Vec::new(), 0);
    w.block_list(&descs(&list)).unwrap();
    // ram1 has 8 pages: bit 8 marks a page past its end.
    w.discard(1, 0, &[0x1ff]).unwrap();
    w.end().unwrap();
    let past = w.get_mut().clone();
    // Recovery: a resumed main stream announcing the urgent connection
    // and two page channels, then pages; a reopened page channel (channel
    // record, block list, POSTCOPY, pages); one with a page past its block.
    use livemig::stream::format::{FLAG_CHANNELS, FLAG_URGENT};
    let mut w = StreamWriter::new(Vec::new(), FLAG_URGENT | FLAG_CHANNELS);
    w.channel(0, 2, 0x5e55).unwrap();
    w.block_list(&descs(&list)).unwrap();
    w.section_end(0).unwrap();
    w.raw(1, 2 * P, &pattern(3)).unwrap();
    w.section_end(1).unwrap();
    w.end().unwrap();
    let resumed = w.get_mut().clone();
    let channel = |page: u64| {
        let mut w = StreamWriter::new(Vec::new(), FLAG_CHANNELS);
        w.channel(2, 2, 0x5e55).unwrap();
        w.block_list(&descs(&list)).unwrap();
        w.section_end(0).unwrap();
        w.postcopy().unwrap();
        w.section_end(1).unwrap();
        w.zero(0, 5 * P).unwrap();
        w.raw(1, page, &pattern(4)).unwrap();
        w.section_end(2).unwrap();
        w.end().unwrap();
        w.get_mut().clone()
    };
    vec![
        ("postcopy".into(), good),
        ("discard-past-block".into(), past),
        ("resumed-main".into(), resumed),
        ("resumed-channel".into(), channel(7 * P)),
        ("resumed-channel-past-block".into(), channel(8 * P)),
    ]
}

/// Return paths after the switch: requests good and bad, COMPLETE, FAILED,
/// received bitmaps of a recovery.
fn postcopy_message_seeds() -> Vec<(String, Vec<u8>)> {
    use livemig::engine::postcopy::{write_message, FaultReport, Message, PageRequest};
    let enc = |ms: &[Message]| {
        let mut v = Vec::new();
        for m in ms {
            write_message(&mut v, m).unwrap();
        }
        v
    };
    let req = |block, offset, len| Message::Request(PageRequest { block, offset, len });
    let bitmap = |block, first_word, words| Message::Bitmap {
        block,
        first_word,
        words,
    };
    vec![
        (
            "session".into(),
            enc(&[
                req(0, 0, 4096),
                req(1, 2 * P, 4096),
                Message::Complete(FaultReport {
                    faults: 2,
                    blocktime_us: 300,
                    latency_sum_us: 250,
                    p50_us: 100,
                    p99_us: 150,
                    threads: vec![(7, 300)],
                    buckets: vec![0, 0, 0, 0, 0, 0, 2],
                    local_faults: 1,
                    local_pages: 512,
                    local_us: 30,
                }),
            ]),
        ),
        (
            "outside".into(),
            enc(&[req(1, 3 * P, 4096), req(2, 0, 4096)]),
        ),
        (
            "unaligned".into(),
            enc(&[req(0, 100, 4096), req(0, 0, 100)]),
        ),
        ("failed".into(), enc(&[Message::Failed("lost".into())])),
        (
            "lost".into(),
            enc(&[
                req(0, 0, 4096),
                Message::Lost { stream: 1 },
                Message::Lost { stream: u16::MAX },
            ]),
        ),
        (
            "progress".into(),
            enc(&[
                Message::Progress {
                    stream: 0,
                    offset: 64 << 10,
                },
                req(1, 0, 4096),
                Message::Progress {
                    stream: 2,
                    offset: u64::MAX,
                },
            ]),
        ),
        ("bad-tag".into(), vec![b'Z', 0, 1]),
        (
            "recovery-bitmap".into(),
            enc(&[
                bitmap(0, 0, vec![!0b1011]),
                bitmap(1, 0, vec![0b101]),
                Message::BitmapEnd { blocks: 2 },
                req(0, 2 * P, 4096),
            ]),
        ),
        (
            "recovery-bitmap-bad".into(),
            enc(&[
                bitmap(1, 0, vec![0, 0]),
                bitmap(2, 0, vec![1]),
                Message::BitmapEnd { blocks: 1 },
            ]),
        ),
    ]
}

/// Control-socket sessions: every command, good and bad arguments.
fn control_seeds() -> Vec<(String, Vec<u8>)> {
    let lines = |v: &[&str]| -> Vec<u8> { v.join("\n").into_bytes() };
    vec![
        (
            "queries".into(),
            lines(&[
                r#"{"execute":"query-migrate"}"#,
                r#"{"execute":"query-migrate-parameters"}"#,
                r#"{"execute":"query-migrate-capabilities"}"#,
            ]),
        ),
        (
            "set-parameters".into(),
            lines(&[
                r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1048576,"downtime-limit":30,"xbzrle-cache-size":0}}"#,
                r#"{"execute":"migrate-set-parameters","arguments":{"channels":4,"dirty-limit":4096,"cpu-throttle-initial":99}}"#,
                r#"{"execute":"migrate-set-parameters","arguments":{"no-such":1}}"#,
            ]),
        ),
        (
            "capabilities".into(),
            lines(&[
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":true},{"capability":"auto-converge","state":true},{"capability":"verify","state":false}]}}"#,
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"bogus","state":true}]}}"#,
                r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":{}}}"#,
            ]),
        ),
        (
            "migrate".into(),
            lines(&[
                r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444"}}"#,
                r#"{"execute":"migrate","arguments":{"uri":"unix:/tmp/x"}}"#,
                r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":5}}"#,
                r#"{"execute":"migrate-cancel"}"#,
                r#"{"execute":"migrate-incoming","arguments":{"uri":"file:/tmp/snap"}}"#,
                r#"{"execute":"migrate","arguments":{"uri":"bogus"}}"#,
            ]),
        ),
        (
            "malformed".into(),
            lines(&[
                "{",
                "[]",
                r#"{"execute":7}"#,
                r#"{"execute":"query-migrate","arguments":[]}"#,
                "\u{0}\u{ff}",
                r#"{"execute":"nope"}"#,
            ]),
        ),
    ]
}

/// Mapped-ram headers: a VM's (two blocks, state) and process memory's,
/// each with the file length in front; one with a region past the end.
fn mapped_ram_header_seeds() -> Vec<(String, Vec<u8>)> {
    use livemig::snapshot::format::{Header, FLAG_VM_STATE};
    let seed = |h: &Header, file_len: u64| {
        let mut v = file_len.to_le_bytes().to_vec();
        v.extend_from_slice(&h.encode());
        v
    };
    let vm = Header::plan(
        &[("ram@0".into(), 6 << 20), ("ram@600000".into(), 3 * P)],
        200,
        FLAG_VM_STATE,
    );
    let process = Header::plan(&[("ram0".into(), 64 * P)], 0, 0);
    let mut past = process.clone();
    past.blocks[0].pages_offset += 1 << 20;
    vec![
        ("vm".into(), seed(&vm, vm.file_len())),
        ("process".into(), seed(&process, process.file_len())),
        ("past-the-end".into(), seed(&past, process.file_len())),
    ]
}
