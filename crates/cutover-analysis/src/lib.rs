//! cutover-analysis: the judge. From one analysis window of candidate (and stable) requests it
//! decides Pass, Fail or Inconclusive, with a reason that carries the numbers.
//!
//! Pure: the same windows give the same verdict; no IO, no clock, no randomness (the seeded
//! simulation in [`sim`] draws its own streams and only calls [`judge`]).
//!
//! The controller calls the judge every `interval` on the cumulative window since the last
//! Pass, so one window is looked at many times as it grows. Every check is therefore a
//! *sequential*, anytime-valid test ([`sequential`]): its chance of ever failing a version
//! that meets its limit is bounded however many looks there are, where the fixed-sample tests
//! this replaces were repeated every 2 s and accumulated false alarms. The verdicts mean:
//! - **Fail**: evidence that the candidate is bad (any check failed);
//! - **Pass**: evidence that it is fine: the error rate's anytime-valid upper bound (and the
//!   slow-request share's, for p99) is within the limit, and nothing failed;
//! - **Inconclusive**: not enough evidence yet; the window keeps growing.
//!
//! The checks:
//! - **error rate**: fails when the mixture SPRT of "rate above `max_error_rate`" reaches
//!   `1/`[`ALPHA_THRESHOLD`]; passes when the 1−[`ALPHA_PASS`] confidence sequence's upper
//!   bound is within `max_error_rate`. Exact on the binomial counts.
//! - **p99**: the same two tests on the share of candidate requests slower than `max_p99`,
//!   against 1% (p99 within `max_p99` means at most 1% of requests are slower).
//! - **errors vs stable**: the normal-mixture mSPRT on the difference of the two error rates,
//!   one-sided beyond [`ERROR_MARGIN`], at [`ALPHA_COMPARE`]. When `max_error_rate` is set it
//!   can only fail (the threshold's bound gives the positive evidence); without it, it passes
//!   only on evidence that the candidate is within the margin.
//! - **latency vs stable**: Kayenta's approach made sequential: the Mann-Whitney U effect size
//!   (probability of superiority, over the HDR buckets, ties averaged) under the same normal
//!   mixture at [`ALPHA_COMPARE`], plus floors: the candidate must be slower in at least
//!   [`MIN_LATENCY_EFFECT`] of pairs, and its p95 slower than stable's by at least
//!   [`MIN_LATENCY_DELTA`] and [`MIN_LATENCY_RATIO`], so a tiny but "significant" shift is not
//!   a failure. It can only fail.
//! - Below `min_requests` candidate requests there is no verdict at all.
//!
//! Why these levels. One false Fail blocks a step until the next Pass and `failure_limit` (default
//! 2) of them roll back, so [`ALPHA_THRESHOLD`] bounds the chance that a version *at* its limit is
//! ever failed in a window, however many looks; versions below it are failed far less often (an
//! exact computation for 100 looks 40 requests apart: 0.6% of versions at 0.7% against a 1% limit,
//! 0.2% at 0.5%). 5% rather than 1% because it is what buys speed: at 20 candidate rps it fails a
//! +5-point error canary on 4 errors in its first 80 requests, as the old per-look 1% binomial test
//! did, where a 1% mixture needs 5. It cannot be much faster: to roll such a canary back within 8 s
//! in 95% of cases (two failed looks out of those at 80, 120 and 160 requests), *any* threshold on
//! the error count at each look (exhaustive search, exact binomial) also rolls back at least 7% of
//! canaries sitting exactly at a 1% limit within those 8 s. The comparisons rest on a normal
//! approximation, so they run at the stricter 1%. A Pass is promotion, so it needs a 95% confidence
//! sequence. Its price is honest: with no errors at all it takes 363 candidate requests to show a
//! rate is below 1% whatever the number of looks (669 with one error), and a version at half its
//! limit typically needs thousands, so at low traffic a step holds instead of advancing on thin
//! evidence.

pub mod sequential;
pub mod sim;

use std::time::Duration;

use cutover_core::{AnalysisSpec, WindowStats};

