//! PostgreSQL with its own tools: `pg_dump --format=custom` to back up, `pg_restore --clean
//! --if-exists --single-transaction` to restore into the same database, `psql` for the few
//! queries (the server's version, the relations there are, row counts).
//!
//! The tools must be of the server's major version: a newer server refuses an older `pg_dump`,
//! and a dump made by a newer `pg_dump` may not restore into an older server. Unless
//! `database.bin_dir` says where they are, the ones under `/usr/lib/postgresql/<major>/bin`
//! (Debian's layout) are used for the server's major, else those in `PATH`; a mismatch is
//! refused up front with a sentence naming both versions.
//!
//! `pg_restore --clean` drops and recreates what the dump holds, so a column a migration added
//! to an existing table goes away with it; but a table (view, sequence) the migration created
//! is not in the dump, so it is dropped first, and the database then equals the backup.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::command::{self, Cmd, Ran};
use crate::target::PgUrl;

/// Where the tools are, with their major version.
#[derive(Clone, Debug)]
pub struct Tools {
    pub dir: Option<PathBuf>,
    pub major: u32,
    /// `pg_dump (PostgreSQL) 15.18`.
    pub version: String,
}

impl Tools {
    fn bin(&self, name: &str) -> String {
        match &self.dir {
            Some(d) => d.join(name).display().to_string(),
            None => name.to_owned(),
        }
    }
}

/// How a job runs the tools: where, with which extra environment, for how long.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub url: PgUrl,
    pub bin_dir: Option<PathBuf>,
    /// Extra environment for every tool (the daemon's marker).
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    pub groups: Option<command::Groups>,
}

impl Ctx {
    fn cmd(&self, argv: Vec<String>) -> Cmd {
        let mut c = Cmd::new(argv, self.timeout);
        c.groups = self.groups.clone();
        c.env = self.env.clone();
        c.env.extend(self.url.tool_env());
        c
    }

    fn fail(&self, what: &str, ran: &Ran) -> String {
        format!("{what} {}", ran.describe(self.timeout))
    }

    /// Runs one query on `dbname` with the `psql` program and returns its rows, fields split
    /// at tabs.
    async fn query(&self, psql: &str, dbname: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let mut c = self.cmd(vec![
            psql.to_owned(),
            "-X".into(),
            "-q".into(),
            "-A".into(),
            "-t".into(),
            "-F".into(),
            "\t".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-d".into(),
            self.url.for_tools(dbname),
            "-c".into(),
            sql.into(),
        ]);
        c.capture = true;
        let ran = command::run(&c).await;
        if !ran.ok() {
            return Err(self.fail("psql", &ran));
        }
        Ok(String::from_utf8_lossy(&ran.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect())
    }
}

/// `15` from `pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` or `psql (PostgreSQL) 9.6.2`.
pub fn major_of(version_line: &str) -> Option<u32> {
    let v = version_line
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut parts = v.split('.');
    let first: u32 = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    if first < 10 {
        // 9.6: the major is the first two parts, as 906 (what server_version_num / 100 gives).
        let second: u32 = parts.next()?.parse().ok()?;
        return Some(first * 100 + second);
    }
    Some(first)
}

/// Debian's directory of PostgreSQL `major`'s programs, if it is installed.
fn debian_dir(major: u32) -> Option<PathBuf> {
    let d = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    d.join("pg_dump").exists().then_some(d)
}

/// Any psql, to ask the server its version: the configured one, else the newest of Debian's,
/// else PATH's (a newer psql reads any older server).
fn any_psql(bin_dir: Option<&Path>) -> String {
    if let Some(d) = bin_dir {
        return d.join("psql").display().to_string();
    }
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    majors.sort_unstable();
    majors
        .into_iter()
        .rev()
        .map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/psql")))
        .find(|p| p.exists())
        .map_or_else(|| "psql".to_owned(), |p| p.display().to_string())
}

async fn tool_version(ctx: &Ctx, program: &str) -> Result<String, String> {
    let mut c = ctx.cmd(vec![program.to_owned(), "--version".into()]);
    c.capture = true;
    c.timeout = Duration::from_secs(10);
    let ran = command::run(&c).await;
    if !ran.ok() {
        return Err(match &ran.ending {
            command::Ending::NotStarted(why) => format!(
                "{why}; install PostgreSQL's client tools (Debian: postgresql-client) or set database.bin_dir"
            ),
            _ => ctx.fail(program, &ran),
        });
    }
    Ok(String::from_utf8_lossy(&ran.stdout).trim().to_owned())
}

/// The tools for the server behind `ctx`, checked against its major version.
pub async fn tools(ctx: &Ctx) -> Result<Tools, String> {
    let psql = any_psql(ctx.bin_dir.as_deref());
    let rows = ctx
        .query(&psql, ctx.url.dbname(), "SHOW server_version_num")
        .await
        .map_err(|e| format!("cannot reach {}: {e}", ctx.url.describe()))?;
    let server: u32 = rows
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("{} did not say its version", ctx.url.describe()))?;
    let server_major = if server >= 100_000 {
        server / 10_000
    } else {
        server / 100
    };
    let dir = ctx.bin_dir.clone().or_else(|| debian_dir(server_major));
    let dump = match &dir {
        Some(d) => d.join("pg_dump").display().to_string(),
        None => "pg_dump".to_owned(),
    };
    let version = tool_version(ctx, &dump).await?;
    let major = major_of(&version)
        .ok_or_else(|| format!("cannot read {dump}'s version from {version:?}"))?;
    if major != server_major {
        return Err(format!(
            "{dump} is PostgreSQL {major} but the server at {} runs PostgreSQL {server_major}: its backups would fail or not restore; install PostgreSQL {server_major}'s client tools (Debian: postgresql-client-{server_major}) or point database.bin_dir at them",
            ctx.url.describe()
        ));
    }
    Ok(Tools {
        dir,
        major,
        version,
    })
}

