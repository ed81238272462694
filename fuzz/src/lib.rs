//! Shared code of the livemig fuzz targets: the checks each target runs
//! (also replayed over the corpus by `crates/livemig/tests/fuzz_corpus.rs`)
//! and the seed-corpus generator.

pub mod checks;
pub mod seeds;
