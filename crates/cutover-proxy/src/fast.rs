//! The fast path: HTTP/1.1 requests proxied without hyper, in the client connection's own task.
//!
//! hyper's general machinery (a header map built and encoded back on both sides, a task per
//! upstream connection and a channel between the two) was most of the proxy's user-space CPU.
//! Here the request head is parsed once (httparse), routed, and written to a plain keep-alive
//! connection of the chosen instance as the bytes the client sent, minus hop-by-hop headers,
//! plus `X-Forwarded-*`, with the body bytes that came with it. The rest of the body and the
//! answer are relayed as they arrive, delimited by Content-Length, by chunked framing (passed
//! on verbatim, followed by [`Chunk`]) or, for an answer, by the upstream closing. Routing,
//! the retry decision, accounting, error texts and draining are the exchange's
//! (`exchange.rs`), shared with hyper's path.
//!
//! It takes only what it fully understands: HTTP/1.1, an origin-form target, one Host, a body
//! delimited by one Content-Length or by chunked, no Upgrade, no Expect other than
//! `100-continue` (which it answers itself once the request is routed). At the first request
//! it does not take, the connection goes to hyper's path for good, with the bytes already read
//! ([`Prefixed`]); hyper also answers every head that does not parse. Two kinds of request it
//! answers itself with 400: Content-Length together with Transfer-Encoding (in either order),
//! the smuggling attempt RFC 9112 §6.3 allows a server to reject (hyper would resolve it in
//! favour of chunked instead), and an HTTP/1.1 request without a Host or with several (RFC
//! 9112 §3.2; hyper's path refuses them too, in `forward.rs`).
//!
//! It must never forward bytes it cannot frame: an upstream answer whose framing breaks ends
//! the client connection, and an upstream connection is reused only after a response that
//! ended exactly where its framing said.

use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::exchange::{self, Conn, Error, MALFORMED, Routed};
use crate::fault::Outcome;

#[doc(hidden)]
pub mod fuzzing;
use crate::limit::Admitted;
use crate::upstream::Pool;

/// Header lines parsed per head, as many as hyper allows on its path.
const MAX_HEADERS: usize = 100;
/// The longest head read before giving up on it (hyper's limit on its path is the same).
const MAX_HEAD: usize = 64 * 1024;
/// Room made before a read of bodies and answers. A read shorter than its buffer tells tokio
/// the socket is drained, which spares a system call that would only say "nothing more".
const BUF: usize = 16 * 1024;
/// Room made before reading a request head: most fit many times over. Kept small because every
/// open client connection, idle ones included, holds this buffer.
const HEAD_BUF: usize = 4 * 1024;

/// How a client connection left the fast path.
pub(crate) enum Served {
    /// Closed by either side, or the proxy stopped.
    Done,
    /// A request this path does not take: the connection, with what was read of it, goes to
    /// hyper's path.
    Hyper(Prefixed),
    /// The proxy is handing its connections to a new daemon: this one is between requests,
    /// with nothing of a next request read, so it can be served on by the new process.
    Parked(TcpStream),
}

/// Serves a client connection here until a request this path does not take, the connection
/// ends, or the proxy stops (closing it) or hands over (parking it at its next idle moment).
pub(crate) async fn serve(
    conn: &Conn,
    client: TcpStream,
    mut stop: watch::Receiver<bool>,
    admitted: &Admitted,
) -> Served {
    // `idle`: waiting for the first byte of a request, so stopping may close at once.
    // `closing`: the proxy stops; finish the request under way and close.
    // `parking`: the proxy hands over; finish the request under way and park.
    let (idle, closing, parking) = (
        AtomicBool::new(true),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    let mut run = std::pin::pin!(run(conn, client, &idle, &closing, (&parking, admitted)));
    tokio::select! {
        r = run.as_mut() => r,
        _ = exchange::stopped(&mut stop) => {
            if conn.ctx.proxy.handing_over() {
                parking.store(true, Ordering::Relaxed);
                admitted.slot.wake.notify_one();
                return run.await;
            }
            if idle.load(Ordering::Relaxed) {
                return Served::Done;
            }
            closing.store(true, Ordering::Relaxed);
            run.await
        }
    }
}

/// Buffers of one client connection, reused by all its requests.
struct Bufs {
    /// Bytes read from the client and not yet served.
    input: BytesMut,
    /// Bytes read from the upstream.
    upstream: BytesMut,
    /// The head (and first body bytes) being written.
    out: Vec<u8>,
    lines: Vec<Line>,
}

/// `admitted.slot.wake` wakes the connection while it waits idle: to park when `parking` is
/// set, else to close (the service is at `max_connections` and this one was idle longest).
async fn run(
    conn: &Conn,
    mut client: TcpStream,
    idle: &AtomicBool,
    closing: &AtomicBool,
    (parking, admitted): (&AtomicBool, &Admitted),
) -> Served {
    let mut b = Bufs {
        input: BytesMut::with_capacity(HEAD_BUF),
        // Allocated by the first exchange, not by every connection that opens.
        upstream: BytesMut::new(),
        out: Vec::with_capacity(1024),
        lines: Vec::with_capacity(16),
    };
    let limits = conn.ctx.client;
    // One timer for the connection's life, moved later as it goes: pushing a deadline later
    // is an atomic store in tokio, where a new timer per request would lock the timer wheel.
    let mut deadline = std::pin::pin!(tokio::time::sleep(limits.idle));
    loop {
        // Only a wait for a head that is not here whole arms the timer: the idle limit while
        // nothing came, the head's own limit from its first byte.
        let mut armed = None;
        let head = loop {
            if !b.input.is_empty() {
                match parse_request(&b.input, &mut b.lines) {
                    Parsed::Take(head) => break head,
                    Parsed::Partial if b.input.len() < MAX_HEAD => {
                        if armed != Some(Wait::Head) {
                            armed = Some(Wait::Head);
                            let at = tokio::time::Instant::now() + limits.head;
                            deadline.as_mut().reset(at);
                        }
                    }
                    Parsed::Partial | Parsed::Hyper => {
                        if closing.load(Ordering::Relaxed) {
                            return Served::Done;
                        }
                        return Served::Hyper(Prefixed {
                            pre: b.input,
                            io: client,
                        });
                    }
                    Parsed::Reject(why) => {
                        answer(&mut client, &mut b.out, StatusCode::BAD_REQUEST, why, true).await;
                        let _ = client.shutdown().await;
                        return Served::Done;
                    }
                }
            } else if closing.load(Ordering::Relaxed) {
                return Served::Done;
            } else if parking.load(Ordering::Relaxed) {
                return Served::Parked(client);
            }
            let was_idle = b.input.is_empty();
            if was_idle && armed.is_none() {
                armed = Some(Wait::Idle);
                let now = tokio::time::Instant::now();
                deadline.as_mut().reset(now + limits.idle);
                admitted.idle(now);
            }
            idle.store(was_idle, Ordering::Relaxed);
            b.input.reserve(HEAD_BUF);
            tokio::select! {
                // The read first: when it is ready, the timer is not even looked at.
                biased;
                r = client.read_buf(&mut b.input) => match r {
                    Ok(0) | Err(_) => return Served::Done,
                    Ok(_) => {
                        if was_idle {
                            admitted.busy();
                        }
                        idle.store(false, Ordering::Relaxed);
                    }
                },
                // Nothing of a next request has been read: whatever the client sends now
                // waits in the socket for the process that takes the connection over. Or,
                // not handing over, this idle connection makes room for a new one.
                _ = admitted.slot.wake.notified(), if was_idle => {
                    if parking.load(Ordering::Relaxed) {
                        return Served::Parked(client);
                    }
                    return Served::Done;
                }
                _ = &mut deadline => {
                    // An idle keep-alive connection just closes; a head that does not come
                    // whole in time (a slow or stalled client) is told why.
                    if !was_idle {
                        let msg = "408 Request Timeout: the request head did not arrive in time";
                        answer(&mut client, &mut b.out, StatusCode::REQUEST_TIMEOUT, msg, true)
                            .await;
                        let _ = client.shutdown().await;
                    }
                    return Served::Done;
                }
            }
        };
        // `proxy` consumes the request (head and body) from `b.input`.
        let keep = proxy(conn, &head, &mut b, &mut client, closing).await;
        if !keep {
            let _ = client.shutdown().await;
            return Served::Done;
        }
    }
}

/// What a client connection's timer is counting.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Idle,
    Head,
}

