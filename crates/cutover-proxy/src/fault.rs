//! Faults injected into the data plane on purpose: added latency, error answers, connection
//! resets, a bandwidth cap and blackholes, per service (or dependency), version or instance.
//!
//! The proxy only applies faults; who sets them, checks them and makes them expire is the
//! daemon's fault registry (`cutover-chaos`), which publishes each service's whole list here
//! with [`crate::Proxy::set_faults`]. A fault carries its own deadline and is ignored past it,
//! so even a registry that stopped cannot leave one behind for longer than it was given.
//!
//! Off, they cost one relaxed atomic load per request ([`FaultSlot::any`]): the list itself is
//! read only while some fault is set for the service. [`decide`] is pure (the time and the
//! random draws are arguments) and table-tested.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use cutover_core::{InstanceId, Version};

/// What a fault applies to, within its service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    /// Every request of the service (or every connection of the dependency).
    Service,
    Version(Version),
    Instance(InstanceId),
}

/// What a fault does.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// Every request waits `fixed` plus a uniform share of `jitter` before it is sent.
    Latency { fixed: Duration, jitter: Duration },
    /// That share of requests (0..=1) is answered `status` by the proxy, unsent.
    Error { rate: f64, status: u16 },
    /// That share of requests has its client connection reset, unsent.
    Reset { rate: f64 },
    /// Answers (or a dependency's bytes) flow at most this many bytes per second.
    Bandwidth { bytes_per_sec: u64 },
    /// Requests are accepted and never answered, until the fault ends or the client gives up.
    Blackhole,
}

/// One fault, as the proxy applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub id: u64,
    pub target: FaultTarget,
    pub kind: FaultKind,
    /// Ignored from this moment on, whatever the registry does.
    pub until: Instant,
}

/// What happens to one request (or dependency connection) under the faults that apply to it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Injection {
    /// Waited before the request is sent (or the answer, for an error).
    pub delay: Duration,
    pub outcome: Outcome,
    /// The answer's bytes flow at most this fast.
    pub bytes_per_sec: Option<u64>,
}

/// How a request under faults ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// It goes to its instance as usual.
    #[default]
    Forward,
    /// The proxy answers this status itself.
    Error(u16),
    /// The client connection is reset.
    Reset,
    /// No answer until this moment, then the connection closes.
    Blackhole(Instant),
}

impl Injection {
    /// Nothing to do: the request goes as if no fault were set.
    pub fn is_none(&self) -> bool {
        self.delay.is_zero() && self.outcome == Outcome::Forward && self.bytes_per_sec.is_none()
    }
}

/// Random draws for one request, in [0, 1): one per fault that needs one, in list order.
pub trait Draw {
    fn next(&mut self) -> f64;
}

impl<F: FnMut() -> f64> Draw for F {
    fn next(&mut self) -> f64 {
        self()
    }
}

/// What the faults in `faults` do to a request of `version` on `instance` at `now`. Expired
/// faults are ignored. Latencies add up; the first blackhole, reset or error (in list order)
/// that fires decides the outcome; the lowest bandwidth cap wins.
pub fn decide(
    faults: &[Fault],
    version: Option<&Version>,
    instance: Option<&InstanceId>,
    now: Instant,
    draw: &mut dyn Draw,
) -> Injection {
    let mut out = Injection::default();
    for f in faults {
        if f.until <= now {
            continue;
        }
        let applies = match &f.target {
            FaultTarget::Service => true,
            FaultTarget::Version(v) => version == Some(v),
            FaultTarget::Instance(i) => instance == Some(i),
        };
        if !applies {
            continue;
        }
        match &f.kind {
            FaultKind::Latency { fixed, jitter } => {
                out.delay += *fixed + jitter.mul_f64(draw.next().clamp(0.0, 1.0));
            }
            FaultKind::Bandwidth { bytes_per_sec } => {
                let cap = (*bytes_per_sec).max(1);
                out.bytes_per_sec = Some(out.bytes_per_sec.map_or(cap, |c| c.min(cap)));
            }
            FaultKind::Blackhole => {
                if out.outcome == Outcome::Forward {
                    out.outcome = Outcome::Blackhole(f.until);
                }
            }
            FaultKind::Reset { rate } => {
                if draw.next() < *rate && out.outcome == Outcome::Forward {
                    out.outcome = Outcome::Reset;
                }
            }
            FaultKind::Error { rate, status } => {
                if draw.next() < *rate && out.outcome == Outcome::Forward {
                    out.outcome = Outcome::Error(*status);
                }
            }
        }
    }
    out
}

/// A service's faults as the request path reads them.
#[derive(Default)]
pub(crate) struct FaultSlot {
    /// Whether any fault is set: the one check a request makes when none is.
    on: AtomicBool,
    list: ArcSwapOption<Vec<Fault>>,
}

impl FaultSlot {
    pub(crate) fn set(&self, faults: Vec<Fault>) {
        if faults.is_empty() {
            self.on.store(false, Ordering::Release);
            self.list.store(None);
        } else {
            self.list.store(Some(Arc::new(faults)));
            self.on.store(true, Ordering::Release);
        }
    }

