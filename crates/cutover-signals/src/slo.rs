//! SLOs, error budgets and the multi-window multi-burn-rate alerts of the SRE Workbook.
//!
//! A service's history is a list of per-minute [`Counts`] (requests, and how many were bad:
//! 5xx, or slower than the SLO's latency). Time is a minute index (`now` is the minute being
//! filled, included); a window of `n` minutes is the `n` minutes ending with `now`. Everything
//! is computed from these counts, so the same history always gives the same answer.
//!
//! The alert windows are the Workbook's, as Sloth ships them: page when the burn rate is above
//! its factor over 1h and 5m (2% of the budget in an hour) or over 6h and 30m (5% in six
//! hours); ticket over 1d and 2h (10% in a day) or 3d and 6h (10% in three days). The factor
//! is Sloth's `budget% × period / long window`, which gives the Workbook's 14.4, 6, 3 and 1 for
//! a 30-day SLO and scales with any other period (13.44 for 28 days).

use std::time::Duration;

use crate::{percent, short_duration};

const MIN: u64 = 60;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// The name of every SLO burn alert; `service`, `slo` and `severity` tell them apart.
pub const ALERT_NAME: &str = "ErrorBudgetBurn";

/// How urgent a burn is: a page wakes someone, a ticket waits for working hours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Page,
    Ticket,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Page => "page",
            Severity::Ticket => "ticket",
        }
    }
}

/// One pair of windows of a multi-window multi-burn-rate alert.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BurnWindow {
    pub severity: Severity,
    /// `page-quick`, `page-slow`, `ticket-quick`, `ticket-slow` (Sloth's names).
    pub name: &'static str,
    pub long: Duration,
    pub short: Duration,
    /// The share of the whole period's budget that burning at the factor for the long window
    /// consumes, in percent.
    pub budget_percent: f64,
}

impl BurnWindow {
    /// Sloth's burn-rate factor for an SLO over `period`: the speed that spends
    /// `budget_percent` of the budget within the long window.
    pub fn factor(&self, period: Duration) -> f64 {
        self.budget_percent / 100.0 * period.as_secs_f64() / self.long.as_secs_f64()
    }
}

/// The Workbook's recommended windows, in the order they are checked.
pub const BURN_WINDOWS: [BurnWindow; 4] = [
    BurnWindow {
        severity: Severity::Page,
        name: "page-quick",
        long: Duration::from_secs(HOUR),
        short: Duration::from_secs(5 * MIN),
        budget_percent: 2.0,
    },
    BurnWindow {
        severity: Severity::Page,
        name: "page-slow",
        long: Duration::from_secs(6 * HOUR),
        short: Duration::from_secs(30 * MIN),
        budget_percent: 5.0,
    },
    BurnWindow {
        severity: Severity::Ticket,
        name: "ticket-quick",
        long: Duration::from_secs(DAY),
        short: Duration::from_secs(2 * HOUR),
        budget_percent: 10.0,
    },
    BurnWindow {
        severity: Severity::Ticket,
        name: "ticket-slow",
        long: Duration::from_secs(3 * DAY),
        short: Duration::from_secs(6 * HOUR),
        budget_percent: 10.0,
    },
];

/// An SLO's window must hold its longest alert window.
pub const LONGEST_ALERT_WINDOW: Duration = Duration::from_secs(3 * DAY);

/// The windows `cutover slo` reports burn rates over.
pub const REPORT_WINDOWS: [Duration; 7] = [
    Duration::from_secs(5 * MIN),
    Duration::from_secs(30 * MIN),
    Duration::from_secs(HOUR),
    Duration::from_secs(2 * HOUR),
    Duration::from_secs(6 * HOUR),
    Duration::from_secs(DAY),
    Duration::from_secs(3 * DAY),
];

/// Requests a burn alert's long window must hold before it may fire, unless configured: one
/// failure among a handful of requests is not a burn anyone should be paged for.
pub const DEFAULT_MIN_REQUESTS: u64 = 100;

#[derive(Clone, Debug, PartialEq)]
pub struct SloSpec {
    pub service: String,
    pub name: String,
    /// Percent of good requests, above 0 and below 100.
    pub objective: f64,
    pub window: Duration,
    /// With it, a good request is one answered within it; without it, one that is not 5xx.
    pub latency: Option<Duration>,
    /// Requests a burn alert's long window needs before the alert may fire.
    pub min_requests: u64,
}

