//! The QMP server: the socket (created safely, removed when done), one
//! session per connection, and the same sessions without a socket
//! ([`Dispatcher`]).

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::commands::{generic, CmdError, State};
use super::framing::{Frame, Splitter};
use super::{version, ControlError, MigrationStarter, MAX_LINE};
use crate::engine::{MigrationHandle, Params};

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// One client's protocol state.
struct Session<'a> {
    state: &'a Mutex<State>,
    negotiated: bool,
    /// Key of this session's event subscription, once negotiated.
    subscription: Option<u64>,
    out: Sender<Value>,
}

fn error_answer(e: CmdError, id: Option<Value>) -> Value {
    let mut a = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        a["id"] = id;
    }
    a
}

impl Session<'_> {
    /// The answer to one request text.
    fn answer(&mut self, text: &[u8]) -> Value {
        let req: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(e) => return error_answer(generic(format!("JSON parse error, {e}")), None),
        };
        let Value::Object(obj) = req else {
            return error_answer(generic("QMP input must be a JSON object"), None);
        };
        let id = obj.get("id").cloned();
        match self.run(&obj) {
            Ok(v) => {
                let mut a = json!({ "return": v });
                if let Some(id) = id {
                    a["id"] = id;
                }
                a
            }
            Err(e) => error_answer(e, id),
        }
    }

    fn run(&mut self, obj: &Map<String, Value>) -> Result<Value, CmdError> {
        let empty = Map::new();
        let mut cmd = None;
        let mut args = &empty;
        for (k, v) in obj {
            match k.as_str() {
                "execute" => {
                    cmd =
                        Some(v.as_str().ok_or_else(|| {
                            generic("QMP input member 'execute' must be a string")
                        })?)
                }
                "arguments" => {
                    args = v
                        .as_object()
                        .ok_or_else(|| generic("QMP input member 'arguments' must be an object"))?
                }
                "id" => {}
                // No out-of-band capability is offered, so `exec-oob` is
                // as unexpected as any other member (QEMU's answer too).
                other => return Err(generic(format!("QMP input member '{other}' is unexpected"))),
            }
        }
        let cmd = cmd.ok_or_else(|| generic("QMP input lacks member 'execute'"))?;
        if cmd == "qmp_capabilities" {
            if self.negotiated {
                return Err(CmdError {
                    class: "CommandNotFound",
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                });
            }
            for (k, v) in args {
                if k != "enable" {
                    return Err(generic(format!("Parameter '{k}' is unexpected")));
                }
                let list = v.as_array().ok_or_else(|| {
                    generic("Invalid parameter type for 'enable', expected: array")
                })?;
                if let Some(c) = list.first() {
                    return Err(generic(format!(
                        "Capability {c} is not available (this server offers none)"
                    )));
                }
            }
            self.negotiated = true;
            let events = lock(self.state).events.clone();
            self.subscription = Some(events.subscribe(self.out.clone()));
            return Ok(json!({}));
        }
        if !self.negotiated {
            return Err(CmdError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            });
        }
        lock(self.state).execute(cmd, args)
    }
}

/// One client session: the greeting, then an answer per request; events
/// once negotiated. Answers and events go out through one queue and a
/// writer thread, in order. Reads that time out let `stop` be noticed;
/// what was queued before the session ends is still written.
fn serve_session<R: Read, W: Write + Send>(
    state: &Mutex<State>,
    mut input: R,
    out: W,
    stop: &AtomicBool,
) -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<()> {
            let mut out = out;
            for msg in rx {
                let mut line = msg.to_string().into_bytes();
                line.extend_from_slice(b"\r\n");
                out.write_all(&line)?;
                out.flush()?;
            }
            Ok(())
        });
        let _ = tx.send(greeting());
        let mut session = Session {
            state,
            negotiated: false,
            subscription: None,
            out: tx,
        };
        let read = read_requests(&mut session, &mut input, stop);
        if let Some(id) = session.subscription {
            lock(state).events.unsubscribe(id);
        }
        drop(session);
        let written = writer.join().unwrap_or(Ok(()));
        read.and(written)
    })
}

