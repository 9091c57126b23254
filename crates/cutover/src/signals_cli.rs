//! `cutover slo`, `cutover alerts`, `cutover dora` and `cutover export prometheus-rules`, and
//! what `deploy` and `validate` add for signals (docs/reference.md §12).

use cutover_api::signals::{humantime_like, wire};
use cutover_config::Settings;
use serde_json::json;

use crate::client::Client;
use crate::commands::print_json;
use crate::exit::{CliError, CliResult, Code};
use crate::output::{err, out};

/// `validate` and `up` refuse a config whose receivers' environment variables are not set.
pub fn check_secrets(settings: &Settings) -> CliResult {
    let missing = settings.missing_secrets();
    if missing.is_empty() {
        return Ok(());
    }
    let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
    Err(CliError::new(Code::Usage, text.join("\n")))
}

/// What `validate --json` says about signals.
pub fn validate_json(settings: &Settings) -> serde_json::Value {
    let sig = &settings.signals;
    json!({
        "slos": settings.services.iter().flat_map(|s| s.slos.iter()).map(|s| json!({
            "service": s.service, "name": s.name, "objective": s.objective,
            "window": cutover_signals::short_duration(s.window),
            "latency": s.latency.map(cutover_signals::short_duration),
        })).collect::<Vec<_>>(),
        "receivers": sig.receivers.iter().map(|r| json!({"name": r.name, "kind": r.kind.as_str(), "send_resolved": r.send_resolved})).collect::<Vec<_>>(),
        "routes": sig.routing.routes.len(),
        "rules": sig.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        "freeze_when_budget_exhausted": sig.freeze_when_budget_exhausted,
    })
}

