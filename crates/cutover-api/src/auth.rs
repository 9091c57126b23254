//! Who may call the API, and how the dashboard's browser sessions are kept from being ridden.
//!
//! Two ways in. An API client (the CLI, scripts) sends `Authorization: Bearer <token>`; a
//! browser cannot be made to send that header by another page (it would need a CORS preflight
//! this server never grants), so bearer requests need nothing more. The dashboard logs in once
//! with the token and gets a cookie holding a random session id, never the token: the sessions
//! live in this process only, expire, and end at logout.
//!
//! A cookie is sent by the browser whoever built the request, and `SameSite=Strict` does not
//! help against a page on another port of the same host (same site, other origin). So every
//! cookie-authenticated request that changes state must also carry the session's CSRF token in
//! [`CSRF_HEADER`] (only the dashboard's own pages can read it) and come from the dashboard's
//! own origin: `Sec-Fetch-Site: same-origin`, or, from a browser that does not send that, an
//! `Origin` whose host matches `Host`. Tokens are compared in constant time so response timing
//! reveals nothing about them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::ApiState;
use crate::routes::error;

/// The dashboard's session cookie: a random id, looked up in [`Sessions`].
pub const COOKIE: &str = "cutover_session";
/// The header in which the dashboard's scripts send the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a dashboard session lasts after logging in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 60 * 60);
/// Sessions kept at most; logging in beyond this forgets the oldest (a bound on memory that
/// only someone holding the token could push against).
const MAX_SESSIONS: usize = 256;

pub fn token_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// 256 random bits as 64 hex characters.
fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Session {
    csrf: String,
    expires: Instant,
}

/// The dashboard's logged-in sessions: id → CSRF token and expiry. In memory only, so a
/// restart of the daemon logs every browser out, and nothing of them is ever on disk.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, Session>>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding this lock leaves the map whole: every change is one call.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new session: `(id, csrf token)`.
    pub fn create(&self) -> (String, String) {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => map.remove(&id),
                None => break,
            };
        }
        let (id, csrf) = (random_hex(), random_hex());
        map.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    /// The CSRF token of a live session; an expired one is forgotten.
    pub fn csrf(&self, id: &str) -> Option<String> {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.csrf.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// How a request authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// `Authorization: Bearer` with the right token.
    Bearer,
    /// The dashboard's cookie of a live session.
    Session { id: String, csrf: String },
}

/// Why a request is not let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Nothing,
    WrongToken,
    NoSession,
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Who is calling. A bearer header decides alone: a wrong one is not rescued by a cookie.
pub fn caller(headers: &HeaderMap, state: &ApiState) -> Result<Caller, Refused> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let given = v
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Refused::WrongToken)?;
        return if token_matches(given, &state.token) {
            Ok(Caller::Bearer)
        } else {
            Err(Refused::WrongToken)
        };
    }
    let id = cookie(headers).ok_or(Refused::Nothing)?;
    let csrf = state.sessions.csrf(&id).ok_or(Refused::NoSession)?;
    Ok(Caller::Session { id, csrf })
}

/// Whether a browser says this request comes from the dashboard's own origin. `Sec-Fetch-Site`
/// decides when present (every current browser sends it); otherwise `Origin` must name the
/// host the request was sent to. Neither is something a page can forge in a browser.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    if let Some(site) = get(header::HeaderName::from_static("sec-fetch-site")) {
        return site == "same-origin";
    }
    match (get(header::ORIGIN), get(header::HOST)) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// Whether a cookie-authenticated request that changes state is the dashboard's own: its
/// origin, and the session's CSRF token (from the header, or a form field for plain forms).
pub fn csrf_ok(headers: &HeaderMap, given: Option<&str>, csrf: &str) -> bool {
    let given = given.or_else(|| headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()));
    same_origin(headers) && given.is_some_and(|g| token_matches(g, csrf))
}

