//! One exchange of a request with an instance, as both request paths see it: route the
//! request, lease an instance, decide whether a failure may be retried elsewhere, account for
//! the outcome, and say what the client is answered.
//!
//! The fast path (`fast.rs`) and hyper's path (`forward.rs`) move bytes differently, but every
//! decision about a request is taken here, once, so that a rule (a retry, a passive ejection, a
//! fault) is written one time and both paths obey it. Neither path imports the other; the
//! accept loop (`accept.rs`) is the one place that knows both.
//!
//! Failures are typed ([`Error`]): each says which side failed (the client, the upstream or
//! the proxy itself), what the client gets for it, how it counts in the metrics, and whether
//! sending the request again is safe. That is pingora's model (an error source and a retry
//! type per error) cut to what this proxy needs: a request is retried on another instance only
//! when nothing of it left the proxy, and a request is retried on another connection of the
//! same instance only when that connection was a reused one that turned out closed and the
//! request was not sent or is idempotent ([`Retry::ReusedOnly`]).
//!
//! Nothing here may block or panic: it runs on every request.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_core::{Health, HealthChange, UpstreamErrorKind};
use http::StatusCode;
use http::header::{self, HeaderName, HeaderValue};
use tokio::sync::watch;

use crate::ServiceState;
use crate::backend::{BackendState, Lease};
use crate::fault::{Injection, Outcome};
use crate::table::{Compiled, CompiledVersion};

/// Consecutive connect failures after which real traffic ejects an instance.
const PASSIVE_EJECT_AFTER: u32 = 3;
/// Consecutive failed answers (5xx, resets, timeouts) after which real traffic ejects an
/// instance. High enough that a canary with a 20% error rate is judged by analysis, not ejected
/// (ten in a row at 20% is a one-in-ten-million run), low enough that a broken instance of a
/// healthy version stops taking traffic within a handful of requests.
const EJECT_AFTER_FAILED_ANSWERS: u32 = 10;

/// What every connection of one listener shares.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) state: Arc<ServiceState>,
    pub(crate) proxy: crate::Proxy,
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
    pub(crate) last: Mutex<Option<Arc<BackendState>>>,
}

impl Conn {
    pub(crate) fn new(ctx: Ctx, peer: SocketAddr, preview: bool) -> Conn {
        Conn {
            ctx,
            peer,
            preview,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            last: Mutex::new(None),
        }
    }

    /// Whether the instance that served this connection's last request has left the table:
    /// then this answer asks the client to reconnect.
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

/// Resolves once the stop signal is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The innermost cause of an error, in words.
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross the proxy, on either path. A
/// `static`, not a `const`: a const array of header names is built and dropped again at every
/// use.
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

/// Whether `name` is hop-by-hop by itself (case-insensitive).
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|n| n.as_str().eq_ignore_ascii_case(name))
}

/// Whether a Connection token may remove the header it names. `Host` never goes: the
/// instance would get an HTTP/1.1 request without one (found by fuzzing).
pub(crate) fn connection_may_name(token: &str) -> bool {
    !token.eq_ignore_ascii_case("host")
}

/// Which side of an exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The proxy, on purpose: a fault was injected.
    Proxy,
    /// The client: its body broke its framing, ended early or stopped coming.
    Client,
    /// The instance: no connection, no answer in time, or a broken answer.
    Upstream,
}

/// Whether a failed request may be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Never: something of it reached an instance, or the failure was not an instance's.
    No,
    /// Nothing of it left the proxy: another instance may take it.
    Elsewhere,
    /// Only when the connection it went out on was a reused keep-alive one that turned out
    /// closed, and the request never left or is idempotent: then the same instance may take
    /// it on a fresh connection. The fast path decides it with what it knows of the
    /// connection ([`Retry::decide_reuse`]).
    ReusedOnly,
}

impl Retry {
    /// Settles [`Retry::ReusedOnly`] with what the fast path knows of the connection.
    pub(crate) fn decide_reuse(self, reused: bool, unsent: bool, idempotent: bool) -> bool {
        match self {
            Retry::ReusedOnly => reused && (unsent || idempotent),
            Retry::Elsewhere => true,
            Retry::No => false,
        }
    }
}

