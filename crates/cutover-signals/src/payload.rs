//! What each receiver is sent, in the format its own tools expect.
//!
//! - `webhook`: Alertmanager's webhook payload, version "4", so consumers written for
//!   Alertmanager work unchanged.
//! - `slack`: an incoming-webhook message (`text` plus one coloured attachment).
//! - `pagerduty`: an Events API v2 `trigger` while the group fires and a `resolve` when it no
//!   longer does, with the same `dedup_key` (SHA-256 of the group key, as Alertmanager makes
//!   it), so PagerDuty folds repeats into one incident and closes it.
//! - `email`: a subject and a plain-text body.
//!
//! Titles follow Alertmanager's default template: `[FIRING:1] ErrorBudgetBurn web (page)`.

use cutover_core::Timestamp;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::Labels;
use crate::route::{Alert, Notification};

/// RFC 3339 in UTC, as Alertmanager writes times.
pub fn rfc3339(t: Timestamp) -> String {
    i64::try_from(t.as_millis())
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Alertmanager writes this as `endsAt` of an alert still firing.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn object(labels: &Labels) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

/// `[FIRING:2] ErrorBudgetBurn web (page)`, Alertmanager's default title.
pub fn title(n: &Notification) -> String {
    let status = match n.status() {
        "firing" => format!("FIRING:{}", n.firing()),
        _ => "RESOLVED".to_owned(),
    };
    let group: Vec<&str> = n.group_labels.values().map(String::as_str).collect();
    let common = n.common_labels();
    let rest: Vec<&str> = common
        .iter()
        .filter(|(k, _)| !n.group_labels.contains_key(*k))
        .map(|(_, v)| v.as_str())
        .collect();
    let extra = if rest.is_empty() {
        String::new()
    } else {
        format!(" ({})", rest.join(" "))
    };
    format!("[{status}] {}{extra}", group.join(" "))
}

fn fingerprint_hex(a: &Alert) -> String {
    format!("{:016x}", a.fingerprint())
}

/// Alertmanager's webhook payload, version 4.
pub fn webhook(n: &Notification, external_url: &str) -> Value {
    let alerts: Vec<Value> = n
        .alerts
        .iter()
        .map(|a| {
            json!({
                "status": if a.is_firing() { "firing" } else { "resolved" },
                "labels": object(&a.labels),
                "annotations": object(&a.annotations),
                "startsAt": rfc3339(a.starts_at),
                "endsAt": a.ends_at.map_or(ZERO_TIME.to_owned(), rfc3339),
                "generatorURL": external_url,
                "fingerprint": fingerprint_hex(a),
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status(),
        "receiver": n.receiver,
        "groupLabels": object(&n.group_labels),
        "commonLabels": object(&n.common_labels()),
        "commonAnnotations": object(&n.common_annotations()),
        "externalURL": external_url,
        "alerts": alerts,
    })
}

/// One line per alert: its summary (or its labels), and since when.
fn lines(n: &Notification) -> Vec<String> {
    n.alerts
        .iter()
        .map(|a| {
            let what = a
                .annotations
                .get("summary")
                .cloned()
                .unwrap_or_else(|| crate::route::labels_text(&a.labels));
            match a.ends_at {
                None => format!("firing since {}: {what}", rfc3339(a.starts_at)),
                Some(e) => format!("resolved at {}: {what}", rfc3339(e)),
            }
        })
        .collect()
}

/// A Slack incoming-webhook message.
pub fn slack(n: &Notification, external_url: &str) -> Value {
    let title = title(n);
    let text = lines(n).join("\n");
    json!({
        "text": title,
        "attachments": [{
            "color": if n.status() == "firing" { "danger" } else { "good" },
            "title": title,
            "title_link": external_url,
            "text": text,
            "fallback": format!("{title}\n{text}"),
        }],
    })
}

/// The `dedup_key` of a group: SHA-256 of its group key in hex, as Alertmanager makes it.
pub fn dedup_key(group_key: &str) -> String {
    Sha256::digest(group_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// PagerDuty's severity for an alert's `severity` label.
pub fn pagerduty_severity(label: Option<&str>) -> &'static str {
    match label {
        Some("page" | "critical") => "critical",
        Some("ticket" | "warning") => "warning",
        Some("info") => "info",
        _ => "error",
    }
}

/// An Events API v2 event: `trigger` while the group fires, `resolve` once it no longer does.
pub fn pagerduty(n: &Notification, routing_key: &str, external_url: &str) -> Value {
    let key = dedup_key(&n.group_key);
    if n.status() == "resolved" {
        return json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": key,
        });
    }
    let common = n.common_labels();
    let mut summary = title(n);
    if let Some(s) = n.alerts.first().and_then(|a| a.annotations.get("summary")) {
        summary = format!("{summary}: {s}");
    }
    // PagerDuty refuses summaries over 1024 characters.
    if summary.chars().count() > 1024 {
        summary = summary.chars().take(1021).collect::<String>() + "...";
    }
    let firing: Vec<Value> = n
        .alerts
        .iter()
        .filter(|a| a.is_firing())
        .map(|a| json!({"labels": object(&a.labels), "annotations": object(&a.annotations)}))
        .collect();
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": key,
        "payload": {
            "summary": summary,
            "source": common.get("service").map_or("cutover", String::as_str),
            "severity": pagerduty_severity(common.get("severity").map(String::as_str)),
            "timestamp": n.alerts.iter().map(|a| a.starts_at).min().map(rfc3339),
            "component": common.get("service"),
            "class": common.get("alertname"),
            "custom_details": {
                "firing": firing,
                "num_firing": n.firing(),
                "num_resolved": n.alerts.len() - n.firing(),
            },
        },
        "client": "cutover",
        "client_url": external_url,
    })
}

