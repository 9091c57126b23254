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
                "    {:<18} {:<8} {:<22} {}",
                i.id, i.version, i.address, i.health
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
        "{:>4}  {:<10} {:<16} {:<10} {:<12} {:<20} {:>8}  reason\n",
        "id", "service", "from → to", "strategy", "outcome", "started", "took"
    );
    for r in rollouts {
        let took = r
            .duration_seconds
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:>4}  {:<10} {:<16} {:<10} {:<12} {:<20} {:>8}  {}",
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
            r.reason.as_deref().unwrap_or("")
        );
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
    fn clocks() {
        assert_eq!(clock("2026-11-22T15:04:05.123Z"), "15:04:05");
        assert_eq!(clock("short"), "short");
    }
}
