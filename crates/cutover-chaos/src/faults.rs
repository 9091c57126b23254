//! The fault registry: the one owner of the faults set on the daemon's services and
//! dependencies (docs/reference.md §11, `cutover fault add|list|clear`).
//!
//! Every fault has an end (`--for`), checked when it is added ([`check`], pure), enforced by
//! the proxy itself (a fault carries its deadline there) and swept here, so a forgotten fault
//! cannot outlive its experiment. Faults live in memory only: none survives a daemon restart.
//! Every change is an event (`fault-added`, `fault-cleared`, `fault-expired`) and the gauge
//! `cutover_faults_active{service}` follows the count.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_controller::Controller;
use cutover_core::{EventKind, InstanceId, ServiceName, Timestamp, Version};
use cutover_metrics::Metrics;
use cutover_proxy::{Fault, FaultKind, FaultTarget, Proxy};
use serde::{Deserialize, Serialize};

/// The longest a fault may be set for: a day. An experiment that needs longer sets it again.
pub const MAX_FOR: Duration = Duration::from_secs(24 * 3600);
/// How often expired faults are swept (the proxy ignores them from their deadline on anyway).
const SWEEP: Duration = Duration::from_millis(250);

/// What a fault applies to: a service (requests) or a dependency (TCP connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Place {
    Service,
    Dependency,
}

/// A fault as asked for, through the API or by an experiment. Exactly one effect is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    pub service: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub instance: Option<String>,
    /// How long it lasts, e.g. `"5m"`: required.
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
    #[serde(default)]
    pub latency: Option<String>,
    #[serde(default)]
    pub jitter: Option<String>,
    #[serde(default)]
    pub error_rate: Option<f64>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub reset_rate: Option<f64>,
    /// Bytes per second.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    #[serde(default)]
    pub blackhole: bool,
    /// The experiment that set it, if one did (its rollbacks clear it).
    #[serde(default)]
    pub experiment: Option<String>,
}

/// A fault as the registry keeps and shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultInfo {
    pub id: String,
    pub service: String,
    pub place: Place,
    /// `service`, `version V` or `instance ID`.
    pub target: String,
    /// What it does, in words: `latency 300ms ± 50ms`, `errors 20% (503)`...
    pub effect: String,
    /// RFC 3339.
    pub added_at: String,
    pub expires_at: String,
    pub experiment: Option<String>,
}

/// A fault's checked form: what the proxy gets, and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub service: ServiceName,
    pub place: Place,
    pub target: FaultTarget,
    pub kind: FaultKind,
    pub duration: Duration,
}

