#![no_main]
//! Fuzz target `control`: see `livemig_fuzz::checks::control`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::control(data));
