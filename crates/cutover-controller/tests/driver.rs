//! The driver against an in-memory runtime, an in-memory data plane and paused tokio time:
//! start, scale, drain, crash-restart and resume, each in milliseconds of real time.
//!
//! The fake runtime behaves like the real ones where the driver can tell: `start` makes an
//! instance run at an address, `stop` makes it stop, an unasked exit is reported on the exits
//! channel and the instance runs again (same address) after its backoff, and instances of a
//! runtime whose instances outlive the daemon (containers) are `Found` by `recover`. The fake
//! data plane plays the proxy's active health check: [`World::probe`] reports every instance
//! in the last published table as healthy when it runs and unhealthy when it does not.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_controller::{
    Action, Controller, DeployRequest, DriverParts, SafetySetup, ServiceSetup, ServiceView,
    Shutdown,
};
use cutover_core::{
    CanaryStep, DataPlane, EventKind, Health, HealthChange, InstanceId, Phase, RolloutOutcome,
    RolloutSpec, RouteTable, ServiceName, Version, Weight,
};
use cutover_runtime::{
    BoxFuture, Disturbance, Found, Handle, InstanceExit, Recorded, Runtime, RuntimeError,
    StartSpec, Started,
};
use cutover_store::Store;
use tokio::sync::mpsc;

/// What the driver did to the world, in order.
#[derive(Clone, Debug, PartialEq)]
enum Did {
    Start(String),
    Stop(String),
    Adopt(String),
    /// A table was published; the instances it routes to.
    Publish(Vec<String>),
    /// A chaos experiment's action reached the instance.
    Disturb(String, Disturbance),
    /// A version was prepared (its image made).
    Prepare(String),
}

#[derive(Clone, Debug)]
struct Running {
    version: Version,
    addr: SocketAddr,
    up: bool,
}

/// The machine the fake runtime runs instances on; it outlives a driver (a daemon crash).
#[derive(Default)]
struct World {
    running: Mutex<BTreeMap<InstanceId, Running>>,
    log: Mutex<Vec<Did>>,
    next_port: AtomicU64,
    tables: Mutex<Vec<RouteTable>>,
    /// Requests in flight per instance, as the proxy would count them.
    inflight: Mutex<BTreeMap<InstanceId, u64>>,
    /// What the health check last reported per instance: like the proxy's, it reports
    /// changes only.
    reported: Mutex<BTreeMap<InstanceId, Health>>,
    /// Set: versions need preparing (like images), which ends when it reads `true`.
    image_gate: Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
}

impl World {
    fn did(&self, d: Did) {
        self.log.lock().unwrap().push(d);
    }

    fn log(&self) -> Vec<Did> {
        self.log.lock().unwrap().clone()
    }

    fn starts(&self) -> usize {
        self.log()
            .iter()
            .filter(|d| matches!(d, Did::Start(_)))
            .count()
    }

    fn running_of(&self, version: &str) -> Vec<InstanceId> {
        self.running
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.version.as_str() == version)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The proxy's active health check over the last published table.
    fn probe(&self, health: &mpsc::UnboundedSender<HealthChange>) {
        let Some(table) = self.tables.lock().unwrap().last().cloned() else {
            return;
        };
        let running = self.running.lock().unwrap().clone();
        for v in &table.versions {
            for b in &v.backends {
                let up = running.get(&b.instance).is_some_and(|r| r.up);
                let now = if up {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                };
                let before = self
                    .reported
                    .lock()
                    .unwrap()
                    .insert(b.instance.clone(), now);
                if before == Some(now) {
                    continue;
                }
                let _ = health.send(HealthChange {
                    service: table.service.clone(),
                    version: v.version.clone(),
                    instance: b.instance.clone(),
                    health: if up {
                        Health::Healthy
                    } else {
                        Health::Unhealthy
                    },
                    reason: if up {
                        "probe passed".into()
                    } else {
                        "connection refused".into()
                    },
                });
            }
        }
    }
}

struct FakeRuntime {
    world: Arc<World>,
    /// Containers outlive their daemon; processes do not.
    outlives_daemon: bool,
}

