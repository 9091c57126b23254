//! cutover.toml to validated settings, with diagnostics naming file:line:col and key.
