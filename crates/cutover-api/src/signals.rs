//! The signals surface of the API (docs/reference.md §12): SLOs, alerts, DORA, the Prometheus rules
//! export, and the dashboard's cards for them.
//!
//! The daemon's signals task owns the numbers; it reaches the API through [`SignalsSource`],
//! which answers in the wire types below (shared with the CLI, which decodes them). Without a
//! source (a daemon started without one, as some tests do) the routes answer 404.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cutover_controller::ControlError;
use serde::Deserialize;

use crate::ApiState;
use crate::dashboard::escape;
use crate::routes::ApiError;

/// The JSON shapes of `cutover slo`, `cutover alerts` and `cutover dora`.
pub mod wire {
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct SloReport {
        pub slos: Vec<Slo>,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct Slo {
        pub service: String,
        pub name: String,
        /// Percent, e.g. 99.9.
        pub objective: f64,
        /// `30d`.
        pub window: String,
        /// `300ms` for a latency SLO; null when good means "not 5xx".
        pub latency: Option<String>,
        /// Good share over the last 5 minutes; null without requests.
        pub sli_now: Option<f64>,
        /// Good share over the whole window.
        pub sli_window: Option<f64>,
        pub requests: u64,
        pub bad: u64,
        /// Bad requests the budget allows for the traffic so far.
        pub allowed_bad: f64,
        /// 1 untouched, 0 spent, below 0 overspent.
        pub budget_remaining: f64,
        pub exhausted: bool,
        pub burn_rates: Vec<BurnRate>,
        /// The multi-window checks, with their factors and whether each holds.
        pub alerts: Vec<BurnCheck>,
        /// `(RFC 3339, budget remaining)` over the last window, for the burn-down chart.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub burn_down: Vec<(String, f64)>,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct BurnRate {
        pub window: String,
        /// Null without requests in the window.
        pub rate: Option<f64>,
        pub requests: u64,
        pub bad: u64,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct BurnCheck {
        /// `page-quick`, `page-slow`, `ticket-quick`, `ticket-slow`.
        pub name: String,
        pub severity: String,
        pub long: String,
        pub short: String,
        pub factor: f64,
        pub long_rate: Option<f64>,
        pub short_rate: Option<f64>,
        pub active: bool,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct AlertsReport {
        /// Pending and firing alerts (and those resolved in the last 15 minutes).
        pub alerts: Vec<Alert>,
        pub receivers: Vec<Receiver>,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct Alert {
        pub alertname: String,
        pub service: String,
        pub severity: String,
        /// `pending`, `firing` or `resolved`.
        pub state: String,
        pub labels: std::collections::BTreeMap<String, String>,
        pub summary: String,
        /// When its condition started to hold.
        pub since: String,
        pub fired_at: Option<String>,
        pub resolved_at: Option<String>,
        /// The receivers its routes send it to.
        pub receivers: Vec<String>,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct Receiver {
        pub name: String,
        pub kind: String,
        pub sent: u64,
        pub failed: u64,
        /// The last notification failed after all its attempts.
        pub failing: bool,
        pub last_error: Option<String>,
        pub last_sent: Option<String>,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct Dora {
        /// Null: every service.
        pub service: Option<String>,
        pub since: String,
        pub until: String,
        pub deployments: u64,
        pub deployments_per_day: f64,
        /// `daily`, `weekly`, `monthly`, `yearly` (Four Keys' buckets).
        pub deployment_frequency: String,
        pub deployment_frequency_level: String,
        pub lead_time_seconds: Option<f64>,
        pub lead_time_level: Option<String>,
        /// Deployments that named a commit (the lead time's sample).
        pub deployments_with_commit: u64,
        pub failed_deployments: u64,
        pub change_failure_rate: Option<f64>,
        pub change_failure_level: Option<String>,
        pub time_to_restore_seconds: Option<f64>,
        pub time_to_restore_level: Option<String>,
        pub failures: Vec<DoraFailure>,
        /// Canaries analysis rolled back before they reached all users (not in the rate).
        pub caught_by_analysis: u64,
        /// Aborted or failed rollouts (not deployments).
        pub not_promoted: u64,
        pub rollbacks: u64,
    }

    #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
    pub struct DoraFailure {
        pub rollout_id: i64,
        pub how: String,
        pub time_to_restore_seconds: Option<f64>,
    }
}

/// What `deploy` and `rollback` tell the signals about a rollout they started.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RolloutNote {
    pub rollout_id: i64,
    pub service: String,
    pub rollback: bool,
    pub commit: Option<String>,
    /// RFC 3339 as the CLI sent it.
    pub commit_time: Option<String>,
    pub fixes: Option<i64>,
    /// Set when the deploy went through a budget freeze with `--force --reason`.
    pub forced_reason: Option<String>,
    /// The freeze it went through, with its figures.
    pub overrode: Option<String>,
    pub actor: String,
}

/// The daemon's signals, as the API sees them.
pub trait SignalsSource: Send + Sync + 'static {
    fn slo(&self, service: Option<&str>) -> Result<wire::SloReport, ControlError>;
    fn alerts(&self) -> wire::AlertsReport;
    /// Reads the history: blocking, call it off the async workers.
    fn dora(&self, service: Option<&str>, since: Duration) -> Result<wire::Dora, ControlError>;
    fn prometheus_rules(&self, service: Option<&str>) -> Result<String, ControlError>;
    /// A sentence with the budget figures when `service` may not be deployed now.
    fn frozen(&self, service: &str) -> Option<String>;
    /// Writes to the history: blocking, call it off the async workers.
    fn note(&self, note: RolloutNote);
}

pub type Source = Arc<dyn SignalsSource>;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/slo", get(slo))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/dora", get(dora))
        .route("/api/v1/export/prometheus-rules", get(prometheus_rules))
}

fn source(s: &ApiState) -> Result<Source, ApiError> {
    s.signals.clone().ok_or_else(|| {
        ApiError::Control(ControlError::NotFound(
            "this daemon keeps no signals".into(),
        ))
    })
}

#[derive(Deserialize)]
struct ServiceQuery {
    service: Option<String>,
    since: Option<String>,
}

async fn slo(
    State(s): State<ApiState>,
    Query(q): Query<ServiceQuery>,
) -> Result<Json<wire::SloReport>, ApiError> {
    Ok(Json(source(&s)?.slo(q.service.as_deref())?))
}

async fn alerts(State(s): State<ApiState>) -> Result<Json<wire::AlertsReport>, ApiError> {
    Ok(Json(source(&s)?.alerts()))
}

/// `30d`, `12h`, `2w`; the DORA period.
pub fn parse_since(s: Option<&str>) -> Result<Duration, ApiError> {
    let Some(s) = s else {
        return Ok(Duration::from_secs(30 * 86_400));
    };
    let t = s.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = n.parse().map_err(|_| {
        ApiError::Control(ControlError::BadRequest(format!(
            "since {s:?} is not a period like 30d, 12h or 2w"
        )))
    })?;
    let secs = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "w" => 7 * 86_400,
        "m" => 60,
        _ => {
            return Err(ApiError::Control(ControlError::BadRequest(format!(
                "since {s:?} is not a period like 30d, 12h or 2w"
            ))));
        }
    };
    if n == 0 {
        return Err(ApiError::Control(ControlError::BadRequest(
            "since must be longer than 0".into(),
        )));
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

async fn dora(
    State(s): State<ApiState>,
    Query(q): Query<ServiceQuery>,
) -> Result<Json<wire::Dora>, ApiError> {
    let src = source(&s)?;
    let since = parse_since(q.since.as_deref())?;
    let service = q.service;
    let r = tokio::task::spawn_blocking(move || src.dora(service.as_deref(), since))
        .await
        .map_err(|e| ApiError::Control(ControlError::Internal(e.to_string())))??;
    Ok(Json(r))
}

async fn prometheus_rules(
    State(s): State<ApiState>,
    Query(q): Query<ServiceQuery>,
) -> Result<Response, ApiError> {
    let text = source(&s)?.prometheus_rules(q.service.as_deref())?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/yaml; charset=utf-8")],
        text,
    )
        .into_response())
}

/// A deploy's `commit_time` must be RFC 3339 (else 400, before anything is deployed).
pub fn check_commit_time(t: Option<&str>) -> Result<(), ApiError> {
    match t {
        Some(t) if t.trim().parse::<jiff::Timestamp>().is_err() => {
            Err(ApiError::Control(ControlError::BadRequest(format!(
                "commit_time {t:?} is not an RFC 3339 time like 2026-03-01T12:00:00Z"
            ))))
        }
        _ => Ok(()),
    }
}

/// The deploy route's check: `Err` (409, code `frozen`) when the service's budget is
/// exhausted and the request does not force its way through with a reason.
pub fn check_freeze(
    s: &ApiState,
    service: &str,
    force: bool,
    reason: Option<&str>,
) -> Result<Option<String>, Box<Response>> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    if force && reason.is_none() {
        return Err(Box::new(
            crate::routes::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "--force needs --reason TEXT: the reason is recorded with the rollout",
            )
            .into_response(),
        ));
    }
    let Some(src) = &s.signals else {
        return Ok(None);
    };
    match src.frozen(service) {
        None => Ok(None),
        Some(why) if force => Ok(Some(why)),
        Some(why) => Err(Box::new(
            crate::routes::error(
                StatusCode::CONFLICT,
                "frozen",
                &format!(
                    "{why}; deploys of {service} are frozen ([policy] freeze_when_budget_exhausted): deploy with --force --reason TEXT to go ahead anyway, or `cutover rollback {service}` (never frozen)"
                ),
            )
            .into_response(),
        )),
    }
}