pub fn email_subject(n: &Notification) -> String {
    title(n)
}

/// The plain-text body: each alert with its labels and annotations.
pub fn email_body(n: &Notification, external_url: &str) -> String {
    let mut out = format!("{}\n\n", title(n));
    for (a, line) in n.alerts.iter().zip(lines(n)) {
        out.push_str(&line);
        out.push('\n');
        for (k, v) in &a.labels {
            out.push_str(&format!("  {k} = {v}\n"));
        }
        for (k, v) in a.annotations.iter().filter(|(k, _)| *k != "summary") {
            out.push_str(&format!("  {k}: {v}\n"));
        }
        out.push('\n');
    }
    out.push_str(&format!("Dashboard: {external_url}\n"));
    out
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

    fn notification(resolved: bool) -> Notification {
        let a = Alert {
            labels: labels(&[
                ("alertname", "ErrorBudgetBurn"),
                ("service", "web"),
                ("severity", "page"),
                ("slo", "availability"),
            ]),
            annotations: labels(&[("summary", "burn 31.2× over 1h"), ("runbook", "r")]),
            starts_at: Timestamp(1_700_000_000_000),
            ends_at: resolved.then_some(Timestamp(1_700_000_600_000)),
        };
        Notification {
            receiver: "oncall".into(),
            group_key: "{}/{severity=\"page\"}:{alertname=\"ErrorBudgetBurn\", service=\"web\"}"
                .into(),
            group_labels: labels(&[("alertname", "ErrorBudgetBurn"), ("service", "web")]),
            alerts: vec![a],
        }
    }

    #[test]
    fn webhook_is_alertmanager_v4() {
        let v = webhook(&notification(false), "http://127.0.0.1:7070/");
        assert_eq!(v["version"], "4");
        assert_eq!(v["status"], "firing");
        assert_eq!(v["receiver"], "oncall");
        assert_eq!(v["truncatedAlerts"], 0);
        assert_eq!(v["groupLabels"]["service"], "web");
        assert_eq!(v["commonLabels"]["slo"], "availability");
        assert_eq!(v["commonAnnotations"]["runbook"], "r");
        assert_eq!(v["externalURL"], "http://127.0.0.1:7070/");
        let a = &v["alerts"][0];
        assert_eq!(a["status"], "firing");
        assert_eq!(a["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a["fingerprint"].as_str().map(str::len), Some(16));
        let r = webhook(&notification(true), "x");
        assert_eq!(r["status"], "resolved");
        assert_eq!(r["alerts"][0]["endsAt"], "2023-11-14T22:23:20Z");
    }

    #[test]
    fn pagerduty_triggers_and_resolves_with_one_dedup_key() {
        let t = pagerduty(&notification(false), "KEY", "http://x/");
        assert_eq!(t["event_action"], "trigger");
        assert_eq!(t["routing_key"], "KEY");
        assert_eq!(t["payload"]["severity"], "critical");
        assert_eq!(t["payload"]["source"], "web");
        assert_eq!(t["payload"]["class"], "ErrorBudgetBurn");
        assert_eq!(
            t["payload"]["summary"],
            "[FIRING:1] ErrorBudgetBurn web (page availability): burn 31.2× over 1h"
        );
        let r = pagerduty(&notification(true), "KEY", "http://x/");
        assert_eq!(r["event_action"], "resolve");
        assert_eq!(t["dedup_key"], r["dedup_key"]);
        // SHA-256 hex, stable across runs and restarts.
        assert_eq!(
            dedup_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(pagerduty_severity(Some("ticket")), "warning");
        assert_eq!(pagerduty_severity(None), "error");
    }

    #[test]
    fn slack_and_email_read_well() {
        let s = slack(&notification(false), "http://x/");
        assert_eq!(
            s["text"],
            "[FIRING:1] ErrorBudgetBurn web (page availability)"
        );
        assert_eq!(s["attachments"][0]["color"], "danger");
        let s = slack(&notification(true), "http://x/");
        assert_eq!(
            s["text"],
            "[RESOLVED] ErrorBudgetBurn web (page availability)"
        );
        assert_eq!(s["attachments"][0]["color"], "good");
        let body = email_body(&notification(false), "http://x/");
        assert!(body.contains("firing since 2023-11-14T22:13:20Z: burn 31.2× over 1h"));
        assert!(body.contains("  slo = availability"));
        assert!(body.contains("  runbook: r"));
        assert!(body.ends_with("Dashboard: http://x/\n"));
    }
}
