//! The CLI's HTTP client for the daemon's API: finds the address and token from the config,
//! says who is acting (`user@host`, for the rollout's record), and turns HTTP failures into the
//! exit codes of docs/reference.md §9.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cutover_api::wire::ErrorBody;
use cutover_config::Settings;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::exit::{CliError, CliResult, Code};

#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    token: String,
    actor: String,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    /// A client for the daemon the settings describe. The token comes from `CUTOVER_TOKEN` or
    /// the daemon's token file.
    pub fn new(settings: &Settings) -> CliResult<Client> {
        let token = match std::env::var("CUTOVER_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => {
                let path = settings.daemon.state_dir.join("token");
                std::fs::read_to_string(&path)
                    .map_err(|e| {
                        CliError::new(
                            Code::Unreachable,
                            format!(
                                "cannot read the API token at {} ({e}); start the daemon with `cutover up` or set CUTOVER_TOKEN",
                                path.display()
                            ),
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Client::with_token(settings.daemon.api, token))
    }

    pub fn with_token(addr: SocketAddr, token: String) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        connector.set_nodelay(true);
        Client {
            addr,
            token,
            actor: actor(),
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> CliResult<T> {
        let v = self.request(hyper::Method::GET, path, None).await?;
        decode(path, v)
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> CliResult<T> {
        let v = self.request(hyper::Method::POST, path, Some(body)).await?;
        decode(path, v)
    }

    /// One API call; the body is JSON both ways. Errors carry the API's own message.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> CliResult<serde_json::Value> {
        let uri = format!("http://{}{}", self.addr, path);
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(&uri)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                cutover_api::wire::ACTOR_HEADER,
                hyper::header::HeaderValue::from_bytes(self.actor.as_bytes())
                    .unwrap_or(hyper::header::HeaderValue::from_static("unknown")),
            )
            .body(Full::new(bytes))
            .map_err(|e| CliError::new(Code::Usage, format!("bad request to {uri}: {e}")))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.http.request(req))
            .await
            .map_err(|_| CliError::new(Code::Unreachable, format!("the cutover daemon at {} did not answer within 30s", self.addr)))?
            .map_err(|e| {
                CliError::new(
                    Code::Unreachable,
                    format!(
                        "cannot reach the cutover daemon at {} ({}); is `cutover up` running with this config?",
                        self.addr,
                        root_cause(&e)
                    ),
                )
            })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| {
                CliError::new(
                    Code::Unreachable,
                    format!("the daemon's answer broke off: {e}"),
                )
            })?
            .to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                CliError::new(
                    Code::Failure,
                    format!("the daemon answered {path} with invalid JSON: {e}"),
                )
            });
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        let code = match status.as_u16() {
            401 | 403 => Code::Unreachable,
            409 => Code::Conflict,
            400 | 404 | 422 => Code::Usage,
            _ => Code::Failure,
        };
        Err(CliError::new(code, message))
    }
}

/// Who runs this CLI, for the record: `CUTOVER_ACTOR` when set (a CI job can name itself),
/// else `user@host` from `USER`/`LOGNAME` and the kernel's hostname.
pub fn actor() -> String {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(a) = var("CUTOVER_ACTOR") {
        return a;
    }
    let user = var("USER")
        .or_else(|| var("LOGNAME"))
        .or_else(user_from_uid)
        .unwrap_or_else(|| "unknown".into());
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_owned())
        .find(|h| !h.is_empty())
        .or_else(|| var("HOSTNAME"))
        .unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// The login name of this process's real uid, for when `USER` and `LOGNAME` are unset (cron,
/// containers, some service managers): from /proc and /etc/passwd, else `uid<N>`.
fn user_from_uid() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_owned();
    let named = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid).then(|| name.to_owned())
        })
    });
    Some(named.unwrap_or_else(|| format!("uid{uid}")))
}

fn decode<T: DeserializeOwned>(path: &str, v: serde_json::Value) -> CliResult<T> {
    serde_json::from_value(v)
        .map_err(|e| CliError::new(Code::Failure, format!("unexpected answer from {path}: {e}")))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_os_user_is_found_without_user_or_logname() {
        // Linux keeps the real uid in /proc: its name from /etc/passwd, or `uid<N>`.
        let name = user_from_uid().unwrap();
        assert!(!name.is_empty() && !name.contains(':'), "{name}");
        let a = actor();
        assert!(
            std::env::var_os("CUTOVER_ACTOR").is_some() || a.contains('@'),
            "{a}"
        );
    }
}
