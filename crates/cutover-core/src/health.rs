//! Instance health: the states the contract names, the probe settings, and the change report.

use std::fmt;
use std::time::Duration;

use crate::{InstanceId, ServiceName, Version};

/// An instance's health as `status` and the API show it (docs/reference.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// Started, not yet `healthy_threshold` consecutive passing probes.
    Starting,
    /// Takes traffic.
    Healthy,
    /// Failed `unhealthy_threshold` probes, or was ejected passively; takes no traffic.
    Unhealthy,
    /// Left the route table; requests in flight complete, then it stops.
    Draining,
}

impl Health {
    pub const ALL: &'static [Health] = &[
        Health::Starting,
        Health::Healthy,
        Health::Unhealthy,
        Health::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Draining => "draining",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Active health-check settings for every instance of one service (`[services.X.health]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes before an instance takes traffic.
    pub healthy_threshold: u32,
    /// Consecutive failures before it is taken out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// The proxy's report that an instance's health changed, for the controller to act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthChange {
    pub service: ServiceName,
    pub version: Version,
    pub instance: InstanceId,
    pub health: Health,
    /// Why, in words: `3 consecutive probe failures: connection refused`.
    pub reason: String,
}
