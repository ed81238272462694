//! Postcopy `auto`'s first pass: a window on the bytes in flight.
//!
//! Until `auto` has decided, precopy's bytes are mostly a measurement: on
//! a link far slower than the guest's writes the first measured probe
//! switches to postcopy, and everything still in flight then must reach
//! the destination before the guest may stop there (drained with the
//! guest running, or in the pause). A blocking write into a fresh socket
//! takes megabytes at memcpy speed, and a shaped link queues more: at
//! 1 Gbit/s (tbf, 20 ms of queue) 3.1-5.2 MB were in flight at the
//! decision in 9 traced runs, and the drain that followed took 12-20 ms,
//! each millisecond of it about a megabyte more that the guest wrote for
//! postcopy to carry (~8.5 ms of link time). Those writes also blocked
//! the probes: the deciding one came 6-32 ms late.
//!
//! So while the decision is open (one stream, first pass), precopy ends a
//! section with a DRAIN mark every quarter window and, before writing more
//! than a [`Window::limit`] past the last mark the destination confirmed
//! (APPLIED), waits for the oldest one. Up to [`MAX_MARKS`] are out at a
//! time, so the link stays busy while the source waits, and at the switch
//! only what followed the newest one can still be on its way (the switch
//! waits for their answers first, then drains the rest or, when it fits
//! in the pause, leaves it there); the window follows the
//! rate the destination confirms at (what it drains in [`WINDOW_TIME`]),
//! never below [`MIN_WINDOW`]. Once the decision is taken (or the first
//! pass ends), the marks still out are waited for and the window is gone.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The smallest window (bytes written and not confirmed applied).
pub(crate) const MIN_WINDOW: u64 = 1 << 20;
/// The window holds what the destination confirms in this long, at the
/// rate it last confirmed at.
pub(crate) const WINDOW_TIME: Duration = Duration::from_millis(8);
/// Most DRAIN marks waiting for their APPLIED at a time (one every
/// `1 / MAX_MARKS` of the window).
pub(crate) const MAX_MARKS: usize = 4;
/// A confirmation interval shorter than this says nothing of the rate (two
/// answers read back to back).
const MIN_INTERVAL: Duration = Duration::from_micros(500);

/// The marks out and the rate the destination confirms at.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// (mark, stream bytes at it), oldest first.
    marks: VecDeque<(u64, u64)>,
    /// The last confirmation: when it was read, and its stream bytes.
    confirmed: Option<(Instant, u64)>,
    /// Bytes per second between the last two confirmations (0: unknown).
    rate: f64,
}

impl Window {
    /// Most bytes written and not confirmed.
    pub fn limit(&self) -> u64 {
        MIN_WINDOW.max((self.rate * WINDOW_TIME.as_secs_f64()) as u64)
    }

    /// Whether `sent` stream bytes, `applied` of them confirmed, fill the
    /// window: no more may be written before a confirmation.
    pub fn full(&self, sent: u64, applied: u64) -> bool {
        sent.saturating_sub(applied) >= self.limit()
    }

    /// Whether a new mark is due at `sent`: a [`MAX_MARKS`]th of the
    /// window past the last mark out (or past `applied`, with none out).
    pub fn mark_due(&self, sent: u64, applied: u64) -> bool {
        let from = self.marks.back().map_or(applied, |m| m.1).max(applied);
        sent.saturating_sub(from) >= self.limit() / MAX_MARKS as u64
    }

    /// Whether the oldest mark must be waited for before writing more at
    /// `sent`: the window is full, or a mark is due and [`MAX_MARKS`] are
    /// out already.
    pub fn must_wait(&self, sent: u64, applied: u64) -> bool {
        !self.marks.is_empty()
            && (self.full(sent, applied)
                || (self.marks.len() >= MAX_MARKS && self.mark_due(sent, applied)))
    }

    /// Mark `mark` went out, the stream at `bytes` after it.
    pub fn marked(&mut self, mark: u64, bytes: u64) {
        self.marks.push_back((mark, bytes));
    }

    /// The oldest mark out: (mark, stream bytes at it).
    pub fn oldest(&self) -> Option<(u64, u64)> {
        self.marks.front().copied()
    }

    /// Marks out.
    pub fn outstanding(&self) -> usize {
        self.marks.len()
    }

    /// The oldest mark was confirmed, read at `now`: returns it, and
    /// measures the rate against the confirmation before.
    pub fn confirm(&mut self, now: Instant) -> Option<(u64, u64)> {
        let (mark, bytes) = self.marks.pop_front()?;
        if let Some((t, b)) = self.confirmed {
            let dt = now.saturating_duration_since(t);
            if dt >= MIN_INTERVAL && bytes > b {
                self.rate = (bytes - b) as f64 / dt.as_secs_f64();
            }
        }
        self.confirmed = Some((now, bytes));
        Some((mark, bytes))
    }

