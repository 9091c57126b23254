//! Release-safety jobs: the work a rollout's stage calls for (`Command::Run`) — hooks, the
//! backup, the migration, smoke checks, a restore — runs in a task of its own, off the
//! controller loop (a migration may take minutes while status and other services are
//! answered), and comes back as an `Event::JobDone` for the fsm, which decides what follows.
//! Each hook, check, backup and migration is also recorded as it finishes, with its duration
//! and, on failure, the end of its output. The scheduled backups of `[backups] every` run
//! here too, beside any rollout.
//!
//! The driver keeps at most the one job the rollout's stage calls for: a job whose stage was
//! left is stopped (its processes with it). A restore or `migrate_down` waits until the
//! candidate's instances have stopped, so nothing the candidate writes lands after it.

use std::path::PathBuf;

use cutover_core::{BackupSettings, SafetySpec};
use cutover_safety::catalog::Reason;
use cutover_safety::command::{Cmd, Groups, secs};
use cutover_safety::{Catalog, Db, Meta, Target};

use super::*;
use crate::fsm::{BackupRef, Job};

/// What the driver needs to run a service's release-safety work; the binary builds it from
/// the settings.
#[derive(Clone, Debug, Default)]
pub struct SafetySetup {
    pub spec: SafetySpec,
    /// The service's database as cutover reaches it, or why it cannot (a `url_env` variable
    /// that is not set): a backup then fails with that sentence.
    pub database: Option<Result<Target, String>>,
    pub backups: BackupSettings,
    /// The daemon's state dir (canonical): every process a job starts carries its marker, so
    /// the keeper kills it with the daemon and a migration never outlives the daemon that ran
    /// it.
    pub state_dir: Option<PathBuf>,
    /// Where hooks and migrations run: the config file's directory.
    pub workdir: Option<PathBuf>,
    /// Where the processes of this service's jobs are registered while they run; the driver
    /// kills them when it stops or hands over.
    pub groups: Groups,
}

impl SafetySetup {
    fn marker(&self) -> BTreeMap<String, String> {
        self.state_dir
            .iter()
            .map(|d| {
                (
                    cutover_runtime::STATE_DIR_ENV.to_owned(),
                    d.display().to_string(),
                )
            })
            .collect()
    }

    /// The service's database as an operation reaches it.
    fn db(&self, service: &ServiceName) -> Result<Db, String> {
        let spec = self
            .spec
            .database
            .as_ref()
            .ok_or_else(|| format!("{service} has no [services.{service}.database]"))?;
        let target = match &self.database {
            Some(Ok(t)) => t.clone(),
            Some(Err(why)) => return Err(why.clone()),
            None => return Err(format!("the database of {service} is not resolved")),
        };
        Ok(Db {
            service: service.to_string(),
            target,
            catalog: Catalog::new(&self.backups.dir),
            timeout: spec.timeout,
            env: self.marker(),
            groups: Some(self.groups.clone()),
        })
    }
}

/// The job of a rollout that runs now.
pub(super) struct RunningJob {
    seq: u64,
    rollout: i64,
    job: Job,
    task: tokio::task::JoinHandle<()>,
}

impl RunningJob {
    pub(super) fn abort(&self) {
        self.task.abort();
    }
}

/// Everything a job needs, copied out of the driver's state when it starts.
struct JobCtx {
    service: ServiceName,
    rollout: i64,
    job: Job,
    seq: u64,
    stable: Version,
    candidate: Version,
    safety: Arc<SafetySetup>,
    /// The service's env under the rollout's `--env` and the `CUTOVER_*` variables of
    /// docs/reference.md §10.
    env: BTreeMap<String, String>,
    /// Healthy candidate instances, for smoke checks.
    candidates: Vec<(InstanceId, SocketAddr)>,
    backup: Option<BackupRef>,
    tx: mpsc::UnboundedSender<Internal>,
}

impl JobCtx {
    fn fact(&self, kind: EventKind, message: String) {
        let _ = self.tx.send(Internal::Fact {
            service: self.service.clone(),
            rollout: Some(self.rollout),
            kind,
            message,
        });
    }

