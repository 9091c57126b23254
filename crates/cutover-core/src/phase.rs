//! The closed sets of rollout phases, outcomes and strategies (docs/reference.md §6).
//!
//! Their kebab-case names are part of the user-facing contract, so `as_str`/`parse` live here
//! once instead of as string literals scattered over the API, CLI and store.

use std::fmt;

macro_rules! kebab_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value named `s`, exactly as `as_str` spells it.
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

kebab_enum!(
    /// Where a service stands. `Stable` means no rollout is in progress.
    Phase {
        Stable => "stable",
        /// Candidate instances are starting and must pass health checks.
        Starting => "starting",
        /// Steps are running and analysis judges the candidate.
        Progressing => "progressing",
        /// A timed pause between steps, or a person paused the rollout.
        Paused => "paused",
        /// Waiting for `cutover promote`.
        AwaitingApproval => "awaiting-approval",
        /// The candidate has all traffic; the old version drains and stops (and the
        /// `post_promote` hooks run).
        Promoting => "promoting",
        /// `pre_deploy` hooks run before anything changes, or `on_rollback` hooks after the
        /// rollout was decided against.
        Hooks => "hooks",
        /// The service's database is backed up before anything changes.
        BackingUp => "backing-up",
        /// `migrate` runs (once per rollout), or `migrate_down` after a rollback.
        Migrating => "migrating",
        /// The candidate is healthy at 0% and smoke checks and `pre_traffic` hooks run against
        /// it alone.
        Smoke => "smoke",
        /// The database is restored from the rollout's backup; traffic is already on stable.
        Restoring => "restoring",
        Promoted => "promoted",
        RolledBack => "rolled-back",
        Aborted => "aborted",
        Failed => "failed",
    }
);

kebab_enum!(
    /// How a rollout ended, or that it has not.
    RolloutOutcome {
        InProgress => "in-progress",
        Promoted => "promoted",
        /// Analysis or health failed: cutover decided.
        RolledBack => "rolled-back",
        /// A person decided.
        Aborted => "aborted",
        /// The candidate never became healthy; traffic never moved.
        Failed => "failed",
    }
);

kebab_enum!(
    /// How traffic moves from the stable version to the candidate.
    StrategyKind {
        Canary => "canary",
        BlueGreen => "blue-green",
        Rolling => "rolling",
    }
);

kebab_enum!(
    /// What a rollout does when a stage waited `analysis_deadline` without a passing verdict
    /// and without a failed one either (too little traffic to judge).
    NoEvidence {
        /// Roll back: no evidence is treated as bad evidence.
        Rollback => "rollback",
        /// Pause and wait for a person (`promote`, `resume` or `abort`). The default.
        Pause => "pause",
        /// Advance without a verdict: only ever the user's explicit choice.
        Promote => "promote",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(*p));
        }
        for o in RolloutOutcome::ALL {
            assert_eq!(RolloutOutcome::parse(o.as_str()), Some(*o));
        }
        for s in StrategyKind::ALL {
            assert_eq!(StrategyKind::parse(s.as_str()), Some(*s));
        }
        assert_eq!(StrategyKind::parse("bluegreen"), None);
    }
}

