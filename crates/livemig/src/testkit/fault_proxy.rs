//! A TCP proxy that breaks a migration on purpose, for fault-injection
//! tests: it forwards bytes between a source and a destination and cuts
//! the connection at a chosen byte or handshake step.
//!
//! Only the first connection is faulted (the main stream and its return
//! path), or the one chosen with [`FaultProxy::start_on`]; the others
//! pass through untouched. The replies of precopy on the return path
//! (the setup verdict ACCEPTED, APPLIED for each drain mark) are passed
//! on and not counted: the faults act on what follows them. A cut shuts
//! both sockets down and closes them, so each peer sees the connection
//! end (end-of-file on reads, a reset on writes) as it would when a
//! network path or a peer dies.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::engine::{GO_LEN, REPLY_HEAD_LEN};

/// Where the proxy cuts the first connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything (a byte counter).
    None,
    /// Forward exactly this many source→destination bytes, then cut.
    CutForwardAt(u64),
    /// Forward the whole stream; cut when the destination's first reply
    /// after the setup verdict (LOADED or FAILED) arrives, without passing
    /// it on.
    CutBeforeReply,
    /// Pass LOADED back to the source, swallow its GO, then cut.
    CutAfterLoaded,
    /// Pass LOADED back and GO on, swallow STARTED, then cut.
    CutAfterGo,
    /// Forward exactly this many destination→source bytes (the return
    /// path: replies, then postcopy page requests), then cut.
    CutBackAt(u64),
}

#[derive(Default)]
struct Counters {
    forward: AtomicU64,
    back: AtomicU64,
    cut: AtomicBool,
}

/// A running proxy; it stops accepting when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to
    /// `upstream`, applying `fault` to the first one.
    pub fn start(upstream: SocketAddr, fault: Fault) -> io::Result<FaultProxy> {
        Self::start_on(upstream, fault, 0)
    }

    /// As [`FaultProxy::start`], applying `fault` to connection `nth`
    /// (0 the first) instead: a postcopy urgent connection or a page
    /// channel; the counters and [`FaultProxy::has_cut`] are that
    /// connection's.
    pub fn start_on(upstream: SocketAddr, fault: Fault, nth: usize) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        let accept = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let mut k = 0;
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(up) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let faulted = k == nth;
                    k += 1;
                    let fault = if faulted { fault } else { Fault::None };
                    let counters = if faulted {
                        c.clone()
                    } else {
                        Arc::new(Counters::default())
                    };
                    let _ = Link::start(client, up, fault, counters);
                }
            })?;
        Ok(FaultProxy {
            addr,
            counters,
            stop,
            accept: Some(accept),
        })
    }

    /// The URI a source connects to: `tcp:127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    /// Bytes passed source→destination on the faulted connection so far.
    pub fn forwarded(&self) -> u64 {
        self.counters.forward.load(Ordering::SeqCst)
    }

    /// Bytes passed destination→source on the faulted connection so far.
    pub fn returned(&self) -> u64 {
        self.counters.back.load(Ordering::SeqCst)
    }

    /// True once the fault has cut the faulted connection.
    pub fn has_cut(&self) -> bool {
        self.counters.cut.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop up so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One proxied connection: two pumps sharing the fault's state.
struct Link {
    client: TcpStream,
    up: TcpStream,
    fault: Fault,
    counters: Arc<Counters>,
    /// Handshake progress, under one lock so each pump's decision and
    /// its write happen in a fixed order relative to the other pump's.
    state: Mutex<HandshakeState>,
}

#[derive(Default)]
struct HandshakeState {
    /// LOADED (the first reply) went back to the source.
    loaded_passed: bool,
    /// Source bytes after LOADED passed on (GO).
    after_loaded: u64,
    /// Drop everything from the destination from now on.
    swallow_back: bool,
}

impl Link {
    fn start(
        client: TcpStream,
        up: TcpStream,
        fault: Fault,
        counters: Arc<Counters>,
    ) -> io::Result<()> {
        let link = Arc::new(Link {
            client,
            up,
            fault,
            counters,
            state: Mutex::new(HandshakeState::default()),
        });
        let (l1, l2) = (link.clone(), link);
        std::thread::Builder::new()
            .name("fault-proxy-fwd".into())
            .spawn(move || l1.pump_forward())?;
        std::thread::Builder::new()
            .name("fault-proxy-back".into())
            .spawn(move || l2.pump_back())?;
        Ok(())
    }

    /// Ends the connection both ways. `has_cut` reports only the fault's
    /// own cuts, not a peer that died.
    fn cut(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.up.shutdown(Shutdown::Both);
    }

    /// The fault cuts the connection.
    fn fire(&self) {
        self.counters.cut.store(true, Ordering::SeqCst);
        self.cut();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandshakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Source → destination.
    fn pump_forward(&self) {
        let mut buf = vec![0u8; 64 << 10];
        let (mut from, mut to) = (&self.client, &self.up);
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                // A reset (a dead peer) is passed on as one.
                Err(_) => return self.cut(),
            };
            let mut chunk = &buf[..n];
            let mut cut_after = false;
            {
                let mut st = self.lock();
                match self.fault {
                    Fault::CutForwardAt(limit) => {
                        let done = self.counters.forward.load(Ordering::SeqCst);
                        let room = limit.saturating_sub(done);
                        if room <= chunk.len() as u64 {
                            chunk = &chunk[..room as usize];
                            cut_after = true;
                        }
                    }
                    // Once LOADED went back, the destination has read the
                    // whole stream: what the source sends now is GO.
                    Fault::CutAfterLoaded if st.loaded_passed => {
                        drop(st);
                        self.fire();
                        break;
                    }
                    Fault::CutAfterGo if st.loaded_passed => {
                        let room = (GO_LEN as u64).saturating_sub(st.after_loaded);
                        if room <= chunk.len() as u64 {
                            chunk = &chunk[..room as usize];
                            // STARTED must not get through: decided before
                            // GO is passed on.
                            st.swallow_back = true;
                        }
                        st.after_loaded += chunk.len() as u64;
                    }
                    _ => {}
                }
            }
            if to.write_all(chunk).is_err() {
                return self.cut();
            }
            self.counters
                .forward
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if cut_after {
                self.fire();
                break;
            }
        }
        let _ = self.up.shutdown(Shutdown::Write);
    }

    /// Destination → source.
    fn pump_back(&self) {
        let mut buf = vec![0u8; 4096];
        let (mut from, mut to) = (&self.up, &self.client);
        // The return path's first replies, while they are precopy's (the
        // setup verdict ACCEPTED, APPLIED for each drain mark): passed on
        // as they are and not counted, so the faults apply to the replies
        // and requests after them (LOADED or FAILED first).
        let mut head = Some(Vec::new());
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => {
                    if let Some(h) = head.take() {
                        let _ = to.write_all(&h);
                    }
                    break;
                }
                Ok(n) => n,
                Err(_) => return self.cut(),
            };
            let rest;
            let mut chunk = &buf[..n];
            if let Some(h) = head.as_mut() {
                h.extend_from_slice(chunk);
                let mut passed = 0;
                let counted = loop {
                    match precopy_reply(&h[passed..]) {
                        Some(Some(len)) => passed += len,
                        Some(None) => break false,
                        None => break true,
                    }
                };
                if to.write_all(&h[..passed]).is_err() {
                    return self.cut();
                }
                h.drain(..passed);
                if !counted {
                    continue;
                }
                rest = head.take().expect("just used");
                if rest.is_empty() {
                    continue;
                }
                chunk = &rest;
            }
            let n = chunk.len();
            let mut cut_after = false;
            {
                let mut st = self.lock();
                let before = self.counters.back.load(Ordering::SeqCst);
                match self.fault {
                    Fault::CutBackAt(limit) => {
                        let room = limit.saturating_sub(before);
                        if room <= n as u64 {
                            chunk = &chunk[..room as usize];
                            cut_after = true;
                        }
                    }
                    Fault::CutBeforeReply => {
                        drop(st);
                        self.fire();
                        break;
                    }
                    Fault::CutAfterGo if st.swallow_back => {
                        drop(st);
                        self.fire();
                        break;
                    }
                    Fault::CutAfterLoaded | Fault::CutAfterGo
                        if before + n as u64 >= REPLY_HEAD_LEN as u64 =>
                    {
                        // Set before LOADED reaches the source, so GO (sent
                        // only after it) is handled as GO by the other pump.
                        st.loaded_passed = true;
                    }
                    _ => {}
                }
            }
            if to.write_all(chunk).is_err() {
                return self.cut();
            }
            self.counters
                .back
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            if cut_after {
                self.fire();
                break;
            }
        }
        let _ = self.client.shutdown(Shutdown::Write);
    }
}

