//! Requests from the API: status and history reads, `deploy` and the actions people take on a rollout. What a request may do is the fsm's and `plan`'s to decide; this module turns the answer into a reply.

use super::*;

impl Driver {
    pub(super) async fn request(&mut self, req: Request) {
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
            Request::Record(name, kind, message, tx) => {
                let rollout = self
                    .services
                    .get(&name)
                    .and_then(|s| s.active.as_ref())
                    .map(|a| a.row.id);
                self.record_loose(&name, rollout, kind, message);
                let _ = tx.send(());
            }
            Request::Disturb(name, instance, how, tx) => {
                let r = match self.disturber(&name, &instance, how) {
                    Ok(runtime) => runtime
                        .disturb(&instance, how)
                        .await
                        .map_err(|e| ControlError::Conflict(e.to_string())),
                    Err(e) => Err(e),
                };
                let _ = tx.send(r);
            }
        }
    }

    /// The runtime to carry out a disturbance of `instance`, which must be the service's own:
    /// an experiment never reaches anything else.
    fn disturber(
        &self,
        name: &ServiceName,
        instance: &InstanceId,
        how: Disturbance,
    ) -> Result<Arc<dyn Runtime>, ControlError> {
        let svc = self.services.get(name).ok_or_else(|| Self::unknown(name))?;
        if how != Disturbance::Calm && !svc.instances.contains_key(instance) {
            return Err(ControlError::NotFound(format!(
                "{name} has no instance {instance}"
            )));
        }
        Ok(svc.setup.runtime.clone())
    }

    pub(super) fn rollout_with_events(&self, id: i64) -> Result<RolloutView, ControlError> {
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
            .filter_map(event_view)
            .collect();
        Ok(v)
    }

    pub(super) fn unknown(name: &ServiceName) -> ControlError {
        ControlError::NotFound(format!("no service named {name:?} in the configuration"))
    }

    pub(super) async fn deploy(&mut self, req: DeployRequest) -> Result<RolloutView, ControlError> {
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
        let version = plan::deploy_version(
            &req.version,
            plan::DeployContext {
                service: name.as_str(),
                stable: &svc.stable,
                same_env: req.env == svc.stable_env,
                known_versions: svc.setup.known_versions.as_deref(),
            },
        )
        .map_err(|r| match r {
            plan::DeployRefusal::Invalid(m) => ControlError::BadRequest(m),
            plan::DeployRefusal::Conflict(m) => ControlError::Conflict(m),
        })?;
        let strategy = req.strategy.unwrap_or(svc.setup.spec.strategy);
        let mut spec = svc.setup.spec.clone();
        spec.strategy = strategy;
        self.begin(&name, version, req.env, spec).await
    }

    pub(super) async fn begin(
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
        let t = self.clock.now();
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

    pub(super) async fn act(
        &mut self,
        name: &ServiceName,
        action: Action,
    ) -> Result<ServiceView, ControlError> {
        let svc = self.services.get(name).ok_or_else(|| Self::unknown(name))?;
        if svc.active.is_none() {
            if action == Action::Rollback {
                // After a finished promotion the previous version is started again (or
                // reused, while still warm) and takes all traffic when healthy (`plan`).
                let Some((prev, env)) = svc.previous.clone() else {
                    return Err(ControlError::Conflict(format!(
                        "{name} has no previous version to roll back to"
                    )));
                };
                let spec = plan::rollback_spec(&svc.setup.spec);
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
}
