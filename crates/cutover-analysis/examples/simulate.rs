//! Decision quality of the judge: `cargo run --release -p cutover-analysis --example simulate`.
//!
//! 200 rps, canary at 10% (20 candidate rps), the documented analysis defaults (interval 2s,
//! min_requests 50, max 1% errors, max p99 500ms, failure_limit 2, compare_to_stable), 60 s per
//! trial, 200 seeded trials per row. The last rows have 30 rps (3 candidate rps), where 20 s
//! of traffic is too little evidence to promote on.
//!
//! Columns: share of trials rolled back and when (median, p95, max seconds); share of trials
//! the judge passed at all and within the 20 s step pause (a step may only advance after a
//! Pass), and when the first Pass came (median, p95).

use cutover_analysis::sim::{Behaviour, Report, Scenario, trials};

const TRIALS: u32 = 200;

fn secs(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.0}s")).unwrap_or_else(|| "-".into())
}

fn share(n: u32) -> String {
    format!("{:.1}%", 100.0 * f64::from(n) / f64::from(TRIALS))
}

fn row(name: &str, r: &Report) {
    println!(
        "{name:<46} {:>6} {:>5} {:>5} {:>5} | {:>6} {:>6} {:>5} {:>5}",
        share(r.rolled_back),
        secs(r.median),
        secs(r.p95),
        secs(r.max),
        share(r.passed),
        share(r.passed_in_pause),
        secs(r.first_pass.median),
        secs(r.first_pass.p95),
    );
}

fn main() {
    println!(
        "{:<46} {:>6} {:>5} {:>5} {:>5} | {:>6} {:>6} {:>5} {:>5}",
        "scenario (200 trials of 60 s)",
        "rolled",
        "med",
        "p95",
        "max",
        "passed",
        "≤20s",
        "1st",
        "p95"
    );
    for base in [0.0, 0.002, 0.005] {
        let stable = Behaviour {
            error_rate: base,
            median_ms: 20.0,
        };
        let b = base * 100.0;
        let rows = [
            (format!("healthy canary, stable errors {b:.1}%"), stable),
            (
                format!("healthy +0.2pp errors +5% latency, stable {b:.1}%"),
                Behaviour {
                    error_rate: base + 0.002,
                    median_ms: 21.0,
                },
            ),
            (
                format!("bad canary +5pp errors, stable {b:.1}%"),
                Behaviour {
                    error_rate: base + 0.05,
                    ..stable
                },
            ),
            (
                format!("bad canary 2x latency, stable {b:.1}%"),
                Behaviour {
                    median_ms: 40.0,
                    ..stable
                },
            ),
        ];
        for (name, candidate) in rows {
            row(
                &name,
                &trials(&Scenario::contract(stable, candidate), TRIALS, 1),
            );
        }
    }
    let stable = Behaviour {
        error_rate: 0.002,
        median_ms: 20.0,
    };
    let at_limit = Behaviour {
        error_rate: 0.01,
        ..stable
    };
    row(
        "canary at the limit (1.0% errors), stable 0.2%",
        &trials(&Scenario::contract(stable, at_limit), TRIALS, 1),
    );
    let thin = |candidate| Scenario {
        rps: 30,
        ..Scenario::contract(stable, candidate)
    };
    row(
        "3 cand. rps: healthy canary, stable 0.2%",
        &trials(&thin(stable), TRIALS, 1),
    );
    let bad = Behaviour {
        error_rate: 0.302,
        ..stable
    };
    row(
        "3 cand. rps: bad +30pp errors, stable 0.2%",
        &trials(&thin(bad), TRIALS, 1),
    );
}
