//! Token checks for the API and the dashboard.
//!
//! The token is compared in constant time so response timing reveals nothing about it. The
//! dashboard keeps it in an HttpOnly, SameSite=Strict cookie, so page scripts cannot read it and
//! other sites cannot make a logged-in browser send it.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::ApiState;
use crate::routes::error;

pub const COOKIE: &str = "cutover_token";

pub fn token_matches(given: &str, expected: &str) -> bool {
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// The token a request presents, from `Authorization: Bearer` or the dashboard cookie.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Who is acting, for the record (rollout `started_by`/`ended_by`, event messages).
///
/// The dashboard's session (the cookie, no bearer header) is `dashboard`, whatever it sends;
/// an API client names itself in [`ACTOR_HEADER`](crate::wire::ACTOR_HEADER) (the CLI sends
/// `user@host`); anything else is `api`. The name is a label the token holder chooses, not an
/// identity cutover checks: it is kept printable and short so it cannot garble logs or pages.
pub fn actor(headers: &HeaderMap) -> String {
    if headers.get(header::AUTHORIZATION).is_none() && presented(headers).is_some() {
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

pub fn authorised(headers: &HeaderMap, token: &str) -> bool {
    presented(headers).is_some_and(|t| token_matches(&t, token))
}

/// Middleware for the API routes: 401 with a JSON error unless the token is right.
pub async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    if authorised(req.headers(), &state.token) {
        return next.run(req).await;
    }
    let msg = if presented(req.headers()).is_some() {
        "the token is wrong; use the one in .cutover/token beside the config (or CUTOVER_TOKEN)"
    } else {
        "this route needs `Authorization: Bearer <token>`; the token is in .cutover/token beside the config"
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, "unauthorized", msg).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources() {
        let mut h = HeaderMap::new();
        assert!(!authorised(&h, "abc"));
        h.insert(header::COOKIE, "a=b; cutover_token=abc".parse().unwrap());
        assert!(authorised(&h, "abc"));
        h.insert(header::AUTHORIZATION, "Bearer abd".parse().unwrap());
        assert!(
            !authorised(&h, "abc"),
            "a wrong bearer is not rescued by a cookie"
        );
        assert!(!token_matches("ab", "abc"));
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
        d.insert(header::COOKIE, "cutover_token=abc".parse().unwrap());
        d.insert(crate::wire::ACTOR_HEADER, "someone@else".parse().unwrap());
        assert_eq!(actor(&d), "dashboard");
    }
}
