//! Whether the state on disk can be trusted before the daemon uses it.
//!
//! Two failures must never pass silently. A damaged database (a bad page) can lose rows while
//! every query still "works": a rollout in progress simply vanishes. So `up` runs SQLite's
//! `quick_check` first and refuses a database that fails it. And a missing or empty database
//! looks exactly like a first start, after which the config's initial versions would be
//! deployed over whatever had been promoted since: a silent downgrade. So beside the database
//! lives a small record of the last promoted versions (`last-promoted.json`, written after every
//! change of a stable version); a missing database with that record present is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde_json::json;

use crate::StoreError;

/// The database's file name in the state dir.
pub const DB_FILE: &str = "state.db";
/// The record of the last promoted versions, beside the database.
pub const RECORD_FILE: &str = "last-promoted.json";

pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DB_FILE)
}

pub fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join(RECORD_FILE)
}

/// One service in the record: its stable version and the one before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promoted {
    pub stable: String,
    pub previous: Option<String>,
}

/// What the record says, by service.
pub type Record = BTreeMap<String, Promoted>;

/// What the state on disk is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateCheck {
    /// No database and no record: a first start.
    Fresh,
    /// A database that passes `quick_check`.
    Sound,
    /// No database (or an empty one), but the record says what had been promoted.
    Lost { record: Record },
    /// A database that fails `quick_check` or is not a database at all.
    Damaged { detail: String },
}

/// Checks `state_dir` before the daemon opens it. Read-only: it creates and changes nothing.
pub fn check(state_dir: &Path) -> Result<StateCheck, StoreError> {
    let db = db_path(state_dir);
    let record = read_record(state_dir)?;
    let empty = match std::fs::metadata(&db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e.into()),
        Ok(m) => m.len() == 0,
    };
    if !empty {
        if let Err(detail) = quick_check(&db) {
            return Ok(StateCheck::Damaged { detail });
        }
        if has_schema(&db).unwrap_or(false) {
            return Ok(StateCheck::Sound);
        }
    }
    // Nothing in it: a first start, unless the record says there was state.
    Ok(match record {
        Some(record) => StateCheck::Lost { record },
        None => StateCheck::Fresh,
    })
}

/// SQLite's `quick_check` of the database at `path` (with its WAL): `Err` with what it found.
/// Milliseconds on a database of cutover's size.
pub fn quick_check(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| e.to_string())?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| e.to_string())?;
    match rows.as_slice() {
        [ok] if ok == "ok" => Ok(()),
        [] => Err("quick_check said nothing".into()),
        problems => Err(problems
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// Whether cutover's schema is in the database (an empty file opens as an empty database).
fn has_schema(path: &Path) -> Result<bool, rusqlite::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// The record, if there is one.
pub fn read_record(state_dir: &Path) -> Result<Option<Record>, StoreError> {
    let path = record_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("{} is not valid JSON: {e}", path.display())))?;
    let mut record = Record::new();
    if let Some(services) = v["services"].as_object() {
        for (name, s) in services {
            if let Some(stable) = s["stable"].as_str() {
                record.insert(
                    name.clone(),
                    Promoted {
                        stable: stable.to_owned(),
                        previous: s["previous"].as_str().map(str::to_owned),
                    },
                );
            }
        }
    }
    Ok(Some(record))
}

/// Writes the record (mode 0600, replaced whole).
pub fn write_record(state_dir: &Path, record: &Record) -> Result<(), StoreError> {
    let services: serde_json::Map<String, serde_json::Value> = record
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                json!({ "stable": p.stable, "previous": p.previous }),
            )
        })
        .collect();
    let text = json!({
        "about": "the versions cutover last made stable; kept beside state.db so that a lost database is noticed",
        "services": services,
    });
    crate::write_private(&record_path(state_dir), format!("{text:#}\n").as_bytes())?;
    Ok(())
}

