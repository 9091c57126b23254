//! The route table: what the controller tells the proxy, as one immutable value.
//!
//! The controller builds a whole new [`RouteTable`] for every change and hands it to the data
//! plane through [`DataPlane::publish`]; the proxy swaps it in atomically, so a request sees
//! either the old table or the new one, never a mix. The table lists every instance the
//! controller wants probed, including candidates still starting at weight 0: the proxy's health
//! checker decides which of them take traffic.

use std::fmt;
use std::net::SocketAddr;

use crate::{InstanceId, ServiceName, Version};

/// A traffic share in whole percent, 0 to 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u8);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightError(pub u32);

impl fmt::Display for WeightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "weight {} is above 100", self.0)
    }
}

impl std::error::Error for WeightError {}

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(100);

    pub fn new(percent: u32) -> Result<Self, WeightError> {
        u8::try_from(percent)
            .ok()
            .filter(|p| *p <= 100)
            .map(Weight)
            .ok_or(WeightError(percent))
    }

    pub const fn percent(self) -> u8 {
        self.0
    }

    /// The rest of 100 once this share is taken.
    pub const fn complement(self) -> Weight {
        Weight(100 - self.0)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

/// One upstream address that can serve requests for a version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub instance: InstanceId,
    pub addr: SocketAddr,
    /// Known healthy when it enters the proxy (kept warm, or handed over by a previous
    /// daemon): routable at once instead of after `healthy_threshold` probes. Probes and real
    /// traffic can still take it out.
    pub healthy: bool,
}

/// A version present in the table with its share of traffic and all of its instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteVersion {
    pub version: Version,
    /// The share of unpinned requests this version should get while it has a healthy instance.
    pub weight: Weight,
    pub backends: Vec<Backend>,
}

/// Everything the proxy of one service needs to route a request.
///
/// Weights of all versions add up to 100 when the controller publishes; the proxy still copes
/// with a table whose weights do not (it normalises), because it must never crash on a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    pub service: ServiceName,
    /// Increases with every table the controller publishes for this service, for logs and tests.
    pub generation: u64,
    /// Gets the weight of any version that has no healthy instance.
    pub stable: Version,
    pub versions: Vec<RouteVersion>,
    /// The version the blue-green preview listener serves, if any.
    pub preview: Option<Version>,
}

impl RouteTable {
    /// A table that sends everything to `stable`.
    pub fn single(service: ServiceName, stable: Version, backends: Vec<Backend>) -> Self {
        RouteTable {
            service,
            generation: 0,
            versions: vec![RouteVersion {
                version: stable.clone(),
                weight: Weight::FULL,
                backends,
            }],
            stable,
            preview: None,
        }
    }
}

/// What the controller's driver needs from the data plane. The binary wires the proxy in; tests
/// wire a fake. The proxy does not depend on the controller: this trait is how the arrow points
/// the right way.
pub trait DataPlane: Send + Sync {
    /// Replace the route table of `table.service` atomically for new requests.
    fn publish(&self, table: RouteTable);

    /// Requests to `instance` that have been sent and not yet answered completely.
    fn inflight(&self, service: &ServiceName, instance: &InstanceId) -> u64;

    /// `instance` died and its runtime is starting it again: it takes no traffic until its
    /// health checks pass again, and that passing is reported as a change (a health checker
    /// that reports only changes would otherwise never tell, had its probes not failed in
    /// the short gap).
    fn restarted(&self, service: &ServiceName, instance: &InstanceId);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bounds() {
        assert_eq!(Weight::new(100).map(Weight::percent), Ok(100));
        assert_eq!(Weight::new(101), Err(WeightError(101)));
        assert_eq!(Weight::new(300), Err(WeightError(300)));
        assert_eq!(Weight::new(10).map(Weight::complement), Weight::new(90));
    }
}
