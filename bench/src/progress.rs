//! Guest progress during a migration: how fast the incrementer runs while
//! it is migrated, against its own rate just before.
//!
//! The incrementer prints a ',' on its serial port after every 16 MiB of
//! a pass (and after the pass's last, shorter, chunk), then a '.' once it
//! counted the pass at 0x7e00 (n = 1). [`PassClock`] timestamps those
//! marks by polling the source's serial file (both systems write each
//! byte to it as the guest outputs it): each event is a time and the
//! writer's position then, in passes (the "INC" banner is position 0).
//! Between marks the position is estimated from the rate before the
//! migration; at the end of a completed migration it is exact, read from
//! the source's final memory (the pass counter and where the writer stood,
//! as [`crate::guest::IncrementerCheck::position`] finds it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::guest::FIRST;

/// How often the serial file is polled (the error of each mark's time).
const POLL: Duration = Duration::from_millis(2);

/// Bytes of a pass between two ',' marks (the guest's MARK).
pub const MARK_BYTES: u64 = 16 << 20;

/// Marks to see before the migration starts, for the rate before it (a
/// sixteenth of a 1 GiB pass: the migration still starts early in the
/// first pass, while most of the range is zero).
pub const MARKS_BEFORE: usize = 4;

/// One timed mark: seconds since the clock started, and the writer's
/// position then, in passes.
pub type Event = (f64, f64);

/// The writer's positions (in passes) that the serial output `after` the
/// banner shows, one per mark, for a range of `range` bytes: a ',' ends a
/// chunk, a '.' a counted pass. The banner itself is position 0.
pub fn positions(after: &[u8], range: u64) -> Vec<f64> {
    let mut out = vec![0.0];
    let (mut passes, mut chunks) = (0u64, 0u64);
    for &b in after {
        match b {
            b',' => chunks += 1,
            b'.' => {
                passes += 1;
                chunks = 0;
            }
            _ => continue,
        }
        let p = passes as f64 + (chunks * MARK_BYTES).min(range) as f64 / range as f64;
        // The last chunk's ',' and the pass's '.' are the same position.
        if out.last().is_some_and(|&l| p > l) {
            out.push(p);
        }
    }
    out
}

/// Times of the incrementer's marks on a serial file, polled in a thread
/// until dropped.
pub struct PassClock {
    t0: Instant,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PassClock {
    /// Starts watching `serial` for `banner` and the marks after it, for a
    /// guest writing [1 MiB, `end`).
    pub fn start(serial: &Path, banner: &str, end: u64) -> PassClock {
        let t0 = Instant::now();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, st, path, banner) = (
            events.clone(),
            stop.clone(),
            PathBuf::from(serial),
            banner.as_bytes().to_vec(),
        );
        let range = end.saturating_sub(FIRST).max(1);
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let s = std::fs::read(&path).unwrap_or_default();
                let now = t0.elapsed().as_secs_f64();
                if let Some(at) = find(&s, &banner) {
                    let p = positions(&s[at + banner.len()..], range);
                    let mut e = ev.lock().expect("pass clock lock");
                    // Marks that arrived within one poll share its time.
                    let seen = e.len();
                    e.extend(p.into_iter().skip(seen).map(|p| (now, p)));
                }
                std::thread::sleep(POLL);
            }
        });
        PassClock {
            t0,
            events,
            stop,
            thread: Some(thread),
        }
    }

    /// Seconds since the clock started.
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("pass clock lock").clone()
    }

    /// Waits until the writer reached `position` (in passes) and `marks`
    /// marks followed the banner, or `timeout`; true if it did.
    pub fn wait(&self, position: f64, marks: usize, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            let e = self.events();
            if e.len() > marks && e.last().is_some_and(|l| l.1 >= position) {
                return true;
            }
            std::thread::sleep(POLL * 5);
        }
        false
    }
}

impl Drop for PassClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The incrementer's speed before and during a migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GuestSpeed {
    /// Passes per second before the migration started.
    pub before_pps: f64,
    /// Passes per second while it ran (until the source stopped the guest,
    /// or until the last mark seen before the cancel).
    pub during_pps: f64,
}

