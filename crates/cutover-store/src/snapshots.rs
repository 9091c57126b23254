//! Snapshots of the state database, and restoring one.
//!
//! A snapshot is a consistent copy made with SQLite's online backup API while the daemon runs
//! (after every finished rollout), into `state_dir/snapshots/` (0700), each file 0600 like the
//! database itself: it holds the same env values. The newest [`KEEP`] are kept. Restoring
//! (`cutover state restore`, with no daemon on the state dir) checks the snapshot, sets the
//! current database aside rather than deleting it, and copies the snapshot in its place.

use std::path::{Path, PathBuf};

use cutover_core::Timestamp;
use rusqlite::{Connection, MAIN_DB, OpenFlags};

use crate::integrity::{self, Promoted, Record};
use crate::{Store, StoreError};

/// The folder of snapshots in the state dir.
pub const SNAPSHOT_DIR: &str = "snapshots";
/// How many snapshots are kept.
pub const KEEP: usize = 10;

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(SNAPSHOT_DIR)
}

/// One snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub path: PathBuf,
    /// The file name: what `cutover state restore NAME` takes.
    pub name: String,
    pub taken_at: Timestamp,
    /// The rollout whose end it followed, if any.
    pub rollout: Option<i64>,
    pub bytes: u64,
}

/// `state-<unix ms>[-rollout-<id>].db`: sorts by time, and says what it followed.
fn parse_name(name: &str) -> Option<(Timestamp, Option<i64>)> {
    let stem = name.strip_prefix("state-")?.strip_suffix(".db")?;
    let (ms, rollout) = match stem.split_once("-rollout-") {
        Some((ms, id)) => (ms, Some(id.parse().ok()?)),
        None => (stem, None),
    };
    Some((Timestamp(ms.parse().ok()?), rollout))
}

/// Every snapshot of `state_dir`, newest first.
pub fn list(state_dir: &Path) -> Result<Vec<Snapshot>, StoreError> {
    let entries = match std::fs::read_dir(dir(state_dir)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((taken_at, rollout)) = parse_name(&name) {
            out.push(Snapshot {
                path: e.path(),
                bytes: e.metadata().map(|m| m.len()).unwrap_or(0),
                name,
                taken_at,
                rollout,
            });
        }
    }
    out.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then(b.name.cmp(&a.name)));
    Ok(out)
}

/// An empty file readable by its owner only, for SQLite to fill (it keeps the mode).
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// Copies the open database `from` into a new file `to` with the backup API, via a temporary
/// name, so a half-written copy never carries the final name.
fn copy(from: &Connection, to: &Path) -> Result<(), StoreError> {
    let tmp = to.with_extension("partial");
    private_file(&tmp)?;
    if let Err(e) = from.backup(MAIN_DB, &tmp, None) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, to)?;
    Ok(())
}

impl Store {
    /// Takes a snapshot of the database now (after rollout `rollout`, if given) and keeps the
    /// newest [`KEEP`]. Returns the new file.
    pub fn snapshot(&self, rollout: Option<i64>) -> Result<PathBuf, StoreError> {
        let state_dir = self.dir.as_ref().ok_or_else(|| {
            StoreError::Corrupt("an in-memory store has no place for snapshots".into())
        })?;
        let folder = dir(state_dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&folder)?;
        }
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let name = match rollout {
            Some(id) => format!("state-{ms:013}-rollout-{id}.db"),
            None => format!("state-{ms:013}.db"),
        };
        let path = folder.join(name);
        copy(&self.conn, &path)?;
        for old in list(state_dir)?.into_iter().skip(KEEP) {
            let _ = std::fs::remove_file(&old.path);
            for ext in ["-wal", "-shm"] {
                let mut p = old.path.clone().into_os_string();
                p.push(ext);
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(path)
    }

    /// Writes the record of the last promoted versions from the `services` table.
    pub fn save_record(&self) -> Result<(), StoreError> {
        let Some(state_dir) = &self.dir else {
            return Ok(());
        };
        integrity::write_record(state_dir, &record_of(&self.conn)?)
    }
}

fn record_of(conn: &Connection) -> Result<Record, StoreError> {
    let mut stmt = conn.prepare("SELECT name, stable_version, previous_version FROM services")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Promoted {
                stable: r.get(1)?,
                previous: r.get(2)?,
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// Where the database it replaced was moved, if there was one.
    pub set_aside: Option<PathBuf>,
    /// The stable versions the restored state has.
    pub record: Record,
}

/// Replaces the database of `state_dir` with `snapshot`, which must pass `quick_check`. The
/// caller makes sure no daemon uses the state dir. Instances recorded in the snapshot are
/// forgotten: none of them runs now.
pub fn restore(state_dir: &Path, snapshot: &Path) -> Result<Restored, StoreError> {
    integrity::quick_check(snapshot).map_err(|detail| {
        StoreError::Corrupt(format!(
            "the snapshot {} is damaged too ({detail}); choose another (`cutover state list`)",
            snapshot.display()
        ))
    })?;
    let from = Connection::open_with_flags(snapshot, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let db = integrity::db_path(state_dir);
    let staged = state_dir.join("state.db.restoring");
    copy(&from, &staged)?;
    drop(from);
    let record = {
        let conn = Connection::open(&staged)?;
        conn.execute("DELETE FROM instances", [])?;
        let record = record_of(&conn)?;
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")?;
        record
    };
    let keep = std::fs::metadata(&db).is_ok_and(|m| m.len() > 0);
    let set_aside = if keep {
        integrity::set_aside(state_dir, "replaced")?
    } else {
        None
    };
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(state_dir.join(format!("{}{ext}", integrity::DB_FILE)));
    }
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(state_dir.join(format!("state.db.restoring{ext}")));
    }
    std::fs::rename(&staged, &db)?;
    integrity::write_record(state_dir, &record)?;
    Ok(Restored { set_aside, record })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ServiceRow;

    fn stable(s: &mut Store, v: &str) {
        s.upsert_service(&ServiceRow {
            name: "web".into(),
            stable_version: v.into(),
            stable_env: BTreeMap::new(),
            previous_version: None,
            previous_env: BTreeMap::new(),
        })
        .unwrap();
    }

    #[test]
    fn snapshots_are_private_bounded_and_restorable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        stable(&mut s, "v2");
        let first = s.snapshot(Some(1)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&first), 0o600);
        assert_eq!(mode(&dir.path().join(SNAPSHOT_DIR)), 0o700);
        for id in 2..=(KEEP as i64 + 3) {
            s.snapshot(Some(id)).unwrap();
        }
        let all = list(dir.path()).unwrap();
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].rollout, Some(KEEP as i64 + 3), "newest first");
        assert!(!first.exists(), "the oldest went");
        let keep = all[0].path.clone();
        stable(&mut s, "v3");
        drop(s);

        let r = restore(dir.path(), &keep).unwrap();
        assert_eq!(r.record["web"].stable, "v2");
        assert!(r.set_aside.as_ref().is_some_and(|p| p.exists()));
        assert_eq!(mode(&dir.path().join("state.db")), 0o600);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.service("web").unwrap().unwrap().stable_version, "v2");
        assert_eq!(
            crate::integrity::read_record(dir.path()).unwrap().unwrap()["web"].stable,
            "v2"
        );

        // A damaged snapshot is refused, and the database stays as it was.
        std::fs::write(&keep, b"garbage that is not a database at all").unwrap();
        assert!(restore(dir.path(), &keep).is_err());
        assert_eq!(s.service("web").unwrap().unwrap().stable_version, "v2");
    }
}
