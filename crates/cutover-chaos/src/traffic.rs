//! Cutover's own traffic: synthetic requests that let a quiet canary be judged, and
//! scheduled blackbox probes.
//!
//! Synthetic traffic (`[services.X.analysis] synthetic`) starts for an analysis interval when
//! the candidate's real requests in the last interval were fewer than `min_requests`: then
//! every `1/rps` one request goes to a candidate instance and one to a stable instance (the
//! same count to each, for a fair comparison). They go to the instances directly, never
//! through the users' listener, and are recorded with [`cutover_metrics::VersionRecorder::
//! record_synthetic`]: the judge counts them, users' numbers never do. A tick finding its
//! version's requests all still in flight (`concurrency`) is skipped, so a slow candidate
//! never makes the rate grow. [`plan`] is the pure rule.
//!
//! Probes (`[[services.X.probe]]`) ask the service's listener, as a user would, on their
//! interval, and export `cutover_probe_success` / `cutover_probe_duration_seconds`; a probe
//! that starts or stops failing is an event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_config::{ProbeSettings, SyntheticSettings};
use cutover_controller::Controller;
use cutover_core::{EventKind, Health, ServiceName, Version};
use cutover_metrics::Metrics;
use tokio::sync::Semaphore;

/// Whether to send synthetic traffic for the next interval: only while a candidate takes part
/// in a rollout, and only when its real traffic in the last one was too thin to judge.
pub fn plan(candidate: bool, real_requests: u64, min_requests: u64) -> bool {
    candidate && real_requests < min_requests
}

/// What synthetic traffic needs of its service.
pub struct Synthetic {
    pub service: ServiceName,
    pub interval: Duration,
    pub min_requests: u64,
    pub settings: SyntheticSettings,
}

/// Runs synthetic traffic for a service until the task is aborted.
pub fn spawn_synthetic(
    controller: Controller,
    metrics: Metrics,
    s: Synthetic,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last: Option<(Version, u64)> = None;
        let mut sending = false;
        let permits = (
            Arc::new(Semaphore::new(s.settings.concurrency as usize)),
            Arc::new(Semaphore::new(s.settings.concurrency as usize)),
        );
        let mut tick = tokio::time::interval(s.interval);
        loop {
            tick.tick().await;
            let Ok(view) = controller.service(s.service.as_str()).await else {
                continue;
            };
            let Some(cand) = view.candidate.clone() else {
                last = None;
                if sending {
                    sending = false;
                    note(
                        &controller,
                        &s.service,
                        "synthetic traffic stopped: no canary".into(),
                    )
                    .await;
                }
                continue;
            };
            let total = metrics.user_requests(&s.service, &cand);
            let real = match &last {
                Some((v, n)) if *v == cand => total.saturating_sub(*n),
                // The first interval of a canary has no measure yet: it counts as quiet.
                _ => 0,
            };
            last = Some((cand.clone(), total));
            let go = plan(true, real, s.min_requests);
            if go != sending {
                sending = go;
                let msg = if go {
                    format!(
                        "synthetic traffic started: {real} real request(s) to {cand} in the last {}s, below min_requests {}; {} req/s to {cand} and as many to {}",
                        s.interval.as_secs_f64(),
                        s.min_requests,
                        s.settings.rps,
                        view.stable
                    )
                } else {
                    format!(
                        "synthetic traffic stopped: {real} real request(s) to {cand} in the last interval"
                    )
                };
                note(&controller, &s.service, msg).await;
            }
            if !go {
                continue;
            }
            let addrs = |v: &Version| -> Vec<SocketAddr> {
                view.instances
                    .iter()
                    .filter(|i| &i.version == v && i.health == Health::Healthy)
                    .map(|i| i.address)
                    .collect()
            };
            let targets = [
                (cand.clone(), addrs(&cand), permits.0.clone()),
                (view.stable.clone(), addrs(&view.stable), permits.1.clone()),
            ];
            send_for(&metrics, &s, &targets, s.interval).await;
        }
    })
}