    fn cmd(&self, argv: &[String], timeout: Duration, phase: &str) -> Cmd {
        let mut c = Cmd::new(argv.to_vec(), timeout);
        c.env = self.env.clone();
        c.env.insert("CUTOVER_PHASE".into(), phase.into());
        c.env.extend(self.safety.marker());
        c.workdir = self.safety.workdir.clone();
        c.groups = Some(self.safety.groups.clone());
        c
    }

    /// Runs the hooks of one hook point in order. `all`: run every one (post_promote,
    /// on_rollback); otherwise the first failure ends them.
    async fn hooks(&self, point: &str, list: &[Vec<String>], all: bool) -> (bool, String) {
        let timeout = self.safety.spec.hooks.timeout;
        let mut failed = Vec::new();
        let mut passed = 0;
        for argv in list {
            let c = self.cmd(argv, timeout, point);
            let ran = cutover_safety::command::run(&c).await;
            let text = format!("{point} hook `{}` {}", c.shown(), ran.describe(timeout));
            if ran.ok() {
                passed += 1;
                self.fact(EventKind::Hook, text);
            } else {
                self.fact(EventKind::HookFailed, text.clone());
                failed.push(text);
                if !all {
                    break;
                }
            }
        }
        if failed.is_empty() {
            (true, format!("{passed} {point} hook(s) passed"))
        } else {
            (false, failed.join("; "))
        }
    }

    async fn smoke(&self) -> (bool, String) {
        let started = std::time::Instant::now();
        let checks = &self.safety.spec.smoke;
        if !checks.is_empty() && self.candidates.is_empty() {
            return (
                false,
                format!("no healthy instance of {} to check", self.candidate),
            );
        }
        for check in checks {
            for (id, addr) in &self.candidates {
                let r = cutover_safety::smoke::check(*addr, check).await;
                let text = format!("smoke check on {id}: {}", r.message);
                if r.ok {
                    self.fact(EventKind::Smoke, text);
                } else {
                    self.fact(EventKind::SmokeFailed, text.clone());
                    return (false, text);
                }
            }
        }
        let hooks = &self.safety.spec.hooks.pre_traffic;
        let (ok, detail) = self.hooks("pre_traffic", hooks, false).await;
        if !ok {
            return (false, detail);
        }
        (
            true,
            format!(
                "{} check(s) on {} instance(s) and {} pre_traffic hook(s) in {}",
                checks.len(),
                self.candidates.len(),
                hooks.len(),
                secs(started.elapsed())
            ),
        )
    }

    async fn backup(&self) -> (bool, String, Option<BackupRef>) {
        let db = match self.safety.db(&self.service) {
            Ok(db) => db,
            Err(e) => {
                self.fact(
                    EventKind::BackupFailed,
                    format!("backup of {}: {e}", self.service),
                );
                return (false, e, None);
            }
        };
        let meta = Meta {
            reason: Some(Reason::BeforeDeploy),
            version: Some(self.stable.to_string()),
            rollout_id: Some(self.rollout),
            pinned: true,
        };
        match db.backup(meta).await {
            Ok(m) => {
                let text = backup_text(&m);
                self.fact(EventKind::Backup, text.clone());
                (
                    true,
                    text,
                    Some(BackupRef {
                        id: m.id,
                        taken_at: Timestamp(m.taken_at),
                    }),
                )
            }
            Err(e) => {
                let text = format!("backup of {} failed: {e}", db.target.describe());
                self.fact(EventKind::BackupFailed, text);
                (false, e.to_string(), None)
            }
        }
    }

