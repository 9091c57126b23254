//! Release safety end to end (CONTRACT §9): real daemons, a real SQLite app (Python) and a
//! real PostgreSQL cluster started for each test (`PgCluster`: initdb + pg_ctl on a loopback
//! port, as an unprivileged user when the tests run as root). No mocks of a database.
//!
//! The issue's list: (a) a migration that adds a column, then a good deploy promotes; (b) a
//! migration that fails half-way: the database is restored (row counts as before), the rollout
//! `failed`, no traffic moved; (c) a failing smoke check moves no traffic; (d) an analysis
//! rollback with `on_rollback = "restore"` leaves the database equal to the backup; (e) kill -9
//! during the migration, restart: it is never run twice. (f), the retention tables, are unit
//! tests in `cutover-safety`; `cutover backup …` is exercised here.

use std::path::Path;
use std::time::{Duration, Instant};

use cutover_safety::testing::PgCluster;

use crate::harness::{Daemon, Load, healthy, http, pid_alive, stderr, stdout, with_command, write};

/// The app: a JSON API over one SQLite connection it keeps for its whole life, so a restore
/// must reach it through the database, not by a reopen. `/api/menu` reads `price` when
/// `APP_USES_PRICE` is set (the version that needs the migration).
const APP: &str = r#"
import json, os, sqlite3, sys, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

VERSION = os.environ.get("CUTOVER_VERSION", "v?")
conn = sqlite3.connect(os.environ["APP_DB"], check_same_thread=False)
lock = threading.Lock()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.answer(200, {"ok": True})
        try:
            with lock:
                if self.path == "/api/menu":
                    cols = "name, price" if os.environ.get("APP_USES_PRICE") else "name"
                    rows = conn.execute(f"SELECT {cols} FROM items ORDER BY id").fetchall()
                    return self.answer(200, {"version": VERSION, "menu": [list(r) for r in rows]})
                n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
            return self.answer(200, {"version": VERSION, "items": n})
        except Exception as e:
            return self.answer(500, {"version": VERSION, "error": str(e)})

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// The app's migrations, chosen by the version being deployed; every run is logged.
const MIGRATE: &str = r#"
import os, sqlite3, sys
version = os.environ["CUTOVER_VERSION"]
with open("migrations.log", "a") as f:
    f.write(version + "\n")
c = sqlite3.connect(os.environ["DATABASE_PATH"])
if version.startswith("v2"):
    c.execute("ALTER TABLE items ADD COLUMN price INTEGER DEFAULT 5")
    c.commit()
    print("added items.price")
elif version.startswith("bad"):
    c.execute("DELETE FROM items WHERE id % 2 = 0")
    c.commit()
    print("step 1/2: removed duplicate items", flush=True)
    sys.exit("step 2/2 failed: UNIQUE constraint failed: items.name")
elif version.startswith("more"):
    c.executemany("INSERT INTO items (name) VALUES (?)", [("new %d" % i,) for i in range(25)])
    c.commit()
"#;

const GATE: &str =
    "#!/bin/sh\necho \"gate: $CUTOVER_SERVICE $CUTOVER_STABLE_VERSION -> $CUTOVER_VERSION\"\n";

const STEPS: &str = r#"[ { weight = 50, pause = "500ms", analysis = false }, { weight = 100 } ]"#;

fn sqlite_items(path: &Path, n: u32) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);",
    )
    .unwrap();
    for i in 0..n {
        c.execute(
            "INSERT INTO items (name) VALUES (?1)",
            [format!("item {i}")],
        )
        .unwrap();
    }
}

