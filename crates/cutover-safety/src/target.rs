//! The database a service uses, as cutover reaches it: a PostgreSQL URL (read from the config
//! or from a variable of the service's environment) or a SQLite file.
//!
//! A URL may carry a password. It never appears in a message, an event, the catalog or a
//! command line (where `ps` would show it): messages use [`Target::describe`], and the tools
//! get the URL without its password and the password in `PGPASSWORD`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cutover_core::{DatabaseSpec, DbKind, DbLocation};

/// A PostgreSQL URL, taken apart.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl {
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    /// `host:port`, `[::1]:5432`, or empty (the tools' default socket).
    host: String,
    dbname: String,
    /// After `?`, as given.
    query: Option<String>,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a % in the URL is not followed by two hex digits".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL decodes to text that is not UTF-8".to_owned())
}

impl PgUrl {
    /// Parses `postgres://user:password@host:port/dbname?options` (or `postgresql://`).
    /// The error never repeats the URL, which may hold a password.
    pub fn parse(url: &str) -> Result<PgUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .filter(|(s, _)| *s == "postgres" || *s == "postgresql")
            .ok_or_else(|| {
                "it is not a postgres:// or postgresql:// URL (like postgres://user@127.0.0.1:5432/shop)".to_owned()
            })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q.to_owned())),
            None => (rest, None),
        };
        let (authority, dbname) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (Some(percent_decode(user)?), Some(percent_decode(pass)?)),
                None => (Some(percent_decode(u)?), None),
            },
        };
        let dbname = percent_decode(dbname)?;
        if dbname.is_empty() {
            return Err("the URL names no database (…/DBNAME at its end)".into());
        }
        Ok(PgUrl {
            scheme: scheme.to_owned(),
            user: user.filter(|u| !u.is_empty()),
            password,
            host: host.to_owned(),
            dbname,
            query,
        })
    }

    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// The URL without its password, safe for messages.
    pub fn describe(&self) -> String {
        let user = self
            .user
            .as_ref()
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        format!("{}://{user}{}/{}", self.scheme, self.host, self.dbname)
    }

    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    /// The URL the tools get (no password: that goes in `PGPASSWORD`), for `dbname`.
    pub fn for_tools(&self, dbname: &str) -> String {
        let user = self
            .user
            .as_ref()
            .map(|u| format!("{}@", Self::encode(u)))
            .unwrap_or_default();
        let query = self
            .query
            .as_ref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        format!(
            "{}://{user}{}/{}{query}",
            self.scheme,
            self.host,
            Self::encode(dbname)
        )
    }

    /// The environment the tools need beside the URL.
    pub fn tool_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if let Some(p) = &self.password {
            env.insert("PGPASSWORD".to_owned(), p.clone());
        }
        // Never wait for a password prompt: there is no one to answer it.
        env.insert("PGCONNECT_TIMEOUT".to_owned(), "10".to_owned());
        env
    }
}

/// Where a service's database is, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Postgres {
        url: PgUrl,
        bin_dir: Option<PathBuf>,
    },
    Sqlite {
        path: PathBuf,
    },
}

impl Target {
    /// `postgres://shop@127.0.0.1:5432/shop`, `sqlite /srv/shop/data/shop.db`: no secret.
    pub fn describe(&self) -> String {
        match self {
            Target::Postgres { url, .. } => url.describe(),
            Target::Sqlite { path } => format!("sqlite {}", path.display()),
        }
    }

    pub fn kind(&self) -> DbKind {
        match self {
            Target::Postgres { .. } => DbKind::Postgres,
            Target::Sqlite { .. } => DbKind::Sqlite,
        }
    }

    /// What a migration gets in its environment: the URL under `url_env` (or
    /// `DATABASE_URL`), or for SQLite the file as `DATABASE_PATH`; and `CUTOVER_DATABASE`
    /// either way.
    pub fn migration_env(&self, spec: &DatabaseSpec) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        match self {
            Target::Postgres { url, .. } => {
                let name = match &spec.location {
                    DbLocation::UrlEnv(n) => n.clone(),
                    _ => "DATABASE_URL".to_owned(),
                };
                let full = url.full();
                env.insert(name, full.clone());
                env.insert("CUTOVER_DATABASE".to_owned(), full);
            }
            Target::Sqlite { path } => {
                let p = path.display().to_string();
                env.insert("DATABASE_PATH".to_owned(), p.clone());
                env.insert("CUTOVER_DATABASE".to_owned(), p);
            }
        }
        env
    }
}

