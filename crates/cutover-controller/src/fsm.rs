//! The rollout state machine: one pure `step` from (spec, rollout, event, now) to the next
//! rollout and the commands that make the world match it.
//!
//! Nothing here does IO or reads a clock: `now` is an argument and every effect is a
//! [`Command`] value that the driver carries out after it has persisted the new state. That is
//! what lets every transition of CONTRACT §3 be tested in microseconds, and lets a restarted
//! daemon replay a rollout from its checkpoint.
//!
//! The model is declarative, like a Kubernetes controller: commands say how many instances of a
//! version should exist and what share of traffic the candidate gets; the driver reconciles.

use std::time::Duration;

use cutover_core::{
    CanaryStep, Phase, RolloutOutcome, RolloutSpec, StrategyKind, Timestamp, Version, Weight,
};

/// One rollout of a service from `stable` to `candidate`, and where it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    pub id: i64,
    pub stable: Version,
    pub candidate: Version,
    pub strategy: StrategyKind,
    pub started_at: Timestamp,
    /// Failed analysis evaluations so far; `failure_limit` of them roll back.
    pub failures: u32,
    pub stage: Stage,
}

/// Where a rollout is. Each variant carries only what is valid in it.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// Candidate instances are starting; they must all be healthy before `deadline`.
    Starting { deadline: Timestamp },
    /// Canary step `step` is applied: the candidate gets `weight`, held until `hold_until`.
    Canary {
        step: usize,
        weight: Weight,
        hold_until: Option<Timestamp>,
    },
    /// A rolling update in which `ready` candidate instances have replaced stable ones.
    Rolling { ready: u32 },
    /// Waiting for `cutover promote` at an approval step (canary) or before the switch
    /// (blue-green with `auto_promote = false`).
    AwaitingApproval { step: usize, weight: Weight },
    /// A person paused the rollout; `prior` resumes with `remaining` of its hold left.
    Paused {
        prior: Box<Stage>,
        remaining: Option<Duration>,
    },
    /// The candidate has all traffic; the old version stops at `scale_down_at`.
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
    Promote {
        full: bool,
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
    /// Record a decision in the event log.
    Record { kind: EventKind, message: String },
}

/// The kinds of events the controller records; their names are in the API and the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Started,
    Ready,
    Step,
    Paused,
    Resumed,
    AwaitingApproval,
    Approved,
    AnalysisPassed,
    AnalysisFailed,
    HealthFailed,
    Promoting,
    Promoted,
    RolledBack,
    Aborted,
    Failed,
    Restarted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Ready => "ready",
            EventKind::Step => "step",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::AwaitingApproval => "awaiting-approval",
            EventKind::Approved => "approved",
            EventKind::AnalysisPassed => "analysis-passed",
            EventKind::AnalysisFailed => "analysis-failed",
            EventKind::HealthFailed => "health-failed",
            EventKind::Promoting => "promoting",
            EventKind::Promoted => "promoted",
            EventKind::RolledBack => "rolled-back",
            EventKind::Aborted => "aborted",
            EventKind::Failed => "failed",
            EventKind::Restarted => "restarted",
        }
    }
}

