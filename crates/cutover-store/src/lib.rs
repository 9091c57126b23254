//! cutover-store: the daemon's durable state in one SQLite file (`state_dir/state.db`).
//!
//! It owns the schema and its forward migrations, and the rows of rollouts, events, services,
//! instances and the dashboard's chart points. It knows nothing of the controller's types: a rollout's `checkpoint` is opaque
//! text the controller writes and reads. It also owns the API token file. Synchronous by design:
//! the controller calls it from its own thread, never from a proxy worker.
//!
//! [`integrity`] decides whether the state on disk can be trusted at start (`quick_check`, the
//! record of the last promoted versions); [`snapshots`] keeps backup copies and restores one.

pub mod integrity;
pub mod signals;
pub mod snapshots;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use cutover_core::{RolloutOutcome, StrategyKind, Timestamp};
use rusqlite::{Connection, OptionalExtension, Row, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the state was written by a newer cutover (schema {found}, this one knows {known}); upgrade cutover"
    )]
    Newer { found: i64, known: i64 },
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("the token file {0} is readable by others; run `chmod 600` on it")]
    TokenMode(String),
    /// The token file exists but holds no token, or is not a plain file.
    #[error("{0}")]
    TokenFile(String),
}

/// Forward migrations; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service TEXT NOT NULL,
        from_version TEXT NOT NULL,
        to_version TEXT NOT NULL,
        strategy TEXT NOT NULL,
        env TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER,
        checkpoint TEXT NOT NULL
    );
    CREATE INDEX rollouts_service ON rollouts(service, id);
    CREATE INDEX rollouts_outcome ON rollouts(outcome);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service TEXT NOT NULL,
        rollout_id INTEGER REFERENCES rollouts(id),
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_rollout ON events(rollout_id, id);
    CREATE INDEX events_service ON events(service, id);
    CREATE TABLE services (
        name TEXT PRIMARY KEY,
        stable_version TEXT NOT NULL,
        stable_env TEXT NOT NULL,
        previous_version TEXT,
        previous_env TEXT NOT NULL
    );
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        service TEXT NOT NULL,
        version TEXT NOT NULL,
        address TEXT NOT NULL,
        pid INTEGER,
        pgid INTEGER,
        started_at INTEGER NOT NULL
    );",
    // Who started a rollout and who ended it, when a person did (`user@host`, `dashboard`).
    "ALTER TABLE rollouts ADD COLUMN started_by TEXT;
    ALTER TABLE rollouts ADD COLUMN ended_by TEXT;",
    // The dashboard's chart points, so the charts survive a restart. Bounded by the writer to
    // the window the charts show; keyed by time so a re-written point replaces itself.
    "CREATE TABLE series_points (
        service TEXT NOT NULL,
        version TEXT NOT NULL,
        at INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        p99_us INTEGER,
        PRIMARY KEY (service, version, at)
    ) WITHOUT ROWID;
    CREATE INDEX series_points_at ON series_points(at);",
    // An instance is found again through its runtime's opaque handle (a process's pid and
    // group, a container's id) instead of a pid the store had to know about. Rows of the
    // process runtime carry over in its `pid/pgid` form.
    "ALTER TABLE instances ADD COLUMN handle TEXT NOT NULL DEFAULT '';
    UPDATE instances SET handle = pid || '/' || coalesce(pgid, pid) WHERE pid IS NOT NULL;
    ALTER TABLE instances DROP COLUMN pid;
    ALTER TABLE instances DROP COLUMN pgid;",
    // Signals (docs/reference.md §12): requests per service, version and minute for SLOs, written by
    // the signals task off the request path and kept for the longest SLO window (older
    // minutes are compacted into hours); the share within each SLO latency beside them; and
    // what `deploy` said about a rollout beyond the rollout (its commit, the rollout it
    // fixes, why it was forced through a freeze), and whether it was a rollback, for DORA.
    "CREATE TABLE signal_counts (
        service TEXT NOT NULL,
        version TEXT NOT NULL,
        at INTEGER NOT NULL,
        width INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        PRIMARY KEY (service, version, at, width)
    ) WITHOUT ROWID;
    CREATE INDEX signal_counts_at ON signal_counts(at);
    CREATE TABLE signal_within (
        service TEXT NOT NULL,
        version TEXT NOT NULL,
        at INTEGER NOT NULL,
        width INTEGER NOT NULL,
        threshold_us INTEGER NOT NULL,
        within INTEGER NOT NULL,
        PRIMARY KEY (service, version, at, width, threshold_us)
    ) WITHOUT ROWID;
    CREATE INDEX signal_within_at ON signal_within(at);
    CREATE TABLE rollout_notes (
        rollout_id INTEGER PRIMARY KEY REFERENCES rollouts(id),
        kind TEXT NOT NULL,
        commit_sha TEXT,
        commit_time INTEGER,
        fixes INTEGER,
        forced_reason TEXT
    );",
];

