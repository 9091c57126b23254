//! What the daemon's jobs and `cutover backup …` do with a service's database: take a backup
//! into the catalog, restore one, verify one, prune to the `keep` policy. Each holds the
//! service's catalog lock while it works, so two of them never touch one database at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutover_core::Keep;
use jiff::tz::TimeZone;

use crate::catalog::{Catalog, CatalogError, Lock, Manifest, Reason, Verification};
use crate::command::secs;
use crate::retention::{self, Decision, Item};
use crate::target::Target;
use crate::{postgres, sqlite};

/// Why an operation did not happen, and whose fault that is (for the CLI's exit code).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The service's database is being worked on by someone else.
    #[error("{0}")]
    Busy(String),
    /// No such backup.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

impl From<CatalogError> for OpError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Busy(m) => OpError::Busy(m),
            CatalogError::NotFound(m) => OpError::NotFound(m),
            CatalogError::Io(m) => OpError::Failed(m),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `12.3 MB`, `640 KB`.
pub fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} KB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

/// A service's database, as an operation reaches it.
#[derive(Clone, Debug)]
pub struct Db {
    pub service: String,
    pub target: Target,
    pub catalog: Catalog,
    /// How long a backup or restore may take; also how long to wait for the lock.
    pub timeout: Duration,
    /// Extra environment for the tools (the daemon's marker).
    pub env: BTreeMap<String, String>,
    /// Where the tools' processes are registered while they run (the daemon's).
    pub groups: Option<crate::command::Groups>,
}

/// What a backup is for.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub reason: Option<Reason>,
    pub version: Option<String>,
    pub rollout_id: Option<i64>,
    /// Kept by `prune` until unpinned (a rollout's restore point).
    pub pinned: bool,
}

impl Db {
    fn pg(&self) -> Option<postgres::Ctx> {
        match &self.target {
            Target::Postgres { url, bin_dir } => Some(postgres::Ctx {
                url: url.clone(),
                bin_dir: bin_dir.clone(),
                env: self.env.clone(),
                timeout: self.timeout,
                groups: self.groups.clone(),
            }),
            Target::Sqlite { .. } => None,
        }
    }

    async fn lock(&self, purpose: &str) -> Result<Lock, OpError> {
        Ok(self
            .catalog
            .lock(&self.service, purpose, self.timeout)
            .await?)
    }

    /// Takes a backup into the catalog: the file is written under a partial name, checksummed,
    /// then moved into place with its manifest. On failure the partial file is removed and
    /// nothing is recorded.
    pub async fn backup(&self, meta: Meta) -> Result<Manifest, OpError> {
        let _lock = self.lock("backup").await?;
        self.catalog.remove_partials(&self.service);
        let taken_at = now_ms();
        let id = self.catalog.new_id(&self.service, taken_at);
        let partial = self.catalog.partial_path(&self.service, &id)?;
        let started = Instant::now();
        let made = self.write_backup(&partial).await;
        let tool = match made {
            Ok(tool) => tool,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                let full = e.contains("No space left")
                    || e.contains("disk is full")
                    || e.contains("database or disk is full");
                return Err(OpError::Failed(if full {
                    format!(
                        "the disk holding {} is full: {e}; the partial backup was removed",
                        self.catalog.service_dir(&self.service).display()
                    )
                } else {
                    format!("{e}; the partial backup was removed")
                }));
            }
        };
        let path = partial.clone();
        let sum = tokio::task::spawn_blocking(move || crate::catalog::sha256_file(&path))
            .await
            .map_err(|e| OpError::Failed(format!("checksumming failed: {e}")))?
            .map_err(|e| OpError::Failed(format!("cannot read the backup to checksum it: {e}")));
        let sum = match sum {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        let bytes = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        let ext = match self.target {
            Target::Postgres { .. } => "dump",
            Target::Sqlite { .. } => "sqlite3",
        };
        let m = Manifest {
            file: format!("{id}.{ext}"),
            id,
            service: self.service.clone(),
            kind: self.target.kind().as_str().to_owned(),
            database: self.target.describe(),
            bytes,
            sha256: sum,
            taken_at,
            duration_ms: ms(started.elapsed()),
            reason: meta.reason.unwrap_or(Reason::Manual),
            version: meta.version,
            rollout_id: meta.rollout_id,
            pinned: meta.pinned,
            tool,
            verifications: Vec::new(),
        };
        if let Err(e) = self.catalog.commit(&partial, &m) {
            let _ = std::fs::remove_file(&partial);
            let _ = std::fs::remove_file(self.catalog.file_of(&m));
            return Err(e.into());
        }
        Ok(m)
    }

