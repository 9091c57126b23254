//! SQLite through its online backup API, both ways (blocking; callers use `spawn_blocking`).
//!
//! A backup copies the live database page by page in one step, under a read lock, so it is a
//! consistent snapshot even while the app writes (in WAL mode writers are not even paused).
//! A restore goes back through the same API *into the live file*: the running app keeps its
//! connections and sees the restored content on its next read, and nothing is ever swapped
//! under it (which would leave it writing to a deleted file). Both wait for a lock the app
//! holds, up to the timeout, then give up without having changed anything: each is one step,
//! one transaction on the destination.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

/// How long to wait between two tries while the other side holds a lock.
const RETRY: Duration = Duration::from_millis(50);

fn open_existing(path: &Path, flags: OpenFlags) -> Result<Connection, String> {
    if !path.exists() {
        return Err(format!(
            "the SQLite database {} does not exist",
            path.display()
        ));
    }
    Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| format!("cannot open the SQLite database {}: {e}", path.display()))
}

/// Copies `from` into `to` in one backup step, retrying while either is locked.
fn copy(
    from: &Connection,
    to: &mut Connection,
    timeout: Duration,
    locked: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let b = Backup::new(from, to).map_err(|e| format!("cannot start the backup: {e}"))?;
    loop {
        match b.step(-1) {
            Ok(StepResult::Done) => return Ok(()),
            Ok(StepResult::More) => {}
            Ok(StepResult::Busy | StepResult::Locked) => {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "{locked} stayed locked by another connection (the running app?) for {}; nothing was changed",
                        crate::command::secs(timeout)
                    ));
                }
                std::thread::sleep(RETRY);
            }
            // A step result added by a later rusqlite: try again, bounded by the deadline.
            Ok(_) => {
                if Instant::now() >= deadline {
                    return Err("the backup made no progress".into());
                }
                std::thread::sleep(RETRY);
            }
            Err(e) => return Err(format!("the backup step failed: {e}")),
        }
    }
}

/// Backs the live database `live` up into the new file `dest`.
pub fn backup(live: &Path, dest: &Path, timeout: Duration) -> Result<(), String> {
    let src = open_existing(live, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut dst =
        Connection::open(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    copy(
        &src,
        &mut dst,
        timeout,
        &format!("the SQLite database {}", live.display()),
    )?;
    // The copy is a file of its own now: one file, no -wal beside it.
    dst.execute_batch("PRAGMA journal_mode=DELETE")
        .map_err(|e| format!("cannot finish {}: {e}", dest.display()))?;
    Ok(())
}

/// Restores `file` into the live database `live`, through the backup API.
pub fn restore(file: &Path, live: &Path, timeout: Duration) -> Result<(), String> {
    let src = open_existing(file, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut dst = open_existing(live, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    copy(
        &src,
        &mut dst,
        timeout,
        &format!("the SQLite database {}", live.display()),
    )
}

/// Rows per table of the database at `path` (read-only).
pub fn row_counts(path: &Path) -> Result<BTreeMap<String, u64>, String> {
    let c = open_existing(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    counts(&c)
}

fn counts(c: &Connection) -> Result<BTreeMap<String, u64>, String> {
    let names: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| format!("cannot list the tables: {e}"))?;
    let mut out = BTreeMap::new();
    for n in names {
        let q = format!("SELECT count(*) FROM \"{}\"", n.replace('"', "\"\""));
        let count: i64 = c
            .query_row(&q, [], |r| r.get(0))
            .map_err(|e| format!("cannot count the rows of {n}: {e}"))?;
        out.insert(n, u64::try_from(count).unwrap_or(0));
    }
    Ok(out)
}

/// Verifies the backup `file`: copies it into a scratch file in `scratch_dir` (so the backup
/// itself is never opened for writing), runs `PRAGMA integrity_check` and counts the rows
/// of every table.
pub fn verify(file: &Path, scratch_dir: &Path) -> Result<BTreeMap<String, u64>, String> {
    let scratch = scratch_dir.join(format!(".verify-{}.sqlite3", std::process::id()));
    std::fs::copy(file, &scratch)
        .map_err(|e| format!("cannot copy {} to a scratch file: {e}", file.display()))?;
    let result = (|| {
        let c = Connection::open(&scratch)
            .map_err(|e| format!("the backup does not open as a SQLite database: {e}"))?;
        let check: Vec<String> = c
            .prepare("PRAGMA integrity_check")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| format!("PRAGMA integrity_check failed: {e}"))?;
        if check != ["ok"] {
            return Err(format!(
                "PRAGMA integrity_check found damage: {}",
                check.into_iter().take(5).collect::<Vec<_>>().join("; ")
            ));
        }
        counts(&c)
    })();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", scratch.display()));
    }
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn db(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT);",
        )
        .unwrap();
        for i in 0..rows {
            c.execute(
                "INSERT INTO items (name) VALUES (?1)",
                [format!("item {i}")],
            )
            .unwrap();
        }
        c
    }

    #[test]
    fn backup_verify_and_restore_into_a_live_database_with_an_open_connection() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("shop.db");
        let app = db(&live, 100);
        let copy = dir.path().join("b.sqlite3");
        backup(&live, &copy, Duration::from_secs(5)).unwrap();
        assert_eq!(verify(&copy, dir.path()).unwrap()["items"], 100);
        // A migration adds a column and a table and deletes rows, through the app's own
        // connection, which stays open throughout.
        app.execute_batch(
            "ALTER TABLE items ADD COLUMN price INTEGER; CREATE TABLE extra (x); DELETE FROM items WHERE id > 10;",
        )
        .unwrap();
        restore(&copy, &live, Duration::from_secs(5)).unwrap();
        // The app's open connection sees the restored content.
        let n: i64 = app
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        let cols: i64 = app
            .query_row(
                "SELECT count(*) FROM pragma_table_info('items') WHERE name = 'price'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cols, 0, "the added column is gone");
        assert_eq!(
            row_counts(&live).unwrap().keys().collect::<Vec<_>>(),
            vec!["items"]
        );
        // And it can go on writing.
        app.execute("INSERT INTO items (name) VALUES ('after')", [])
            .unwrap();
    }

    #[test]
    fn a_lock_held_by_the_app_makes_the_restore_give_up_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("shop.db");
        let app = db(&live, 5);
        let copy = dir.path().join("b.sqlite3");
        backup(&live, &copy, Duration::from_secs(5)).unwrap();
        app.execute_batch("BEGIN IMMEDIATE; INSERT INTO items (name) VALUES ('x');")
            .unwrap();
        let e = restore(&copy, &live, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("stayed locked by another connection"), "{e}");
        app.execute_batch("COMMIT").unwrap();
        assert_eq!(row_counts(&live).unwrap()["items"], 6, "nothing changed");
    }

    #[test]
    fn missing_and_damaged_files_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = backup(
            &dir.path().join("nope.db"),
            &dir.path().join("b"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let junk = dir.path().join("junk.sqlite3");
        std::fs::write(&junk, vec![7u8; 8192]).unwrap();
        let e = verify(&junk, dir.path()).unwrap_err();
        assert!(!e.is_empty());
    }
}