pub struct NewRollout {
    pub service: String,
    pub from_version: String,
    pub to_version: String,
    pub strategy: StrategyKind,
    pub env: BTreeMap<String, String>,
    pub started_at: Timestamp,
    pub checkpoint: String,
    /// Who asked for it (`user@host`, `dashboard`, `api`); `None` when cutover itself did.
    pub started_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RolloutRow {
    pub id: i64,
    pub service: String,
    pub from_version: String,
    pub to_version: String,
    pub strategy: StrategyKind,
    pub env: BTreeMap<String, String>,
    pub outcome: RolloutOutcome,
    pub reason: Option<String>,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    /// Opaque text the controller writes: its serialised state.
    pub checkpoint: String,
    pub started_by: Option<String>,
    /// Who ended it when a person did (abort, a rollback request); `None` otherwise.
    pub ended_by: Option<String>,
}

/// One point of a dashboard chart series: what one version answered in one interval.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesRow {
    pub service: String,
    pub version: String,
    pub at: Timestamp,
    pub requests: u64,
    pub errors: u64,
    pub p99_micros: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub service: String,
    pub rollout_id: Option<i64>,
    pub at: Timestamp,
    pub kind: String,
    pub message: String,
    /// JSON text, opaque here.
    pub data: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub id: i64,
    pub service: String,
    pub rollout_id: Option<i64>,
    pub at: Timestamp,
    pub kind: String,
    pub message: String,
    pub data: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    pub stable_version: String,
    pub stable_env: BTreeMap<String, String>,
    pub previous_version: Option<String>,
    pub previous_env: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InstanceRow {
    pub id: String,
    pub service: String,
    pub version: String,
    pub address: String,
    /// The runtime's handle for the instance (`cutover_runtime::Handle`), opaque here.
    pub handle: String,
    pub started_at: Timestamp,
}

pub struct Store {
    pub(crate) conn: Connection,
    /// The state dir, for the files beside the database; `None` in memory.
    dir: Option<std::path::PathBuf>,
    /// Set by tests through [`Store::write_fault`]: transitions fail as on a full disk.
    fault: WriteFault,
}

/// A switch that makes [`Store::record_transition`] fail as a full disk would, for tests of
/// what the controller does when it cannot persist. A clone stays with the test while the
/// store moves into the controller. Off unless a test turns it on.
#[derive(Clone, Debug, Default)]
pub struct WriteFault(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl WriteFault {
    pub fn set(&self, failing: bool) {
        self.0.store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "database or disk is full (injected by a test)",
            )));
        }
        Ok(())
    }
}

fn env_text(env: &BTreeMap<String, String>) -> String {
    serde_json::to_string(env).unwrap_or_else(|_| "{}".to_owned())
}

fn env_parse(text: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("env {text:?}: {e}")))
}

pub(crate) fn ts(v: i64) -> Timestamp {
    Timestamp(u64::try_from(v).unwrap_or(0))
}

