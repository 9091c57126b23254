//! Table-driven tests of the rollout state machine: every transition of CONTRACT §3, with
//! made-up times and no tokio.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cutover_controller::checkpoint;
use cutover_controller::fsm::{
    Command, Event, EventKind, HealthCounts, Rollout, Stage, Verdict, step,
};
use cutover_core::{
    CanaryStep, Phase, RolloutOutcome, RolloutSpec, StrategyKind, Timestamp, Version, Weight,
};

fn w(p: u32) -> Weight {
    Weight::new(p).unwrap()
}

fn spec(strategy: StrategyKind) -> RolloutSpec {
    let mut s = RolloutSpec {
        strategy,
        ..RolloutSpec::default()
    };
    s.canary_steps = vec![
        CanaryStep::SetWeight {
            weight: w(10),
            pause: Some(Duration::from_secs(20)),
        },
        CanaryStep::SetWeight {
            weight: w(50),
            pause: Some(Duration::from_secs(20)),
        },
        CanaryStep::Approve,
        CanaryStep::SetWeight {
            weight: w(100),
            pause: None,
        },
    ];
    s.blue_green.scale_down_delay = Duration::from_secs(30);
    s
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
        reason: "candidate error rate 7.9% (41/519) > max 1.0%; stable 0.2%".into(),
    }
}

/// What a script of events must lead to.
struct Case {
    name: &'static str,
    spec: RolloutSpec,
    /// `(seconds since start, event)`.
    events: Vec<(u64, Event)>,
    phase: Phase,
    weight: u32,
    /// Event kinds that must have been recorded, in this order (others may come between).
    records: &'static [EventKind],
}

struct Run {
    rollout: Rollout,
    cmds: Vec<Command>,
    refusals: Vec<String>,
}

fn run(spec: &RolloutSpec, events: &[(u64, Event)]) -> Run {
    let (mut rollout, mut cmds) = Rollout::begin(
        spec,
        1,
        Version::new("v1"),
        Version::new("v2"),
        spec.strategy,
        Timestamp(0),
    );
    let mut refusals = Vec::new();
    for (t, e) in events {
        match step(spec, &rollout, e, Timestamp(t * 1000)) {
            Ok((next, c)) => {
                // Every state must survive a checkpoint round trip unchanged.
                let text = checkpoint::encode(&next);
                assert_eq!(
                    checkpoint::decode(1, &text).unwrap(),
                    next,
                    "checkpoint of {next:?}"
                );
                rollout = next;
                cmds.extend(c);
            }
            Err(r) => refusals.push(r.0),
        }
    }
    Run {
        rollout,
        cmds,
        refusals,
    }
}

