//! `[services.X.hooks]`, `[[services.X.smoke]]`, `[services.X.database]` and `[backups]`
//! (docs/reference.md §10) → the core's safety settings, every problem a diagnostic at its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_core::{
    Argv, BackupSettings, DatabaseSpec, DbKind, DbLocation, DbRollback, Hooks, Keep, SafetySpec,
    SmokeCheck,
};

use super::{Ctx, config_dir, resolve_program};
use crate::raw::{RawArg, RawBackups, RawDatabase, RawHooks, RawService, RawSmoke, S};

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];

/// Whether a URL carries a password (`scheme://user:password@host/...`).
fn has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// A header name as HTTP allows it (a token).
fn header_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An argv from the config: not empty, its program not blank, a relative program path made
/// absolute against the config's directory (like `command`).
fn argv(cx: &mut Ctx<'_>, v: &S<Vec<S<String>>>, key: &str) -> Option<Argv> {
    let args: Vec<String> = v.get_ref().iter().map(|a| a.get_ref().clone()).collect();
    command(cx, v, key, args)
}

fn command<T>(cx: &mut Ctx<'_>, at: &S<T>, key: &str, mut args: Vec<String>) -> Option<Argv> {
    match args.first() {
        None => {
            cx.err(
                at,
                key,
                "must name a program to run, e.g. [\"./ci/gate.sh\"]",
            );
            None
        }
        Some(p) if p.trim().is_empty() => {
            cx.err(
                at,
                key,
                "must name a program to run, e.g. [\"./ci/gate.sh\"]",
            );
            None
        }
        Some(p) => {
            let p = resolve_program(p, &config_dir(cx.file));
            args[0] = p;
            Some(args)
        }
    }
}

/// A hook point: one command (an array of strings) or several (an array of arrays).
fn hook_list(cx: &mut Ctx<'_>, v: Option<&S<Vec<S<RawArg>>>>, key: &str) -> Vec<Argv> {
    let Some(v) = v else { return Vec::new() };
    let items = v.get_ref();
    if items.is_empty() {
        return Vec::new();
    }
    let singles = items
        .iter()
        .filter(|a| matches!(a.get_ref(), RawArg::One(_)))
        .count();
    if singles == items.len() {
        let args = items
            .iter()
            .filter_map(|a| match a.get_ref() {
                RawArg::One(s) => Some(s.clone()),
                RawArg::Many(_) => None,
            })
            .collect();
        return command(cx, v, key, args).into_iter().collect();
    }
    let mut out = Vec::new();
    for (i, a) in items.iter().enumerate() {
        let k = format!("{key}[{i}]");
        match a.get_ref() {
            RawArg::Many(args) => {
                if let Some(c) = command(cx, a, &k, args.clone()) {
                    out.push(c);
                }
            }
            RawArg::One(_) => cx.err(
                a,
                k,
                "mixes strings and arrays: write one command as [\"./a.sh\", \"arg\"] or several as [[\"./a.sh\"], [\"./b.sh\"]]",
            ),
        }
    }
    out
}

fn hooks(cx: &mut Ctx<'_>, h: Option<&S<RawHooks>>, k: &dyn Fn(&str) -> String) -> Hooks {
    let d = Hooks::default();
    let Some(h) = h else { return d };
    let h = h.get_ref();
    Hooks {
        pre_deploy: hook_list(cx, h.pre_deploy.as_ref(), &k("hooks.pre_deploy")),
        pre_traffic: hook_list(cx, h.pre_traffic.as_ref(), &k("hooks.pre_traffic")),
        post_promote: hook_list(cx, h.post_promote.as_ref(), &k("hooks.post_promote")),
        on_rollback: hook_list(cx, h.on_rollback.as_ref(), &k("hooks.on_rollback")),
        timeout: cx.duration(h.timeout.as_ref(), &k("hooks.timeout"), d.timeout),
    }
}

