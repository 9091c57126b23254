//! Routes of faults and chaos experiments (docs/reference.md, "Chaos experiments"): each asks
//! the fault registry or the experiment executor and turns the answer into JSON. Their JSON
//! shapes are `cutover-chaos`'s own serde types (the experiment model is also what the daemon
//! persists), passed through unchanged. The dashboard's experiment card and report page
//! live here too, beside the routes whose data they show.

use std::fmt::Write;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cutover_chaos::exec::{ProbeResult, StepResult};
use cutover_chaos::experiment::Experiment;
use cutover_chaos::{ChaosError, Clear, FaultError, FaultRequest, Report};
use serde::Deserialize;
use serde_json::json;

use crate::ApiState;
use crate::dashboard::escape;
use crate::routes::{body, error};

pub fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/api/v1/faults", get(list).post(add))
        .route("/api/v1/faults/clear", post(clear))
        .route("/api/v1/experiments", get(experiments).post(start))
        .route("/api/v1/experiments/{id}", get(report))
        .route("/api/v1/experiments/{id}/stop", post(stop))
}

fn unavailable() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "faults and experiments are not available in this daemon",
    )
    .into_response()
}

fn fault_error(e: FaultError) -> Response {
    match e {
        FaultError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", &m),
        FaultError::NotFound(m) => error(StatusCode::NOT_FOUND, "not_found", &m),
    }
    .into_response()
}

fn chaos_error(e: ChaosError) -> Response {
    match e {
        ChaosError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", &m),
        ChaosError::NotFound(m) => error(StatusCode::NOT_FOUND, "not_found", &m),
        ChaosError::Conflict(m) => error(StatusCode::CONFLICT, "conflict", &m),
        ChaosError::Io(m) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", &m),
    }
    .into_response()
}

async fn list(State(s): State<ApiState>) -> Response {
    match s.chaos.as_ref() {
        Some(c) => Json(json!({ "faults": c.faults().list() })).into_response(),
        None => unavailable(),
    }
}

