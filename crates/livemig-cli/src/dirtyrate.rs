//! `livemig dirtyrate`: measure how fast a running guest dirties its memory,
//! without migrating it. Starts the built-in test guest as `vm-migrate`
//! does, turns dirty tracking on, syncs once a second for N seconds and
//! reports dirty pages per second overall (distinct pages per one-second
//! period, as QEMU's calc-dirty-rate) and, with the dirty ring, per vCPU
//! (ring entries per second: the ring is the only KVM log that says which
//! vCPU wrote).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use livemig::bitmap::DirtyBitmap;
use livemig::memory::GuestMemory;
use minivm::{GuestImage, TestGuestConfig, TrackerKind, Vm, VmConfig};
use serde_json::json;

use crate::units::{human, parse_mem_size, parse_size};
use crate::vm::{DirtyTrack, LayoutArgs};

const MIB: f64 = (1u64 << 20) as f64;

/// `livemig dirtyrate`.
#[derive(Args, Debug)]
pub struct DirtyRateArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Seconds to sample (one sync per second).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub seconds: u32,
    /// Bytes per second the guest writes, all vCPUs together (0 = as fast as it can).
    #[arg(long, alias = "rate", value_name = "BYTES_PER_SEC", default_value = "0", value_parser = parse_size)]
    pub dirty_rate: u64,
    /// Working set of each vCPU (default: about 3/4 of --mem shared by the vCPUs, at most 384M each).
    #[arg(long, value_parser = parse_mem_size)]
    pub working_set: Option<u64>,
    /// Dirty tracker; only the ring gives per-vCPU rates.
    #[arg(
        long,
        alias = "tracker",
        value_name = "TRACKER",
        value_enum,
        default_value = "ring"
    )]
    pub dirty_track: DirtyTrack,
    /// Ring tracker: dirty ring entries per vCPU (a power of two).
    #[arg(long, default_value_t = 65536)]
    pub dirty_ring: u32,
    /// Cap each vCPU's dirty rate while measuring (bytes/s, e.g. 8M; needs the ring).
    #[arg(long, value_parser = parse_size)]
    pub dirty_limit: Option<u64>,
    /// Seconds the guest runs untracked before sampling.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

fn tracker_kind(t: DirtyTrack) -> TrackerKind {
    match t {
        DirtyTrack::Auto => TrackerKind::Auto,
        DirtyTrack::Bitmap => TrackerKind::Bitmap,
        DirtyTrack::Manual => TrackerKind::Manual {
            chunk_shift: TrackerKind::DEFAULT_CHUNK_SHIFT,
        },
        DirtyTrack::Ring => TrackerKind::Ring,
    }
}

