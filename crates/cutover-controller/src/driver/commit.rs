//! The fsm loop: feed an event to `fsm::step`, persist the transition with its events before anything is done (holding it while the disk refuses), then carry out its commands.

use super::*;

impl Driver {
    pub(super) async fn feed(&mut self, name: &ServiceName, event: Event) {
        if let Err(r) = self.feed_checked(name, event).await {
            tracing::debug!(refusal = %r, "event refused");
        }
    }

    /// Steps the service's rollout with `event`, persists the result, then runs its commands.
    pub(super) async fn feed_checked(
        &mut self,
        name: &ServiceName,
        event: Event,
    ) -> Result<(), fsm::Refusal> {
        // A held service decides nothing more until its last decision is durable.
        if self.services.get(name).is_some_and(|s| s.held.is_some()) {
            return Err(fsm::Refusal(format!(
                "{name} is held until its state can be saved"
            )));
        }
        let Some(a) = self.services.get_mut(name).and_then(|s| s.active.as_mut()) else {
            return Ok(());
        };
        let (next, cmds) = fsm::step(&a.spec, &a.rollout, &event, self.clock.now())?;
        if next == a.rollout && cmds.is_empty() {
            return Ok(());
        }
        a.rollout = next;
        self.commit(name, cmds).await;
        Ok(())
    }

