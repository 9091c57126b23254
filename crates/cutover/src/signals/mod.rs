//! Signals in the daemon (docs/reference.md §12): the thread that counts and alerts (`engine`), the
//! receivers it sends to (`deliver`), and the handle the API reads through.
//!
//! All decisions are `cutover-signals`' pure functions; this module does the IO around them:
//! SQLite (its own connections), the controller's event stream, the clock and the network.
//!
//! The bucket every count is kept in is a minute. `CUTOVER_SIGNALS_BUCKET` (a duration, at
//! least 100ms) shortens it for tests: every window of the SLO math is counted in buckets, so
//! with `1s` an hour is a minute of real time. It is an internal setting, not documented for
//! users.

mod deliver;
mod engine;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cutover_api::signals::{RolloutNote, SignalsSource, wire};
use cutover_config::Settings;
use cutover_controller::{ControlError, Controller, EventView, Notice};
use cutover_core::{EventKind, Phase, RolloutOutcome, Timestamp};
use cutover_metrics::Metrics;
use cutover_signals::alert::AlertState;
use cutover_signals::dora::{self, Kind, Record};
use cutover_signals::prom;
use cutover_signals::short_duration;
use cutover_store::{NewEvent, Store};
use tokio::sync::{mpsc, watch};

use crate::series::now;
use engine::{Engine, Parts, Shared};

/// The width of a count bucket: a minute, unless a test shortens it.
pub fn bucket() -> Duration {
    std::env::var("CUTOVER_SIGNALS_BUCKET")
        .ok()
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .map_or(Duration::from_secs(60), |d| {
            d.max(Duration::from_millis(100))
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running signals thread; [`Running::stop`] saves the last counts and ends it.
pub struct Running {
    stop: watch::Sender<bool>,
    thread: JoinHandle<()>,
}

impl Running {
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.thread.join();
    }
}

/// Starts the signals thread and returns it with the API's handle.
pub fn start(
    settings: &Settings,
    metrics: &Metrics,
    controller: &Controller,
    external_url: String,
) -> Result<(Running, Arc<Handle>), String> {
    let state_dir = &settings.daemon.state_dir;
    let open = || Store::open(state_dir).map_err(|e| format!("cannot open the state: {e}"));
    let (engine_store, handle_store) = (open()?, open()?);
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (stop, stopping) = watch::channel(false);
    let notices = controller.subscribe();
    let parts = Parts {
        settings: settings.clone(),
        metrics: metrics.clone(),
        store: engine_store,
        controller: controller.clone(),
        shared: shared.clone(),
        bucket: bucket(),
        external_url,
    };
    let thread = std::thread::Builder::new()
        .name("cutover-signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the signals runtime; no SLOs or alerts");
                    return;
                }
            };
            rt.block_on(async move {
                let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
                let engine = Engine::new(parts, outcomes_tx);
                engine::run(engine, outcomes, notices, stopping).await;
            });
        })
        .map_err(|e| format!("cannot start the signals thread: {e}"))?;
    let handle = Arc::new(Handle {
        shared,
        settings: settings.clone(),
        store: Mutex::new(handle_store),
        controller: controller.clone(),
    });
    Ok((Running { stop, thread }, handle))
}

/// What the API reads and writes through.
pub struct Handle {
    shared: Arc<Mutex<Shared>>,
    settings: Settings,
    store: Mutex<Store>,
    controller: Controller,
}

fn internal(e: impl std::fmt::Display) -> ControlError {
    ControlError::Internal(e.to_string())
}

impl Handle {
    fn check_service(&self, service: Option<&str>) -> Result<(), ControlError> {
        match service {
            Some(s) if self.settings.service(s).is_none() => Err(ControlError::NotFound(format!(
                "no service named {s:?} in the configuration"
            ))),
            _ => Ok(()),
        }
    }
}

/// The rules file for `service` (or all) from the config alone: `cutover export
/// prometheus-rules` needs no daemon.
pub fn prometheus_rules(settings: &Settings, service: Option<&str>) -> Result<String, String> {
    if let Some(s) = service
        && settings.service(s).is_none()
    {
        return Err(format!("no service named {s:?} in the configuration"));
    }
    let slos: Vec<_> = settings
        .services
        .iter()
        .filter(|s| service.is_none_or(|n| s.name.as_str() == n))
        .flat_map(|s| s.slos.iter().cloned())
        .collect();
    let rules: Vec<_> = settings
        .signals
        .rules
        .iter()
        .filter(|r| service.is_none() || r.service.is_none() || r.service.as_deref() == service)
        .map(|r| {
            let mut r = r.clone();
            if r.service.is_none() {
                r.service = service.map(str::to_owned);
            }
            r
        })
        .collect();
    use cutover_metrics::names;
    Ok(prom::rules_file(
        &slos,
        &rules,
        &prom::Names {
            requests: names::REQUESTS,
            duration: names::DURATION,
            instances: names::INSTANCES,
            rollouts: names::ROLLOUTS,
        },
    ))
}

