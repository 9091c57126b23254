//! The rollout state as text, so a restarted daemon resumes where it was.
//!
//! The store keeps the checkpoint opaque; this module owns its format. It is a private mirror of
//! [`Rollout`] with serde derives, because the core types carry none (ARCHITECTURE invariant 4).
//! The `v` field lets a later format read an older one.

use std::time::Duration;

use cutover_core::{
    AnalysisSpec, BlueGreenSpec, CanaryStep, DbRollback, NoEvidence, ReleaseSteps, RollingSpec,
    RolloutOutcome, RolloutSpec, ServiceName, StrategyKind, Timestamp, Version, Weight,
};
use serde::{Deserialize, Serialize};

use crate::fsm::{BackupRef, Gate, Revert, Rollout, Stage, Verdict};

/// 2 added the evidence gate, the healthy count and the blue-green preview stage; a format-1
/// checkpoint reads with an empty gate (its stage waits for a new verdict). 3 added the
/// release-safety stages, the rollout's backup and its steps; an older checkpoint reads with
/// no backup, no steps, and as having changed something (it was past its start).
const FORMAT: u32 = 3;

#[derive(Serialize, Deserialize)]
struct Checkpoint {
    v: u32,
    stable: String,
    candidate: String,
    strategy: String,
    started_at: u64,
    failures: u32,
    #[serde(default)]
    gate: CpGate,
    #[serde(default)]
    healthy: u32,
    stage: CpStage,
    /// The rollout's own policy, as it started: a reload changes the config for the next
    /// rollout, never for one under way. Absent in older checkpoints (the config's is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<CpSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup: Option<CpBackup>,
    #[serde(default = "yes")]
    touched: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize)]