/// A header line of a parsed head, as ranges of the buffer it was parsed from.
#[derive(Clone, Debug)]
struct Line {
    name: Range<usize>,
    value: Range<usize>,
}

/// A request head the fast path takes, as ranges of the client buffer.
#[derive(Debug)]
struct Head {
    len: usize,
    method: Range<usize>,
    target: Range<usize>,
    /// Safe to send again if a reused connection turns out closed (RFC 9110 §9.2.2).
    idempotent: bool,
    is_head: bool,
    /// The client asked to close after this request.
    close: bool,
    /// How the request's body is delimited (`Empty`, `Length` or `Chunked`).
    body: Framing,
    /// `Expect: 100-continue`: the client waits for a go-ahead before it sends its body.
    expect_continue: bool,
    host: Range<usize>,
    pin: Option<Range<usize>>,
    /// The first `X-Forwarded-For` value the client sent (replaced, with our peer appended).
    forwarded_for: Option<Range<usize>>,
    forwarded_proto: bool,
    forwarded_host: bool,
    // The lines to pass on are in `Bufs::lines`.
}

#[derive(Debug)]
enum Parsed {
    Partial,
    Take(Head),
    /// Not for this path (an upgrade, HTTP/1.0, a head that does not parse...).
    Hyper,
    /// A request that must not reach any upstream; answered 400 with this reason.
    Reject(&'static str),
}

fn is(name: &str, known: &str) -> bool {
    name.eq_ignore_ascii_case(known)
}

fn slice(buf: &[u8], r: Range<usize>) -> &[u8] {
    buf.get(r).unwrap_or_default()
}

/// Where `part` (a sub-slice of `buf`) lies in `buf`.
fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    start..start + part.len()
}

/// The tokens of the Connection header lines (lower-case comparisons are done by the caller).
/// More than a handful is unusual enough to leave to hyper: `None`.
fn connection_tokens<'a>(headers: &[httparse::Header<'a>]) -> Option<Vec<&'a [u8]>> {
    let mut tokens = Vec::new();
    for h in headers.iter().filter(|h| is(h.name, "connection")) {
        for t in h.value.split(|&c| c == b',') {
            let t = t.trim_ascii();
            if !t.is_empty() {
                tokens.push(t);
            }
        }
    }
    (tokens.len() <= 8).then_some(tokens)
}

/// What a head's Content-Length and Transfer-Encoding lines say about its body, gathered line
/// by line; the same rules for requests and answers.
#[derive(Default)]
struct Declared {
    /// Content-Length lines, valid or not.
    lengths: usize,
    length: Option<u64>,
    /// A Content-Length that is not a number, or two that differ.
    bad_length: bool,
    te: bool,
    /// The coding applied last is chunked: the body can be followed; others run to close.
    chunked: bool,
}

enum FramingLine {
    Length,
    /// The same Content-Length again: left out.
    Repeat,
    Coding,
}

