//! Table tests of the release-safety stages of the rollout state machine (CONTRACT §9): hooks,
//! the backup, the migration, smoke checks and what an unpromoted end does to the database.
//! Every failure path is a row; made-up times, no tokio, every state round-tripped through its
//! checkpoint.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cutover_controller::checkpoint;
use cutover_controller::fsm::{
    BackupRef, Command, Event, EventKind, HealthCounts, Job, Rollout, Verdict, step,
};
use cutover_core::{
    CanaryStep, DbRollback, Phase, ReleaseSteps, RolloutOutcome, RolloutSpec, StrategyKind,
    Timestamp, Version, Weight,
};

fn spec(steps: ReleaseSteps) -> RolloutSpec {
    let mut s = RolloutSpec {
        strategy: StrategyKind::Canary,
        steps,
        ..RolloutSpec::default()
    };
    s.canary_steps = vec![
        CanaryStep::SetWeight {
            weight: Weight::new(10).unwrap(),
            pause: Some(Duration::from_secs(20)),
            analysis: true,
        },
        CanaryStep::SetWeight {
            weight: Weight::FULL,
            pause: None,
            analysis: true,
        },
    ];
    s.scale_down_delay = Duration::from_secs(30);
    s
}

/// Everything configured, `on_rollback` as given.
fn all(on_rollback: DbRollback) -> ReleaseSteps {
    ReleaseSteps {
        pre_deploy: true,
        backup: true,
        migrate: true,
        smoke: true,
        post_promote: true,
        on_rollback_hooks: true,
        on_rollback,
        migrate_down: true,
    }
}

fn done(job: Job, ok: bool) -> Event {
    Event::JobDone {
        job,
        ok,
        detail: format!("{job:?} {}", if ok { "passed" } else { "failed" }),
        backup: (job == Job::Backup && ok).then(|| BackupRef {
            id: "web-20260101-000000-000".into(),
            taken_at: Timestamp(1_000),
        }),
    }
}

fn healthy(n: u32) -> Event {
    Event::Health(HealthCounts {
        candidate_healthy: n,
        candidate_unhealthy: 0,
        detail: None,
    })
}

fn unhealthy() -> Event {
    Event::Health(HealthCounts {
        candidate_healthy: 1,
        candidate_unhealthy: 1,
        detail: Some("3 consecutive probe failures".into()),
    })
}

fn judged(v: Verdict) -> Event {
    Event::Judged {
        verdict: v,
        reason: "candidate error rate 7.9% (41/519) > max 1.0%".into(),
    }
}

struct Run {
    rollout: Rollout,
    cmds: Vec<Command>,
    refusals: Vec<String>,
    /// The highest weight the candidate was ever routed.
    max_weight: u8,
}

fn run(spec: &RolloutSpec, events: &[(u64, Event)]) -> Run {
    let (mut rollout, mut cmds) = Rollout::begin(
        spec,
        1,
        "web".into(),
        Version::new("v1"),
        Version::new("v2"),
        Timestamp(0),
    );
    let mut refusals = Vec::new();
    for (t, e) in events {
        match step(spec, &rollout, e, Timestamp(t * 1000)) {
            Ok((next, c)) => {
                let text = checkpoint::encode_with_spec(&next, spec);
                assert_eq!(
                    checkpoint::decode_with_spec(1, &"web".into(), &text).unwrap(),
                    (next.clone(), Some(spec.clone())),
                    "checkpoint of {next:?}"
                );
                rollout = next;
                cmds.extend(c);
            }
            Err(r) => refusals.push(r.0),
        }
    }
    let max_weight = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Route { candidate, .. } => Some(candidate.percent()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    Run {
        rollout,
        cmds,
        refusals,
        max_weight,
    }
}

fn jobs(cmds: &[Command]) -> Vec<Job> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Run(j) => Some(*j),
            _ => None,
        })
        .collect()
}

