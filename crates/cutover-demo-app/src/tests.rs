//! Tests: option parsing, and the server over real loopback sockets with a hyper client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

use super::*;

fn opts() -> DemoOptions {
    DemoOptions {
        version: "v1".into(),
        instance: "web-v1-0".into(),
        error_rate: 0.0,
        latency: Duration::ZERO,
        fail_health: false,
    }
}

/// A running demo app: its address, the trigger that stops it, and its task.
struct Server {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(opts: DemoOptions, started: Option<Arc<Notify>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        opts,
        async move {
            let _ = stopped.await;
        },
        started,
    ));
    Server { addr, stop, task }
}

/// One keep-alive client connection.
async fn connect(addr: std::net::SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Status, content type and body of `GET path`.
async fn get(client: &mut SendRequest<Empty<Bytes>>, path: &str) -> (u16, String, String) {
    client.ready().await.expect("connection ready");
    let req = Request::get(path)
        .header("host", "demo")
        .body(Empty::new())
        .expect("request");
    let resp = client.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        ctype,
        String::from_utf8(body.to_vec()).expect("utf-8"),
    )
}

#[tokio::test]
async fn answers_root_healthz_and_unknown_paths() {
    let server = start(opts(), None).await;
    let mut c = connect(server.addr).await;
    // All on one connection: keep-alive must hold across answers of every kind.
    let cases = [
        (
            "/",
            200,
            "application/json",
            r#"{"version":"v1","instance":"web-v1-0"}"#,
        ),
        ("/healthz", 200, "text/plain", "ok"),
        ("/nope", 404, "text/plain", "not found"),
        (
            "/?q=1",
            200,
            "application/json",
            r#"{"version":"v1","instance":"web-v1-0"}"#,
        ),
    ];
    for (path, status, ctype, body) in cases {
        assert_eq!(
            get(&mut c, path).await,
            (status, ctype.to_owned(), body.to_owned()),
            "GET {path}"
        );
    }
    let _ = server.stop.send(());
    server.task.await.expect("join").expect("run");
}

#[tokio::test]
async fn fail_health_answers_503_but_still_serves_root() {
    let server = start(
        DemoOptions {
            fail_health: true,
            ..opts()
        },
        None,
    )
    .await;
    let mut c = connect(server.addr).await;
    assert_eq!(get(&mut c, "/healthz").await.0, 503);
    assert_eq!(get(&mut c, "/").await.0, 200);
}

/// Counts 500s among `n` requests of `GET /` at `error_rate`, checking every answer's body.
async fn count_errors(error_rate: f64, n: usize) -> usize {
    let server = start(
        DemoOptions {
            error_rate,
            ..opts()
        },
        None,
    )
    .await;
    let mut c = connect(server.addr).await;
    let mut errors = 0;
    for _ in 0..n {
        match get(&mut c, "/").await {
            (200, _, body) => assert_eq!(body, r#"{"version":"v1","instance":"web-v1-0"}"#),
            (500, ctype, body) => {
                assert_eq!(ctype, "application/json");
                assert_eq!(body, r#"{"error":"injected failure","version":"v1"}"#);
                errors += 1;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    errors
}

#[tokio::test]
async fn error_rate_zero_and_one_are_exact() {
    assert_eq!(count_errors(0.0, 300).await, 0);
    assert_eq!(count_errors(1.0, 300).await, 300);
}

#[tokio::test]
async fn error_rate_one_half_fails_about_half() {
    // Binomial(2000, 0.5) has a standard deviation of about 22; 35%..65% is 13 of them away,
    // so this bound cannot be missed by chance, yet a broken generator (always, never, or a
    // wrong comparison) is caught.
    let errors = count_errors(0.5, 2000).await;
    assert!((700..=1300).contains(&errors), "{errors} of 2000 failed");
}

#[tokio::test]
async fn latency_delays_root_only() {
    let latency = Duration::from_millis(40);
    let server = start(DemoOptions { latency, ..opts() }, None).await;
    let mut c = connect(server.addr).await;
    let t = Instant::now();
    assert_eq!(get(&mut c, "/").await.0, 200);
    // Only a lower bound: an upper one would flake on a loaded machine.
    assert!(t.elapsed() >= latency, "{:?}", t.elapsed());
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    // The server gets a runtime of its own that is dropped as soon as `serve` returns, which
    // kills any connection task still running: the slow request can only succeed if `serve`
    // itself waited for it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let started = Arc::new(Notify::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let signal = started.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let result = rt.block_on(async move {
            let listener = TcpListener::from_std(listener)?;
            let opts = DemoOptions {
                latency: Duration::from_millis(300),
                ..opts()
            };
            serve(
                listener,
                opts,
                async move {
                    let _ = stopped.await;
                },
                Some(signal),
            )
            .await
        });
        drop(rt);
        result
    });

    let mut c = connect(addr).await;
    // An idle keep-alive connection must not hold the shutdown up.
    let mut idle = connect(addr).await;
    assert_eq!(get(&mut idle, "/healthz").await.0, 200);

    let slow = tokio::spawn(async move { get(&mut c, "/").await });
    started.notified().await;
    let _ = stop.send(());
    let (status, _, body) = slow.await.expect("join");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"version":"v1","instance":"web-v1-0"}"#);
    let result = tokio::task::spawn_blocking(move || server.join())
        .await
        .expect("join")
        .expect("server thread");
    result.expect("run returns Ok");
    // Stopped accepting: nothing listens on the port any more.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[test]
fn env_overrides_flags() {
    let mut o = opts();
    let env = |k: &str| match k {
        "DEMO_ERROR_RATE" => Some("0.25".to_owned()),
        "DEMO_LATENCY" => Some("20ms".to_owned()),
        "DEMO_FAIL_HEALTH" => Some("yes".to_owned()),
        "CUTOVER_INSTANCE" => Some("web-v1-3".to_owned()),
        _ => None,
    };
    o.apply_env(env).expect("valid env");
    assert_eq!(
        (o.error_rate, o.latency, o.fail_health, o.instance.as_str()),
        (0.25, Duration::from_millis(20), true, "web-v1-3")
    );
}

#[test]
fn fail_health_spellings() {
    for (value, want) in [
        ("1", true),
        ("true", true),
        ("YES", true),
        ("0", false),
        ("false", false),
        ("no", false),
    ] {
        let mut o = DemoOptions {
            fail_health: !want,
            ..opts()
        };
        o.apply_env(|k| (k == "DEMO_FAIL_HEALTH").then(|| value.to_owned()))
            .expect("valid");
        assert_eq!(o.fail_health, want, "DEMO_FAIL_HEALTH={value}");
    }
}

#[test]
fn no_env_changes_nothing() {
    let mut o = opts();
    o.apply_env(|_| None).expect("valid");
    assert_eq!(o, opts());
}

#[test]
fn invalid_env_is_an_error_naming_the_variable() {
    for (var, value) in [
        ("DEMO_ERROR_RATE", "lots"),
        ("DEMO_ERROR_RATE", "1.5"),
        ("DEMO_ERROR_RATE", "-0.1"),
        ("DEMO_ERROR_RATE", "NaN"),
        ("DEMO_LATENCY", "soon"),
        ("DEMO_FAIL_HEALTH", "maybe"),
    ] {
        let mut o = opts();
        let err = o
            .apply_env(|k| (k == var).then(|| value.to_owned()))
            .expect_err("invalid");
        assert!(err.to_string().starts_with(var), "{err}");
        assert_eq!(o, opts(), "a bad value changes nothing");
    }
}

#[test]
fn json_escaping() {
    assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
}
