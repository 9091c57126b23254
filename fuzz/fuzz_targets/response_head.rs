//! An instance's answer head, as the proxy's fast path parses and rewrites it (to a GET and
//! to a HEAD).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cutover_proxy::fuzzing::response_head(data, false);
    cutover_proxy::fuzzing::response_head(data, true);
});
