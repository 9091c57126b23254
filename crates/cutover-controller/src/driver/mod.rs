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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutover_analysis::judge;
use cutover_core::{
    Backend, DataPlane, Health, HealthChange, InstanceId, Phase, RolloutOutcome, RolloutSpec,
    RouteTable, RouteVersion, ServiceName, Timestamp, Version, Weight,
};
use cutover_metrics::{Metrics, VersionSnapshot};
use cutover_runtime::{Disturbance, Handle, InstanceExit, Recorded, Runtime, StartSpec, Started};
use cutover_store::{InstanceRow, NewEvent, NewRollout, RolloutRow, ServiceRow, Store};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::checkpoint;
use crate::fsm::{self, Command, Event, EventKind, HealthCounts, Rollout, Verdict};
use crate::view::{
    Action, ControlError, DeployRequest, EventView, InstanceView, Notice, RolloutView, ServiceView,
};
use crate::{plan, probe};

mod analysis;
mod commit;
mod events;
mod jobs;
mod publish;
mod reconcile;
mod record;
mod recover;
mod requests;
mod views;

pub use jobs::SafetySetup;
use reconcile::instance_env;
use record::finished_service_row;
use views::{event_view, rollout_view};

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
    /// `env_file`: read at each start, between `env` and the rollout's `--env`; never stored.
    pub env_file: Option<std::path::PathBuf>,
    /// For static services: the versions that exist. `None`: any version can be started.
    pub known_versions: Option<Vec<Version>>,
    pub runtime: Arc<dyn Runtime>,
    /// Hooks, smoke checks, the database and its backups (docs/reference.md §10).
    pub safety: Arc<SafetySetup>,
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
    /// An event from outside the release state (a fault, an experiment, a probe), recorded
    /// and broadcast like the driver's own.
    Record(
        ServiceName,
        cutover_core::EventKind,
        String,
        oneshot::Sender<()>,
    ),
    /// A chaos experiment's action on one instance, carried out by its runtime.
    Disturb(
        ServiceName,
        InstanceId,
        Disturbance,
        oneshot::Sender<Result<String, ControlError>>,
    ),
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

    /// Records an event for a service (or a dependency) that no rollout decided: a fault set
    /// or cleared, an experiment's course, a probe's change. It is stored and broadcast.
    pub async fn record(
        &self,
        service: &ServiceName,
        kind: cutover_core::EventKind,
        message: String,
    ) -> Result<(), ControlError> {
        self.ask(|tx| Request::Record(service.clone(), kind, message, tx))
            .await
    }

    /// Has the service's runtime do `how` to one of its instances (docs/reference.md §11:
    /// `kill-instance`, `cpu-stress`); returns what was done, in words. Runs on the driver's
    /// thread, which lives as long as the daemon: a process a runtime starts for it (a CPU
    /// stress's busy loop) dies with the daemon.
    pub async fn disturb(
        &self,
        service: &str,
        instance: &InstanceId,
        how: Disturbance,
    ) -> Result<String, ControlError> {
        let name = ServiceName::new(service);
        self.ask(|tx| Request::Disturb(name, instance.clone(), how, tx))
            .await?
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
    /// A rollout's job finished (`seq` tells it from a job that was replaced).
    JobDone {
        service: ServiceName,
        seq: u64,
        event: Event,
    },
    /// Something a job did (a hook ran, a backup was taken), to record.
    Fact {
        service: ServiceName,
        rollout: Option<i64>,
        kind: EventKind,
        message: String,
    },
    /// A scheduled backup round of the service ended.
    ScheduledDone(ServiceName),
    /// A version's runtime preparation (its image) ended.
    Prepared {
        service: ServiceName,
        version: Version,
        result: Result<(), String>,
    },
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
    /// The job the rollout's stage runs now (hooks, a backup, the migration, ...).
    job: Option<jobs::RunningJob>,
    /// A restore (or `migrate_down`) of rollout `.0` that waits for the candidate to stop.
    pending_job: Option<(i64, fsm::Job)>,
    job_seq: u64,
    /// The scheduled backup round in flight, and when the next one is due.
    scheduled: Option<tokio::task::JoinHandle<()>>,
    next_backup: Option<Timestamp>,
    /// Versions whose runtime preparation (an image) is done, and those being prepared.
    prepared: BTreeSet<Version>,
    preparing: BTreeSet<Version>,
    /// How many instances of each version were last asked for: what to start once its
    /// preparation is done.
    want: BTreeMap<Version, u32>,
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
                job: None,
                pending_job: None,
                job_seq: 0,
                scheduled: None,
                next_backup: None,
                prepared: BTreeSet::new(),
                preparing: BTreeSet::new(),
                want: BTreeMap::new(),
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
        clock: Clock::new(),
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
    clock: Clock,
}

/// The driver's clock: wall time read once, then advanced by tokio's monotonic clock.
///
/// Every time the fsm is given comes from here, so a wall-clock jump (NTP, a manual change)
/// cannot shorten a pause or a deadline, and tests with paused tokio time drive pauses,
/// deadlines and scale-down delays in virtual time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    wall: Timestamp,
    start: tokio::time::Instant,
}

impl Clock {
    fn new() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Clock {
            wall: Timestamp(u64::try_from(ms).unwrap_or(u64::MAX)),
            start: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        self.wall.plus(self.start.elapsed())
    }
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
                Some(i) = self.internal.recv() => self.on_internal(i).await,
                _ = tick.tick() => self.on_tick().await,
                _ = sample.tick() => self.metrics.sample(self.clock.now()),
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
        // Nothing would wait for a job's processes after the exec: they stop now, and the
        // next program resumes the rollout from its checkpoint (a migration stopped this way
        // is undone from its backup, never run twice).
        self.stop_jobs();
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

    /// Restores state and publishes every service's route table before [`Driver::run`]: a
    /// daemon that accepts only after this never answers 503 for instances it already has.
    pub async fn restore_first(&mut self) {
        self.restore().await;
    }
}
