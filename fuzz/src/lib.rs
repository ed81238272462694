//! Shared code of the livemig fuzz targets: the checks each target runs and
//! the seed-corpus generator. Both live in the livemig package
//! (`crates/livemig/tests/fuzz/`), whose tests replay the seeds
//! (`tests/fuzz_seeds.rs`) and, in the repository, this corpus
//! (`tests/fuzz_corpus.rs`) through exactly these checks.

#[path = "../../crates/livemig/tests/fuzz/checks.rs"]
pub mod checks;
#[path = "../../crates/livemig/tests/fuzz/seeds.rs"]
pub mod seeds;
