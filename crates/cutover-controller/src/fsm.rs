//! The rollout state machine: one pure `step` from (spec, rollout, event, now) to the next
//! rollout and the commands that make the world match it.
//!
//! Nothing here does IO or reads a clock: `now` is an argument and every effect is a
//! [`Command`] value that the driver carries out after it has persisted the new state. That is
//! what lets every transition of docs/reference.md §6 be tested in microseconds, and lets a restarted
//! daemon replay a rollout from its checkpoint.
//!
//! The model is declarative, like a Kubernetes controller: commands say how many instances of a
//! version should exist and what share of traffic the candidate gets; the driver reconciles.

use std::time::Duration;

use cutover_core::{
    CanaryStep, DbRollback, NoEvidence, Phase, RolloutOutcome, RolloutSpec, ServiceName,
    StrategyKind, Timestamp, Version, Weight,
};

/// One rollout of a service from `stable` to `candidate`, and where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    pub id: i64,
    /// The service, so that messages can name the command a person should run.
    pub service: ServiceName,
    pub stable: Version,
    pub candidate: Version,
    pub strategy: StrategyKind,
    pub started_at: Timestamp,
    /// Failed analysis evaluations so far; `failure_limit` of them roll back.
    pub failures: u32,
    /// The evidence gathered at the current stage; every stage change starts a new gate.
    pub gate: Gate,
    /// Candidate instances healthy at the last health report: a rolling batch advances only
    /// once its instances are healthy *and* its traffic passed analysis, which arrive apart.
    pub healthy: u32,
    pub stage: Stage,
    /// The backup taken before this rollout changed anything: what a restore goes back to.
    pub backup: Option<BackupRef>,
    /// The rollout changed something (its migration started or its candidate did): only then
    /// does ending it unpromoted run `on_rollback` hooks and database steps.
    pub touched: bool,
}

/// A backup a rollout took, as its restore needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRef {
    /// The catalog's id of the backup.
    pub id: String,
    pub taken_at: Timestamp,
}

/// Release-safety work the driver runs off the controller loop (it may take minutes); its
/// result comes back as [`Event::JobDone`]. Each belongs to exactly one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// `pre_deploy` hooks, in order; the first failure ends them.
    PreDeploy,
    /// A backup of the database, checksummed and put in the catalog.
    Backup,
    /// `migrate`, once.
    Migrate,
    /// Smoke checks against every healthy candidate instance, then `pre_traffic` hooks.
    Smoke,
    /// `post_promote` hooks (their failure is recorded, never rolled back).
    PostPromote,
    /// The rollout's backup restored into the live database.
    Restore,
    /// `migrate_down`.
    MigrateDown,
    /// `on_rollback` hooks.
    OnRollback,
}

impl Job {
    /// How the job is named in messages.
    pub fn label(self) -> &'static str {
        match self {
            Job::PreDeploy => "pre_deploy hooks",
            Job::Backup => "the backup",
            Job::Migrate => "the migration",
            Job::Smoke => "smoke checks and pre_traffic hooks",
            Job::PostPromote => "post_promote hooks",
            Job::Restore => "the restore",
            Job::MigrateDown => "migrate_down",
            Job::OnRollback => "on_rollback hooks",
        }
    }
}

/// What is left to do for a rollout that ends without promotion, in this order: the database
/// (per `on_rollback`, or a restore after a failed migration), then the `on_rollback` hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revert {
    Restore,
    Down,
    Hooks,
}

impl Revert {
    fn job(self) -> Job {
        match self {
            Revert::Restore => Job::Restore,
            Revert::Down => Job::MigrateDown,
            Revert::Hooks => Job::OnRollback,
        }
    }
}

/// What analysis has said at the current stage. A stage that takes analysis advances only
/// after a passing verdict; a failed one blocks it until a later pass (or rolls back at
/// `failure_limit`); without either, `analysis_deadline` ends the wait by `on_no_evidence`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Gate {
    /// When the stage began; `analysis_deadline` counts from here.
    pub since: Timestamp,
    /// The last conclusive verdict at this stage (`Pass` or `Fail`), if any.
    pub last: Option<Verdict>,
    /// The judge's latest reason at this stage, with its counts, for hold and refusal messages.
    pub note: Option<String>,
    /// When the stage last said that it holds for evidence; it says so at most every
    /// [`hold_note_every`], not at every tick.
    pub noted_at: Option<Timestamp>,
}

impl Gate {
    fn new(now: Timestamp) -> Gate {
        Gate {
            since: now,
            ..Gate::default()
        }
    }
}

/// Where a rollout is. Each variant carries only what is valid in it.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// `pre_deploy` hooks run; nothing has changed yet.
    PreDeploy,
    /// The database is backed up; nothing has changed yet.
    BackingUp,
    /// `migrate` runs. It runs once per rollout: a restarted daemon that finds a rollout here
    /// never runs it again (it may have half-run), it restores the backup and fails.
    Migrating,
    /// Candidate instances are starting; they must all be healthy before `deadline`.
    Starting { deadline: Timestamp },
    /// The candidate is healthy and takes no traffic; smoke checks and `pre_traffic` hooks run
    /// against it alone.
    Smoke,
    /// Canary step `step` is applied: the candidate gets `weight`, held at least until
    /// `hold_until` and until analysis passed at this weight.
    Canary {
        step: usize,
        weight: Weight,
        hold_until: Option<Timestamp>,
    },
    /// A rolling update in which `ready` candidate instances have replaced stable ones (they
    /// take `ready / instances` of the traffic); the next batch starts beside them and takes
    /// over once it is healthy and this batch's traffic passed analysis.
    Rolling { ready: u32 },
    /// Blue-green before the switch: the candidate serves only the preview listener and probe
    /// requests while analysis judges it; no user traffic has moved.
    Preview,
    /// Waiting for `cutover promote` at an approval step (canary) or before the switch
    /// (blue-green with `auto_promote = false`).
    AwaitingApproval { step: usize, weight: Weight },
    /// A person paused the rollout, or a stage found no evidence within `analysis_deadline`
    /// with `on_no_evidence = "pause"`; `prior` resumes with `remaining` of its hold left.
    Paused {
        prior: Box<Stage>,
        remaining: Option<Duration>,
    },
    /// The candidate has all traffic; post-promotion analysis judges it. The rollout is
    /// promoted on its first pass (at once without analysis, at `scale_down_at` without a
    /// verdict); the old version stays warm until `scale_down_at` either way.
    Promoting { scale_down_at: Timestamp },
    /// Promoted, with `reason`; the `post_promote` hooks run before the rollout ends.
    PostPromote { reason: String },
    /// Decided against (`outcome`, `reason`): traffic is back on stable and the candidate
    /// stops; `work` runs before the rollout ends.
    Reverting {
        outcome: RolloutOutcome,
        reason: String,
        work: Revert,
    },
    /// The rollout ended.
    Done {
        outcome: RolloutOutcome,
        reason: String,
    },
}

/// What the judge said about one analysis window, as the driver hands it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// Instance health of the rollout's two versions, counted by the driver after any change.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HealthCounts {
    pub candidate_healthy: u32,
    /// Candidate instances that were taken out by health checks (not those still starting).
    pub candidate_unhealthy: u32,
    /// Why the last candidate instance went unhealthy, for the event log.
    pub detail: Option<String>,
}

