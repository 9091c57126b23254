//! SQLite persistence of rollouts, events and instances, with its own migrations.