impl SloSpec {
    /// The share of requests that may be bad: 0.001 for 99.9%.
    pub fn error_budget(&self) -> f64 {
        1.0 - self.objective / 100.0
    }

    /// `web-availability`: Sloth's `sloth_id`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.service, self.name)
    }

    /// `99.9% over 30d`, or `99% within 300ms over 30d`.
    pub fn describe(&self) -> String {
        let latency = self
            .latency
            .map(|l| format!(" within {}", short_duration(l)))
            .unwrap_or_default();
        format!(
            "{}%{latency} over {}",
            self.objective,
            short_duration(self.window)
        )
    }
}

/// Requests in some span of time, and how many of them were bad for an SLO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub bad: u64,
}

impl Counts {
    pub fn new(total: u64, bad: u64) -> Counts {
        Counts {
            total,
            bad: bad.min(total),
        }
    }

    pub fn good(&self) -> u64 {
        self.total - self.bad.min(self.total)
    }

    /// Bad share; `None` without requests (no traffic is not an error rate of 0).
    pub fn error_ratio(&self) -> Option<f64> {
        (self.total > 0).then(|| self.bad as f64 / self.total as f64)
    }

    pub fn add(&mut self, o: Counts) {
        self.total += o.total;
        self.bad += o.bad;
    }
}

/// The counts of one minute of a service's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the epoch (or since any origin the caller keeps to).
    pub index: u64,
    pub counts: Counts,
}

/// Whole minutes in `d`, at least one.
pub fn minutes(d: Duration) -> u64 {
    d.as_secs().div_ceil(MIN).max(1)
}

/// The counts of the `len` minutes ending with minute `now` (included): minutes in
/// `(now - len, now]`. `history` must be sorted by index; minutes after `now` are ignored.
pub fn window_counts(history: &[Minute], now: u64, len: u64) -> Counts {
    let first = (now + 1).saturating_sub(len);
    let start = history.partition_point(|m| m.index < first);
    let mut c = Counts::default();
    for m in history[start..].iter().take_while(|m| m.index <= now) {
        c.add(m.counts);
    }
    c
}

/// A burn rate over one window: how fast the budget is being spent there, where 1 spends
/// exactly the budget over the SLO's period.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BurnRate {
    pub window: Duration,
    pub counts: Counts,
    /// `None` without requests in the window.
    pub rate: Option<f64>,
}

fn burn(spec: &SloSpec, history: &[Minute], now: u64, window: Duration) -> BurnRate {
    let counts = window_counts(history, now, minutes(window));
    BurnRate {
        window,
        counts,
        rate: counts.error_ratio().map(|r| r / spec.error_budget()),
    }
}

/// One pair of windows checked against its factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BurnCheck {
    pub window: BurnWindow,
    pub factor: f64,
    pub long: BurnRate,
    pub short: BurnRate,
    /// Both rates above the factor, with at least `min_requests` in the long window.
    pub active: bool,
}

impl BurnCheck {
    /// `burn 31.2× over 1h and 45.0× over 5m > 14.4× (1,234 requests, 38 bad)`.
    pub fn describe(&self) -> String {
        let rate = |b: &BurnRate| b.rate.map_or("-".to_owned(), |r| format!("{r:.1}×"));
        format!(
            "burn {} over {} and {} over {} > {:.1}× ({} of {} requests bad over {})",
            rate(&self.long),
            short_duration(self.window.long),
            rate(&self.short),
            short_duration(self.window.short),
            self.factor,
            self.long.counts.bad,
            self.long.counts.total,
            short_duration(self.window.long),
        )
    }
}

/// Everything `cutover slo` shows about one SLO at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct SloStatus {
    pub spec: SloSpec,
    /// The whole window.
    pub period: Counts,
    /// Good share over the whole window.
    pub sli: Option<f64>,
    /// Good share over the last 5 minutes.
    pub sli_now: Option<f64>,
    /// 1 untouched, 0 spent, below 0 overspent.
    pub budget_remaining: f64,
    /// Over [`REPORT_WINDOWS`].
    pub burn_rates: Vec<BurnRate>,
    /// Over [`BURN_WINDOWS`].
    pub checks: Vec<BurnCheck>,
}

impl SloStatus {
    pub fn exhausted(&self) -> bool {
        self.budget_remaining <= 0.0
    }

