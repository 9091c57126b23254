//! Data-driven tests of the judge and of its sequential statistics, and the simulation's
//! targets on fixed seeds.

use std::time::Duration;

use cutover_core::{AnalysisSpec, LatencyDist, WindowStats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::sim::{Behaviour, STEP_PAUSE, Scenario, trials};

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
            "clear error increase, over max and over stable",
            spec(true),
            window(519, 41, 10, 30),
            Some(window(4671, 9, 10, 30)),
            Fail,
            "candidate error rate 7.9% (41/519) > max 1.0%, and vs stable 0.2% (9/4671) over the 1.0pp margin",
        ),
        (
            "over max only: stable's rate for context",
            spec(true),
            window(200, 8, 10, 30),
            Some(window(1800, 40, 10, 30)),
            Fail,
            "candidate error rate 4.0% (8/200) > max 1.0%; stable 2.2%",
        ),
        (
            "a clean window passes with its confidence bound",
            spec(true),
            window(1000, 0, 10, 30),
            Some(window(9000, 9, 10, 30)),
            Pass,
            "candidate 0.0% errors (0/1000), at most 0.36% with 95% confidence, p99",
        ),
        (
            "no errors in 300 is not yet evidence of under 1%",
            spec(true),
            window(300, 0, 10, 30),
            Some(window(2700, 0, 10, 30)),
            Inconclusive,
            "candidate error rate 0.0% (0/300) not yet clearly within max 1.0% (95% bound 1.",
        ),
        (
            "without max_error_rate the comparison gives the evidence",
            AnalysisSpec {
                max_error_rate: None,
                ..spec(true)
            },
            window(3000, 15, 10, 20),
            Some(window(27000, 135, 10, 20)),
            Pass,
            "candidate 0.5% errors (15/3000), p99",
        ),
        (
            "without max_error_rate a short window is inconclusive",
            AnalysisSpec {
                max_error_rate: None,
                max_p99: None,
                ..spec(true)
            },
            window(100, 1, 10, 20),
            Some(window(900, 5, 10, 20)),
            Inconclusive,
            "not yet clearly within the 1.0pp margin",
        ),
        (
            "p99 near its limit is not yet a pass",
            AnalysisSpec {
                max_error_rate: None,
                ..spec(false)
            },
            window(1000, 0, 10, 505),
            None,
            Inconclusive,
            "candidate p99 499ms not yet clearly within max 500ms (8/1000 requests slower)",
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
        assert_eq!(j.reason.matches(". ").count(), 0, "{name}: one sentence");
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
    for healthy in [
        stable,
        Behaviour {
            error_rate: 0.004,
            median_ms: 21.0,
        },
    ] {
        let r = trials(&Scenario::contract(stable, healthy), 60, 1);
        assert_eq!(r.rolled_back, 0, "healthy canaries rolled back: {r:?}");
        assert!(
            r.passed > 0,
            "some healthy canaries pass within 60 s: {r:?}"
        );
    }
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
        assert_eq!(r.passed, 0, "no bad canary ever passes: {r:?}");
        assert!(
            r.median.is_some_and(|m| m <= 10.0),
            "median time to rollback within 10 s: {r:?}"
        );
    }
    // At 3 candidate requests/s a step pause is too little evidence to promote on: the step
    // holds, and a badly broken candidate is still rolled back.
    let thin = |candidate| Scenario {
        rps: 30,
        ..Scenario::contract(stable, candidate)
    };
    let r = trials(&thin(stable), 30, 1);
    assert_eq!((r.rolled_back, r.passed_in_pause), (0, 0), "{r:?}");
    let r = trials(
        &thin(Behaviour {
            error_rate: 0.302,
            ..stable
        }),
        30,
        1,
    );
    assert_eq!((r.rolled_back, r.passed), (r.trials, 0), "{r:?}");
    assert!(r.max.is_some_and(|t| t <= STEP_PAUSE), "{r:?}");
    assert_eq!(
        judge(&spec(true), &window(1, 0, 1, 1), None).candidate.p99,
        Some(Duration::from_millis(1))
    );
}

