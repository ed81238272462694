#![no_main]
//! Fuzz target `mapped_ram_header`: see `livemig_fuzz::checks::mapped_ram_header`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::mapped_ram_header(data));
