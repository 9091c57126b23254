//! cutover-runtime: starts and stops the instances of a version.
//!
//! Two runtimes: `process` runs a command per instance on a free port, supervises it (restart
//! with backoff if it dies unasked), captures its output to rotated log files, and contains its
//! whole process tree so that nothing of it outlives a stop or the daemon; `static` maps
//! versions to addresses something else runs; `docker` runs each instance as a container on a
//! Docker Engine (see the `docker` module). This crate carries out what the controller
//! decided; it never decides when to start or stop.

// Signals to process groups, the parent-death signal, joining a cgroup before exec, the
// keeper's pipe and the state dir's lock need libc calls; every unsafe block says why it is
// sound.
#![allow(unsafe_code)]

mod contain;
pub mod docker;
pub mod inherit;
pub mod logs;
mod process;
pub mod stress;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use cutover_core::{InstanceId, ServiceName, Version};

pub use contain::{
    CGROUPS_ENV, Registered, STATE_DIR_ENV, Swept, canonical_state_dir, registered, safe_component,
    sweep_leftovers,
};
pub use logs::LogLimits;
pub use process::{Inherited, KEEPER_COMMAND, ProcessOptions, ProcessRuntime, keeper_main};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the command is empty")]
    EmptyCommand,
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free port: {0}")]
    Port(std::io::Error),
    #[error("static service has no upstreams for version {version}")]
    NoUpstream { version: Version, index: usize },
    #[error(
        "another cutover daemon uses the state dir {}; stop it first, or give this config another daemon.state_dir",
        .0.display()
    )]
    StateDirBusy(std::path::PathBuf),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The runtime cannot do what was asked (e.g. kill an instance of a static service).
    #[error("{0}")]
    Unsupported(String),
    /// What the Docker Engine refused or reported, as one sentence.
    #[error("{0}")]
    Docker(String),
    #[error(
        "the Docker Engine at {host} does not answer ({why}); start it, or point [services.NAME.docker] host or DOCKER_HOST at it"
    )]
    EngineUnreachable { host: String, why: String },
}

/// What to start.
#[derive(Clone, Debug)]
pub struct StartSpec {
    pub service: ServiceName,
    pub version: Version,
    pub instance: InstanceId,
    /// The nth instance of this version, 0-based.
    pub index: usize,
    /// Command template: `{port}` and `{version}` are substituted; program `cutover` means the
    /// daemon's own executable.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Reuse this port (when resuming), else pick a free one.
    pub port: Option<u16>,
}

/// How a runtime finds one of its instances again: text that only the runtime that wrote it
/// reads (a process's pid and group, a container's id). The store keeps it across restarts;
/// nothing outside the runtime looks inside.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handle(String);

impl Handle {
    pub fn new(text: impl Into<String>) -> Self {
        Handle(text.into())
    }

    /// The stored text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    pub instance: InstanceId,
    pub addr: SocketAddr,
    pub handle: Handle,
}

/// An instance a daemon recorded, read back by a later daemon of the same state dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub service: ServiceName,
    pub version: Version,
    pub instance: InstanceId,
    pub addr: Option<SocketAddr>,
    pub handle: Handle,
}

/// An instance that outlived the daemon that started it and that this runtime can supervise
/// again ([`Runtime::adopt`]): containers do, processes never (they die with their daemon).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub service: ServiceName,
    pub version: Version,
    pub started: Started,
}

/// A boxed future, so that runtimes can be trait objects the driver holds per service.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the controller's driver asks of a runtime: start, stop and find instances of a
/// service's versions. Exits the runtime did not cause are sent as [`InstanceExit`] values on
/// the channel the runtime was built with; health is the proxy's to judge.
///
/// The trait is per instance rather than "make version V have N instances" because a stop
/// must wait for the proxy's drain, which the driver sequences with route publication.
pub trait Runtime: Send + Sync {
    /// Starts one instance; returns once it runs (not once it is healthy).
    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, RuntimeError>>;

    /// Whether a version must be prepared ([`Runtime::prepare`]) before its first start.
    fn needs_prepare(&self) -> bool;

