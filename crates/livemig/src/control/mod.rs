//! A control socket: JSON lines on a Unix socket, modelled on QMP's
//! migration commands, so a running VMM can be steered from outside.
//!
//! Each request is one line, `{"execute": NAME, "arguments": {...}}`; each
//! answer one line, `{"return": VALUE}` or
//! `{"error": {"class": CLASS, "desc": TEXT}}`. On connect the server
//! greets with `{"livemig": {"version": "..."}}`.
//!
//! | command | arguments | does |
//! |---|---|---|
//! | `query-migrate` | none | stats of the current or last migration (`{"status": "none"}` before any) |
//! | `migrate` | `uri` | starts an outgoing migration |
//! | `migrate-incoming` | `uri` | starts waiting for an incoming one |
//! | `migrate-set-parameters` | any of the [`Params`] fields, QEMU names | applies now, and to the next migration |
//! | `query-migrate-parameters` | none | the parameters |
//! | `migrate-set-capabilities` | `capabilities: [{capability, state}]` | `xbzrle`, `auto-converge`, `verify`, `postcopy-ram` |
//! | `query-migrate-capabilities` | none | the capabilities |
//! | `migrate-cancel` | none | cancels the running migration; the guest runs on |
//! | `migrate-start-postcopy` | none | switches the running migration to postcopy (needs `postcopy-ram`) |

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::engine::{MigrationHandle, Params};
use crate::transport::Uri;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// Starts migrations for the control server: the VMM's side.
pub trait MigrationStarter: Send {
    /// Starts an outgoing migration to `uri` in the background, steered
    /// and watched through `handle`. Returns once it has started.
    fn start_outgoing(&mut self, uri: &Uri, handle: MigrationHandle) -> Result<(), String>;

    /// Starts listening for an incoming migration on `uri` in the
    /// background.
    fn start_incoming(&mut self, uri: &Uri) -> Result<(), String>;

    /// `cont`: resumes a source guest that an outgoing migration left
    /// paused because the destination never confirmed it started
    /// (`MigrationError::Unconfirmed`). The operator sends it only when
    /// the destination is known not to run the guest.
    fn resume_unconfirmed(&mut self) -> Result<(), String> {
        Err("this VMM cannot resume a guest from the control socket".into())
    }
}

struct State {
    params: Params,
    current: Option<MigrationHandle>,
    starter: Box<dyn MigrationStarter>,
}

/// An error answer.
#[derive(Debug)]
struct CmdError {
    class: &'static str,
    desc: String,
}

fn generic(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "GenericError",
        desc: desc.into(),
    }
}

const CAPABILITIES: [&str; 4] = ["xbzrle", "auto-converge", "verify", "postcopy-ram"];

