//! `livemig control SOCKET COMMAND [ARGS-JSON]`: one request to a QMP
//! control socket (`minivm run --control PATH`, any VMM serving
//! `livemig::control`, or QEMU's), its answer printed as one JSON line on
//! stdout.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use livemig::control::{ControlClient, ControlError};
use livemig::engine::MigrationStats;
use serde_json::{json, Value};

use crate::report::{summary, Progress};

/// `livemig control`.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The control socket (a Unix socket path).
    pub socket: PathBuf,
    /// The QMP command: query-migrate, migrate, migrate-incoming,
    /// migrate-set-parameters, query-migrate-parameters,
    /// migrate-set-capabilities, query-migrate-capabilities, migrate-cancel,
    /// query-status, stop, cont, query-version, query-commands,
    /// migrate-start-postcopy, migrate-recover (postcopy recovery; the
    /// source reconnects with migrate and "resume": true).
    /// With --raw: a whole request line, sent as it is.
    pub command: String,
    /// The command's arguments as a JSON object, e.g. '{"uri":
    /// "tcp:10.0.0.2:4444"}' or '{"max-bandwidth": 268435456}'.
    pub args: Option<String>,
    /// With migrate or migrate-cancel: follow the migration (MIGRATION
    /// events, turning the `events` capability on for migrate, and
    /// query-migrate polls) until it ends (progress bar on a terminal,
    /// summary on stderr), print the final query-migrate answer (or
    /// `{"status": ...}` alone when the source exited right after saying
    /// it completed), and fail unless it completed (cancelled, for
    /// migrate-cancel).
    #[arg(long)]
    pub wait: bool,
    /// Milliseconds between polls with --wait.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub interval: u64,
    /// Send COMMAND verbatim as the request line (for testing the server).
    #[arg(long, conflicts_with_all = ["args", "wait"])]
    pub raw: bool,
    /// No progress bar or summary with --wait.
    #[arg(long)]
    pub quiet: bool,
}

fn error_answer(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

/// `livemig control`.
pub fn control(a: ControlArgs) -> Result<()> {
    let mut c = ControlClient::connect(&a.socket)?;
    if a.raw {
        let mut line = a.command.into_bytes();
        line.push(b'\n');
        let ans = c.raw(&line)?;
        println!("{ans}");
        if let Some(e) = ans.get("error") {
            bail!(
                "{}: {}",
                e["class"].as_str().unwrap_or("?"),
                e["desc"].as_str().unwrap_or("?")
            );
        }
        return Ok(());
    }
    let args = match &a.args {
        None => Value::Null,
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .with_context(|| format!("ARGS-JSON is not JSON: {text}"))?;
            if !v.is_object() {
                bail!("ARGS-JSON must be a JSON object, not {v}");
            }
            v
        }
    };
    let waits = matches!(a.command.as_str(), "migrate" | "migrate-cancel");
    if a.wait && !waits {
        bail!("--wait applies to migrate and migrate-cancel only");
    }
    if a.wait && a.command == "migrate" {
        enable_events(&mut c);
    }
    let ret = match c.execute(&a.command, args) {
        Ok(v) => v,
        Err(ControlError::Command { class, desc }) => {
            println!("{}", error_answer(&class, &desc));
            bail!("{class}: {desc}");
        }
        Err(e) => return Err(e.into()),
    };
    if !a.wait {
        println!("{}", json!({ "return": ret }));
        return Ok(());
    }
    // Right after `migrate` the new migration may not have published its
    // first status yet: "none" is only final when cancelling.
    let none_final = a.command == "migrate-cancel";
    let stats = wait_final(
        &mut c,
        Duration::from_millis(a.interval),
        a.quiet,
        none_final,
    )?;
    let parsed: Option<MigrationStats> = serde_json::from_value(stats.clone()).ok();
    if !a.quiet {
        if let Some(s) = &parsed {
            eprintln!("{}", summary(s));
        }
    }
    println!("{}", json!({ "return": stats }));
    let status = stats["status"].as_str().unwrap_or("?");
    let want = if a.command == "migrate" {
        "completed"
    } else {
        "cancelled"
    };
    if status != want && !(a.command == "migrate-cancel" && status == "none") {
        let why = stats["error-desc"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        bail!("migration ended with status {status}{why}");
    }
    Ok(())
}

/// Turns the `events` capability on when it is off and no migration runs
/// (capabilities cannot change then), so that `--wait` hears the final
/// status as an event even when the source exits right after it.
fn enable_events(c: &mut ControlClient) {
    let on = c
        .execute("query-migrate-capabilities", Value::Null)
        .ok()
        .and_then(|caps| {
            caps.as_array()?
                .iter()
                .find(|x| x["capability"] == "events")
                .map(|x| x["state"] == true)
        });
    if on == Some(false) {
        let _ = c.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
    }
}

const FINAL: [&str; 3] = ["completed", "failed", "cancelled"];

/// Waits until the migration's status is final, from `MIGRATION` events
/// and query-migrate polls; returns the last query-migrate answer, or the
/// final status alone when the server went away (a source VMM exits once
/// its guest has left) after announcing it.
fn wait_final(
    c: &mut ControlClient,
    every: Duration,
    quiet: bool,
    none_final: bool,
) -> Result<Value> {
    let sent = Arc::new(AtomicU64::new(0));
    let mut progress: Option<Progress> = None;
    let t0 = Instant::now();
    let mut announced: Option<String> = None;
    loop {
        // Events first: they arrive even when the server closes right after.
        let waited = (|| -> Result<(), ControlError> {
            let until = Instant::now() + every;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(());
                }
                let Some(e) = c.next_event(left)? else {
                    return Ok(());
                };
                if e["event"] == "MIGRATION" {
                    let st = e["data"]["status"].as_str().unwrap_or("");
                    if FINAL.contains(&st) {
                        announced = Some(st.to_string());
                        return Ok(());
                    }
                }
            }
        })();
        let polled = match waited {
            Ok(()) => c.execute("query-migrate", Value::Null),
            Err(e) => Err(e),
        };
        let s = match (polled, &announced) {
            (Ok(s), _) => s,
            (Err(_), Some(st)) => return Ok(json!({ "status": st })),
            (Err(e), None) => return Err(anyhow!("query-migrate: {e}")),
        };
        let status = s["status"].as_str().unwrap_or("none");
        let ram = &s["ram"];
        let total = ram["total"].as_u64().unwrap_or(0);
        sent.store(ram["transferred"].as_u64().unwrap_or(0), Ordering::Relaxed);
        if progress.is_none() && total > 0 {
            progress = Some(Progress::counter(sent.clone(), total, quiet));
        }
        if FINAL.contains(&status) || (none_final && status == "none") {
            return Ok(s);
        }
        if status == "none" && t0.elapsed() > Duration::from_secs(30) {
            bail!("the migration did not start within 30 s");
        }
    }
}