    /// Whether any fault is set (it may have expired: [`decide`] says).
    #[inline]
    pub(crate) fn any(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// What the faults do to this request, if any is set and applies.
    pub(crate) fn injection(
        &self,
        version: Option<&Version>,
        instance: Option<&InstanceId>,
    ) -> Option<Injection> {
        let list = self.list.load_full()?;
        let mut draw = || rand::random::<f64>();
        let inj = decide(&list, version, instance, Instant::now(), &mut draw);
        (!inj.is_none()).then_some(inj)
    }
}

/// Makes the close of `s` a reset (RST), as a crashing peer's would be.
///
/// tokio deprecates `set_linger` because a non-zero linger blocks the thread in `close` until
/// the data is sent; a zero linger never blocks: the kernel drops the data and resets at once.
#[allow(deprecated)]
pub(crate) fn reset_on_close(s: &tokio::net::TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// How long `bytes` take at `bytes_per_sec`.
pub(crate) fn pace(bytes: usize, bytes_per_sec: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / bytes_per_sec.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(target: FaultTarget, kind: FaultKind, until: Instant) -> Fault {
        Fault {
            id: 1,
            target,
            kind,
            until,
        }
    }

    fn v(s: &str) -> Version {
        Version::new(s)
    }

    /// One row per case: the faults, the request's version and instance, the draws, and what
    /// the request gets.
    #[test]
    fn faults_apply_to_their_target_until_they_expire() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let ms = Duration::from_millis;
        let inst = InstanceId::new("web-v2-1");
        let latency = FaultKind::Latency {
            fixed: ms(100),
            jitter: ms(50),
        };
        let errors = FaultKind::Error {
            rate: 0.5,
            status: 503,
        };
        let rows: Vec<(Vec<Fault>, &str, f64, Injection)> = vec![
            // Nothing set: nothing happens.
            (vec![], "v2", 0.0, Injection::default()),
            // Latency with jitter drawn at 0.5.
            (
                vec![fault(FaultTarget::Version(v("v2")), latency.clone(), later)],
                "v2",
                0.5,
                Injection {
                    delay: ms(125),
                    ..Injection::default()
                },
            ),
            // Another version is untouched.
            (
                vec![fault(FaultTarget::Version(v("v2")), latency.clone(), later)],
                "v1",
                0.5,
                Injection::default(),
            ),
            // Expired: ignored.
            (
                vec![fault(FaultTarget::Service, latency.clone(), now)],
                "v1",
                0.5,
                Injection::default(),
            ),
            // An error fires below its rate, not above.
            (
                vec![fault(FaultTarget::Service, errors.clone(), later)],
                "v1",
                0.2,
                Injection {
                    outcome: Outcome::Error(503),
                    ..Injection::default()
                },
            ),
            (
                vec![fault(FaultTarget::Service, errors.clone(), later)],
                "v1",
                0.7,
                Injection::default(),
            ),
            // One instance only.
            (
                vec![fault(
                    FaultTarget::Instance(inst.clone()),
                    FaultKind::Reset { rate: 1.0 },
                    later,
                )],
                "v2",
                0.0,
                Injection {
                    outcome: Outcome::Reset,
                    ..Injection::default()
                },
            ),
            // Blackhole first decides; the lowest bandwidth cap wins; latencies add.
            (
                vec![
                    fault(FaultTarget::Service, FaultKind::Blackhole, later),
                    fault(FaultTarget::Service, errors, later),
                    fault(
                        FaultTarget::Service,
                        FaultKind::Bandwidth { bytes_per_sec: 10 },
                        later,
                    ),
                    fault(
                        FaultTarget::Service,
                        FaultKind::Bandwidth { bytes_per_sec: 5 },
                        later,
                    ),
                    fault(FaultTarget::Service, latency.clone(), later),
                    fault(FaultTarget::Service, latency, later),
                ],
                "v2",
                0.0,
                Injection {
                    delay: ms(200),
                    outcome: Outcome::Blackhole(later),
                    bytes_per_sec: Some(5),
                },
            ),
        ];
        for (i, (faults, version, d, want)) in rows.into_iter().enumerate() {
            let mut draw = || d;
            let got = decide(&faults, Some(&v(version)), Some(&inst), now, &mut draw);
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn a_slot_is_off_until_set_and_off_again_when_cleared() {
        let s = FaultSlot::default();
        assert!(!s.any());
        assert!(s.injection(None, None).is_none());
        let later = Instant::now() + Duration::from_secs(60);
        s.set(vec![fault(
            FaultTarget::Service,
            FaultKind::Error {
                rate: 1.0,
                status: 500,
            },
            later,
        )]);
        assert!(s.any());
        assert_eq!(
            s.injection(None, None).map(|i| i.outcome),
            Some(Outcome::Error(500))
        );
        s.set(Vec::new());
        assert!(!s.any());
        assert_eq!(pace(1000, 1000), Duration::from_secs(1));
    }
}
