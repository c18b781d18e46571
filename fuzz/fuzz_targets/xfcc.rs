#![no_main]
//! See `payroc_broker::fuzzing::xfcc`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| payroc_broker::fuzzing::xfcc(data));