pub(crate) fn db_ts(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

const ROLLOUT_COLS: &str = "id, service, from_version, to_version, strategy, env, outcome, reason, started_at, finished_at, checkpoint, started_by, ended_by";
const EVENT_COLS: &str = "id, service, rollout_id, at, kind, message, data";

fn rollout_row(r: &Row<'_>) -> rusqlite::Result<Result<RolloutRow, StoreError>> {
    let strategy: String = r.get(4)?;
    let env: String = r.get(5)?;
    let outcome: String = r.get(6)?;
    let finished: Option<i64> = r.get(9)?;
    let row = (|| {
        Ok(RolloutRow {
            id: r.get(0)?,
            service: r.get(1)?,
            from_version: r.get(2)?,
            to_version: r.get(3)?,
            strategy: StrategyKind::parse(&strategy)
                .ok_or_else(|| StoreError::Corrupt(format!("strategy {strategy:?}")))?,
            env: env_parse(&env)?,
            outcome: RolloutOutcome::parse(&outcome)
                .ok_or_else(|| StoreError::Corrupt(format!("outcome {outcome:?}")))?,
            reason: r.get(7)?,
            started_at: ts(r.get(8)?),
            finished_at: finished.map(ts),
            checkpoint: r.get(10)?,
            started_by: r.get(11)?,
            ended_by: r.get(12)?,
        })
    })();
    Ok(row)
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        service: r.get(1)?,
        rollout_id: r.get(2)?,
        at: ts(r.get(3)?),
        kind: r.get(4)?,
        message: r.get(5)?,
        data: r.get(6)?,
    })
}

