//! `[[alerts.rules]]`: a measured value of a service compared with a number or a duration, and
//! the built-in alerts cutover raises from its own events.
//!
//! `when = "error_rate > 0.05"` reads as metric, comparison, threshold: `error_rate` (5xx share
//! of requests over the rule's window), `p99` (compared with a duration), `healthy_instances`
//! (instances taking traffic now) and `rps` (requests per second over the window).

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    ErrorRate,
    P99,
    HealthyInstances,
    Rps,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::ErrorRate => "error_rate",
            Metric::P99 => "p99",
            Metric::HealthyInstances => "healthy_instances",
            Metric::Rps => "rps",
        }
    }

    fn parse(s: &str) -> Option<Metric> {
        Some(match s {
            "error_rate" => Metric::ErrorRate,
            "p99" => Metric::P99,
            "healthy_instances" => Metric::HealthyInstances,
            "rps" => Metric::Rps,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Cmp {
    pub fn as_str(self) -> &'static str {
        match self {
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
        }
    }
}

/// `error_rate > 0.05`, `p99 > 300ms`, `healthy_instances < 2`, `rps < 1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Condition {
    pub metric: Metric,
    pub cmp: Cmp,
    /// p99 in seconds; the others as they are measured.
    pub threshold: f64,
}

/// What a rule is evaluated against: one service's numbers now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Over the rule's window; `None` without requests.
    pub error_rate: Option<f64>,
    pub p99: Option<Duration>,
    pub healthy_instances: u64,
    pub rps: f64,
}

impl Condition {
    /// Parses the `when` text; the error says what is wrong in a user's words.
    pub fn parse(
        text: &str,
        parse_duration: impl Fn(&str) -> Result<Duration, String>,
    ) -> Result<Condition, String> {
        let t = text.trim();
        let Some(op_at) = t.find(['<', '>']) else {
            return Err(format!(
                "{text:?} has no comparison; write it like \"error_rate > 0.05\" or \"p99 > 300ms\""
            ));
        };
        let name = t[..op_at].trim();
        let rest = &t[op_at..];
        let (cmp, value) = if let Some(v) = rest.strip_prefix(">=") {
            (Cmp::Ge, v)
        } else if let Some(v) = rest.strip_prefix("<=") {
            (Cmp::Le, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Cmp::Gt, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Cmp::Lt, v)
        } else {
            return Err(format!("{text:?}: use one of >, >=, <, <="));
        };
        let metric = Metric::parse(name).ok_or_else(|| {
            format!("{name:?} is not a metric; use error_rate, p99, healthy_instances or rps")
        })?;
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{text:?} has nothing to compare {name} with"));
        }
        let threshold = match metric {
            Metric::P99 => parse_duration(value)
                .map_err(|e| format!("p99 is compared with a duration like 300ms: {e}"))?
                .as_secs_f64(),
            _ => {
                let n: f64 = value.parse().map_err(|_| {
                    format!("{name} is compared with a number; {value:?} is not one")
                })?;
                if !n.is_finite() || n < 0.0 {
                    return Err(format!("{name} is compared with a number of at least 0"));
                }
                if metric == Metric::ErrorRate && n > 1.0 {
                    return Err(format!(
                        "error_rate is a share between 0 and 1 (0.05 = 5%); {n} is above 1"
                    ));
                }
                n
            }
        };
        Ok(Condition {
            metric,
            cmp,
            threshold,
        })
    }

    /// The measured value this condition compares, if there is one.
    pub fn value(&self, s: &Sample) -> Option<f64> {
        match self.metric {
            Metric::ErrorRate => s.error_rate,
            Metric::P99 => s.p99.map(|d| d.as_secs_f64()),
            Metric::HealthyInstances => Some(s.healthy_instances as f64),
            Metric::Rps => Some(s.rps),
        }
    }

    /// Whether it holds for `s`. Without a value (no requests in the window) it does not:
    /// a silent service has no error rate to alert on.
    pub fn holds(&self, s: &Sample) -> bool {
        self.value(s)
            .is_some_and(|v| self.cmp.holds(v, self.threshold))
    }

    /// `error_rate 7.9% > 5.0%`, with the measured value, for an alert's summary.
    pub fn describe(&self, s: &Sample) -> String {
        let show = |v: f64| match self.metric {
            Metric::ErrorRate => crate::percent(v),
            Metric::P99 => format!("{:.0}ms", v * 1000.0),
            Metric::HealthyInstances => format!("{v:.0}"),
            Metric::Rps => format!("{v:.1}/s"),
        };
        let now = self.value(s).map_or("none".to_owned(), show);
        format!(
            "{} {now} {} {}",
            self.metric.as_str(),
            self.cmp.as_str(),
            show(self.threshold)
        )
    }
}

