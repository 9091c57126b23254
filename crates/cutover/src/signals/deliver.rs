//! Sending notifications to receivers: HTTP(S) POSTs for webhook, Slack and PagerDuty, SMTP
//! with STARTTLS (lettre, rustls) for email.
//!
//! Each notification is sent by a task of its own on the signals thread, with retries and
//! exponential backoff, so a slow or failing receiver holds up neither the next evaluation nor
//! any other receiver, and never the controller (which runs on another thread). The outcome of
//! the last attempt goes back to the signals task, which keeps the receiver's record and lets
//! the group notify again at its next `group_interval` after a failure.
//!
//! Secrets (routing keys, a Slack URL, an SMTP password) are read from their environment
//! variables when a notification is sent and are never logged: errors about a URL from the
//! environment name the variable, not the URL.

use std::time::Duration;

use bytes::Bytes;
use cutover_config::signals::{ReceiverKind, ReceiverSettings, UrlSource};
use cutover_signals::payload;
use cutover_signals::route::Notification;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::series::now;
use cutover_core::Timestamp;

/// Attempts per notification, the first pause between them (doubled each time) and the
/// longest; each attempt gets `ATTEMPT_TIMEOUT`.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a notification ended.
#[derive(Debug)]
pub struct Outcome {
    pub receiver: String,
    pub group_key: String,
    /// `None` on success; otherwise the last attempt's error.
    pub error: Option<String>,
    pub attempts: u32,
    pub at: Timestamp,
    /// The group's `service` label, for the event a failure records.
    pub service: Option<String>,
}

type Https = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
pub struct Deliverer {
    http: Https,
    receivers: Vec<ReceiverSettings>,
    external_url: String,
    outcomes: mpsc::UnboundedSender<Outcome>,
}

impl Deliverer {
    pub fn new(
        receivers: Vec<ReceiverSettings>,
        external_url: String,
        outcomes: mpsc::UnboundedSender<Outcome>,
    ) -> Deliverer {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Deliverer {
            http: HyperClient::builder(TokioExecutor::new()).build(https),
            receivers,
            external_url,
            outcomes,
        }
    }

    /// Whether `receiver` wants resolved notifications.
    pub fn send_resolved(&self, receiver: &str) -> bool {
        self.receivers
            .iter()
            .find(|r| r.name == receiver)
            .is_some_and(|r| r.send_resolved)
    }

    /// Sends `n` in the background; its outcome comes back on the outcomes channel.
    pub fn send(&self, n: Notification) {
        let Some(r) = self
            .receivers
            .iter()
            .find(|r| r.name == n.receiver)
            .cloned()
        else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            let mut attempt = 0;
            let error = loop {
                attempt += 1;
                let r = tokio::time::timeout(ATTEMPT_TIMEOUT, me.attempt(&r, &n))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
                match r {
                    Ok(()) => break None,
                    Err(e) if attempt >= ATTEMPTS => break Some(e),
                    Err(e) => {
                        tracing::debug!(receiver = %n.receiver, attempt, error = %e, "notification failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            };
            let _ = me.outcomes.send(Outcome {
                receiver: n.receiver.clone(),
                group_key: n.group_key.clone(),
                error,
                attempts: attempt,
                at: now(),
                service: n.common_labels().get("service").cloned(),
            });
        });
    }

    async fn attempt(&self, r: &ReceiverSettings, n: &Notification) -> Result<(), String> {
        match &r.kind {
            ReceiverKind::Webhook { url } => {
                let body = payload::webhook(n, &self.external_url);
                self.post(url, &body).await
            }
            ReceiverKind::Slack { url } => {
                let body = payload::slack(n, &self.external_url);
                self.post(url, &body).await
            }
            ReceiverKind::PagerDuty {
                url,
                routing_key_env,
            } => {
                let key = secret(routing_key_env)?;
                let body = payload::pagerduty(n, &key, &self.external_url);
                self.post(&UrlSource::Url(url.clone()), &body).await
            }
            ReceiverKind::Email {
                smtp,
                from,
                to,
                username,
                password_env,
                require_tls,
                ca_file,
            } => {
                email(
                    n,
                    &self.external_url,
                    EmailTo {
                        smtp,
                        from,
                        to,
                        username: username.as_deref(),
                        password_env: password_env.as_deref(),
                        require_tls: *require_tls,
                        ca_file: ca_file.as_deref(),
                    },
                )
                .await
            }
        }
    }

    async fn post(&self, url: &UrlSource, body: &serde_json::Value) -> Result<(), String> {
        // A URL from the environment is a secret (a Slack webhook's path is its key).
        let (uri, shown) = match url {
            UrlSource::Url(u) => (u.clone(), u.clone()),
            UrlSource::Env(e) => (secret(e)?, format!("${e}")),
        };
        let req = hyper::Request::post(&uri)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("cutover/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|_| format!("{shown} is not a URL"))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| format!("POST {shown}: {}", root_cause(&e)))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("POST {shown} answered {status}"))
        }
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn secret(env: &str) -> Result<String, String> {
    match std::env::var(env) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => Err(format!("the environment variable {env} is not set")),
    }
}

struct EmailTo<'a> {
    smtp: &'a str,
    from: &'a str,
    to: &'a [String],
    username: Option<&'a str>,
    password_env: Option<&'a str>,
    require_tls: bool,
    ca_file: Option<&'a std::path::Path>,
}

async fn email(n: &Notification, external_url: &str, e: EmailTo<'_>) -> Result<(), String> {
    use lettre::message::header::ContentType;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let (host, port) = e
        .smtp
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("smtp {:?} is not host:port", e.smtp))?;
    let mut msg = Message::builder()
        .from(
            e.from
                .parse()
                .map_err(|err| format!("from {:?}: {err}", e.from))?,
        )
        .subject(payload::email_subject(n))
        .header(ContentType::TEXT_PLAIN);
    for to in e.to {
        msg = msg.to(to.parse().map_err(|err| format!("to {to:?}: {err}"))?);
    }
    let msg = msg
        .body(payload::email_body(n, external_url))
        .map_err(|err| format!("cannot build the message: {err}"))?;
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .timeout(Some(ATTEMPT_TIMEOUT));
    if e.require_tls {
        let mut tls = TlsParameters::builder(host.to_owned());
        if let Some(ca) = e.ca_file {
            let pem = tokio::fs::read(ca)
                .await
                .map_err(|err| format!("ca_file {}: {err}", ca.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|err| format!("ca_file {}: {err}", ca.display()))?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls
            .build_rustls()
            .map_err(|err| format!("TLS for {host}: {err}"))?;
        // STARTTLS, and only STARTTLS: a server that does not offer it gets no mail.
        b = b.tls(Tls::Required(tls));
    }
    if let (Some(user), Some(env)) = (e.username, e.password_env) {
        b = b.credentials(Credentials::new(user.to_owned(), secret(env)?));
    }
    let transport = b.build();
    transport
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|err| format!("SMTP {}: {}", e.smtp, root_cause(&err)))
}
