//! The request path: accept, choose, forward, answer; hyper's general path, and what it shares
//! with the fast path (`fast.rs`).
//!
//! Every connection starts on the fast path, which serves HTTP/1.1 requests itself and hands
//! the connection to hyper (here) at the first request it does not take (an upgrade, an
//! `Expect` other than `100-continue`, HTTP/1.0, an absolute-form target, a head that does not
//! parse). Nothing here may panic or block. Requests hyper cannot parse (differing
//! Content-Lengths, bad chunk sizes, obs-fold, oversized headers) are answered by hyper itself
//! with 400/431 before this code runs, so they never reach an upstream. Bodies are streamed both ways, never buffered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_core::{Health, HealthChange, UpstreamErrorKind};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::{BackendState, Lease};
use crate::table::{Compiled, CompiledVersion};
use crate::upstream::{SendError, Sender};
use crate::{Proxy, ServiceState};

pub(crate) type ReqBody = Either<Watched, Empty<Bytes>>;
type RespBody = Either<Watched, Full<Bytes>>;

/// Consecutive connect failures after which real traffic ejects an instance.
const PASSIVE_EJECT_AFTER: u32 = 3;
/// Consecutive failed answers (5xx, resets, timeouts) after which real traffic ejects an
/// instance. High enough that a canary with a 20% error rate is judged by analysis, not ejected
/// (ten in a row at 20% is a one-in-ten-million run), low enough that a broken instance of a
/// healthy version stops taking traffic within a handful of requests.
const EJECT_AFTER_FAILED_ANSWERS: u32 = 10;
// Header names as statics: a `&str` key is parsed and hashed into a name on every lookup.
static PIN_HEADER: HeaderName = HeaderName::from_static("x-cutover-version");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) state: Arc<ServiceState>,
    pub(crate) proxy: Proxy,
    pub(crate) upstream_timeout: Duration,
    pub(crate) client: crate::ClientTimeouts,
    pub(crate) limit: Arc<crate::limit::Limit>,
}

/// One client connection.
pub(crate) struct Conn {
    pub(crate) ctx: Ctx,
    pub(crate) peer: SocketAddr,
    pub(crate) preview: bool,
    /// The client's address as an X-Forwarded-For value, formatted once per connection.
    pub(crate) peer_ip: Option<HeaderValue>,
    /// The instance that served this connection's last request: if it has since left the
    /// table, the next response asks the client to reconnect (`Connection: close`).
    last: Mutex<Option<Arc<BackendState>>>,
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    ctx: Ctx,
    preview: bool,
    mut stop: watch::Receiver<bool>,
    adopted: Vec<std::net::TcpStream>,
) {
    // Every connection task holds a clone of `alive`; when the last is dropped, `all_done`
    // resolves: that is how shutdown waits for requests in flight.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    // Connections a previous daemon handed over are served first, as if just accepted.
    for s in adopted {
        let taken = s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(s))
            .and_then(|s| s.peer_addr().map(|p| (s, p)));
        match taken {
            // Already open, so counted whatever the limit: new ones make room for them.
            Ok((stream, peer)) => match ctx.limit.admit(true) {
                Some(a) => spawn_conn(&ctx, preview, stream, peer, &alive, &stop, a),
                None => refuse(&ctx.limit, stream),
            },
            Err(e) => tracing::warn!(error = %e, "could not take over a client connection"),
        }
    }
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
        match ctx.limit.admit(false) {
            Some(a) => spawn_conn(&ctx, preview, stream, peer, &alive, &stop, a),
            None => refuse(&ctx.limit, stream),
        }
    }
    drop(listener);
    drop(alive);
    let _ = all_done.recv().await;
}