/// Something that happened, fed to [`step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Time passed: pause holds, deadlines and scale-down delays are checked.
    Tick,
    Health(HealthCounts),
    /// A verdict on the window since the last conclusive one. Only a rollout whose candidate
    /// takes traffic counts it.
    Judged {
        verdict: Verdict,
        reason: String,
    },
    /// A candidate instance could not be started at all (bad command, no such static version).
    StartFailed {
        reason: String,
    },
    /// `cutover promote`: pass the current gate (`full`: go to 100% at once). `force` is
    /// needed when analysis failed at the current stage and has not passed since.
    Promote {
        full: bool,
        force: bool,
    },
    Abort,
    /// `cutover rollback` while the rollout has not ended yet.
    Rollback,
    Pause,
    Resume,
    /// The daemon restarted and found this rollout in progress in its state.
    Resumed,
    /// A job the current stage ran has finished; `detail` says what happened (with durations
    /// and, on failure, the end of the output), `backup` is what a backup job took.
    JobDone {
        job: Job,
        ok: bool,
        detail: String,
        backup: Option<BackupRef>,
    },
}

/// An effect for the driver, which runs them in order after persisting the new state.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Make `instances` instances of `version` run (draining and stopping extra ones).
    Scale { version: Version, instances: u32 },
    /// Give the candidate `weight` of unpinned traffic and the stable version the rest;
    /// `preview` makes the blue-green preview listener serve the candidate.
    Route { candidate: Weight, preview: bool },
    /// Start a new analysis window now: traffic shares just changed.
    ResetAnalysis,
    /// The old version after a promotion: it has no traffic, but its instances keep running
    /// until `at` so that `cutover rollback` is an instant switch; then they stop.
    Retire { version: Version, at: Timestamp },
    /// Record a decision in the event log.
    Record { kind: EventKind, message: String },
    /// Run `job` off the controller loop and report back with [`Event::JobDone`]. A job the
    /// rollout's stage no longer calls for is stopped by the driver, except that nothing
    /// interrupts a migration or a restore (no event leaves those stages but their result).
    Run(Job),
}

/// The kinds of events the controller records (in `cutover-core`, with their names).
pub use cutover_core::EventKind;