    async fn migrate(&self, down: bool) -> (bool, String) {
        let (key, phase) = if down {
            ("migrate_down", "migrate_down")
        } else {
            ("migrate", "migrate")
        };
        let Some(spec) = self.safety.spec.database.as_ref() else {
            return (false, "no database is configured".into());
        };
        let Some(argv) = (if down {
            &spec.migrate_down
        } else {
            &spec.migrate
        }) else {
            return (false, format!("database.{key} is not set"));
        };
        let target = match &self.safety.database {
            Some(Ok(t)) => t.clone(),
            Some(Err(e)) => return (false, e.clone()),
            None => return (false, "the database is not resolved".into()),
        };
        let mut c = self.cmd(argv, spec.timeout, phase);
        c.env.extend(target.migration_env(spec));
        // The service's lock, so that no backup or restore (`cutover backup …` included)
        // touches the database while the migration changes it.
        let catalog = Catalog::new(&self.safety.backups.dir);
        let purpose = format!("{key} for {} (rollout #{})", self.candidate, self.rollout);
        let _lock = match catalog
            .lock(self.service.as_str(), &purpose, spec.timeout)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                let text = format!("{key} did not start: {e}");
                self.fact(EventKind::MigrateFailed, text.clone());
                return (false, text);
            }
        };
        let ran = cutover_safety::command::run(&c).await;
        let text = format!("{key} `{}` {}", c.shown(), ran.describe(spec.timeout));
        self.fact(
            if ran.ok() {
                EventKind::Migrated
            } else {
                EventKind::MigrateFailed
            },
            text.clone(),
        );
        (ran.ok(), text)
    }

    async fn restore(&self) -> (bool, String) {
        let Some(b) = &self.backup else {
            return (false, "the rollout took no backup".into());
        };
        let db = match self.safety.db(&self.service) {
            Ok(db) => db,
            Err(e) => {
                self.fact(EventKind::RestoreFailed, e.clone());
                return (false, e);
            }
        };
        match db.restore(&b.id).await {
            Ok((_, detail)) => {
                self.fact(
                    EventKind::Restored,
                    format!(
                        "{} restored from backup {} ({detail})",
                        db.target.describe(),
                        b.id
                    ),
                );
                (true, detail)
            }
            Err(e) => {
                self.fact(
                    EventKind::RestoreFailed,
                    format!(
                        "restoring {} from backup {} failed: {e}",
                        db.target.describe(),
                        b.id
                    ),
                );
                (false, e.to_string())
            }
        }
    }

    async fn run(self) {
        let hooks = &self.safety.spec.hooks;
        let mut backup = None;
        let (ok, detail) = match self.job {
            Job::PreDeploy => self.hooks("pre_deploy", &hooks.pre_deploy, false).await,
            Job::PostPromote => self.hooks("post_promote", &hooks.post_promote, true).await,
            Job::OnRollback => self.hooks("on_rollback", &hooks.on_rollback, true).await,
            Job::Smoke => self.smoke().await,
            Job::Backup => {
                let (ok, detail, b) = self.backup().await;
                backup = b;
                (ok, detail)
            }
            Job::Migrate => self.migrate(false).await,
            Job::MigrateDown => self.migrate(true).await,
            Job::Restore => self.restore().await,
        };
        let _ = self.tx.send(Internal::JobDone {
            service: self.service.clone(),
            seq: self.seq,
            event: Event::JobDone {
                job: self.job,
                ok,
                detail,
                backup,
            },
        });
    }
}

/// `backup web-… of postgres://shop@db/shop taken in 1.2s: 12.3 MB, sha256 ab12…`.
fn backup_text(m: &cutover_safety::Manifest) -> String {
    format!(
        "backup {} of {} taken in {}: {}, sha256 {}…",
        m.id,
        m.database,
        secs(Duration::from_millis(m.duration_ms)),
        cutover_safety::ops::size(m.bytes),
        m.sha256.get(..12).unwrap_or(&m.sha256)
    )
}

