#![no_main]
//! Fuzz target `stream_reader`: see `livemig_fuzz::checks::stream_reader`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::stream_reader(data));
