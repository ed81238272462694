//! Runs every fuzz target's check over the seed inputs generated in memory
//! by `tests/fuzz/seeds.rs` (valid streams from the real writer, truncated
//! and mutated variants, XBZRLE deltas, compressed pages), so the package
//! tests its checks and seeds without the repository's corpus.

#[allow(dead_code)]
#[path = "fuzz/checks.rs"]
mod checks;
#[allow(dead_code)]
#[path = "fuzz/seeds.rs"]
mod seeds;

use std::panic::{catch_unwind, AssertUnwindSafe};

#[test]
fn every_seed_passes_its_check() {
    let seeds = seeds::all();
    for t in checks::TARGETS {
        assert!(
            seeds.iter().any(|s| s.target == *t),
            "no seed for fuzz target '{t}'"
        );
    }
    let mut failed = Vec::new();
    for s in &seeds {
        let r = catch_unwind(AssertUnwindSafe(|| checks::run(s.target, &s.data)));
        if !matches!(r, Ok(true)) {
            failed.push(format!("{}/seed-{}", s.target, s.name));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed their check:\n  {}",
        failed.len(),
        seeds.len(),
        failed.join("\n  ")
    );
}
