//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary directory, `pg_ctl
//! start` on a loopback port the OS picked, stopped and deleted when dropped.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to an
//! unprivileged user (`postgres` if there is one, else `nobody`) and its programs run through
//! `runuser`. The server programs are Debian's (`/usr/lib/postgresql/*/bin`, the newest), or
//! those in `PATH`; without them this panics saying how to install them (`.ci/run` does).
//! Not an API: tests of this crate and of the binary use it.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; dropping it stops it (immediately) and deletes its files.
pub struct PgCluster {
    pub port: u16,
    pub bin: PathBuf,
    dir: tempfile::TempDir,
    /// The unprivileged user it runs as, when the tests run as root.
    user: Option<String>,
}

fn find_bin() -> PathBuf {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    majors.sort_unstable();
    if let Some(d) = majors
        .iter()
        .rev()
        .map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin")))
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    {
        return d;
    }
    let which = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match which {
        Some(p) if !p.is_empty() => Path::new(&p).parent().unwrap().to_owned(),
        _ => panic!(
            "PostgreSQL's server programs (initdb, pg_ctl) are not installed; the database tests need them: run `bash .ci/run`, or `apt-get install postgresql`"
        ),
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .output()
        .is_ok_and(|o| o.status.success())
}

impl PgCluster {
    /// Starts a new cluster whose superuser is `cutover` (no password, loopback only).
    pub fn start() -> PgCluster {
        let bin = find_bin();
        let dir = tempfile::Builder::new()
            .prefix("cutover-pg-")
            .tempdir()
            .unwrap();
        let user = is_root().then(|| {
            if user_exists("postgres") {
                "postgres".to_owned()
            } else {
                "nobody".to_owned()
            }
        });
        if let Some(u) = &user {
            let ok = Command::new("chown")
                .args([u.as_str(), &dir.path().display().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot give {} to {u}", dir.path().display());
        }
        // The OS picks the port; it is free again for the server a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = PgCluster {
            port,
            bin,
            dir,
            user,
        };
        let data = c.dir.path().join("data");
        c.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                "cutover",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        c.run(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-l",
                &c.dir.path().join("log").display().to_string(),
                "-o",
                &format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
                    c.dir.path().display()
                ),
                "-w",
                "start",
            ],
        );
        c
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// `postgres://cutover@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://cutover@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` with psql on `db`; its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(db))
            .args(["-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates database `db`.
    pub fn create_db(&self, db: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\""));
    }

    /// Rows per table of `db` and its columns, as one comparable text.
    pub fn fingerprint(&self, db: &str) -> String {
        self.psql(
            db,
            "SELECT string_agg(t, ' | ' ORDER BY t) FROM ( \
               SELECT c.table_name || '(' || string_agg(c.column_name, ',' ORDER BY c.ordinal_position) || ')=' || \
               (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', c.table_schema, c.table_name), false, true, '')))[1]::text AS t \
               FROM information_schema.columns c JOIN information_schema.tables tb \
               ON tb.table_schema = c.table_schema AND tb.table_name = c.table_name AND tb.table_type = 'BASE TABLE' \
               WHERE c.table_schema = 'public' GROUP BY c.table_schema, c.table_name) s",
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data.display().to_string(), "-m", "immediate", "stop"])
            .output();
    }
}
