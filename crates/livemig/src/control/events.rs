//! QMP events: each one copied, with its timestamp, to every session that
//! has negotiated capabilities.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

type Subscribers = Vec<(u64, Sender<Value>)>;

/// Where a VMM (or the control server itself) sends QMP events. Cheap to
/// clone; sending never blocks (each session has its own queue).
#[derive(Clone, Default)]
pub struct Events {
    subs: Arc<Mutex<Subscribers>>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Events({} sessions)", lock(&self.subs).len())
    }
}

fn lock(m: &Mutex<Subscribers>) -> MutexGuard<'_, Subscribers> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// QMP's timestamp: wall-clock seconds and microseconds.
fn timestamp() -> Value {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()})
}

impl Events {
    /// Sends event `name` (with `data` when given) to every negotiated
    /// session.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let mut msg = json!({"event": name, "timestamp": timestamp()});
        if let Some(d) = data {
            msg["data"] = d;
        }
        lock(&self.subs).retain(|(_, tx)| tx.send(msg.clone()).is_ok());
    }

    /// Adds a session's queue; returns its key for [`Events::unsubscribe`].
    pub(crate) fn subscribe(&self, tx: Sender<Value>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.subs).push((id, tx));
        id
    }

    /// Removes a session's queue.
    pub(crate) fn unsubscribe(&self, id: u64) {
        lock(&self.subs).retain(|(k, _)| *k != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_subscribers_with_a_timestamp_until_they_leave() {
        let ev = Events::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let id = ev.subscribe(tx);
        ev.emit("STOP", None);
        ev.emit("MIGRATION", Some(json!({"status": "active"})));
        let a = rx.recv().unwrap();
        assert_eq!(a["event"], "STOP");
        assert!(a.get("data").is_none());
        assert!(a["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(a["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        assert_eq!(rx.recv().unwrap()["data"]["status"], "active");
        ev.unsubscribe(id);
        ev.emit("RESUME", None);
        assert!(rx.try_recv().is_err());
    }
}