    /// The first active check of `severity`, the one its alert reports.
    pub fn active(&self, severity: Severity) -> Option<&BurnCheck> {
        self.checks
            .iter()
            .find(|c| c.active && c.window.severity == severity)
    }

    /// Bad requests the budget allows over the window, given the traffic so far.
    pub fn allowed_bad(&self) -> f64 {
        self.spec.error_budget() * self.period.total as f64
    }

    /// `web/availability (99.9% over 30d): 131.0% of the error budget spent, -31.0% left (231
    /// bad of 100000 requests; 100 allowed)`.
    pub fn budget_sentence(&self) -> String {
        format!(
            "{}/{} ({}): {} of the error budget spent, {} left ({} bad of {} requests; {:.0} allowed)",
            self.spec.service,
            self.spec.name,
            self.spec.describe(),
            percent(1.0 - self.budget_remaining),
            percent(self.budget_remaining),
            self.period.bad,
            self.period.total,
            self.allowed_bad(),
        )
    }
}

/// Budget left after `counts`: 1 untouched (and without traffic), 0 spent, below 0 overspent.
pub fn budget_remaining(spec: &SloSpec, counts: Counts) -> f64 {
    match counts.error_ratio() {
        None => 1.0,
        Some(r) => 1.0 - r / spec.error_budget(),
    }
}

/// The SLO's state at minute `now` from its service's `history` (sorted by index).
pub fn evaluate(spec: &SloSpec, history: &[Minute], now: u64) -> SloStatus {
    let period = window_counts(history, now, minutes(spec.window));
    let five = window_counts(history, now, 5);
    let checks = BURN_WINDOWS
        .iter()
        .map(|w| {
            let factor = w.factor(spec.window);
            let long = burn(spec, history, now, w.long);
            let short = burn(spec, history, now, w.short);
            let above = |b: &BurnRate| b.rate.is_some_and(|r| r > factor);
            BurnCheck {
                window: *w,
                factor,
                long,
                short,
                active: above(&long)
                    && above(&short)
                    && long.counts.total >= spec.min_requests.max(1),
            }
        })
        .collect();
    SloStatus {
        spec: spec.clone(),
        period,
        sli: period.error_ratio().map(|r| 1.0 - r),
        sli_now: five.error_ratio().map(|r| 1.0 - r),
        budget_remaining: budget_remaining(spec, period),
        burn_rates: REPORT_WINDOWS
            .iter()
            .map(|w| burn(spec, history, now, *w))
            .collect(),
        checks,
    }
}

