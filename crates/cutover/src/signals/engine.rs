//! The signals task: counts, SLOs, alerts and notifications, one round at a time.
//!
//! Each round (every sixth of a bucket, at most 10 s) it reads the cumulative counters the
//! proxy already keeps (no work is added to the request path), adds what each version answered
//! since the last round to the current minute, in memory and in SQLite; evaluates every SLO and
//! alert rule on what it has; steps each alert's state machine, recording every transition as
//! an event; and hands what Alertmanager's timing says is due to the receivers. It runs on a
//! thread of its own with its own SQLite connection, so neither a proxied request nor a
//! controller decision ever waits for it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_config::Settings;
use cutover_controller::{Controller, EventView, Notice, ServiceView};
use cutover_core::{EventKind, Health, LatencyDist, Phase, ServiceName, Timestamp, Version};
use cutover_metrics::{
    AlertGauge, Metrics, ReceiverGauge, SignalGauges, SloGauge, VersionSnapshot,
};
use cutover_signals::alert::{AlertState, Transition, step};
use cutover_signals::route::{Alert, Dispatcher, Routing};
use cutover_signals::rules::{Metric, RuleSpec, Sample, builtin};
use cutover_signals::slo::{self, Counts, Minute, Severity, SloSpec, SloStatus};
use cutover_signals::{Labels, short_duration};
use cutover_store::signals::CountRow;
use cutover_store::{NewEvent, Store};
use tokio::sync::{broadcast, mpsc, watch};

use super::deliver::{Deliverer, Outcome};
use crate::series::now;

/// Hours of compacted counts are kept this long.
const KEEP_HOURS: Duration = Duration::from_secs(400 * 86_400);
/// Resolved alerts stay visible in `cutover alerts` this long.
const SHOW_RESOLVED: Duration = Duration::from_secs(15 * 60);
/// How often old minutes are compacted into hours.
const COMPACT_EVERY: Duration = Duration::from_secs(3_600);

/// One bucket of one service (all versions): requests, 5xx, and answers within each SLO
/// latency (µs).
#[derive(Clone, Debug, Default)]
struct Bucket {
    requests: u64,
    errors: u64,
    within: BTreeMap<u64, u64>,
}

/// What the API reads: the last round's results.
#[derive(Default)]
pub struct Shared {
    pub slos: Vec<SloView>,
    pub alerts: Vec<AlertView>,
    pub receivers: Vec<ReceiverView>,
}

#[derive(Clone)]
pub struct SloView {
    pub status: SloStatus,
    /// `(bucket start, budget remaining)`.
    pub burn_down: Vec<(Timestamp, f64)>,
}

#[derive(Clone)]
pub struct AlertView {
    pub labels: Labels,
    pub state: AlertState,
    pub summary: String,
    pub receivers: Vec<String>,
}

#[derive(Clone, Default)]
pub struct ReceiverView {
    pub name: String,
    pub kind: String,
    pub sent: u64,
    pub failed: u64,
    pub failing: bool,
    pub last_error: Option<String>,
    pub last_sent: Option<Timestamp>,
}

/// An alert's entry: its identity, state and last words.
struct Entry {
    labels: Labels,
    annotations: Labels,
    hold: Duration,
    state: AlertState,
    summary: String,
}

/// One candidate alert of this round: does its condition hold, and what does it say.
struct Candidate {
    labels: Labels,
    annotations: Labels,
    hold: Duration,
    holds: bool,
    summary: String,
}

/// A built-in alert raised by an event, held until it resolves.
struct OneShot {
    labels: Labels,
    summary: String,
    since: Timestamp,
}

