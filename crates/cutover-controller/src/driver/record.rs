//! Event recording and service rows: what the store keeps about a service between restarts, and events that belong to no transition (health, exits, recovery).

use super::*;

impl Driver {
    pub(super) fn save_service(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let row = service_row(name, svc);
        if let Err(e) = self.store.upsert_service(&row) {
            tracing::error!(error = %e, "could not save service state");
        } else if let Err(e) = self.store.save_record() {
            tracing::warn!(error = %e, "could not update the record of promoted versions");
        }
    }

    /// Records an event that is not an fsm transition (health changes, exits).
    pub(super) fn record_loose(
        &mut self,
        name: &ServiceName,
        rollout_id: Option<i64>,
        kind: EventKind,
        message: String,
    ) {
        self.record_about(name, rollout_id, kind, None, message);
    }

    /// Records an event about one instance (or none), which the notice names.
    pub(super) fn record_about(
        &mut self,
        name: &ServiceName,
        rollout_id: Option<i64>,
        kind: EventKind,
        instance: Option<&InstanceId>,
        message: String,
    ) {
        let phase = self.phase(name);
        let data = match instance {
            Some(i) => serde_json::json!({ "instance": i.as_str() }).to_string(),
            None => "{}".to_owned(),
        };
        let e = NewEvent {
            service: name.to_string(),
            rollout_id,
            at: self.clock.now(),
            kind: kind.as_str().to_owned(),
            message,
            data,
        };
        tracing::info!(service = %e.service, kind = %e.kind, "{}", e.message);
        match self.store.append_event(&e) {
            Ok(id) => {
                let _ = self.notices.send(Notice {
                    event: EventView {
                        id,
                        service: e.service,
                        rollout_id,
                        at: e.at,
                        kind,
                        message: e.message,
                    },
                    phase,
                    instance: instance.cloned(),
                });
            }
            Err(err) => tracing::warn!(error = %err, "could not record an event"),
        }
    }
}

/// The service's row as it stands.
pub(super) fn service_row(name: &ServiceName, svc: &Svc) -> ServiceRow {
    ServiceRow {
        name: name.to_string(),
        stable_version: svc.stable.to_string(),
        stable_env: svc.stable_env.clone(),
        previous_version: svc.previous.as_ref().map(|(v, _)| v.to_string()),
        previous_env: svc
            .previous
            .as_ref()
            .map(|(_, e)| e.clone())
            .unwrap_or_default(),
    }
}

/// The service's row as it will be once its finished rollout is carried out: a promotion makes
/// the candidate stable and the old stable the previous version (see `finish_if_done`).
pub(super) fn finished_service_row(name: &ServiceName, svc: &Svc) -> ServiceRow {
    let mut row = service_row(name, svc);
    if let Some(a) = svc
        .active
        .as_ref()
        .filter(|a| a.rollout.outcome() == RolloutOutcome::Promoted)
    {
        row.previous_version = Some(std::mem::replace(
            &mut row.stable_version,
            a.rollout.candidate.to_string(),
        ));
        row.previous_env = std::mem::replace(&mut row.stable_env, a.row.env.clone());
    }
    row
}