/// `livemig dirtyrate`.
pub fn dirtyrate(a: DirtyRateArgs) -> Result<()> {
    let kind = tracker_kind(a.dirty_track);
    let ring = kind == TrackerKind::Ring;
    if a.dirty_limit.is_some() && !ring {
        bail!("--dirty-limit needs --dirty-track ring: only the dirty ring counts pages per vCPU");
    }
    let vcpus = usize::from(a.layout.vcpus);
    let pages = match a.working_set {
        Some(ws) => ws / 4096,
        None => minivm::defaults::working_set_pages(a.layout.mem, vcpus),
    }
    .max(1);
    let cfg = TestGuestConfig {
        pages_per_vcpu: pages,
        rate_bytes_per_sec: a.dirty_rate,
    };
    let need = minivm::guest::test_guest_bytes(&cfg, vcpus);
    if need > a.layout.mem {
        bail!(
            "a working set of {} per vCPU needs {} of guest memory, more than --mem {}",
            human(pages * 4096),
            human(need),
            human(a.layout.mem)
        );
    }
    let vm = Vm::new(VmConfig {
        mem_size: a.layout.mem,
        ram_blocks: usize::from(a.layout.blocks),
        vcpus,
        guest: GuestImage::TestGuest(cfg),
        dirty_ring_entries: ring.then_some(a.dirty_ring),
        prefault: true,
        ..VmConfig::default()
    })
    .context("starting the VM (dirtyrate needs /dev/kvm)")?;
    vm.set_dirty_limit(a.dirty_limit)?;
    let say = !a.json;
    std::thread::sleep(Duration::from_secs_f64(a.warmup.max(0.1)));
    let st = vm.guest_status();
    if !st.ok() || st.heartbeats() == 0 {
        bail!("the guest does not run well: {st:?}");
    }

    let (resolved, why) = vm.resolve_tracker(kind);
    let mut tracker = vm.tracker(resolved)?;
    let mem = vm.memory();
    let block_pages: Vec<u64> = mem.blocks().iter().map(|b| b.pages()).collect();
    let mut bitmaps: Vec<DirtyBitmap> = block_pages.iter().map(|&p| DirtyBitmap::new(p)).collect();
    let manual = tracker.clear_chunk_shift().is_some();
    if say {
        eprintln!(
            "measuring the dirty rate of {} vCPUs, {} of RAM ({} per vCPU, guest rate {}) for {} s with the {} tracker ({why})",
            a.layout.vcpus,
            human(a.layout.mem),
            human(pages * 4096),
            if a.dirty_rate == 0 {
                "as fast as it can".to_string()
            } else {
                format!("{}/s", human(a.dirty_rate))
            },
            a.seconds,
            tracker.name()
        );
    }
    tracker.start()?;
    // Start from a clean log (an initially-set log reports everything once).
    tracker.sync(&mut bitmaps)?;
    let reset = |tracker: &mut dyn livemig::dirty::DirtyTracker,
                 bitmaps: &mut [DirtyBitmap]|
     -> Result<()> {
        bitmaps.iter_mut().for_each(DirtyBitmap::clear_all);
        if manual {
            for (b, &p) in block_pages.iter().enumerate() {
                tracker.clear(b, 0, p)?;
            }
        }
        Ok(())
    };
    reset(&mut *tracker, &mut bitmaps)?;
    let s0 = vm.guest_status();
    let v0 = vm.vcpu_dirty_pages();
    let t0 = Instant::now();
    let mut last_t = t0;
    let mut last_v = v0.clone();
    let mut samples = Vec::new();
    let mut total_pages = 0u64;
    for k in 1..=a.seconds {
        let due = t0 + Duration::from_secs(u64::from(k));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        tracker.sync(&mut bitmaps)?;
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64();
        let distinct: u64 = bitmaps.iter().map(DirtyBitmap::count).sum();
        reset(&mut *tracker, &mut bitmaps)?;
        total_pages += distinct;
        let v = vm.vcpu_dirty_pages();
        let per_vcpu: Option<Vec<u64>> = match (&v, &last_v) {
            (Some(v), Some(l)) => Some(
                v.iter()
                    .zip(l)
                    .map(|(a, b)| ((a - b) as f64 / dt) as u64)
                    .collect(),
            ),
            _ => None,
        };
        let rate = (distinct as f64 / dt) as u64;
        if say {
            let mut line = format!(
                "t={:>4.1}s dirty {rate:>8} pages/s ({:>7.1} MiB/s)",
                now.duration_since(t0).as_secs_f64(),
                rate as f64 * 4096.0 / MIB
            );
            if let Some(pv) = &per_vcpu {
                for (i, r) in pv.iter().enumerate() {
                    line.push_str(&format!("  vCPU{i} {r:>7}"));
                }
            }
            eprintln!("{line}");
        }
        samples.push(json!({
            "time": now.duration_since(t0).as_millis() as u64,
            "dirty-pages": distinct,
            "dirty-pages-rate": rate,
            "vcpu-dirty-pages-rate": per_vcpu,
        }));
        last_t = now;
        last_v = v;
    }
    let secs = t0.elapsed().as_secs_f64();
    tracker.stop()?;
    let s1 = vm.guest_status();
    let avg = (total_pages as f64 / secs) as u64;
    let written_rate = (s1.pages_written() - s0.pages_written()) as f64 * 4096.0 / secs;
    let per_vcpu_avg: Option<Vec<u64>> = match (vm.vcpu_dirty_pages(), &v0) {
        (Some(v), Some(b)) => Some(
            v.iter()
                .zip(b)
                .map(|(a, b)| ((a - b) as f64 / secs) as u64)
                .collect(),
        ),
        _ => None,
    };
    let waited = vm.dirty_limit_waited();
    let ring_full: Vec<u64> = s1.vcpus.iter().map(|v| v.ring_full_exits).collect();
    if a.json {
        let vcpus_json: Vec<_> = (0..vcpus)
            .map(|i| {
                json!({
                    "vcpu": i,
                    "dirty-pages-rate": per_vcpu_avg.as_ref().map(|p| p[i]),
                    "dirty-limit-waited-ms": waited.get(i).map(|d| d.as_millis() as u64),
                    "ring-full-exits": ring_full.get(i),
                })
            })
            .collect();
        let v = json!({
            "tracker": tracker.name(),
            "seconds": secs,
            "page-size": 4096,
            "dirty-pages-rate": avg,
            "dirty-rate": avg * 4096,
            "per-vcpu": per_vcpu_avg.is_some(),
            "vcpus": vcpus_json,
            "dirty-limit": a.dirty_limit,
            "guest-write-rate": written_rate as u64,
            "self-check": if s1.ok() { "passed" } else { "failed" },
            "samples": samples,
        });
        crate::jsonout::print(&v)?;
    } else {
        eprintln!(
            "average: {avg} dirty pages/s ({:.1} MiB/s) over {secs:.1} s; the guest wrote {:.1} MiB/s (its own count, rewrites included); self-check {}",
            avg as f64 * 4096.0 / MIB,
            written_rate / MIB,
            if s1.ok() { "passed" } else { "FAILED" }
        );
        match &per_vcpu_avg {
            Some(pv) => {
                for (i, r) in pv.iter().enumerate() {
                    eprintln!(
                        "vCPU{i}: {r} pages/s ({:.1} MiB/s){}{}",
                        *r as f64 * 4096.0 / MIB,
                        match (a.dirty_limit, waited.get(i)) {
                            (Some(_), Some(w)) => format!(", waited {:.2} s for the dirty limit", w.as_secs_f64()),
                            _ => String::new(),
                        },
                        match ring_full.get(i) {
                            Some(&n) if n > 0 => format!(", ring full {n} times (rate capped by the ring size)"),
                            _ => String::new(),
                        }
                    );
                }
            }
            None => eprintln!(
                "per-vCPU rates need the dirty ring (--dirty-track ring): the {} log does not say which vCPU wrote",
                tracker.name()
            ),
        }
    }
    if !s1.ok() {
        bail!("the guest's self-check failed: {s1:?}");
    }
    Ok(())
}