impl GuestSpeed {
    /// The rate during the migration as a percentage of the rate before.
    pub fn pct(&self) -> f64 {
        100.0 * self.during_pps / self.before_pps
    }
}

/// Passes per second between the first and the last event before `until`
/// (None without two such events, or with no time between them).
pub fn rate_before(events: &[Event], until: f64) -> Option<f64> {
    let before: Vec<Event> = events.iter().copied().filter(|e| e.0 <= until).collect();
    let (first, last) = (*before.first()?, *before.last()?);
    (last.0 > first.0).then(|| (last.1 - first.1) / (last.0 - first.0))
}

/// The writer's position at time `t`: where the last mark by then put it,
/// plus what it covers at `rate` since, but not past the next mark (or,
/// with none seen, the next chunk's end).
pub fn position_at(events: &[Event], t: f64, rate: f64, range: u64) -> Option<f64> {
    let k = events.iter().filter(|e| e.0 <= t).count();
    let (at, pos) = *events.get(k.checked_sub(1)?)?;
    let cap = match events.get(k) {
        Some(next) => next.1,
        None => pos + MARK_BYTES as f64 / range.max(1) as f64,
    };
    Some((pos + (t - at) * rate).min(cap))
}

/// Where the migration ended for the guest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum End {
    /// The source stopped the guest at this time with it at this exact
    /// position (passes, fractional, from its final memory).
    Stopped { at: f64, position: f64 },
    /// The migration was cancelled (or its end is not known exactly) at
    /// this time: the last mark before it closes the window.
    Open { at: f64 },
}

