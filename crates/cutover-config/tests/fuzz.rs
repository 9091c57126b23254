//! Seeded, time-bounded fuzzing of the config loader on the stable toolchain: the committed
//! corpus and its mutants through `cutover_config::fuzzing::config` (the check the cargo-fuzz
//! target in `fuzz/` runs). `CUTOVER_FUZZ_SECS` lengthens a run.

#[path = "../../../fuzz/mutate.rs"]
mod mutate;

#[test]
fn config_files() {
    assert!(
        mutate::run(
            "config",
            mutate::CONFIG_WORDS,
            cutover_config::fuzzing::config
        ) > 0
    );
}
