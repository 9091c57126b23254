//! The life of one alert: inactive → pending → firing → resolved, as Prometheus runs it.
//!
//! [`step`] takes the state, whether the alert's condition holds now, its `for` and the time,
//! and answers the next state and the transition to record (each transition is an event). A
//! condition must hold for `for` before the alert fires; with `for = 0` it fires at once.
//! A pending alert whose condition stops holding goes back to inactive (`Cleared`); a firing
//! one is `Resolved`, and stays so (for display and for the resolved notification) until its
//! condition holds again.

use std::time::Duration;

use cutover_core::{EventKind, Timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertState {
    Inactive,
    /// The condition has held since `since`, not yet for `for`.
    Pending {
        since: Timestamp,
    },
    /// Firing since `fired_at`; the condition has held since `since`.
    Firing {
        since: Timestamp,
        fired_at: Timestamp,
    },
    /// It fired from `fired_at` and was resolved at `at`.
    Resolved {
        fired_at: Timestamp,
        at: Timestamp,
    },
}

impl AlertState {
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertState::Inactive => "inactive",
            AlertState::Pending { .. } => "pending",
            AlertState::Firing { .. } => "firing",
            AlertState::Resolved { .. } => "resolved",
        }
    }

    pub fn is_firing(&self) -> bool {
        matches!(self, AlertState::Firing { .. })
    }
}

/// A change worth an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Pending,
    Firing,
    Resolved,
    /// Pending, then the condition stopped holding before `for` passed.
    Cleared,
}

impl Transition {
    /// The event kind: `alert-pending`, `alert-firing`, `alert-resolved`, `alert-cleared`.
    pub fn event_kind(self) -> EventKind {
        match self {
            Transition::Pending => EventKind::AlertPending,
            Transition::Firing => EventKind::AlertFiring,
            Transition::Resolved => EventKind::AlertResolved,
            Transition::Cleared => EventKind::AlertCleared,
        }
    }
}

/// The next state of an alert whose condition is `holds` at `now`, with `hold` as its `for`.
pub fn step(
    state: AlertState,
    holds: bool,
    hold: Duration,
    now: Timestamp,
) -> (AlertState, Option<Transition>) {
    use AlertState::*;
    match (state, holds) {
        (Inactive | Resolved { .. }, true) if hold.is_zero() => (
            Firing {
                since: now,
                fired_at: now,
            },
            Some(Transition::Firing),
        ),
        (Inactive | Resolved { .. }, true) => (Pending { since: now }, Some(Transition::Pending)),
        (Pending { since }, true) if now.since(since) >= hold => (
            Firing {
                since,
                fired_at: now,
            },
            Some(Transition::Firing),
        ),
        (Pending { since }, true) => (Pending { since }, None),
        (Pending { .. }, false) => (Inactive, Some(Transition::Cleared)),
        (Firing { since, fired_at }, true) => (Firing { since, fired_at }, None),
        (Firing { fired_at, .. }, false) => {
            (Resolved { fired_at, at: now }, Some(Transition::Resolved))
        }
        (s @ (Inactive | Resolved { .. }), false) => (s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AlertState::*;

    fn t(s: u64) -> Timestamp {
        Timestamp(s * 1000)
    }

    /// Every transition one row: (state, holds, for, now) → (state, transition).
    #[test]
    fn state_machine_table() {
        let m = Duration::from_secs(60);
        let rows: Vec<(
            AlertState,
            bool,
            Duration,
            u64,
            AlertState,
            Option<Transition>,
        )> = vec![
            (Inactive, false, m, 10, Inactive, None),
            (
                Inactive,
                true,
                m,
                10,
                Pending { since: t(10) },
                Some(Transition::Pending),
            ),
            (
                Inactive,
                true,
                Duration::ZERO,
                10,
                Firing {
                    since: t(10),
                    fired_at: t(10),
                },
                Some(Transition::Firing),
            ),
            // `for` not yet over: 59 s of 60.
            (
                Pending { since: t(10) },
                true,
                m,
                69,
                Pending { since: t(10) },
                None,
            ),
            // Exactly `for`: fires.
            (
                Pending { since: t(10) },
                true,
                m,
                70,
                Firing {
                    since: t(10),
                    fired_at: t(70),
                },
                Some(Transition::Firing),
            ),
            (
                Pending { since: t(10) },
                false,
                m,
                30,
                Inactive,
                Some(Transition::Cleared),
            ),
            (
                Firing {
                    since: t(10),
                    fired_at: t(70),
                },
                true,
                m,
                500,
                Firing {
                    since: t(10),
                    fired_at: t(70),
                },
                None,
            ),
            (
                Firing {
                    since: t(10),
                    fired_at: t(70),
                },
                false,
                m,
                500,
                Resolved {
                    fired_at: t(70),
                    at: t(500),
                },
                Some(Transition::Resolved),
            ),
            (
                Resolved {
                    fired_at: t(70),
                    at: t(500),
                },
                false,
                m,
                900,
                Resolved {
                    fired_at: t(70),
                    at: t(500),
                },
                None,
            ),
            // Holding again after a resolution starts over: pending first.
            (
                Resolved {
                    fired_at: t(70),
                    at: t(500),
                },
                true,
                m,
                900,
                Pending { since: t(900) },
                Some(Transition::Pending),
            ),
        ];
        for (i, (state, holds, hold, now, want, tr)) in rows.into_iter().enumerate() {
            assert_eq!(
                step(state, holds, hold, t(now)),
                (want, tr),
                "row {i}: {state:?} holds={holds}"
            );
        }
    }

    #[test]
    fn a_flapping_condition_never_fires_within_for() {
        let mut s = Inactive;
        let mut fired = false;
        for i in 0..100u64 {
            let (n, tr) = step(s, i % 3 != 2, Duration::from_secs(5), t(i));
            fired |= tr == Some(Transition::Firing);
            s = n;
        }
        assert!(!fired);
        assert_eq!(Transition::Resolved.event_kind().as_str(), "alert-resolved");
    }
}
