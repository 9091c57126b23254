//! A chunked body (after a first byte that sets the read size), followed whole and in pieces.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_proxy::fuzzing::chunked(data));
