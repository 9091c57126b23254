//! hyper's general request path: what the fast path (`fast.rs`) does not take. Routing, the
//! retry decision, accounting and the proxy's own answers are the exchange's (`exchange.rs`),
//! shared with the fast path; this module only moves requests and answers through hyper.
//!
//! Every connection starts on the fast path, which serves HTTP/1.1 requests itself and hands
//! the connection to hyper (here) at the first request it does not take (an upgrade, an
//! `Expect` other than `100-continue`, HTTP/1.0, an absolute-form target, a head that does not
//! parse). Nothing here may panic or block. Requests hyper cannot parse (differing
//! Content-Lengths, bad chunk sizes, obs-fold, oversized headers) are answered by hyper itself
//! with 400/431 before this code runs, so they never reach an upstream. Bodies are streamed both ways, never buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::backend::Lease;
use crate::exchange::{self, Answer, Conn, Error, HOP_BY_HOP, Routed, describe, stopped};
use crate::fault::Outcome;
use crate::upstream::{SendError, Sender};

pub(crate) type ReqBody = Either<Watched, Empty<Bytes>>;
type RespBody = Either<Watched, Full<Bytes>>;

// Header names as statics: a `&str` key is parsed and hashed into a name on every lookup.
static PIN_HEADER: HeaderName = HeaderName::from_static("x-cutover-version");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Serves a client connection with hyper until it closes or the proxy stops.
pub(crate) async fn serve_hyper<I>(conn: Arc<Conn>, io: I, mut stop: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = service_conn.clone();
        async move { handle(&conn, req).await }
    });
    let head_timeout = conn.ctx.client.head;
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(64 * 1024)
        // hyper closes a connection whose next head does not arrive in time (idle ones too).
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut served = std::pin::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        _ = stopped(&mut stop) => {
            // Finish the request in flight, then close instead of waiting for another.
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

/// An answer of the proxy's own as a hyper response (the fast path writes the same as bytes).
fn plain(a: Answer, close: bool) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(a.text + "\n"))));
    *r.status_mut() = a.status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(exchange::TEXT_PLAIN),
    );
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
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
        .map(str::trim)
        // `Connection: keep-alive` (most upstream answers) names a header that is hop-by-hop
        // anyway and already in `found` if present; skipping it spares building a name.
        .filter(|t| !exchange::is_hop_by_hop(t))
        // `Connection: host` must not take the request's Host away from the instance.
        .filter(|t| exchange::connection_may_name(t))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
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

/// What is wrong with a request's Host headers, if anything (RFC 9112 §3.2): HTTP/1.1 needs
/// exactly one; HTTP/1.0 may have none, never two. The fast path applies the same rule.
fn host_problem(req: &Request<Incoming>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("400 Bad Request: more than one Host header"),
        (None, _) if req.version() >= http::Version::HTTP_11 => {
            Some("400 Bad Request: an HTTP/1.1 request needs a Host header")
        }
        _ => None,
    }
}

/// A request a fault ended without an answer: hyper closes its connection.
#[derive(Debug, thiserror::Error)]
#[error("the connection was dropped by an injected fault")]
pub(crate) struct Dropped;

async fn handle(conn: &Conn, req: Request<Incoming>) -> Result<Response<RespBody>, Dropped> {
    if let Some(why) = host_problem(&req) {
        return Ok(plain(Answer::new(StatusCode::BAD_REQUEST, why), true));
    }
    serve_request(conn, req).await
}