/// Hands a note to the signals off the async workers.
pub async fn note(s: &ApiState, note: RolloutNote) {
    if let Some(src) = s.signals.clone() {
        let _ = tokio::task::spawn_blocking(move || src.note(note)).await;
    }
}

// ---- the dashboard's cards ------------------------------------------------------------------

fn pct(v: f64) -> String {
    format!("{:.2}%", v * 100.0)
}

/// A burn-down chart: budget remaining over the last window, 100% at the top, 0 marked.
fn burn_down_svg(points: &[(String, f64)], title: &str) -> String {
    const W: f64 = 320.0;
    const H: f64 = 110.0;
    const PAD: f64 = 26.0;
    let low = points.iter().map(|p| p.1).fold(0.0f64, f64::min).max(-1.0);
    let (top, bottom) = (1.0f64, low);
    let y = |v: f64| 16.0 + (top - v.clamp(bottom, top)) / (top - bottom) * (H - 32.0);
    let n = points.len().max(2) as f64 - 1.0;
    let x = |i: usize| PAD + i as f64 / n * (W - PAD - 4.0);
    let mut out = format!(
        "<svg class=burndown viewBox=\"0 0 {W} {H}\" role=img aria-label=\"{t}\"><text x=4 y=12 fill=#9aa3b2 font-size=10>{t}</text>\
<text x=4 y={y1:.1} fill=#9aa3b2 font-size=8>100%</text><text x=4 y={y0:.1} fill=#9aa3b2 font-size=8>0%</text>\
<line x1={PAD} y1={y0:.1} x2={W} y2={y0:.1} stroke=#f85149 stroke-dasharray=3,2 />",
        t = escape(title),
        y1 = y(1.0) + 3.0,
        y0 = y(0.0),
    );
    let pts: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, (_, v))| format!("{:.1},{:.1}", x(i), y(*v)))
        .collect();
    let colour = if points.last().is_some_and(|p| p.1 <= 0.0) {
        "#f85149"
    } else {
        "#3fb950"
    };
    let _ = write!(
        out,
        "<polyline fill=none stroke={colour} stroke-width=1.5 points=\"{}\" />",
        pts.join(" ")
    );
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let _ = write!(
            out,
            "<text x={PAD} y={H} fill=#9aa3b2 font-size=8>{}</text><text x={W} y={H} fill=#9aa3b2 font-size=8 text-anchor=end>now</text>",
            escape(first.0.get(..10).unwrap_or(&first.0))
        );
        let _ = last;
    }
    out.push_str("</svg>");
    out
}

