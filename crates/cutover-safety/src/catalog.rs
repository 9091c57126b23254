//! The backup catalog: a directory per service under `[backups] dir`, holding each backup's
//! file beside a JSON manifest (who, what, when, how big, how long, its sha256, and every
//! verification of it).
//!
//! Files rather than rows in the daemon's state: the catalog is read and changed both by the
//! daemon (before a deploy, on its schedule) and by `cutover backup …` with or without a daemon
//! running — restoring a database must not need the daemon — and a backup directory copied
//! elsewhere still says what it holds. A manifest is written to a temporary name and renamed,
//! so a reader never sees half of one; a backup's file appears under its final name only once
//! it is complete and checksummed (a partial one is `.ID.partial` and is removed on failure, or
//! at the next start). One lock per service (`flock` on `.lock`) serialises everything that
//! touches that service's database or catalog, across processes; `.lock.who` says who holds it.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One verification of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Unix milliseconds.
    pub at: u64,
    pub ok: bool,
    /// What was checked and found, or what failed.
    pub detail: String,
    pub duration_ms: u64,
    /// Rows per table of the restored copy.
    #[serde(default)]
    pub tables: std::collections::BTreeMap<String, u64>,
}

/// Why a backup was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// By a rollout, before it changed anything (`backup_before_deploy`).
    BeforeDeploy,
    /// By the daemon's schedule (`[backups] every`).
    Scheduled,
    /// By `cutover backup create`.
    Manual,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BeforeDeploy => "before-deploy",
            Reason::Scheduled => "scheduled",
            Reason::Manual => "manual",
        }
    }
}

/// A backup's manifest (`ID.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub service: String,
    /// `postgres` or `sqlite`.
    pub kind: String,
    /// The database, without any secret.
    pub database: String,
    /// The backup's file name, in the same directory.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// Unix milliseconds.
    pub taken_at: u64,
    pub duration_ms: u64,
    pub reason: Reason,
    /// The version that served while it was taken.
    pub version: Option<String>,
    pub rollout_id: Option<i64>,
    /// A rollout in progress would restore it: `prune` keeps it.
    #[serde(default)]
    pub pinned: bool,
    /// What made it (`pg_dump (PostgreSQL) 15.18`, `SQLite 3.50.2 online backup`).
    #[serde(default)]
    pub tool: String,
    #[serde(default)]
    pub verifications: Vec<Verification>,
}

impl Manifest {
    /// The last verification's result, if any.
    pub fn verified(&self) -> Option<bool> {
        self.verifications.last().map(|v| v.ok)
    }
}

/// Why the catalog could not do something.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Another process (or job) works on this service's database now.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Io(String),
}

/// The catalog under one directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalog {
    dir: PathBuf,
}

