//! The driver: the one task that owns every service's release state and runs the fsm's
//! commands against the world.
//!
//! It receives messages (API requests, health changes from the proxy, instance exits from the
//! runtime, drain completions) and timer ticks; for each it asks `fsm::step` what to do,
//! persists the transition with its events in one SQLite transaction, and only then carries out
//! the commands: reconciling instance counts through the runtime and publishing route tables
//! through the data plane. It is the single owner of this state; readers get copies (views).
//!
//! Persist-then-act has no exception: a transition that cannot be written (a full disk) is
//! held, with its commands, and the service is `degraded`: nothing more is decided or done for
//! it (traffic and instances stay as they are) while the write is retried with backoff, and the
//! held commands run only once it is durable. Acting on a decision the disk does not know would
//! let a restart resume an older checkpoint than the world it finds.
//!
//! It must not make decisions itself (those are the fsm's and the judge's) and must not be on
//! the request path: the proxy keeps serving the last table if this task stops.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutover_analysis::judge;
use cutover_core::{
    Backend, DataPlane, Health, HealthChange, InstanceId, Phase, RolloutOutcome, RolloutSpec,
    RouteTable, RouteVersion, ServiceName, StrategyKind, Timestamp, Version, Weight,
};
use cutover_metrics::{Metrics, VersionSnapshot};
use cutover_runtime::{Handle, InstanceExit, Recorded, Runtime, StartSpec, Started};
use cutover_store::{InstanceRow, NewEvent, NewRollout, RolloutRow, ServiceRow, Store};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::checkpoint;
use crate::fsm::{self, Command, Event, EventKind, HealthCounts, Rollout, Verdict};
use crate::probe;
use crate::view::{
    Action, ControlError, DeployRequest, EventView, InstanceView, Notice, RolloutView, ServiceView,
};

/// How often pause holds, deadlines and scale-down delays are checked.
const TICK: Duration = Duration::from_millis(200);
/// Exits of a candidate instance that never became healthy after which the rollout ends at
/// once instead of waiting out `progress_deadline`.
const CRASH_LOOP_EXITS: u32 = 3;
/// How many recent events a service view carries.
const RECENT_EVENTS: usize = 20;

/// What the driver needs to know about one service; the binary builds it from the settings.
pub struct ServiceSetup {
    pub name: ServiceName,
    pub listen: SocketAddr,
    pub preview_listen: Option<SocketAddr>,
    /// Deployed when the state has no stable version yet.
    pub initial_version: Version,
    pub spec: RolloutSpec,
    /// Paths the blue-green preview probes ask the candidate for (the health path and `/`).
    pub probe_paths: Vec<String>,
    /// Command template for process services (empty for static ones).
    pub command: Vec<String>,
    /// The service's configured environment, below any per-rollout `--env`.
    pub env: BTreeMap<String, String>,
    /// For static services: the versions that exist. `None`: any version can be started.
    pub known_versions: Option<Vec<Version>>,
    pub runtime: Arc<dyn Runtime>,
}

/// Traffic shares in percent per version, stable first.
type Shares = Vec<(Version, u8)>;

/// A request to the driver with the channel its answer goes back on.
enum Request {
    Status(oneshot::Sender<Vec<ServiceView>>),
    Service(String, oneshot::Sender<Result<ServiceView, ControlError>>),
    Deploy(
        DeployRequest,
        oneshot::Sender<Result<RolloutView, ControlError>>,
    ),
    Act(
        String,
        Action,
        String,
        oneshot::Sender<Result<ServiceView, ControlError>>,
    ),
    History(
        Option<String>,
        usize,
        oneshot::Sender<Result<Vec<RolloutView>, ControlError>>,
    ),
    Rollout(i64, oneshot::Sender<Result<RolloutView, ControlError>>),
}

/// A cheap, cloneable handle for talking to the driver.
#[derive(Clone)]
pub struct Controller {
    tx: mpsc::Sender<Request>,
    notices: broadcast::Sender<Notice>,
}

fn gone() -> ControlError {
    ControlError::Internal("the controller has stopped; restart `cutover up`".into())
}

impl Controller {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    pub async fn status(&self) -> Result<Vec<ServiceView>, ControlError> {
        self.ask(Request::Status).await
    }

    pub async fn service(&self, name: &str) -> Result<ServiceView, ControlError> {
        self.ask(|tx| Request::Service(name.to_owned(), tx)).await?
    }

    pub async fn deploy(&self, req: DeployRequest) -> Result<RolloutView, ControlError> {
        self.ask(|tx| Request::Deploy(req, tx)).await?
    }

    /// A person's action on a service's rollout; `actor` says who, for the record.
    pub async fn act(
        &self,
        service: &str,
        action: Action,
        actor: String,
    ) -> Result<ServiceView, ControlError> {
        self.ask(|tx| Request::Act(service.to_owned(), action, actor, tx))
            .await?
    }

    pub async fn history(
        &self,
        service: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutView>, ControlError> {
        self.ask(|tx| Request::History(service.map(str::to_owned), limit, tx))
            .await?
    }

    pub async fn rollout(&self, id: i64) -> Result<RolloutView, ControlError> {
        self.ask(|tx| Request::Rollout(id, tx)).await?
    }

    /// Every event the controller records from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    /// Passes on an event another part of the daemon recorded (an alert's transition, saved
    /// by the signals task), so that live views see it like the controller's own.
    pub fn publish(&self, notice: Notice) {
        let _ = self.notices.send(notice);
    }
}

/// Messages from the other parts of the daemon.
enum Internal {
    /// An instance left the route table, drained and stopped.
    Stopped(InstanceId),
}

struct Instance {
    version: Version,
    addr: SocketAddr,
    /// The runtime's handle: how it finds the instance again.
    handle: Handle,
    health: Health,
    /// Out of the route table; finishing its requests, then stopped.
    draining: bool,
    /// Why it is not healthy (its last failed probe or exit), for `status`.
    detail: Option<String>,
    /// It passed its health checks at least once: a crash loop is told from a slow start.
    ever_healthy: bool,
}

/// A rollout in progress, with what the driver keeps around it.
struct Active {
    rollout: Rollout,
    row: RolloutRow,
    spec: RolloutSpec,
    /// Metric snapshots at the start of the current analysis window.
    baseline: (VersionSnapshot, VersionSnapshot),
    last_analysis: Option<String>,
    next_analysis: Timestamp,
}

struct Svc {
    setup: ServiceSetup,
    stable: Version,
    stable_env: BTreeMap<String, String>,
    previous: Option<(Version, BTreeMap<String, String>)>,
    instances: BTreeMap<InstanceId, Instance>,
    active: Option<Active>,
    /// The candidate's share and whether the preview listener serves it, as last commanded.
    candidate_weight: Weight,
    preview: bool,
    generation: u64,
    next_instance: u64,
    /// Probe traffic to a blue-green preview that is being judged.
    prober: Option<tokio::task::JoinHandle<()>>,
    /// The version a promotion retired, kept running out of traffic until the time given,
    /// so that a rollback is an instant switch.
    warm: Option<(Version, Timestamp)>,
    /// A transition decided but not yet durable: while set, the service is degraded and held.
    held: Option<Held>,
}

/// A transition whose write failed, kept to be written again and then carried out.
struct Held {
    row: RolloutRow,
    events: Vec<NewEvent>,
    service: Option<ServiceRow>,
    cmds: Vec<Command>,
    phase: Phase,
    /// The last write error.
    error: String,
    attempts: u32,
    next_try: tokio::time::Instant,
    backoff: Duration,
}

/// The first retry of a held write, and the longest wait between two.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

impl Held {
    fn reason(&self) -> String {
        format!(
            "the {} decision could not be saved ({}); traffic and instances are held as they are until it can be (retrying; {} failed attempt(s))",
            self.events
                .last()
                .map(|e| e.kind.as_str())
                .unwrap_or("rollout's"),
            self.error,
            self.attempts,
        )
    }
}

/// How the driver's run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop every instance: the daemon exits.
    Stop,
    /// Leave every instance running for the daemon program that takes over (a planned
    /// restart); [`Driver::run`] returns them.
    HandOver,
}

