//! The dashboard: a login form that sets the token cookie, and server-rendered pages.
//!
//! No front-end build step: HTML is rendered here, charts are inline SVG drawn from the metrics'
//! 15-minute series (which the daemon keeps in SQLite across restarts) on a time axis labelled
//! relative to now, and a small inline script listens to the SSE stream and swaps in a freshly
//! rendered service panel whenever something is recorded. Buttons post to the same API routes
//! the CLI uses, authenticated by the session cookie (so the API records them as the
//! `dashboard`'s) plus the session's CSRF token, which each page carries in a `<meta>` tag that
//! only pages of this origin can read (see `auth`). Its only state is the sessions.

use std::fmt::Write;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use cutover_controller::{EventView, ServiceView};
use cutover_core::{Phase, ServiceName, Timestamp, Tone};
use cutover_metrics::{Metrics, VersionSeries};
use serde::Deserialize;

use crate::{ApiState, auth};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/", get(index))
        .route("/services/{name}", get(service_page))
        .route("/experiments/{id}", get(crate::chaos::experiment_page))
        .route("/ui/services/{name}/panel", get(service_panel))
        .route("/login", get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
}

pub fn escape(s: &str) -> String {
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

const STYLE: &str = r#"
:root{--bg:#0f1115;--card:#181b22;--fg:#e6e6e6;--dim:#9aa3b2;--ok:#3fb950;--bad:#f85149;--warn:#d29922;--acc:#58a6ff}
*{box-sizing:border-box}body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:var(--bg);color:var(--fg);line-height:1.4}
main{max-width:1100px;margin:auto;padding:.75rem}header{display:flex;justify-content:space-between;align-items:center;gap:1rem;flex-wrap:wrap}
a{color:var(--acc)}h1{font-size:1.3rem;margin:.3rem 0}h2{font-size:1.1rem;margin:.2rem 0}h3{font-size:.95rem;margin:.8rem 0 .3rem;color:var(--dim)}
.card{background:var(--card);border-radius:10px;padding:.9rem;margin:.75rem 0}
.phase{display:inline-block;padding:.1rem .55rem;border-radius:999px;font-weight:600;font-size:.85rem;background:#30363d}
.phase-stable,.phase-promoted{background:#1f3d2a;color:var(--ok)}.phase-rolled-back,.phase-failed,.phase-aborted{background:#3d1f22;color:var(--bad)}
.phase-paused,.phase-awaiting-approval{background:#3d321f;color:var(--warn)}.phase-progressing,.phase-starting,.phase-promoting,.phase-hooks,.phase-backing-up,.phase-migrating,.phase-smoke,.phase-restoring{background:#1f2d3d;color:var(--acc)}
.bar{background:#30363d;border-radius:4px;height:.8rem;overflow:hidden;flex:1}.bar>span{display:block;height:100%}
.wrow{display:flex;align-items:center;gap:.6rem;margin:.25rem 0}.wrow b{min-width:4.5rem}.wrow i{min-width:3rem;text-align:right;font-style:normal}
table{width:100%;border-collapse:collapse;font-size:.88rem}td,th{padding:.3rem .4rem;border-bottom:1px solid #262b33;text-align:left;vertical-align:top}
.h-healthy{color:var(--ok)}.h-unhealthy{color:var(--bad)}.h-starting,.h-draining{color:var(--warn)}
button,input{font:inherit;padding:.45rem .8rem;border-radius:6px;border:1px solid #30363d;background:#21262d;color:var(--fg)}
button{cursor:pointer}button:hover{border-color:var(--acc)}button.danger{border-color:#6e2b2b}button:disabled{opacity:.4;cursor:default}
.actions{display:flex;gap:.5rem;flex-wrap:wrap;margin:.6rem 0}.dim{color:var(--dim)}.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:.6rem}
svg{width:100%;height:auto;background:#12151b;border-radius:6px}.ev-kind{white-space:nowrap;color:var(--dim)}
.legend span{margin-right:.8rem;font-size:.85rem}code{background:#21262d;padding:.05rem .3rem;border-radius:4px}
@media (max-width:600px){td.hide-sm,th.hide-sm{display:none}main{padding:.4rem}}
"#;

/// Colours for versions in charts and bars, stable first.
const PALETTE: &[&str] = &[
    "#58a6ff", "#3fb950", "#d29922", "#bc8cff", "#f85149", "#39c5cf",
];

fn page(title: &str, body: &str, script: &str) -> String {
    page_with(title, body, script, None)
}

/// A page; `csrf` is the session's token for the scripts that post (none on the login form).
pub(crate) fn page_with(title: &str, body: &str, script: &str, csrf: Option<&str>) -> String {
    let meta = csrf
        .map(|t| format!("<meta name=csrf-token content=\"{}\">", escape(t)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width,initial-scale=1\">{meta}\
<title>{}</title><style>{STYLE}</style></head><body><main>{body}</main>{script}</body></html>",
        escape(title)
    )
}

/// The caller of a dashboard page: `Some(csrf)` for a session (`Some("")` for a bearer
/// client, which needs none), `None` when not logged in.
pub(crate) fn viewer(headers: &HeaderMap, s: &ApiState) -> Option<String> {
    match auth::caller(headers, s) {
        Ok(auth::Caller::Session { csrf, .. }) => Some(csrf),
        Ok(auth::Caller::Bearer) => Some(String::new()),
        Err(_) => None,
    }
}

async fn login_form() -> Html<String> {
    Html(login_page(None))
}

fn login_page(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p role=alert style=color:var(--bad)>{}</p>", escape(e)))
        .unwrap_or_default();
    page(
        "cutover · log in",
        &format!(
            "<div class=card><h1>cutover</h1>{err}<form method=post action=/login>\
<p><label>API token<br><input id=token name=token type=password autocomplete=current-password required size=40></label></p>\
<button id=login type=submit>Log in</button></form>\
<p class=dim>The token is in <code>.cutover/token</code> beside your config.</p></div>"
        ),
        "",
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<ApiState>, Form(f): Form<LoginForm>) -> Response {
    let token = f.token.trim();
    if !auth::token_matches(token, &s.token) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(Some("That token is not right."))),
        )
            .into_response();
    }
    // The cookie holds a random session id, never the token: a cookie that leaks (a proxy's
    // log, a shared browser profile) dies at logout or expiry, and the token stays in its file.
    // HttpOnly keeps it from scripts; SameSite=Strict keeps other sites from sending it.
    let (id, _) = s.sessions.create();
    let cookie = format!(
        "{}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        auth::COOKIE,
        auth::SESSION_TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// Ends the session on the server (its cookie is dead even if kept) and clears the cookie. Only
/// the dashboard's own form can: another page logging a person out is a nuisance worth
/// refusing.
async fn logout(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Response {
    if let Ok(auth::Caller::Session { id, csrf }) = auth::caller(&headers, &s) {
        if !auth::csrf_ok(&headers, Some(&f.csrf), &csrf) {
            return (
                StatusCode::FORBIDDEN,
                Html(page(
                    "cutover",
                    "<p class=card>Log out from the dashboard's own page.</p>",
                    "",
                )),
            )
                .into_response();
        }
        s.sessions.end(&id);
    }
    let cookie = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        auth::COOKIE
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

pub(crate) fn header_bar(title: &str, csrf: &str) -> String {
    format!(
        "<header><h1><a href=/ style=color:inherit;text-decoration:none>cutover</a> · {}</h1>\
<form method=post action=/logout><input type=hidden name=csrf value=\"{}\"><button type=submit>Log out</button></form></header>",
        escape(title),
        escape(csrf)
    )
}

async fn index(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let Some(csrf) = viewer(&headers, &s) else {
        return Redirect::to("/login").into_response();
    };
    let services = match s.controller.status().await {
        Ok(v) => v,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let mut body = header_bar("services", &csrf);
    for svc in &services {
        // Phase and weights at a glance: the page reloads itself on every recorded event.
        let _ = write!(
            body,
            "<section class=card data-service=\"{n}\"><h2><a href=\"/services/{n}\">{n}</a> <span class=\"phase phase-{p}\">{p}</span></h2>\
<p class=dim>listen {listen} · stable {st}{cand}{step} · {strategy}</p>{weights}</section>",
            n = escape(svc.name.as_str()),
            p = svc.phase,
            listen = svc.listen,
            st = escape(svc.stable.as_str()),
            cand = match (&svc.candidate, svc.rollout_id) {
                (Some(c), Some(id)) => format!(" · rollout #{id} to {}", escape(c.as_str())),
                (Some(c), None) => format!(" · candidate {}", escape(c.as_str())),
                _ => String::new(),
            },
            step = svc
                .step
                .map(|(i, n)| format!(" · step {i}/{n}"))
                .unwrap_or_default(),
            strategy = svc.strategy,
            weights = weight_bars(svc),
        );
    }
    if services.is_empty() {
        body.push_str("<p class=card>No services are configured.</p>");
    }
    body.push_str(&crate::signals::cards(&s, None));
    body.push_str(&crate::chaos::experiments_card(&s).await);
    if let Some(src) = s.signals.clone() {
        let d = tokio::task::spawn_blocking(move || {
            src.dora(None, std::time::Duration::from_secs(30 * 86_400))
        })
        .await;
        if let Ok(Ok(d)) = d {
            body.push_str(&crate::signals::dora_card(&d));
        }
    }
    Html(page_with("cutover", &body, &live_script(None), Some(&csrf))).into_response()
}

async fn service_page(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(csrf) = viewer(&headers, &s) else {
        return Redirect::to("/login").into_response();
    };
    match s.controller.service(&name).await {
        Ok(svc) => {
            let body = format!(
                "{}<div id=panel>{}{}</div>",
                header_bar(svc.name.as_str(), &csrf),
                panel(&svc, &s.metrics),
                crate::signals::cards(&s, Some(svc.name.as_str()))
            );
            Html(page_with(
                &format!("cutover · {}", svc.name),
                &body,
                &live_script(Some(svc.name.as_str())),
                Some(&csrf),
            ))
            .into_response()
        }
        Err(e) => (
            StatusCode::NOT_FOUND,
            Html(page(
                "cutover",
                &format!("<p class=card>{}</p>", escape(&e.to_string())),
                "",
            )),
        )
            .into_response(),
    }
}

/// The service panel alone, for the live script to swap in.
async fn service_panel(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if viewer(&headers, &s).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match s.controller.service(&name).await {
        Ok(svc) => {
            Html(panel(&svc, &s.metrics) + &crate::signals::cards(&s, Some(svc.name.as_str())))
                .into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

fn weight_bars(svc: &ServiceView) -> String {
    let mut out = String::from("<div class=weights>");
    for (i, (v, w)) in svc.weights.iter().enumerate() {
        let _ = write!(
            out,
            "<div class=wrow><b>{}</b><div class=bar><span style=\"width:{w}%;background:{}\"></span></div><i class=weight data-version=\"{}\">{w}%</i></div>",
            escape(v.as_str()),
            PALETTE[i % PALETTE.len()],
            escape(v.as_str()),
        );
    }
    out.push_str("</div>");
    out
}

fn panel(svc: &ServiceView, metrics: &Metrics) -> String {
    let name = escape(svc.name.as_str());
    let mut out = String::new();
    let step = svc
        .step
        .map(|(i, n)| format!(" · step {i}/{n}"))
        .unwrap_or_default();
    let rollout = match (&svc.candidate, svc.rollout_id) {
        (Some(c), Some(id)) => format!(
            "rollout #{id}: {} → {} ({})",
            escape(svc.stable.as_str()),
            escape(c.as_str()),
            svc.strategy
        ),
        _ => format!("stable {} ({})", escape(svc.stable.as_str()), svc.strategy),
    };
    let _ = write!(
        out,
        "<section class=card><h2>{name} <span id=phase class=\"phase phase-{p}\">{p}</span></h2>\
<p class=dim>{rollout}{step} · listen {listen}{preview}</p>{weights}",
        p = svc.phase,
        listen = svc.listen,
        preview = svc
            .preview_listen
            .map(|p| format!(" · preview {p}"))
            .unwrap_or_default(),
        weights = weight_bars(svc),
    );
    if let Some(why) = &svc.degraded {
        let _ = write!(
            out,
            "<p id=degraded role=alert style=color:var(--bad)><b>degraded:</b> {}</p>",
            escape(why)
        );
    }
    if let Some(a) = &svc.last_analysis {
        let _ = write!(
            out,
            "<p class=dim>analysis: {} failed evaluation(s); last verdict: {}</p>",
            svc.failures,
            escape(a)
        );
    }
    let in_progress = svc.rollout_id.is_some();
    let paused = svc.phase == Phase::Paused;
    let button = |action: &str, label: &str, enabled: bool, danger: bool| {
        format!(
            "<button type=button data-action={action} data-service=\"{name}\"{}{}>{label}</button>",
            if danger { " class=danger" } else { "" },
            if enabled { "" } else { " disabled" }
        )
    };
    let _ = write!(
        out,
        "<div class=actions>{}{}{}{}{}</div></section>",
        button("promote", "Promote", in_progress, false),
        button("pause", "Pause", in_progress && !paused, false),
        button("resume", "Resume", paused, false),
        button("abort", "Abort", in_progress, true),
        button("rollback", "Roll back", true, true),
    );
    out.push_str(&charts(metrics, svc));
    let _ = write!(
        out,
        "<section class=card><h3>Instances</h3><table><tr><th>instance</th><th>version</th><th class=hide-sm>address</th><th>health</th></tr>"
    );
    for i in &svc.instances {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=hide-sm>{}</td><td class=\"h-{h}\">{h}</td></tr>",
            escape(i.id.as_str()),
            escape(i.version.as_str()),
            i.address,
            h = i.health
        );
    }
    out.push_str("</table></section>");
    let _ = write!(out, "<section class=card><h3>Events</h3><table id=events>");
    for e in &svc.recent_events {
        let _ = write!(
            out,
            "<tr><td class=dim>{}</td><td class=ev-kind>{}</td><td>{}</td></tr>",
            clock(e.at),
            escape(e.kind.as_str()),
            escape(&e.message)
        );
    }
    out.push_str("</table></section>");
    out
}

fn clock(t: Timestamp) -> String {
    let s = crate::wire::rfc3339(t);
    s.get(11..19).unwrap_or(&s).to_owned()
}

/// What one chart plots from a series point.
#[derive(Clone, Copy)]
enum Plot {
    Rate,
    ErrorRate,
    P99,
}

impl Plot {
    fn title(self) -> &'static str {
        match self {
            Plot::Rate => "requests/s",
            Plot::ErrorRate => "5xx %",
            Plot::P99 => "p99 ms",
        }
    }
}

/// Three small SVG charts of the last 15 minutes, with decisions marked as vertical lines.
fn charts(metrics: &Metrics, svc: &ServiceView) -> String {
    let series = metrics.series(&svc.name);
    let end = series
        .iter()
        .filter_map(|s| s.points.last().map(|p| p.at))
        .max()
        .or_else(|| svc.recent_events.first().map(|e| e.at))
        .unwrap_or_default();
    // Up to 15 minutes; a younger daemon's history fills the whole width instead of a sliver.
    let first = series
        .iter()
        .filter_map(|s| s.points.first().map(|p| p.at))
        .min()
        .unwrap_or(end);
    let start = Timestamp(end.as_millis().saturating_sub(15 * 60 * 1000)).max(first);
    let mut out = String::from(
        "<section class=card><h3>Traffic (up to the last 15 minutes)</h3><div class=legend>",
    );
    for (i, s) in series.iter().enumerate() {
        let _ = write!(
            out,
            "<span style=color:{}>■ {}</span>",
            PALETTE[i % PALETTE.len()],
            escape(s.version.as_str())
        );
    }
    out.push_str("</div><div class=charts>");
    for plot in [Plot::Rate, Plot::ErrorRate, Plot::P99] {
        out.push_str(&chart(plot, &series, &svc.recent_events, start, end));
    }
    out.push_str("</div></section>");
    out
}

fn value(plot: Plot, requests: u64, errors: u64, p99: Option<std::time::Duration>) -> Option<f64> {
    match plot {
        Plot::Rate => Some(requests as f64),
        Plot::ErrorRate => (requests > 0).then(|| 100.0 * errors as f64 / requests as f64),
        Plot::P99 => p99.map(|d| d.as_secs_f64() * 1000.0),
    }
}

fn chart(
    plot: Plot,
    series: &[VersionSeries],
    events: &[EventView],
    start: Timestamp,
    end: Timestamp,
) -> String {
    const W: f64 = 320.0;
    const H: f64 = 120.0;
    const PAD: f64 = 22.0;
    let span = end.as_millis().saturating_sub(start.as_millis()).max(1) as f64;
    let x = |t: Timestamp| {
        PAD + (t.as_millis().saturating_sub(start.as_millis()) as f64 / span) * (W - PAD - 4.0)
    };
    let max = series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .filter_map(|p| value(plot, p.requests, p.errors, p.p99))
        })
        .fold(0.0f64, f64::max);
    let top = nice_ceiling(max);
    let y = |v: f64| H - 14.0 - (v / top) * (H - 24.0);
    let mut out = format!(
        "<svg viewBox=\"0 0 {W} {H}\" role=img aria-label=\"{t}\"><text x=4 y=12 fill=#9aa3b2 font-size=10>{t}</text>\
<text x={xr} y={yt} fill=#9aa3b2 font-size=9 text-anchor=end>max {top}</text><line x1={PAD} y1={yb} x2={W} y2={yb} stroke=#30363d />",
        t = plot.title(),
        xr = W - 4.0,
        yt = 12.0,
        yb = y(0.0),
        top = fmt_axis(top),
    );
    // The time axis: a faint grid line and a label per tick, "now" at the right edge.
    for (at, label) in time_ticks(start, end) {
        let tx = x(at);
        let now = label == "now";
        let _ = write!(
            out,
            "<line x1={tx:.1} y1=16 x2={tx:.1} y2={yt:.1} stroke=#30363d stroke-opacity=.5 />\
<text class=tick x={lx:.1} y={ly} fill=#9aa3b2 font-size=8 text-anchor={anchor} data-at=\"{iso}\">{label}<title>{iso}</title></text>",
            yt = y(0.0) + 3.0,
            lx = if now { W - 4.0 } else { tx },
            ly = H - 3.0,
            anchor = if now { "end" } else { "middle" },
            iso = crate::wire::rfc3339(at),
        );
    }
    // Decisions and steps on the time axis.
    for e in events
        .iter()
        .filter(|e| e.at >= start && e.kind.marker().is_some())
    {
        let colour = match e.kind.marker() {
            Some(Tone::Bad) => "#f85149",
            Some(Tone::Good) => "#3fb950",
            Some(Tone::Neutral) | None => "#6e7681",
        };
        let _ = write!(
            out,
            "<line x1={x:.1} y1=16 x2={x:.1} y2={yb:.1} stroke={colour} stroke-dasharray=2,2><title>{} {}</title></line>",
            escape(e.kind.as_str()),
            escape(&e.message),
            x = x(e.at),
            yb = y(0.0),
        );
    }
    for (i, s) in series.iter().enumerate() {
        // One line per stretch of consecutive samples: a gap (the daemon was down) stays a gap
        // instead of being bridged by a straight line.
        let mut segments: Vec<Vec<String>> = Vec::new();
        let mut previous: Option<Timestamp> = None;
        for p in s.points.iter().filter(|p| p.at >= start) {
            if previous.is_none_or(|t| p.at.as_millis().saturating_sub(t.as_millis()) > GAP_MS) {
                segments.push(Vec::new());
            }
            previous = Some(p.at);
            if let (Some(v), Some(seg)) = (
                value(plot, p.requests, p.errors, p.p99),
                segments.last_mut(),
            ) {
                seg.push(format!("{:.1},{:.1}", x(p.at), y(v)));
            }
        }
        for pts in segments.iter().filter(|s| !s.is_empty()) {
            let _ = write!(
                out,
                "<polyline fill=none stroke={} stroke-width=1.5 points=\"{}\" />",
                PALETTE[i % PALETTE.len()],
                pts.join(" ")
            );
        }
    }
    out.push_str("</svg>");
    out
}

/// Samples further apart than this (they are taken every second) mark a gap in the data.
const GAP_MS: u64 = 5_000;

/// Ticks for a time axis from `start` to `end`: at most five, a round step apart, counted back
/// from the end and labelled relative to it ("now", "-30s", "-5m"). Relative labels are true in
/// every time zone, and the page is re-rendered every few seconds, so they never go stale.
fn time_ticks(start: Timestamp, end: Timestamp) -> Vec<(Timestamp, String)> {
    const STEPS_S: &[u64] = &[1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900];
    let span = end.as_millis().saturating_sub(start.as_millis());
    let step = STEPS_S
        .iter()
        .map(|s| s * 1000)
        .find(|s| span / s <= 4)
        .unwrap_or(900_000);
    (0..)
        .map(|k| k * step)
        .take_while(|back| *back <= span)
        .map(|back| (Timestamp(end.as_millis() - back), relative(back)))
        .collect()
}

/// "now", "-45s", "-5m", "-1m30s" for a time `back_ms` before now.
fn relative(back_ms: u64) -> String {
    let s = back_ms / 1000;
    match (s / 60, s % 60) {
        (0, 0) => "now".to_owned(),
        (0, sec) => format!("-{sec}s"),
        (min, 0) => format!("-{min}m"),
        (min, sec) => format!("-{min}m{sec}s"),
    }
}

/// A round axis maximum at or above `v` (1, 2, 5 × 10^n).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * mag)
}

fn fmt_axis(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Confirmed actions (sent as JSON with the session's CSRF token), and a live refresh of the panel on every recorded event (SSE), plus a
/// slow timer so the charts move even when nothing is decided.
fn live_script(service: Option<&str>) -> String {
    let svc = service
        .map(|s| format!("{:?}", s))
        .unwrap_or_else(|| "null".into());
    format!(
        r#"<script>
const SERVICE = {svc};
const CSRF = (document.querySelector('meta[name=csrf-token]') || {{}}).content || '';
async function refresh() {{
  if (!SERVICE) {{ location.reload(); return; }}
  const r = await fetch(`/ui/services/${{encodeURIComponent(SERVICE)}}/panel`, {{credentials: 'same-origin'}});
  if (r.status === 401) {{ location.href = '/login'; return; }}
  if (r.ok) document.getElementById('panel').innerHTML = await r.text();
}}
document.addEventListener('click', async (ev) => {{
  const b = ev.target.closest('button[data-action]');
  if (!b) return;
  const action = b.dataset.action, service = b.dataset.service;
  if (!confirm(`${{action}} ${{service}}?`)) return;
  b.disabled = true;
  const r = await fetch(`/api/v1/services/${{encodeURIComponent(service)}}/${{action}}`, {{
    method: 'POST', credentials: 'same-origin', headers: {{'Content-Type': 'application/json', 'X-CSRF-Token': CSRF}}, body: '{{}}'}});
  if (!r.ok) {{ const e = await r.json().catch(() => ({{}})); alert((e.error && e.error.message) || r.statusText); }}
  refresh();
}});
let pending = null;
const es = new EventSource('/api/v1/events');
es.addEventListener('rollout', () => {{ if (!pending) pending = setTimeout(() => {{ pending = null; refresh(); }}, 150); }});
setInterval(refresh, SERVICE ? 2000 : 5000);
</script>"#
    )
}

/// Per-version points of the last 15 minutes as JSON, for scripts and the API.
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
                        "at": crate::wire::rfc3339(p.at),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn time_axis_ticks() {
        let labels = |span_s: u64| -> Vec<String> {
            let end = Timestamp(1_000_000_000);
            time_ticks(Timestamp(end.as_millis() - span_s * 1000), end)
                .into_iter()
                .map(|(_, l)| l)
                .collect()
        };
        assert_eq!(labels(0), ["now"]);
        assert_eq!(labels(3), ["now", "-1s", "-2s", "-3s"]);
        assert_eq!(labels(40), ["now", "-10s", "-20s", "-30s", "-40s"]);
        assert_eq!(labels(100), ["now", "-30s", "-1m", "-1m30s"]);
        assert_eq!(labels(15 * 60), ["now", "-5m", "-10m", "-15m"]);
    }

    #[test]
    fn charts_have_a_labelled_time_axis_and_keep_gaps_open() {
        let point = |at: u64| cutover_metrics::SeriesPoint {
            at: Timestamp(at),
            requests: 10,
            errors: 1,
            p99: Some(std::time::Duration::from_millis(20)),
        };
        let series = vec![VersionSeries {
            version: cutover_core::Version::new("v1"),
            // Two stretches 59 s apart: the daemon was down in between.
            points: vec![
                point(100_000),
                point(101_000),
                point(160_000),
                point(161_000),
            ],
        }];
        let svg = chart(
            Plot::Rate,
            &series,
            &[],
            Timestamp(100_000),
            Timestamp(161_000),
        );
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        let ticks: Vec<&str> = svg
            .split("class=tick")
            .skip(1)
            .filter_map(|t| t.split_once('>').and_then(|(_, r)| r.split_once('<')))
            .map(|(label, _)| label)
            .collect();
        assert_eq!(ticks, ["now", "-15s", "-30s", "-45s", "-1m"], "{svg}");
    }

    #[test]
    fn axis_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
    }
}
