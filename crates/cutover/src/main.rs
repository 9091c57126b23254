//! The cutover binary: parses arguments, loads settings and wires the parts together.

fn main() {}
