//! Which backups a `keep` policy keeps: restic's `forget` semantics, as a pure function.
//!
//! Backups are taken newest first. Each bucket (`last`, `hourly`, `daily`, `weekly`, `monthly`,
//! `yearly`) has a count; walking the list, a backup whose period (its hour, day, ISO week, …)
//! differs from the last one that bucket kept is kept by it, and uses one of its counts, so
//! each bucket keeps the newest backup of each of its last N periods that have a backup. A
//! backup kept by any bucket stays. While a bucket still has counts left at the oldest backup,
//! that one is kept too (restic does the same: it lengthens the history kept). Periods are
//! calendar ones in the time zone given (restic uses local time), so the caller passes it:
//! nothing here reads a clock or the system's zone.
//!
//! Two rules of cutover's own come on top, in [`plan`]: a backup pinned by a rollout in
//! progress (its restore point) is never deleted, and neither is the newest verified backup
//! when the policy would keep no verified one.

use cutover_core::{Keep, Timestamp};
use jiff::tz::TimeZone;

/// One backup as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    pub taken_at: Timestamp,
    /// A verification of it passed.
    pub verified: bool,
    /// A rollout in progress would restore it.
    pub pinned: bool,
}

/// Why a backup is kept; empty: it is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub reasons: Vec<&'static str>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// The period a backup falls in, for one bucket; `Last` gives every backup its own.
#[derive(Clone, Copy)]
enum Bucket {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Bucket {
    fn name(self) -> &'static str {
        match self {
            Bucket::Last => "last",
            Bucket::Hourly => "hourly",
            Bucket::Daily => "daily",
            Bucket::Weekly => "weekly",
            Bucket::Monthly => "monthly",
            Bucket::Yearly => "yearly",
        }
    }

