//! cutover-metrics: what every request did, per service and version.
//!
//! The proxy records each answer through a [`VersionRecorder`] it resolved once per route table:
//! atomic counters per status class and upstream error kind, and the latency into an HDR
//! histogram. Everything is cumulative; readers take snapshots and subtract, so the judge's
//! window, the dashboard's series and Prometheus never reset each other's numbers. The metric
//! names of docs/reference.md §5 are defined once, here. This crate decides nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use cutover_core::{
    Health, LatencyDist, RolloutOutcome, ServiceName, Timestamp, UpstreamErrorKind, Version,
    WindowStats,
};
use hdrhistogram::Histogram;

mod signals;
pub use signals::{AlertGauge, ReceiverGauge, SignalGauges, SloGauge};

/// The metric names of docs/reference.md §5, and those added since; defined here only.
pub mod names {
    pub const REQUESTS: &str = "cutover_requests_total";
    pub const DURATION: &str = "cutover_request_duration_seconds";
    pub const WEIGHT: &str = "cutover_traffic_weight";
    pub const INSTANCES: &str = "cutover_instances";
    pub const ROLLOUTS: &str = "cutover_rollouts_total";
    pub const UPSTREAM_ERRORS: &str = "cutover_upstream_errors_total";
    // The proxy's client connections per service (docs/reference.md, `max_connections`).
    pub const CONNECTIONS_OPEN: &str = "cutover_connections_open";
    pub const CONNECTIONS_REJECTED: &str = "cutover_connections_rejected_total";
    // Faults, synthetic traffic and probes (docs/reference.md, "Chaos experiments").
    pub const FAULTS_ACTIVE: &str = "cutover_faults_active";
    pub const PROBE_SUCCESS: &str = "cutover_probe_success";
    pub const PROBE_DURATION: &str = "cutover_probe_duration_seconds";
    // SLOs and alerts (docs/reference.md §12), and the delivery of alerts to their receivers.
    pub const SLO_OBJECTIVE: &str = "cutover_slo_objective_ratio";
    pub const SLO_BUDGET_REMAINING: &str = "cutover_slo_error_budget_remaining_ratio";
    pub const SLO_BURN_RATE: &str = "cutover_slo_burn_rate";
    pub const ALERTS: &str = "cutover_alerts";
    pub const ALERT_NOTIFICATIONS: &str = "cutover_alert_notifications_total";
    pub const ALERT_RECEIVER_FAILING: &str = "cutover_alert_receiver_failing";
}

/// Upper bounds of the Prometheus histogram buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The dashboard keeps this many one-second points: 15 minutes.
const SERIES_POINTS: usize = 15 * 60;
/// How far back the dashboard's series reach. Points are also dropped by age, not only by
/// count, so points restored after a restart leave on time even for a version that no longer
/// takes requests.
pub const SERIES_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Latencies are recorded in microseconds up to an hour, at 3 significant digits.
const MAX_MICROS: u64 = 3_600_000_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain numbers behind, still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail at run time, whatever the input.
    Histogram::new_with_bounds(1, MAX_MICROS, 3)
        .expect("1µs..1h at 3 significant digits is a valid histogram")
}

/// The histogram as `(latency in µs, requests)` buckets: each recorded value at the top of its
/// precision range, so equal values are real ties. The judge's windows and the Prometheus
/// buckets both read this.
fn recorded(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    // For recorded values hdrhistogram already reports the highest equivalent value.
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

struct VersionMetrics {
    /// Answers by status class 1xx..5xx (index 0..4).
    classes: [AtomicU64; 5],
    upstream_errors: [AtomicU64; 3],
    latency: Mutex<Histogram<u64>>,
    /// Cutover's own probe traffic (`analysis.synthetic`), kept apart from users' requests:
    /// the judge counts both, while the users' series and counters never include it.
    synthetic_classes: [AtomicU64; 5],
    synthetic_latency: Mutex<Histogram<u64>>,
}

impl VersionMetrics {
    fn new() -> Self {
        VersionMetrics {
            classes: Default::default(),
            upstream_errors: Default::default(),
            latency: Mutex::new(new_histogram()),
            synthetic_classes: Default::default(),
            synthetic_latency: Mutex::new(new_histogram()),
        }
    }
}

fn class_of(status: u16) -> usize {
    usize::from((status / 100).clamp(1, 5) - 1)
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS)
}