kebab_enum!(
    /// The kinds of events the controller records; their names are in the API and the store.
    EventKind {
        Started => "started",
        Ready => "ready",
        Step => "step",
        Paused => "paused",
        Resumed => "resumed",
        AwaitingApproval => "awaiting-approval",
        Approved => "approved",
        AnalysisPassed => "analysis-passed",
        AnalysisFailed => "analysis-failed",
        /// A stage is due to advance but holds for a passing verdict.
        Holding => "holding",
        /// A stage waited `analysis_deadline` without a verdict; `on_no_evidence` decided.
        NoEvidence => "no-evidence",
        HealthFailed => "health-failed",
        /// An instance's health changed, or a starting one failed a probe for a new reason.
        Health => "health",
        /// An instance exited without being asked to.
        InstanceExit => "instance-exit",
        /// An instance could not be started.
        StartFailed => "start-failed",
        /// A transition that could not be written is durable now, and was carried out.
        Recovered => "recovered",
        Promoting => "promoting",
        Promoted => "promoted",
        RolledBack => "rolled-back",
        Aborted => "aborted",
        Failed => "failed",
        Restarted => "restarted",
        /// A fault was injected (`cutover fault add`, or an experiment's action).
        FaultAdded => "fault-added",
        /// A fault was cleared before its end.
        FaultCleared => "fault-cleared",
        /// A fault reached its end.
        FaultExpired => "fault-expired",
        /// A chaos experiment started, ran an action, or ended (with its verdict).
        Experiment => "experiment",
        /// A scheduled probe started or stopped failing.
        Probe => "probe",
        /// Synthetic traffic to a quiet canary started or stopped.
        Synthetic => "synthetic",
        /// An alert's condition holds, not yet for its `for`.
        AlertPending => "alert-pending",
        /// An alert fires: its receivers are notified.
        AlertFiring => "alert-firing",
        /// A firing alert no longer holds.
        AlertResolved => "alert-resolved",
        /// A pending alert stopped holding before its `for` passed.
        AlertCleared => "alert-cleared",
        /// A receiver could not be notified after its retries.
        AlertDeliveryFailed => "alert-delivery-failed",
        /// A deploy went ahead over an exhausted error budget, with its reason.
        DeployForced => "deploy-forced",
        /// A hook ran and passed (its duration in the message).
        Hook => "hook",
        /// A hook exited non-zero, timed out or could not start (with its output's end).
        HookFailed => "hook-failed",
        /// A smoke check passed against a candidate instance.
        Smoke => "smoke",
        SmokeFailed => "smoke-failed",
        /// A backup was taken: size, duration, sha256.
        Backup => "backup",
        BackupFailed => "backup-failed",
        /// A backup was restored into a scratch database and checked.
        BackupVerified => "backup-verified",
        /// Backups the `keep` policy no longer wants were deleted.
        BackupPruned => "backup-pruned",
        /// `migrate` (or `migrate_down`) ran to its end.
        Migrated => "migrated",
        MigrateFailed => "migrate-failed",
        /// The database was restored from a backup.
        Restored => "restored",
        RestoreFailed => "restore-failed",
    }
);

kebab_enum!(
    /// What a rollout that ends without promotion does to the service's database
    /// (`[services.X.database] on_rollback`).
    DbRollback {
        /// Leave it as the migration made it: the old version must run on the new schema
        /// (expand/contract). The default.
        Keep => "keep",
        /// Restore the backup taken before the deploy; writes since it are lost.
        Restore => "restore",
        /// Run `migrate_down`.
        Down => "down",
    }
);

kebab_enum!(
    /// The kind of database a service uses.
    DbKind {
        Postgres => "postgres",
        Sqlite => "sqlite",
    }
);

/// How an event reads at a glance: what the dashboard colours its marker by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Good,
    Bad,
    Neutral,
}

impl EventKind {
    /// The kinds that mark a rollout's course on the charts' time axis, with their tone;
    /// `None` for the rest (health changes, holds, instance exits), which would crowd it.
    pub fn marker(self) -> Option<Tone> {
        use EventKind::*;
        match self {
            Started | Step => Some(Tone::Neutral),
            Promoting | Promoted => Some(Tone::Good),
            RolledBack | Aborted | Failed | AnalysisFailed | HealthFailed | HookFailed
            | SmokeFailed | BackupFailed | MigrateFailed | RestoreFailed => Some(Tone::Bad),
            Migrated | Restored => Some(Tone::Neutral),
            Ready | Paused | Resumed | AwaitingApproval | Approved | AnalysisPassed | Holding
            | NoEvidence | Health | InstanceExit | StartFailed | Recovered | Restarted | Hook
            | Smoke | Backup | BackupVerified | BackupPruned => None,
            FaultAdded => Some(Tone::Bad),
            FaultCleared | FaultExpired | Experiment | Probe | Synthetic => None,
            AlertFiring | AlertDeliveryFailed => Some(Tone::Bad),
            AlertPending | AlertResolved | AlertCleared | DeployForced => None,
        }
    }
}
