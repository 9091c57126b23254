//! The dashboard: a login form that sets the token cookie, and server-rendered pages.
//!
//! No front-end build step: HTML is rendered here, charts are inline SVG, and a small inline
//! script listens to the SSE stream to refresh the page's parts. It must not hold any state of
//! its own; everything it shows comes from the controller and the metrics.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use cutover_core::ServiceName;
use cutover_metrics::Metrics;
use serde::Deserialize;

use crate::{ApiState, auth};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;background:#0f1115;color:#e6e6e6}\
main{max-width:1100px;margin:auto;padding:1rem}input,button{font:inherit;padding:.4rem .7rem}\
.card{background:#181b22;border-radius:8px;padding:1rem;margin:1rem 0}";

async fn login_form() -> Html<String> {
    Html(login_page(None))
}

fn login_page(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p role=alert style=color:#ff6b6b>{}</p>", escape(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,initial-scale=1\">\
<title>cutover · login</title><style>{STYLE}</style></head><body><main><div class=card><h1>cutover</h1>{err}\
<form method=post action=/login><label>Token <input id=token name=token type=password autocomplete=current-password required></label> \
<button id=login type=submit>Log in</button></form><p>The token is in <code>.cutover/token</code> beside your config.</p></div></main></body></html>"
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<ApiState>, Form(f): Form<LoginForm>) -> Response {
    if !auth::token_matches(f.token.trim(), &s.token) {
        return (StatusCode::UNAUTHORIZED, Html(login_page(Some("That token is not right.")))).into_response();
    }
    let cookie = format!("{}={}; HttpOnly; SameSite=Strict; Path=/", auth::COOKIE, f.token.trim());
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout() -> Response {
    let cookie = format!("{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0", auth::COOKIE);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

async fn index(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if !auth::authorised(&headers, &s.token) {
        return Redirect::to("/login").into_response();
    }
    let services = match s.controller.status().await {
        Ok(v) => v,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let mut body = String::new();
    for svc in &services {
        body.push_str(&format!(
            "<section class=card data-service=\"{n}\"><h2>{n}</h2><p>phase <b class=phase>{p}</b> · stable {st}</p></section>",
            n = escape(svc.name.as_str()),
            p = svc.phase,
            st = escape(svc.stable.as_str()),
        ));
    }
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,initial-scale=1\">\
<title>cutover</title><style>{STYLE}</style></head><body><main><h1>cutover</h1>{body}</main></body></html>"
    ))
    .into_response()
}

/// Per-version points of the last 15 minutes as JSON for the chart.
pub fn series_json(metrics: &Metrics, service: &ServiceName) -> serde_json::Value {
    let series: Vec<serde_json::Value> = metrics
        .series(service)
        .into_iter()
        .map(|s| {
            let points: Vec<serde_json::Value> = s
                .points
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "at": p.at.as_millis(),
                        "requests": p.requests,
                        "errors": p.errors,
                        "p99_ms": p.p99.map(|d| d.as_secs_f64() * 1000.0),
                    })
                })
                .collect();
            serde_json::json!({ "version": s.version.as_str(), "points": points })
        })
        .collect();
    serde_json::json!({ "service": service.as_str(), "series": series })
}
