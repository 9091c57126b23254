//! How many client connections one service may hold open (`max_connections`), and what
//! happens beyond: the oldest idle keep-alive connection is closed to make room, and when none
//! is idle the new connection gets a fixed 503 and is closed at once.
//!
//! Without a limit, one client opening connections and sending nothing took every descriptor
//! the daemon had, and the API with them (nobody could even abort). An idle connection costs
//! the client nothing to reopen, so it goes first, as nginx reuses its idle connections; a
//! connection with a request under way is never cut. Connections on hyper's path (upgrades,
//! HTTP/1.0) and connections handed over by a previous daemon count too, but only the fast
//! path's are ever idle here.
//!
//! The bookkeeping is per connection, not per request: a request costs one relaxed store when
//! its connection turns idle (with the time the idle timer is armed with anyway) and one when
//! it turns busy. Only a connection beyond the limit scans the open ones for the oldest idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cutover_core::ServiceName;
use cutover_metrics::ConnectionCounts;
use tokio::sync::Notify;

/// The open connections of one service (main and preview listeners together).
pub(crate) struct Limit {
    max: usize,
    counts: Arc<ConnectionCounts>,
    slots: Mutex<Slots>,
    /// Idle times are kept as nanoseconds after this, plus one (0 means "busy").
    base: tokio::time::Instant,
    /// The whole answer a turned-away connection gets, made once.
    refusal: Vec<u8>,
}

#[derive(Default)]
struct Slots {
    all: Vec<Option<Arc<Slot>>>,
    free: Vec<usize>,
    used: usize,
}

/// What the limit knows of one open connection.
pub(crate) struct Slot {
    /// 0 while a request is under way (or the connection was chosen to close); otherwise
    /// when it turned idle, as kept by [`Limit::base`].
    idle_since: AtomicU64,
    /// Wakes the connection while it waits idle: to close (chosen to make room) or to park
    /// (a hand-over; the connection tells which by the proxy's state). A wake-up that comes
    /// while a request is under way waits for the next idle moment.
    pub(crate) wake: Notify,
}

/// A connection's place under the limit, given back when it is dropped.
pub(crate) struct Admitted {
    limit: Arc<Limit>,
    index: usize,
    pub(crate) slot: Arc<Slot>,
}

impl Limit {
    pub(crate) fn new(service: &ServiceName, max: usize, counts: Arc<ConnectionCounts>) -> Self {
        let body = format!(
            "503 Service Unavailable: {service}: too many open connections (max_connections = {max}); try again\n"
        );
        let refusal = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        Limit {
            max: max.max(1),
            counts,
            slots: Mutex::new(Slots::default()),
            base: tokio::time::Instant::now(),
            refusal,
        }
    }

    pub(crate) fn refusal(&self) -> &[u8] {
        &self.refusal
    }

    /// A place for a new connection: free, or made by telling the oldest idle connection to
    /// close. `None` when every open connection is busy: the caller answers 503. `force`
    /// admits regardless (connections handed over by a previous daemon are already open).
    pub(crate) fn admit(self: &Arc<Self>, force: bool) -> Option<Admitted> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.used >= self.max && !force && !Self::close_oldest_idle(&slots) {
            drop(slots);
            self.counts.rejected();
            return None;
        }
        let slot = Arc::new(Slot {
            idle_since: AtomicU64::new(0),
            wake: Notify::new(),
        });
        let index = match slots.free.pop() {
            Some(i) => {
                if let Some(s) = slots.all.get_mut(i) {
                    *s = Some(slot.clone());
                }
                i
            }
            None => {
                slots.all.push(Some(slot.clone()));
                slots.all.len() - 1
            }
        };
        slots.used += 1;
        self.counts.opened();
        Some(Admitted {
            limit: self.clone(),
            index,
            slot,
        })
    }

    /// Tells the connection idle longest to close; false when none is idle.
    fn close_oldest_idle(slots: &Slots) -> bool {
        loop {
            let oldest = slots
                .all
                .iter()
                .flatten()
                .filter_map(|s| {
                    let since = s.idle_since.load(Ordering::Relaxed);
                    (since != 0).then_some((since, s))
                })
                .min_by_key(|(since, _)| *since);
            let Some((since, s)) = oldest else {
                return false;
            };
            // Claimed only if it is still idle since then: a connection whose next request
            // just arrived is busy again and not chosen; the next oldest is.
            if s.idle_since
                .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                s.wake.notify_one();
                return true;
            }
        }
    }
}

