//! Rules for a user's own Prometheus: the same SLOs and alerts over cutover's metric names.
//!
//! The SLO rules are Sloth's: SLI error ratios recorded as `slo:sli_error:ratio_rate<window>`
//! for every alert window and the period, the metadata series (`slo:objective:ratio`,
//! `slo:error_budget:ratio`, `slo:period_error_budget_remaining:ratio`, …) and the
//! multi-window multi-burn-rate page and ticket alerts, with Sloth's `sloth_id`,
//! `sloth_service`, `sloth_slo` and `sloth_window` labels, so Sloth's Grafana dashboards work
//! on them. `[[alerts.rules]]` and the rollout built-ins become plain alerting rules. The text
//! is YAML whose every string is double-quoted (JSON's quoting, which YAML reads the same).

use std::fmt::Write;

use crate::rules::{Cmp, Metric, RuleSpec, builtin};
use crate::short_duration;
use crate::slo::{BURN_WINDOWS, REPORT_WINDOWS, Severity, SloSpec};

/// The metric names the rules read (those of `cutover-metrics`).
#[derive(Clone, Copy, Debug)]
pub struct Names<'a> {
    pub requests: &'a str,
    pub duration: &'a str,
    pub instances: &'a str,
    pub rollouts: &'a str,
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `0.3` for 300 ms: how the exposition writes the `le` of a bucket at that latency.
pub fn le(d: std::time::Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// A number as a rule writes it: `0.001`, not `0.0010000000000000009`.
pub fn num(x: f64) -> String {
    let s = format!("{x:.10}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

fn sli_error_expr(slo: &SloSpec, n: &Names<'_>, window: &str) -> String {
    let svc = esc(&slo.service);
    match slo.latency {
        None => format!(
            "(sum(rate({r}{{service=\"{svc}\",code=\"5xx\"}}[{window}])))\n/\n(sum(rate({r}{{service=\"{svc}\"}}[{window}])))",
            r = n.requests
        ),
        Some(l) => format!(
            "1 - (\n  (sum(rate({d}_bucket{{service=\"{svc}\",le=\"{le}\"}}[{window}])))\n  /\n  (sum(rate({d}_count{{service=\"{svc}\"}}[{window}])))\n)",
            d = n.duration,
            le = le(l)
        ),
    }
}

struct Rule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
    hold: Option<String>,
    labels: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
}

fn write_group(out: &mut String, name: &str, rules: &[Rule]) {
    let _ = writeln!(out, "  - name: {}", q(name));
    let _ = writeln!(out, "    rules:");
    for r in rules {
        if let Some(rec) = &r.record {
            let _ = writeln!(out, "      - record: {}", q(rec));
        }
        if let Some(a) = &r.alert {
            let _ = writeln!(out, "      - alert: {}", q(a));
        }
        let _ = writeln!(out, "        expr: {}", q(&r.expr));
        if let Some(f) = &r.hold {
            let _ = writeln!(out, "        for: {}", q(f));
        }
        for (key, pairs) in [("labels", &r.labels), ("annotations", &r.annotations)] {
            if pairs.is_empty() {
                continue;
            }
            let _ = writeln!(out, "        {key}:");
            for (k, v) in pairs {
                let _ = writeln!(out, "          {k}: {}", q(v));
            }
        }
    }
}

fn slo_labels(slo: &SloSpec) -> Vec<(String, String)> {
    vec![
        ("sloth_id".into(), slo.id()),
        ("sloth_service".into(), slo.service.clone()),
        ("sloth_slo".into(), slo.name.clone()),
    ]
}

fn filter(slo: &SloSpec) -> String {
    let parts: Vec<String> = slo_labels(slo)
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

fn metric(window: &str) -> String {
    format!("slo:sli_error:ratio_rate{window}")
}

fn slo_groups(out: &mut String, slo: &SloSpec, n: &Names<'_>) {
    let period = short_duration(slo.window);
    // Every alert window and the report windows, shortest first.
    let mut windows: Vec<std::time::Duration> = REPORT_WINDOWS.to_vec();
    windows.sort();
    windows.dedup();
    let mut rec: Vec<Rule> = windows
        .iter()
        .map(|w| {
            let w = short_duration(*w);
            let mut labels = slo_labels(slo);
            labels.push(("sloth_window".into(), w.clone()));
            Rule {
                record: Some(metric(&w)),
                alert: None,
                expr: sli_error_expr(slo, n, &w),
                hold: None,
                labels,
                annotations: Vec::new(),
            }
        })
        .collect();
    // The period from the 5m ratio, as Sloth's optimised rule does: a ratio of sums, not an
    // average of ratios.
    let five = metric("5m");
    rec.push(Rule {
        record: Some(metric(&period)),
        alert: None,
        expr: format!(
            "sum_over_time({five}{f}[{period}])\n/ ignoring (sloth_window)\ncount_over_time({five}{f}[{period}])",
            f = filter(slo)
        ),
        hold: None,
        // The SLO's labels too, though the source series has them: without them the rules of
        // two SLOs would be duplicates to `promtool check rules`.
        labels: {
            let mut l = slo_labels(slo);
            l.push(("sloth_window".into(), period.clone()));
            l
        },
        annotations: Vec::new(),
    });
    write_group(
        out,
        &format!("cutover-slo-sli-recordings-{}", slo.id()),
        &rec,
    );

    let ratio = slo.objective / 100.0;
    let f = filter(slo);
    let burn = |m: &str| {
        format!(
            "{m}{f}\n/ on(sloth_id, sloth_slo, sloth_service) group_left\nslo:error_budget:ratio{f}"
        )
    };
    let mut info = slo_labels(slo);
    info.push(("sloth_mode".into(), "cutover".into()));
    info.push(("sloth_objective".into(), format!("{}", slo.objective)));
    let meta = vec![
        ("slo:objective:ratio", format!("vector({})", num(ratio))),
        (
            "slo:error_budget:ratio",
            format!("vector(1-{})", num(ratio)),
        ),
        (
            "slo:time_period:days",
            format!("vector({})", num(slo.window.as_secs_f64() / 86_400.0)),
        ),
        ("slo:current_burn_rate:ratio", burn(&five)),
        ("slo:period_burn_rate:ratio", burn(&metric(&period))),
        (
            "slo:period_error_budget_remaining:ratio",
            format!("1 - slo:period_burn_rate:ratio{f}"),
        ),
        ("sloth_slo_info", "vector(1)".to_owned()),
    ];
    let meta: Vec<Rule> = meta
        .into_iter()
        .map(|(name, expr)| Rule {
            record: Some(name.to_owned()),
            alert: None,
            expr,
            hold: None,
            labels: if name == "sloth_slo_info" {
                info.clone()
            } else {
                slo_labels(slo)
            },
            annotations: Vec::new(),
        })
        .collect();
    write_group(
        out,
        &format!("cutover-slo-meta-recordings-{}", slo.id()),
        &meta,
    );

    let budget = num(1.0 - ratio);
    let alerts: Vec<Rule> = [Severity::Page, Severity::Ticket]
        .into_iter()
        .map(|sev| {
            let pair = |i: usize| {
                let w = BURN_WINDOWS[i];
                let factor = num(w.factor(slo.window));
                let (s, l) = (short_duration(w.short), short_duration(w.long));
                format!(
                    "(\n    ({s_m}{f} > ({factor} * {budget}))\n    and ignoring (sloth_window)\n    ({l_m}{f} > ({factor} * {budget}))\n)",
                    s_m = metric(&s),
                    l_m = metric(&l)
                )
            };
            let (quick, slow) = match sev {
                Severity::Page => (0, 1),
                Severity::Ticket => (2, 3),
            };
            Rule {
                record: None,
                alert: Some(crate::slo::ALERT_NAME.to_owned()),
                expr: format!("{}\nor ignoring (sloth_window)\n{}", pair(quick), pair(slow)),
                hold: None,
                labels: vec![
                    ("severity".into(), sev.as_str().into()),
                    ("sloth_severity".into(), sev.as_str().into()),
                    ("service".into(), slo.service.clone()),
                    ("slo".into(), slo.name.clone()),
                ],
                annotations: vec![
                    (
                        "title".into(),
                        format!(
                            "({}) {} {} SLO error budget burn rate is too fast.",
                            sev.as_str(),
                            slo.service,
                            slo.name
                        ),
                    ),
                    (
                        "summary".into(),
                        format!(
                            "{} {} ({}) is burning its error budget faster than the {} windows allow.",
                            slo.service,
                            slo.name,
                            slo.describe(),
                            sev.as_str()
                        ),
                    ),
                ],
            }
        })
        .collect();
    write_group(out, &format!("cutover-slo-alerts-{}", slo.id()), &alerts);
}

fn cmp(c: Cmp) -> &'static str {
    c.as_str()
}

fn rule_expr(r: &RuleSpec, n: &Names<'_>) -> String {
    let sel = |extra: &str| -> String {
        let mut parts = Vec::new();
        if let Some(s) = &r.service {
            parts.push(format!("service=\"{}\"", esc(s)));
        }
        if !extra.is_empty() {
            parts.push(extra.to_owned());
        }
        format!("{{{}}}", parts.join(","))
    };
    let w = short_duration(r.window);
    let c = &r.condition;
    let value = match c.metric {
        Metric::ErrorRate => format!(
            "(\n  sum by (service) (rate({req}{}[{w}]))\n  /\n  sum by (service) (rate({req}{}[{w}]))\n)",
            sel("code=\"5xx\""),
            sel(""),
            req = n.requests
        ),
        Metric::P99 => format!(
            "histogram_quantile(0.99, sum by (service, le) (rate({}_bucket{}[{w}])))",
            n.duration,
            sel("")
        ),
        Metric::HealthyInstances => format!(
            "sum by (service) ({}{})",
            n.instances,
            sel("health=\"healthy\"")
        ),
        Metric::Rps => format!("sum by (service) (rate({}{}[{w}]))", n.requests, sel("")),
    };
    format!("{value} {} {}", cmp(c.cmp), num(c.threshold))
}

/// The whole rules file: SLO groups for `slos`, then a group of `rules` and the built-ins.
pub fn rules_file(slos: &[SloSpec], rules: &[RuleSpec], n: &Names<'_>) -> String {
    let mut out = String::from(
        "# Prometheus rules generated by `cutover export prometheus-rules` over cutover's own\n# metrics: Sloth-style SLO recording rules and multi-window multi-burn-rate alerts, then\n# the [[alerts.rules]] of the config and the rollout alerts. Check with\n# `promtool check rules FILE`.\ngroups:\n",
    );
    for slo in slos {
        slo_groups(&mut out, slo, n);
    }
    let mut alerting: Vec<Rule> = rules
        .iter()
        .map(|r| {
            let mut labels = vec![("severity".to_owned(), r.severity.clone())];
            if let Some(s) = &r.service {
                labels.push(("service".into(), s.clone()));
            }
            Rule {
                record: None,
                alert: Some(r.name.clone()),
                expr: rule_expr(r, n),
                hold: Some(short_duration(r.hold)),
                labels,
                annotations: vec![(
                    "summary".into(),
                    format!(
                        "{{{{ $labels.service }}}}: {} {} {} (value {{{{ $value }}}})",
                        r.condition.metric.as_str(),
                        r.condition.cmp.as_str(),
                        num(r.condition.threshold)
                    ),
                )],
            }
        })
        .collect();
    for (name, outcome, what) in [
        (builtin::ROLLED_BACK, "rolled-back", "rolled back"),
        (builtin::FAILED, "failed", "failed"),
    ] {
        alerting.push(Rule {
            record: None,
            alert: Some(name.to_owned()),
            expr: format!(
                "sum by (service) (increase({}{{outcome=\"{outcome}\"}}[5m])) > 0",
                n.rollouts
            ),
            hold: None,
            labels: vec![("severity".into(), builtin::SEVERITY.into())],
            annotations: vec![(
                "summary".into(),
                format!("A rollout of {{{{ $labels.service }}}} {what} in the last 5 minutes."),
            )],
        });
    }
    write_group(&mut out, "cutover-alerts", &alerting);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Condition;
    use std::time::Duration;

    pub const NAMES: Names<'static> = Names {
        requests: "cutover_requests_total",
        duration: "cutover_request_duration_seconds",
        instances: "cutover_instances",
        rollouts: "cutover_rollouts_total",
    };

    fn slo(latency: Option<Duration>) -> SloSpec {
        SloSpec {
            service: "web".into(),
            name: if latency.is_some() {
                "latency"
            } else {
                "availability"
            }
            .into(),
            objective: 99.9,
            window: Duration::from_secs(30 * 86_400),
            latency,
            min_requests: 100,
        }
    }

    #[test]
    fn the_rules_file_has_sloths_names_and_factors() {
        let rule = RuleSpec {
            name: "HighErrorRate".into(),
            service: Some("web".into()),
            condition: Condition::parse("error_rate > 0.05", |_| Err(String::new())).unwrap(),
            hold: Duration::from_secs(300),
            window: Duration::from_secs(60),
            severity: "page".into(),
        };
        let text = rules_file(
            &[slo(None), slo(Some(Duration::from_millis(300)))],
            &[rule],
            &NAMES,
        );
        for want in [
            "  - name: \"cutover-slo-sli-recordings-web-availability\"",
            "      - record: \"slo:sli_error:ratio_rate5m\"",
            "      - record: \"slo:sli_error:ratio_rate3d\"",
            "      - record: \"slo:sli_error:ratio_rate30d\"",
            "          sloth_window: \"1h\"",
            "      - record: \"slo:period_error_budget_remaining:ratio\"",
            "      - alert: \"ErrorBudgetBurn\"",
            "          severity: \"page\"",
            "      - alert: \"HighErrorRate\"",
            "        for: \"5m\"",
            "      - alert: \"RolloutRolledBack\"",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want}:\n{text}");
        }
        assert!(text.contains("(14.4 * 0.001))"), "{text}");
        assert!(text.contains("(6 * 0.001))"));
        assert!(text.contains("(1 * 0.001))"));
        assert!(text.contains("vector(0.999)"));
        assert!(text.contains("le=\\\"0.3\\\""), "latency bucket");
        assert!(text.contains("cutover_request_duration_seconds_count"));
    }
}