fn recorded(cmds: &[Command]) -> Vec<EventKind> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Record { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

fn check(case: Case) {
    let r = run(&case.spec, &case.events);
    assert_eq!(
        r.rollout.phase(),
        case.phase,
        "{}: phase (stage {:?})",
        case.name,
        r.rollout.stage
    );
    assert_eq!(
        r.rollout.candidate_weight(&case.spec),
        w(case.weight),
        "{}: weight",
        case.name
    );
    let got = recorded(&r.cmds);
    let mut it = got.iter();
    for want in case.records {
        assert!(
            it.any(|k| k == want),
            "{}: {want:?} not recorded in order; got {got:?}",
            case.name
        );
    }
}

#[test]
fn transitions() {
    use EventKind as K;
    use StrategyKind::*;
    use Verdict::*;
    let cases = vec![
        Case {
            name: "starting waits for every candidate instance",
            spec: spec(Canary),
            events: vec![(1, healthy(1)), (2, Event::Tick)],
            phase: Phase::Starting,
            weight: 0,
            records: &[K::Started],
        },
        Case {
            name: "healthy candidate enters the first canary step",
            spec: spec(Canary),
            events: vec![(1, healthy(2))],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Started, K::Ready, K::Step],
        },
        Case {
            name: "pause hold elapses into the next step",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (20, Event::Tick), (21, Event::Tick)],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Step, K::Step],
        },
        Case {
            name: "hold not yet elapsed keeps the step",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (20, Event::Tick)],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Step],
        },
        Case {
            name: "approval step waits at the previous weight",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (21, Event::Tick), (41, Event::Tick)],
            phase: Phase::AwaitingApproval,
            weight: 50,
            records: &[K::AwaitingApproval],
        },
        Case {
            name: "promote passes approval; the final 100% step promotes",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (21, Event::Tick),
                (41, Event::Tick),
                (50, Event::Promote { full: false }),
            ],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::Approved, K::Promoting],
        },
        Case {
            name: "promoting finishes on the next tick for canary",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (21, Event::Tick),
                (41, Event::Tick),
                (50, Event::Promote { full: false }),
                (50, Event::Tick),
            ],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Promoting, K::Promoted],
        },
        Case {
            name: "promote --full skips every step",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (2, Event::Promote { full: true }),
                (2, Event::Tick),
            ],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Approved, K::Promoting, K::Promoted],
        },
        Case {
            name: "promote skips a timed pause",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (2, Event::Promote { full: false })],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Approved, K::Step],
        },
        Case {
            name: "analysis failures up to the limit roll back",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (3, judged(Fail)), (5, judged(Fail))],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::AnalysisFailed, K::AnalysisFailed, K::RolledBack],
        },
        Case {
            name: "one failure below the limit keeps going",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (3, judged(Fail)), (5, judged(Pass))],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::AnalysisFailed, K::AnalysisPassed],
        },
        Case {
            name: "inconclusive verdicts never count",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Inconclusive)),
                (5, judged(Inconclusive)),
                (7, judged(Inconclusive)),
            ],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Step],
        },
        Case {
            name: "verdicts while starting are ignored (no traffic yet)",
            spec: spec(Canary),
            events: vec![(1, judged(Fail)), (2, judged(Fail)), (3, judged(Fail))],
            phase: Phase::Starting,
            weight: 0,
            records: &[K::Started],
        },
        Case {
            name: "candidate health failure rolls back",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (3, unhealthy())],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::HealthFailed, K::RolledBack],
        },
        Case {
            name: "progress deadline fails a candidate that never gets healthy",
            spec: spec(Canary),
            events: vec![(30, healthy(1)), (59, Event::Tick), (60, Event::Tick)],
            phase: Phase::Failed,
            weight: 0,
            records: &[K::Failed],
        },
        Case {
            name: "a candidate that cannot start fails",
            spec: spec(Canary),
            events: vec![(
                0,
                Event::StartFailed {
                    reason: "no such file".into(),
                },
            )],
            phase: Phase::Failed,
            weight: 0,
            records: &[K::Failed],
        },
        Case {
            name: "abort returns all traffic to stable",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (21, Event::Tick), (25, Event::Abort)],
            phase: Phase::Aborted,
            weight: 0,
            records: &[K::Aborted],
        },
        Case {
            name: "abort while starting",
            spec: spec(Canary),
            events: vec![(1, Event::Abort)],
            phase: Phase::Aborted,
            weight: 0,
            records: &[K::Aborted],
        },
        Case {
            name: "pause freezes the hold; resume continues with what was left",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (11, Event::Pause),
                (100, Event::Tick),
                (200, Event::Resume),
                (209, Event::Tick),
            ],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Paused, K::Resumed],
        },
        Case {
            name: "after resume the remaining hold elapses",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (11, Event::Pause),
                (200, Event::Resume),
                (210, Event::Tick),
            ],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Paused, K::Resumed, K::Step],
        },
        Case {
            name: "analysis still judges while paused",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (11, Event::Pause),
                (12, judged(Fail)),
                (14, judged(Fail)),
            ],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::Paused, K::RolledBack],
        },
        Case {
            name: "blue-green auto-promotes when the full set is healthy, keeps the old warm",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (20, Event::Tick)],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::Ready, K::Promoting],
        },
        Case {
            name: "blue-green scale-down delay ends the rollout",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (31, Event::Tick)],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Promoting, K::Promoted],
        },
        Case {
            name: "blue-green rollback within the delay is instant",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (10, Event::Rollback)],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::Promoting, K::RolledBack],
        },
        Case {
            name: "blue-green analysis after the switch rolls back",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (3, judged(Fail)), (5, judged(Fail))],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::AnalysisFailed, K::RolledBack],
        },
        Case {
            name: "blue-green manual promote waits on preview",
            spec: RolloutSpec {
                blue_green: cutover_core::BlueGreenSpec {
                    auto_promote: false,
                    ..spec(BlueGreen).blue_green
                },
                ..spec(BlueGreen)
            },
            events: vec![(1, healthy(2)), (40, Event::Tick)],
            phase: Phase::AwaitingApproval,
            weight: 0,
            records: &[K::AwaitingApproval],
        },
        Case {
            name: "blue-green manual promote switches",
            spec: RolloutSpec {
                blue_green: cutover_core::BlueGreenSpec {
                    auto_promote: false,
                    ..spec(BlueGreen).blue_green
                },
                ..spec(BlueGreen)
            },
            events: vec![(1, healthy(2)), (40, Event::Promote { full: false })],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::AwaitingApproval, K::Approved, K::Promoting],
        },
        Case {
            name: "rolling replaces instance by instance",
            spec: RolloutSpec {
                instances: 3,
                ..spec(Rolling)
            },
            events: vec![(1, healthy(1)), (2, healthy(2))],
            phase: Phase::Progressing,
            weight: 66,
            records: &[K::Step, K::Step],
        },
        Case {
            name: "rolling promotes when all are replaced",
            spec: RolloutSpec {
                instances: 3,
                ..spec(Rolling)
            },
            events: vec![
                (1, healthy(1)),
                (2, healthy(2)),
                (3, healthy(3)),
                (3, Event::Tick),
            ],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Promoting, K::Promoted],
        },
        Case {
            name: "rolling health failure rolls back",
            spec: RolloutSpec {
                instances: 3,
                ..spec(Rolling)
            },
            events: vec![(1, healthy(1)), (2, unhealthy())],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::RolledBack],
        },
        Case {
            name: "restart resumes a step and restarts its hold",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (15, Event::Resumed), (34, Event::Tick)],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Restarted],
        },
        Case {
            name: "restart: the hold runs in full from the restart",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (15, Event::Resumed), (35, Event::Tick)],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Restarted, K::Step],
        },
        Case {
            name: "restart while starting restarts the deadline",
            spec: spec(Canary),
            events: vec![(50, Event::Resumed), (100, Event::Tick), (110, healthy(2))],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Restarted, K::Ready],
        },
    ];
    for case in cases {
        check(case);
    }
}

