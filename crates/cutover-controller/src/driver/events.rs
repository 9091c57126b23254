//! Events from the world: health changes from the proxy, instance exits from the runtime, drains that finished, and the clock's ticks; each becomes an fsm event or a recorded fact.

use super::*;

impl Driver {
    pub(super) async fn on_health(&mut self, h: HealthChange) {
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

    pub(super) async fn on_exit(&mut self, e: InstanceExit) {
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
        // A crashed instance takes no traffic until the health checker admits it again, and
        // the checker must report that admission even if none of its probes failed meanwhile.
        if was_healthy {
            inst.health = Health::Unhealthy;
        }
        if e.restart_in.is_some() {
            self.dataplane.restarted(&e.service, &e.instance);
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
        self.record_about(
            &e.service,
            rollout_id,
            EventKind::InstanceExit,
            Some(&e.instance),
            msg.clone(),
        );
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

    pub(super) async fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::Stopped(id) => {
                let mut stopped = None;
                for (name, svc) in self.services.iter_mut() {
                    if svc.instances.remove(&id).is_some() {
                        if let Err(e) = self.store.delete_instance(id.as_str()) {
                            tracing::warn!(error = %e, "could not forget a stopped instance");
                        }
                        stopped = Some(name.clone());
                        break;
                    }
                }
                if let Some(name) = stopped {
                    self.update_instance_gauges(&name);
                    self.start_pending_job(&name);
                }
            }
            Internal::JobDone {
                service,
                seq,
                event,
            } => self.on_job_done(&service, seq, event).await,
            Internal::Fact {
                service,
                rollout,
                kind,
                message,
            } => self.record_loose(&service, rollout, kind, message),
            Internal::Prepared {
                service,
                version,
                result,
            } => self.on_prepared(&service, &version, result).await,
            Internal::ScheduledDone(service) => {
                if let Some(svc) = self.services.get_mut(&service) {
                    svc.scheduled = None;
                }
            }
        }
    }

    pub(super) async fn on_tick(&mut self) {
        let t = self.clock.now();
        self.schedule_backups(t);
        let names: Vec<ServiceName> = self.services.keys().cloned().collect();
        for name in names {
            // A held service does nothing but retry its write: not even a scale-down.
            if self.retry_held(&name).await {
                continue;
            }
            self.start_pending_job(&name);
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

    pub(super) async fn feed_health(&mut self, name: &ServiceName, detail: Option<String>) {
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
}
