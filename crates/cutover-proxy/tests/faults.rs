//! Faults in the data plane, in-process against in-process upstreams: error answers counted
//! for the version, latency, resets, blackholes, expiry, bandwidth caps, both request paths,
//! and the dependency hop.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cutover_core::{
    Backend, HealthSpec, InstanceId, RouteTable, RouteVersion, ServiceName, Version, Weight,
};
use cutover_metrics::Metrics;
use cutover_proxy::{ClientTimeouts, Fault, FaultKind, FaultTarget, Proxy, ServiceProxySpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream answering `hello from NAME` (and `/big`: 20 kB) on keep-alive connections.
async fn upstream(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut have = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    have.extend_from_slice(&buf[..n]);
                    while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&have[..end]).into_owned();
                        have.drain(..end + 4);
                        let body = if head.starts_with("GET /big") {
                            "x".repeat(20_000)
                        } else {
                            format!("hello from {name}")
                        };
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err()
                            || head.to_ascii_lowercase().contains("connection: close")
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Serves service "web" with versions v1 (stable, 100%) and v2 (no weight; reached pinned),
/// each one healthy instance; returns the proxy, its address and the metrics.
async fn serve() -> (Proxy, SocketAddr, Metrics) {
    let (a, b) = (upstream("v1").await, upstream("v2").await);
    let metrics = Metrics::new();
    let (tx, mut health) = tokio::sync::mpsc::unbounded_channel();
    let proxy = Proxy::new(metrics.clone(), tx);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let version = |v: &str, w: u32, id: &str, at: SocketAddr| RouteVersion {
        version: Version::new(v),
        weight: Weight::new(w).unwrap(),
        backends: vec![Backend {
            instance: InstanceId::new(id),
            addr: at,
            healthy: true,
        }],
    };
    let table = RouteTable {
        service: ServiceName::new("web"),
        generation: 1,
        stable: Version::new("v1"),
        versions: vec![
            version("v1", 100, "web-v1-1", a),
            version("v2", 0, "web-v2-1", b),
        ],
        preview: None,
    };
    let spec = ServiceProxySpec {
        service: ServiceName::new("web"),
        health: HealthSpec {
            path: "/".into(),
            interval: Duration::from_secs(60),
            timeout: Duration::from_millis(500),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        },
        upstream_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_millis(500),
        client: ClientTimeouts::default(),
        max_connections: 1000,
    };
    let p = proxy.clone();
    tokio::spawn(async move {
        p.serve(spec, l, None, table, std::future::pending())
            .await
            .unwrap();
    });
    tokio::spawn(async move { while health.recv().await.is_some() {} });
    // Ready when it answers.
    for _ in 0..100 {
        if get(addr, "/", None).await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (proxy, addr, metrics)
}

/// One request on a new connection, HTTP/1.1 (the fast path) or 1.0 (hyper's): the status
/// (0 when the connection ended without an answer) and the body.
async fn request(addr: SocketAddr, path: &str, pin: Option<&str>, http10: bool) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let pin = pin
        .map(|p| format!("x-cutover-version: {p}\r\n"))
        .unwrap_or_default();
    let v = if http10 { "1.0" } else { "1.1" };
    let req = format!("GET {path} HTTP/{v}\r\nHost: web\r\n{pin}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

async fn get(addr: SocketAddr, path: &str, pin: Option<&str>) -> (u16, String) {
    request(addr, path, pin, false).await
}

fn fault(target: FaultTarget, kind: FaultKind, for_: Duration) -> Fault {
    Fault {
        id: 1,
        target,
        kind,
        until: Instant::now() + for_,
    }
}

fn web() -> ServiceName {
    ServiceName::new("web")
}

#[tokio::test]
async fn an_error_fault_answers_for_its_version_only_and_counts_for_the_judge() {
    let (proxy, addr, metrics) = serve().await;
    proxy.set_faults(
        &web(),
        vec![fault(
            FaultTarget::Version(Version::new("v2")),
            FaultKind::Error {
                rate: 1.0,
                status: 503,
            },
            Duration::from_secs(60),
        )],
    );
    let before = metrics.snapshot(&web(), &Version::new("v2"));
    for http10 in [false, true] {
        let (s, body) = request(addr, "/", Some("v2"), http10).await;
        assert_eq!(s, 503, "http/1.0: {http10}");
        assert!(body.contains("injected fault"), "{body}");
        // The other version is untouched.
        assert_eq!(
            request(addr, "/", None, http10).await,
            (200, "hello from v1".into())
        );
    }
    let w = metrics
        .snapshot(&web(), &Version::new("v2"))
        .window_since(Some(&before));
    assert_eq!(
        (w.requests, w.errors),
        (2, 2),
        "the judge sees injected errors"
    );
    proxy.set_faults(&web(), Vec::new());
    assert_eq!(
        get(addr, "/", Some("v2")).await,
        (200, "hello from v2".into())
    );
}

#[tokio::test]
async fn latency_delays_and_a_fault_ends_by_itself() {
    let (proxy, addr, _) = serve().await;
    proxy.set_faults(
        &web(),
        vec![fault(
            FaultTarget::Service,
            FaultKind::Latency {
                fixed: Duration::from_millis(300),
                jitter: Duration::ZERO,
            },
            Duration::from_millis(1500),
        )],
    );
    for http10 in [false, true] {
        let t = Instant::now();
        assert_eq!(request(addr, "/", None, http10).await.0, 200);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
    }
    // Past its end the fault is ignored, though nobody cleared it.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let t = Instant::now();
    assert_eq!(get(addr, "/", None).await.0, 200);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn resets_and_blackholes_give_no_answer() {
    let (proxy, addr, metrics) = serve().await;
    let inst = FaultTarget::Instance(InstanceId::new("web-v1-1"));
    proxy.set_faults(
        &web(),
        vec![fault(
            inst.clone(),
            FaultKind::Reset { rate: 1.0 },
            Duration::from_secs(60),
        )],
    );
    let before = metrics.snapshot(&web(), &Version::new("v1"));
    assert_eq!(get(addr, "/", None).await.0, 0, "reset: no answer");
    assert_eq!(
        request(addr, "/", None, true).await.0,
        0,
        "reset on hyper's path"
    );
    let w = metrics
        .snapshot(&web(), &Version::new("v1"))
        .window_since(Some(&before));
    assert_eq!(w.errors, 2);
    proxy.set_faults(
        &web(),
        vec![fault(
            inst,
            FaultKind::Blackhole,
            Duration::from_millis(700),
        )],
    );
    let t = Instant::now();
    assert_eq!(get(addr, "/", None).await.0, 0, "blackhole: no answer");
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(600),
        "held until the fault ended: {held:?}"
    );
    assert_eq!(get(addr, "/", None).await, (200, "hello from v1".into()));
}

#[tokio::test]
async fn a_bandwidth_cap_paces_the_answer() {
    let (proxy, addr, _) = serve().await;
    proxy.set_faults(
        &web(),
        vec![fault(
            FaultTarget::Service,
            FaultKind::Bandwidth {
                bytes_per_sec: 40_000,
            },
            Duration::from_secs(60),
        )],
    );
    // Both request paths: HTTP/1.1 on the fast path, HTTP/1.0 through hyper's.
    for http10 in [false, true] {
        let t = Instant::now();
        let (s, body) = request(addr, "/big", None, http10).await;
        assert_eq!((s, body.len()), (200, 20_000), "HTTP/1.0: {http10}");
        // 20 kB at 40 kB/s: half a second at least.
        assert!(
            t.elapsed() >= Duration::from_millis(450),
            "HTTP/1.0: {http10}: {:?}",
            t.elapsed()
        );
    }
}

#[tokio::test]
async fn a_dependency_hop_relays_and_its_faults_slow_or_cut_it() {
    let up = upstream("db").await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let proxy = Proxy::new(Metrics::new(), tx);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hop = l.local_addr().unwrap();
    let db = ServiceName::new("db");
    let p = proxy.clone();
    let name = db.clone();
    tokio::spawn(async move {
        p.serve_dependency(name, l, up, std::future::pending())
            .await
    });
    assert_eq!(get(hop, "/", None).await, (200, "hello from db".into()));
    // A connection opened before the fault is slowed too: faults apply per chunk.
    let mut s = TcpStream::connect(hop).await.unwrap();
    proxy.set_faults(
        &db,
        vec![fault(
            FaultTarget::Service,
            FaultKind::Latency {
                fixed: Duration::from_millis(200),
                jitter: Duration::ZERO,
            },
            Duration::from_secs(60),
        )],
    );
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("hello from db"));
    // Both directions pass the hop: 200 ms each way.
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    proxy.set_faults(
        &db,
        vec![fault(
            FaultTarget::Service,
            FaultKind::Reset { rate: 1.0 },
            Duration::from_secs(60),
        )],
    );
    s.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "reset: {r:?}");
    proxy.set_faults(&db, Vec::new());
    assert_eq!(get(hop, "/", None).await, (200, "hello from db".into()));
}
