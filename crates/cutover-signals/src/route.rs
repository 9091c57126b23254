//! Routing, grouping and notification timing with Alertmanager's semantics.
//!
//! Routes are checked in order; the first whose matchers all match takes the alert, unless it
//! says `continue`, in which case the next matching routes take it too. An alert no route takes
//! goes to the default receiver (`[alerts] receiver`), if there is one. Each route groups its
//! alerts by `group_by` (default `alertname` and `service`); a new group waits `group_wait`
//! before its first notification, so that alerts firing together arrive together, then is
//! looked at every `group_interval`: it notifies when an alert joined or (for receivers with
//! `send_resolved`) resolved, and otherwise repeats a still-firing group every
//! `repeat_interval`. These are the rules of Alertmanager's dispatcher and its dedup stage
//! (`needsUpdate`), with time as an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cutover_core::Timestamp;

use crate::Labels;
use crate::matcher::Matcher;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub group_wait: Duration,
    pub group_interval: Duration,
    pub repeat_interval: Duration,
}

impl Default for Timing {
    /// Alertmanager's defaults.
    fn default() -> Timing {
        Timing {
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(5 * 60),
            repeat_interval: Duration::from_secs(4 * 3600),
        }
    }
}

/// The labels alerts are grouped by unless a route says otherwise.
pub fn default_group_by() -> Vec<String> {
    vec!["alertname".to_owned(), "service".to_owned()]
}

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub matchers: Vec<Matcher>,
    pub receiver: String,
    /// Keep looking for matching routes after this one.
    pub continue_matching: bool,
    /// `["..."]` groups by every label.
    pub group_by: Vec<String>,
    pub timing: Timing,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Routing {
    pub routes: Vec<Route>,
    /// The root route: what takes alerts no route matched. `None`: they are not sent.
    pub default: Option<Route>,
}

impl Routing {
    /// The routes that take an alert with `labels`: indices into `routes`, or `routes.len()`
    /// for the default.
    pub fn matching(&self, labels: &Labels) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.matchers.iter().all(|m| m.matches(labels)) {
                out.push(i);
                if !r.continue_matching {
                    return out;
                }
            }
        }
        if out.is_empty() && self.default.is_some() {
            out.push(self.routes.len());
        }
        out
    }

    pub fn route(&self, i: usize) -> Option<&Route> {
        self.routes.get(i).or(if i == self.routes.len() {
            self.default.as_ref()
        } else {
            None
        })
    }

    /// Alertmanager's route key: `{}` for the root, `{}/{severity="page"}` for a route.
    pub fn route_key(&self, i: usize) -> String {
        match self.routes.get(i) {
            None => "{}".to_owned(),
            Some(r) => {
                let ms: Vec<String> = r.matchers.iter().map(ToString::to_string).collect();
                // Two routes with the same matchers still get their own groups.
                let twin = self
                    .routes
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.matchers == r.matchers);
                let suffix = if twin { format!("/{i}") } else { String::new() };
                format!("{{}}/{{{}}}{suffix}", ms.join(","))
            }
        }
    }
}

/// `{alertname="X", service="web"}`, Prometheus's label-set text.
pub fn labels_text(labels: &Labels) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", parts.join(", "))
}

#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub labels: Labels,
    pub annotations: Labels,
    pub starts_at: Timestamp,
    /// Set once resolved.
    pub ends_at: Option<Timestamp>,
}

impl Alert {
    pub fn is_firing(&self) -> bool {
        self.ends_at.is_none()
    }

    /// Prometheus's fingerprint of the label set: FNV-1a 64 over names and values, each
    /// followed by the separator byte 0xff, in label order.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (k, v) in &self.labels {
            for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

/// What one receiver is told about one group.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub receiver: String,
    pub group_key: String,
    pub group_labels: Labels,
    /// Firing first, then resolved (only for receivers with `send_resolved`).
    pub alerts: Vec<Alert>,
}

