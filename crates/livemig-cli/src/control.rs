//! `livemig control SOCKET COMMAND [ARGS-JSON]`: one request to a control
//! socket (`minivm run --control PATH`, or any VMM serving
//! `livemig::control`), its answer printed as one JSON line on stdout.

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
    /// The command: query-migrate, migrate, migrate-incoming,
    /// migrate-set-parameters, query-migrate-parameters,
    /// migrate-set-capabilities, query-migrate-capabilities, migrate-cancel,
    /// migrate-start-postcopy. With --raw: a whole request line, sent as it is.
    pub command: String,
    /// The command's arguments as a JSON object, e.g. '{"uri":
    /// "tcp:10.0.0.2:4444"}' or '{"max-bandwidth": 268435456}'.
    pub args: Option<String>,
    /// With migrate or migrate-cancel: poll query-migrate until the
    /// migration ends (progress bar on a terminal, summary on stderr), print
    /// the final query-migrate answer, and fail unless it completed
    /// (cancelled, for migrate-cancel).
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

/// Polls query-migrate until the status is final; returns the last answer.
fn wait_final(
    c: &mut ControlClient,
    every: Duration,
    quiet: bool,
    none_final: bool,
) -> Result<Value> {
    let sent = Arc::new(AtomicU64::new(0));
    let mut progress: Option<Progress> = None;
    let t0 = Instant::now();
    loop {
        let s = c
            .execute("query-migrate", Value::Null)
            .map_err(|e| anyhow!("query-migrate: {e}"))?;
        let status = s["status"].as_str().unwrap_or("");
        let ram = &s["ram"];
        let total = ram["total"].as_u64().unwrap_or(0);
        sent.store(ram["transferred"].as_u64().unwrap_or(0), Ordering::Relaxed);
        if progress.is_none() && total > 0 {
            progress = Some(Progress::counter(sent.clone(), total, quiet));
        }
        if matches!(status, "completed" | "failed" | "cancelled")
            || (none_final && status == "none")
        {
            return Ok(s);
        }
        if status.is_empty() {
            bail!("query-migrate answered without a status: {s}");
        }
        if status == "none" && t0.elapsed() > Duration::from_secs(30) {
            bail!("the migration did not start within 30 s");
        }
        std::thread::sleep(every);
    }
}