/// Why a person's command was not applied; the API answers 409 with this sentence.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Rollout {
    /// A new rollout and the commands that start its candidate.
    pub fn begin(
        spec: &RolloutSpec,
        id: i64,
        service: ServiceName,
        stable: Version,
        candidate: Version,
        now: Timestamp,
    ) -> (Rollout, Vec<Command>) {
        let steps = &spec.steps;
        let stage = if steps.pre_deploy {
            Stage::PreDeploy
        } else if steps.backup {
            Stage::BackingUp
        } else if steps.migrate {
            Stage::Migrating
        } else {
            Stage::Starting {
                deadline: now.plus(spec.progress_deadline),
            }
        };
        let rollout = Rollout {
            id,
            service,
            stable,
            candidate,
            strategy: spec.strategy,
            started_at: now,
            failures: 0,
            gate: Gate::new(now),
            healthy: 0,
            touched: matches!(stage, Stage::Starting { .. } | Stage::Migrating),
            stage,
            backup: None,
        };
        let mut cmds = rollout.world(spec);
        let first: Vec<&str> = [
            (steps.pre_deploy, "pre_deploy hooks"),
            (steps.backup, "a database backup"),
            (steps.migrate, "the migration"),
        ]
        .into_iter()
        .filter_map(|(on, what)| on.then_some(what))
        .collect();
        let then = match first.as_slice() {
            [] => "waiting for {n} candidate instance(s) to pass health checks".to_owned(),
            [one] => {
                format!("first {one}, then {{n}} candidate instance(s) must pass health checks")
            }
            [rest @ .., last] => format!(
                "first {} and {last}, then {{n}} candidate instance(s) must pass health checks",
                rest.join(", ")
            ),
        }
        .replace("{n}", &rollout.instances_to_start(spec).to_string());
        cmds.push(Command::Record {
            kind: EventKind::Started,
            message: format!(
                "{} rollout {} → {} started; {then} (deadline {})",
                rollout.strategy,
                rollout.stable,
                rollout.candidate,
                fmt_duration(spec.progress_deadline)
            ),
        });
        if let Some(job) = rollout.job() {
            cmds.push(Command::Run(job));
        }
        (rollout, cmds)
    }

    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done { .. })
    }

    pub fn outcome(&self) -> RolloutOutcome {
        match &self.stage {
            Stage::Done { outcome, .. } => *outcome,
            _ => RolloutOutcome::InProgress,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match &self.stage {
            Stage::Done { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The job the current stage runs, if any: the driver keeps exactly this one running.
    pub fn job(&self) -> Option<Job> {
        match &self.stage {
            Stage::PreDeploy => Some(Job::PreDeploy),
            Stage::BackingUp => Some(Job::Backup),
            Stage::Migrating => Some(Job::Migrate),
            Stage::Smoke => Some(Job::Smoke),
            Stage::PostPromote { .. } => Some(Job::PostPromote),
            Stage::Reverting { work, .. } => Some(work.job()),
            _ => None,
        }
    }

    /// How a rollout that is ending unpromoted ends, while its last work runs: the outcome
    /// and the reason so far. `on_rollback` hooks are told these.
    pub fn ending(&self) -> Option<(RolloutOutcome, &str)> {
        match &self.stage {
            Stage::Reverting {
                outcome, reason, ..
            } => Some((*outcome, reason)),
            Stage::PostPromote { reason } => Some((RolloutOutcome::Promoted, reason)),
            Stage::Done { outcome, reason } => Some((*outcome, reason)),
            _ => None,
        }
    }

    /// The phase the contract names for this rollout.
    pub fn phase(&self) -> Phase {
        match &self.stage {
            Stage::PreDeploy => Phase::Hooks,
            Stage::BackingUp => Phase::BackingUp,
            Stage::Migrating => Phase::Migrating,
            Stage::Smoke => Phase::Smoke,
            Stage::PostPromote { .. } => Phase::Promoting,
            Stage::Reverting { work, .. } => match work {
                Revert::Restore => Phase::Restoring,
                Revert::Down => Phase::Migrating,
                Revert::Hooks => Phase::Hooks,
            },
            Stage::Starting { .. } => Phase::Starting,
            Stage::Canary { .. } | Stage::Rolling { .. } | Stage::Preview => Phase::Progressing,
            Stage::AwaitingApproval { .. } => Phase::AwaitingApproval,
            Stage::Paused { .. } => Phase::Paused,
            Stage::Promoting { .. } => Phase::Promoting,
            Stage::Done { outcome, .. } => match outcome {
                RolloutOutcome::Promoted => Phase::Promoted,
                RolloutOutcome::RolledBack => Phase::RolledBack,
                RolloutOutcome::Aborted => Phase::Aborted,
                RolloutOutcome::Failed | RolloutOutcome::InProgress => Phase::Failed,
            },
        }
    }

    /// The candidate's share of unpinned traffic in this stage.
    pub fn candidate_weight(&self, spec: &RolloutSpec) -> Weight {
        stage_weight(&self.stage, spec)
    }

    /// `(current step, number of steps)` for canary rollouts, 1-based, for `status`.
    pub fn step_progress(&self, spec: &RolloutSpec) -> Option<(usize, usize)> {
        if self.strategy != StrategyKind::Canary {
            return None;
        }
        let n = spec.canary_steps.len();
        let at = |s: &Stage| match s {
            Stage::Starting { .. } => Some(0),
            Stage::Canary { step, .. } | Stage::AwaitingApproval { step, .. } => Some(step + 1),
            Stage::Promoting { .. } | Stage::Done { .. } => Some(n),
            _ => None,
        };
        let i = match &self.stage {
            Stage::Paused { prior, .. } => at(prior),
            s => at(s),
        };
        i.map(|i| (i, n))
    }

    /// Whether analysis verdicts count now: while the candidate takes unpinned traffic, and
    /// for blue-green while it serves the preview (whose traffic may be only cutover's probes).
    pub fn judging(&self, spec: &RolloutSpec) -> bool {
        spec.analysis.enabled
            && match &self.stage {
                Stage::Starting { .. }
                | Stage::Done { .. }
                | Stage::PreDeploy
                | Stage::BackingUp
                | Stage::Migrating
                | Stage::Smoke
                | Stage::PostPromote { .. }
                | Stage::Reverting { .. } => false,
                Stage::Paused { prior, .. } => self.stage_judged(prior, spec),
                s => self.stage_judged(s, spec),
            }
    }

    fn stage_judged(&self, stage: &Stage, spec: &RolloutSpec) -> bool {
        self.previewing_stage(stage) || stage_weight(stage, spec) > Weight::ZERO
    }

    fn previewing_stage(&self, stage: &Stage) -> bool {
        self.strategy == StrategyKind::BlueGreen
            && matches!(
                stage,
                Stage::Starting { .. }
                    | Stage::Smoke
                    | Stage::Preview
                    | Stage::AwaitingApproval { .. }
            )
    }

    /// Whether the driver should send probe requests to the candidate: a blue-green preview
    /// is judged, and nobody may be using the preview listener. Probes go only to the
    /// candidate, so no user ever sees them.
    pub fn wants_probes(&self, spec: &RolloutSpec) -> bool {
        let stage = match &self.stage {
            Stage::Paused { prior, .. } => prior.as_ref(),
            s => s,
        };
        spec.analysis.enabled
            && !matches!(stage, Stage::Starting { .. } | Stage::Smoke)
            && self.previewing_stage(stage)
    }

    /// Whether the current stage needs a passing verdict to advance: analysis is on for the
    /// service and, for a canary step, not turned off on that step.
    fn stage_needs_verdict(&self, spec: &RolloutSpec) -> bool {
        spec.analysis.enabled
            && match &self.stage {
                Stage::Canary { step, .. } => !matches!(
                    spec.canary_steps.get(*step),
                    Some(CanaryStep::SetWeight {
                        analysis: false,
                        ..
                    })
                ),
                _ => true,
            }
    }

    /// Candidate instances the starting stage waits for.
    fn instances_to_start(&self, spec: &RolloutSpec) -> u32 {
        match self.strategy {
            StrategyKind::Rolling => rolling_batch(spec).min(spec.instances),
            StrategyKind::Canary | StrategyKind::BlueGreen => spec.instances,
        }
    }

    /// The commands that make the world match this rollout: instance counts, then traffic.
    /// Emitted on every stage change and again after a daemon restart.
    fn world(&self, spec: &RolloutSpec) -> Vec<Command> {
        let n = spec.instances;
        // The stable version keeps all its instances until the rollout ends: they serve its
        // share of traffic and stay warm, so a rollback at any point, and within
        // `scale_down_delay` after the switch, is an instant switch back.
        let (candidate, stable) = match &self.stage {
            Stage::Starting { .. } | Stage::Smoke => (self.instances_to_start(spec), n),
            // Before the migration ran, the candidate is not started (and a version kept warm
            // after a promotion is left as it is); the stable version serves everything.
            Stage::PreDeploy | Stage::BackingUp | Stage::Migrating => (0, n),
            Stage::PostPromote { .. } => (n, 0),
            Stage::Reverting { .. } => (0, n),
            Stage::Rolling { ready } => ((*ready + rolling_batch(spec)).min(n), n),
            Stage::Paused { prior, .. } => match prior.as_ref() {
                Stage::Rolling { ready } => (*ready, n),
                _ => (n, n),
            },
            Stage::Canary { .. }
            | Stage::AwaitingApproval { .. }
            | Stage::Preview
            | Stage::Promoting { .. } => (n, n),
            Stage::Done { outcome, .. } => match outcome {
                RolloutOutcome::Promoted => (n, 0),
                _ => (0, n),
            },
        };
        let route = Command::Route {
            candidate: self.candidate_weight(spec),
            preview: self.previewing_stage(&self.stage),
        };
        let scale = |version: &Version, instances| Command::Scale {
            version: version.clone(),
            instances,
        };
        // Order matters for zero-downtime: grow before shifting traffic, shift traffic before
        // shrinking, so no version ever has weight without instances to serve it.
        match &self.stage {
            Stage::PreDeploy | Stage::BackingUp | Stage::Migrating => {
                vec![scale(&self.stable, stable), route]
            }
            // The old version was retired (kept warm) when the promotion was decided.
            Stage::PostPromote { .. } => vec![scale(&self.candidate, candidate), route],
            Stage::Done { outcome, .. } if *outcome != RolloutOutcome::Promoted => vec![
                route,
                scale(&self.stable, stable),
                scale(&self.candidate, candidate),
            ],
            Stage::Reverting { .. } => vec![
                route,
                scale(&self.stable, stable),
                scale(&self.candidate, candidate),
            ],
            _ => vec![
                scale(&self.candidate, candidate),
                scale(&self.stable, stable),
                route,
            ],
        }
    }

    /// A short name of the current stage for messages: `step 2/4 (50%)`, `rolling batch 1/3`.
    fn stage_label(&self, spec: &RolloutSpec) -> String {
        match &self.stage {
            Stage::Canary { step, weight, .. } => {
                format!("step {}/{} ({weight})", step + 1, spec.canary_steps.len())
            }
            Stage::Rolling { ready } => {
                format!(
                    "rolling {ready}/{} instances ({})",
                    spec.instances,
                    self.candidate_weight(spec)
                )
            }
            Stage::Preview | Stage::AwaitingApproval { .. }
                if self.strategy == StrategyKind::BlueGreen =>
            {
                "the blue-green preview".into()
            }
            Stage::AwaitingApproval { step, weight } => {
                format!(
                    "approval step {}/{} ({weight})",
                    step + 1,
                    spec.canary_steps.len()
                )
            }
            Stage::Promoting { .. } => "post-promotion analysis".into(),
            _ => self.phase().to_string(),
        }
    }
}

/// How often a stage that holds for evidence says so: once per analysis interval, but not
/// more than twice a minute, so that a quiet service's history is not a flood.
pub fn hold_note_every(spec: &RolloutSpec) -> Duration {
    spec.analysis.interval.max(Duration::from_secs(30))
}

/// Advances `rollout` by one event. Returns the next state and what to do, or a [`Refusal`]
/// when a person's command does not apply to the current stage (nothing changes then).
pub fn step(
    spec: &RolloutSpec,
    rollout: &Rollout,
    event: &Event,
    now: Timestamp,
) -> Result<(Rollout, Vec<Command>), Refusal> {
    if let Stage::Done { outcome, .. } = &rollout.stage {
        return match event {
            Event::Promote { .. }
            | Event::Abort
            | Event::Rollback
            | Event::Pause
            | Event::Resume => Err(Refusal(format!(
                "rollout {} already ended as {outcome}",
                rollout.id
            ))),
            _ => Ok((rollout.clone(), Vec::new())),
        };
    }
    let mut t = Transition {
        spec,
        now,
        next: rollout.clone(),
        cmds: Vec::new(),
    };
    t.apply(event)?;
    Ok((t.next, t.cmds))
}

/// The working state of one call to [`step`].
struct Transition<'a> {
    spec: &'a RolloutSpec,
    now: Timestamp,
    next: Rollout,
    cmds: Vec<Command>,
}

impl Transition<'_> {
    fn apply(&mut self, event: &Event) -> Result<(), Refusal> {
        match event {
            Event::Tick => self.tick(),
            Event::Health(h) => self.health(h),
            Event::Judged { verdict, reason } => self.judged(*verdict, reason),
            Event::StartFailed { reason } => {
                let reason = format!(
                    "candidate {} could not start: {reason}",
                    self.next.candidate
                );
                match self.next.stage {
                    Stage::Starting { .. } | Stage::Smoke => self.finish(
                        RolloutOutcome::Failed,
                        EventKind::Failed,
                        format!("{reason}; traffic never moved"),
                    ),
                    Stage::Canary { .. }
                    | Stage::Rolling { .. }
                    | Stage::Preview
                    | Stage::AwaitingApproval { .. }
                    | Stage::Paused { .. }
                    | Stage::Promoting { .. } => {
                        self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
                    }
                    // No candidate is meant to run yet, or the rollout is already decided.
                    Stage::PreDeploy
                    | Stage::BackingUp
                    | Stage::Migrating
                    | Stage::PostPromote { .. }
                    | Stage::Reverting { .. }
                    | Stage::Done { .. } => {}
                }
            }
            Event::Promote { full, force } => return self.promote(*full, *force),
            Event::Abort | Event::Rollback if self.uninterruptible().is_some() => {
                return Err(Refusal(self.uninterruptible().unwrap_or_default()));
            }
            Event::Abort => self.finish(
                RolloutOutcome::Aborted,
                EventKind::Aborted,
                match self.next.stage {
                    Stage::PreDeploy | Stage::BackingUp => {
                        "aborted by user before anything changed".into()
                    }
                    _ => "aborted by user".into(),
                },
            ),
            Event::Rollback => self.rollback_requested(),
            Event::Pause => return self.pause(),
            Event::Resume => return self.resume(),
            Event::Resumed => self.resumed(),
            Event::JobDone {
                job,
                ok,
                detail,
                backup,
            } => self.job_done(*job, *ok, detail, backup.clone()),
        }
        Ok(())
    }

    /// Why the rollout cannot be aborted or rolled back now, if it cannot: a migration is
    /// never interrupted half-way, and a rollout that is already ending (or promoted and
    /// running its `post_promote` hooks) has nothing left to stop.
    fn uninterruptible(&self) -> Option<String> {
        let (cand, svc) = (&self.next.candidate, &self.next.service);
        match &self.next.stage {
            Stage::Migrating => Some(format!(
                "the migration for {cand} is running, and a migration is never interrupted half-way; abort once it has finished (database.timeout bounds it)"
            )),
            Stage::Reverting { outcome, work, .. } => Some(format!(
                "rollout {} is already ending as {outcome}; {} {} running",
                self.next.id,
                work.job().label(),
                if matches!(work, Revert::Hooks) {
                    "are"
                } else {
                    "is"
                }
            )),
            Stage::PostPromote { .. } => Some(format!(
                "{cand} is promoted and its post_promote hooks are running; run `cutover rollback {svc}` once they have finished"
            )),
            _ => None,
        }
    }

    fn record(&mut self, kind: EventKind, message: String) {
        self.cmds.push(Command::Record { kind, message });
    }

    /// Moves to `stage` and emits the commands that realise it. A new stage starts with a new
    /// gate and a new analysis window: evidence counts only at the weight it was taken at.
    fn enter(&mut self, stage: Stage) {
        self.next.stage = stage;
        self.next.gate = Gate::new(self.now);
        self.cmds.extend(self.next.world(self.spec));
        self.cmds.push(Command::ResetAnalysis);
        if let Some(job) = self.next.job() {
            self.cmds.push(Command::Run(job));
        }
    }

    /// Ends the rollout unpromoted: traffic back on stable and the candidate stopped at once,
    /// then (for a rollout that changed something) the database per `on_rollback` and the
    /// `on_rollback` hooks, and only then `Done`. The decision is recorded now, saying what
    /// follows; the final reason gathers what each step did.
    fn finish(&mut self, outcome: RolloutOutcome, kind: EventKind, reason: String) {
        let (db, mut note) = self.database_revert();
        let work = db.or_else(|| self.hooks_revert());
        if let Some(w) = work {
            let what = match w {
                Revert::Restore => format!(
                    "restoring the database from backup {}",
                    self.next.backup.as_ref().map_or("?", |b| b.id.as_str())
                ),
                Revert::Down => "running migrate_down".to_owned(),
                Revert::Hooks => "running on_rollback hooks".to_owned(),
            };
            note.push_str(&format!("; {what}"));
        }
        let reason = format!("{reason}{note}");
        self.record(kind, reason.clone());
        self.next.stage = match work {
            None => Stage::Done { outcome, reason },
            Some(work) => Stage::Reverting {
                outcome,
                reason,
                work,
            },
        };
        self.cmds.extend(self.next.world(self.spec));
        if let Some(job) = self.next.job() {
            self.cmds.push(Command::Run(job));
        }
    }

    /// What an unpromoted end does to the database, with a note when it cannot do what
    /// `on_rollback` asks. A failed (or interrupted) migration is always undone from the
    /// backup; otherwise `on_rollback` decides, and only for a rollout that changed something.
    fn database_revert(&self) -> (Option<Revert>, String) {
        let steps = &self.spec.steps;
        let backup = self.next.backup.is_some();
        if matches!(self.next.stage, Stage::Migrating) {
            return if backup {
                (Some(Revert::Restore), String::new())
            } else {
                (
                    None,
                    "; no backup to restore (backup_before_deploy = false): the database is as the migration left it".to_owned(),
                )
            };
        }
        if !self.next.touched {
            return (None, String::new());
        }
        match steps.on_rollback {
            DbRollback::Keep => (None, String::new()),
            DbRollback::Restore if backup => (Some(Revert::Restore), String::new()),
            DbRollback::Restore => (
                None,
                "; on_rollback = \"restore\" but this rollout took no backup: the database is kept as it is".to_owned(),
            ),
            DbRollback::Down if steps.migrate && steps.migrate_down => {
                (Some(Revert::Down), String::new())
            }
            DbRollback::Down => (None, String::new()),
        }
    }

    fn hooks_revert(&self) -> Option<Revert> {
        (self.next.touched && self.spec.steps.on_rollback_hooks).then_some(Revert::Hooks)
    }

    /// The stage after `pre_deploy` hooks, the backup or the migration: the next configured
    /// one, and finally the candidate's start.
    fn after_preparation(&mut self, done: Job) {
        let steps = self.spec.steps;
        let next = match done {
            Job::PreDeploy if steps.backup => Some(Stage::BackingUp),
            Job::PreDeploy | Job::Backup if steps.migrate => Some(Stage::Migrating),
            _ => None,
        };
        match next {
            Some(stage) => {
                if matches!(stage, Stage::Migrating) {
                    self.next.touched = true;
                }
                self.enter(stage);
            }
            None => self.start_candidate(),
        }
    }

    fn start_candidate(&mut self) {
        self.next.touched = true;
        let want = self.next.instances_to_start(self.spec);
        self.record(
            EventKind::Step,
            format!(
                "starting {want} candidate instance(s) of {}; they must pass health checks within {}",
                self.next.candidate,
                fmt_duration(self.spec.progress_deadline)
            ),
        );
        self.enter(Stage::Starting {
            deadline: self.now.plus(self.spec.progress_deadline),
        });
    }

    fn job_done(&mut self, job: Job, ok: bool, detail: &str, backup: Option<BackupRef>) {
        // A result for another stage (one left since, or from before a restart) is stale.
        if self.next.job() != Some(job) {
            return;
        }
        let cand = self.next.candidate.clone();
        match job {
            Job::PreDeploy | Job::Backup | Job::Migrate if ok => {
                if job == Job::Backup {
                    self.next.backup = backup;
                }
                self.after_preparation(job);
            }
            Job::PreDeploy => self.finish(
                RolloutOutcome::Failed,
                EventKind::Failed,
                format!("pre_deploy hook failed: {detail}; nothing changed"),
            ),
            Job::Backup => self.finish(
                RolloutOutcome::Failed,
                EventKind::Failed,
                format!(
                    "the backup before the deploy failed: {detail}; nothing changed, so the deploy is refused"
                ),
            ),
            Job::Migrate => self.finish(
                RolloutOutcome::Failed,
                EventKind::Failed,
                format!("the migration for {cand} failed: {detail}; no candidate instance was started"),
            ),
            Job::Smoke if ok => {
                self.record(
                    EventKind::Step,
                    format!("{cand} passed its smoke checks and pre_traffic hooks at 0%: {detail}"),
                );
                self.traffic_begins();
            }
            Job::Smoke => self.finish(
                RolloutOutcome::Failed,
                EventKind::Failed,
                format!("smoke check failed: {detail}; traffic never moved to {cand}"),
            ),
            Job::PostPromote => {
                let Stage::PostPromote { reason } = self.next.stage.clone() else {
                    return;
                };
                let reason = if ok {
                    reason
                } else {
                    format!("{reason}; a post_promote hook failed (recorded, not rolled back): {detail}")
                };
                self.next.stage = Stage::Done {
                    outcome: RolloutOutcome::Promoted,
                    reason,
                };
            }
            Job::Restore | Job::MigrateDown | Job::OnRollback => self.revert_done(job, ok, detail),
        }
    }

    /// One piece of an unpromoted end finished: note it in the reason, then the next piece,
    /// or the end.
    fn revert_done(&mut self, job: Job, ok: bool, detail: &str) {
        let Stage::Reverting {
            outcome,
            mut reason,
            work,
        } = self.next.stage.clone()
        else {
            return;
        };
        let svc = &self.next.service;
        match (job, ok) {
            (Job::Restore, true) => {
                let (id, ago) = self.backup_age();
                reason.push_str(&format!(
                    "; database restored from backup {id} ({detail}): writes made since it was taken {ago} ago are lost"
                ));
            }
            (Job::Restore, false) => {
                let (id, _) = self.backup_age();
                reason.push_str(&format!(
                    "; RESTORING THE DATABASE FAILED: {detail}; it is as the rollout left it; try `cutover backup restore {svc} {id} --yes`"
                ));
            }
            (Job::MigrateDown, true) => reason.push_str(&format!("; migrate_down ran: {detail}")),
            (Job::MigrateDown, false) => {
                reason.push_str(&format!("; MIGRATE_DOWN FAILED: {detail}"));
            }
            (_, true) => reason.push_str("; on_rollback hooks ran"),
            (_, false) => reason.push_str(&format!("; an on_rollback hook failed: {detail}")),
        }
        let next = match work {
            Revert::Restore | Revert::Down => self.hooks_revert(),
            Revert::Hooks => None,
        };
        match next {
            Some(work) => {
                self.next.stage = Stage::Reverting {
                    outcome,
                    reason,
                    work,
                };
                self.cmds.push(Command::Run(work.job()));
            }
            None => self.next.stage = Stage::Done { outcome, reason },
        }
    }

    /// The rollout's backup id and how long before now it was taken (`12 min`, `40s`).
    fn backup_age(&self) -> (String, String) {
        match &self.next.backup {
            Some(b) => {
                let age = self.now.since(b.taken_at);
                let text = if age.as_secs() >= 120 {
                    format!("{} min", age.as_secs() / 60)
                } else {
                    fmt_duration(Duration::from_secs(age.as_secs()))
                };
                (b.id.clone(), text)
            }
            None => ("?".to_owned(), "?".to_owned()),
        }
    }

    fn tick(&mut self) {
        match self.next.stage.clone() {
            Stage::Starting { deadline } if self.now >= deadline => {
                let reason = format!(
                    "candidate {} not healthy within progress_deadline {}{}; traffic never moved",
                    self.next.candidate,
                    fmt_duration(self.spec.progress_deadline),
                    self.next
                        .gate
                        .note
                        .as_deref()
                        .map(|n| format!(" (last: {n})"))
                        .unwrap_or_default()
                );
                self.finish(RolloutOutcome::Failed, EventKind::Failed, reason);
            }
            _ => self.try_advance(),
        }
    }

    /// Advances the stage if everything but evidence says it is due (its pause elapsed, its
    /// batch is healthy, its preview is up, its scale-down delay passed) and the evidence
    /// allows it; otherwise holds, says so, and applies `analysis_deadline`.
    fn try_advance(&mut self) {
        let n = self.spec.instances;
        if let Stage::Promoting { scale_down_at } = self.next.stage {
            self.promoting(scale_down_at);
            return;
        }
        let due = match &self.next.stage {
            Stage::Canary { hold_until, .. } => hold_until.is_none_or(|t| self.now >= t),
            Stage::Rolling { ready } => {
                *ready >= n || self.next.healthy >= (ready + rolling_batch(self.spec)).min(n)
            }
            Stage::Preview => true,
            _ => false,
        };
        if !due {
            return;
        }
        let gate = &self.next.gate;
        if !self.next.stage_needs_verdict(self.spec) || gate.last == Some(Verdict::Pass) {
            self.advance();
            return;
        }
        self.hold();
    }

    /// Post-promotion: the switch was decided on evidence, so a pass at 100% (or no analysis)
    /// ends the rollout at once, and without a verdict it ends at `scale_down_at`; a failed
    /// evaluation holds it until a later pass, `failure_limit` or `analysis_deadline`.
    fn promoting(&mut self, scale_down_at: Timestamp) {
        let last = self.next.gate.last;
        if !self.spec.analysis.enabled
            || last == Some(Verdict::Pass)
            || (last.is_none() && self.now >= scale_down_at)
        {
            self.finish_promoted(scale_down_at);
        } else if last == Some(Verdict::Fail) && self.now >= scale_down_at {
            self.hold();
        }
    }

    /// The stage is due but has no passing verdict: say so now and then, and end the wait at
    /// `analysis_deadline`.
    fn hold(&mut self) {
        let gate = &self.next.gate;
        let waited = self.now.since(gate.since);
        if waited >= self.spec.analysis.deadline {
            self.no_evidence();
        } else if gate
            .noted_at
            .is_none_or(|t| self.now.since(t) >= hold_note_every(self.spec))
        {
            let label = self.next.stage_label(self.spec);
            let why = match (gate.last, gate.note.as_deref()) {
                (Some(Verdict::Fail), note) => format!(
                    "analysis failed here and has not passed since{}",
                    note.map(|n| format!(" ({n})")).unwrap_or_default()
                ),
                (_, Some(note)) => format!("no passing verdict yet: {note}"),
                (_, None) => "no verdict yet".to_owned(),
            };
            let left = fmt_duration(self.spec.analysis.deadline.saturating_sub(waited));
            self.next.gate.noted_at = Some(self.now);
            self.record(
                EventKind::Holding,
                format!(
                    "{label} holds {}: {why}; analysis_deadline ends the wait in {left}",
                    self.next.candidate
                ),
            );
        }
    }

    /// The stage is done: the strategy says what comes next.
    fn advance(&mut self) {
        match self.next.stage.clone() {
            Stage::Canary { step, .. } => self.canary_step(step + 1),
            Stage::Rolling { ready } => {
                let n = self.spec.instances;
                if ready >= n {
                    self.promote_now("every instance replaced and judged");
                } else {
                    self.rolling_to((ready + rolling_batch(self.spec)).min(n));
                }
            }
            Stage::Preview => {
                if self.spec.blue_green.auto_promote {
                    self.promote_now("auto_promote: candidate healthy and its preview judged");
                } else {
                    let svc = self.next.service.clone();
                    self.record(
                        EventKind::AwaitingApproval,
                        format!(
                            "candidate {} healthy on the preview listener; run `cutover promote {svc}` to switch",
                            self.next.candidate
                        ),
                    );
                    self.enter(Stage::AwaitingApproval {
                        step: 0,
                        weight: Weight::ZERO,
                    });
                }
            }
            Stage::Promoting { scale_down_at } => self.finish_promoted(scale_down_at),
            _ => {}
        }
    }

    /// The rollout is promoted: the candidate is the new stable version, and the old one
    /// stays warm, out of traffic, until `scale_down_at`.
    fn finish_promoted(&mut self, scale_down_at: Timestamp) {
        let (cand, old, svc) = (
            self.next.candidate.clone(),
            self.next.stable.clone(),
            self.next.service.clone(),
        );
        let warm = if scale_down_at > self.now {
            format!(
                "; {old} stays warm for {} (`cutover rollback {svc}` switches back at once)",
                fmt_duration(scale_down_at.since(self.now))
            )
        } else {
            format!("; {old} {}", gone(self.spec))
        };
        let why = match self.next.gate.last {
            Some(Verdict::Pass) => "post-promotion analysis passed",
            _ if !self.spec.analysis.enabled => "analysis off",
            _ => "no post-promotion verdict against it within scale_down_delay",
        };
        let reason = format!("promoted {cand} ({why}): all traffic on it{warm}");
        self.record(EventKind::Promoted, reason.clone());
        self.next.stage = if self.spec.steps.post_promote {
            Stage::PostPromote { reason }
        } else {
            Stage::Done {
                outcome: RolloutOutcome::Promoted,
                reason,
            }
        };
        let n = self.spec.instances;
        self.cmds.push(Command::Scale {
            version: cand,
            instances: n,
        });
        self.cmds.push(Command::Route {
            candidate: Weight::FULL,
            preview: false,
        });
        self.cmds.push(Command::Retire {
            version: old,
            at: scale_down_at,
        });
        if let Some(job) = self.next.job() {
            self.cmds.push(Command::Run(job));
        }
    }

    /// `analysis_deadline` passed at a stage that was due to advance but had no passing verdict.
    fn no_evidence(&mut self) {
        let label = self.next.stage_label(self.spec);
        let deadline = fmt_duration(self.spec.analysis.deadline);
        let cand = self.next.candidate.clone();
        if self.next.gate.last == Some(Verdict::Fail) {
            let reason = format!(
                "analysis of {cand} failed at {label} and did not pass again within analysis_deadline {deadline}{}",
                self.next
                    .gate
                    .note
                    .as_deref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            );
            self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
            return;
        }
        let what = format!(
            "no verdict on {cand} at {label} within analysis_deadline {deadline} ({})",
            self.next
                .gate
                .note
                .as_deref()
                .unwrap_or("no analysis window completed")
        );
        let svc = self.next.service.clone();
        match self.spec.analysis.on_no_evidence {
            NoEvidence::Rollback => {
                let reason = format!("{what}; rolled back (on_no_evidence = \"rollback\")");
                self.record(EventKind::NoEvidence, reason.clone());
                self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
            }
            NoEvidence::Pause => {
                self.record(
                    EventKind::NoEvidence,
                    format!(
                        "{what}; paused (on_no_evidence = \"pause\"): run `cutover promote {svc}` to advance without a verdict, `cutover resume {svc}` to wait another {deadline}, or `cutover abort {svc}`"
                    ),
                );
                let remaining = None;
                self.next.stage = Stage::Paused {
                    prior: Box::new(self.next.stage.clone()),
                    remaining,
                };
            }
            NoEvidence::Promote => {
                self.record(
                    EventKind::NoEvidence,
                    format!("{what}; advancing without a verdict (on_no_evidence = \"promote\")"),
                );
                self.advance();
            }
        }
    }

    fn health(&mut self, h: &HealthCounts) {
        self.next.healthy = h.candidate_healthy;
        match self.next.stage.clone() {
            Stage::Starting { .. } => {
                // Why the candidate is not healthy yet, for the deadline's message.
                if let Some(d) = &h.detail {
                    self.next.gate.note = Some(d.clone());
                }
                let want = self.next.instances_to_start(self.spec);
                if h.candidate_healthy >= want {
                    self.record(
                        EventKind::Ready,
                        format!(
                            "candidate {} ready: {}/{} instances healthy",
                            self.next.candidate, h.candidate_healthy, want
                        ),
                    );
                    self.after_ready();
                }
            }
            Stage::Done { .. }
            | Stage::PreDeploy
            | Stage::BackingUp
            | Stage::Migrating
            | Stage::PostPromote { .. }
            | Stage::Reverting { .. } => {}
            Stage::Smoke if h.candidate_unhealthy > 0 => {
                let reason = format!(
                    "health check failed at 0% during smoke checks: {} of candidate {}'s instances unhealthy{}; traffic never moved",
                    h.candidate_unhealthy,
                    self.next.candidate,
                    h.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
                self.record(EventKind::HealthFailed, reason.clone());
                self.finish(RolloutOutcome::Failed, EventKind::Failed, reason);
            }
            _ if h.candidate_unhealthy > 0 => {
                let reason = format!(
                    "health check failed: {} of candidate {}'s instances unhealthy{}",
                    h.candidate_unhealthy,
                    self.next.candidate,
                    h.detail
                        .as_deref()
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                );
                self.record(EventKind::HealthFailed, reason.clone());
                self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
            }
            Stage::Rolling { .. } => self.try_advance(),
            _ => {}
        }
    }

    /// The candidate passed its health checks: smoke checks first when there are any, else
    /// the strategy decides what comes next.
    fn after_ready(&mut self) {
        if self.spec.steps.smoke {
            self.record(
                EventKind::Step,
                format!(
                    "smoke checks and pre_traffic hooks run against {} alone before any traffic moves",
                    self.next.candidate
                ),
            );
            self.enter(Stage::Smoke);
            return;
        }
        self.traffic_begins();
    }

    /// The candidate is ready for traffic: the strategy decides what comes next.
    fn traffic_begins(&mut self) {
        match self.next.strategy {
            StrategyKind::Canary => self.canary_step(0),
            StrategyKind::BlueGreen => {
                if self.spec.analysis.enabled {
                    self.record(
                        EventKind::Step,
                        format!(
                            "preview of {}: judging it on preview and probe traffic before any user traffic moves",
                            self.next.candidate
                        ),
                    );
                }
                self.enter(Stage::Preview);
                self.try_advance();
            }
            StrategyKind::Rolling => {
                let first = rolling_batch(self.spec).min(self.spec.instances);
                self.rolling_to(first);
            }
        }
    }

    fn rolling_to(&mut self, ready: u32) {
        let n = self.spec.instances;
        self.record(
            EventKind::Step,
            format!(
                "rolling: {ready}/{n} instances on {} ({} of traffic){}",
                self.next.candidate,
                stage_weight(&Stage::Rolling { ready }, self.spec),
                if self.next.stage_needs_verdict(self.spec) {
                    "; judged before the next batch"
                } else {
                    ""
                }
            ),
        );
        self.enter(Stage::Rolling { ready });
    }

    /// Applies canary step `i`, or promotes when the steps are exhausted.
    fn canary_step(&mut self, i: usize) {
        let Some(step) = self.spec.canary_steps.get(i) else {
            self.promote_now("all canary steps passed");
            return;
        };
        let n = self.spec.canary_steps.len();
        match step {
            CanaryStep::SetWeight {
                weight,
                pause,
                analysis,
            } => {
                if *weight == Weight::FULL && pause.is_none() && i + 1 == n {
                    self.promote_now("final step: 100%");
                    return;
                }
                let hold = pause
                    .map(|p| format!(", holding at least {}", fmt_duration(p)))
                    .unwrap_or_default();
                let gate = if self.spec.analysis.enabled && *analysis {
                    " and until analysis passes at this weight"
                } else {
                    "; unanalysed (analysis = false)"
                };
                self.record(
                    EventKind::Step,
                    format!(
                        "step {}/{n}: {} gets {weight} of traffic{hold}{gate}",
                        i + 1,
                        self.next.candidate
                    ),
                );
                self.enter(Stage::Canary {
                    step: i,
                    weight: *weight,
                    hold_until: pause.map(|p| self.now.plus(p)),
                });
            }
            CanaryStep::Approve => {
                let weight = self.next.candidate_weight(self.spec);
                let svc = self.next.service.clone();
                self.record(
                    EventKind::AwaitingApproval,
                    format!(
                        "step {}/{n}: waiting for approval at {weight}; run `cutover promote {svc}`",
                        i + 1
                    ),
                );
                self.enter(Stage::AwaitingApproval { step: i, weight });
            }
        }
    }

    fn promote_now(&mut self, why: &str) {
        let delay = self.spec.scale_down_delay;
        let keep = if delay.is_zero() {
            String::new()
        } else {
            format!(
                "; {} kept warm for {} for instant rollback{}",
                self.next.stable,
                fmt_duration(delay),
                if self.spec.analysis.enabled {
                    ", while post-promotion analysis judges"
                } else {
                    ""
                }
            )
        };
        self.record(
            EventKind::Promoting,
            format!(
                "promoting {}: {why}; 100% of traffic{keep}",
                self.next.candidate
            ),
        );
        self.enter(Stage::Promoting {
            scale_down_at: self.now.plus(delay),
        });
    }

    fn judged(&mut self, verdict: Verdict, reason: &str) {
        if !self.next.judging(self.spec) {
            return;
        }
        self.next.gate.note = Some(reason.to_owned());
        match verdict {
            Verdict::Inconclusive => {}
            Verdict::Pass => {
                self.next.gate.last = Some(Verdict::Pass);
                self.record(
                    EventKind::AnalysisPassed,
                    format!("analysis passed: {reason}"),
                );
                self.cmds.push(Command::ResetAnalysis);
            }
            Verdict::Fail => {
                self.next.failures += 1;
                self.next.gate.last = Some(Verdict::Fail);
                let limit = self.spec.analysis.failure_limit.max(1);
                let msg = format!("analysis failed ({}/{limit}): {reason}", self.next.failures);
                self.record(EventKind::AnalysisFailed, msg.clone());
                // No reset after a failure: the evidence stands and the window keeps growing,
                // so a bad candidate fails again at the next evaluation with more data, while a
                // fluke is diluted by it. Until a later pass the stage cannot advance.
                if self.next.failures >= limit {
                    let reason = if self.next.previewing_stage(&self.next.stage) {
                        format!(
                            "{msg}; no user traffic ever moved to {}",
                            self.next.candidate
                        )
                    } else {
                        msg
                    };
                    self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
                    return;
                }
            }
        }
        // Evidence may be the last thing a due stage was waiting for.
        if !matches!(self.next.stage, Stage::Paused { .. }) {
            self.try_advance();
        }
    }

    fn promote(&mut self, full: bool, force: bool) -> Result<(), Refusal> {
        let stage = match self.next.stage.clone() {
            Stage::Paused { prior, .. } => *prior,
            s => s,
        };
        match stage {
            Stage::Starting { .. } => {
                return Err(Refusal(format!(
                    "candidate {} is still starting; promote once it is healthy",
                    self.next.candidate
                )));
            }
            Stage::PreDeploy | Stage::BackingUp | Stage::Migrating | Stage::Smoke => {
                return Err(Refusal(format!(
                    "the rollout of {} is at {} and the candidate takes no traffic yet; promote once it does",
                    self.next.candidate,
                    self.next.phase()
                )));
            }
            Stage::PostPromote { .. } | Stage::Reverting { .. } => {
                return Err(Refusal(format!(
                    "rollout {} is already decided; nothing to promote",
                    self.next.id
                )));
            }
            Stage::Promoting { .. } => {
                return Err(Refusal("the rollout is already promoting".into()));
            }
            _ => {}
        }
        if self.next.gate.last == Some(Verdict::Fail) && !force {
            let svc = &self.next.service;
            return Err(Refusal(format!(
                "analysis of {} failed at {} and has not passed since ({}); run `cutover promote {svc} --force` to promote it anyway, or `cutover abort {svc}`",
                self.next.candidate,
                self.next.stage_label(self.spec),
                self.next.gate.note.as_deref().unwrap_or("no details")
            )));
        }
        let forced = if force && self.next.gate.last == Some(Verdict::Fail) {
            " (--force over a failed analysis)"
        } else {
            ""
        };
        // A paused stage is left for the one promote leads to.
        self.next.stage = stage.clone();
        match stage {
            _ if full => {
                self.record(
                    EventKind::Approved,
                    format!("promote --full by user: skipping remaining steps{forced}"),
                );
                self.promote_now("promoted in full by user");
            }
            Stage::AwaitingApproval { step, .. } => {
                self.record(
                    EventKind::Approved,
                    format!("step {} approved by user{forced}", step + 1),
                );
                match self.next.strategy {
                    StrategyKind::Canary => self.canary_step(step + 1),
                    _ => self.promote_now("approved by user"),
                }
            }
            Stage::Canary { step, .. } => {
                self.record(
                    EventKind::Approved,
                    format!("step {} passed by user{forced}", step + 1),
                );
                self.canary_step(step + 1);
            }
            Stage::Rolling { ready } => {
                self.record(
                    EventKind::Approved,
                    format!("rolling batch passed by user{forced}"),
                );
                if ready >= self.spec.instances {
                    self.promote_now("every instance replaced; promoted by user");
                } else {
                    let target = (ready + rolling_batch(self.spec)).min(self.spec.instances);
                    self.rolling_to(target);
                }
            }
            Stage::Preview => {
                self.record(
                    EventKind::Approved,
                    format!("preview approved by user{forced}"),
                );
                self.promote_now("approved by user");
            }
            Stage::Starting { .. }
            | Stage::Promoting { .. }
            | Stage::Paused { .. }
            | Stage::Done { .. }
            | Stage::PreDeploy
            | Stage::BackingUp
            | Stage::Migrating
            | Stage::Smoke
            | Stage::PostPromote { .. }
            | Stage::Reverting { .. } => {}
        }
        Ok(())
    }

    fn rollback_requested(&mut self) {
        if matches!(self.next.stage, Stage::Promoting { .. }) {
            let reason = format!(
                "rollback by user: traffic back on {} (kept warm), {} {}",
                self.next.stable,
                self.next.candidate,
                gone(self.spec)
            );
            self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
        } else {
            self.finish(
                RolloutOutcome::Aborted,
                EventKind::Aborted,
                "rollback by user before promotion: traffic back on stable".into(),
            );
        }
    }

    fn pause(&mut self) -> Result<(), Refusal> {
        let remaining = match &self.next.stage {
            Stage::Canary { hold_until, .. } => hold_until.map(|t| t.since(self.now)),
            Stage::Rolling { .. } | Stage::AwaitingApproval { .. } | Stage::Preview => None,
            Stage::Paused { .. } => return Err(Refusal("the rollout is already paused".into())),
            Stage::Starting { .. } => {
                return Err(Refusal(
                    "the candidate is still starting; pause once it takes traffic".into(),
                ));
            }
            Stage::PreDeploy | Stage::BackingUp | Stage::Migrating | Stage::Smoke => {
                return Err(Refusal(format!(
                    "the rollout is at {} and the candidate takes no traffic yet; pause once it does",
                    self.next.phase()
                )));
            }
            Stage::Reverting { .. } => {
                return Err(Refusal("the rollout is already ending".into()));
            }
            Stage::Promoting { .. } | Stage::PostPromote { .. } | Stage::Done { .. } => {
                return Err(Refusal(
                    "the rollout is promoting; nothing left to pause".into(),
                ));
            }
        };
        self.record(EventKind::Paused, "paused by user".into());
        self.next.stage = Stage::Paused {
            prior: Box::new(self.next.stage.clone()),
            remaining,
        };
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Refusal> {
        let Stage::Paused { prior, remaining } = self.next.stage.clone() else {
            return Err(Refusal("the rollout is not paused".into()));
        };
        let prior = match *prior {
            Stage::Canary { step, weight, .. } => Stage::Canary {
                step,
                weight,
                hold_until: remaining.map(|r| self.now.plus(r)),
            },
            other => other,
        };
        self.record(EventKind::Resumed, "resumed by user".into());
        self.next.stage = prior;
        // A resumed stage gets a fresh analysis_deadline; the evidence it has stands.
        self.next.gate.since = self.now;
        self.next.gate.noted_at = None;
        self.try_advance();
        Ok(())
    }

    /// After a daemon restart: timers restart from now, instances and traffic are re-applied.
    /// The gate starts anew too: the metrics that backed its verdicts died with the daemon.
    fn resumed(&mut self) {
        let cand = self.next.candidate.clone();
        match self.next.stage.clone() {
            // The migration may have half-run: it is never run again. The backup undoes
            // whatever it did (`finish` restores it), and the rollout fails, saying why.
            Stage::Migrating => {
                self.record(
                    EventKind::Restarted,
                    format!("daemon restarted during the migration for {cand}"),
                );
                self.finish(
                    RolloutOutcome::Failed,
                    EventKind::Failed,
                    format!(
                        "the daemon stopped while the migration for {cand} was running; it may have half-run and a migration is never run twice for one rollout; deploy again to retry it"
                    ),
                );
                return;
            }
            // The same holds for migrate_down; a restore is redone instead (below).
            Stage::Reverting {
                outcome,
                mut reason,
                work: Revert::Down,
            } => {
                let svc = self.next.service.clone();
                self.record(
                    EventKind::Restarted,
                    format!("daemon restarted during migrate_down for {cand}"),
                );
                reason.push_str(&format!(
                    "; the daemon stopped while migrate_down ran: it is not run twice, so check the database{}",
                    self.next
                        .backup
                        .as_ref()
                        .map(|b| format!(" (or restore backup {}: `cutover backup restore {svc} {} --yes`)", b.id, b.id))
                        .unwrap_or_default()
                ));
                self.cmds.extend(self.next.world(self.spec));
                match self.hooks_revert() {
                    Some(work) => {
                        self.next.stage = Stage::Reverting {
                            outcome,
                            reason,
                            work,
                        };
                        self.cmds.push(Command::Run(work.job()));
                    }
                    None => self.next.stage = Stage::Done { outcome, reason },
                }
                return;
            }
            _ => {}
        }
        let restart = |stage: &Stage, now: Timestamp, spec: &RolloutSpec| match stage {
            // A candidate being smoke-tested starts again like any other: it must be healthy
            // again before its checks run again.
            Stage::Starting { .. } | Stage::Smoke => Stage::Starting {
                deadline: now.plus(spec.progress_deadline),
            },
            Stage::Canary {
                step,
                weight,
                hold_until,
            } => Stage::Canary {
                step: *step,
                weight: *weight,
                hold_until: hold_until.and(step_pause(spec, *step)).map(|p| now.plus(p)),
            },
            Stage::Promoting { .. } => Stage::Promoting {
                scale_down_at: now.plus(spec.scale_down_delay),
            },
            other => other.clone(),
        };
        let stage = restart(&self.next.stage, self.now, self.spec);
        self.record(
            EventKind::Restarted,
            format!(
                "daemon restarted; resuming {} at {}",
                self.next.candidate,
                self.next.phase()
            ),
        );
        self.next.healthy = 0;
        self.enter(stage);
    }
}

/// What happens to a version that leaves: its instances stop, or, when something else runs
/// them (static), it only gets no more traffic.
fn gone(spec: &RolloutSpec) -> &'static str {
    if spec.runs_instances {
        "stopped"
    } else {
        "gets no more traffic"
    }
}

fn step_pause(spec: &RolloutSpec, step: usize) -> Option<Duration> {
    match spec.canary_steps.get(step) {
        Some(CanaryStep::SetWeight { pause, .. }) => *pause,
        _ => None,
    }
}

fn stage_weight(stage: &Stage, spec: &RolloutSpec) -> Weight {
    match stage {
        Stage::Starting { .. }
        | Stage::Preview
        | Stage::PreDeploy
        | Stage::BackingUp
        | Stage::Migrating
        | Stage::Smoke
        | Stage::Reverting { .. } => Weight::ZERO,
        Stage::PostPromote { .. } => Weight::FULL,
        Stage::Canary { weight, .. } | Stage::AwaitingApproval { weight, .. } => *weight,
        Stage::Rolling { ready } => {
            let n = spec.instances.max(1);
            Weight::new(ready.saturating_mul(100) / n).unwrap_or(Weight::FULL)
        }
        Stage::Paused { prior, .. } => stage_weight(prior, spec),
        Stage::Promoting { .. } => Weight::FULL,
        Stage::Done { outcome, .. } => match outcome {
            RolloutOutcome::Promoted => Weight::FULL,
            _ => Weight::ZERO,
        },
    }
}

/// Instances replaced per rolling batch: at least one, at most what surge or unavailability allow.
fn rolling_batch(spec: &RolloutSpec) -> u32 {
    spec.rolling
        .max_surge
        .max(spec.rolling.max_unavailable)
        .max(1)
}

/// `20s`, `1m30s`, `250ms`: durations as a person writes them in the config.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if !ms.is_multiple_of(1000) && ms < 10_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        match (s / 3600, (s % 3600) / 60, s % 60) {
            (0, 0, s) => format!("{s}s"),
            (0, m, 0) => format!("{m}m"),
            (0, m, s) => format!("{m}m{s}s"),
            (h, 0, 0) => format!("{h}h"),
            (h, m, _) => format!("{h}h{m}m"),
        }
    }
}
