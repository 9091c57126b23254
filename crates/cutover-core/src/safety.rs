//! What a user asked for around a rollout (docs/reference.md §10), resolved: hooks, smoke checks, the
//! service's database, and the backups kept of it.
//!
//! Plain values, like the rest of `spec`: `cutover-config` builds them after checking them, the
//! controller's fsm decides with the [`ReleaseSteps`] summary alone, and `cutover-safety` carries
//! the work out. Nothing here runs a command or opens a database.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{DbKind, DbRollback};

/// Which release-safety steps a rollout has, for the fsm: it decides the order from these,
/// the driver knows the commands. All off by default, which leaves a rollout exactly as it
/// was before these steps existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReleaseSteps {
    /// `pre_deploy` hooks run before anything changes.
    pub pre_deploy: bool,
    /// The database is backed up before anything changes (`backup_before_deploy`).
    pub backup: bool,
    /// `migrate` runs once, after the backup and before candidates start.
    pub migrate: bool,
    /// Smoke checks or `pre_traffic` hooks run against the healthy candidate at 0%.
    pub smoke: bool,
    /// `post_promote` hooks run after the promotion.
    pub post_promote: bool,
    /// `on_rollback` hooks run when a rollout that changed something ends unpromoted.
    pub on_rollback_hooks: bool,
    /// What the database gets when such a rollout ends.
    pub on_rollback: DbRollback,
    /// `migrate_down` is configured (`on_rollback = "down"` needs it).
    pub migrate_down: bool,
}

impl ReleaseSteps {
    /// Whether anything at all is configured.
    pub fn any(&self) -> bool {
        *self != ReleaseSteps::default()
    }
}

// `kebab_enum!` declares the enum and derives no `Default`; the default lives here, with the
// settings it is the default of.
#[allow(clippy::derivable_impls)]
impl Default for DbRollback {
    fn default() -> Self {
        DbRollback::Keep
    }
}

/// A command as an argv: the program, then its arguments. Run without a shell.
pub type Argv = Vec<String>;

/// `[services.X.hooks]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hooks {
    pub pre_deploy: Vec<Argv>,
    pub pre_traffic: Vec<Argv>,
    pub post_promote: Vec<Argv>,
    pub on_rollback: Vec<Argv>,
    /// How long one hook may run before it is killed and counts as failed.
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            pre_deploy: Vec::new(),
            pre_traffic: Vec::new(),
            post_promote: Vec::new(),
            on_rollback: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// One `[[services.X.smoke]]` check, sent to every healthy candidate instance at 0% traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmokeCheck {
    pub path: String,
    pub method: String,
    /// The status the answer must have; `None`: any 2xx.
    pub status: Option<u16>,
    /// A text the body must contain.
    pub body_contains: Option<String>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// Where the database is. A URL may hold a password, so it is never printed whole.
#[derive(Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// `url = "postgres://..."` in the config.
    Url(String),
    /// `url_env = "NAME"`: the URL is in that variable of the service's env (or cutover's).
    UrlEnv(String),
    /// SQLite: the database file, absolute.
    Path(PathBuf),
}

impl fmt::Debug for DbLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbLocation::Url(_) => f.write_str("Url(<hidden>)"),
            DbLocation::UrlEnv(n) => write!(f, "UrlEnv({n:?})"),
            DbLocation::Path(p) => write!(f, "Path({p:?})"),
        }
    }
}

/// `[services.X.database]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseSpec {
    pub kind: DbKind,
    pub location: DbLocation,
    pub backup_before_deploy: bool,
    pub migrate: Option<Argv>,
    pub on_rollback: DbRollback,
    pub migrate_down: Option<Argv>,
    /// How long a migration, a backup or a restore may take before it is stopped.
    pub timeout: Duration,
    /// Where `pg_dump`, `pg_restore` and `psql` are; `None`: the ones of the server's major
    /// version under `/usr/lib/postgresql/*/bin`, else `PATH`.
    pub bin_dir: Option<PathBuf>,
}

/// Everything of docs/reference.md §10 one service has.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SafetySpec {
    pub hooks: Hooks,
    pub smoke: Vec<SmokeCheck>,
    pub database: Option<DatabaseSpec>,
}

impl SafetySpec {
    /// The steps a rollout of this service has.
    pub fn steps(&self) -> ReleaseSteps {
        let db = self.database.as_ref();
        ReleaseSteps {
            pre_deploy: !self.hooks.pre_deploy.is_empty(),
            backup: db.is_some_and(|d| d.backup_before_deploy),
            migrate: db.is_some_and(|d| d.migrate.is_some()),
            smoke: !self.smoke.is_empty() || !self.hooks.pre_traffic.is_empty(),
            post_promote: !self.hooks.post_promote.is_empty(),
            on_rollback_hooks: !self.hooks.on_rollback.is_empty(),
            on_rollback: db.map(|d| d.on_rollback).unwrap_or_default(),
            migrate_down: db.is_some_and(|d| d.migrate_down.is_some()),
        }
    }
}

/// `[backups] keep`: restic's retention buckets (each keeps the newest backup of each of its
/// last N periods; a backup kept by any bucket stays).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Default for Keep {
    /// docs/reference.md §10's example, which is also a sensible default.
    fn default() -> Self {
        Keep {
            last: 3,
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 12,
            yearly: 0,
        }
    }
}

/// `[backups]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupSettings {
    /// Absolute: resolved against the config file's directory.
    pub dir: PathBuf,
    pub keep: Keep,
    /// A scheduled backup (then verification and pruning) of every service with a database.
    pub every: Option<Duration>,
    /// Scheduled backups are verified right after they are taken.
    pub verify: bool,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            dir: PathBuf::from(".cutover/backups"),
            keep: Keep::default(),
            every: None,
            verify: true,
        }
    }
}