/// Checks a request against the services and dependencies the daemon has; the message says
/// what is wrong in the CLI's words (flags).
pub fn check(
    req: &FaultRequest,
    services: &[ServiceName],
    dependencies: &[ServiceName],
) -> Result<Checked, String> {
    let name = ServiceName::new(&req.service);
    let place = if services.contains(&name) {
        Place::Service
    } else if dependencies.contains(&name) {
        Place::Dependency
    } else {
        let mut known: Vec<&str> = services.iter().map(ServiceName::as_str).collect();
        known.extend(dependencies.iter().map(ServiceName::as_str));
        return Err(format!(
            "no service or dependency named {:?} (known: {})",
            req.service,
            known.join(", ")
        ));
    };
    let duration = match &req.duration {
        None => {
            return Err(
                "a fault needs an end: add --for DURATION (e.g. --for 5m), so a forgotten one cannot outlive its experiment".into(),
            );
        }
        Some(d) => cutover_config::parse_duration(d)?,
    };
    if duration.is_zero() || duration > MAX_FOR {
        return Err(format!(
            "--for must be longer than 0 and at most 24h, not {:?}",
            req.duration.as_deref().unwrap_or("")
        ));
    }
    let target = match (&req.version, &req.instance) {
        (Some(_), Some(_)) => return Err("give --version or --instance, not both".into()),
        (Some(v), None) => {
            Version::parse(v).map_err(|e| e.to_string())?;
            FaultTarget::Version(Version::new(v))
        }
        (None, Some(i)) => FaultTarget::Instance(InstanceId::new(i)),
        (None, None) => FaultTarget::Service,
    };
    if place == Place::Dependency && target != FaultTarget::Service {
        return Err(format!(
            "{} is a dependency: it has no versions or instances",
            req.service
        ));
    }
    let rate = |r: f64, flag: &str| {
        if (0.0..=1.0).contains(&r) && r > 0.0 {
            Ok(r)
        } else {
            Err(format!(
                "{flag} {r} is a share above 0 and at most 1 (0.2 = 20%)"
            ))
        }
    };
    let mut kinds = Vec::new();
    if let Some(l) = &req.latency {
        let fixed = cutover_config::parse_duration(l)?;
        let jitter = match &req.jitter {
            Some(j) => cutover_config::parse_duration(j)?,
            None => Duration::ZERO,
        };
        kinds.push(FaultKind::Latency { fixed, jitter });
    } else if req.jitter.is_some() {
        return Err("--jitter goes with --latency".into());
    }
    if let Some(r) = req.error_rate {
        let status = req.status.unwrap_or(500);
        if !(400..=599).contains(&status) {
            return Err(format!(
                "--status {status} is not an error status (400..599)"
            ));
        }
        if place == Place::Dependency {
            return Err(format!(
                "{} is a TCP dependency: it has no HTTP answers; use --reset-rate, --latency, --bandwidth or --blackhole",
                req.service
            ));
        }
        kinds.push(FaultKind::Error {
            rate: rate(r, "--error-rate")?,
            status,
        });
    } else if req.status.is_some() {
        return Err("--status goes with --error-rate".into());
    }
    if let Some(r) = req.reset_rate {
        kinds.push(FaultKind::Reset {
            rate: rate(r, "--reset-rate")?,
        });
    }
    if let Some(b) = req.bandwidth {
        if b == 0 {
            return Err("--bandwidth must be above 0 bytes per second (use --blackhole to stop all traffic)".into());
        }
        kinds.push(FaultKind::Bandwidth { bytes_per_sec: b });
    }
    if req.blackhole {
        kinds.push(FaultKind::Blackhole);
    }
    let kind = match kinds.len() {
        1 => kinds.remove(0),
        0 => {
            return Err(
                "say what the fault does: --latency, --error-rate, --reset-rate, --bandwidth or --blackhole".into(),
            );
        }
        _ => return Err("one effect per fault: add several faults to combine them".into()),
    };
    Ok(Checked {
        service: name,
        place,
        target,
        kind,
        duration,
    })
}

/// A fault's effect in words.
pub fn effect(kind: &FaultKind) -> String {
    let ms = |d: &Duration| format!("{}ms", d.as_millis());
    match kind {
        FaultKind::Latency { fixed, jitter } if jitter.is_zero() => {
            format!("latency {}", ms(fixed))
        }
        FaultKind::Latency { fixed, jitter } => {
            format!("latency {} + up to {}", ms(fixed), ms(jitter))
        }
        FaultKind::Error { rate, status } => format!("errors {:.0}% ({status})", rate * 100.0),
        FaultKind::Reset { rate } => format!("resets {:.0}%", rate * 100.0),
        FaultKind::Bandwidth { bytes_per_sec } => format!("bandwidth {bytes_per_sec} B/s"),
        FaultKind::Blackhole => "blackhole".to_owned(),
    }
}

fn target_text(t: &FaultTarget) -> String {
    match t {
        FaultTarget::Service => "service".to_owned(),
        FaultTarget::Version(v) => format!("version {v}"),
        FaultTarget::Instance(i) => format!("instance {i}"),
    }
}

/// Wall-clock milliseconds now.
pub(crate) fn wall_now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
}

pub(crate) fn rfc3339(t: Timestamp) -> String {
    i64::try_from(t.0)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

struct Entry {
    info: FaultInfo,
    fault: Fault,
}

/// Why a fault could not be set or cleared.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
}

/// What to clear.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clear {
    /// A service's or dependency's faults, or one fault by id.
    Target(String),
    /// The faults an experiment set.
    Experiment(String),
    All,
}

/// The registry's handle. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    inner: Arc<Inner>,
}