/// The example: two failing error checks used to repeat the candidate's error rate.
#[test]
fn each_number_once_in_a_reason() {
    let j = judge(
        &spec(true),
        &window(120, 32, 10, 30),
        Some(&window(1000, 2, 10, 30)),
    );
    assert_eq!(j.verdict, Verdict::Fail, "{j:#?}");
    assert_eq!(
        j.reason,
        "candidate error rate 26.7% (32/120) > max 1.0%, and vs stable 0.2% (2/1000) over the 1.0pp margin"
    );
    // With a latency failure too, the error numbers still appear once.
    let j = judge(
        &spec(true),
        &window(500, 100, 40, 200),
        Some(&window(4500, 9, 10, 50)),
    );
    assert_eq!(j.verdict, Verdict::Fail, "{j:#?}");
    for number in ["20.0%", "(100/500)", "0.2%", "(9/4500)", "1.0pp"] {
        assert_eq!(
            j.reason.matches(number).count(),
            1,
            "{number} in {}",
            j.reason
        );
    }
    assert!(
        j.reason.contains("; candidate latency p50/p99"),
        "{}",
        j.reason
    );
}

#[test]
fn no_verdict_below_min_requests() {
    for (min, n, errors) in [(50, 49, 49), (50, 0, 0), (1000, 999, 500), (1, 0, 0)] {
        let s = AnalysisSpec {
            min_requests: min,
            ..spec(true)
        };
        let j = judge(
            &s,
            &window(n, errors, 10, 900),
            Some(&window(9000, 0, 1, 2)),
        );
        assert_eq!(j.verdict, Verdict::Inconclusive, "{min} {n}: {j:#?}");
        assert!(j.checks.is_empty());
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// Values computed independently (Python, the same mixing weights and formulas).
#[test]
fn sequential_known_values() {
    let cases: [(&str, f64, f64); 6] = [
        (
            "above 4/80 vs 1%",
            log_evidence_above(4, 80, 0.01),
            3.035580586513182,
        ),
        (
            "above 0/100 vs 1%",
            log_evidence_above(0, 100, 0.01),
            -2.60672390018971,
        ),
        (
            "below 0/400 vs 1%",
            log_evidence_below(0, 400, 0.01),
            3.3326607817798157,
        ),
        (
            "below 3/1000 vs 1%",
            log_evidence_below(3, 1000, 0.01),
            2.706133668337347,
        ),
        (
            "normal mixture",
            log_normal_mixture(0.04, 1e-4, 0.03),
            6.048707453502977,
        ),
        ("no data, no evidence", log_evidence_above(0, 0, 0.01), 0.0),
    ];
    for (name, got, want) in cases {
        assert!(close(got, want), "{name}: {got} != {want}");
    }
    // 20 is 1/ALPHA_THRESHOLD: 4 errors in 80 requests fail a 1% limit, 3 do not.
    assert!(rejects(log_evidence_above(4, 80, 0.01), ALPHA_THRESHOLD));
    assert!(!rejects(log_evidence_above(3, 80, 0.01), ALPHA_THRESHOLD));
    assert!(close(always_valid_p(20f64.ln()), 0.05));
    assert_eq!(always_valid_p(-3.0), 1.0);
    // The evidence of "below" is exactly what the confidence sequence inverts.
    for (k, n) in [(0, 400), (0, 300), (3, 1000), (5, 1000), (1, 700)] {
        assert_eq!(
            upper_bound(k, n, ALPHA_PASS) <= 0.01,
            rejects(log_evidence_below(k, n, 0.01), ALPHA_PASS),
            "{k}/{n}"
        );
    }
}

#[test]
fn sequential_monotonicity() {
    for (p0, n) in [(0.01, 80), (0.01, 1000), (0.001, 5000), (0.2, 50)] {
        for k in 0..n / 4 {
            let (a, b) = (
                log_evidence_above(k, n, p0),
                log_evidence_above(k + 1, n, p0),
            );
            assert!(b > a, "above rises with errors: {k}/{n} vs {p0}");
            assert!(
                log_evidence_above(k, n + 1, p0) < a,
                "above falls with clean requests"
            );
            assert!(
                log_evidence_above(k, n, p0 * 1.1) < a,
                "above falls as the limit rises"
            );
            let c = log_evidence_below(k, n, p0);
            assert!(
                log_evidence_below(k + 1, n, p0) <= c,
                "below falls with errors"
            );
            assert!(
                log_evidence_below(k, n + 1, p0) >= c,
                "below rises with clean requests"
            );
            assert!(
                log_evidence_below(k, n, p0 * 1.1) >= c,
                "below rises with the limit"
            );
            let u = upper_bound(k, n, 0.05);
            assert!(u >= k as f64 / n as f64 && u <= 1.0, "{k}/{n}: {u}");
            assert!(upper_bound(k, n + 10, 0.05) <= u, "bound tightens");
            assert!(upper_bound(k + 1, n, 0.05) >= u, "bound rises with errors");
            assert!(upper_bound(k, n, 0.01) >= u, "more confidence, wider");
        }
    }
    for (excess, var) in [(0.01, 1e-4), (0.05, 1e-3), (0.2, 1e-2)] {
        let l = log_normal_mixture(excess, var, 0.03);
        assert!(log_normal_mixture(excess * 1.5, var, 0.03) > l);
        assert!(log_normal_mixture(excess, var / 2.0, 0.03) > l);
    }
}

/// Ville's inequality in practice: a rate exactly at its limit, looked at after *every*
/// request for 2,000 requests, crosses 1/α in at most an α share of streams.
#[test]
fn sequential_tests_hold_their_level_under_continuous_monitoring() {
    let mut rng = StdRng::seed_from_u64(7);
    let (paths, len, p0) = (400, 2000u64, 0.01);
    let (mut above, mut below) = (0, 0);
    for _ in 0..paths {
        let (mut k, mut hit_above, mut hit_below) = (0, false, false);
        for n in 1..=len {
            if rng.random::<f64>() < p0 {
                k += 1;
            }
            hit_above |= rejects(log_evidence_above(k, n, p0), ALPHA_THRESHOLD);
            hit_below |= rejects(log_evidence_below(k, n, p0), ALPHA_PASS);
        }
        above += u32::from(hit_above);
        below += u32::from(hit_below);
    }
    let share = |x: u32| f64::from(x) / f64::from(paths);
    assert!(share(above) <= ALPHA_THRESHOLD, "above: {above}/{paths}");
    assert!(share(below) <= ALPHA_PASS, "below: {below}/{paths}");
}

/// Grows `w` by `n` requests erring at `rate`, latencies 10–30 ms. The errors are drawn by
/// their geometric gaps, one random number per error rather than per request, and the latencies
/// are one prepared histogram, to keep the test fast.
fn grow(w: &mut WindowStats, rng: &mut StdRng, n: u64, rate: f64, latency: &LatencyDist) {
    let mut errors = 0;
    if rate > 0.0 {
        let mut at = 0.0;
        loop {
            let u = rng.random::<f64>().max(f64::MIN_POSITIVE);
            at += (u.ln() / (-rate).ln_1p()).floor() + 1.0;
            if at > n as f64 {
                break;
            }
            errors += 1;
        }
    }
    w.requests += n;
    w.errors += errors;
    w.latency.merge(latency);
}

/// The controller's worst case for a healthy version: no Pass, so one window judged again and
/// again as it grows. 100 looks, 40 requests apart, 300 seeded versions each.
#[test]
fn healthy_version_judged_100_times_stays_below_the_bound() {
    // (candidate rate, stable rate, compare, largest share of versions with any Fail)
    let cases = [
        // Exactly at the 1% limit: the worst case, bounded by the test's level.
        (0.01, 0.01, false, ALPHA_THRESHOLD),
        // Healthy ones below it rarely fail even once (an exact computation of the threshold
        // test alone gives 0.01%, 0.2% and 0.6% for these rates over these looks).
        (0.002, 0.0, true, 0.005),
        (0.005, 0.005, true, 0.005),
        (0.007, 0.005, true, 0.015),
    ];
    let (c_lat, s_lat) = (
        window(40, 0, 10, 30).latency,
        window(360, 0, 10, 30).latency,
    );
    for (rate, stable_rate, compare, bound) in cases {
        let mut rng = StdRng::seed_from_u64(11);
        let mut failed = 0;
        for _ in 0..300 {
            let (mut cw, mut sw) = (WindowStats::default(), WindowStats::default());
            let mut any = false;
            for _ in 0..100 {
                grow(&mut cw, &mut rng, 40, rate, &c_lat);
                grow(&mut sw, &mut rng, 360, stable_rate, &s_lat);
                any |= judge(&spec(compare), &cw, Some(&sw)).verdict == Verdict::Fail;
            }
            failed += u32::from(any);
        }
        assert!(
            f64::from(failed) / 300.0 <= bound,
            "{rate} vs {stable_rate}: {failed}/300 failed at least once"
        );
    }
}