/// Who is acting, for the record (rollout `started_by`/`ended_by`, event messages).
///
/// The dashboard's session (the cookie, no bearer header) is `dashboard`, whatever it sends;
/// an API client names itself in [`ACTOR_HEADER`](crate::wire::ACTOR_HEADER) (the CLI sends
/// `user@host`); anything else is `api`. The name is a label the token holder chooses, not an
/// identity cutover checks: it is kept printable and short so it cannot garble logs or pages.
pub fn actor(headers: &HeaderMap) -> String {
    if headers.get(header::AUTHORIZATION).is_none() && cookie(headers).is_some() {
        return "dashboard".to_owned();
    }
    // Lossy rather than `to_str`, so a name such as `josé@host` is kept.
    let named: String = headers
        .get(crate::wire::ACTOR_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    match named.trim() {
        "" => "api".to_owned(),
        n => n.to_owned(),
    }
}

/// Middleware for the API routes: 401 unless the caller is known; 403 for a cookie-borne
/// request that changes state without the dashboard's origin and CSRF token.
pub async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let msg = match caller(req.headers(), &state) {
        Ok(Caller::Bearer) => return next.run(req).await,
        Ok(Caller::Session { csrf, .. }) => {
            let reads = matches!(*req.method(), Method::GET | Method::HEAD);
            if reads || csrf_ok(req.headers(), None, &csrf) {
                return next.run(req).await;
            }
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a dashboard session can change state only from the dashboard's own pages \
                 (same origin, with its CSRF token); API clients send `Authorization: Bearer <token>`",
            )
            .into_response();
        }
        Err(Refused::WrongToken) => {
            "the token is wrong; use the one in .cutover/token beside the config (or CUTOVER_TOKEN)"
        }
        Err(Refused::NoSession) => {
            "the dashboard session has expired or was logged out; log in again at /login"
        }
        Err(Refused::Nothing) => {
            "this route needs `Authorization: Bearer <token>`; the token is in .cutover/token beside the config"
        }
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", msg).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Headers on every answer: no page of another origin may frame the dashboard (a framed
/// button can be clicked through a decoy), and browsers must not guess content types.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (k, v) in [
        ("x-frame-options", "DENY"),
        ("content-security-policy", "frame-ancestors 'none'"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
    ] {
        h.insert(
            header::HeaderName::from_static(k),
            header::HeaderValue::from_static(v),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::default();
        let (id, csrf) = s.create();
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert_eq!(s.csrf(&id).as_deref(), Some(csrf.as_str()));
        s.end(&id);
        assert_eq!(s.csrf(&id), None);
        let (id, _) = s.create();
        if let Some(x) = s.lock().get_mut(&id) {
            x.expires = Instant::now();
        }
        assert_eq!(s.csrf(&id), None, "expired");
        for _ in 0..MAX_SESSIONS + 5 {
            s.create();
        }
        assert!(s.lock().len() <= MAX_SESSIONS);
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(!same_origin(&h), "nothing said: refused");
        h.insert(header::HOST, "127.0.0.1:9000".parse().unwrap());
        h.insert(header::ORIGIN, "http://127.0.0.1:9000".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!same_origin(&h), "another port is another origin");
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert("sec-fetch-site", "same-site".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h));
        assert!(csrf_ok(&h, Some("abc"), "abc"));
        assert!(!csrf_ok(&h, Some("abd"), "abc"));
        assert!(!csrf_ok(&h, None, "abc"));
        h.insert(CSRF_HEADER, "abc".parse().unwrap());
        assert!(csrf_ok(&h, None, "abc"));
    }

    #[test]
    fn actors() {
        let mut h = HeaderMap::new();
        assert_eq!(actor(&h), "api");
        h.insert(crate::wire::ACTOR_HEADER, "ana@build-1".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(actor(&h), "ana@build-1");
        h.insert(crate::wire::ACTOR_HEADER, " a\tb ".parse().unwrap());
        assert_eq!(actor(&h), "ab", "control characters are dropped");
        h.insert(crate::wire::ACTOR_HEADER, "x".repeat(300).parse().unwrap());
        assert_eq!(actor(&h).len(), 100);
        // The dashboard's session is the dashboard, whatever the page claims.
        let mut d = HeaderMap::new();
        d.insert(header::COOKIE, "cutover_session=abc".parse().unwrap());
        d.insert(crate::wire::ACTOR_HEADER, "someone@else".parse().unwrap());
        assert_eq!(actor(&d), "dashboard");
    }
}
