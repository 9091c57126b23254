//! `[notify] webhook`: posts every recorded rollout event as JSON to a URL.
//!
//! It reads the controller's broadcast of events, so it can never block a decision: if the
//! webhook is slow, this task falls behind, and past the broadcast buffer it skips events (and
//! says how many) rather than holding anything up. Each post is retried with exponential backoff.

use std::time::Duration;

use bytes::Bytes;
use cutover_api::wire;
use cutover_controller::Controller;
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use tokio::sync::broadcast::error::RecvError;

/// Attempts per event, and the first and largest pause between them.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until the controller's event stream closes.
pub async fn webhook(url: hyper::Uri, controller: Controller) {
    let client: HyperClient<_, Full<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build_http();
    let mut events = controller.subscribe();
    loop {
        let notice = match events.recv().await {
            Ok(n) => n,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "webhook is behind; skipped events");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let mut e = wire::Event::from(&notice.event);
        e.phase = Some(notice.phase.as_str().to_owned());
        let Ok(body) = serde_json::to_vec(&e) else {
            continue;
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match post(&client, &url, body.clone()).await {
                Ok(()) => break,
                Err(why) if attempt == ATTEMPTS => {
                    tracing::warn!(event = e.id, %why, "webhook gave up after {ATTEMPTS} attempts");
                }
                Err(why) => {
                    tracing::debug!(event = e.id, %why, attempt, "webhook failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

async fn post(
    client: &HyperClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &hyper::Uri,
    body: Vec<u8>,
) -> Result<(), String> {
    let req = hyper::Request::post(url.clone())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("cutover/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", resp.status()))
    }
}