struct Inner {
    proxy: Proxy,
    metrics: Metrics,
    events: Controller,
    services: Vec<ServiceName>,
    dependencies: Vec<ServiceName>,
    faults: Mutex<BTreeMap<String, Entry>>,
}

impl Faults {
    pub fn new(
        proxy: Proxy,
        metrics: Metrics,
        events: Controller,
        services: Vec<ServiceName>,
        dependencies: Vec<ServiceName>,
    ) -> Faults {
        for s in services.iter().chain(&dependencies) {
            metrics.set_faults_active(s, 0);
        }
        Faults {
            inner: Arc::new(Inner {
                proxy,
                metrics,
                events,
                services,
                dependencies,
                faults: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn services(&self) -> &[ServiceName] {
        &self.inner.services
    }

    pub fn dependencies(&self) -> &[ServiceName] {
        &self.inner.dependencies
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        match self.inner.faults.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Publishes a service's faults to the proxy and its gauge.
    fn publish(&self, service: &ServiceName) {
        let list: Vec<Fault> = self
            .lock()
            .values()
            .filter(|e| e.info.service == service.as_str())
            .map(|e| e.fault.clone())
            .collect();
        self.inner
            .metrics
            .set_faults_active(service, list.len() as u64);
        self.inner.proxy.set_faults(service, list);
    }

    /// Sets a fault; returns it with its id.
    pub async fn add(&self, req: &FaultRequest) -> Result<FaultInfo, FaultError> {
        let c = check(req, &self.inner.services, &self.inner.dependencies)
            .map_err(FaultError::Invalid)?;
        let id = format!("f{:06x}", rand::random::<u32>() & 0xff_ffff);
        let now = wall_now();
        let info = FaultInfo {
            id: id.clone(),
            service: c.service.to_string(),
            place: c.place,
            target: target_text(&c.target),
            effect: effect(&c.kind),
            added_at: rfc3339(now),
            expires_at: rfc3339(now.plus(c.duration)),
            experiment: req.experiment.clone(),
        };
        let fault = Fault {
            id: u64::from(rand::random::<u32>()),
            target: c.target,
            kind: c.kind,
            until: Instant::now() + c.duration,
        };
        self.lock().insert(
            id.clone(),
            Entry {
                info: info.clone(),
                fault,
            },
        );
        self.publish(&c.service);
        let by = req
            .experiment
            .as_ref()
            .map(|e| format!(" by experiment {e}"))
            .unwrap_or_default();
        self.event(
            &c.service,
            EventKind::FaultAdded,
            format!(
                "fault {id} added{by}: {} on {} for {}s (until {})",
                info.effect,
                info.target,
                c.duration.as_secs_f64(),
                info.expires_at
            ),
        )
        .await;
        Ok(info)
    }

    pub fn list(&self) -> Vec<FaultInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// Clears faults; returns those cleared. Naming nothing that exists is an error.
    pub async fn clear(&self, what: &Clear) -> Result<Vec<FaultInfo>, FaultError> {
        let gone: Vec<FaultInfo> = {
            let mut map = self.lock();
            let ids: Vec<String> = map
                .iter()
                .filter(|(id, e)| match what {
                    Clear::All => true,
                    Clear::Target(t) => *id == t || e.info.service == *t,
                    Clear::Experiment(x) => e.info.experiment.as_deref() == Some(x.as_str()),
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| map.remove(id).map(|e| e.info))
                .collect()
        };
        if let Clear::Target(t) = what
            && gone.is_empty()
        {
            let known = self.inner.services.iter().chain(&self.inner.dependencies);
            if !known.clone().any(|s| s.as_str() == t) {
                return Err(FaultError::NotFound(format!(
                    "no fault with id {t:?} and no service or dependency of that name; see `cutover fault list`"
                )));
            }
        }
        self.after_removal(&gone, EventKind::FaultCleared, "cleared")
            .await;
        Ok(gone)
    }

    async fn after_removal(&self, gone: &[FaultInfo], kind: EventKind, how: &str) {
        let mut touched: Vec<ServiceName> =
            gone.iter().map(|i| ServiceName::new(&i.service)).collect();
        touched.dedup();
        for s in &touched {
            self.publish(s);
        }
        for i in gone {
            self.event(
                &ServiceName::new(&i.service),
                kind,
                format!("fault {} {how}: {} on {}", i.id, i.effect, i.target),
            )
            .await;
        }
    }

    /// Removes the faults whose end has come; returns them.
    pub async fn sweep(&self) -> Vec<FaultInfo> {
        let now = Instant::now();
        let gone: Vec<FaultInfo> = {
            let mut map = self.lock();
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, e)| e.fault.until <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| map.remove(id).map(|e| e.info))
                .collect()
        };
        self.after_removal(&gone, EventKind::FaultExpired, "expired")
            .await;
        gone
    }

    /// Sweeps expired faults until the handle's task is aborted.
    pub fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP);
            loop {
                tick.tick().await;
                me.sweep().await;
            }
        })
    }

