//! The request path: accept, choose, forward, answer.
//!
//! Nothing here may panic or block. Requests hyper cannot parse (differing Content-Lengths, bad
//! chunk sizes, obs-fold, oversized headers) are answered by hyper itself with 400/431 before
//! this code runs, so they never reach an upstream. A request with both Content-Length and
//! Transfer-Encoding is resolved as RFC 9112 §6.3 says: chunked wins, Content-Length is dropped
//! and the client connection is closed after the answer; since the body is re-framed on the way
//! out, the upstream never sees two framings. Bodies are streamed both ways, never buffered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_core::{Health, HealthChange, UpstreamErrorKind};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::BackendState;
use crate::table::CompiledVersion;
use crate::{Proxy, ServiceState};

pub(crate) type ReqBody = Either<Watched, Empty<Bytes>>;
type RespBody = Either<Watched, Full<Bytes>>;

/// Consecutive connect failures after which real traffic ejects an instance.
const PASSIVE_EJECT_AFTER: u32 = 3;
const PIN_HEADER: &str = "x-cutover-version";

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) state: Arc<ServiceState>,
    pub(crate) proxy: Proxy,
    pub(crate) upstream_timeout: Duration,
}

/// One client connection.
struct Conn {
    ctx: Ctx,
    peer: SocketAddr,
    preview: bool,
    /// The client's address as an X-Forwarded-For value, formatted once per connection.
    peer_ip: Option<HeaderValue>,
    /// The instance that served this connection's last request: if it has since left the
    /// table, the next response asks the client to reconnect (`Connection: close`).
    last: Mutex<Option<Arc<BackendState>>>,
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    ctx: Ctx,
    preview: bool,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a clone of `alive`; when the last is dropped, `all_done`
    // resolves: that is how shutdown waits for requests in flight.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            ctx: ctx.clone(),
            peer,
            preview,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            last: Mutex::new(None),
        });
        let service = hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(&conn, req).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let (alive, mut stop) = (alive.clone(), stop.clone());
        tokio::spawn(async move {
            let mut served = std::pin::pin!(served);
            tokio::select! {
                _ = served.as_mut() => {}
                _ = stopped(&mut stop) => {
                    // Finish the request in flight, then close instead of waiting for another.
                    served.as_mut().graceful_shutdown();
                    let _ = served.await;
                }
            }
            drop(alive);
        });
    }
    drop(listener);
    drop(alive);
    let _ = all_done.recv().await;
}

/// Resolves once the stop signal is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn plain(status: StatusCode, msg: String, close: bool) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(msg + "\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The innermost cause of a client error, in words.
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross the proxy.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes hop-by-hop headers, including those the Connection header names. One pass over the
/// (usually few) headers finds them; removing blindly by name cost more than the rest of the
/// header handling together.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let mut found: Vec<HeaderName> = Vec::new();
    for name in h.keys() {
        if HOP_BY_HOP.contains(name) {
            found.push(name.clone());
        }
    }
    if found.is_empty() && !keep_upgrade {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in found.into_iter().chain(named) {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

impl Conn {
    fn take_close(&self) -> bool {
        self.last
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|b| b.removed.load(Ordering::Relaxed)))
            .unwrap_or(false)
    }

    fn remember(&self, b: &Arc<BackendState>) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(b.clone());
        }
    }
}

async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<RespBody> {
    let started = Instant::now();
    let close = conn.take_close();
    let table = conn.ctx.state.table.load_full();
    let pinned = req
        .headers()
        .get(PIN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let chosen: Option<&CompiledVersion> = if conn.preview {
        table.preview.and_then(|i| table.versions.get(i))
    } else if let Some(p) = &pinned {
        table.version(p)
    } else {
        table.next_version()
    };
    let Some(cv) = chosen else {
        let why = match (&pinned, conn.preview) {
            (_, true) => "no version is in preview".to_owned(),
            (Some(p), _) => format!("version {p:?} is not running"),
            (None, _) => "no healthy instance".to_owned(),
        };
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("503 Service Unavailable: {}: {why}", conn.ctx.state.name),
            close,
        );
    };
    let Some(backend) = cv.pick(None).cloned() else {
        cv.recorder.record(503, started.elapsed(), None);
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "503 Service Unavailable: {} has no healthy instance of {}",
                conn.ctx.state.name, cv.version
            ),
            close,
        );
    };
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    // Only a request without a body can be sent twice: a streamed body is consumed once.
    let replayable = body.is_end_stream();
    let client_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = Watched::request(body, client_failed.clone());
    let first = forward(conn, &parts, Either::Left(body), &backend, upgrade).await;
    // A broken request body (bad chunking, a client that hung up) is the client's fault, not the
    // upstream's: answer 400 and count no upstream error.
    if first.is_err() && client_failed.load(Ordering::Relaxed) {
        cv.recorder.record(400, started.elapsed(), None);
        return plain(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: the request body is malformed".into(),
            true,
        );
    }
    let (backend, result) = match first {
        Err(Failure::Connect(why)) if replayable => {
            passive_failure(conn, &backend, &why);
            match cv.pick(Some(&backend)).cloned() {
                Some(other) => {
                    let r =
                        forward(conn, &parts, Either::Right(Empty::new()), &other, upgrade).await;
                    (other, r)
                }
                None => (backend, Err(Failure::Connect(why))),
            }
        }
        Err(Failure::Connect(why)) => {
            passive_failure(conn, &backend, &why);
            (backend, Err(Failure::Connect(why)))
        }
        other => (backend, other),
    };
    conn.remember(&backend);
    let name = &conn.ctx.state.name;
    match result {
        Ok(mut resp) => {
            backend.connect_failures.store(0, Ordering::Relaxed);
            let status = resp.status();
            cv.recorder.record(status.as_u16(), started.elapsed(), None);
            if status == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client_side) = client_upgrade
            {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(c),
                            &mut TokioIo::new(u),
                        )
                        .await;
                    }
                });
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, true);
                return Response::from_parts(parts, Either::Left(Watched::response(body, backend)));
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            if close || backend.removed.load(Ordering::Relaxed) {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Response::from_parts(parts, Either::Left(Watched::response(body, backend)))
        }
        Err(Failure::Connect(why)) => {
            cv.recorder
                .record(502, started.elapsed(), Some(UpstreamErrorKind::Connect));
            plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "502 Bad Gateway: {name}: cannot connect to {} ({}): {why}",
                    backend.id, backend.addr
                ),
                close,
            )
        }
        Err(Failure::Timeout) => {
            cv.recorder
                .record(504, started.elapsed(), Some(UpstreamErrorKind::Timeout));
            plain(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "504 Gateway Timeout: {name}: {} did not answer within {}ms",
                    backend.id,
                    conn.ctx.upstream_timeout.as_millis()
                ),
                close,
            )
        }
        Err(Failure::Reset(why)) => {
            cv.recorder
                .record(502, started.elapsed(), Some(UpstreamErrorKind::Reset));
            plain(
                StatusCode::BAD_GATEWAY,
                format!("502 Bad Gateway: {name}: {} broke off: {why}", backend.id),
                close,
            )
        }
    }
}

