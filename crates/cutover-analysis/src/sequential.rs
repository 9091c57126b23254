//! Anytime-valid evidence: test statistics that may be looked at after every request, or every
//! interval on a growing window, without the repeated looks inflating the error rate.
//!
//! Each statistic is a *mixture likelihood ratio* (a mixture SPRT): under its null hypothesis
//! it is a nonnegative (super)martingale with expectation at most 1, so by Ville's inequality
//! the probability that it *ever* reaches `1/α`, however often and whenever it is looked at, is
//! at most `α`. A fixed-sample test repeated every interval has no such bound: its false
//! positives accumulate look after look. The functions return the natural logarithm of the
//! ratio ("log evidence"); `α`-level rejection is `log evidence ≥ ln(1/α)`, and
//! [`always_valid_p`] turns it into an always-valid p-value (Johari, Pekelis, Walsh, "Always
//! Valid Inference", 2017).
//!
//! **Rates against a limit** (the error rate against `max_error_rate`, the share of slow
//! requests against 1% for p99) are tested exactly on the binomial counts. The alternatives are
//! Bernoulli rates whose odds are a fixed multiple (an *odds ratio*) of the limit's odds, which
//! makes each likelihood ratio a closed form, `ψᵏ / (1 + p₀(ψ − 1))ⁿ` for `k` events in `n`
//! requests, and the mixture over a few odds ratios exact (a discrete mixing distribution, no
//! quadrature). Both directions are monotone in the limit `p₀`: evidence of "above" falls as
//! `p₀` rises and evidence of "below" rises with it, so a test at `p₀` also covers every null
//! rate beyond it (a composite null) and the "below" test inverts into a confidence sequence,
//! [`upper_bound`], valid at all times at once.
//!
//! **Differences with stable** (error rates with a margin, the Mann-Whitney effect size of
//! latencies) use the normal-mixture mSPRT of Johari et al. on an asymptotically normal
//! estimate: [`log_normal_mixture`]. It is approximate for small counts, which is why those
//! comparisons run at the stricter [`crate::ALPHA_COMPARE`] and why the error comparison uses
//! the Agresti-Caffo variance (one success and one failure added per group), which stays away
//! from zero when a group has no errors yet.

/// Mixing distribution for "the rate is above the limit": (odds ratio, weight). A broken
/// deploy typically fails several times more often than its limit, so most of the weight is
/// at odds ratios 3 to 8 (where one error per second at 20 rps is told from a 1% limit in
/// 4–6 s); the weight at 2 keeps the test consistent for a version only twice over its limit,
/// which is then caught later rather than never.
pub const ABOVE: [(f64, f64); 4] = [(2.0, 0.10), (3.0, 0.20), (5.0, 0.45), (8.0, 0.25)];

/// Mixing distribution for "the rate is below the limit": (odds ratio, weight). Odds ratio 0
/// is the alternative "no errors at all", the quickest to confirm for a clean version; 0.2 and
/// 0.45 cover versions at a fifth or half of their limit (a typical healthy service against a
/// typical limit), and a little weight at 0.7 keeps a version at 70% of its limit confirmable
/// eventually.
pub const BELOW: [(f64, f64); 4] = [(0.0, 0.30), (0.2, 0.35), (0.45, 0.25), (0.7, 0.10)];

/// `ln Σ wᵢ·exp(xᵢ)` without overflow; `-∞` for an empty or all-`-∞` mixture.
fn log_mixture(terms: &[(f64, f64)]) -> f64 {
    let top = terms
        .iter()
        .filter(|(w, _)| *w > 0.0)
        .map(|(_, x)| *x)
        .fold(f64::NEG_INFINITY, f64::max);
    if !top.is_finite() {
        return top;
    }
    let sum: f64 = terms
        .iter()
        .filter(|(w, _)| *w > 0.0)
        .map(|(w, x)| w * (x - top).exp())
        .sum();
    top + sum.ln()
}

/// ln of the likelihood ratio of `k` events in `n` trials at the rate with odds `psi` times
/// the odds of `p0`, against the rate `p0`.
fn log_odds_ratio_lr(psi: f64, k: u64, n: u64, p0: f64) -> f64 {
    let (k, n) = (k as f64, n as f64);
    if psi == 0.0 {
        // The alternative "rate 0": any event rules it out.
        return if k > 0.0 {
            f64::NEG_INFINITY
        } else {
            -n * (-p0).ln_1p()
        };
    }
    k * psi.ln() - n * (p0 * (psi - 1.0)).ln_1p()
}

fn log_evidence(grid: &[(f64, f64); 4], k: u64, n: u64, p0: f64) -> f64 {
    let p0 = p0.clamp(0.0, 1.0);
    let k = k.min(n);
    log_mixture(&grid.map(|(psi, w)| (w, log_odds_ratio_lr(psi, k, n, p0))))
}

/// Log evidence that a rate is above `p0`, from `k` events in `n` trials (null: rate ≤ `p0`).
pub fn log_evidence_above(k: u64, n: u64, p0: f64) -> f64 {
    log_evidence(&ABOVE, k, n, p0)
}

/// Log evidence that a rate is below `p0`, from `k` events in `n` trials (null: rate ≥ `p0`).
pub fn log_evidence_below(k: u64, n: u64, p0: f64) -> f64 {
    log_evidence(&BELOW, k, n, p0)
}

/// Upper end of the one-sided confidence sequence at level `1 − alpha`: the rate is below it
/// at every `n` at once with probability at least `1 − alpha`. It is the smallest `p0` whose
/// "below" test rejects, found by bisection (the evidence rises with `p0`); 1 when none does.
pub fn upper_bound(k: u64, n: u64, alpha: f64) -> f64 {
    let target = (1.0 / alpha).ln();
    if n == 0 || log_evidence_below(k, n, 1.0) < target {
        return 1.0;
    }
    // No alternative beats the observed rate itself, so the bound is never below it.
    let (mut lo, mut hi) = (k.min(n) as f64 / n as f64, 1.0);
    // 50 halvings of [0, 1] are far below the two decimals the bound is shown with.
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if log_evidence_below(k, n, mid) >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// ln of the normal-mixture likelihood ratio (mSPRT) for an estimate that is `excess` beyond
/// its null value with variance `var`, the effect mixed over N(0, `tau`²):
/// `√(V/(V+τ²)) · exp(τ²·excess² / (2V(V+τ²)))`. Callers use it one-sided (only when `excess`
/// is positive), which keeps the level: rejecting on one side is a subset of the two-sided
/// rejections.
pub fn log_normal_mixture(excess: f64, var: f64, tau: f64) -> f64 {
    let t2 = tau * tau;
    if var <= 0.0 {
        return if excess > 0.0 { f64::INFINITY } else { 0.0 };
    }
    0.5 * (var / (var + t2)).ln() + t2 * excess * excess / (2.0 * var * (var + t2))
}

/// The always-valid p-value of a log evidence: `min(1, 1/Λ)`.
pub fn always_valid_p(log_evidence: f64) -> f64 {
    (-log_evidence).exp().min(1.0)
}

/// Whether `log_evidence` rejects at level `alpha`.
pub fn rejects(log_evidence: f64, alpha: f64) -> bool {
    log_evidence >= (1.0 / alpha).ln()
}
