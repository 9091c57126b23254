//! Routes and handlers: each one asks the controller and turns its answer into JSON.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use cutover_controller::{Action, ControlError, DeployRequest};
use cutover_core::StrategyKind;
use cutover_metrics::Metrics;
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use tokio_stream::wrappers::BroadcastStream;

use crate::wire::{self, DeployBody, ErrorBody, ErrorDetail, PromoteBody};
use crate::{ApiState, auth, dashboard};

pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/services/{name}/deploy", post(deploy))
        .route("/api/v1/services/{name}/promote", post(promote))
        .route("/api/v1/services/{name}/abort", post(abort))
        .route("/api/v1/services/{name}/rollback", post(rollback))
        .route("/api/v1/services/{name}/pause", post(pause))
        .route("/api/v1/services/{name}/resume", post(resume))
        .route("/api/v1/history", get(history))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/events", get(events))
        .route("/api/v1/services/{name}/series", get(series))
        .route("/metrics", get(metrics))
        .merge(crate::chaos::routes())
        .merge(crate::signals::routes())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(dashboard::routes())
        .merge(api)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see docs/reference.md §4",
            )
        })
        .layer(middleware::from_fn(auth::security_headers))
        .with_state(state)
}

pub fn error(status: StatusCode, code: &str, message: &str) -> (StatusCode, Json<ErrorBody>) {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        }),
    )
}

/// A controller error as the HTTP answer its kind deserves, or a body that is not JSON.
pub enum ApiError {
    Control(ControlError),
    NotJson,
}

