//! cutover-proxy: the data plane. Users' traffic goes through here; it must be fast, exact and
//! never drop a request it could have served.
//!
//! Per service it accepts HTTP/1.1 on the service's listener (and the blue-green preview
//! listener), picks a version by exact weighted round robin from an immutable compiled table
//! swapped atomically ([`arc_swap`]), picks a healthy instance of it, and forwards the request
//! over a keep-alive pool of that instance. It probes instances actively, ejects them passively
//! on bursts of connect failures or failed answers, reports health changes, drains instances
//! that left the table, and records every answer in the metrics.
//!
//! It depends on the core and the metrics only: never on the controller, store, API or runtime.
//! If nobody publishes a new table, it keeps serving the last one.

mod accept;
mod backend;
mod exchange;
mod fast;
mod fault;
mod forward;
mod health;
mod hop;
mod limit;
mod table;
mod upstream;

pub use fault::{Draw, Fault, FaultKind, FaultTarget, Injection, Outcome, decide};
pub use limit::{FD_RESERVE, MIN_DEFAULT_CONNECTIONS, default_max_connections};

/// The hand-written HTTP/1.1 parsers with their invariants checked, for the fuzz targets
/// (`fuzz/`) and the seeded fuzz tests; not an API.
#[doc(hidden)]
pub use fast::fuzzing;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use cutover_core::{DataPlane, HealthChange, HealthSpec, InstanceId, RouteTable, ServiceName};
use cutover_metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::backend::Backends;
use crate::table::Compiled;

/// How one service is proxied.
#[derive(Clone, Debug)]
pub struct ServiceProxySpec {
    pub service: ServiceName,
    pub health: HealthSpec,
    /// Longest wait for an upstream's response headers before answering 504.
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    pub client: ClientTimeouts,
    /// Client connections kept open at most, the main and preview listeners' together (see
    /// `limit.rs`; [`default_max_connections`] when the config sets none).
    pub max_connections: usize,
}

/// How long the proxy waits on a client. A connection that waits longer is closed, so idle or
/// stalled clients cannot hold connections (and, mid-body, upstream connections) for ever.
#[derive(Clone, Copy, Debug)]
pub struct ClientTimeouts {
    /// A kept-alive connection with no request under way.
    pub idle: Duration,
    /// A request head, counted from its first byte (answered 408).
    pub head: Duration,
    /// Between two reads of a request body (answered 408).
    pub body: Duration,
}

