//! Data-driven tests of `[services.X.hooks]`, `[[services.X.smoke]]`, `[services.X.database]`
//! and `[backups]` (docs/reference.md §10): what they resolve to, and every mistake's exact diagnostic.

use std::path::Path;
use std::time::Duration;

use cutover_core::{DbKind, DbLocation, DbRollback, Keep};

use super::*;

const WEB: &str = "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n";

fn web(rest: &str) -> String {
    format!("{WEB}{rest}")
}

fn errors(text: &str) -> String {
    parse(text, Path::new("/srv/shop/cutover.toml"))
        .expect_err("should not parse")
        .to_string()
}

#[test]
fn the_contract_example_parses_with_its_values() {
    let text = web(r#"
[services.web.hooks]
pre_deploy   = ["./ci/gate.sh"]
pre_traffic  = ["./smoke.sh"]
post_promote = ["./notify.sh"]
on_rollback  = ["./page.sh"]
timeout = "2m"

[[services.web.smoke]]
path = "/api/menu"
method = "GET"
status = 200
body_contains = "menu"
headers = { Accept = "application/json" }

[[services.web.smoke]]
path = "/healthz"

[services.web.database]
kind = "postgres"
url_env = "DATABASE_URL"
backup_before_deploy = true
migrate = ["./shop", "migrate"]
on_rollback = "keep"

[backups]
dir = ".cutover/backups"
keep = { last = 3, hourly = 24, daily = 7, weekly = 4, monthly = 12 }
every = "1h"
"#);
    let s = parse(&text, Path::new("/srv/shop/cutover.toml")).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let w = s.service("web").unwrap();
    let h = &w.safety.hooks;
    assert_eq!(h.pre_deploy, vec![vec!["/srv/shop/ci/gate.sh".to_owned()]]);
    assert_eq!(h.pre_traffic, vec![vec!["/srv/shop/smoke.sh".to_owned()]]);
    assert_eq!(h.post_promote.len(), 1);
    assert_eq!(h.on_rollback.len(), 1);
    assert_eq!(h.timeout, Duration::from_secs(120));
    assert_eq!(w.safety.smoke.len(), 2);
    let menu = &w.safety.smoke[0];
    assert_eq!(menu.status, Some(200));
    assert_eq!(menu.body_contains.as_deref(), Some("menu"));
    assert_eq!(
        menu.headers,
        vec![("Accept".to_owned(), "application/json".to_owned())]
    );
    let health = &w.safety.smoke[1];
    assert_eq!((health.method.as_str(), health.status), ("GET", None));
    assert_eq!(health.timeout, Duration::from_secs(10));
    let db = w.safety.database.as_ref().unwrap();
    assert_eq!(db.kind, DbKind::Postgres);
    assert_eq!(db.location, DbLocation::UrlEnv("DATABASE_URL".into()));
    assert_eq!(db.migrate.as_ref().unwrap()[0], "/srv/shop/shop");
    assert_eq!(db.on_rollback, DbRollback::Keep);
    assert_eq!(db.timeout, Duration::from_secs(1800));
    let steps = w.rollout.steps;
    assert!(steps.pre_deploy && steps.backup && steps.migrate && steps.smoke);
    assert!(steps.post_promote && steps.on_rollback_hooks && !steps.migrate_down);
    assert_eq!(s.backups.dir, Path::new("/srv/shop/.cutover/backups"));
    assert_eq!(
        s.backups.keep,
        Keep {
            last: 3,
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 12,
            yearly: 0
        }
    );
    assert_eq!(s.backups.every, Some(Duration::from_secs(3600)));
    assert!(s.backups.verify);
}

#[test]
fn nothing_configured_means_no_steps_and_default_backups() {
    let s = parse(WEB, Path::new("/srv/shop/cutover.toml")).unwrap();
    let w = s.service("web").unwrap();
    assert!(!w.rollout.steps.any());
    assert_eq!(w.safety, cutover_core::SafetySpec::default());
    assert_eq!(s.backups.dir, Path::new("/srv/shop/.cutover/backups"));
    assert_eq!(s.backups.every, None);
    assert_eq!(s.backups.keep, Keep::default());
}

#[test]
fn hooks_take_one_command_or_several_and_sqlite_a_path() {
    let text = web(r#"
[services.web.hooks]
pre_deploy = [["./a.sh", "--x"], ["python3", "b.py"]]

[services.web.database]
kind = "sqlite"
path = "data/shop.db"
migrate = ["python3", "migrate.py"]
on_rollback = "down"
migrate_down = ["python3", "migrate.py", "down"]
"#);
    let s = parse(&text, Path::new("/srv/shop/cutover.toml")).unwrap();
    let w = s.service("web").unwrap();
    assert_eq!(
        w.safety.hooks.pre_deploy,
        vec![
            vec!["/srv/shop/a.sh".to_owned(), "--x".to_owned()],
            vec!["python3".to_owned(), "b.py".to_owned()]
        ]
    );
    let db = w.safety.database.as_ref().unwrap();
    assert_eq!(
        db.location,
        DbLocation::Path("/srv/shop/data/shop.db".into())
    );
    assert_eq!(db.on_rollback, DbRollback::Down);
    assert!(w.rollout.steps.migrate_down);
}

#[test]
fn warnings_for_a_password_in_the_file_and_a_migration_without_backup() {
    let text = web(r#"
[services.web.database]
kind = "postgres"
url = "postgres://shop:hunter2@db:5432/shop"
backup_before_deploy = false
migrate = ["./shop", "migrate"]
"#);
    let s = parse(&text, Path::new("cutover.toml")).unwrap();
    let w: Vec<String> = s.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("services.web.database.url: holds a password"),
        "{w:?}"
    );
    assert!(!w[0].contains("hunter2"), "{w:?}");
    assert!(
        w[1].contains("backup_before_deploy: is false while migrate is set"),
        "{w:?}"
    );
}

#[test]
fn mistakes_name_their_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            web("[services.web.database]\nurl_env = \"DB\"\n"),
            "/srv/shop/cutover.toml:4:1: services.web.database.kind: is required: \"postgres\" or \"sqlite\"",
        ),
        (
            web("[services.web.database]\nkind = \"mysql\"\n"),
            "/srv/shop/cutover.toml:5:8: services.web.database.kind: \"mysql\" is not \"postgres\" or \"sqlite\"",
        ),
        (
            web("[services.web.database]\nkind = \"sqlite\"\nurl = \"x\"\n"),
            "/srv/shop/cutover.toml:4:1: services.web.database.path: is required for SQLite: the database file, e.g. \"data/shop.db\"\n/srv/shop/cutover.toml:6:7: services.web.database.url: is for PostgreSQL; SQLite takes path = \"data/app.db\"",
        ),
        (
            web("[services.web.database]\nkind = \"postgres\"\npath = \"x.db\"\n"),
            "/srv/shop/cutover.toml:6:8: services.web.database.path: is for SQLite; PostgreSQL takes url or url_env",
        ),
        (
            web("[services.web.database]\nkind = \"postgres\"\nurl = \"mysql://u:secret@h/d\"\n"),
            "/srv/shop/cutover.toml:6:7: services.web.database.url: must be a postgres:// URL (the value is not repeated here: it may hold a password)",
        ),
        (
            web("[services.web.database]\nkind = \"postgres\"\non_rollback = \"down\"\n"),
            "/srv/shop/cutover.toml:6:15: services.web.database.on_rollback: \"down\" runs migrate_down, which is not set; add migrate_down = [\"./app\", \"migrate\", \"down\"]",
        ),
        (
            web(
                "[services.web.database]\nkind = \"postgres\"\non_rollback = \"restore\"\nbackup_before_deploy = false\n",
            ),
            "/srv/shop/cutover.toml:6:15: services.web.database.on_rollback: \"restore\" restores the backup taken before the deploy, but backup_before_deploy = false takes none",
        ),
        (
            web("[services.web.database]\nkind = \"postgres\"\non_rollback = \"undo\"\n"),
            "/srv/shop/cutover.toml:6:15: services.web.database.on_rollback: \"undo\" is not one of \"keep\", \"restore\", \"down\"",
        ),
        (
            web("[services.web.database]\nkind = \"postgres\"\nmigrate_down = [\"./down\"]\n"),
            "/srv/shop/cutover.toml:6:16: services.web.database.migrate_down: runs only with on_rollback = \"down\"; set that, or remove migrate_down",
        ),
        (
            web("[services.web.database]\nkind = \"postgres\"\nmigrate = []\n"),
            "/srv/shop/cutover.toml:6:11: services.web.database.migrate: must name a program to run, e.g. [\"./ci/gate.sh\"]",
        ),
        (
            web("[services.web.hooks]\npre_deploy = [\"./a.sh\", [\"./b.sh\"]]\n"),
            "/srv/shop/cutover.toml:5:15: services.web.hooks.pre_deploy[0]: mixes strings and arrays: write one command as [\"./a.sh\", \"arg\"] or several as [[\"./a.sh\"], [\"./b.sh\"]]",
        ),
        (
            web("[services.web.hooks]\non_rollback = [\"\"]\ntimeout = \"0s\"\n"),
            "/srv/shop/cutover.toml:5:15: services.web.hooks.on_rollback: must name a program to run, e.g. [\"./ci/gate.sh\"]\n/srv/shop/cutover.toml:6:11: services.web.hooks.timeout: must be longer than 0",
        ),
        (
            web("[services.web.hooks]\npre_deploy = \"./gate.sh\"\n"),
            "/srv/shop/cutover.toml:5:14: services.web.hooks.pre_deploy: invalid type: string \"./gate.sh\", expected an array",
        ),
        (
            web("[services.web.hooks]\npre_merge = [\"x\"]\n"),
            "/srv/shop/cutover.toml:5:1: services.web.hooks.pre_merge: unknown key `pre_merge`; allowed keys: `pre_deploy`, `pre_traffic`, `post_promote`, `on_rollback`, `timeout`",
        ),
        (
            web("[[services.web.smoke]]\nmethod = \"GET\"\n"),
            "/srv/shop/cutover.toml:4:1: services.web.smoke[0].path: is required: the path to ask the candidate for, e.g. \"/healthz\"",
        ),
        (
            web("[[services.web.smoke]]\npath = \"api\"\nmethod = \"FETCH\"\nstatus = 42\n"),
            "/srv/shop/cutover.toml:5:8: services.web.smoke[0].path: \"api\" must start with '/'",
        ),
        (
            web(
                "[[services.web.smoke]]\npath = \"/api\"\nmethod = \"FETCH\"\nstatus = 42\nheaders = { \"Bad Name\" = \"x\" }\n",
            ),
            "/srv/shop/cutover.toml:6:10: services.web.smoke[0].method: \"FETCH\" is not one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS\n/srv/shop/cutover.toml:7:10: services.web.smoke[0].status: 42 is not an HTTP status (100-599)\n/srv/shop/cutover.toml:8:11: services.web.smoke[0].headers: \"Bad Name\" is not a header name",
        ),
        (
            web("[backups]\nkeep = { last = 0 }\nevery = \"soon\"\n"),
            "/srv/shop/cutover.toml:5:8: backups.keep: keeps nothing; set at least one of last, hourly, daily, weekly, monthly, yearly above 0\n/srv/shop/cutover.toml:6:9: backups.every: \"soon\" is not a duration like \"250ms\", \"10s\" or \"5m\" (expected number at 0)",
        ),
        (
            web("[backups]\nkeep = { daily = -1, fortnightly = 2 }\n"),
            "/srv/shop/cutover.toml:5:22: backups.keep.fortnightly: unknown key `fortnightly`; allowed keys: `last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(errors(&text), want, "for config:\n{text}");
    }
}
