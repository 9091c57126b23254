//! Instances as the proxy knows them: health, requests in flight, and a keep-alive pool each.
//!
//! An instance's state outlives route tables: a new table that still lists it keeps its health
//! and counters. When a table drops it, it is marked removed (draining): no new request picks
//! it, requests in flight finish, and once none is left its entry and its connection pool are
//! dropped, which closes its idle keep-alive connections.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_core::{Health, InstanceId, Version};

use crate::upstream::Pool;

pub(crate) struct BackendState {
    pub(crate) id: InstanceId,
    pub(crate) version: Version,
    pub(crate) addr: SocketAddr,
    /// `addr` as a URI authority, built once: formatting it per request showed in profiles.
    pub(crate) authority: http::uri::Authority,
    /// Whether it may take new requests: healthy and not removed. Read on every request.
    ///
    /// Written and read with `SeqCst`, as is `inflight`: a request counts itself in flight
    /// before it checks this flag, and a drain clears the flag before it reads the count, so
    /// either the request sees the instance leave or the drain sees the request (see [`lease`]).
    ///
    /// [`lease`]: BackendState::lease
    routable: AtomicBool,
    health: Mutex<HealthState>,
    pub(crate) inflight: AtomicU64,
    /// Consecutive failed connection attempts by real requests (passive ejection).
    pub(crate) connect_failures: AtomicU32,
    /// Consecutive failed answers (5xx, resets, timeouts) to real requests (passive ejection).
    pub(crate) failed_answers: AtomicU32,
    pub(crate) removed: AtomicBool,
    pub(crate) pool: Pool,
}

pub(crate) struct HealthState {
    pub(crate) health: Health,
    pub(crate) passes: u32,
    pub(crate) failures: u32,
    /// The last probe failure reported while the instance was still starting.
    pub(crate) last_failure: Option<String>,
}

impl BackendState {
    fn new(
        id: InstanceId,
        version: Version,
        addr: SocketAddr,
        connect_timeout: Duration,
        healthy: bool,
    ) -> Self {
        // A socket address always formats to a valid authority; the fallback is unreachable.
        let authority = http::uri::Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"));
        BackendState {
            id,
            version,
            addr,
            authority,
            routable: AtomicBool::new(healthy),
            health: Mutex::new(HealthState {
                health: if healthy {
                    Health::Healthy
                } else {
                    Health::Starting
                },
                passes: 0,
                failures: 0,
                last_failure: None,
            }),
            inflight: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            failed_answers: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            pool: Pool::new(addr, connect_timeout),
        }
    }

    pub(crate) fn routable(&self) -> bool {
        self.routable.load(Ordering::Relaxed)
    }

    /// Counts a request in flight on this instance if it may still take one.
    ///
    /// Between a request choosing an instance and counting itself, the controller may take the
    /// instance out of the table, see nothing in flight and stop it. Counting first and checking
    /// second closes that gap (with the drain clearing the flag first and counting second).
    pub(crate) fn lease(self: &Arc<Self>) -> Option<Lease> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.routable.load(Ordering::SeqCst) {
            Some(Lease(self.clone()))
        } else {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }

    /// Runs `f` on the health state; returns the new health if it changed.
    pub(crate) fn update_health(&self, f: impl FnOnce(&mut HealthState)) -> Option<Health> {
        let mut h = match self.health.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let before = h.health;
        f(&mut h);
        self.routable.store(
            h.health == Health::Healthy && !self.removed.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
        (h.health != before).then_some(h.health)
    }
}

/// Every instance of one service the proxy knows, by id.
#[derive(Default)]
pub(crate) struct Backends {
    map: Mutex<HashMap<InstanceId, Arc<BackendState>>>,
}

impl Backends {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Arc<BackendState>>> {
        match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    /// The state for an instance of a new table, reusing what is known about it.
    pub(crate) fn get_or_create(
        &self,
        id: &InstanceId,
        version: &Version,
        addr: SocketAddr,
        connect_timeout: Duration,
        healthy: bool,
    ) -> Arc<BackendState> {
        let mut map = self.map();
        if let Some(b) = map.get(id).filter(|b| {
            b.addr == addr && &b.version == version && !b.removed.load(Ordering::Relaxed)
        }) {
            return b.clone();
        }
        let b = Arc::new(BackendState::new(
            id.clone(),
            version.clone(),
            addr,
            connect_timeout,
            healthy,
        ));
        if let Some(old) = map.insert(id.clone(), b.clone()) {
            old.removed.store(true, Ordering::SeqCst);
            old.update_health(|_| {});
        }
        b
    }

    /// Marks every instance not in `keep` as removed: it drains.
    pub(crate) fn retain(&self, keep: &HashSet<InstanceId>) {
        for b in self.map().values() {
            if !keep.contains(&b.id) && !b.removed.swap(true, Ordering::SeqCst) {
                b.update_health(|_| {});
            }
        }
    }

    /// Drops removed instances with nothing in flight, closing their pools.
    pub(crate) fn forget_drained(&self) {
        self.map().retain(|_, b| {
            !(b.removed.load(Ordering::Relaxed) && b.inflight.load(Ordering::Relaxed) == 0)
        });
    }

    /// The instance died and is started again: unhealthy (no traffic) until `healthy_threshold`
    /// probes pass, which the health checker then reports. Whether it was known.
    pub(crate) fn restarted(&self, id: &InstanceId) -> bool {
        let Some(b) = self.map().get(id).cloned() else {
            return false;
        };
        b.update_health(|h| {
            h.health = Health::Unhealthy;
            h.passes = 0;
            h.failures = 0;
            h.last_failure = None;
        });
        true
    }

    pub(crate) fn inflight(&self, id: &InstanceId) -> u64 {
        self.map()
            .get(id)
            .map(|b| b.inflight.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    pub(crate) fn live(&self) -> Vec<Arc<BackendState>> {
        self.map()
            .values()
            .filter(|b| !b.removed.load(Ordering::Relaxed))
            .cloned()
            .collect()
    }
}

/// One request counted in flight on an instance; the count ends when the lease is dropped.
pub(crate) struct Lease(Arc<BackendState>);

impl Lease {
    pub(crate) fn backend(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}
