//! Publishing: compile the route table of a service from its instances and the rollout's weights and hand it to the data plane; start or stop the blue-green preview probes to match.

use super::*;

impl Driver {
    /// Builds and publishes the route table of `name` from the current state.
    pub(super) fn publish(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.generation += 1;
        let backends = |v: &Version| -> Vec<Backend> {
            svc.instances
                .iter()
                .filter(|(_, i)| &i.version == v && !i.draining)
                .map(|(id, i)| Backend {
                    instance: id.clone(),
                    addr: i.addr,
                    healthy: i.health == Health::Healthy,
                })
                .collect()
        };
        let mut versions = vec![RouteVersion {
            version: svc.stable.clone(),
            weight: svc.candidate_weight.complement(),
            backends: backends(&svc.stable),
        }];
        let candidate = svc.active.as_ref().map(|a| a.rollout.candidate.clone());
        if let Some(c) = candidate.as_ref().filter(|c| **c != svc.stable) {
            versions.push(RouteVersion {
                version: c.clone(),
                weight: svc.candidate_weight,
                backends: backends(c),
            });
        }
        let table = RouteTable {
            service: name.clone(),
            generation: svc.generation,
            stable: svc.stable.clone(),
            preview: candidate.filter(|_| svc.preview),
            versions,
        };
        self.dataplane.publish(table);
        self.update_instance_gauges(name);
    }

    /// `(configured, effective)` shares of unpinned traffic in percent, stable first. The
    /// proxy gives a version with no routable instance no traffic: its share goes to the
    /// other version, and the effective shares say so.
    pub(super) fn weights(svc: &Svc) -> (Shares, Shares) {
        let cand = svc.active.as_ref().map(|a| &a.rollout.candidate);
        let w = svc.candidate_weight.percent();
        let mut configured = vec![(svc.stable.clone(), 100 - w)];
        let Some(cand) = cand.filter(|c| **c != svc.stable) else {
            return (configured.clone(), configured);
        };
        configured.push((cand.clone(), w));
        let routable = |v: &Version| {
            svc.instances
                .values()
                .any(|i| &i.version == v && !i.draining && i.health == Health::Healthy)
        };
        let effective = match (routable(&svc.stable), routable(cand)) {
            (true, false) => vec![(svc.stable.clone(), 100), (cand.clone(), 0)],
            (false, true) => vec![(svc.stable.clone(), 0), (cand.clone(), 100)],
            _ => configured.clone(),
        };
        (configured, effective)
    }

    /// Runs probe traffic exactly while the rollout wants it (a judged blue-green preview).
    pub(super) fn reconcile_probes(&mut self, name: &ServiceName) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let want = svc
            .active
            .as_ref()
            .filter(|a| a.rollout.wants_probes(&a.spec));
        match (want, &svc.prober) {
            (Some(a), None) => {
                let analysis = &a.spec.analysis;
                // Enough probes for a window of `min_requests` in about one interval, within
                // a rate no service should notice.
                let per_interval = analysis.min_requests as f64;
                let rate =
                    (per_interval / analysis.interval.as_secs_f64().max(0.1)).clamp(10.0, 50.0);
                svc.prober = Some(probe::spawn(
                    svc.setup.listen,
                    a.rollout.candidate.clone(),
                    svc.setup.probe_paths.clone(),
                    rate as u32,
                ));
            }
            (None, Some(p)) => {
                p.abort();
                svc.prober = None;
            }
            _ => {}
        }
    }
}
