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
            pb.set_message(format!(
                "{:?} round {} remaining {} {:.0} Mbit/s dirty {} pages/s throttle {}%",
                s.status,
                s.ram.rounds,
                human(s.ram.remaining),
                s.ram.mbps,
                s.ram.dirty_pages_rate,
                s.cpu_throttle_percentage
            ));
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

/// A few lines a person reads after a migration.
pub fn summary(s: &MigrationStats) -> String {
    let mut out = format!(
        "status: {:?}\n\
         total time: {} ms (setup {} ms), downtime: {} ms{}\n\
         transferred: {} of {} guest RAM, {} rounds, {} dirty syncs\n\
         pages: {} zero, {} raw, {} skipped (unchanged)\n\
         throughput: {:.0} Mbit/s, dirty tracker: {}",
        s.status,
        s.total_time,
        s.setup_time,
        s.downtime,
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
        s.ram.mbps,
        s.dirty_tracker,
    );
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
    }
    if let Some(e) = &s.error_desc {
        out += &format!("\nerror: {e}");
    }
    out
}

/// Whether a status means the migration went through.
pub fn succeeded(s: &MigrationStats) -> bool {
    s.status == Status::Completed
}
