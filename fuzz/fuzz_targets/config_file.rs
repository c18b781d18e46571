#![no_main]
//! See `payroc_broker::fuzzing::config_file`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| payroc_broker::fuzzing::config_file(data));