pub struct Engine {
    bucket_ms: u64,
    metrics: Metrics,
    store: Store,
    controller: Controller,
    slos: Vec<SloSpec>,
    rules: Vec<RuleSpec>,
    routing: Routing,
    deliverer: Deliverer,
    /// Latency thresholds (µs) counted per service, from its SLOs.
    thresholds: BTreeMap<String, Vec<u64>>,
    /// Cumulative numbers of each version at the last round.
    last: HashMap<(ServiceName, Version), (u64, u64, Vec<u64>)>,
    history: BTreeMap<String, BTreeMap<u64, Bucket>>,
    /// Snapshots for the rules' windows, per version, oldest first.
    snapshots: HashMap<(ServiceName, Version), VecDeque<(Timestamp, VersionSnapshot)>>,
    snapshot_every: Duration,
    longest_rule_window: Duration,
    alerts: BTreeMap<String, Entry>,
    oneshots: BTreeMap<String, OneShot>,
    exits: BTreeMap<(String, String), VecDeque<Timestamp>>,
    dispatcher: Dispatcher,
    receivers: BTreeMap<String, ReceiverView>,
    phases: BTreeMap<String, Phase>,
    shared: Arc<Mutex<Shared>>,
    next_compaction: Timestamp,
    /// Minutes (buckets) kept: the longest SLO window.
    keep_buckets: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn key(l: &Labels) -> String {
    cutover_signals::route::labels_text(l)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

pub struct Parts {
    pub settings: Settings,
    pub metrics: Metrics,
    pub store: Store,
    pub controller: Controller,
    pub shared: Arc<Mutex<Shared>>,
    pub bucket: Duration,
    pub external_url: String,
}

impl Engine {
    /// The engine with the history of the longest SLO window loaded back from SQLite.
    pub fn new(p: Parts, outcomes: mpsc::UnboundedSender<Outcome>) -> Engine {
        let bucket_ms = u64::try_from(p.bucket.as_millis()).unwrap_or(60_000).max(1);
        let slos: Vec<SloSpec> = p
            .settings
            .services
            .iter()
            .flat_map(|s| s.slos.iter().cloned())
            .collect();
        let mut thresholds: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for s in &slos {
            if let Some(l) = s.latency {
                let t = thresholds.entry(s.service.clone()).or_default();
                t.push(us(l));
                t.sort_unstable();
                t.dedup();
            }
        }
        // The exposition gets the SLO latencies as buckets, for the exported rules.
        let secs: Vec<f64> = slos
            .iter()
            .filter_map(|s| s.latency.map(|l| l.as_secs_f64()))
            .collect();
        p.metrics.add_buckets(&secs);
        // Minutes are kept for the longest SLO window, and at least 30 days.
        let keep_buckets = slos
            .iter()
            .map(|s| slo::minutes(s.window))
            .max()
            .unwrap_or(0)
            .max(30 * 24 * 60);
        let rules = p.settings.signals.rules.clone();
        let longest_rule_window = rules
            .iter()
            .map(|r| r.window)
            .max()
            .unwrap_or(Duration::from_secs(60));
        let shortest = rules
            .iter()
            .map(|r| r.window)
            .min()
            .unwrap_or(Duration::from_secs(60));
        let receivers = p
            .settings
            .signals
            .receivers
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    ReceiverView {
                        name: r.name.clone(),
                        kind: r.kind.as_str().to_owned(),
                        ..ReceiverView::default()
                    },
                )
            })
            .collect();
        let deliverer = Deliverer::new(
            p.settings.signals.receivers.clone(),
            p.external_url.clone(),
            outcomes,
        );
        let mut e = Engine {
            bucket_ms,
            metrics: p.metrics,
            store: p.store,
            controller: p.controller,
            slos,
            rules,
            routing: p.settings.signals.routing.clone(),
            deliverer,
            thresholds,
            last: HashMap::new(),
            history: BTreeMap::new(),
            snapshots: HashMap::new(),
            snapshot_every: (shortest / 10).max(Duration::from_millis(100)),
            longest_rule_window,
            alerts: BTreeMap::new(),
            oneshots: BTreeMap::new(),
            exits: BTreeMap::new(),
            dispatcher: Dispatcher::default(),
            receivers,
            phases: BTreeMap::new(),
            shared: p.shared,
            next_compaction: Timestamp(0),
            keep_buckets,
        };
        e.restore();
        e
    }

    /// How often a round runs: six times a bucket, at most every 10 s, at least every 100 ms.
    pub fn round_every(&self) -> Duration {
        Duration::from_millis(self.bucket_ms / 6)
            .clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    fn index(&self, t: Timestamp) -> u64 {
        t.as_millis() / self.bucket_ms
    }

    fn restore(&mut self) {
        let from = Timestamp(
            self.index(now())
                .saturating_sub(self.keep_buckets)
                .saturating_mul(self.bucket_ms),
        );
        match self.store.signal_counts_since(from) {
            Ok(rows) => {
                let n = rows.len();
                let width = self.bucket_ms;
                for r in rows.iter().filter(|r| r.width_ms == width) {
                    self.add_to_history(r);
                }
                tracing::debug!(
                    rows = n,
                    "restored the per-minute counts of the SLO windows"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the per-minute counts; SLOs start without history")
            }
        }
    }

    fn add_to_history(&mut self, r: &CountRow) {
        let b = self
            .history
            .entry(r.service.clone())
            .or_default()
            .entry(r.at.as_millis() / self.bucket_ms)
            .or_default();
        b.requests += r.requests;
        b.errors += r.errors;
        for (t, k) in &r.within {
            *b.within.entry(*t).or_default() += k;
        }
    }

    /// Reads what every version answered since the last round; adds it to the history and
    /// to SQLite.
    fn count(&mut self, t: Timestamp) {
        let at = Timestamp(self.index(t) * self.bucket_ms);
        let mut rows = Vec::new();
        for (service, version) in self.metrics.versions() {
            let snap = self.metrics.snapshot(&service, &version);
            let thresholds = self
                .thresholds
                .get(service.as_str())
                .cloned()
                .unwrap_or_default();
            let within: Vec<u64> = thresholds
                .iter()
                .map(|t| snap.within(Duration::from_micros(*t)))
                .collect();
            let now_counts = (snap.requests(), snap.errors(), within);
            let k = (service.clone(), version.clone());
            let before = self
                .last
                .get(&k)
                .cloned()
                .unwrap_or((0, 0, vec![0; thresholds.len()]));
            let d_req = now_counts.0.saturating_sub(before.0);
            if d_req > 0 {
                rows.push(CountRow {
                    service: service.to_string(),
                    version: version.to_string(),
                    at,
                    width_ms: self.bucket_ms,
                    requests: d_req,
                    errors: now_counts.1.saturating_sub(before.1),
                    within: thresholds
                        .iter()
                        .enumerate()
                        .map(|(i, th)| {
                            (
                                *th,
                                now_counts.2[i]
                                    .saturating_sub(before.2.get(i).copied().unwrap_or(0)),
                            )
                        })
                        .collect(),
                });
            }
            self.last.insert(k.clone(), now_counts);
            // The rules' windows: a snapshot every `snapshot_every`, kept for the longest.
            let ring = self.snapshots.entry(k).or_default();
            if ring
                .back()
                .is_none_or(|(at, _)| t.since(*at) >= self.snapshot_every)
            {
                ring.push_back((t, snap));
            }
            let keep = self.longest_rule_window + self.snapshot_every * 2;
            while ring.len() > 2 && ring.get(1).is_some_and(|(at, _)| t.since(*at) >= keep) {
                ring.pop_front();
            }
        }
        for r in &rows {
            self.add_to_history(r);
        }
        if !rows.is_empty()
            && let Err(e) = self.store.add_signal_counts(&rows)
        {
            // The SLOs in memory are right; after a restart this minute would be short.
            tracing::warn!(error = %e, "could not save the per-minute counts");
        }
        let oldest = self.index(t).saturating_sub(self.keep_buckets);
        for h in self.history.values_mut() {
            while h.first_key_value().is_some_and(|(i, _)| *i < oldest) {
                h.pop_first();
            }
        }
        if t >= self.next_compaction {
            self.next_compaction = t.plus(COMPACT_EVERY);
            let cut = Timestamp(oldest * self.bucket_ms);
            let hours = Timestamp(
                t.as_millis()
                    .saturating_sub(u64::try_from(KEEP_HOURS.as_millis()).unwrap_or(0)),
            );
            if let Err(e) = self.store.compact_signal_counts(cut, hours) {
                tracing::warn!(error = %e, "could not compact the per-minute counts");
            }
        }
    }

    fn minutes(&self, spec: &SloSpec) -> Vec<Minute> {
        let Some(h) = self.history.get(&spec.service) else {
            return Vec::new();
        };
        let threshold = spec.latency.map(us);
        h.iter()
            .map(|(i, b)| Minute {
                index: *i,
                counts: Counts::new(
                    b.requests,
                    match threshold {
                        None => b.errors,
                        Some(t) => {
                            b.requests - b.within.get(&t).copied().unwrap_or(0).min(b.requests)
                        }
                    },
                ),
            })
            .collect()
    }

    /// A service's sample for the rules: over `window`, all versions together.
    fn sample(&self, service: &str, window: Duration, t: Timestamp, healthy: u64) -> Sample {
        let (mut requests, mut errors, mut buckets, mut elapsed) =
            (0u64, 0u64, Vec::new(), Duration::ZERO);
        for ((s, v), ring) in &self.snapshots {
            if s.as_str() != service {
                continue;
            }
            // The newest snapshot at least `window` old, or the oldest there is.
            let old = ring
                .iter()
                .rev()
                .find(|(at, _)| t.since(*at) >= window)
                .or_else(|| ring.front());
            let Some((at, old)) = old else { continue };
            let w = self.metrics.snapshot(s, v).window_since(Some(old));
            requests += w.requests;
            errors += w.errors;
            buckets.extend_from_slice(w.latency.buckets());
            elapsed = elapsed.max(t.since(*at));
        }
        let secs = elapsed.max(Duration::from_millis(100)).as_secs_f64();
        let dist = LatencyDist::from_buckets(buckets);
        Sample {
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            p99: dist.quantile(0.99),
            healthy_instances: healthy,
            rps: requests as f64 / secs,
        }
    }

    /// One round at `t`.
    pub async fn round(&mut self, t: Timestamp) {
        self.count(t);
        // Without the controller's view (it is stopping) nothing is judged this round: the
        // rules would see no service and resolve every alert.
        let Ok(services) = self.controller.status().await else {
            return;
        };
        self.phases = services
            .iter()
            .map(|s| (s.name.to_string(), s.phase))
            .collect();
        let idx = self.index(t);
        let mut slo_views = Vec::new();
        let mut candidates = Vec::new();
        for spec in &self.slos {
            let minutes = self.minutes(spec);
            let status = slo::evaluate(spec, &minutes, idx);
            let burn_down = slo::burn_down(spec, &minutes, idx, 60)
                .into_iter()
                .map(|(i, v)| (Timestamp(i * self.bucket_ms), v))
                .collect();
            for sev in [Severity::Page, Severity::Ticket] {
                candidates.push(slo_candidate(&status, sev));
            }
            slo_views.push(SloView { status, burn_down });
        }
        for rule in &self.rules {
            let names: Vec<&ServiceView> = services
                .iter()
                .filter(|s| rule.service.as_deref().is_none_or(|r| r == s.name.as_str()))
                .collect();
            for svc in names {
                let healthy = svc
                    .instances
                    .iter()
                    .filter(|i| i.health == Health::Healthy)
                    .count() as u64;
                let sample = self.sample(svc.name.as_str(), rule.window, t, healthy);
                candidates.push(rule_candidate(rule, svc.name.as_str(), &sample));
            }
        }
        self.builtin_candidates(t, &mut candidates);
        self.step_alerts(t, candidates);

        // What fires goes to the dispatcher; what is due goes out.
        let firing: Vec<Alert> = self
            .alerts
            .values()
            .filter_map(|e| match e.state {
                AlertState::Firing { since, .. } => Some(Alert {
                    labels: e.labels.clone(),
                    annotations: e.annotations.clone(),
                    starts_at: since,
                    ends_at: None,
                }),
                _ => None,
            })
            .collect();
        let deliverer = self.deliverer.clone();
        let due = self
            .dispatcher
            .tick(&self.routing, &firing, |r| deliverer.send_resolved(r), t);
        for n in due {
            tracing::info!(receiver = %n.receiver, group = %n.group_key, status = n.status(), alerts = n.alerts.len(), "sending an alert notification");
            self.deliverer.send(n);
        }
        self.publish(slo_views);
    }

    fn builtin_candidates(&mut self, t: Timestamp, out: &mut Vec<Candidate>) {
        self.oneshots
            .retain(|_, o| t.since(o.since) < builtin::RESOLVE_AFTER);
        for o in self.oneshots.values() {
            out.push(Candidate {
                labels: o.labels.clone(),
                annotations: labels(&[("summary", &o.summary)]),
                hold: Duration::ZERO,
                holds: true,
                summary: o.summary.clone(),
            });
        }
        for ((service, instance), exits) in self.exits.iter_mut() {
            while exits
                .front()
                .is_some_and(|e| t.since(*e) >= builtin::CRASH_WINDOW)
            {
                exits.pop_front();
            }
            if exits.len() >= builtin::CRASH_EXITS {
                let summary = format!(
                    "instance {instance} of {service} exited {} times in the last {}",
                    exits.len(),
                    short_duration(builtin::CRASH_WINDOW)
                );
                out.push(Candidate {
                    labels: labels(&[
                        ("alertname", builtin::CRASH_LOOPING),
                        ("service", service),
                        ("severity", builtin::SEVERITY),
                        ("instance", instance),
                    ]),
                    annotations: labels(&[("summary", &summary)]),
                    hold: Duration::ZERO,
                    holds: true,
                    summary,
                });
            }
        }
        self.exits.retain(|_, e| !e.is_empty());
    }

    fn step_alerts(&mut self, t: Timestamp, candidates: Vec<Candidate>) {
        let mut seen = BTreeSet::new();
        let mut transitions = Vec::new();
        for c in candidates {
            let k = key(&c.labels);
            seen.insert(k.clone());
            let e = self.alerts.entry(k.clone()).or_insert_with(|| Entry {
                labels: c.labels.clone(),
                annotations: c.annotations.clone(),
                hold: c.hold,
                state: AlertState::Inactive,
                summary: c.summary.clone(),
            });
            let (next, tr) = step(e.state, c.holds, c.hold, t);
            e.state = next;
            e.hold = c.hold;
            // A firing alert keeps the words it fired with until its numbers change while it
            // fires; a resolved one says what its numbers are now.
            e.summary = c.summary;
            e.annotations = c.annotations;
            if let Some(tr) = tr {
                transitions.push((k, tr));
            }
        }
        // Alerts no longer defined (a rule removed, a one-off that expired) stop holding.
        for (k, e) in self.alerts.iter_mut().filter(|(k, _)| !seen.contains(*k)) {
            let (next, tr) = step(e.state, false, e.hold, t);
            e.state = next;
            if let Some(tr) = tr {
                transitions.push((k.clone(), tr));
            }
        }
        for (k, tr) in transitions {
            if let Some(e) = self.alerts.get(&k) {
                let (service, message) = describe(e, tr);
                self.record(&service, tr.event_kind(), message, t);
            }
        }
        self.alerts.retain(|_, e| match e.state {
            AlertState::Inactive => false,
            AlertState::Resolved { at, .. } => t.since(at) < SHOW_RESOLVED,
            _ => true,
        });
    }

    /// Saves an event and passes it on to live views.
    fn record(&mut self, service: &str, kind: EventKind, message: String, t: Timestamp) {
        tracing::info!(service, kind = kind.as_str(), "{message}");
        let e = NewEvent {
            service: service.to_owned(),
            rollout_id: None,
            at: t,
            kind: kind.as_str().to_owned(),
            message: message.clone(),
            data: "{}".to_owned(),
        };
        match self.store.append_event(&e) {
            Ok(id) => self.controller.publish(Notice {
                event: EventView {
                    id,
                    service: service.to_owned(),
                    rollout_id: None,
                    at: t,
                    kind,
                    message,
                },
                phase: self.phases.get(service).copied().unwrap_or(Phase::Stable),
                instance: None,
            }),
            Err(err) => tracing::warn!(error = %err, "could not record an alert event"),
        }
    }

    /// An event the controller recorded: rollouts that ended badly and crashing instances
    /// raise built-in alerts; a promotion resolves the service's rollout alerts.
    pub fn on_notice(&mut self, n: &Notice) {
        let e = &n.event;
        let service = e.service.clone();
        let oneshot = |name: &str| {
            let summary = format!(
                "{}: {}",
                match e.rollout_id {
                    Some(id) => format!("rollout #{id} of {service}"),
                    None => service.clone(),
                },
                e.message
            );
            (
                key(&labels(&[("alertname", name), ("service", &service)])),
                OneShot {
                    labels: labels(&[
                        ("alertname", name),
                        ("service", &service),
                        ("severity", builtin::SEVERITY),
                    ]),
                    summary,
                    since: e.at,
                },
            )
        };
        match e.kind {
            EventKind::RolledBack => {
                let (k, o) = oneshot(builtin::ROLLED_BACK);
                self.oneshots.insert(k, o);
            }
            EventKind::Failed => {
                let (k, o) = oneshot(builtin::FAILED);
                self.oneshots.insert(k, o);
            }
            EventKind::BackupFailed => {
                let (k, o) = oneshot(builtin::BACKUP_FAILED);
                self.oneshots.insert(k, o);
            }
            EventKind::Backup => {
                // A backup that worked ends a BackupFailed of its service.
                let failed = key(&labels(&[
                    ("alertname", builtin::BACKUP_FAILED),
                    ("service", &service),
                ]));
                self.oneshots.remove(&failed);
            }
            EventKind::Promoted => {
                self.oneshots
                    .retain(|_, o| o.labels.get("service") != Some(&service));
            }
            EventKind::InstanceExit => {
                if let Some(id) = &n.instance {
                    self.exits
                        .entry((service, id.to_string()))
                        .or_default()
                        .push_back(e.at);
                }
            }
            _ => {}
        }
    }

    /// A notification ended: the receiver's record, and on failure a retry at the group's
    /// next interval and an event.
    pub fn on_outcome(&mut self, o: Outcome) {
        let r = self.receivers.entry(o.receiver.clone()).or_default();
        match &o.error {
            None => {
                r.sent += 1;
                r.failing = false;
                r.last_sent = Some(o.at);
            }
            Some(err) => {
                r.failed += 1;
                r.failing = true;
                r.last_error = Some(err.clone());
                self.dispatcher.failed(&o.group_key, &self.routing);
                let message = format!(
                    "receiver {} could not be notified after {} attempt(s): {err}; trying again at the group's next interval",
                    o.receiver, o.attempts
                );
                let service = o.service.clone().unwrap_or_else(|| "-".to_owned());
                self.record(&service, EventKind::AlertDeliveryFailed, message, o.at);
            }
        }
    }

    fn publish(&self, slos: Vec<SloView>) {
        let alerts: Vec<AlertView> = self
            .alerts
            .values()
            .map(|e| AlertView {
                labels: e.labels.clone(),
                state: e.state,
                summary: e.summary.clone(),
                receivers: self
                    .routing
                    .matching(&e.labels)
                    .into_iter()
                    .filter_map(|i| self.routing.route(i).map(|r| r.receiver.clone()))
                    .collect(),
            })
            .collect();
        let mut counts: BTreeMap<(String, String, &'static str), u64> = BTreeMap::new();
        for a in &alerts {
            let state = match a.state {
                AlertState::Pending { .. } => "pending",
                AlertState::Firing { .. } => "firing",
                _ => continue,
            };
            let get = |k: &str| a.labels.get(k).cloned().unwrap_or_default();
            *counts
                .entry((get("alertname"), get("severity"), state))
                .or_default() += 1;
        }
        self.metrics.set_signals(SignalGauges {
            slos: slos
                .iter()
                .map(|v| SloGauge {
                    service: v.status.spec.service.clone(),
                    slo: v.status.spec.name.clone(),
                    // 0.999, not 0.9990000000000001.
                    objective: (v.status.spec.objective * 1e8).round() / 1e10,
                    budget_remaining: v.status.budget_remaining,
                    burn_rates: v
                        .status
                        .burn_rates
                        .iter()
                        .filter_map(|b| b.rate.map(|r| (short_duration(b.window), r)))
                        .collect(),
                })
                .collect(),
            alerts: counts
                .into_iter()
                .map(|((alertname, severity, state), count)| AlertGauge {
                    alertname,
                    severity,
                    state: state.to_owned(),
                    count,
                })
                .collect(),
            receivers: self
                .receivers
                .values()
                .map(|r| ReceiverGauge {
                    receiver: r.name.clone(),
                    sent: r.sent,
                    failed: r.failed,
                    failing: r.failing,
                })
                .collect(),
        });
        let mut shared = lock(&self.shared);
        shared.slos = slos;
        shared.alerts = alerts;
        shared.receivers = self.receivers.values().cloned().collect();
    }

    /// Saves what was counted since the last round (at shutdown).
    pub fn flush(&mut self) {
        self.count(now());
    }
}

fn slo_candidate(status: &SloStatus, sev: Severity) -> Candidate {
    let spec = &status.spec;
    let active = status.active(sev);
    let check = active.or_else(|| status.checks.iter().find(|c| c.window.severity == sev));
    let summary = format!(
        "{}/{} ({}): {}; {} of the error budget left",
        spec.service,
        spec.name,
        spec.describe(),
        check.map(|c| c.describe()).unwrap_or_default(),
        cutover_signals::percent(status.budget_remaining),
    );
    Candidate {
        labels: labels(&[
            ("alertname", slo::ALERT_NAME),
            ("service", &spec.service),
            ("slo", &spec.name),
            ("severity", sev.as_str()),
        ]),
        annotations: labels(&[
            ("summary", &summary),
            ("objective", &format!("{}", spec.objective)),
            (
                "budget_remaining",
                &format!("{:.4}", status.budget_remaining),
            ),
        ]),
        hold: Duration::ZERO,
        holds: active.is_some(),
        summary,
    }
}

fn rule_candidate(rule: &RuleSpec, service: &str, s: &Sample) -> Candidate {
    let over = match rule.condition.metric {
        Metric::HealthyInstances => String::new(),
        _ => format!(" over {}", short_duration(rule.window)),
    };
    let summary = format!("{service}: {}{over}", rule.condition.describe(s));
    Candidate {
        labels: labels(&[
            ("alertname", &rule.name),
            ("service", service),
            ("severity", &rule.severity),
        ]),
        annotations: labels(&[("summary", &summary)]),
        hold: rule.hold,
        holds: rule.condition.holds(s),
        summary,
    }
}

/// The event for a transition: the service it belongs to, and a sentence with the numbers.
fn describe(e: &Entry, tr: Transition) -> (String, String) {
    let get = |k: &str| e.labels.get(k).cloned().unwrap_or_default();
    let what = match tr {
        Transition::Pending => {
            format!("pending (fires if it holds for {})", short_duration(e.hold))
        }
        Transition::Firing => "firing".to_owned(),
        Transition::Resolved => "resolved".to_owned(),
        Transition::Cleared => "cleared before it fired".to_owned(),
    };
    (
        get("service"),
        format!(
            "alert {} ({}) {what}: {}",
            get("alertname"),
            get("severity"),
            e.summary
        ),
    )
}

/// Runs the engine until `stop` turns true; then saves the last counts.
pub async fn run(
    mut engine: Engine,
    mut outcomes: mpsc::UnboundedReceiver<Outcome>,
    notices: broadcast::Receiver<Notice>,
    mut stop: watch::Receiver<bool>,
) -> Engine {
    let mut notices = Some(notices);
    let mut every = tokio::time::interval(engine.round_every());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = every.tick() => engine.round(now()).await,
            Some(o) = outcomes.recv() => engine.on_outcome(o),
            n = async {
                match notices.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => match n {
                Ok(n) => engine.on_notice(&n),
                Err(broadcast::error::RecvError::Lagged(k)) => {
                    tracing::warn!(skipped = k, "the signals task fell behind the event stream");
                }
                // The controller is gone; keep counting until told to stop.
                Err(broadcast::error::RecvError::Closed) => notices = None,
            },
        }
    }
    engine.flush();
    engine
}
