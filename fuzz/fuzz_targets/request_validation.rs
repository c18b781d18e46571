#![no_main]
//! See `payroc_broker::fuzzing::request_validation`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| payroc_broker::fuzzing::request_validation(data));