impl Declared {
    /// Notes `name: value` if it is a framing line, and says which kind it was.
    fn note(&mut self, name: &str, value: &[u8]) -> Option<FramingLine> {
        if is(name, "content-length") {
            self.lengths += 1;
            match (content_length(value), self.length) {
                (Some(n), None) => self.length = Some(n),
                (Some(n), Some(prev)) if n == prev => return Some(FramingLine::Repeat),
                _ => self.bad_length = true,
            }
            Some(FramingLine::Length)
        } else if is(name, "transfer-encoding") {
            self.te = true;
            self.chunked = last_coding_is_chunked(value);
            Some(FramingLine::Coding)
        } else {
            None
        }
    }
}

fn push(lines: &mut Vec<Line>, buf: &[u8], name: &str, value: &[u8]) {
    lines.push(Line {
        name: range_in(buf, name.as_bytes()),
        value: range_in(buf, value),
    });
}

/// A Content-Length value: digits only (no sign, no list), as RFC 9110 §8.6 has it.
fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether the coding applied last (the last of the line's list) is chunked: then the body is
/// delimited by its chunks; any other coding last leaves it undelimited.
fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&c| c == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a header stays on its side of the proxy: hop-by-hop by name (the list hyper's path
/// strips), or named by the message's Connection header.
fn hop_by_hop(name: &str, tokens: &[&[u8]]) -> bool {
    exchange::is_hop_by_hop(name) || named_by(tokens, name)
}

fn named_by(tokens: &[&[u8]], name: &str) -> bool {
    tokens
        .iter()
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

fn parse_request(buf: &[u8], lines: &mut Vec<Line>) -> Parsed {
    parse_request_with::<MAX_HEADERS>(buf, lines)
}

/// [`parse_request`] with room for `N` header lines (the fuzz checks re-read the heads the
/// proxy writes, which may have a few more lines than it reads).
fn parse_request_with<const N: usize>(buf: &[u8], lines: &mut Vec<Line>) -> Parsed {
    // Uninitialised: zeroing a hundred header slots per request would cost more than parsing.
    let mut headers = [const { MaybeUninit::uninit() }; N];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // hyper answers it (400, 431) in its own words.
        Err(_) => return Parsed::Hyper,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    if method == "CONNECT" || !(target.starts_with('/') || target == "*") {
        return Parsed::Hyper;
    }
    let Some(tokens) = connection_tokens(req.headers) else {
        return Parsed::Hyper;
    };
    lines.clear();
    let (mut declared, mut other, mut expect_continue) = (Declared::default(), false, false);
    let (mut host, mut hosts, mut pin, mut forwarded_for) = (None, 0usize, None, None);
    let (mut forwarded_proto, mut forwarded_host) = (false, false);
    for h in req.headers.iter() {
        let (name, value) = (h.name, h.value);
        match declared.note(name, value) {
            Some(FramingLine::Repeat) => continue,
            // Passed on as they are, since the body is too.
            Some(_) => {
                push(lines, buf, name, value);
                continue;
            }
            None => {}
        }
        if is(name, "expect") {
            // The go-ahead is the proxy's to give (see `proxy`); other expectations are
            // hyper's to refuse.
            if value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
                continue;
            }
            other = true;
        } else if is(name, "upgrade") {
            other = true;
        } else if is(name, "host") {
            hosts += 1;
            host.get_or_insert(range_in(buf, value));
            // Never named away by `Connection: host` (found by fuzzing): the instance would
            // get an HTTP/1.1 request without a Host.
            push(lines, buf, name, value);
            continue;
        } else if is(name, "x-cutover-version") {
            pin.get_or_insert(range_in(buf, value));
        } else if is(name, "x-forwarded-for") {
            forwarded_for.get_or_insert(range_in(buf, value));
            continue;
        } else if is(name, "x-forwarded-proto") {
            forwarded_proto = true;
        } else if is(name, "x-forwarded-host") {
            forwarded_host = true;
        }
        if !hop_by_hop(name, &tokens) {
            push(lines, buf, name, value);
        }
    }
    let Declared {
        lengths,
        length,
        bad_length,
        te,
        chunked,
    } = declared;
    // Whatever the Content-Length says, valid or not, it must not come with Transfer-Encoding.
    if te && lengths > 0 {
        return Parsed::Reject("400 Bad Request: Content-Length together with Transfer-Encoding");
    }
    // RFC 9112 §3.2: an HTTP/1.1 request with no Host, or with more than one, gets 400 (two
    // would let the proxy and the instance disagree on which site is asked for).
    let host = match (host, hosts) {
        (Some(h), 1) => h,
        (None, _) => {
            return Parsed::Reject("400 Bad Request: an HTTP/1.1 request needs a Host header");
        }
        (Some(_), _) => return Parsed::Reject("400 Bad Request: more than one Host header"),
    };
    // An invalid or ambiguous length, or a transfer coding other than chunked last, cannot be
    // delimited: hyper answers 400 in its words.
    if other || bad_length || (te && !chunked) {
        return Parsed::Hyper;
    }
    let body = match (te, length) {
        (true, _) => Framing::Chunked(Chunk::default()),
        (false, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::Empty,
    };
    Parsed::Take(Head {
        len,
        method: range_in(buf, method.as_bytes()),
        target: range_in(buf, target.as_bytes()),
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        is_head: method == "HEAD",
        close: named_by(&tokens, "close"),
        body,
        expect_continue,
        host,
        pin,
        forwarded_for,
        forwarded_proto,
        forwarded_host,
    })
}

/// Writes the upstream's request head: the client's, less hop-by-hop headers, with
/// `X-Forwarded-For` (the client's chain plus its address), `-Proto` and `-Host` added as
/// hyper's path does.
fn write_request(
    peer_ip: Option<&http::HeaderValue>,
    head: &Head,
    input: &[u8],
    lines: &[Line],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(slice(input, head.method.clone()));
    out.push(b' ');
    out.extend_from_slice(slice(input, head.target.clone()));
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_lines(out, input, lines);
    if let Some(ip) = peer_ip {
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = &head.forwarded_for {
            out.extend_from_slice(slice(input, prev.clone()));
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !head.forwarded_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    if !head.forwarded_host {
        out.extend_from_slice(b"x-forwarded-host: ");
        out.extend_from_slice(slice(input, head.host.clone()));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Header lines of a parsed head, as they came.
fn write_lines(out: &mut Vec<u8>, buf: &[u8], lines: &[Line]) {
    for l in lines {
        out.extend_from_slice(slice(buf, l.name.clone()));
        out.extend_from_slice(b": ");
        out.extend_from_slice(slice(buf, l.value.clone()));
        out.extend_from_slice(b"\r\n");
    }
}

/// Serves one request; whether the client connection stays open.
async fn proxy(
    conn: &Conn,
    head: &Head,
    b: &mut Bufs,
    client: &mut TcpStream,
    closing: &AtomicBool,
) -> bool {
    let started = Instant::now();
    // The body's first bytes, read with the head: they go out with it, in one write.
    let mut body = head.body;
    let (first, complete) = match delimit(&mut body, b.input.get(head.len..).unwrap_or_default()) {
        Ok((take, done, _)) => (take, done),
        Err(()) => {
            return answer(client, &mut b.out, StatusCode::BAD_REQUEST, MALFORMED, true).await;
        }
    };
    let input = &b.input[..];
    let mut close = conn.take_close() || head.close;
    let pinned = head
        .pin
        .clone()
        .and_then(|r| std::str::from_utf8(slice(input, r)).ok());
    let (table, index, lease) = match exchange::route(conn, pinned, started) {
        Ok(Routed {
            table,
            index,
            lease,
        }) => (table, index, lease),
        Err(miss) => {
            // The body was not read: the connection cannot go on after this answer.
            close |= !complete;
            let consumed = (head.len + first).min(b.input.len());
            b.input.advance(consumed);
            return send_answer(client, &mut b.out, &exchange::refused(conn, &miss), close).await;
        }
    };
    let Some(cv) = table.versions.get(index) else {
        return false;
    };
    // Faults (off: one relaxed load). An injected answer, reset or blackhole ends the request
    // here, before anything is sent, and the instance keeps nothing in flight for it.
    let mut paced = None;
    if let Some(inj) = exchange::faults(conn, cv, lease.backend()) {
        if !inj.delay.is_zero() {
            tokio::time::sleep(inj.delay).await;
        }
        paced = inj.bytes_per_sec;
        if inj.outcome != Outcome::Forward {
            drop(lease);
            // The body was not read: the connection cannot go on after this.
            close |= !complete;
            let consumed = (head.len + first).min(b.input.len());
            b.input.advance(consumed);
            return injected(conn, cv, inj.outcome, started, client, b, close).await;
        }
    }
    // The request has somewhere to go: the client may send its body (RFC 9110 §10.1.1). Not
    // asked of the upstream, whose early answer would come after the body anyway; if the body
    // came already, the client did not wait and needs no go-ahead.
    if head.expect_continue
        && !complete
        && client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return false;
    }
    write_request(conn.peer_ip.as_ref(), head, input, &b.lines, &mut b.out);
    let from = head.len.min(b.input.len());
    b.out
        .extend_from_slice(b.input.get(from..from + first).unwrap_or_default());
    b.input.advance(from + first);
    let mut lease = lease;
    let timeout = conn.ctx.upstream_timeout;
    let mut ex = Exchange {
        head,
        body,
        complete,
        consumed: complete,
        timeout,
        body_pause: conn.ctx.client.body,
    };
    let mut result = ex.run(&lease.backend().pool, b, client).await;
    if let Err(e) = &result
        && let Some(other) = exchange::retry_elsewhere(conn, cv, &lease, e)
    {
        // Nothing was sent, so another instance of the same version may have it.
        lease = other;
        result = ex.run(&lease.backend().pool, b, client).await;
    }
    let backend = lease.backend().clone();
    conn.remember(&backend);
    let (mut upstream, answer, sent) = match result {
        Ok(r) => r,
        Err(e) => {
            let a = exchange::failed(conn, cv, &backend, &e, started);
            // A client's failure, or a body not read to its end, leaves the connection
            // unusable.
            close |= e.side() == exchange::Side::Client || !ex.consumed;
            return send_answer(client, &mut b.out, &a, close).await;
        }
    };
    exchange::answered(conn, cv, &backend, answer.status, started);
    // An answer that came before the whole body was sent (say a 413) ends the exchange: the
    // rest of the body is never read, so neither connection can carry another request.
    close |= matches!(answer.framing, Framing::Close)
        || !sent
        || backend.removed.load(Ordering::Relaxed)
        || closing.load(Ordering::Relaxed);
    write_response(&answer, &b.upstream, &b.lines, close, &mut b.out);
    match relay(answer, &mut upstream, client, b, paced).await {
        Ok(true) if sent => backend.pool.put_raw(upstream),
        Ok(_) => {}
        Err(()) => return false,
    }
    drop(lease);
    !close
}

/// Ends a request as an injected fault says: the proxy's own error answer, a reset of the
/// client connection, or no answer until the blackhole ends or the client gives up. Whether the
/// connection stays open.
async fn injected(
    conn: &Conn,
    cv: &crate::table::CompiledVersion,
    outcome: Outcome,
    started: Instant,
    client: &mut TcpStream,
    b: &mut Bufs,
    close: bool,
) -> bool {
    match outcome {
        Outcome::Error(status) => {
            let a = exchange::failed_injected(conn, cv, status, started);
            send_answer(client, &mut b.out, &a, close).await
        }
        Outcome::Reset => {
            exchange::dropped(cv, outcome, started);
            // A zero linger turns the close into a reset.
            crate::fault::reset_on_close(client);
            false
        }
        Outcome::Blackhole(until) => {
            let mut sink = [0u8; 1024];
            let hold = tokio::time::sleep_until(until.into());
            tokio::pin!(hold);
            loop {
                tokio::select! {
                    _ = &mut hold => break,
                    r = client.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break },
                }
            }
            exchange::dropped(cv, outcome, started);
            false
        }
        Outcome::Forward => !close,
    }
}

/// Sends an answer of the proxy's own; whether the connection stays open after it.
async fn answer(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    status: StatusCode,
    msg: &str,
    close: bool,
) -> bool {
    send_answer(client, out, &exchange::Answer::new(status, msg), close).await
}

/// Sends an answer of the proxy's own; whether the connection stays open after it.
async fn send_answer(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    a: &exchange::Answer,
    close: bool,
) -> bool {
    a.write(out, close);
    client.write_all(out).await.is_ok() && !close
}

/// How a body is delimited.
#[derive(Clone, Copy, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes (no length, or a transfer coding other than chunked last).
    Close,
}

/// A response head, as ranges of the upstream buffer; its lines to pass on are in
/// `Bufs::lines`.
#[derive(Debug)]
struct Answer {
    len: usize,
    status: StatusCode,
    reason: Range<usize>,
    framing: Framing,
    /// The upstream may take another request on this connection after this response.
    reusable: bool,
}

enum ParsedAnswer {
    Partial,
    /// An interim (1xx) response of this many bytes, which is dropped as hyper's client does.
    Interim(usize),
    Head(Answer),
    Bad(String),
}

fn parse_response(buf: &[u8], is_head: bool, lines: &mut Vec<Line>) -> ParsedAnswer {
    parse_response_with::<MAX_HEADERS>(buf, is_head, lines)
}

/// [`parse_response`] with room for `N` header lines (see [`parse_request_with`]).
fn parse_response_with<const N: usize>(
    buf: &[u8],
    is_head: bool,
    lines: &mut Vec<Line>,
) -> ParsedAnswer {
    let mut headers = [const { MaybeUninit::uninit() }; N];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return ParsedAnswer::Partial,
        Err(e) => return ParsedAnswer::Bad(format!("invalid response head: {e}")),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return ParsedAnswer::Bad("invalid response head".into());
    };
    let Ok(status) = StatusCode::from_u16(code) else {
        return ParsedAnswer::Bad(format!("invalid status {code}"));
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return ParsedAnswer::Bad("switched protocols though nobody asked".into());
    }
    if status.is_informational() {
        return ParsedAnswer::Interim(len);
    }
    let Some(tokens) = connection_tokens(resp.headers) else {
        return ParsedAnswer::Bad("too many Connection options".into());
    };
    lines.clear();
    let mut declared = Declared::default();
    let mut length_lines = Vec::new();
    for h in resp.headers.iter() {
        let (name, value) = (h.name, h.value);
        match declared.note(name, value) {
            Some(FramingLine::Repeat) => continue,
            Some(kind) => {
                if matches!(kind, FramingLine::Length) {
                    length_lines.push(lines.len());
                }
                // Passed on as they are, since the body is too.
                push(lines, buf, name, value);
                continue;
            }
            None => {}
        }
        if !hop_by_hop(name, &tokens) {
            push(lines, buf, name, value);
        }
    }
    if declared.bad_length {
        return ParsedAnswer::Bad("invalid or differing Content-Lengths".into());
    }
    let Declared {
        length,
        te,
        chunked,
        ..
    } = declared;
    let no_body = is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if te && !no_body {
        // Transfer-Encoding overrides Content-Length, which must not go on (RFC 9112 §6.3).
        for i in length_lines.into_iter().rev() {
            lines.remove(i);
        }
    }
    let framing = match (no_body, te, chunked, length) {
        (true, ..) | (false, false, _, Some(0)) => Framing::Empty,
        (false, true, true, _) => Framing::Chunked(Chunk::default()),
        (false, true, false, _) | (false, false, _, None) => Framing::Close,
        (false, false, _, Some(n)) => Framing::Length(n),
    };
    let reusable =
        version == 1 && !named_by(&tokens, "close") && !matches!(framing, Framing::Close);
    ParsedAnswer::Head(Answer {
        len,
        status,
        reason: resp
            .reason
            .map(|r| range_in(buf, r.as_bytes()))
            .unwrap_or(0..0),
        framing,
        reusable,
    })
}

fn write_response(
    answer: &Answer,
    upstream: &[u8],
    lines: &[Line],
    close: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(answer.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(slice(upstream, answer.reason.clone()));
    out.extend_from_slice(b"\r\n");
    write_lines(out, upstream, lines);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// One request on its way to an instance: its head and the body's first bytes are in
/// `Bufs::out`; the rest of the body, if any, is still to be read from the client.
struct Exchange<'a> {
    head: &'a Head,
    /// Where the body stands after the bytes already in `out`.
    body: Framing,
    /// The whole body is in `out`: the request can be sent again as it is.
    complete: bool,
    /// The body was read from the client to its end (so the client's next request follows).
    consumed: bool,
    timeout: Duration,
    /// The longest pause allowed between two reads of the body.
    body_pause: Duration,
}

impl Exchange<'_> {
    /// Sends the request to an idle connection of `pool` (or a new one) and reads the response
    /// head into `b.upstream`, its lines into `b.lines`. The bool says the body was sent in
    /// full (it is not when the answer came first).
    async fn run(
        &mut self,
        pool: &Pool,
        b: &mut Bufs,
        client: &mut TcpStream,
    ) -> Result<(TcpStream, Answer, bool), Error> {
        loop {
            let (mut s, reused) = match pool.take_raw() {
                Some(s) => (s, true),
                None => (pool.dial().await.map_err(Error::Connect)?, false),
            };
            b.upstream.clear();
            if !self.complete {
                // Once the rest of the body is read from the client, there is no going back.
                if let Err(e) = s.write_all(&b.out).await {
                    if reused {
                        continue;
                    }
                    return Err(Error::Reset(e.to_string()));
                }
                return self.stream(s, b, client).await;
            }
            match tokio::time::timeout(self.timeout, send(&mut s, self.head.is_head, b)).await {
                Err(_) => return Err(Error::Timeout),
                Ok(Ok(answer)) => return Ok((s, answer, true)),
                // A kept-alive connection the upstream closed just as it was taken: nothing
                // came back, so the request did not get an answer; try again on another
                // connection if sending it twice is harmless, or if it never left.
                Ok(Err(Broke { why, unsent })) => {
                    let e = Error::Reset(why);
                    let harmless = self.head.idempotent && b.upstream.is_empty();
                    if !e.retry().decide_reuse(reused, unsent, harmless) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Relays the rest of the request body from the client while waiting for the response
    /// head; the upstream timeout counts from the body's end. An answer that comes first ends
    /// the relay.
    async fn stream(
        &mut self,
        mut s: TcpStream,
        b: &mut Bufs,
        client: &mut TcpStream,
    ) -> Result<(TcpStream, Answer, bool), Error> {
        let is_head = self.head.is_head;
        let (mut ur, mut uw) = s.split();
        let Bufs {
            input,
            upstream,
            lines,
            ..
        } = b;
        let mut relaying = true;
        let pause = self.body_pause;
        let answer = {
            let mut body =
                std::pin::pin!(relay_body(client, &mut uw, input, &mut self.body, pause));
            let mut answer = std::pin::pin!(read_head(&mut ur, is_head, upstream, lines));
            // Armed when the body has gone out: the wait for the answer starts then.
            let mut deadline = std::pin::pin!(tokio::time::sleep(self.timeout));
            loop {
                tokio::select! {
                    r = &mut answer => break r,
                    r = &mut body, if relaying => {
                        relaying = false;
                        match r {
                            Ok(()) => self.consumed = true,
                            Err(BodyError::Client(why)) => return Err(Error::ClientBody(why)),
                            Err(BodyError::Stalled) => return Err(Error::ClientStalled),
                            // The upstream stopped reading: its answer may still come.
                            Err(BodyError::Upstream(why)) => {
                                tracing::debug!(why, "upstream stopped reading the body");
                            }
                        }
                        deadline.as_mut().reset(tokio::time::Instant::now() + self.timeout);
                    }
                    _ = &mut deadline, if !relaying => return Err(Error::Timeout),
                }
            }
        };
        match answer {
            Ok(a) => Ok((s, a, self.consumed)),
            Err(Broke { why, .. }) => Err(Error::Reset(why)),
        }
    }
}

enum BodyError {
    Client(String),
    /// The client sent no more of its body for longer than allowed.
    Stalled,
    Upstream(String),
}

/// Copies the rest of a request body from the client to the upstream, as it arrives, up to
/// where its framing ends; bytes after it (the client's next request) stay in `input`.
async fn relay_body(
    client: &mut TcpStream,
    upstream: &mut tokio::net::tcp::WriteHalf<'_>,
    input: &mut BytesMut,
    body: &mut Framing,
    pause: Duration,
) -> Result<(), BodyError> {
    loop {
        input.reserve(BUF);
        match tokio::time::timeout(pause, client.read_buf(input)).await {
            Err(_) => return Err(BodyError::Stalled),
            Ok(Ok(0)) => return Err(BodyError::Client("the client closed mid-body".into())),
            Ok(Err(e)) => return Err(BodyError::Client(e.to_string())),
            Ok(Ok(_)) => {}
        }
        let (take, done, _) = delimit(body, input)
            .map_err(|()| BodyError::Client("malformed chunked body".into()))?;
        let part = input.get(..take).unwrap_or_default();
        if let Err(e) = upstream.write_all(part).await {
            return Err(BodyError::Upstream(e.to_string()));
        }
        input.advance(take);
        if done {
            return Ok(());
        }
    }
}

struct Broke {
    why: String,
    /// The request could not be written at all.
    unsent: bool,
}

async fn send(s: &mut TcpStream, is_head: bool, b: &mut Bufs) -> Result<Answer, Broke> {
    if let Err(e) = s.write_all(&b.out).await {
        return Err(Broke {
            why: e.to_string(),
            unsent: true,
        });
    }
    read_head(s, is_head, &mut b.upstream, &mut b.lines).await
}

/// Reads a response head (skipping interim ones) into `buf`, its lines into `lines`.
async fn read_head<R: AsyncRead + Unpin>(
    s: &mut R,
    is_head: bool,
    buf: &mut BytesMut,
    lines: &mut Vec<Line>,
) -> Result<Answer, Broke> {
    loop {
        if !buf.is_empty() {
            match parse_response(buf, is_head, lines) {
                ParsedAnswer::Head(answer) => return Ok(answer),
                ParsedAnswer::Interim(n) => {
                    buf.advance(n);
                    continue;
                }
                ParsedAnswer::Bad(why) => return Err(Broke { why, unsent: false }),
                ParsedAnswer::Partial if buf.len() >= MAX_HEAD => {
                    return Err(Broke {
                        why: "response head too large".into(),
                        unsent: false,
                    });
                }
                ParsedAnswer::Partial => {}
            }
        }
        buf.reserve(BUF / 2);
        match s.read_buf(buf).await {
            Ok(0) => {
                return Err(Broke {
                    why: "connection closed before the response head".into(),
                    unsent: false,
                });
            }
            Err(e) => {
                return Err(Broke {
                    why: e.to_string(),
                    unsent: false,
                });
            }
            Ok(_) => {}
        }
    }
}

/// Sends the response head in `b.out` and relays the body that follows it, as it arrives.
/// `Ok(reusable)`: the response was relayed in full, and the upstream connection may carry
/// another request. `Err`: the response broke off on either side; the client connection must
/// close, since its answer is incomplete.
async fn relay(
    answer: Answer,
    upstream: &mut TcpStream,
    client: &mut TcpStream,
    b: &mut Bufs,
    paced: Option<u64>,
) -> Result<bool, ()> {
    let mut framing = answer.framing;
    b.upstream.advance(answer.len);
    let (take, mut done, mut extra) = delimit(&mut framing, &b.upstream)?;
    b.out
        .extend_from_slice(b.upstream.get(..take).unwrap_or_default());
    client.write_all(&b.out).await.map_err(|_| ())?;
    if let Some(rate) = paced {
        tokio::time::sleep(crate::fault::pace(b.out.len(), rate)).await;
    }
    while !done {
        b.upstream.clear();
        b.upstream.reserve(BUF);
        match upstream.read_buf(&mut b.upstream).await {
            Ok(0) if matches!(framing, Framing::Close) => break,
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => {}
        }
        let (take, d, e) = delimit(&mut framing, &b.upstream)?;
        client
            .write_all(b.upstream.get(..take).unwrap_or_default())
            .await
            .map_err(|_| ())?;
        // A bandwidth fault: the next read waits as long as these bytes take at its rate.
        if let Some(rate) = paced {
            tokio::time::sleep(crate::fault::pace(take, rate)).await;
        }
        (done, extra) = (d, e);
    }
    Ok(answer.reusable && !extra)
}

/// How much of `data` (the next bytes from the upstream) belongs to the body; whether the body
/// is complete; whether bytes beyond it came (then the connection is not reused).
fn delimit(framing: &mut Framing, data: &[u8]) -> Result<(usize, bool, bool), ()> {
    Ok(match framing {
        Framing::Empty => (0, true, !data.is_empty()),
        Framing::Length(left) => {
            let take = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
            *left -= take as u64;
            (take, *left == 0, take < data.len())
        }
        Framing::Chunked(c) => {
            let take = c.feed(data).map_err(|_| ())?;
            let done = *c == Chunk::Done;
            (take, done, take < data.len())
        }
        Framing::Close => (data.len(), false, false),
    })
}

/// Where a chunked body stands (RFC 9112 §7.1), fed its bytes in order. Only the framing is
/// followed, to know where the body ends; the bytes themselves pass on unchanged. It is
/// stricter than the grammar's leniencies (a bare LF ends nothing), so that a client's parser
/// can never find an end where this one did not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// In a chunk-size line, with the size so far and how many hex digits gave it.
    Size {
        n: u64,
        digits: u8,
    },
    #[default]
    Start,
    /// After the size, whitespace before an extension (or the line's end).
    SizeWs(u64),
    /// In a chunk extension, up to the line's CR.
    Ext(u64),
    /// The size line's CR came; its LF must follow.
    SizeLf(u64),
    /// Inside a chunk's data, with this much left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunk {
    /// Consumes `data` up to the end of the body; returns how many bytes belong to it.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() {
            if let Chunk::Data(left) = *self {
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                i += take;
                let left = left - take as u64;
                *self = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            if *self == Chunk::Done {
                break;
            }
            let c = data[i];
            i += 1;
            *self = match (*self, c) {
                (Chunk::Start, c) if c.is_ascii_hexdigit() => Chunk::Size {
                    n: u64::from(hex(c)),
                    digits: 1,
                },
                (Chunk::Size { n, digits }, c) if c.is_ascii_hexdigit() => {
                    if digits >= 15 {
                        return Err("chunk size too large");
                    }
                    Chunk::Size {
                        n: n * 16 + u64::from(hex(c)),
                        digits: digits + 1,
                    }
                }
                (Chunk::Size { n, .. } | Chunk::SizeWs(n), b' ' | b'\t') => Chunk::SizeWs(n),
                (Chunk::Size { n, .. } | Chunk::SizeWs(n), b';') => Chunk::Ext(n),
                (Chunk::Size { n, .. } | Chunk::SizeWs(n) | Chunk::Ext(n), b'\r') => {
                    Chunk::SizeLf(n)
                }
                (Chunk::Ext(_), b'\n') => return Err("bare LF in a chunk extension"),
                (Chunk::Ext(n), _) => Chunk::Ext(n),
                (Chunk::SizeLf(0), b'\n') => Chunk::TrailerStart,
                (Chunk::SizeLf(n), b'\n') => Chunk::Data(n),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::Start,
                (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::TrailerStart | Chunk::Trailer, b'\n') => {
                    return Err("bare LF in a trailer");
                }
                (Chunk::TrailerStart | Chunk::Trailer, _) => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
                (Chunk::EndLf, b'\n') => Chunk::Done,
                _ => return Err("malformed chunked body"),
            };
        }
        Ok(i)
    }
}

fn hex(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

/// A client connection handed to hyper, with the bytes the fast path read but did not serve.
pub(crate) struct Prefixed {
    pre: BytesMut,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pre.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = buf.remaining().min(this.pre.len());
        buf.put_slice(&this.pre.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> (Parsed, Vec<Line>) {
        let mut lines = Vec::new();
        (parse_request(raw.as_bytes(), &mut lines), lines)
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused_in_either_order() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert!(matches!(request(raw).0, Parsed::Reject(_)), "{raw}");
        }
    }

    #[test]
    fn http11_requests_need_exactly_one_host() {
        for (raw, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "needs a Host"),
            ("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", "needs a Host"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "more than one Host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
                "more than one Host",
            ),
        ] {
            match request(raw).0 {
                Parsed::Reject(m) => assert!(m.contains(why), "{raw:?}: {m}"),
                other => panic!("{raw:?} not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn http11_requests_with_a_host_and_a_delimited_body_are_taken() {
        let body = |raw: &str| match request(raw).0 {
            Parsed::Take(h) => h.body,
            other => panic!("not taken: {other:?} {raw}"),
        };
        let get = "GET /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(body(get), Framing::Empty));
        let post = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert!(matches!(body(post), Framing::Length(3)));
        let chunked = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert!(matches!(body(chunked), Framing::Chunked(_)));
        let expect =
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n";
        assert!(matches!(
            request(expect).0,
            Parsed::Take(Head {
                expect_continue: true,
                ..
            })
        ));
        // hyper's: it answers the malformed ones (400) and serves the unusual ones.
        for raw in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        ] {
            assert!(matches!(request(raw).0, Parsed::Hyper), "{raw}");
        }
        assert!(matches!(request("GET / HTTP/1.1\r\nHo").0, Parsed::Partial));
    }

    #[test]
    fn the_upstream_head_drops_hop_by_hop_headers_and_adds_forwarding_ones() {
        let raw = "GET /p HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret\r\n\
                   X-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\n\
                   Accept: */*\r\n\r\n";
        let (Parsed::Take(head), lines) = request(raw) else {
            panic!("not taken");
        };
        let names: Vec<&str> = lines.iter().map(|l| &raw[l.name.clone()]).collect();
        assert_eq!(names, ["Host", "Accept"]);
        assert_eq!(&raw[head.forwarded_for.clone().unwrap()], "10.0.0.1");
        assert!(!head.close && head.idempotent && !head.is_head);
    }

    /// Found by fuzzing: `Connection: host` made the fast path drop the Host line from the
    /// head it sent upstream.
    #[test]
    fn connection_cannot_name_the_host_away() {
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nConnection: host, content-length\r\nContent-Length: 2\r\n\r\nhi";
        let (Parsed::Take(head), lines) = request(raw) else {
            panic!("not taken");
        };
        let names: Vec<&str> = lines.iter().map(|l| &raw[l.name.clone()]).collect();
        assert_eq!(names, ["Host", "Content-Length"]);
        assert!(matches!(head.body, Framing::Length(2)));
        fuzzing::request_head(raw.as_bytes());
    }

    fn response(raw: &str, is_head: bool) -> (Answer, Vec<Line>) {
        let mut lines = Vec::new();
        match parse_response(raw.as_bytes(), is_head, &mut lines) {
            ParsedAnswer::Head(a) => (a, lines),
            _ => panic!("no head in {raw:?}"),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let (a, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false);
        assert!(matches!(a.framing, Framing::Length(5)) && a.reusable);
        let (a, lines) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(matches!(a.framing, Framing::Chunked(_)));
        assert_eq!(
            lines.len(),
            1,
            "Content-Length is dropped when chunked wins"
        );
        let (a, _) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert!(matches!(a.framing, Framing::Close) && !a.reusable);
        let (a, _) = response("HTTP/1.1 200 OK\r\n\r\n", false);
        assert!(matches!(a.framing, Framing::Close));
        let (a, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert!(matches!(a.framing, Framing::Empty));
        let (a, _) = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert!(matches!(a.framing, Framing::Empty));
        let (a, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(!a.reusable);
        let (a, _) = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!a.reusable);
        let mut lines = Vec::new();
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(matches!(
                parse_response(bad.as_bytes(), false, &mut lines),
                ParsedAnswer::Bad(_)
            ));
        }
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                false,
                &mut lines
            ),
            ParsedAnswer::Interim(_)
        ));
    }

    #[test]
    fn chunked_bodies_end_exactly_where_their_framing_says_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10 ; e\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let rest = b"HTTP/1.1 200 OK\r\n";
        let mut all = body.to_vec();
        all.extend_from_slice(rest);
        for split in 0..=all.len() {
            let mut c = Chunk::default();
            let a = c.feed(&all[..split]).unwrap();
            let b = c.feed(&all[split..]).unwrap();
            assert_eq!(a + b, body.len(), "split at {split}");
            assert_eq!(c, Chunk::Done);
        }
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"zz\r\n",
            b"1;a\nb\r\n",
            b"0\r\nX: 1\n\r\n",
            b"ffffffffffffffff0\r\n",
            b"5 3\r\nhello\r\n",
        ] {
            assert!(
                Chunk::default().feed(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Seeded random chunked bodies (sizes, extensions, trailers), fed in random pieces, end
    /// exactly at their end; random corruptions of them never panic and never end beyond the
    /// bytes given.
    #[test]
    fn random_chunked_bodies_in_random_pieces() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let mut body = Vec::new();
            for _ in 0..rng.random_range(0..5) {
                let n = rng.random_range(1..300usize);
                body.extend_from_slice(format!("{n:x}").as_bytes());
                if rng.random_bool(0.3) {
                    body.extend_from_slice(b" ;name=\"v\"");
                }
                body.extend_from_slice(b"\r\n");
                body.extend((0..n).map(|_| rng.random::<u8>()));
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            if rng.random_bool(0.3) {
                body.extend_from_slice(b"X-Sum: 1\r\n");
            }
            body.extend_from_slice(b"\r\n");
            let len = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (mut c, mut at) = (Chunk::default(), 0);
            while c != Chunk::Done {
                let end = (at + rng.random_range(1..64)).min(body.len());
                at += c.feed(&body[at..end]).unwrap();
                assert!(at <= len);
            }
            assert_eq!(at, len);
            let mut bad = body.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..len);
                bad[i] = rng.random();
            }
            let mut c = Chunk::default();
            if let Ok(n) = c.feed(&bad[..len]) {
                assert!(n <= len);
            }
        }
    }
}
