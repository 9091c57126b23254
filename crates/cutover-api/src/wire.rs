//! The JSON shapes of the API (docs/reference.md §4), used by the server and by the CLI client alike.
//!
//! This is the only place where the controller's views meet serde. Field names are part of the
//! contract: rename nothing here without changing docs/reference.md.

use std::collections::BTreeMap;

use cutover_controller::{EventView, InstanceView, RolloutView, ServiceView};
use cutover_core::Timestamp;
use serde::{Deserialize, Serialize};

/// The request header in which an API client says who is acting (the CLI: `user@host`).
pub const ACTOR_HEADER: &str = "x-cutover-actor";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub services: Vec<Service>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub name: String,
    pub listen: String,
    pub preview_listen: Option<String>,
    pub phase: String,
    pub stable: String,
    pub candidate: Option<String>,
    pub strategy: String,
    /// version → percent
    /// Where unpinned traffic really goes (a version with no routable instance gets none).
    pub weights: BTreeMap<String, u8>,
    /// The shares the rollout asks for.
    pub configured_weights: BTreeMap<String, u8>,
    pub step: Option<usize>,
    pub steps: Option<usize>,
    pub rollout_id: Option<i64>,
    pub failures: u32,
    pub last_analysis: Option<String>,
    pub instances: Vec<Instance>,
    pub events: Vec<Event>,
    /// Why the service is held as it is (a decision could not be saved); null when all is well.
    #[serde(default)]
    pub degraded: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    pub id: String,
    pub version: String,
    pub address: String,
    pub health: String,
    /// What runs it, as its runtime tells it: `pid 4242`, `container 3fa2b1c9d0e1`.
    pub runs_as: String,
    /// Why it is not healthy, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: i64,
    pub service: String,
    pub rollout_id: Option<i64>,
    pub at: String,
    pub kind: String,
    pub message: String,
    /// The service's phase when the event was recorded (live events only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Rollout {
    pub id: i64,
    pub service: String,
    pub from: String,
    pub to: String,
    pub strategy: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Seconds from start to the end, when it ended.
    pub duration_seconds: Option<f64>,
    pub env: BTreeMap<String, String>,
    /// Who started it: `user@host` from the CLI, `dashboard`, or `api`; null for rollouts
    /// recorded before cutover kept this.
    #[serde(default)]
    pub started_by: Option<String>,
    /// Who ended it, when a person's action did (abort, rollback); null otherwise.
    #[serde(default)]
    pub ended_by: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct History {
    pub rollouts: Vec<Rollout>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct DeployBody {
    pub version: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub strategy: Option<String>,
    /// The commit being deployed and its time (RFC 3339), for DORA's lead time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
    /// The rollout whose failure this deployment fixes (DORA's change failure rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixes: Option<i64>,
    /// Deploy although the error budget is exhausted; needs `reason`, which is recorded.
    #[serde(default)]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct PromoteBody {
    #[serde(default)]
    pub full: bool,
    /// Promote although analysis failed at the current stage and has not passed since.
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// RFC 3339 in UTC, e.g. `2026-11-22T15:04:05.123Z`.
pub fn rfc3339(t: Timestamp) -> String {
    i64::try_from(t.as_millis())
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

impl From<&InstanceView> for Instance {
    fn from(i: &InstanceView) -> Self {
        Instance {
            id: i.id.to_string(),
            version: i.version.to_string(),
            address: i.address.to_string(),
            health: i.health.as_str().to_owned(),
            runs_as: i.runs_as.clone(),
            detail: i.detail.clone(),
        }
    }
}

impl From<&EventView> for Event {
    fn from(e: &EventView) -> Self {
        Event {
            id: e.id,
            service: e.service.clone(),
            rollout_id: e.rollout_id,
            at: rfc3339(e.at),
            kind: e.kind.as_str().to_owned(),
            message: e.message.clone(),
            phase: None,
        }
    }
}

impl From<&ServiceView> for Service {
    fn from(s: &ServiceView) -> Self {
        Service {
            name: s.name.to_string(),
            listen: s.listen.to_string(),
            preview_listen: s.preview_listen.map(|a| a.to_string()),
            phase: s.phase.as_str().to_owned(),
            stable: s.stable.to_string(),
            candidate: s.candidate.as_ref().map(ToString::to_string),
            strategy: s.strategy.as_str().to_owned(),
            weights: s.weights.iter().map(|(v, w)| (v.to_string(), *w)).collect(),
            configured_weights: s
                .configured_weights
                .iter()
                .map(|(v, w)| (v.to_string(), *w))
                .collect(),
            step: s.step.map(|(i, _)| i),
            steps: s.step.map(|(_, n)| n),
            rollout_id: s.rollout_id,
            failures: s.failures,
            last_analysis: s.last_analysis.clone(),
            instances: s.instances.iter().map(Instance::from).collect(),
            events: s.recent_events.iter().map(Event::from).collect(),
            degraded: s.degraded.clone(),
        }
    }
}

impl From<&RolloutView> for Rollout {
    fn from(r: &RolloutView) -> Self {
        Rollout {
            id: r.id,
            service: r.service.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            strategy: r.strategy.as_str().to_owned(),
            outcome: r.outcome.as_str().to_owned(),
            reason: r.reason.clone(),
            started_at: rfc3339(r.started_at),
            finished_at: r.finished_at.map(rfc3339),
            duration_seconds: r.finished_at.map(|f| f.since(r.started_at).as_secs_f64()),
            env: r.env.clone(),
            started_by: r.started_by.clone(),
            ended_by: r.ended_by.clone(),
            events: r.events.iter().map(Event::from).collect(),
        }
    }
}