/// `pg_dump --format=custom` of the database into `dest`, then read back with `pg_restore
/// --list`: `pg_dump` has been seen to exit 0 over a file a failed write cut short (a full
/// disk, a file size limit), and such a backup must never be recorded as good.
pub async fn backup(ctx: &Ctx, tools: &Tools, dest: &Path) -> Result<(), String> {
    let c = ctx.cmd(vec![
        tools.bin("pg_dump"),
        "--format=custom".into(),
        "--no-password".into(),
        format!("--file={}", dest.display()),
        format!("--dbname={}", ctx.url.for_tools(ctx.url.dbname())),
    ]);
    let ran = command::run(&c).await;
    if !ran.ok() {
        return Err(ctx.fail("pg_dump", &ran));
    }
    let mut check = ctx.cmd(vec![
        tools.bin("pg_restore"),
        "--list".into(),
        dest.display().to_string(),
    ]);
    check.capture = true;
    let read = command::run(&check).await;
    if !read.ok() {
        return Err(format!(
            "pg_dump exited 0 but what it wrote does not read back (is the disk full?): {}",
            ctx.fail("pg_restore --list", &read)
        ));
    }
    Ok(())
}

/// The relations (tables, views, sequences) a dump holds, as `(kind, schema, name)`, and the
/// schemas it covers.
async fn dump_relations(
    ctx: &Ctx,
    tools: &Tools,
    file: &Path,
) -> Result<(BTreeSet<(String, String)>, BTreeSet<String>), String> {
    let mut c = ctx.cmd(vec![
        tools.bin("pg_restore"),
        "--list".into(),
        file.display().to_string(),
    ]);
    c.capture = true;
    let ran = command::run(&c).await;
    if !ran.ok() {
        return Err(ctx.fail("pg_restore --list", &ran));
    }
    let mut rels = BTreeSet::new();
    let mut schemas = BTreeSet::new();
    // Lines like `215; 1259 16386 TABLE public items shop`: id; oids, kind, schema, name, owner.
    for line in String::from_utf8_lossy(&ran.stdout).lines() {
        if line.starts_with(';') {
            continue;
        }
        let Some((_, rest)) = line.split_once(';') else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let kinds: &[&[&str]] = &[
            &["TABLE"],
            &["VIEW"],
            &["MATERIALIZED", "VIEW"],
            &["SEQUENCE"],
            &["SCHEMA"],
        ];
        for kind in kinds {
            let at = 2;
            if words.len() > at + kind.len() && words[at..at + kind.len()] == **kind {
                let tail = &words[at + kind.len()..];
                // `TABLE DATA`, `SEQUENCE SET`, `SEQUENCE OWNED BY` are contents, not relations.
                if matches!(tail.first(), Some(&("DATA" | "SET" | "OWNED"))) {
                    continue;
                }
                if kind == &["SCHEMA"] {
                    if let Some(s) = tail.get(1) {
                        schemas.insert((*s).to_owned());
                    }
                } else if tail.len() >= 3 {
                    let schema = tail[0].to_owned();
                    let name = tail[1..tail.len() - 1].join(" ");
                    schemas.insert(schema.clone());
                    rels.insert((schema, name));
                }
            }
        }
    }
    Ok((rels, schemas))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Restores `file` into the live database: relations the dump does not hold (in the schemas
/// it covers) are dropped first, then `pg_restore --clean --if-exists --single-transaction`.
/// Returns a short account of what was done.
pub async fn restore(ctx: &Ctx, tools: &Tools, file: &Path) -> Result<String, String> {
    let (in_dump, schemas) = dump_relations(ctx, tools, file).await?;
    let mut dropped = Vec::new();
    if !schemas.is_empty() {
        let list = schemas
            .iter()
            .map(|s| quote_literal(s))
            .collect::<Vec<_>>()
            .join(",");
        let rows = ctx
            .query(
                &tools.bin("psql"),
                ctx.url.dbname(),
                &format!(
                    "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r','p','v','m','S') AND n.nspname IN ({list}) ORDER BY 3, 1, 2"
                ),
            )
            .await?;
        let mut sql = String::new();
        for r in rows {
            let [schema, name, kind] = r.as_slice() else {
                continue;
            };
            if in_dump.contains(&(schema.clone(), name.clone())) {
                continue;
            }
            let what = match kind.as_str() {
                "r" | "p" => "TABLE",
                "v" => "VIEW",
                "m" => "MATERIALIZED VIEW",
                _ => "SEQUENCE",
            };
            sql.push_str(&format!(
                "DROP {what} IF EXISTS {}.{} CASCADE;\n",
                quote_ident(schema),
                quote_ident(name)
            ));
            dropped.push(format!("{schema}.{name}"));
        }
        if !sql.is_empty() {
            let mut c = ctx.cmd(vec![
                tools.bin("psql"),
                "-X".into(),
                "-q".into(),
                "-v".into(),
                "ON_ERROR_STOP=1".into(),
                "--single-transaction".into(),
                "-d".into(),
                ctx.url.for_tools(ctx.url.dbname()),
                "-f".into(),
                "-".into(),
            ]);
            c.stdin = Some(sql.into_bytes());
            let ran = command::run(&c).await;
            if !ran.ok() {
                return Err(ctx.fail("dropping what the migration added", &ran));
            }
        }
    }
    let c = ctx.cmd(vec![
        tools.bin("pg_restore"),
        "--clean".into(),
        "--if-exists".into(),
        "--single-transaction".into(),
        "--no-owner".into(),
        "--no-password".into(),
        format!("--dbname={}", ctx.url.for_tools(ctx.url.dbname())),
        file.display().to_string(),
    ]);
    let ran = command::run(&c).await;
    if !ran.ok() {
        return Err(ctx.fail("pg_restore", &ran));
    }
    Ok(if dropped.is_empty() {
        format!("pg_restore --clean in {}", command::secs(ran.duration))
    } else {
        format!(
            "dropped what the backup does not have ({}), then pg_restore --clean in {}",
            dropped.join(", "),
            command::secs(ran.duration)
        )
    })
}

/// Rows per table of `dbname` (`schema.table` → rows).
pub async fn row_counts(
    ctx: &Ctx,
    tools: &Tools,
    dbname: &str,
) -> Result<BTreeMap<String, u64>, String> {
    let rows = ctx
        .query(
            &tools.bin("psql"),
            dbname,
            "SELECT table_schema || '.' || table_name, \
             (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', table_schema, table_name), false, true, '')))[1]::text \
             FROM information_schema.tables WHERE table_type = 'BASE TABLE' \
             AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match r.as_slice() {
            [name, n] => Some((name.clone(), n.trim().parse().unwrap_or(0))),
            _ => None,
        })
        .collect())
}

