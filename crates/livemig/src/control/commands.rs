//! The commands the control socket serves, with QEMU's names, argument
//! names and units (see the table in the module docs).

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::{Events, MigrationStarter, MigrationTls};
use crate::codec::compress::Algorithm;
use crate::engine::{CompressParams, HandleEvent, MigrationHandle, Params, Status};
use crate::transport::Uri;

/// An error answer: QMP's error class and a description.
#[derive(Debug)]
pub(crate) struct CmdError {
    pub(crate) class: &'static str,
    pub(crate) desc: String,
}

pub(crate) fn generic(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "GenericError",
        desc: desc.into(),
    }
}

fn not_found(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "CommandNotFound",
        desc: desc.into(),
    }
}

/// The commands, as `query-commands` lists them.
pub(crate) const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "stop",
    "cont",
    "migrate",
    "migrate-incoming",
    "migrate-cancel",
    "migrate-start-postcopy",
    "migrate-recover",
    "query-migrate",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
];

/// The capabilities, in the order `query-migrate-capabilities` lists them.
pub(crate) const CAPABILITIES: &[&str] = &[
    "xbzrle",
    "auto-converge",
    "events",
    "multifd",
    "return-path",
    "dirty-limit",
    "postcopy-ram",
    "postcopy-preempt",
    "mapped-ram",
    "background-snapshot",
    "x-livemig-verify",
];

/// The settings whose QEMU form differs from livemig's [`Params`]: QEMU
/// keeps a value and a switch apart (multifd-channels and the multifd
/// capability), or counts in other units (vcpu-dirty-limit in MB/s).
#[derive(Clone, Debug)]
struct QemuSide {
    multifd_channels: u16,
    multifd_compression: &'static str,
    zstd_level: i32,
    /// MB/s (MiB), QEMU's unit.
    vcpu_dirty_limit: u64,
    tls_creds: String,
    tls_hostname: String,
    events: bool,
    multifd: bool,
    dirty_limit: bool,
}

/// Mebibytes: QEMU's "MB" in vcpu-dirty-limit.
const MIB: u64 = 1 << 20;

impl QemuSide {
    /// QEMU's view of `p`.
    fn from_params(p: &Params) -> QemuSide {
        let (comp, level) = match p.compress {
            None => ("none", 1),
            Some(CompressParams {
                algorithm: Algorithm::Zstd,
                level,
            }) => ("zstd", level),
            Some(CompressParams {
                algorithm: Algorithm::Lz4,
                ..
            }) => ("lz4", 1),
        };
        QemuSide {
            multifd_channels: if p.channels > 1 { p.channels } else { 2 },
            multifd_compression: comp,
            zstd_level: level,
            vcpu_dirty_limit: if p.dirty_limit > 0 {
                p.dirty_limit.div_ceil(MIB)
            } else {
                1
            },
            tls_creds: String::new(),
            tls_hostname: String::new(),
            events: false,
            multifd: p.channels > 1,
            dirty_limit: p.dirty_limit > 0,
        }
    }

    /// Writes the QEMU-side settings into `p`.
    fn apply(&self, p: &mut Params) {
        p.channels = if self.multifd {
            self.multifd_channels
        } else {
            1
        };
        p.dirty_limit = if self.dirty_limit {
            self.vcpu_dirty_limit.saturating_mul(MIB)
        } else {
            0
        };
        p.compress = match self.multifd_compression {
            "zstd" => Some(CompressParams {
                algorithm: Algorithm::Zstd,
                level: self.zstd_level,
            }),
            "lz4" => Some(CompressParams {
                algorithm: Algorithm::Lz4,
                level: 1,
            }),
            _ => None,
        };
    }
}

/// Which migration `query-migrate` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Outgoing,
    Incoming,
}

/// The control protocol's state, shared by all sessions.
pub(crate) struct State {
    /// livemig's parameters; the fields QEMU sets differently are derived
    /// from `qemu` (see [`State::params`]).
    base: Params,
    qemu: QemuSide,
    current: Option<(MigrationHandle, Direction)>,
    /// The current `migrate-incoming file:` restore: `migrate-cancel`
    /// stops it too.
    restore: Option<MigrationHandle>,
    /// Snapshot-file and lazy-restore settings.
    file: super::file::FileSide,
    starter: Box<dyn MigrationStarter>,
    pub(crate) events: Events,
}