/// At the start of `b`, a reply of precopy: `Some(Some(len))` for a
/// whole ACCEPTED or APPLIED (with or without a report) of `len` bytes, `Some(None)` when `b` is too
/// short to tell (or holds part of an APPLIED), `None` for anything else.
fn precopy_reply(b: &[u8]) -> Option<Option<usize>> {
    if b.len() < REPLY_HEAD_LEN {
        return Some(None);
    }
    let len = u32::from_be_bytes([b[9], b[10], b[11], b[12]]) as usize;
    match (b[8], len) {
        (4, 0) => Some(Some(REPLY_HEAD_LEN)),
        // APPLIED: a mark, or a mark and the destination's report.
        (5, 8 | 32) if b.len() >= REPLY_HEAD_LEN + len => Some(Some(REPLY_HEAD_LEN + len)),
        (5, 8 | 32) => Some(None),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        });
        (addr, t)
    }

    #[test]
    fn cuts_after_exactly_n_bytes() {
        let (addr, server) = echo_server();
        let p = FaultProxy::start(addr, Fault::CutForwardAt(1000)).unwrap();
        let mut s = TcpStream::connect(p.addr).unwrap();
        let data = vec![7u8; 5000];
        // The first write may or may not fail: the cut races with it.
        let _ = s.write_all(&data);
        let got = server.join().unwrap();
        assert_eq!(got.len(), 1000);
        assert!(p.has_cut());
        assert_eq!(p.forwarded(), 1000);
        // The source's side is closed: reads see the end.
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }

    #[test]
    fn passes_everything_without_a_fault() {
        let (addr, server) = echo_server();
        let p = FaultProxy::start(addr, Fault::None).unwrap();
        let mut s = TcpStream::connect(p.addr).unwrap();
        s.write_all(&[1u8; 300_000]).unwrap();
        drop(s);
        assert_eq!(server.join().unwrap().len(), 300_000);
        assert!(!p.has_cut());
    }
}