    /// A number that is equal for two backups exactly when they share this bucket's period.
    fn period(self, t: Timestamp, index: usize, tz: &TimeZone) -> i64 {
        let Ok(ts) = jiff::Timestamp::from_millisecond(i64::try_from(t.0).unwrap_or(i64::MAX))
        else {
            return i64::MIN;
        };
        let z = ts.to_zoned(tz.clone());
        let (y, m, d, h) = (
            i64::from(z.year()),
            i64::from(z.month()),
            i64::from(z.day()),
            i64::from(z.hour()),
        );
        match self {
            Bucket::Last => i64::try_from(index).unwrap_or(i64::MAX),
            Bucket::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Bucket::Daily => (y * 100 + m) * 100 + d,
            Bucket::Weekly => {
                let w = z.date().iso_week_date();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            Bucket::Monthly => y * 100 + m,
            Bucket::Yearly => y,
        }
    }
}

/// Restic's selection: for each backup (in the order given back: newest first), the buckets
/// that keep it. A policy of all zeros keeps everything (restic refuses to forget everything).
pub fn select(items: &[Item], keep: &Keep, tz: &TimeZone) -> Vec<Decision> {
    let mut sorted: Vec<&Item> = items.iter().collect();
    // Newest first; equal times keep their given order (restic's sort is stable too).
    sorted.sort_by_key(|i| std::cmp::Reverse(i.taken_at));
    let policy = [
        (Bucket::Last, keep.last),
        (Bucket::Hourly, keep.hourly),
        (Bucket::Daily, keep.daily),
        (Bucket::Weekly, keep.weekly),
        (Bucket::Monthly, keep.monthly),
        (Bucket::Yearly, keep.yearly),
    ];
    if policy.iter().all(|(_, n)| *n == 0) {
        return sorted
            .iter()
            .map(|i| Decision {
                id: i.id.clone(),
                reasons: vec!["policy is empty"],
            })
            .collect();
    }
    let mut left: Vec<u32> = policy.iter().map(|(_, n)| *n).collect();
    let mut last: Vec<Option<i64>> = vec![None; policy.len()];
    let oldest = sorted.len().saturating_sub(1);
    sorted
        .iter()
        .enumerate()
        .map(|(nr, item)| {
            let mut reasons = Vec::new();
            for (b, (bucket, _)) in policy.iter().enumerate() {
                if left[b] == 0 {
                    continue;
                }
                let period = bucket.period(item.taken_at, nr, tz);
                if last[b] != Some(period) || nr == oldest {
                    last[b] = Some(period);
                    left[b] -= 1;
                    reasons.push(bucket.name());
                }
            }
            Decision {
                id: item.id.clone(),
                reasons,
            }
        })
        .collect()
}

/// What `prune` does: restic's selection, plus the backups cutover never deletes (a rollout's
/// restore point, the newest verified backup when no other verified one is kept).
pub fn plan(items: &[Item], keep: &Keep, tz: &TimeZone) -> Vec<Decision> {
    let mut decisions = select(items, keep, tz);
    let by_id = |id: &str| items.iter().find(|i| i.id == id);
    for d in &mut decisions {
        if by_id(&d.id).is_some_and(|i| i.pinned) && !d.keep() {
            d.reasons.push("restore point of a rollout in progress");
        }
    }
    let verified_kept = decisions
        .iter()
        .any(|d| d.keep() && by_id(&d.id).is_some_and(|i| i.verified));
    if !verified_kept {
        // Decisions are newest first: the first verified one is the newest.
        if let Some(d) = decisions
            .iter_mut()
            .find(|d| by_id(&d.id).is_some_and(|i| i.verified))
        {
            d.reasons.push("the only verified backup kept");
        }
    }
    decisions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(text: &str) -> Timestamp {
        let t: jiff::Timestamp = format!("{text}Z").replace(' ', "T").parse().unwrap();
        Timestamp(u64::try_from(t.as_millisecond()).unwrap())
    }

    fn items(times: &[&str]) -> Vec<Item> {
        times
            .iter()
            .map(|t| Item {
                id: (*t).to_owned(),
                taken_at: at(t),
                verified: false,
                pinned: false,
            })
            .collect()
    }

    fn keep(last: u32, hourly: u32, daily: u32, weekly: u32, monthly: u32) -> Keep {
        Keep {
            last,
            hourly,
            daily,
            weekly,
            monthly,
            yearly: 0,
        }
    }

    fn kept(items: &[Item], k: &Keep) -> Vec<String> {
        let mut ids: Vec<String> = select(items, k, &TimeZone::UTC)
            .into_iter()
            .filter(Decision::keep)
            .map(|d| d.id)
            .collect();
        ids.sort();
        ids
    }

    /// restic's documentation: a backup every Sunday for 12 weeks; `--keep-daily 4` keeps the
    /// last four Sundays and removes the other eight.
    #[test]
    fn restic_documented_twelve_sundays_keep_daily_4() {
        let sundays = items(&[
            "2019-09-01 11:00:00",
            "2019-09-08 11:00:00",
            "2019-09-15 11:00:00",
            "2019-09-22 11:00:00",
            "2019-09-29 11:00:00",
            "2019-10-06 11:00:00",
            "2019-10-13 11:00:00",
            "2019-10-20 11:00:00",
            "2019-10-27 11:00:00",
            "2019-11-03 11:00:00",
            "2019-11-10 11:00:00",
            "2019-11-17 11:00:00",
        ]);
        assert_eq!(
            kept(&sundays, &keep(0, 0, 4, 0, 0)),
            vec![
                "2019-10-27 11:00:00",
                "2019-11-03 11:00:00",
                "2019-11-10 11:00:00",
                "2019-11-17 11:00:00"
            ]
        );
    }

    /// restic's documentation: daily backups, `--keep-daily 7 --keep-weekly 5 --keep-monthly
    /// 12 --keep-yearly 75` keeps 7 dailies, 4 more weeklies (the dailies include one), 11 or
    /// 12 monthlies and 74 or 75 yearlies. Here three years of dailies (so the yearly bucket,
    /// 75, has counts left at the oldest backup and keeps it as well).
    #[test]
    fn restic_documented_daily_backups_with_every_bucket() {
        let mut days = Vec::new();
        let mut d = jiff::civil::date(2021, 1, 1);
        while d <= jiff::civil::date(2023, 12, 31) {
            days.push(format!("{d} 03:00:00"));
            d = d.tomorrow().unwrap();
        }
        let refs: Vec<&str> = days.iter().map(String::as_str).collect();
        let all = items(&refs);
        let k = Keep {
            last: 0,
            hourly: 0,
            daily: 7,
            weekly: 5,
            monthly: 12,
            yearly: 75,
        };
        let decisions = select(&all, &k, &TimeZone::UTC);
        let count = |name: &str| {
            decisions
                .iter()
                .filter(|d| d.reasons.contains(&name))
                .count()
        };
        assert_eq!(count("daily"), 7);
        assert_eq!(count("weekly"), 5);
        assert_eq!(count("monthly"), 12);
        // Three years, plus the oldest backup (the bucket still had counts left).
        assert_eq!(count("yearly"), 4);
        let kept: Vec<&Decision> = decisions.iter().filter(|d| d.keep()).collect();
        // 7 dailies (Dec 25-31, a Monday to a Sunday); weeklies add 4 (one is Dec 31, a
        // Sunday, already a daily); monthlies add 11 (Dec 31 is one); yearlies add 2022-12-31
        // and 2021-12-31 (2023's is a daily) and the oldest, 2021-01-01.
        assert_eq!(kept.len(), 7 + 4 + 11 + 3, "{kept:#?}");
        assert!(kept.iter().any(|d| d.id == "2021-01-01 03:00:00"));
        assert!(kept.iter().any(|d| d.id == "2022-12-31 03:00:00"));
    }

    /// A kept backup is the newest of its period, and a bucket counts periods that have a
    /// backup, not calendar periods (gaps do not use up counts).
    #[test]
    fn buckets_keep_the_newest_of_each_period_with_a_backup() {
        type Row = (&'static str, Keep, &'static [&'static str]);
        let list = items(&[
            "2024-03-01 10:00:00",
            "2024-03-01 10:30:00",
            "2024-03-01 11:15:00",
            "2024-03-01 23:59:59",
            "2024-03-02 00:00:01",
            "2024-03-04 09:00:00",
            "2024-03-10 09:00:00",
            "2024-03-11 09:00:00",
            "2024-04-30 12:00:00",
        ]);
        let rows: Vec<Row> = vec![
            (
                "last 3",
                keep(3, 0, 0, 0, 0),
                &[
                    "2024-03-10 09:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
            (
                "hourly 3: three newest hours that have one",
                keep(0, 3, 0, 0, 0),
                &[
                    "2024-03-10 09:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
            (
                "daily 5: newest of each day, across a gap",
                keep(0, 0, 5, 0, 0),
                &[
                    "2024-03-02 00:00:01",
                    "2024-03-04 09:00:00",
                    "2024-03-10 09:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
            (
                "daily 6: the sixth day is March 1st, its newest backup",
                keep(0, 0, 6, 0, 0),
                &[
                    "2024-03-01 23:59:59",
                    "2024-03-02 00:00:01",
                    "2024-03-04 09:00:00",
                    "2024-03-10 09:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
            (
                "weekly 3: ISO weeks (Mon-Sun): Mar 10 is a Sunday, Mar 11 a Monday",
                keep(0, 0, 0, 3, 0),
                &[
                    "2024-03-10 09:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
            (
                "monthly 1 + last 1 keep the same backup once",
                keep(1, 0, 0, 0, 1),
                &["2024-04-30 12:00:00"],
            ),
            (
                "monthly 5: two months have backups, then the oldest is kept too",
                keep(0, 0, 0, 0, 5),
                &[
                    "2024-03-01 10:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
            (
                "buckets are ORed",
                keep(1, 0, 2, 0, 2),
                &["2024-03-11 09:00:00", "2024-04-30 12:00:00"],
            ),
            (
                "an empty policy keeps everything",
                keep(0, 0, 0, 0, 0),
                &[
                    "2024-03-01 10:00:00",
                    "2024-03-01 10:30:00",
                    "2024-03-01 11:15:00",
                    "2024-03-01 23:59:59",
                    "2024-03-02 00:00:01",
                    "2024-03-04 09:00:00",
                    "2024-03-10 09:00:00",
                    "2024-03-11 09:00:00",
                    "2024-04-30 12:00:00",
                ],
            ),
        ];
        for (name, k, want) in rows {
            assert_eq!(kept(&list, &k), want.to_vec(), "{name}");
        }
    }

    #[test]
    fn periods_follow_the_time_zone_given() {
        // 23:30 UTC on March 1st is already March 2nd in UTC+1: one day in UTC, two there.
        let list = items(&["2024-03-01 22:30:00", "2024-03-01 23:30:00"]);
        let k = keep(0, 0, 2, 0, 0);
        let utc = select(&list, &k, &TimeZone::UTC);
        assert_eq!(utc.iter().filter(|d| d.keep()).count(), 2, "oldest rule");
        let k1 = keep(0, 0, 1, 0, 0);
        let plus1 = TimeZone::fixed(jiff::tz::offset(1));
        assert_eq!(
            select(&list, &k1, &plus1)
                .iter()
                .filter(|d| d.keep())
                .count(),
            1
        );
        let two_days = select(&list, &keep(0, 0, 3, 0, 0), &plus1);
        assert_eq!(
            two_days
                .iter()
                .filter(|d| d.reasons.contains(&"daily"))
                .count(),
            2
        );
    }

    #[test]
    fn prune_never_deletes_the_only_verified_backup_nor_a_restore_point() {
        let mut list = items(&[
            "2024-03-01 10:00:00",
            "2024-03-02 10:00:00",
            "2024-03-03 10:00:00",
            "2024-03-04 10:00:00",
        ]);
        list[0].verified = true;
        list[1].pinned = true;
        let p = plan(&list, &keep(1, 0, 0, 0, 0), &TimeZone::UTC);
        let why = |id: &str| {
            p.iter()
                .find(|d| d.id.starts_with(id))
                .unwrap()
                .reasons
                .clone()
        };
        assert_eq!(why("2024-03-04"), vec!["last"]);
        assert_eq!(why("2024-03-03"), Vec::<&str>::new());
        assert_eq!(
            why("2024-03-02"),
            vec!["restore point of a rollout in progress"]
        );
        assert_eq!(why("2024-03-01"), vec!["the only verified backup kept"]);
        // Once a verified backup is kept by the policy, older verified ones may go.
        list[3].verified = true;
        let p = plan(&list, &keep(1, 0, 0, 0, 0), &TimeZone::UTC);
        assert!(
            !p.iter()
                .find(|d| d.id.starts_with("2024-03-01"))
                .unwrap()
                .keep()
        );
    }
}
