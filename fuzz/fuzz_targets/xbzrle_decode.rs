#![no_main]
//! Fuzz target `xbzrle_decode`: see `livemig_fuzz::checks::xbzrle_decode`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| livemig_fuzz::checks::xbzrle_decode(data));
