//! A small QMP client: greeting, `qmp_capabilities`, commands; async
//! events are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// One line from a QMP server.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// `{"QMP": {...}}`, sent once on connect.
    Greeting(Value),
    /// `{"return": ...}`.
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`.
    Error {
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// `{"event": NAME, ...}`: asynchronous, not an answer.
    Event(String),
}

/// Parses one QMP line.
pub fn parse(line: &str) -> Result<Message> {
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("not a JSON line: {:?}", line.trim()))?;
    if let Some(g) = v.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(r) = v.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        return Ok(Message::Error {
            class: e["class"].as_str().unwrap_or("?").to_string(),
            desc: e["desc"].as_str().unwrap_or("?").to_string(),
        });
    }
    if let Some(e) = v.get("event").and_then(Value::as_str) {
        return Ok(Message::Event(e.to_string()));
    }
    bail!("not a QMP message: {v}")
}

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the socket at `path`, retrying until `timeout` (QEMU
    /// creates it while starting), and leaves capability negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP socket {}", path.display()))
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let writer = s.try_clone()?;
        let mut q = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(s),
            writer,
        };
        match q.read()? {
            Message::Greeting(_) => {}
            other => bail!(
                "QMP socket {}: expected a greeting, got {other:?}",
                path.display()
            ),
        }
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Message> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .with_context(|| format!("reading QMP socket {}", self.path.display()))?;
        if n == 0 {
            bail!(
                "QMP socket {}: QEMU closed the connection",
                self.path.display()
            );
        }
        parse(&line).with_context(|| format!("QMP socket {}", self.path.display()))
    }

    /// Runs `cmd` with `args` (an object, or null for none) and returns
    /// its `return` value.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut req = json!({ "execute": cmd });
        if !args.is_null() {
            req["arguments"] = args;
        }
        writeln!(self.writer, "{req}")
            .with_context(|| format!("QMP command {cmd} on {}", self.path.display()))?;
        loop {
            match self.read()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => bail!(
                    "QMP command {cmd} on {} failed: {class}: {desc}",
                    self.path.display()
                ),
                Message::Event(_) => continue,
                Message::Greeting(_) => bail!(
                    "QMP command {cmd} on {}: unexpected greeting",
                    self.path.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_line() {
        let g =
            parse(r#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}"#).unwrap();
        assert!(matches!(g, Message::Greeting(v) if v["version"]["qemu"]["major"] == 7));
        assert_eq!(
            parse(r#"{"return": {"status": "active"}}"#).unwrap(),
            Message::Return(json!({"status": "active"}))
        );
        assert_eq!(
            parse(r#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
            Message::Error {
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert_eq!(
            parse(r#"{"timestamp": {"seconds": 1}, "event": "MIGRATION", "data": {}}"#).unwrap(),
            Message::Event("MIGRATION".into())
        );
        assert!(parse("{\"something\": 1}").is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn execute_skips_events_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            for reply in [
                r#"{"return": {}}"#.to_string(),
                format!(
                    "{}\n{}",
                    r#"{"event": "STOP", "timestamp": {}}"#, r#"{"return": {"status": "paused"}}"#
                ),
                r#"{"error": {"class": "GenericError", "desc": "bad"}}"#.to_string(),
            ] {
                line.clear();
                r.read_line(&mut line).unwrap();
                seen.push(line.trim().to_string());
                writeln!(w, "{reply}").unwrap();
            }
            seen
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let v = q.execute("query-status", Value::Null).unwrap();
        assert_eq!(v["status"], "paused");
        let e = q
            .execute("migrate", json!({"uri": "tcp:x"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("QMP command migrate on") && e.contains("bad"),
            "{e}"
        );
        let seen = server.join().unwrap();
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(seen[1], r#"{"execute":"query-status"}"#);
        assert!(seen[2].contains(r#""arguments":{"uri":"tcp:x"}"#));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