    /// Makes what starting instances of `version` needs and may take long (a container
    /// image built or pulled). The driver runs it off its loop, once per version, before the
    /// version's first start, so that a slow build never stalls other services or requests.
    /// A start still works without it (it prepares what is missing itself).
    fn prepare<'a>(&'a self, version: &'a Version) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Stops an instance: its stop signal, then a kill after `stop_timeout`; returns once
    /// nothing of it runs. Idempotent: an unknown instance is already stopped.
    fn stop<'a>(
        &'a self,
        instance: &'a InstanceId,
        stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Supervises an instance that already runs (handed over by a restart in place, or
    /// [`Found`] by [`Runtime::recover`]): it is not started again. `spec` says how to start
    /// it again if it exits.
    fn adopt(&self, spec: StartSpec, started: Started) -> BoxFuture<'_, Result<(), RuntimeError>>;

    /// After a daemon died without handing its instances over: `recorded` is what it had
    /// written down for services on this runtime. Returns the instances that still run and
    /// can be adopted (for containers, also any this state dir's labels name that the record
    /// missed); what cannot be adopted is removed here.
    fn recover(&self, recorded: Vec<Recorded>) -> BoxFuture<'_, Vec<Found>>;

    /// Stops every instance this runtime runs (the daemon is stopping).
    fn stop_all(&self, stop_timeout: Duration) -> BoxFuture<'_, ()>;

    /// A short text for people, e.g. `pid 4242` or `container 3fa2b1c9d0e1`: what the
    /// instance runs as now (after a crash it was restarted as another process or
    /// container), else what `handle` names.
    fn describe(&self, instance: &InstanceId, handle: &Handle) -> String;

    /// Does to one running instance what a chaos experiment asks (docs/reference.md §11);
    /// returns what was done, in words. Nothing here outlives the daemon or the stress's end:
    /// see [`Disturbance`].
    fn disturb<'a>(
        &'a self,
        instance: &'a InstanceId,
        how: Disturbance,
    ) -> BoxFuture<'a, Result<String, RuntimeError>>;
}

/// What a chaos experiment does to one instance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Disturbance {
    /// Kills it as a crash would (SIGKILL to its whole tree; `docker kill` of its container).
    /// The runtime sees an exit it did not ask for and restarts the instance as after any
    /// other crash.
    Kill,
    /// Takes CPU away from it until `duration` has passed or [`Disturbance::Calm`]: a
    /// process shares one CPU with a busy loop that runs `load` of every 100 ms; a container
    /// is limited to `1 - load` of a CPU. The stress ends by itself at its deadline, and with
    /// the daemon (the busy loop exits when its parent is gone; a restarted daemon gives an
    /// adopted container its configured limit back).
    CpuStress { load: f64, duration: Duration },
    /// Ends a CPU stress of the instance now, if it has one.
    Calm,
}

/// The CPU stresses a runtime has under way, by instance: each one's signal to end early.
#[derive(Default)]
pub(crate) struct Stresses(
    std::sync::Mutex<BTreeMap<InstanceId, tokio::sync::oneshot::Sender<()>>>,
);

impl Stresses {
    /// Registers a stress of `instance`; the receiver fires on [`Stresses::calm`]. One at a
    /// time per instance: a second would have to know what the first gives back at its end.
    pub(crate) fn begin(
        &self,
        instance: &InstanceId,
    ) -> Result<tokio::sync::oneshot::Receiver<()>, RuntimeError> {
        let mut s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.contains_key(instance) {
            return Err(RuntimeError::Unsupported(format!(
                "{instance} is already under a CPU stress; wait for its end or calm it first"
            )));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.insert(instance.clone(), tx);
        Ok(rx)
    }

    /// The stress of `instance` ended (by itself or calmed).
    pub(crate) fn end(&self, instance: &InstanceId) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(instance);
    }

    /// Ends the stress of `instance` now; its answer in words.
    pub(crate) fn calm(&self, instance: &InstanceId) -> String {
        let tx = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(instance);
        if tx.is_some_and(|tx| tx.send(()).is_ok()) {
            format!("the CPU stress of {instance} ended")
        } else {
            format!("{instance} had no CPU stress")
        }
    }
}

/// A runtime that cannot do `how` to its instances.
pub fn cannot_disturb(what: &str, how: Disturbance) -> RuntimeError {
    let verb = match how {
        Disturbance::Kill => "kill",
        Disturbance::CpuStress { .. } | Disturbance::Calm => "stress the CPU of",
    };
    RuntimeError::Unsupported(format!(
        "cutover cannot {verb} {what}: their instances are not cutover's to run"
    ))
}

