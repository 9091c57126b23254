//! cutover-api: the daemon's HTTP API (docs/reference.md §4), its authentication, the live event stream,
//! `/metrics` (also alone and without a token on the optional `[daemon] metrics` listener), and
//! the dashboard.
//!
//! Every route but `GET /healthz` and the login form requires the token as a bearer header, or
//! a dashboard session (a random id in an HttpOnly cookie, set by the login form); a session
//! changes state only from the dashboard's own origin with its CSRF token (see `auth`). Bodies
//! are JSON, sent as `application/json`. Errors are JSON `{"error":{"code","message"}}`. This
//! crate translates between HTTP and the controller's handle; it must make no decision of its
//! own and holds no state beyond the token and the dashboard's sessions.

mod auth;
mod chaos;
mod dashboard;
mod routes;
pub mod signals;
pub mod wire;

use std::future::Future;
use std::sync::Arc;

use cutover_controller::Controller;
use cutover_metrics::Metrics;

pub use auth::Sessions;
pub use routes::{metrics_router, router};

/// What the API's handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub controller: Controller,
    pub metrics: Metrics,
    pub token: Arc<str>,
    /// The dashboard's logged-in browsers.
    pub sessions: Sessions,
    /// Faults and experiments (`None`: those routes answer 503).
    pub chaos: Option<cutover_chaos::Chaos>,
    /// SLOs, alerts and DORA (docs/reference.md §12); `None`: those routes answer 404.
    pub signals: Option<signals::Source>,
}

impl ApiState {
    pub fn new(controller: Controller, metrics: Metrics, token: &str) -> ApiState {
        ApiState {
            controller,
            metrics,
            token: Arc::from(token),
            sessions: Sessions::default(),
            chaos: None,
            signals: None,
        }
    }

    /// With faults and experiments.
    pub fn with_chaos(mut self, chaos: cutover_chaos::Chaos) -> ApiState {
        self.chaos = Some(chaos);
        self
    }

    /// The same state, with the daemon's signals behind the §10 routes.
    pub fn with_signals(mut self, source: signals::Source) -> ApiState {
        self.signals = Some(source);
        self
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves only `GET /metrics`, without a token, on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}
