//! The four DORA keys from cutover's own history, with Four Keys' performance buckets.
//!
//! - **Deployment frequency**: promoted deployments (rollbacks are not deployments). The bucket
//!   is Four Keys': *daily* when the median week of the period has deployments on 3 days or
//!   more, *weekly* when most weeks have one, *monthly* when most 30-day months do, else
//!   *yearly*; elite, high, medium and low.
//! - **Lead time for changes**: from the commit's time to the promotion, median over the
//!   deployments that name a commit; elite under a day, high under a week, medium under a
//!   month (30 days), low beyond (Four Keys' "one day / one week / one month" buckets).
//! - **Change failure rate**, per deployment: a promoted deployment counts as failed when it
//!   was later rolled back (`cutover rollback` away from it) or when a deployment marked
//!   `--fixes` it was started within the fix window after it. Canaries that analysis rolled
//!   back never reached all users: they are reported apart and are not in the rate (nor are
//!   aborted or failed rollouts). Elite up to 15%, high up to 30%, medium up to 45%, low
//!   beyond (Four Keys' 0–15% and 16–45% bands, split at 30% as the 2021 report does).
//! - **Time to restore**: from the failed deployment's promotion to the promotion of the
//!   rollback or the fix, median; elite under an hour, high under a day, medium under a week,
//!   low beyond (the 2019 State of DevOps thresholds Four Keys buckets by).

use std::time::Duration;

use cutover_core::{RolloutOutcome, Timestamp};

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// What kind of rollout a history row was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `cutover deploy`.
    Deploy,
    /// `cutover rollback`: back to the previous version.
    Rollback,
}

/// One rollout of the history, with what `deploy` recorded about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub id: i64,
    pub service: String,
    pub from: String,
    pub to: String,
    pub kind: Kind,
    pub outcome: RolloutOutcome,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    /// `--commit-time`, or the commit's time from `git log -1`.
    pub commit_time: Option<Timestamp>,
    /// `--fixes ROLLOUT`.
    pub fixes: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Elite,
    High,
    Medium,
    Low,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Elite => "elite",
            Level::High => "high",
            Level::Medium => "medium",
            Level::Low => "low",
        }
    }
}

/// Four Keys' deployment frequency buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frequency {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Frequency {
    pub fn as_str(self) -> &'static str {
        match self {
            Frequency::Daily => "daily",
            Frequency::Weekly => "weekly",
            Frequency::Monthly => "monthly",
            Frequency::Yearly => "yearly",
        }
    }

    pub fn level(self) -> Level {
        match self {
            Frequency::Daily => Level::Elite,
            Frequency::Weekly => Level::High,
            Frequency::Monthly => Level::Medium,
            Frequency::Yearly => Level::Low,
        }
    }
}

/// A failed deployment and how it was restored.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub deployment: i64,
    /// `rolled back by #12`, `fixed by #13`.
    pub how: String,
    /// `None` while not restored yet.
    pub time_to_restore: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `None`: every service.
    pub service: Option<String>,
    pub since: Timestamp,
    pub until: Timestamp,
    /// Promoted deployments in the period.
    pub deployments: u64,
    pub per_day: f64,
    pub frequency: Frequency,
    pub lead_time: Option<Duration>,
    pub lead_time_level: Option<Level>,
    /// Deployments whose lead time is known (they named a commit).
    pub with_commit: u64,
    pub failed: u64,
    /// `failed / deployments`; `None` without deployments.
    pub change_failure_rate: Option<f64>,
    pub change_failure_level: Option<Level>,
    pub failures: Vec<Failure>,
    pub time_to_restore: Option<Duration>,
    pub time_to_restore_level: Option<Level>,
    /// Canaries analysis rolled back: caught before they reached all users.
    pub caught_by_analysis: u64,
    /// Rollouts aborted by a person or failed before traffic moved.
    pub not_promoted: u64,
    pub rollbacks: u64,
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    })
}

