//! cutover-safety: the work around a rollout that keeps a release safe (docs/reference.md §10) — hooks,
//! smoke checks, backups of the service's database, restores, verification, and the catalog
//! of backups with its retention policy.
//!
//! It carries work out and decides nothing about a rollout: the controller's fsm says which
//! step runs when, and the driver runs these functions off its loop and feeds their results
//! back as events. The one decision here, which backups a `keep` policy keeps, is a pure
//! function ([`retention`]) with table tests. The CLI uses the same functions for
//! `cutover backup …`, with or without a daemon.
//!
//! What it must not do: print a database password (messages use [`target::Target::describe`];
//! tools get the password in their environment, never on their command line), keep more than
//! a bounded tail of a command's output, or swap a file under a running database (SQLite is
//! restored through its online backup API into the live file).

pub mod catalog;
pub mod command;
pub mod ops;
pub mod postgres;
pub mod retention;
pub mod smoke;
pub mod sqlite;
pub mod target;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

pub use catalog::{Catalog, CatalogError, Manifest, Reason, Verification};
pub use command::{Cmd, Ending, Ran};
pub use ops::{Db, Meta, OpError};
pub use target::Target;
