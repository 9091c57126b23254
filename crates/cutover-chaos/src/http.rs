//! A minimal HTTP/1.1 client for probes: one request per connection (`Connection: close`),
//! the status and the first 64 KiB of the body. Enough to ask cutover's own listeners and
//! instances on loopback; never a general client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of a body kept for a `body_contains` check.
const MAX_BODY: usize = 64 * 1024;

/// An `http://host:port/path` URL, split.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_owned()))
}

/// Sends one request and reads the answer: `(status, body)`.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(u16, String), String> {
    let once = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cutover-probe\r\nConnection: close\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {addr}: {e}"))?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_BODY {
                        break;
                    }
                }
                Err(e) if buf.is_empty() => return Err(format!("{addr} broke off: {e}")),
                Err(_) => break,
            }
        }
        parse(&buf).ok_or_else(|| format!("{addr} sent no HTTP answer"))
    };
    tokio::time::timeout(timeout, once)
        .await
        .map_err(|_| format!("no answer from {addr} within {}ms", timeout.as_millis()))?
}

/// Sends one request to a socket address.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    request(&addr.to_string(), "GET", path, &[], timeout).await
}

fn parse(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_answers_are_split() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/a?b").unwrap(),
            ("127.0.0.1:8080".into(), "/a?b".into())
        );
        assert_eq!(
            split_url("http://localhost").unwrap(),
            ("localhost:80".into(), "/".into())
        );
        assert!(split_url("https://x/").is_err());
        assert_eq!(
            parse(b"HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\nbusy"),
            Some((503, "busy".into()))
        );
        assert_eq!(parse(b"garbage"), None);
    }
}