/// One `[[alerts.rules]]` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSpec {
    pub name: String,
    /// `None`: every service, each its own alert.
    pub service: Option<String>,
    pub condition: Condition,
    /// How long the condition must hold before the alert fires (`for`).
    pub hold: Duration,
    /// What `error_rate`, `p99` and `rps` are measured over.
    pub window: Duration,
    pub severity: String,
}

/// The rule window when none is given: Prometheus's usual `rate(...[1m])`.
pub const DEFAULT_RULE_WINDOW: Duration = Duration::from_secs(60);

/// The alerts cutover raises from its own events.
pub mod builtin {
    use std::time::Duration;

    /// A rollout ended `rolled-back`: cutover judged a version bad and took it out.
    pub const ROLLED_BACK: &str = "RolloutRolledBack";
    /// A rollout ended `failed`: the candidate never became healthy.
    pub const FAILED: &str = "RolloutFailed";
    /// An instance exited [`CRASH_EXITS`] times within [`CRASH_WINDOW`].
    pub const CRASH_LOOPING: &str = "InstanceCrashLooping";
    /// A database backup failed (before a deploy, scheduled, or asked for); resolves at the
    /// service's next good backup or after [`RESOLVE_AFTER`].
    pub const BACKUP_FAILED: &str = "BackupFailed";
    pub const CRASH_EXITS: usize = 3;
    pub const CRASH_WINDOW: Duration = Duration::from_secs(10 * 60);
    /// A one-off alert (a rollback, a failed rollout) resolves after this long, or when the
    /// service's next rollout is promoted: Alertmanager's `resolve_timeout`.
    pub const RESOLVE_AFTER: Duration = Duration::from_secs(5 * 60);
    /// The severity of every built-in alert: someone should look, nobody need wake up
    /// (cutover already acted).
    pub const SEVERITY: &str = "ticket";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dur(s: &str) -> Result<Duration, String> {
        match s {
            "300ms" => Ok(Duration::from_millis(300)),
            "1s" => Ok(Duration::from_secs(1)),
            _ => Err(format!("{s:?} is not a duration")),
        }
    }

    #[test]
    fn conditions_parse_and_hold() {
        let sample = Sample {
            error_rate: Some(0.079),
            p99: Some(Duration::from_millis(450)),
            healthy_instances: 1,
            rps: 12.5,
        };
        let rows = [
            ("error_rate > 0.05", true, "error_rate 7.90% > 5.00%"),
            ("error_rate>=0.079", true, "error_rate 7.90% >= 7.90%"),
            ("error_rate < 0.05", false, "error_rate 7.90% < 5.00%"),
            ("p99 > 300ms", true, "p99 450ms > 300ms"),
            ("p99 <= 1s", true, "p99 450ms <= 1000ms"),
            ("healthy_instances < 2", true, "healthy_instances 1 < 2"),
            ("rps < 1", false, "rps 12.5/s < 1.0/s"),
        ];
        for (text, holds, said) in rows {
            let c = Condition::parse(text, dur).unwrap();
            assert_eq!(c.holds(&sample), holds, "{text}");
            assert_eq!(c.describe(&sample), said);
        }
        // No requests: no error rate and no p99, so neither alerts.
        let quiet = Sample::default();
        assert!(
            !Condition::parse("error_rate > 0", dur)
                .unwrap()
                .holds(&quiet)
        );
        assert!(!Condition::parse("p99 > 300ms", dur).unwrap().holds(&quiet));
        assert!(Condition::parse("rps < 1", dur).unwrap().holds(&quiet));
    }

    #[test]
    fn bad_conditions_say_what_is_wrong() {
        let rows = [
            ("error_rate 0.05", "no comparison"),
            ("latency > 1", "not a metric"),
            ("error_rate > lots", "compared with a number"),
            ("error_rate > 5", "between 0 and 1"),
            ("p99 > 0.3", "duration like 300ms"),
            ("rps >", "nothing to compare"),
            ("rps > -1", "at least 0"),
            ("rps => 1", "not a metric"),
        ];
        for (text, says) in rows {
            let e = Condition::parse(text, dur).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
