//! cutover-analysis: the judge. From one analysis window of candidate (and stable) requests it
//! decides Pass, Fail or Inconclusive, with a reason that carries the numbers.
//!
//! Pure: the same windows give the same verdict; no IO, no clock, no randomness (the seeded
//! simulation in [`sim`] draws its own streams and only calls [`judge`]).
//!
//! Every check is statistical, because thresholds on small samples roll back healthy versions
//! on noise (one error in 80 requests is 1.25%, "above" a 1% limit):
//! - **error rate** fails only when a one-sided exact binomial test says the candidate's rate is
//!   above `max_error_rate` with p < [`ALPHA_THRESHOLD`];
//! - **p99** fails only when significantly more than 1% of candidate requests are slower than
//!   `max_p99` (same test on the count of slow requests);
//! - **errors vs stable** fails when the candidate's rate exceeds stable's by more than
//!   [`ERROR_MARGIN`] and a one-sided two-proportion z-test on that margin has p < [`ALPHA_COMPARE`];
//! - **latency vs stable** is Kayenta's approach: a one-sided Mann-Whitney U test (normal
//!   approximation with tie correction, over the HDR buckets) with p < [`ALPHA_COMPARE`], and an
//!   effect-size floor: the probability that a candidate request is slower than a stable one
//!   must be at least [`MIN_LATENCY_EFFECT`], and the candidate's p95 must be slower than
//!   stable's by at least [`MIN_LATENCY_DELTA`] and [`MIN_LATENCY_RATIO`], so a tiny but
//!   "significant" shift is not a failure.
//!
//! A window passes only when nothing failed and the evidence is good, not merely absent: the
//! candidate's 95% upper bound on its error rate is within `max_error_rate`. Otherwise it is
//! inconclusive, and the controller lets the window grow.

pub mod sim;

use std::fmt::Write;
use std::time::Duration;

use cutover_core::{AnalysisSpec, WindowStats};
use statrs::distribution::{Beta, Binomial, ContinuousCDF, DiscreteCDF, Normal};

/// Significance for the absolute thresholds. The candidate must be clearly over the user's own
/// limit; healthy versions far below it practically never trip this.
pub const ALPHA_THRESHOLD: f64 = 0.01;
/// Significance for comparisons with stable, stricter because two healthy versions are exactly
/// the case where noise alone would make a difference.
pub const ALPHA_COMPARE: f64 = 0.001;
/// Extra error rate tolerated over stable before the comparison can fail (1 percentage point).
pub const ERROR_MARGIN: f64 = 0.01;
/// Smallest probability of superiority (candidate slower than stable) that counts as a
/// latency regression: 0.5 is no difference; a uniform 2× slowdown of a typical service is ~0.8.
pub const MIN_LATENCY_EFFECT: f64 = 0.6;
/// A latency regression must also matter to a person: the candidate's p95 must exceed stable's
/// by at least this much and by [`MIN_LATENCY_RATIO`]. Without it a fresh instance on loopback,
/// 0.05 ms slower on cold connections, is a "significant" regression.
pub const MIN_LATENCY_DELTA: Duration = Duration::from_millis(2);
pub const MIN_LATENCY_RATIO: f64 = 1.2;
/// The p99 threshold tolerates this share of requests above `max_p99`.
const P99_SHARE: f64 = 0.01;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// One version's numbers in a window.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50: Option<Duration>,
    pub p95: Option<Duration>,
    pub p99: Option<Duration>,
}

