//! Start-up: what a previous program of this daemon left behind. Service state is read back, instances handed over by a restart in place (or found alive by their runtime after a crash) are adopted, the rest are removed, and rollouts in progress resume from their checkpoints.

use super::*;

impl Driver {
    pub(super) async fn restore(&mut self) {
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
                            started_at: self.clock.now(),
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
        let t = self.clock.now();
        for row in active {
            self.resume_rollout(row).await;
        }
        self.unpin_stale_backups();
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
    pub(super) async fn adopt_instance(
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
            env: instance_env(svc, &version, rollout_env).unwrap_or_else(|e| {
                // It runs already; only a restart after a crash would use this environment.
                tracing::warn!(instance = %instance, error = %e, "the env_file cannot be read; a restart of this instance runs without it");
                BTreeMap::new()
            }),
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

    pub(super) async fn resume_rollout(&mut self, mut row: RolloutRow) {
        let name = ServiceName::new(&row.service);
        let Some(svc) = self.services.get(&name) else {
            row.outcome = RolloutOutcome::Failed;
            row.reason = Some(format!(
                "service {} is no longer in the configuration",
                row.service
            ));
            row.finished_at = Some(self.clock.now());
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
                let t = self.clock.now();
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
                row.finished_at = Some(self.clock.now());
                if let Err(e) = self.store.update_rollout(&row) {
                    tracing::error!(error = %e, "could not close an unreadable rollout");
                }
            }
        }
    }
}
