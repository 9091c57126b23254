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
    CanaryStep, NoEvidence, Phase, RolloutOutcome, RolloutSpec, ServiceName, StrategyKind,
    Timestamp, Version, Weight,
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
    /// Candidate instances are starting; they must all be healthy before `deadline`.
    Starting { deadline: Timestamp },
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
            stage: Stage::Starting {
                deadline: now.plus(spec.progress_deadline),
            },
        };
        let mut cmds = rollout.world(spec);
        cmds.push(Command::Record {
            kind: EventKind::Started,
            message: format!(
                "{} rollout {} → {} started; waiting for {} candidate instance(s) to pass health checks (deadline {})",
                rollout.strategy,
                rollout.stable,
                rollout.candidate,
                rollout.instances_to_start(spec),
                fmt_duration(spec.progress_deadline)
            ),
        });
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

    /// The phase the contract names for this rollout.
    pub fn phase(&self) -> Phase {
        match &self.stage {
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
                Stage::Starting { .. } | Stage::Done { .. } => false,
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
                Stage::Starting { .. } | Stage::Preview | Stage::AwaitingApproval { .. }
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
            && !matches!(stage, Stage::Starting { .. })
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
            Stage::Starting { .. } => (self.instances_to_start(spec), n),
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
            Stage::Done { outcome, .. } if *outcome != RolloutOutcome::Promoted => vec![
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
                if matches!(self.next.stage, Stage::Starting { .. }) {
                    self.finish(RolloutOutcome::Failed, EventKind::Failed, reason);
                } else {
                    self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, reason);
                }
            }
            Event::Promote { full, force } => return self.promote(*full, *force),
            Event::Abort => self.finish(
                RolloutOutcome::Aborted,
                EventKind::Aborted,
                "aborted by user".into(),
            ),
            Event::Rollback => self.rollback_requested(),
            Event::Pause => return self.pause(),
            Event::Resume => return self.resume(),
            Event::Resumed => self.resumed(),
        }
        Ok(())
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
    }

    fn finish(&mut self, outcome: RolloutOutcome, kind: EventKind, reason: String) {
        self.record(kind, reason.clone());
        self.next.stage = Stage::Done { outcome, reason };
        self.cmds.extend(self.next.world(self.spec));
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
        self.next.stage = Stage::Done {
            outcome: RolloutOutcome::Promoted,
            reason,
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
            Stage::Done { .. } => {}
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

    /// The candidate passed its health checks: the strategy decides what comes next.
    fn after_ready(&mut self) {
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
            | Stage::Done { .. } => {}
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
            Stage::Promoting { .. } | Stage::Done { .. } => {
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
        let restart = |stage: &Stage, now: Timestamp, spec: &RolloutSpec| match stage {
            Stage::Starting { .. } => Stage::Starting {
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
        Stage::Starting { .. } | Stage::Preview => Weight::ZERO,
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
