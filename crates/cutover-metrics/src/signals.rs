//! The SLO, alert and receiver gauges of docs/reference.md §12 in the exposition.
//!
//! The signals task computes them and hands over a whole [`SignalGauges`] each round; this
//! module only renders what it was given, with the names from [`crate::names`].

use std::fmt::Write;

use crate::{esc, header, names};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SloGauge {
    pub service: String,
    pub slo: String,
    /// 0.999 for 99.9%.
    pub objective: f64,
    pub budget_remaining: f64,
    /// `(window, burn rate)`, e.g. `("5m", 14.2)`; windows without traffic are left out.
    pub burn_rates: Vec<(String, f64)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct AlertGauge {
    pub alertname: String,
    pub severity: String,
    /// `pending` or `firing`.
    pub state: String,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceiverGauge {
    pub receiver: String,
    pub sent: u64,
    pub failed: u64,
    /// The last delivery failed after all its attempts.
    pub failing: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SignalGauges {
    pub slos: Vec<SloGauge>,
    pub alerts: Vec<AlertGauge>,
    pub receivers: Vec<ReceiverGauge>,
}

/// Prometheus writes `+Inf`/`-Inf`/`NaN`; Rust's `inf` is not valid exposition.
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

impl SignalGauges {
    pub(crate) fn render(&self, out: &mut String) {
        let slo = |s: &SloGauge| format!("service=\"{}\",slo=\"{}\"", esc(&s.service), esc(&s.slo));
        header(
            out,
            names::SLO_OBJECTIVE,
            "gauge",
            "The SLO's objective as a ratio of good requests.",
        );
        for s in &self.slos {
            let _ = writeln!(
                out,
                "{}{{{}}} {}",
                names::SLO_OBJECTIVE,
                slo(s),
                value(s.objective)
            );
        }
        header(
            out,
            names::SLO_BUDGET_REMAINING,
            "gauge",
            "Error budget left over the SLO window: 1 untouched, 0 spent, below 0 overspent.",
        );
        for s in &self.slos {
            let _ = writeln!(
                out,
                "{}{{{}}} {}",
                names::SLO_BUDGET_REMAINING,
                slo(s),
                value(s.budget_remaining)
            );
        }
        header(
            out,
            names::SLO_BURN_RATE,
            "gauge",
            "How fast the error budget burns over a window; 1 spends exactly the budget over the SLO window.",
        );
        for s in &self.slos {
            for (w, r) in &s.burn_rates {
                let _ = writeln!(
                    out,
                    "{}{{{},window=\"{}\"}} {}",
                    names::SLO_BURN_RATE,
                    slo(s),
                    esc(w),
                    value(*r)
                );
            }
        }
        header(
            out,
            names::ALERTS,
            "gauge",
            "Alerts by name, severity and state (pending, firing).",
        );
        for a in &self.alerts {
            let _ = writeln!(
                out,
                "{}{{alertname=\"{}\",severity=\"{}\",state=\"{}\"}} {}",
                names::ALERTS,
                esc(&a.alertname),
                esc(&a.severity),
                esc(&a.state),
                a.count
            );
        }
        header(
            out,
            names::ALERT_NOTIFICATIONS,
            "counter",
            "Notifications to alert receivers, by outcome (a failure is counted once all its attempts failed).",
        );
        for r in &self.receivers {
            for (outcome, n) in [("sent", r.sent), ("failed", r.failed)] {
                let _ = writeln!(
                    out,
                    "{}{{receiver=\"{}\",outcome=\"{outcome}\"}} {n}",
                    names::ALERT_NOTIFICATIONS,
                    esc(&r.receiver)
                );
            }
        }
        header(
            out,
            names::ALERT_RECEIVER_FAILING,
            "gauge",
            "1 while a receiver's last notification failed after all its attempts.",
        );
        for r in &self.receivers {
            let _ = writeln!(
                out,
                "{}{{receiver=\"{}\"}} {}",
                names::ALERT_RECEIVER_FAILING,
                esc(&r.receiver),
                u8::from(r.failing)
            );
        }
    }
}