/// Sends synthetic requests at the configured rate for `span`, to each target version.
async fn send_for(
    metrics: &Metrics,
    s: &Synthetic,
    targets: &[(Version, Vec<SocketAddr>, Arc<Semaphore>)],
    span: Duration,
) {
    let every = Duration::from_secs_f64(1.0 / s.settings.rps);
    let mut tick = tokio::time::interval(every);
    // Skip beats rather than catch up: the rate is a ceiling, not a debt.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = Instant::now() + span;
    let headers: Vec<(String, String)> = s
        .settings
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([("X-Cutover-Synthetic".to_owned(), "1".to_owned())])
        .collect();
    let headers = Arc::new(headers);
    for n in 0usize.. {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        let path = s.settings.paths[n % s.settings.paths.len()].clone();
        for (version, addrs, permits) in targets {
            if addrs.is_empty() {
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let addr = addrs[n % addrs.len()];
            let rec = metrics.recorder(&s.service, version);
            let (path, headers) = (path.clone(), headers.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let status = crate::http::request(
                    &addr.to_string(),
                    "GET",
                    &path,
                    &headers,
                    Duration::from_secs(10),
                )
                .await
                .map_or(502, |(s, _)| s);
                rec.record_synthetic(status, started.elapsed());
                drop(permit);
            });
        }
    }
}

/// Where a listener is reached from this host: a wildcard address on loopback.
fn reach(listen: SocketAddr) -> SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Whether a probe's answer passes.
pub fn passes(p: &ProbeSettings, status: u16, body: &str) -> bool {
    p.status
        .map_or((200..300).contains(&status), |s| s == status)
        && p.body_contains.as_ref().is_none_or(|b| body.contains(b))
}

/// Runs one scheduled probe until the task is aborted.
pub fn spawn_probe(
    controller: Controller,
    metrics: Metrics,
    service: ServiceName,
    listen: SocketAddr,
    p: ProbeSettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let to = reach(listen);
        let mut tick = tokio::time::interval(p.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_ok: Option<bool> = None;
        loop {
            tick.tick().await;
            let started = Instant::now();
            let r = crate::http::get(to, &p.path, p.timeout).await;
            let took = started.elapsed();
            let (ok, why) = match &r {
                Ok((status, body)) if passes(&p, *status, body) => {
                    (true, format!("answered {status}"))
                }
                Ok((status, _)) => (false, format!("answered {status}")),
                Err(e) => (false, e.clone()),
            };
            metrics.set_probe(&service, &p.name, ok, took);
            if was_ok != Some(ok) && (was_ok.is_some() || !ok) {
                let msg = if ok {
                    format!("probe {} passes again: GET {} {why}", p.name, p.path)
                } else {
                    format!("probe {} failed: GET {} {why}", p.name, p.path)
                };
                note(&controller, &service, msg).await;
            }
            was_ok = Some(ok);
        }
    })
}

async fn note(controller: &Controller, service: &ServiceName, msg: String) {
    let kind = if msg.starts_with("probe") {
        EventKind::Probe
    } else {
        EventKind::Synthetic
    };
    let _ = controller.record(service, kind, msg).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_traffic_only_for_a_quiet_canary() {
        // (a candidate, real requests, min_requests) → send
        for (cand, real, min, want) in [
            (false, 0, 50, false),
            (true, 0, 50, true),
            (true, 49, 50, true),
            (true, 50, 50, false),
            (true, 500, 50, false),
        ] {
            assert_eq!(plan(cand, real, min), want, "{cand} {real} {min}");
        }
    }

    #[test]
    fn a_probe_passes_on_its_status_and_body() {
        let p = |status, body: Option<&str>| ProbeSettings {
            name: "h".into(),
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            status,
            body_contains: body.map(str::to_owned),
        };
        assert!(passes(&p(None, None), 204, ""));
        assert!(!passes(&p(None, None), 503, ""));
        assert!(passes(&p(Some(503), None), 503, ""));
        assert!(passes(&p(Some(200), Some("ok")), 200, "all ok"));
        assert!(!passes(&p(Some(200), Some("ok")), 200, "down"));
    }
}
