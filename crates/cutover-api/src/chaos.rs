//! Routes of faults and chaos experiments (docs/reference.md, "Chaos experiments"): each asks
//! the fault registry or the experiment executor and turns the answer into JSON. Their JSON
//! shapes are `cutover-chaos`'s own serde types (the experiment model is also what the daemon
//! persists), passed through unchanged.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cutover_chaos::experiment::Experiment;
use cutover_chaos::{ChaosError, Clear, FaultError, FaultRequest};
use serde::Deserialize;
use serde_json::json;

use crate::ApiState;
use crate::routes::{body, error};

pub fn routes() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/api/v1/faults", get(list).post(add))
        .route("/api/v1/faults/clear", post(clear))
        .route("/api/v1/experiments", post(start))
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
