//! Plain-text rendering of API documents for the terminal: status, history, rollouts.
//!
//! Pure functions from wire types to strings, so they are testable and shared by `status`,
//! `status --watch`, `deploy --wait` and `demo`.

use std::fmt::Write;

use cutover_api::wire::{Event, Rollout, Service};

/// A horizontal bar of `width` cells filled to `percent`.
pub fn bar(percent: u8, width: usize) -> String {
    let filled = (usize::from(percent.min(100)) * width + 50) / 100;
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

/// `HH:MM:SS` of an RFC 3339 timestamp, for compact event lists.
pub fn clock(rfc3339: &str) -> &str {
    rfc3339.get(11..19).unwrap_or(rfc3339)
}

pub fn service(s: &Service, events: usize) -> String {
    let mut out = String::new();
    let rollout = match (&s.candidate, s.rollout_id) {
        (Some(c), Some(id)) => format!("  rollout #{id} {} → {c} ({})", s.stable, s.strategy),
        _ => format!("  {} ({})", s.stable, s.strategy),
    };
    let step = match (s.step, s.steps) {
        (Some(i), Some(n)) => format!("  step {i}/{n}"),
        _ => String::new(),
    };
    let _ = writeln!(out, "{}  {}{step}{rollout}", s.name, s.phase.to_uppercase());
    let _ = writeln!(
        out,
        "  listen {}{}",
        s.listen,
        s.preview_listen
            .as_deref()
            .map(|p| format!("  preview {p}"))
            .unwrap_or_default()
    );
    if let Some(why) = &s.degraded {
        let _ = writeln!(out, "  DEGRADED  {why}");
    }
    let _ = writeln!(out, "  weights");
    let mut weights: Vec<(&String, &u8)> = s.weights.iter().collect();
    weights.sort_by_key(|(v, _)| (**v != s.stable, (*v).clone()));
    for (v, w) in weights {
        let _ = writeln!(out, "    {v:<10} {} {w:>3}%", bar(*w, 30));
    }
    if !s.instances.is_empty() {
        let _ = writeln!(out, "  instances");
        for i in &s.instances {
            let _ = writeln!(
                out,
                "    {:<18} {:<8} {:<22} {}{}",
                i.id,
                i.version,
                i.address,
                i.health,
                i.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            );
        }
    }
    if s.failures > 0 || s.last_analysis.is_some() {
        let _ = writeln!(
            out,
            "  analysis  {} failed evaluation(s); last: {}",
            s.failures,
            s.last_analysis.as_deref().unwrap_or("-")
        );
    }
    if events > 0 && !s.events.is_empty() {
        let _ = writeln!(out, "  events");
        for e in s.events.iter().take(events).rev() {
            let _ = writeln!(out, "    {}", event_line(e));
        }
    }
    out
}

pub fn event_line(e: &Event) -> String {
    format!("{}  {:<17} {}", clock(&e.at), e.kind, e.message)
}

pub fn history(rollouts: &[Rollout]) -> String {
    if rollouts.is_empty() {
        return "no rollouts yet\n".into();
    }
    let mut out = format!(
        "{:>4}  {:<10} {:<16} {:<10} {:<12} {:<20} {:>8}  {:<20} reason\n",
        "id", "service", "from → to", "strategy", "outcome", "started", "took", "by"
    );
    for r in rollouts {
        let took = r
            .duration_seconds
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        // Who ended it, when a person's action did (abort, rollback).
        let ended_by = r
            .ended_by
            .as_deref()
            .map(|who| format!(" (by {who})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:>4}  {:<10} {:<16} {:<10} {:<12} {:<20} {:>8}  {:<20} {}{ended_by}",
            r.id,
            r.service,
            format!("{} → {}", r.from, r.to),
            r.strategy,
            r.outcome,
            r.started_at
                .get(..19)
                .unwrap_or(&r.started_at)
                .replace('T', " "),
            took,
            r.started_by.as_deref().unwrap_or("-"),
            r.reason.as_deref().unwrap_or("")
        );
        // Values come redacted unless `--show-env` asked for them (see `commands::history`).
        if !r.env.is_empty() {
            let env: Vec<String> = r.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "      env: {}", env.join(" "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars() {
        assert_eq!(bar(0, 4), "░░░░");
        assert_eq!(bar(50, 4), "██░░");
        assert_eq!(bar(100, 4), "████");
        assert_eq!(bar(200, 4), "████");
    }

    #[test]
    fn history_says_who() {
        let r = Rollout {
            id: 7,
            service: "web".into(),
            from: "v1".into(),
            to: "v2".into(),
            strategy: "canary".into(),
            outcome: "aborted".into(),
            reason: Some("aborted by user".into()),
            started_at: "2026-11-22T15:04:05.123Z".into(),
            finished_at: Some("2026-11-22T15:05:05.123Z".into()),
            duration_seconds: Some(60.0),
            env: Default::default(),
            started_by: Some("ana@build-1".into()),
            ended_by: Some("dashboard".into()),
            events: Vec::new(),
        };
        let text = history(std::slice::from_ref(&r));
        let row = text.lines().nth(1).unwrap_or_default();
        assert!(row.contains("ana@build-1"), "{text}");
        assert!(row.ends_with("aborted by user (by dashboard)"), "{text}");
        let old = Rollout {
            started_by: None,
            ended_by: None,
            ..r
        };
        let text = history(&[old]);
        assert!(
            text.lines()
                .nth(1)
                .unwrap_or_default()
                .ends_with("  aborted by user"),
            "{text}"
        );
    }

    #[test]
    fn clocks() {
        assert_eq!(clock("2026-11-22T15:04:05.123Z"), "15:04:05");
        assert_eq!(clock("short"), "short");
    }
}
