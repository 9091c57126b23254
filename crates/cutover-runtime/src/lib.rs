//! cutover-runtime: starts and stops the instances of a version.
//!
//! Two runtimes: `process` runs a command per instance on a free port, supervises it (restart
//! with backoff if it dies unasked), captures its output to rotated log files, and contains its
//! whole process tree so that nothing of it outlives a stop or the daemon; `static` maps
//! versions to addresses something else runs. This crate carries out what the controller
//! decided; it never decides when to start or stop.

// Signals to process groups, the parent-death signal, joining a cgroup before exec, the
// keeper's pipe and the state dir's lock need libc calls; every unsafe block says why it is
// sound.
#![allow(unsafe_code)]

mod contain;
pub mod inherit;
pub mod logs;
mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cutover_core::{InstanceId, ServiceName, Version};

pub use contain::{
    CGROUPS_ENV, Registered, STATE_DIR_ENV, Swept, registered, safe_component, sweep_leftovers,
};
pub use logs::LogLimits;
pub use process::{
    Inherited, KEEPER_COMMAND, ProcessOptions, ProcessRuntime, keeper_main, kill_orphans,
};

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    pub instance: InstanceId,
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub pgid: Option<u32>,
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

pub enum Runtime {
    Process(ProcessRuntime),
    Static(StaticRuntime),
}

impl Runtime {
    pub async fn start(&self, spec: StartSpec) -> Result<Started, RuntimeError> {
        match self {
            Runtime::Process(p) => p.start(spec).await,
            Runtime::Static(s) => {
                let addr = s
                    .upstreams
                    .get(&spec.version)
                    .and_then(|a| a.get(spec.index % a.len().max(1)))
                    .copied()
                    .ok_or_else(|| RuntimeError::NoUpstream {
                        version: spec.version.clone(),
                        index: spec.index,
                    })?;
                Ok(Started {
                    instance: spec.instance,
                    addr,
                    pid: None,
                    pgid: None,
                })
            }
        }
    }

    /// SIGTERM to the instance's process group, SIGKILL to its whole tree after
    /// `stop_timeout`; returns once nothing of the tree runs. Idempotent.
    pub async fn stop(
        &self,
        instance: &InstanceId,
        stop_timeout: Duration,
    ) -> Result<(), RuntimeError> {
        match self {
            Runtime::Process(p) => p.stop(instance, stop_timeout).await,
            Runtime::Static(_) => Ok(()),
        }
    }

    /// Supervises an instance a previous program of this daemon started and handed over:
    /// it is not started again. `spec` is how to restart it if it exits.
    pub async fn adopt(&self, spec: StartSpec, started: Started) -> Result<(), RuntimeError> {
        match self {
            Runtime::Process(p) => p.adopt(spec, started),
            Runtime::Static(_) => Ok(()),
        }
    }

    pub async fn stop_all(&self, stop_timeout: Duration) {
        if let Runtime::Process(p) = self {
            p.stop_all(stop_timeout).await;
        }
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
        let rt = Runtime::Static(StaticRuntime::new(BTreeMap::from([
            (Version::new("v1"), vec![a, b]),
            (Version::new("v3"), vec![c]),
        ])));
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
