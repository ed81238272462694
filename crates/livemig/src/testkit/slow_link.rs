//! A link whose rate can collapse on command: a writer that hands at most
//! [`SlowLink::CHUNK`] bytes to its transport per call and, while the link
//! is slowed, sleeps a set time before each call. It stands in for a
//! source whose sending thread gets a sliver of a loaded host's CPUs, or a
//! link that turned slow, at a moment a test chooses (e.g. in the pause at
//! switch-over), without asserting anything about the machine's speed.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// The switch shared by a test and the writers it slows.
#[derive(Clone, Debug, Default)]
pub struct SlowLink {
    /// Microseconds slept before each write (0: full speed).
    delay_us: Arc<AtomicU64>,
    /// Writes made while slowed.
    slowed_writes: Arc<AtomicU64>,
}

impl SlowLink {
    /// Most bytes one write hands to the transport.
    pub const CHUNK: usize = 64 << 10;

    /// A link at full speed.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, each write first sleeps `delay` (the link carries at
    /// most [`Self::CHUNK`] bytes per `delay`).
    pub fn slow(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros().max(1) as u64, Ordering::Release);
    }

    /// Back to full speed.
    pub fn restore(&self) {
        self.delay_us.store(0, Ordering::Release);
    }

    /// Writes made while the link was slowed.
    pub fn slowed_writes(&self) -> u64 {
        self.slowed_writes.load(Ordering::Acquire)
    }

    /// `inner` behind this link.
    pub fn writer<W: Write>(&self, inner: W) -> SlowWrite<W> {
        SlowWrite {
            inner,
            link: self.clone(),
        }
    }
}

/// A writer behind a [`SlowLink`].
#[derive(Debug)]
pub struct SlowWrite<W> {
    inner: W,
    link: SlowLink,
}

impl<W: Write> Write for SlowWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let us = self.link.delay_us.load(Ordering::Acquire);
        if us > 0 {
            self.link.slowed_writes.fetch_add(1, Ordering::AcqRel);
            thread::sleep(Duration::from_micros(us));
        }
        self.inner.write(&buf[..buf.len().min(SlowLink::CHUNK)])
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_chunked_and_counted_only_while_slowed() {
        let link = SlowLink::new();
        let mut w = link.writer(Vec::new());
        let data = vec![1u8; 3 * SlowLink::CHUNK / 2];
        assert_eq!(w.write(&data).unwrap(), SlowLink::CHUNK);
        assert_eq!(link.slowed_writes(), 0);
        link.slow(Duration::from_micros(10));
        w.write_all(&data).unwrap();
        assert_eq!(link.slowed_writes(), 2, "two chunks, each slowed");
        link.restore();
        w.write_all(&data).unwrap();
        assert_eq!(link.slowed_writes(), 2);
        assert_eq!(w.inner.len(), SlowLink::CHUNK + 2 * data.len());
    }
}