impl Notification {
    pub fn firing(&self) -> usize {
        self.alerts.iter().filter(|a| a.is_firing()).count()
    }

    /// `firing` while any alert of the group fires, else `resolved`.
    pub fn status(&self) -> &'static str {
        if self.firing() > 0 {
            "firing"
        } else {
            "resolved"
        }
    }

    /// Labels every alert has with the same value.
    pub fn common_labels(&self) -> Labels {
        common(self.alerts.iter().map(|a| &a.labels))
    }

    pub fn common_annotations(&self) -> Labels {
        common(self.alerts.iter().map(|a| &a.annotations))
    }
}

fn common<'a>(mut sets: impl Iterator<Item = &'a Labels>) -> Labels {
    let Some(first) = sets.next() else {
        return Labels::new();
    };
    let mut out = first.clone();
    for s in sets {
        out.retain(|k, v| s.get(k) == Some(v));
    }
    out
}

/// What was last sent to a group's receiver.
#[derive(Clone, Debug, PartialEq)]
struct Sent {
    firing: BTreeSet<u64>,
    resolved: BTreeSet<u64>,
    at: Timestamp,
}

#[derive(Clone, Debug, PartialEq)]
struct Group {
    route: usize,
    labels: Labels,
    alerts: BTreeMap<u64, Alert>,
    next_flush: Timestamp,
    sent: Option<Sent>,
}

/// A group as `cutover alerts` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupView {
    pub receiver: String,
    pub group_key: String,
    pub alerts: usize,
    pub next_flush: Timestamp,
    pub last_sent: Option<Timestamp>,
}

/// A group's identity: its route and the values of its `group_by` labels.
type GroupId = (usize, Vec<(String, String)>);

/// The groups and what was sent for each: Alertmanager's dispatcher and notification log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dispatcher {
    groups: BTreeMap<GroupId, Group>,
}

fn group_labels(route: &Route, labels: &Labels) -> Labels {
    if route.group_by.iter().any(|g| g == "...") {
        return labels.clone();
    }
    route
        .group_by
        .iter()
        .filter_map(|g| labels.get(g).map(|v| (g.clone(), v.clone())))
        .collect()
}

/// Alertmanager's `DedupStage.needsUpdate`.
fn needs_update(
    sent: Option<&Sent>,
    firing: &BTreeSet<u64>,
    resolved: &BTreeSet<u64>,
    send_resolved: bool,
    repeat: Duration,
    now: Timestamp,
) -> bool {
    let Some(sent) = sent else {
        // Never notified: only if something fires (resolved alerts nobody heard of stay quiet).
        return !firing.is_empty();
    };
    if !firing.is_subset(&sent.firing) {
        return true;
    }
    if firing.is_empty() {
        // Everything resolved: the receiver hears of it if it heard of the firing ones.
        return !sent.firing.is_empty();
    }
    if send_resolved && !resolved.is_subset(&sent.resolved) {
        return true;
    }
    now.since(sent.at) >= repeat
}