fn recorded(cmds: &[Command]) -> Vec<EventKind> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Record { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

/// Whether a candidate instance was ever asked for.
fn candidate_started(cmds: &[Command]) -> bool {
    cmds.iter().any(|c| {
        matches!(c, Command::Scale { version, instances } if version.as_str() == "v2" && *instances > 0)
    })
}

struct Case {
    name: &'static str,
    steps: ReleaseSteps,
    events: Vec<(u64, Event)>,
    phase: Phase,
    /// The jobs run, in order.
    jobs: &'static [Job],
    /// Whether a candidate instance was ever started.
    started: bool,
    /// Whether any traffic ever moved to the candidate.
    traffic: bool,
    /// A text the final reason (or, in progress, nothing) must contain.
    reason: Option<&'static str>,
    refused: usize,
}

fn check(c: Case) {
    let r = run(&spec(c.steps), &c.events);
    assert_eq!(
        r.rollout.phase(),
        c.phase,
        "{}: phase (stage {:?})",
        c.name,
        r.rollout.stage
    );
    assert_eq!(jobs(&r.cmds), c.jobs, "{}: jobs", c.name);
    assert_eq!(
        candidate_started(&r.cmds),
        c.started,
        "{}: candidate started? {:?}",
        c.name,
        r.cmds
    );
    assert_eq!(r.max_weight > 0, c.traffic, "{}: traffic moved?", c.name);
    if let Some(text) = c.reason {
        let reason = r.rollout.reason().unwrap_or_default();
        assert!(reason.contains(text), "{}: reason {reason:?}", c.name);
    }
    assert_eq!(r.refusals.len(), c.refused, "{}: {:?}", c.name, r.refusals);
}

#[test]
fn release_safety_transitions() {
    use Job::*;
    let cases = vec![
        Case {
            name: "the whole way: hooks, backup, migration, smoke, steps, post_promote",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, true)),
                (4, healthy(2)),
                (5, done(Smoke, true)),
                (6, judged(Verdict::Pass)),
                (30, Event::Tick),
                (31, judged(Verdict::Pass)),
                (32, done(PostPromote, true)),
            ],
            phase: Phase::Promoted,
            jobs: &[PreDeploy, Backup, Migrate, Smoke, PostPromote],
            started: true,
            traffic: true,
            reason: Some("promoted v2"),
            refused: 0,
        },
        Case {
            name: "a pre_deploy hook fails: failed, nothing changed, no on_rollback",
            steps: all(DbRollback::Restore),
            events: vec![(1, done(PreDeploy, false))],
            phase: Phase::Failed,
            jobs: &[PreDeploy],
            started: false,
            traffic: false,
            reason: Some("nothing changed"),
            refused: 0,
        },
        Case {
            name: "the backup fails: failed, deploy refused",
            steps: all(DbRollback::Restore),
            events: vec![(1, done(PreDeploy, true)), (2, done(Backup, false))],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup],
            started: false,
            traffic: false,
            reason: Some("the deploy is refused"),
            refused: 0,
        },
        Case {
            name: "the migration fails: restored whatever on_rollback says, then hooks",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, false)),
                (4, done(Restore, true)),
                (5, done(OnRollback, true)),
            ],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup, Migrate, Restore, OnRollback],
            started: false,
            traffic: false,
            reason: Some("database restored from backup web-20260101-000000-000"),
            refused: 0,
        },
        Case {
            name: "while the restore runs the rollout is restoring",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, false)),
            ],
            phase: Phase::Restoring,
            jobs: &[PreDeploy, Backup, Migrate, Restore],
            started: false,
            traffic: false,
            reason: None,
            refused: 0,
        },
        Case {
            name: "a failed migration without a backup says the database is as it left it",
            steps: ReleaseSteps {
                migrate: true,
                ..Default::default()
            },
            events: vec![(1, done(Migrate, false))],
            phase: Phase::Failed,
            jobs: &[Migrate],
            started: false,
            traffic: false,
            reason: Some("no backup to restore"),
            refused: 0,
        },
        Case {
            name: "a failed restore is said loudly, with the command to retry it",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, false)),
                (4, done(Restore, false)),
                (5, done(OnRollback, true)),
            ],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup, Migrate, Restore, OnRollback],
            started: false,
            traffic: false,
            reason: Some("cutover backup restore web web-20260101-000000-000 --yes"),
            refused: 0,
        },
        Case {
            name: "smoke fails with on_rollback = keep: failed, no traffic, database kept",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, true)),
                (4, healthy(2)),
                (5, done(Smoke, false)),
                (6, done(OnRollback, true)),
            ],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup, Migrate, Smoke, OnRollback],
            started: true,
            traffic: false,
            reason: Some("traffic never moved"),
            refused: 0,
        },
        Case {
            name: "smoke fails with on_rollback = restore: restored too",
            steps: all(DbRollback::Restore),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, true)),
                (4, healthy(2)),
                (5, done(Smoke, false)),
                (6, done(Restore, true)),
                (7, done(OnRollback, true)),
            ],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup, Migrate, Smoke, Restore, OnRollback],
            started: true,
            traffic: false,
            reason: Some("writes made since it was taken"),
            refused: 0,
        },
        Case {
            name: "smoke alone (no database): a failure fails the rollout at 0%",
            steps: ReleaseSteps {
                smoke: true,
                ..Default::default()
            },
            events: vec![(1, healthy(2)), (2, done(Smoke, false))],
            phase: Phase::Failed,
            jobs: &[Smoke],
            started: true,
            traffic: false,
            reason: Some("smoke check failed"),
            refused: 0,
        },
        Case {
            name: "an instance goes unhealthy during smoke checks: failed, not rolled back",
            steps: ReleaseSteps {
                smoke: true,
                ..Default::default()
            },
            events: vec![(1, healthy(2)), (2, unhealthy())],
            phase: Phase::Failed,
            jobs: &[Smoke],
            started: true,
            traffic: false,
            reason: Some("traffic never moved"),
            refused: 0,
        },
        Case {
            name: "analysis rolls back with on_rollback = restore: traffic back, then restore",
            steps: all(DbRollback::Restore),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, true)),
                (4, healthy(2)),
                (5, done(Smoke, true)),
                (6, judged(Verdict::Fail)),
                (7, judged(Verdict::Fail)),
                (8, done(Restore, true)),
                (9, done(OnRollback, true)),
            ],
            phase: Phase::RolledBack,
            jobs: &[PreDeploy, Backup, Migrate, Smoke, Restore, OnRollback],
            started: true,
            traffic: true,
            reason: Some("database restored"),
            refused: 0,
        },
        Case {
            name: "analysis rolls back with on_rollback = down: migrate_down runs",
            steps: all(DbRollback::Down),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, true)),
                (4, healthy(2)),
                (5, done(Smoke, true)),
                (6, judged(Verdict::Fail)),
                (7, judged(Verdict::Fail)),
                (8, done(MigrateDown, true)),
                (9, done(OnRollback, false)),
            ],
            phase: Phase::RolledBack,
            jobs: &[PreDeploy, Backup, Migrate, Smoke, MigrateDown, OnRollback],
            started: true,
            traffic: true,
            reason: Some("an on_rollback hook failed"),
            refused: 0,
        },
        Case {
            name: "abort during pre_deploy hooks: aborted, nothing changed, nothing more runs",
            steps: all(DbRollback::Restore),
            events: vec![(1, Event::Abort), (2, done(PreDeploy, true))],
            phase: Phase::Aborted,
            jobs: &[PreDeploy],
            started: false,
            traffic: false,
            reason: Some("before anything changed"),
            refused: 0,
        },
        Case {
            name: "abort during the migration is refused; it runs to its end",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, Event::Abort),
                (4, Event::Rollback),
                (5, Event::Pause),
                (
                    6,
                    Event::Promote {
                        full: true,
                        force: true,
                    },
                ),
            ],
            phase: Phase::Migrating,
            jobs: &[PreDeploy, Backup, Migrate],
            started: false,
            traffic: false,
            reason: None,
            refused: 4,
        },
        Case {
            name: "a restart during the migration never runs it again: restore, then failed",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (50, Event::Resumed),
                (51, done(Migrate, true)),
                (52, done(Restore, true)),
                (53, done(OnRollback, true)),
            ],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup, Migrate, Restore, OnRollback],
            started: false,
            traffic: false,
            reason: Some("never run twice"),
            refused: 0,
        },
        Case {
            name: "a restart during the restore redoes it",
            steps: all(DbRollback::Keep),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, false)),
                (50, Event::Resumed),
                (51, done(Restore, true)),
                (52, done(OnRollback, true)),
            ],
            phase: Phase::Failed,
            jobs: &[PreDeploy, Backup, Migrate, Restore, Restore, OnRollback],
            started: false,
            traffic: false,
            reason: Some("database restored"),
            refused: 0,
        },
        Case {
            name: "a restart during migrate_down does not run it again",
            steps: all(DbRollback::Down),
            events: vec![
                (1, done(PreDeploy, true)),
                (2, done(Backup, true)),
                (3, done(Migrate, true)),
                (4, healthy(2)),
                (5, done(Smoke, true)),
                (6, Event::Abort),
                (50, Event::Resumed),
                (51, done(OnRollback, true)),
            ],
            phase: Phase::Aborted,
            jobs: &[PreDeploy, Backup, Migrate, Smoke, MigrateDown, OnRollback],
            started: true,
            traffic: true,
            reason: Some("it is not run twice"),
            refused: 0,
        },
        Case {
            name: "a restart during pre_deploy hooks runs them again",
            steps: all(DbRollback::Keep),
            events: vec![(50, Event::Resumed), (51, done(PreDeploy, false))],
            phase: Phase::Failed,
            jobs: &[PreDeploy, PreDeploy],
            started: false,
            traffic: false,
            reason: Some("pre_deploy hook failed"),
            refused: 0,
        },
        Case {
            name: "a restart during smoke checks starts the candidate again, then checks again",
            steps: ReleaseSteps {
                smoke: true,
                ..Default::default()
            },
            events: vec![
                (1, healthy(2)),
                (50, Event::Resumed),
                (51, done(Smoke, true)),
                (52, healthy(2)),
            ],
            phase: Phase::Smoke,
            jobs: &[Smoke, Smoke],
            started: true,
            traffic: false,
            reason: None,
            refused: 0,
        },
        Case {
            name: "a result for a stage already left is ignored",
            steps: ReleaseSteps {
                smoke: true,
                ..Default::default()
            },
            events: vec![
                (1, healthy(2)),
                (2, done(Smoke, true)),
                (3, done(Smoke, false)),
                (4, done(Restore, false)),
            ],
            phase: Phase::Progressing,
            jobs: &[Smoke],
            started: true,
            traffic: true,
            reason: None,
            refused: 0,
        },
        Case {
            name: "a failing post_promote hook is recorded, the rollout stays promoted",
            steps: ReleaseSteps {
                post_promote: true,
                ..Default::default()
            },
            events: vec![
                (1, healthy(2)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
                (3, judged(Verdict::Pass)),
                (4, Event::Rollback),
                (5, done(PostPromote, false)),
            ],
            phase: Phase::Promoted,
            jobs: &[PostPromote],
            started: true,
            traffic: true,
            reason: Some("post_promote hook failed (recorded, not rolled back)"),
            refused: 1,
        },
        Case {
            name: "on_rollback = restore with no backup taken keeps the database, saying so",
            steps: ReleaseSteps {
                on_rollback: DbRollback::Restore,
                on_rollback_hooks: true,
                ..Default::default()
            },
            events: vec![
                (1, healthy(2)),
                (2, Event::Abort),
                (3, done(OnRollback, true)),
            ],
            phase: Phase::Aborted,
            jobs: &[OnRollback],
            started: true,
            traffic: true,
            reason: Some("took no backup"),
            refused: 0,
        },
    ];
    for c in cases {
        check(c);
    }
}

