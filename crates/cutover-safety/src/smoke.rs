//! Built-in smoke checks (`[[services.X.smoke]]`): one HTTP request to one candidate
//! instance, straight to its own address, so only the candidate ever sees it.
//!
//! The answer must have the expected status (any 2xx by default) and, if asked, contain a
//! text; at most 1 MiB of the body is read. The result says what was asked, of which
//! instance, what came back and how long it took.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_core::SmokeCheck;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::command::secs;

/// The most of a body read to look for `body_contains`.
const BODY_MAX: usize = 1024 * 1024;

/// What one check against one instance gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmokeResult {
    pub ok: bool,
    /// One sentence: `GET /api/menu on 127.0.0.1:4242 → 200 in 12ms`.
    pub message: String,
    pub duration: Duration,
}

/// Sends `check` to the instance at `addr`.
pub async fn check(addr: SocketAddr, check: &SmokeCheck) -> SmokeResult {
    let started = Instant::now();
    let what = format!("{} {} on {addr}", check.method, check.path);
    let r = tokio::time::timeout(check.timeout, ask(addr, check)).await;
    let duration = started.elapsed();
    let took = secs(duration);
    let fail = |why: String| SmokeResult {
        ok: false,
        message: format!("{what}: {why}"),
        duration,
    };
    let (status, body) = match r {
        Err(_) => return fail(format!("no answer within {}", secs(check.timeout))),
        Ok(Err(e)) => return fail(e),
        Ok(Ok(answer)) => answer,
    };
    let status_ok = match check.status {
        Some(want) => status == want,
        None => (200..300).contains(&status),
    };
    let excerpt = || {
        let text = String::from_utf8_lossy(&body);
        let t: String = text.trim().chars().take(200).collect();
        if t.is_empty() {
            "an empty body".to_owned()
        } else {
            format!("body {t:?}")
        }
    };
    if !status_ok {
        let want = check
            .status
            .map_or_else(|| "a 2xx".to_owned(), |s| s.to_string());
        return fail(format!(
            "answered {status} in {took}, expected {want}; {}",
            excerpt()
        ));
    }
    if let Some(text) = &check.body_contains
        && !String::from_utf8_lossy(&body).contains(text.as_str())
    {
        return fail(format!(
            "answered {status} in {took}, but the body does not contain {text:?}; {}",
            excerpt()
        ));
    }
    let contains = check
        .body_contains
        .as_ref()
        .map(|t| format!(", body contains {t:?}"))
        .unwrap_or_default();
    SmokeResult {
        ok: true,
        message: format!("{what} → {status} in {took}{contains}"),
        duration,
    }
}

async fn ask(addr: SocketAddr, check: &SmokeCheck) -> Result<(u16, Vec<u8>), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(check.method.as_str())
        .uri(check.path.as_str());
    let has_host = check
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("host"));
    if !has_host {
        req = req.header("host", addr.to_string());
    }
    req = req.header("user-agent", "cutover-smoke");
    for (k, v) in &check.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("the request failed: {e}"))?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while bytes.len() < BODY_MAX {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(format!("reading the body failed: {e}")),
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    bytes.extend_from_slice(d);
                }
            }
        }
    }
    driver.abort();
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-answer server: every connection gets `answer` verbatim.
    async fn server(answer: &'static str) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn menu(status: Option<u16>, contains: Option<&str>) -> SmokeCheck {
        SmokeCheck {
            path: "/api/menu".into(),
            method: "GET".into(),
            status,
            body_contains: contains.map(str::to_owned),
            headers: vec![("Accept".into(), "application/json".into())],
            timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn status_and_body_are_checked() {
        let ok = server("HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"menu\":[1,2]}").await;
        let r = check(ok, &menu(None, Some("menu"))).await;
        assert!(r.ok, "{r:?}");
        assert!(r.message.contains("→ 200"), "{}", r.message);
        let r = check(ok, &menu(Some(201), None)).await;
        assert!(!r.ok);
        assert!(r.message.contains("expected 201"), "{}", r.message);
        let r = check(ok, &menu(None, Some("pizza"))).await;
        assert!(!r.ok);
        assert!(
            r.message.contains("does not contain \"pizza\""),
            "{}",
            r.message
        );
        let bad = server("HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom").await;
        let r = check(bad, &menu(None, None)).await;
        assert!(!r.ok);
        assert!(r.message.contains("answered 500"), "{}", r.message);
        assert!(
            r.message.contains("expected a 2xx; body \"boom\""),
            "{}",
            r.message
        );
    }

    #[tokio::test]
    async fn nothing_listening_or_no_answer_fails_clearly() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = check(addr, &menu(None, None)).await;
        assert!(!r.ok);
        assert!(r.message.contains("cannot connect"), "{}", r.message);
        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut keep = Vec::new();
            loop {
                let (s, _) = silent.accept().await.unwrap();
                keep.push(s);
            }
        });
        let mut c = menu(None, None);
        c.timeout = Duration::from_millis(200);
        let r = check(addr, &c).await;
        assert!(
            r.message.contains("no answer within 200ms"),
            "{}",
            r.message
        );
    }
}
