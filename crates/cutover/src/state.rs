//! The state on disk from the command line: `up`'s start-up check, `cutover state list` and
//! `cutover state restore [SNAPSHOT]`.
//!
//! `up` refuses a damaged database (`quick_check`) and a missing or empty one when the record
//! of promoted versions says there was state, each with one sentence naming the file and the
//! command that fixes it; `up --reset-state` is the explicit way to start from the config's
//! versions instead. Refusals exit 1, not 2: nothing is wrong with the command line or the
//! config (2); the operation ran and found the state unusable, as any other failure to open the
//! state does. `restore` exits 4 (conflict) while a daemon runs on the state dir.

use std::os::fd::OwnedFd;
use std::path::Path;

use cutover_config::Settings;
use cutover_store::integrity::{self, StateCheck};
use cutover_store::snapshots::{self, Snapshot};
use serde_json::json;

use crate::exit::{CliError, CliResult, Code};
use crate::output::{err, out};

fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// "restore the newest snapshot (…) with `cutover state restore`", or that there is none.
fn way_back(state_dir: &Path) -> String {
    match snapshots::list(state_dir)
        .ok()
        .and_then(|l| l.into_iter().next())
    {
        Some(s) => format!(
            "restore the newest snapshot ({}, taken {}) with `cutover state restore` (all of them: `cutover state list`)",
            s.name,
            rfc3339(s.taken_at.as_millis())
        ),
        None => format!(
            "there is no snapshot in {} to restore",
            snapshots::dir(state_dir).display()
        ),
    }
}

/// `up`'s check of the state before anything opens it. With `reset`, a damaged database is set
/// aside (kept, renamed) and a lost one accepted: the daemon starts from the config's versions.
pub fn check_at_start(state_dir: &Path, reset: bool) -> CliResult {
    let db = integrity::db_path(state_dir);
    let check = integrity::check(state_dir).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot check the state in {}: {e}", state_dir.display()),
        )
    })?;
    match check {
        StateCheck::Fresh | StateCheck::Sound => Ok(()),
        StateCheck::Damaged { detail } if reset => {
            let aside = integrity::set_aside(state_dir, "damaged").map_err(|e| {
                CliError::new(
                    Code::Failure,
                    format!("cannot move the damaged {} aside: {e}", db.display()),
                )
            })?;
            tracing::warn!(
                damage = %detail,
                kept_as = %aside.map(|p| p.display().to_string()).unwrap_or_default(),
                "--reset-state: the damaged state database was set aside; starting from the config's versions"
            );
            Ok(())
        }
        StateCheck::Damaged { detail } => Err(CliError::new(
            Code::Failure,
            format!(
                "the state database {} is damaged (quick_check: {detail}), so cutover will not start on it: {}; or set it aside and start from the config's versions with `cutover up --reset-state`",
                db.display(),
                way_back(state_dir)
            ),
        )),
        StateCheck::Lost { record } if reset => {
            tracing::warn!(
                last_promoted = %integrity::describe(&record),
                "--reset-state: the state database was missing or empty; starting from the config's versions"
            );
            Ok(())
        }
        StateCheck::Lost { record } => Err(CliError::new(
            Code::Failure,
            format!(
                "the state database {} is missing or empty, but {} says cutover had promoted {}; starting now would deploy the config's versions instead: {}; or accept the config's versions with `cutover up --reset-state`",
                db.display(),
                integrity::record_path(state_dir).display(),
                integrity::describe(&record),
                way_back(state_dir)
            ),
        )),
    }
}

/// The snapshots of `dir`, newest first, or why they cannot be read.
fn list_snapshots(dir: &Path) -> CliResult<Vec<Snapshot>> {
    snapshots::list(dir).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!(
                "cannot list the snapshots in {}: {e}",
                snapshots::dir(dir).display()
            ),
        )
    })
}