#[test]
fn with_nothing_configured_a_rollout_begins_exactly_as_before() {
    let s = spec(ReleaseSteps::default());
    let (r, cmds) = Rollout::begin(
        &s,
        1,
        "web".into(),
        Version::new("v1"),
        Version::new("v2"),
        Timestamp(0),
    );
    assert_eq!(r.phase(), Phase::Starting);
    assert!(r.touched);
    assert_eq!(
        cmds,
        vec![
            Command::Scale {
                version: Version::new("v2"),
                instances: 2
            },
            Command::Scale {
                version: Version::new("v1"),
                instances: 2
            },
            Command::Route {
                candidate: Weight::ZERO,
                preview: false
            },
            Command::Record {
                kind: EventKind::Started,
                message: "canary rollout v1 → v2 started; waiting for 2 candidate instance(s) to pass health checks (deadline 1m)".into()
            },
        ]
    );
    // And the healthy candidate goes straight to the first step: no smoke stage.
    let (r, _) = step(&s, &r, &healthy(2), Timestamp(1000)).unwrap();
    assert_eq!(r.candidate_weight(&s), Weight::new(10).unwrap());
}

#[test]
fn the_migration_starts_the_candidate_only_after_it_ran_and_says_what_comes_first() {
    let s = spec(all(DbRollback::Keep));
    let (r, cmds) = Rollout::begin(
        &s,
        1,
        "web".into(),
        Version::new("v1"),
        Version::new("v2"),
        Timestamp(0),
    );
    assert_eq!(r.phase(), Phase::Hooks);
    let started = cmds
        .iter()
        .find_map(|c| match c {
            Command::Record { message, .. } => Some(message.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        started.contains(
            "started; first pre_deploy hooks, a database backup and the migration, then 2 candidate instance(s) must pass health checks"
        ),
        "{started}"
    );
    assert!(!candidate_started(&cmds));
    let r = [
        done(Job::PreDeploy, true),
        done(Job::Backup, true),
        done(Job::Migrate, true),
    ]
    .iter()
    .fold(r, |r, e| {
        let (next, c) = step(&s, &r, e, Timestamp(1000)).unwrap();
        assert_eq!(
            candidate_started(&c),
            matches!(
                e,
                Event::JobDone {
                    job: Job::Migrate,
                    ..
                }
            ),
            "{e:?}: {c:?}"
        );
        next
    });
    assert_eq!(r.phase(), Phase::Starting);
    assert_eq!(r.backup.as_ref().unwrap().id, "web-20260101-000000-000");
}

#[test]
fn the_restore_message_says_how_many_minutes_of_writes_are_lost() {
    let s = spec(all(DbRollback::Restore));
    let events = vec![
        (1, done(Job::PreDeploy, true)),
        (2, done(Job::Backup, true)),
        (3, done(Job::Migrate, true)),
        (4, healthy(2)),
        (5, done(Job::Smoke, true)),
        (600, Event::Abort),
        (601, done(Job::Restore, true)),
        (602, done(Job::OnRollback, true)),
    ];
    let r = run(&s, &events);
    assert_eq!(r.rollout.outcome(), RolloutOutcome::Aborted);
    let reason = r.rollout.reason().unwrap();
    assert!(
        reason.contains("writes made since it was taken 10 min ago are lost"),
        "{reason}"
    );
    // The decision event says what follows it.
    let aborted = r
        .cmds
        .iter()
        .find_map(|c| match c {
            Command::Record {
                kind: EventKind::Aborted,
                message,
            } => Some(message.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        aborted.contains("restoring the database from backup web-20260101-000000-000"),
        "{aborted}"
    );
    // Traffic went back to stable and the candidate stopped before the restore was asked for.
    let i_route = r
        .cmds
        .iter()
        .rposition(|c| matches!(c, Command::Route { candidate, .. } if *candidate == Weight::ZERO))
        .unwrap();
    let i_restore = r
        .cmds
        .iter()
        .position(|c| *c == Command::Run(Job::Restore))
        .unwrap();
    assert!(i_route < i_restore);
    assert_eq!(recorded(&r.cmds).last(), Some(&EventKind::Aborted));
}
