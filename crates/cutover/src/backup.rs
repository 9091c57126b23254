//! `cutover backup create|list|verify|restore|prune` (docs/reference.md §10): the backup catalog from
//! the command line.
//!
//! These work on the catalog and the database directly, with or without a daemon running:
//! restoring a database must not depend on the daemon being up. The catalog's per-service lock
//! keeps them from running beside a daemon's backup, migration or restore of the same
//! database (conflict, exit 4, saying who holds it). What they do is also recorded as an event
//! in the daemon's state, when there is one, so `history` and the dashboard tell it.
//!
//! Exit codes: 2 for a service without `[services.X.database]`, an unknown backup or `restore`
//! without `--yes`; 4 while the database is busy; 1 when the operation ran and failed (a
//! failed verification too).

use std::collections::BTreeMap;

use cutover_config::{RuntimeSettings, ServiceSettings, Settings};
use cutover_core::EventKind;
use cutover_safety::command::secs;
use cutover_safety::ops::{self, size};
use cutover_safety::{Catalog, Db, Manifest, Meta, OpError, Reason};
use serde_json::json;

use crate::cli::BackupCommand;
use crate::exit::{CliError, CliResult, Code};
use crate::output::{err, out};

fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn op_error(e: OpError) -> CliError {
    match e {
        OpError::Busy(m) => CliError::new(Code::Conflict, m),
        OpError::NotFound(m) => CliError::new(Code::Usage, m),
        OpError::Failed(m) => CliError::new(Code::Failure, m),
    }
}

fn service<'a>(settings: &'a Settings, name: &str) -> CliResult<&'a ServiceSettings> {
    let s = settings.service(name).ok_or_else(|| {
        CliError::new(
            Code::Usage,
            format!("no service named {name:?} in {}", settings.file.display()),
        )
    })?;
    if s.safety.database.is_none() {
        return Err(CliError::new(
            Code::Usage,
            format!(
                "{name} has no database to back up; add [services.{name}.database] to {}",
                settings.file.display()
            ),
        ));
    }
    Ok(s)
}

/// The service's env from the config, where `url_env` is looked up first.
fn service_env(s: &ServiceSettings) -> BTreeMap<String, String> {
    match &s.runtime {
        RuntimeSettings::Process { env, .. } => env.clone(),
        // A static service runs nothing, so it has no env of its own; any other runtime
        // that has one is looked up like a process's once it is added here.
        _ => BTreeMap::new(),
    }
}

fn db(settings: &Settings, s: &ServiceSettings) -> CliResult<Db> {
    let spec = s
        .safety
        .database
        .as_ref()
        .ok_or_else(|| CliError::new(Code::Usage, format!("{} has no database", s.name)))?;
    let target = cutover_safety::target::resolve(spec, &service_env(s))
        .map_err(|e| CliError::new(Code::Usage, e))?;
    Ok(Db {
        service: s.name.to_string(),
        target,
        catalog: Catalog::new(&settings.backups.dir),
        timeout: spec.timeout,
        env: BTreeMap::new(),
        groups: None,
    })
}

