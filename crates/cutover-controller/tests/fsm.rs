//! Table-driven tests of the rollout state machine: every transition of docs/reference.md §6, with
//! made-up times and no tokio.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cutover_controller::checkpoint;
use cutover_controller::fsm::{
    Command, Event, EventKind, HealthCounts, Rollout, Stage, Verdict, step,
};
use cutover_core::{
    CanaryStep, NoEvidence, Phase, RolloutOutcome, RolloutSpec, StrategyKind, Timestamp, Version,
    Weight,
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
            analysis: true,
        },
        CanaryStep::SetWeight {
            weight: w(50),
            pause: Some(Duration::from_secs(20)),
            analysis: true,
        },
        CanaryStep::Approve,
        CanaryStep::SetWeight {
            weight: w(100),
            pause: None,
            analysis: true,
        },
    ];
    s.scale_down_delay = Duration::from_secs(30);
    s.analysis.deadline = Duration::from_secs(600);
    s
}

/// `spec(strategy)` with `f` applied.
fn with(strategy: StrategyKind, f: impl FnOnce(&mut RolloutSpec)) -> RolloutSpec {
    let mut s = spec(strategy);
    f(&mut s);
    s
}

fn promote() -> Event {
    Event::Promote {
        full: false,
        force: false,
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
        "web".into(),
        Version::new("v1"),
        Version::new("v2"),
        Timestamp(0),
    );
    let mut refusals = Vec::new();
    for (t, e) in events {
        match step(spec, &rollout, e, Timestamp(t * 1000)) {
            Ok((next, c)) => {
                // Every state must survive a checkpoint round trip unchanged.
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
    let manual_bg = || {
        with(BlueGreen, |s| {
            s.blue_green.auto_promote = false;
        })
    };
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
            name: "a passed step advances when its pause has elapsed",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (5, judged(Pass)), (21, Event::Tick)],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Step, K::AnalysisPassed, K::Step],
        },
        Case {
            name: "a pass after the pause advances at once",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (25, Event::Tick), (26, judged(Pass))],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Step, K::Holding, K::AnalysisPassed, K::Step],
        },
        Case {
            name: "hold not yet elapsed keeps the step, even with a pass",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (5, judged(Pass)), (20, Event::Tick)],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Step],
        },
        Case {
            name: "pause elapsed without a verdict holds the step (no traffic at all)",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (21, Event::Tick), (300, Event::Tick)],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Step, K::Holding],
        },
        Case {
            name: "inconclusive verdicts hold the step and never count",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Inconclusive)),
                (21, Event::Tick),
                (23, judged(Inconclusive)),
                (25, Event::Tick),
            ],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Step, K::Holding],
        },
        Case {
            name: "a failed evaluation then the timer: still held",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (3, judged(Fail)), (21, Event::Tick)],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::AnalysisFailed, K::Holding],
        },
        Case {
            name: "a pass after a pass then a failure is needed again",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Pass)),
                (5, judged(Fail)),
                (21, Event::Tick),
            ],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::AnalysisPassed, K::AnalysisFailed, K::Holding],
        },
        Case {
            name: "one failure below the limit, then a pass: the step advances",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Fail)),
                (21, Event::Tick),
                (23, judged(Pass)),
            ],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::AnalysisFailed, K::AnalysisPassed, K::Step],
        },
        Case {
            name: "analysis_deadline without evidence pauses by default",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (21, Event::Tick), (601, Event::Tick)],
            phase: Phase::Paused,
            weight: 10,
            records: &[K::Holding, K::NoEvidence],
        },
        Case {
            name: "on_no_evidence = rollback rolls back at the deadline",
            spec: with(Canary, |s| s.analysis.on_no_evidence = NoEvidence::Rollback),
            events: vec![(1, healthy(2)), (21, Event::Tick), (601, Event::Tick)],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::NoEvidence, K::RolledBack],
        },
        Case {
            name: "on_no_evidence = promote advances at the deadline, by the user's choice",
            spec: with(Canary, |s| s.analysis.on_no_evidence = NoEvidence::Promote),
            events: vec![(1, healthy(2)), (21, Event::Tick), (601, Event::Tick)],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::NoEvidence, K::Step],
        },
        Case {
            name: "a failed step never advances at the deadline, whatever on_no_evidence says",
            spec: with(Canary, |s| s.analysis.on_no_evidence = NoEvidence::Promote),
            events: vec![
                (1, healthy(2)),
                (3, judged(Fail)),
                (21, Event::Tick),
                (601, Event::Tick),
            ],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::AnalysisFailed, K::RolledBack],
        },
        Case {
            name: "resume after a no-evidence pause waits another deadline",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (601, Event::Tick),
                (700, Event::Resume),
                (1200, Event::Tick),
            ],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::NoEvidence, K::Resumed],
        },
        Case {
            name: "a pass while paused for evidence advances once resumed",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (601, Event::Tick),
                (650, judged(Pass)),
                (700, Event::Resume),
            ],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::NoEvidence, K::AnalysisPassed, K::Resumed, K::Step],
        },
        Case {
            name: "analysis = false on the service: steps advance on their pauses alone",
            spec: with(Canary, |s| s.analysis.enabled = false),
            events: vec![(1, healthy(2)), (21, Event::Tick)],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Step, K::Step],
        },
        Case {
            name: "analysis = false on one step: only that step is unjudged",
            spec: with(Canary, |s| {
                s.canary_steps[0] = CanaryStep::SetWeight {
                    weight: w(10),
                    pause: Some(Duration::from_secs(20)),
                    analysis: false,
                }
            }),
            events: vec![(1, healthy(2)), (21, Event::Tick), (41, Event::Tick)],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Step, K::Step, K::Holding],
        },
        Case {
            name: "approval step waits at the previous weight",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Pass)),
                (21, Event::Tick),
                (23, judged(Pass)),
                (41, Event::Tick),
            ],
            phase: Phase::AwaitingApproval,
            weight: 50,
            records: &[K::AwaitingApproval],
        },
        Case {
            name: "promote passes approval; the final 100% step promotes",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Pass)),
                (21, Event::Tick),
                (23, judged(Pass)),
                (41, Event::Tick),
                (50, promote()),
            ],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::Approved, K::Promoting],
        },
        Case {
            name: "promoting holds the old version warm for scale_down_delay, then ends",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
                (31, Event::Tick),
                (32, Event::Tick),
            ],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Approved, K::Promoting, K::Promoted],
        },
        Case {
            name: "canary rollback within scale_down_delay is instant",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
                (10, Event::Rollback),
            ],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::Promoting, K::RolledBack],
        },
        Case {
            name: "post-promotion analysis rolls a canary back",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
                (4, judged(Fail)),
                (6, judged(Fail)),
            ],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::Promoting, K::AnalysisFailed, K::RolledBack],
        },
        Case {
            name: "a failed post-promotion evaluation holds the end of scale_down_delay",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
                (4, judged(Fail)),
                (40, Event::Tick),
            ],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::AnalysisFailed, K::Holding],
        },
        Case {
            name: "promote skips a timed pause",
            spec: spec(Canary),
            events: vec![(1, healthy(2)), (2, promote())],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Approved, K::Step],
        },
        Case {
            name: "promote --force passes a failed step",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Fail)),
                (
                    4,
                    Event::Promote {
                        full: false,
                        force: true,
                    },
                ),
            ],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::AnalysisFailed, K::Approved, K::Step],
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
                (3, judged(Pass)),
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
                (3, judged(Pass)),
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
            name: "blue-green judges the preview before the switch",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (20, Event::Tick)],
            phase: Phase::Progressing,
            weight: 0,
            records: &[K::Ready, K::Step, K::Holding],
        },
        Case {
            name: "blue-green auto-promotes on a passed preview, keeps the old warm",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (5, judged(Pass)), (20, Event::Tick)],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::Ready, K::AnalysisPassed, K::Promoting],
        },
        Case {
            name: "blue-green preview failing analysis rolls back with no user traffic moved",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (3, judged(Fail)), (5, judged(Fail))],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::AnalysisFailed, K::AnalysisFailed, K::RolledBack],
        },
        Case {
            name: "blue-green preview without evidence pauses at analysis_deadline",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (700, Event::Tick)],
            phase: Phase::Paused,
            weight: 0,
            records: &[K::NoEvidence],
        },
        Case {
            name: "blue-green without analysis switches once healthy",
            spec: with(BlueGreen, |s| s.analysis.enabled = false),
            events: vec![(1, healthy(2))],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::Ready, K::Promoting],
        },
        Case {
            name: "blue-green scale-down delay ends the rollout",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (2, judged(Pass)), (33, Event::Tick)],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Promoting, K::Promoted],
        },
        Case {
            name: "blue-green rollback within the delay is instant",
            spec: spec(BlueGreen),
            events: vec![(1, healthy(2)), (2, judged(Pass)), (10, Event::Rollback)],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::Promoting, K::RolledBack],
        },
        Case {
            name: "blue-green analysis after the switch rolls back",
            spec: spec(BlueGreen),
            events: vec![
                (1, healthy(2)),
                (2, judged(Pass)),
                (3, judged(Fail)),
                (5, judged(Fail)),
            ],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::Promoting, K::AnalysisFailed, K::RolledBack],
        },
        Case {
            name: "blue-green manual promote waits after a passed preview",
            spec: manual_bg(),
            events: vec![(1, healthy(2)), (3, judged(Pass)), (40, Event::Tick)],
            phase: Phase::AwaitingApproval,
            weight: 0,
            records: &[K::AnalysisPassed, K::AwaitingApproval],
        },
        Case {
            name: "blue-green manual promote switches",
            spec: manual_bg(),
            events: vec![(1, healthy(2)), (3, judged(Pass)), (40, promote())],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::AwaitingApproval, K::Approved, K::Promoting],
        },
        Case {
            name: "blue-green promote --force over a failed preview",
            spec: manual_bg(),
            events: vec![
                (1, healthy(2)),
                (3, judged(Fail)),
                (
                    4,
                    Event::Promote {
                        full: false,
                        force: true,
                    },
                ),
            ],
            phase: Phase::Promoting,
            weight: 100,
            records: &[K::AnalysisFailed, K::Approved, K::Promoting],
        },
        Case {
            name: "rolling judges each batch before the next",
            spec: RolloutSpec {
                instances: 3,
                ..spec(Rolling)
            },
            events: vec![(1, healthy(1)), (2, healthy(2)), (3, Event::Tick)],
            phase: Phase::Progressing,
            weight: 33,
            records: &[K::Step, K::Holding],
        },
        Case {
            name: "rolling replaces instance by instance on passing verdicts",
            spec: RolloutSpec {
                instances: 3,
                ..spec(Rolling)
            },
            events: vec![(1, healthy(1)), (2, healthy(2)), (4, judged(Pass))],
            phase: Phase::Progressing,
            weight: 66,
            records: &[K::Step, K::AnalysisPassed, K::Step],
        },
        Case {
            name: "rolling judges the last batch too, then promotes",
            spec: RolloutSpec {
                instances: 2,
                ..spec(Rolling)
            },
            events: vec![
                (1, healthy(1)),
                (2, healthy(2)),
                (3, judged(Pass)),
                (4, Event::Tick),
                (5, judged(Pass)),
                (40, Event::Tick),
            ],
            phase: Phase::Promoted,
            weight: 100,
            records: &[K::Step, K::Step, K::Promoting, K::Promoted],
        },
        Case {
            name: "rolling batch failing analysis rolls every replaced instance back",
            spec: RolloutSpec {
                instances: 3,
                ..spec(Rolling)
            },
            events: vec![(1, healthy(1)), (3, judged(Fail)), (5, judged(Fail))],
            phase: Phase::RolledBack,
            weight: 0,
            records: &[K::AnalysisFailed, K::RolledBack],
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
            events: vec![
                (1, healthy(2)),
                (15, Event::Resumed),
                (16, judged(Pass)),
                (34, Event::Tick),
            ],
            phase: Phase::Progressing,
            weight: 10,
            records: &[K::Restarted],
        },
        Case {
            name: "restart: the hold runs in full from the restart, and needs a new pass",
            spec: spec(Canary),
            events: vec![
                (1, healthy(2)),
                (3, judged(Pass)),
                (15, Event::Resumed),
                (35, Event::Tick),
                (36, judged(Pass)),
            ],
            phase: Phase::Progressing,
            weight: 50,
            records: &[K::Restarted, K::Holding, K::AnalysisPassed, K::Step],
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
fn a_holding_step_says_so_at_most_every_30_seconds() {
    let s = spec(StrategyKind::Canary);
    let mut events = vec![(1, healthy(2))];
    // Ten minutes less a second of ticks and inconclusive verdicts every two seconds.
    for t in (21..600).step_by(2) {
        events.push((t, Event::Tick));
        events.push((t, judged(Verdict::Inconclusive)));
    }
    let r = run(&s, &events);
    let holds = recorded(&r.cmds)
        .into_iter()
        .filter(|k| *k == EventKind::Holding)
        .count();
    assert_eq!(holds, 20, "one note per 30 s over 579 s");
    let last = r
        .cmds
        .iter()
        .rev()
        .find_map(|c| match c {
            Command::Record {
                kind: EventKind::Holding,
                message,
            } => Some(message.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        last.contains("step 1/4 (10%) holds v2")
            && last.contains("7.9% (41/519)")
            && last.contains("analysis_deadline ends the wait in"),
        "{last}"
    );
}

#[test]
fn refusals_change_nothing() {
    let s = spec(StrategyKind::Canary);
    type Script = Vec<(u64, Event)>;
    let cases: Vec<(&str, Script, &str)> = vec![
        (
            "promote while starting",
            vec![(1, promote())],
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
        (
            "promote over a failed evaluation needs --force",
            vec![(1, healthy(2)), (3, judged(Verdict::Fail)), (4, promote())],
            "run `cutover promote web --force`",
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
    let (r, cmds) = Rollout::begin(&s, 1, "web".into(), "v1".into(), "v2".into(), Timestamp(0));
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

/// Every strategy keeps the stable version at full size until the rollout ends.
#[test]
fn the_old_version_stays_warm_until_scale_down() {
    for strategy in StrategyKind::ALL {
        let s = RolloutSpec {
            instances: 3,
            ..spec(*strategy)
        };
        let r = run(
            &s,
            &[
                (1, healthy(3)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
            ],
        );
        assert!(
            matches!(r.rollout.stage, Stage::Promoting { .. }),
            "{strategy}: {:?}",
            r.rollout.stage
        );
        let stable_scales: Vec<u32> = r
            .cmds
            .iter()
            .filter_map(|c| match c {
                Command::Scale { version, instances } if version.as_str() == "v1" => {
                    Some(*instances)
                }
                _ => None,
            })
            .collect();
        assert!(
            stable_scales.iter().all(|n| *n == 3),
            "{strategy}: v1 scaled to {stable_scales:?}"
        );
    }
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
fn approval_messages_name_the_service() {
    let s = spec(StrategyKind::Canary);
    let r = run(
        &s,
        &[
            (1, healthy(2)),
            (3, judged(Verdict::Pass)),
            (21, Event::Tick),
            (23, judged(Verdict::Pass)),
            (41, Event::Tick),
        ],
    );
    let msg = r
        .cmds
        .iter()
        .find_map(|c| match c {
            Command::Record {
                kind: EventKind::AwaitingApproval,
                message,
            } => Some(message.clone()),
            _ => None,
        })
        .unwrap();
    assert!(msg.contains("run `cutover promote web`"), "{msg}");
}

#[test]
fn blue_green_preview_serves_the_candidate_only_before_the_switch() {
    let s = spec(StrategyKind::BlueGreen);
    let (r, cmds) = Rollout::begin(&s, 1, "web".into(), "v1".into(), "v2".into(), Timestamp(0));
    assert!(cmds.contains(&Command::Route {
        candidate: Weight::ZERO,
        preview: true
    }));
    assert!(
        !r.wants_probes(&s),
        "no probes before the candidate is healthy"
    );
    let (r, cmds) = step(&s, &r, &healthy(2), Timestamp(1000)).unwrap();
    assert!(cmds.contains(&Command::Route {
        candidate: Weight::ZERO,
        preview: true
    }));
    assert!(r.judging(&s) && r.wants_probes(&s), "the preview is judged");
    let (r, cmds) = step(&s, &r, &judged(Verdict::Pass), Timestamp(2000)).unwrap();
    assert!(cmds.contains(&Command::Route {
        candidate: Weight::FULL,
        preview: false
    }));
    assert!(matches!(r.stage, Stage::Promoting { .. }));
    assert!(!r.wants_probes(&s), "real traffic judges after the switch");
    // The old version stays at full size during the delay.
    assert!(cmds.contains(&Command::Scale {
        version: "v1".into(),
        instances: 2
    }));
}

#[test]
fn checkpoint_rejects_garbage_and_reads_format_1() {
    let web: cutover_core::ServiceName = "web".into();
    assert!(checkpoint::decode(1, &web, "not json").is_err());
    assert!(checkpoint::decode(1, &web, r#"{"v":99,"stable":"a","candidate":"b","strategy":"canary","started_at":0,"failures":0,"stage":{"stage":"rolling","ready":1}}"#).is_err());
    assert!(checkpoint::decode(1, &web, r#"{"v":1,"stable":"a","candidate":"b","strategy":"zigzag","started_at":0,"failures":0,"stage":{"stage":"rolling","ready":1}}"#).is_err());
    let old = checkpoint::decode(1, &web, r#"{"v":1,"stable":"a","candidate":"b","strategy":"canary","started_at":5,"failures":1,"stage":{"stage":"canary","step":0,"weight":10,"hold_until":null}}"#).unwrap();
    assert_eq!(
        old.gate.last, None,
        "an old checkpoint's step waits for a new verdict"
    );
    assert_eq!(old.failures, 1);
}

#[test]
fn step_progress_for_status() {
    let s = spec(StrategyKind::Canary);
    let r = run(
        &s,
        &[
            (1, healthy(2)),
            (3, judged(Verdict::Pass)),
            (21, Event::Tick),
        ],
    );
    assert_eq!(r.rollout.step_progress(&s), Some((2, 4)));
}

/// A pass at 100% promotes at once; the old version is retired (kept warm, out of traffic)
/// until the end of `scale_down_delay`, never stopped on the spot.
#[test]
fn post_promotion_pass_promotes_and_keeps_the_old_version_warm() {
    for strategy in StrategyKind::ALL {
        let s = spec(*strategy);
        let r = run(
            &s,
            &[
                (1, healthy(2)),
                (
                    2,
                    Event::Promote {
                        full: true,
                        force: false,
                    },
                ),
                (4, judged(Verdict::Pass)),
            ],
        );
        assert_eq!(r.rollout.outcome(), RolloutOutcome::Promoted, "{strategy}");
        assert!(
            r.cmds.contains(&Command::Retire {
                version: "v1".into(),
                at: Timestamp(32_000),
            }),
            "{strategy}: {:?}",
            r.cmds
        );
        assert!(
            !r.cmds.iter().any(|c| matches!(
                c,
                Command::Scale { version, instances: 0 } if version.as_str() == "v1"
            )),
            "{strategy}: v1 is never scaled to 0 by the promotion itself"
        );
        let reason = r.rollout.reason().unwrap();
        assert!(
            reason.contains("v1 stays warm for 28s") && reason.contains("cutover rollback web"),
            "{reason}"
        );
    }
}