fn rfc(t: Timestamp) -> String {
    cutover_api::wire::rfc3339(t)
}

fn slo_wire(v: &engine::SloView) -> wire::Slo {
    let s = &v.status;
    wire::Slo {
        service: s.spec.service.clone(),
        name: s.spec.name.clone(),
        objective: s.spec.objective,
        window: short_duration(s.spec.window),
        latency: s.spec.latency.map(short_duration),
        sli_now: s.sli_now,
        sli_window: s.sli,
        requests: s.period.total,
        bad: s.period.bad,
        allowed_bad: s.allowed_bad(),
        budget_remaining: s.budget_remaining,
        exhausted: s.exhausted(),
        burn_rates: s
            .burn_rates
            .iter()
            .map(|b| wire::BurnRate {
                window: short_duration(b.window),
                rate: b.rate,
                requests: b.counts.total,
                bad: b.counts.bad,
            })
            .collect(),
        alerts: s
            .checks
            .iter()
            .map(|c| wire::BurnCheck {
                name: c.window.name.to_owned(),
                severity: c.window.severity.as_str().to_owned(),
                long: short_duration(c.window.long),
                short: short_duration(c.window.short),
                factor: c.factor,
                long_rate: c.long.rate,
                short_rate: c.short.rate,
                active: c.active,
            })
            .collect(),
        burn_down: v.burn_down.iter().map(|(t, r)| (rfc(*t), *r)).collect(),
    }
}

fn dora_wire(r: &dora::Report) -> wire::Dora {
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    wire::Dora {
        service: r.service.clone(),
        since: rfc(r.since),
        until: rfc(r.until),
        deployments: r.deployments,
        deployments_per_day: r.per_day,
        deployment_frequency: r.frequency.as_str().to_owned(),
        deployment_frequency_level: r.frequency.level().as_str().to_owned(),
        lead_time_seconds: secs(r.lead_time),
        lead_time_level: r.lead_time_level.map(|l| l.as_str().to_owned()),
        deployments_with_commit: r.with_commit,
        failed_deployments: r.failed,
        change_failure_rate: r.change_failure_rate,
        change_failure_level: r.change_failure_level.map(|l| l.as_str().to_owned()),
        time_to_restore_seconds: secs(r.time_to_restore),
        time_to_restore_level: r.time_to_restore_level.map(|l| l.as_str().to_owned()),
        failures: r
            .failures
            .iter()
            .map(|f| wire::DoraFailure {
                rollout_id: f.deployment,
                how: f.how.clone(),
                time_to_restore_seconds: secs(f.time_to_restore),
            })
            .collect(),
        caught_by_analysis: r.caught_by_analysis,
        not_promoted: r.not_promoted,
        rollbacks: r.rollbacks,
    }
}

/// RFC 3339 → milliseconds since the epoch.
pub fn parse_time(s: &str) -> Option<Timestamp> {
    let t: jiff::Timestamp = s.trim().parse().ok()?;
    u64::try_from(t.as_millisecond()).ok().map(Timestamp)
}

impl SignalsSource for Handle {
    fn slo(&self, service: Option<&str>) -> Result<wire::SloReport, ControlError> {
        self.check_service(service)?;
        let shared = lock(&self.shared);
        Ok(wire::SloReport {
            slos: shared
                .slos
                .iter()
                .filter(|v| service.is_none_or(|s| v.status.spec.service == s))
                .map(slo_wire)
                .collect(),
        })
    }

    fn alerts(&self) -> wire::AlertsReport {
        let shared = lock(&self.shared);
        let get = |l: &cutover_signals::Labels, k: &str| l.get(k).cloned().unwrap_or_default();
        wire::AlertsReport {
            alerts: shared
                .alerts
                .iter()
                .map(|a| {
                    let (since, fired, resolved) = match a.state {
                        AlertState::Pending { since } => (since, None, None),
                        AlertState::Firing { since, fired_at } => (since, Some(fired_at), None),
                        AlertState::Resolved { fired_at, at } => {
                            (fired_at, Some(fired_at), Some(at))
                        }
                        AlertState::Inactive => (Timestamp(0), None, None),
                    };
                    wire::Alert {
                        alertname: get(&a.labels, "alertname"),
                        service: get(&a.labels, "service"),
                        severity: get(&a.labels, "severity"),
                        state: a.state.as_str().to_owned(),
                        labels: a.labels.clone(),
                        summary: a.summary.clone(),
                        since: rfc(since),
                        fired_at: fired.map(rfc),
                        resolved_at: resolved.map(rfc),
                        receivers: a.receivers.clone(),
                    }
                })
                .collect(),
            receivers: shared
                .receivers
                .iter()
                .map(|r| wire::Receiver {
                    name: r.name.clone(),
                    kind: r.kind.clone(),
                    sent: r.sent,
                    failed: r.failed,
                    failing: r.failing,
                    last_error: r.last_error.clone(),
                    last_sent: r.last_sent.map(rfc),
                })
                .collect(),
        }
    }