/// Restores `file` into a scratch database on the same server (created, then dropped) and
/// counts the rows of every table there.
pub async fn verify(
    ctx: &Ctx,
    tools: &Tools,
    file: &Path,
    scratch: &str,
) -> Result<BTreeMap<String, u64>, String> {
    let started = Instant::now();
    ctx.query(
        &tools.bin("psql"),
        ctx.url.dbname(),
        &format!("CREATE DATABASE {}", quote_ident(scratch)),
    )
    .await
    .map_err(|e| {
        format!("cannot create the scratch database {scratch} (the user needs CREATEDB): {e}")
    })?;
    let result = async {
        let c = ctx.cmd(vec![
            tools.bin("pg_restore"),
            "--exit-on-error".into(),
            "--no-owner".into(),
            "--no-password".into(),
            format!("--dbname={}", ctx.url.for_tools(scratch)),
            file.display().to_string(),
        ]);
        let ran = command::run(&c).await;
        if !ran.ok() {
            return Err(ctx.fail("pg_restore into the scratch database", &ran));
        }
        row_counts(ctx, tools, scratch).await
    }
    .await;
    let dropped = ctx
        .query(
            &tools.bin("psql"),
            ctx.url.dbname(),
            &format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(scratch)
            ),
        )
        .await;
    if let Err(e) = dropped {
        tracing::warn!(database = scratch, error = %e, "could not drop a scratch database");
    }
    tracing::debug!(took = ?started.elapsed(), "verified a PostgreSQL backup");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_are_read_from_version_lines() {
        assert_eq!(
            major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of("psql (PostgreSQL) 16.2"), Some(16));
        assert_eq!(major_of("pg_dump (PostgreSQL) 9.6.24"), Some(906));
        assert_eq!(major_of("pg_dump (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(major_of("nothing here"), None);
    }
}