struct CpBackup {
    id: String,
    taken_at: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct CpSteps {
    pre_deploy: bool,
    backup: bool,
    migrate: bool,
    smoke: bool,
    post_promote: bool,
    on_rollback_hooks: bool,
    on_rollback: String,
    migrate_down: bool,
}

#[derive(Serialize, Deserialize)]
struct CpSpec {
    strategy: String,
    instances: u32,
    steps: Vec<CpStep>,
    auto_promote: bool,
    preview_listen: Option<String>,
    max_surge: u32,
    max_unavailable: u32,
    analysis: bool,
    interval_ms: u64,
    min_requests: u64,
    max_error_rate: Option<f64>,
    max_p99_ms: Option<u64>,
    failure_limit: u32,
    compare_to_stable: bool,
    deadline_ms: u64,
    on_no_evidence: String,
    progress_deadline_ms: u64,
    drain_timeout_ms: u64,
    stop_timeout_ms: u64,
    scale_down_delay_ms: u64,
    runs_instances: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    safety: Option<CpSteps>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum CpStep {
    Weight {
        weight: u8,
        pause_ms: Option<u64>,
        analysis: bool,
    },
    Approve,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn spec_out(s: &RolloutSpec) -> CpSpec {
    CpSpec {
        strategy: s.strategy.as_str().to_owned(),
        instances: s.instances,
        steps: s
            .canary_steps
            .iter()
            .map(|st| match st {
                CanaryStep::SetWeight {
                    weight,
                    pause,
                    analysis,
                } => CpStep::Weight {
                    weight: weight.percent(),
                    pause_ms: pause.map(ms),
                    analysis: *analysis,
                },
                CanaryStep::Approve => CpStep::Approve,
            })
            .collect(),
        auto_promote: s.blue_green.auto_promote,
        preview_listen: s.blue_green.preview_listen.map(|a| a.to_string()),
        max_surge: s.rolling.max_surge,
        max_unavailable: s.rolling.max_unavailable,
        analysis: s.analysis.enabled,
        interval_ms: ms(s.analysis.interval),
        min_requests: s.analysis.min_requests,
        max_error_rate: s.analysis.max_error_rate,
        max_p99_ms: s.analysis.max_p99.map(ms),
        failure_limit: s.analysis.failure_limit,
        compare_to_stable: s.analysis.compare_to_stable,
        deadline_ms: ms(s.analysis.deadline),
        on_no_evidence: s.analysis.on_no_evidence.as_str().to_owned(),
        progress_deadline_ms: ms(s.progress_deadline),
        drain_timeout_ms: ms(s.drain_timeout),
        stop_timeout_ms: ms(s.stop_timeout),
        scale_down_delay_ms: ms(s.scale_down_delay),
        runs_instances: s.runs_instances,
        // Absent when nothing is configured, so such checkpoints read as before.
        safety: s.steps.any().then(|| CpSteps {
            pre_deploy: s.steps.pre_deploy,
            backup: s.steps.backup,
            migrate: s.steps.migrate,
            smoke: s.steps.smoke,
            post_promote: s.steps.post_promote,
            on_rollback_hooks: s.steps.on_rollback_hooks,
            on_rollback: s.steps.on_rollback.as_str().to_owned(),
            migrate_down: s.steps.migrate_down,
        }),
    }
}

fn spec_in(c: CpSpec) -> Result<RolloutSpec, CheckpointError> {
    let unknown = |what: &'static str, value: &str| CheckpointError::Unknown {
        what,
        value: value.to_owned(),
    };
    let d = Duration::from_millis;
    let mut steps = Vec::with_capacity(c.steps.len());
    for st in c.steps {
        steps.push(match st {
            CpStep::Weight {
                weight,
                pause_ms,
                analysis,
            } => CanaryStep::SetWeight {
                weight: Weight::new(u32::from(weight))
                    .map_err(|_| unknown("weight", &weight.to_string()))?,
                pause: pause_ms.map(d),
                analysis,
            },
            CpStep::Approve => CanaryStep::Approve,
        });
    }
    Ok(RolloutSpec {
        strategy: StrategyKind::parse(&c.strategy)
            .ok_or_else(|| unknown("strategy", &c.strategy))?,
        instances: c.instances,
        canary_steps: steps,
        blue_green: BlueGreenSpec {
            auto_promote: c.auto_promote,
            preview_listen: c.preview_listen.and_then(|a| a.parse().ok()),
        },
        rolling: RollingSpec {
            max_surge: c.max_surge,
            max_unavailable: c.max_unavailable,
        },
        analysis: AnalysisSpec {
            enabled: c.analysis,
            interval: d(c.interval_ms),
            min_requests: c.min_requests,
            max_error_rate: c.max_error_rate,
            max_p99: c.max_p99_ms.map(d),
            failure_limit: c.failure_limit,
            compare_to_stable: c.compare_to_stable,
            deadline: d(c.deadline_ms),
            on_no_evidence: NoEvidence::parse(&c.on_no_evidence)
                .ok_or_else(|| unknown("on_no_evidence", &c.on_no_evidence))?,
        },
        progress_deadline: d(c.progress_deadline_ms),
        drain_timeout: d(c.drain_timeout_ms),
        stop_timeout: d(c.stop_timeout_ms),
        scale_down_delay: d(c.scale_down_delay_ms),
        runs_instances: c.runs_instances,
        steps: match c.safety {
            None => ReleaseSteps::default(),
            Some(st) => ReleaseSteps {
                pre_deploy: st.pre_deploy,
                backup: st.backup,
                migrate: st.migrate,
                smoke: st.smoke,
                post_promote: st.post_promote,
                on_rollback_hooks: st.on_rollback_hooks,
                on_rollback: DbRollback::parse(&st.on_rollback)
                    .ok_or_else(|| unknown("on_rollback", &st.on_rollback))?,
                migrate_down: st.migrate_down,
            },
        },
    })
}

#[derive(Serialize, Deserialize, Default)]
struct CpGate {
    since: u64,
    /// `pass` or `fail`.
    last: Option<String>,
    note: Option<String>,
    noted_at: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "kebab-case")]
enum CpStage {
    Starting {
        deadline: u64,
    },
    Canary {
        step: usize,
        weight: u8,
        hold_until: Option<u64>,
    },
    Rolling {
        ready: u32,
    },
    Preview,
    AwaitingApproval {
        step: usize,
        weight: u8,
    },
    Paused {
        prior: Box<CpStage>,
        remaining_ms: Option<u64>,
    },
    Promoting {
        scale_down_at: u64,
    },
    Done {
        outcome: String,
        reason: String,
    },
    PreDeploy,
    BackingUp,
    Migrating,
    Smoke,
    PostPromote {
        reason: String,
    },
    Reverting {
        outcome: String,
        reason: String,
        /// `restore`, `down` or `hooks`.
        work: String,
    },
}

fn revert_name(r: Revert) -> &'static str {
    match r {
        Revert::Restore => "restore",
        Revert::Down => "down",
        Revert::Hooks => "hooks",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint is not valid JSON of a rollout: {0}")]
    Json(#[from] serde_json::Error),
    #[error("checkpoint format {0} is newer than this cutover understands ({FORMAT})")]
    Version(u32),
    #[error("checkpoint names unknown {what} {value:?}")]
    Unknown { what: &'static str, value: String },
}

pub fn encode(r: &Rollout) -> String {
    encode_text(r, None)
}

/// The checkpoint of `r` with the policy it runs under, so that a reload or restart resumes it
/// under the same policy.
pub fn encode_with_spec(r: &Rollout, spec: &RolloutSpec) -> String {
    encode_text(r, Some(spec))
}

fn encode_text(r: &Rollout, spec: Option<&RolloutSpec>) -> String {
    let cp = Checkpoint {
        v: FORMAT,
        stable: r.stable.to_string(),
        candidate: r.candidate.to_string(),
        strategy: r.strategy.as_str().to_owned(),
        started_at: r.started_at.as_millis(),
        failures: r.failures,
        gate: CpGate {
            since: r.gate.since.0,
            last: r.gate.last.map(|v| verdict_name(v).to_owned()),
            note: r.gate.note.clone(),
            noted_at: r.gate.noted_at.map(|t| t.0),
        },
        healthy: r.healthy,
        stage: stage_out(&r.stage),
        spec: spec.map(spec_out),
        backup: r.backup.as_ref().map(|b| CpBackup {
            id: b.id.clone(),
            taken_at: b.taken_at.0,
        }),
        touched: r.touched,
    };
    // Serialising plain strings and numbers cannot fail; an empty checkpoint would only make
    // the rollout roll back after a restart, never corrupt anything.
    serde_json::to_string(&cp).unwrap_or_default()
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Inconclusive => "inconclusive",
    }
}

/// The rollout `id` of `service` from its checkpoint text.
pub fn decode(id: i64, service: &ServiceName, text: &str) -> Result<Rollout, CheckpointError> {
    decode_with_spec(id, service, text).map(|(r, _)| r)
}

/// The rollout and, when the checkpoint has it, the policy it started with.
pub fn decode_with_spec(
    id: i64,
    service: &ServiceName,
    text: &str,
) -> Result<(Rollout, Option<RolloutSpec>), CheckpointError> {
    let cp: Checkpoint = serde_json::from_str(text)?;
    let spec = cp.spec.map(spec_in).transpose()?;
    if cp.v > FORMAT {
        return Err(CheckpointError::Version(cp.v));
    }
    let strategy = StrategyKind::parse(&cp.strategy).ok_or_else(|| CheckpointError::Unknown {
        what: "strategy",
        value: cp.strategy.clone(),
    })?;
    let last = match cp.gate.last.as_deref() {
        None => None,
        Some(v) => Some(
            [Verdict::Pass, Verdict::Fail, Verdict::Inconclusive]
                .into_iter()
                .find(|x| verdict_name(*x) == v)
                .ok_or_else(|| CheckpointError::Unknown {
                    what: "verdict",
                    value: v.to_owned(),
                })?,
        ),
    };
    let rollout = Rollout {
        id,
        service: service.clone(),
        stable: Version::new(&cp.stable),
        candidate: Version::new(&cp.candidate),
        strategy,
        started_at: Timestamp(cp.started_at),
        failures: cp.failures,
        gate: Gate {
            since: Timestamp(cp.gate.since),
            last,
            note: cp.gate.note,
            noted_at: cp.gate.noted_at.map(Timestamp),
        },
        healthy: cp.healthy,
        stage: stage_in(cp.stage)?,
        backup: cp.backup.map(|b| BackupRef {
            id: b.id,
            taken_at: Timestamp(b.taken_at),
        }),
        touched: cp.touched,
    };
    Ok((rollout, spec))
}

fn stage_out(s: &Stage) -> CpStage {
    match s {
        Stage::Starting { deadline } => CpStage::Starting {
            deadline: deadline.0,
        },
        Stage::Canary {
            step,
            weight,
            hold_until,
        } => CpStage::Canary {
            step: *step,
            weight: weight.percent(),
            hold_until: hold_until.map(|t| t.0),
        },
        Stage::Rolling { ready } => CpStage::Rolling { ready: *ready },
        Stage::Preview => CpStage::Preview,
        Stage::AwaitingApproval { step, weight } => CpStage::AwaitingApproval {
            step: *step,
            weight: weight.percent(),
        },
        Stage::Paused { prior, remaining } => CpStage::Paused {
            prior: Box::new(stage_out(prior)),
            remaining_ms: remaining.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        },
        Stage::Promoting { scale_down_at } => CpStage::Promoting {
            scale_down_at: scale_down_at.0,
        },
        Stage::Done { outcome, reason } => CpStage::Done {
            outcome: outcome.as_str().to_owned(),
            reason: reason.clone(),
        },
        Stage::PreDeploy => CpStage::PreDeploy,
        Stage::BackingUp => CpStage::BackingUp,
        Stage::Migrating => CpStage::Migrating,
        Stage::Smoke => CpStage::Smoke,
        Stage::PostPromote { reason } => CpStage::PostPromote {
            reason: reason.clone(),
        },
        Stage::Reverting {
            outcome,
            reason,
            work,
        } => CpStage::Reverting {
            outcome: outcome.as_str().to_owned(),
            reason: reason.clone(),
            work: revert_name(*work).to_owned(),
        },
    }
}

fn stage_in(s: CpStage) -> Result<Stage, CheckpointError> {
    let weight = |w: u8| {
        Weight::new(u32::from(w)).map_err(|_| CheckpointError::Unknown {
            what: "weight",
            value: w.to_string(),
        })
    };
    Ok(match s {
        CpStage::Starting { deadline } => Stage::Starting {
            deadline: Timestamp(deadline),
        },
        CpStage::Canary {
            step,
            weight: w,
            hold_until,
        } => Stage::Canary {
            step,
            weight: weight(w)?,
            hold_until: hold_until.map(Timestamp),
        },
        CpStage::Rolling { ready } => Stage::Rolling { ready },
        CpStage::Preview => Stage::Preview,
        CpStage::AwaitingApproval { step, weight: w } => Stage::AwaitingApproval {
            step,
            weight: weight(w)?,
        },
        CpStage::Paused {
            prior,
            remaining_ms,
        } => Stage::Paused {
            prior: Box::new(stage_in(*prior)?),
            remaining: remaining_ms.map(Duration::from_millis),
        },
        CpStage::Promoting { scale_down_at } => Stage::Promoting {
            scale_down_at: Timestamp(scale_down_at),
        },
        CpStage::Done { outcome, reason } => Stage::Done {
            outcome: RolloutOutcome::parse(&outcome).ok_or(CheckpointError::Unknown {
                what: "outcome",
                value: outcome,
            })?,
            reason,
        },
        CpStage::PreDeploy => Stage::PreDeploy,
        CpStage::BackingUp => Stage::BackingUp,
        CpStage::Migrating => Stage::Migrating,
        CpStage::Smoke => Stage::Smoke,
        CpStage::PostPromote { reason } => Stage::PostPromote { reason },
        CpStage::Reverting {
            outcome,
            reason,
            work,
        } => Stage::Reverting {
            outcome: RolloutOutcome::parse(&outcome).ok_or(CheckpointError::Unknown {
                what: "outcome",
                value: outcome,
            })?,
            reason,
            work: [Revert::Restore, Revert::Down, Revert::Hooks]
                .into_iter()
                .find(|r| revert_name(*r) == work)
                .ok_or(CheckpointError::Unknown {
                    what: "revert step",
                    value: work,
                })?,
        },
    })
}
