//! Dependency hops (`[dependencies.NAME] listen / upstream`): plain TCP relays that an app
//! uses to reach a database or another service, so that faults can reach those too
//! (Toxiproxy's model).
//!
//! Each accepted connection is relayed to the upstream byte for byte, in both directions. The
//! faults set for the dependency are checked per chunk, so a fault set on a pool of long-lived
//! connections takes effect at once: latency delays each chunk, a bandwidth cap paces it, a
//! reset (drawn per chunk) resets both connections, and a blackhole drops the bytes until it
//! ends, keeping the connections open. Error answers have no meaning here (the registry
//! refuses them for a dependency). With no fault set, a chunk costs one relaxed load more than
//! a plain copy.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fault::{FaultSlot, Outcome, pace};

/// How long a new upstream connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts and relays until `shutdown` resolves; connections under way are closed with it.
pub(crate) async fn serve(
    faults: Arc<FaultSlot>,
    listener: TcpListener,
    upstream: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((client, _)) => {
                    conns.spawn(relay(faults.clone(), client, upstream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dependency accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            // Finished connections are reaped as they end, so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// A reset was drawn: both connections are to be reset.
struct Reset;

async fn relay(faults: Arc<FaultSlot>, mut client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_nodelay(true);
    let mut up = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %upstream, "dependency upstream refused");
            crate::fault::reset_on_close(&client);
            return;
        }
        Err(_) => {
            crate::fault::reset_on_close(&client);
            return;
        }
    };
    let _ = up.set_nodelay(true);
    let reset = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        let there = pump(&faults, &mut cr, &mut uw);
        let back = pump(&faults, &mut ur, &mut cw);
        tokio::try_join!(there, back).is_err()
    };
    if reset {
        // A zero linger makes the close a reset, as a dying peer's would be.
        crate::fault::reset_on_close(&client);
        crate::fault::reset_on_close(&up);
    }
}

/// Copies one direction until its end (passed on as a half-close) or an error.
async fn pump(
    faults: &FaultSlot,
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
) -> Result<(), Reset> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
        };
        if faults.any()
            && let Some(inj) = faults.injection(None, None)
        {
            match inj.outcome {
                Outcome::Reset => return Err(Reset),
                // Dropped while the blackhole lasts; the connection stays open.
                Outcome::Blackhole(until) if until > Instant::now() => continue,
                _ => {}
            }
            if !inj.delay.is_zero() {
                tokio::time::sleep(inj.delay).await;
            }
            if let Some(rate) = inj.bytes_per_sec {
                tokio::time::sleep(pace(n, rate)).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return Ok(());
        }
    }
}