fn smoke(
    cx: &mut Ctx<'_>,
    list: Option<&S<Vec<S<RawSmoke>>>>,
    k: &dyn Fn(&str) -> String,
) -> Vec<SmokeCheck> {
    let Some(list) = list else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, c) in list.get_ref().iter().enumerate() {
        let sk = k(&format!("smoke[{i}]"));
        let r = c.get_ref();
        let path = match &r.path {
            None => {
                cx.err(
                    c,
                    format!("{sk}.path"),
                    "is required: the path to ask the candidate for, e.g. \"/healthz\"",
                );
                continue;
            }
            Some(p) if !p.get_ref().starts_with('/') => {
                cx.err(
                    p,
                    format!("{sk}.path"),
                    format!("{:?} must start with '/'", p.get_ref()),
                );
                continue;
            }
            Some(p) if p.get_ref().contains(char::is_whitespace) => {
                cx.err(
                    p,
                    format!("{sk}.path"),
                    "must not contain spaces (percent-encode them)",
                );
                continue;
            }
            Some(p) => p.get_ref().clone(),
        };
        let method = match &r.method {
            None => "GET".to_owned(),
            Some(m) => {
                let up = m.get_ref().to_ascii_uppercase();
                if METHODS.contains(&up.as_str()) {
                    up
                } else {
                    cx.err(
                        m,
                        format!("{sk}.method"),
                        format!("{:?} is not one of {}", m.get_ref(), METHODS.join(", ")),
                    );
                    "GET".to_owned()
                }
            }
        };
        let status = r.status.as_ref().and_then(|st| {
            let n = *st.get_ref();
            if (100..=599).contains(&n) {
                u16::try_from(n).ok()
            } else {
                cx.err(
                    st,
                    format!("{sk}.status"),
                    format!("{n} is not an HTTP status (100-599)"),
                );
                None
            }
        });
        let mut headers = Vec::new();
        if let Some(h) = &r.headers {
            for (name, value) in h.get_ref() {
                if !header_name_ok(name) {
                    cx.err(
                        h,
                        format!("{sk}.headers"),
                        format!("{name:?} is not a header name"),
                    );
                } else if value.contains(['\r', '\n']) {
                    cx.err(
                        h,
                        format!("{sk}.headers.{name}"),
                        "a header value cannot contain a line break",
                    );
                } else {
                    headers.push((name.clone(), value.clone()));
                }
            }
        }
        out.push(SmokeCheck {
            path,
            method,
            status,
            body_contains: r.body_contains.as_ref().map(|b| b.get_ref().clone()),
            headers,
            timeout: cx.duration(
                r.timeout.as_ref(),
                &format!("{sk}.timeout"),
                Duration::from_secs(10),
            ),
        });
    }
    out
}

fn database(
    cx: &mut Ctx<'_>,
    d: &S<RawDatabase>,
    k: &dyn Fn(&str) -> String,
) -> Option<DatabaseSpec> {
    let at = d;
    let d = d.get_ref();
    let errors = cx.diags.len();
    let kind = match &d.kind {
        None => {
            cx.err(
                at,
                k("database.kind"),
                "is required: \"postgres\" or \"sqlite\"",
            );
            return None;
        }
        Some(v) => match DbKind::parse(v.get_ref()) {
            Some(kd) => kd,
            None => {
                cx.err(
                    v,
                    k("database.kind"),
                    format!("{:?} is not \"postgres\" or \"sqlite\"", v.get_ref()),
                );
                return None;
            }
        },
    };
    let base = config_dir(cx.file);
    let location = match kind {
        DbKind::Postgres => {
            if let Some(p) = &d.path {
                cx.err(
                    p,
                    k("database.path"),
                    "is for SQLite; PostgreSQL takes url or url_env",
                );
            }
            match (&d.url, &d.url_env) {
                (Some(u), Some(_)) => {
                    cx.err(u, k("database.url"), "set either url or url_env, not both");
                    None
                }
                (Some(u), None) => {
                    let url = u.get_ref();
                    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                        cx.err(u, k("database.url"), "must be a postgres:// URL (the value is not repeated here: it may hold a password)");
                        None
                    } else {
                        if has_password(url) {
                            cx.warn(u, k("database.url"), "holds a password in the config file; put the URL in the service's environment and name it with url_env instead");
                        }
                        Some(DbLocation::Url(url.clone()))
                    }
                }
                (None, Some(e)) => {
                    let name = e.get_ref();
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        cx.err(
                            e,
                            k("database.url_env"),
                            format!("{name:?} is not an environment variable name"),
                        );
                        None
                    } else {
                        Some(DbLocation::UrlEnv(name.clone()))
                    }
                }
                (None, None) => Some(DbLocation::UrlEnv("DATABASE_URL".to_owned())),
            }
        }
        DbKind::Sqlite => {
            for (v, key) in [(&d.url, "database.url"), (&d.url_env, "database.url_env")] {
                if let Some(v) = v {
                    cx.err(
                        v,
                        k(key),
                        "is for PostgreSQL; SQLite takes path = \"data/app.db\"",
                    );
                }
            }
            match &d.path {
                None => {
                    cx.err(
                        at,
                        k("database.path"),
                        "is required for SQLite: the database file, e.g. \"data/shop.db\"",
                    );
                    None
                }
                Some(p) if p.get_ref().trim().is_empty() => {
                    cx.err(p, k("database.path"), "must not be empty");
                    None
                }
                Some(p) => {
                    let path = PathBuf::from(p.get_ref());
                    let abs = if path.is_absolute() {
                        path
                    } else {
                        base.join(path)
                    };
                    Some(DbLocation::Path(std::path::absolute(&abs).unwrap_or(abs)))
                }
            }
        }
    };
    let backup_before_deploy = d.backup_before_deploy.as_ref().is_none_or(|b| *b.get_ref());
    let migrate = d
        .migrate
        .as_ref()
        .and_then(|m| argv(cx, m, &k("database.migrate")));
    let migrate_down = d
        .migrate_down
        .as_ref()
        .and_then(|m| argv(cx, m, &k("database.migrate_down")));
    let on_rollback = match &d.on_rollback {
        None => DbRollback::Keep,
        Some(v) => DbRollback::parse(v.get_ref()).unwrap_or_else(|| {
            cx.err(
                v,
                k("database.on_rollback"),
                format!(
                    "{:?} is not one of \"keep\", \"restore\", \"down\"",
                    v.get_ref()
                ),
            );
            DbRollback::Keep
        }),
    };
    if let Some(v) = &d.on_rollback {
        match on_rollback {
            DbRollback::Down if d.migrate_down.is_none() => cx.err(
                v,
                k("database.on_rollback"),
                "\"down\" runs migrate_down, which is not set; add migrate_down = [\"./app\", \"migrate\", \"down\"]",
            ),
            DbRollback::Restore if !backup_before_deploy => cx.err(
                v,
                k("database.on_rollback"),
                "\"restore\" restores the backup taken before the deploy, but backup_before_deploy = false takes none",
            ),
            _ => {}
        }
    }
    if let Some(m) = &d.migrate_down
        && on_rollback != DbRollback::Down
    {
        cx.err(
            m,
            k("database.migrate_down"),
            "runs only with on_rollback = \"down\"; set that, or remove migrate_down",
        );
    }
    if let (Some(_), Some(b)) = (&d.migrate, &d.backup_before_deploy)
        && !*b.get_ref()
    {
        cx.warn(
            b,
            k("database.backup_before_deploy"),
            "is false while migrate is set: a migration that fails half-way cannot be undone",
        );
    }
    let bin_dir = d.bin_dir.as_ref().map(|b| {
        let p = PathBuf::from(b.get_ref());
        if p.is_absolute() { p } else { base.join(p) }
    });
    if let (Some(b), DbKind::Sqlite) = (&d.bin_dir, kind) {
        cx.err(
            b,
            k("database.bin_dir"),
            "is where PostgreSQL's tools are; SQLite needs none",
        );
    }
    let timeout = cx.duration(
        d.timeout.as_ref(),
        &k("database.timeout"),
        Duration::from_secs(30 * 60),
    );
    if cx.diags.len() > errors {
        return None;
    }
    Some(DatabaseSpec {
        kind,
        location: location?,
        backup_before_deploy,
        migrate,
        on_rollback,
        migrate_down,
        timeout,
        bin_dir,
    })
}

