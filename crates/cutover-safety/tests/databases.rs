//! Backups, restores and verification against real databases: a throwaway PostgreSQL cluster
//! (`testing::PgCluster`) and SQLite files, no mocks.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_core::{DatabaseSpec, DbKind, DbLocation, DbRollback, Keep};
use cutover_safety::testing::PgCluster;
use cutover_safety::{Catalog, Db, Meta, OpError, Reason, target};

fn pg_db(
    cluster: &PgCluster,
    db: &str,
    catalog: &Catalog,
    bin_dir: Option<std::path::PathBuf>,
) -> Db {
    let spec = DatabaseSpec {
        kind: DbKind::Postgres,
        location: DbLocation::Url(cluster.url(db)),
        backup_before_deploy: true,
        migrate: None,
        on_rollback: DbRollback::Keep,
        migrate_down: None,
        timeout: Duration::from_secs(60),
        bin_dir,
    };
    Db {
        service: "shop".into(),
        target: target::resolve(&spec, &BTreeMap::new()).unwrap(),
        catalog: catalog.clone(),
        timeout: Duration::from_secs(60),
        env: BTreeMap::new(),
        groups: None,
    }
}

#[tokio::test]
async fn postgres_backup_migrate_restore_verify() {
    let pg = PgCluster::start();
    pg.create_db("shop");
    pg.psql(
        "shop",
        "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL); \
         INSERT INTO items (name) SELECT 'item ' || g FROM generate_series(1, 1000) g; \
         CREATE TABLE orders (id serial PRIMARY KEY, item int REFERENCES items(id)); \
         INSERT INTO orders (item) SELECT g FROM generate_series(1, 50) g;",
    );
    let before = pg.fingerprint("shop");
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::new(dir.path());
    let db = pg_db(&pg, "shop", &catalog, None);

    let m = db
        .backup(Meta {
            reason: Some(Reason::BeforeDeploy),
            version: Some("v1".into()),
            rollout_id: Some(7),
            pinned: true,
        })
        .await
        .unwrap();
    assert_eq!(m.kind, "postgres");
    assert_eq!(m.sha256.len(), 64);
    assert!(m.bytes > 1000);
    assert!(m.tool.contains("pg_dump (PostgreSQL)"), "{}", m.tool);
    assert_eq!(m.database, pg.url("shop"));
    assert!(catalog.file_of(&m).exists());

    // A migration that adds a column, a table, a view and deletes rows; then restore.
    pg.psql(
        "shop",
        "ALTER TABLE items ADD COLUMN price int DEFAULT 3; \
         CREATE TABLE coupons (id serial PRIMARY KEY, item int REFERENCES items(id)); \
         CREATE VIEW cheap AS SELECT * FROM items WHERE price < 5; \
         DELETE FROM orders WHERE id > 10;",
    );
    assert_ne!(pg.fingerprint("shop"), before);
    let (_, detail) = db.restore(&m.id).await.unwrap();
    assert!(detail.contains("public.coupons"), "{detail}");
    assert_eq!(
        pg.fingerprint("shop"),
        before,
        "the database equals the backup"
    );
    assert_eq!(
        pg.psql(
            "shop",
            "SELECT count(*) FROM pg_views WHERE viewname = 'cheap'"
        ),
        "0"
    );
    // The sequence is where it was: new rows do not collide.
    pg.psql("shop", "INSERT INTO items (name) VALUES ('new')");

    // Verify: restored into a scratch database (then dropped), row counts recorded.
    let (m2, v) = db.verify(&m.id).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.tables["public.items"], 1000);
    assert_eq!(v.tables["public.orders"], 50);
    assert_eq!(m2.verified(), Some(true));
    assert_eq!(catalog.get("shop", &m.id).unwrap().verifications.len(), 1);
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'cutover_verify_%'"
        ),
        "0",
        "the scratch database is gone"
    );

    // A changed file is refused by restore (naming it) and fails verification; the
    // database is untouched.
    let f = catalog.file_of(&m);
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let fp = pg.fingerprint("shop");
    let e = db.restore(&m.id).await.unwrap_err().to_string();
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(e.contains(&m.file), "{e}");
    assert_eq!(pg.fingerprint("shop"), fp);
    let (_, v) = db.verify(&m.id).await.unwrap();
    assert!(!v.ok);

    // While another holds the service's lock, a restore waits, then says who.
    let held = catalog.try_lock("shop", "backup create (a test)").unwrap();
    let mut short = db.clone();
    short.timeout = Duration::from_millis(300);
    let e = short.restore(&m.id).await.unwrap_err();
    assert!(
        matches!(&e, OpError::Busy(m) if m.contains("backup create (a test)")),
        "{e}"
    );
    drop(held);
}

