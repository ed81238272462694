//! Page codec throughput over a 64 MiB working set (larger than the CPU
//! caches, as guest memory is), one 4 KiB page per iteration, reported in
//! bytes of page processed. `memcpy` of the same bytes is the reference:
//! a codec slower than it costs more than sending the page raw over a
//! fast link.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemig::codec::compress::{Algorithm, Compressor, Decompressor};
use livemig::codec::{xbzrle, zero};
use livemig::testkit::workload::XorShift;

const PAGE: usize = 4096;
const WORKING_SET: usize = 64 << 20;
const PAGES: usize = WORKING_SET / PAGE;

/// A working set of incompressible bytes, every page touched.
fn random_set(seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = Vec::with_capacity(WORKING_SET);
    while v.len() < WORKING_SET {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v
}

/// A working set of compressible pages: text-like records with a few
/// varying fields.
fn compressible_set() -> Vec<u8> {
    let mut rng = XorShift::new(7);
    let mut v = vec![0u8; WORKING_SET];
    for rec in v.chunks_mut(64) {
        rec[..24].copy_from_slice(b"guest-record id=0000 v: ");
        rec[24..32].copy_from_slice(&(rng.next_u64() & 0x0f0f_0f0f).to_le_bytes());
    }
    v
}

/// Cycles through the pages of the working set.
struct Pages(usize);

impl Pages {
    fn next(&mut self) -> std::ops::Range<usize> {
        let i = self.0;
        self.0 = (i + 1) % PAGES;
        i * PAGE..(i + 1) * PAGE
    }
}

fn codecs(c: &mut Criterion) {
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(PAGE as u64));

    {
        let src = random_set(1);
        let mut dst = vec![1u8; WORKING_SET];
        let mut p = Pages(0);
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                let r = p.next();
                dst[r.clone()].copy_from_slice(black_box(&src[r]));
            })
        });
    }

    {
        let mut zeros = vec![1u8; WORKING_SET];
        zeros.fill(0); // real, distinct zeroed pages, not the shared zero page
        let mut p = Pages(0);
        let name = format!("is_zero/zero_page/{}", zero::implementation());
        g.bench_function(name, |b| {
            b.iter(|| black_box(zero::is_zero(black_box(&zeros[p.next()]))))
        });
    }

    {
        let old = random_set(2);
        let mut new = old.clone();
        // A few changed bytes per page: a counter, a flag, a pointer.
        for page in new.chunks_mut(PAGE) {
            for at in [8, 9, 1000, 2048, 2049, 2050, 2051, 4000] {
                page[at] ^= 0x5a;
            }
        }
        let mut out = vec![0u8; PAGE];
        let mut p = Pages(0);
        g.bench_function("xbzrle_encode/few_changes", |b| {
            b.iter(|| {
                let r = p.next();
                black_box(xbzrle::encode(&old[r.clone()], &new[r], &mut out))
            })
        });

        let mut encoded = Vec::with_capacity(PAGES);
        for (o, n) in old.chunks(PAGE).zip(new.chunks(PAGE)) {
            let len = xbzrle::encode(o, n, &mut out).expect("a few changes fit");
            encoded.push(out[..len].to_vec());
        }
        let mut target = old.clone();
        let mut p = Pages(0);
        g.bench_function("xbzrle_decode/few_changes", |b| {
            b.iter(|| {
                let r = p.next();
                let e = &encoded[r.start / PAGE];
                black_box(xbzrle::decode(e, &mut target[r]))
            })
        });

        let changed: Vec<u8> = old.iter().map(|b| !b).collect();
        let mut p = Pages(0);
        g.bench_function("xbzrle_encode/all_changed_overflow", |b| {
            b.iter(|| {
                let r = p.next();
                black_box(xbzrle::encode(&old[r.clone()], &changed[r], &mut out))
            })
        });
    }

    {
        let set = compressible_set();
        for (algo, level) in [
            (Algorithm::Lz4, 0),
            (Algorithm::Zstd, 1),
            (Algorithm::Zstd, 3),
        ] {
            let mut comp = Compressor::new(algo, level).expect("compressor");
            let mut out = Vec::with_capacity(2 * PAGE);
            let mut p = Pages(0);
            g.bench_function(format!("compress/{algo}-{level}"), |b| {
                b.iter(|| {
                    out.clear();
                    black_box(comp.compress(&set[p.next()], &mut out).expect("compress"))
                })
            });

            let mut compressed = Vec::with_capacity(PAGES);
            for page in set.chunks(PAGE) {
                out.clear();
                comp.compress(page, &mut out)
                    .expect("compress")
                    .expect("compressible");
                compressed.push(out.clone());
            }
            let mut dec = Decompressor::new();
            let mut dst = vec![0u8; WORKING_SET];
            let mut p = Pages(0);
            g.bench_function(format!("decompress/{algo}-{level}"), |b| {
                b.iter(|| {
                    let r = p.next();
                    let src = &compressed[r.start / PAGE];
                    dec.decompress(algo, src, &mut dst[r]).expect("decompress")
                })
            });
        }
    }

    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    targets = codecs
}
criterion_main!(benches);
