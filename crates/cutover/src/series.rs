//! The dashboard's chart series across restarts.
//!
//! The controller samples per-version request counts, errors and p99 into memory every second
//! (`cutover-metrics`, 15 minutes' worth). This module copies new points into SQLite every few
//! seconds and, when the daemon starts, loads the last 15 minutes back, so the charts do not
//! start empty after a restart or an upgrade. It saves on a thread of its own, with its own
//! SQLite connection: neither a proxied request nor a controller decision ever waits for it.
//! A crash loses at most the last few seconds of chart points, never a decision.

use std::collections::BTreeMap;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutover_core::{ServiceName, Timestamp, Version};
use cutover_metrics::{Metrics, SERIES_WINDOW, SeriesPoint};
use cutover_store::{SeriesRow, Store, StoreError};

/// How often new points are saved.
const SAVE_EVERY: Duration = Duration::from_secs(5);

pub fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// The oldest instant the charts still show at `t`.
fn window_start(t: Timestamp) -> Timestamp {
    Timestamp(
        t.as_millis()
            .saturating_sub(u64::try_from(SERIES_WINDOW.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// Loads the saved points of the last 15 minutes into `metrics`; returns how many.
pub fn restore(store: &Store, metrics: &Metrics, at: Timestamp) -> Result<usize, StoreError> {
    let rows = store.series_since(window_start(at))?;
    let n = rows.len();
    let mut by_key: BTreeMap<(String, String), Vec<SeriesPoint>> = BTreeMap::new();
    for r in rows {
        by_key
            .entry((r.service, r.version))
            .or_default()
            .push(SeriesPoint {
                at: r.at,
                requests: r.requests,
                errors: r.errors,
                p99: r.p99_micros.map(Duration::from_micros),
            });
    }
    for ((service, version), points) in by_key {
        metrics.restore_series(&ServiceName::new(&service), &Version::new(&version), points);
    }
    Ok(n)
}

/// Saves the points sampled after `*saved_up_to`, drops those older than the window, and moves
/// `*saved_up_to` on.
pub fn save(
    store: &mut Store,
    metrics: &Metrics,
    saved_up_to: &mut Timestamp,
) -> Result<(), StoreError> {
    let points = metrics.points_after(*saved_up_to);
    let newest = points.iter().map(|(_, _, p)| p.at).max();
    let rows: Vec<SeriesRow> = points
        .into_iter()
        .map(|(service, version, p)| SeriesRow {
            service: service.to_string(),
            version: version.to_string(),
            at: p.at,
            requests: p.requests,
            errors: p.errors,
            p99_micros: p
                .p99
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        })
        .collect();
    store.save_series(&rows, window_start(now()))?;
    if let Some(t) = newest {
        *saved_up_to = t;
    }
    Ok(())
}

/// The saving thread; [`Saver::stop`] saves once more and ends it.
pub struct Saver {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Saver {
    /// Starts saving what `metrics` samples after `from` (what is older is saved already).
    pub fn start(mut store: Store, metrics: Metrics, from: Timestamp) -> std::io::Result<Saver> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cutover-series".into())
            .spawn(move || {
                let mut saved_up_to = from;
                loop {
                    let last = match stopped.recv_timeout(SAVE_EVERY) {
                        Err(RecvTimeoutError::Timeout) => false,
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
                    };
                    if let Err(e) = save(&mut store, &metrics, &mut saved_up_to) {
                        // The charts lose some history; nothing else depends on it.
                        tracing::warn!(error = %e, "could not save the dashboard's chart points");
                    }
                    if last {
                        return;
                    }
                }
            })?;
        Ok(Saver { stop, thread })
    }

    /// Saves what is left and waits for the thread to end.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_survive_a_restart_and_old_ones_are_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (web, v1) = (ServiceName::new("web"), Version::new("v1"));
        let t = now();
        {
            // The first daemon: some traffic, sampled, saved.
            let metrics = Metrics::new();
            let mut store = Store::open(dir.path()).unwrap();
            // A point from well before the window, as a long-stopped daemon would have left.
            store
                .save_series(
                    &[SeriesRow {
                        service: "web".into(),
                        version: "v0".into(),
                        at: Timestamp(t.as_millis() - 20 * 60 * 1000),
                        requests: 1,
                        errors: 0,
                        p99_micros: None,
                    }],
                    Timestamp(0),
                )
                .unwrap();
            let r = metrics.recorder(&web, &v1);
            let mut saved_up_to = Timestamp(0);
            for i in 0..3u64 {
                for _ in 0..=i {
                    r.record(200, Duration::from_millis(7), None);
                }
                metrics.sample(Timestamp(t.as_millis() - 3_000 + i * 1_000));
                save(&mut store, &metrics, &mut saved_up_to).unwrap();
            }
            assert_eq!(saved_up_to, Timestamp(t.as_millis() - 1_000));
        }
        // The next daemon starts with empty metrics and finds the points again.
        let metrics = Metrics::new();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(restore(&store, &metrics, t).unwrap(), 3);
        let series = metrics.series(&web);
        assert_eq!(series.len(), 1, "v0's point is older than the window");
        let points = &series[0].points;
        assert_eq!(
            points.iter().map(|p| p.requests).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(
            points
                .iter()
                .all(|p| p.p99.is_some_and(|d| d >= Duration::from_millis(7)))
        );
    }
}