fn type_error(name: &str, expected: &str) -> CmdError {
    generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn as_u64(name: &str, v: &Value) -> Result<u64, CmdError> {
    v.as_u64().ok_or_else(|| type_error(name, "integer"))
}

fn as_bool(name: &str, v: &Value) -> Result<bool, CmdError> {
    v.as_bool().ok_or_else(|| type_error(name, "boolean"))
}

fn as_str<'a>(name: &str, v: &'a Value) -> Result<&'a str, CmdError> {
    v.as_str().ok_or_else(|| type_error(name, "string"))
}

fn in_range(name: &str, v: u64, lo: u64, hi: u64) -> Result<u64, CmdError> {
    if v < lo || v > hi {
        return Err(generic(format!(
            "Parameter '{name}' expects an integer in the range of {lo} to {hi}"
        )));
    }
    Ok(v)
}

/// Refuses arguments other than `allowed`, as QEMU does.
fn only(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), CmdError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// The URI of `migrate` / `migrate-incoming`: `uri`, or QEMU's `channels`
/// form (one `main` channel).
fn target_uri(args: &Map<String, Value>) -> Result<Uri, CmdError> {
    let text = match (args.get("uri"), args.get("channels")) {
        (Some(_), Some(_)) => {
            return Err(generic(
                "'uri' and 'channels' are mutually exclusive: give exactly one",
            ))
        }
        (None, None) => return Err(generic("need either 'uri' or 'channels' argument")),
        (Some(u), None) => as_str("uri", u)?.to_string(),
        (None, Some(c)) => channel_uri(c)?,
    };
    text.parse()
        .map_err(|e: crate::transport::TransportError| generic(e.to_string()))
}

/// `[{"channel-type": "main", "addr": {...}}]` as a livemig URI.
fn channel_uri(channels: &Value) -> Result<String, CmdError> {
    let list = channels
        .as_array()
        .ok_or_else(|| type_error("channels", "array"))?;
    let [ch] = list.as_slice() else {
        return Err(generic("'channels' must hold exactly one channel ('main')"));
    };
    let ch = ch
        .as_object()
        .ok_or_else(|| type_error("channels[0]", "object"))?;
    only(ch, &["channel-type", "addr"])?;
    match ch.get("channel-type").map(|v| as_str("channel-type", v)) {
        Some(Ok("main")) => {}
        Some(Ok(other)) => {
            return Err(generic(format!(
                "channel-type '{other}' is not supported (only 'main')"
            )))
        }
        Some(Err(e)) => return Err(e),
        None => return Err(generic("Parameter 'channel-type' is missing")),
    }
    let addr = ch
        .get("addr")
        .ok_or_else(|| generic("Parameter 'addr' is missing"))?
        .as_object()
        .ok_or_else(|| type_error("addr", "object"))?;
    let field = |k: &str| -> Result<String, CmdError> {
        let v = addr
            .get(k)
            .ok_or_else(|| generic(format!("Parameter '{k}' is missing")))?;
        // QEMU takes the port as a string; a number is accepted too.
        match v {
            Value::Number(n) => Ok(n.to_string()),
            v => Ok(as_str(k, v)?.to_string()),
        }
    };
    let transport = field("transport")?;
    match transport.as_str() {
        "socket" => match field("type")?.as_str() {
            "inet" => {
                only(addr, &["transport", "type", "host", "port"])?;
                let host = field("host")?;
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                Ok(format!("tcp:{host}:{}", field("port")?))
            }
            "unix" => {
                only(addr, &["transport", "type", "path"])?;
                Ok(format!("unix:{}", field("path")?))
            }
            other => Err(generic(format!(
                "socket type '{other}' is not supported (inet or unix)"
            ))),
        },
        "file" => {
            only(addr, &["transport", "filename", "offset"])?;
            if addr.get("offset").is_some_and(|o| o.as_u64() != Some(0)) {
                return Err(generic("a file channel's offset must be 0"));
            }
            Ok(format!("file:{}", field("filename")?))
        }
        other => Err(generic(format!(
            "transport '{other}' is not supported (socket or file)"
        ))),
    }
}