use crate::sequential::{
    always_valid_p, log_evidence_above, log_evidence_below, log_normal_mixture, rejects,
    upper_bound,
};

/// Level of the tests that fail a candidate over an absolute limit (error rate, p99): the
/// chance that a version exactly at its limit is ever failed in a window, over all looks.
pub const ALPHA_THRESHOLD: f64 = 0.05;
/// Level of the comparisons with stable (error rates, latency). Stricter than the thresholds
/// because their statistics are normal approximations, loose on a handful of errors.
pub const ALPHA_COMPARE: f64 = 0.01;
/// A Pass needs the candidate's rates inside their limits with confidence `1 − ALPHA_PASS`,
/// valid at every look at once (a confidence sequence).
pub const ALPHA_PASS: f64 = 0.05;
/// Extra error rate tolerated over stable before the comparison can fail (1 percentage point).
pub const ERROR_MARGIN: f64 = 0.01;
/// Scale of the normal mixture on the difference of error rates beyond the margin: the
/// differences worth catching range from a few points to tens of points.
pub const TAU_ERROR: f64 = 0.05;
/// Scale of the normal mixture on the Mann-Whitney effect size (probability of superiority
/// minus ½): regressions that matter start at [`MIN_LATENCY_EFFECT`], 0.1 above no difference.
pub const TAU_LATENCY: f64 = 0.1;
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

/// One-sided sequential Mann-Whitney U: `(always-valid p-value that the candidate is slower,
/// probability of superiority)`. Works on the (value, count) buckets, so every request in a
/// bucket is a tie.
///
/// The effect size `U/(n₁n₂)` is asymptotically normal around ½ when nothing changed, with the
/// tie-corrected variance of U scaled by `(n₁n₂)²`; the p-value is `1/Λ` of the normal mixture
/// ([`TAU_LATENCY`]) on it, so it stays valid when the growing window is looked at again.
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
    let var_u = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    let effect = u / (n1 * n2);
    if var_u <= 0.0 || effect <= 0.5 {
        return Some((1.0, effect));
    }
    let var = var_u / (n1 * n2).powi(2);
    Some((
        always_valid_p(log_normal_mixture(effect - 0.5, var, TAU_LATENCY)),
        effect,
    ))
}

