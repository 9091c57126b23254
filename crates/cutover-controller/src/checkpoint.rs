//! The rollout state as text, so a restarted daemon resumes where it was.
//!
//! The store keeps the checkpoint opaque; this module owns its format. It is a private mirror of
//! [`Rollout`] with serde derives, because the core types carry none (ARCHITECTURE invariant 4).
//! The `v` field lets a later format read an older one.

use std::time::Duration;

use cutover_core::{RolloutOutcome, ServiceName, StrategyKind, Timestamp, Version, Weight};
use serde::{Deserialize, Serialize};

use crate::fsm::{Gate, Rollout, Stage, Verdict};

/// 2 added the evidence gate, the healthy count and the blue-green preview stage; a format-1
/// checkpoint reads with an empty gate (its stage waits for a new verdict).
const FORMAT: u32 = 2;

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
    let cp: Checkpoint = serde_json::from_str(text)?;
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
    Ok(Rollout {
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
    })
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
    })
}