/// Why no instance could be chosen for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    NoPreview,
    NotRunning(String),
    NoHealthy,
    /// The chosen version has no routable instance, and nothing could stand in.
    NoInstanceOf(String),
}

/// Why an exchange with an instance brought no answer from it. (A request that finds no
/// instance at all is a [`Miss`]: the proxy's own failure, answered 503.)
#[derive(Debug)]
pub(crate) enum Error {
    /// No connection could be made (after the retry on another instance, if there was one).
    Connect(String),
    /// No response head within the upstream timeout.
    Timeout,
    /// The connection broke before a response head came, or the head was not HTTP.
    Reset(String),
    /// The client's body broke its framing or ended early.
    ClientBody(String),
    /// The client sent no more of its body for longer than allowed.
    ClientStalled,
    /// A fault answered in the instance's place, with this status.
    Injected(u16),
}

impl Error {
    pub(crate) fn side(&self) -> Side {
        match self {
            Error::Connect(_) | Error::Timeout | Error::Reset(_) => Side::Upstream,
            Error::ClientBody(_) | Error::ClientStalled => Side::Client,
            Error::Injected(_) => Side::Proxy,
        }
    }

    pub(crate) fn retry(&self) -> Retry {
        match self {
            Error::Connect(_) => Retry::Elsewhere,
            Error::Reset(_) => Retry::ReusedOnly,
            _ => Retry::No,
        }
    }

    /// The status the client is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Error::Connect(_) | Error::Reset(_) => StatusCode::BAD_GATEWAY,
            Error::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Error::ClientBody(_) => StatusCode::BAD_REQUEST,
            Error::ClientStalled => StatusCode::REQUEST_TIMEOUT,
            Error::Injected(s) => StatusCode::from_u16(*s).unwrap_or(StatusCode::BAD_GATEWAY),
        }
    }

    /// How the metrics count it against the upstream, if they do.
    fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            Error::Connect(_) => Some(UpstreamErrorKind::Connect),
            Error::Timeout => Some(UpstreamErrorKind::Timeout),
            Error::Reset(_) => Some(UpstreamErrorKind::Reset),
            _ => None,
        }
    }
}

/// The answer to a request whose body breaks its own framing (or ends early).
pub(crate) const MALFORMED: &str = "400 Bad Request: the request body is malformed";

/// An answer of the proxy's own: a status and a line of text saying why. Each path renders it
/// its way (bytes, or a hyper response) with the same headers.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) text: String,
}

impl Answer {
    pub(crate) fn new(status: StatusCode, text: impl Into<String>) -> Answer {
        Answer {
            status,
            text: text.into(),
        }
    }

