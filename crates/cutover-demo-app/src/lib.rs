//! The sample upstream used by the demo, tests and benchmarks.