/// What `validate` says about signals, a line each.
pub fn validate_text(settings: &Settings) -> CliResult {
    for s in settings.services.iter().flat_map(|s| s.slos.iter()) {
        let w: Vec<String> = cutover_signals::slo::BURN_WINDOWS
            .iter()
            .map(|w| {
                format!(
                    "{} above {}× over {} and {}",
                    w.severity.as_str(),
                    cutover_signals::prom::num((w.factor(s.window) * 100.0).round() / 100.0),
                    cutover_signals::short_duration(w.long),
                    cutover_signals::short_duration(w.short)
                )
            })
            .collect();
        out(format_args!(
            "slo {}/{}: {}; alerts: {}",
            s.service,
            s.name,
            s.describe(),
            w.join(", ")
        ))?;
    }
    let sig = &settings.signals;
    if !sig.receivers.is_empty() || !sig.rules.is_empty() {
        out(format_args!(
            "alerts: {} receiver(s) ({}), {} route(s), {} rule(s){}",
            sig.receivers.len(),
            sig.receivers
                .iter()
                .map(|r| format!("{} {}", r.name, r.kind.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            sig.routing.routes.len(),
            sig.rules.len(),
            if sig.freeze_when_budget_exhausted {
                "; deploys freeze while an error budget is exhausted"
            } else {
                ""
            }
        ))?;
    }
    Ok(())
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_owned(), |v| format!("{:.3}%", v * 100.0))
}

pub async fn slo(client: &Client, service: Option<&str>, json: bool) -> CliResult {
    let path = match service {
        Some(s) => format!("/api/v1/slo?service={s}"),
        None => "/api/v1/slo".to_owned(),
    };
    let mut r: wire::SloReport = client.get(&path).await?;
    if json {
        for s in &mut r.slos {
            s.burn_down.clear();
        }
        return print_json(&r);
    }
    if r.slos.is_empty() {
        return out("no SLO is configured; add [[services.NAME.slo]] to the config");
    }
    for s in &r.slos {
        let latency = s
            .latency
            .as_ref()
            .map(|l| format!(" within {l}"))
            .unwrap_or_default();
        out(format_args!(
            "{}/{}  {}%{latency} over {}{}",
            s.service,
            s.name,
            s.objective,
            s.window,
            if s.exhausted {
                "  BUDGET EXHAUSTED"
            } else {
                ""
            }
        ))?;
        out(format_args!(
            "  SLI now {} (5m), {} over the window · budget left {:.1}% ({} bad of {} requests; {:.0} allowed)",
            pct(s.sli_now),
            pct(s.sli_window),
            s.budget_remaining * 100.0,
            s.bad,
            s.requests,
            s.allowed_bad
        ))?;
        let rates: Vec<String> = s
            .burn_rates
            .iter()
            .map(|b| {
                format!(
                    "{} {}",
                    b.window,
                    b.rate.map_or("-".to_owned(), |r| format!("{r:.1}×"))
                )
            })
            .collect();
        out(format_args!("  burn rate  {}", rates.join("  ")))?;
        let active: Vec<String> = s
            .alerts
            .iter()
            .filter(|a| a.active)
            .map(|a| {
                format!(
                    "{} ({} > {:.1}× over {} and {})",
                    a.severity, a.name, a.factor, a.long, a.short
                )
            })
            .collect();
        out(format_args!(
            "  alerts  {}",
            if active.is_empty() {
                "none".to_owned()
            } else {
                active.join(", ")
            }
        ))?;
    }
    Ok(())
}

pub async fn alerts(client: &Client, json: bool) -> CliResult {
    let r: wire::AlertsReport = client.get("/api/v1/alerts").await?;
    if json {
        return print_json(&r);
    }
    let live: Vec<&wire::Alert> = r
        .alerts
        .iter()
        .filter(|a| a.state == "pending" || a.state == "firing")
        .collect();
    if live.is_empty() {
        out("no alert is pending or firing")?;
    } else {
        out(format_args!(
            "{:<8} {:<22} {:<9} {:<12} {:<9} SUMMARY",
            "STATE", "ALERT", "SEVERITY", "SERVICE", "SINCE"
        ))?;
        for a in live {
            out(format_args!(
                "{:<8} {:<22} {:<9} {:<12} {:<9} {}",
                a.state,
                a.alertname,
                a.severity,
                a.service,
                a.since.get(11..19).unwrap_or(&a.since),
                a.summary
            ))?;
        }
    }
    for rc in &r.receivers {
        let state = if rc.failing {
            format!(
                "FAILING: {}",
                rc.last_error.as_deref().unwrap_or("no detail")
            )
        } else {
            "ok".to_owned()
        };
        out(format_args!(
            "receiver {} ({}): {} sent, {} failed, {state}",
            rc.name, rc.kind, rc.sent, rc.failed
        ))?;
    }
    Ok(())
}

pub async fn dora(client: &Client, service: Option<&str>, since: &str, json: bool) -> CliResult {
    let mut path = format!("/api/v1/dora?since={since}");
    if let Some(s) = service {
        path.push_str(&format!("&service={s}"));
    }
    let d: wire::Dora = client.get(&path).await?;
    if json {
        return print_json(&d);
    }
    let dur = |s: Option<f64>| {
        s.map_or("-".to_owned(), |s| {
            humantime_like(std::time::Duration::from_secs_f64(s.max(0.0)))
        })
    };
    let lvl = |l: &Option<String>| l.clone().unwrap_or_else(|| "-".to_owned());
    out(format_args!(
        "DORA for {} since {} ({since})",
        d.service.as_deref().unwrap_or("all services"),
        d.since.get(..10).unwrap_or(&d.since)
    ))?;
    out(format_args!(
        "{:<24}{:<44}{}",
        "deployment frequency",
        format!(
            "{} promoted ({:.2}/day): {}",
            d.deployments, d.deployments_per_day, d.deployment_frequency
        ),
        d.deployment_frequency_level
    ))?;
    out(format_args!(
        "{:<24}{:<44}{}",
        "lead time for changes",
        format!(
            "{} (median of {} with a commit time)",
            dur(d.lead_time_seconds),
            d.deployments_with_commit
        ),
        lvl(&d.lead_time_level)
    ))?;
    out(format_args!(
        "{:<24}{:<44}{}",
        "change failure rate",
        d.change_failure_rate.map_or("-".to_owned(), |r| format!(
            "{:.0}% ({} of {})",
            r * 100.0,
            d.failed_deployments,
            d.deployments
        )),
        lvl(&d.change_failure_level)
    ))?;
    out(format_args!(
        "{:<24}{:<44}{}",
        "time to restore",
        format!(
            "{} (median of {})",
            dur(d.time_to_restore_seconds),
            d.failures
                .iter()
                .filter(|f| f.time_to_restore_seconds.is_some())
                .count()
        ),
        lvl(&d.time_to_restore_level)
    ))?;
    out(format_args!(
        "caught by canary analysis: {} · aborted or failed: {} · rollbacks: {}",
        d.caught_by_analysis, d.not_promoted, d.rollbacks
    ))?;
    for f in &d.failures {
        out(format_args!(
            "failed: #{} {} ({})",
            f.rollout_id,
            f.how,
            f.time_to_restore_seconds
                .map_or("not restored yet".to_owned(), |s| format!(
                    "restored after {}",
                    dur(Some(s))
                ))
        ))?;
    }
    Ok(())
}

/// `cutover export prometheus-rules [SERVICE]`: from the config alone, no daemon needed.
pub fn export_rules(settings: &Settings, service: Option<&str>) -> CliResult {
    let text = crate::signals::prometheus_rules(settings, service)
        .map_err(|e| CliError::new(Code::Usage, e))?;
    if !settings.services.iter().any(|s| !s.slos.is_empty()) && settings.signals.rules.is_empty() {
        err(
            "note: no [[services.NAME.slo]] or [[alerts.rules]] in the config: only the rollout alerts are exported",
        );
    }
    crate::output::out_raw(&text)
}

/// The commit being deployed, from `git log -1` in the current directory: `(sha, time)`.
pub fn git_head() -> Option<(String, String)> {
    let out = std::process::Command::new("git")
        .args(["log", "-1", "--format=%H%n%cI"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    Some((
        lines.next()?.trim().to_owned(),
        lines.next()?.trim().to_owned(),
    ))
}

/// `--commit-time` must be RFC 3339 (exit 2 otherwise).
pub fn check_commit_time(t: &str) -> CliResult {
    crate::signals::parse_time(t).map(|_| ()).ok_or_else(|| {
        CliError::new(
            Code::Usage,
            format!("--commit-time {t:?} is not an RFC 3339 time like 2026-03-01T12:00:00Z"),
        )
    })
}
