//! A client's request head, as the proxy's fast path parses and rewrites it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_proxy::fuzzing::request_head(data));
