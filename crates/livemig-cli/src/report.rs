//! What the command shows: a progress bar on a terminal, a summary for
//! people on stderr, and JSON for machines on stdout.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use livemig::engine::{MigrationHandle, MigrationStats, Status};

use crate::units::human;

/// A progress bar that follows a migration until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn bar(len: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb
}

impl Progress {
    /// Follows `handle` (source side): sent bytes against guest size.
    pub fn source(handle: MigrationHandle, total: u64, quiet: bool) -> Progress {
        let pb = bar(total, quiet);
        Self::spawn(pb, move |pb| {
            let s = handle.stats();
            pb.set_length(s.ram.total.max(s.ram.transferred).max(1));
            pb.set_position(s.ram.transferred.min(pb.length().unwrap_or(0)));
            let mut msg = format!(
                "{:?} round {} remaining {} {:.0} Mbit/s dirty {} pages/s throttle {}%",
                s.status,
                s.ram.rounds,
                human(s.ram.remaining),
                s.ram.mbps,
                s.ram.dirty_pages_rate,
                s.cpu_throttle_percentage
            );
            if let Some(c) = s.convergence.as_ref().filter(|c| !c.converging) {
                msg = format!("{msg} | {}", c.describe());
            }
            pb.set_message(msg);
        })
    }

    /// Follows a byte counter (destination side).
    pub fn counter(bytes: Arc<AtomicU64>, total: u64, quiet: bool) -> Progress {
        let pb = bar(total, quiet);
        Self::spawn(pb, move |pb| {
            let b = bytes.load(Ordering::Relaxed);
            pb.set_length(total.max(b).max(1));
            pb.set_position(b);
            pb.set_message("received");
        })
    }

