//! Seeded, time-bounded fuzzing of the fast path's parsers on the stable toolchain: the
//! committed corpus and its mutants through the checks of `cutover_proxy::fuzzing` (the same
//! ones the cargo-fuzz targets in `fuzz/` run). `CUTOVER_FUZZ_SECS` lengthens a run.

#[path = "../../../fuzz/mutate.rs"]
mod mutate;

use cutover_proxy::fuzzing;

#[test]
fn request_heads() {
    assert!(mutate::run("request_head", mutate::HTTP_WORDS, fuzzing::request_head) > 0);
}

#[test]
fn response_heads() {
    let check = |d: &[u8]| {
        fuzzing::response_head(d, false);
        fuzzing::response_head(d, true);
    };
    assert!(mutate::run("response_head", mutate::HTTP_WORDS, check) > 0);
}

#[test]
fn chunked_bodies() {
    assert!(mutate::run("chunked", mutate::HTTP_WORDS, fuzzing::chunked) > 0);
}
