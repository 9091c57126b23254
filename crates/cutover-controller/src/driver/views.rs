//! Read models: the copies of a service's state that `status`, the API and the dashboard show.

use super::*;

impl Driver {
    pub(super) fn phase(&self, name: &ServiceName) -> Phase {
        self.services
            .get(name)
            .and_then(|s| s.active.as_ref())
            .map(|a| a.rollout.phase())
            .unwrap_or(Phase::Stable)
    }

    pub(super) fn view(&self, name: &ServiceName) -> Result<ServiceView, ControlError> {
        let svc = self.services.get(name).ok_or_else(|| Self::unknown(name))?;
        let a = svc.active.as_ref();
        let (configured_weights, weights) = Self::weights(svc);
        let instances = svc
            .instances
            .iter()
            .map(|(id, i)| InstanceView {
                id: id.clone(),
                version: i.version.clone(),
                address: i.addr,
                health: i.health,
                runs_as: svc.setup.runtime.describe(id, &i.handle),
                detail: i.detail.clone(),
            })
            .collect();
        let recent_events = self
            .store
            .recent_events(Some(name.as_str()), RECENT_EVENTS)
            .unwrap_or_default()
            .into_iter()
            .filter_map(event_view)
            .collect();
        Ok(ServiceView {
            name: name.clone(),
            listen: svc.setup.listen,
            preview_listen: svc.setup.preview_listen,
            phase: a.map(|a| a.rollout.phase()).unwrap_or(Phase::Stable),
            stable: svc.stable.clone(),
            candidate: a.map(|a| a.rollout.candidate.clone()),
            strategy: a
                .map(|a| a.rollout.strategy)
                .unwrap_or(svc.setup.spec.strategy),
            weights,
            configured_weights,
            step: a.and_then(|a| a.rollout.step_progress(&a.spec)),
            rollout_id: a.map(|a| a.rollout.id),
            failures: a.map(|a| a.rollout.failures).unwrap_or(0),
            last_analysis: a.and_then(|a| a.last_analysis.clone()),
            instances,
            recent_events,
            degraded: svc.held.as_ref().map(Held::reason),
        })
    }
}

pub(super) fn rollout_view(r: RolloutRow) -> RolloutView {
    RolloutView {
        id: r.id,
        service: r.service,
        from: r.from_version,
        to: r.to_version,
        strategy: r.strategy,
        outcome: r.outcome,
        reason: r.reason,
        started_at: r.started_at,
        finished_at: r.finished_at,
        env: r.env,
        started_by: r.started_by,
        ended_by: r.ended_by,
        events: Vec::new(),
    }
}

/// The stored event as a view; `None` for a kind this program does not know (written by a
/// newer cutover before a downgrade), which is left out rather than guessed at.
pub(super) fn event_view(e: cutover_store::EventRow) -> Option<EventView> {
    let Some(kind) = EventKind::parse(&e.kind) else {
        tracing::warn!(kind = %e.kind, id = e.id, "an event of a kind this cutover does not know is not shown");
        return None;
    };
    Some(EventView {
        id: e.id,
        service: e.service,
        rollout_id: e.rollout_id,
        at: e.at,
        kind,
        message: e.message,
    })
}