    /// Writes the backup to `dest`; returns what made it.
    async fn write_backup(&self, dest: &std::path::Path) -> Result<String, String> {
        match &self.target {
            Target::Sqlite { path } => {
                let (live, dest, timeout) = (path.clone(), dest.to_owned(), self.timeout);
                tokio::task::spawn_blocking(move || sqlite::backup(&live, &dest, timeout))
                    .await
                    .map_err(|e| format!("the backup task failed: {e}"))??;
                Ok(format!("SQLite {} online backup API", rusqlite::version()))
            }
            Target::Postgres { .. } => {
                let ctx = self.pg().ok_or("not PostgreSQL")?;
                let tools = postgres::tools(&ctx).await?;
                postgres::backup(&ctx, &tools, dest).await?;
                Ok(tools.version)
            }
        }
    }

    /// The manifest of `id`, checked to belong to this database's kind and checksummed.
    async fn checked(&self, id: &str) -> Result<Manifest, OpError> {
        let m = self.catalog.get(&self.service, id)?;
        if m.kind != self.target.kind().as_str() {
            return Err(OpError::Failed(format!(
                "backup {id} is a {} backup, but {} is {}",
                m.kind,
                self.service,
                self.target.describe()
            )));
        }
        let (c, m2) = (self.catalog.clone(), m.clone());
        tokio::task::spawn_blocking(move || c.check(&m2))
            .await
            .map_err(|e| OpError::Failed(format!("checksumming failed: {e}")))??;
        Ok(m)
    }

    /// Restores backup `id` into the live database, after checking its sha256. Returns its
    /// manifest and a short account (`in 1.2s`, what was dropped first).
    pub async fn restore(&self, id: &str) -> Result<(Manifest, String), OpError> {
        let _lock = self.lock(&format!("restore {id}")).await?;
        let m = self.checked(id).await?;
        let file = self.catalog.file_of(&m);
        let started = Instant::now();
        let detail = match &self.target {
            Target::Sqlite { path } => {
                let (live, timeout) = (path.clone(), self.timeout);
                tokio::task::spawn_blocking(move || sqlite::restore(&file, &live, timeout))
                    .await
                    .map_err(|e| OpError::Failed(format!("the restore task failed: {e}")))?
                    .map_err(OpError::Failed)?;
                format!(
                    "through SQLite's online backup API in {}",
                    secs(started.elapsed())
                )
            }
            Target::Postgres { .. } => {
                let ctx = self
                    .pg()
                    .ok_or_else(|| OpError::Failed("not PostgreSQL".into()))?;
                let tools = postgres::tools(&ctx).await.map_err(OpError::Failed)?;
                let how = postgres::restore(&ctx, &tools, &file)
                    .await
                    .map_err(OpError::Failed)?;
                format!("{how}; {} in all", secs(started.elapsed()))
            }
        };
        Ok((m, detail))
    }

