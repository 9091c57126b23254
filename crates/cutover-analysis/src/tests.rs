//! Data-driven tests of the judge, and the simulation's targets on fixed seeds.

use std::time::Duration;

use cutover_core::{AnalysisSpec, LatencyDist, WindowStats};

use super::*;
use crate::sim::{Behaviour, Scenario, trials};

/// A window of `n` requests with `errors` 5xx, latencies spread evenly over `lo..=hi` ms.
fn window(n: u64, errors: u64, lo_ms: u64, hi_ms: u64) -> WindowStats {
    let samples = (0..n).map(|i| (lo_ms + (hi_ms - lo_ms) * i / n.max(1)) * 1000);
    WindowStats {
        requests: n,
        errors,
        latency: LatencyDist::from_samples(samples),
    }
}

fn spec(compare: bool) -> AnalysisSpec {
    AnalysisSpec {
        compare_to_stable: compare,
        ..AnalysisSpec::default()
    }
}

#[test]
fn verdicts() {
    use Verdict::*;
    /// (name, spec, candidate, stable, verdict, words the reason must contain)
    type Case = (
        &'static str,
        AnalysisSpec,
        WindowStats,
        Option<WindowStats>,
        Verdict,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "below min_requests",
            spec(true),
            window(49, 49, 10, 20),
            Some(window(500, 0, 10, 20)),
            Inconclusive,
            "fewer than min_requests 50",
        ),
        (
            "equal healthy streams, lots of data",
            spec(true),
            window(2000, 2, 10, 30),
            Some(window(18000, 18, 10, 30)),
            Pass,
            "candidate 0.1% errors (2/2000)",
        ),
        (
            "one error in 80 is not a failure",
            spec(true),
            window(80, 1, 10, 30),
            Some(window(720, 1, 10, 30)),
            Inconclusive,
            "not yet clearly within",
        ),
        (
            "clear error increase",
            spec(true),
            window(519, 41, 10, 30),
            Some(window(4671, 9, 10, 30)),
            Fail,
            "candidate error rate 7.9% (41/519) > max 1.0%; stable 0.2%",
        ),
        (
            "latency doubled",
            spec(true),
            window(500, 0, 20, 120),
            Some(window(4500, 0, 10, 60)),
            Fail,
            "candidate latency p50/p99",
        ),
        (
            "tiny latency shift with many samples",
            spec(true),
            window(20000, 0, 10, 31),
            Some(window(20000, 0, 10, 30)),
            Pass,
            "candidate 0.0% errors",
        ),
        (
            "p99 over max",
            spec(false),
            window(500, 0, 100, 900),
            None,
            Fail,
            "candidate p99 890ms > max 500ms (249/500 requests slower)",
        ),
        (
            "threshold-only without stable",
            spec(true),
            window(600, 0, 10, 20),
            None,
            Pass,
            "candidate 0.0% errors (0/600)",
        ),
        (
            "compare off ignores a slower stable-relative",
            spec(false),
            window(600, 0, 40, 80),
            Some(window(600, 0, 10, 20)),
            Pass,
            "candidate 0.0% errors",
        ),
        (
            "error rate vs stable beyond the margin",
            AnalysisSpec {
                max_error_rate: None,
                ..spec(true)
            },
            window(2000, 100, 10, 20),
            Some(window(18000, 90, 10, 20)),
            Fail,
            "vs stable 0.5% (90/18000)",
        ),
    ];
    for (name, spec, cand, stable, want, reason) in cases {
        let j = judge(&spec, &cand, stable.as_ref());
        assert_eq!(j.verdict, want, "{name}: {j:#?}");
        assert!(
            j.reason.contains(reason),
            "{name}: reason {:?} lacks {reason:?}",
            j.reason
        );
    }
}

/// Seen on loopback: a fresh canary 0.05 ms slower is statistically significant and irrelevant.
#[test]
fn sub_millisecond_shift_is_not_a_regression() {
    let w = |n: u64, lo: u64, hi: u64| WindowStats {
        requests: n,
        errors: 0,
        latency: LatencyDist::from_samples((0..n).map(|i| lo + (hi - lo) * i / n)),
    };
    let j = judge(&spec(true), &w(400, 300, 420), Some(&w(3600, 250, 350)));
    let latency = j
        .checks
        .iter()
        .find(|c| c.name == "latency-vs-stable")
        .unwrap();
    assert_eq!(latency.verdict, Verdict::Pass, "{j:#?}");
}

#[test]
fn judging_is_pure() {
    let (c, s) = (window(300, 9, 10, 50), window(2700, 5, 10, 40));
    assert_eq!(
        judge(&spec(true), &c, Some(&s)),
        judge(&spec(true), &c, Some(&s))
    );
}

#[test]
fn mann_whitney_on_buckets() {
    let same = mann_whitney(&window(1000, 0, 10, 20), &window(1000, 0, 10, 20)).unwrap();
    assert!((same.1 - 0.5).abs() < 0.01 && same.0 > 0.4, "{same:?}");
    let slower = mann_whitney(&window(1000, 0, 20, 40), &window(1000, 0, 10, 20)).unwrap();
    assert!(slower.1 > 0.99 && slower.0 < 1e-9, "{slower:?}");
    assert_eq!(
        mann_whitney(&WindowStats::default(), &window(5, 0, 1, 2)),
        None
    );
}

/// The decision-quality targets on fixed seeds (deterministic: the same numbers every run).
#[test]
fn simulation_meets_targets() {
    let stable = Behaviour {
        error_rate: 0.002,
        median_ms: 20.0,
    };
    let healthy = trials(&Scenario::contract(stable, stable), 60, 1);
    assert!(
        healthy.rolled_back == 0,
        "healthy canaries rolled back: {healthy:?}"
    );
    for bad in [
        Behaviour {
            error_rate: 0.052,
            ..stable
        },
        Behaviour {
            median_ms: 40.0,
            ..stable
        },
    ] {
        let r = trials(&Scenario::contract(stable, bad), 60, 1);
        assert_eq!(r.rolled_back, r.trials, "every bad canary is caught: {r:?}");
        assert!(
            r.median.is_some_and(|m| m <= 10.0),
            "median time to rollback within 10 s: {r:?}"
        );
    }
    assert_eq!(
        judge(&spec(true), &window(1, 0, 1, 1), None).candidate.p99,
        Some(Duration::from_millis(1))
    );
}
