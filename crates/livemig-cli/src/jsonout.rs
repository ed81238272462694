//! `--json` output: the one JSON object a command prints on stdout, and an
//! error object when a command fails before it printed one.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{json, Value};

static PRINTED: AtomicBool = AtomicBool::new(false);

/// Prints `v` as the command's JSON object.
pub fn print(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    PRINTED.store(true, Ordering::SeqCst);
    Ok(())
}

/// After a failure: prints `{"status": "failed", "error": ...}` unless the
/// command already printed its object (which then says why it failed).
pub fn print_failure(error: &str) {
    if !PRINTED.load(Ordering::SeqCst) {
        println!("{}", json!({"status": "failed", "error": error}));
    }
}