impl State {
    pub(crate) fn new(params: Params, mut starter: Box<dyn MigrationStarter>) -> State {
        let events = Events::default();
        starter.attach_events(events.clone());
        State {
            qemu: QemuSide::from_params(&params),
            base: params,
            current: None,
            restore: None,
            file: Default::default(),
            starter,
            events,
        }
    }

    /// The parameters the next migration uses.
    pub(crate) fn params(&self) -> Params {
        let mut p = self.base.clone();
        self.qemu.apply(&mut p);
        p
    }

    /// The current or last migration's handle.
    pub(crate) fn current(&self) -> Option<MigrationHandle> {
        self.current.as_ref().map(|(h, _)| h.clone())
    }

    fn running(&self) -> Option<&MigrationHandle> {
        self.current
            .as_ref()
            .map(|(h, _)| h)
            .filter(|h| !h.stats().status.is_final())
    }

    fn capability(&self, name: &str) -> Option<bool> {
        Some(match name {
            "xbzrle" => self.base.xbzrle,
            "auto-converge" => self.base.auto_converge,
            "events" => self.qemu.events,
            "multifd" => self.qemu.multifd,
            // The completion handshake always uses the return path.
            "return-path" => true,
            "dirty-limit" => self.qemu.dirty_limit,
            "postcopy-ram" => self.base.postcopy_ram,
            "postcopy-preempt" => self.base.postcopy_preempt,
            "x-livemig-verify" => self.base.verify,
            "mapped-ram" => self.file.mapped_ram,
            "background-snapshot" => self.file.background_snapshot,
            _ => return None,
        })
    }

    fn query_parameters(&self) -> Value {
        let p = &self.base;
        let q = &self.qemu;
        json!({
            "max-bandwidth": p.max_bandwidth,
            "downtime-limit": p.downtime_limit,
            "xbzrle-cache-size": p.xbzrle_cache_size,
            "cpu-throttle-initial": p.cpu_throttle_initial,
            "cpu-throttle-increment": p.cpu_throttle_increment,
            "max-cpu-throttle": p.max_cpu_throttle,
            "multifd-channels": q.multifd_channels,
            "multifd-compression": q.multifd_compression,
            "multifd-zstd-level": q.zstd_level,
            "vcpu-dirty-limit": q.vcpu_dirty_limit,
            "tls-creds": q.tls_creds,
            "tls-hostname": q.tls_hostname,
            "x-livemig-throttle-sync-period": p.throttle_sync_period,
            "x-livemig-adaptive-encoding": p.adaptive_encoding,
            "x-livemig-postcopy-switchover": p.postcopy_switchover,
            "mode": p.mode,
            "direct-io": self.file.direct_io,
            "x-livemig-lazy": self.file.lazy,
        })
    }

