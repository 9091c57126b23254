//! Whole rollouts through the real daemon: canary promotion, automatic rollback of a bad
//! canary, a blue-green switch under load and one promoted by hand after a preview, a rolling
//! update, and recovery from a SIGKILL mid-rollout.

use std::time::Duration;

use crate::harness::{Daemon, Load, healthy, http, pid_alive, stderr};

const QUICK_STEPS: &str =
    r#"[ { weight = 20, pause = "2s" }, { weight = 50, pause = "1s" }, { weight = 100 } ]"#;

#[test]
fn canary_is_promoted_and_a_bad_canary_rolled_back_by_analysis() {
    let d = Daemon::start(QUICK_STEPS);
    let load = Load::start(d.web, 4, Duration::from_millis(5));
    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert!(
        out.status.success(),
        "v2 should be promoted: {}\n{}",
        stderr(&out),
        d.log()
    );
    let s = d.status();
    assert_eq!(
        (s["phase"].as_str(), s["stable"].as_str()),
        (Some("stable"), Some("v2"))
    );
    assert_eq!(s["weights"]["v2"], 100);

    let out = d.cli(&[
        "deploy",
        "web",
        "v3",
        "--env",
        "DEMO_ERROR_RATE=0.3",
        "--wait",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a bad canary ends the wait with exit 1: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("rolled-back"), "{}", stderr(&out));
    let tally = load.stop();
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    let last = &h["rollouts"][0];
    assert_eq!(last["outcome"], "rolled-back");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("analysis failed"),
        "rolled back by analysis, with numbers: {reason}"
    );
    assert_eq!(h["rollouts"][1]["outcome"], "promoted");
    let s = d.status();
    assert_eq!(s["stable"], "v2");
    assert_eq!(s["weights"]["v2"], 100);
    // Every failure the clients saw came from the bad canary's share.
    assert!(
        tally.per_version.get("v3").is_some_and(|(n, _)| *n > 0),
        "{tally:?}"
    );
    assert_eq!(tally.errors_except("v3"), 0, "{tally:?}");
}

/// The version that answered a GET on `addr` ("proxy" for the proxy's own answer).
fn served_by(addr: std::net::SocketAddr) -> (u16, String) {
    let (status, body) = http(addr, "GET", "/", None, "");
    let v = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "proxy".to_owned());
    (status, v)
}

#[test]
fn blue_green_without_auto_promote_previews_the_candidate_until_promoted() {
    let d = Daemon::start_edited(|t| {
        t.replace("STEPS", QUICK_STEPS)
            .replace("AUTO_PROMOTE", "false")
    });
    // Before a rollout nothing is in preview.
    assert_eq!(served_by(d.preview).0, 503);
    let out = d.cli(&["deploy", "web", "v2", "--strategy", "blue-green"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("v2 healthy and waiting for promote", |s| {
        s["phase"] == "awaiting-approval" && healthy(s, "v2") == 2
    });
    assert_eq!(s["weights"]["v2"], 0, "{s:#}");
    // The candidate answers on the preview listener only; users still get v1.
    for _ in 0..20 {
        assert_eq!(served_by(d.preview), (200, "v2".to_owned()));
        assert_eq!(served_by(d.web), (200, "v1".to_owned()));
    }
    let out = d.cli(&["promote", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_for("v2 stable", |s| {
        s["phase"] == "stable" && s["stable"] == "v2"
    });
    for _ in 0..20 {
        assert_eq!(served_by(d.web), (200, "v2".to_owned()));
    }
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h["rollouts"][0]["outcome"], "promoted");
}

#[test]
fn blue_green_switch_loses_no_request_under_load() {
    let d = Daemon::start(QUICK_STEPS);
    let load = Load::start(d.web, 8, Duration::from_millis(1));
    let out = d.cli(&["deploy", "web", "v2", "--strategy", "blue-green", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    // Keep the load on through the scale-down of the old version.
    d.wait_for("v1 stopped", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["version"] == "v2")
    });
    let tally = load.stop();
    assert!(
        tally.per_version.get("v1").is_some_and(|(n, _)| *n > 0),
        "{tally:?}"
    );
    assert!(
        tally.per_version.get("v2").is_some_and(|(n, _)| *n > 0),
        "{tally:?}"
    );
    assert_eq!(
        tally.errors_except(""),
        0,
        "no failed request across the switch: {tally:?}"
    );
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h["rollouts"][0]["strategy"], "blue-green");
    assert_eq!(h["rollouts"][0]["outcome"], "promoted");
}

#[test]
fn sigkill_mid_rollout_resumes_and_leaves_no_orphans() {
    let steps = r#"[ { weight = 20, pause = "2s" }, { approve = true }, { weight = 100 } ]"#;
    let mut d = Daemon::start(steps);
    // Traffic is the evidence each step needs, before and after the restart.
    let load = Load::start(d.web, 2, Duration::from_millis(5));
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    let s = d.wait_for("v2 at 20%", |s| {
        s["weights"]["v2"] == 20 && healthy(s, "v2") == 2
    });
    let pids: Vec<u32> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(crate::harness::pid_of)
        .map(|p| p as u32)
        .collect();
    assert_eq!(pids.len(), 4, "two v1 and two v2 instances: {s:#}");
    d.kill9();
    // The instances die with the daemon (parent-death signal), not at the next start.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| pid_alive(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "instances outlived a SIGKILLed daemon: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.spawn();
    let s = d.wait_for("the rollout to resume to its approval gate", |s| {
        s["phase"] == "awaiting-approval"
    });
    assert_eq!(s["candidate"], "v2");
    let out = d.cli(&["promote", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("promotion", |s| {
        s["phase"] == "stable" && s["stable"] == "v2"
    });
    assert_eq!(s["weights"]["v2"], 100);
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h["rollouts"][0]["outcome"], "promoted");
    let r: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(r["rollouts"].as_array().unwrap().len(), 1);
    load.stop();
}

#[test]
fn rollback_after_promotion_returns_to_the_previous_version() {
    let d = Daemon::start(r#"[ { weight = 100 } ]"#);
    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("v1 stable again", |s| {
        s["phase"] == "stable" && s["stable"] == "v1"
    });
    assert_eq!(s["weights"]["v1"], 100);
    assert_eq!(healthy(&s, "v1"), 2);
}

#[test]
fn rolling_update_replaces_instances_under_load_without_failures() {
    let d = Daemon::start(QUICK_STEPS);
    let load = Load::start(d.web, 4, Duration::from_millis(2));
    let out = d.cli(&["deploy", "web", "v2", "--strategy", "rolling", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let s = d.wait_for("v1 gone", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["version"] == "v2")
    });
    assert_eq!(healthy(&s, "v2"), 2);
    let tally = load.stop();
    assert_eq!(tally.errors_except(""), 0, "{tally:?}\n{}", d.log());
    let r: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(r["rollouts"][0]["strategy"], "rolling");
    // The roll went instance by instance: a step at 50% (1 of 2 replaced) was recorded.
    let id = r["rollouts"][0]["id"].as_i64().unwrap();
    let events = http_events(&d, id);
    assert!(
        events
            .iter()
            .any(|m| m.contains("rolling: 1/2 instances on v2")),
        "{events:?}"
    );
}

fn http_events(d: &Daemon, id: i64) -> Vec<String> {
    crate::harness::rollout_events(d, id)
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}
