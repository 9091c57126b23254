//! Cutover's own traffic: synthetic requests that let a quiet canary be judged, scheduled
//! blackbox probes, and the load of a `scaling-shock` experiment action.
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
//!
//! A scaling shock ([`run_shock`]) sends [`shock_rate`] requests a second through the
//! service's listener, as users would (and counted as theirs: the judge, the SLOs and the
//! alerts are what it tests), with at most `concurrency` in flight: like synthetic traffic, a
//! beat that finds them all busy is skipped, so a slowed service is never buried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_config::{ProbeSettings, SyntheticSettings};
use cutover_controller::Controller;
use cutover_core::{EventKind, Health, LatencyDist, ServiceName, Version};
use cutover_metrics::Metrics;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

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
                        EventKind::Synthetic,
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
                note(&controller, &s.service, EventKind::Synthetic, msg).await;
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

/// The rate a scaling shock adds: what the service gets now times `factor - 1`, at least
/// `min_rps` (a quiet service is still shocked) and at most `max_rps`.
pub fn shock_rate(current_rps: f64, factor: f64, min_rps: f64, max_rps: f64) -> f64 {
    (current_rps.max(0.0) * (factor - 1.0)).clamp(min_rps, max_rps)
}

/// The users' request rate of a service (every version) over the next `sample`.
pub async fn user_rate(metrics: &Metrics, service: &ServiceName, sample: Duration) -> f64 {
    let total = |m: &Metrics| -> u64 {
        m.versions()
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(s, v)| m.user_requests(s, v))
            .sum()
    };
    let before = total(metrics);
    tokio::time::sleep(sample).await;
    total(metrics).saturating_sub(before) as f64 / sample.as_secs_f64()
}

/// A scaling shock as decided: where, how fast, how long.
#[derive(Clone, Debug)]
pub struct Shock {
    pub service: ServiceName,
    /// The service's listener: the shock goes where users' requests go.
    pub to: SocketAddr,
    pub rps: f64,
    pub concurrency: u32,
    pub paths: Vec<String>,
    pub duration: Duration,
}

/// What a scaling shock sent and got back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShockResult {
    pub service: String,
    pub rps: f64,
    pub seconds: f64,
    pub sent: u64,
    /// Answered below 500.
    pub ok: u64,
    /// Answered 5xx, or not answered (refused, reset, timed out).
    pub failed: u64,
    /// Beats skipped because `concurrency` requests were still in flight: the service slowed
    /// down, and the shock does not pile on more than it allows.
    pub skipped: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl ShockResult {
    pub fn describe(&self) -> String {
        let q = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}ms"));
        format!(
            "{} sent at {:.1} req/s for {:.1}s: {} ok, {} failed, {} skipped at the concurrency cap; p50 {}, p99 {}",
            self.sent,
            self.rps,
            self.seconds,
            self.ok,
            self.failed,
            self.skipped,
            q(self.p50_ms),
            q(self.p99_ms)
        )
    }
}

/// Sends a scaling shock's requests through the listener until its end or until `stop`
/// says so; returns once those sent are all answered (or timed out).
pub async fn run_shock(s: &Shock, mut stop: watch::Receiver<bool>) -> ShockResult {
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / s.rps.max(0.01));
    let mut tick = tokio::time::interval(every);
    // A rate is a ceiling, not a debt: late beats are skipped, never sent in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let permits = Arc::new(Semaphore::new(s.concurrency.max(1) as usize));
    let tally = Arc::new(std::sync::Mutex::new((0u64, 0u64, Vec::<u64>::new())));
    let headers = Arc::new(vec![(
        "X-Cutover-Chaos".to_owned(),
        "scaling-shock".to_owned(),
    )]);
    let to = s.to.to_string();
    let (mut sent, mut skipped) = (0u64, 0u64);
    let end = started + s.duration;
    for n in 0usize.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if Instant::now() >= end {
            break;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        sent += 1;
        let path = s.paths[n % s.paths.len()].clone();
        let (to, headers, tally) = (to.clone(), headers.clone(), tally.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let r =
                crate::http::request(&to, "GET", &path, &headers, Duration::from_secs(10)).await;
            let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Ok(mut g) = tally.lock() {
                match r {
                    Ok((status, _)) if status < 500 => g.0 += 1,
                    _ => g.1 += 1,
                }
                g.2.push(us);
            }
            drop(permit);
        });
    }
    // Every request in flight ends within its timeout; then all permits are free.
    let _ = tokio::time::timeout(
        Duration::from_secs(11),
        permits.acquire_many(s.concurrency.max(1)),
    )
    .await;
    let (ok, failed, samples) = tally
        .lock()
        .map(|g| (g.0, g.1, g.2.clone()))
        .unwrap_or_default();
    let dist = LatencyDist::from_samples(samples);
    let ms = |q: f64| dist.quantile(q).map(|d| d.as_secs_f64() * 1000.0);
    ShockResult {
        service: s.service.to_string(),
        rps: s.rps,
        seconds: started.elapsed().min(s.duration).as_secs_f64(),
        sent,
        ok,
        failed,
        skipped,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
    }
}

/// Where a listener is reached from this host: a wildcard address on loopback.
pub fn reach(listen: SocketAddr) -> SocketAddr {
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
                note(&controller, &service, EventKind::Probe, msg).await;
            }
            was_ok = Some(ok);
        }
    })
}

async fn note(controller: &Controller, service: &ServiceName, kind: EventKind, msg: String) {
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
    fn a_shock_multiplies_the_current_rate_within_its_bounds() {
        // (current, factor, min, max) → extra rate
        for (cur, factor, min, max, want) in [
            (100.0, 3.0, 10.0, 1000.0, 200.0),
            (0.0, 3.0, 10.0, 1000.0, 10.0),
            (2.0, 2.0, 10.0, 1000.0, 10.0),
            (900.0, 5.0, 10.0, 1000.0, 1000.0),
            (-1.0, 3.0, 5.0, 50.0, 5.0),
        ] {
            assert_eq!(shock_rate(cur, factor, min, max), want, "{cur} ×{factor}");
        }
    }

    #[tokio::test]
    async fn a_shock_never_exceeds_its_rate_or_its_concurrency() {
        // A slow server (each answer after 200 ms) and a cap of 2 in flight: at 50 req/s for
        // 1 s, only about 2 per 200 ms are sent; the rest are skipped, none piled up.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (o, m) = (open.clone(), most.clone());
        tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                let (o, m) = (o.clone(), m.clone());
                tokio::spawn(async move {
                    let now = o.fetch_add(1, SeqCst) + 1;
                    m.fetch_max(now, SeqCst);
                    let mut b = [0u8; 1024];
                    let _ = c.read(&mut b).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = c
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    o.fetch_sub(1, SeqCst);
                });
            }
        });
        let r = run_shock(
            &Shock {
                service: ServiceName::new("web"),
                to: addr,
                rps: 50.0,
                concurrency: 2,
                paths: vec!["/".into()],
                duration: Duration::from_secs(1),
            },
            watch::channel(false).1,
        )
        .await;
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 2, "{r:?}");
        assert!(r.sent <= 14 && r.sent >= 6, "{r:?}");
        assert_eq!(r.ok, r.sent, "{r:?}");
        assert!(r.skipped >= 30, "{r:?}");
        assert!(r.p50_ms.unwrap() >= 190.0, "{r:?}");
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