enum Failure {
    /// Nothing was sent: safe to retry.
    Connect(String),
    Timeout,
    Reset(String),
}

/// Counts a connect failure by real traffic; after a few in a row the instance is ejected until
/// the active probe admits it again.
fn passive_failure(conn: &Conn, b: &BackendState, why: &str) {
    let n = b.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n < PASSIVE_EJECT_AFTER {
        return;
    }
    let changed = b.update_health(|h| {
        if h.health == Health::Healthy {
            h.health = Health::Unhealthy;
            h.passes = 0;
        }
    });
    if changed == Some(Health::Unhealthy) {
        conn.ctx.proxy.report(HealthChange {
            service: conn.ctx.state.name.clone(),
            version: b.version.clone(),
            instance: b.id.clone(),
            health: Health::Unhealthy,
            reason: format!("ejected after {n} consecutive connection failures: {why}"),
        });
        conn.ctx.proxy.recompile(&conn.ctx.state);
    }
}

async fn forward(
    conn: &Conn,
    parts: &http::request::Parts,
    body: ReqBody,
    b: &Arc<BackendState>,
    upgrade: bool,
) -> Result<Response<Incoming>, Failure> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(b.authority.clone());
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(uri).map_err(|e| Failure::Reset(e.to_string()))?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = parts.headers.clone();
    let h = req.headers_mut();
    let host = h.get(header::HOST).cloned();
    strip_hop_by_hop(h, upgrade);
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        None => conn.peer_ip.clone(),
    };
    if let Some(v) = xff {
        h.insert("x-forwarded-for", v);
    }
    h.entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
    if let Some(host) = host {
        h.entry("x-forwarded-host").or_insert(host);
    }
    b.inflight.fetch_add(1, Ordering::Relaxed);
    let guard = InflightGuard(Some(b.clone()));
    match tokio::time::timeout(conn.ctx.upstream_timeout, b.client.request(req)).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Err(e)) if e.is_connect() => Err(Failure::Connect(describe(&e))),
        Ok(Err(e)) => Err(Failure::Reset(describe(&e))),
        Ok(Ok(resp)) => {
            // The response body now carries the in-flight count until it is fully sent.
            std::mem::forget(guard);
            Ok(resp)
        }
    }
}

/// Decrements an instance's in-flight count when dropped.
struct InflightGuard(Option<Arc<BackendState>>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A body passing through the proxy, watched on the way. A client's request body remembers
/// whether reading it failed, so an exchange the client broke is not blamed on the upstream; an
/// upstream's response body keeps its request counted in flight until it ends.
pub(crate) struct Watched {
    inner: Incoming,
    /// Released when the body ends or fails, not only when the connection drops it.
    inflight: InflightGuard,
    failed: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Watched {
    fn request(inner: Incoming, failed: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Watched {
            inner,
            inflight: InflightGuard(None),
            failed: Some(failed),
        }
    }

    /// Takes over the in-flight count `forward` left for this response.
    fn response(inner: Incoming, b: Arc<BackendState>) -> Self {
        Watched {
            inner,
            inflight: InflightGuard(Some(b)),
            failed: None,
        }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = &self.failed {
                    f.store(true, Ordering::Relaxed);
                }
                self.inflight = InflightGuard(None);
            }
            Poll::Ready(None) => self.inflight = InflightGuard(None),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