/// The guest's speed over a migration started at `start`, from the marks
/// of the source's serial port and how it ended, for a range of `range`
/// bytes. None without a rate before (fewer than two marks before
/// `start`) or without progress measurable in the window.
pub fn guest_speed(events: &[Event], start: f64, end: End, range: u64) -> Option<GuestSpeed> {
    let before = rate_before(events, start)?;
    let from = position_at(events, start, before, range)?;
    let during = match end {
        End::Stopped { at, position } if at > start => (position - from).max(0.0) / (at - start),
        End::Stopped { .. } => return None,
        End::Open { at } => {
            let &(t, p) = events.iter().rfind(|e| e.0 <= at)?;
            if t <= start {
                return None;
            }
            (p - from).max(0.0) / (t - start)
        }
    };
    Some(GuestSpeed {
        before_pps: before,
        during_pps: during,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = 64 << 20; // 4 chunks a pass

    #[test]
    fn positions_follow_chunk_marks_and_pass_dots() {
        assert_eq!(positions(b"", R), vec![0.0]);
        assert_eq!(
            positions(b",,,,.,x,", R),
            vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
        );
        // A last chunk shorter than a mark: its ',' ends the pass.
        let r = 40 << 20;
        assert_eq!(positions(b",,,.", r), vec![0.0, 0.4, 0.8, 1.0]);
    }

    #[test]
    fn rate_before_uses_the_span_of_the_marks() {
        // Banner at 1 s, a quarter pass every 0.25 s: 1 pass/s; events
        // after the start are not counted.
        let e = [(1.0, 0.0), (1.25, 0.25), (1.5, 0.5), (9.0, 0.75)];
        assert_eq!(rate_before(&e, 1.6), Some(1.0));
        assert_eq!(rate_before(&e, 1.1), None);
        assert_eq!(rate_before(&[], 10.0), None);
        // Two events at the same poll: no time between them.
        assert_eq!(rate_before(&[(1.0, 0.0), (1.0, 0.25)], 2.0), None);
    }

    #[test]
    fn position_extrapolates_but_never_past_the_next_mark() {
        let e = [(0.0, 0.0), (0.5, 0.25), (1.0, 0.5)];
        // 0.5 at 1.0, then 0.1 s at 1 pass/s.
        assert!((position_at(&e, 1.1, 1.0, R).unwrap() - 0.6).abs() < 1e-9);
        // A mark exactly at t counts.
        assert_eq!(position_at(&e, 1.0, 1.0, R), Some(0.5));
        // Not past the next mark seen, nor past the next chunk's end.
        assert_eq!(position_at(&e, 0.9, 5.0, R), Some(0.5));
        assert_eq!(position_at(&e, 9.0, 5.0, R), Some(0.75));
        assert_eq!(position_at(&e, -1.0, 1.0, R), None);
    }

    #[test]
    fn stopped_guest_speed_uses_its_exact_end_position() {
        // 1 pass/s before; the migration starts at 0.6 (position 0.6);
        // the source stopped the guest at 2.6 at position 1.1: half a pass
        // in 2 s = 0.25 passes/s, 25 % of its speed.
        let e = [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (1.5, 0.75)];
        let s = guest_speed(
            &e,
            0.6,
            End::Stopped {
                at: 2.6,
                position: 1.1,
            },
            R,
        )
        .unwrap();
        assert_eq!(s.before_pps, 1.0);
        assert!((s.during_pps - 0.25).abs() < 1e-9, "{s:?}");
        assert!((s.pct() - 25.0).abs() < 1e-9);
    }

    #[test]
    fn open_window_ends_at_the_last_mark_seen() {
        // 1 pass/s before; start at 0.5 (position 0.5); marks at 1.0 and
        // 1.5 then nothing until the cancel at 10: half a pass in 1 s.
        let e = [(0.0, 0.0), (0.5, 0.5), (1.0, 0.75), (1.5, 1.0)];
        let s = guest_speed(&e, 0.5, End::Open { at: 10.0 }, R).unwrap();
        assert_eq!((s.before_pps, s.during_pps), (1.0, 0.5));
        assert_eq!(s.pct(), 50.0);
        // Faster during than before shows above 100 %.
        let e = [(0.0, 0.0), (1.0, 0.25), (1.1, 0.5), (1.2, 0.75)];
        let s = guest_speed(&e, 1.0, End::Open { at: 3.0 }, R).unwrap();
        assert!((s.during_pps - 2.5).abs() < 1e-9, "{s:?}");
        assert!((s.pct() - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn no_figure_without_a_rate_before_or_progress_during() {
        // One event before the start: no rate before.
        let e = [(0.0, 0.0), (5.0, 0.25)];
        assert_eq!(guest_speed(&e, 1.0, End::Open { at: 9.0 }, R), None);
        // No mark in an open window.
        let e = [(0.0, 0.0), (1.0, 0.25)];
        assert_eq!(guest_speed(&e, 1.5, End::Open { at: 9.0 }, R), None);
        // A stop before the start is nonsense.
        let stop = |at, position| End::Stopped { at, position };
        assert_eq!(guest_speed(&e, 1.5, stop(1.0, 0.5), R), None);
        // A guest stopped where it stood at the start made no progress.
        let s = guest_speed(&e, 1.5, stop(3.0, 0.3), R).unwrap();
        assert_eq!(s.during_pps, 0.0);
    }

    #[test]
    fn clock_timestamps_the_banner_and_the_marks_of_a_growing_file() {
        let dir = std::env::temp_dir().join(format!("pass-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("serial");
        std::fs::write(&f, b"boot noise,. ").unwrap();
        let c = PassClock::start(&f, "INC\n", FIRST + R);
        std::thread::sleep(Duration::from_millis(50));
        // Marks before the banner do not count.
        assert!(c.events().is_empty());
        std::fs::write(&f, b"boot noise,. INC\n").unwrap();
        assert!(!c.wait(0.0, 1, Duration::from_millis(100)));
        assert_eq!(c.events().last().map(|e| e.1), Some(0.0));
        std::fs::write(&f, b"boot noise,. INC\n,,,,.,").unwrap();
        assert!(c.wait(1.25, 5, Duration::from_secs(10)));
        let e = c.events();
        let p: Vec<f64> = e.iter().map(|e| e.1).collect();
        assert_eq!(p, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25]);
        assert!(e.windows(2).all(|w| w[0].0 <= w[1].0) && e[0].0 <= c.now());
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