    fn spawn(pb: ProgressBar, tick: impl Fn(&ProgressBar) + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                tick(&pb);
                std::thread::sleep(Duration::from_millis(100));
            }
            tick(&pb);
            pb.finish_and_clear();
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The downtime's limit beside it, and whether it was overshot (never
/// silently), with the source's own view of the pause when it differs.
fn downtime_limit_text(s: &MigrationStats) -> String {
    let mut t = String::new();
    if s.source_downtime > 0 && s.source_downtime != s.downtime {
        t += &format!(
            " to the destination's resume ({} ms to STARTED on the source)",
            s.source_downtime
        );
    }
    if s.downtime_limit > 0 && s.status == livemig::engine::Status::Completed {
        if s.downtime_limit_exceeded {
            t += &format!(", OVER its limit of {} ms", s.downtime_limit);
        } else {
            t += &format!(", within its limit of {} ms", s.downtime_limit);
        }
    }
    t
}

/// The average rate over the whole migration (bytes sent over the total
/// time), and beside it `ram.mbps` (QEMU's field: the rate of the last
/// round only, which alone reads as if the whole migration ran at it).
fn throughput_text(s: &MigrationStats) -> String {
    if s.total_time == 0 {
        return format!("{:.0} Mbit/s in the last round", s.ram.mbps);
    }
    let average = s.ram.transferred as f64 * 8.0 / 1e6 / (s.total_time as f64 / 1e3);
    format!(
        "{average:.0} Mbit/s on average ({:.0} Mbit/s in the last round)",
        s.ram.mbps
    )
}

/// A few lines a person reads after a migration.
pub fn summary(s: &MigrationStats) -> String {
    let mut out = format!(
        "status: {:?}\n\
         total time: {} ms (setup {} ms), downtime: {} ms{}{}\n\
         transferred: {} of {} guest RAM, {} rounds, {} dirty syncs\n\
         pages: {} zero, {} raw, {} skipped (unchanged)\n\
         throughput: {}, dirty tracker: {}",
        s.status,
        s.total_time,
        s.setup_time,
        s.downtime,
        downtime_limit_text(s),
        if s.verify_time > 0 {
            format!(" (verify digest {} ms of it on the source)", s.verify_time)
        } else {
            String::new()
        },
        human(s.ram.transferred),
        human(s.ram.total),
        s.ram.rounds,
        s.ram.dirty_sync_count,
        s.ram.duplicate,
        s.ram.normal,
        s.ram.skipped,
        throughput_text(s),
        s.dirty_tracker,
    );
    if let Some(b) = &s.pause_breakdown {
        let ms = |us: u64| us as f64 / 1000.0;
        out += &format!(
            "\npause (source clock): stop {:.1} ms, sync {:.1}, pages {:.1}, state {:.1}, digest {:.1}, handshake to STARTED {:.1}; in flight at the pause {} (drained {:.1} ms before it, guest running)",
            ms(b.stop_us),
            ms(b.sync_us),
            ms(b.pages_us),
            ms(b.state_us),
            ms(b.digest_us),
            ms(b.handshake_us),
            human(b.in_flight_bytes),
            ms(b.drain_us)
        );
        if b.loaded_us > 0 {
            out += &format!(
                " (END to LOADED {:.1}, the destination's resume {:.1})",
                ms(b.loaded_us),
                ms(b.dest_resume_us)
            );
        }
        if b.ping_us > 0 {
            out += &format!(
                "; round trip before it {:.1} ms (handshake priced at {:.1})",
                ms(b.ping_us),
                ms(b.handshake_estimate_us)
            );
        }
    }
    if s.pause_backouts > 0 {
        out += &format!(
            "
pauses cut short: {} (the rest would have crossed the limit; the guest ran on, longest {} ms)",
            s.pause_backouts, s.backout_pause_max
        );
    }
    if let Some(x) = &s.xbzrle_cache {
        out += &format!(
            "\nxbzrle: {} pages in {} (x{:.1}), cache {} misses {} ({:.0}%), overflows {}",
            x.pages,
            human(x.bytes),
            x.encoding_rate,
            human(x.cache_size),
            x.cache_miss,
            x.cache_miss_rate * 100.0,
            x.overflow
        );
    }
    if let Some(c) = &s.compression {
        out += &format!(
            "\ncompression: {} pages in {} (x{:.1})",
            c.pages,
            human(c.compressed_size),
            c.compression_rate
        );
    }
    if s.cpu_throttle_percentage > 0 {
        out += &format!("\nthrottle: {}%", s.cpu_throttle_percentage);
    }
    if let Some(t) = s.postcopy_time {
        out += &format!(
            "\npostcopy: {} ms after the switch, {} sent, {} page requests; fault latency mean {} us, p50 {} us, p99 {} us; vCPU blocktime {} ms",
            t,
            human(s.ram.postcopy_bytes),
            s.ram.postcopy_requests,
            s.postcopy_latency.unwrap_or(0),
            s.postcopy_latency_p50.unwrap_or(0),
            s.postcopy_latency_p99.unwrap_or(0),
            s.postcopy_blocktime.unwrap_or(0),
        );
        if let Some(n) = s.postcopy_local_faults {
            out += &format!(
                "; {n} local faults (never-written pages zero-filled on the destination: {} pages, mean {} us)",
                s.postcopy_local_pages.unwrap_or(0),
                s.postcopy_local_latency.unwrap_or(0),
            );
        }
        if let Some(d) = s
            .postcopy_latency_dist
            .as_ref()
            .filter(|d| d.iter().any(|&c| c > 0))
        {
            out += &format!(
                "
fault latency distribution: {}",
                latency_dist(d)
            );
        }
    }
    if let Some(c) = s.convergence.as_ref().filter(|c| !c.converging) {
        // A cancelled precopy: why it could not finish.
        out += &format!("\nprecopy was {}", c.describe());
    }
    if let Some(e) = &s.error_desc {
        out += &format!("\nerror: {e}");
    }
    out
}

/// Postcopy's fault latencies per power-of-two µs bucket (bucket i:
/// `[2^i, 2^(i+1))` µs), non-empty buckets only: `"64-127 us: 5, ..."`.
pub fn latency_dist(dist: &[u64]) -> String {
    dist.iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, c)| {
            let lo = if i == 0 { 0 } else { 1u64 << i };
            format!("{lo}-{} us: {c}", (1u64 << (i + 1)) - 1)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a status means the migration went through.
pub fn succeeded(s: &MigrationStats) -> bool {
    s.status == Status::Completed
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig::engine::Status;

    #[test]
    fn summary_and_progress_say_when_precopy_does_not_converge() {
        let mut s = MigrationStats {
            status: Status::Cancelled,
            ..Default::default()
        };
        assert!(!summary(&s).contains("converging"));
        s.convergence = Some(livemig::engine::Convergence {
            converging: false,
            dirty_rate: 1_400_000_000,
            send_rate: 1_170_000_000,
            stalled_syncs: 0,
            projected_ms: None,
        });
        let t = summary(&s);
        assert!(
            t.contains(
                "precopy was NOT converging: the guest dirties 1400 MB/s, the link sends 1170 MB/s"
            ),
            "{t}"
        );
        // A converging one says nothing more.
        s.convergence.as_mut().unwrap().converging = true;
        assert!(!summary(&s).contains("converging"));
    }

    #[test]
    fn summary_says_whether_the_downtime_kept_its_limit() {
        let mut s = MigrationStats {
            status: Status::Completed,
            downtime: 120,
            source_downtime: 121,
            downtime_limit: 300,
            ..MigrationStats::default()
        };
        let t = summary(&s);
        assert!(t.contains("downtime: 120 ms to the destination's resume (121 ms to STARTED on the source), within its limit of 300 ms"), "{t}");
        s.downtime = 450;
        s.source_downtime = 450;
        s.downtime_limit_exceeded = true;
        let t = summary(&s);
        assert!(
            t.contains("downtime: 450 ms, OVER its limit of 300 ms"),
            "{t}"
        );
        s.status = Status::Failed;
        assert!(
            !summary(&s).contains("limit"),
            "no verdict on a failed migration"
        );
    }

    #[test]
    fn summary_gives_the_average_rate_beside_the_last_rounds() {
        let mut s = MigrationStats {
            status: Status::Completed,
            total_time: 2000,
            ..MigrationStats::default()
        };
        // 500 MB in 2 s: 2000 Mbit/s on average; the last round faster.
        s.ram.transferred = 500_000_000;
        s.ram.mbps = 13873.4;
        let t = summary(&s);
        assert!(
            t.contains("throughput: 2000 Mbit/s on average (13873 Mbit/s in the last round)"),
            "{t}"
        );
        s.total_time = 0;
        assert!(
            summary(&s).contains("throughput: 13873 Mbit/s in the last round"),
            "no average without a time"
        );
    }

    #[test]
    fn summary_gives_postcopy_fault_latency_p50_p99_and_distribution() {
        let s = MigrationStats {
            status: Status::Completed,
            postcopy_time: Some(40),
            postcopy_latency: Some(90),
            postcopy_latency_p50: Some(88),
            postcopy_latency_p99: Some(172),
            postcopy_blocktime: Some(12),
            postcopy_latency_dist: Some(vec![1, 0, 0, 0, 0, 0, 7, 2]),
            postcopy_local_faults: Some(3),
            postcopy_local_pages: Some(1536),
            postcopy_local_latency: Some(41),
            ..MigrationStats::default()
        };
        let t = summary(&s);
        assert!(
            t.contains("p50 88 us, p99 172 us; vCPU blocktime 12 ms; 3 local faults (never-written pages zero-filled on the destination: 1536 pages, mean 41 us)"),
            "{t}"
        );
        assert!(
            t.contains("fault latency distribution: 0-1 us: 1, 64-127 us: 7, 128-255 us: 2"),
            "{t}"
        );
    }
}