/// Answers a connection beyond `max_connections`, none of them idle, with a fixed 503 and
/// closes it, right in the accept loop: it costs a few system calls and no task, so a flood
/// of connections cannot make the proxy do more per connection than this.
fn refuse(limit: &crate::limit::Limit, stream: tokio::net::TcpStream) {
    use std::io::{Read, Write};
    // Plain non-blocking calls on the socket: tokio's `try_*` would say "not ready" for a
    // socket its reactor has not polled yet.
    let Ok(mut s) = stream.into_std() else {
        return;
    };
    // What the client already sent is read and dropped first: closing a socket with unread
    // bytes sends a reset, which can destroy the answer on its way.
    let mut sink = [0u8; 2048];
    for _ in 0..8 {
        match s.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = s.write(limit.refusal());
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Serves one client connection in a task of its own; its place under the limit is given
/// back when the task ends.
fn spawn_conn(
    ctx: &Ctx,
    preview: bool,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    alive: &tokio::sync::mpsc::Sender<()>,
    stop: &watch::Receiver<bool>,
    admitted: crate::limit::Admitted,
) {
    let _ = stream.set_nodelay(true);
    let conn = Arc::new(Conn {
        ctx: ctx.clone(),
        peer,
        preview,
        peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
        last: Mutex::new(None),
    });
    let (alive, stop) = (alive.clone(), stop.clone());
    tokio::spawn(async move {
        match crate::fast::serve(&conn, stream, stop.clone(), &admitted).await {
            crate::fast::Served::Done => {}
            crate::fast::Served::Hyper(rest) => serve_hyper(conn, rest, stop).await,
            crate::fast::Served::Parked(s) => conn.ctx.proxy.park(&conn.ctx.state.name, preview, s),
        }
        drop(admitted);
        drop(alive);
    });
}

/// Serves a client connection with hyper until it closes or the proxy stops.
async fn serve_hyper<I>(conn: Arc<Conn>, io: I, mut stop: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let conn = service_conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross the proxy. A `static`, not a `const`:
/// a const array of header names is built and dropped again at every use.
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
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
        .map(str::trim)
        // `Connection: keep-alive` (most upstream answers) names a header that is hop-by-hop
        // anyway and already in `found` if present; skipping it spares building a name.
        .filter(|t| {
            !HOP_BY_HOP
                .iter()
                .any(|n| n.as_str().eq_ignore_ascii_case(t))
        })
        // `Connection: host` must not take the request's Host away from the instance.
        .filter(|t| !t.eq_ignore_ascii_case("host"))
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

impl Conn {
    pub(crate) fn take_close(&self) -> bool {
        self.last
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|b| b.removed.load(Ordering::Relaxed)))
            .unwrap_or(false)
    }

    pub(crate) fn remember(&self, b: &Arc<BackendState>) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(b.clone());
        }
    }
}

/// Why no instance could be chosen for a request.
enum Miss {
    NoPreview,
    NotRunning,
    NoHealthy,
    /// The chosen version (by index) has no routable instance, and nothing could stand in.
    NoInstanceOf(usize),
}

/// The version and instance for a request: the preview version on the preview listener, the
/// pinned version when the request names one, else the next in the weighted schedule (falling
/// back to another version if the scheduled one just lost its last instance).
fn choose(t: &Compiled, pinned: Option<&str>, preview: bool) -> Result<(usize, Lease), Miss> {
    let i = if preview {
        t.preview.ok_or(Miss::NoPreview)?
    } else if let Some(p) = pinned {
        t.index(p).ok_or(Miss::NotRunning)?
    } else {
        t.next_index().ok_or(Miss::NoHealthy)?
    };
    let cv = t.versions.get(i).ok_or(Miss::NoHealthy)?;
    if let Some(lease) = cv.pick(None) {
        return Ok((i, lease));
    }
    if preview || pinned.is_some() {
        return Err(Miss::NoInstanceOf(i));
    }
    t.fallback(i).ok_or(Miss::NoInstanceOf(i))
}

/// A request's place: the table it was routed by, its version's index there, and its instance.
pub(crate) struct Routed {
    pub(crate) table: Arc<Compiled>,
    pub(crate) index: usize,
    pub(crate) lease: Lease,
}

