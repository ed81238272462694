//! A guest stand-in for process memory: a thread that dirties pages at a
//! chosen rate, and that the engine can pause and throttle the way a VMM
//! pauses and throttles vCPUs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory::{RamBlock, PAGE_SIZE};
use crate::vm::VmControl;

/// Writes `data` at `offset` of block `block`. Lets a tracker that needs
/// to see writes (the software log) sit in the path; for trackers that
/// watch memory itself it is a plain write.
pub type PageWriter = Arc<dyn Fn(usize, u64, &[u8]) + Send + Sync>;

/// A writer that writes straight into the blocks' memory.
pub fn direct_writer(blocks: Vec<RamBlock>) -> PageWriter {
    Arc::new(move |b, off, data| {
        blocks[b].region().write(off as usize, data);
    })
}

/// How pages are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// In order, wrapping around.
    Sequential,
    /// Pseudo-random pages.
    Random,
}

/// What the workload does.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    /// Bytes of pages dirtied per second (pages × 4096); 0 = flat out.
    pub rate: u64,
    /// Bytes written into each touched page (1..=4096): few bytes make
    /// XBZRLE shine, a whole page defeats it.
    pub bytes_per_touch: usize,
    /// Page choice.
    pub pattern: Pattern,
    /// Only the first this-many bytes of each block are touched (the
    /// working set); 0 = all of it.
    pub working_set: u64,
    /// Seed of the pseudo-random sequence.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            rate: 64 << 20,
            bytes_per_touch: 8,
            pattern: Pattern::Random,
            working_set: 0,
            seed: 1,
        }
    }
}

#[derive(Default)]
struct Ctl {
    stop: AtomicBool,
    paused: AtomicBool,
    throttle: AtomicU8,
    /// Held while a page is written; `pause` takes it to wait out a write
    /// in progress.
    writing: Mutex<()>,
    pages: AtomicU64,
}

/// A running workload.
pub struct Workload {
    ctl: Arc<Ctl>,
    thread: Option<JoinHandle<()>>,
}

/// Small, fast PRNG (xorshift64*): reproducible page choice and contents.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (0 is mapped to a fixed non-zero seed).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// One pseudo-random byte.
    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Fills every page of `blocks` with pseudo-random bytes (incompressible,
/// non-zero), through `writer`.
pub fn fill_random(blocks: &[RamBlock], writer: &PageWriter, seed: u64) {
    let mut rng = XorShift::new(seed);
    let mut chunk = vec![0u8; 1 << 20];
    for (b, blk) in blocks.iter().enumerate() {
        let mut off = 0u64;
        while off < blk.len() {
            let n = (chunk.len() as u64).min(blk.len() - off) as usize;
            rng.fill(&mut chunk[..n]);
            writer(b, off, &chunk[..n]);
            off += n as u64;
        }
    }
}

/// A slice of time the rate and throttle are enforced over.
const SLICE: Duration = Duration::from_millis(10);

impl Workload {
    /// Starts dirtying `blocks` through `writer`.
    pub fn start(blocks: Vec<RamBlock>, writer: PageWriter, cfg: WorkloadConfig) -> Workload {
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || run(&blocks, &writer, &cfg, &c))
            .expect("spawn workload thread");
        Workload {
            ctl,
            thread: Some(thread),
        }
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.ctl.pages.load(Ordering::Relaxed)
    }

    /// A [`VmControl`] that pauses, resumes and throttles this workload.
    pub fn control(&self) -> WorkloadControl {
        WorkloadControl {
            ctl: self.ctl.clone(),
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Pause/resume/throttle of a [`Workload`].
#[derive(Clone)]
pub struct WorkloadControl {
    ctl: Arc<Ctl>,
}

impl WorkloadControl {
    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.paused.load(Ordering::SeqCst)
    }
    /// Current throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.ctl.throttle.load(Ordering::Relaxed)
    }
}

impl VmControl for WorkloadControl {
    fn pause(&mut self) -> Result<(), crate::vm::VmError> {
        self.ctl.paused.store(true, Ordering::SeqCst);
        // Wait out a write in progress: after this, none can start.
        drop(self.ctl.writing.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(())
    }
    fn resume(&mut self) -> Result<(), crate::vm::VmError> {
        self.ctl.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn set_throttle(&mut self, percent: u8) {
        self.ctl.throttle.store(percent.min(99), Ordering::Relaxed);
    }
}

fn run(blocks: &[RamBlock], writer: &PageWriter, cfg: &WorkloadConfig, ctl: &Ctl) {
    let mut rng = XorShift::new(cfg.seed);
    let pages: Vec<u64> = blocks
        .iter()
        .map(|b| {
            let ws = if cfg.working_set == 0 {
                b.len()
            } else {
                cfg.working_set.min(b.len())
            };
            (ws / PAGE_SIZE as u64).max(1)
        })
        .collect();
    let total: u64 = pages.iter().sum();
    let touch = cfg.bytes_per_touch.clamp(1, PAGE_SIZE);
    let mut data = vec![0u8; touch];
    let per_slice = if cfg.rate == 0 {
        u64::MAX
    } else {
        ((cfg.rate as f64 / PAGE_SIZE as f64) * SLICE.as_secs_f64()).max(1.0) as u64
    };
    let mut seq = 0u64;
    let mut counter = 0u64;
    while !ctl.stop.load(Ordering::Relaxed) {
        let slice_start = Instant::now();
        let throttle = u32::from(ctl.throttle.load(Ordering::Relaxed));
        let run_for = SLICE * (100 - throttle) / 100;
        let mut done = 0u64;
        while done < per_slice && slice_start.elapsed() < run_for {
            let guard = ctl.writing.lock().unwrap_or_else(|e| e.into_inner());
            if ctl.paused.load(Ordering::SeqCst) || ctl.stop.load(Ordering::Relaxed) {
                drop(guard);
                break;
            }
            for _ in 0..16 {
                let g = match cfg.pattern {
                    Pattern::Sequential => {
                        seq = (seq + 1) % total;
                        seq
                    }
                    Pattern::Random => rng.next_u64() % total,
                };
                let (mut b, mut p) = (0usize, g);
                while p >= pages[b] {
                    p -= pages[b];
                    b += 1;
                }
                counter += 1;
                let v = counter.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = v[i % 8] ^ (i as u8);
                }
                let within = (counter * 8) % (PAGE_SIZE - touch + 1) as u64;
                writer(b, p * PAGE_SIZE as u64 + within, &data);
                done += 1;
            }
            drop(guard);
            // Pace writes evenly over the slice: a guest dirties steadily,
            // it does not burst and then idle.
            if cfg.rate != 0 {
                let due = slice_start + run_for.mul_f64(done as f64 / per_slice as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
        ctl.pages.fetch_add(done, Ordering::Relaxed);
        // Sleep out the rest of the slice (rate limit, throttle, or pause).
        let left = SLICE.saturating_sub(slice_start.elapsed());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
    }
}