    fn set_parameter(
        p: &mut Params,
        q: &mut QemuSide,
        name: &str,
        v: &Value,
    ) -> Result<(), CmdError> {
        let percent =
            |v| -> Result<u8, CmdError> { Ok(in_range(name, as_u64(name, v)?, 1, 99)? as u8) };
        match name {
            "max-bandwidth" => p.max_bandwidth = as_u64(name, v)?,
            "x-livemig-postcopy-switchover" => {
                p.postcopy_switchover = match as_str(name, v)? {
                    "manual" => crate::engine::Switchover::Manual,
                    "auto" => crate::engine::Switchover::Auto,
                    other => {
                        return Err(generic(format!(
                            "Parameter 'x-livemig-postcopy-switchover' does not accept value \
                             '{other}' (manual, auto)"
                        )))
                    }
                }
            }
            "mode" => {
                p.mode = match as_str(name, v)? {
                    "normal" => crate::engine::MigrationMode::Normal,
                    "local" => crate::engine::MigrationMode::Local,
                    other => {
                        return Err(generic(format!(
                            "Parameter 'mode' does not accept value '{other}' (normal, local)"
                        )))
                    }
                }
            }
            "downtime-limit" => p.downtime_limit = in_range(name, as_u64(name, v)?, 1, 2_000_000)?,
            "xbzrle-cache-size" => p.xbzrle_cache_size = as_u64(name, v)?,
            "cpu-throttle-initial" => p.cpu_throttle_initial = percent(v)?,
            "cpu-throttle-increment" => p.cpu_throttle_increment = percent(v)?,
            "max-cpu-throttle" => p.max_cpu_throttle = percent(v)?,
            "multifd-channels" => {
                let max = u64::from(crate::stream::format::MAX_CHANNELS);
                q.multifd_channels = in_range(name, as_u64(name, v)?, 1, max)? as u16;
            }
            "multifd-compression" => {
                q.multifd_compression = match as_str(name, v)? {
                    "none" => "none",
                    "zstd" => "zstd",
                    "lz4" => "lz4",
                    other => {
                        return Err(generic(format!(
                            "Parameter 'multifd-compression' does not accept value '{other}' \
                             (livemig: none, zstd, lz4)"
                        )))
                    }
                }
            }
            "multifd-zstd-level" => q.zstd_level = in_range(name, as_u64(name, v)?, 1, 19)? as i32,
            "vcpu-dirty-limit" => {
                q.vcpu_dirty_limit = in_range(name, as_u64(name, v)?, 1, u64::MAX / MIB)?
            }
            "tls-creds" => {
                let dir = as_str(name, v)?;
                if !dir.is_empty() && !std::path::Path::new(dir).is_dir() {
                    return Err(generic(format!(
                        "tls-creds '{dir}': livemig takes a directory holding ca.pem, \
                         cert.pem and key.pem, and this is not a directory"
                    )));
                }
                q.tls_creds = dir.to_string();
            }
            "tls-hostname" => q.tls_hostname = as_str(name, v)?.to_string(),
            "x-livemig-throttle-sync-period" => p.throttle_sync_period = as_u64(name, v)?,
            "x-livemig-adaptive-encoding" => p.adaptive_encoding = as_bool(name, v)?,
            other => return Err(generic(format!("Parameter '{other}' is unexpected"))),
        }
        Ok(())
    }

    fn tls(&self) -> Option<MigrationTls> {
        (!self.qemu.tls_creds.is_empty()).then(|| MigrationTls {
            dir: PathBuf::from(&self.qemu.tls_creds),
            hostname: (!self.qemu.tls_hostname.is_empty()).then(|| self.qemu.tls_hostname.clone()),
        })
    }

    /// Makes `handle` send QMP events: MIGRATION on each status change and
    /// MIGRATION_PASS on each dirty sync (with the `events` capability, as
    /// QEMU), STOP when the source pauses for stop-and-copy and RESUME if
    /// it runs on after that.
    fn watch(&self, handle: &MigrationHandle, outgoing: bool) {
        let ev = self.events.clone();
        let migration_events = self.qemu.events;
        let stopped = std::sync::atomic::AtomicBool::new(false);
        handle.observe(Box::new(move |e| match e {
            HandleEvent::Status(s) => {
                if outgoing && *s == Status::Device {
                    stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                    ev.emit("STOP", None);
                }
                if migration_events {
                    let status = serde_json::to_value(s).unwrap_or(Value::Null);
                    ev.emit("MIGRATION", Some(json!({ "status": status })));
                }
                if outgoing
                    && matches!(s, Status::Failed | Status::Cancelled)
                    && stopped.load(std::sync::atomic::Ordering::SeqCst)
                {
                    ev.emit("RESUME", None);
                }
            }
            HandleEvent::Pass(n) => {
                if migration_events {
                    ev.emit("MIGRATION_PASS", Some(json!({ "pass": n })));
                }
            }
        }));
    }