    /// The answer as HTTP/1.1 bytes in `out` (replacing what was there).
    pub(crate) fn write(&self, out: &mut Vec<u8>, close: bool) {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: ");
        out.extend_from_slice(TEXT_PLAIN.as_bytes());
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice((self.text.len() + 1).to_string().as_bytes());
        if close {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(self.text.as_bytes());
        out.push(b'\n');
    }
}

/// The content type of the proxy's own answers.
pub(crate) const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// The version and instance for a request: the preview version on the preview listener, the
/// pinned version when the request names one, else the next in the weighted schedule (falling
/// back to another version if the scheduled one just lost its last instance).
fn choose(t: &Compiled, pinned: Option<&str>, preview: bool) -> Result<(usize, Lease), Miss> {
    let i = if preview {
        t.preview.ok_or(Miss::NoPreview)?
    } else if let Some(p) = pinned {
        t.index(p).ok_or_else(|| Miss::NotRunning(p.to_owned()))?
    } else {
        t.next_index().ok_or(Miss::NoHealthy)?
    };
    let cv = t.versions.get(i).ok_or(Miss::NoHealthy)?;
    if let Some(lease) = cv.pick(None) {
        return Ok((i, lease));
    }
    let none = || Miss::NoInstanceOf(cv.version.to_string());
    if preview || pinned.is_some() {
        return Err(none());
    }
    t.fallback(i).ok_or_else(none)
}

/// A request's place: the table it was routed by, its version's index there, and its instance.
pub(crate) struct Routed {
    pub(crate) table: Arc<Compiled>,
    pub(crate) index: usize,
    pub(crate) lease: Lease,
}

/// Routes a request (see [`choose`]), or says why it gets a 503.
pub(crate) fn route(conn: &Conn, pinned: Option<&str>, started: Instant) -> Result<Routed, Miss> {
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
    match chosen {
        Ok((index, lease)) => Ok(Routed {
            table,
            index,
            lease,
        }),
        Err(miss) => {
            // A version that lost its last instance answers 503 in its own name, and the
            // judge sees it.
            if let Miss::NoInstanceOf(v) = &miss
                && let Some(cv) = table.versions.iter().find(|cv| cv.version.as_str() == v)
            {
                cv.recorder.record(503, started.elapsed(), None);
            }
            Err(miss)
        }
    }
}

/// Nothing of the request left the proxy: the instance's connect failure counts toward its
/// passive ejection, and another routable instance of the same version takes the request if
/// there is one. The caller sends it there with the new lease (and drops the old one).
pub(crate) fn retry_elsewhere(
    conn: &Conn,
    cv: &CompiledVersion,
    lease: &Lease,
    err: &Error,
) -> Option<Lease> {
    if err.retry() != Retry::Elsewhere {
        return None;
    }
    if let Error::Connect(why) = err {
        passive_failure(conn, lease.backend(), why);
    }
    cv.pick(Some(lease.backend()))
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

/// The text the client gets for a request that could not be routed.
pub(crate) fn refused(conn: &Conn, miss: &Miss) -> Answer {
    let why = match miss {
        Miss::NoPreview => "no version is in preview".to_owned(),
        Miss::NotRunning(v) => format!("version {v:?} is not running"),
        Miss::NoInstanceOf(v) => format!("no healthy instance of {v}"),
        Miss::NoHealthy => "no healthy instance".to_owned(),
    };
    Answer::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("503 Service Unavailable: {}: {why}", conn.ctx.state.name),
    )
}

/// Accounts for a failed exchange with instance `b` of `cv` and gives the client's answer. An
/// upstream's failure counts against it (metrics with its kind, its failures in a row); a
/// client's counts as the client's status and blames no instance.
pub(crate) fn failed(
    conn: &Conn,
    cv: &CompiledVersion,
    b: &BackendState,
    err: &Error,
    started: Instant,
) -> Answer {
    if let Error::Injected(status) = err {
        return failed_injected(conn, cv, *status, started);
    }
    let name = &conn.ctx.state.name;
    let status = err.status();
    let elapsed = started.elapsed();
    cv.recorder
        .record(status.as_u16(), elapsed, err.upstream_kind());
    let text = match err {
        Error::Connect(why) => format!(
            "502 Bad Gateway: {name}: cannot connect to {} ({}): {why}",
            b.id, b.addr
        ),
        Error::Timeout => {
            failed_answer(conn, cv, b, "timed out");
            format!(
                "504 Gateway Timeout: {name}: {} did not answer within {}ms",
                b.id,
                conn.ctx.upstream_timeout.as_millis()
            )
        }
        Error::Reset(why) => {
            failed_answer(conn, cv, b, why);
            format!("502 Bad Gateway: {name}: {} broke off: {why}", b.id)
        }
        Error::ClientBody(why) => {
            // The client's fault, not the upstream's: no upstream error is counted.
            tracing::debug!(why, "request body broke off");
            MALFORMED.to_owned()
        }
        Error::ClientStalled => "408 Request Timeout: the request body stopped arriving".to_owned(),
        Error::Injected(_) => String::new(),
    };
    Answer::new(status, text)
}

/// The faults that apply to a request for instance `b` of `cv`, if any: one relaxed load when
/// none is set for the service.
#[inline]
pub(crate) fn faults(conn: &Conn, cv: &CompiledVersion, b: &BackendState) -> Option<Injection> {
    let slot = &conn.ctx.state.faults;
    if !slot.any() {
        return None;
    }
    slot.injection(Some(&cv.version), Some(&b.id))
}

/// Accounts for an error answer a fault gave in the instance's place, and gives it. It counts
/// as the version's answer (the judge must see it), never against the instance's health: the
/// instance did nothing wrong.
pub(crate) fn failed_injected(
    conn: &Conn,
    cv: &CompiledVersion,
    status: u16,
    started: Instant,
) -> Answer {
    let e = Error::Injected(status);
    let status = e.status();
    cv.recorder.record(status.as_u16(), started.elapsed(), None);
    let text = format!(
        "{} {}: {}: injected fault (see `cutover fault list`)",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        conn.ctx.state.name
    );
    Answer::new(status, text)
}

/// Accounts for a request a fault ended without an answer (its connection reset, or
/// blackholed and closed): the version's metrics count it as the upstream failure it imitates.
pub(crate) fn dropped(cv: &CompiledVersion, outcome: Outcome, started: Instant) {
    let (status, kind) = match outcome {
        Outcome::Reset => (502, UpstreamErrorKind::Reset),
        Outcome::Blackhole(_) => (504, UpstreamErrorKind::Timeout),
        Outcome::Forward | Outcome::Error(_) => return,
    };
    cv.recorder.record(status, started.elapsed(), Some(kind));
}

/// Counts a connect failure by real traffic; after a few in a row the instance is ejected until
/// the active probe admits it again.
fn passive_failure(conn: &Conn, b: &BackendState, why: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure says who failed, what the client gets and whether a retry is safe: one
    /// table row each.
    #[test]
    fn errors_name_their_side_status_and_retry() {
        let rows: [(Error, Side, u16, Retry); 6] = [
            (Error::Injected(503), Side::Proxy, 503, Retry::No),
            (
                Error::Connect("refused".into()),
                Side::Upstream,
                502,
                Retry::Elsewhere,
            ),
            (Error::Timeout, Side::Upstream, 504, Retry::No),
            (
                Error::Reset("eof".into()),
                Side::Upstream,
                502,
                Retry::ReusedOnly,
            ),
            (
                Error::ClientBody("bad chunk".into()),
                Side::Client,
                400,
                Retry::No,
            ),
            (Error::ClientStalled, Side::Client, 408, Retry::No),
        ];
        for (e, side, status, retry) in rows {
            assert_eq!(e.side(), side, "{e:?}");
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.retry(), retry, "{e:?}");
            // Only an upstream's failure is counted against an upstream.
            assert_eq!(e.upstream_kind().is_some(), side == Side::Upstream, "{e:?}");
            assert_eq!(
                e.retry() != Retry::No,
                matches!(e, Error::Connect(_) | Error::Reset(_))
            );
        }
    }

