//! A `cutover.toml`, as `validate` and `up` load it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cutover_config::fuzzing::config(data));