impl State {
    fn capability(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "xbzrle" => &mut self.params.xbzrle,
            "auto-converge" => &mut self.params.auto_converge,
            "verify" => &mut self.params.verify,
            "postcopy-ram" => &mut self.params.postcopy_ram,
            _ => return None,
        })
    }

    fn running(&self) -> Option<&MigrationHandle> {
        self.current
            .as_ref()
            .filter(|h| !h.stats().status.is_final())
    }

    fn execute(&mut self, cmd: &str, args: &Map<String, Value>) -> Result<Value, CmdError> {
        match cmd {
            "query-migrate" => Ok(match &self.current {
                Some(h) => serde_json::to_value(h.stats()).map_err(|e| generic(e.to_string()))?,
                None => json!({"status": "none"}),
            }),
            "query-migrate-parameters" => {
                serde_json::to_value(&self.params).map_err(|e| generic(e.to_string()))
            }
            "query-migrate-capabilities" => {
                let caps: Vec<Value> = CAPABILITIES
                    .iter()
                    .map(|c| json!({"capability": c, "state": *self.capability(c).expect("known")}))
                    .collect();
                Ok(Value::Array(caps))
            }
            "migrate-set-parameters" => {
                let mut merged =
                    serde_json::to_value(&self.params).map_err(|e| generic(e.to_string()))?;
                let obj = merged
                    .as_object_mut()
                    .expect("params serialize to an object");
                for (k, v) in args {
                    if !obj.contains_key(k) {
                        return Err(generic(format!("unknown parameter '{k}'")));
                    }
                    obj.insert(k.clone(), v.clone());
                }
                let p: Params = serde_json::from_value(merged)
                    .map_err(|e| generic(format!("invalid parameter value: {e}")))?;
                p.validate().map_err(generic)?;
                if let Some(h) = self.running() {
                    h.set_params(p.clone()).map_err(generic)?;
                }
                self.params = p;
                Ok(json!({}))
            }
            "migrate-set-capabilities" => {
                let caps = args
                    .get("capabilities")
                    .and_then(Value::as_array)
                    .ok_or_else(|| generic("'capabilities' must be an array"))?;
                if self.running().is_some() {
                    return Err(generic("capabilities cannot change while a migration runs"));
                }
                let mut changes = Vec::new();
                for c in caps {
                    let name = c.get("capability").and_then(Value::as_str);
                    let state = c.get("state").and_then(Value::as_bool);
                    let (Some(name), Some(state)) = (name, state) else {
                        return Err(generic(
                            "each capability needs 'capability' (string) and 'state' (bool)",
                        ));
                    };
                    if self.capability(name).is_none() {
                        return Err(generic(format!("unknown capability '{name}'")));
                    }
                    changes.push((name.to_string(), state));
                }
                let mut next = Params::clone(&self.params);
                for (name, state) in changes {
                    let slot = match name.as_str() {
                        "xbzrle" => &mut next.xbzrle,
                        "auto-converge" => &mut next.auto_converge,
                        "postcopy-ram" => &mut next.postcopy_ram,
                        _ => &mut next.verify,
                    };
                    *slot = state;
                }
                // A capability can make the parameters inconsistent (xbzrle
                // on with a cache smaller than a page): refuse, change nothing.
                next.validate().map_err(generic)?;
                self.params = next;
                Ok(json!({}))
            }
            "migrate" | "migrate-incoming" => {
                let uri: Uri = args
                    .get("uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| generic("'uri' (string) is required"))?
                    .parse()
                    .map_err(|e: crate::transport::TransportError| generic(e.to_string()))?;
                if self.running().is_some() {
                    return Err(generic("a migration is already running"));
                }
                if cmd == "migrate" {
                    let h = MigrationHandle::new(self.params.clone());
                    self.starter
                        .start_outgoing(&uri, h.clone())
                        .map_err(generic)?;
                    self.current = Some(h);
                } else {
                    self.starter.start_incoming(&uri).map_err(generic)?;
                }
                Ok(json!({}))
            }
            "cont" => {
                if self.running().is_some() {
                    return Err(generic("a migration is running: cancel it instead"));
                }
                self.starter.resume_unconfirmed().map_err(generic)?;
                Ok(json!({}))
            }
            "migrate-cancel" => {
                if let Some(h) = self.running() {
                    h.cancel();
                }
                Ok(json!({}))
            }
            "migrate-start-postcopy" => {
                let h = self
                    .running()
                    .ok_or_else(|| generic("no migration is running"))?;
                h.start_postcopy().map_err(generic)?;
                Ok(json!({}))
            }
            other => Err(CmdError {
                class: "CommandNotFound",
                desc: format!("unknown command '{other}'"),
            }),
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parses one request line and runs it; returns the answer.
fn answer(state: &Mutex<State>, line: &str) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return json!({"error": {"class": "GenericError", "desc": format!("malformed JSON: {e}")}})
        }
    };
    let Some(cmd) = req.get("execute").and_then(Value::as_str) else {
        return json!({"error": {"class": "GenericError", "desc": "request must be an object with an 'execute' string"}});
    };
    let empty = Map::new();
    let args = match req.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return json!({"error": {"class": "GenericError", "desc": "'arguments' must be an object"}})
        }
    };
    match lock(state).execute(cmd, args) {
        Ok(v) => json!({ "return": v }),
        Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
    }
}

/// A running control server; stops and removes its socket on drop.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    state: Arc<Mutex<State>>,
}