/// An instance left running by a hand-over, for the next program to adopt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedOver {
    pub instance: InstanceId,
    /// Healthy when handed over: the next program routes to it at once.
    pub healthy: bool,
}

/// Everything the driver is given at start.
pub struct DriverParts {
    pub services: Vec<ServiceSetup>,
    pub store: Store,
    pub dataplane: Arc<dyn DataPlane>,
    pub metrics: Metrics,
    pub health: mpsc::UnboundedReceiver<HealthChange>,
    pub exits: mpsc::UnboundedReceiver<InstanceExit>,
    /// Instances a previous program of this daemon handed over: adopted, not started again.
    pub adopt: Vec<HandedOver>,
}

/// Creates the driver and its handle. Run the driver with [`Driver::run`] on a runtime of its
/// own (so SQLite writes never stall proxy workers); the handle works from any runtime.
pub fn driver(parts: DriverParts) -> (Driver, Controller) {
    let (tx, rx) = mpsc::channel(256);
    let (notices, _) = broadcast::channel(1024);
    let (itx, irx) = mpsc::unbounded_channel();
    let services = parts
        .services
        .into_iter()
        .map(|setup| {
            let name = setup.name.clone();
            let svc = Svc {
                stable: setup.initial_version.clone(),
                stable_env: BTreeMap::new(),
                previous: None,
                instances: BTreeMap::new(),
                active: None,
                candidate_weight: Weight::ZERO,
                preview: false,
                generation: 0,
                next_instance: 1,
                prober: None,
                warm: None,
                held: None,
                setup,
            };
            (name, svc)
        })
        .collect();
    let d = Driver {
        services,
        store: parts.store,
        dataplane: parts.dataplane,
        metrics: parts.metrics,
        notices: notices.clone(),
        requests: rx,
        health: parts.health,
        exits: parts.exits,
        internal_tx: itx,
        internal: irx,
        adopt: parts.adopt,
        acting: None,
        restored: false,
    };
    (d, Controller { tx, notices })
}

pub struct Driver {
    services: BTreeMap<ServiceName, Svc>,
    store: Store,
    dataplane: Arc<dyn DataPlane>,
    metrics: Metrics,
    notices: broadcast::Sender<Notice>,
    requests: mpsc::Receiver<Request>,
    health: mpsc::UnboundedReceiver<HealthChange>,
    exits: mpsc::UnboundedReceiver<InstanceExit>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
    adopt: Vec<HandedOver>,
    /// Who asked for the request being handled; the next commit credits its events to them.
    acting: Option<String>,
    restored: bool,
}

fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
}