    fn dora(&self, service: Option<&str>, since: Duration) -> Result<wire::Dora, ControlError> {
        self.check_service(service)?;
        let store = lock(&self.store);
        let mut rows = store.rollouts(service, 1_000_000).map_err(internal)?;
        rows.reverse();
        let notes: HashMap<i64, cutover_store::signals::RolloutNote> = store
            .rollout_notes()
            .map_err(internal)?
            .into_iter()
            .map(|n| (n.rollout_id, n))
            .collect();
        drop(store);
        let mut records: Vec<Record> = Vec::with_capacity(rows.len());
        for r in &rows {
            let note = notes.get(&r.id);
            let kind = match note.map(|n| n.kind.as_str()) {
                Some("rollback") => Kind::Rollback,
                Some(_) => Kind::Deploy,
                // Rollouts from before notes were kept: a rollout that reverses the service's
                // previous promotion was a rollback.
                None => {
                    let reverses = records
                        .iter()
                        .rev()
                        .find(|p| p.service == r.service && p.outcome == RolloutOutcome::Promoted)
                        .is_some_and(|p| p.to == r.from_version && p.from == r.to_version);
                    if reverses {
                        Kind::Rollback
                    } else {
                        Kind::Deploy
                    }
                }
            };
            records.push(Record {
                id: r.id,
                service: r.service.clone(),
                from: r.from_version.clone(),
                to: r.to_version.clone(),
                kind,
                outcome: r.outcome,
                started_at: r.started_at,
                finished_at: r.finished_at,
                commit_time: note.and_then(|n| n.commit_time),
                fixes: note.and_then(|n| n.fixes),
            });
        }
        let until = now();
        let from = Timestamp(
            until
                .as_millis()
                .saturating_sub(u64::try_from(since.as_millis()).unwrap_or(u64::MAX)),
        );
        let report = dora::report(
            &records,
            service,
            from,
            until.plus(Duration::from_millis(1)),
            self.settings.signals.fix_window,
        );
        Ok(dora_wire(&report))
    }

    fn prometheus_rules(&self, service: Option<&str>) -> Result<String, ControlError> {
        prometheus_rules(&self.settings, service).map_err(ControlError::NotFound)
    }

    fn frozen(&self, service: &str) -> Option<String> {
        if !self.settings.signals.freeze_when_budget_exhausted {
            return None;
        }
        let shared = lock(&self.shared);
        let spent: Vec<String> = shared
            .slos
            .iter()
            .filter(|v| v.status.spec.service == service && v.status.exhausted())
            .map(|v| v.status.budget_sentence())
            .collect();
        (!spent.is_empty()).then(|| format!("error budget exhausted: {}", spent.join("; ")))
    }

    fn note(&self, n: RolloutNote) {
        let note = cutover_store::signals::RolloutNote {
            rollout_id: n.rollout_id,
            kind: if n.rollback { "rollback" } else { "deploy" }.to_owned(),
            commit_sha: n.commit.clone(),
            commit_time: n.commit_time.as_deref().and_then(parse_time),
            fixes: n.fixes,
            forced_reason: n.forced_reason.clone(),
        };
        let mut store = lock(&self.store);
        if let Err(e) = store.put_rollout_note(&note) {
            tracing::warn!(error = %e, rollout = n.rollout_id, "could not record the rollout's note");
        }
        let Some(overrode) = &n.overrode else { return };
        let t = now();
        let message = format!(
            "deployed through the budget freeze: {}; {overrode} (by {})",
            n.forced_reason.as_deref().unwrap_or("no reason given"),
            n.actor
        );
        tracing::warn!(service = %n.service, "{message}");
        let e = NewEvent {
            service: n.service.clone(),
            rollout_id: Some(n.rollout_id),
            at: t,
            kind: EventKind::DeployForced.as_str().to_owned(),
            message: message.clone(),
            data: "{}".into(),
        };
        match store.append_event(&e) {
            Ok(id) => self.controller.publish(Notice {
                event: EventView {
                    id,
                    service: n.service,
                    rollout_id: Some(n.rollout_id),
                    at: t,
                    kind: EventKind::DeployForced,
                    message,
                },
                phase: Phase::Starting,
                instance: None,
            }),
            Err(err) => tracing::warn!(error = %err, "could not record the forced deploy"),
        }
    }
}
