//! cutover-core: the value types through which cutover's parts meet.
//!
//! The proxy, the controller, the runtime and the API never call each other's internals; they
//! exchange the values defined here: a [`RouteTable`] the controller publishes and the proxy
//! serves, [`HealthChange`]s the proxy's health checker reports, [`WindowStats`] the metrics hand
//! to the judge, and the names ([`ServiceName`], [`Version`], [`InstanceId`]) they all share.
//!
//! This crate must do no IO, read no clock and carry no serde derives: wire formats belong to
//! `cutover-api` and `cutover-config`, so that changing a JSON field never touches the data plane.

mod health;
mod names;
mod phase;
mod route;
mod safety;
mod spec;
mod stats;
mod time;

pub use health::{Health, HealthChange, HealthSpec};
pub use names::{BadVersion, InstanceId, MAX_VERSION_LEN, ServiceName, Version};
pub use phase::{
    DbKind, DbRollback, EventKind, NoEvidence, Phase, RolloutOutcome, StrategyKind, Tone,
};
pub use route::{Backend, DataPlane, RouteTable, RouteVersion, Weight, WeightError};
pub use safety::{
    Argv, BackupSettings, DatabaseSpec, DbLocation, Hooks, Keep, ReleaseSteps, SafetySpec,
    SmokeCheck,
};
pub use spec::{AnalysisSpec, BlueGreenSpec, CanaryStep, RollingSpec, RolloutSpec};
pub use stats::{LatencyDist, UpstreamErrorKind, WindowStats};
pub use time::Timestamp;