impl Driver {
    /// Restores state, starts the stable versions, resumes rollouts, then serves until
    /// `shutdown` resolves; finally stops every instance it started, or, for a hand-over,
    /// returns them running.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = Shutdown>,
    ) -> Vec<HandedOver> {
        if !self.restored {
            self.restore().await;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sample = tokio::time::interval(Duration::from_secs(1));
        tokio::pin!(shutdown);
        let how = loop {
            tokio::select! {
                how = &mut shutdown => break how,
                Some(req) = self.requests.recv() => self.request(req).await,
                Some(h) = self.health.recv() => self.on_health(h).await,
                Some(e) = self.exits.recv() => self.on_exit(e).await,
                Some(i) = self.internal.recv() => self.on_internal(i),
                _ = tick.tick() => self.on_tick().await,
                _ = sample.tick() => self.metrics.sample(now()),
            }
        };
        match how {
            Shutdown::Stop => {
                self.stop_everything().await;
                Vec::new()
            }
            Shutdown::HandOver => self.hand_over(),
        }
    }

    /// Leaves every instance running and says which, for the next program. Nothing is
    /// forgotten in the store: its rows are how that program finds them.
    fn hand_over(&mut self) -> Vec<HandedOver> {
        let mut out = Vec::new();
        for svc in self.services.values_mut() {
            if let Some(p) = svc.prober.take() {
                p.abort();
            }
            for (id, i) in &svc.instances {
                out.push(HandedOver {
                    instance: id.clone(),
                    healthy: i.health == Health::Healthy && !i.draining,
                });
            }
        }
        out
    }

    // ---- start-up -----------------------------------------------------------------------

    /// Restores state and publishes every service's route table before [`Driver::run`]: a
    /// daemon that accepts only after this never answers 503 for instances it already has.
    pub async fn restore_first(&mut self) {
        self.restore().await;
    }

    async fn restore(&mut self) {
        self.restored = true;
        let names: Vec<ServiceName> = self.services.keys().cloned().collect();
        for name in &names {
            match self.store.service(name.as_str()) {
                Ok(Some(row)) => {
                    if let Some(svc) = self.services.get_mut(name) {
                        svc.stable = Version::new(&row.stable_version);
                        svc.stable_env = row.stable_env;
                        svc.previous = row
                            .previous_version
                            .map(|v| (Version::new(v), row.previous_env));
                    }
                }
                Ok(None) => self.save_service(name),
                Err(e) => {
                    tracing::error!(error = %e, service = %name, "could not read service state")
                }
            }
        }
        let active = self.store.active_rollouts().unwrap_or_else(|e| {
            tracing::error!(error = %e, "could not read rollouts in progress");
            Vec::new()
        });
        // Instances a previous program of this daemon handed over keep running and are
        // adopted. Any other a previous daemon started and did not stop (it was killed) are
        // gone or orphans: kill what is left, then start what the state requires.
        match self.store.instances(None) {
            Ok(mut rows) => {
                let adopt = std::mem::take(&mut self.adopt);
                let mut orphans = Vec::new();
                for r in rows.drain(..) {
                    // A candidate's instances run with its rollout's environment.
                    let rollout_env = active
                        .iter()
                        .find(|a| a.service == r.service && a.to_version == r.version)
                        .map(|a| a.env.clone());
                    match adopt.iter().find(|h| h.instance.as_str() == r.id) {
                        Some(h) if self.adopt_instance(&r, h.healthy, rollout_env).await => {}
                        _ => orphans.push(r),
                    }
                }
                // Each runtime says which of the rest still run and can be supervised
                // again (containers outlive a daemon; processes do not) and removes what
                // cannot. Rows are forgotten; adopted instances are recorded anew.
                for r in &orphans {
                    if let Err(e) = self.store.delete_instance(&r.id) {
                        tracing::warn!(error = %e, "could not forget an old instance");
                    }
                }
                for name in &names {
                    let Some(runtime) = self.services.get(name).map(|s| s.setup.runtime.clone())
                    else {
                        continue;
                    };
                    let recorded = orphans
                        .iter()
                        .filter(|r| r.service == name.as_str())
                        .map(|r| Recorded {
                            service: name.clone(),
                            version: Version::new(&r.version),
                            instance: InstanceId::new(&r.id),
                            addr: r.address.parse().ok(),
                            handle: Handle::new(&r.handle),
                        })
                        .collect();
                    for found in runtime.recover(recorded).await {
                        let rollout_env = active
                            .iter()
                            .find(|a| {
                                a.service == name.as_str() && a.to_version == found.version.as_str()
                            })
                            .map(|a| a.env.clone());
                        let wanted = self
                            .services
                            .get(name)
                            .is_some_and(|s| s.stable == found.version)
                            || rollout_env.is_some();
                        let row = InstanceRow {
                            id: found.started.instance.to_string(),
                            service: name.to_string(),
                            version: found.version.to_string(),
                            address: found.started.addr.to_string(),
                            handle: found.started.handle.as_str().to_owned(),
                            started_at: now(),
                        };
                        // A running container is routed to at once, so a daemon's crash costs
                        // no more than its own downtime; the proxy's checks correct it.
                        if wanted && self.adopt_instance(&row, true, rollout_env).await {
                            tracing::info!(instance = %row.id, "adopted an instance that outlived the previous daemon");
                            if let Err(e) = self.store.upsert_instance(&row) {
                                tracing::warn!(error = %e, "could not record an adopted instance");
                            }
                        } else {
                            let id = found.started.instance.clone();
                            let timeout = self
                                .services
                                .get(name)
                                .map(|s| s.setup.spec.stop_timeout)
                                .unwrap_or_default();
                            tracing::info!(instance = %id, "removing an instance no rollout wants");
                            if let Err(e) = runtime.stop(&id, timeout).await {
                                tracing::warn!(instance = %id, error = %e, "could not remove an old instance");
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "could not read recorded instances"),
        }
        for name in &names {
            if let Some(svc) = self.services.get(name) {
                let (stable, n) = (svc.stable.clone(), svc.setup.spec.instances);
                // `scale` publishes the table once the instances are started.
                self.scale(name, &stable, n).await;
            }
        }
        let t = now();
        for row in active {
            self.resume_rollout(row).await;
        }
        // Adopted instances of a version no rollout wants (one retired by a promotion that
        // was still warm) stay warm for another `scale_down_delay`, then stop.
        for name in &names {
            let Some(svc) = self.services.get_mut(name) else {
                continue;
            };
            let wanted = |v: &Version| {
                *v == svc.stable
                    || svc
                        .active
                        .as_ref()
                        .is_some_and(|a| a.rollout.candidate == *v)
            };
            let stray = svc
                .instances
                .values()
                .find(|i| !wanted(&i.version))
                .map(|i| i.version.clone());
            if let Some(v) = stray {
                svc.warm = Some((v, t.plus(svc.setup.spec.scale_down_delay)));
            }
        }
    }

    /// Takes over an instance a previous program handed over: the runtime supervises it
    /// again, and it keeps its health so the proxy routes to it without waiting for probes.
    async fn adopt_instance(
        &mut self,
        row: &InstanceRow,
        healthy: bool,
        rollout_env: Option<BTreeMap<String, String>>,
    ) -> bool {
        let name = ServiceName::new(&row.service);
        let (Some(svc), Ok(addr)) = (
            self.services.get_mut(&name),
            row.address.parse::<SocketAddr>(),
        ) else {
            return false;
        };
        let version = Version::new(&row.version);
        let instance = InstanceId::new(&row.id);
        let spec = StartSpec {
            service: name.clone(),
            version: version.clone(),
            instance: instance.clone(),
            index: 0,
            command: svc.setup.command.clone(),
            env: instance_env(svc, &version, rollout_env),
            port: Some(addr.port()),
        };
        let started = Started {
            instance: instance.clone(),
            addr,
            handle: Handle::new(&row.handle),
        };
        if let Err(e) = svc.setup.runtime.adopt(spec, started).await {
            tracing::warn!(instance = %instance, error = %e, "could not adopt an instance");
            return false;
        }
        // Ids of adopted instances are taken: new ones are numbered after them.
        if let Some(seq) = row
            .id
            .rsplit('-')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        {
            svc.next_instance = svc.next_instance.max(seq + 1);
        }
        svc.instances.insert(
            instance,
            Instance {
                version,
                addr,
                handle: Handle::new(&row.handle),
                health: if healthy {
                    Health::Healthy
                } else {
                    Health::Starting
                },
                draining: false,
                detail: None,
                ever_healthy: healthy,
            },
        );
        true
    }

    async fn resume_rollout(&mut self, mut row: RolloutRow) {
        let name = ServiceName::new(&row.service);
        let Some(svc) = self.services.get(&name) else {
            row.outcome = RolloutOutcome::Failed;
            row.reason = Some(format!(
                "service {} is no longer in the configuration",
                row.service
            ));
            row.finished_at = Some(now());
            if let Err(e) = self.store.update_rollout(&row) {
                tracing::error!(error = %e, "could not close an orphaned rollout");
            }
            return;
        };
        let mut spec = svc.setup.spec.clone();
        spec.strategy = row.strategy;
        match checkpoint::decode_with_spec(row.id, &name, &row.checkpoint) {
            Ok((rollout, started_with)) => {
                // A rollout under way keeps the policy it started with, whatever a reload
                // changed since; the next rollout gets the new one.
                let spec = started_with.unwrap_or(spec);
                let baseline = self.snapshots(&name, &rollout.stable, &rollout.candidate);
                let t = now();
                let active = Active {
                    rollout,
                    row,
                    baseline,
                    last_analysis: None,
                    next_analysis: t.plus(spec.analysis.interval),
                    spec,
                };
                if let Some(svc) = self.services.get_mut(&name) {
                    svc.active = Some(active);
                }
                self.feed(&name, Event::Resumed).await;
            }
            Err(e) => {
                row.outcome = RolloutOutcome::RolledBack;
                row.reason = Some(format!(
                    "could not resume after a restart ({e}); traffic stays on stable"
                ));
                row.finished_at = Some(now());
                if let Err(e) = self.store.update_rollout(&row) {
                    tracing::error!(error = %e, "could not close an unreadable rollout");
                }
            }
        }
    }

    // ---- requests ---------------------------------------------------------------------------

    async fn request(&mut self, req: Request) {
        match req {
            Request::Status(tx) => {
                let names: Vec<ServiceName> = self.services.keys().cloned().collect();
                let views = names.iter().filter_map(|n| self.view(n).ok()).collect();
                let _ = tx.send(views);
            }
            Request::Service(name, tx) => {
                let _ = tx.send(self.view(&ServiceName::new(&name)));
            }
            Request::Deploy(req, tx) => {
                let name = ServiceName::new(&req.service);
                if let Err(e) = self.held_error(&name) {
                    let _ = tx.send(Err(e));
                    return;
                }
                self.acting = Some(req.actor.clone());
                let r = self.deploy(req).await;
                self.acting = None;
                // Decided, but held: say so rather than report it done.
                let r = r.and_then(|v| self.held_error(&name).map(|()| v));
                let _ = tx.send(r);
            }
            Request::Act(name, action, actor, tx) => {
                let name = ServiceName::new(&name);
                if let Err(e) = self.held_error(&name) {
                    let _ = tx.send(Err(e));
                    return;
                }
                self.acting = Some(actor);
                let r = self.act(&name, action).await;
                self.acting = None;
                let r = r.and_then(|v| self.held_error(&name).map(|()| v));
                let _ = tx.send(r);
            }
            Request::History(service, limit, tx) => {
                let r = self
                    .store
                    .rollouts(service.as_deref(), limit)
                    .map(|rows| rows.into_iter().map(rollout_view).collect())
                    .map_err(|e| ControlError::Internal(e.to_string()));
                let _ = tx.send(r);
            }
            Request::Rollout(id, tx) => {
                let _ = tx.send(self.rollout_with_events(id));
            }
        }
    }

    fn rollout_with_events(&self, id: i64) -> Result<RolloutView, ControlError> {
        let row = self
            .store
            .rollout(id)
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .ok_or_else(|| ControlError::NotFound(format!("no rollout {id}")))?;
        let mut v = rollout_view(row);
        v.events = self
            .store
            .events_for_rollout(id)
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .into_iter()
            .map(event_view)
            .collect();
        Ok(v)
    }

    fn unknown(name: &ServiceName) -> ControlError {
        ControlError::NotFound(format!("no service named {name:?} in the configuration"))
    }

    async fn deploy(&mut self, req: DeployRequest) -> Result<RolloutView, ControlError> {
        let name = ServiceName::new(&req.service);
        let svc = self
            .services
            .get(&name)
            .ok_or_else(|| Self::unknown(&name))?;
        if let Some(a) = &svc.active {
            return Err(ControlError::Conflict(format!(
                "rollout {} of {name} to {} is in progress ({}); wait for it, or run `cutover abort {name}`",
                a.rollout.id,
                a.rollout.candidate,
                a.rollout.phase()
            )));
        }
        // The one rule for labels (config, CLI and API alike): it reaches instances' argv.
        let version = Version::parse(req.version.trim())
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        // The same version with another environment is a new revision of it, rolled out like
        // any other version (`v1@r2`); with the same environment there is nothing to do.
        let mut version = version;
        if version.as_str() == svc.stable.base() {
            if req.env == svc.stable_env || svc.setup.known_versions.is_some() {
                return Err(ControlError::Conflict(format!(
                    "{name} already runs {} with this environment; change --env to roll out a new revision of it",
                    svc.stable
                )));
            }
            version = Version::revision_of(svc.stable.base(), svc.stable.revision() + 1);
        }
        if let Some(known) = &svc.setup.known_versions
            && !known.contains(&version)
        {
            let list: Vec<&str> = known.iter().map(Version::as_str).collect();
            return Err(ControlError::BadRequest(format!(
                "static service {name} has no upstreams for {version}; configured: {}",
                list.join(", ")
            )));
        }
        let strategy = req.strategy.unwrap_or(svc.setup.spec.strategy);
        let mut spec = svc.setup.spec.clone();
        spec.strategy = strategy;
        self.begin(&name, version, req.env, spec).await
    }

    async fn begin(
        &mut self,
        name: &ServiceName,
        version: Version,
        env: BTreeMap<String, String>,
        spec: RolloutSpec,
    ) -> Result<RolloutView, ControlError> {
        let Some(svc) = self.services.get(name) else {
            return Err(Self::unknown(name));
        };
        let stable = svc.stable.clone();
        let t = now();
        let new = NewRollout {
            service: name.to_string(),
            from_version: stable.to_string(),
            to_version: version.to_string(),
            strategy: spec.strategy,
            env,
            started_at: t,
            checkpoint: String::new(),
            started_by: self.acting.clone(),
        };
        let id = self
            .store
            .insert_rollout(&new)
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        let (rollout, cmds) =
            Rollout::begin(&spec, id, name.clone(), stable.clone(), version.clone(), t);
        let row = RolloutRow {
            id,
            service: new.service,
            from_version: new.from_version,
            to_version: new.to_version,
            strategy: spec.strategy,
            env: new.env,
            outcome: RolloutOutcome::InProgress,
            reason: None,
            started_at: t,
            finished_at: None,
            checkpoint: checkpoint::encode_with_spec(&rollout, &spec),
            started_by: new.started_by,
            ended_by: None,
        };
        let baseline = self.snapshots(name, &stable, &version);
        if let Some(svc) = self.services.get_mut(name) {
            // A version kept warm after a promotion serves this rollout instead of stopping.
            if svc.warm.as_ref().is_some_and(|(v, _)| *v == version) {
                svc.warm = None;
            }
            svc.active = Some(Active {
                rollout,
                row,
                baseline,
                last_analysis: None,
                next_analysis: t.plus(spec.analysis.interval),
                spec,
            });
        }
        self.commit(name, cmds).await;
        // Instances of the candidate that already run (kept warm) count at once.
        self.feed_health(name, None).await;
        let row = self
            .store
            .rollout(id)
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .ok_or_else(|| ControlError::Internal(format!("rollout {id} vanished")))?;
        Ok(rollout_view(row))
    }

    async fn act(
        &mut self,
        name: &ServiceName,
        action: Action,
    ) -> Result<ServiceView, ControlError> {
        let svc = self.services.get(name).ok_or_else(|| Self::unknown(name))?;
        if svc.active.is_none() {
            if action == Action::Rollback {
                // After a finished promotion the previous version is started again and takes
                // all traffic as soon as it is healthy: a blue-green switch with no delay. A
                // person asked to go back to the version that served before, so the way back
                // is not held for a verdict.
                let Some((prev, env)) = svc.previous.clone() else {
                    return Err(ControlError::Conflict(format!(
                        "{name} has no previous version to roll back to"
                    )));
                };
                let mut spec = svc.setup.spec.clone();
                spec.strategy = StrategyKind::BlueGreen;
                spec.blue_green.auto_promote = true;
                spec.scale_down_delay = Duration::ZERO;
                spec.analysis.enabled = false;
                self.begin(name, prev, env, spec).await?;
                return self.view(name);
            }
            return Err(ControlError::Conflict(format!(
                "{name} has no rollout in progress; nothing to {}",
                action.name()
            )));
        }
        let event = match action {
            Action::Promote { full, force } => Event::Promote { full, force },
            Action::Abort => Event::Abort,
            Action::Rollback => Event::Rollback,
            Action::Pause => Event::Pause,
            Action::Resume => Event::Resume,
        };
        self.feed_checked(name, event)
            .await
            .map_err(|r| ControlError::Conflict(r.0))?;
        self.view(name)
    }

    // ---- events from the world ---------------------------------------------------------------

    async fn on_health(&mut self, h: HealthChange) {
        let Some(svc) = self.services.get_mut(&h.service) else {
            return;
        };
        let Some(inst) = svc.instances.get_mut(&h.instance) else {
            return;
        };
        if inst.draining {
            return;
        }
        let rollout_id = svc.active.as_ref().map(|a| a.rollout.id);
        if inst.health == h.health {
            // A starting instance whose probes fail for a new reason: no state changed, but
            // the reason belongs in status, in an event and in the deadline's message (the
            // proxy reports each reason once, not every probe).
            if h.health == Health::Starting && inst.detail.as_deref() != Some(&h.reason) {
                inst.detail = Some(h.reason.clone());
                let msg = format!("instance {} ({}) {}", h.instance, h.version, h.reason);
                self.record_loose(&h.service, rollout_id, EventKind::Health, msg);
                self.feed_health(&h.service, Some(h.reason)).await;
            }
            return;
        }
        inst.health = h.health;
        inst.detail = (h.health != Health::Healthy).then(|| h.reason.clone());
        inst.ever_healthy |= h.health == Health::Healthy;
        let msg = format!(
            "instance {} ({}) is {}: {}",
            h.instance, h.version, h.health, h.reason
        );
        self.record_loose(&h.service, rollout_id, EventKind::Health, msg);
        self.update_instance_gauges(&h.service);
        self.feed_health(&h.service, Some(h.reason)).await;
    }

    async fn on_exit(&mut self, e: InstanceExit) {
        let Some(svc) = self.services.get_mut(&e.service) else {
            return;
        };
        let Some(inst) = svc.instances.get_mut(&e.instance) else {
            return;
        };
        if inst.draining {
            return;
        }
        let how = match (e.code, e.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => format!("was killed by signal {s}"),
            (None, None) => "exited".to_owned(),
        };
        let again = e
            .restart_in
            .map(|d| format!("; restarting in {}", fsm::fmt_duration(d)))
            .unwrap_or_default();
        let was_healthy = inst.health == Health::Healthy;
        // A crashed instance takes no traffic until the health checker admits it again.
        if was_healthy {
            inst.health = Health::Unhealthy;
        }
        let tail = if e.stderr_tail.is_empty() {
            String::new()
        } else {
            format!("; its last output: {}", e.stderr_tail.join(" ⏎ "))
        };
        inst.detail = Some(format!("{how}{tail}"));
        let never_healthy = !inst.ever_healthy;
        let rollout_id = svc.active.as_ref().map(|a| a.rollout.id);
        let is_candidate = svc
            .active
            .as_ref()
            .is_some_and(|a| a.rollout.candidate == e.version && a.rollout.stable != e.version);
        let msg = format!("instance {} ({}) {how}{again}{tail}", e.instance, e.version);
        self.record_loose(&e.service, rollout_id, EventKind::InstanceExit, msg.clone());
        self.update_instance_gauges(&e.service);
        if is_candidate && never_healthy && e.exits >= CRASH_LOOP_EXITS {
            // It will not get healthy by waiting out the deadline: end the rollout now, with
            // what the process said.
            let reason = format!(
                "instance {} crash-looped: {how} {} times without ever becoming healthy{tail}",
                e.instance, e.exits
            );
            self.feed(&e.service, Event::StartFailed { reason }).await;
        } else if was_healthy {
            self.feed_health(&e.service, Some(msg)).await;
        }
    }

    fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::Stopped(id) => {
                for (name, svc) in self.services.iter_mut() {
                    if svc.instances.remove(&id).is_some() {
                        if let Err(e) = self.store.delete_instance(id.as_str()) {
                            tracing::warn!(error = %e, "could not forget a stopped instance");
                        }
                        let name = name.clone();
                        self.update_instance_gauges(&name);
                        break;
                    }
                }
            }
        }
    }

    async fn on_tick(&mut self) {
        let t = now();
        let names: Vec<ServiceName> = self.services.keys().cloned().collect();
        for name in names {
            // A held service does nothing but retry its write: not even a scale-down.
            if self.retry_held(&name).await {
                continue;
            }
            let cold = self
                .services
                .get(&name)
                .and_then(|s| s.warm.clone())
                .filter(|(_, at)| t >= *at);
            if let Some((version, _)) = cold {
                if let Some(svc) = self.services.get_mut(&name) {
                    svc.warm = None;
                }
                self.scale(&name, &version, 0).await;
            }
            let Some(a) = self.services.get(&name).and_then(|s| s.active.as_ref()) else {
                continue;
            };
            let due = t >= a.next_analysis;
            self.feed(&name, Event::Tick).await;
            if due {
                self.analyse(&name, t).await;
            }
        }
    }

    /// Judges the window since the last conclusive verdict and feeds the verdict to the fsm.
    async fn analyse(&mut self, name: &ServiceName, t: Timestamp) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let stable_weight = svc.candidate_weight.complement();
        let Some(a) = svc.active.as_mut() else { return };
        a.next_analysis = t.plus(a.spec.analysis.interval);
        if !a.rollout.judging(&a.spec) {
            return;
        }
        let cand = self
            .metrics
            .snapshot(name, &a.rollout.candidate)
            .window_since(Some(&a.baseline.1));
        let stable = self
            .metrics
            .snapshot(name, &a.rollout.stable)
            .window_since(Some(&a.baseline.0));
        // Comparing with stable needs both to serve the same user traffic; a preview's
        // candidate sees only probes, so it is held to the absolute thresholds alone.
        let compare = a.spec.analysis.compare_to_stable
            && stable_weight > Weight::ZERO
            && stable_weight < Weight::FULL;
        let j = judge(&a.spec.analysis, &cand, compare.then_some(&stable));
        let verdict = match j.verdict {
            cutover_analysis::Verdict::Pass => Verdict::Pass,
            cutover_analysis::Verdict::Fail => Verdict::Fail,
            cutover_analysis::Verdict::Inconclusive => Verdict::Inconclusive,
        };
        if verdict != Verdict::Inconclusive {
            a.last_analysis = Some(j.reason.clone());
        }
        self.feed(
            name,
            Event::Judged {
                verdict,
                reason: j.reason,
            },
        )
        .await;
    }

    async fn feed_health(&mut self, name: &ServiceName, detail: Option<String>) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let Some(a) = &svc.active else { return };
        let cand = &a.rollout.candidate;
        let mut counts = HealthCounts {
            detail,
            ..HealthCounts::default()
        };
        for i in svc
            .instances
            .values()
            .filter(|i| &i.version == cand && !i.draining)
        {
            match i.health {
                Health::Healthy => counts.candidate_healthy += 1,
                Health::Unhealthy => counts.candidate_unhealthy += 1,
                Health::Starting | Health::Draining => {}
            }
        }
        self.feed(name, Event::Health(counts)).await;
    }

    // ---- the fsm loop -------------------------------------------------------------------------

    async fn feed(&mut self, name: &ServiceName, event: Event) {
        if let Err(r) = self.feed_checked(name, event).await {
            tracing::debug!(refusal = %r, "event refused");
        }
    }

    /// Steps the service's rollout with `event`, persists the result, then runs its commands.
    async fn feed_checked(&mut self, name: &ServiceName, event: Event) -> Result<(), fsm::Refusal> {
        // A held service decides nothing more until its last decision is durable.
        if self.services.get(name).is_some_and(|s| s.held.is_some()) {
            return Err(fsm::Refusal(format!(
                "{name} is held until its state can be saved"
            )));
        }
        let Some(a) = self.services.get_mut(name).and_then(|s| s.active.as_mut()) else {
            return Ok(());
        };
        let (next, cmds) = fsm::step(&a.spec, &a.rollout, &event, now())?;
        if next == a.rollout && cmds.is_empty() {
            return Ok(());
        }
        a.rollout = next;
        self.commit(name, cmds).await;
        Ok(())
    }

    /// Persists the active rollout of `name` with the events its commands record, then runs
    /// the commands, then finishes the rollout if it ended.
    async fn commit(&mut self, name: &ServiceName, cmds: Vec<Command>) {
        let t = now();
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(a) = svc.active.as_mut() else { return };
        // Only this commit is the person's doing; what follows from it later is cutover's.
        let actor = self.acting.take();
        a.row.checkpoint = checkpoint::encode_with_spec(&a.rollout, &a.spec);
        a.row.outcome = a.rollout.outcome();
        a.row.reason = a.rollout.reason().map(str::to_owned);
        if a.rollout.is_done() {
            a.row.finished_at = Some(t);
            a.row.ended_by = actor.clone();
        }
        let phase = a.rollout.phase();
        let weight = a.rollout.candidate_weight(&a.spec).percent();
        let events: Vec<NewEvent> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Record { kind, message } => Some(NewEvent {
                    service: name.to_string(),
                    rollout_id: Some(a.rollout.id),
                    at: t,
                    kind: kind.as_str().to_owned(),
                    message: match &actor {
                        Some(who) => format!("{message} (by {who})"),
                        None => message.clone(),
                    },
                    data: format!(
                        "{{\"phase\":\"{phase}\",\"candidate_weight\":{weight},\"failures\":{}}}",
                        a.rollout.failures
                    ),
                }),
                _ => None,
            })
            .collect();
        for e in &events {
            tracing::info!(service = %e.service, kind = %e.kind, "{}", e.message);
        }
        // The service's new stable version goes into the same transaction as the rollout's end.
        let service = a.rollout.is_done().then(|| finished_service_row(name, svc));
        let row = svc.active.as_ref().map(|a| a.row.clone());
        let Some(row) = row else { return };
        // Persist before acting: if the daemon dies between here and the commands, a restart
        // re-applies the recorded state instead of forgetting a decision. If the write fails,
        // nothing is carried out: the transition is held and written again until it lands.
        match self
            .store
            .record_transition(&row, &events, service.as_ref())
        {
            Ok(ids) => self.carry_out(name, ids, events, cmds, phase).await,
            Err(e) => {
                tracing::error!(
                    service = %name,
                    error = %e,
                    "could not persist a transition; holding the service as it is (no command runs) and retrying the write"
                );
                if let Some(svc) = self.services.get_mut(name) {
                    svc.held = Some(Held {
                        row,
                        events,
                        service,
                        cmds,
                        phase,
                        error: e.to_string(),
                        attempts: 1,
                        next_try: tokio::time::Instant::now() + RETRY_FIRST,
                        backoff: RETRY_FIRST,
                    });
                }
            }
        }
    }

    /// What follows a durable transition: its live notices, its commands, its end.
    async fn carry_out(
        &mut self,
        name: &ServiceName,
        ids: Vec<i64>,
        events: Vec<NewEvent>,
        cmds: Vec<Command>,
        phase: Phase,
    ) {
        for (id, e) in ids.into_iter().zip(events) {
            let _ = self.notices.send(Notice {
                event: EventView {
                    id,
                    service: e.service,
                    rollout_id: e.rollout_id,
                    at: e.at,
                    kind: e.kind,
                    message: e.message,
                },
                phase,
            });
        }
        for c in cmds {
            self.run_command(name, c).await;
        }
        self.finish_if_done(name);
        self.reconcile_probes(name);
    }

    /// Writes a held transition again once its backoff has passed; when it lands, carries it
    /// out and lets the service go on. Returns whether the service is still held.
    async fn retry_held(&mut self, name: &ServiceName) -> bool {
        let Some(svc) = self.services.get_mut(name) else {
            return false;
        };
        let Some(h) = svc.held.as_mut() else {
            return false;
        };
        if tokio::time::Instant::now() < h.next_try {
            return true;
        }
        match self
            .store
            .record_transition(&h.row, &h.events, h.service.as_ref())
        {
            Err(e) => {
                h.attempts += 1;
                h.error = e.to_string();
                h.backoff = (h.backoff * 2).min(RETRY_MAX);
                h.next_try = tokio::time::Instant::now() + h.backoff;
                // Loud at first, then about once a minute at the longest backoff.
                if h.attempts <= 3 || h.attempts % 6 == 0 {
                    tracing::warn!(service = %name, attempts = h.attempts, error = %e, "still cannot persist a transition; the service stays held");
                }
                true
            }
            Ok(ids) => {
                let Some(h) = svc.held.take() else {
                    return false;
                };
                tracing::warn!(service = %name, attempts = h.attempts, "the held transition is saved; carrying it out");
                self.carry_out(name, ids, h.events, h.cmds, h.phase).await;
                let rollout_id = self
                    .services
                    .get(name)
                    .and_then(|s| s.active.as_ref())
                    .map(|a| a.rollout.id)
                    .or(Some(h.row.id));
                self.record_loose(
                    name,
                    rollout_id,
                    EventKind::Recovered,
                    format!(
                        "the state could be saved again after {} failed attempt(s); the held decision was carried out",
                        h.attempts
                    ),
                );
                false
            }
        }
    }

    /// `Unavailable` while `name` is held, saying why.
    fn held_error(&self, name: &ServiceName) -> Result<(), ControlError> {
        match self.services.get(name).and_then(|s| s.held.as_ref()) {
            Some(h) => Err(ControlError::Unavailable(format!(
                "{name} is degraded: {}; act again once the state can be written (free disk space in the state directory)",
                h.reason()
            ))),
            None => Ok(()),
        }
    }

    /// Runs probe traffic exactly while the rollout wants it (a judged blue-green preview).
    fn reconcile_probes(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let want = svc
            .active
            .as_ref()
            .filter(|a| a.rollout.wants_probes(&a.spec));
        match (want, &svc.prober) {
            (Some(a), None) => {
                let analysis = &a.spec.analysis;
                // Enough probes for a window of `min_requests` in about one interval, within
                // a rate no service should notice.
                let per_interval = analysis.min_requests as f64;
                let rate =
                    (per_interval / analysis.interval.as_secs_f64().max(0.1)).clamp(10.0, 50.0);
                svc.prober = Some(probe::spawn(
                    svc.setup.listen,
                    a.rollout.candidate.clone(),
                    svc.setup.probe_paths.clone(),
                    rate as u32,
                ));
            }
            (None, Some(p)) => {
                p.abort();
                svc.prober = None;
            }
            _ => {}
        }
    }

    async fn run_command(&mut self, name: &ServiceName, c: Command) {
        match c {
            Command::Scale { version, instances } => self.scale(name, &version, instances).await,
            Command::Route { candidate, preview } => {
                if let Some(svc) = self.services.get_mut(name) {
                    svc.candidate_weight = candidate;
                    svc.preview = preview;
                }
                self.publish(name);
            }
            Command::ResetAnalysis => {
                let Some(a) = self.services.get(name).and_then(|s| s.active.as_ref()) else {
                    return;
                };
                let (stable, cand) = (a.rollout.stable.clone(), a.rollout.candidate.clone());
                let snaps = self.snapshots(name, &stable, &cand);
                if let Some(a) = self.services.get_mut(name).and_then(|s| s.active.as_mut()) {
                    a.baseline = snaps;
                    a.next_analysis = now().plus(a.spec.analysis.interval);
                }
            }
            Command::Retire { version, at } => {
                if let Some(svc) = self.services.get_mut(name) {
                    svc.warm = Some((version, at));
                }
            }
            Command::Record { .. } => {}
        }
    }

    fn finish_if_done(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(a) = &svc.active else { return };
        if !a.rollout.is_done() {
            return;
        }
        let outcome = a.rollout.outcome();
        let id = a.rollout.id;
        if outcome == RolloutOutcome::Promoted {
            let old = std::mem::replace(&mut svc.stable, a.rollout.candidate.clone());
            let old_env = std::mem::replace(&mut svc.stable_env, a.row.env.clone());
            svc.previous = Some((old, old_env));
        }
        svc.active = None;
        svc.candidate_weight = Weight::ZERO;
        svc.preview = false;
        self.metrics.inc_rollouts(name, outcome);
        // The service's row was saved with the final transition (`finished_service_row`).
        self.publish(name);
        // The record of promoted versions beside the database, and a snapshot of it: what a
        // lost or damaged database is noticed by and restored from. Neither is the state
        // itself (that is durable already), so a failure here is worth a warning only.
        if let Err(e) = self.store.save_record() {
            tracing::warn!(error = %e, "could not update the record of promoted versions");
        }
        match self.store.snapshot(Some(id)) {
            Ok(path) => tracing::debug!(snapshot = %path.display(), "state snapshot taken"),
            Err(e) => tracing::warn!(error = %e, "could not take a snapshot of the state"),
        }
    }

    // ---- the world: instances and routes -------------------------------------------------------

    /// Makes `want` instances of `version` run: starts missing ones, drains extra ones.
    async fn scale(&mut self, name: &ServiceName, version: &Version, want: u32) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let live: Vec<InstanceId> = svc
            .instances
            .iter()
            .filter(|(_, i)| &i.version == version && !i.draining)
            .map(|(id, _)| id.clone())
            .collect();
        let have = u32::try_from(live.len()).unwrap_or(u32::MAX);
        if have > want {
            // Newest first, so the longest-running (warmest) instances stay.
            let extra: Vec<InstanceId> = live
                .iter()
                .rev()
                .take((have - want) as usize)
                .cloned()
                .collect();
            for id in extra {
                self.drain(name, &id);
            }
            self.publish(name);
            return;
        }
        let mut failure = None;
        for index in have..want {
            if let Err(reason) = self.start(name, version, index as usize).await {
                failure = Some(reason);
                break;
            }
        }
        // Whatever did start is routed, even when a later start of the batch failed.
        self.publish(name);
        if let Some(reason) = failure {
            let active = self.services.get(name).and_then(|s| s.active.as_ref());
            let candidate = active.is_some_and(|a| &a.rollout.candidate == version);
            let rollout_id = active.map(|a| a.rollout.id);
            self.record_loose(
                name,
                rollout_id,
                EventKind::StartFailed,
                format!("could not start {version}: {reason}"),
            );
            if candidate {
                // Boxed: the fsm reacts by scaling, which can come back here.
                Box::pin(self.feed(name, Event::StartFailed { reason })).await;
            }
        }
    }

    async fn start(
        &mut self,
        name: &ServiceName,
        version: &Version,
        index: usize,
    ) -> Result<(), String> {
        let Some(svc) = self.services.get_mut(name) else {
            return Err("unknown service".into());
        };
        let seq = svc.next_instance;
        svc.next_instance += 1;
        let instance = InstanceId::new(format!("{name}-{version}-{seq}"));
        let rollout_env = svc
            .active
            .as_ref()
            .filter(|a| &a.rollout.candidate == version)
            .map(|a| a.row.env.clone());
        let env = instance_env(svc, version, rollout_env);
        let spec = StartSpec {
            service: name.clone(),
            version: version.clone(),
            instance: instance.clone(),
            index,
            command: svc.setup.command.clone(),
            env,
            port: None,
        };
        let runtime = svc.setup.runtime.clone();
        let started = runtime.start(spec).await.map_err(|e| e.to_string())?;
        let row = InstanceRow {
            id: instance.to_string(),
            service: name.to_string(),
            version: version.to_string(),
            address: started.addr.to_string(),
            handle: started.handle.as_str().to_owned(),
            started_at: now(),
        };
        if let Err(e) = self.store.upsert_instance(&row) {
            tracing::warn!(error = %e, "could not record a started instance");
        }
        if let Some(svc) = self.services.get_mut(name) {
            svc.instances.insert(
                instance,
                Instance {
                    version: version.clone(),
                    addr: started.addr,
                    handle: started.handle,
                    health: Health::Starting,
                    draining: false,
                    detail: None,
                    ever_healthy: false,
                },
            );
        }
        self.update_instance_gauges(name);
        Ok(())
    }

    /// Takes an instance out of the table; a task waits for its requests to finish (up to
    /// `drain_timeout`), stops it, and reports back.
    fn drain(&mut self, name: &ServiceName, id: &InstanceId) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(inst) = svc.instances.get_mut(id) else {
            return;
        };
        inst.draining = true;
        inst.health = Health::Draining;
        let drain_timeout = svc.setup.spec.drain_timeout;
        let stop_timeout = svc.setup.spec.stop_timeout;
        let runtime = svc.setup.runtime.clone();
        let dataplane = self.dataplane.clone();
        let tx = self.internal_tx.clone();
        let (name, id) = (name.clone(), id.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + drain_timeout;
            // The instance is already out of the published table, so no new request reaches
            // it; poll until the ones in flight are done.
            while dataplane.inflight(&name, &id) > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Err(e) = runtime.stop(&id, stop_timeout).await {
                tracing::warn!(error = %e, instance = %id, "could not stop instance");
            }
            let _ = tx.send(Internal::Stopped(id));
        });
    }

    /// Builds and publishes the route table of `name` from the current state.
    fn publish(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.generation += 1;
        let backends = |v: &Version| -> Vec<Backend> {
            svc.instances
                .iter()
                .filter(|(_, i)| &i.version == v && !i.draining)
                .map(|(id, i)| Backend {
                    instance: id.clone(),
                    addr: i.addr,
                    healthy: i.health == Health::Healthy,
                })
                .collect()
        };
        let mut versions = vec![RouteVersion {
            version: svc.stable.clone(),
            weight: svc.candidate_weight.complement(),
            backends: backends(&svc.stable),
        }];
        let candidate = svc.active.as_ref().map(|a| a.rollout.candidate.clone());
        if let Some(c) = candidate.as_ref().filter(|c| **c != svc.stable) {
            versions.push(RouteVersion {
                version: c.clone(),
                weight: svc.candidate_weight,
                backends: backends(c),
            });
        }
        let table = RouteTable {
            service: name.clone(),
            generation: svc.generation,
            stable: svc.stable.clone(),
            preview: candidate.filter(|_| svc.preview),
            versions,
        };
        self.dataplane.publish(table);
        self.update_instance_gauges(name);
    }

    /// `(configured, effective)` shares of unpinned traffic in percent, stable first. The
    /// proxy gives a version with no routable instance no traffic: its share goes to the
    /// other version, and the effective shares say so.
    fn weights(svc: &Svc) -> (Shares, Shares) {
        let cand = svc.active.as_ref().map(|a| &a.rollout.candidate);
        let w = svc.candidate_weight.percent();
        let mut configured = vec![(svc.stable.clone(), 100 - w)];
        let Some(cand) = cand.filter(|c| **c != svc.stable) else {
            return (configured.clone(), configured);
        };
        configured.push((cand.clone(), w));
        let routable = |v: &Version| {
            svc.instances
                .values()
                .any(|i| &i.version == v && !i.draining && i.health == Health::Healthy)
        };
        let effective = match (routable(&svc.stable), routable(cand)) {
            (true, false) => vec![(svc.stable.clone(), 100), (cand.clone(), 0)],
            (false, true) => vec![(svc.stable.clone(), 0), (cand.clone(), 100)],
            _ => configured.clone(),
        };
        (configured, effective)
    }

    fn update_instance_gauges(&self, name: &ServiceName) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let mut counts: HashMap<(Version, Health), u64> = HashMap::new();
        for i in svc.instances.values() {
            *counts.entry((i.version.clone(), i.health)).or_default() += 1;
        }
        let list: Vec<(Version, Health, u64)> =
            counts.into_iter().map(|((v, h), n)| (v, h, n)).collect();
        self.metrics.set_instances(name, &list);
        // Health decides where traffic really goes, so the weight gauge follows it too.
        self.metrics.set_weights(name, &Self::weights(svc).1);
    }

    fn snapshots(
        &self,
        name: &ServiceName,
        stable: &Version,
        cand: &Version,
    ) -> (VersionSnapshot, VersionSnapshot) {
        (
            self.metrics.snapshot(name, stable),
            self.metrics.snapshot(name, cand),
        )
    }

    async fn stop_everything(&mut self) {
        for svc in self.services.values_mut() {
            if let Some(p) = svc.prober.take() {
                p.abort();
            }
        }
        let runtimes: Vec<(Arc<dyn Runtime>, Duration)> = self
            .services
            .values()
            .map(|s| (s.setup.runtime.clone(), s.setup.spec.stop_timeout))
            .collect();
        for (rt, timeout) in runtimes {
            rt.stop_all(timeout).await;
        }
        for svc in self.services.values() {
            for id in svc.instances.keys() {
                if let Err(e) = self.store.delete_instance(id.as_str()) {
                    tracing::warn!(error = %e, "could not forget a stopped instance");
                }
            }
        }
    }

    // ---- records and views -----------------------------------------------------------------------

    fn save_service(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let row = service_row(name, svc);
        if let Err(e) = self.store.upsert_service(&row) {
            tracing::error!(error = %e, "could not save service state");
        } else if let Err(e) = self.store.save_record() {
            tracing::warn!(error = %e, "could not update the record of promoted versions");
        }
    }

    /// Records an event that is not an fsm transition (health changes, exits).
    fn record_loose(
        &mut self,
        name: &ServiceName,
        rollout_id: Option<i64>,
        kind: EventKind,
        message: String,
    ) {
        let phase = self.phase(name);
        let e = NewEvent {
            service: name.to_string(),
            rollout_id,
            at: now(),
            kind: kind.as_str().to_owned(),
            message,
            data: "{}".to_owned(),
        };
        tracing::info!(service = %e.service, kind = %e.kind, "{}", e.message);
        match self.store.append_event(&e) {
            Ok(id) => {
                let _ = self.notices.send(Notice {
                    event: EventView {
                        id,
                        service: e.service,
                        rollout_id,
                        at: e.at,
                        kind: e.kind,
                        message: e.message,
                    },
                    phase,
                });
            }
            Err(err) => tracing::warn!(error = %err, "could not record an event"),
        }
    }

    fn phase(&self, name: &ServiceName) -> Phase {
        self.services
            .get(name)
            .and_then(|s| s.active.as_ref())
            .map(|a| a.rollout.phase())
            .unwrap_or(Phase::Stable)
    }

    fn view(&self, name: &ServiceName) -> Result<ServiceView, ControlError> {
        let svc = self.services.get(name).ok_or_else(|| Self::unknown(name))?;
        let a = svc.active.as_ref();
        let (configured_weights, weights) = Self::weights(svc);
        let instances = svc
            .instances
            .iter()
            .map(|(id, i)| InstanceView {
                id: id.clone(),
                version: i.version.clone(),
                address: i.addr,
                health: i.health,
                runs_as: svc.setup.runtime.describe(&i.handle),
                detail: i.detail.clone(),
            })
            .collect();
        let recent_events = self
            .store
            .recent_events(Some(name.as_str()), RECENT_EVENTS)
            .unwrap_or_default()
            .into_iter()
            .map(event_view)
            .collect();
        Ok(ServiceView {
            name: name.clone(),
            listen: svc.setup.listen,
            preview_listen: svc.setup.preview_listen,
            phase: a.map(|a| a.rollout.phase()).unwrap_or(Phase::Stable),
            stable: svc.stable.clone(),
            candidate: a.map(|a| a.rollout.candidate.clone()),
            strategy: a
                .map(|a| a.rollout.strategy)
                .unwrap_or(svc.setup.spec.strategy),
            weights,
            configured_weights,
            step: a.and_then(|a| a.rollout.step_progress(&a.spec)),
            rollout_id: a.map(|a| a.rollout.id),
            failures: a.map(|a| a.rollout.failures).unwrap_or(0),
            last_analysis: a.and_then(|a| a.last_analysis.clone()),
            instances,
            recent_events,
            degraded: svc.held.as_ref().map(Held::reason),
        })
    }
}