impl FakeRuntime {
    /// The instance dies unasked; like the real runtimes, it is reported and runs again at
    /// the same address after its backoff.
    fn crash(world: &Arc<World>, exits: &mpsc::UnboundedSender<InstanceExit>, id: &InstanceId) {
        let version = {
            let mut running = world.running.lock().unwrap();
            let r = running.get_mut(id).unwrap();
            r.up = false;
            r.version.clone()
        };
        let backoff = Duration::from_secs(1);
        exits
            .send(InstanceExit {
                service: ServiceName::new("web"),
                version,
                instance: id.clone(),
                code: Some(1),
                signal: None,
                restart_in: Some(backoff),
                exits: 1,
                ran_for: Duration::from_secs(60),
                stderr_tail: vec!["panic: out of cheese".into()],
            })
            .unwrap();
        let (world, id) = (world.clone(), id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            if let Some(r) = world.running.lock().unwrap().get_mut(&id) {
                r.up = true;
            }
        });
    }
}

impl Runtime for FakeRuntime {
    fn needs_prepare(&self) -> bool {
        self.world.image_gate.lock().unwrap().is_some()
    }

    fn prepare<'a>(&'a self, version: &'a Version) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.world.did(Did::Prepare(version.to_string()));
            // A slow image build: it ends when the test says so.
            let gate = self.world.image_gate.lock().unwrap().clone();
            if let Some(mut g) = gate {
                let _ = g.wait_for(|open| *open).await;
            }
            Ok(())
        })
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        Box::pin(async move {
            let port = 20_000 + self.world.next_port.fetch_add(1, Ordering::SeqCst);
            let addr = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
            self.world.running.lock().unwrap().insert(
                spec.instance.clone(),
                Running {
                    version: spec.version.clone(),
                    addr,
                    up: true,
                },
            );
            self.world.did(Did::Start(spec.instance.to_string()));
            Ok(Started {
                instance: spec.instance,
                addr,
                handle: Handle::new(format!("fake-{port}")),
            })
        })
    }

    fn stop<'a>(
        &'a self,
        instance: &'a InstanceId,
        _stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if self
                .world
                .running
                .lock()
                .unwrap()
                .remove(instance)
                .is_some()
            {
                self.world.did(Did::Stop(instance.to_string()));
            }
            Ok(())
        })
    }

    fn adopt(&self, spec: StartSpec, started: Started) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let known = self
                .world
                .running
                .lock()
                .unwrap()
                .get(&spec.instance)
                .is_some_and(|r| r.addr == started.addr);
            if !known {
                return Err(RuntimeError::Io(std::io::Error::other("not running")));
            }
            self.world.did(Did::Adopt(spec.instance.to_string()));
            Ok(())
        })
    }

    fn recover(&self, recorded: Vec<Recorded>) -> BoxFuture<'_, Vec<Found>> {
        Box::pin(async move {
            let running = self.world.running.lock().unwrap().clone();
            if !self.outlives_daemon {
                // Processes died with their daemon.
                for r in &recorded {
                    self.world.running.lock().unwrap().remove(&r.instance);
                }
                return Vec::new();
            }
            running
                .into_iter()
                .map(|(id, r)| Found {
                    service: ServiceName::new("web"),
                    version: r.version,
                    started: Started {
                        instance: id,
                        addr: r.addr,
                        handle: Handle::new(format!("fake-{}", r.addr.port())),
                    },
                })
                .collect()
        })
    }

    fn stop_all(&self, _stop_timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let ids: Vec<InstanceId> = self.world.running.lock().unwrap().keys().cloned().collect();
            for id in ids {
                self.world.running.lock().unwrap().remove(&id);
                self.world.did(Did::Stop(id.to_string()));
            }
        })
    }

    fn describe(&self, _instance: &InstanceId, handle: &Handle) -> String {
        handle.as_str().to_owned()
    }

    fn disturb<'a>(
        &'a self,
        instance: &'a InstanceId,
        how: Disturbance,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        Box::pin(async move {
            self.world.did(Did::Disturb(instance.to_string(), how));
            Ok(format!("disturbed {instance}"))
        })
    }
}

