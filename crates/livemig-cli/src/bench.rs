//! `livemig bench`: how fast livemig is, as ratios to limits measured in
//! the same run.
//!
//! References (measured first, same process): memcpy bandwidth over
//! pre-touched buffers, raw loopback TCP and Unix-socket throughput between
//! two threads. Then:
//! - page codecs over a working set, per 4 KiB page, as ratios to a
//!   per-page memcpy of the same working set;
//! - migration of an idle guest (no workload, `NoVm`) over loopback TCP
//!   (and one Unix-socket run) into destination memory that is pre-touched
//!   (and, for two contents, cold), for incompressible, compressible (raw,
//!   lz4, zstd) and mostly-zero guests, as ratios to the link;
//! - XBZRLE off against on, for a live workload that changes a few bytes
//!   per page, under a downtime limit tight enough that pages are re-sent
//!   for a fixed time before the limit is raised;
//! - TLS against plain TCP (see `bench/tls.rs`).
//!
//! The destination is a thread of this process with its own socket end,
//! going through the same transport (`Listener`/`connect`) and `Loader`
//! as `livemig incoming`.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use livemig::codec::compress::{Algorithm, Compressor, Decompressor};
use livemig::codec::{xbzrle, zero};
use livemig::dirty::{DirtyTracker, SoftwareTracker, UffdMode, UffdTracker};
use livemig::engine::{
    memory_digest, ChannelWriter, CompressParams, Destination, LoadStats, MigrationHandle,
    MigrationStats, Params,
};
use livemig::memory::{GuestMemory, ProcessMemory, PAGE_SIZE};
use livemig::testkit::workload::{direct_writer, fill_random, PageWriter, XorShift};
use livemig::transport::{connect, Incoming, Listener, Outgoing, Uri};
use livemig::vm::{NoVm, VmControl};
use serde::Serialize;
use serde_json::{json, Value};

use crate::sys::{cpu_secs, thread_cpu_secs};
use crate::units::{human, parse_mem_size, parse_size};

mod tls;

/// Parts of the benchmark (the references always run: every ratio needs them).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Page codecs against memcpy.
    Codecs,
    /// Idle-guest migration throughput against the link.
    Migration,
    /// XBZRLE off against on under a live workload.
    Xbzrle,
    /// Only the references (memcpy, loopback TCP, Unix socket), which
    /// every run measures: `--only references` skips all the rest.
    References,
    /// TLS against plain loopback TCP: raw stream and migration.
    Tls,
}

/// `livemig bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Small sizes and one run of each (a smoke test, a few seconds).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Runs of each measurement; medians are reported [default: 3, quick 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: Option<u32>,
    /// Guest size of the throughput migrations [default: 1G, quick 16M].
    #[arg(short = 'm', long = "mem", alias = "size", value_parser = parse_mem_size)]
    pub size: Option<u64>,
    /// Each memcpy reference buffer [default: 256M, quick 16M].
    #[arg(long, value_parser = parse_mem_size)]
    pub memcpy_size: Option<u64>,
    /// Bytes sent per socket reference run [default: 1G, quick 64M].
    #[arg(long, value_parser = parse_size)]
    pub link_bytes: Option<u64>,
    /// Codec working set [default: 256M, quick 4M].
    #[arg(long, value_parser = parse_mem_size)]
    pub codec_set: Option<u64>,
    /// Guest size of the XBZRLE comparison [default: 256M, quick 16M].
    #[arg(long = "xbzrle-mem", alias = "xbzrle-size", value_name = "SIZE", value_parser = parse_mem_size)]
    pub xbzrle_size: Option<u64>,
    /// Working set the XBZRLE workload writes [default: 64M, quick 4M].
    #[arg(long, value_parser = parse_mem_size)]
    pub xbzrle_working_set: Option<u64>,
    /// Page-dirtying rate of the XBZRLE workload, bytes of pages per second
    /// [default: 512M, quick 256M].
    #[arg(long, value_parser = parse_size)]
    pub xbzrle_dirty_rate: Option<u64>,
    /// Bandwidth cap of the XBZRLE runs (both): a link slower than the
    /// workload dirties pages, the case XBZRLE is for [default: 256M,
    /// quick 64M].
    #[arg(long, value_parser = parse_size)]
    pub xbzrle_max_bandwidth: Option<u64>,
    /// Bytes the workload writes into each page it touches.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub xbzrle_touch_bytes: u16,
    /// Seconds the XBZRLE runs iterate under the tight downtime limit
    /// before it is raised [default: 4, quick 0.5].
    #[arg(long)]
    pub xbzrle_secs: Option<f64>,
    /// Only these parts (comma-separated); default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Skip the cold-destination migrations.
    #[arg(long)]
    pub no_cold: bool,
    /// Only the migration cases whose name contains one of these
    /// (comma-separated), e.g. `--case incompressible`; a whole value
    /// that is exactly one case's name (`--case "incompressible, tcp,
    /// 1ch"`) runs only that case.
    #[arg(long, value_delimiter = ',')]
    pub case: Vec<String>,
    /// Also write the JSON object to this file.
    #[arg(long)]
    pub save: Option<std::path::PathBuf>,
}

/// Resolved sizes.
#[derive(Clone, Debug, Serialize)]
struct Config {
    quick: bool,
    runs: u32,
    size: u64,
    memcpy_size: u64,
    link_bytes: u64,
    codec_set: u64,
    xbzrle_size: u64,
    xbzrle_working_set: u64,
    xbzrle_dirty_rate: u64,
    xbzrle_max_bandwidth: u64,
    xbzrle_touch_bytes: u16,
    xbzrle_secs: f64,
    xbzrle_cache_size: u64,
}