impl Summary {
    pub fn of(w: &WindowStats) -> Summary {
        Summary {
            requests: w.requests,
            errors: w.errors,
            error_rate: w.error_rate().unwrap_or(0.0),
            p50: w.latency.quantile(0.5),
            p95: w.latency.quantile(0.95),
            p99: w.latency.quantile(0.99),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// `error-rate`, `p99`, `error-rate-vs-stable` or `latency-vs-stable`.
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    /// One sentence with the numbers, e.g. `candidate error rate 7.9% (41/519) > max 1.0%; stable 0.2%`.
    pub reason: String,
    pub candidate: Summary,
    pub stable: Option<Summary>,
    pub checks: Vec<Check>,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn ms(d: Option<Duration>) -> String {
    // Whole milliseconds hide everything on a fast service; keep one decimal below 10 ms.
    d.map(|d| match d.as_secs_f64() * 1000.0 {
        m if m < 10.0 => format!("{m:.1}ms"),
        m => format!("{m:.0}ms"),
    })
    .unwrap_or_else(|| "-".into())
}

/// P(X ≥ k) for X ~ Binomial(n, p).
fn binomial_tail(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    match Binomial::new(p.clamp(0.0, 1.0), n) {
        Ok(b) => (1.0 - b.cdf(k - 1)).max(0.0),
        Err(_) => 1.0,
    }
}

/// Clopper-Pearson upper bound of a proportion at `confidence`.
fn upper_bound(k: u64, n: u64, confidence: f64) -> f64 {
    if n == 0 || k >= n {
        return 1.0;
    }
    Beta::new(k as f64 + 1.0, (n - k) as f64)
        .map(|b| b.inverse_cdf(confidence))
        .unwrap_or(1.0)
}

fn normal_sf(z: f64) -> f64 {
    Normal::new(0.0, 1.0).map(|n| 1.0 - n.cdf(z)).unwrap_or(1.0)
}

/// Requests in the window slower than `limit`.
fn slower_than(w: &WindowStats, limit: Duration) -> u64 {
    let us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
    w.latency
        .buckets()
        .iter()
        .filter(|(v, _)| *v > us)
        .map(|(_, n)| n)
        .sum()
}

/// One-sided Mann-Whitney U: `(p-value that candidate is slower, probability of superiority)`.
/// Works on the (value, count) buckets, so every request in a bucket is a tie.
pub fn mann_whitney(candidate: &WindowStats, stable: &WindowStats) -> Option<(f64, f64)> {
    let (n1, n2) = (
        candidate.latency.count() as f64,
        stable.latency.count() as f64,
    );
    if n1 == 0.0 || n2 == 0.0 {
        return None;
    }
    // Merge the two bucket lists in value order; ranks of ties are averaged.
    let (a, b) = (candidate.latency.buckets(), stable.latency.buckets());
    let (mut i, mut j) = (0, 0);
    let (mut rank_sum_c, mut next_rank, mut tie_term) = (0.0f64, 1.0f64, 0.0f64);
    while i < a.len() || j < b.len() {
        let v = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.0.min(y.0),
            (Some(x), None) => x.0,
            (None, Some(y)) => y.0,
            (None, None) => break,
        };
        let ca = if a.get(i).is_some_and(|x| x.0 == v) {
            i += 1;
            a[i - 1].1 as f64
        } else {
            0.0
        };
        let cb = if b.get(j).is_some_and(|y| y.0 == v) {
            j += 1;
            b[j - 1].1 as f64
        } else {
            0.0
        };
        let t = ca + cb;
        let avg = next_rank + (t - 1.0) / 2.0;
        rank_sum_c += ca * avg;
        next_rank += t;
        tie_term += t * t * t - t;
    }
    let u = rank_sum_c - n1 * (n1 + 1.0) / 2.0;
    let n = n1 + n2;
    let mean = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    let effect = u / (n1 * n2);
    if var <= 0.0 {
        return Some((1.0, effect));
    }
    // Continuity correction towards the null.
    let z = (u - mean - 0.5) / var.sqrt();
    Some((normal_sf(z), effect))
}

/// Judges one window of the candidate, against stable's window when given.
pub fn judge(
    spec: &AnalysisSpec,
    candidate: &WindowStats,
    stable: Option<&WindowStats>,
) -> Judgement {
    let cs = Summary::of(candidate);
    let ss = stable.map(Summary::of);
    let stable_note = ss
        .as_ref()
        .map(|s| format!("; stable {}", pct(s.error_rate)))
        .unwrap_or_default();
    if candidate.requests < spec.min_requests {
        return Judgement {
            verdict: Verdict::Inconclusive,
            reason: format!(
                "{} candidate requests so far, fewer than min_requests {}; waiting for more",
                candidate.requests, spec.min_requests
            ),
            candidate: cs,
            stable: ss,
            checks: Vec::new(),
        };
    }
    let (n, k) = (candidate.requests, candidate.errors);
    let mut checks = Vec::new();

    if let Some(max) = spec.max_error_rate {
        let p = binomial_tail(k, n, max);
        let rate = cs.error_rate;
        let (verdict, detail) = if rate > max && p < ALPHA_THRESHOLD {
            (
                Verdict::Fail,
                format!(
                    "candidate error rate {} ({k}/{n}) > max {}{stable_note}",
                    pct(rate),
                    pct(max)
                ),
            )
        } else if upper_bound(k, n, 0.95) <= max {
            (
                Verdict::Pass,
                format!(
                    "candidate error rate {} ({k}/{n}) within max {}",
                    pct(rate),
                    pct(max)
                ),
            )
        } else {
            (
                Verdict::Inconclusive,
                format!(
                    "candidate error rate {} ({k}/{n}) not yet clearly within max {}",
                    pct(rate),
                    pct(max)
                ),
            )
        };
        checks.push(Check {
            name: "error-rate",
            verdict,
            detail,
        });
    }

    if let Some(max) = spec.max_p99 {
        let slow = slower_than(candidate, max);
        let p = binomial_tail(slow, n, P99_SHARE);
        let share = slow as f64 / n as f64;
        let (verdict, detail) = if share > P99_SHARE && p < ALPHA_THRESHOLD {
            (
                Verdict::Fail,
                format!(
                    "candidate p99 {} > max {} ({slow}/{n} requests slower)",
                    ms(cs.p99),
                    ms(Some(max))
                ),
            )
        } else {
            (
                Verdict::Pass,
                format!("candidate p99 {} within max {}", ms(cs.p99), ms(Some(max))),
            )
        };
        checks.push(Check {
            name: "p99",
            verdict,
            detail,
        });
    }

    if spec.compare_to_stable
        && let Some(st) = stable.filter(|s| s.requests > 0)
    {
        let (pc, ps) = (cs.error_rate, st.errors as f64 / st.requests as f64);
        let se = (pc * (1.0 - pc) / n as f64 + ps * (1.0 - ps) / st.requests as f64).sqrt();
        let z = if se > 0.0 {
            (pc - ps - ERROR_MARGIN) / se
        } else {
            f64::NEG_INFINITY
        };
        let verdict = if pc - ps > ERROR_MARGIN && normal_sf(z) < ALPHA_COMPARE {
            Verdict::Fail
        } else {
            Verdict::Pass
        };
        checks.push(Check {
            name: "error-rate-vs-stable",
            verdict,
            detail: format!(
                "candidate error rate {} ({k}/{n}) vs stable {} ({}/{})",
                pct(pc),
                pct(ps),
                st.errors,
                st.requests
            ),
        });
        if let Some((p, effect)) = mann_whitney(candidate, st) {
            let ss = Summary::of(st);
            let material = match (cs.p95, ss.p95) {
                (Some(c), Some(s)) => {
                    c >= s + MIN_LATENCY_DELTA
                        && c.as_secs_f64() >= s.as_secs_f64() * MIN_LATENCY_RATIO
                }
                _ => false,
            };
            let verdict = if p < ALPHA_COMPARE && effect >= MIN_LATENCY_EFFECT && material {
                Verdict::Fail
            } else {
                Verdict::Pass
            };
            checks.push(Check {
                name: "latency-vs-stable",
                verdict,
                detail: format!(
                    "candidate latency p50/p99 {}/{} vs stable {}/{} (slower in {:.0}% of pairs, p={p:.2e})",
                    ms(cs.p50),
                    ms(cs.p99),
                    ms(ss.p50),
                    ms(ss.p99),
                    effect * 100.0
                ),
            });
        }
    }

    let failed: Vec<&Check> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .collect();
    let (verdict, reason) = if !failed.is_empty() {
        let mut r = String::new();
        for (i, c) in failed.iter().enumerate() {
            let _ = write!(r, "{}{}", if i > 0 { "; " } else { "" }, c.detail);
        }
        (Verdict::Fail, r)
    } else if checks.iter().any(|c| c.verdict == Verdict::Inconclusive) {
        let c = checks
            .iter()
            .find(|c| c.verdict == Verdict::Inconclusive)
            .map(|c| c.detail.clone())
            .unwrap_or_default();
        (Verdict::Inconclusive, c)
    } else {
        (
            Verdict::Pass,
            format!(
                "candidate {} errors ({k}/{n}), p99 {}{}",
                pct(cs.error_rate),
                ms(cs.p99),
                ss.as_ref()
                    .map(|s| format!("; stable {} errors, p99 {}", pct(s.error_rate), ms(s.p99)))
                    .unwrap_or_default()
            ),
        )
    };
    Judgement {
        verdict,
        reason,
        candidate: cs,
        stable: ss,
        checks,
    }
}

#[cfg(test)]
mod tests;