/// Records answers of one version of one service. Cheap to clone.
#[derive(Clone)]
pub struct VersionRecorder(Arc<VersionMetrics>);

impl VersionRecorder {
    pub fn record(
        &self,
        status: u16,
        latency: Duration,
        upstream_error: Option<UpstreamErrorKind>,
    ) {
        self.0.classes[class_of(status)].fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = upstream_error {
            let i = match kind {
                UpstreamErrorKind::Connect => 0,
                UpstreamErrorKind::Timeout => 1,
                UpstreamErrorKind::Reset => 2,
            };
            self.0.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
        }
        let _ = lock(&self.0.latency).record(micros(latency));
    }

    /// Records an answer to cutover's own synthetic traffic: seen by the judge, counted with
    /// `source="synthetic"`, never in the users' numbers.
    pub fn record_synthetic(&self, status: u16, latency: Duration) {
        self.0.synthetic_classes[class_of(status)].fetch_add(1, Ordering::Relaxed);
        let _ = lock(&self.0.synthetic_latency).record(micros(latency));
    }
}

/// Cumulative numbers of one version at one moment.
#[derive(Clone)]
pub struct VersionSnapshot {
    requests: u64,
    errors: u64,
    latency: Histogram<u64>,
}

impl VersionSnapshot {
    fn of(m: &VersionMetrics) -> Self {
        let classes: Vec<u64> = m
            .classes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        VersionSnapshot {
            requests: classes.iter().sum(),
            errors: classes[4],
            latency: lock(&m.latency).clone(),
        }
    }

    /// What the judge reads: users' answers and cutover's synthetic ones together.
    fn judged(m: &VersionMetrics) -> Self {
        let mut s = VersionSnapshot::of(m);
        let synthetic: Vec<u64> = m
            .synthetic_classes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        s.requests += synthetic.iter().sum::<u64>();
        s.errors += synthetic[4];
        let _ = s.latency.add(&*lock(&m.synthetic_latency));
        s
    }

    /// Answers since the start (cumulative).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// 5xx answers since the start (cumulative).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Answers within `d` since the start (cumulative), to the histogram's precision (3
    /// significant digits: a value in the same precision step as `d` counts as within).
    pub fn within(&self, d: Duration) -> u64 {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(MAX_MICROS)
            .clamp(1, MAX_MICROS);
        self.latency.count_between(1, us)
    }

    /// What happened between `earlier` (or the start) and this snapshot.
    pub fn window_since(&self, earlier: Option<&VersionSnapshot>) -> WindowStats {
        let mut h = self.latency.clone();
        if let Some(e) = earlier {
            // Both are cumulative histograms of the same version, so `e` is contained in `h`;
            // if that ever failed the whole history is a safe (wider) answer.
            let _ = h.subtract(&e.latency);
        }
        let buckets = recorded(&h);
        WindowStats {
            requests: self.requests - earlier.map_or(0, |e| e.requests.min(self.requests)),
            errors: self.errors - earlier.map_or(0, |e| e.errors.min(self.errors)),
            latency: LatencyDist::from_buckets(buckets),
        }
    }
}

/// One point of the dashboard's series: what happened in one sampling interval.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesPoint {
    pub at: Timestamp,
    pub requests: u64,
    pub errors: u64,
    pub p99: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VersionSeries {
    pub version: Version,
    pub points: Vec<SeriesPoint>,
}