impl ControlServer {
    /// Listens on `path` and serves clients one line at a time, each
    /// connection on its own thread.
    pub fn start(
        path: &Path,
        params: Params,
        starter: Box<dyn MigrationStarter>,
    ) -> io::Result<ControlServer> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let state = Dispatcher::new(params, starter).state;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stop.clone(), state.clone());
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, st, s))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
            state,
        })
    }

    /// The current or last migration, if any.
    pub fn current(&self) -> Option<MigrationHandle> {
        lock(&self.state).current.clone()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                let (st, s) = (state.clone(), stop.clone());
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let _ = serve_conn(conn, &st, &s);
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                log::warn!("control socket accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_conn(conn: UnixStream, state: &Mutex<State>, stop: &AtomicBool) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let out = conn.try_clone()?;
    serve_session(state, conn, out, stop)
}

/// One client session: the greeting, then an answer per request line.
/// Reads time out now and then so that `stop` is noticed.
fn serve_session<R: Read, W: Write>(
    state: &Mutex<State>,
    input: R,
    mut out: W,
    stop: &AtomicBool,
) -> io::Result<()> {
    writeln!(
        out,
        "{}",
        json!({"livemig": {"version": env!("CARGO_PKG_VERSION")}})
    )?;
    let mut reader = BufReader::new(input);
    let mut line = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Read at most MAX_LINE + 1 bytes of one line.
        let mut limited = (&mut reader).take((MAX_LINE + 1 - line.len()) as u64);
        let got = match limited.read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_LINE {
                let err = json!({"error": {"class": "GenericError", "desc": format!("request longer than {MAX_LINE} bytes")}});
                writeln!(out, "{err}")?;
                return Ok(());
            }
            if got == 0 && line.is_empty() {
                return Ok(());
            }
            // End of input without a newline: answer what there is.
        }
        let text = String::from_utf8_lossy(&line).trim().to_string();
        let at_end = got == 0 || line.last() != Some(&b'\n');
        line.clear();
        if !text.is_empty() {
            writeln!(out, "{}", answer(state, &text))?;
        }
        if at_end {
            return Ok(());
        }
    }
}

/// The control protocol without a socket: the same state, commands and
/// answers as [`ControlServer`], for a VMM that carries the lines over its
/// own channel (and for fuzzing the parser).
pub struct Dispatcher {
    state: Arc<Mutex<State>>,
}

impl Dispatcher {
    /// A dispatcher with `params` that starts migrations through `starter`.
    pub fn new(params: Params, starter: Box<dyn MigrationStarter>) -> Dispatcher {
        Dispatcher {
            state: Arc::new(Mutex::new(State {
                params,
                current: None,
                starter,
            })),
        }
    }

    /// Runs one request line and returns the answer object.
    pub fn answer(&self, line: &str) -> Value {
        answer(&self.state, line)
    }

    /// Serves one session: writes the greeting, then reads request lines
    /// from `input` until it ends (or `stop` is set) and writes an answer
    /// line for each. A line longer than [`MAX_LINE`] ends the session
    /// with an error answer.
    pub fn serve<R: Read, W: Write>(&self, input: R, out: W, stop: &AtomicBool) -> io::Result<()> {
        serve_session(&self.state, input, out, stop)
    }

    /// The parameters the next migration would use.
    pub fn params(&self) -> Params {
        lock(&self.state).params.clone()
    }

    /// The current or last migration, if any.
    pub fn current(&self) -> Option<MigrationHandle> {
        lock(&self.state).current.clone()
    }
}

/// A client of a control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Errors of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting or talking failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// OS error.
        source: io::Error,
    },
    /// The server answered something that is not a protocol line.
    #[error("control socket: bad answer {0:?}")]
    Protocol(String),
    /// The server answered with an error.
    #[error("{class}: {desc}")]
    Command {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
}

impl ControlClient {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.display().to_string(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io_err)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io_err)?;
        let writer = s.try_clone().map_err(io_err)?;
        let mut c = ControlClient {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = c.read_line()?;
        if greeting.get("livemig").is_none() {
            return Err(ControlError::Protocol(greeting.to_string()));
        }
        Ok(c)
    }

    fn read_line(&mut self) -> Result<Value, ControlError> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|source| ControlError::Io {
                path: "(connected)".into(),
                source,
            })?;
        serde_json::from_str(&line).map_err(|_| ControlError::Protocol(line))
    }

    /// Runs `cmd` with `args` (an object or null) and returns its result.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, ControlError> {
        let mut req = json!({ "execute": cmd });
        if !args.is_null() {
            req["arguments"] = args;
        }
        writeln!(self.writer, "{req}").map_err(|source| ControlError::Io {
            path: "(connected)".into(),
            source,
        })?;
        let mut ans = self.read_line()?;
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

    /// Sends raw bytes (for tests of malformed input) and reads one answer.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<Value, ControlError> {
        self.writer
            .write_all(bytes)
            .map_err(|source| ControlError::Io {
                path: "(connected)".into(),
                source,
            })?;
        self.read_line()
    }
}

#[cfg(test)]
mod tests;
