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

use crate::backend::{BackendState, Backends};

pub(crate) struct CompiledVersion {
    pub(crate) version: Version,
    pub(crate) backends: Vec<Arc<BackendState>>,
    pub(crate) recorder: VersionRecorder,
    next: AtomicUsize,
}

impl CompiledVersion {
    /// The next routable instance in round-robin order, skipping `avoid`.
    pub(crate) fn pick(&self, avoid: Option<&BackendState>) -> Option<&Arc<BackendState>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.backends[(start + i) % n])
            .find(|b| b.routable() && avoid.is_none_or(|a| !std::ptr::eq(a, b.as_ref())))
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
                        backends.get_or_create(&b.instance, &rv.version, b.addr, connect_timeout)
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
        }
    }

    /// The version for the next unpinned request.
    pub(crate) fn next_version(&self) -> Option<&CompiledVersion> {
        if self.schedule.is_empty() {
            return None;
        }
        let i = self.counter.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.versions.get(usize::from(self.schedule[i]))
    }

    pub(crate) fn version(&self, name: &str) -> Option<&CompiledVersion> {
        self.versions.iter().find(|v| v.version.as_str() == name)
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