/// An instance exited without being asked to. Sent once its whole process tree is gone and
/// its output is in its log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceExit {
    pub service: ServiceName,
    pub version: Version,
    pub instance: InstanceId,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// When it will be started again.
    pub restart_in: Option<Duration>,
    /// Unasked exits of this instance so far, this one included (1 for the first crash).
    pub exits: u32,
    /// How long this run lasted.
    pub ran_for: Duration,
    /// Its last lines of stderr (at most `logs::TAIL_LINES`, each cut at
    /// `logs::TAIL_LINE_BYTES`), oldest first.
    pub stderr_tail: Vec<String>,
}

/// Maps versions to fixed addresses; starting and stopping do nothing but name them.
///
/// The nth instance of a version is its nth address, wrapping around: the driver runs the same
/// number of instances of every version (the largest number of addresses any version lists),
/// so a version with fewer addresses than that serves from each of them, some more than once,
/// and every listed address gets traffic.
pub struct StaticRuntime {
    upstreams: BTreeMap<Version, Vec<SocketAddr>>,
}

impl StaticRuntime {
    pub fn new(upstreams: BTreeMap<Version, Vec<SocketAddr>>) -> Self {
        StaticRuntime { upstreams }
    }
}

impl Runtime for StaticRuntime {
    fn needs_prepare(&self) -> bool {
        false
    }

    fn prepare<'a>(&'a self, _version: &'a Version) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        let found = self
            .upstreams
            .get(&spec.version)
            .and_then(|a| a.get(spec.index % a.len().max(1)))
            .copied();
        Box::pin(async move {
            let addr = found.ok_or_else(|| RuntimeError::NoUpstream {
                version: spec.version.clone(),
                index: spec.index,
            })?;
            Ok(Started {
                instance: spec.instance,
                addr,
                handle: Handle::default(),
            })
        })
    }

    fn stop<'a>(
        &'a self,
        _instance: &'a InstanceId,
        _stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn adopt(
        &self,
        _spec: StartSpec,
        _started: Started,
    ) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn recover(&self, _recorded: Vec<Recorded>) -> BoxFuture<'_, Vec<Found>> {
        // Nothing of a static service is cutover's to run: the addresses are just names.
        Box::pin(async { Vec::new() })
    }

    fn stop_all(&self, _stop_timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    fn describe(&self, _instance: &InstanceId, _handle: &Handle) -> String {
        "static".to_owned()
    }

    fn disturb<'a>(
        &'a self,
        _instance: &'a InstanceId,
        how: Disturbance,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        Box::pin(async move {
            match how {
                // Nothing to end: a static service is never stressed.
                Disturbance::Calm => Ok("nothing to calm".to_owned()),
                _ => Err(cannot_disturb("a static service's addresses", how)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_runtime_names_configured_addresses() {
        let a: SocketAddr = "127.0.0.1:18081".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:18082".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:18083".parse().unwrap();
        let rt = StaticRuntime::new(BTreeMap::from([
            (Version::new("v1"), vec![a, b]),
            (Version::new("v3"), vec![c]),
        ]));
        let spec = |v: &str, index| StartSpec {
            service: "api".into(),
            version: v.into(),
            instance: "api-v1-0".into(),
            index,
            command: vec![],
            env: BTreeMap::new(),
            port: None,
        };
        let addr = |v, i| {
            let rt = &rt;
            async move { rt.start(spec(v, i)).await.unwrap().addr }
        };
        assert_eq!(addr("v1", 0).await, a);
        assert_eq!(addr("v1", 1).await, b, "every listed address is used");
        assert_eq!(addr("v1", 2).await, a);
        assert_eq!(addr("v3", 0).await, c);
        assert_eq!(
            addr("v3", 1).await,
            c,
            "fewer addresses than instances: they repeat"
        );
        assert!(matches!(
            rt.start(spec("v2", 0)).await,
            Err(RuntimeError::NoUpstream { .. })
        ));
        rt.stop(&"api-v1-0".into(), Duration::from_secs(1))
            .await
            .unwrap();
    }
}
