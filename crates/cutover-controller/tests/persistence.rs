//! Persist-then-act, with the store's writes failing as on a full disk: the driver must hold
//! the world as it is (no route table, no instance started or stopped), say `degraded` with the
//! reason, retry the write, and carry the held decision out only once it is durable.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_controller::{
    Action, ControlError, DeployRequest, DriverParts, ServiceSetup, Shutdown,
};
use cutover_core::{
    CanaryStep, DataPlane, Health, HealthChange, InstanceId, RolloutOutcome, RolloutSpec,
    RouteTable, ServiceName, Version, Weight,
};
use cutover_runtime::StaticRuntime;
use cutover_store::Store;

/// Records every published table, and how many were published while the disk was "full".
#[derive(Default)]
struct Plane {
    tables: Mutex<Vec<RouteTable>>,
    full: AtomicBool,
    published_while_full: Mutex<Vec<RouteTable>>,
}

impl DataPlane for Plane {
    fn publish(&self, table: RouteTable) {
        if self.full.load(Ordering::SeqCst) {
            self.published_while_full
                .lock()
                .unwrap()
                .push(table.clone());
        }
        self.tables.lock().unwrap().push(table);
    }
    fn inflight(&self, _: &ServiceName, _: &InstanceId) -> u64 {
        0
    }
    fn restarted(&self, _: &ServiceName, _: &InstanceId) {}
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn setup() -> ServiceSetup {
    let upstreams = BTreeMap::from([
        (Version::new("v1"), vec![addr(1)]),
        (Version::new("v2"), vec![addr(2)]),
    ]);
    let mut spec = RolloutSpec {
        instances: 1,
        scale_down_delay: Duration::ZERO,
        ..RolloutSpec::default()
    };
    spec.analysis.enabled = false;
    spec.canary_steps = vec![
        CanaryStep::SetWeight {
            weight: Weight::new(20).unwrap(),
            pause: Some(Duration::from_secs(3600)),
            analysis: false,
        },
        CanaryStep::SetWeight {
            weight: Weight::FULL,
            pause: None,
            analysis: false,
        },
    ];
    ServiceSetup {
        name: ServiceName::new("web"),
        listen: addr(3),
        preview_listen: None,
        initial_version: Version::new("v1"),
        spec,
        probe_paths: vec!["/".into()],
        command: Vec::new(),
        env: BTreeMap::new(),
        env_file: None,
        known_versions: Some(vec![Version::new("v1"), Version::new("v2")]),
        runtime: Arc::new(StaticRuntime::new(upstreams)),
        safety: Default::default(),
    }
}

/// Polls the service until `f` holds (readiness, with a limit that only stops a hang).
async fn wait_for(
    c: &cutover_controller::Controller,
    what: &str,
    f: impl Fn(&cutover_controller::ServiceView) -> bool,
) -> cutover_controller::ServiceView {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c.service("web").await.unwrap();
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_that_cannot_be_saved_is_held_not_acted_on() {
    let store = Store::open_in_memory().unwrap();
    let fault = store.write_fault();
    let plane = Arc::new(Plane::default());
    let (health_tx, health) = tokio::sync::mpsc::unbounded_channel();
    let (_exits_tx, exits) = tokio::sync::mpsc::unbounded_channel();
    let (driver, c) = cutover_controller::driver(DriverParts {
        services: vec![setup()],
        store,
        dataplane: plane.clone(),
        metrics: cutover_metrics::Metrics::new(),
        health,
        exits,
        adopt: Vec::new(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(driver.run(async move {
        let _ = stopped.await;
        Shutdown::Stop
    }));

    let healthy = |v: &cutover_controller::ServiceView, version: &str| {
        for i in v.instances.iter().filter(|i| i.version.as_str() == version) {
            health_tx
                .send(HealthChange {
                    service: ServiceName::new("web"),
                    version: i.version.clone(),
                    instance: i.id.clone(),
                    health: Health::Healthy,
                    reason: "probe passed".into(),
                })
                .unwrap();
        }
    };
    let v = wait_for(&c, "v1 started", |v| !v.instances.is_empty()).await;
    healthy(&v, "v1");
    c.deploy(DeployRequest {
        service: "web".into(),
        version: "v2".into(),
        env: BTreeMap::new(),
        strategy: None,
        actor: "test".into(),
    })
    .await
    .unwrap();
    let v = wait_for(&c, "a v2 instance", |v| {
        v.instances.iter().any(|i| i.version.as_str() == "v2")
    })
    .await;
    healthy(&v, "v2");
    let weight = |v: &cutover_controller::ServiceView| {
        v.configured_weights
            .iter()
            .find(|(ver, _)| ver.as_str() == "v2")
            .map(|(_, w)| *w)
    };
    wait_for(&c, "v2 at 20%", |v| weight(v) == Some(20)).await;

    // The disk is full: the person's promotion is decided but cannot be written.
    fault.set(true);
    plane.full.store(true, Ordering::SeqCst);
    let refused = c
        .act(
            "web",
            Action::Promote {
                full: false,
                force: false,
            },
            "test".into(),
        )
        .await;
    match &refused {
        Err(ControlError::Unavailable(m)) => {
            assert!(
                m.contains("could not be saved") && m.contains("full"),
                "{m}"
            )
        }
        other => panic!("a held promotion must say so: {other:?}"),
    }
    // Held: degraded with the reason, the route unchanged, retries counted.
    let v = wait_for(&c, "a few failed retries", |v| {
        v.degraded
            .as_deref()
            .is_some_and(|d| d.contains("3 failed attempt"))
    })
    .await;
    assert_eq!(weight(&v), Some(20), "{v:#?}");
    assert_eq!(v.stable.as_str(), "v1");
    // Another action meanwhile is refused, not queued behind the held one.
    assert!(matches!(
        c.act("web", Action::Abort, "test".into()).await,
        Err(ControlError::Unavailable(_))
    ));
    let h = c.history(Some("web"), 5).await.unwrap();
    assert_eq!(h[0].outcome, RolloutOutcome::InProgress);
    assert!(
        plane.published_while_full.lock().unwrap().is_empty(),
        "a route table was published for a decision that is not on disk: {:?}",
        plane.published_while_full.lock().unwrap()
    );

    // Space again: the write lands, then (only then) the promotion is carried out.
    plane.full.store(false, Ordering::SeqCst);
    fault.set(false);
    let v = wait_for(&c, "the held promotion carried out", |v| {
        v.degraded.is_none() && v.rollout_id.is_none()
    })
    .await;
    assert_eq!(v.stable.as_str(), "v2", "{v:#?}");
    let h = c.history(Some("web"), 5).await.unwrap();
    assert_eq!(h[0].outcome, RolloutOutcome::Promoted, "{h:#?}");
    assert!(
        v.recent_events
            .iter()
            .any(|e| e.kind == cutover_core::EventKind::Recovered),
        "{:#?}",
        v.recent_events
    );
    let last = plane.tables.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.stable.as_str(), "v2");

    let _ = stop.send(());
    run.await.unwrap();
}
