//! Keep-alive connections to one instance: a stack of idle HTTP/1.1 senders for hyper's path,
//! and a stack of idle plain TCP connections for the fast path (`fast.rs`).
//!
//! An instance is one address, so its pool needs no keys, no checkout futures and no task per
//! request: a request pops the most recently used idle connection (or connects), sends, and
//! puts the connection back when the response has been read to its end. A hyper connection's
//! IO runs in a task of its own, spawned once when it connects; a plain connection is driven by
//! the client connection's task that holds it. The health checker closes connections idle for
//! longer than [`IDLE_TIMEOUT`] on each of its rounds; dropping the pool (the instance drained
//! and was forgotten) closes all its idle connections.
//!
//! It replaced hyper-util's general-purpose pooled client, which with the header copy it needed
//! for retries cost about a fifth of the proxy's user-space instructions per request
//! (ARCHITECTURE.md, "Proxy speed").
//!
//! It must never lose a request it did not send: a request that never left (the connection
//! could not be made, or an idle one turned out closed) comes back to the caller, which may try
//! another instance with it.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::forward::ReqBody;

pub(crate) type Sender = http1::SendRequest<ReqBody>;

/// Idle connections kept per instance; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// Idle connections older than this are closed (nginx's `keepalive_timeout` default for
/// upstream connections is 60 s too), so a burst of traffic leaves no lasting crowd behind.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) enum SendError {
    /// Nothing of the request was sent; here it is back, with the reason.
    NotSent(Box<Request<ReqBody>>, String),
    /// The request went out (at least partly) and no response head came back.
    Failed(hyper::Error),
}

pub(crate) struct Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    /// Idle senders with the moment each came back, most recent last.
    idle: Mutex<Vec<(Sender, Instant)>>,
    /// Idle plain connections of the fast path, the same way.
    raw: Mutex<Vec<(TcpStream, Instant)>>,
}

/// Whether an idle plain connection has something to read: the upstream closed it, or sent
/// bytes nobody asked for. Either way it must not carry a request.
///
/// This reads tokio's cached readiness, with no system call: a response read in full leaves
/// the readiness clear (a read shorter than its buffer clears it), and a close or stray bytes
/// set it again when the reactor sees them. A close still on its way is not seen; the caller
/// treats a connection that ends before any byte of the response as not having carried it.
fn stale(s: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(s.poll_read_ready(&mut cx), Poll::Ready(_))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Pool {
    pub(crate) fn new(addr: SocketAddr, connect_timeout: Duration) -> Pool {
        Pool {
            addr,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            raw: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, Instant)>> {
        lock(&self.idle)
    }

    /// The most recently used idle plain connection that still looks open, if any.
    pub(crate) fn take_raw(&self) -> Option<TcpStream> {
        let mut raw = lock(&self.raw);
        while let Some((s, _)) = raw.pop() {
            if !stale(&s) {
                return Some(s);
            }
        }
        None
    }

    /// Hands a plain connection back after its response was read to the end.
    pub(crate) fn put_raw(&self, s: TcpStream) {
        let mut raw = lock(&self.raw);
        if raw.len() < MAX_IDLE {
            raw.push((s, Instant::now()));
        }
    }

    /// Sends `req` on an idle connection, or on a new one if none is usable. On success the
    /// sender comes back with the response; return it with [`Pool::put`] once the response
    /// body has been read to its end, not before (the connection is busy until then).
    pub(crate) async fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        loop {
            let popped = self.idle().pop();
            let Some((mut sender, _)) = popped else { break };
            // The upstream may have closed it while it sat idle; that costs nothing but a pop.
            // A connection just handed back may still be finishing its last exchange: `ready`
            // waits for that (it is already under way) or reports it closed.
            if sender.is_closed() || sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(mut e) => match e.take_message() {
                    // It closed before the request was written: try the next connection.
                    Some(back) => req = back,
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
        let mut sender = match self.connect().await {
            Ok(s) => s,
            Err(why) => return Err(SendError::NotSent(Box::new(req), why)),
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, sender)),
            Err(mut e) => match e.take_message() {
                Some(back) => Err(SendError::NotSent(
                    Box::new(back),
                    crate::exchange::describe(e.error()),
                )),
                None => Err(SendError::Failed(e.into_error())),
            },
        }
    }

    /// Hands a sender back after its response was read to the end.
    pub(crate) fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE {
            idle.push((sender, Instant::now()));
        }
    }

    /// Closes idle connections that the upstream closed or that sat unused longer than
    /// `max_idle`. The most recently used are on top, so the old ones are at the bottom.
    pub(crate) fn prune(&self, now: Instant, max_idle: Duration) {
        self.idle().retain(|(s, since)| {
            !s.is_closed() && now.saturating_duration_since(*since) < max_idle
        });
        lock(&self.raw)
            .retain(|(s, since)| !stale(s) && now.saturating_duration_since(*since) < max_idle);
    }

    /// A new plain connection (the fast path's; hyper's path builds its senders on one).
    pub(crate) async fn dial(&self) -> Result<TcpStream, String> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Err(_) => {
                    return Err(format!(
                        "no connection within {}ms",
                        self.connect_timeout.as_millis()
                    ));
                }
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(s)) => s,
            };
        // Requests and responses are small and latency-bound; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect(&self) -> Result<Sender, String> {
        let stream = self.dial().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| crate::exchange::describe(&e))?;
        // Upgrades (WebSocket) hand the connection's IO over to the tunnel when they happen.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn pruning_closes_connections_idle_too_long_and_keeps_fresh_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(addr, Duration::from_secs(5));
        let (a, b) = (pool.connect().await.unwrap(), pool.connect().await.unwrap());
        let (mut sa, _) = listener.accept().await.unwrap();
        let (mut sb, _) = listener.accept().await.unwrap();
        pool.put(a);
        pool.put(b);
        pool.prune(Instant::now(), IDLE_TIMEOUT);
        assert_eq!(pool.idle().len(), 2, "fresh connections stay");
        pool.prune(Instant::now() + IDLE_TIMEOUT, IDLE_TIMEOUT);
        assert_eq!(pool.idle().len(), 0, "old ones go");
        // And they are really closed: the upstream reads end-of-stream on both.
        let mut buf = [0u8; 16];
        for s in [&mut sa, &mut sb] {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 0);
        }
    }
}
