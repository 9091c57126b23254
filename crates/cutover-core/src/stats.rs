//! Request statistics of one version over one window, as the judge reads them.
//!
//! The metrics crate fills these from its HDR histograms; the judge reads them. Keeping the
//! latency distribution as plain `(value, count)` buckets lets the judge stay pure and free of
//! the histogram library, and it is exactly what a rank test over tied values needs.

use std::time::Duration;

/// Why an upstream exchange failed, as `cutover_upstream_errors_total{kind}` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamErrorKind {
    /// Could not connect (refused, unreachable, connect timeout).
    Connect,
    /// Connected, but no complete answer within the upstream timeout.
    Timeout,
    /// The connection broke mid-exchange.
    Reset,
}

impl UpstreamErrorKind {
    pub const ALL: &'static [UpstreamErrorKind] = &[
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
        }
    }
}

/// A latency distribution as buckets of `(latency in microseconds, number of requests)`, sorted
/// by latency with no repeated latency. Values are bucket representatives (HDR precision), so
/// equal values are real ties for rank statistics.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LatencyDist {
    buckets: Vec<(u64, u64)>,
}

impl LatencyDist {
    /// Builds a distribution from buckets in any order; repeated values are merged and empty
    /// buckets dropped.
    pub fn from_buckets(mut buckets: Vec<(u64, u64)>) -> Self {
        buckets.retain(|&(_, n)| n > 0);
        buckets.sort_unstable_by_key(|&(v, _)| v);
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(buckets.len());
        for (v, n) in buckets {
            match merged.last_mut() {
                Some((lv, ln)) if *lv == v => *ln += n,
                _ => merged.push((v, n)),
            }
        }
        LatencyDist { buckets: merged }
    }

    /// A distribution of individual latency samples in microseconds.
    pub fn from_samples(samples: impl IntoIterator<Item = u64>) -> Self {
        Self::from_buckets(samples.into_iter().map(|v| (v, 1)).collect())
    }

    pub fn buckets(&self) -> &[(u64, u64)] {
        &self.buckets
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The smallest latency at or below which a share `q` (0..=1) of requests fall.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        // Rank of the wanted sample, 1-based; ceil so that p99 of 100 samples is the 99th.
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(v, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(v));
            }
        }
        self.buckets.last().map(|&(v, _)| Duration::from_micros(v))
    }

    /// Adds another distribution's buckets to this one.
    pub fn merge(&mut self, other: &LatencyDist) {
        let mut all = std::mem::take(&mut self.buckets);
        all.extend_from_slice(&other.buckets);
        *self = Self::from_buckets(all);
    }
}

/// One version's requests over one analysis window.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WindowStats {
    /// Requests answered (by the upstream or by the proxy on its behalf).
    pub requests: u64,
    /// Of those, answered with a 5xx status, including the proxy's own 502/503/504.
    pub errors: u64,
    pub latency: LatencyDist,
}

impl WindowStats {
    /// The 5xx share, or `None` when there were no requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    pub fn merge(&mut self, other: &WindowStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_samples() {
        let d = LatencyDist::from_samples(1..=100);
        assert_eq!(d.count(), 100);
        assert_eq!(d.quantile(0.5), Some(Duration::from_micros(50)));
        assert_eq!(d.quantile(0.99), Some(Duration::from_micros(99)));
        assert_eq!(d.quantile(1.0), Some(Duration::from_micros(100)));
        assert_eq!(d.quantile(0.0), Some(Duration::from_micros(1)));
        assert_eq!(LatencyDist::default().quantile(0.5), None);
    }

    #[test]
    fn buckets_merge_and_sort() {
        let mut a = LatencyDist::from_buckets(vec![(5, 1), (1, 2), (5, 3), (9, 0)]);
        assert_eq!(a.buckets(), &[(1, 2), (5, 4)]);
        a.merge(&LatencyDist::from_buckets(vec![(1, 1), (7, 1)]));
        assert_eq!(a.buckets(), &[(1, 3), (5, 4), (7, 1)]);
    }
}
