//! The signals' rows: per-minute request counts for SLOs and the notes `deploy` leaves on a
//! rollout for DORA.
//!
//! Counts are *added*: the signals task writes what each version answered since its last
//! write, so a restarted daemon (whose in-memory counters start again at zero) adds to the
//! minute it finds instead of replacing it. Minutes older than the longest SLO window are
//! compacted into hours, which are kept for a year.

use cutover_core::Timestamp;
use rusqlite::params;

use crate::{Store, StoreError, db_ts, ts};

/// What one version of a service answered in one bucket (a minute, or an hour once
/// compacted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountRow {
    pub service: String,
    pub version: String,
    /// The bucket's start.
    pub at: Timestamp,
    /// The bucket's width in milliseconds.
    pub width_ms: u64,
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// `(latency threshold in µs, answers within it)` for each SLO latency.
    pub within: Vec<(u64, u64)>,
}

/// What a rollout was and what `deploy` said about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutNote {
    pub rollout_id: i64,
    /// `deploy` or `rollback`.
    pub kind: String,
    pub commit_sha: Option<String>,
    pub commit_time: Option<Timestamp>,
    /// The rollout this deployment fixes (`deploy --fixes`).
    pub fixes: Option<i64>,
    /// Why it was deployed although the error budget was exhausted (`--force --reason`).
    pub forced_reason: Option<String>,
}

