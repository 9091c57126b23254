//! The experiment runner's state machine: hypothesis → method → hypothesis → rollbacks, pure.
//!
//! [`step`] takes the run's state and what just happened (a probe's or an action's result, a
//! stop asked by a person, a restart after a crash) and returns the next state and the one
//! thing to do next. It does no IO and reads no clock. The daemon persists the state after
//! every step, before it does what the step says, so a crash at any point leaves a state from
//! which [`Input::Resumed`] reaches the rollbacks: rollbacks always run once an experiment has
//! started, and the experiment's faults are always cleared last (at least once: a rollback
//! interrupted by a crash runs again).

use serde::{Deserialize, Serialize};

/// How many activities each part of the experiment has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub hypothesis: usize,
    pub method: usize,
    pub rollbacks: usize,
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "stage", content = "at")]
pub enum Stage {
    /// Not started.
    Pending,
    /// Checking hypothesis probe `n` before the method.
    Before(usize),
    /// Running method activity `n`.
    Method(usize),
    /// Checking hypothesis probe `n` after the method.
    After(usize),
    /// Running rollback `n`.
    Rollback(usize),
    /// Clearing every fault the experiment set.
    Clearing,
    Done,
}

/// How a run ended, or will end once its rollbacks are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The hypothesis held before and after, and every action ran.
    Held,
    /// The hypothesis did not hold before: nothing was done to the system.
    NotHeldBefore,
    /// The hypothesis did not hold after the method: the system did not recover.
    Deviated,
    /// An action of the method failed.
    ActionFailed,
    /// A person stopped it (Ctrl-C, `abort`).
    Aborted,
    /// The daemon died during it; a restarted daemon ran its rollbacks.
    Interrupted,
}

impl Verdict {
    /// Whether `chaos run` exits 0.
    pub fn ok(self) -> bool {
        self == Verdict::Held
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Held => "held",
            Verdict::NotHeldBefore => "not-held-before",
            Verdict::Deviated => "deviated",
            Verdict::ActionFailed => "action-failed",
            Verdict::Aborted => "aborted",
            Verdict::Interrupted => "interrupted",
        }
    }
}

/// A run's durable state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub stage: Stage,
    /// Set once the outcome is known; `Held` is given only at the end.
    pub verdict: Option<Verdict>,
}

impl Run {
    pub fn new() -> Run {
        Run {
            stage: Stage::Pending,
            verdict: None,
        }
    }

    pub fn done(&self) -> bool {
        self.stage == Stage::Done
    }
}