#[test]
fn refusals_change_nothing() {
    let s = spec(StrategyKind::Canary);
    type Script = Vec<(u64, Event)>;
    let cases: Vec<(&str, Script, &str)> = vec![
        (
            "promote while starting",
            vec![(1, Event::Promote { full: false })],
            "still starting",
        ),
        (
            "pause while starting",
            vec![(1, Event::Pause)],
            "still starting",
        ),
        (
            "resume when not paused",
            vec![(1, healthy(2)), (2, Event::Resume)],
            "not paused",
        ),
        (
            "pause twice",
            vec![(1, healthy(2)), (2, Event::Pause), (3, Event::Pause)],
            "already paused",
        ),
        (
            "abort after the end",
            vec![(1, Event::Abort), (2, Event::Abort)],
            "already ended as aborted",
        ),
    ];
    for (name, events, want) in cases {
        let r = run(&s, &events);
        assert_eq!(r.refusals.len(), 1, "{name}: {:?}", r.refusals);
        assert!(r.refusals[0].contains(want), "{name}: {:?}", r.refusals);
    }
}

/// Zero-downtime ordering: grow before shifting traffic; shift traffic back before shrinking.
#[test]
fn commands_are_ordered_for_zero_downtime() {
    let s = spec(StrategyKind::Canary);
    let (r, cmds) = Rollout::begin(
        &s,
        1,
        "v1".into(),
        "v2".into(),
        StrategyKind::Canary,
        Timestamp(0),
    );
    let pos = |cmds: &[Command], f: &dyn Fn(&Command) -> bool| cmds.iter().position(f).unwrap();
    assert_eq!(
        cmds[0],
        Command::Scale {
            version: "v2".into(),
            instances: 2
        },
        "the candidate starts first"
    );
    let (r, cmds) = step(&s, &r, &healthy(2), Timestamp(1000)).unwrap();
    assert!(cmds.contains(&Command::Route {
        candidate: w(10),
        preview: false
    }));
    assert!(cmds.contains(&Command::ResetAnalysis));
    let (_, cmds) = step(&s, &r, &Event::Abort, Timestamp(2000)).unwrap();
    let route = pos(
        &cmds,
        &|c| matches!(c, Command::Route { candidate, .. } if *candidate == Weight::ZERO),
    );
    let stop = pos(
        &cmds,
        &|c| matches!(c, Command::Scale { version, instances: 0 } if version.as_str() == "v2"),
    );
    assert!(
        route < stop,
        "traffic returns before the candidate stops: {cmds:?}"
    );
}

