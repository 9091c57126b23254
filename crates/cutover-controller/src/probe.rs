//! Probe traffic for a blue-green preview: requests that only the candidate sees.
//!
//! A preview is judged before any user traffic moves to it, but nobody may be using the
//! preview listener, and a judge with no requests has no evidence. So while a preview is
//! judged the driver runs one of these tasks: it asks the service's own listener for the
//! health path and `/`, pinned to the candidate with `X-Cutover-Version`, so the proxy routes
//! and measures them like any other request to that version and no user ever gets one.
//!
//! The rate is bounded and so is concurrency: a slow candidate gets fewer probes, never a
//! pile of them. It must not decide anything; its requests are only evidence for the judge.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cutover_core::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Probes in flight at once, at most.
const CONCURRENCY: usize = 4;
/// A probe that has not finished by then is given up (the proxy's own timeout answers first).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to send probes for a service listening on `listen`: a wildcard address is reached
/// on loopback.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Starts probing `version` through `listen` at `per_second` requests a second, cycling
/// through `paths`, until the handle is aborted.
pub fn spawn(
    listen: SocketAddr,
    version: Version,
    paths: Vec<String>,
    per_second: u32,
) -> JoinHandle<()> {
    let to = target(listen);
    let paths = if paths.is_empty() {
        vec!["/".to_owned()]
    } else {
        paths
    };
    let every = Duration::from_secs(1) / per_second.max(1);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0usize.. {
            tick.tick().await;
            // Skip a beat rather than queue: the rate is a ceiling, not a debt.
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {to}\r\nUser-Agent: cutover-probe\r\nX-Cutover-Version: {version}\r\nConnection: close\r\n\r\n",
                paths[i % paths.len()]
            );
            tokio::spawn(async move {
                let _ = tokio::time::timeout(PROBE_TIMEOUT, once(to, request)).await;
                drop(permit);
            });
        }
    })
}

/// One probe: send the request and read the answer to its end (the connection closes).
async fn once(to: SocketAddr, request: String) -> std::io::Result<()> {
    let mut s = TcpStream::connect(to).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; 4096];
    while s.read(&mut buf).await? > 0 {}
    Ok(())
}