fn n(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Adds the counts of `rows` to what is stored for their buckets, in one transaction.
    pub fn add_signal_counts(&mut self, rows: &[CountRow]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut counts = tx.prepare_cached(
                "INSERT INTO signal_counts (service, version, at, width, requests, errors)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (service, version, at, width) DO UPDATE SET
                   requests = requests + excluded.requests, errors = errors + excluded.errors",
            )?;
            let mut within = tx.prepare_cached(
                "INSERT INTO signal_within (service, version, at, width, threshold_us, within)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (service, version, at, width, threshold_us) DO UPDATE SET
                   within = within + excluded.within",
            )?;
            for r in rows {
                let (at, width) = (db_ts(r.at), n(r.width_ms));
                counts.execute(params![
                    r.service,
                    r.version,
                    at,
                    width,
                    n(r.requests),
                    n(r.errors)
                ])?;
                for (threshold, k) in &r.within {
                    within.execute(params![
                        r.service,
                        r.version,
                        at,
                        width,
                        n(*threshold),
                        n(*k)
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every bucket that starts at or after `from`, oldest first.
    pub fn signal_counts_since(&self, from: Timestamp) -> Result<Vec<CountRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT service, version, at, width, requests, errors FROM signal_counts
             WHERE at >= ?1 ORDER BY at, service, version",
        )?;
        let mut rows: Vec<CountRow> = stmt
            .query_map([db_ts(from)], |r| {
                Ok(CountRow {
                    service: r.get(0)?,
                    version: r.get(1)?,
                    at: ts(r.get(2)?),
                    width_ms: u(r.get(3)?),
                    requests: u(r.get(4)?),
                    errors: u(r.get(5)?),
                    within: Vec::new(),
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT service, version, at, width, threshold_us, within FROM signal_within
             WHERE at >= ?1 ORDER BY at, service, version, threshold_us",
        )?;
        let within = stmt.query_map([db_ts(from)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                ts(r.get(2)?),
                u(r.get(3)?),
                u(r.get(4)?),
                u(r.get(5)?),
            ))
        })?;
        // Both are in the same order, so one walk pairs them.
        let mut i = 0;
        for w in within {
            let (service, version, at, width, threshold, k) = w?;
            let key = |r: &CountRow| (r.at, r.service.clone(), r.version.clone(), r.width_ms);
            let want = (at, service, version, width);
            while i < rows.len() && key(&rows[i]) < want {
                i += 1;
            }
            if let Some(r) = rows.get_mut(i).filter(|r| key(r) == want) {
                r.within.push((threshold, k));
            }
        }
        Ok(rows)
    }

    /// Folds the minutes that start before `minutes_before` into hours (same service and
    /// version) and forgets hours that start before `hours_before`.
    pub fn compact_signal_counts(
        &mut self,
        minutes_before: Timestamp,
        hours_before: Timestamp,
    ) -> Result<(), StoreError> {
        const HOUR: i64 = 3_600_000;
        let tx = self.conn.transaction()?;
        let cut = db_ts(minutes_before);
        tx.execute(
            "INSERT INTO signal_counts (service, version, at, width, requests, errors)
             SELECT service, version, (at / ?2) * ?2, ?2, sum(requests), sum(errors)
             FROM signal_counts WHERE width < ?2 AND at < ?1
             GROUP BY service, version, (at / ?2) * ?2
             ON CONFLICT (service, version, at, width) DO UPDATE SET
               requests = requests + excluded.requests, errors = errors + excluded.errors",
            params![cut, HOUR],
        )?;
        tx.execute(
            "INSERT INTO signal_within (service, version, at, width, threshold_us, within)
             SELECT service, version, (at / ?2) * ?2, ?2, threshold_us, sum(within)
             FROM signal_within WHERE width < ?2 AND at < ?1
             GROUP BY service, version, (at / ?2) * ?2, threshold_us
             ON CONFLICT (service, version, at, width, threshold_us) DO UPDATE SET
               within = within + excluded.within",
            params![cut, HOUR],
        )?;
        for table in ["signal_counts", "signal_within"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE width < ?2 AND at < ?1"),
                params![cut, HOUR],
            )?;
            tx.execute(
                &format!("DELETE FROM {table} WHERE at < ?1"),
                [db_ts(hours_before)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records (or replaces) what `deploy` said about a rollout.
    pub fn put_rollout_note(&mut self, note: &RolloutNote) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO rollout_notes (rollout_id, kind, commit_sha, commit_time, fixes, forced_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                note.rollout_id,
                note.kind,
                note.commit_sha,
                note.commit_time.map(db_ts),
                note.fixes,
                note.forced_reason
            ],
        )?;
        Ok(())
    }

    pub fn rollout_notes(&self) -> Result<Vec<RolloutNote>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT rollout_id, kind, commit_sha, commit_time, fixes, forced_reason FROM rollout_notes ORDER BY rollout_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(RolloutNote {
                rollout_id: r.get(0)?,
                kind: r.get(1)?,
                commit_sha: r.get(2)?,
                commit_time: r.get::<_, Option<i64>>(3)?.map(ts),
                fixes: r.get(4)?,
                forced_reason: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: &str, minute: u64, requests: u64, errors: u64, within: u64) -> CountRow {
        CountRow {
            service: "web".into(),
            version: version.into(),
            at: Timestamp(minute * 60_000),
            width_ms: 60_000,
            requests,
            errors,
            within: vec![(300_000, within)],
        }
    }

    #[test]
    fn counts_add_up_across_writes_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path()).unwrap();
            s.add_signal_counts(&[row("v1", 10, 100, 2, 90), row("v2", 10, 5, 5, 0)])
                .unwrap();
            // The same minute again (the next write of the task): added, not replaced.
            s.add_signal_counts(&[row("v1", 10, 50, 1, 50), row("v1", 11, 7, 0, 7)])
                .unwrap();
        }
        // Another process (a restarted daemon) adds to the same minute.
        let mut s = Store::open(dir.path()).unwrap();
        s.add_signal_counts(&[row("v1", 11, 3, 3, 0)]).unwrap();
        let rows = s.signal_counts_since(Timestamp(0)).unwrap();
        assert_eq!(
            rows,
            vec![
                row("v1", 10, 150, 3, 140),
                row("v2", 10, 5, 5, 0),
                row("v1", 11, 10, 3, 7)
            ]
        );
        assert_eq!(
            s.signal_counts_since(Timestamp(11 * 60_000)).unwrap().len(),
            1
        );
    }

    #[test]
    fn old_minutes_become_hours_and_old_hours_go() {
        let mut s = Store::open_in_memory().unwrap();
        // Minutes 0..=59 (hour 0), 60..=61 (hour 1), and 120 (kept as a minute).
        let mut rows: Vec<CountRow> = (0..62).map(|m| row("v1", m, 10, 1, 9)).collect();
        rows.push(row("v1", 120, 4, 0, 4));
        s.add_signal_counts(&rows).unwrap();
        s.compact_signal_counts(Timestamp(120 * 60_000), Timestamp(0))
            .unwrap();
        let got = s.signal_counts_since(Timestamp(0)).unwrap();
        let hour = |h: u64, requests: u64, errors: u64, within: u64| CountRow {
            at: Timestamp(h * 3_600_000),
            width_ms: 3_600_000,
            ..row("v1", 0, requests, errors, within)
        };
        assert_eq!(
            got,
            vec![
                hour(0, 600, 60, 540),
                hour(1, 20, 2, 18),
                row("v1", 120, 4, 0, 4)
            ]
        );
        // Compacting again changes nothing; hours before the second cut are forgotten.
        s.compact_signal_counts(Timestamp(120 * 60_000), Timestamp(3_600_000))
            .unwrap();
        let got = s.signal_counts_since(Timestamp(0)).unwrap();
        assert_eq!(got, vec![hour(1, 20, 2, 18), row("v1", 120, 4, 0, 4)]);
    }

    #[test]
    fn rollout_notes_round_trip() {
        let mut s = Store::open_in_memory().unwrap();
        let id = s
            .insert_rollout(&crate::NewRollout {
                service: "web".into(),
                from_version: "v1".into(),
                to_version: "v2".into(),
                strategy: cutover_core::StrategyKind::Canary,
                env: Default::default(),
                started_at: Timestamp(1),
                checkpoint: String::new(),
                started_by: None,
            })
            .unwrap();
        let note = RolloutNote {
            rollout_id: id,
            kind: "deploy".into(),
            commit_sha: Some("abc123".into()),
            commit_time: Some(Timestamp(5)),
            fixes: None,
            forced_reason: Some("hotfix for the outage".into()),
        };
        s.put_rollout_note(&note).unwrap();
        assert_eq!(s.rollout_notes().unwrap(), vec![note]);
    }
}