async fn serve_request(
    conn: &Conn,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, Dropped> {
    let started = Instant::now();
    let close = conn.take_close();
    let pinned = req
        .headers()
        .get(&PIN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let routed = match exchange::route(conn, pinned.as_deref(), started) {
        Ok(r) => r,
        Err(miss) => return Ok(plain(exchange::refused(conn, &miss), close)),
    };
    let Routed {
        table,
        index,
        lease,
    } = routed;
    // `route` took the index from this table; the fallback only keeps this path panic-free.
    let Some(cv) = table.versions.get(index) else {
        return Ok(plain(
            Answer::new(StatusCode::SERVICE_UNAVAILABLE, "503"),
            close,
        ));
    };
    // Faults (off: one relaxed load). A bandwidth cap paces the answer's body (`Watched`).
    let mut pace = None;
    if let Some(inj) = exchange::faults(conn, cv, lease.backend()) {
        pace = inj.bytes_per_sec;
        if !inj.delay.is_zero() {
            tokio::time::sleep(inj.delay).await;
        }
        match inj.outcome {
            Outcome::Forward => {}
            Outcome::Error(status) => {
                drop(lease);
                return Ok(plain(
                    exchange::failed_injected(conn, cv, status, started),
                    close,
                ));
            }
            Outcome::Reset => {
                drop(lease);
                exchange::dropped(cv, inj.outcome, started);
                return Err(Dropped);
            }
            Outcome::Blackhole(until) => {
                drop(lease);
                tokio::time::sleep_until(until.into()).await;
                exchange::dropped(cv, inj.outcome, started);
                return Err(Dropped);
            }
        }
    }
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare(conn, &mut parts, upgrade);
    // A body-less request (most are) needs no watching: it cannot fail half-way.
    let exchange = (!body.is_end_stream()).then(|| Arc::new(AtomicU8::new(STREAMING)));
    let body = match &exchange {
        Some(x) => Either::Left(Watched::request(body, x.clone())),
        None => Either::Right(Empty::new()),
    };
    let upstream_req = Request::from_parts(parts, body);
    let (lease, result) = match forward(conn, upstream_req, &lease).await {
        Err((e, Some(req))) => match exchange::retry_elsewhere(conn, cv, &lease, &e) {
            // Nothing was sent, so the request goes to another instance of the same version;
            // the first no longer has it in flight.
            Some(next) => {
                drop(lease);
                let r = forward(conn, *req, &next).await;
                (next, r)
            }
            None => (lease, Err((e, None))),
        },
        other => (lease, other),
    };
    // A broken request body (bad chunking, a client that hung up) is the client's fault, not the
    // upstream's: answer 400 and count no upstream error.
    if result.is_err()
        && exchange
            .as_ref()
            .is_some_and(|x| x.load(Ordering::Relaxed) == FAILED)
    {
        let broken = Error::ClientBody("the request body broke off".into());
        return Ok(plain(
            exchange::failed(conn, cv, lease.backend(), &broken, started),
            true,
        ));
    }
    let backend = lease.backend().clone();
    conn.remember(&backend);
    match result {
        Ok((mut resp, sender)) => {
            let status = resp.status();
            exchange::answered(conn, cv, &backend, status, started);
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
                // The connection now belongs to the tunnel: it never goes back to the pool.
                let body = Watched::response(body, lease, None, exchange).paced(pace);
                return Ok(Response::from_parts(parts, Either::Left(body)));
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            if close || backend.removed.load(Ordering::Relaxed) {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let body = Watched::response(body, lease, Some(sender), exchange).paced(pace);
            Ok(Response::from_parts(parts, Either::Left(body)))
        }
        Err((e, _)) => Ok(plain(
            exchange::failed(conn, cv, &backend, &e, started),
            close,
        )),
    }
}

/// Turns the client's request head into the upstream's, in place: origin-form target,
/// hop-by-hop headers removed, `X-Forwarded-*` added. The headers are moved, never copied.
fn prepare(conn: &Conn, parts: &mut http::request::Parts, upgrade: bool) {
    // An absolute-form target (a client that treats us as a forward proxy) becomes origin-form;
    // the common origin-form target is left alone.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        if let Some(a) = parts.uri.authority().cloned()
            && !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            parts.headers.insert(header::HOST, v);
        }
        parts.uri = Uri::from(pq);
    }
    let h = &mut parts.headers;
    strip_hop_by_hop(h, upgrade);
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        None => conn.peer_ip.clone(),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.entry(X_FORWARDED_PROTO.clone())
        .or_insert(HeaderValue::from_static("http"));
    if let Some(host) = h.get(header::HOST).cloned() {
        h.entry(X_FORWARDED_HOST.clone()).or_insert(host);
    }
}

/// An exchange on hyper's path: the response head and the connection it came on, or why not,
/// with the request given back when nothing of it was sent (for a retry elsewhere).
type Sent = Result<(Response<Incoming>, Sender), (Error, Option<Box<Request<ReqBody>>>)>;

/// Sends one request to the leased instance and waits for its response head.
async fn forward(conn: &Conn, mut req: Request<ReqBody>, lease: &Lease) -> Sent {
    let b = lease.backend();
    // HTTP/1.0 clients may send no Host; the upstream gets the instance's address then.
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(b.authority.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    match tokio::time::timeout(conn.ctx.upstream_timeout, b.pool.send(req)).await {
        Err(_) => Err((Error::Timeout, None)),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(SendError::NotSent(req, why))) => Err((Error::Connect(why), Some(req))),
        Ok(Err(SendError::Failed(e))) => Err((Error::Reset(describe(&e)), None)),
    }
}

/// How far a request body got (shared by the request's and the response's watchers).
const STREAMING: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// A body passing through the proxy, watched on the way.
///
/// A client's request body records whether it was read to its end or failed, so an exchange
/// the client broke is not blamed on the upstream, and a connection is not reused while the
/// upstream may still be reading the request. An upstream's response body holds the request's
/// lease (its in-flight count) until it ends, and then gives the connection back to the pool.
pub(crate) struct Watched {
    inner: Incoming,
    /// Released when the body ends or fails, not only when the connection drops it.
    lease: Option<Lease>,
    /// The connection that carries this response, to reuse once the response has been read.
    sender: Option<Sender>,
    /// The request body's progress: `None` when the request had no body.
    exchange: Option<Arc<AtomicU8>>,
    /// A bandwidth fault's pacing of the body (`None`: no fault, no cost).
    pace: Option<Box<Pace>>,
}

/// A body under a bandwidth cap: each frame of n bytes is held n / rate seconds before it
/// passes, so the body flows at the cap.
struct Pace {
    bytes_per_sec: u64,
    held: Option<Frame<Bytes>>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Watched {
    fn request(inner: Incoming, exchange: Arc<AtomicU8>) -> Self {
        Watched {
            inner,
            lease: None,
            sender: None,
            exchange: Some(exchange),
            pace: None,
        }
    }

    fn response(
        inner: Incoming,
        lease: Lease,
        sender: Option<Sender>,
        exchange: Option<Arc<AtomicU8>>,
    ) -> Self {
        Watched {
            inner,
            lease: Some(lease),
            sender,
            exchange,
            pace: None,
        }
    }

    /// Paces the body at `bytes_per_sec` (a bandwidth fault).
    fn paced(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.pace = bytes_per_sec.map(|b| {
            Box::new(Pace {
                bytes_per_sec: b.max(1),
                held: None,
                wait: None,
            })
        });
        self
    }

    /// The response was read to its end: the connection may serve another request, provided
    /// the request body was also sent in full.
    fn finish(&mut self) {
        if let (Some(lease), Some(sender)) = (&self.lease, self.sender.take())
            && self
                .exchange
                .as_ref()
                .is_none_or(|x| x.load(Ordering::Relaxed) == DONE)
        {
            lease.backend().pool.put(sender);
        }
        self.lease = None;
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(p) = &mut self.pace
            && let Some(wait) = &mut p.wait
        {
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            p.wait = None;
            if let Some(f) = p.held.take() {
                let r = Poll::Ready(Some(Ok(f)));
                return self.passed(r);
            }
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(p) = &mut self.pace
            && let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            let secs = d.len() as f64 / p.bytes_per_sec as f64;
            let mut wait = Box::pin(tokio::time::sleep(std::time::Duration::from_secs_f64(secs)));
            if wait.as_mut().poll(cx).is_pending()
                && let Poll::Ready(Some(Ok(f))) = r
            {
                p.held = Some(f);
                p.wait = Some(wait);
                return Poll::Pending;
            }
        }
        self.passed(r)
    }

    fn is_end_stream(&self) -> bool {
        self.pace.as_ref().is_none_or(|p| p.held.is_none()) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Watched {
    /// The bookkeeping of a frame (or the end) as it passes to hyper.
    fn passed(
        mut self: Pin<&mut Self>,
        r: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // A body of known length ends with its last data frame: hyper does not poll it again
        // for the end, so that frame must count as the end (else the connection, waiting for
        // a request body that never "ends", would never be reused).
        let ended = matches!(&r, Poll::Ready(Some(Ok(_)))) && self.inner.is_end_stream();
        match &r {
            Poll::Ready(Some(Err(_))) => {
                if self.lease.is_none()
                    && let Some(x) = &self.exchange
                {
                    x.store(FAILED, Ordering::Relaxed);
                }
                self.sender = None;
                self.lease = None;
            }
            Poll::Ready(None) => self.ended(),
            _ if ended => self.ended(),
            _ => {}
        }
        r
    }
}

impl Watched {
    /// The body was read to its end.
    fn ended(&mut self) {
        if self.lease.is_none()
            && let Some(x) = &self.exchange
        {
            x.store(DONE, Ordering::Relaxed);
        }
        self.finish();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // hyper does not poll a body it knows is empty (204, 304, HEAD, `Content-Length: 0`):
        // such a response ended without a last frame, and its connection is reusable.
        if self.lease.is_some() && self.inner.is_end_stream() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "Keep-Alive, X-Secret"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("x-keep", "1"),
            ("host", "example"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host", "x-keep"]);
        // Named or not, Host stays.
        let mut h = headers(&[
            ("connection", "host, x-a"),
            ("host", "example"),
            ("x-a", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host"]);
        // Nothing hop-by-hop: untouched.
        let mut h = headers(&[("x-keep", "1")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-keep"]);
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_header_and_says_so() {
        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }
}