impl Default for ClientTimeouts {
    /// nginx's `keepalive_timeout` (75 s) and `client_body_timeout` (60 s), and hyper's
    /// `header_read_timeout` (30 s).
    fn default() -> Self {
        ClientTimeouts {
            idle: Duration::from_secs(75),
            head: Duration::from_secs(30),
            body: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read the listener's address: {0}")]
    Listener(std::io::Error),
}

/// Everything the proxy keeps for one service.
pub(crate) struct ServiceState {
    pub(crate) name: ServiceName,
    pub(crate) table: ArcSwap<Compiled>,
    pub(crate) backends: Backends,
    /// The last published table, kept to recompile when health changes.
    pub(crate) source: std::sync::Mutex<RouteTable>,
    pub(crate) timeouts: std::sync::Mutex<(Duration, Duration)>,
    /// Faults injected into this service's requests (shared with the registry's updates).
    pub(crate) faults: Arc<fault::FaultSlot>,
}

struct Inner {
    metrics: Metrics,
    health_events: mpsc::UnboundedSender<HealthChange>,
    services: RwLock<HashMap<ServiceName, Arc<ServiceState>>>,
    /// Set before a hand-over to a new daemon: stopping then parks idle client connections
    /// instead of closing them.
    handing_over: std::sync::atomic::AtomicBool,
    parked: std::sync::Mutex<Vec<ParkedConn>>,
    /// Each service's and dependency's faults, by name; created on first use by whichever
    /// comes first, the service or a fault set for it.
    faults: RwLock<HashMap<ServiceName, Arc<fault::FaultSlot>>>,
}

/// A client connection between requests, parked for the daemon that takes over.
#[derive(Debug)]
pub struct ParkedConn {
    pub service: ServiceName,
    /// Accepted on the blue-green preview listener rather than the main one.
    pub preview: bool,
    pub stream: std::net::TcpStream,
}

/// Client connections a previous daemon handed over, served before anything is accepted.
#[derive(Debug, Default)]
pub struct Adopted {
    pub main: Vec<std::net::TcpStream>,
    pub preview: Vec<std::net::TcpStream>,
}

/// The data plane handle. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl Proxy {
    pub fn new(metrics: Metrics, health_events: mpsc::UnboundedSender<HealthChange>) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                metrics,
                health_events,
                services: RwLock::new(HashMap::new()),
                handing_over: std::sync::atomic::AtomicBool::new(false),
                parked: std::sync::Mutex::new(Vec::new()),
                faults: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Makes the next stop a hand-over: each client connection finishes the request under way
    /// and is parked at its next idle moment (see [`Proxy::take_parked`]) instead of closed.
    /// Connections that moved to hyper's path (upgrades, HTTP/1.0) still close gracefully.
    pub fn hand_over(&self) {
        self.inner
            .handing_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn handing_over(&self) -> bool {
        self.inner
            .handing_over
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn park(&self, service: &ServiceName, preview: bool, s: tokio::net::TcpStream) {
        match s.into_std() {
            Ok(stream) => {
                if let Ok(mut p) = self.inner.parked.lock() {
                    p.push(ParkedConn {
                        service: service.clone(),
                        preview,
                        stream,
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not park a client connection"),
        }
    }

    /// The connections parked by a hand-over, once the proxies have stopped.
    pub fn take_parked(&self) -> Vec<ParkedConn> {
        self.inner
            .parked
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Replaces every fault of a service or dependency with `faults` (empty: none). Each fault
    /// also stops applying at its own deadline.
    pub fn set_faults(&self, name: &ServiceName, faults: Vec<Fault>) {
        self.fault_slot(name).set(faults);
    }

    fn fault_slot(&self, name: &ServiceName) -> Arc<fault::FaultSlot> {
        if let Some(s) = self
            .inner
            .faults
            .read()
            .ok()
            .and_then(|f| f.get(name).cloned())
        {
            return s;
        }
        let mut f = match self.inner.faults.write() {
            Ok(f) => f,
            Err(p) => p.into_inner(),
        };
        f.entry(name.clone()).or_default().clone()
    }

    /// Relays TCP connections accepted on `listener` to `upstream` until `shutdown` resolves: a
    /// dependency hop (`[dependencies.NAME]`) that the faults set for `name` can slow or cut.
    pub async fn serve_dependency(
        &self,
        name: ServiceName,
        listener: TcpListener,
        upstream: std::net::SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        hop::serve(self.fault_slot(&name), listener, upstream, shutdown).await;
    }

    fn service(&self, name: &ServiceName) -> Option<Arc<ServiceState>> {
        self.inner
            .services
            .read()
            .ok()
            .and_then(|s| s.get(name).cloned())
    }

    /// The service's state, created on first use with `table` (by `serve` or `publish`,
    /// whichever comes first).
    fn service_or_insert(&self, table: &RouteTable) -> Arc<ServiceState> {
        if let Some(s) = self.service(&table.service) {
            return s;
        }
        let mut services = match self.inner.services.write() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let faults = self.fault_slot(&table.service);
        services
            .entry(table.service.clone())
            .or_insert_with(|| {
                let backends = Backends::default();
                let compiled = Compiled::build(
                    table,
                    &backends,
                    &self.inner.metrics,
                    Duration::from_secs(2),
                );
                Arc::new(ServiceState {
                    name: table.service.clone(),
                    table: ArcSwap::from_pointee(compiled),
                    backends,
                    source: std::sync::Mutex::new(table.clone()),
                    timeouts: std::sync::Mutex::new((
                        Duration::from_secs(30),
                        Duration::from_secs(2),
                    )),
                    faults,
                })
            })
            .clone()
    }

    /// Serves one service until `shutdown` resolves, then stops accepting and lets requests in
    /// flight finish.
    pub async fn serve(
        &self,
        spec: ServiceProxySpec,
        listener: TcpListener,
        preview: Option<TcpListener>,
        initial: RouteTable,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ProxyError> {
        self.serve_adopting(
            spec,
            listener,
            preview,
            initial,
            shutdown,
            Adopted::default(),
        )
        .await
    }

    /// [`Proxy::serve`], first serving client connections a previous daemon handed over.
    pub async fn serve_adopting(
        &self,
        spec: ServiceProxySpec,
        listener: TcpListener,
        preview: Option<TcpListener>,
        initial: RouteTable,
        shutdown: impl Future<Output = ()> + Send + 'static,
        adopted: Adopted,
    ) -> Result<(), ProxyError> {
        listener.local_addr().map_err(ProxyError::Listener)?;
        let state = self.service_or_insert(&initial);
        if let Ok(mut t) = state.timeouts.lock() {
            *t = (spec.upstream_timeout, spec.connect_timeout);
        }
        self.recompile(&state);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let checker = tokio::spawn(health::run(
            state.clone(),
            spec.health.clone(),
            self.clone(),
            stop_rx.clone(),
        ));
        let ctx = exchange::Ctx {
            state: state.clone(),
            proxy: self.clone(),
            upstream_timeout: spec.upstream_timeout,
            client: spec.client,
            limit: Arc::new(limit::Limit::new(
                &spec.service,
                spec.max_connections,
                self.inner.metrics.connections(&spec.service),
            )),
        };
        let preview_task = preview.map(|l| {
            tokio::spawn(accept::accept_loop(
                l,
                ctx.clone(),
                true,
                stop_rx.clone(),
                adopted.preview,
            ))
        });
        let main = tokio::spawn(accept::accept_loop(
            listener,
            ctx,
            false,
            stop_rx,
            adopted.main,
        ));
        shutdown.await;
        let _ = stop_tx.send(true);
        let _ = main.await;
        if let Some(p) = preview_task {
            let _ = p.await;
        }
        checker.abort();
        Ok(())
    }

    /// Rebuilds the compiled table of `state` from its last published table and current health.
    pub(crate) fn recompile(&self, state: &ServiceState) {
        let source = match state.source.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let connect_timeout = state
            .timeouts
            .lock()
            .map(|t| t.1)
            .unwrap_or(Duration::from_secs(2));
        let compiled = Compiled::build(
            &source,
            &state.backends,
            &self.inner.metrics,
            connect_timeout,
        );
        state.table.store(Arc::new(compiled));
    }

    pub(crate) fn report(&self, change: HealthChange) {
        let _ = self.inner.health_events.send(change);
    }
}

impl DataPlane for Proxy {
    fn publish(&self, table: RouteTable) {
        let state = self.service_or_insert(&table);
        match state.source.lock() {
            Ok(mut s) => *s = table,
            Err(p) => *p.into_inner() = table,
        }
        self.recompile(&state);
        state.backends.forget_drained();
    }

    fn inflight(&self, service: &ServiceName, instance: &InstanceId) -> u64 {
        self.service(service)
            .map(|s| s.backends.inflight(instance))
            .unwrap_or(0)
    }

    fn restarted(&self, service: &ServiceName, instance: &InstanceId) {
        if let Some(s) = self.service(service)
            && s.backends.restarted(instance)
        {
            self.recompile(&s);
        }
    }
}