    /// Bytes per second the destination confirmed at, between the last
    /// two confirmations (`None`: not measured).
    pub fn rate(&self) -> Option<f64> {
        (self.rate > 0.0).then_some(self.rate)
    }

    /// The rate, if its last confirmation was read within `age` of `now`.
    pub fn recent_rate(&self, now: Instant, age: Duration) -> Option<f64> {
        let (t, _) = self.confirmed?;
        self.rate()
            .filter(|_| now.saturating_duration_since(t) <= age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    const Q: u64 = MIN_WINDOW / MAX_MARKS as u64;

    #[test]
    fn the_window_starts_at_its_minimum_and_marks_every_quarter() {
        let w = Window::default();
        assert_eq!(w.limit(), MIN_WINDOW);
        assert!(!w.mark_due(Q - 1, 0));
        assert!(w.mark_due(Q, 0));
        assert!(!w.full(MIN_WINDOW - 1, 0));
        assert!(w.full(MIN_WINDOW, 0));
        // Nothing out: nothing to wait for, however much was written.
        assert!(!w.must_wait(10 * MIN_WINDOW, 0));
    }

    #[test]
    fn a_full_window_waits_for_the_oldest_mark() {
        let mut w = Window::default();
        w.marked(1, Q);
        assert!(!w.must_wait(Q + 1, 0));
        // The next mark is due a quarter window after the first.
        assert!(!w.mark_due(2 * Q - 1, 0));
        assert!(w.mark_due(2 * Q, 0));
        w.marked(2, 2 * Q);
        w.marked(3, 3 * Q);
        w.marked(4, MIB);
        assert!(w.must_wait(MIB, 0), "a full window waits");
        assert_eq!(w.oldest(), Some((1, Q)));
        let t = Instant::now();
        assert_eq!(w.confirm(t), Some((1, Q)));
        // A quarter confirmed: room for another quarter.
        assert!(!w.must_wait(MIB, Q));
        assert!(w.must_wait(MIB + Q, Q));
        assert_eq!(w.outstanding(), 3);
    }

    #[test]
    fn no_more_marks_than_max_marks_are_ever_out() {
        let mut w = Window::default();
        for k in 1..=MAX_MARKS as u64 {
            w.marked(k, k * Q / 2);
        }
        // Little in flight, but a fifth mark would be due: the oldest is
        // waited for first.
        let sent = (MAX_MARKS as u64) * Q / 2 + Q;
        assert!(!w.full(sent, 0));
        assert!(w.mark_due(sent, 0));
        assert!(w.must_wait(sent, 0));
        w.confirm(Instant::now());
        assert!(!w.must_wait(sent, Q / 2));
    }

    #[test]
    fn the_window_follows_the_confirmed_rate() {
        let mut w = Window::default();
        let t = Instant::now();
        w.marked(1, MIB);
        w.marked(2, 11 * MIB);
        w.confirm(t);
        assert_eq!(w.rate(), None, "one confirmation measures nothing");
        // 10 MiB confirmed in 10 ms: 1 GiB/s, a window of 8 ms of it.
        w.confirm(t + Duration::from_millis(10));
        let rate = w.rate().unwrap();
        assert!((rate - 1000.0 * MIB as f64).abs() < 1.0, "{rate}");
        assert_eq!(w.limit(), (rate * 0.008) as u64);
        let later = t + Duration::from_millis(30);
        assert_eq!(w.recent_rate(later, Duration::from_millis(20)), Some(rate));
        assert_eq!(w.recent_rate(later, Duration::from_millis(10)), None);
        assert!(w.limit() > MIN_WINDOW);
        // A slow link keeps the minimum.
        let mut s = Window::default();
        s.marked(1, MIB);
        s.marked(2, MIB + 64 * 1024);
        s.confirm(t);
        s.confirm(t + Duration::from_millis(10));
        assert_eq!(s.limit(), MIN_WINDOW);
        // Answers read back to back measure nothing.
        let mut b = Window::default();
        b.marked(1, MIB);
        b.marked(2, 2 * MIB);
        b.confirm(t);
        b.confirm(t + Duration::from_micros(10));
        assert_eq!(b.rate(), None);
    }

    #[test]
    fn confirming_with_no_mark_out_is_nothing() {
        let mut w = Window::default();
        assert_eq!(w.confirm(Instant::now()), None);
        assert_eq!(w.outstanding(), 0);
    }
}
