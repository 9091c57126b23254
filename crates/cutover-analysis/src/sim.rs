//! A deterministic, seeded simulation of the judge in the controller's loop, to measure
//! decision quality: how fast a bad canary is rolled back, and how often a healthy one is.
//!
//! It mirrors the controller exactly where it matters: every `interval` the window since the
//! last *passing* verdict is judged (an inconclusive or failed window keeps growing),
//! `failure_limit` failed evaluations roll back. Traffic: `rps` requests per second, a share
//! `canary` of them to the candidate; errors are Bernoulli, latencies log-normal, rounded to 3
//! significant digits as the HDR histograms of the real metrics do.

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
    /// CONTRACT's defaults: 200 rps, canary at 10%, judged for 60 s.
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

/// When the candidate was rolled back (seconds after it started taking traffic), if it was.
pub fn run(s: &Scenario, seed: u64) -> Option<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cand_n = (f64::from(s.rps) * s.canary).round() as u32;
    let stable_n = s.rps - cand_n;
    let interval = s.spec.interval.as_secs().max(1) as u32;
    let (mut cw, mut sw) = (WindowStats::default(), WindowStats::default());
    let mut failures = 0;
    for t in 1..=s.seconds {
        second(&mut rng, cand_n, s.candidate, &mut cw);
        second(&mut rng, stable_n, s.stable, &mut sw);
        if t % interval != 0 {
            continue;
        }
        let stable = s.spec.compare_to_stable.then_some(&sw);
        match judge(&s.spec, &cw, stable).verdict {
            Verdict::Pass => {
                cw = WindowStats::default();
                sw = WindowStats::default();
            }
            Verdict::Fail => {
                failures += 1;
                if failures >= s.spec.failure_limit {
                    return Some(f64::from(t));
                }
            }
            Verdict::Inconclusive => {}
        }
    }
    None
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
}

pub fn trials(s: &Scenario, trials: u32, first_seed: u64) -> Report {
    let mut times: Vec<f64> = (0..trials)
        .filter_map(|i| run(s, first_seed + u64::from(i)))
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        (!times.is_empty())
            .then(|| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1])
    };
    Report {
        trials,
        rolled_back: times.len() as u32,
        median: q(0.5),
        p95: q(0.95),
        max: times.last().copied(),
    }
}