impl PgUrl {
    /// The whole URL, password included: only ever put in a migration's environment.
    fn full(&self) -> String {
        let userinfo = match (&self.user, &self.password) {
            (Some(u), Some(p)) => format!("{}:{}@", Self::encode(u), Self::encode(p)),
            (Some(u), None) => format!("{}@", Self::encode(u)),
            (None, Some(p)) => format!(":{}@", Self::encode(p)),
            (None, None) => String::new(),
        };
        let query = self
            .query
            .as_ref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        format!(
            "{}://{userinfo}{}/{}{query}",
            self.scheme,
            self.host,
            Self::encode(&self.dbname)
        )
    }
}

/// The target of `spec`, with `url_env` looked up in `service_env` first, then in cutover's
/// own environment. The error is one sentence that names the variable, never its value.
pub fn resolve(
    spec: &DatabaseSpec,
    service_env: &BTreeMap<String, String>,
) -> Result<Target, String> {
    let pg = |url: &str, whence: &str| {
        PgUrl::parse(url)
            .map(|url| Target::Postgres {
                url,
                bin_dir: spec.bin_dir.clone(),
            })
            .map_err(|e| format!("the database URL {whence} is not usable: {e}"))
    };
    match &spec.location {
        DbLocation::Path(p) => Ok(Target::Sqlite { path: p.clone() }),
        DbLocation::Url(u) => pg(u, "in database.url"),
        DbLocation::UrlEnv(name) => {
            let value = service_env
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| {
                    format!(
                        "{name} (database.url_env) is set neither in the service's env nor in cutover's environment"
                    )
                })?;
            pg(value.trim(), &format!("in {name}"))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn urls_are_taken_apart_and_never_shown_with_their_password() {
        let u =
            PgUrl::parse("postgres://shop:s%40cret@127.0.0.1:5432/shop?sslmode=disable").unwrap();
        assert_eq!(u.describe(), "postgres://shop@127.0.0.1:5432/shop");
        assert_eq!(format!("{u:?}"), "postgres://shop@127.0.0.1:5432/shop");
        assert_eq!(
            u.for_tools("cutover_verify_1"),
            "postgres://shop@127.0.0.1:5432/cutover_verify_1?sslmode=disable"
        );
        assert_eq!(u.tool_env().get("PGPASSWORD").unwrap(), "s@cret");
        assert_eq!(
            u.full(),
            "postgres://shop:s%40cret@127.0.0.1:5432/shop?sslmode=disable"
        );
        for bad in [
            "mysql://x@h/db",
            "postgres://x@h",
            "postgres://x@h/",
            "postgres://x:%zz@h/db",
        ] {
            let e = PgUrl::parse(bad).unwrap_err();
            assert!(!e.contains("%zz"), "{e}");
        }
    }

    #[test]
    fn url_env_is_looked_up_in_the_service_env_and_named_when_missing() {
        let spec = DatabaseSpec {
            kind: DbKind::Postgres,
            location: DbLocation::UrlEnv("CUTOVER_TEST_NO_SUCH_VAR".into()),
            backup_before_deploy: true,
            migrate: None,
            on_rollback: cutover_core::DbRollback::Keep,
            migrate_down: None,
            timeout: std::time::Duration::from_secs(60),
            bin_dir: None,
        };
        let e = resolve(&spec, &BTreeMap::new()).unwrap_err();
        assert!(e.contains("CUTOVER_TEST_NO_SUCH_VAR (database.url_env) is set neither"));
        let env = BTreeMap::from([(
            "CUTOVER_TEST_NO_SUCH_VAR".to_owned(),
            "postgres://u:pw@localhost:5/d".to_owned(),
        )]);
        let t = resolve(&spec, &env).unwrap();
        assert_eq!(t.describe(), "postgres://u@localhost:5/d");
        let env = t.migration_env(&spec);
        assert_eq!(
            env.get("CUTOVER_TEST_NO_SUCH_VAR").unwrap(),
            "postgres://u:pw@localhost:5/d"
        );
        let bad = BTreeMap::from([(
            "CUTOVER_TEST_NO_SUCH_VAR".to_owned(),
            "host=localhost password=pw".to_owned(),
        )]);
        let e = resolve(&spec, &bad).unwrap_err();
        assert!(
            e.contains("in CUTOVER_TEST_NO_SUCH_VAR is not usable"),
            "{e}"
        );
        assert!(!e.contains("pw"), "{e}");
    }
}