struct Plane(Arc<World>);

impl DataPlane for Plane {
    fn publish(&self, table: RouteTable) {
        let routed = table
            .versions
            .iter()
            .filter(|v| v.weight > Weight::ZERO)
            .flat_map(|v| v.backends.iter().map(|b| b.instance.to_string()))
            .collect();
        self.0.did(Did::Publish(routed));
        // Like the proxy, the health check forgets instances the table no longer lists.
        let listed: Vec<InstanceId> = table
            .versions
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.instance.clone()))
            .collect();
        self.0
            .reported
            .lock()
            .unwrap()
            .retain(|id, _| listed.contains(id));
        self.0.tables.lock().unwrap().push(table);
    }

    fn inflight(&self, _service: &ServiceName, instance: &InstanceId) -> u64 {
        self.0
            .inflight
            .lock()
            .unwrap()
            .get(instance)
            .copied()
            .unwrap_or(0)
    }

    fn restarted(&self, _service: &ServiceName, instance: &InstanceId) {
        self.0
            .reported
            .lock()
            .unwrap()
            .insert(instance.clone(), Health::Unhealthy);
    }
}

fn spec() -> RolloutSpec {
    let mut spec = RolloutSpec {
        instances: 2,
        scale_down_delay: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(10),
        ..RolloutSpec::default()
    };
    spec.analysis.enabled = false;
    spec.canary_steps = vec![
        CanaryStep::SetWeight {
            weight: Weight::new(50).unwrap(),
            pause: Some(Duration::from_secs(30)),
            analysis: false,
        },
        CanaryStep::SetWeight {
            weight: Weight::FULL,
            pause: None,
            analysis: false,
        },
    ];
    spec
}

struct Daemon {
    world: Arc<World>,
    c: Controller,
    health: mpsc::UnboundedSender<HealthChange>,
    exits: mpsc::UnboundedSender<InstanceExit>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    run: tokio::task::JoinHandle<Vec<cutover_controller::HandedOver>>,
}

impl Daemon {
    fn start(world: &Arc<World>, store: Store, outlives_daemon: bool) -> Daemon {
        Daemon::start_with(
            world,
            store,
            outlives_daemon,
            spec(),
            SafetySetup::default(),
        )
    }