impl Store {
    /// Opens (creating if needed) `state_dir/state.db` and brings its schema up to date.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        private_dir(state_dir)?;
        std::fs::create_dir_all(state_dir.join("logs"))?;
        private_db_files(&integrity::db_path(state_dir))?;
        let conn = Connection::open(integrity::db_path(state_dir))?;
        Store::init(conn, Some(state_dir.to_owned()))
    }

    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::init(Connection::open_in_memory()?, None)
    }

    fn init(conn: Connection, dir: Option<std::path::PathBuf>) -> Result<Store, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL lets readers run beside the writer; NORMAL sync is durable across a crash of the
        // process (what `kill -9` does), losing at most the last commit on a power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store {
            conn,
            dir,
            fault: WriteFault::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let current: Option<i64> = tx
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()?;
        let known = MIGRATIONS.len() as i64;
        let mut v = current.unwrap_or(0);
        if v > known {
            return Err(StoreError::Newer { found: v, known });
        }
        while v < known {
            tx.execute_batch(MIGRATIONS[v as usize])?;
            v += 1;
        }
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [v])?;
        tx.commit()?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))?)
    }

    pub fn insert_rollout(&mut self, r: &NewRollout) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO rollouts (service, from_version, to_version, strategy, env, outcome, reason, started_at, finished_at, checkpoint, started_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7, NULL, ?8, ?9)",
            params![
                r.service,
                r.from_version,
                r.to_version,
                r.strategy.as_str(),
                env_text(&r.env),
                RolloutOutcome::InProgress.as_str(),
                db_ts(r.started_at),
                r.checkpoint,
                r.started_by
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    fn update_rollout_in(conn: &Connection, r: &RolloutRow) -> Result<(), StoreError> {
        conn.execute(
            "UPDATE rollouts SET outcome = ?2, reason = ?3, finished_at = ?4, checkpoint = ?5, env = ?6, ended_by = ?7 WHERE id = ?1",
            params![
                r.id,
                r.outcome.as_str(),
                r.reason,
                r.finished_at.map(db_ts),
                r.checkpoint,
                env_text(&r.env),
                r.ended_by
            ],
        )?;
        Ok(())
    }

    pub fn update_rollout(&mut self, r: &RolloutRow) -> Result<(), StoreError> {
        Store::update_rollout_in(&self.conn, r)
    }

    pub fn rollout(&self, id: i64) -> Result<Option<RolloutRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {ROLLOUT_COLS} FROM rollouts WHERE id = ?1"),
                [id],
                rollout_row,
            )
            .optional()?
            .transpose()
    }

    /// Newest first.
    pub fn rollouts(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ROLLOUT_COLS} FROM rollouts WHERE (?1 IS NULL OR service = ?1) ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![service, limit], rollout_row)?;
        rows.map(|r| r?).collect()
    }

    pub fn active_rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ROLLOUT_COLS} FROM rollouts WHERE outcome = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([RolloutOutcome::InProgress.as_str()], rollout_row)?;
        rows.map(|r| r?).collect()
    }

    fn append_event_in(conn: &Connection, e: &NewEvent) -> Result<i64, StoreError> {
        conn.execute(
            "INSERT INTO events (service, rollout_id, at, kind, message, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.service, e.rollout_id, db_ts(e.at), e.kind, e.message, e.data],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn append_event(&mut self, e: &NewEvent) -> Result<i64, StoreError> {
        Store::append_event_in(&self.conn, e)
    }

    pub fn events_for_rollout(&self, rollout_id: i64) -> Result<Vec<EventRow>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {EVENT_COLS} FROM events WHERE rollout_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([rollout_id], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Newest first.
    pub fn recent_events(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {EVENT_COLS} FROM events WHERE (?1 IS NULL OR service = ?1) ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![service, limit], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn service(&self, name: &str) -> Result<Option<ServiceRow>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT name, stable_version, stable_env, previous_version, previous_env FROM services WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(name, stable_version, se, previous_version, pe)| {
            Ok(ServiceRow {
                name,
                stable_version,
                stable_env: env_parse(&se)?,
                previous_version,
                previous_env: env_parse(&pe)?,
            })
        })
        .transpose()
    }

    pub fn upsert_service(&mut self, s: &ServiceRow) -> Result<(), StoreError> {
        Store::upsert_service_in(&self.conn, s)
    }

    pub fn upsert_instance(&mut self, i: &InstanceRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO instances (id, service, version, address, handle, started_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(id) DO UPDATE SET service = ?2, version = ?3, address = ?4, handle = ?5, started_at = ?6",
            params![i.id, i.service, i.version, i.address, i.handle, db_ts(i.started_at)],
        )?;
        Ok(())
    }

    pub fn delete_instance(&mut self, id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM instances WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn instances(&self, service: Option<&str>) -> Result<Vec<InstanceRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, service, version, address, handle, started_at FROM instances WHERE (?1 IS NULL OR service = ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![service], |r| {
            Ok(InstanceRow {
                id: r.get(0)?,
                service: r.get(1)?,
                version: r.get(2)?,
                address: r.get(3)?,
                handle: r.get(4)?,
                started_at: ts(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Saves chart points (replacing any at the same service, version and time) and forgets
    /// those older than `keep_after`, in one transaction.
    pub fn save_series(
        &mut self,
        points: &[SeriesRow],
        keep_after: Timestamp,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO series_points (service, version, at, requests, errors, p99_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for p in points {
                insert.execute(params![
                    p.service,
                    p.version,
                    db_ts(p.at),
                    i64::try_from(p.requests).unwrap_or(i64::MAX),
                    i64::try_from(p.errors).unwrap_or(i64::MAX),
                    p.p99_micros.map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
                ])?;
            }
        }
        tx.execute(
            "DELETE FROM series_points WHERE at <= ?1",
            [db_ts(keep_after)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Chart points newer than `after`, oldest first.
    pub fn series_since(&self, after: Timestamp) -> Result<Vec<SeriesRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT service, version, at, requests, errors, p99_us FROM series_points
             WHERE at > ?1 ORDER BY service, version, at",
        )?;
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        let rows = stmt.query_map([db_ts(after)], |r| {
            Ok(SeriesRow {
                service: r.get(0)?,
                version: r.get(1)?,
                at: ts(r.get(2)?),
                requests: count(r.get(3)?),
                errors: count(r.get(4)?),
                p99_micros: r.get::<_, Option<i64>>(5)?.map(count),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The switch that makes transitions fail, for tests.
    pub fn write_fault(&self) -> WriteFault {
        self.fault.clone()
    }

    fn upsert_service_in(conn: &Connection, s: &ServiceRow) -> Result<(), StoreError> {
        conn.execute(
            "INSERT INTO services (name, stable_version, stable_env, previous_version, previous_env) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET stable_version = ?2, stable_env = ?3, previous_version = ?4, previous_env = ?5",
            params![s.name, s.stable_version, env_text(&s.stable_env), s.previous_version, env_text(&s.previous_env)],
        )?;
        Ok(())
    }

    /// Saves a rollout's new state, the events that explain it and, when the rollout ends, the
    /// service's new stable version, all or nothing: a promotion is never half on disk.
    pub fn record_transition(
        &mut self,
        r: &RolloutRow,
        events: &[NewEvent],
        service: Option<&ServiceRow>,
    ) -> Result<Vec<i64>, StoreError> {
        self.fault.check()?;
        let tx = self.conn.transaction()?;
        Store::update_rollout_in(&tx, r)?;
        let ids = events
            .iter()
            .map(|e| Store::append_event_in(&tx, e))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(s) = service {
            Store::upsert_service_in(&tx, s)?;
        }
        tx.commit()?;
        Ok(ids)
    }
}

/// Creates `dir` (and its parents) if needed, and makes it the owner's alone (0700 whatever
/// the umask): the state dir holds `--env` values in `state.db`, the token and the instances'
/// logs, none of which other users of the machine may read.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // A directory made by an older cutover, or under a umask that took bits away, is fixed
    // here; only its own mode changes, never its contents'.
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes the database and its WAL and shared-memory files 0600 whatever the umask. The
/// database is created here, empty, when missing: SQLite gives the WAL and `-shm` files it
/// creates later the database file's mode, so this one mode carries over to them.
fn private_db_files(db: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(db)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` readable by its owner only (0600 whatever the umask), replacing
/// it whole: written beside it first, then renamed over it.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The API token in `state_dir/token`: created at first use with mode 0600 (random 256 bits as
/// 64 hex characters), read afterwards. A token file others can read is refused.
pub fn ensure_token(state_dir: &Path) -> Result<String, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    private_dir(state_dir)?;
    let path = state_dir.join("token");
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let bytes: [u8; 32] = rand::random();
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            f.write_all(token.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Not followed: a link is not the file cutover made, whatever it points to.
            let meta = std::fs::symlink_metadata(&path)?;
            if !meta.is_file() {
                let what = if meta.is_dir() {
                    "a directory"
                } else if meta.file_type().is_symlink() {
                    "a symbolic link"
                } else {
                    "not a regular file"
                };
                return Err(StoreError::TokenFile(format!(
                    "the token file {} is {what}; remove it and cutover makes a new token (API clients then need the new one)",
                    path.display()
                )));
            }
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(StoreError::TokenMode(path.display().to_string()));
            }
            let token = std::fs::read_to_string(&path)?.trim().to_owned();
            if token.is_empty() {
                return Err(StoreError::TokenFile(format!(
                    "the token file {} is empty; delete it and cutover makes a new token (API clients then need the new one)",
                    path.display()
                )));
            }
            Ok(token)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_rollout(service: &str) -> NewRollout {
        NewRollout {
            service: service.into(),
            from_version: "v1".into(),
            to_version: "v2".into(),
            strategy: StrategyKind::Canary,
            env: BTreeMap::from([("A".into(), "1".into())]),
            started_at: Timestamp(1_000),
            checkpoint: "{}".into(),
            started_by: Some("ana@build-1".into()),
        }
    }

    fn event(service: &str, rollout: Option<i64>, kind: &str) -> NewEvent {
        NewEvent {
            service: service.into(),
            rollout_id: rollout,
            at: Timestamp(2_000),
            kind: kind.into(),
            message: format!("{kind} happened"),
            data: "{}".into(),
        }
    }

    #[test]
    fn rollouts_round_trip_and_filter() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.insert_rollout(&new_rollout("web")).unwrap();
        let b = s.insert_rollout(&new_rollout("api")).unwrap();
        let mut row = s.rollout(a).unwrap().unwrap();
        assert_eq!(
            (row.outcome, row.env.get("A").map(String::as_str)),
            (RolloutOutcome::InProgress, Some("1"))
        );
        row.outcome = RolloutOutcome::Promoted;
        row.reason = Some("done".into());
        row.finished_at = Some(Timestamp(9_000));
        row.checkpoint = "{\"x\":1}".into();
        assert_eq!(row.started_by.as_deref(), Some("ana@build-1"));
        assert_eq!(row.ended_by, None);
        row.ended_by = Some("dashboard".into());
        let ids = s
            .record_transition(&row, &[event("web", Some(a), "promoted")], None)
            .unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(s.rollout(a).unwrap().unwrap(), row);
        assert_eq!(
            s.active_rollouts()
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            vec![b]
        );
        assert_eq!(
            s.rollouts(None, 10)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            vec![b, a]
        );
        assert_eq!(s.rollouts(Some("web"), 10).unwrap().len(), 1);
        assert_eq!(s.events_for_rollout(a).unwrap()[0].kind, "promoted");
        assert!(s.rollout(999).unwrap().is_none());
    }

    #[test]
    fn transition_is_atomic() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.insert_rollout(&new_rollout("web")).unwrap();
        let mut row = s.rollout(a).unwrap().unwrap();
        row.outcome = RolloutOutcome::Aborted;
        // The second event points at a rollout that does not exist: the foreign key fails it,
        // and the update of the rollout must be undone with it.
        let err = s.record_transition(
            &row,
            &[
                event("web", Some(a), "aborted"),
                event("web", Some(999), "bad"),
            ],
            None,
        );
        assert!(err.is_err());
        assert_eq!(
            s.rollout(a).unwrap().unwrap().outcome,
            RolloutOutcome::InProgress
        );
        assert!(s.events_for_rollout(a).unwrap().is_empty());
    }

    #[test]
    fn the_new_stable_version_is_saved_with_the_final_transition() {
        let mut s = Store::open_in_memory().unwrap();
        let v1 = ServiceRow {
            name: "web".into(),
            stable_version: "v1".into(),
            stable_env: BTreeMap::new(),
            previous_version: None,
            previous_env: BTreeMap::new(),
        };
        s.upsert_service(&v1).unwrap();
        let a = s.insert_rollout(&new_rollout("web")).unwrap();
        let mut row = s.rollout(a).unwrap().unwrap();
        row.outcome = RolloutOutcome::Promoted;
        let v2 = ServiceRow {
            stable_version: "v2".into(),
            previous_version: Some("v1".into()),
            ..v1.clone()
        };
        // A failing event undoes the service's new stable version with the rollout's end.
        let bad = [event("web", Some(999), "bad")];
        assert!(s.record_transition(&row, &bad, Some(&v2)).is_err());
        assert_eq!(s.service("web").unwrap(), Some(v1.clone()));
        // The test switch fails it as a full disk would, and writes nothing.
        let fault = s.write_fault();
        fault.set(true);
        let ok = [event("web", Some(a), "promoted")];
        let err = s.record_transition(&row, &ok, Some(&v2)).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert_eq!(s.service("web").unwrap(), Some(v1));
        fault.set(false);
        s.record_transition(&row, &ok, Some(&v2)).unwrap();
        assert_eq!(s.service("web").unwrap(), Some(v2));
        assert_eq!(
            s.rollout(a).unwrap().unwrap().outcome,
            RolloutOutcome::Promoted
        );
    }

    #[test]
    fn services_instances_and_events() {
        let mut s = Store::open_in_memory().unwrap();
        let row = ServiceRow {
            name: "web".into(),
            stable_version: "v2".into(),
            stable_env: BTreeMap::new(),
            previous_version: Some("v1".into()),
            previous_env: BTreeMap::from([("K".into(), "V".into())]),
        };
        s.upsert_service(&row).unwrap();
        s.upsert_service(&row).unwrap();
        assert_eq!(s.service("web").unwrap(), Some(row));
        assert_eq!(s.service("nope").unwrap(), None);
        let inst = InstanceRow {
            id: "web-v2-1".into(),
            service: "web".into(),
            version: "v2".into(),
            address: "127.0.0.1:4000".into(),
            handle: "42/42".into(),
            started_at: Timestamp(5),
        };
        s.upsert_instance(&inst).unwrap();
        assert_eq!(s.instances(Some("web")).unwrap(), vec![inst]);
        s.delete_instance("web-v2-1").unwrap();
        assert!(s.instances(None).unwrap().is_empty());
        for k in ["a", "b", "c"] {
            s.append_event(&event("web", None, k)).unwrap();
        }
        let recent: Vec<String> = s
            .recent_events(Some("web"), 2)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(recent, vec!["c", "b"]);
    }

    #[test]
    fn migrations_are_idempotent_and_refuse_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let mut s = Store::open(dir.path()).unwrap();
            s.insert_rollout(&new_rollout("web")).unwrap()
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert!(s.rollout(id).unwrap().is_some(), "data survives reopening");
        // A second connection beside the first (WAL) works.
        let s2 = Store::open(dir.path()).unwrap();
        assert_eq!(s2.rollouts(None, 5).unwrap().len(), 1);
        drop((s, s2));
        let conn = Connection::open(dir.path().join("state.db")).unwrap();
        conn.execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Newer { found: 99, .. })
        ));
    }

    #[test]
    fn a_version_1_database_gains_the_actor_columns() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The state as the first release wrote it.
            let conn = Connection::open(dir.path().join("state.db")).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (1);
                 INSERT INTO rollouts (service, from_version, to_version, strategy, env, outcome, started_at, checkpoint)
                 VALUES ('web', 'v1', 'v2', 'canary', '{}', 'promoted', 5, '');",
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let old = &s.rollouts(None, 5).unwrap()[0];
        assert_eq!((old.started_by.clone(), old.ended_by.clone()), (None, None));
        assert!(s.series_since(Timestamp(0)).unwrap().is_empty());
    }

    #[test]
    fn series_points_are_replaced_pruned_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let point = |version: &str, at: u64, requests: u64| SeriesRow {
            service: "web".into(),
            version: version.into(),
            at: Timestamp(at),
            requests,
            errors: requests / 10,
            p99_micros: (requests > 0).then_some(1_500),
        };
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.save_series(
                &[point("v1", 1_000, 5), point("v1", 2_000, 7)],
                Timestamp(0),
            )
            .unwrap();
            // The same instant again replaces the point; older ones than the window go.
            s.save_series(
                &[point("v1", 2_000, 8), point("v2", 3_000, 0)],
                Timestamp(1_000),
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.series_since(Timestamp(0)).unwrap(),
            vec![point("v1", 2_000, 8), point("v2", 3_000, 0)]
        );
        assert_eq!(
            s.series_since(Timestamp(2_000)).unwrap(),
            vec![point("v2", 3_000, 0)]
        );
    }

    #[test]
    fn token_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t1 = ensure_token(dir.path()).unwrap();
        assert_eq!(t1.len(), 64);
        assert!(t1.chars().all(|c| c.is_ascii_hexdigit()));
        let mode = std::fs::metadata(dir.path().join("token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(ensure_token(dir.path()).unwrap(), t1);
        std::fs::set_permissions(
            dir.path().join("token"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            ensure_token(dir.path()),
            Err(StoreError::TokenMode(_))
        ));
    }

    /// A token file that is a directory, or empty, is named for what it is, not called
    /// "readable by others" or a "corrupt row".
    #[test]
    fn a_token_file_that_is_a_directory_or_empty_says_so() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::create_dir(&token).unwrap();
        let e = ensure_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory; remove it"), "{e}");
        assert!(!e.contains("chmod"), "{e}");
        std::fs::remove_dir(&token).unwrap();
        std::fs::write(&token, "\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = ensure_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is empty; delete it"), "{e}");
        assert!(!e.contains("corrupt row"), "{e}");
    }

    /// The state dir is the owner's alone and the database files 0600, whatever the umask
    /// and however an older cutover left them.
    #[test]
    fn the_state_dir_and_database_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        // As an older cutover left them: world-readable.
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in ["state.db-wal", "state.db-shm"] {
            std::fs::write(state.join(f), "").unwrap();
            std::fs::set_permissions(state.join(f), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        std::fs::remove_file(state.join("state.db-wal")).unwrap();
        let mut store = Store::open(&state).unwrap();
        store.insert_rollout(&new_rollout("web")).unwrap();
        assert_eq!(mode(&state), 0o700);
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            assert_eq!(mode(&state.join(f)), 0o600, "{f}");
        }
        drop(store);
        let fresh = root.path().join("a/b/state");
        ensure_token(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join("token")), 0o600);
    }
}
