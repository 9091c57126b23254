//! Decision quality of the judge: `cargo run --release -p cutover-analysis --example simulate`.
//!
//! 200 rps, canary at 10%, CONTRACT's analysis defaults (interval 2s, min_requests 50, max 1%
//! errors, max p99 500ms, failure_limit 2, compare_to_stable). 200 seeded trials per row.

use cutover_analysis::sim::{Behaviour, Scenario, trials};

fn main() {
    const TRIALS: u32 = 200;
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>8}",
        "scenario (200 trials each)", "rollbacks", "median", "p95", "max"
    );
    for base in [0.0, 0.002, 0.005] {
        let stable = Behaviour {
            error_rate: base,
            median_ms: 20.0,
        };
        let rows = [
            (
                format!("healthy canary, stable errors {:.1}%", base * 100.0),
                stable,
            ),
            (
                format!("bad canary +5pp errors, stable {:.1}%", base * 100.0),
                Behaviour {
                    error_rate: base + 0.05,
                    ..stable
                },
            ),
            (
                format!("bad canary 2x latency, stable {:.1}%", base * 100.0),
                Behaviour {
                    median_ms: 40.0,
                    ..stable
                },
            ),
        ];
        for (name, candidate) in rows {
            let r = trials(&Scenario::contract(stable, candidate), TRIALS, 1);
            let s = |x: Option<f64>| x.map(|v| format!("{v:.0}s")).unwrap_or_else(|| "-".into());
            println!(
                "{name:<44} {:>8.1}% {:>8} {:>8} {:>8}",
                100.0 * f64::from(r.rolled_back) / f64::from(r.trials),
                s(r.median),
                s(r.p95),
                s(r.max)
            );
        }
    }
}
