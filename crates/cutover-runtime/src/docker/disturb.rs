//! What a chaos experiment does to a container (docs/reference.md §11): `kill-instance` is a
//! `docker kill` with SIGKILL (the supervisor sees the exit and makes the container again, as
//! after any crash); `cpu-stress` lowers the container's CPU limit (`NanoCpus`) to `1 - load`
//! of a CPU until the stress ends, then gives it its configured limit back.
//!
//! A container outlives the daemon, so its limit must not depend on the daemon surviving the
//! stress: [`DockerRuntime::restore_cpus`] runs at every adoption and puts the configured
//! limit back on a container whose limit differs.

use bollard::Docker;
use bollard::models::ContainerUpdateBody;
use bollard::query_parameters::KillContainerOptionsBuilder;
use cutover_core::InstanceId;

use super::{DockerRuntime, engine_message, short};
use crate::{Disturbance, RuntimeError};

/// The least CPU a stressed container keeps: a hundredth of one.
const FLOOR_CPUS: f64 = 0.01;

impl DockerRuntime {
    /// The container `instance` runs as now (a crash makes a new one).
    pub(super) fn current(&self, instance: &InstanceId) -> Result<String, RuntimeError> {
        self.inner
            .ctrs
            .lock()
            .ok()
            .and_then(|c| {
                c.get(instance)
                    .and_then(|c| c.id.lock().ok().map(|g| g.clone()))
            })
            .filter(|id| !id.is_empty())
            .ok_or_else(|| RuntimeError::Unsupported(format!("{instance} does not run here")))
    }

    /// The limit the config gives, in `NanoCpus`; without one, every CPU of the machine, which
    /// limits nothing (the Engine ignores an update to 0, so "no limit" cannot be put back
    /// literally).
    fn configured_nano_cpus(&self) -> i64 {
        let cpus = self.inner.opts.cpus.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
        });
        (cpus * 1e9).round() as i64
    }

    async fn set_nano_cpus(
        &self,
        docker: &Docker,
        id: &str,
        nano: i64,
    ) -> Result<(), RuntimeError> {
        let body = ContainerUpdateBody {
            nano_cpus: Some(nano),
            ..Default::default()
        };
        docker.update_container(id, body).await.map_err(|e| {
            RuntimeError::Docker(format!(
                "cannot change the CPU limit of container {}: {}",
                short(id),
                engine_message(&e)
            ))
        })
    }

    /// Gives an adopted container its configured CPU limit back if a CPU stress of a previous
    /// daemon left it lower.
    pub(super) async fn restore_cpus(&self, docker: &Docker, id: &str) {
        let Ok(c) = docker.inspect_container(id, None).await else {
            return;
        };
        let now = c.host_config.and_then(|h| h.nano_cpus).unwrap_or(0);
        let configured = self.inner.opts.cpus.map(|c| (c * 1e9).round() as i64);
        let stressed = match configured {
            Some(want) => now != want,
            // Unlimited by the config: a limit below the machine's CPUs is a stress's.
            None => now != 0 && now < self.configured_nano_cpus(),
        };
        if stressed {
            let want = self.configured_nano_cpus();
            match self.set_nano_cpus(docker, id, want).await {
                Ok(()) => tracing::warn!(
                    container = short(id),
                    "gave the container its CPU limit back after a CPU stress the previous daemon did not end"
                ),
                Err(e) => tracing::error!(error = %e, "cannot end a CPU stress"),
            }
        }
    }

    pub(super) async fn disturb(
        &self,
        instance: &InstanceId,
        how: Disturbance,
    ) -> Result<String, RuntimeError> {
        match how {
            Disturbance::Calm => Ok(self.inner.stresses.calm(instance)),
            Disturbance::Kill => {
                let id = self.current(instance)?;
                let docker = self.docker().await?;
                let options = KillContainerOptionsBuilder::default()
                    .signal("SIGKILL")
                    .build();
                docker
                    .kill_container(&id, Some(options))
                    .await
                    .map_err(|e| {
                        RuntimeError::Docker(format!(
                            "cannot kill container {}: {}",
                            short(&id),
                            engine_message(&e)
                        ))
                    })?;
                Ok(format!(
                    "SIGKILL sent to {instance} (container {})",
                    short(&id)
                ))
            }
            Disturbance::CpuStress { load, duration } => {
                let id = self.current(instance)?;
                let docker = self.docker().await?;
                let rx = self.inner.stresses.begin(instance)?;
                let cpus = (1.0 - load).max(FLOOR_CPUS);
                if let Err(e) = self
                    .set_nano_cpus(&docker, &id, (cpus * 1e9).round() as i64)
                    .await
                {
                    self.inner.stresses.end(instance);
                    return Err(e);
                }
                let rt = self.clone();
                let instance_ = instance.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(duration) => {}
                        _ = rx => {}
                    }
                    rt.inner.stresses.end(&instance_);
                    // The container it runs as now: a crash meanwhile made a new one, which
                    // already has the configured limit.
                    let Ok(id) = rt.current(&instance_) else {
                        return;
                    };
                    let Ok(docker) = rt.docker().await else {
                        return;
                    };
                    let want = rt.configured_nano_cpus();
                    if let Err(e) = rt.set_nano_cpus(&docker, &id, want).await {
                        tracing::error!(error = %e, "cannot end a CPU stress");
                    }
                });
                Ok(format!(
                    "{instance} (container {}) limited to {cpus:.2} CPU for {}ms",
                    short(&id),
                    duration.as_millis()
                ))
            }
        }
    }
}