fn read_requests<R: Read>(
    session: &mut Session<'_>,
    input: &mut R,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut splitter = Splitter::new(MAX_LINE);
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let end = match input.read(&mut buf) {
            Ok(0) => {
                splitter.finish(&mut frames);
                true
            }
            Ok(n) => {
                splitter.feed(&buf[..n], &mut frames);
                false
            }
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
        for f in frames.drain(..) {
            let (answer, last) = match f {
                Frame::Text(t) => (session.answer(&t), false),
                Frame::TooLong => (
                    error_answer(
                        generic(format!("request longer than {MAX_LINE} bytes")),
                        None,
                    ),
                    true,
                ),
            };
            if session.out.send(answer).is_err() || last {
                return Ok(());
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// Binds `path`, removing what is there only when it is a stale socket
/// (one nobody listens on). Returns the listener and the socket's inode.
fn bind_safely(path: &Path) -> Result<(UnixListener, (u64, u64)), ControlError> {
    let shown = || path.display().to_string();
    let io_err = |source| ControlError::Io {
        path: shown(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ControlError::NotASocket { path: shown() })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ControlError::InUse { path: shown() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("control socket {}: removing a stale socket", shown());
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    let m = std::fs::symlink_metadata(path).map_err(io_err)?;
    Ok((listener, (m.dev(), m.ino())))
}

type Sessions = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// A running control server; on drop it stops, lets each session write
/// what it has queued (a final `MIGRATION` event included), and removes
/// its socket (if the file is still the one it created).
pub struct ControlServer {
    path: PathBuf,
    inode: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sessions: Sessions,
    state: Arc<Mutex<State>>,
}

impl ControlServer {
    /// Listens on `path` and serves each connection on its own thread. A
    /// file at `path` is removed only when it is a stale socket; a live
    /// socket or any other file is an error and is left alone.
    pub fn start(
        path: &Path,
        params: Params,
        starter: Box<dyn MigrationStarter>,
    ) -> Result<ControlServer, ControlError> {
        let (listener, inode) = bind_safely(path)?;
        let io_err = |source| ControlError::Io {
            path: path.display().to_string(),
            source,
        };
        listener.set_nonblocking(true).map_err(io_err)?;
        let state = Arc::new(Mutex::new(State::new(params, starter)));
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Sessions::default();
        let (s, st, ss) = (stop.clone(), state.clone(), sessions.clone());
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, st, s, ss));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(io_err(e));
            }
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            inode,
            stop,
            thread: Some(thread),
            sessions,
            state,
        })
    }

    /// The current or last migration, if any.
    pub fn current(&self) -> Option<MigrationHandle> {
        lock(&self.state).current()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let sessions =
            std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|e| e.into_inner()));
        for t in sessions {
            let _ = t.join();
        }
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    sessions: Sessions,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                let (st, s) = (state.clone(), stop.clone());
                let t = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let _ = serve_conn(conn, &st, &s);
                    });
                let mut list = sessions.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|t| !t.is_finished());
                if let Ok(t) = t {
                    list.push(t);
                }
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
    conn.set_read_timeout(Some(Duration::from_millis(100)))?;
    // A client that stops reading must not hold the session forever.
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let out = conn.try_clone()?;
    serve_session(state, conn, out, stop)
}

/// The control protocol without a socket: the same state, commands and
/// answers as [`ControlServer`], for a VMM that carries the bytes over its
/// own channel (and for fuzzing).
pub struct Dispatcher {
    state: Arc<Mutex<State>>,
}

impl Dispatcher {
    /// A dispatcher with `params` that starts migrations through `starter`.
    pub fn new(params: Params, starter: Box<dyn MigrationStarter>) -> Dispatcher {
        Dispatcher {
            state: Arc::new(Mutex::new(State::new(params, starter))),
        }
    }

    /// Serves one session: writes the greeting, then reads requests from
    /// `input` until it ends (or `stop` is set) and writes an answer line
    /// for each (and the events). A request longer than [`MAX_LINE`] ends
    /// the session with an error answer.
    pub fn serve<R: Read, W: Write + Send>(
        &self,
        input: R,
        out: W,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        serve_session(&self.state, input, out, stop)
    }

    /// The parameters the next migration would use.
    pub fn params(&self) -> Params {
        lock(&self.state).params()
    }

    /// The current or last migration, if any.
    pub fn current(&self) -> Option<MigrationHandle> {
        lock(&self.state).current()
    }
}