/// A bound next to a limit needs a second decimal: 0.96% printed as "1.0%" would read as over.
fn pct2(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// Agresti-Caffo variance of an error rate: one error and one success added, so a group with
/// no errors yet does not claim to know its rate exactly.
fn smoothed_var(k: u64, n: u64) -> f64 {
    let p = (k as f64 + 1.0) / (n as f64 + 2.0);
    p * (1.0 - p) / (n as f64 + 2.0)
}

/// Judges one window of the candidate, against stable's window when given.
pub fn judge(
    spec: &AnalysisSpec,
    candidate: &WindowStats,
    stable: Option<&WindowStats>,
) -> Judgement {
    use Verdict::{Fail, Inconclusive, Pass};
    let cs = Summary::of(candidate);
    let ss = stable.map(Summary::of);
    if candidate.requests < spec.min_requests {
        return Judgement {
            verdict: Inconclusive,
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
    let rate = format!("candidate error rate {} ({k}/{n})", pct(cs.error_rate));
    let confidence = format!("{:.0}%", (1.0 - ALPHA_PASS) * 100.0);
    let mut checks = Vec::new();
    // The failing clauses of the two error checks are kept apart from their details so that a
    // reason naming both says the candidate's error rate once.
    let (mut over_max, mut over_stable) = (None, None);

    if let Some(max) = spec.max_error_rate {
        let (verdict, detail) = if rejects(log_evidence_above(k, n, max), ALPHA_THRESHOLD) {
            let clause = format!("> max {}", pct(max));
            let detail = format!("{rate} {clause}");
            over_max = Some(clause);
            (Fail, detail)
        } else if rejects(log_evidence_below(k, n, max), ALPHA_PASS) {
            (
                Pass,
                format!(
                    "{rate}, at most {} with {confidence} confidence, within max {}",
                    pct2(upper_bound(k, n, ALPHA_PASS)),
                    pct(max)
                ),
            )
        } else {
            (
                Inconclusive,
                format!(
                    "{rate} not yet clearly within max {} ({confidence} bound {})",
                    pct(max),
                    pct2(upper_bound(k, n, ALPHA_PASS))
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
        // p99 within max_p99 means at most 1% of requests slower than it: a rate like errors.
        let slow = slower_than(candidate, max);
        let (p99, max) = (ms(cs.p99), ms(Some(max)));
        let (verdict, detail) = if rejects(log_evidence_above(slow, n, P99_SHARE), ALPHA_THRESHOLD)
        {
            (
                Fail,
                format!("candidate p99 {p99} > max {max} ({slow}/{n} requests slower)"),
            )
        } else if rejects(log_evidence_below(slow, n, P99_SHARE), ALPHA_PASS) {
            (Pass, format!("candidate p99 {p99} within max {max}"))
        } else {
            (
                Inconclusive,
                format!(
                    "candidate p99 {p99} not yet clearly within max {max} ({slow}/{n} requests slower)"
                ),
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
        let (ks, ns) = (st.errors, st.requests);
        let ps = ks as f64 / ns as f64;
        let diff = cs.error_rate - ps;
        let var = smoothed_var(k, n) + smoothed_var(ks, ns);
        let vs = format!("vs stable {} ({ks}/{ns})", pct(ps));
        let margin = format!("{:.1}pp margin", ERROR_MARGIN * 100.0);
        let (verdict, detail) = if diff > ERROR_MARGIN
            && rejects(
                log_normal_mixture(diff - ERROR_MARGIN, var, TAU_ERROR),
                ALPHA_COMPARE,
            ) {
            let clause = format!("{vs} over the {margin}");
            let detail = format!("{rate} {clause}");
            over_stable = Some(clause);
            (Fail, detail)
        } else if spec.max_error_rate.is_some() {
            // The threshold's confidence bound is the positive evidence; this check only vetoes.
            (Pass, format!("{rate} {vs}, not over the {margin}"))
        } else if diff < ERROR_MARGIN
            && rejects(
                log_normal_mixture(ERROR_MARGIN - diff, var, TAU_ERROR),
                ALPHA_COMPARE,
            )
        {
            (Pass, format!("{rate} {vs}, within the {margin}"))
        } else {
            (
                Inconclusive,
                format!("{rate} {vs}, not yet clearly within the {margin}"),
            )
        };
        checks.push(Check {
            name: "error-rate-vs-stable",
            verdict,
            detail,
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
            let verdict = if p <= ALPHA_COMPARE && effect >= MIN_LATENCY_EFFECT && material {
                Fail
            } else {
                Pass
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

    let (verdict, reason) = if checks.iter().any(|c| c.verdict == Fail) {
        let mut parts = Vec::new();
        match (&over_max, &over_stable) {
            (Some(m), Some(v)) => parts.push(format!("{rate} {m}, and {v}")),
            (Some(m), None) => parts.push(format!(
                "{rate} {m}{}",
                ss.as_ref()
                    .map(|s| format!("; stable {}", pct(s.error_rate)))
                    .unwrap_or_default()
            )),
            (None, Some(v)) => parts.push(format!("{rate} {v}")),
            (None, None) => {}
        }
        parts.extend(
            checks
                .iter()
                .filter(|c| c.verdict == Fail && !c.name.starts_with("error-rate"))
                .map(|c| c.detail.clone()),
        );
        (Fail, parts.join("; "))
    } else if let Some(c) = checks.iter().find(|c| c.verdict == Inconclusive) {
        (Inconclusive, c.detail.clone())
    } else {
        let bound = spec
            .max_error_rate
            .map(|_| {
                format!(
                    ", at most {} with {confidence} confidence",
                    pct2(upper_bound(k, n, ALPHA_PASS))
                )
            })
            .unwrap_or_default();
        (
            Pass,
            format!(
                "candidate {} errors ({k}/{n}){bound}, p99 {}{}",
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