    /// A reset is retried on a fresh connection only when the one it went out on was reused,
    /// and then only when nothing was sent or sending twice is harmless.
    #[test]
    fn a_reset_is_retried_only_on_a_reused_connection() {
        let r = Retry::ReusedOnly;
        // (reused, unsent, idempotent) → retry
        for (reused, unsent, idempotent, want) in [
            (false, true, true, false),
            (true, true, false, true),
            (true, false, true, true),
            (true, false, false, false),
        ] {
            assert_eq!(r.decide_reuse(reused, unsent, idempotent), want);
        }
        assert!(Retry::Elsewhere.decide_reuse(false, false, false));
        assert!(!Retry::No.decide_reuse(true, true, true));
    }

    #[test]
    fn the_proxys_answers_are_plain_text_with_their_length() {
        let mut out = Vec::new();
        Answer::new(StatusCode::SERVICE_UNAVAILABLE, "503 x").write(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 6\r\nconnection: close\r\n\r\n503 x\n"
        );
    }

    #[test]
    fn hop_by_hop_names_are_known_in_any_case() {
        assert!(is_hop_by_hop("Keep-Alive") && is_hop_by_hop("transfer-encoding"));
        assert!(!is_hop_by_hop("x-keep"));
        assert!(!connection_may_name("HOST") && connection_may_name("x-secret"));
    }
}