impl Dispatcher {
    /// Takes the alerts firing now, resolves those of earlier calls that no longer fire, and
    /// returns the notifications due at `now`. `send_resolved` tells, per receiver name,
    /// whether it wants resolved alerts.
    pub fn tick(
        &mut self,
        routing: &Routing,
        firing: &[Alert],
        send_resolved: impl Fn(&str) -> bool,
        now: Timestamp,
    ) -> Vec<Notification> {
        let mut present: BTreeSet<(GroupId, u64)> = BTreeSet::new();
        for a in firing.iter().filter(|a| a.is_firing()) {
            for r in routing.matching(&a.labels) {
                let Some(route) = routing.route(r) else {
                    continue;
                };
                let labels = group_labels(route, &a.labels);
                let key = (r, labels.clone().into_iter().collect::<Vec<_>>());
                let fp = a.fingerprint();
                let g = self.groups.entry(key.clone()).or_insert_with(|| Group {
                    route: r,
                    labels,
                    alerts: BTreeMap::new(),
                    next_flush: now.plus(route.timing.group_wait),
                    sent: None,
                });
                g.alerts.insert(fp, a.clone());
                present.insert((key, fp));
            }
        }
        let mut out = Vec::new();
        let keys: Vec<_> = self.groups.keys().cloned().collect();
        for key in keys {
            let Some(g) = self.groups.get_mut(&key) else {
                continue;
            };
            for (fp, a) in g.alerts.iter_mut() {
                if a.ends_at.is_none() && !present.contains(&(key.clone(), *fp)) {
                    a.ends_at = Some(now);
                }
            }
            let Some(route) = routing.route(g.route) else {
                // The route is gone (a reload): so is its group.
                self.groups.remove(&key);
                continue;
            };
            if now < g.next_flush {
                continue;
            }
            let firing: BTreeSet<u64> = g
                .alerts
                .iter()
                .filter(|(_, a)| a.is_firing())
                .map(|(fp, _)| *fp)
                .collect();
            let resolved: BTreeSet<u64> = g
                .alerts
                .iter()
                .filter(|(_, a)| !a.is_firing())
                .map(|(fp, _)| *fp)
                .collect();
            let wants_resolved = send_resolved(&route.receiver);
            if needs_update(
                g.sent.as_ref(),
                &firing,
                &resolved,
                wants_resolved,
                route.timing.repeat_interval,
                now,
            ) {
                let mut alerts: Vec<Alert> = g
                    .alerts
                    .values()
                    .filter(|a| a.is_firing())
                    .cloned()
                    .collect();
                if wants_resolved {
                    alerts.extend(g.alerts.values().filter(|a| !a.is_firing()).cloned());
                }
                if !alerts.is_empty() {
                    out.push(Notification {
                        receiver: route.receiver.clone(),
                        group_key: format!(
                            "{}:{}",
                            routing.route_key(g.route),
                            labels_text(&g.labels)
                        ),
                        group_labels: g.labels.clone(),
                        alerts,
                    });
                }
                g.sent = Some(Sent {
                    firing,
                    resolved,
                    at: now,
                });
            }
            // A resolved alert leaves its group once the group has been flushed.
            g.alerts.retain(|_, a| a.is_firing());
            g.next_flush = now.plus(route.timing.group_interval);
            if g.alerts.is_empty() {
                self.groups.remove(&key);
            }
        }
        out
    }

    /// A notification could not be delivered: its group notifies again at its next flush,
    /// as Alertmanager retries a failed notification at the next `group_interval`.
    pub fn failed(&mut self, group_key: &str, routing: &Routing) {
        for g in self.groups.values_mut() {
            let key = format!("{}:{}", routing.route_key(g.route), labels_text(&g.labels));
            if key == group_key {
                g.sent = None;
            }
        }
    }