impl Admitted {
    /// The connection waits for its next request from `now` on (the instant its idle timer
    /// was armed with).
    pub(crate) fn idle(&self, now: tokio::time::Instant) {
        let nanos = now.saturating_duration_since(self.limit.base).as_nanos();
        let since = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
        self.slot.idle_since.store(since, Ordering::Relaxed);
    }

    /// A request is under way: the connection may not be chosen to close.
    pub(crate) fn busy(&self) {
        self.slot.idle_since.store(0, Ordering::Relaxed);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut slots = self.limit.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.all.get_mut(self.index) {
            *s = None;
            slots.free.push(self.index);
            slots.used = slots.used.saturating_sub(1);
        }
        drop(slots);
        self.limit.counts.closed();
    }
}

/// The default `max_connections` of each of `services` services, from the daemon's descriptor
/// limit `nofile`: `(nofile − FD_RESERVE) / (2 × services)`, and at least
/// [`MIN_DEFAULT_CONNECTIONS`]. Two descriptors per connection, since a client connection
/// with a request under way also holds a connection to an instance; the reserve keeps
/// descriptors for the API, health checks, instances' log pipes, log files and SQLite
/// whatever clients do.
pub fn default_max_connections(nofile: u64, services: usize) -> usize {
    let services = u64::try_from(services.max(1)).unwrap_or(u64::MAX);
    let share = nofile.saturating_sub(FD_RESERVE) / 2 / services;
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .max(MIN_DEFAULT_CONNECTIONS)
}

/// Descriptors kept out of the services' connection limits (see [`default_max_connections`]).
pub const FD_RESERVE: u64 = 256;
/// The smallest derived default, for a daemon started with very few descriptors.
pub const MIN_DEFAULT_CONNECTIONS: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: usize) -> Arc<Limit> {
        Arc::new(Limit::new(
            &ServiceName::new("web"),
            max,
            Arc::new(ConnectionCounts::default()),
        ))
    }

    #[test]
    fn beyond_the_limit_the_oldest_idle_closes_and_with_none_idle_the_new_one_is_refused() {
        let l = limit(3);
        let t0 = tokio::time::Instant::now();
        let conns: Vec<Admitted> = (0..3).map(|_| l.admit(false).unwrap()).collect();
        // All busy: refused, and counted.
        assert!(l.admit(false).is_none());
        assert_eq!(l.counts.rejected_total(), 1);
        // Idle in the order 2, 0, 1: 2 is the oldest.
        conns[2].idle(t0 + std::time::Duration::from_millis(1));
        conns[0].idle(t0 + std::time::Duration::from_millis(2));
        conns[1].idle(t0 + std::time::Duration::from_millis(3));
        let fourth = l.admit(false).unwrap();
        assert_eq!(conns[2].slot.idle_since.load(Ordering::Relaxed), 0);
        assert_ne!(conns[0].slot.idle_since.load(Ordering::Relaxed), 0);
        // Its wake-up is waiting for it.
        {
            let woke = conns[2].slot.wake.notified();
            let mut woke = std::pin::pin!(woke);
            assert!(woke.as_mut().enable());
        }
        // Then 0; a connection busy again is passed over.
        conns[0].busy();
        let fifth = l.admit(false).unwrap();
        assert_eq!(conns[1].slot.idle_since.load(Ordering::Relaxed), 0);
        assert!(l.admit(false).is_none());
        assert_eq!(l.counts.open(), 5);
        drop(conns);
        drop((fourth, fifth));
        assert_eq!(l.counts.open(), 0);
        assert_eq!(l.slots.lock().unwrap().used, 0);
        // Places are reused, and a hand-over's connections come in regardless.
        let again: Vec<Admitted> = (0..4).map(|_| l.admit(true).unwrap()).collect();
        assert_eq!(l.slots.lock().unwrap().all.len(), 5);
        assert_eq!(again.len(), 4);
    }

    #[test]
    fn the_default_shares_the_descriptors_left_after_the_reserve() {
        assert_eq!(default_max_connections(8192, 1), (8192 - 256) / 2);
        assert_eq!(default_max_connections(1024, 1), 384);
        assert_eq!(default_max_connections(1024, 2), 192);
        assert_eq!(default_max_connections(300, 4), MIN_DEFAULT_CONNECTIONS);
        assert_eq!(default_max_connections(0, 0), MIN_DEFAULT_CONNECTIONS);
    }
}