impl Driver {
    /// `Command::Run`: starts the job, or parks a restore (or `migrate_down`) until the
    /// candidate's instances have stopped.
    pub(super) fn run_job(&mut self, name: &ServiceName, job: Job) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(a) = &svc.active else { return };
        if matches!(job, Job::Restore | Job::MigrateDown) && candidate_runs(svc) {
            svc.pending_job = Some((a.rollout.id, job));
            return;
        }
        self.start_job(name, job);
    }

    fn start_job(&mut self, name: &ServiceName, job: Job) {
        let tx = self.internal_tx.clone();
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(a) = &svc.active else { return };
        if let Some(old) = svc.job.take() {
            old.task.abort();
        }
        svc.pending_job = None;
        svc.job_seq += 1;
        let seq = svc.job_seq;
        let r = &a.rollout;
        let cand = r.candidate.clone();
        let candidates: Vec<(InstanceId, SocketAddr)> = svc
            .instances
            .iter()
            .filter(|(_, i)| {
                i.version == cand && cand != r.stable && !i.draining && i.health == Health::Healthy
            })
            .map(|(id, i)| (id.clone(), i.addr))
            .collect();
        let mut env = svc.setup.env.clone();
        env.extend(a.row.env.clone());
        env.insert("CUTOVER_SERVICE".into(), name.to_string());
        env.insert("CUTOVER_VERSION".into(), cand.to_string());
        env.insert("CUTOVER_STABLE_VERSION".into(), r.stable.to_string());
        env.insert("CUTOVER_ROLLOUT_ID".into(), r.id.to_string());
        if let Some((_, addr)) = candidates.first() {
            // The candidate's own address: only it answers there, whatever the weights are.
            env.insert("CUTOVER_CANDIDATE_URL".into(), format!("http://{addr}"));
            env.insert(
                "CUTOVER_CANDIDATE_URLS".into(),
                candidates
                    .iter()
                    .map(|(_, a)| format!("http://{a}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if let Some((outcome, reason)) = r.ending() {
            env.insert("CUTOVER_OUTCOME".into(), outcome.to_string());
            env.insert("CUTOVER_REASON".into(), reason.to_owned());
        }
        let ctx = JobCtx {
            service: name.clone(),
            rollout: r.id,
            job,
            seq,
            stable: r.stable.clone(),
            candidate: cand,
            safety: svc.setup.safety.clone(),
            env,
            candidates,
            backup: r.backup.clone(),
            tx,
        };
        let rollout = r.id;
        let task = tokio::spawn(ctx.run());
        svc.job = Some(RunningJob {
            seq,
            rollout,
            job,
            task,
        });
    }

    /// Keeps only the job the rollout's stage calls for: a job for a stage that was left (an
    /// abort during pre_deploy hooks or smoke checks, a rollout that ended) is stopped.
    pub(super) fn reconcile_job(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let want = svc
            .active
            .as_ref()
            .and_then(|a| a.rollout.job().map(|j| (a.rollout.id, j)));
        if let Some(r) = &svc.job
            && Some((r.rollout, r.job)) != want
        {
            r.task.abort();
            svc.job = None;
        }
        if svc.pending_job.is_some() && svc.pending_job != want {
            svc.pending_job = None;
        }
    }

    /// A parked restore starts once no candidate instance runs any more.
    pub(super) fn start_pending_job(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let Some((rollout, job)) = svc.pending_job else {
            return;
        };
        if candidate_runs(svc) || svc.active.as_ref().map(|a| a.rollout.id) != Some(rollout) {
            return;
        }
        self.start_job(name, job);
    }

    /// A job reported back: its result goes to the fsm, unless the job was replaced since.
    pub(super) async fn on_job_done(&mut self, name: &ServiceName, seq: u64, event: Event) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if svc.job.as_ref().map(|j| j.seq) != Some(seq) {
            return;
        }
        svc.job = None;
        self.feed(name, event).await;
    }

    /// The rollout's backups are no longer its restore point once it ended: `prune` may
    /// apply the policy to them again (also to one taken by a run of its backup that a
    /// restart cut short before its result was saved).
    pub(super) fn unpin_backups(&self, name: &ServiceName, rollout: i64) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let catalog = Catalog::new(&svc.setup.safety.backups.dir);
        for m in catalog.list(Some(name.as_str())).unwrap_or_default() {
            if m.pinned
                && m.rollout_id == Some(rollout)
                && let Err(e) = catalog.pin(name.as_str(), &m.id, false)
            {
                tracing::warn!(service = %name, backup = %m.id, error = %e, "could not unpin a rollout's backup");
            }
        }
    }

    /// Backups pinned as the restore point of a rollout that is no longer in progress (it
    /// was closed while the daemon was down) go back under the `keep` policy.
    pub(super) fn unpin_stale_backups(&self) {
        for (name, svc) in &self.services {
            if svc.setup.safety.spec.database.is_none() {
                continue;
            }
            let catalog = Catalog::new(&svc.setup.safety.backups.dir);
            let active = svc.active.as_ref().map(|a| a.rollout.id);
            for m in catalog.list(Some(name.as_str())).unwrap_or_default() {
                if m.pinned
                    && m.rollout_id != active
                    && let Err(e) = catalog.pin(name.as_str(), &m.id, false)
                {
                    tracing::warn!(backup = %m.id, error = %e, "could not unpin a backup");
                }
            }
        }
    }

    /// Scheduled backups (`[backups] every`): when one is due and none runs, back the
    /// database up, verify the backup (unless `verify = false`) and prune to `keep`.
    pub(super) fn schedule_backups(&mut self, now: Timestamp) {
        let tx = self.internal_tx.clone();
        for (name, svc) in &mut self.services {
            let safety = svc.setup.safety.clone();
            let Some(every) = safety.backups.every else {
                continue;
            };
            if safety.spec.database.is_none() || svc.scheduled.is_some() {
                continue;
            }
            let due = *svc.next_backup.get_or_insert_with(|| {
                // After a restart the schedule goes on from the newest scheduled backup.
                let newest = Catalog::new(&safety.backups.dir)
                    .list(Some(name.as_str()))
                    .ok()
                    .and_then(|l| l.into_iter().find(|m| m.reason == Reason::Scheduled))
                    .map(|m| Timestamp(m.taken_at));
                newest.unwrap_or(now).plus(every)
            });
            if now < due {
                continue;
            }
            svc.next_backup = Some(now.plus(every));
            let (name, version, tx) = (name.clone(), svc.stable.to_string(), tx.clone());
            svc.scheduled = Some(tokio::spawn(scheduled(name, version, safety, tx)));
        }
    }
}