    /// Restores backup `id` into a scratch database and checks it; the result is recorded in
    /// its manifest (a failed check too) and returned.
    pub async fn verify(&self, id: &str) -> Result<(Manifest, Verification), OpError> {
        let _lock = self.lock(&format!("verify {id}")).await?;
        let mut m = self.catalog.get(&self.service, id)?;
        let started = Instant::now();
        let checked = self.checked(id).await;
        let result: Result<BTreeMap<String, u64>, String> = match checked {
            Err(OpError::Failed(e)) => Err(e),
            Err(e) => return Err(e),
            Ok(_) => {
                let file = self.catalog.file_of(&m);
                match &self.target {
                    Target::Sqlite { .. } => {
                        let scratch: PathBuf = self.catalog.service_dir(&self.service);
                        tokio::task::spawn_blocking(move || sqlite::verify(&file, &scratch))
                            .await
                            .map_err(|e| format!("the verify task failed: {e}"))
                            .and_then(|r| r)
                    }
                    Target::Postgres { .. } => match self.pg() {
                        None => Err("not PostgreSQL".into()),
                        Some(ctx) => match postgres::tools(&ctx).await {
                            Err(e) => Err(e),
                            Ok(tools) => {
                                let scratch = format!(
                                    "cutover_verify_{}_{}",
                                    self.service.replace('-', "_"),
                                    now_ms()
                                );
                                postgres::verify(&ctx, &tools, &file, &scratch).await
                            }
                        },
                    },
                }
            }
        };
        let took = started.elapsed();
        let v = match result {
            Ok(tables) => {
                let rows: u64 = tables.values().sum();
                let how = match &self.target {
                    Target::Sqlite { .. } => "PRAGMA integrity_check ok",
                    Target::Postgres { .. } => "pg_restore into a scratch database ok",
                };
                Verification {
                    at: now_ms(),
                    ok: true,
                    detail: format!(
                        "sha256 ok, {how}, {} table(s), {rows} row(s), in {}",
                        tables.len(),
                        secs(took)
                    ),
                    duration_ms: ms(took),
                    tables,
                }
            }
            Err(e) => Verification {
                at: now_ms(),
                ok: false,
                detail: e,
                duration_ms: ms(took),
                tables: BTreeMap::new(),
            },
        };
        m.verifications.push(v.clone());
        self.catalog.save(&m)?;
        Ok((m, v))
    }
}

/// The catalog's lock, from code that may block (the CLI, or a blocking task).
///
/// A lock just released can look held for a moment: a process this one forked (an instance,
/// a hook, another thread's `pg_dump`) shares the lock's open descriptor until it `exec`s and
/// close-on-exec drops it. So "held" is believed only once it has held for a second; a real
/// holder (a backup, a migration) holds far longer.
fn settled_lock(
    catalog: &Catalog,
    service: &str,
    purpose: &str,
) -> Result<crate::catalog::Lock, OpError> {
    let mut tries = 0;
    loop {
        match catalog.try_lock(service, purpose) {
            Err(CatalogError::Busy(_)) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// What `prune` decided for each backup of `service`, newest first; with `apply`, the
/// backups not kept are deleted.
pub fn prune(
    catalog: &Catalog,
    service: &str,
    keep: &Keep,
    tz: &TimeZone,
    apply: bool,
) -> Result<Vec<(Manifest, Decision)>, OpError> {
    let _lock = if apply {
        Some(settled_lock(catalog, service, "prune")?)
    } else {
        None
    };
    let all = catalog.list(Some(service))?;
    let items: Vec<Item> = all
        .iter()
        .map(|m| Item {
            id: m.id.clone(),
            taken_at: cutover_core::Timestamp(m.taken_at),
            verified: m.verified() == Some(true),
            pinned: m.pinned,
        })
        .collect();
    let decisions = retention::plan(&items, keep, tz);
    let mut out = Vec::new();
    for d in decisions {
        let Some(m) = all.iter().find(|m| m.id == d.id).cloned() else {
            continue;
        };
        if apply && !d.keep() {
            catalog.remove(&m)?;
        }
        out.push((m, d));
    }
    Ok(out)
}
