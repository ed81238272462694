#![no_main]
//! Fuzz target `postcopy_messages`: see `livemig_fuzz::checks::postcopy_messages`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::postcopy_messages(data));