    async fn event(&self, service: &ServiceName, kind: EventKind, message: String) {
        if let Err(e) = self.inner.events.record(service, kind, message).await {
            tracing::warn!(error = %e, "could not record a fault event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(f: impl FnOnce(&mut FaultRequest)) -> FaultRequest {
        let mut r = FaultRequest {
            service: "web".into(),
            duration: Some("5m".into()),
            ..FaultRequest::default()
        };
        f(&mut r);
        r
    }

    /// One row per request: accepted with this effect, or refused with words that say so.
    #[test]
    fn faults_are_checked_before_they_are_set() {
        let services = [ServiceName::new("web")];
        let deps = [ServiceName::new("db")];
        let ok: Vec<(FaultRequest, &str)> = vec![
            (req(|r| r.latency = Some("300ms".into())), "latency 300ms"),
            (
                req(|r| {
                    r.latency = Some("100ms".into());
                    r.jitter = Some("50ms".into());
                    r.version = Some("v2".into());
                }),
                "latency 100ms + up to 50ms",
            ),
            (
                req(|r| {
                    r.error_rate = Some(0.2);
                    r.status = Some(503);
                }),
                "errors 20% (503)",
            ),
            (req(|r| r.reset_rate = Some(1.0)), "resets 100%"),
            (req(|r| r.bandwidth = Some(1000)), "bandwidth 1000 B/s"),
            (
                req(|r| {
                    r.service = "db".into();
                    r.blackhole = true;
                }),
                "blackhole",
            ),
        ];
        for (r, want) in ok {
            let c = check(&r, &services, &deps).unwrap_or_else(|e| panic!("{r:?}: {e}"));
            assert_eq!(effect(&c.kind), want);
        }
        let bad: Vec<(FaultRequest, &str)> = vec![
            (req(|r| r.duration = None), "needs an end"),
            (
                req(|r| {
                    r.duration = Some("48h".into());
                    r.blackhole = true;
                }),
                "at most 24h",
            ),
            (req(|_| {}), "say what the fault does"),
            (
                req(|r| {
                    r.blackhole = true;
                    r.service = "nope".into();
                }),
                "no service or dependency named \"nope\"",
            ),
            (req(|r| r.error_rate = Some(1.5)), "a share above 0"),
            (
                req(|r| {
                    r.error_rate = Some(0.5);
                    r.status = Some(200);
                }),
                "not an error status",
            ),
            (
                req(|r| {
                    r.service = "db".into();
                    r.error_rate = Some(0.5);
                }),
                "TCP dependency",
            ),
            (
                req(|r| {
                    r.service = "db".into();
                    r.version = Some("v1".into());
                    r.blackhole = true;
                }),
                "no versions",
            ),
            (
                req(|r| {
                    r.blackhole = true;
                    r.reset_rate = Some(0.5);
                }),
                "one effect per fault",
            ),
            (req(|r| r.jitter = Some("5ms".into())), "--jitter goes with"),
            (
                req(|r| {
                    r.blackhole = true;
                    r.version = Some("v1".into());
                    r.instance = Some("web-v1-1".into());
                }),
                "not both",
            ),
        ];
        for (r, want) in bad {
            match check(&r, &services, &deps) {
                Ok(c) => panic!("{r:?} accepted: {c:?}"),
                Err(e) => assert!(e.contains(want), "{r:?}: {e}"),
            }
        }
    }
}