/// Routes a request (see [`choose`]), or says in words why it gets a 503.
pub(crate) fn route(conn: &Conn, pinned: Option<&str>, started: Instant) -> Result<Routed, String> {
    let state = &conn.ctx.state;
    let mut table = state.table.load_full();
    let mut chosen = choose(&table, pinned, conn.preview);
    if chosen.is_err() {
        // A newer table may have been stored since ours was loaded (an instance left and its
        // replacement arrived): the answer must come from the newest one.
        let newest = state.table.load_full();
        if !Arc::ptr_eq(&newest, &table) {
            table = newest;
            chosen = choose(&table, pinned, conn.preview);
        }
    }
    let why = match chosen {
        Ok((index, lease)) => {
            return Ok(Routed {
                table,
                index,
                lease,
            });
        }
        Err(Miss::NoPreview) => "no version is in preview".to_owned(),
        Err(Miss::NotRunning) => format!("version {:?} is not running", pinned.unwrap_or("")),
        Err(Miss::NoInstanceOf(i)) => match table.versions.get(i) {
            Some(cv) => {
                cv.recorder.record(503, started.elapsed(), None);
                format!("no healthy instance of {}", cv.version)
            }
            None => "no healthy instance".to_owned(),
        },
        Err(Miss::NoHealthy) => "no healthy instance".to_owned(),
    };
    Err(format!("503 Service Unavailable: {}: {why}", state.name))
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

async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<RespBody> {
    if let Some(why) = host_problem(&req) {
        return plain(StatusCode::BAD_REQUEST, why.to_owned(), true);
    }
    let started = Instant::now();
    let close = conn.take_close();
    let pinned = req
        .headers()
        .get(&PIN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let routed = match route(conn, pinned.as_deref(), started) {
        Ok(r) => r,
        Err(msg) => return plain(StatusCode::SERVICE_UNAVAILABLE, msg, close),
    };
    let Routed {
        table,
        index,
        lease,
    } = routed;
    // `choose` took the index from this table; the fallback only keeps this path panic-free.
    let Some(cv) = table.versions.get(index) else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "503".into(), close);
    };
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
        // Nothing was sent, so the request can go to another instance of the same version.
        Err(Failure::NotSent(req, why)) => {
            passive_failure(conn, lease.backend(), &why);
            match cv.pick(Some(lease.backend())) {
                Some(other) => {
                    // The first instance no longer has this request in flight.
                    drop(lease);
                    let r = forward(conn, *req, &other).await;
                    (other, r)
                }
                None => (lease, Err(Failure::NotSent(req, why))),
            }
        }
        other => (lease, other),
    };
    // A broken request body (bad chunking, a client that hung up) is the client's fault, not the
    // upstream's: answer 400 and count no upstream error.
    if result.is_err()
        && exchange
            .as_ref()
            .is_some_and(|x| x.load(Ordering::Relaxed) == FAILED)
    {
        cv.recorder.record(400, started.elapsed(), None);
        return plain(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: the request body is malformed".into(),
            true,
        );
    }
    let backend = lease.backend().clone();
    conn.remember(&backend);
    match result {
        Ok((mut resp, sender)) => {
            let status = resp.status();
            answered(conn, cv, &backend, status, started);
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
                let body = Watched::response(body, lease, None, exchange);
                return Response::from_parts(parts, Either::Left(body));
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            if close || backend.removed.load(Ordering::Relaxed) {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let body = Watched::response(body, lease, Some(sender), exchange);
            Response::from_parts(parts, Either::Left(body))
        }
        Err(f) => {
            let failed = match &f {
                Failure::NotSent(_, why) => Failed::NotSent(why),
                Failure::Timeout => Failed::Timeout,
                Failure::Reset(why) => Failed::Reset(why),
            };
            let (status, msg) = failure(conn, cv, &backend, failed, started);
            plain(status, msg, close)
        }
    }
}

enum Failure {
    /// Nothing was sent (no connection could be made): the request is back, to retry.
    NotSent(Box<Request<ReqBody>>, String),
    Timeout,
    Reset(String),
}