impl Config {
    fn from(a: &BenchArgs) -> Result<Config> {
        let q = a.quick;
        let pick =
            |v: Option<u64>, full: u64, quick: u64| v.unwrap_or(if q { quick } else { full });
        let xbzrle_size = pick(a.xbzrle_size, 256 << 20, 16 << 20);
        let xbzrle_working_set = pick(a.xbzrle_working_set, 64 << 20, 4 << 20).min(xbzrle_size);
        let c = Config {
            quick: q,
            runs: a.runs.unwrap_or(if q { 1 } else { 3 }),
            size: pick(a.size, 1 << 30, 16 << 20),
            memcpy_size: pick(a.memcpy_size, 256 << 20, 16 << 20),
            link_bytes: pick(a.link_bytes, 1 << 30, 64 << 20).max(1 << 20),
            codec_set: pick(a.codec_set, 256 << 20, 4 << 20),
            xbzrle_size,
            xbzrle_working_set,
            xbzrle_dirty_rate: pick(a.xbzrle_dirty_rate, 512 << 20, 256 << 20),
            xbzrle_max_bandwidth: pick(a.xbzrle_max_bandwidth, 256 << 20, 64 << 20),
            xbzrle_touch_bytes: a.xbzrle_touch_bytes,
            xbzrle_secs: a.xbzrle_secs.unwrap_or(if q { 0.5 } else { 4.0 }),
            // Twice the working set: the cache is direct-mapped by address,
            // so a working set at the start of the block never collides.
            xbzrle_cache_size: (2 * xbzrle_working_set).next_power_of_two(),
        };
        if !(c.xbzrle_secs > 0.0 && c.xbzrle_secs <= 600.0) {
            bail!("--xbzrle-secs must be in (0, 600]");
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------- helpers

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn median_u64(v: &[u64]) -> u64 {
    median(&v.iter().map(|&x| x as f64).collect::<Vec<_>>()).round() as u64
}

/// Bytes per second as GB/s (decimal) for tables.
fn gbs(bps: f64) -> String {
    format!("{:.2}", bps / 1e9)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// A buffer of `len` bytes with every page written (not the shared zero page).
fn touched(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Progress, on stderr so stdout stays a table or one JSON object.
fn note(_json: bool, msg: &str) {
    eprintln!("bench: {msg}");
}

// ------------------------------------------------------------- references

/// Median memcpy bandwidth between two pre-touched buffers of `len`.
fn memcpy_bandwidth(len: usize, runs: u32) -> (f64, Vec<f64>) {
    let src = touched(len, 1);
    let mut dst = touched(len, 2);
    dst.copy_from_slice(&src); // warm-up pass
    let passes = runs.max(5);
    let samples: Vec<f64> = (0..passes)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
            len as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    (median(&samples), samples)
}

/// Sends `total` bytes from `data` (cycled) in 1 MiB writes through `tx`,
/// while a second thread reads them from `rx`; bytes per second from the
/// first write to the reader seeing the end.
fn stream_rate<W: Write + Send, R: Read + Send>(
    mut tx: W,
    mut rx: R,
    data: &[u8],
    total: u64,
    shutdown: impl FnOnce(&mut W),
) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<(u64, Instant)> {
            let mut buf = touched(CHUNK, 3);
            let mut got = 0u64;
            loop {
                let n = rx.read(&mut buf)?;
                if n == 0 {
                    return Ok((got, Instant::now()));
                }
                got += n as u64;
            }
        });
        let t0 = Instant::now();
        let mut sent = 0u64;
        let mut at = 0usize;
        let res = (|| -> std::io::Result<()> {
            while sent < total {
                if at + CHUNK > data.len() {
                    at = 0;
                }
                let n = (CHUNK as u64).min(total - sent) as usize;
                tx.write_all(&data[at..at + n])?;
                at += n;
                sent += n as u64;
            }
            tx.flush()
        })();
        shutdown(&mut tx);
        drop(tx);
        let (got, end) = reader
            .join()
            .map_err(|_| anyhow!("socket reader panicked"))??;
        res?;
        if got != total {
            bail!("socket reference: sent {total} bytes, received {got}");
        }
        Ok(total as f64 / (end - t0).as_secs_f64())
    })
}

fn tcp_rate(data: &[u8], total: u64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let tx = TcpStream::connect(addr)?;
    tx.set_nodelay(true)?; // as livemig's transport does
    let (rx, _) = l.accept()?;
    stream_rate(tx, rx, data, total, |s| {
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// Raw loopback TCP between the migration's own two memories: every block
/// of `src` sent in 1 MiB writes straight from its pages, each read landing
/// in place in the same block of `dst` (as the destination lands runs of
/// raw pages), two threads, nodelay as livemig's transport. Nothing else:
/// no records, checksum, tracker or page search. Returns bytes per second
/// (first write to the reader's last byte), this process's CPU seconds, and
/// the sending and reading threads' own CPU seconds.
fn tcp_memory_rate(src: &ProcessMemory, dst: &ProcessMemory) -> Result<MemoryRun> {
    const CHUNK: usize = 1 << 20;
    let total: u64 = src.blocks().iter().map(|b| b.len()).sum();
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let mut tx = TcpStream::connect(addr)?;
    tx.set_nodelay(true)?; // as livemig's transport does
    let (mut rx, _) = l.accept()?;
    let cpu0 = cpu_secs();
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<(u64, Instant, f64)> {
            let c0 = thread_cpu_secs();
            let mut got = 0u64;
            for blk in dst.blocks() {
                let (region, len) = (blk.region(), blk.len() as usize);
                let mut at = 0usize;
                while at < len {
                    let n = region.read_from(at, CHUNK.min(len - at), &mut rx)?;
                    if n == 0 {
                        return Ok((got, Instant::now(), thread_cpu_secs() - c0));
                    }
                    at += n;
                    got += n as u64;
                }
            }
            Ok((got, Instant::now(), thread_cpu_secs() - c0))
        });
        let t0 = Instant::now();
        let c0 = thread_cpu_secs();
        let res = (|| -> std::io::Result<()> {
            for blk in src.blocks() {
                blk.region()
                    .scan(0, blk.len() as usize, |bytes| {
                        bytes.chunks(CHUNK).try_for_each(|c| tx.write_all(c))
                    })
                    .unwrap_or(Ok(()))?;
            }
            tx.flush()
        })();
        let sender_cpu = thread_cpu_secs() - c0;
        let _ = tx.shutdown(std::net::Shutdown::Write);
        drop(tx);
        let (got, end, reader_cpu) = reader
            .join()
            .map_err(|_| anyhow!("socket reader panicked"))??;
        res?;
        if got != total {
            bail!("memory-to-memory TCP reference: sent {total} bytes, received {got}");
        }
        Ok(MemoryRun {
            bytes_per_sec: total as f64 / (end - t0).as_secs_f64(),
            cpu: cpu_secs() - cpu0,
            sender_cpu,
            reader_cpu,
        })
    })
}

/// One run of [`tcp_memory_rate`].
struct MemoryRun {
    bytes_per_sec: f64,
    /// CPU seconds of the process.
    cpu: f64,
    /// CPU seconds of the sending thread, and of the reading thread.
    sender_cpu: f64,
    reader_cpu: f64,
}

/// Spins before a futex sleep in the shm reference that measures spinning
/// against the default.
const SHM_SPIN: u32 = 2000;

/// Throughput of the shared-memory transport between two threads, with
/// `spin` spins before each futex sleep (0: sleep at once).
fn shm_rate(data: &[u8], total: u64, spin: u32) -> Result<f64> {
    use livemig::transport::shm::{Geometry, Session};
    let path = std::env::temp_dir().join(format!(
        "livemig-bench-shm-{}-{spin}.sock",
        std::process::id()
    ));
    let l = livemig::transport::shm::bind(&path)?;
    let dest = std::thread::spawn(move || -> Result<Session> {
        let (sock, _) = l.accept()?;
        Ok(Session::take(sock)?)
    });
    let src = Session::offer(UnixStream::connect(&path)?, Geometry::default())?
        .with_wait(livemig::transport::IO_TIMEOUT, spin);
    let dst = dest
        .join()
        .map_err(|_| anyhow!("shm accept panicked"))??
        .with_wait(livemig::transport::IO_TIMEOUT, spin);
    let _ = std::fs::remove_file(&path);
    stream_rate(src.writer(), dst.reader(), data, total, |_| {})
}

fn unix_rate(data: &[u8], total: u64) -> Result<f64> {
    let (tx, rx) = UnixStream::pair()?;
    stream_rate(tx, rx, data, total, |s| {
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

#[derive(Clone, Debug, Serialize)]
struct Reference {
    /// Bytes per second (median).
    bytes_per_sec: f64,
    /// Every sample.
    samples: Vec<f64>,
    what: String,
}

#[derive(Clone, Debug, Serialize)]
struct References {
    memcpy: Reference,
    tcp_loopback: Reference,
    /// CPU seconds (both threads) per GiB of the loopback TCP reference.
    tcp_loopback_cpu_secs_per_gib: f64,
    unix_socket: Reference,
    /// The shm transport as configured by default (futex sleep at once).
    shm: Reference,
    /// The shm transport spinning [`SHM_SPIN`] times before each sleep.
    shm_spin: Reference,
}

fn references(c: &Config, json: bool) -> Result<References> {
    note(
        json,
        &format!("memcpy reference ({} buffers)", human(c.memcpy_size)),
    );
    let len = c.memcpy_size as usize;
    let (m, ms) = memcpy_bandwidth(len, c.runs);
    // The link references send from a pre-touched buffer of the same size.
    let data = touched(len.max(1 << 20), 9);
    note(
        json,
        &format!("loopback TCP reference ({} per run)", human(c.link_bytes)),
    );
    let runs = c.runs.max(3);
    let cpu0 = cpu_secs();
    let tcp: Vec<f64> = (0..runs)
        .map(|_| tcp_rate(&data, c.link_bytes))
        .collect::<Result<_>>()?;
    // Both threads' CPU per GiB moved: what the link costs whatever share
    // of the cores a loaded host grants.
    let tcp_cpu = (cpu_secs() - cpu0) / (runs as f64 * c.link_bytes as f64 / (1u64 << 30) as f64);
    note(json, "Unix socket reference");
    let unix: Vec<f64> = (0..runs)
        .map(|_| unix_rate(&data, c.link_bytes))
        .collect::<Result<_>>()?;
    note(json, "shared-memory transport reference");
    let spin = livemig::transport::shm::DEFAULT_SPIN;
    let shm: Vec<f64> = (0..runs)
        .map(|_| shm_rate(&data, c.link_bytes, spin))
        .collect::<Result<_>>()?;
    let shm_spin: Vec<f64> = (0..runs)
        .map(|_| shm_rate(&data, c.link_bytes, SHM_SPIN))
        .collect::<Result<_>>()?;
    Ok(References {
        memcpy: Reference {
            bytes_per_sec: m,
            samples: ms,
            what: format!(
                "copy_from_slice between two pre-touched {} buffers",
                human(c.memcpy_size)
            ),
        },
        tcp_loopback_cpu_secs_per_gib: tcp_cpu,
        tcp_loopback: Reference {
            bytes_per_sec: median(&tcp),
            samples: tcp,
            what: format!(
                "{} in 1 MiB writes over 127.0.0.1 TCP (nodelay), two threads",
                human(c.link_bytes)
            ),
        },
        unix_socket: Reference {
            bytes_per_sec: median(&unix),
            samples: unix,
            what: format!(
                "{} in 1 MiB writes over a Unix stream socket pair, two threads",
                human(c.link_bytes)
            ),
        },
        shm: Reference {
            bytes_per_sec: median(&shm),
            samples: shm,
            what: format!(
                "{} in 1 MiB writes through the shm: transport (default 4 x 256 KiB slots, {spin} spins before a futex sleep), two threads",
                human(c.link_bytes)
            ),
        },
        shm_spin: Reference {
            bytes_per_sec: median(&shm_spin),
            samples: shm_spin,
            what: format!(
                "{} in 1 MiB writes through the shm: transport, {SHM_SPIN} spins before each futex sleep, two threads",
                human(c.link_bytes)
            ),
        },
    })
}

// ------------------------------------------------------------ page content

#[rustfmt::skip]
const WORDS: [&str; 48] = [
    "the", "guest", "page", "memory", "migration", "dirty", "bitmap", "round", "send", "block",
    "kernel", "user", "fault", "write", "protect", "stream", "record", "socket", "buffer", "copy",
    "zero", "delta", "cache", "hit", "miss", "level", "frame", "queue", "thread", "lock", "time",
    "error", "of", "and", "to", "in", "is", "for", "on", "with", "as", "at", "by", "from", "this",
    "that", "an", "or",
];

/// A text-like page: words from a small vocabulary, numbers, line breaks.
/// lz4 roughly halves it, zstd does better; it has no zero runs.
fn text_page(rng: &mut XorShift, out: &mut [u8]) {
    let mut i = 0;
    let mut col = 0;
    while i < out.len() {
        let r = rng.next_u64();
        let mut word = [0u8; 24];
        let w: &[u8] = if r.is_multiple_of(7) {
            let n = (r >> 8) % 100_000;
            let s = n.to_string();
            let l = s.len();
            word[..l].copy_from_slice(s.as_bytes());
            &word[..l]
        } else {
            WORDS[((r >> 16) % WORDS.len() as u64) as usize].as_bytes()
        };
        for &b in w.iter().chain(if col > 60 { b"\n" } else { b" " }) {
            if i == out.len() {
                break;
            }
            out[i] = b;
            i += 1;
        }
        col = if col > 60 { 0 } else { col + w.len() + 1 };
    }
}

/// Guest contents of the throughput migrations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Content {
    /// Pseudo-random bytes in every page.
    Incompressible,
    /// Text-like pages.
    Compressible,
    /// 95% zero pages (written zeros), 5% random pages, spread out.
    MostlyZero,
}

/// Writes every page of `mem` (so all of it is populated).
fn fill_content(mem: &ProcessMemory, content: Content) {
    let blocks = mem.blocks().to_vec();
    match content {
        Content::Incompressible => {
            fill_random(&blocks, &direct_writer(blocks.clone()), 0x5eed);
        }
        Content::Compressible => {
            // A pool of distinct pages, tiled with the page number stamped
            // in: pages compress independently, so tiling changes nothing
            // for the codec and saves generating a gigabyte of text.
            let mut rng = XorShift::new(77);
            let pool_pages = 2048;
            let mut pool = vec![0u8; pool_pages * PAGE_SIZE];
            for p in pool.chunks_mut(PAGE_SIZE) {
                text_page(&mut rng, p);
            }
            let mut page = vec![0u8; PAGE_SIZE];
            let mut n = 0usize;
            for blk in &blocks {
                for off in (0..blk.len()).step_by(PAGE_SIZE) {
                    let i = n % pool_pages;
                    page.copy_from_slice(&pool[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                    let stamp = format!("{n:08}");
                    page[..8].copy_from_slice(stamp.as_bytes());
                    blk.region().write(off as usize, &page);
                    n += 1;
                }
            }
        }
        Content::MostlyZero => {
            let mut rng = XorShift::new(5);
            let mut page = vec![0u8; PAGE_SIZE];
            let zeros = vec![0u8; PAGE_SIZE];
            for blk in &blocks {
                for off in (0..blk.len()).step_by(PAGE_SIZE) {
                    if rng.next_u64().is_multiple_of(20) {
                        rng.fill(&mut page);
                        blk.region().write(off as usize, &page);
                    } else {
                        blk.region().write(off as usize, &zeros);
                    }
                }
            }
        }
    }
}

/// Writes zeros over all of `mem` (keeps it resident and zero).
fn zero_memory(mem: &ProcessMemory) {
    let zeros = vec![0u8; 1 << 20];
    for blk in mem.blocks() {
        let mut off = 0u64;
        while off < blk.len() {
            let n = (zeros.len() as u64).min(blk.len() - off) as usize;
            blk.region().write(off as usize, &zeros[..n]);
            off += n as u64;
        }
    }
}

// ------------------------------------------------------------------ codecs

#[derive(Clone, Debug, Serialize)]
struct CodecRow {
    name: String,
    /// Bytes of page processed per second (median).
    bytes_per_sec: f64,
    /// Over per-page memcpy of the same working set: the median of the
    /// ratios of paired passes (memcpy, codec), each timed in thread CPU
    /// time.
    ratio_to_memcpy: f64,
    /// Over the memcpy reference (big buffers).
    ratio_to_memcpy_reference: f64,
    /// Output bytes per page (encoders), when meaningful.
    #[serde(skip_serializing_if = "Option::is_none")]
    out_bytes_per_page: Option<f64>,
}

/// Thread CPU seconds `f` takes: the time this thread ran, not the time it
/// waited for one of the shared CPUs.
fn cpu_timed(f: impl FnOnce()) -> f64 {
    let t = crate::sys::thread_cpu_secs();
    f();
    (crate::sys::thread_cpu_secs() - t).max(1e-9)
}

/// Paired passes per codec row for `runs`: at least 9. One pass over the
/// 256 MiB set takes ~20 ms here, and within one process the ratio of a
/// row drifts by up to 0.3 over a few seconds (the host's memory
/// bandwidth, shared with other guests), so 3 pairs let one slow stretch
/// decide a row.
fn codec_pairs(runs: u32) -> u32 {
    (3 * runs).max(9)
}

/// A codec measured against per-page memcpy in pairs: after a warm-up of
/// each, [`codec_pairs`]`(runs)` times a memcpy pass over `memcpy_bytes` then
/// a codec pass over `bytes`, each timed in this thread's CPU time. The
/// ratio is the median of the pairs' ratios, so a slow stretch of the
/// machine hits both sides of a pair; the rate is the median codec pass.
fn paired(
    memcpy_bytes: usize,
    bytes: usize,
    runs: u32,
    memcpy: &mut dyn FnMut(),
    pass: &mut dyn FnMut(),
) -> (f64, f64) {
    memcpy();
    pass();
    let (rates, ratios): (Vec<f64>, Vec<f64>) = (0..codec_pairs(runs))
        .map(|_| {
            let m = memcpy_bytes as f64 / cpu_timed(&mut *memcpy);
            let c = bytes as f64 / cpu_timed(&mut *pass);
            (c, c / m)
        })
        .unzip();
    (median(&rates), median(&ratios))
}

/// The pages of the sparse-change XBZRLE rows: `old` with 8 bytes of each
/// page changed (a counter, a flag, a pointer).
fn sparse_changes(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    for page in new.chunks_mut(PAGE_SIZE) {
        for at in [8, 9, 1000, 2048, 2049, 2050, 2051, 4000] {
            page[at] ^= 0x5a;
        }
    }
    new
}

/// A two-page buffer and the index in it where a page starts at the same
/// offset within a 4 KiB page as `like` does.
fn page_like(like: &[u8]) -> (Vec<u8>, usize) {
    let buf = vec![0u8; 2 * PAGE_SIZE];
    let want = like.as_ptr() as usize % PAGE_SIZE;
    let at = (want + PAGE_SIZE - buf.as_ptr() as usize % PAGE_SIZE) % PAGE_SIZE;
    (buf, at)
}

/// Page indices `0..pages` in a fixed shuffled order.
fn shuffled(pages: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pages).collect();
    let mut rng = XorShift::new(41);
    for i in (1..pages).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

fn codecs(c: &Config, refs: &References, json: bool) -> Result<Vec<CodecRow>> {
    note(
        json,
        &format!("page codecs over a {} working set", human(c.codec_set)),
    );
    let ws = c.codec_set as usize;
    let pages = ws / PAGE_SIZE;
    let runs = c.runs;
    // (name, bytes/s, ratio to the paired memcpy, out bytes per page)
    let mut rows: Vec<(String, f64, f64, Option<f64>)> = Vec::new();

    let old = touched(ws, 21);
    let mut dst = touched(ws, 22);
    let copy_all = |dst: &mut [u8]| {
        for (d, s) in dst.chunks_mut(PAGE_SIZE).zip(old.chunks(PAGE_SIZE)) {
            d.copy_from_slice(black_box(s));
        }
        black_box(&dst);
    };
    let mut memcpy = || copy_all(&mut dst);
    {
        let mut bps = Vec::new();
        for _ in 0..codec_pairs(runs) {
            bps.push(ws as f64 / cpu_timed(&mut memcpy));
        }
        rows.push(("memcpy (per page)".into(), median(&bps), 1.0, None));
    }
    {
        let mut zeros = touched(ws, 23);
        zeros.fill(0); // real zeroed pages, not the shared zero page
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            for p in zeros.chunks(PAGE_SIZE) {
                assert!(zero::is_zero(black_box(p)));
            }
        });
        rows.push((
            format!("zero detection, zero page ({})", zero::implementation()),
            bps,
            r,
            None,
        ));
    }
    {
        let new = sparse_changes(&old);
        let mut out = vec![0u8; PAGE_SIZE];
        let mut encoded_len = 0usize;
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            encoded_len = 0;
            for (o, n) in old.chunks(PAGE_SIZE).zip(new.chunks(PAGE_SIZE)) {
                encoded_len += black_box(xbzrle::encode(o, n, &mut out)).unwrap_or(PAGE_SIZE);
            }
        });
        rows.push((
            format!(
                "xbzrle encode, 8 bytes changed ({})",
                xbzrle::implementation()
            ),
            bps,
            r,
            Some(encoded_len as f64 / pages as f64),
        ));
        if xbzrle::implementation() != "scalar" {
            let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
                for (o, n) in old.chunks(PAGE_SIZE).zip(new.chunks(PAGE_SIZE)) {
                    let _ = black_box(xbzrle::encode_portable(o, n, &mut out));
                }
            });
            rows.push((
                "xbzrle encode, 8 bytes changed (scalar)".into(),
                bps,
                r,
                None,
            ));
        }
        // The encoder's ceiling: both pages read and compared, no run to
        // write (an unchanged page).
        let same = old.clone();
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            for (o, n) in old.chunks(PAGE_SIZE).zip(same.chunks(PAGE_SIZE)) {
                let _ = black_box(xbzrle::encode(o, n, &mut out));
            }
        });
        drop(same);
        rows.push((
            "xbzrle encode, unchanged page (reads only)".into(),
            bps,
            r,
            None,
        ));
        // Half of that: a page encoded against itself reads one page from
        // memory (the second read of each line hits the cache). Twice this
        // row's time is what reading the two pages of any encoder costs.
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            for o in old.chunks(PAGE_SIZE) {
                let _ = black_box(xbzrle::encode(o, black_box(o), &mut out));
            }
        });
        rows.push((
            "xbzrle encode, page against itself (reads one page)".into(),
            bps,
            r,
            None,
        ));
        // The same pages with the new copy 8 bytes further into its
        // 64-byte line than the old one (the encoder lays its loads on the
        // old page's lines, so here every load of the new page spans two
        // lines); the memcpy reference is the same as the row above's.
        let mut shifted = vec![0u8; ws + 64];
        let skew = (8 + old.as_ptr() as usize % 64 + 64 - shifted.as_ptr() as usize % 64) % 64;
        shifted[skew..skew + ws].copy_from_slice(&new);
        let new_skewed = &shifted[skew..skew + ws];
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            for (o, n) in old.chunks(PAGE_SIZE).zip(new_skewed.chunks(PAGE_SIZE)) {
                let _ = black_box(xbzrle::encode(o, n, &mut out));
            }
        });
        drop(shifted);
        rows.push((
            "xbzrle encode, 8 bytes changed, new page 8 B off ~".into(),
            bps,
            r,
            None,
        ));
        // Pages in random order, as the engine meets them (a cache slot
        // and a staged page, not neighbours), against memcpy in that order.
        let order = shuffled(pages);
        let at = |p: usize| p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
        let mut scattered_memcpy = || {
            for &p in &order {
                dst[at(p)].copy_from_slice(black_box(&old[at(p)]));
            }
            black_box(&dst);
        };
        let (bps, r) = paired(ws, ws, runs, &mut scattered_memcpy, &mut || {
            for &p in &order {
                let _ = black_box(xbzrle::encode(&old[at(p)], &new[at(p)], &mut out));
            }
        });
        rows.push((
            "xbzrle encode, 8 bytes changed, shuffled *".into(),
            bps,
            r,
            None,
        ));
        // The engine's case: the new page was just staged (copied into a
        // buffer that stays in cache) and only the cached old copy is
        // cold; against a per-page memcpy from the same cold pages into
        // one page buffer that stays in cache (the raw path's staging
        // copy). Every old page holds the same bytes so that one staged
        // page differs from each in the same 8 bytes.
        let mut cold = touched(ws, 25);
        for p in cold.chunks_mut(PAGE_SIZE) {
            p.copy_from_slice(&old[..PAGE_SIZE]);
        }
        // The staged page and the memcpy's page buffer sit at the cold
        // pages' offset within a 4 KiB page (as `old` and `dst` do in the
        // rows above): where the allocator happened to put a 4 KiB buffer
        // moved this memcpy by up to 1.5x between builds of the same code.
        let (mut staged_buf, at) = page_like(&cold);
        staged_buf[at..at + PAGE_SIZE].copy_from_slice(&sparse_changes(&old[..PAGE_SIZE]));
        let staged = &staged_buf[at..at + PAGE_SIZE];
        let (mut buffer_buf, at) = page_like(&cold);
        let buffer = &mut buffer_buf[at..at + PAGE_SIZE];
        let mut staging_memcpy = || {
            for p in cold.chunks(PAGE_SIZE) {
                buffer.copy_from_slice(black_box(p));
                black_box(&buffer);
            }
        };
        let (bps, r) = paired(ws, ws, runs, &mut staging_memcpy, &mut || {
            for o in cold.chunks(PAGE_SIZE) {
                let _ = black_box(xbzrle::encode(o, black_box(staged), &mut out));
            }
        });
        drop(cold);
        rows.push((
            "xbzrle encode, 8 bytes changed, staged +".into(),
            bps,
            r,
            None,
        ));
        let mut memcpy = || copy_all(&mut dst);
        let mut encoded = Vec::with_capacity(pages);
        for (o, n) in old.chunks(PAGE_SIZE).zip(new.chunks(PAGE_SIZE)) {
            let len = xbzrle::encode(o, n, &mut out).map_err(|e| anyhow!("xbzrle: {e}"))?;
            encoded.push(out[..len].to_vec());
        }
        drop(new);
        let mut target = old.clone();
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            for (e, t) in encoded.iter().zip(target.chunks_mut(PAGE_SIZE)) {
                black_box(xbzrle::decode(e, t)).expect("decodes");
            }
        });
        rows.push(("xbzrle decode, 8 bytes changed".into(), bps, r, None));
        drop(target);
        let changed: Vec<u8> = old.iter().map(|b| !b).collect();
        let (bps, r) = paired(ws, ws, runs, &mut memcpy, &mut || {
            for (o, n) in old.chunks(PAGE_SIZE).zip(changed.chunks(PAGE_SIZE)) {
                let _ = black_box(xbzrle::encode(o, n, &mut out));
            }
        });
        rows.push(("xbzrle encode, all changed (overflow)".into(), bps, r, None));
    }
    let mut memcpy = || copy_all(&mut dst);
    {
        let set = ws.min(COMPRESS_SET_MAX);
        let set_pages = set / PAGE_SIZE;
        let set_note = if set < ws {
            format!(" ({} set)", human(set as u64))
        } else {
            String::new()
        };
        let mut rng = XorShift::new(31);
        let mut text = vec![0u8; set];
        for p in text.chunks_mut(PAGE_SIZE) {
            text_page(&mut rng, p);
        }
        for (algo, level) in [
            (Algorithm::Lz4, 1),
            (Algorithm::Zstd, 1),
            (Algorithm::Zstd, 3),
        ] {
            let mut comp = Compressor::new(algo, level).map_err(|e| anyhow!("{algo}: {e}"))?;
            let mut out = Vec::with_capacity(2 * PAGE_SIZE);
            let mut total_out = 0usize;
            let (bps, r) = paired(ws, set, runs, &mut memcpy, &mut || {
                total_out = 0;
                for p in text.chunks(PAGE_SIZE) {
                    out.clear();
                    total_out += comp
                        .compress(black_box(p), &mut out)
                        .expect("compress")
                        .unwrap_or(PAGE_SIZE);
                }
            });
            let name = format!("{algo}-{level}");
            rows.push((
                format!("compress {name}, text page{set_note}"),
                bps,
                r,
                Some(total_out as f64 / set_pages as f64),
            ));
            let mut compressed = Vec::with_capacity(set_pages);
            for p in text.chunks(PAGE_SIZE) {
                out.clear();
                match comp.compress(p, &mut out).map_err(|e| anyhow!("{e}"))? {
                    Some(n) => compressed.push(out[..n].to_vec()),
                    None => bail!("{name} did not compress a text page enough"),
                }
            }
            let mut dec = Decompressor::new();
            let mut to = touched(set, 24);
            let (bps, r) = paired(ws, set, runs, &mut memcpy, &mut || {
                for (s, d) in compressed.iter().zip(to.chunks_mut(PAGE_SIZE)) {
                    dec.decompress(algo, s, d).expect("decompress");
                }
            });
            rows.push((format!("decompress {name}{set_note}"), bps, r, None));
        }
    }
    Ok(rows
        .into_iter()
        .map(|(name, bps, r, out)| CodecRow {
            name,
            bytes_per_sec: bps,
            ratio_to_memcpy: r,
            ratio_to_memcpy_reference: ratio(bps, refs.memcpy.bytes_per_sec),
            out_bytes_per_page: out,
        })
        .collect())
}

