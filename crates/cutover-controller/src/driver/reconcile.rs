//! Reconciliation: make the runtime run the number of instances of a version the fsm asked for. Instances grow before traffic moves to them; a shrinking one leaves the route table, drains, and only then stops.

use super::*;

impl Driver {
    /// Makes `want` instances of `version` run: starts missing ones, drains extra ones.
    pub(super) async fn scale(&mut self, name: &ServiceName, version: &Version, want: u32) {
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
        if let Some(svc) = self.services.get_mut(name) {
            svc.want.insert(version.clone(), want);
        }
        if have < want && !self.ready_to_start(name, version) {
            // Started once the preparation ends (`Internal::Prepared`).
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
            self.start_failed(name, version, reason).await;
        }
    }

    /// Whether instances of `version` can be started now; if its runtime must prepare it
    /// first (an image), starts that off the loop and says no.
    fn ready_to_start(&mut self, name: &ServiceName, version: &Version) -> bool {
        let tx = self.internal_tx.clone();
        let Some(svc) = self.services.get_mut(name) else {
            return false;
        };
        if svc.prepared.contains(version) || !svc.setup.runtime.needs_prepare() {
            return true;
        }
        if svc.preparing.insert(version.clone()) {
            tracing::info!(service = %name, version = %version, "preparing the version (its image) before its first start");
            let runtime = svc.setup.runtime.clone();
            let (service, version) = (name.clone(), version.clone());
            tokio::spawn(async move {
                let result = runtime.prepare(&version).await.map_err(|e| e.to_string());
                let _ = tx.send(Internal::Prepared {
                    service,
                    version,
                    result,
                });
            });
        }
        false
    }

    /// A version's preparation ended: its instances start now, or the start failed.
    pub(super) async fn on_prepared(
        &mut self,
        name: &ServiceName,
        version: &Version,
        result: Result<(), String>,
    ) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.preparing.remove(version);
        let want = svc.want.get(version).copied().unwrap_or(0);
        match result {
            Ok(()) => {
                svc.prepared.insert(version.clone());
                Box::pin(self.scale(name, version, want)).await;
            }
            // Nobody waits for this version any more: nothing failed that matters.
            Err(_) if want == 0 => {}
            Err(reason) => self.start_failed(name, version, reason).await,
        }
    }

    /// Instances of `version` could not be started: an event, and for a candidate the fsm
    /// hears it (the rollout fails with the reason).
    async fn start_failed(&mut self, name: &ServiceName, version: &Version, reason: String) {
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

    pub(super) async fn start(
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
        let env = instance_env(svc, version, rollout_env)?;
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
            started_at: self.clock.now(),
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
    pub(super) fn drain(&mut self, name: &ServiceName, id: &InstanceId) {
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

    /// Stops every job in flight and the processes they run.
    pub(super) fn stop_jobs(&mut self) {
        for svc in self.services.values_mut() {
            if let Some(j) = svc.job.take() {
                j.abort();
            }
            if let Some(s) = svc.scheduled.take() {
                s.abort();
            }
            svc.setup.safety.groups.kill_all();
        }
    }

    pub(super) async fn stop_everything(&mut self) {
        // A migration stopped with the daemon is undone from its backup at the next start.
        self.stop_jobs();
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

    pub(super) fn update_instance_gauges(&self, name: &ServiceName) {
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
}

/// The environment of an instance of `version`: the service's, under the `--env` of the
/// rollout that brought the version (its candidate's, the stable's or the previous one's).
pub(super) fn instance_env(
    svc: &Svc,
    version: &Version,
    rollout_env: Option<BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = svc.setup.env.clone();
    // Read at each start and never stored: a secret in it stays in the file.
    if let Some(file) = &svc.setup.env_file {
        env.extend(cutover_config::read_env_file(file)?);
    }
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
    Ok(env)
}
