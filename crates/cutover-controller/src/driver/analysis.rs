//! Analysis windows: the counts each verdict is taken on, from the metrics of both versions since the window began, handed to the pure judge.

use super::*;

impl Driver {
    /// Judges the window since the last conclusive verdict and feeds the verdict to the fsm.
    pub(super) async fn analyse(&mut self, name: &ServiceName, t: Timestamp) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        let stable_weight = svc.candidate_weight.complement();
        let Some(a) = svc.active.as_mut() else { return };
        a.next_analysis = t.plus(a.spec.analysis.interval);
        if !a.rollout.judging(&a.spec) {
            return;
        }
        let cand = self
            .metrics
            .snapshot(name, &a.rollout.candidate)
            .window_since(Some(&a.baseline.1));
        let stable = self
            .metrics
            .snapshot(name, &a.rollout.stable)
            .window_since(Some(&a.baseline.0));
        // Comparing with stable needs both to serve the same user traffic; a preview's
        // candidate sees only probes, so it is held to the absolute thresholds alone.
        let compare = a.spec.analysis.compare_to_stable
            && stable_weight > Weight::ZERO
            && stable_weight < Weight::FULL;
        let j = judge(&a.spec.analysis, &cand, compare.then_some(&stable));
        let verdict = match j.verdict {
            cutover_analysis::Verdict::Pass => Verdict::Pass,
            cutover_analysis::Verdict::Fail => Verdict::Fail,
            cutover_analysis::Verdict::Inconclusive => Verdict::Inconclusive,
        };
        if verdict != Verdict::Inconclusive {
            a.last_analysis = Some(j.reason.clone());
        }
        self.feed(
            name,
            Event::Judged {
                verdict,
                reason: j.reason,
            },
        )
        .await;
    }

    pub(super) fn snapshots(
        &self,
        name: &ServiceName,
        stable: &Version,
        cand: &Version,
    ) -> (VersionSnapshot, VersionSnapshot) {
        (
            self.metrics.snapshot(name, stable),
            self.metrics.snapshot(name, cand),
        )
    }
}
