//! A QMP client for the control socket (and for QEMU's): negotiates on
//! connect, matches answers to requests by `id`, keeps events for
//! [`ControlClient::next_event`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::framing::{Frame, Splitter};
use super::ControlError;

/// Longest message accepted from a server.
const MAX_MESSAGE: usize = 16 << 20;

/// A client of a control socket.
pub struct ControlClient {
    stream: UnixStream,
    path: String,
    splitter: Splitter,
    pending: VecDeque<Value>,
    events: VecDeque<Value>,
    greeting: Value,
    next_id: u64,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlClient({})", self.path)
    }
}

/// Default wait for an answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl ControlClient {
    /// Connects, reads the QMP greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let mut c = ControlClient::connect_raw(path)?;
        c.execute("qmp_capabilities", Value::Null)?;
        Ok(c)
    }

    /// Connects and reads the greeting, without negotiating (for tests of
    /// the negotiation itself).
    pub fn connect_raw(path: &Path) -> Result<ControlClient, ControlError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Io {
            path: shown.clone(),
            source,
        })?;
        let mut c = ControlClient {
            stream,
            path: shown,
            splitter: Splitter::new(MAX_MESSAGE),
            pending: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 0,
        };
        let greeting = c.read_message(Instant::now() + ANSWER_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            return Err(ControlError::Protocol(greeting.to_string()));
        }
        c.greeting = greeting;
        Ok(c)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    fn io(&self, source: io::Error) -> ControlError {
        ControlError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The next message (answer or event), waiting until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, ControlError> {
        let mut buf = [0u8; 8192];
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Ok(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from the server",
                )));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            let n = match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(self.io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            };
            let mut frames = Vec::new();
            self.splitter.feed(&buf[..n], &mut frames);
            for f in frames {
                match f {
                    Frame::Text(t) => match serde_json::from_slice(&t) {
                        Ok(v) => self.pending.push_back(v),
                        Err(_) => {
                            return Err(ControlError::Protocol(
                                String::from_utf8_lossy(&t).into_owned(),
                            ))
                        }
                    },
                    Frame::TooLong => {
                        return Err(ControlError::Protocol(format!(
                            "a message longer than {MAX_MESSAGE} bytes"
                        )))
                    }
                }
            }
        }
    }

    /// The next answer (not an event), keeping events for
    /// [`ControlClient::next_event`].
    fn read_answer(&mut self) -> Result<Value, ControlError> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let m = self.read_message(deadline)?;
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return Ok(m);
            }
        }
    }

    /// Runs `cmd` with `args` (an object or null) and returns its result.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, ControlError> {
        self.next_id += 1;
        let id = format!("livemig-{}", self.next_id);
        let mut req = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            req["arguments"] = args;
        }
        let line = format!("{req}\n");
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        let mut ans = self.read_answer()?;
        if ans.get("id") != Some(&json!(id)) {
            return Err(ControlError::Protocol(ans.to_string()));
        }
        if let Some(r) = ans.get_mut("return") {
            return Ok(r.take());
        }
        match ans.get("error") {
            Some(e) => Err(ControlError::Command {
                class: e["class"].as_str().unwrap_or("?").to_string(),
                desc: e["desc"].as_str().unwrap_or("?").to_string(),
            }),
            None => Err(ControlError::Protocol(ans.to_string())),
        }
    }

    /// Sends raw bytes (for tests of malformed input) and reads the next
    /// answer object as it is.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<Value, ControlError> {
        self.stream.write_all(bytes).map_err(|e| self.io(e))?;
        self.read_answer()
    }

    /// The next event, waiting up to `timeout`; `None` when none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>, ControlError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        match self.read_message(Instant::now() + timeout) {
            Ok(m) if m.get("event").is_some() => Ok(Some(m)),
            // An answer nobody waits for (cannot happen in order).
            Ok(m) => Err(ControlError::Protocol(m.to_string())),
            Err(ControlError::Io { source, .. })
                if matches!(
                    source.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