/// `a, b` as `web v2, api v5`, for messages.
pub fn describe(record: &Record) -> String {
    if record.is_empty() {
        return "no service yet".into();
    }
    record
        .iter()
        .map(|(name, p)| format!("{name} {}", p.stable))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Moves the database (with its WAL and shared-memory files) aside as
/// `state.db.<why>-<unix ms>`, keeping it for inspection; returns the new name, or `None` when
/// there was nothing to move.
pub fn set_aside(state_dir: &Path, why: &str) -> Result<Option<PathBuf>, StoreError> {
    let db = db_path(state_dir);
    if !db.exists() {
        return Ok(None);
    }
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let aside = state_dir.join(format!("{DB_FILE}.{why}-{ms}"));
    std::fs::rename(&db, &aside)?;
    for ext in ["-wal", "-shm"] {
        let from = state_dir.join(format!("{DB_FILE}{ext}"));
        if from.exists() {
            std::fs::rename(&from, state_dir.join(format!("{DB_FILE}.{why}-{ms}{ext}")))?;
        }
    }
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ServiceRow, Store};

    fn v2(dir: &Path) {
        let mut s = Store::open(dir).unwrap();
        s.upsert_service(&ServiceRow {
            name: "web".into(),
            stable_version: "v2".into(),
            stable_env: BTreeMap::new(),
            previous_version: Some("v1".into()),
            previous_env: BTreeMap::new(),
        })
        .unwrap();
        s.save_record().unwrap();
    }

    #[test]
    fn fresh_sound_lost_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check(dir.path()).unwrap(), StateCheck::Fresh);
        v2(dir.path());
        assert_eq!(check(dir.path()).unwrap(), StateCheck::Sound);
        let lost = StateCheck::Lost {
            record: Record::from([(
                "web".to_owned(),
                Promoted {
                    stable: "v2".into(),
                    previous: Some("v1".into()),
                },
            )]),
        };
        // A 0-byte database is no database.
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.path().join(format!("state.db{ext}")));
        }
        std::fs::write(dir.path().join("state.db"), b"").unwrap();
        assert_eq!(check(dir.path()).unwrap(), lost);
        std::fs::remove_file(dir.path().join("state.db")).unwrap();
        assert_eq!(check(dir.path()).unwrap(), lost);
        assert_eq!(
            describe(&read_record(dir.path()).unwrap().unwrap()),
            "web v2"
        );
    }

    #[test]
    fn a_damaged_database_is_found_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        v2(dir.path());
        {
            // Enough rows for several pages, then checkpointed into the main file.
            let s = Store::open(dir.path()).unwrap();
            s.conn
                .execute_batch(
                    "CREATE TABLE filler (x TEXT);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                     INSERT INTO filler SELECT hex(randomblob(100)) FROM n;
                     PRAGMA wal_checkpoint(TRUNCATE);",
                )
                .unwrap();
        }
        let db = db_path(dir.path());
        let mut bytes = std::fs::read(&db).unwrap();
        // Garbage over a page in the middle of the file (page size 4096): one of the filler
        // table's b-tree pages, header included.
        let page = bytes.len() / 4096 / 2;
        for b in &mut bytes[page * 4096..(page + 1) * 4096] {
            *b = 0x5a;
        }
        std::fs::write(&db, &bytes).unwrap();
        match check(dir.path()).unwrap() {
            StateCheck::Damaged { detail } => assert!(!detail.is_empty()),
            other => panic!("not found damaged: {other:?}"),
        }
        let aside = set_aside(dir.path(), "damaged").unwrap().unwrap();
        assert!(aside.exists() && !db.exists());
        assert!(matches!(
            check(dir.path()).unwrap(),
            StateCheck::Lost { .. }
        ));
        // Not a database at all.
        std::fs::write(&db, b"this is not sqlite, just text of some length").unwrap();
        assert!(matches!(
            check(dir.path()).unwrap(),
            StateCheck::Damaged { .. }
        ));
    }
}