fn median_f(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn lead_time_level(d: Duration) -> Level {
    match d.as_secs() {
        s if s < DAY => Level::Elite,
        s if s < 7 * DAY => Level::High,
        s if s < 30 * DAY => Level::Medium,
        _ => Level::Low,
    }
}

pub fn restore_level(d: Duration) -> Level {
    match d.as_secs() {
        s if s < HOUR => Level::Elite,
        s if s < DAY => Level::High,
        s if s < 7 * DAY => Level::Medium,
        _ => Level::Low,
    }
}

pub fn failure_level(rate: f64) -> Level {
    match rate {
        r if r <= 0.15 => Level::Elite,
        r if r <= 0.30 => Level::High,
        r if r <= 0.45 => Level::Medium,
        _ => Level::Low,
    }
}

/// Four Keys' bucket from the days on which deployments were promoted, over `[since, until)`:
/// weeks and 30-day months counted back from `until`.
pub fn frequency(days: &[u64], since: Timestamp, until: Timestamp) -> Frequency {
    let day_ms = DAY * 1000;
    let first = since.as_millis() / day_ms;
    let last = until.as_millis().saturating_sub(1) / day_ms;
    if last < first {
        return Frequency::Yearly;
    }
    let span = last - first + 1;
    // Periods of `len` days ending with the last day; a partial oldest one is left out unless
    // it is all there is.
    let periods = |len: u64| -> Vec<(u64, u64)> {
        let n = (span / len).max(1);
        (0..n)
            .map(|i| {
                let end = last - i * len;
                (end.saturating_sub(len - 1).max(first), end)
            })
            .collect()
    };
    let in_period = |(a, b): (u64, u64)| days.iter().filter(move |d| **d >= a && **d <= b);
    let weeks = periods(7);
    let days_per_week: Vec<f64> = weeks
        .iter()
        .map(|w| {
            let mut d: Vec<u64> = in_period(*w).copied().collect();
            d.dedup();
            d.len() as f64
        })
        .collect();
    if median_f(days_per_week) >= 3.0 {
        return Frequency::Daily;
    }
    let weeks_deployed: Vec<f64> = weeks
        .iter()
        .map(|w| f64::from(u8::from(in_period(*w).next().is_some())))
        .collect();
    if median_f(weeks_deployed) >= 1.0 {
        return Frequency::Weekly;
    }
    let monthly: Vec<f64> = periods(30)
        .into_iter()
        .map(|m| in_period(m).count() as f64)
        .collect();
    if median_f(monthly) >= 1.0 {
        return Frequency::Monthly;
    }
    Frequency::Yearly
}

/// The report for `service` (or all) over `[since, until)`. `history` may hold every
/// service and any time: the function picks. `fix_window` bounds how long after a promotion a
/// `--fixes` deployment still marks it failed.
pub fn report(
    history: &[Record],
    service: Option<&str>,
    since: Timestamp,
    until: Timestamp,
    fix_window: Duration,
) -> Report {
    let mut rows: Vec<&Record> = history
        .iter()
        .filter(|r| service.is_none_or(|s| r.service == s))
        .collect();
    rows.sort_by_key(|r| (r.started_at, r.id));
    let in_period = |t: Timestamp| t >= since && t < until;
    let promoted = |r: &&Record| r.outcome == RolloutOutcome::Promoted;
    let deployments: Vec<&Record> = rows
        .iter()
        .copied()
        .filter(|r| r.kind == Kind::Deploy)
        .filter(promoted)
        .filter(|r| r.finished_at.is_some_and(in_period))
        .collect();
    let started_in = |r: &&&Record| in_period(r.started_at);
    let caught = rows
        .iter()
        .filter(started_in)
        .filter(|r| r.kind == Kind::Deploy && r.outcome == RolloutOutcome::RolledBack)
        .count() as u64;
    let not_promoted = rows
        .iter()
        .filter(started_in)
        .filter(|r| matches!(r.outcome, RolloutOutcome::Aborted | RolloutOutcome::Failed))
        .count() as u64;
    let rollbacks = rows
        .iter()
        .filter(started_in)
        .filter(|r| r.kind == Kind::Rollback)
        .count() as u64;

    let mut failures = Vec::new();
    for d in &deployments {
        let Some(live) = d.finished_at else { continue };
        // Rollouts of the same service after this one was promoted.
        let later = rows
            .iter()
            .filter(|r| r.service == d.service && r.started_at >= live && r.id != d.id);
        let mut restored: Option<(String, Option<Timestamp>)> = None;
        // Once another deployment replaced it, a rollback is that one's, not this one's; a
        // fix that names it still counts within the window.
        let mut replaced = false;
        for r in later {
            let restored_at = r
                .finished_at
                .filter(|_| r.outcome == RolloutOutcome::Promoted);
            if r.kind == Kind::Rollback && !replaced && r.from == d.to {
                restored = Some((format!("rolled back by #{}", r.id), restored_at));
                break;
            }
            if r.kind == Kind::Deploy
                && r.fixes == Some(d.id)
                && r.started_at.since(live) <= fix_window
            {
                restored = Some((format!("fixed by #{}", r.id), restored_at));
                break;
            }
            if r.kind == Kind::Deploy && r.outcome == RolloutOutcome::Promoted {
                replaced = true;
            }
        }
        if let Some((how, at)) = restored {
            failures.push(Failure {
                deployment: d.id,
                how,
                time_to_restore: at.map(|t| t.since(live)),
            });
        }
    }
    let n = deployments.len() as u64;
    let failed = failures.len() as u64;
    let rate = (n > 0).then(|| failed as f64 / n as f64);
    let lead: Vec<Duration> = deployments
        .iter()
        .filter_map(|d| Some(d.finished_at?.since(d.commit_time?)))
        .filter(|d| !d.is_zero())
        .collect();
    let with_commit = lead.len() as u64;
    let lead_time = median(lead);
    let ttr = median(failures.iter().filter_map(|f| f.time_to_restore).collect());
    let days: Vec<u64> = {
        let mut d: Vec<u64> = deployments
            .iter()
            .filter_map(|d| d.finished_at)
            .map(|t| t.as_millis() / (DAY * 1000))
            .collect();
        d.sort_unstable();
        d
    };
    let period_days = (until.since(since).as_secs_f64() / DAY as f64).max(1.0 / 24.0);
    Report {
        service: service.map(str::to_owned),
        since,
        until,
        deployments: n,
        per_day: n as f64 / period_days,
        frequency: frequency(&days, since, until),
        lead_time,
        lead_time_level: lead_time.map(lead_time_level),
        with_commit,
        failed,
        change_failure_rate: rate,
        change_failure_level: rate.map(failure_level),
        failures,
        time_to_restore: ttr,
        time_to_restore_level: ttr.map(restore_level),
        caught_by_analysis: caught,
        not_promoted,
        rollbacks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600 * 1000;
    const D: u64 = 24 * H;

    struct Hist(Vec<Record>);

    impl Hist {
        #[allow(clippy::too_many_arguments)]
        fn add(
            &mut self,
            kind: Kind,
            from: &str,
            to: &str,
            outcome: RolloutOutcome,
            start: u64,
            minutes: u64,
            commit_before: Option<u64>,
            fixes: Option<i64>,
        ) -> i64 {
            let id = self.0.len() as i64 + 1;
            self.0.push(Record {
                id,
                service: "web".into(),
                from: from.into(),
                to: to.into(),
                kind,
                outcome,
                started_at: Timestamp(start),
                finished_at: Some(Timestamp(start + minutes * 60_000)),
                commit_time: commit_before.map(|b| Timestamp(start - b)),
                fixes,
            });
            id
        }
    }

    /// A scripted month, computed by hand in the comments.
    #[test]
    fn a_month_of_history_gives_hand_computed_figures() {
        use Kind::*;
        use RolloutOutcome::*;
        let t0 = 100 * D;
        let mut h = Hist(Vec::new());
        // #1 day 0: v2 promoted after 10 min, committed 2 h before: lead 2h10m.
        h.add(Deploy, "v1", "v2", Promoted, t0, 10, Some(2 * H), None);
        // #2 day 1: v3 promoted (lead 1h10m), then #3 rolled back 30 min after promotion
        // (restored when #3 is promoted, 1 min later: time to restore 31 min).
        let v3 = h.add(Deploy, "v2", "v3", Promoted, t0 + D, 10, Some(H), None);
        h.add(
            Rollback,
            "v3",
            "v2",
            Promoted,
            t0 + D + 40 * 60_000,
            1,
            None,
            None,
        );
        // #4 day 2: v4 canary rolled back by analysis: caught, not a deployment.
        h.add(Deploy, "v2", "v4", RolledBack, t0 + 2 * D, 5, Some(H), None);
        // #5 day 3: v5 promoted (lead 3h10m); #6 day 4 marked --fixes 5, promoted after 10
        // min: v5 failed, restored exactly a day after its promotion (within the 7-day
        // window).
        let v5 = h.add(
            Deploy,
            "v2",
            "v5",
            Promoted,
            t0 + 3 * D,
            10,
            Some(3 * H),
            None,
        );
        h.add(
            Deploy,
            "v5",
            "v6",
            Promoted,
            t0 + 4 * D,
            10,
            Some(4 * H),
            Some(v5),
        );
        // #7 day 5: aborted by a person.
        h.add(Deploy, "v6", "v7", Aborted, t0 + 5 * D, 3, None, None);
        // #8 day 20: v8 promoted without a commit time.
        h.add(Deploy, "v6", "v8", Promoted, t0 + 20 * D, 10, None, None);
        // Another service's rollout never counts for web.
        h.0.push(Record {
            service: "api".into(),
            id: 99,
            ..h.0[0].clone()
        });
        let r = report(
            &h.0,
            Some("web"),
            Timestamp(t0),
            Timestamp(t0 + 30 * D),
            Duration::from_secs(7 * 86_400),
        );
        // Deployments: #1, #2, #5, #6, #8 = 5 over 30 days.
        assert_eq!(r.deployments, 5);
        assert!((r.per_day - 5.0 / 30.0).abs() < 1e-9);
        // Failed: #2 (rolled back by #3) and #5 (fixed by #6): 2 of 5 = 40%, medium.
        assert_eq!(r.failed, 2);
        assert_eq!(r.change_failure_rate, Some(0.4));
        assert_eq!(r.change_failure_level, Some(Level::Medium));
        assert_eq!(
            r.failures
                .iter()
                .map(|f| (f.deployment, f.how.as_str()))
                .collect::<Vec<_>>(),
            vec![(v3, "rolled back by #3"), (v5, "fixed by #6")]
        );
        // Restores: 31 min and 24 h (#6 promoted at day 4 + 10 min, v5 at day 3 + 10 min):
        // the median of two is their mean, 12h15m30s: high.
        assert_eq!(
            r.time_to_restore,
            Some(Duration::from_secs(12 * 3600 + 15 * 60 + 30))
        );
        assert_eq!(r.time_to_restore_level, Some(Level::High));
        // Lead times: 2h10m, 1h10m, 3h10m, 4h10m (no commit for #8): median 2h40m, elite.
        assert_eq!(r.with_commit, 4);
        assert_eq!(r.lead_time, Some(Duration::from_secs(2 * 3600 + 40 * 60)));
        assert_eq!(r.lead_time_level, Some(Level::Elite));
        assert_eq!(
            (r.caught_by_analysis, r.not_promoted, r.rollbacks),
            (1, 1, 1)
        );
        // Promotions on days 0, 1, 3, 4, 20 of 30. Whole weeks back from day 29: 23-29 none,
        // 16-22 one day, 9-15 none, 2-8 two days (days 0 and 1 are a partial week, left
        // out): median days per week 0.5, median weeks deployed 0.5, so not weekly; the one
        // 30-day month has 5: monthly.
        assert_eq!(r.frequency, Frequency::Monthly);
        assert_eq!(r.frequency.level(), Level::Medium);
    }

    #[test]
    fn frequency_buckets() {
        let since = Timestamp(0);
        let until = Timestamp(28 * D);
        // Every weekday: daily.
        let weekdays: Vec<u64> = (0..28).filter(|d| d % 7 < 5).collect();
        assert_eq!(frequency(&weekdays, since, until), Frequency::Daily);
        // Twice a week: weekly.
        let twice: Vec<u64> = (0..28).filter(|d| d % 7 == 1 || d % 7 == 4).collect();
        assert_eq!(frequency(&twice, since, until), Frequency::Weekly);
        // Once in the period: monthly; nothing: yearly.
        assert_eq!(frequency(&[3], since, until), Frequency::Monthly);
        assert_eq!(frequency(&[], since, until), Frequency::Yearly);
    }

    #[test]
    fn a_fix_outside_the_window_and_a_later_unrelated_rollback() {
        use Kind::*;
        use RolloutOutcome::*;
        let mut h = Hist(Vec::new());
        let a = h.add(Deploy, "v1", "v2", Promoted, D, 10, None, None);
        // Marked as fixing #1, but 10 days later with a 7-day window: #1 is not failed.
        h.add(Deploy, "v2", "v3", Promoted, 11 * D, 10, None, Some(a));
        // A rollback away from v3: #2 failed; it is still being rolled back (not restored).
        h.add(Rollback, "v3", "v2", InProgress, 12 * D, 0, None, None);
        let r = report(
            &h.0,
            None,
            Timestamp(0),
            Timestamp(30 * D),
            Duration::from_secs(7 * 86_400),
        );
        assert_eq!(r.deployments, 2);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].deployment, 2);
        assert_eq!(r.failures[0].time_to_restore, None);
        assert_eq!(r.time_to_restore, None);
        assert_eq!(r.change_failure_level, Some(Level::Low));
        // Nothing at all: no rate, no lead time, yearly.
        let r = report(
            &[],
            None,
            Timestamp(0),
            Timestamp(30 * D),
            Duration::from_secs(1),
        );
        assert_eq!(
            (r.deployments, r.change_failure_rate, r.lead_time),
            (0, None, None)
        );
    }
}
