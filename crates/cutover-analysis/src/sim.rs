//! A deterministic, seeded simulation of the judge in the controller's loop, to measure
//! decision quality: how fast a bad canary is rolled back, how often a healthy one is, and how
//! soon a canary step may advance.
//!
//! It mirrors the controller exactly where it matters: every `interval` the window since the
//! last *passing* verdict is judged (an inconclusive or failed window keeps growing, a Pass
//! starts a new one), and `failure_limit` failed evaluations over the whole step roll back (a
//! Pass does not forgive earlier failures). A step may only advance after a Pass, so the time
//! of the first Pass is when the controller could move on (once the step's pause is over).
//! Traffic: `rps` requests per second, a share `canary` of them to the candidate; errors are
//! Bernoulli, latencies log-normal, rounded to 3 significant digits as the HDR histograms of
//! the real metrics do.

use cutover_core::{AnalysisSpec, LatencyDist, WindowStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Verdict, judge};

/// A version's behaviour.
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    pub error_rate: f64,
    /// Median latency in milliseconds; the log-normal spread is `SIGMA`.
    pub median_ms: f64,
}

/// Log-normal spread: with it, p99 is 4× the median (20 ms median → 80 ms p99).
pub const SIGMA: f64 = 0.596;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub spec: AnalysisSpec,
    pub rps: u32,
    pub canary: f64,
    pub stable: Behaviour,
    pub candidate: Behaviour,
    /// How long the candidate is judged, in seconds.
    pub seconds: u32,
}

impl Scenario {
    /// the documented defaults: 200 rps, canary at 10%, judged for 60 s.
    pub fn contract(stable: Behaviour, candidate: Behaviour) -> Scenario {
        Scenario {
            spec: AnalysisSpec::default(),
            rps: 200,
            canary: 0.10,
            stable,
            candidate,
            seconds: 60,
        }
    }
}

fn round3(us: u64) -> u64 {
    // Keep three significant digits, like an HDR histogram with precision 3.
    let mut scale = 1;
    while us / scale >= 1000 {
        scale *= 10;
    }
    (us / scale) * scale
}

fn second(rng: &mut StdRng, n: u32, b: Behaviour, w: &mut WindowStats) {
    let mut samples = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if rng.random::<f64>() < b.error_rate {
            w.errors += 1;
        }
        // Box-Muller for a standard normal.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let ms = b.median_ms * (SIGMA * z).exp();
        samples.push(round3((ms * 1000.0).max(1.0) as u64));
    }
    w.requests += u64::from(n);
    w.latency.merge(&LatencyDist::from_samples(samples));
}

/// The pause of the default canary steps: a step that has no Pass by then holds.
pub const STEP_PAUSE: f64 = 20.0;

/// What happened to one candidate, in seconds after it started taking traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    /// When it was rolled back, if it was.
    pub rolled_back: Option<f64>,
    /// When the judge first passed it (the earliest moment its step could advance), if ever.
    pub first_pass: Option<f64>,
}

/// One seeded run of `s`, judged as the controller does.
pub fn run(s: &Scenario, seed: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let cand_n = (f64::from(s.rps) * s.canary).round() as u32;
    let stable_n = s.rps - cand_n;
    let interval = s.spec.interval.as_secs().max(1) as u32;
    let (mut cw, mut sw) = (WindowStats::default(), WindowStats::default());
    let mut failures = 0;
    let mut out = Outcome::default();
    for t in 1..=s.seconds {
        second(&mut rng, cand_n, s.candidate, &mut cw);
        second(&mut rng, stable_n, s.stable, &mut sw);
        if t % interval != 0 {
            continue;
        }
        let stable = s.spec.compare_to_stable.then_some(&sw);
        match judge(&s.spec, &cw, stable).verdict {
            Verdict::Pass => {
                out.first_pass.get_or_insert(f64::from(t));
                cw = WindowStats::default();
                sw = WindowStats::default();
            }
            Verdict::Fail => {
                failures += 1;
                if failures >= s.spec.failure_limit.max(1) {
                    out.rolled_back = Some(f64::from(t));
                    return out;
                }
            }
            Verdict::Inconclusive => {}
        }
    }
    out
}

/// Median, 95th percentile and max of a set of times, `None` when it is empty.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Times {
    pub median: Option<f64>,
    pub p95: Option<f64>,
    pub max: Option<f64>,
}

impl Times {
    fn of(mut times: Vec<f64>) -> Times {
        times.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            (!times.is_empty()).then(|| {
                times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1]
            })
        };
        Times {
            median: q(0.5),
            p95: q(0.95),
            max: times.last().copied(),
        }
    }
}

/// The outcome of many seeded trials of one scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub trials: u32,
    pub rolled_back: u32,
    /// Seconds to rollback over the trials that rolled back: median, 95th percentile, max.
    pub median: Option<f64>,
    pub p95: Option<f64>,
    pub max: Option<f64>,
    /// Trials that got a Pass at all, and within [`STEP_PAUSE`].
    pub passed: u32,
    pub passed_in_pause: u32,
    /// Seconds to the first Pass over the trials that got one.
    pub first_pass: Times,
}

pub fn trials(s: &Scenario, trials: u32, first_seed: u64) -> Report {
    let runs: Vec<Outcome> = (0..trials)
        .map(|i| run(s, first_seed + u64::from(i)))
        .collect();
    let rollbacks = Times::of(runs.iter().filter_map(|o| o.rolled_back).collect());
    let passes: Vec<f64> = runs.iter().filter_map(|o| o.first_pass).collect();
    Report {
        trials,
        rolled_back: runs.iter().filter(|o| o.rolled_back.is_some()).count() as u32,
        median: rollbacks.median,
        p95: rollbacks.p95,
        max: rollbacks.max,
        passed: passes.len() as u32,
        passed_in_pause: passes.iter().filter(|&&t| t <= STEP_PAUSE).count() as u32,
        first_pass: Times::of(passes),
    }
}