    /// Persists the active rollout of `name` with the events its commands record, then runs
    /// the commands, then finishes the rollout if it ended.
    pub(super) async fn commit(&mut self, name: &ServiceName, cmds: Vec<Command>) {
        let t = self.clock.now();
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(a) = svc.active.as_mut() else { return };
        // Only this commit is the person's doing; what follows from it later is cutover's.
        let actor = self.acting.take();
        a.row.checkpoint = checkpoint::encode_with_spec(&a.rollout, &a.spec);
        a.row.outcome = a.rollout.outcome();
        a.row.reason = a.rollout.reason().map(str::to_owned);
        if a.rollout.is_done() {
            a.row.finished_at = Some(t);
            a.row.ended_by = actor.clone();
        }
        let phase = a.rollout.phase();
        let weight = a.rollout.candidate_weight(&a.spec).percent();
        let events: Vec<NewEvent> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Record { kind, message } => Some(NewEvent {
                    service: name.to_string(),
                    rollout_id: Some(a.rollout.id),
                    at: t,
                    kind: kind.as_str().to_owned(),
                    message: match &actor {
                        Some(who) => format!("{message} (by {who})"),
                        None => message.clone(),
                    },
                    data: format!(
                        "{{\"phase\":\"{phase}\",\"candidate_weight\":{weight},\"failures\":{}}}",
                        a.rollout.failures
                    ),
                }),
                _ => None,
            })
            .collect();
        for e in &events {
            tracing::info!(service = %e.service, kind = %e.kind, "{}", e.message);
        }
        // The service's new stable version goes into the same transaction as the rollout's end.
        let service = a.rollout.is_done().then(|| finished_service_row(name, svc));
        let row = svc.active.as_ref().map(|a| a.row.clone());
        let Some(row) = row else { return };
        // Persist before acting: if the daemon dies between here and the commands, a restart
        // re-applies the recorded state instead of forgetting a decision. If the write fails,
        // nothing is carried out: the transition is held and written again until it lands.
        match self
            .store
            .record_transition(&row, &events, service.as_ref())
        {
            Ok(ids) => self.carry_out(name, ids, events, cmds, phase).await,
            Err(e) => {
                tracing::error!(
                    service = %name,
                    error = %e,
                    "could not persist a transition; holding the service as it is (no command runs) and retrying the write"
                );
                if let Some(svc) = self.services.get_mut(name) {
                    svc.held = Some(Held {
                        row,
                        events,
                        service,
                        cmds,
                        phase,
                        error: e.to_string(),
                        attempts: 1,
                        next_try: tokio::time::Instant::now() + RETRY_FIRST,
                        backoff: RETRY_FIRST,
                    });
                }
            }
        }
    }

    /// What follows a durable transition: its live notices, its commands, its end.
    pub(super) async fn carry_out(
        &mut self,
        name: &ServiceName,
        ids: Vec<i64>,
        events: Vec<NewEvent>,
        cmds: Vec<Command>,
        phase: Phase,
    ) {
        // `events` were made from the `Record` commands, in order.
        let kinds = cmds.iter().filter_map(|c| match c {
            Command::Record { kind, .. } => Some(*kind),
            _ => None,
        });
        let notices: Vec<Notice> = ids
            .into_iter()
            .zip(events)
            .zip(kinds)
            .map(|((id, e), kind)| Notice {
                event: EventView {
                    id,
                    service: e.service,
                    rollout_id: e.rollout_id,
                    at: e.at,
                    kind,
                    message: e.message,
                },
                phase,
                instance: None,
            })
            .collect();
        for n in notices {
            let _ = self.notices.send(n);
        }
        for c in cmds {
            self.run_command(name, c).await;
        }
        self.finish_if_done(name);
        self.reconcile_probes(name);
        self.reconcile_job(name);
    }

    /// Writes a held transition again once its backoff has passed; when it lands, carries it
    /// out and lets the service go on. Returns whether the service is still held.
    pub(super) async fn retry_held(&mut self, name: &ServiceName) -> bool {
        let Some(svc) = self.services.get_mut(name) else {
            return false;
        };
        let Some(h) = svc.held.as_mut() else {
            return false;
        };
        if tokio::time::Instant::now() < h.next_try {
            return true;
        }
        match self
            .store
            .record_transition(&h.row, &h.events, h.service.as_ref())
        {
            Err(e) => {
                h.attempts += 1;
                h.error = e.to_string();
                h.backoff = (h.backoff * 2).min(RETRY_MAX);
                h.next_try = tokio::time::Instant::now() + h.backoff;
                // Loud at first, then about once a minute at the longest backoff.
                if h.attempts <= 3 || h.attempts % 6 == 0 {
                    tracing::warn!(service = %name, attempts = h.attempts, error = %e, "still cannot persist a transition; the service stays held");
                }
                true
            }
            Ok(ids) => {
                let Some(h) = svc.held.take() else {
                    return false;
                };
                tracing::warn!(service = %name, attempts = h.attempts, "the held transition is saved; carrying it out");
                self.carry_out(name, ids, h.events, h.cmds, h.phase).await;
                let rollout_id = self
                    .services
                    .get(name)
                    .and_then(|s| s.active.as_ref())
                    .map(|a| a.rollout.id)
                    .or(Some(h.row.id));
                self.record_loose(
                    name,
                    rollout_id,
                    EventKind::Recovered,
                    format!(
                        "the state could be saved again after {} failed attempt(s); the held decision was carried out",
                        h.attempts
                    ),
                );
                false
            }
        }
    }

    /// `Unavailable` while `name` is held, saying why.
    pub(super) fn held_error(&self, name: &ServiceName) -> Result<(), ControlError> {
        match self.services.get(name).and_then(|s| s.held.as_ref()) {
            Some(h) => Err(ControlError::Unavailable(format!(
                "{name} is degraded: {}; act again once the state can be written (free disk space in the state directory)",
                h.reason()
            ))),
            None => Ok(()),
        }
    }

    pub(super) async fn run_command(&mut self, name: &ServiceName, c: Command) {
        match c {
            Command::Scale { version, instances } => self.scale(name, &version, instances).await,
            Command::Route { candidate, preview } => {
                if let Some(svc) = self.services.get_mut(name) {
                    svc.candidate_weight = candidate;
                    svc.preview = preview;
                }
                self.publish(name);
            }
            Command::ResetAnalysis => {
                let Some(a) = self.services.get(name).and_then(|s| s.active.as_ref()) else {
                    return;
                };
                let (stable, cand) = (a.rollout.stable.clone(), a.rollout.candidate.clone());
                let snaps = self.snapshots(name, &stable, &cand);
                if let Some(a) = self.services.get_mut(name).and_then(|s| s.active.as_mut()) {
                    a.baseline = snaps;
                    a.next_analysis = self.clock.now().plus(a.spec.analysis.interval);
                }
            }
            Command::Retire { version, at } => {
                if let Some(svc) = self.services.get_mut(name) {
                    svc.warm = Some((version, at));
                }
            }
            Command::Record { .. } => {}
            Command::Run(job) => self.run_job(name, job),
        }
    }

    pub(super) fn finish_if_done(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let Some(a) = &svc.active else { return };
        if !a.rollout.is_done() {
            return;
        }
        let outcome = a.rollout.outcome();
        let id = a.rollout.id;
        let took_backup = a.spec.steps.backup;
        if outcome == RolloutOutcome::Promoted {
            let old = std::mem::replace(&mut svc.stable, a.rollout.candidate.clone());
            let old_env = std::mem::replace(&mut svc.stable_env, a.row.env.clone());
            svc.previous = Some((old, old_env));
        }
        svc.active = None;
        svc.candidate_weight = Weight::ZERO;
        svc.preview = false;
        self.metrics.inc_rollouts(name, outcome);
        if took_backup {
            self.unpin_backups(name, id);
        }
        // The service's row was saved with the final transition (`finished_service_row`).
        self.publish(name);
        // The record of promoted versions beside the database, and a snapshot of it: what a
        // lost or damaged database is noticed by and restored from. Neither is the state
        // itself (that is durable already), so a failure here is worth a warning only.
        if let Err(e) = self.store.save_record() {
            tracing::warn!(error = %e, "could not update the record of promoted versions");
        }
        match self.store.snapshot(Some(id)) {
            Ok(path) => tracing::debug!(snapshot = %path.display(), "state snapshot taken"),
            Err(e) => tracing::warn!(error = %e, "could not take a snapshot of the state"),
        }
    }
}