/// The firing alerts and each SLO's budget burn-down (of one service, or all), for the
/// dashboard; empty without signals.
pub fn cards(s: &ApiState, service: Option<&str>) -> String {
    let Some(src) = &s.signals else {
        return String::new();
    };
    let mut out = String::new();
    let alerts = src.alerts();
    let shown: Vec<&wire::Alert> = alerts
        .alerts
        .iter()
        .filter(|a| service.is_none_or(|s| a.service == s) && a.state != "resolved")
        .collect();
    let _ = write!(out, "<section class=card id=alerts><h3>Alerts</h3>");
    if shown.is_empty() {
        out.push_str("<p class=dim>No alert is pending or firing.</p>");
    } else {
        out.push_str("<table><tr><th>alert</th><th>state</th><th>summary</th></tr>");
        for a in shown {
            let _ = write!(
                out,
                "<tr class=\"alert-{st}\"><td><b>{}</b> <span class=dim>{} · {}</span></td><td class=\"{cls}\">{st}</td><td>{}</td></tr>",
                escape(&a.alertname),
                escape(&a.service),
                escape(&a.severity),
                escape(&a.summary),
                st = escape(&a.state),
                cls = if a.state == "firing" {
                    "h-unhealthy"
                } else {
                    "h-starting"
                },
            );
        }
        out.push_str("</table>");
    }
    for r in alerts.receivers.iter().filter(|r| r.failing) {
        let _ = write!(
            out,
            "<p role=alert style=color:var(--bad)>receiver <b>{}</b> ({}) is failing: {}</p>",
            escape(&r.name),
            escape(&r.kind),
            escape(r.last_error.as_deref().unwrap_or("no detail"))
        );
    }
    out.push_str("</section>");
    if let Ok(report) = src.slo(service)
        && !report.slos.is_empty()
    {
        {
            out.push_str("<section class=card id=slos><h3>Error budgets</h3><div class=charts>");
            for slo in &report.slos {
                let title = format!(
                    "{}/{} {}% · {} left",
                    slo.service,
                    slo.name,
                    slo.objective,
                    pct(slo.budget_remaining)
                );
                out.push_str(&burn_down_svg(&slo.burn_down, &title));
            }
            out.push_str("</div></section>");
        }
    }
    out
}