impl Default for Run {
    fn default() -> Self {
        Run::new()
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    Start,
    /// The current probe's result (hypothesis) or the current activity's (method, rollback).
    Result {
        ok: bool,
    },
    /// A person asked to stop: straight to the rollbacks.
    Stop,
    /// The daemon restarted with this run unfinished: straight to the rollbacks.
    Resumed,
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Do {
    /// Check hypothesis probe `n` (before or after, as the stage says).
    Probe(usize),
    /// Run method activity `n`.
    Method(usize),
    /// Run rollback `n`.
    Rollback(usize),
    /// Clear every fault the experiment set.
    ClearFaults,
    /// Nothing more: the run is over with this verdict.
    Finish(Verdict),
    /// Nothing to do for this input (a stale result, a stop during rollbacks).
    Nothing,
}

/// The first step of a stage, skipping empty ones.
fn enter(shape: &Shape, stage: Stage, verdict: Option<Verdict>) -> (Run, Do) {
    let run = |stage| Run { stage, verdict };
    match stage {
        Stage::Before(n) if n < shape.hypothesis => (run(stage), Do::Probe(n)),
        Stage::Before(_) => enter(shape, Stage::Method(0), verdict),
        Stage::Method(n) if n < shape.method => (run(stage), Do::Method(n)),
        Stage::Method(_) => enter(shape, Stage::After(0), verdict),
        Stage::After(n) if n < shape.hypothesis => (run(stage), Do::Probe(n)),
        Stage::After(_) => enter(
            shape,
            Stage::Rollback(0),
            Some(verdict.unwrap_or(Verdict::Held)),
        ),
        Stage::Rollback(n) if n < shape.rollbacks => (run(stage), Do::Rollback(n)),
        Stage::Rollback(_) => (run(Stage::Clearing), Do::ClearFaults),
        Stage::Clearing => (run(Stage::Clearing), Do::ClearFaults),
        Stage::Pending => (run(Stage::Pending), Do::Nothing),
        Stage::Done => (
            run(Stage::Done),
            Do::Finish(verdict.unwrap_or(Verdict::Held)),
        ),
    }
}

/// Goes to the rollbacks with `verdict` (unless one is already set), from rollback `from`.
fn to_rollbacks(shape: &Shape, run: Run, verdict: Verdict, from: usize) -> (Run, Do) {
    enter(
        shape,
        Stage::Rollback(from),
        Some(run.verdict.unwrap_or(verdict)),
    )
}

/// The next state and what to do.
pub fn step(shape: &Shape, run: Run, input: Input) -> (Run, Do) {
    match (run.stage, input) {
        (Stage::Done, _) => (run, Do::Nothing),
        (Stage::Pending, Input::Start) => enter(shape, Stage::Before(0), None),
        // Nothing ran, but the rollbacks are still the rollbacks: they run.
        (Stage::Pending, Input::Stop) => to_rollbacks(shape, run, Verdict::Aborted, 0),
        (Stage::Pending, _) => (run, Do::Nothing),

        (Stage::Before(n), Input::Result { ok: true }) => {
            enter(shape, Stage::Before(n + 1), run.verdict)
        }
        (Stage::Before(_), Input::Result { ok: false }) => {
            to_rollbacks(shape, run, Verdict::NotHeldBefore, 0)
        }
        (Stage::Method(n), Input::Result { ok: true }) => {
            enter(shape, Stage::Method(n + 1), run.verdict)
        }
        (Stage::Method(_), Input::Result { ok: false }) => {
            to_rollbacks(shape, run, Verdict::ActionFailed, 0)
        }
        (Stage::After(n), Input::Result { ok: true }) => {
            enter(shape, Stage::After(n + 1), run.verdict)
        }
        (Stage::After(_), Input::Result { ok: false }) => {
            to_rollbacks(shape, run, Verdict::Deviated, 0)
        }
        (Stage::Before(_) | Stage::Method(_) | Stage::After(_), Input::Stop) => {
            to_rollbacks(shape, run, Verdict::Aborted, 0)
        }
        (Stage::Before(_) | Stage::Method(_) | Stage::After(_), Input::Resumed) => {
            to_rollbacks(shape, run, Verdict::Interrupted, 0)
        }
        (Stage::Before(_) | Stage::Method(_) | Stage::After(_), Input::Start) => (run, Do::Nothing),

        // A rollback's failure is reported, never a reason to skip the others.
        (Stage::Rollback(n), Input::Result { .. }) => {
            enter(shape, Stage::Rollback(n + 1), run.verdict)
        }
        // The rollback under way when the daemon died runs again: it may not have finished.
        (Stage::Rollback(n), Input::Resumed) => to_rollbacks(shape, run, Verdict::Interrupted, n),
        (Stage::Rollback(_), Input::Stop | Input::Start) => (run, Do::Nothing),

        (Stage::Clearing, Input::Result { .. }) => (
            Run {
                stage: Stage::Done,
                verdict: run.verdict,
            },
            Do::Finish(run.verdict.unwrap_or(Verdict::Held)),
        ),
        (Stage::Clearing, Input::Resumed) => (run, Do::ClearFaults),
        (Stage::Clearing, Input::Stop | Input::Start) => (run, Do::Nothing),
    }
}

/// What to do for a run found unfinished at start: its rollbacks, then clearing its faults.
pub fn resume(shape: &Shape, run: Run) -> (Run, Do) {
    match run.stage {
        Stage::Done => (run, Do::Nothing),
        Stage::Pending => to_rollbacks(shape, run, Verdict::Interrupted, 0),
        _ => step(shape, run, Input::Resumed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        hypothesis: 2,
        method: 2,
        rollbacks: 2,
    };

    /// Drives a run with `results` (one per probe/activity, in order) until it finishes;
    /// returns everything it did.
    fn drive(shape: &Shape, results: &[bool]) -> (Vec<Do>, Run) {
        let (mut run, mut d) = step(shape, Run::new(), Input::Start);
        let mut done = vec![d];
        let mut results = results.iter();
        while !matches!(d, Do::Finish(_)) {
            let ok = results.next().copied().unwrap_or(true);
            (run, d) = step(shape, run, Input::Result { ok });
            done.push(d);
        }
        (done, run)
    }

    use Do::*;

    /// Every path through an experiment: one row each, the results fed and what was done.
    #[test]
    fn hypothesis_method_hypothesis_rollbacks() {
        let rows: Vec<(&[bool], Vec<Do>)> = vec![
            (
                &[true, true, true, true, true, true, true, true],
                vec![
                    Probe(0),
                    Probe(1),
                    Method(0),
                    Method(1),
                    Probe(0),
                    Probe(1),
                    Rollback(0),
                    Rollback(1),
                    ClearFaults,
                    Finish(Verdict::Held),
                ],
            ),
            // Not held before: no method, but rollbacks and clearing still run.
            (
                &[true, false],
                vec![
                    Probe(0),
                    Probe(1),
                    Rollback(0),
                    Rollback(1),
                    ClearFaults,
                    Finish(Verdict::NotHeldBefore),
                ],
            ),
            // An action fails: straight to the rollbacks.
            (
                &[true, true, false],
                vec![
                    Probe(0),
                    Probe(1),
                    Method(0),
                    Rollback(0),
                    Rollback(1),
                    ClearFaults,
                    Finish(Verdict::ActionFailed),
                ],
            ),
            // Deviated after; a failed rollback does not skip the next.
            (
                &[true, true, true, true, false, false],
                vec![
                    Probe(0),
                    Probe(1),
                    Method(0),
                    Method(1),
                    Probe(0),
                    Rollback(0),
                    Rollback(1),
                    ClearFaults,
                    Finish(Verdict::Deviated),
                ],
            ),
        ];
        for (results, want) in rows {
            let (got, run) = drive(&SHAPE, results);
            assert_eq!(got, want, "results {results:?}");
            assert!(run.done());
        }
        // Empty parts are skipped.
        let empty = Shape {
            hypothesis: 0,
            method: 1,
            rollbacks: 0,
        };
        assert_eq!(
            drive(&empty, &[]).0,
            vec![Method(0), ClearFaults, Finish(Verdict::Held)]
        );
    }

    /// A person stops the run at each point: the rollbacks run from the start, once.
    #[test]
    fn a_stop_at_any_point_runs_the_rollbacks() {
        for at in 0..6 {
            let (mut run, mut d) = step(&SHAPE, Run::new(), Input::Start);
            for _ in 0..at {
                (run, d) = step(&SHAPE, run, Input::Result { ok: true });
            }
            let was_rollback = matches!(d, Rollback(_) | ClearFaults);
            let (run2, d2) = step(&SHAPE, run, Input::Stop);
            if was_rollback {
                assert_eq!(d2, Nothing, "a stop does not interrupt the rollbacks");
                continue;
            }
            assert_eq!(d2, Rollback(0), "stopped after {at} steps");
            assert_eq!(run2.verdict, Some(Verdict::Aborted));
        }
    }

    /// The daemon crashes after every persisted state: the state written to disk is read
    /// back and resumed, and from there the rollbacks (from the one under way, or the first)
    /// and the clearing of faults always run, and the run ends exactly once.
    #[test]
    fn a_crash_at_every_point_still_runs_rollbacks_and_clears_faults() {
        let all_ok = [true; 16];
        let (full, _) = drive(&SHAPE, &all_ok);
        for crash_after in 0..full.len() {
            // Replay to the crash point, persisting (serialising) each state.
            let (mut run, mut d) = step(&SHAPE, Run::new(), Input::Start);
            let mut persisted = serde_json::to_string(&run).unwrap();
            for _ in 0..crash_after {
                if matches!(d, Finish(_)) {
                    break;
                }
                (run, d) = step(&SHAPE, run, Input::Result { ok: true });
                persisted = serde_json::to_string(&run).unwrap();
            }
            let restored: Run = serde_json::from_str(&persisted).unwrap();
            let (mut run, mut d) = resume(&SHAPE, restored);
            if restored.done() {
                assert_eq!(d, Nothing);
                continue;
            }
            let mut did = vec![d];
            while !matches!(d, Finish(_)) {
                (run, d) = step(&SHAPE, run, Input::Result { ok: true });
                did.push(d);
            }
            assert!(
                did.contains(&ClearFaults),
                "crash after {crash_after}: {did:?}"
            );
            let last_rollback = did.iter().rposition(|x| *x == Rollback(1));
            let clear = did.iter().position(|x| *x == ClearFaults);
            if restored.stage != Stage::Clearing {
                assert!(
                    last_rollback.is_some() && last_rollback < clear,
                    "crash after {crash_after}: {did:?}"
                );
            }
            assert_eq!(
                did.iter().filter(|x| matches!(x, Finish(_))).count(),
                1,
                "crash after {crash_after}"
            );
            assert!(run.done());
            // A run that had not decided its verdict is `interrupted`.
            let v = run.verdict.unwrap();
            assert!(
                v == Verdict::Interrupted || v == Verdict::Held,
                "crash after {crash_after}: {v:?}"
            );
        }
        // A run that never started still gets its rollbacks.
        assert_eq!(resume(&SHAPE, Run::new()).1, Rollback(0));
    }
}