struct Series {
    last: Option<VersionSnapshot>,
    points: VecDeque<SeriesPoint>,
}

/// A service's client connections, counted by the proxy as they open, close and are turned
/// away (the proxy also decides admissions by `open`, so the gauge is the number it acts on).
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: AtomicU64,
    rejected: AtomicU64,
}

impl ConnectionCounts {
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        // Never below zero, even if a close were counted twice.
        let _ = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A connection answered 503 and closed at once: the service had `max_connections` open
    /// and none of them idle.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
}

type Key = (ServiceName, Version);
/// Instance counts of one service, by version and health.
type InstanceCounts = Vec<(Version, Health, u64)>;

#[derive(Default)]
struct Inner {
    versions: RwLock<BTreeMap<Key, Arc<VersionMetrics>>>,
    weights: Mutex<BTreeMap<ServiceName, Vec<(Version, u8)>>>,
    instances: Mutex<BTreeMap<ServiceName, InstanceCounts>>,
    rollouts: Mutex<BTreeMap<(ServiceName, &'static str), u64>>,
    series: Mutex<HashMap<Key, Series>>,
    connections: Mutex<BTreeMap<ServiceName, Arc<ConnectionCounts>>>,
    faults: Mutex<BTreeMap<ServiceName, u64>>,
    /// Per service and probe name: the last result and how long it took, in seconds.
    probes: Mutex<BTreeMap<(ServiceName, String), (bool, f64)>>,
    /// Bucket bounds (seconds) added to the exposition's histogram, e.g. SLO latencies, so
    /// that a Prometheus rule can read the share within them exactly.
    extra_buckets: RwLock<Vec<f64>>,
    signals: Mutex<SignalGauges>,
}

/// The daemon's metrics registry. Cheap to clone; all clones share the numbers.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics::default()
    }

    fn version(&self, service: &ServiceName, version: &Version) -> Arc<VersionMetrics> {
        let key = (service.clone(), version.clone());
        if let Some(m) = self
            .inner
            .versions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return m.clone();
        }
        self.inner
            .versions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| Arc::new(VersionMetrics::new()))
            .clone()
    }

    /// Every service and version that has a recorder.
    pub fn versions(&self) -> Vec<(ServiceName, Version)> {
        self.inner
            .versions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Adds histogram bucket bounds (in seconds) to the exposition.
    pub fn add_buckets(&self, seconds: &[f64]) {
        let mut b = self
            .inner
            .extra_buckets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.extend(seconds.iter().filter(|s| s.is_finite() && **s > 0.0));
        b.sort_by(f64::total_cmp);
        b.dedup();
    }

    /// Replaces the SLO, alert and receiver gauges (the signals task sets them each round).
    pub fn set_signals(&self, gauges: SignalGauges) {
        *lock(&self.inner.signals) = gauges;
    }

    pub fn recorder(&self, service: &ServiceName, version: &Version) -> VersionRecorder {
        VersionRecorder(self.version(service, version))
    }

    /// What the judge reads of a version: users' and synthetic requests together.
    pub fn snapshot(&self, service: &ServiceName, version: &Version) -> VersionSnapshot {
        VersionSnapshot::judged(&self.version(service, version))
    }

    /// Users' requests answered by a version so far (synthetic ones not included).
    pub fn user_requests(&self, service: &ServiceName, version: &Version) -> u64 {
        self.version(service, version)
            .classes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// How many faults are active on a service (or dependency) now.
    pub fn set_faults_active(&self, service: &ServiceName, n: u64) {
        lock(&self.inner.faults).insert(service.clone(), n);
    }

    /// The last result of a scheduled probe.
    pub fn set_probe(&self, service: &ServiceName, probe: &str, success: bool, took: Duration) {
        lock(&self.inner.probes).insert(
            (service.clone(), probe.to_owned()),
            (success, took.as_secs_f64()),
        );
    }

    /// The client connection counts of `service`, shared with whoever keeps them (the proxy).
    pub fn connections(&self, service: &ServiceName) -> Arc<ConnectionCounts> {
        lock(&self.inner.connections)
            .entry(service.clone())
            .or_default()
            .clone()
    }

    pub fn set_weights(&self, service: &ServiceName, weights: &[(Version, u8)]) {
        lock(&self.inner.weights).insert(service.clone(), weights.to_vec());
    }

    pub fn set_instances(&self, service: &ServiceName, counts: &[(Version, Health, u64)]) {
        lock(&self.inner.instances).insert(service.clone(), counts.to_vec());
    }

    pub fn inc_rollouts(&self, service: &ServiceName, outcome: RolloutOutcome) {
        *lock(&self.inner.rollouts)
            .entry((service.clone(), outcome.as_str()))
            .or_default() += 1;
    }

    /// Appends one point per version: what happened since the previous call.
    pub fn sample(&self, now: Timestamp) {
        let versions: Vec<(Key, Arc<VersionMetrics>)> = self
            .inner
            .versions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut series = lock(&self.inner.series);
        for (key, m) in versions {
            let snap = VersionSnapshot::of(&m);
            let s = series.entry(key).or_insert_with(|| Series {
                last: None,
                points: VecDeque::with_capacity(SERIES_POINTS),
            });
            let w = snap.window_since(s.last.as_ref());
            s.points.push_back(SeriesPoint {
                at: now,
                requests: w.requests,
                errors: w.errors,
                p99: w.latency.quantile(0.99),
            });
            s.last = Some(snap);
        }
        let oldest = now
            .as_millis()
            .saturating_sub(u64::try_from(SERIES_WINDOW.as_millis()).unwrap_or(u64::MAX));
        for s in series.values_mut() {
            while s.points.len() > SERIES_POINTS
                || s.points.front().is_some_and(|p| p.at.as_millis() <= oldest)
            {
                s.points.pop_front();
            }
        }
        series.retain(|_, s| !s.points.is_empty() || s.last.is_some());
    }

    /// Every series point sampled after `after`, for saving them elsewhere.
    pub fn points_after(&self, after: Timestamp) -> Vec<(ServiceName, Version, SeriesPoint)> {
        let series = lock(&self.inner.series);
        let mut out = Vec::new();
        for ((service, version), s) in series.iter() {
            // Points are in time order: walk back from the newest.
            let fresh = s.points.iter().rev().take_while(|p| p.at > after);
            let start = out.len();
            out.extend(fresh.map(|p| (service.clone(), version.clone(), p.clone())));
            out[start..].reverse();
        }
        out
    }

    /// Puts saved points (e.g. from before a restart) in front of what was sampled since.
    /// Points at or after the first sampled one are ignored, so restoring twice is harmless.
    pub fn restore_series(
        &self,
        service: &ServiceName,
        version: &Version,
        points: impl IntoIterator<Item = SeriesPoint>,
    ) {
        let mut series = lock(&self.inner.series);
        let s = series
            .entry((service.clone(), version.clone()))
            .or_insert_with(|| Series {
                last: None,
                points: VecDeque::with_capacity(SERIES_POINTS),
            });
        let first = s.points.front().map(|p| p.at);
        let mut older: Vec<SeriesPoint> = points
            .into_iter()
            .filter(|p| first.is_none_or(|f| p.at < f))
            .collect();
        older.sort_by_key(|p| p.at);
        older.dedup_by_key(|p| p.at);
        for p in older.into_iter().rev() {
            s.points.push_front(p);
        }
        while s.points.len() > SERIES_POINTS {
            s.points.pop_front();
        }
    }

    pub fn series(&self, service: &ServiceName) -> Vec<VersionSeries> {
        let series = lock(&self.inner.series);
        let mut out: Vec<VersionSeries> = series
            .iter()
            .filter(|((s, _), _)| s == service)
            .map(|((_, v), s)| VersionSeries {
                version: v.clone(),
                points: s.points.iter().cloned().collect(),
            })
            .collect();
        out.sort_by(|a, b| a.version.cmp(&b.version));
        out
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        #[allow(clippy::type_complexity)]
        let versions: Vec<(Key, VersionSnapshot, [u64; 5], [u64; 3], [u64; 5])> = self
            .inner
            .versions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, m)| {
                let classes = std::array::from_fn(|i| m.classes[i].load(Ordering::Relaxed));
                let errs = std::array::from_fn(|i| m.upstream_errors[i].load(Ordering::Relaxed));
                let synthetic =
                    std::array::from_fn(|i| m.synthetic_classes[i].load(Ordering::Relaxed));
                (k.clone(), VersionSnapshot::of(m), classes, errs, synthetic)
            })
            .collect();
        let labels = |s: &ServiceName, v: &Version| {
            format!(
                "service=\"{}\",version=\"{}\"",
                esc(s.as_str()),
                esc(v.as_str())
            )
        };

        header(
            &mut out,
            names::REQUESTS,
            "counter",
            "Requests answered, by status class.",
        );
        for ((s, v), _, classes, _, synthetic) in &versions {
            for (i, n) in classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{}{{{},code=\"{}xx\"}} {n}",
                    names::REQUESTS,
                    labels(s, v),
                    i + 1
                );
            }
            // Cutover's own probe traffic, apart: only once there has been some.
            if synthetic.iter().any(|n| *n > 0) {
                for (i, n) in synthetic.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{}{{{},code=\"{}xx\",source=\"synthetic\"}} {n}",
                        names::REQUESTS,
                        labels(s, v),
                        i + 1
                    );
                }
            }
        }
        header(
            &mut out,
            names::DURATION,
            "histogram",
            "Request latency through the proxy, in seconds.",
        );
        let bounds: Vec<f64> = {
            let extra = self
                .inner
                .extra_buckets
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut b: Vec<f64> = BUCKETS.iter().chain(extra.iter()).copied().collect();
            b.sort_by(f64::total_cmp);
            b.dedup();
            b
        };
        for ((s, v), snap, _, _, _) in &versions {
            let h = &snap.latency;
            let recorded = recorded(h);
            // One pass: buckets are sorted by latency, and so are the bounds.
            let (mut i, mut below) = (0, 0u64);
            for le in &bounds {
                let us = (le * 1e6) as u64;
                while let Some((_, n)) = recorded.get(i).filter(|(at, _)| *at <= us) {
                    below += n;
                    i += 1;
                }
                let _ = writeln!(
                    out,
                    "{}_bucket{{{},le=\"{le}\"}} {below}",
                    names::DURATION,
                    labels(s, v)
                );
            }
            let _ = writeln!(
                out,
                "{}_bucket{{{},le=\"+Inf\"}} {}",
                names::DURATION,
                labels(s, v),
                h.len()
            );
            let sum: f64 = recorded
                .iter()
                .map(|(v, n)| *v as f64 * *n as f64)
                .sum::<f64>()
                / 1e6;
            let _ = writeln!(out, "{}_sum{{{}}} {sum}", names::DURATION, labels(s, v));
            let _ = writeln!(
                out,
                "{}_count{{{}}} {}",
                names::DURATION,
                labels(s, v),
                h.len()
            );
        }
        header(
            &mut out,
            names::WEIGHT,
            "gauge",
            "Share of unpinned traffic a version really gets, in percent (none without a routable instance).",
        );
        for (s, ws) in lock(&self.inner.weights).iter() {
            for (v, w) in ws {
                let _ = writeln!(out, "{}{{{}}} {w}", names::WEIGHT, labels(s, v));
            }
        }
        header(
            &mut out,
            names::INSTANCES,
            "gauge",
            "Instances by version and health.",
        );
        for (s, counts) in lock(&self.inner.instances).iter() {
            for (v, h, n) in counts {
                let _ = writeln!(
                    out,
                    "{}{{{},health=\"{}\"}} {n}",
                    names::INSTANCES,
                    labels(s, v),
                    h.as_str()
                );
            }
        }
        header(
            &mut out,
            names::ROLLOUTS,
            "counter",
            "Rollouts that ended, by outcome.",
        );
        for ((s, o), n) in lock(&self.inner.rollouts).iter() {
            let _ = writeln!(
                out,
                "{}{{service=\"{}\",outcome=\"{o}\"}} {n}",
                names::ROLLOUTS,
                esc(s.as_str())
            );
        }
        header(
            &mut out,
            names::UPSTREAM_ERRORS,
            "counter",
            "Failed exchanges with upstream instances, by kind.",
        );
        for ((s, v), _, _, errs, _) in &versions {
            for (kind, n) in UpstreamErrorKind::ALL.iter().zip(errs) {
                let _ = writeln!(
                    out,
                    "{}{{{},kind=\"{}\"}} {n}",
                    names::UPSTREAM_ERRORS,
                    labels(s, v),
                    kind.as_str()
                );
            }
        }
        let connections: Vec<(ServiceName, Arc<ConnectionCounts>)> = lock(&self.inner.connections)
            .iter()
            .map(|(s, c)| (s.clone(), c.clone()))
            .collect();
        header(
            &mut out,
            names::CONNECTIONS_OPEN,
            "gauge",
            "Client connections open, per service.",
        );
        for (s, c) in &connections {
            let _ = writeln!(
                out,
                "{}{{service=\"{}\"}} {}",
                names::CONNECTIONS_OPEN,
                esc(s.as_str()),
                c.open()
            );
        }
        header(
            &mut out,
            names::CONNECTIONS_REJECTED,
            "counter",
            "Client connections answered 503 and closed at once: max_connections were open, none idle.",
        );
        for (s, c) in &connections {
            let _ = writeln!(
                out,
                "{}{{service=\"{}\"}} {}",
                names::CONNECTIONS_REJECTED,
                esc(s.as_str()),
                c.rejected_total()
            );
        }
        header(
            &mut out,
            names::FAULTS_ACTIVE,
            "gauge",
            "Faults injected now, per service or dependency.",
        );
        for (s, n) in lock(&self.inner.faults).iter() {
            let _ = writeln!(
                out,
                "{}{{service=\"{}\"}} {n}",
                names::FAULTS_ACTIVE,
                esc(s.as_str())
            );
        }
        let probes = lock(&self.inner.probes).clone();
        header(
            &mut out,
            names::PROBE_SUCCESS,
            "gauge",
            "Whether a scheduled probe's last run passed (1) or not (0).",
        );
        for ((s, p), (ok, _)) in &probes {
            let _ = writeln!(
                out,
                "{}{{service=\"{}\",probe=\"{}\"}} {}",
                names::PROBE_SUCCESS,
                esc(s.as_str()),
                esc(p),
                u8::from(*ok)
            );
        }
        header(
            &mut out,
            names::PROBE_DURATION,
            "gauge",
            "How long a scheduled probe's last run took, in seconds.",
        );
        for ((s, p), (_, took)) in &probes {
            let _ = writeln!(
                out,
                "{}{{service=\"{}\",probe=\"{}\"}} {took}",
                names::PROBE_DURATION,
                esc(s.as_str()),
                esc(p),
            );
        }
        lock(&self.inner.signals).render(&mut out);
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn windows_are_deltas_of_cumulative_numbers() {
        let m = Metrics::new();
        let (s, v) = (ServiceName::new("web"), Version::new("v2"));
        let r = m.recorder(&s, &v);
        for i in 0..100 {
            r.record(if i < 3 { 500 } else { 200 }, ms(10), None);
        }
        let first = m.snapshot(&s, &v);
        for _ in 0..50 {
            r.record(503, ms(100), Some(UpstreamErrorKind::Connect));
        }
        let w = m.snapshot(&s, &v).window_since(Some(&first));
        assert_eq!((w.requests, w.errors), (50, 50));
        let p50 = w.latency.quantile(0.5).unwrap();
        assert!(p50 >= ms(99) && p50 <= ms(101), "{p50:?}");
        let snap = m.snapshot(&s, &v);
        assert_eq!((snap.requests(), snap.errors()), (150, 53));
        assert_eq!(snap.within(ms(50)), 100);
        assert_eq!(snap.within(ms(100)), 150);
        let all = m.snapshot(&s, &v).window_since(None);
        assert_eq!(
            (all.requests, all.errors, all.latency.count()),
            (150, 53, 150)
        );
    }

    #[test]
    fn series_points_are_per_interval() {
        let m = Metrics::new();
        let (s, v) = (ServiceName::new("web"), Version::new("v1"));
        let r = m.recorder(&s, &v);
        r.record(200, ms(5), None);
        m.sample(Timestamp(1_000));
        r.record(200, ms(5), None);
        r.record(500, ms(5), None);
        m.sample(Timestamp(2_000));
        let series = m.series(&s);
        assert_eq!(series.len(), 1);
        let counts: Vec<(u64, u64)> = series[0]
            .points
            .iter()
            .map(|p| (p.requests, p.errors))
            .collect();
        assert_eq!(counts, vec![(1, 0), (2, 1)]);
        for i in 0..(SERIES_POINTS as u64 + 10) {
            m.sample(Timestamp(3_000 + i));
        }
        assert_eq!(m.series(&s)[0].points.len(), SERIES_POINTS);
    }

    #[test]
    fn series_are_bounded_by_age_and_restorable() {
        let m = Metrics::new();
        let (s, v1, old) = (
            ServiceName::new("web"),
            Version::new("v1"),
            Version::new("v0"),
        );
        let window = SERIES_WINDOW.as_millis() as u64;
        let t0 = 10 * window;
        let point = |at: u64, requests: u64| SeriesPoint {
            at: Timestamp(at),
            requests,
            errors: 0,
            p99: None,
        };
        // Before the restart: v0 took traffic, v1 too; saved points come back in order.
        m.restore_series(&s, &old, vec![point(t0 - 2_000, 3), point(t0 - 3_000, 4)]);
        m.restore_series(&s, &v1, vec![point(t0 - 1_000, 9)]);
        m.recorder(&s, &v1).record(200, ms(1), None);
        m.sample(Timestamp(t0));
        let series = m.series(&s);
        let counts: Vec<(&str, Vec<u64>)> = series
            .iter()
            .map(|vs| {
                (
                    vs.version.as_str(),
                    vs.points.iter().map(|p| p.requests).collect(),
                )
            })
            .collect();
        assert_eq!(counts, vec![("v0", vec![4, 3]), ("v1", vec![9, 1])]);
        // Restoring again (or something newer than what was sampled) changes nothing.
        m.restore_series(&s, &v1, vec![point(t0 - 1_000, 9), point(t0 + 5, 1)]);
        assert_eq!(m.series(&s)[1].points.len(), 2);
        let fresh = m.points_after(Timestamp(t0 - 1_500));
        assert_eq!(
            fresh
                .iter()
                .map(|(_, v, p)| (v.as_str(), p.at.as_millis()))
                .collect::<Vec<_>>(),
            vec![("v1", t0 - 1_000), ("v1", t0)]
        );
        // Fifteen minutes on, the restored points have aged out, and v0 with them.
        m.sample(Timestamp(t0 + window - 500));
        let series = m.series(&s);
        assert_eq!(series.len(), 1, "v0 has no points left");
        assert_eq!(
            series[0]
                .points
                .iter()
                .map(|p| p.at.as_millis())
                .collect::<Vec<_>>(),
            vec![t0, t0 + window - 500]
        );
    }

    fn sample_exposition() -> String {
        let m = Metrics::new();
        let (s, v1, v2) = (
            ServiceName::new("web"),
            Version::new("v1"),
            Version::new("v2"),
        );
        m.recorder(&s, &v1).record(200, ms(3), None);
        m.recorder(&s, &v2)
            .record(502, ms(700), Some(UpstreamErrorKind::Reset));
        m.set_weights(&s, &[(v1.clone(), 90), (v2.clone(), 10)]);
        m.set_instances(&s, &[(v1, Health::Healthy, 2), (v2, Health::Starting, 1)]);
        m.inc_rollouts(&s, RolloutOutcome::RolledBack);
        let c = m.connections(&s);
        c.opened();
        c.opened();
        c.closed();
        c.rejected();
        m.add_buckets(&[0.3, 0.25]);
        m.set_signals(SignalGauges {
            slos: vec![SloGauge {
                service: "web".into(),
                slo: "availability".into(),
                objective: 0.999,
                budget_remaining: -0.31,
                burn_rates: vec![("5m".into(), 14.5), ("1h".into(), f64::INFINITY)],
            }],
            alerts: vec![AlertGauge {
                alertname: "ErrorBudgetBurn".into(),
                severity: "page".into(),
                state: "firing".into(),
                count: 1,
            }],
            receivers: vec![ReceiverGauge {
                receiver: "oncall".into(),
                sent: 2,
                failed: 1,
                failing: true,
            }],
        });
        m.render_prometheus()
    }

    #[test]
    fn exposition_has_the_contract_names() {
        let text = sample_exposition();
        for line in [
            "cutover_requests_total{service=\"web\",version=\"v1\",code=\"2xx\"} 1",
            "cutover_requests_total{service=\"web\",version=\"v2\",code=\"5xx\"} 1",
            "cutover_request_duration_seconds_bucket{service=\"web\",version=\"v1\",le=\"0.005\"} 1",
            "cutover_request_duration_seconds_bucket{service=\"web\",version=\"v2\",le=\"0.5\"} 0",
            "cutover_request_duration_seconds_count{service=\"web\",version=\"v2\"} 1",
            "cutover_traffic_weight{service=\"web\",version=\"v2\"} 10",
            "cutover_instances{service=\"web\",version=\"v1\",health=\"healthy\"} 2",
            "cutover_rollouts_total{service=\"web\",outcome=\"rolled-back\"} 1",
            "cutover_upstream_errors_total{service=\"web\",version=\"v2\",kind=\"reset\"} 1",
            "cutover_connections_open{service=\"web\"} 1",
            "cutover_connections_rejected_total{service=\"web\"} 1",
            "cutover_request_duration_seconds_bucket{service=\"web\",version=\"v2\",le=\"0.3\"} 0",
            "cutover_slo_objective_ratio{service=\"web\",slo=\"availability\"} 0.999",
            "cutover_slo_error_budget_remaining_ratio{service=\"web\",slo=\"availability\"} -0.31",
            "cutover_slo_burn_rate{service=\"web\",slo=\"availability\",window=\"5m\"} 14.5",
            "cutover_slo_burn_rate{service=\"web\",slo=\"availability\",window=\"1h\"} +Inf",
            "cutover_alerts{alertname=\"ErrorBudgetBurn\",severity=\"page\",state=\"firing\"} 1",
            "cutover_alert_notifications_total{receiver=\"oncall\",outcome=\"failed\"} 1",
            "cutover_alert_receiver_failing{receiver=\"oncall\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    /// `promtool check metrics` on real output. CI installs promtool (Debian's `prometheus`),
    /// so there a missing promtool is a failure; elsewhere the check is skipped with a note.
    #[test]
    fn exposition_passes_promtool() {
        use std::io::Write as _;
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must install promtool (.ci/run does)"
            );
            eprintln!("note: promtool not installed; skipping the exposition check");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sample_exposition().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