// --------------------------------------------------------------- migration

/// Transport of a migration run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Link {
    Tcp,
    Unix,
    Shm,
}

/// One migration: what the source reported, what the destination loaded.
struct MigRun {
    secs: f64,
    /// CPU seconds this process used (source, destination and their
    /// kernel work), user + system.
    cpu: f64,
    /// CPU seconds of the source's thread, and of the destination's.
    source_cpu: f64,
    destination_cpu: f64,
    stats: MigrationStats,
    load: LoadStats,
}

/// A tracker over `mem` and the writer a workload must write through:
/// userfaultfd write-protect when the kernel allows it, else the software
/// log (its writer records the writes).
fn tracker_for(mem: &ProcessMemory) -> (Box<dyn DirtyTracker>, PageWriter) {
    match UffdTracker::new(mem, UffdMode::Auto) {
        Ok(t) => (Box::new(t), direct_writer(mem.blocks().to_vec())),
        Err(e) => {
            log::warn!("userfaultfd tracking unavailable ({e}); using the software log");
            let (t, log) = SoftwareTracker::new(mem);
            let writer: PageWriter =
                std::sync::Arc::new(move |b: usize, off: u64, d: &[u8]| log.write(b, off, d));
            (Box::new(t), writer)
        }
    }
}

fn bind(link: Link) -> Result<Listener> {
    let uri = match link {
        Link::Tcp => Uri::Tcp("127.0.0.1:0".into()),
        Link::Unix => Uri::Unix(std::env::temp_dir().join(format!(
            "livemig-bench-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ))),
        Link::Shm => Uri::Shm(std::env::temp_dir().join(format!(
            "livemig-bench-shm-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ))),
    };
    Ok(Listener::bind(&uri)?)
}

/// The destination of a bench migration: loads `dst` from the first
/// connection `accept` brings and from the page channels it brings next,
/// then answers the source's completion handshake (go, then started; or
/// the load's failure).
fn receive<E>(
    dst: &ProcessMemory,
    mut accept: impl FnMut() -> Result<Incoming, E>,
) -> Result<LoadStats>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let inc = accept()?;
    let mut more = || accept().map(|i| i.reader).map_err(std::io::Error::other);
    let arrived = Destination::new(dst, &mut livemig::vm::NoVm)
        .run(inc, &mut more)
        .context("destination")?;
    Ok(arrived.load.stats)
}

/// The source of a bench migration: sends `src` over `out`, opening page
/// channels with `open`.
fn send(
    src: &ProcessMemory,
    tracker: &mut dyn DirtyTracker,
    vm: &mut dyn VmControl,
    handle: &MigrationHandle,
    out: Outgoing,
    open: &mut dyn FnMut(u16) -> std::io::Result<ChannelWriter>,
) -> Result<MigrationStats> {
    let mut ack = out.ack;
    livemig::engine::Source::new(src, tracker, vm, handle.clone())
        .run_with_channels(
            out.writer,
            ack.as_deref_mut().map(|r| r as &mut dyn Read),
            open,
        )
        .map_err(anyhow::Error::from)
}

/// The end of a bench migration that took `secs` (wall) since `cpu0`
/// (CPU): waits for the destination, then the source's `result` and the
/// destination's decide.
fn finish(
    secs: f64,
    cpu0: f64,
    source_cpu: f64,
    dest: std::thread::ScopedJoinHandle<'_, (Result<LoadStats>, f64)>,
    result: Result<MigrationStats>,
) -> Result<MigRun> {
    let (load, destination_cpu) = dest.join().map_err(|_| anyhow!("destination panicked"))?;
    let cpu = cpu_secs() - cpu0;
    let stats = result.context("source")?;
    let load = load?;
    Ok(MigRun {
        secs,
        cpu,
        source_cpu,
        destination_cpu,
        stats,
        load,
    })
}

/// Steers a running migration from its own thread; the receiver
/// disconnects when the migration has ended.
type Controller = dyn Fn(&MigrationHandle, mpsc::Receiver<()>) + Sync;

/// Migrates `src` into `dst` over `link`. `control` runs on its own thread
/// while the migration runs (it may change parameters); it gets a receiver
/// that disconnects when the migration has ended.
fn migrate_once(
    src: &ProcessMemory,
    dst: &ProcessMemory,
    tracker: &mut dyn DirtyTracker,
    vm: &mut dyn VmControl,
    params: Params,
    link: Link,
    control: Option<&Controller>,
) -> Result<MigRun> {
    let listener = bind(link)?;
    let target = listener.local_uri();
    let handle = MigrationHandle::new(params);
    std::thread::scope(|s| {
        let dest = s.spawn(|| {
            let c0 = thread_cpu_secs();
            let r = receive(dst, || listener.accept());
            (r, thread_cpu_secs() - c0)
        });
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let ctl = control.map(|f| {
            let h = handle.clone();
            s.spawn(move || f(&h, done_rx))
        });
        let cpu0 = cpu_secs();
        let thread0 = thread_cpu_secs();
        let t0 = Instant::now();
        let result = match connect(&target) {
            Ok(out) => send(src, tracker, vm, &handle, out, &mut |_| {
                Ok(connect(&target).map_err(std::io::Error::other)?.writer)
            }),
            Err(e) => {
                // Unblock the destination's accept before failing.
                let _ = connect(&target);
                Err(e.into())
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        let source_cpu = thread_cpu_secs() - thread0;
        drop(done_tx);
        if let Some(c) = ctl {
            let _ = c.join();
        }
        finish(secs, cpu0, source_cpu, dest, result)
    })
}

#[derive(Clone, Debug, Serialize)]
struct RunFig {
    secs: f64,
    cpu_secs: f64,
    /// CPU seconds of the source's thread and of the destination's (each
    /// with the kernel work run on its behalf, e.g. loopback TCP's).
    source_thread_cpu_secs: f64,
    destination_thread_cpu_secs: f64,
    stream_bytes: u64,
    guest_bytes_per_sec: f64,
    stream_bytes_per_sec: f64,
}

/// Raw loopback TCP between the migration's own source and destination
/// memory ([`tcp_memory_rate`]), one run right before each migration run.
#[derive(Clone, Debug, Serialize)]
struct SameMemoryTcp {
    /// Bytes per second (median of the runs).
    bytes_per_sec: f64,
    /// Every run.
    samples: Vec<f64>,
    /// CPU seconds per GiB (median), this process (both threads).
    cpu_secs_per_gib: f64,
    /// CPU seconds per GiB (median) of the sending thread and of the
    /// reading thread.
    sender_thread_cpu_secs_per_gib: f64,
    reader_thread_cpu_secs_per_gib: f64,
    /// Each migration run's guest throughput over the reference run just
    /// before it.
    run_ratios: Vec<f64>,
    /// Median of `run_ratios`.
    guest_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
struct MigRow {
    name: String,
    /// Page channels (1 = one stream).
    channels: u16,
    /// CPU seconds per GiB of guest moved (median), both sides.
    cpu_secs_per_gib: f64,
    /// CPU seconds per GiB (median) of the source's thread and of the
    /// destination's: on an idle host each has a core, and the busier one
    /// bounds the throughput.
    source_thread_cpu_secs_per_gib: f64,
    destination_thread_cpu_secs_per_gib: f64,
    /// CPU busy share of the 2-core budget: cpu seconds / (wall seconds x cores).
    cpu_share: f64,
    content: Content,
    link: Link,
    /// "pre-touched" or "cold".
    dest: &'static str,
    compress: Option<String>,
    guest_bytes: u64,
    /// Median over runs.
    secs: f64,
    /// The median run took under 10 ms: its ratios are timer and setup
    /// noise, not throughput.
    noise: bool,
    stream_bytes: u64,
    guest_bytes_per_sec: f64,
    stream_bytes_per_sec: f64,
    /// Stream throughput over the matching link reference.
    stream_ratio_to_link: f64,
    /// Guest bytes moved per second over the matching link reference
    /// (above 1 when zero pages or compression shrink the stream).
    guest_ratio_to_link: f64,
    /// Guest bytes moved per second over memcpy bandwidth.
    guest_ratio_to_memcpy: f64,
    /// Guest bytes moved per second over raw loopback TCP (whatever the
    /// link): how a transport compares with TCP on the same guest.
    guest_ratio_to_tcp: f64,
    /// Guest throughput over that of the same case (content, channels,
    /// destination, compression) migrated over TCP in this run, when that
    /// case ran: above 1 = faster than the TCP migration.
    guest_ratio_to_tcp_migration: Option<f64>,
    /// One-stream TCP cases into pre-touched memory: raw loopback TCP
    /// between the same two memories, interleaved run by run.
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_same_memory: Option<SameMemoryTcp>,
    /// The reference that bounds this case.
    limit: &'static str,
    /// Guest throughput over that limit.
    ratio_to_limit: f64,
    pages: Value,
    tracker: String,
    /// Destination memory digest equal to the source's (checked after the
    /// first run, outside the timing).
    verified: bool,
    runs: Vec<RunFig>,
}

struct Scenario {
    name: String,
    channels: u16,
    content: Content,
    link: Link,
    cold: bool,
    compress: Option<CompressParams>,
    /// Adaptive encoding (the default); false compresses every page.
    adaptive: bool,
    /// Bandwidth cap, bytes/s (0 = none).
    cap: u64,
}

/// Bandwidth caps of the capped-link cases: a link about as fast as the
/// compressors here, and one much slower, where compressing pays.
const CAPPED_LINKS: [u64; 2] = [200 << 20, 25 << 20];

/// Seconds a capped-link case is sized to take at its cap (its guest is
/// the power of two at or above cap x this, at most `--mem`): long enough
/// for the cap to pace it, short enough for three runs of each.
const CAPPED_SECS: f64 = 1.0;

/// Guest size of a capped-link case at `cap` bytes/s with `--mem` `size`.
fn capped_guest(size: u64, cap: u64) -> u64 {
    size.min(((cap as f64 * CAPPED_SECS) as u64).next_power_of_two())
}

/// Shortest time a capped case must take at its cap to be run: shorter
/// runs finish inside the rate limiter's first grant.
const MIN_CAPPED_SECS: f64 = 0.5;

/// Runs shorter than this are dominated by setup and timer noise: their
/// ratios are marked in the table.
const NOISE_SECS: f64 = 0.010;

/// Largest guest of the compressed migrations.
const COMPRESSED_GUEST_MAX: u64 = 256 << 20;

/// Largest working set of the compression codecs (compute-bound: a
/// bigger set only makes the run longer).
const COMPRESS_SET_MAX: usize = 64 << 20;

fn migration(
    c: &Config,
    refs: &References,
    json: bool,
    no_cold: bool,
    cases: &[String],
) -> Result<(Vec<MigRow>, Vec<String>)> {
    let lz4 = Some(CompressParams {
        algorithm: Algorithm::Lz4,
        level: 1,
    });
    let zstd = Some(CompressParams {
        algorithm: Algorithm::Zstd,
        level: 1,
    });
    let sc = |name: &str, content, link, cold, compress| Scenario {
        name: name.to_string(),
        channels: 1,
        content,
        link,
        cold,
        compress,
        adaptive: true,
        cap: 0,
    };
    let every_page = |mut s: Scenario| {
        s.adaptive = false;
        s.name.push_str(", every page");
        s
    };
    let capped = |cap: u64, mut s: Scenario| {
        s.cap = cap;
        s.name.push_str(&format!(", {}/s cap", human(cap)));
        s
    };
    use Content::*;
    let mut list = vec![
        sc(
            "incompressible, cold dest",
            Incompressible,
            Link::Tcp,
            true,
            None,
        ),
        sc("compressible, raw", Compressible, Link::Tcp, false, None),
        sc("compressible, zstd-1", Compressible, Link::Tcp, false, zstd),
        every_page(sc(
            "compressible, zstd-1",
            Compressible,
            Link::Tcp,
            false,
            zstd,
        )),
        sc("incompressible, lz4", Incompressible, Link::Tcp, false, lz4),
        every_page(sc(
            "incompressible, lz4",
            Incompressible,
            Link::Tcp,
            false,
            lz4,
        )),
        sc("mostly-zero, cold dest", MostlyZero, Link::Tcp, true, None),
    ];
    for cap in CAPPED_LINKS {
        let c = |s| capped(cap, s);
        list.push(c(sc(
            "compressible, raw",
            Compressible,
            Link::Tcp,
            false,
            None,
        )));
        list.push(c(sc(
            "compressible, lz4",
            Compressible,
            Link::Tcp,
            false,
            lz4,
        )));
        list.push(c(every_page(sc(
            "compressible, lz4",
            Compressible,
            Link::Tcp,
            false,
            lz4,
        ))));
    }
    // Parallel channels: 1, 2 and 4 for three contents over both links.
    for (label, content, compress) in [
        ("incompressible", Incompressible, None),
        ("compressible lz4", Compressible, lz4),
        ("mostly-zero", MostlyZero, None),
    ] {
        for link in [Link::Tcp, Link::Unix, Link::Shm] {
            for channels in [1u16, 2, 4] {
                let l = match link {
                    Link::Tcp => "tcp",
                    Link::Unix => "unix",
                    Link::Shm => "shm",
                };
                let mut s = sc(
                    &format!("{label}, {l}, {channels}ch"),
                    content,
                    link,
                    false,
                    compress,
                );
                s.channels = channels;
                list.push(s);
            }
        }
    }
    // A cap only paces a run that lasts: a guest moved in well under a
    // second at the cap's rate fits in the limiter's first grant and would
    // report the uncapped rate under a "cap" label.
    let mut skipped = Vec::new();
    list.retain(|s| {
        let capped_size = capped_guest(c.size, s.cap);
        let paced = s.cap == 0 || capped_size as f64 / s.cap as f64 >= MIN_CAPPED_SECS;
        if !paced {
            let why = format!(
                "\"{}\": a {} guest takes {:.2} s at the cap, too short to be paced \
                 (-m {} or more runs it)",
                s.name,
                human(capped_size),
                capped_size as f64 / s.cap as f64,
                human(capped_guest(u64::MAX, s.cap)),
            );
            note(json, &format!("skipping {why}"));
            skipped.push(why);
        }
        paced
    });
    if no_cold {
        list.retain(|s| !s.cold);
    }
    if !cases.is_empty() {
        // Names hold commas, which the option splits on: the whole value
        // naming one case exactly selects only that case.
        let whole = cases.join(",");
        if list.iter().any(|s| s.name == whole) {
            list.retain(|s| s.name == whole);
        } else {
            list.retain(|s| cases.iter().any(|c| s.name.contains(c.as_str())));
        }
    }
    // Source and pre-touched destination memory of each guest size, and
    // what the source holds.
    let mut guests: Vec<(u64, ProcessMemory, ProcessMemory, Option<Content>)> = Vec::new();
    let mut rows = Vec::new();
    for s in &list {
        // Compression runs at a fraction of link speed here: a smaller
        // guest keeps the run short; throughput does not depend on size.
        let size = if s.cap > 0 {
            capped_guest(c.size, s.cap)
        } else if s.compress.is_some() {
            c.size.min(COMPRESSED_GUEST_MAX)
        } else {
            c.size
        };
        let layout = [("ram0", size)];
        let at = match guests.iter().position(|g| g.0 == size) {
            Some(i) => i,
            None => {
                let src = ProcessMemory::new(&layout)?;
                let warm = ProcessMemory::new(&layout)?;
                zero_memory(&warm);
                guests.push((size, src, warm, None));
                guests.len() - 1
            }
        };
        let (_, src, warm, filled) = &mut guests[at];
        if *filled != Some(s.content) {
            note(
                json,
                &format!("filling a {} guest: {:?}", human(size), s.content),
            );
            fill_content(src, s.content);
            *filled = Some(s.content);
        }
        let (src, warm) = (&*src, &*warm);
        note(json, &format!("migrating: {}", s.name));
        let params = Params {
            compress: s.compress,
            verify: false,
            channels: s.channels,
            adaptive_encoding: s.adaptive,
            max_bandwidth: s.cap,
            // Under a cap, a short downtime limit keeps the uncapped
            // final pass short, so the cap paces nearly the whole run.
            downtime_limit: if s.cap > 0 {
                30
            } else {
                Params::default().downtime_limit
            },
            ..Params::default()
        };
        let mut runs = Vec::new();
        let mut last: Option<MigRun> = None;
        let mut verified = false;
        // (bytes/s, CPU s) of raw TCP between the same memories, each run
        // right before the migration run it is compared with.
        let same_memory = s.link == Link::Tcp && s.channels == 1 && !s.cold;
        let mut refs_mem: Vec<MemoryRun> = Vec::new();
        for i in 0..c.runs {
            if same_memory {
                zero_memory(warm);
                refs_mem.push(tcp_memory_rate(src, warm)?);
            }
            let cold_mem;
            let dst = if s.cold {
                cold_mem = ProcessMemory::new(&layout)?;
                &cold_mem
            } else {
                zero_memory(warm);
                warm
            };
            let (mut tracker, _) = tracker_for(src);
            let r = migrate_once(
                src,
                dst,
                tracker.as_mut(),
                &mut NoVm,
                params.clone(),
                s.link,
                None,
            )?;
            if i == 0 {
                verified = memory_digest(src) == memory_digest(dst);
                if !verified {
                    bail!("{}: destination memory differs from the source", s.name);
                }
            }
            let stream = r.stats.ram.transferred;
            runs.push(RunFig {
                secs: r.secs,
                cpu_secs: r.cpu,
                source_thread_cpu_secs: r.source_cpu,
                destination_thread_cpu_secs: r.destination_cpu,
                stream_bytes: stream,
                guest_bytes_per_sec: size as f64 / r.secs,
                stream_bytes_per_sec: stream as f64 / r.secs,
            });
            last = Some(r);
        }
        let last = last.expect("at least one run");
        let link_ref = match s.link {
            Link::Tcp => refs.tcp_loopback.bytes_per_sec,
            Link::Unix => refs.unix_socket.bytes_per_sec,
            Link::Shm => refs.shm.bytes_per_sec,
        };
        let g = median(
            &runs
                .iter()
                .map(|r| r.guest_bytes_per_sec)
                .collect::<Vec<_>>(),
        );
        let st = median(
            &runs
                .iter()
                .map(|r| r.stream_bytes_per_sec)
                .collect::<Vec<_>>(),
        );
        let (limit, lim_bps) = match (s.content, s.link) {
            _ if s.cap > 0 => ("bandwidth cap", s.cap as f64),
            (MostlyZero, _) => ("memcpy", refs.memcpy.bytes_per_sec),
            (_, Link::Tcp) => ("tcp-loopback", link_ref),
            (_, Link::Unix) => ("unix-socket", link_ref),
            (_, Link::Shm) => ("memcpy", refs.memcpy.bytes_per_sec),
        };
        let cpu = median(&runs.iter().map(|r| r.cpu_secs).collect::<Vec<_>>());
        let wall = median(&runs.iter().map(|r| r.secs).collect::<Vec<_>>());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let gib = size as f64 / (1u64 << 30) as f64;
        let tcp_same_memory = (!refs_mem.is_empty()).then(|| {
            let samples: Vec<f64> = refs_mem.iter().map(|r| r.bytes_per_sec).collect();
            let per_gib = |f: &dyn Fn(&MemoryRun) -> f64| {
                median(&refs_mem.iter().map(|r| f(r) / gib).collect::<Vec<_>>())
            };
            let run_ratios: Vec<f64> = runs
                .iter()
                .zip(&samples)
                .map(|(r, &t)| ratio(r.guest_bytes_per_sec, t))
                .collect();
            SameMemoryTcp {
                bytes_per_sec: median(&samples),
                cpu_secs_per_gib: per_gib(&|r| r.cpu),
                sender_thread_cpu_secs_per_gib: per_gib(&|r| r.sender_cpu),
                reader_thread_cpu_secs_per_gib: per_gib(&|r| r.reader_cpu),
                guest_ratio: median(&run_ratios),
                run_ratios,
                samples,
            }
        });
        rows.push(MigRow {
            name: s.name.clone(),
            channels: s.channels,
            cpu_secs_per_gib: cpu / gib,
            source_thread_cpu_secs_per_gib: median(
                &runs
                    .iter()
                    .map(|r| r.source_thread_cpu_secs / gib)
                    .collect::<Vec<_>>(),
            ),
            destination_thread_cpu_secs_per_gib: median(
                &runs
                    .iter()
                    .map(|r| r.destination_thread_cpu_secs / gib)
                    .collect::<Vec<_>>(),
            ),
            cpu_share: cpu / (wall * cores),
            content: s.content,
            link: s.link,
            dest: if s.cold { "cold" } else { "pre-touched" },
            compress: s.compress.map(|p| {
                let how = if s.adaptive { "adaptive" } else { "every page" };
                format!("{}-{} {how}", p.algorithm, p.level)
            }),
            guest_bytes: size,
            secs: wall,
            noise: wall < NOISE_SECS,
            stream_bytes: median_u64(&runs.iter().map(|r| r.stream_bytes).collect::<Vec<_>>()),
            guest_bytes_per_sec: g,
            stream_bytes_per_sec: st,
            stream_ratio_to_link: ratio(st, link_ref),
            guest_ratio_to_link: ratio(g, link_ref),
            guest_ratio_to_memcpy: ratio(g, refs.memcpy.bytes_per_sec),
            guest_ratio_to_tcp: ratio(g, refs.tcp_loopback.bytes_per_sec),
            guest_ratio_to_tcp_migration: None,
            tcp_same_memory,
            limit,
            ratio_to_limit: ratio(g, lim_bps),
            pages: json!({
                "zero": last.load.zero_pages,
                "raw": last.load.raw_pages,
                "compressed": last.load.compressed_pages,
                "compress-skipped": last.stats.compression.as_ref().map_or(0, |c| c.skipped_pages),
                "xbzrle": last.load.xbzrle_pages,
            }),
            tracker: last.stats.dirty_tracker.clone(),
            verified,
            runs,
        });
    }
    let tcp: Vec<(Content, u16, &'static str, Option<String>, f64)> = rows
        .iter()
        .filter(|r| r.link == Link::Tcp)
        .map(|r| {
            (
                r.content,
                r.channels,
                r.dest,
                r.compress.clone(),
                r.guest_bytes_per_sec,
            )
        })
        .collect();
    for r in rows.iter_mut().filter(|r| r.link != Link::Tcp) {
        r.guest_ratio_to_tcp_migration = tcp
            .iter()
            .find(|t| t.0 == r.content && t.1 == r.channels && t.2 == r.dest && t.3 == r.compress)
            .map(|t| ratio(r.guest_bytes_per_sec, t.4));
    }
    Ok((rows, skipped))
}

// ------------------------------------------------------------------ xbzrle

#[derive(Clone, Debug, Serialize)]
struct XbRun {
    xbzrle: bool,
    secs: f64,
    stream_bytes: u64,
    /// Stream bytes beyond an idle migration of the same memory: what the
    /// re-sends cost.
    resent_bytes: u64,
    /// Page records beyond one per guest page.
    resent_pages: u64,
    bytes_per_resent_page: f64,
    /// Pages the workload wrote while migrating.
    workload_page_writes: u64,
    resent_bytes_per_page_write: f64,
    pages_zero: u64,
    pages_raw: u64,
    pages_xbzrle: u64,
    pages_skipped: u64,
    xbzrle_cache_miss: u64,
    xbzrle_overflow: u64,
    xbzrle_encoded_bytes: u64,
    /// Encoded bytes per XBZRLE page (record headers not included).
    xbzrle_bytes_per_page: f64,
    rounds: u64,
    dirty_syncs: u64,
    /// Guest pause, without `held_ms`.
    downtime_ms: u64,
    /// How long the stop was held back so the writer ran the full time.
    held_ms: u64,
    /// The engine chose to stop before the limit was raised (it was then
    /// held until the end of the iterate time).
    converged_early: bool,
    verified: bool,
}

#[derive(Clone, Debug, Serialize)]
struct XbSummary {
    guest_bytes: u64,
    working_set: u64,
    dirty_rate: u64,
    max_bandwidth: u64,
    touch_bytes: u16,
    iterate_secs: f64,
    cache_size: u64,
    tight_downtime_limit_ms: u64,
    idle_stream_bytes: u64,
    tracker: String,
    off: Vec<XbRun>,
    on: Vec<XbRun>,
    median_stream_bytes_off: u64,
    median_stream_bytes_on: u64,
    /// Total bytes off over on (same workload, same time).
    total_bytes_ratio: f64,
    median_bytes_per_resent_page_off: f64,
    median_bytes_per_resent_page_on: f64,
    /// Bytes per re-sent page, off over on.
    per_resent_page_ratio: f64,
    median_resent_bytes_per_page_write_off: f64,
    median_resent_bytes_per_page_write_on: f64,
    /// Re-send bytes per page the workload wrote, off over on.
    per_page_write_ratio: f64,
}

const TIGHT_DOWNTIME_MS: u64 = 1;

/// A guest stand-in that writes `touch` bytes into random pages of the
/// first `pages` pages of block 0 at a steady `pages_per_sec`.
///
/// Unlike `livemig::testkit::workload::Workload`, which writes a 10 ms slice's
/// pages in a burst and sleeps the rest of the slice, this one paces
/// itself every few writes: a sync that falls into a burst's sleep would
/// otherwise find almost nothing dirty and let the migration converge at
/// an arbitrary moment, and the off/on runs would not cover the same time.
struct SteadyWriter {
    ctl: Arc<SteadyCtl>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct SteadyCtl {
    stop: AtomicBool,
    paused: AtomicBool,
    /// Held while writing; `pause` takes it to wait out a write.
    writing: Mutex<()>,
    pages: AtomicU64,
}

impl SteadyWriter {
    fn start(writer: PageWriter, pages: u64, pages_per_sec: u64, touch: usize, seed: u64) -> Self {
        let ctl = Arc::new(SteadyCtl::default());
        let c = ctl.clone();
        let pages = pages.max(1);
        let touch = touch.clamp(1, PAGE_SIZE);
        let rate = pages_per_sec.max(1) as f64;
        let thread = std::thread::Builder::new()
            .name("bench-writer".into())
            .spawn(move || {
                let mut rng = XorShift::new(seed);
                let mut data = vec![0u8; touch];
                let mut counter = 0u64;
                let t0 = Instant::now();
                while !c.stop.load(Ordering::Relaxed) {
                    if counter as f64 >= t0.elapsed().as_secs_f64() * rate {
                        std::thread::sleep(Duration::from_micros(50));
                        continue;
                    }
                    let guard = c.writing.lock().unwrap_or_else(|e| e.into_inner());
                    if c.paused.load(Ordering::SeqCst) {
                        drop(guard);
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    for _ in 0..8 {
                        let page = rng.next_u64() % pages;
                        counter += 1;
                        let v = counter.to_le_bytes();
                        for (i, d) in data.iter_mut().enumerate() {
                            *d = v[i % 8] ^ (i as u8);
                        }
                        let within = (counter * 8) % (PAGE_SIZE - touch + 1) as u64;
                        writer(0, page * PAGE_SIZE as u64 + within, &data);
                    }
                    drop(guard);
                    c.pages.fetch_add(8, Ordering::Relaxed);
                }
            })
            .expect("spawn writer thread");
        SteadyWriter {
            ctl,
            thread: Some(thread),
        }
    }

    fn pages_written(&self) -> u64 {
        self.ctl.pages.load(Ordering::Relaxed)
    }

    /// A control whose `pause` waits until `hold_until` first.
    fn control(&self, hold_until: Instant) -> SteadyControl {
        SteadyControl {
            ctl: self.ctl.clone(),
            hold_until,
            held: Duration::ZERO,
        }
    }
}

impl Drop for SteadyWriter {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pause and resume of a [`SteadyWriter`], for the engine.
///
/// A stop asked for before `hold_until` waits until then with the writer
/// still running, so that every run covers the same stretch of guest
/// writes whatever moment the engine chose to converge (a 2-core host
/// shared with other jobs can starve the writer for a few milliseconds,
/// and a sync that falls into such a gap finds nothing dirty). The wait
/// is recorded in `held` and taken out of the reported downtime.
struct SteadyControl {
    ctl: Arc<SteadyCtl>,
    hold_until: Instant,
    held: Duration,
}

impl VmControl for SteadyControl {
    fn pause(&mut self) -> Result<(), livemig::vm::VmError> {
        let now = Instant::now();
        if now < self.hold_until {
            self.held = self.hold_until - now;
            std::thread::sleep(self.held);
        }
        self.ctl.paused.store(true, Ordering::SeqCst);
        drop(self.ctl.writing.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(())
    }
    fn resume(&mut self) -> Result<(), livemig::vm::VmError> {
        self.ctl.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
}

fn xbzrle_compare(c: &Config, json: bool) -> Result<XbSummary> {
    let layout = [("ram0", c.xbzrle_size)];
    let src = ProcessMemory::new(&layout)?;
    let dst = ProcessMemory::new(&layout)?;
    let guest_pages = c.xbzrle_size / PAGE_SIZE as u64;
    note(
        json,
        &format!(
            "XBZRLE: {} guest, workload {}/s of pages over {}, {} bytes per touch, link capped at {}/s, {} s",
            human(c.xbzrle_size),
            human(c.xbzrle_dirty_rate),
            human(c.xbzrle_working_set),
            c.xbzrle_touch_bytes,
            human(c.xbzrle_max_bandwidth),
            c.xbzrle_secs
        ),
    );
    let base_params = Params {
        downtime_limit: TIGHT_DOWNTIME_MS,
        max_bandwidth: c.xbzrle_max_bandwidth,
        xbzrle_cache_size: c.xbzrle_cache_size,
        verify: true,
        ..Params::default()
    };
    // Idle baseline: what one pass over the same memory costs.
    fill_content(&src, Content::Incompressible);
    zero_memory(&dst);
    let idle = {
        let (mut t, _) = tracker_for(&src);
        let p = Params {
            downtime_limit: 300,
            max_bandwidth: 0,
            ..base_params.clone()
        };
        migrate_once(&src, &dst, t.as_mut(), &mut NoVm, p, Link::Tcp, None)?
    };
    let idle_bytes = idle.stats.ram.transferred;
    let tracker_name = idle.stats.dirty_tracker.clone();
    let iterate = Duration::from_secs_f64(c.xbzrle_secs);
    let raise = move |h: &MigrationHandle, done: mpsc::Receiver<()>| {
        if !matches!(
            done.recv_timeout(iterate),
            Err(mpsc::RecvTimeoutError::Timeout)
        ) {
            return; // the migration is already over
        }
        let mut p = h.params();
        p.downtime_limit = 60_000;
        let _ = h.set_params(p);
        // A migration that still has not converged is cancelled.
        if let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_secs(60)) {
            h.cancel();
        }
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    for i in 0..c.runs {
        for xb in [false, true] {
            note(
                json,
                &format!("XBZRLE {} run {}", if xb { "on" } else { "off" }, i + 1),
            );
            fill_content(&src, Content::Incompressible);
            zero_memory(&dst);
            let (mut tracker, writer) = tracker_for(&src);
            let workload = SteadyWriter::start(
                writer,
                c.xbzrle_working_set / PAGE_SIZE as u64,
                c.xbzrle_dirty_rate / PAGE_SIZE as u64,
                usize::from(c.xbzrle_touch_bytes),
                42,
            );
            let mut control = workload.control(Instant::now() + iterate);
            let before = workload.pages_written();
            let params = Params {
                xbzrle: xb,
                ..base_params.clone()
            };
            let r = migrate_once(
                &src,
                &dst,
                tracker.as_mut(),
                &mut control,
                params,
                Link::Tcp,
                Some(&raise),
            );
            let writes = workload.pages_written() - before;
            drop(workload);
            let r = r?;
            let l = &r.load;
            let records = l.zero_pages + l.raw_pages + l.xbzrle_pages + l.compressed_pages;
            let stream = r.stats.ram.transferred;
            let resent_pages = records.saturating_sub(guest_pages);
            let resent_bytes = stream.saturating_sub(idle_bytes);
            let xs = r.stats.xbzrle_cache.clone().unwrap_or_default();
            let run = XbRun {
                xbzrle: xb,
                secs: r.secs,
                stream_bytes: stream,
                resent_bytes,
                resent_pages,
                bytes_per_resent_page: ratio(resent_bytes as f64, resent_pages as f64),
                workload_page_writes: writes,
                resent_bytes_per_page_write: ratio(resent_bytes as f64, writes as f64),
                pages_zero: l.zero_pages,
                pages_raw: l.raw_pages,
                pages_xbzrle: l.xbzrle_pages,
                pages_skipped: r.stats.ram.skipped,
                xbzrle_cache_miss: xs.cache_miss,
                xbzrle_overflow: xs.overflow,
                xbzrle_encoded_bytes: xs.bytes,
                xbzrle_bytes_per_page: ratio(xs.bytes as f64, xs.pages as f64),
                rounds: r.stats.ram.rounds,
                dirty_syncs: r.stats.ram.dirty_sync_count,
                downtime_ms: r
                    .stats
                    .downtime
                    .saturating_sub(control.held.as_millis() as u64),
                held_ms: control.held.as_millis() as u64,
                converged_early: !control.held.is_zero(),
                // Verify mode: the destination checked the source's digest
                // at stop time before acknowledging.
                verified: true,
            };
            if xb {
                on.push(run);
            } else {
                off.push(run);
            }
        }
    }
    let med = |v: &[XbRun], f: fn(&XbRun) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let so = med(&off, |r| r.stream_bytes as f64);
    let sn = med(&on, |r| r.stream_bytes as f64);
    let po = med(&off, |r| r.bytes_per_resent_page);
    let pn = med(&on, |r| r.bytes_per_resent_page);
    let wo = med(&off, |r| r.resent_bytes_per_page_write);
    let wn = med(&on, |r| r.resent_bytes_per_page_write);
    Ok(XbSummary {
        guest_bytes: c.xbzrle_size,
        working_set: c.xbzrle_working_set,
        dirty_rate: c.xbzrle_dirty_rate,
        max_bandwidth: c.xbzrle_max_bandwidth,
        touch_bytes: c.xbzrle_touch_bytes,
        iterate_secs: c.xbzrle_secs,
        cache_size: c.xbzrle_cache_size,
        tight_downtime_limit_ms: TIGHT_DOWNTIME_MS,
        idle_stream_bytes: idle_bytes,
        tracker: tracker_name,
        median_stream_bytes_off: so as u64,
        median_stream_bytes_on: sn as u64,
        total_bytes_ratio: ratio(so, sn),
        median_bytes_per_resent_page_off: po,
        median_bytes_per_resent_page_on: pn,
        per_resent_page_ratio: ratio(po, pn),
        median_resent_bytes_per_page_write_off: wo,
        median_resent_bytes_per_page_write_on: wn,
        per_page_write_ratio: ratio(wo, wn),
        off,
        on,
    })
}

// ------------------------------------------------------------------ output

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "memory": mem_kib * 1024,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "thp": read("/sys/kernel/mm/transparent_hugepage/enabled").trim(),
        "zero-detection": zero::implementation(),
    })
}

fn print_tables(
    m: &Value,
    c: &Config,
    refs: &References,
    codecs: Option<&[CodecRow]>,
    migs: Option<(&[MigRow], &[String])>,
    xb: Option<&XbSummary>,
    secs: f64,
) {
    println!(
        "livemig bench: {} cpus ({}), kernel {}, {:.0} s; medians of {} run(s) per migration, {} per socket reference, {} memcpy-reference passes, {} paired passes per codec",
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        secs,
        c.runs,
        c.runs.max(3),
        c.runs.max(5),
        codec_pairs(c.runs),
    );
    println!();
    println!("References (same run)                         GB/s");
    for (name, r) in [
        ("memcpy", &refs.memcpy),
        ("loopback TCP", &refs.tcp_loopback),
        ("Unix socket", &refs.unix_socket),
        ("shm: transport (futex sleep at once)", &refs.shm),
        ("shm: transport (2000 spins, then futex)", &refs.shm_spin),
    ] {
        let samples: Vec<String> = r.samples.iter().map(|s| gbs(*s)).collect();
        println!(
            "  {name:<44}{:>6}   (runs: {})",
            gbs(r.bytes_per_sec),
            samples.join(" ")
        );
    }
    println!(
        "  loopback TCP CPU cost: {:.3} CPU s per GiB (both threads; compare the migrations' CPU s/GiB)",
        refs.tcp_loopback_cpu_secs_per_gib
    );
    if let Some(rows) = codecs {
        println!();
        println!(
            "Page codecs ({} working set, 4 KiB pages; thread CPU time, each codec pass paired with a per-page memcpy pass)",
            human(c.codec_set)
        );
        println!(
            "  {:<44}{:>6}   {:>16}  {:>11}  {:>10}",
            "", "GB/s", "/memcpy-per-page", "/memcpy-ref", "out B/page"
        );
        for r in rows {
            println!(
                "  {:<44}{:>6}   {:>16.2}  {:>11.2}  {:>10}",
                r.name,
                gbs(r.bytes_per_sec),
                r.ratio_to_memcpy,
                r.ratio_to_memcpy_reference,
                r.out_bytes_per_page
                    .map(|b| format!("{b:.0}"))
                    .unwrap_or_default()
            );
        }
        println!(
            "  (* pages in random order, as the engine meets them, against a per-page memcpy in the same order)"
        );
        println!(
            "  (+ the new page in cache, as the engine stages it, the old one not; against a per-page memcpy into a page buffer in cache)"
        );
        println!(
            "  (~ the new page 8 bytes further into its 64-byte line than the old page, so every load of it spans two lines; the other rows' pages share their offset in a line)"
        );
    }
    if let Some((rows, mig_skipped)) = migs {
        println!();
        println!(
            "Migration of an idle {} guest (guest GB/s = guest bytes / total time)",
            human(c.size)
        );
        let name_of = |r: &MigRow| {
            if r.noise {
                format!("{} (noise: <10 ms)", r.name)
            } else {
                r.name.clone()
            }
        };
        let compressed_of = |r: &MigRow| {
            let page_count = |k: &str| r.pages[k].as_u64().unwrap_or(0);
            match page_count("compressed") + page_count("raw") {
                0 => String::new(),
                n if r.compress.is_some() => format!(
                    " ({:.0}% of pages compressed)",
                    100.0 * page_count("compressed") as f64 / n as f64
                ),
                _ => String::new(),
            }
        };
        if c.quick {
            // Eight columns: what a smoke run needs; --json has the rest.
            println!(
                "  {:<48}{:>7}{:>8}{:>7}{:>8}{:>9}{:>8}{:>6}  limit",
                "case", "time s", "guest", "guest", "guest", "over", "CPU s", "CPU"
            );
            println!(
                "  {:<48}{:>7}{:>8}{:>7}{:>8}{:>9}{:>8}{:>6}",
                "", "", "GB/s", "/link", "/limit", "TCP run", "/GiB", "busy"
            );
            for r in rows {
                println!(
                    "  {:<48}{:>7.2}{:>8}{:>7.2}{:>8.2}{:>9}{:>8.2}{:>5.0}%  {}{}",
                    name_of(r),
                    r.secs,
                    gbs(r.guest_bytes_per_sec),
                    r.guest_ratio_to_link,
                    r.ratio_to_limit,
                    r.guest_ratio_to_tcp_migration
                        .map(|x| format!("{x:.2}x"))
                        .unwrap_or_default(),
                    r.cpu_secs_per_gib,
                    r.cpu_share * 100.0,
                    r.limit,
                    compressed_of(r)
                );
            }
            println!(
                "  (over TCP run: guest throughput over the same case over TCP in this run; \
                 --json has every column of the full table)"
            );
        } else {
            println!(
                "  {:<48}{:>7}{:>10}{:>9}{:>11}{:>11}{:>11}{:>9}{:>9}{:>9}{:>6}  limit",
                "case",
                "time s",
                "stream",
                "guest",
                "stream",
                "guest",
                "guest",
                "guest",
                "guest",
                "CPU s",
                "CPU"
            );
            println!(
                "  {:<48}{:>7}{:>10}{:>9}{:>11}{:>11}{:>11}{:>9}{:>9}{:>9}{:>6}",
                "",
                "",
                "GB/s",
                "GB/s",
                "/link",
                "/link",
                "/limit",
                "/TCP",
                "/memcpy",
                "/GiB",
                "busy"
            );
            for r in rows {
                println!(
                    "  {:<48}{:>7.2}{:>10}{:>9}{:>11.2}{:>11.2}{:>11.2}{:>9.2}{:>9.2}{:>9.2}{:>5.0}%  {}{}",
                    name_of(r),
                    r.secs,
                    gbs(r.stream_bytes_per_sec),
                    gbs(r.guest_bytes_per_sec),
                    r.stream_ratio_to_link,
                    r.guest_ratio_to_link,
                    r.ratio_to_limit,
                    r.guest_ratio_to_tcp,
                    r.guest_ratio_to_memcpy,
                    r.cpu_secs_per_gib,
                    r.cpu_share * 100.0,
                    r.limit,
                    compressed_of(r)
                );
            }
            let vs: Vec<String> = rows
                .iter()
                .filter_map(|r| {
                    r.guest_ratio_to_tcp_migration
                        .map(|x| format!("{}: {x:.2}x", r.name))
                })
                .collect();
            if !vs.is_empty() {
                println!("  Guest throughput over the same migration over TCP in this run:");
                for line in vs {
                    println!("    {line}");
                }
            }
        }
        for r in rows {
            let Some(m) = &r.tcp_same_memory else {
                continue;
            };
            let list = |v: &[f64], f: &dyn Fn(f64) -> String| {
                v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(" ")
            };
            println!(
                "  {}: raw loopback TCP between the same two memories, one run before each migration run: \
                 {} GB/s (runs: {}), {:.3} CPU s/GiB; migration over it run by run: {} (median {:.2}x)",
                r.name,
                gbs(m.bytes_per_sec),
                list(&m.samples, &|x| gbs(x)),
                m.cpu_secs_per_gib,
                list(&m.run_ratios, &|x| format!("{x:.2}")),
                m.guest_ratio
            );
            println!(
                "    CPU s/GiB per thread (an idle host gives each its core; the busier bounds the rate): \
                 migration source {:.3}, destination {:.3}; raw TCP sender {:.3}, reader {:.3}",
                r.source_thread_cpu_secs_per_gib,
                r.destination_thread_cpu_secs_per_gib,
                m.sender_thread_cpu_secs_per_gib,
                m.reader_thread_cpu_secs_per_gib
            );
        }
        if let Some(r) = rows.first() {
            println!(
                "  (tracker: {}; link = the matching reference: TCP, Unix socket or the shm: transport)",
                r.tracker
            );
        }
        for why in mig_skipped {
            println!("  not run: {why}");
        }
    }
    if let Some(x) = xb {
        println!();
        println!(
            "XBZRLE: {} guest, workload writes {} bytes into random pages of a {} working set at {}/s;",
            human(x.guest_bytes),
            x.touch_bytes,
            human(x.working_set),
            human(x.dirty_rate)
        );
        println!(
            "  link capped at {}/s; downtime limit {} ms for {} s, then raised; cache {}; idle migration = {}",
            human(x.max_bandwidth),
            x.tight_downtime_limit_ms,
            x.iterate_secs,
            human(x.cache_size),
            human(x.idle_stream_bytes)
        );
        println!(
            "  {:<5}{:>7}{:>11}{:>10}{:>11}{:>9}{:>10}{:>9}{:>9}{:>8}{:>10}{:>8}",
            "",
            "time s",
            "stream",
            "re-sent",
            "B/re-sent",
            "raw",
            "xbzrle",
            "skipped",
            "miss",
            "rounds",
            "downtime",
            "held"
        );
        for r in x.off.iter().chain(&x.on) {
            println!(
                "  {:<5}{:>7.2}{:>11}{:>10}{:>11.0}{:>9}{:>10}{:>9}{:>9}{:>8}{:>8}ms{:>6}ms",
                if r.xbzrle { "on" } else { "off" },
                r.secs,
                human(r.stream_bytes),
                r.resent_pages,
                r.bytes_per_resent_page,
                r.pages_raw,
                r.pages_xbzrle,
                r.pages_skipped,
                r.xbzrle_cache_miss,
                r.rounds,
                r.downtime_ms,
                r.held_ms
            );
        }
        println!(
            "  total bytes off/on: {:.1}x   bytes per re-sent page off/on: {:.1}x ({:.0} vs {:.0})   re-send bytes per page written off/on: {:.1}x",
            x.total_bytes_ratio,
            x.per_resent_page_ratio,
            x.median_bytes_per_resent_page_off,
            x.median_bytes_per_resent_page_on,
            x.per_page_write_ratio
        );
    }
}

/// `livemig bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    let c = Config::from(&a)?;
    let want = |p: Part| a.only.is_empty() || a.only.contains(&p);
    let started = Instant::now();
    let m = machine();
    let refs = references(&c, a.json)?;
    let codec_rows = if want(Part::Codecs) {
        Some(codecs(&c, &refs, a.json)?)
    } else {
        None
    };
    let (mig_rows, mig_skipped) = if want(Part::Migration) {
        let (rows, skipped) = migration(&c, &refs, a.json, a.no_cold, &a.case)?;
        (Some(rows), skipped)
    } else {
        (None, Vec::new())
    };
    let xb = if want(Part::Xbzrle) {
        Some(xbzrle_compare(&c, a.json)?)
    } else {
        None
    };
    let tls_cost = if want(Part::Tls) {
        Some(tls::tls_cost(&c, &refs, a.json)?)
    } else {
        None
    };
    let secs = started.elapsed().as_secs_f64();
    let v = json!({
            "machine": m,
            "config": c,
            "destination": "a thread of the same process, own socket end, livemig transport + Loader",
            "references": refs,
            "codecs": codec_rows,
            "migration": mig_rows,
            "migration_skipped": mig_skipped,
            "xbzrle": xb,
            "tls": tls_cost,
        "elapsed_secs": secs,
    });
    if let Some(path) = &a.save {
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        crate::jsonout::print(&v)?;
    } else {
        print_tables(
            &m,
            &c,
            &refs,
            codec_rows.as_deref(),
            mig_rows.as_deref().map(|r| (r, mig_skipped.as_slice())),
            xb.as_ref(),
            secs,
        );
        if let Some(t) = &tls_cost {
            tls::print(t, &refs, &c);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median_u64(&[5, 1, 9]), 5);
    }

    #[test]
    fn text_pages_compress() {
        let mut rng = XorShift::new(1);
        let mut page = vec![0u8; PAGE_SIZE];
        text_page(&mut rng, &mut page);
        assert!(page.iter().all(|&b| b != 0));
        let mut out = Vec::new();
        let mut c = Compressor::new(Algorithm::Lz4, 1).unwrap();
        let n = c.compress(&page, &mut out).unwrap().expect("compressible");
        assert!(n < PAGE_SIZE * 3 / 4, "lz4 gave {n} bytes");
    }
}
