//! A route table compiled for the request path: versions with their instances and a schedule
//! that realises the weights exactly.
//!
//! The schedule is built with smooth weighted round robin (as nginx does): over every run of
//! `len` requests each version gets exactly its share, spread evenly instead of in bursts. A
//! version without a routable instance gets no slot; its share goes to the stable version.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cutover_core::{RouteTable, Version};
use cutover_metrics::{Metrics, VersionRecorder};

use crate::backend::{BackendState, Backends, Lease};

pub(crate) struct CompiledVersion {
    pub(crate) version: Version,
    pub(crate) backends: Vec<Arc<BackendState>>,
    pub(crate) recorder: VersionRecorder,
    next: AtomicUsize,
}

impl CompiledVersion {
    /// The next routable instance in round-robin order, skipping `avoid`, with the request
    /// already counted in flight on it.
    pub(crate) fn pick(&self, avoid: Option<&BackendState>) -> Option<Lease> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.backends[(start + i) % n])
            .filter(|b| b.routable() && avoid.is_none_or(|a| !std::ptr::eq(a, b.as_ref())))
            .find_map(BackendState::lease)
    }

    pub(crate) fn has_routable(&self) -> bool {
        self.backends.iter().any(|b| b.routable())
    }
}

pub(crate) struct Compiled {
    pub(crate) versions: Vec<CompiledVersion>,
    /// Index into `versions` per slot; empty when nothing is routable.
    schedule: Vec<u8>,
    counter: AtomicUsize,
    pub(crate) preview: Option<usize>,
    stable: Option<usize>,
}

impl Compiled {
    pub(crate) fn build(
        table: &RouteTable,
        backends: &Backends,
        metrics: &Metrics,
        connect_timeout: Duration,
    ) -> Compiled {
        let mut keep = HashSet::new();
        let versions: Vec<CompiledVersion> = table
            .versions
            .iter()
            .map(|rv| CompiledVersion {
                version: rv.version.clone(),
                backends: rv
                    .backends
                    .iter()
                    .map(|b| {
                        keep.insert(b.instance.clone());
                        backends.get_or_create(
                            &b.instance,
                            &rv.version,
                            b.addr,
                            connect_timeout,
                            b.healthy,
                        )
                    })
                    .collect(),
                recorder: metrics.recorder(&table.service, &rv.version),
                next: AtomicUsize::new(0),
            })
            .collect();
        backends.retain(&keep);
        let stable = versions.iter().position(|v| v.version == table.stable);
        let mut weights: Vec<u32> = table
            .versions
            .iter()
            .zip(&versions)
            .map(|(rv, cv)| {
                if cv.has_routable() {
                    u32::from(rv.weight.percent())
                } else {
                    0
                }
            })
            .collect();
        // Shares of versions that cannot serve fall back to stable, if stable can.
        let lost: u32 = table
            .versions
            .iter()
            .zip(&versions)
            .filter(|(_, cv)| !cv.has_routable())
            .map(|(rv, _)| u32::from(rv.weight.percent()))
            .sum();
        if let Some(s) = stable.filter(|s| versions[*s].has_routable()) {
            weights[s] += lost;
        }
        let preview = table
            .preview
            .as_ref()
            .and_then(|p| versions.iter().position(|v| &v.version == p));
        Compiled {
            schedule: smooth_schedule(&weights),
            versions,
            counter: AtomicUsize::new(0),
            preview,
            stable,
        }
    }

    /// The version (index into `versions`) for the next unpinned request.
    pub(crate) fn next_index(&self) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let i = self.counter.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        Some(usize::from(self.schedule[i]))
    }

    /// An instance of another version when the scheduled one `missed` has no routable instance
    /// left: stable first, then the others in table order.
    ///
    /// The schedule is rebuilt whenever health or the table changes, but a request may still
    /// hold the table from just before: an instance drained or failed between the two. Its
    /// share falls to stable then as it will in the rebuilt table, instead of answering 503.
    pub(crate) fn fallback(&self, missed: usize) -> Option<(usize, Lease)> {
        self.stable
            .into_iter()
            .chain(0..self.versions.len())
            .filter(|i| *i != missed)
            .find_map(|i| self.versions.get(i)?.pick(None).map(|l| (i, l)))
    }

    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        self.versions
            .iter()
            .position(|v| v.version.as_str() == name)
    }
}