/// The release-safety settings of service `name`.
pub(super) fn service(cx: &mut Ctx<'_>, name: &str, s: &RawService) -> SafetySpec {
    let k = |key: &str| format!("services.{name}.{key}");
    SafetySpec {
        hooks: hooks(cx, s.hooks.as_ref(), &k),
        smoke: smoke(cx, s.smoke.as_ref(), &k),
        database: s.database.as_ref().and_then(|d| database(cx, d, &k)),
    }
}

/// `[backups]`, with `dir` resolved against the config's directory (default: `backups` in the
/// state dir).
pub(super) fn backups(
    cx: &mut Ctx<'_>,
    b: Option<&S<RawBackups>>,
    state_dir: &Path,
) -> BackupSettings {
    let mut out = BackupSettings {
        dir: state_dir.join("backups"),
        ..BackupSettings::default()
    };
    let Some(b) = b else { return out };
    let b = b.get_ref();
    if let Some(d) = &b.dir {
        if d.get_ref().trim().is_empty() {
            cx.err(d, "backups.dir", "must not be empty");
        } else {
            let p = PathBuf::from(d.get_ref());
            out.dir = if p.is_absolute() {
                p
            } else {
                config_dir(cx.file).join(p)
            };
        }
    }
    if let Some(keep) = &b.keep {
        let r = keep.get_ref();
        let mut n = |v: &Option<S<i64>>, key: &str| {
            cx.count(v.as_ref(), &format!("backups.keep.{key}"), 0, 100_000, 0)
        };
        let k = Keep {
            last: n(&r.last, "last"),
            hourly: n(&r.hourly, "hourly"),
            daily: n(&r.daily, "daily"),
            weekly: n(&r.weekly, "weekly"),
            monthly: n(&r.monthly, "monthly"),
            yearly: n(&r.yearly, "yearly"),
        };
        if k == (Keep {
            last: 0,
            hourly: 0,
            daily: 0,
            weekly: 0,
            monthly: 0,
            yearly: 0,
        }) {
            cx.err(keep, "backups.keep", "keeps nothing; set at least one of last, hourly, daily, weekly, monthly, yearly above 0");
        }
        out.keep = k;
    }
    out.every = b
        .every
        .as_ref()
        .map(|e| cx.duration(Some(e), "backups.every", Duration::from_secs(3600)));
    if let (Some(e), Some(d)) = (&b.every, out.every)
        && d < Duration::from_secs(1)
    {
        cx.err(e, "backups.every", "must be at least 1s");
    }
    out.verify = b.verify.as_ref().is_none_or(|v| *v.get_ref());
    out
}
