#![no_main]
//! Fuzz target `loader_guard`: see `livemig_fuzz::checks::loader_guard`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::loader_guard(data));
