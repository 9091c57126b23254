//! Active health checks: every `interval`, `GET path` on every instance the table lists.
//!
//! An instance takes traffic after `healthy_threshold` consecutive passes and loses it after
//! `unhealthy_threshold` consecutive failures; an instance that never passed stays `starting`
//! (the controller's progress deadline decides about it). Every change is reported to the
//! controller and recompiles the table, so weights fall back to stable at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cutover_core::{Health, HealthChange, HealthSpec};
use http_body_util::{BodyExt, Either, Empty};
use tokio::sync::watch;

use crate::backend::BackendState;
use crate::upstream::SendError;
use crate::{Proxy, ServiceState};

pub(crate) async fn run(
    state: Arc<ServiceState>,
    spec: HealthSpec,
    proxy: Proxy,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::exchange::stopped(&mut stop) => return,
        }
        let mut set = tokio::task::JoinSet::new();
        let now = std::time::Instant::now();
        for b in state.backends.live() {
            b.pool.prune(now, crate::upstream::IDLE_TIMEOUT);
            let (path, timeout) = (spec.path.clone(), spec.timeout);
            set.spawn(async move {
                let r = probe(&b, &path, timeout).await;
                (b, r)
            });
        }
        let mut changed = false;
        while let Some(joined) = set.join_next().await {
            let Ok((b, result)) = joined else { continue };
            if let Some((health, reason)) = apply(&b, result, &spec) {
                changed = true;
                proxy.report(HealthChange {
                    service: state.name.clone(),
                    version: b.version.clone(),
                    instance: b.id.clone(),
                    health,
                    reason,
                });
            }
        }
        if changed {
            proxy.recompile(&state);
        }
    }
}

async fn probe(b: &BackendState, path: &str, timeout: Duration) -> Result<(), String> {
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, b.authority.as_str())
        .header(hyper::header::USER_AGENT, "cutover-health")
        .body(Either::Right(Empty::<Bytes>::new()))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let (resp, sender) = match b.pool.send(req).await {
            Ok(r) => r,
            Err(SendError::NotSent(_, why)) => return Err(why),
            Err(SendError::Failed(e)) => return Err(crate::exchange::describe(&e)),
        };
        let status = resp.status();
        // Read the (small) body to its end so the connection can serve traffic afterwards.
        let body = match resp.into_body().collect().await {
            Ok(collected) => {
                b.pool.put(sender);
                collected.to_bytes()
            }
            Err(_) => Bytes::new(),
        };
        Ok((status, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(format!(
            "GET {path}: no answer within {}ms",
            timeout.as_millis()
        )),
        Ok(Err(why)) => Err(format!("GET {path}: {why}")),
        Ok(Ok((s, _))) if s.is_success() || s.is_redirection() => Ok(()),
        Ok(Ok((s, body))) => Err(format!("GET {path} answered {s}{}", first_bytes(&body))),
    }
}

/// The start of a failed probe's body, as a person would want to see it in an event.
fn first_bytes(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(BODY_SHOWN)]);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        let more = if body.len() > BODY_SHOWN { "…" } else { "" };
        format!(": {text:?}{more}")
    }
}

/// Failed probes of a starting instance before their reason is told: an app that is still
/// opening its port refuses the first probe or two, and that is no news.
const STARTING_FAILURES_TOLD: u32 = 3;

/// How much of a failed probe's body an event shows.
const BODY_SHOWN: usize = 80;

/// Applies one probe result; returns the new health and why, if it changed.
pub(crate) fn apply(
    b: &BackendState,
    result: Result<(), String>,
    spec: &HealthSpec,
) -> Option<(Health, String)> {
    let mut reason = String::new();
    let mut unchanged_but_told = false;
    let changed = b.update_health(|h| match &result {
        Ok(()) => {
            h.failures = 0;
            h.passes = h.passes.saturating_add(1);
            if h.health != Health::Healthy && h.passes >= spec.healthy_threshold {
                h.health = Health::Healthy;
                reason = format!("{} consecutive probe(s) of {} passed", h.passes, spec.path);
            }
        }
        Err(why) => {
            h.passes = 0;
            h.failures = h.failures.saturating_add(1);
            if h.health == Health::Healthy && h.failures >= spec.unhealthy_threshold {
                h.health = Health::Unhealthy;
                reason = format!("{} consecutive probe(s) failed: {why}", h.failures);
            } else if h.health == Health::Starting
                && h.failures >= STARTING_FAILURES_TOLD
                && h.last_failure.as_deref() != Some(why)
            {
                // An instance that never passed changes no state, but the controller must
                // hear why (a 404 on a health path that does not exist, a refused connection):
                // once per new reason, not once per probe.
                reason = format!("not healthy yet: {why}");
                h.last_failure = Some(why.clone());
                unchanged_but_told = true;
            }
        }
    });
    if unchanged_but_told && changed.is_none() {
        return Some((Health::Starting, reason));
    }
    if changed == Some(Health::Healthy) {
        b.connect_failures
            .store(0, std::sync::atomic::Ordering::Relaxed);
        b.failed_answers
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
    changed.map(|h| (h, reason))
}