/// The budget left at `points` evenly spaced minutes up to `now`, each over the SLO window
/// ending there: the burn-down chart of the last window. Minutes before the first recorded one
/// count as no traffic (budget untouched).
pub fn burn_down(spec: &SloSpec, history: &[Minute], now: u64, points: usize) -> Vec<(u64, f64)> {
    let len = minutes(spec.window);
    let points = points.max(2) as u64;
    let start = now.saturating_sub(len);
    let step = ((now - start) / (points - 1)).max(1);
    // Prefix sums make each point two lookups instead of a walk over the window.
    let mut prefix = Vec::with_capacity(history.len() + 1);
    prefix.push(Counts::default());
    for m in history {
        let mut c = *prefix.last().unwrap_or(&Counts::default());
        c.add(m.counts);
        prefix.push(c);
    }
    let upto = |idx: u64| prefix[history.partition_point(|m| m.index <= idx)];
    let mut out = Vec::new();
    let mut t = start;
    loop {
        let (hi, lo) = (upto(t), upto(t.saturating_sub(len)));
        let c = Counts::new(hi.total - lo.total, hi.bad - lo.bad);
        out.push((t, budget_remaining(spec, c)));
        if t >= now {
            break;
        }
        t = (t + step).min(now);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(objective: f64, days: u64) -> SloSpec {
        SloSpec {
            service: "web".into(),
            name: "availability".into(),
            objective,
            window: Duration::from_secs(days * DAY),
            latency: None,
            min_requests: DEFAULT_MIN_REQUESTS,
        }
    }

    fn flat(from: u64, to: u64, total: u64, bad: u64) -> Vec<Minute> {
        (from..=to)
            .map(|index| Minute {
                index,
                counts: Counts::new(total, bad),
            })
            .collect()
    }

    #[test]
    fn factors_are_the_workbooks_for_30_days_and_scale_like_sloth() {
        let f = |days: u64| -> Vec<f64> {
            BURN_WINDOWS
                .iter()
                .map(|w| (w.factor(Duration::from_secs(days * DAY)) * 1e4).round() / 1e4)
                .collect()
        };
        assert_eq!(f(30), vec![14.4, 6.0, 3.0, 1.0]);
        // Sloth's 28-day catalogue: same windows, factors from the shorter period.
        assert_eq!(f(28), vec![13.44, 5.6, 2.8, 0.9333]);
        assert_eq!(f(7), vec![3.36, 1.4, 0.7, 0.2333]);
    }

    #[test]
    fn window_boundaries_include_now_and_exclude_the_minute_len_ago() {
        let h: Vec<Minute> = (0..10)
            .map(|i| Minute {
                index: i,
                counts: Counts::new(1 << i, 0),
            })
            .collect();
        // (now - len, now]: minutes 5..=9.
        let cases = [
            (9, 5, 0b11_1110_0000),
            (9, 1, 1 << 9),
            (9, 10, 0b11_1111_1111),
            (9, 100, 0b11_1111_1111),
            (4, 5, 0b1_1111),
            // Minutes after `now` do not count; a window before any history is empty.
            (2, 2, 0b110),
            (20, 5, 0),
        ];
        for (now, len, total) in cases {
            assert_eq!(
                window_counts(&h, now, len).total,
                total,
                "now {now} len {len}"
            );
        }
        assert_eq!(minutes(Duration::from_secs(300)), 5);
        assert_eq!(minutes(Duration::from_secs(301)), 6);
        assert_eq!(minutes(Duration::ZERO), 1);
    }

    /// Each row: traffic history → which alerts are active.
    #[test]
    fn burn_alerts_table() {
        struct Row {
            what: &'static str,
            history: Vec<Minute>,
            now: u64,
            page: bool,
            ticket: bool,
        }
        let now = 10 * 24 * 60; // ten days of minutes
        let healthy = flat(0, now, 100, 0);
        let with = |mut base: Vec<Minute>, from: u64, to: u64, bad: u64| {
            for m in base.iter_mut().filter(|m| m.index >= from && m.index <= to) {
                m.counts = Counts::new(m.counts.total, bad);
            }
            base
        };
        let rows = vec![
            Row {
                what: "healthy service",
                history: healthy.clone(),
                now,
                page: false,
                ticket: false,
            },
            Row {
                what: "all requests failing for 10 minutes: both page windows over 14.4",
                history: with(healthy.clone(), now - 9, now, 100),
                now,
                page: true,
                ticket: true,
            },
            Row {
                what: "2% errors for an hour: 20× over 1h and 5m pages; 0.8× over 1d is no ticket",
                history: with(healthy.clone(), now - 59, now, 2),
                now,
                page: true,
                ticket: false,
            },
            Row {
                what: "1% errors for an hour: 10×, below 14.4, and 6h at 1.7× below 6",
                history: with(healthy.clone(), now - 59, now, 1),
                now,
                page: false,
                ticket: false,
            },
            Row {
                what: "failed for 10 minutes, recovered 10 minutes ago: 5m is clean, 30m is not",
                history: with(healthy.clone(), now - 19, now - 10, 100),
                now,
                page: true,
                ticket: true,
            },
            Row {
                what: "recovered 40 minutes ago: no page any more, the 1d and 2h pair still holds",
                history: with(healthy.clone(), now - 49, now - 40, 100),
                now,
                page: false,
                ticket: true,
            },
            Row {
                what: "recovered 3 hours ago: 2h is clean, but 3d at 2.3× and 6h still ticket",
                history: with(healthy.clone(), now - 189, now - 180, 100),
                now,
                page: false,
                ticket: true,
            },
            Row {
                what: "recovered 7 hours ago: every short window is clean",
                history: with(healthy.clone(), now - 429, now - 420, 100),
                now,
                page: false,
                ticket: false,
            },
            Row {
                what: "0.7% errors for 6 hours: 7× over 6h and 30m pages (slow burn), 1.75× over 1d",
                history: {
                    // 7 bad per 1000: 1000 requests a minute.
                    let mut h = flat(0, now, 1000, 0);
                    for m in h.iter_mut().filter(|m| m.index > now - 360) {
                        m.counts = Counts::new(1000, 7);
                    }
                    h
                },
                now,
                page: true,
                ticket: false,
            },
            Row {
                what: "0.4% errors for a day: 4× over 1d and 2h is a ticket, not a page",
                history: {
                    let mut h = flat(0, now, 1000, 0);
                    for m in h.iter_mut().filter(|m| m.index > now - 1440) {
                        m.counts = Counts::new(1000, 4);
                    }
                    h
                },
                now,
                page: false,
                ticket: true,
            },
            Row {
                what: "low traffic: 1 failure of 3 requests in the hour never alerts",
                history: vec![
                    Minute {
                        index: now - 30,
                        counts: Counts::new(1, 1),
                    },
                    Minute {
                        index: now - 2,
                        counts: Counts::new(2, 0),
                    },
                    Minute {
                        index: now,
                        counts: Counts::new(0, 0),
                    },
                ],
                now,
                page: false,
                ticket: false,
            },
            Row {
                what: "no traffic at all",
                history: Vec::new(),
                now,
                page: false,
                ticket: false,
            },
        ];
        for r in rows {
            let s = evaluate(&spec(99.9, 30), &r.history, r.now);
            assert_eq!(
                (
                    s.active(Severity::Page).is_some(),
                    s.active(Severity::Ticket).is_some()
                ),
                (r.page, r.ticket),
                "{}: {:#?}",
                r.what,
                s.checks
            );
        }
    }

    #[test]
    fn the_long_window_must_hold_min_requests() {
        let now = 1000;
        // 60 requests in the hour, all failed: below min_requests, no page.
        let s = evaluate(&spec(99.9, 30), &flat(now - 59, now, 1, 1), now);
        assert!(s.checks[0].long.rate.is_some_and(|r| r > 14.4));
        assert!(s.active(Severity::Page).is_none());
        // 120: a page.
        let s = evaluate(&spec(99.9, 30), &flat(now - 59, now, 2, 2), now);
        assert!(s.active(Severity::Page).is_some());
    }

    #[test]
    fn budget_and_sli_over_the_window() {
        let now = 30 * 24 * 60;
        // 100,000 requests, 50 bad: half of a 99.9% budget.
        let mut h = flat(now - 99, now, 1000, 0);
        h[0].counts = Counts::new(1000, 50);
        let s = evaluate(&spec(99.9, 30), &h, now);
        assert_eq!(s.period, Counts::new(100_000, 50));
        assert!((s.budget_remaining - 0.5).abs() < 1e-9);
        assert!((s.sli.unwrap() - 0.9995).abs() < 1e-12);
        assert_eq!(s.sli_now, Some(1.0));
        assert!(!s.exhausted());
        assert!(
            s.budget_sentence()
                .contains("50.0% of the error budget spent, 50.0% left (50 bad of 100000"),
            "{}",
            s.budget_sentence()
        );
        // 150 bad: overspent, exhausted.
        h[1].counts = Counts::new(1000, 100);
        let s = evaluate(&spec(99.9, 30), &h, now);
        assert!((s.budget_remaining + 0.5).abs() < 1e-9);
        assert!(s.exhausted());
        // Bad minutes older than the window no longer count.
        let s = evaluate(&spec(99.9, 30), &h, now + 30 * 24 * 60);
        assert_eq!(s.budget_remaining, 1.0);
        assert_eq!(s.sli, None);
        // The report windows are the seven of the contract.
        assert_eq!(
            s.burn_rates
                .iter()
                .map(|b| short_duration(b.window))
                .collect::<Vec<_>>(),
            vec!["5m", "30m", "1h", "2h", "6h", "1d", "3d"]
        );
    }

    #[test]
    fn burn_down_follows_the_rolling_window() {
        let s = SloSpec {
            window: Duration::from_secs(10 * MIN),
            ..spec(90.0, 30)
        };
        // 10 requests a minute; minute 15 has 5 bad (half the 10-minute budget of 10).
        let mut h = flat(0, 30, 10, 0);
        h[15].counts = Counts::new(10, 5);
        let pts = burn_down(&s, &h, 30, 21);
        assert_eq!(pts.first().map(|p| p.0), Some(20));
        assert_eq!(pts.last().map(|p| p.0), Some(30));
        for (t, left) in pts {
            let want = if t < 25 { 0.5 } else { 1.0 };
            assert!((left - want).abs() < 1e-9, "minute {t}: {left}");
        }
    }
}
