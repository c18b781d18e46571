#![no_main]
//! See `payroc_broker::fuzzing::problem_document`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| payroc_broker::fuzzing::problem_document(data));