#[tokio::test]
async fn postgres_failures_are_one_clear_sentence_and_leave_nothing_behind() {
    let pg = PgCluster::start();
    pg.create_db("shop");
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::new(dir.path());

    // Nothing listens there.
    let mut wrong = pg_db(&pg, "shop", &catalog, None);
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = DatabaseSpec {
        kind: DbKind::Postgres,
        location: DbLocation::Url(format!("postgres://cutover:hunter2@127.0.0.1:{free}/shop")),
        backup_before_deploy: true,
        migrate: None,
        on_rollback: DbRollback::Keep,
        migrate_down: None,
        timeout: Duration::from_secs(60),
        bin_dir: None,
    };
    wrong.target = target::resolve(&spec, &BTreeMap::new()).unwrap();
    let e = wrong.backup(Meta::default()).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "cannot reach postgres://cutover@127.0.0.1:{free}/shop"
        )),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "never the password: {e}");
    assert!(catalog.list(None).unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(catalog.service_dir("shop"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().starts_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Tools of another major version than the server's are refused up front.
    let fake = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(pg.bin.join("psql"), fake.path().join("psql")).unwrap();
    let dump = fake.path().join("pg_dump");
    std::fs::write(&dump, "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n").unwrap();
    std::fs::set_permissions(&dump, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let old = pg_db(&pg, "shop", &catalog, Some(fake.path().to_owned()));
    let e = old.backup(Meta::default()).await.unwrap_err().to_string();
    assert!(e.contains("is PostgreSQL 906 but the server at"), "{e}");
    assert!(e.contains("postgresql-client-"), "{e}");

    // pg_dump missing.
    std::fs::remove_file(&dump).unwrap();
    let e = old.backup(Meta::default()).await.unwrap_err().to_string();
    assert!(e.contains("pg_dump not found"), "{e}");
    assert!(e.contains("install PostgreSQL's client tools"), "{e}");

    // The disk fills up while the backup is written (a file size limit makes every write
    // past 512 bytes fail as a full disk would): the partial file is removed, nothing is
    // recorded.
    pg.psql(
        "shop",
        "CREATE TABLE big AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 1000) g",
    );
    std::fs::write(
        &dump,
        format!(
            "#!/bin/sh\ntrap '' XFSZ\nulimit -f 1\nexec {} \"$@\"\n",
            pg.bin.join("pg_dump").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&dump, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let e = old.backup(Meta::default()).await.unwrap_err().to_string();
    // pg_dump itself exits 0 over the cut-short file; reading it back catches it.
    assert!(e.contains("does not read back (is the disk full?)"), "{e}");
    assert!(e.contains("the partial backup was removed"), "{e}");
    assert!(catalog.list(None).unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(catalog.service_dir("shop"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().starts_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn sqlite_backups_and_prune_to_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("shop.db");
    let c = rusqlite::Connection::open(&live).unwrap();
    c.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY); INSERT INTO items DEFAULT VALUES;",
    )
    .unwrap();
    let catalog = Catalog::new(dir.path().join("backups"));
    let db = Db {
        service: "shop".into(),
        target: cutover_safety::Target::Sqlite { path: live.clone() },
        catalog: catalog.clone(),
        timeout: Duration::from_secs(10),
        env: BTreeMap::new(),
        groups: None,
    };
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(db.backup(Meta::default()).await.unwrap().id);
    }
    let (_, v) = db.verify(&ids[0]).await.unwrap();
    assert!(
        v.ok && v.detail.contains("PRAGMA integrity_check ok"),
        "{v:?}"
    );
    let keep = Keep {
        last: 1,
        hourly: 0,
        daily: 0,
        weekly: 0,
        monthly: 0,
        yearly: 0,
    };
    let tz = jiff::tz::TimeZone::UTC;
    let plan = cutover_safety::ops::prune(&catalog, "shop", &keep, &tz, false).unwrap();
    assert_eq!(
        plan.iter().filter(|(_, d)| d.keep()).count(),
        2,
        "the newest and the verified one"
    );
    assert_eq!(
        catalog.list(None).unwrap().len(),
        4,
        "a dry run deletes nothing"
    );
    cutover_safety::ops::prune(&catalog, "shop", &keep, &tz, true).unwrap();
    let left: Vec<String> = catalog
        .list(None)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, vec![ids[3].clone(), ids[0].clone()]);
}
