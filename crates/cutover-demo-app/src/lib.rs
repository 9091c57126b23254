//! cutover-demo-app: the sample upstream used by `cutover demo`, the tests and the benchmarks.
//!
//! A tiny HTTP/1.1 server: `GET /` answers `{"version","instance"}` (or a 500 for a configured
//! share of requests, after a configured delay), `GET /healthz` answers 200 or 503. It is built
//! to be fast, because benchmarks put it behind the proxy, and it must never be used to judge
//! anything but cutover itself.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;

/// How the demo app behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoOptions {
    pub version: String,
    pub instance: String,
    /// Share of `GET /` answered with 500, 0 to 1.
    pub error_rate: f64,
    /// Added before answering `GET /`.
    pub latency: Duration,
    /// Answer `/healthz` with 503.
    pub fail_health: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DemoError {
    #[error("{var}={value:?} is not valid: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: String,
    },
}

impl DemoOptions {
    /// Applies `DEMO_ERROR_RATE`, `DEMO_LATENCY`, `DEMO_FAIL_HEALTH` and `CUTOVER_INSTANCE` from
    /// `get` over the flags, so `cutover deploy web v3 --env DEMO_ERROR_RATE=0.2` makes a bad
    /// version without changing its command.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), DemoError> {
        let bad = |var: &'static str, value: &str, why: &str| DemoError::Env {
            var,
            value: value.to_owned(),
            why: why.to_owned(),
        };
        // Work on a copy so that an invalid variable leaves the options untouched.
        let mut next = self.clone();
        if let Some(v) = get("DEMO_ERROR_RATE") {
            let rate: f64 = v
                .trim()
                .parse()
                .map_err(|_| bad("DEMO_ERROR_RATE", &v, "not a number"))?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(bad("DEMO_ERROR_RATE", &v, "must be between 0 and 1"));
            }
            next.error_rate = rate;
        }
        if let Some(v) = get("DEMO_LATENCY") {
            next.latency = humantime::parse_duration(v.trim())
                .map_err(|e| bad("DEMO_LATENCY", &v, &e.to_string()))?;
        }
        if let Some(v) = get("DEMO_FAIL_HEALTH") {
            next.fail_health = match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" | "" => false,
                _ => return Err(bad("DEMO_FAIL_HEALTH", &v, "use true or false")),
            };
        }
        if let Some(v) = get("CUTOVER_INSTANCE").filter(|v| !v.trim().is_empty()) {
            next.instance = v.trim().to_owned();
        }
        *self = next;
        Ok(())
    }
}

/// The answers that never change, prepared once.
struct Canned {
    ok: Bytes,
    error: Bytes,
    opts: DemoOptions,
    started: Option<Arc<tokio::sync::Notify>>,
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight finish:
/// idle keep-alive connections are closed, busy ones answer their current request first.
pub async fn run(
    listener: TcpListener,
    opts: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve(listener, opts, shutdown, None).await
}

/// [`run`], plus a signal raised each time a `GET /` starts, so tests can shut down while a
/// request is provably in flight instead of guessing with a sleep.
async fn serve(
    listener: TcpListener,
    opts: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: Option<Arc<tokio::sync::Notify>>,
) -> std::io::Result<()> {
    let canned = Arc::new(Canned {
        ok: Bytes::from(format!(
            "{{\"version\":{},\"instance\":{}}}",
            json_string(&opts.version),
            json_string(&opts.instance)
        )),
        error: Bytes::from(format!(
            "{{\"error\":\"injected failure\",\"version\":{}}}",
            json_string(&opts.version)
        )),
        opts,
        started,
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors or similar: wait a moment instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let canned = canned.clone();
        // One cheap generator per connection: no shared state between connections.
        let rng = std::cell::RefCell::new(SmallRng::from_rng(&mut rand::rng()));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let canned = canned.clone();
            let fail = canned.opts.error_rate > 0.0
                && rng.borrow_mut().random::<f64>() < canned.opts.error_rate;
            async move { Ok::<_, Infallible>(answer(&canned, &req, fail).await) }
        });
        // Pipelined requests are answered in one write, which is what load generators send.
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .pipeline_flush(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn answer(c: &Canned, req: &Request<Incoming>, fail: bool) -> Response<Full<Bytes>> {
    let json = HeaderValue::from_static("application/json");
    let text = HeaderValue::from_static("text/plain");
    let (status, body, ctype) = match req.uri().path() {
        "/healthz" if c.opts.fail_health => (
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"unhealthy"),
            text,
        ),
        "/healthz" => (StatusCode::OK, Bytes::from_static(b"ok"), text),
        "/" => {
            if let Some(started) = &c.started {
                started.notify_one();
            }
            if !c.opts.latency.is_zero() {
                tokio::time::sleep(c.opts.latency).await;
            }
            if fail {
                (StatusCode::INTERNAL_SERVER_ERROR, c.error.clone(), json)
            } else {
                (StatusCode::OK, c.ok.clone(), json)
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found"),
            text,
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, ctype);
    resp
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
