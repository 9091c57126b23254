//! Read-only views the driver hands to the API and CLI, and the requests it accepts.
//!
//! These are plain values; `cutover-api` turns them into JSON. Keeping serde out of here keeps
//! the wire format in one crate.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use cutover_core::{
    EventKind, Health, InstanceId, Phase, RolloutOutcome, ServiceName, StrategyKind, Timestamp,
    Version,
};

#[derive(Clone, Debug, PartialEq)]
pub struct InstanceView {
    pub id: InstanceId,
    pub version: Version,
    pub address: SocketAddr,
    pub health: Health,
    /// What runs it, as its runtime tells it: `pid 4242`, `container 3fa2b1c9d0e1`.
    pub runs_as: String,
    /// Why it is not healthy: its last failed probe (`GET /healthz answered 404 Not Found`)
    /// or its last exit with the end of its output.
    pub detail: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventView {
    pub id: i64,
    pub service: String,
    pub rollout_id: Option<i64>,
    pub at: Timestamp,
    pub kind: EventKind,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RolloutView {
    pub id: i64,
    pub service: String,
    pub from: String,
    pub to: String,
    pub strategy: StrategyKind,
    pub outcome: RolloutOutcome,
    pub reason: Option<String>,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub env: BTreeMap<String, String>,
    /// Who asked for it (`user@host`, `dashboard`, `api`); `None` for older rollouts.
    pub started_by: Option<String>,
    /// Who ended it, when a person's action did.
    pub ended_by: Option<String>,
    /// Filled only when one rollout is asked for.
    pub events: Vec<EventView>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    pub name: ServiceName,
    pub listen: SocketAddr,
    pub preview_listen: Option<SocketAddr>,
    pub phase: Phase,
    pub stable: Version,
    pub candidate: Option<Version>,
    pub strategy: StrategyKind,
    /// Where unpinned traffic really goes, in percent, stable first: a version with no
    /// routable instance gets none, and its configured share goes to the other.
    pub weights: Vec<(Version, u8)>,
    /// The shares the rollout asks for, stable first (equal to `weights` unless a version
    /// has no routable instance).
    pub configured_weights: Vec<(Version, u8)>,
    /// `(step, steps)` of a canary rollout, 1-based.
    pub step: Option<(usize, usize)>,
    pub rollout_id: Option<i64>,
    /// Failed analysis evaluations of the current rollout.
    pub failures: u32,
    /// The judge's last conclusive reason, with its numbers.
    pub last_analysis: Option<String>,
    pub instances: Vec<InstanceView>,
    pub recent_events: Vec<EventView>,
    /// Why the service is held as it is: a decision could not be saved, so nothing is carried
    /// out until it is (the write is retried). `None` when all is well.
    pub degraded: Option<String>,
}

/// What a person asked the controller to do to a service's rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `force`: promote although analysis failed at the current stage.
    Promote {
        full: bool,
        force: bool,
    },
    Abort,
    Rollback,
    Pause,
    Resume,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Promote { .. } => "promote",
            Action::Abort => "abort",
            Action::Rollback => "rollback",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

/// A request for the controller, e.g. from the API.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployRequest {
    pub service: String,
    pub version: String,
    pub env: BTreeMap<String, String>,
    pub strategy: Option<StrategyKind>,
    /// Who asks: recorded on the rollout and in its events.
    pub actor: String,
}

/// Why a request failed, in a way the API maps onto a status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
    /// The service is held until its state can be saved (see `ServiceView::degraded`).
    #[error("{0}")]
    Unavailable(String),
}

/// A live notice for server-sent events and webhooks: something was recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub event: EventView,
    pub phase: Phase,
    /// The instance the event is about (an `instance-exit`), for whoever follows instances
    /// (the signals' crash-loop alert) without reading the message.
    pub instance: Option<InstanceId>,
}