fn sqlite_count(path: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

/// A daemon running the SQLite app, with `extra` TOML (database, hooks, smoke, backups).
fn sqlite_daemon(extra: &str) -> Daemon {
    let mut d = Daemon::create(|t| {
        with_command(
            &t.replace("STEPS", STEPS),
            "command = [\"python3\", \"app.py\", \"{port}\"]\nenv = { APP_DB = \"shop.db\" }",
        ) + extra
    });
    let dir = d.dir.path().to_owned();
    write(&dir, "app.py", APP);
    write(&dir, "migrate.py", MIGRATE);
    let gate = write(&dir, "gate.sh", GATE);
    std::fs::set_permissions(&gate, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    sqlite_items(&dir.join("shop.db"), 100);
    d.spawn();
    d.wait_for("v1 healthy on 2 instances", |s| healthy(s, "v1") >= 2);
    d
}

const SQLITE_SAFETY: &str = r#"
[services.web.hooks]
pre_deploy = ["./gate.sh"]
timeout = "20s"

[[services.web.smoke]]
path = "/api/menu"
status = 200
body_contains = "menu"

[[services.web.smoke]]
path = "/healthz"

[services.web.database]
kind = "sqlite"
path = "shop.db"
migrate = ["python3", "migrate.py"]
on_rollback = "ON_ROLLBACK"
"#;

/// The newest rollout, from `history --json`.
fn last_rollout(d: &Daemon) -> serde_json::Value {
    let out = d.cli(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    h["rollouts"][0].clone()
}

fn event_kinds(d: &Daemon, id: i64) -> Vec<String> {
    crate::harness::rollout_events(d, id)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn deploy_wait(d: &Daemon, version: &str, env: &[&str]) -> std::process::Output {
    let mut args = vec!["deploy", "web", version, "--wait", "--timeout", "90s"];
    for e in env {
        args.extend(["--env", e]);
    }
    d.cli(&args)
}

/// (a) and (b) with the SQLite app: a migration adds a column and the version that needs it
/// is promoted; then a migration fails half-way and the database is restored under the live
/// app, which keeps serving (from the same connection) throughout.
#[test]
fn sqlite_migration_promotes_and_a_half_failed_one_is_restored_under_the_live_app() {
    let d = sqlite_daemon(&SQLITE_SAFETY.replace("ON_ROLLBACK", "keep"));
    let db = d.dir.path().join("shop.db");
    let load = Load::start(d.web, 2, Duration::from_millis(10));
    let out = deploy_wait(&d, "v2", &["APP_USES_PRICE=1"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(
        sqlite_count(
            &db,
            "SELECT count(*) FROM pragma_table_info('items') WHERE name = 'price'"
        ),
        1
    );
    let (status, body) = http(d.web, "GET", "/api/menu", None, "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"v2\"") && body.contains(", 5]"), "{body}");
    let r = last_rollout(&d);
    let kinds = event_kinds(&d, r["id"].as_i64().unwrap());
    for k in ["hook", "backup", "migrated", "smoke", "promoted"] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }

    let out = deploy_wait(&d, "bad3", &["APP_USES_PRICE=1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let tally = load.stop();
    let r = last_rollout(&d);
    assert_eq!(r["outcome"], "failed");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("the migration for bad3 failed"), "{reason}");
    assert!(
        reason.contains("UNIQUE constraint failed"),
        "the output's tail: {reason}"
    );
    assert!(
        reason.contains("database restored from backup web-"),
        "{reason}"
    );
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM items"),
        100,
        "rows as before"
    );
    let kinds = event_kinds(&d, r["id"].as_i64().unwrap());
    assert!(
        !kinds.iter().any(|k| k == "ready"),
        "no candidate started: {kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "restored"), "{kinds:?}");
    // No traffic ever went to bad3, and the stable version kept answering.
    assert!(!tally.per_version.contains_key("bad3"), "{tally:?}");
    assert_eq!(tally.errors_except("bad3"), 0, "{tally:?}");
    let s = d.status();
    assert_eq!(
        (s["stable"].as_str(), s["phase"].as_str()),
        (Some("v2"), Some("stable"))
    );
    // v2's instances kept their connection and see the restored rows.
    let (_, body) = http(d.web, "GET", "/", None, "");
    assert!(body.contains("\"items\": 100"), "{body}");
    let log = std::fs::read_to_string(d.dir.path().join("migrations.log")).unwrap();
    assert_eq!(log, "v2\nbad3\n", "each migration ran once");
}

/// (c) A smoke check fails against the candidate at 0%: failed, no traffic ever moved, and
/// with `on_rollback = "restore"` the migration's rows are undone.
#[test]
fn a_failing_smoke_check_moves_no_traffic_and_restores() {
    let d = sqlite_daemon(&SQLITE_SAFETY.replace("ON_ROLLBACK", "restore"));
    let db = d.dir.path().join("shop.db");
    let load = Load::start(d.web, 2, Duration::from_millis(10));
    // `more4` adds rows but not the column its app reads: /api/menu answers 500.
    let out = deploy_wait(&d, "more4", &["APP_USES_PRICE=1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let tally = load.stop();
    let r = last_rollout(&d);
    assert_eq!(r["outcome"], "failed");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("smoke check failed"), "{reason}");
    assert!(reason.contains("answered 500"), "{reason}");
    assert!(reason.contains("traffic never moved to more4"), "{reason}");
    assert!(reason.contains("database restored"), "{reason}");
    assert!(!tally.per_version.contains_key("more4"), "{tally:?}");
    assert_eq!(tally.errors_except("more4"), 0, "{tally:?}");
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM items"), 100);
    let kinds = event_kinds(&d, r["id"].as_i64().unwrap());
    assert!(kinds.iter().any(|k| k == "smoke-failed"), "{kinds:?}");
}

/// A PostgreSQL service: demo-app instances, migrations with psql on `$DATABASE_URL`.
fn pg_daemon(pg: &PgCluster, extra: &str, steps: &str) -> Daemon {
    let mut d = Daemon::create(|t| {
        let psql = pg.bin.join("psql");
        with_command(
            &t.replace("STEPS", steps),
            &format!(
                "command = [\"cutover\", \"demo-app\", \"--port\", \"{{port}}\", \"--version\", \"{{version}}\"]\nenv = {{ PSQL = \"{}\" }}",
                psql.display()
            ),
        ) + &extra.replace("PG_URL", &pg.url("shop"))
    });
    let dir = d.dir.path().to_owned();
    let migrate = write(
        &dir,
        "migrate.sh",
        r#"#!/bin/sh
set -e
echo "$CUTOVER_VERSION" >> runs.log
echo $$ > migrate.pid
q() { "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" -c "$1"; }
case "$CUTOVER_VERSION" in
  v2*) q "ALTER TABLE items ADD COLUMN price int DEFAULT 5" ;;
  v3*) q "ALTER TABLE items ADD COLUMN colour text"; q "INSERT INTO items (name) SELECT 'v3 ' || g FROM generate_series(1, 10) g" ;;
  bad*) q "DELETE FROM orders"; q "DELETE FROM items WHERE id > 500"; echo "step 2/3: index" >&2; q "CREATE UNIQUE INDEX ON items ((1))" ;;
  slow*) q "DELETE FROM orders"; q "DELETE FROM items WHERE id > 10"; sleep 60; q "ALTER TABLE items ADD COLUMN late int" ;;
esac
"#,
    );
    std::fs::set_permissions(
        &migrate,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d.spawn();
    d.wait_for("v1 healthy on 2 instances", |s| healthy(s, "v1") >= 2);
    d
}

fn pg_shop(pg: &PgCluster) {
    pg.create_db("shop");
    pg.psql(
        "shop",
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL); \
         INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 1000) g; \
         CREATE TABLE orders (id serial PRIMARY KEY, item int REFERENCES items(id)); \
         INSERT INTO orders (item) SELECT g FROM generate_series(1, 600) g;",
    );
}

const PG_SAFETY: &str = r#"
[[services.web.smoke]]
path = "/"
body_contains = "version"

[services.web.database]
kind = "postgres"
url = "PG_URL"
migrate = ["./migrate.sh"]
on_rollback = "ON_ROLLBACK"
timeout = "2m"
"#;

/// (a) and (b) with PostgreSQL: a migration adds a column and v2 is promoted; then one that
/// fails half-way is undone: the database equals what it was (columns and row counts), the
/// rollout failed and no traffic moved.
#[test]
fn postgres_migration_promotes_and_a_half_failed_one_is_restored() {
    let pg = PgCluster::start();
    pg_shop(&pg);
    let d = pg_daemon(&pg, &PG_SAFETY.replace("ON_ROLLBACK", "keep"), STEPS);
    let load = Load::start(d.web, 2, Duration::from_millis(10));
    let out = deploy_wait(&d, "v2", &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert_eq!(
        pg.psql("shop", "SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'price'"),
        "1"
    );
    let before = pg.fingerprint("shop");
    let out = deploy_wait(&d, "bad3", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let tally = load.stop();
    let r = last_rollout(&d);
    assert_eq!(r["outcome"], "failed");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("step 2/3: index"),
        "the output's tail: {reason}"
    );
    assert!(
        reason.contains("database restored from backup web-"),
        "{reason}"
    );
    assert_eq!(pg.fingerprint("shop"), before, "the database is as it was");
    assert!(!tally.per_version.contains_key("bad3"), "{tally:?}");
    assert_eq!(tally.errors_except("bad3"), 0, "{tally:?}");
    // The catalog has both backups, with who took them and why.
    let out = d.cli(&["backup", "list", "web", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{list:#}");
    assert_eq!(backups[0]["reason"], "before-deploy");
    assert_eq!(backups[0]["version"], "v2", "taken while v2 served");
    assert_eq!(
        backups[0]["pinned"], false,
        "unpinned once the rollout ended"
    );
    assert!(
        backups[0]["tool"]
            .as_str()
            .unwrap()
            .starts_with("pg_dump (PostgreSQL)")
    );
}

/// (d) Analysis rolls a bad canary back; `on_rollback = "restore"` puts the database back
/// to the backup taken before its migration.
#[test]
fn postgres_analysis_rollback_restores_the_backup() {
    let pg = PgCluster::start();
    pg_shop(&pg);
    let before = pg.fingerprint("shop");
    let steps = r#"[ { weight = 50, pause = "30s" }, { weight = 100 } ]"#;
    // The smoke check asks only for the health path: the bad version must get as far as
    // traffic, for analysis to judge it (a smoke check of `/` would already catch it).
    let safety = PG_SAFETY.replace("ON_ROLLBACK", "restore").replace(
        "path = \"/\"\nbody_contains = \"version\"",
        "path = \"/healthz\"",
    );
    let d = pg_daemon(&pg, &safety, steps);
    let load = Load::start(d.web, 4, Duration::from_millis(5));
    let out = deploy_wait(&d, "v3", &["DEMO_ERROR_RATE=0.2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    load.stop();
    let r = last_rollout(&d);
    assert_eq!(r["outcome"], "rolled-back");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("analysis failed"), "{reason}");
    assert!(
        reason.contains("writes made since it was taken"),
        "{reason}"
    );
    assert_eq!(
        pg.fingerprint("shop"),
        before,
        "the database equals the backup"
    );
    let kinds = event_kinds(&d, r["id"].as_i64().unwrap());
    let rolled = kinds.iter().position(|k| k == "rolled-back").unwrap();
    let restored = kinds.iter().position(|k| k == "restored").unwrap();
    assert!(
        rolled < restored,
        "traffic back first, then the restore: {kinds:?}"
    );
}

/// (e) The daemon is killed (SIGKILL) while the migration runs. The migration dies with it
/// (its keeper), and the restarted daemon never runs it again: it restores the backup and
/// fails the rollout, saying why.
#[test]
fn kill_9_during_the_migration_never_runs_it_twice() {
    let pg = PgCluster::start();
    pg_shop(&pg);
    let before = pg.fingerprint("shop");
    let mut d = pg_daemon(&pg, &PG_SAFETY.replace("ON_ROLLBACK", "keep"), STEPS);
    let out = d.cli(&["deploy", "web", "slow5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = d.dir.path().to_owned();
    let runs = dir.join("runs.log");
    d.wait_for("the migration running", |s| {
        s["phase"] == "migrating"
            && std::fs::read_to_string(&runs).is_ok_and(|r| r == "slow5\n")
            && pg.psql("shop", "SELECT count(*) FROM items") == "10"
    });
    let pid: u32 = std::fs::read_to_string(dir.join("migrate.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    d.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the migration outlived its daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.spawn();
    let s = d.wait_for("the rollout ended", |s| {
        s["phase"] == "stable" && healthy(s, "v1") >= 2
    });
    assert_eq!(s["stable"], "v1");
    let r = last_rollout(&d);
    assert_eq!(r["outcome"], "failed");
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("never run twice"), "{reason}");
    assert!(reason.contains("database restored from backup"), "{reason}");
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "slow5\n",
        "run once"
    );
    assert_eq!(pg.fingerprint("shop"), before);
}

/// `cutover backup …` without a daemon: create, list, verify, restore (only with --yes, and
/// never a changed file), prune to the policy; and the clear answers for mistakes.
#[test]
fn backup_verbs_work_without_a_daemon() {
    let extra = r#"
[services.web.database]
kind = "sqlite"
path = "shop.db"

[backups]
keep = { last = 1 }
"#;
    let d = Daemon::create(|t| t.replace("STEPS", STEPS) + extra);
    let db = d.dir.path().join("shop.db");
    sqlite_items(&db, 100);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = d.cli(&["backup", "create", "web", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(m["sha256"].as_str().unwrap().len(), 64);
        ids.push(m["id"].as_str().unwrap().to_owned());
    }
    // Verify the oldest: restored into a scratch copy, integrity_check, row counts.
    let out = d.cli(&["backup", "verify", "web", &ids[0]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("PRAGMA integrity_check ok"),
        "{}",
        stdout(&out)
    );
    let out = d.cli(&["backup", "list"]);
    let text = stdout(&out);
    assert!(text.contains(&ids[0]) && text.contains(" ok "), "{text}");
    // Prune keeps the newest (last = 1) and the only verified one.
    let out = d.cli(&["backup", "prune", "--dry-run"]);
    assert!(
        stdout(&out).contains("web: 2 kept, would delete 1"),
        "{}",
        stdout(&out)
    );
    let out = d.cli(&["backup", "prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["backup", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, vec![ids[2].as_str(), ids[0].as_str()]);
    // Restore needs --yes, then puts the rows back.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM items WHERE id > 7", [])
        .unwrap();
    let out = d.cli(&["backup", "restore", "web", &ids[2]]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("run again with --yes"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM items"), 7);
    let out = d.cli(&["backup", "restore", "web", &ids[2], "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM items"), 100);
    // A changed backup file is refused, naming it; the database is untouched.
    let file = d
        .dir
        .path()
        .join("state/backups/web")
        .join(format!("{}.sqlite3", ids[2]));
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let out = d.cli(&["backup", "restore", "web", &ids[2], "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("{}.sqlite3", ids[2])),
        "{}",
        stderr(&out)
    );
    // Mistakes: an unknown backup, a service without a database.
    let out = d.cli(&[
        "backup",
        "restore",
        "web",
        "web-19700101-000000-000",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = d.cli(&["backup", "create", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