/// `cutover state list [--json]`: the snapshots, newest first.
pub fn list(settings: &Settings, json: bool) -> CliResult {
    let dir = &settings.daemon.state_dir;
    let all = list_snapshots(dir)?;
    if json {
        let items: Vec<serde_json::Value> = all
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "path": s.path,
                    "taken_at": rfc3339(s.taken_at.as_millis()),
                    "rollout_id": s.rollout,
                    "bytes": s.bytes,
                })
            })
            .collect();
        return out(json!({ "state_dir": dir, "snapshots": items }));
    }
    if all.is_empty() {
        return out(format!(
            "no snapshots yet in {} (one is taken after every finished rollout)",
            snapshots::dir(dir).display()
        ));
    }
    out(format!(
        "{:<40} {:<21} {:<12} {:>8}",
        "SNAPSHOT", "TAKEN", "AFTER", "SIZE"
    ))?;
    for s in &all {
        out(format!(
            "{:<40} {:<21} {:<12} {:>5} KiB",
            s.name,
            rfc3339(s.taken_at.as_millis()),
            s.rollout
                .map(|r| format!("rollout #{r}"))
                .unwrap_or_default(),
            s.bytes.div_ceil(1024)
        ))?;
    }
    Ok(())
}

/// The state dir's lock, which the keeper of a running daemon holds for the daemon's whole
/// life (across restarts in place): taken, nothing else uses the state dir, and a daemon
/// starting meanwhile waits for it.
fn lock(state_dir: &Path) -> CliResult<OwnedFd> {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    let busy = |who: String| {
        CliError::new(
            Code::Conflict,
            format!(
                "a cutover daemon is running on {} ({who}); stop it first, then run `cutover state restore` again",
                state_dir.display()
            ),
        )
    };
    // The pid file first: a daemon whose keeper could not start holds no lock.
    if let Some(pid) = std::fs::read_to_string(crate::handover::pid_path(state_dir))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|p| *p != std::process::id())
    {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "cutover" {
            return Err(busy(format!("pid {pid}")));
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(canonical.join("keeper.lock"))
        .map_err(|e| {
            CliError::new(
                Code::Failure,
                format!("cannot open the lock in {}: {e}", state_dir.display()),
            )
        })?;
    let fd = OwnedFd::from(file);
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(fd),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(busy("its keeper holds the lock".into())),
        Err(e) => Err(CliError::new(
            Code::Failure,
            format!("cannot lock {}: {e}", state_dir.display()),
        )),
    }
}

/// `cutover state restore [SNAPSHOT]`: the named snapshot, or the newest sound one.
pub fn restore(settings: &Settings, name: Option<&str>) -> CliResult {
    let dir = &settings.daemon.state_dir;
    let _lock = lock(dir)?;
    let all = list_snapshots(dir)?;
    let chosen: Snapshot = match name {
        Some(n) => all
            .iter()
            .find(|s| s.name == n || s.path == Path::new(n))
            .cloned()
            .ok_or_else(|| {
                CliError::new(
                    Code::Usage,
                    format!(
                        "no snapshot {n:?} in {}; `cutover state list` shows them",
                        snapshots::dir(dir).display()
                    ),
                )
            })?,
        None => {
            let mut sound = None;
            for s in &all {
                match integrity::quick_check(&s.path) {
                    Ok(()) => {
                        sound = Some(s.clone());
                        break;
                    }
                    Err(why) => err(format_args!(
                        "cutover: skipping the damaged snapshot {} ({why})",
                        s.name
                    )),
                }
            }
            sound.ok_or_else(|| {
                CliError::new(
                    Code::Failure,
                    format!(
                        "there is no sound snapshot in {} to restore; start from the config's versions with `cutover up --reset-state`",
                        snapshots::dir(dir).display()
                    ),
                )
            })?
        }
    };
    let r = snapshots::restore(dir, &chosen.path).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot restore {}: {e}", chosen.name),
        )
    })?;
    out(format!(
        "restored {} from {} (taken {}{}): {}{}; start the daemon with `cutover up`",
        integrity::db_path(dir).display(),
        chosen.name,
        rfc3339(chosen.taken_at.as_millis()),
        chosen
            .rollout
            .map(|id| format!(", after rollout #{id}"))
            .unwrap_or_default(),
        integrity::describe(&r.record),
        r.set_aside
            .map(|p| format!("; the database it replaced is kept as {}", p.display()))
            .unwrap_or_default()
    ))
}