async fn add(State(s): State<ApiState>, headers: HeaderMap, bytes: axum::body::Bytes) -> Response {
    let Some(c) = s.chaos.as_ref() else {
        return unavailable();
    };
    let req: FaultRequest = match body(&headers, &bytes) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match c.faults().add(&req).await {
        Ok(f) => (StatusCode::CREATED, Json(f)).into_response(),
        Err(e) => fault_error(e),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    /// A service, a dependency or a fault's id.
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn clear(
    State(s): State<ApiState>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Response {
    let Some(c) = s.chaos.as_ref() else {
        return unavailable();
    };
    let b: ClearBody = match body(&headers, &bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let what = match (b.target, b.all) {
        (Some(t), false) => Clear::Target(t),
        (None, true) => Clear::All,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give {\"target\": SERVICE or ID} or {\"all\": true}",
            )
            .into_response();
        }
    };
    match c.faults().clear(&what).await {
        Ok(gone) => Json(json!({ "cleared": gone })).into_response(),
        Err(e) => fault_error(e),
    }
}

async fn start(
    State(s): State<ApiState>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Response {
    let Some(c) = s.chaos.as_ref() else {
        return unavailable();
    };
    let e: Option<Experiment> = match body(&headers, &bytes) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let Some(e) = e else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body is the experiment",
        )
        .into_response();
    };
    match c.start(e) {
        Ok(id) => (StatusCode::CREATED, Json(json!({ "id": id }))).into_response(),
        Err(e) => chaos_error(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// The newest experiments first (`?limit=`, 20 by default).
async fn experiments(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Response {
    match s.chaos.as_ref() {
        Some(c) => {
            let c = c.clone();
            let limit = q.limit.unwrap_or(20).min(500);
            // Earlier runs are read from files.
            match tokio::task::spawn_blocking(move || c.list(limit)).await {
                Ok(list) => Json(json!({ "experiments": list })).into_response(),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    &e.to_string(),
                )
                .into_response(),
            }
        }
        None => unavailable(),
    }
}

async fn report(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.chaos.as_ref() {
        Some(c) => match c.report(&id) {
            Ok(r) => Json(r).into_response(),
            Err(e) => chaos_error(e),
        },
        None => unavailable(),
    }
}

async fn stop(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.chaos.as_ref() {
        Some(c) => match c.stop(&id) {
            Ok(r) => Json(r).into_response(),
            Err(e) => chaos_error(e),
        },
        None => unavailable(),
    }
}

/// The dashboard's card of recent experiments (nothing without the chaos routes).
pub(crate) async fn experiments_card(s: &ApiState) -> String {
    let Some(c) = s.chaos.clone() else {
        return String::new();
    };
    let list = tokio::task::spawn_blocking(move || c.list(5))
        .await
        .unwrap_or_default();
    let mut out = String::from("<section class=card id=experiments><h3>Chaos experiments</h3>");
    if list.is_empty() {
        out.push_str("<p class=dim>None yet: <code>cutover chaos run gameday.toml</code>.</p>");
    } else {
        out.push_str(
            "<table><tr><th>experiment</th><th>verdict</th><th class=hide-sm>started</th></tr>",
        );
        for r in &list {
            let _ = write!(
                out,
                "<tr><td><a href=\"/experiments/{id}\">{title}</a> <span class=dim>{id}</span></td><td class=\"{cls}\">{verdict}</td><td class=\"hide-sm dim\">{at}</td></tr>",
                id = escape(&r.id),
                title = escape(&r.title),
                cls = verdict_class(r),
                verdict = escape(r.verdict.as_deref().unwrap_or(&r.stage)),
                at = escape(&r.started_at),
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
    out
}

fn verdict_class(r: &Report) -> &'static str {
    match (&r.verdict, r.ok) {
        (None, _) => "h-starting",
        (Some(_), true) => "h-healthy",
        (Some(_), false) => "h-unhealthy",
    }
}

fn ok_cell(ok: bool) -> &'static str {
    if ok {
        "<td class=h-healthy>ok</td>"
    } else {
        "<td class=h-unhealthy>FAIL</td>"
    }
}

/// One experiment's report as a page: each probe's numbers before and after, each action
/// and method probe, the rollbacks, the scaling shocks, the verdict and the recovery.
pub(crate) fn report_html(r: &Report) -> String {
    let mut out = String::new();
    let recovered = match (r.recovered, r.recovery_seconds) {
        (Some(true), Some(sec)) => format!("recovered in {sec:.1}s"),
        (Some(false), _) => "did not recover".to_owned(),
        _ => "recovery not measured".to_owned(),
    };
    let _ = write!(
        out,
        "<section class=card><h2>{title} <span class=\"{cls}\">{verdict}</span></h2><p class=dim>{id} · started {start}{end} · stage {stage} · {recovered} · {faults} fault(s) cleared{resumed}</p>",
        title = escape(&r.title),
        cls = verdict_class(r),
        verdict = escape(r.verdict.as_deref().unwrap_or("running")),
        id = escape(&r.id),
        start = escape(&r.started_at),
        end = r
            .finished_at
            .as_deref()
            .map(|f| format!(" · ended {}", escape(f)))
            .unwrap_or_default(),
        stage = escape(&r.stage),
        faults = r.faults_cleared,
        resumed = if r.resumed {
            " · its rollbacks were run by a restarted daemon"
        } else {
            ""
        },
    );
    let probes = |out: &mut String, title: &str, list: &[ProbeResult]| {
        if list.is_empty() {
            return;
        }
        let _ = write!(
            out,
            "<h3>{title}</h3><table><tr><th>probe</th><th>result</th><th>value</th><th>tolerance</th></tr>"
        );
        for p in list {
            let _ = write!(
                out,
                "<tr><td>{}</td>{}<td>{}</td><td class=dim>{}</td></tr>",
                escape(&p.name),
                ok_cell(p.ok),
                escape(&p.detail),
                escape(&p.tolerance)
            );
        }
        out.push_str("</table>");
    };
    let steps = |out: &mut String, title: &str, list: &[StepResult]| {
        if list.is_empty() {
            return;
        }
        let _ = write!(
            out,
            "<h3>{title}</h3><table><tr><th>step</th><th>result</th><th>what happened</th><th class=hide-sm>took</th></tr>"
        );
        for st in list {
            let _ = write!(
                out,
                "<tr><td>{} <span class=dim>{}</span></td>{}<td>{}</td><td class=\"hide-sm dim\">{:.1}s</td></tr>",
                escape(&st.name),
                escape(&st.kind),
                ok_cell(st.ok),
                escape(&st.detail),
                st.took_ms as f64 / 1000.0
            );
        }
        out.push_str("</table>");
    };
    probes(&mut out, "Steady state before", &r.before);
    steps(&mut out, "Method", &r.method);
    probes(&mut out, "Steady state after", &r.after);
    steps(&mut out, "Rollbacks", &r.rollbacks);
    if !r.shocks.is_empty() {
        out.push_str("<h3>Scaling shocks</h3><table><tr><th>service</th><th>rate</th><th>sent</th><th>ok</th><th>failed</th><th>skipped</th><th>p50</th><th>p99</th></tr>");
        for sh in &r.shocks {
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}ms"));
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{:.1}/s for {:.1}s</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&sh.service),
                sh.rps,
                sh.seconds,
                sh.sent,
                sh.ok,
                sh.failed,
                sh.skipped,
                ms(sh.p50_ms),
                ms(sh.p99_ms)
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</section>");
    out
}

/// `/experiments/{id}`: the report, reloaded every second while the run goes on.
pub(crate) async fn experiment_page(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(csrf) = crate::dashboard::viewer(&headers, &s) else {
        return axum::response::Redirect::to("/login").into_response();
    };
    let Some(c) = s.chaos.as_ref() else {
        return unavailable();
    };
    let r = match c.report(&id) {
        Ok(r) => r,
        Err(e) => return chaos_error(e),
    };
    let mut body = crate::dashboard::header_bar(&format!("experiment {}", r.id), &csrf);
    body.push_str(&report_html(&r));
    let script = if r.stage == "done" {
        ""
    } else {
        "<script>setTimeout(() => location.reload(), 1000)</script>"
    };
    axum::response::Html(crate::dashboard::page_with(
        &format!("experiment {}", r.id),
        &body,
        script,
        Some(&csrf),
    ))
    .into_response()
}