/// Why an exchange with an instance brought no answer (both paths).
pub(crate) enum Failed<'a> {
    /// No connection could be made (after the retry on another instance, if there was one).
    NotSent(&'a str),
    /// No response head within the upstream timeout.
    Timeout,
    /// The connection broke before a response head came, or the head was not HTTP.
    Reset(&'a str),
}

/// Accounts for an answer from an instance: the version's metrics and the instance's counts of
/// failures in a row (a 5xx adds to them, anything else resets them).
pub(crate) fn answered(
    conn: &Conn,
    cv: &CompiledVersion,
    b: &BackendState,
    status: StatusCode,
    started: Instant,
) {
    b.connect_failures.store(0, Ordering::Relaxed);
    cv.recorder.record(status.as_u16(), started.elapsed(), None);
    if status.is_server_error() {
        failed_answer(conn, cv, b, &format!("answered {status}"));
    } else {
        b.failed_answers.store(0, Ordering::Relaxed);
    }
}

/// Accounts for a failed exchange and gives the status and text the client gets for it.
pub(crate) fn failure(
    conn: &Conn,
    cv: &CompiledVersion,
    b: &BackendState,
    failed: Failed<'_>,
    started: Instant,
) -> (StatusCode, String) {
    let name = &conn.ctx.state.name;
    let elapsed = started.elapsed();
    match failed {
        Failed::NotSent(why) => {
            cv.recorder
                .record(502, elapsed, Some(UpstreamErrorKind::Connect));
            (
                StatusCode::BAD_GATEWAY,
                format!(
                    "502 Bad Gateway: {name}: cannot connect to {} ({}): {why}",
                    b.id, b.addr
                ),
            )
        }
        Failed::Timeout => {
            cv.recorder
                .record(504, elapsed, Some(UpstreamErrorKind::Timeout));
            failed_answer(conn, cv, b, "timed out");
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "504 Gateway Timeout: {name}: {} did not answer within {}ms",
                    b.id,
                    conn.ctx.upstream_timeout.as_millis()
                ),
            )
        }
        Failed::Reset(why) => {
            cv.recorder
                .record(502, elapsed, Some(UpstreamErrorKind::Reset));
            failed_answer(conn, cv, b, why);
            (
                StatusCode::BAD_GATEWAY,
                format!("502 Bad Gateway: {name}: {} broke off: {why}", b.id),
            )
        }
    }
}

/// Counts a connect failure by real traffic; after a few in a row the instance is ejected until
/// the active probe admits it again.
pub(crate) fn passive_failure(conn: &Conn, b: &BackendState, why: &str) {
    let n = b.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= PASSIVE_EJECT_AFTER {
        eject(
            conn,
            b,
            format!("ejected after {n} consecutive connection failures: {why}"),
        );
    }
}

/// Counts a failed answer by real traffic; after a burst of them the instance is ejected until
/// the active probe admits it again, unless it is the last routable instance of its version.
/// That one keeps its traffic: a 503 from the proxy would serve nobody better than the
/// instance's own answers, and for a canary those answers are the judge's evidence.
fn failed_answer(conn: &Conn, cv: &CompiledVersion, b: &BackendState, why: &str) {
    let n = b.failed_answers.fetch_add(1, Ordering::Relaxed) + 1;
    if n < EJECT_AFTER_FAILED_ANSWERS {
        return;
    }
    let others = cv
        .backends
        .iter()
        .any(|o| !std::ptr::eq(o.as_ref(), b) && o.routable());
    if others {
        eject(
            conn,
            b,
            format!("ejected after {n} consecutive failed answers (the last {why})"),
        );
    }
}

/// Takes a healthy instance out of traffic and reports why.
fn eject(conn: &Conn, b: &BackendState, reason: String) {
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
            reason,
        });
        conn.ctx.proxy.recompile(&conn.ctx.state);
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

/// Sends one request to the leased instance and waits for its response head.
async fn forward(
    conn: &Conn,
    mut req: Request<ReqBody>,
    lease: &Lease,
) -> Result<(Response<Incoming>, Sender), Failure> {
    let b = lease.backend();
    // HTTP/1.0 clients may send no Host; the upstream gets the instance's address then.
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(b.authority.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    match tokio::time::timeout(conn.ctx.upstream_timeout, b.pool.send(req)).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(SendError::NotSent(req, why))) => Err(Failure::NotSent(req, why)),
        Ok(Err(SendError::Failed(e))) => Err(Failure::Reset(describe(&e))),
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
}

impl Watched {
    fn request(inner: Incoming, exchange: Arc<AtomicU8>) -> Self {
        Watched {
            inner,
            lease: None,
            sender: None,
            exchange: Some(exchange),
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
        }
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
        let r = Pin::new(&mut self.inner).poll_frame(cx);
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

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