/// A candidate instance still runs (draining ones included).
fn candidate_runs(svc: &Svc) -> bool {
    svc.active.as_ref().is_some_and(|a| {
        a.rollout.candidate != a.rollout.stable
            && svc
                .instances
                .values()
                .any(|i| i.version == a.rollout.candidate)
    })
}

/// One scheduled round for a service: backup, verification, prune.
async fn scheduled(
    service: ServiceName,
    version: String,
    safety: Arc<SafetySetup>,
    tx: mpsc::UnboundedSender<Internal>,
) {
    let fact = |kind, message| {
        let _ = tx.send(Internal::Fact {
            service: service.clone(),
            rollout: None,
            kind,
            message,
        });
    };
    let done = || {
        let _ = tx.send(Internal::ScheduledDone(service.clone()));
    };
    let db = match safety.db(&service) {
        Ok(db) => db,
        Err(e) => {
            fact(
                EventKind::BackupFailed,
                format!("scheduled backup of {service}: {e}"),
            );
            done();
            return;
        }
    };
    let meta = Meta {
        reason: Some(Reason::Scheduled),
        version: Some(version),
        rollout_id: None,
        pinned: false,
    };
    match db.backup(meta).await {
        Ok(m) => {
            fact(EventKind::Backup, format!("scheduled {}", backup_text(&m)));
            if safety.backups.verify {
                match db.verify(&m.id).await {
                    Ok((_, v)) if v.ok => fact(
                        EventKind::BackupVerified,
                        format!("backup {} verified: {}", m.id, v.detail),
                    ),
                    Ok((_, v)) => fact(
                        EventKind::BackupFailed,
                        format!("backup {} FAILED verification: {}", m.id, v.detail),
                    ),
                    Err(e) => fact(
                        EventKind::BackupFailed,
                        format!("backup {} could not be verified: {e}", m.id),
                    ),
                }
            }
        }
        Err(e) => fact(
            EventKind::BackupFailed,
            format!("scheduled backup of {} failed: {e}", db.target.describe()),
        ),
    }
    let catalog = db.catalog.clone();
    let keep = safety.backups.keep;
    let name = service.to_string();
    let pruned = tokio::task::spawn_blocking(move || {
        cutover_safety::ops::prune(&catalog, &name, &keep, &jiff::tz::TimeZone::system(), true)
    })
    .await;
    match pruned {
        Ok(Ok(plan)) => {
            let gone: Vec<String> = plan
                .iter()
                .filter(|(_, d)| !d.keep())
                .map(|(m, _)| m.id.clone())
                .collect();
            if !gone.is_empty() {
                fact(
                    EventKind::BackupPruned,
                    format!(
                        "pruned {} backup(s) of {service} the keep policy no longer wants ({}); {} kept",
                        gone.len(),
                        gone.join(", "),
                        plan.len() - gone.len()
                    ),
                );
            }
        }
        Ok(Err(e)) => fact(
            EventKind::BackupFailed,
            format!("pruning the backups of {service} failed: {e}"),
        ),
        Err(e) => fact(
            EventKind::BackupFailed,
            format!("pruning the backups of {service} failed: {e}"),
        ),
    }
    done();
}