/// The service's lock, held while the value lives.
#[derive(Debug)]
pub struct Lock {
    _fd: OwnedFd,
    who: PathBuf,
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.who);
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> CatalogError {
    CatalogError::Io(format!("cannot {what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, private to the owner.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The sha256 of a file, hex, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Catalog {
    pub fn new(dir: impl Into<PathBuf>) -> Catalog {
        Catalog { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.dir.join(service)
    }

    fn ensure(&self, service: &str) -> Result<PathBuf, CatalogError> {
        use std::os::unix::fs::DirBuilderExt;
        let d = self.service_dir(service);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .map_err(|e| io("create", &d, e))?;
        Ok(d)
    }

    /// Takes the service's lock now, or says who holds it.
    pub fn try_lock(&self, service: &str, purpose: &str) -> Result<Lock, CatalogError> {
        use std::os::unix::fs::OpenOptionsExt;
        let d = self.ensure(service)?;
        let path = d.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("open", &path, e))?;
        let fd = OwnedFd::from(f);
        let who = d.join(".lock.who");
        match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                let _ = std::fs::write(&who, format!("pid {}: {purpose}\n", std::process::id()));
                Ok(Lock { _fd: fd, who })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let holder = std::fs::read_to_string(&who)
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "another process".into());
                Err(CatalogError::Busy(format!(
                    "the database of {service} is busy ({holder}); try again once that has finished"
                )))
            }
            Err(e) => Err(CatalogError::Io(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }

    /// Takes the service's lock, waiting up to `wait` for whoever holds it.
    pub async fn lock(
        &self,
        service: &str,
        purpose: &str,
        wait: Duration,
    ) -> Result<Lock, CatalogError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.try_lock(service, purpose) {
                Err(CatalogError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// A new backup id for `service` taken at `at_ms`: `SERVICE-YYYYMMDD-HHMMSS-mmm`, unique.
    pub fn new_id(&self, service: &str, at_ms: u64) -> String {
        let t = jiff::Timestamp::from_millisecond(i64::try_from(at_ms).unwrap_or(0))
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let base = format!("{service}-{}", t.strftime("%Y%m%d-%H%M%S-%3f"));
        let d = self.service_dir(service);
        let mut id = base.clone();
        let mut n = 2;
        while d.join(format!("{id}.json")).exists() {
            id = format!("{base}-{n}");
            n += 1;
        }
        id
    }

    /// Where a backup being written goes until it is complete.
    pub fn partial_path(&self, service: &str, id: &str) -> Result<PathBuf, CatalogError> {
        Ok(self.ensure(service)?.join(format!(".{id}.partial")))
    }

    /// Removes partial files a killed process left (called with the service's lock held).
    pub fn remove_partials(&self, service: &str) {
        if let Ok(rd) = std::fs::read_dir(self.service_dir(service)) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".partial") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Moves a complete backup file into place and writes its manifest.
    pub fn commit(&self, partial: &Path, m: &Manifest) -> Result<(), CatalogError> {
        use std::os::unix::fs::PermissionsExt;
        let d = self.ensure(&m.service)?;
        let file = d.join(&m.file);
        // A backup holds all the service's data: readable by cutover's user alone.
        std::fs::set_permissions(partial, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("make private", partial, e))?;
        std::fs::rename(partial, &file).map_err(|e| io("move into place", &file, e))?;
        self.save(m)
    }

    /// Writes (or rewrites) a manifest.
    pub fn save(&self, m: &Manifest) -> Result<(), CatalogError> {
        let d = self.ensure(&m.service)?;
        let path = d.join(format!("{}.json", m.id));
        let text = serde_json::to_vec_pretty(m)
            .map_err(|e| CatalogError::Io(format!("cannot encode a manifest: {e}")))?;
        write_atomic(&path, &text).map_err(|e| io("write", &path, e))
    }

    /// The backups of `service` (every service when `None`), newest first. A manifest that
    /// does not read is skipped with a warning rather than hide the others.
    pub fn list(&self, service: Option<&str>) -> Result<Vec<Manifest>, CatalogError> {
        let services: Vec<String> = match service {
            Some(s) => vec![s.to_owned()],
            None => match std::fs::read_dir(&self.dir) {
                Ok(rd) => rd
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io("read", &self.dir, e)),
            },
        };
        let mut out = Vec::new();
        for s in services {
            let d = self.service_dir(&s);
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("read", &d, e)),
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                {
                    match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| {
                        serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string())
                    }) {
                        Ok(m) => out.push(m),
                        Err(e) => {
                            tracing::warn!(manifest = %p.display(), error = %e, "a backup manifest does not read; skipped")
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then(b.id.cmp(&a.id)));
        Ok(out)
    }

    /// The backup `id` of `service`.
    pub fn get(&self, service: &str, id: &str) -> Result<Manifest, CatalogError> {
        self.list(Some(service))?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| {
                CatalogError::NotFound(format!(
                    "no backup {id:?} of {service} in {}; `cutover backup list {service}` shows them",
                    self.service_dir(service).display()
                ))
            })
    }

    /// The path of a backup's file.
    pub fn file_of(&self, m: &Manifest) -> PathBuf {
        self.service_dir(&m.service).join(&m.file)
    }

    /// Checks a backup's file against its manifest's sha256: refuses a changed or missing one,
    /// naming it.
    pub fn check(&self, m: &Manifest) -> Result<(), CatalogError> {
        let path = self.file_of(m);
        let sum = sha256_file(&path).map_err(|e| {
            CatalogError::Io(format!(
                "backup {} cannot be read ({}: {e})",
                m.id,
                path.display()
            ))
        })?;
        if sum != m.sha256 {
            return Err(CatalogError::Io(format!(
                "checksum mismatch: {} has sha256 {sum}, but the catalog recorded {} when it was taken; the file changed since, so it is not used",
                path.display(),
                m.sha256
            )));
        }
        Ok(())
    }

    /// Deletes a backup: its file, then its manifest.
    pub fn remove(&self, m: &Manifest) -> Result<(), CatalogError> {
        let file = self.file_of(m);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("delete", &file, e)),
        }
        let man = self.service_dir(&m.service).join(format!("{}.json", m.id));
        std::fs::remove_file(&man).map_err(|e| io("delete", &man, e))
    }

    /// Sets or clears the rollout pin of a backup.
    pub fn pin(&self, service: &str, id: &str, pinned: bool) -> Result<(), CatalogError> {
        let mut m = self.get(service, id)?;
        if m.pinned != pinned {
            m.pinned = pinned;
            self.save(&m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn manifest(id: &str, at: u64) -> Manifest {
        Manifest {
            id: id.into(),
            service: "web".into(),
            kind: "sqlite".into(),
            database: "sqlite /x".into(),
            file: format!("{id}.sqlite3"),
            bytes: 5,
            sha256: String::new(),
            taken_at: at,
            duration_ms: 1,
            reason: Reason::Manual,
            version: Some("v1".into()),
            rollout_id: None,
            pinned: false,
            tool: String::new(),
            verifications: Vec::new(),
        }
    }

    #[test]
    fn backups_are_committed_listed_checked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::new(dir.path());
        let id = c.new_id("web", 1_700_000_000_123);
        assert_eq!(id, "web-20231114-221320-123");
        let partial = c.partial_path("web", &id).unwrap();
        std::fs::write(&partial, b"hello").unwrap();
        let mut m = manifest(&id, 1_700_000_000_123);
        m.sha256 = sha256_file(&partial).unwrap();
        c.commit(&partial, &m).unwrap();
        assert!(!partial.exists());
        assert_eq!(c.list(None).unwrap(), vec![m.clone()]);
        c.check(&m).unwrap();
        // A changed file is refused, named.
        std::fs::write(c.file_of(&m), b"HELLO").unwrap();
        let e = c.check(&m).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(e.contains(&format!("{id}.sqlite3")), "{e}");
        // Ids stay unique within a millisecond.
        assert_eq!(c.new_id("web", 1_700_000_000_123), format!("{id}-2"));
        c.pin("web", &id, true).unwrap();
        assert!(c.get("web", &id).unwrap().pinned);
        c.remove(&m).unwrap();
        assert!(c.list(Some("web")).unwrap().is_empty());
        assert!(matches!(c.get("web", &id), Err(CatalogError::NotFound(_))));
    }

    #[test]
    fn the_lock_is_exclusive_and_says_who_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::new(dir.path());
        let held = c.try_lock("web", "restore web-1").unwrap();
        let e = c.try_lock("web", "backup").unwrap_err().to_string();
        assert!(e.contains("busy"), "{e}");
        assert!(e.contains("restore web-1"), "{e}");
        assert!(c.try_lock("api", "backup").is_ok(), "per service");
        drop(held);
        assert!(c.try_lock("web", "backup").is_ok());
    }
}