    pub fn groups(&self, routing: &Routing) -> Vec<GroupView> {
        self.groups
            .values()
            .map(|g| GroupView {
                receiver: routing
                    .route(g.route)
                    .map(|r| r.receiver.clone())
                    .unwrap_or_default(),
                group_key: format!("{}:{}", routing.route_key(g.route), labels_text(&g.labels)),
                alerts: g.alerts.len(),
                next_flush: g.next_flush,
                last_sent: g.sent.as_ref().map(|s| s.at),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn alert(name: &str, service: &str, severity: &str) -> Alert {
        Alert {
            labels: labels(&[
                ("alertname", name),
                ("service", service),
                ("severity", severity),
            ]),
            annotations: labels(&[("summary", "something")]),
            starts_at: Timestamp(0),
            ends_at: None,
        }
    }

    fn route(matchers: &[&str], receiver: &str, cont: bool) -> Route {
        Route {
            matchers: matchers
                .iter()
                .map(|m| Matcher::parse(m).unwrap())
                .collect(),
            receiver: receiver.into(),
            continue_matching: cont,
            group_by: default_group_by(),
            timing: Timing {
                group_wait: Duration::from_secs(30),
                group_interval: Duration::from_secs(300),
                repeat_interval: Duration::from_secs(4 * 3600),
            },
        }
    }

    fn t(s: u64) -> Timestamp {
        Timestamp(s * 1000)
    }

    #[test]
    fn first_match_wins_unless_continue() {
        let routing = Routing {
            routes: vec![
                route(&["severity=page"], "pager", false),
                route(&["service=~\"web|api\""], "slack", true),
                route(&["service=web"], "email", false),
                route(&["service=web"], "never", false),
            ],
            default: Some(route(&[], "fallback", false)),
        };
        let m = |a: &Alert| -> Vec<&str> {
            routing
                .matching(&a.labels)
                .into_iter()
                .map(|i| routing.route(i).unwrap().receiver.as_str())
                .collect()
        };
        assert_eq!(m(&alert("X", "web", "page")), vec!["pager"]);
        assert_eq!(m(&alert("X", "web", "ticket")), vec!["slack", "email"]);
        assert_eq!(m(&alert("X", "api", "ticket")), vec!["slack"]);
        assert_eq!(m(&alert("X", "db", "ticket")), vec!["fallback"]);
        assert_eq!(routing.route_key(0), "{}/{severity=\"page\"}");
        assert_eq!(routing.route_key(2), "{}/{service=\"web\"}/2");
        assert_eq!(routing.route_key(4), "{}");
        let no_default = Routing {
            routes: routing.routes.clone(),
            default: None,
        };
        assert!(
            no_default
                .matching(&alert("X", "db", "ticket").labels)
                .is_empty()
        );
    }

    /// Alertmanager's timeline for one group: wait, batch, interval, repeat, resolve.
    #[test]
    fn grouping_and_timing_follow_alertmanager() {
        let routing = Routing {
            routes: vec![route(&["severity=page"], "pager", false)],
            default: None,
        };
        let mut d = Dispatcher::default();
        let a = alert("ErrorBudgetBurn", "web", "page");
        let mut b = alert("ErrorBudgetBurn", "web", "page");
        b.labels.insert("slo".into(), "latency".into());
        let other = alert("ErrorBudgetBurn", "api", "page");
        let sent = |n: &[Notification]| -> Vec<(String, usize, &'static str)> {
            n.iter()
                .map(|n| (n.group_key.clone(), n.alerts.len(), n.status()))
                .collect()
        };
        let key = "{}/{severity=\"page\"}:{alertname=\"ErrorBudgetBurn\", service=\"web\"}";
        // t=0: a fires; nothing before group_wait.
        assert!(
            d.tick(&routing, std::slice::from_ref(&a), |_| true, t(0))
                .is_empty()
        );
        // t=10: b joins the same group (same alertname and service), api gets its own.
        assert!(
            d.tick(
                &routing,
                &[a.clone(), b.clone(), other.clone()],
                |_| true,
                t(10)
            )
            .is_empty()
        );
        // t=30: the web group flushes with both alerts; api waits until t=40.
        let n = d.tick(
            &routing,
            &[a.clone(), b.clone(), other.clone()],
            |_| true,
            t(30),
        );
        assert_eq!(sent(&n), vec![(key.to_owned(), 2, "firing")]);
        let n = d.tick(
            &routing,
            &[a.clone(), b.clone(), other.clone()],
            |_| true,
            t(40),
        );
        assert_eq!(n.len(), 1);
        assert!(n[0].group_key.contains("service=\"api\""));
        // Nothing new: no notification at the next group_interval.
        assert!(
            d.tick(
                &routing,
                &[a.clone(), b.clone(), other.clone()],
                |_| true,
                t(330)
            )
            .is_empty()
        );
        // b resolves at t=400: told at the next flush (t=630), with b resolved.
        assert!(
            d.tick(&routing, &[a.clone(), other.clone()], |_| true, t(400))
                .is_empty()
        );
        let n = d.tick(&routing, &[a.clone(), other.clone()], |_| true, t(630));
        assert_eq!(sent(&n), vec![(key.to_owned(), 2, "firing")]);
        assert!(n[0].alerts[1].ends_at == Some(t(400)));
        // Still firing, nothing new: repeated after repeat_interval (4h after t=630).
        let mut now = 630;
        let mut repeats = Vec::new();
        while now < 630 + 4 * 3600 + 300 {
            now += 300;
            for n in d.tick(&routing, &[a.clone(), other.clone()], |_| true, t(now)) {
                if n.group_key == key {
                    repeats.push(now);
                }
            }
        }
        assert_eq!(repeats, vec![630 + 4 * 3600]);
        // Everything resolves at t=15400: one resolved notification per group at its next
        // flush (15630), then the groups are gone.
        assert!(d.tick(&routing, &[], |_| true, t(15_400)).is_empty());
        let n = d.tick(&routing, &[], |_| true, t(15_700));
        let mut got = sent(&n);
        got.sort();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|(_, k, s)| *k == 1 && *s == "resolved"));
        assert!(d.groups(&routing).is_empty());
        assert!(d.tick(&routing, &[], |_| true, t(20_000)).is_empty());
    }

    #[test]
    fn send_resolved_false_and_failed_deliveries() {
        let routing = Routing {
            routes: vec![],
            default: Some(route(&[], "slack", false)),
        };
        let mut d = Dispatcher::default();
        let a = alert("HighErrorRate", "web", "ticket");
        assert!(
            d.tick(&routing, std::slice::from_ref(&a), |_| false, t(0))
                .is_empty()
        );
        let n = d.tick(&routing, std::slice::from_ref(&a), |_| false, t(30));
        assert_eq!(n.len(), 1);
        assert_eq!(
            n[0].group_key,
            "{}:{alertname=\"HighErrorRate\", service=\"web\"}"
        );
        assert_eq!(
            n[0].common_labels().get("severity").map(String::as_str),
            Some("ticket")
        );
        // The delivery failed: the next flush sends again although nothing changed.
        d.failed(&n[0].group_key, &routing);
        assert_eq!(
            d.tick(&routing, std::slice::from_ref(&a), |_| false, t(330))
                .len(),
            1
        );
        assert!(
            d.tick(&routing, std::slice::from_ref(&a), |_| false, t(630))
                .is_empty()
        );
        // Resolved, but this receiver does not want to hear it: nothing is sent.
        assert!(d.tick(&routing, &[], |_| false, t(700)).is_empty());
        assert!(d.tick(&routing, &[], |_| false, t(930)).is_empty());
        assert!(d.groups(&routing).is_empty());
        // An alert that fires and resolves within group_wait is never sent.
        assert!(
            d.tick(&routing, std::slice::from_ref(&a), |_| true, t(1000))
                .is_empty()
        );
        assert!(d.tick(&routing, &[], |_| true, t(1010)).is_empty());
        assert!(d.tick(&routing, &[], |_| true, t(1040)).is_empty());
        // Firing again after a resolution is news.
        assert!(
            d.tick(&routing, std::slice::from_ref(&a), |_| true, t(2000))
                .is_empty()
        );
        assert_eq!(d.tick(&routing, &[a], |_| true, t(2030)).len(), 1);
    }

    #[test]
    fn fingerprints_are_prometheus_fnv64a_and_stable() {
        let a = alert("X", "web", "page");
        let mut b = a.clone();
        b.annotations.insert("summary".into(), "different".into());
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.labels.insert("slo".into(), "x".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
        // FNV-1a 64 of the empty label set is the offset basis.
        let empty = Alert {
            labels: Labels::new(),
            ..a
        };
        assert_eq!(empty.fingerprint(), 0xcbf2_9ce4_8422_2325);
    }
}