/// Smooth weighted round robin over `weights`, one cycle long (the sum of the weights).
fn smooth_schedule(weights: &[u32]) -> Vec<u8> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
        else {
            break;
        };
        current[best] -= total;
        out.push(u8::try_from(best).unwrap_or(0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_core::{Backend, Health, InstanceId, RouteVersion, ServiceName, Weight};

    fn version(name: &str, weight: u8, instances: &[(&str, u16)]) -> RouteVersion {
        RouteVersion {
            version: Version::new(name),
            weight: Weight::new(u32::from(weight)).unwrap(),
            backends: instances
                .iter()
                .map(|(id, port)| Backend {
                    instance: InstanceId::new(*id),
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
                    healthy: false,
                })
                .collect(),
        }
    }

    /// A request holding a table compiled before its scheduled version lost its last routable
    /// instance is served by stable, not answered 503 (seen as a rare 503 in a rolling update
    /// under load, before the rebuilt table was stored).
    #[test]
    fn a_version_that_just_lost_its_instances_falls_back_to_stable() {
        let table = RouteTable {
            service: ServiceName::new("web"),
            generation: 1,
            stable: Version::new("v1"),
            versions: vec![
                version("v1", 50, &[("a", 1001)]),
                version("v2", 50, &[("b", 1002)]),
            ],
            preview: None,
        };
        let backends = Backends::default();
        let metrics = Metrics::new();
        // The first build creates the instances; by the second they are healthy.
        Compiled::build(&table, &backends, &metrics, Duration::from_secs(1));
        for b in backends.live() {
            b.update_health(|h| h.health = Health::Healthy);
        }
        let compiled = Compiled::build(&table, &backends, &metrics, Duration::from_secs(1));
        let v2 = compiled.index("v2").unwrap();
        assert!(compiled.versions[v2].pick(None).is_some());
        // v2's only instance fails; the compiled schedule still has v2 slots.
        compiled.versions[v2].backends[0].update_health(|h| h.health = Health::Unhealthy);
        assert!(compiled.versions[v2].pick(None).is_none());
        let (i, lease) = compiled.fallback(v2).expect("stable stands in");
        assert_eq!(compiled.versions[i].version.as_str(), "v1");
        assert_eq!(lease.backend().id.as_str(), "a");
        assert_eq!(lease.backend().inflight.load(Ordering::SeqCst), 1);
        drop(lease);
        // Nothing routable anywhere: no stand-in.
        compiled.versions[0].backends[0].update_health(|h| h.health = Health::Unhealthy);
        assert!(compiled.fallback(v2).is_none());
    }

    /// The lease counts the request before it checks the instance, so a drain that has cleared
    /// the flag either sees the request or the request sees the flag.
    #[test]
    fn leases_are_refused_by_removed_instances_and_count_in_flight() {
        let backends = Backends::default();
        let b = backends.get_or_create(
            &InstanceId::new("a"),
            &Version::new("v1"),
            std::net::SocketAddr::from(([127, 0, 0, 1], 1001)),
            Duration::from_secs(1),
            false,
        );
        b.update_health(|h| h.health = Health::Healthy);
        let lease = b.lease().expect("a healthy instance takes requests");
        assert_eq!(backends.inflight(&InstanceId::new("a")), 1);
        backends.retain(&HashSet::new());
        assert!(
            b.lease().is_none(),
            "a removed instance takes no new request"
        );
        assert_eq!(backends.inflight(&InstanceId::new("a")), 1);
        drop(lease);
        assert_eq!(backends.inflight(&InstanceId::new("a")), 0);
    }

    #[test]
    fn schedules_are_exact_and_spread() {
        let s = smooth_schedule(&[90, 10]);
        assert_eq!(s.len(), 100);
        assert_eq!(s.iter().filter(|v| **v == 1).count(), 10);
        // Spread: never two canary picks in a row at 10%.
        assert!(s.windows(2).all(|w| !(w[0] == 1 && w[1] == 1)));
        assert_eq!(smooth_schedule(&[0, 0]), Vec::<u8>::new());
        assert_eq!(
            smooth_schedule(&[0, 100])
                .iter()
                .filter(|v| **v == 1)
                .count(),
            100
        );
        let s = smooth_schedule(&[50, 30, 20]);
        assert_eq!(
            (0..3)
                .map(|v| s.iter().filter(|x| **x == v).count())
                .collect::<Vec<_>>(),
            vec![50, 30, 20]
        );
    }
}