    fn start_with(
        world: &Arc<World>,
        store: Store,
        outlives_daemon: bool,
        spec: RolloutSpec,
        safety: SafetySetup,
    ) -> Daemon {
        // A new daemon has a new proxy, whose health check has reported nothing yet.
        world.reported.lock().unwrap().clear();
        let (health, health_rx) = mpsc::unbounded_channel();
        let (exits, exits_rx) = mpsc::unbounded_channel();
        let runtime = FakeRuntime {
            world: world.clone(),
            outlives_daemon,
        };
        let setup = ServiceSetup {
            name: ServiceName::new("web"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            preview_listen: None,
            initial_version: Version::new("v1"),
            spec,
            probe_paths: vec!["/".into()],
            command: vec!["app".into()],
            env: BTreeMap::new(),
            env_file: None,
            known_versions: None,
            runtime: Arc::new(runtime),
            safety: Arc::new(safety),
        };
        let (driver, c) = cutover_controller::driver(DriverParts {
            services: vec![setup],
            store,
            dataplane: Arc::new(Plane(world.clone())),
            metrics: cutover_metrics::Metrics::new(),
            health: health_rx,
            exits: exits_rx,
            adopt: Vec::new(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(driver.run(async move {
            let _ = stopped.await;
            Shutdown::Stop
        }));
        Daemon {
            world: world.clone(),
            c,
            health,
            exits,
            stop: Some(stop),
            run,
        }
    }

    async fn view(&self) -> ServiceView {
        self.c.service("web").await.unwrap()
    }

    /// Probes (as the proxy does) and lets virtual time pass until `f` holds.
    async fn until(&self, what: &str, f: impl Fn(&ServiceView) -> bool) -> ServiceView {
        for _ in 0..600 {
            self.world.probe(&self.health);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let v = self.view().await;
            if f(&v) {
                return v;
            }
        }
        panic!(
            "{what} did not happen in 60 s of virtual time: {:#?}",
            self.view().await
        );
    }

    async fn deploy(&self, version: &str) {
        self.c
            .deploy(DeployRequest {
                service: "web".into(),
                version: version.into(),
                env: BTreeMap::new(),
                strategy: None,
                actor: "test".into(),
            })
            .await
            .unwrap();
    }

    async fn shut_down(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.run.await.unwrap();
    }

    /// The daemon dies without a word: nothing is stopped or handed over.
    fn kill(self) {
        self.run.abort();
    }
}

fn healthy_of(v: &ServiceView, version: &str) -> usize {
    v.instances
        .iter()
        .filter(|i| i.version.as_str() == version && i.health == Health::Healthy)
        .count()
}

#[tokio::test(start_paused = true)]
async fn starts_the_stable_version_and_publishes_it_once_it_runs() {
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open_in_memory().unwrap(), false);
    let v = d
        .until("two healthy v1", |v| healthy_of(v, "v1") == 2)
        .await;
    assert_eq!(v.phase, Phase::Stable);
    assert_eq!(world.running_of("v1").len(), 2);
    assert_eq!(world.starts(), 2, "{:?}", world.log());
    // Every instance was started before any table routed to it.
    let log = world.log();
    for (i, d) in log.iter().enumerate() {
        if let Did::Publish(routed) = d {
            for id in routed {
                assert!(
                    log[..i].contains(&Did::Start(id.clone())),
                    "{id} routed before it was started: {log:?}"
                );
            }
        }
    }
    assert!(v.instances.iter().all(|i| i.runs_as.starts_with("fake-")));
    d.shut_down().await;
    assert!(
        world.running.lock().unwrap().is_empty(),
        "stop stops everything"
    );
}

#[tokio::test(start_paused = true)]
async fn a_disturbance_reaches_only_the_services_own_instances() {
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open_in_memory().unwrap(), false);
    let v = d
        .until("two healthy v1", |v| healthy_of(v, "v1") == 2)
        .await;
    let id = v.instances[0].id.clone();
    let done = d.c.disturb("web", &id, Disturbance::Kill).await.unwrap();
    assert_eq!(done, format!("disturbed {id}"));
    assert!(
        world
            .log()
            .contains(&Did::Disturb(id.to_string(), Disturbance::Kill))
    );
    let stranger = InstanceId::new("web-v9-0");
    let e =
        d.c.disturb("web", &stranger, Disturbance::Kill)
            .await
            .unwrap_err();
    assert!(e.to_string().contains("no instance web-v9-0"), "{e}");
    assert!(d.c.disturb("db", &id, Disturbance::Kill).await.is_err());
    d.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_preparation_runs_off_the_loop_and_its_instances_start_after_it() {
    let world = Arc::new(World::default());
    let (gate, opened) = tokio::sync::watch::channel(true);
    *world.image_gate.lock().unwrap() = Some(opened);
    let d = Daemon::start(&world, Store::open_in_memory().unwrap(), false);
    d.until("two healthy v1", |v| healthy_of(v, "v1") == 2)
        .await;
    assert!(world.log().contains(&Did::Prepare("v1".into())));
    // v2's image takes a while to build.
    gate.send(false).unwrap();
    d.deploy("v2").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The deploy was answered and the controller answers on: nothing waits for the build.
    let v = d.view().await;
    assert_eq!(v.candidate.as_ref().map(Version::as_str), Some("v2"));
    assert_eq!(world.running_of("v2").len(), 0, "{:?}", world.log());
    assert!(world.log().contains(&Did::Prepare("v2".into())));
    gate.send(true).unwrap();
    d.until("v2 running", |v| healthy_of(v, "v2") >= 1).await;
    // Prepared once, then every start of the version goes straight on.
    let prepares = world
        .log()
        .iter()
        .filter(|x| **x == Did::Prepare("v2".into()))
        .count();
    assert_eq!(prepares, 1);
    d.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_canary_grows_before_traffic_moves_and_drains_before_it_stops() {
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open_in_memory().unwrap(), false);
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    d.deploy("v2").await;
    let v = d
        .until("50% on v2", |v| {
            v.weights
                .iter()
                .any(|(ver, w)| ver.as_str() == "v2" && *w == 50)
        })
        .await;
    assert_eq!(v.phase, Phase::Progressing, "{v:#?}");
    assert_eq!(v.step, Some((1, 2)), "holds its 30 s pause: {v:#?}");
    assert_eq!(world.running_of("v2").len(), 2);
    let v = d
        .until("promoted, v1 retired then stopped", |v| {
            v.phase == Phase::Stable
                && v.stable.as_str() == "v2"
                && world.running_of("v1").is_empty()
        })
        .await;
    assert_eq!(healthy_of(&v, "v2"), 2);
    let log = world.log();
    // Zero-downtime order: every stop comes after the last table that routed to the instance
    // was replaced, and nothing of v2 was routed before it started.
    for (i, entry) in log.iter().enumerate() {
        if let Did::Stop(id) = entry {
            let last_table = log[..i]
                .iter()
                .rev()
                .find_map(|d| match d {
                    Did::Publish(r) => Some(r),
                    _ => None,
                })
                .unwrap();
            assert!(
                !last_table.contains(id),
                "{id} stopped while routed: {log:?}"
            );
        }
    }
    let rollouts = d.c.history(Some("web"), 5).await.unwrap();
    assert_eq!(rollouts[0].outcome, RolloutOutcome::Promoted);
    d.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_requests_in_flight_up_to_drain_timeout() {
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open_in_memory().unwrap(), false);
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    let v1 = world.running_of("v1");
    // One v1 instance keeps a request in flight.
    world.inflight.lock().unwrap().insert(v1[0].clone(), 1);
    d.deploy("v2").await;
    d.until("v2 healthy", |v| healthy_of(v, "v2") == 2).await;
    d.c.act(
        "web",
        Action::Promote {
            full: true,
            force: false,
        },
        "test".into(),
    )
    .await
    .unwrap();
    // Past scale_down_delay (5 s): the idle instance is stopped, the busy one drains.
    d.until("the idle v1 stopped", |_| {
        !world.running_of("v1").contains(&v1[1])
    })
    .await;
    assert!(
        world.running_of("v1").contains(&v1[0]),
        "busy instance still draining"
    );
    let draining = d.view().await;
    assert!(
        draining
            .instances
            .iter()
            .any(|i| i.id == v1[0] && i.health == Health::Draining),
        "{draining:#?}"
    );
    // Its request finishes: it stops at once.
    world.inflight.lock().unwrap().clear();
    d.until("the busy v1 stopped", |_| world.running_of("v1").is_empty())
        .await;
    // A request that never finishes does not hold a stop beyond drain_timeout (10 s).
    d.deploy("v3").await;
    d.until("v3 healthy", |v| healthy_of(v, "v3") == 2).await;
    d.c.act(
        "web",
        Action::Promote {
            full: true,
            force: false,
        },
        "test".into(),
    )
    .await
    .unwrap();
    d.until("v3 serves", |v| {
        v.phase == Phase::Stable && v.stable.as_str() == "v3" && healthy_of(v, "v3") == 2
    })
    .await;
    for id in world.running_of("v2") {
        world.inflight.lock().unwrap().insert(id, 1);
    }
    let t0 = tokio::time::Instant::now();
    d.until("v2 stopped despite requests in flight", |_| {
        world.running_of("v2").is_empty()
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(20),
        "scale_down_delay then drain_timeout: {took:?}"
    );
    d.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_instance_is_reported_and_serves_again_without_a_new_start() {
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open_in_memory().unwrap(), false);
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    let victim = world.running_of("v1")[0].clone();
    FakeRuntime::crash(&world, &d.exits, &victim);
    let v = d
        .until("the exit recorded", |v| {
            v.recent_events
                .iter()
                .any(|e| e.kind == EventKind::InstanceExit)
        })
        .await;
    let exit = v
        .recent_events
        .iter()
        .find(|e| e.kind == EventKind::InstanceExit)
        .unwrap();
    assert!(exit.message.contains("out of cheese"), "{}", exit.message);
    d.until("both healthy again", |v| healthy_of(v, "v1") == 2)
        .await;
    assert_eq!(
        world.starts(),
        2,
        "the runtime restarted it, not the driver"
    );
    d.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn after_a_crash_the_next_daemon_adopts_what_still_runs_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open(dir.path()).unwrap(), true);
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    d.deploy("v2").await;
    let before = d
        .until("50% on v2", |v| {
            v.weights
                .iter()
                .any(|(ver, w)| ver.as_str() == "v2" && *w == 50)
        })
        .await;
    let starts = world.starts();
    let ids: Vec<InstanceId> = world.running.lock().unwrap().keys().cloned().collect();
    assert_eq!(ids.len(), 4);
    d.kill();

    // Containers outlived the daemon: the next one adopts them, starts nothing, and the
    // rollout goes on from its checkpoint.
    let d = Daemon::start(&world, Store::open(dir.path()).unwrap(), true);
    let v = d
        .until("resumed at 50%", |v| {
            v.rollout_id == before.rollout_id
                && v.weights
                    .iter()
                    .any(|(ver, w)| ver.as_str() == "v2" && *w == 50)
                && healthy_of(v, "v1") == 2
                && healthy_of(v, "v2") == 2
        })
        .await;
    assert_eq!(
        world.starts(),
        starts,
        "nothing started twice: {:?}",
        world.log()
    );
    let adopted = world
        .log()
        .iter()
        .filter(|d| matches!(d, Did::Adopt(_)))
        .count();
    assert_eq!(adopted, 4);
    let now: Vec<InstanceId> = v.instances.iter().map(|i| i.id.clone()).collect();
    assert_eq!(now, ids, "the same instances");
    d.c.act(
        "web",
        Action::Promote {
            full: true,
            force: false,
        },
        "test".into(),
    )
    .await
    .unwrap();
    d.until("promoted", |v| {
        v.phase == Phase::Stable && v.stable.as_str() == "v2"
    })
    .await;
    d.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn after_a_crash_processes_are_gone_and_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let world = Arc::new(World::default());
    let d = Daemon::start(&world, Store::open(dir.path()).unwrap(), false);
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    d.kill();
    let d = Daemon::start(&world, Store::open(dir.path()).unwrap(), false);
    let v = d
        .until("v1 healthy again", |v| healthy_of(v, "v1") == 2)
        .await;
    assert_eq!(world.starts(), 4, "{:?}", world.log());
    assert_eq!(v.instances.len(), 2, "the dead ones are forgotten");
    d.shut_down().await;
}

// Release safety (CONTRACT §9) through the driver: jobs run real commands and real SQLite,
// so these tests run in real time (paused time would jump to a command's timeout while the
// process works); the fake runtime keeps them fast.

/// A spec that promotes as soon as the candidate is healthy (one 100% step, no analysis).
fn quick(steps: cutover_core::ReleaseSteps) -> RolloutSpec {
    let mut s = spec();
    s.canary_steps = vec![CanaryStep::SetWeight {
        weight: Weight::FULL,
        pause: None,
        analysis: false,
    }];
    s.scale_down_delay = Duration::from_millis(100);
    s.drain_timeout = Duration::from_millis(500);
    s.steps = steps;
    s
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// A SQLite database with `rows` rows in `items`.
fn sqlite_db(path: &std::path::Path, rows: u32) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    for i in 0..rows {
        c.execute("INSERT INTO items (name) VALUES (?1)", [i.to_string()])
            .unwrap();
    }
}

fn count(path: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

fn safety_with_sqlite(
    dir: &std::path::Path,
    migrate: Vec<String>,
    on_rollback: cutover_core::DbRollback,
) -> SafetySetup {
    let db = dir.join("shop.db");
    let spec = cutover_core::DatabaseSpec {
        kind: cutover_core::DbKind::Sqlite,
        location: cutover_core::DbLocation::Path(db.clone()),
        backup_before_deploy: true,
        migrate: Some(migrate),
        on_rollback,
        migrate_down: None,
        timeout: Duration::from_secs(30),
        bin_dir: None,
    };
    SafetySetup {
        spec: cutover_core::SafetySpec {
            database: Some(spec),
            ..Default::default()
        },
        database: Some(Ok(cutover_safety::Target::Sqlite { path: db })),
        backups: cutover_core::BackupSettings {
            dir: dir.join("backups"),
            ..Default::default()
        },
        state_dir: None,
        workdir: Some(dir.to_owned()),
        groups: Default::default(),
    }
}

async fn rollout_events(d: &Daemon, id: i64) -> Vec<(EventKind, String)> {
    d.c.rollout(id)
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| (e.kind, e.message))
        .collect()
}

async fn ended(d: &Daemon) -> cutover_controller::RolloutView {
    for _ in 0..300 {
        d.world.probe(&d.health);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let h = d.c.history(Some("web"), 1).await.unwrap();
        if h.first()
            .is_some_and(|r| r.outcome != RolloutOutcome::InProgress)
        {
            return h.into_iter().next().unwrap();
        }
    }
    panic!("the rollout did not end: {:#?}", d.view().await);
}

#[tokio::test]
async fn a_failing_pre_deploy_hook_fails_the_rollout_before_anything_starts() {
    let world = Arc::new(World::default());
    let safety = SafetySetup {
        spec: cutover_core::SafetySpec {
            hooks: cutover_core::Hooks {
                pre_deploy: vec![sh("echo 'gate: 3 critical findings' >&2; exit 3")],
                on_rollback: vec![sh("exit 0")],
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let steps = safety.spec.steps();
    let d = Daemon::start_with(
        &world,
        Store::open_in_memory().unwrap(),
        false,
        quick(steps),
        safety,
    );
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    d.deploy("v2").await;
    let r = ended(&d).await;
    assert_eq!(r.outcome, RolloutOutcome::Failed);
    let reason = r.reason.clone().unwrap();
    assert!(reason.contains("pre_deploy hook failed"), "{reason}");
    assert!(reason.contains("exited with code 3"), "{reason}");
    assert!(reason.contains("gate: 3 critical findings"), "{reason}");
    assert!(reason.contains("nothing changed"), "{reason}");
    assert!(world.running_of("v2").is_empty());
    assert_eq!(world.starts(), 2, "only v1 ever started: {:?}", world.log());
    let kinds: Vec<EventKind> = rollout_events(&d, r.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(kinds.contains(&EventKind::HookFailed), "{kinds:?}");
    assert!(
        !kinds.contains(&EventKind::Hook),
        "no on_rollback hook: nothing changed"
    );
    d.shut_down().await;
}

#[tokio::test]
async fn a_failed_sqlite_migration_is_restored_and_no_candidate_starts() {
    let world = Arc::new(World::default());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    sqlite_db(&db, 100);
    // Deletes half the rows and adds a column, then fails.
    let migrate = vec![
        "python3".into(),
        "-c".into(),
        "import os, sqlite3, sys\nc = sqlite3.connect(os.environ['DATABASE_PATH'])\nc.execute('ALTER TABLE items ADD COLUMN price INTEGER')\nc.execute('DELETE FROM items WHERE id > 50')\nc.commit()\nprint('step 2 of 3: unique index on items.name')\nsys.exit('ERROR: could not create unique index: duplicate key')".into(),
    ];
    let safety = safety_with_sqlite(dir.path(), migrate, cutover_core::DbRollback::Keep);
    let steps = safety.spec.steps();
    let d = Daemon::start_with(
        &world,
        Store::open_in_memory().unwrap(),
        false,
        quick(steps),
        safety,
    );
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    d.deploy("v2").await;
    let r = ended(&d).await;
    assert_eq!(r.outcome, RolloutOutcome::Failed, "{r:#?}");
    let reason = r.reason.clone().unwrap();
    assert!(reason.contains("the migration for v2 failed"), "{reason}");
    assert!(reason.contains("duplicate key"), "{reason}");
    assert!(
        reason.contains("database restored from backup web-"),
        "{reason}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM items"), 100);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pragma_table_info('items') WHERE name = 'price'"
        ),
        0
    );
    assert_eq!(
        world.starts(),
        2,
        "no candidate instance: {:?}",
        world.log()
    );
    let kinds: Vec<EventKind> = rollout_events(&d, r.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    for k in [
        EventKind::Backup,
        EventKind::MigrateFailed,
        EventKind::Failed,
        EventKind::Restored,
    ] {
        assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
    }
    // The backup is in the catalog, unpinned now that the rollout is over.
    let catalog = cutover_safety::Catalog::new(dir.path().join("backups"));
    let list = catalog.list(Some("web")).unwrap();
    assert_eq!(list.len(), 1);
    assert!(!list[0].pinned);
    assert_eq!(list[0].rollout_id, Some(r.id));
    d.shut_down().await;
}

#[tokio::test]
async fn a_long_migration_runs_off_the_loop_and_a_good_one_promotes() {
    let world = Arc::new(World::default());
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    sqlite_db(&db, 10);
    let migrate = sh(
        "sleep 1.5; python3 -c \"import os,sqlite3; c=sqlite3.connect(os.environ['DATABASE_PATH']); c.execute('ALTER TABLE items ADD COLUMN price INTEGER'); c.commit()\"",
    );
    let safety = safety_with_sqlite(dir.path(), migrate, cutover_core::DbRollback::Restore);
    let steps = safety.spec.steps();
    let d = Daemon::start_with(
        &world,
        Store::open_in_memory().unwrap(),
        false,
        quick(steps),
        safety,
    );
    d.until("v1 healthy", |v| healthy_of(v, "v1") == 2).await;
    d.deploy("v2").await;
    d.until("migrating", |v| v.phase == Phase::Migrating).await;
    // The controller answers while the migration runs, and refuses an abort.
    let t0 = std::time::Instant::now();
    let v = d.view().await;
    assert!(t0.elapsed() < Duration::from_millis(200));
    assert_eq!(v.phase, Phase::Migrating);
    let e =
        d.c.act("web", Action::Abort, "test".into())
            .await
            .unwrap_err();
    assert!(e.to_string().contains("never interrupted half-way"), "{e}");
    let r = ended(&d).await;
    assert_eq!(r.outcome, RolloutOutcome::Promoted, "{r:#?}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pragma_table_info('items') WHERE name = 'price'"
        ),
        1
    );
    d.shut_down().await;
}

#[tokio::test]
async fn scheduled_backups_are_taken_verified_and_pruned() {
    let world = Arc::new(World::default());
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(&dir.path().join("shop.db"), 10);
    let mut safety = safety_with_sqlite(dir.path(), sh("true"), cutover_core::DbRollback::Keep);
    safety.backups.every = Some(Duration::from_millis(300));
    safety.backups.keep = cutover_core::Keep {
        last: 2,
        hourly: 0,
        daily: 0,
        weekly: 0,
        monthly: 0,
        yearly: 0,
    };
    let d = Daemon::start_with(
        &world,
        Store::open_in_memory().unwrap(),
        false,
        quick(Default::default()),
        safety,
    );
    let v = d
        .until("a backup pruned", |v| {
            v.recent_events
                .iter()
                .any(|e| e.kind == EventKind::BackupPruned)
        })
        .await;
    assert!(
        v.recent_events.iter().any(
            |e| e.kind == EventKind::BackupVerified && e.message.contains("integrity_check ok")
        ),
        "{:#?}",
        v.recent_events
    );
    let catalog = cutover_safety::Catalog::new(dir.path().join("backups"));
    let list = catalog.list(Some("web")).unwrap();
    assert!(list.len() <= 3, "pruned to the policy: {}", list.len());
    assert!(list.iter().all(|m| m.verified() == Some(true)));
    d.shut_down().await;
}