#[test]
fn reasons_carry_numbers() {
    let s = spec(StrategyKind::Canary);
    let r = run(
        &s,
        &[
            (1, healthy(2)),
            (3, judged(Verdict::Fail)),
            (5, judged(Verdict::Fail)),
        ],
    );
    assert_eq!(r.rollout.outcome(), RolloutOutcome::RolledBack);
    let reason = r.rollout.reason().unwrap();
    assert!(
        reason.contains("analysis failed (2/2)") && reason.contains("7.9% (41/519)"),
        "{reason}"
    );
}

#[test]
fn blue_green_preview_serves_the_candidate_only_before_the_switch() {
    let s = spec(StrategyKind::BlueGreen);
    let (r, cmds) = Rollout::begin(
        &s,
        1,
        "v1".into(),
        "v2".into(),
        StrategyKind::BlueGreen,
        Timestamp(0),
    );
    assert!(cmds.contains(&Command::Route {
        candidate: Weight::ZERO,
        preview: true
    }));
    let (r, cmds) = step(&s, &r, &healthy(2), Timestamp(1000)).unwrap();
    assert!(cmds.contains(&Command::Route {
        candidate: Weight::FULL,
        preview: false
    }));
    assert!(matches!(r.stage, Stage::Promoting { .. }));
    // The old version stays at full size during the delay.
    assert!(cmds.contains(&Command::Scale {
        version: "v1".into(),
        instances: 2
    }));
}

#[test]
fn checkpoint_rejects_garbage() {
    assert!(checkpoint::decode(1, "not json").is_err());
    assert!(checkpoint::decode(1, r#"{"v":99,"stable":"a","candidate":"b","strategy":"canary","started_at":0,"failures":0,"stage":{"stage":"rolling","ready":1}}"#).is_err());
    assert!(checkpoint::decode(1, r#"{"v":1,"stable":"a","candidate":"b","strategy":"zigzag","started_at":0,"failures":0,"stage":{"stage":"rolling","ready":1}}"#).is_err());
}

#[test]
fn step_progress_for_status() {
    let s = spec(StrategyKind::Canary);
    let r = run(&s, &[(1, healthy(2)), (21, Event::Tick)]);
    assert_eq!(r.rollout.step_progress(&s), Some((2, 4)));
}