    /// `migrate` with `resume: true`: a new connection for the outgoing
    /// migration paused in postcopy.
    fn resume_outgoing(&self, uri: &Uri) -> Result<Value, CmdError> {
        let Some((h, Direction::Outgoing)) = &self.current else {
            return Err(generic(
                "no outgoing migration to resume (resume is for a source paused in postcopy)",
            ));
        };
        if h.stats().status != Status::PostcopyPaused {
            return Err(generic(
                "the outgoing migration is not paused in postcopy: nothing to resume",
            ));
        }
        let cfg = match self.tls() {
            None => None,
            Some(t) => {
                let mut cfg = crate::transport::tls::TlsConfig::from_dir(&t.dir)
                    .map_err(|e| generic(format!("tls-creds: {e}")))?;
                if let Some(name) = &t.hostname {
                    cfg = cfg
                        .with_server_name(name)
                        .map_err(|e| generic(format!("tls-hostname: {e}")))?;
                }
                Some(cfg)
            }
        };
        let connect = move |uri: &Uri| match &cfg {
            None => crate::transport::connect(uri).map_err(|e| e.to_string()),
            Some(cfg) => crate::transport::tls::connect(uri, cfg).map_err(|e| e.to_string()),
        };
        let conn = connect(uri).map_err(generic)?;
        // The urgent connection and the page channels go to the same
        // place, where `migrate-recover` accepts them.
        let to = uri.clone();
        let open = move |_: u16| {
            connect(&to)
                .map(|o| o.writer)
                .map_err(std::io::Error::other)
        };
        h.resume_postcopy_with(conn, open).map_err(generic)?;
        Ok(json!({}))
    }

    /// `migrate-recover URI`: listens on `uri` for the source's new
    /// connection and hands it to the incoming migration paused in
    /// postcopy (in the background: the source's `migrate` with `resume`
    /// comes after this answer).
    fn recover_incoming(&self, uri: &Uri) -> Result<Value, CmdError> {
        let Some((h, Direction::Incoming)) = &self.current else {
            return Err(generic(
                "no incoming migration to recover (migrate-recover is for a destination paused in postcopy)",
            ));
        };
        if h.stats().status != Status::PostcopyPaused {
            return Err(generic(
                "the incoming migration is not paused in postcopy: nothing to recover",
            ));
        }
        // The main connection first, then (same listener) the urgent
        // connection and page channels the source reopens.
        type Accept = Box<dyn FnMut() -> Result<crate::transport::Incoming, String> + Send>;
        let mut accept: Accept = match self.tls() {
            None => {
                let l =
                    crate::transport::Listener::bind(uri).map_err(|e| generic(e.to_string()))?;
                Box::new(move || l.accept().map_err(|e| e.to_string()))
            }
            Some(t) => {
                let cfg = crate::transport::tls::TlsConfig::from_dir(&t.dir)
                    .map_err(|e| generic(format!("tls-creds: {e}")))?;
                let l = crate::transport::tls::TlsListener::bind(uri, &cfg)
                    .map_err(|e| generic(e.to_string()))?;
                Box::new(move || l.accept().map_err(|e| e.to_string()))
            }
        };
        let h = h.clone();
        let what = uri.to_string();
        std::thread::Builder::new()
            .name("migrate-recover".into())
            .spawn(move || match accept() {
                Ok(conn) => {
                    let more = move || accept().map(|i| i.reader).map_err(std::io::Error::other);
                    if let Err(e) = h.recover_postcopy_with(conn, more) {
                        log::warn!("migrate-recover on {what}: {e}");
                    }
                }
                Err(e) => log::warn!("migrate-recover on {what}: {e}"),
            })
            .map_err(|e| generic(format!("starting the recovery thread: {e}")))?;
        Ok(json!({}))
    }