fn bad_request(message: String) -> ApiError {
    ApiError::Control(ControlError::BadRequest(message))
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ApiError::Control(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = match self {
            ApiError::Control(e) => e,
            ApiError::NotJson => {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "the body must be JSON sent with `Content-Type: application/json`",
                )
                .into_response();
            }
        };
        let (status, code) = match &e {
            ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ControlError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ControlError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
        };
        error(status, code, &e.to_string()).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn status(State(s): State<ApiState>) -> ApiResult<wire::Status> {
    let services = s.controller.status().await?;
    Ok(Json(wire::Status {
        services: services.iter().map(wire::Service::from).collect(),
    }))
}

async fn service(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<wire::Service> {
    Ok(Json(wire::Service::from(
        &s.controller.service(&name).await?,
    )))
}

/// Parses a JSON body leniently about its absence but strictly about its content: a bad body is
/// a 400 naming what is wrong, not axum's plain-text rejection. A body must say it is JSON
/// (`Content-Type: application/json`): a browser lets any page send `text/plain` or form bodies
/// anywhere without asking, so reading those as JSON would let other pages act.
pub(crate) fn body<T: for<'de> Deserialize<'de> + Default>(
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::NotJson);
    }
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

async fn deploy(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: DeployBody = body(&headers, &bytes)?;
    crate::signals::check_commit_time(b.commit_time.as_deref())?;
    // An exhausted error budget freezes deploys (never rollbacks) unless forced with a reason.
    let overrode = match crate::signals::check_freeze(&s, &name, b.force, b.reason.as_deref()) {
        Ok(o) => o,
        Err(refused) => return Ok(*refused),
    };
    if b.version.trim().is_empty() {
        return Err(bad_request("the body needs a \"version\"".into()));
    }
    let strategy = match b.strategy.as_deref() {
        None => None,
        Some(x) => Some(StrategyKind::parse(x).ok_or_else(|| {
            bad_request(format!(
                "unknown strategy {x:?}; use canary, blue-green or rolling"
            ))
        })?),
    };
    let r = s
        .controller
        .deploy(DeployRequest {
            service: name.clone(),
            version: b.version,
            env: b.env,
            strategy,
            actor: auth::actor(&headers),
        })
        .await?;
    crate::signals::note(
        &s,
        crate::signals::RolloutNote {
            rollout_id: r.id,
            service: name,
            rollback: false,
            commit: b.commit,
            commit_time: b.commit_time,
            fixes: b.fixes,
            forced_reason: b.reason.filter(|_| b.force),
            overrode,
            actor: auth::actor(&headers),
        },
    )
    .await;
    Ok((StatusCode::CREATED, Json(wire::Rollout::from(&r))).into_response())
}

async fn act(
    s: &ApiState,
    name: &str,
    action: Action,
    headers: &HeaderMap,
) -> ApiResult<wire::Service> {
    Ok(Json(wire::Service::from(
        &s.controller.act(name, action, auth::actor(headers)).await?,
    )))
}

/// The body of an action without options: none, or JSON (whose content is ignored).
async fn plain_act(
    s: &ApiState,
    name: &str,
    action: Action,
    headers: &HeaderMap,
    bytes: &[u8],
) -> ApiResult<wire::Service> {
    body::<serde_json::Value>(headers, bytes)?;
    act(s, name, action, headers).await
}

async fn promote(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<wire::Service> {
    let b: PromoteBody = body(&headers, &bytes)?;
    act(
        &s,
        &name,
        Action::Promote {
            full: b.full,
            force: b.force,
        },
        &headers,
    )
    .await
}

async fn abort(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<wire::Service> {
    plain_act(&s, &name, Action::Abort, &headers, &bytes).await
}

async fn rollback(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<wire::Service> {
    let before = s
        .controller
        .service(&name)
        .await
        .ok()
        .and_then(|v| v.rollout_id);
    let v = plain_act(&s, &name, Action::Rollback, &headers, &bytes).await?;
    // A rollback after a promotion starts a new rollout back (one during a rollout ends that
    // rollout instead): DORA counts the new one as a restore.
    if let Some(id) = v.0.rollout_id.filter(|id| before != Some(*id)) {
        crate::signals::note(
            &s,
            crate::signals::RolloutNote {
                rollout_id: id,
                service: name,
                rollback: true,
                actor: auth::actor(&headers),
                ..Default::default()
            },
        )
        .await;
    }
    Ok(v)
}

async fn pause(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<wire::Service> {
    plain_act(&s, &name, Action::Pause, &headers, &bytes).await
}

async fn resume(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<wire::Service> {
    plain_act(&s, &name, Action::Resume, &headers, &bytes).await
}

#[derive(Deserialize)]
struct HistoryQuery {
    service: Option<String>,
    limit: Option<usize>,
}

async fn history(
    State(s): State<ApiState>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<wire::History> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let rows = s.controller.history(q.service.as_deref(), limit).await?;
    Ok(Json(wire::History {
        rollouts: rows.iter().map(wire::Rollout::from).collect(),
    }))
}

async fn rollout(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<wire::Rollout> {
    let id: i64 = id
        .parse()
        .map_err(|_| bad_request(format!("rollout id {id:?} is not a number")))?;
    Ok(Json(wire::Rollout::from(&s.controller.rollout(id).await?)))
}

/// Server-sent events: one `event: rollout` message per recorded event, as JSON.
async fn events(
    State(s): State<ApiState>,
) -> Sse<impl Stream<Item = Result<axum::response::sse::Event, Infallible>>> {
    let stream = BroadcastStream::new(s.controller.subscribe()).filter_map(|n| async move {
        // A lagging client skips what it missed rather than stalling the controller.
        let n = n.ok()?;
        let mut e = wire::Event::from(&n.event);
        e.phase = Some(n.phase.as_str().to_owned());
        let data = serde_json::to_string(&e).ok()?;
        Some(Ok(axum::response::sse::Event::default()
            .event("rollout")
            .data(data)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The last 15 minutes of per-version request rate, error rate and p99, for the dashboard chart.
async fn series(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let svc = s.controller.service(&name).await?;
    Ok(Json(dashboard::series_json(&s.metrics, &svc.name)).into_response())
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    exposition(&s.metrics)
}

fn exposition(m: &Metrics) -> impl IntoResponse + use<> {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render_prometheus(),
    )
}

/// The router of the optional scrape listener (`[daemon] metrics`): `GET /metrics` without a
/// token, so Prometheus needs no secret, and nothing else: every other path is 404, so this
/// address reveals no state and accepts no action.
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Metrics>| async move { exposition(&m) }),
        )
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "this listener serves only GET /metrics; the API is on daemon.api",
            )
        })
        .with_state(metrics)
}
