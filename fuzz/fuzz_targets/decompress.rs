#![no_main]
//! Fuzz target `decompress`: see `livemig_fuzz::checks::decompress`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::decompress(data));