    pub(crate) fn execute(
        &mut self,
        cmd: &str,
        args: &Map<String, Value>,
    ) -> Result<Value, CmdError> {
        let no_args = |args: &Map<String, Value>| only(args, &[]);
        match cmd {
            "query-commands" => {
                no_args(args)?;
                Ok(COMMANDS.iter().map(|c| json!({ "name": c })).collect())
            }
            "query-version" => {
                no_args(args)?;
                Ok(super::version())
            }
            "query-status" => {
                no_args(args)?;
                let s = self.starter.run_state();
                Ok(json!({"running": s.running(), "status": s.qmp_name()}))
            }
            "stop" => {
                no_args(args)?;
                if self.starter.run_state() == super::RunState::Paused {
                    return Ok(json!({}));
                }
                self.starter.stop().map_err(generic)?;
                self.events.emit("STOP", None);
                Ok(json!({}))
            }
            "cont" => {
                no_args(args)?;
                if let Some((_, Direction::Outgoing)) = &self.current {
                    if self.running().is_some() {
                        return Err(generic("a migration is running: cancel it instead"));
                    }
                }
                if self.starter.run_state() == super::RunState::Running {
                    return Ok(json!({}));
                }
                self.starter.cont().map_err(generic)?;
                self.events.emit("RESUME", None);
                Ok(json!({}))
            }
            "query-migrate" => {
                no_args(args)?;
                Ok(match &self.current {
                    None => json!({}),
                    Some((h, Direction::Outgoing)) => {
                        serde_json::to_value(h.stats()).map_err(|e| generic(e.to_string()))?
                    }
                    Some((h, Direction::Incoming)) => {
                        // The destination knows its status, not the figures.
                        let s = h.stats();
                        let mut v = json!({ "status": s.status });
                        if let Some(e) = s.error_desc {
                            v["error-desc"] = json!(e);
                        }
                        v
                    }
                })
            }
            "query-migrate-parameters" => {
                no_args(args)?;
                Ok(self.query_parameters())
            }
            "query-migrate-capabilities" => {
                no_args(args)?;
                Ok(CAPABILITIES
                    .iter()
                    .map(|c| json!({"capability": c, "state": self.capability(c)}))
                    .collect())
            }
            "migrate-set-parameters" => {
                let (mut p, mut q) = (self.base.clone(), self.qemu.clone());
                let mut f = self.file.clone();
                for (k, v) in args {
                    match k.as_str() {
                        "direct-io" => f.direct_io = as_bool(k, v)?,
                        "x-livemig-lazy" => f.lazy = as_bool(k, v)?,
                        _ => State::set_parameter(&mut p, &mut q, k, v)?,
                    }
                }
                let mut eff = p.clone();
                q.apply(&mut eff);
                eff.validate().map_err(|e| generic(e.to_string()))?;
                if let Some(h) = self.running() {
                    h.set_params(eff).map_err(|e| generic(e.to_string()))?;
                }
                self.base = p;
                self.qemu = q;
                self.file = f;
                Ok(json!({}))
            }
            "migrate-set-capabilities" => {
                only(args, &["capabilities"])?;
                let caps = args
                    .get("capabilities")
                    .ok_or_else(|| generic("Parameter 'capabilities' is missing"))?
                    .as_array()
                    .ok_or_else(|| type_error("capabilities", "array"))?;
                if self.running().is_some() {
                    return Err(generic("There's a migration process in progress"));
                }
                let (mut p, mut q) = (self.base.clone(), self.qemu.clone());
                let mut f = self.file.clone();
                for c in caps {
                    let c = c
                        .as_object()
                        .ok_or_else(|| type_error("capabilities[]", "object"))?;
                    only(c, &["capability", "state"])?;
                    let name = as_str(
                        "capability",
                        c.get("capability")
                            .ok_or_else(|| generic("Parameter 'capability' is missing"))?,
                    )?;
                    let state = as_bool(
                        "state",
                        c.get("state")
                            .ok_or_else(|| generic("Parameter 'state' is missing"))?,
                    )?;
                    match name {
                        "xbzrle" => p.xbzrle = state,
                        "auto-converge" => p.auto_converge = state,
                        "events" => q.events = state,
                        "multifd" => q.multifd = state,
                        "dirty-limit" => q.dirty_limit = state,
                        "postcopy-ram" => p.postcopy_ram = state,
                        "postcopy-preempt" => p.postcopy_preempt = state,
                        "x-livemig-verify" => p.verify = state,
                        "mapped-ram" => f.mapped_ram = state,
                        "background-snapshot" => f.background_snapshot = state,
                        "return-path" if state => {}
                        "return-path" => {
                            return Err(generic(
                                "livemig always uses the return path (its completion \
                                 handshake): return-path cannot be turned off",
                            ))
                        }
                        other => {
                            return Err(generic(format!(
                                "Parameter 'capability' does not accept value '{other}'"
                            )))
                        }
                    }
                }
                if p.auto_converge && q.dirty_limit {
                    return Err(generic(
                        "dirty-limit conflicts with auto-converge: turn one off",
                    ));
                }
                let mut eff = p.clone();
                q.apply(&mut eff);
                // A capability can make the parameters inconsistent (xbzrle
                // on with a cache smaller than a page): refuse, change nothing.
                eff.validate().map_err(|e| generic(e.to_string()))?;
                self.base = p;
                self.qemu = q;
                self.file = f;
                Ok(json!({}))
            }
            "migrate" | "migrate-incoming" => {
                let extra: &[&str] = if cmd == "migrate" {
                    &["uri", "channels", "detach", "resume"]
                } else {
                    &["uri", "channels", "exit-on-error"]
                };
                only(args, extra)?;
                let resume = match args.get("resume") {
                    None => false,
                    Some(v) => as_bool("resume", v)?,
                };
                let uri = target_uri(args)?;
                if resume {
                    return self.resume_outgoing(&uri);
                }
                if self.running().is_some() {
                    return Err(generic("There's a migration process in progress"));
                }
                let tls = self.tls();
                let params = self.params();
                let plan = if cmd == "migrate" {
                    self.file.plan_outgoing(&params, tls.is_some(), &uri)?
                } else {
                    self.file.plan_incoming(&params, tls.is_some(), &uri)?
                };
                let h = MigrationHandle::new(params);
                if let super::file::Plan::File(path, opts) = plan {
                    let outgoing = cmd == "migrate";
                    self.watch(&h, outgoing);
                    if outgoing {
                        self.starter.start_snapshot(&path, &opts, h.clone())
                    } else {
                        self.starter.start_restore(&path, &opts, h.clone())
                    }
                    .map_err(generic)?;
                    let dir = if outgoing {
                        Direction::Outgoing
                    } else {
                        self.restore = Some(h.clone());
                        Direction::Incoming
                    };
                    self.current = Some((h, dir));
                    return Ok(json!({}));
                }
                if cmd == "migrate" {
                    // `migrate` with `resume` can hand a paused postcopy a
                    // new connection.
                    h.set_postcopy_recovery(true);
                    self.watch(&h, true);
                    self.starter
                        .start_outgoing(&uri, tls.as_ref(), h.clone())
                        .map_err(generic)?;
                    self.current = Some((h, Direction::Outgoing));
                } else {
                    self.watch(&h, false);
                    self.starter
                        .start_incoming(&uri, tls.as_ref(), h.clone())
                        .map_err(generic)?;
                    self.current = Some((h, Direction::Incoming));
                }
                Ok(json!({}))
            }
            "migrate-cancel" => {
                no_args(args)?;
                if let Some((h, Direction::Outgoing)) = &self.current {
                    if !h.stats().status.is_final() {
                        h.cancel();
                    }
                }
                // A file restore still loading stops too (the VM waits on,
                // never run); a lazy one whose guest runs cannot.
                if let Some(h) = &self.restore {
                    if h.stats().status == crate::engine::Status::Active {
                        h.cancel();
                    }
                }
                Ok(json!({}))
            }
            "migrate-recover" => {
                only(args, &["uri"])?;
                let uri: Uri = as_str(
                    "uri",
                    args.get("uri")
                        .ok_or_else(|| generic("Parameter 'uri' is missing"))?,
                )?
                .parse()
                .map_err(|e: crate::transport::TransportError| generic(e.to_string()))?;
                self.recover_incoming(&uri)
            }
            "migrate-start-postcopy" => {
                no_args(args)?;
                let h = self
                    .running()
                    .ok_or_else(|| generic("no migration is running"))?;
                h.start_postcopy().map_err(generic)?;
                Ok(json!({}))
            }
            other => Err(not_found(format!("The command {other} has not been found"))),
        }
    }
}
