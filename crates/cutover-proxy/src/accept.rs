//! Accepting client connections: the limit on open connections, connections handed over by a
//! previous daemon, and a task per connection that starts on the fast path (`fast.rs`) and
//! moves to hyper's path (`forward.rs`) at the first request the fast path does not take.
//!
//! This is the one module that knows both paths; they know only the exchange (`exchange.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exchange::{Conn, Ctx, stopped};

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
    let conn = Arc::new(Conn::new(ctx.clone(), peer, preview));
    let (alive, stop) = (alive.clone(), stop.clone());
    tokio::spawn(async move {
        match crate::fast::serve(&conn, stream, stop.clone(), &admitted).await {
            crate::fast::Served::Done => {}
            crate::fast::Served::Hyper(rest) => crate::forward::serve_hyper(conn, rest, stop).await,
            crate::fast::Served::Parked(s) => conn.ctx.proxy.park(&conn.ctx.state.name, preview, s),
        }
        drop(admitted);
        drop(alive);
    });
}
