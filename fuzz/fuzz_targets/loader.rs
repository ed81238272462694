#![no_main]
//! Fuzz target `loader`: see `livemig_fuzz::checks::loader`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::loader(data));