/// Why a person's command was not applied; the API answers 409 with this sentence.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Rollout {
    /// A new rollout and the commands that start its candidate.
    pub fn begin(
        spec: &RolloutSpec,
        id: i64,
        stable: Version,
        candidate: Version,
        strategy: StrategyKind,
        now: Timestamp,
    ) -> (Rollout, Vec<Command>) {
        let rollout = Rollout {
            id,
            stable,
            candidate,
            strategy,
            started_at: now,
            failures: 0,
            stage: Stage::Starting {
                deadline: now.plus(spec.progress_deadline),
            },
        };
        let mut cmds = rollout.world(spec);
        cmds.push(Command::Record {
            kind: EventKind::Started,
            message: format!(
                "{} rollout {} → {} started; waiting for {} candidate instance(s) to pass health checks (deadline {})",
                strategy,
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
            Stage::Canary { .. } | Stage::Rolling { .. } => Phase::Progressing,
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

    /// Whether analysis verdicts count now: only while the candidate takes unpinned traffic.
    pub fn judging(&self, spec: &RolloutSpec) -> bool {
        !self.is_done()
            && !matches!(self.stage, Stage::Starting { .. })
            && self.candidate_weight(spec) > Weight::ZERO
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
        let (candidate, stable) = match &self.stage {
            Stage::Starting { .. } => (self.instances_to_start(spec), n),
            Stage::Rolling { ready } => {
                ((*ready + rolling_batch(spec)).min(n), n - (*ready).min(n))
            }
            Stage::Paused { prior, .. } => match prior.as_ref() {
                Stage::Rolling { ready } => (*ready, n - (*ready).min(n)),
                _ => (n, n),
            },
            Stage::Canary { .. } | Stage::AwaitingApproval { .. } => (n, n),
            // A rolling update has already replaced every stable instance when it promotes.
            Stage::Promoting { .. } if self.strategy == StrategyKind::Rolling => (n, 0),
            Stage::Promoting { .. } => (n, n),
            Stage::Done { outcome, .. } => match outcome {
                RolloutOutcome::Promoted => (n, 0),
                _ => (0, n),
            },
        };
        let preview = self.strategy == StrategyKind::BlueGreen
            && matches!(
                self.stage,
                Stage::Starting { .. } | Stage::AwaitingApproval { .. }
            );
        let route = Command::Route {
            candidate: self.candidate_weight(spec),
            preview,
        };
        let scale = |version: &Version, instances| Command::Scale {
            version: version.clone(),
            instances,
        };
        // Order matters for zero-downtime: grow before shifting traffic, shift traffic before
        // shrinking, so no version ever has weight without instances to serve it.
        let mut cmds = Vec::with_capacity(4);
        match &self.stage {
            Stage::Done { outcome, .. } if *outcome != RolloutOutcome::Promoted => {
                cmds.push(route);
                cmds.push(scale(&self.stable, stable));
                cmds.push(scale(&self.candidate, candidate));
            }
            _ => {
                cmds.push(scale(&self.candidate, candidate));
                if let Stage::Rolling { ready } = &self.stage {
                    // Rolling keeps capacity: the stable version shrinks only by instances
                    // the candidate already replaced.
                    cmds.push(route);
                    cmds.push(scale(&self.stable, n - (*ready).min(n)));
                } else {
                    cmds.push(scale(&self.stable, stable));
                    cmds.push(route);
                }
            }
        }
        cmds
    }
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
            Event::Promote { full } => return self.promote(*full),
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

    /// Moves to `stage` and emits the commands that realise it.
    fn enter(&mut self, stage: Stage) {
        self.next.stage = stage;
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
                    "candidate {} not healthy within progress_deadline {}; traffic never moved",
                    self.next.candidate,
                    fmt_duration(self.spec.progress_deadline)
                );
                self.finish(RolloutOutcome::Failed, EventKind::Failed, reason);
            }
            Stage::Canary {
                step, hold_until, ..
            } if hold_until.is_none_or(|t| self.now >= t) => {
                self.canary_step(step + 1);
            }
            Stage::Promoting { scale_down_at } if self.now >= scale_down_at => {
                let reason = format!(
                    "promoted {}: all traffic on it; {} stopped",
                    self.next.candidate, self.next.stable
                );
                self.finish(RolloutOutcome::Promoted, EventKind::Promoted, reason);
            }
            _ => {}
        }
    }

    fn health(&mut self, h: &HealthCounts) {
        let n = self.spec.instances;
        match self.next.stage.clone() {
            Stage::Starting { .. } => {
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
            Stage::Rolling { ready } => {
                let target = (ready + rolling_batch(self.spec)).min(n);
                if ready < n && h.candidate_healthy >= target {
                    self.rolling_to(target);
                }
            }
            _ => {}
        }
    }

    /// The candidate passed its health checks: the strategy decides what comes next.
    fn after_ready(&mut self) {
        match self.next.strategy {
            StrategyKind::Canary => self.canary_step(0),
            StrategyKind::BlueGreen => {
                if self.spec.blue_green.auto_promote {
                    self.promote_now("auto_promote: full candidate set healthy");
                } else {
                    self.record(
                        EventKind::AwaitingApproval,
                        format!(
                            "candidate {} healthy on the preview listener; run `cutover promote` to switch",
                            self.next.candidate
                        ),
                    );
                    self.enter(Stage::AwaitingApproval {
                        step: 0,
                        weight: Weight::ZERO,
                    });
                }
            }
            StrategyKind::Rolling => {
                let first = rolling_batch(self.spec).min(self.spec.instances);
                self.rolling_to(first);
            }
        }
    }

    fn rolling_to(&mut self, ready: u32) {
        let n = self.spec.instances;
        if ready >= n {
            self.promote_now("all instances replaced");
            return;
        }
        self.record(
            EventKind::Step,
            format!("rolling: {ready}/{n} instances on {}", self.next.candidate),
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
            CanaryStep::SetWeight { weight, pause } => {
                if *weight == Weight::FULL && pause.is_none() && i + 1 == n {
                    self.promote_now("final step: 100%");
                    return;
                }
                let hold = pause
                    .map(|p| format!(", holding {}", fmt_duration(p)))
                    .unwrap_or_default();
                self.record(
                    EventKind::Step,
                    format!(
                        "step {}/{n}: {} gets {weight} of traffic{hold}",
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
                self.record(
                    EventKind::AwaitingApproval,
                    format!(
                        "step {}/{n}: waiting for approval at {weight}; run `cutover promote`",
                        i + 1
                    ),
                );
                self.enter(Stage::AwaitingApproval { step: i, weight });
            }
        }
    }

    fn promote_now(&mut self, why: &str) {
        let delay = scale_down_delay(self.spec, self.next.strategy);
        let keep = if delay.is_zero() {
            String::new()
        } else {
            format!(
                "; {} kept warm for {} for instant rollback",
                self.next.stable,
                fmt_duration(delay)
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
        match verdict {
            Verdict::Inconclusive => {}
            Verdict::Pass => {
                self.record(
                    EventKind::AnalysisPassed,
                    format!("analysis passed: {reason}"),
                );
                self.cmds.push(Command::ResetAnalysis);
            }
            Verdict::Fail => {
                self.next.failures += 1;
                let limit = self.spec.analysis.failure_limit.max(1);
                let msg = format!("analysis failed ({}/{limit}): {reason}", self.next.failures);
                self.record(EventKind::AnalysisFailed, msg.clone());
                // No reset after a failure: the evidence stands and the window keeps growing,
                // so a bad candidate fails again at the next evaluation with more data, while a
                // fluke is diluted by it.
                if self.next.failures >= limit {
                    self.finish(RolloutOutcome::RolledBack, EventKind::RolledBack, msg);
                }
            }
        }
    }

    fn promote(&mut self, full: bool) -> Result<(), Refusal> {
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
            _ if full => {
                self.record(
                    EventKind::Approved,
                    "promote --full by user: skipping remaining steps".into(),
                );
                self.promote_now("promoted in full by user");
            }
            Stage::AwaitingApproval { step, .. } => {
                self.record(
                    EventKind::Approved,
                    format!("step {} approved by user", step + 1),
                );
                match self.next.strategy {
                    StrategyKind::Canary => self.canary_step(step + 1),
                    _ => self.promote_now("approved by user"),
                }
            }
            Stage::Canary { step, .. } => {
                self.record(
                    EventKind::Approved,
                    format!("step {} skipped by user", step + 1),
                );
                self.canary_step(step + 1);
            }
            Stage::Rolling { ready } => {
                let target = (ready + rolling_batch(self.spec)).min(self.spec.instances);
                self.record(EventKind::Approved, "rolling batch promoted by user".into());
                self.rolling_to(target);
            }
            Stage::Paused { .. } | Stage::Done { .. } => {}
        }
        Ok(())
    }

    fn rollback_requested(&mut self) {
        if matches!(self.next.stage, Stage::Promoting { .. }) {
            let reason = format!(
                "rollback by user: traffic back on {} (kept warm), {} stopped",
                self.next.stable, self.next.candidate
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
            Stage::Rolling { .. } | Stage::AwaitingApproval { .. } => None,
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
        Ok(())
    }

    /// After a daemon restart: timers restart from now, instances and traffic are re-applied.
    fn resumed(&mut self) {
        let strategy = self.next.strategy;
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
                scale_down_at: now.plus(scale_down_delay(spec, strategy)),
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
        self.enter(stage);
    }
}

/// How long the old version stays warm after the switch: only blue-green keeps it.
fn scale_down_delay(spec: &RolloutSpec, strategy: StrategyKind) -> Duration {
    match strategy {
        StrategyKind::BlueGreen => spec.blue_green.scale_down_delay,
        StrategyKind::Canary | StrategyKind::Rolling => Duration::ZERO,
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
        Stage::Starting { .. } => Weight::ZERO,
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
