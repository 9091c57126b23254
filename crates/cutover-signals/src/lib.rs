//! cutover-signals: what the proxy's measurements mean for the people who run a service.
//!
//! Everything here is a pure function of counts, history and the time passed in as an argument:
//! SLOs with their error budgets and the multi-window multi-burn-rate alerts of the SRE
//! Workbook and Sloth ([`slo`]), alert rules and the pending → firing → resolved state machine
//! ([`rules`], [`alert`]), Alertmanager's matchers, routing, grouping and timing ([`matcher`],
//! [`route`]), the JSON and text the receivers expect ([`payload`]), the four DORA keys
//! ([`dora`]) and rules for a user's own Prometheus ([`prom`]).
//!
//! It must not do IO, read a clock or hold a secret: the daemon (`crates/cutover/src/signals`)
//! reads the counts, keeps them in SQLite, calls these functions and sends what they build.
//! Receiver payloads are JSON because that is the receivers' wire format; nothing else here
//! knows serde.

pub mod alert;
pub mod dora;
pub mod matcher;
pub mod payload;
pub mod prom;
pub mod route;
pub mod rules;
pub mod slo;

use std::collections::BTreeMap;

/// An alert's identity and routing key: `alertname`, `service`, `severity`, … → value.
pub type Labels = BTreeMap<String, String>;

/// Formats `v` as a percentage with enough digits to tell 99.9 from 99.95.
pub fn percent(v: f64) -> String {
    let p = v * 100.0;
    if p.abs() >= 10.0 || p == 0.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.2}%")
    }
}

/// A duration the way a config file writes it: `5m`, `1h`, `3d`, `90s`, `250ms`.
pub fn short_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_and_percentages_read_like_config() {
        for (d, s) in [
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(3 * 86_400), "3d"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(short_duration(d), s);
        }
        assert_eq!(percent(0.001), "0.10%");
        assert_eq!(percent(0.5), "50.0%");
        assert_eq!(percent(-1.31), "-131.0%");
    }
}