/// The environment of an instance of `version`: the service's, under the `--env` of the
/// rollout that brought the version (its candidate's, the stable's or the previous one's).
fn instance_env(
    svc: &Svc,
    version: &Version,
    rollout_env: Option<BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut env = svc.setup.env.clone();
    let extra = match rollout_env {
        Some(e) => e,
        None if &svc.stable == version => svc.stable_env.clone(),
        None => svc
            .previous
            .as_ref()
            .filter(|(v, _)| v == version)
            .map(|(_, e)| e.clone())
            .unwrap_or_default(),
    };
    env.extend(extra);
    env
}

/// The service's row as it stands.
fn service_row(name: &ServiceName, svc: &Svc) -> ServiceRow {
    ServiceRow {
        name: name.to_string(),
        stable_version: svc.stable.to_string(),
        stable_env: svc.stable_env.clone(),
        previous_version: svc.previous.as_ref().map(|(v, _)| v.to_string()),
        previous_env: svc
            .previous
            .as_ref()
            .map(|(_, e)| e.clone())
            .unwrap_or_default(),
    }
}

/// The service's row as it will be once its finished rollout is carried out: a promotion makes
/// the candidate stable and the old stable the previous version (see `finish_if_done`).
fn finished_service_row(name: &ServiceName, svc: &Svc) -> ServiceRow {
    let mut row = service_row(name, svc);
    if let Some(a) = svc
        .active
        .as_ref()
        .filter(|a| a.rollout.outcome() == RolloutOutcome::Promoted)
    {
        row.previous_version = Some(std::mem::replace(
            &mut row.stable_version,
            a.rollout.candidate.to_string(),
        ));
        row.previous_env = std::mem::replace(&mut row.stable_env, a.row.env.clone());
    }
    row
}

fn rollout_view(r: RolloutRow) -> RolloutView {
    RolloutView {
        id: r.id,
        service: r.service,
        from: r.from_version,
        to: r.to_version,
        strategy: r.strategy,
        outcome: r.outcome,
        reason: r.reason,
        started_at: r.started_at,
        finished_at: r.finished_at,
        env: r.env,
        started_by: r.started_by,
        ended_by: r.ended_by,
        events: Vec::new(),
    }
}

fn event_view(e: cutover_store::EventRow) -> EventView {
    EventView {
        id: e.id,
        service: e.service,
        rollout_id: e.rollout_id,
        at: e.at,
        kind: e.kind,
        message: e.message,
    }
}