/// The DORA card of the overview page.
pub fn dora_card(d: &wire::Dora) -> String {
    let secs = |s: Option<f64>| {
        s.map_or("-".to_owned(), |s| {
            humantime_like(Duration::from_secs_f64(s.max(0.0)))
        })
    };
    let level = |l: &Option<String>| l.as_deref().unwrap_or("-").to_owned();
    format!(
        "<section class=card id=dora><h3>DORA since {since}</h3><table>\
<tr><td>deployment frequency</td><td>{n} ({per:.2}/day, {freq})</td><td>{fl}</td></tr>\
<tr><td>lead time for changes</td><td>{lt}</td><td>{ll}</td></tr>\
<tr><td>change failure rate</td><td>{cfr}</td><td>{cl}</td></tr>\
<tr><td>time to restore</td><td>{ttr}</td><td>{tl}</td></tr>\
</table><p class=dim>{caught} canary rollout(s) caught by analysis, {np} aborted or failed, {rb} rollback(s)</p></section>",
        since = escape(d.since.get(..10).unwrap_or(&d.since)),
        n = d.deployments,
        per = d.deployments_per_day,
        freq = escape(&d.deployment_frequency),
        fl = escape(&d.deployment_frequency_level),
        lt = secs(d.lead_time_seconds),
        ll = escape(&level(&d.lead_time_level)),
        cfr = d.change_failure_rate.map_or("-".to_owned(), |r| format!(
            "{:.0}% ({} of {})",
            r * 100.0,
            d.failed_deployments,
            d.deployments
        )),
        cl = escape(&level(&d.change_failure_level)),
        ttr = secs(d.time_to_restore_seconds),
        tl = escape(&level(&d.time_to_restore_level)),
        caught = d.caught_by_analysis,
        np = d.not_promoted,
        rb = d.rollbacks,
    )
}

/// `2h 5m`, `3d 4h`, `45s`: two units at most.
pub fn humantime_like(d: Duration) -> String {
    let s = d.as_secs();
    let parts = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = Vec::new();
    let mut rest = s;
    for (n, u) in parts {
        if rest >= n || (out.is_empty() && n == 1) {
            out.push(format!("{}{u}", rest / n));
            rest %= n;
        }
        if out.len() == 2 {
            break;
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_durations_read_well() {
        assert_eq!(
            parse_since(Some("30d")).ok(),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            parse_since(Some("2w")).ok(),
            Some(Duration::from_secs(14 * 86_400))
        );
        assert!(parse_since(Some("soon")).is_err());
        assert!(parse_since(Some("0d")).is_err());
        assert_eq!(humantime_like(Duration::from_secs(7_500)), "2h 5m");
        assert_eq!(humantime_like(Duration::from_secs(45)), "45s");
        assert_eq!(humantime_like(Duration::from_secs(0)), "0s");
        assert_eq!(
            humantime_like(Duration::from_secs(3 * 86_400 + 4 * 3_600 + 5)),
            "3d 4h"
        );
    }

    #[test]
    fn burn_down_charts_mark_zero() {
        let svg = burn_down_svg(
            &[("2026-01-01T00:00:00Z".into(), 1.0), ("x".into(), -0.5)],
            "web/availability",
        );
        assert!(svg.starts_with("<svg class=burndown"));
        assert!(svg.contains("stroke=#f85149 stroke-width"), "{svg}");
        assert!(svg.contains(">0%</text>"));
    }
}