/// Records what a command did in the daemon's state, when there is one; a failure to do so
/// is only a warning (the catalog itself has the facts).
fn record(settings: &Settings, service: &str, kind: EventKind, message: String) {
    let dir = &settings.daemon.state_dir;
    if !cutover_store::integrity::db_path(dir).exists() {
        return;
    }
    let event = cutover_store::NewEvent {
        service: service.to_owned(),
        rollout_id: None,
        at: cutover_core::Timestamp(
            u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(0),
        ),
        kind: kind.as_str().to_owned(),
        message: format!("{message} (by `cutover backup`)"),
        data: "{}".to_owned(),
    };
    match cutover_store::Store::open(dir) {
        Ok(mut store) => {
            if let Err(e) = store.append_event(&event) {
                tracing::warn!(error = %e, "could not record the event in the daemon's state");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not open the daemon's state to record the event")
        }
    }
}

/// What a rollout of `s` does around its traffic steps, in order, for `validate`; `None` when
/// nothing is configured.
pub fn release_order(s: &ServiceSettings) -> Option<String> {
    let st = s.rollout.steps;
    if !st.any() {
        return None;
    }
    let h = &s.safety.hooks;
    let n = |list: &Vec<Vec<String>>, what: &str| format!("{} {what} hook(s)", list.len());
    let mut order = Vec::new();
    if st.pre_deploy {
        order.push(n(&h.pre_deploy, "pre_deploy"));
    }
    if let Some(db) = &s.safety.database {
        let target = match &db.location {
            cutover_core::DbLocation::Url(_) => format!("{} (url)", db.kind),
            cutover_core::DbLocation::UrlEnv(v) => format!("{} (${v})", db.kind),
            cutover_core::DbLocation::Path(p) => format!("sqlite {}", p.display()),
        };
        if st.backup {
            order.push(format!("back up {target}"));
        }
        if let Some(m) = &db.migrate {
            order.push(format!("migrate `{}`", m.join(" ")));
        }
    }
    order.push("start the candidate".into());
    if st.smoke {
        order.push(format!(
            "{} smoke check(s) and {} at 0%",
            s.safety.smoke.len(),
            n(&h.pre_traffic, "pre_traffic")
        ));
    }
    order.push(format!("{} steps", s.rollout.strategy));
    if st.post_promote {
        order.push(format!(
            "after promotion {}",
            n(&h.post_promote, "post_promote")
        ));
    }
    let mut undo = Vec::new();
    if s.safety.database.is_some() {
        undo.push(format!("database {}", st.on_rollback));
    }
    if st.on_rollback_hooks {
        undo.push(n(&h.on_rollback, "on_rollback"));
    }
    let undo = if undo.is_empty() {
        String::new()
    } else {
        format!("; on rollback: {}", undo.join(", "))
    };
    Some(format!("{}{undo}", order.join(" → ")))
}

fn manifest_json(catalog: &Catalog, m: &Manifest, keep: Option<&[&str]>) -> serde_json::Value {
    json!({
        "id": m.id,
        "service": m.service,
        "kind": m.kind,
        "database": m.database,
        "path": catalog.file_of(m),
        "bytes": m.bytes,
        "sha256": m.sha256,
        "taken_at": rfc3339(m.taken_at),
        "duration_ms": m.duration_ms,
        "reason": m.reason.as_str(),
        "version": m.version,
        "rollout_id": m.rollout_id,
        "pinned": m.pinned,
        "tool": m.tool,
        "verified": m.verified(),
        "verifications": m.verifications.iter().map(|v| json!({
            "at": rfc3339(v.at),
            "ok": v.ok,
            "detail": v.detail,
            "duration_ms": v.duration_ms,
            "tables": v.tables,
        })).collect::<Vec<_>>(),
        "keep": keep,
    })
}

fn block_on<F: std::future::Future<Output = CliResult>>(f: F) -> CliResult {
    crate::runtime(tokio::runtime::Builder::new_current_thread())?.block_on(f)
}

pub fn run(settings: &Settings, cmd: &BackupCommand) -> CliResult {
    match cmd {
        BackupCommand::Create {
            service: name,
            read,
        } => {
            let s = service(settings, name)?;
            let db = db(settings, s)?;
            block_on(async {
                let m = db
                    .backup(Meta {
                        reason: Some(Reason::Manual),
                        version: None,
                        rollout_id: None,
                        pinned: false,
                    })
                    .await
                    .map_err(op_error)?;
                let text = format!(
                    "backup {} of {} taken in {}: {}, sha256 {}",
                    m.id,
                    m.database,
                    secs(std::time::Duration::from_millis(m.duration_ms)),
                    size(m.bytes),
                    m.sha256
                );
                record(settings, name, EventKind::Backup, text.clone());
                if read.json {
                    out(manifest_json(&db.catalog, &m, None))
                } else {
                    out(text)
                }
            })
        }
        BackupCommand::List {
            service: name,
            read,
        } => list(settings, name.as_deref(), read.json),
        BackupCommand::Verify {
            service: name,
            id,
            read,
        } => {
            let s = service(settings, name)?;
            let db = db(settings, s)?;
            let id = match id {
                Some(id) => id.clone(),
                None => db
                    .catalog
                    .list(Some(name))
                    .map_err(|e| op_error(e.into()))?
                    .first()
                    .map(|m| m.id.clone())
                    .ok_or_else(|| {
                        CliError::new(
                            Code::Usage,
                            format!("{name} has no backup to verify; take one with `cutover backup create {name}`"),
                        )
                    })?,
            };
            block_on(async {
                let (m, v) = db.verify(&id).await.map_err(op_error)?;
                let text = if v.ok {
                    format!("backup {} verified: {}", m.id, v.detail)
                } else {
                    format!("backup {} FAILED verification: {}", m.id, v.detail)
                };
                record(
                    settings,
                    name,
                    if v.ok {
                        EventKind::BackupVerified
                    } else {
                        EventKind::BackupFailed
                    },
                    text.clone(),
                );
                if read.json {
                    out(manifest_json(&db.catalog, &m, None))?;
                } else {
                    out(&text)?;
                }
                if v.ok {
                    Ok(())
                } else {
                    Err(CliError::new(Code::Failure, text))
                }
            })
        }
        BackupCommand::Restore {
            service: name,
            id,
            yes,
        } => {
            let s = service(settings, name)?;
            let db = db(settings, s)?;
            let m = db.catalog.get(name, id).map_err(|e| op_error(e.into()))?;
            if !yes {
                return Err(CliError::new(
                    Code::Usage,
                    format!(
                        "restoring backup {} (taken {}, {}) replaces everything in {}, and writes made since it was taken are lost; run again with --yes to do it",
                        m.id,
                        rfc3339(m.taken_at),
                        size(m.bytes),
                        db.target.describe()
                    ),
                ));
            }
            block_on(async {
                let (m, detail) = db.restore(id).await.map_err(op_error)?;
                let text = format!(
                    "{} restored from backup {} (taken {}): {detail}",
                    db.target.describe(),
                    m.id,
                    rfc3339(m.taken_at)
                );
                record(settings, name, EventKind::Restored, text.clone());
                out(text)
            })
        }
        BackupCommand::Prune { dry_run, read } => prune(settings, *dry_run, read.json),
    }
}

fn list(settings: &Settings, name: Option<&str>, json: bool) -> CliResult {
    if let Some(n) = name {
        service(settings, n)?;
    }
    let catalog = Catalog::new(&settings.backups.dir);
    let all = catalog.list(name).map_err(|e| op_error(e.into()))?;
    // What the policy says of each, per service.
    let tz = jiff::tz::TimeZone::system();
    let mut keep: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let services: std::collections::BTreeSet<&str> =
        all.iter().map(|m| m.service.as_str()).collect();
    for s in services {
        let plan = ops::prune(&catalog, s, &settings.backups.keep, &tz, false).map_err(op_error)?;
        for (m, d) in plan {
            keep.insert(m.id, d.reasons);
        }
    }
    if json {
        let items: Vec<serde_json::Value> = all
            .iter()
            .map(|m| manifest_json(&catalog, m, keep.get(&m.id).map(Vec::as_slice)))
            .collect();
        return out(json!({ "dir": catalog.dir(), "backups": items }));
    }
    if all.is_empty() {
        return out(format!(
            "no backups in {}{}",
            catalog.dir().display(),
            name.map(|n| format!(" for {n}; take one with `cutover backup create {n}`"))
                .unwrap_or_default()
        ));
    }
    out(format!(
        "{:<32} {:<21} {:>9} {:<14} {:<10} {:<12} KEEP",
        "ID", "TAKEN", "SIZE", "REASON", "VERSION", "VERIFIED"
    ))?;
    for m in &all {
        let verified = match m.verifications.last() {
            None => "-".to_owned(),
            Some(v) if v.ok => "ok".to_owned(),
            Some(_) => "FAILED".to_owned(),
        };
        let why = keep
            .get(&m.id)
            .map(|r| {
                if r.is_empty() {
                    "prune".to_owned()
                } else {
                    r.join(",")
                }
            })
            .unwrap_or_default();
        out(format!(
            "{:<32} {:<21} {:>9} {:<14} {:<10} {:<12} {why}",
            m.id,
            rfc3339(m.taken_at),
            size(m.bytes),
            m.reason.as_str(),
            m.version.as_deref().unwrap_or("-"),
            verified,
        ))?;
    }
    Ok(())
}

fn prune(settings: &Settings, dry_run: bool, json: bool) -> CliResult {
    let catalog = Catalog::new(&settings.backups.dir);
    let tz = jiff::tz::TimeZone::system();
    let mut report = Vec::new();
    for s in settings
        .services
        .iter()
        .filter(|s| s.safety.database.is_some())
    {
        let name = s.name.as_str();
        let plan =
            ops::prune(&catalog, name, &settings.backups.keep, &tz, !dry_run).map_err(op_error)?;
        let gone: Vec<&str> = plan
            .iter()
            .filter(|(_, d)| !d.keep())
            .map(|(m, _)| m.id.as_str())
            .collect();
        let kept = plan.len() - gone.len();
        if !dry_run && !gone.is_empty() {
            record(
                settings,
                name,
                EventKind::BackupPruned,
                format!(
                    "pruned {} backup(s) the keep policy no longer wants ({}); {kept} kept",
                    gone.len(),
                    gone.join(", ")
                ),
            );
        }
        if !json {
            let verb = if dry_run { "would delete" } else { "deleted" };
            out(format!(
                "{name}: {kept} kept, {verb} {}{}",
                gone.len(),
                if gone.is_empty() {
                    String::new()
                } else {
                    format!(": {}", gone.join(", "))
                }
            ))?;
        }
        report.push(json!({
            "service": name,
            "kept": plan.iter().filter(|(_, d)| d.keep()).map(|(m, d)| json!({"id": m.id, "keep": d.reasons})).collect::<Vec<_>>(),
            "deleted": gone,
        }));
    }
    if json {
        return out(json!({ "dry_run": dry_run, "services": report }));
    }
    if report.is_empty() {
        err("cutover: no service has a [services.NAME.database]; nothing to prune");
    }
    Ok(())
}
