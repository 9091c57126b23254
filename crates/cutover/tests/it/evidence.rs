//! No promotion without evidence: each way a user got a failing version promoted, run for
//! real against the daemon, with each strategy and at traffic from none to hundreds of
//! requests a second. Every one must end rolled back, failed or held, never promoted.

use std::time::{Duration, Instant};

use crate::harness::{Daemon, Load, healthy, http, pid_alive, rollout_events, stderr};

const STEPS: &str =
    r#"[ { weight = 20, pause = "1s" }, { weight = 50, pause = "1s" }, { weight = 100 } ]"#;

/// `FAST` with `STEPS` and these lines added to `[services.web.analysis]`.
fn daemon(analysis: &str) -> Daemon {
    Daemon::start_edited(|t| {
        t.replace("STEPS", STEPS).replace(
            "compare_to_stable = true\n",
            &format!("compare_to_stable = true\n{analysis}\n"),
        )
    })
}

fn history(d: &Daemon) -> serde_json::Value {
    serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap()
}

/// Polls status until the rollout ends, and returns the highest share v3 ever had.
fn max_weight_until_done(d: &Daemon, version: &str) -> u64 {
    let mut max = 0;
    d.wait_for("the rollout to end", |s| {
        max = max.max(s["configured_weights"][version].as_u64().unwrap_or(0));
        s["phase"] == "stable"
    });
    max
}

#[test]
fn a_canary_with_no_traffic_holds_and_is_never_promoted_on_its_timers() {
    // With the old behaviour this promoted in about 3 s with no analysis event at all.
    let d = daemon("analysis_deadline = \"4s\"\non_no_evidence = \"rollback\"");
    let started = Instant::now();
    let out = d.cli(&[
        "deploy",
        "web",
        "v3",
        "--env",
        "DEMO_ERROR_RATE=0.3",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(started.elapsed() >= Duration::from_secs(4));
    let h = history(&d);
    let last = &h["rollouts"][0];
    assert_eq!(last["outcome"], "rolled-back", "{last:#}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("no verdict on v3 at step 1/3 (20%) within analysis_deadline 4s")
            && reason.contains("on_no_evidence = \"rollback\""),
        "{reason}"
    );
    let kinds: Vec<String> = rollout_events(&d, last["id"].as_i64().unwrap())
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(kinds.contains(&"holding".to_owned()), "{kinds:?}");
    assert!(!kinds.contains(&"promoting".to_owned()), "{kinds:?}");
    assert_eq!(d.status()["stable"], "v1");
}

#[test]
fn a_quiet_canary_pauses_for_a_person_by_default() {
    // 4 requests a second, a fifth of them to the candidate: never min_requests in time.
    let d = daemon("analysis_deadline = \"3s\"");
    let load = Load::start(d.web, 1, Duration::from_millis(250));
    let out = d.cli(&["deploy", "web", "v3", "--env", "DEMO_ERROR_RATE=0.3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("the step to pause for lack of evidence", |s| {
        s["phase"] == "paused"
    });
    assert_eq!(s["configured_weights"]["v3"], 20, "{s:#}");
    let id = s["rollout_id"].as_i64().unwrap();
    let evs = rollout_events(&d, id);
    let note = evs
        .iter()
        .find(|(k, _)| k == "no-evidence")
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| panic!("{evs:?}"));
    assert!(
        note.contains("fewer than min_requests 20") && note.contains("cutover promote web"),
        "{note}"
    );
    // Still paused a while later: nothing promotes it but a person.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.status()["phase"], "paused");
    assert!(d.cli(&["abort", "web"]).status.success());
    let tally = load.stop();
    assert_eq!(tally.errors_except("v3"), 0, "{tally:?}");
}

#[test]
fn a_failing_canary_never_passes_its_first_step_at_low_or_high_traffic() {
    // 60 and ~600 requests a second: the step timers (1 s) elapse long before any verdict
    // could pass, and the 30% failure is caught at 20%.
    for (workers, gap) in [
        (1, Duration::from_millis(16)),
        (4, Duration::from_millis(5)),
    ] {
        let d = daemon("");
        let load = Load::start(d.web, workers, gap);
        let out = d.cli(&["deploy", "web", "v3", "--env", "DEMO_ERROR_RATE=0.3"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let max = max_weight_until_done(&d, "v3");
        let tally = load.stop();
        assert_eq!(
            max, 20,
            "v3 never went past its first step ({workers} workers)"
        );
        let h = history(&d);
        assert_eq!(h["rollouts"][0]["outcome"], "rolled-back", "{h:#}");
        assert!(
            h["rollouts"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("analysis failed"),
            "{h:#}"
        );
        assert_eq!(tally.errors_except("v3"), 0, "{tally:?}");
    }
}

#[test]
fn a_failing_rolling_update_is_judged_and_rolled_back() {
    let d = daemon("");
    let load = Load::start(d.web, 4, Duration::from_millis(5));
    let out = d.cli(&[
        "deploy",
        "web",
        "v3",
        "--env",
        "DEMO_ERROR_RATE=0.3",
        "--strategy",
        "rolling",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolled-back"), "{}", stderr(&out));
    let s = d.wait_for("only v1 left", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["version"] == "v1")
    });
    assert_eq!(healthy(&s, "v1"), 2);
    let tally = load.stop();
    assert_eq!(tally.errors_except("v3"), 0, "{tally:?}");
    let h = history(&d);
    assert!(
        h["rollouts"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("analysis failed"),
        "{h:#}"
    );
}

#[test]
fn a_failing_blue_green_preview_is_rolled_back_before_any_user_traffic_moves() {
    let d = daemon("");
    // Users on the main listener; nobody on the preview: cutover's probes are the evidence.
    let load = Load::start(d.web, 2, Duration::from_millis(10));
    let out = d.cli(&[
        "deploy",
        "web",
        "v3",
        "--env",
        "DEMO_ERROR_RATE=0.2",
        "--strategy",
        "blue-green",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let tally = load.stop();
    assert!(
        !tally.per_version.contains_key("v3"),
        "no user request reached v3: {tally:?}"
    );
    assert_eq!(tally.errors_except(""), 0, "{tally:?}");
    let h = history(&d);
    let reason = h["rollouts"][0]["reason"].as_str().unwrap();
    assert_eq!(h["rollouts"][0]["outcome"], "rolled-back");
    assert!(
        reason.contains("analysis failed") && reason.contains("no user traffic ever moved"),
        "{reason}"
    );
}

#[test]
fn a_manual_blue_green_with_a_failed_preview_needs_force_to_promote() {
    let d = Daemon::start_edited(|t| {
        t.replace("STEPS", STEPS)
            .replace("AUTO_PROMOTE", "false")
            .replace("failure_limit = 2", "failure_limit = 1000")
    });
    assert!(
        d.cli(&[
            "deploy",
            "web",
            "v3",
            "--env",
            "DEMO_ERROR_RATE=0.5",
            "--strategy",
            "blue-green",
        ])
        .status
        .success()
    );
    d.wait_for("a failed preview verdict", |s| {
        s["failures"].as_u64() >= Some(1)
    });
    let out = d.cli(&["promote", "web"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cutover promote web --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(d.status()["configured_weights"]["v3"], 0);
    assert!(d.cli(&["abort", "web"]).status.success());
}

#[test]
fn after_a_canary_promotion_the_old_version_stays_warm_and_rollback_is_instant() {
    let d = Daemon::start_edited(|t| {
        t.replace(
            "STEPS",
            r#"[ { weight = 50, pause = "1s" }, { weight = 100 } ]"#,
        )
        .replace("scale_down_delay = \"1s\"", "scale_down_delay = \"20s\"")
    });
    let load = Load::start(d.web, 4, Duration::from_millis(5));
    let before = d.status();
    let v1_pids: Vec<u32> = before["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(crate::harness::pid_of)
        .map(|p| p as u32)
        .collect();
    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert!(
        v1_pids.iter().all(|p| pid_alive(*p)),
        "v1 still runs after deploy --wait returned"
    );
    let s = d.status();
    assert_eq!(
        (s["stable"].as_str(), s["weights"]["v2"].as_u64()),
        (Some("v2"), Some(100))
    );
    let t = Instant::now();
    let out = d.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_for("v1 stable again", |s| {
        s["phase"] == "stable" && s["stable"] == "v1"
    });
    let switch = t.elapsed();
    assert!(
        switch < Duration::from_secs(3),
        "rollback reused the warm instances: {switch:?}"
    );
    assert!(
        v1_pids.iter().all(|p| pid_alive(*p)),
        "the same v1 processes serve again"
    );
    let tally = load.stop();
    assert_eq!(tally.errors_except(""), 0, "{tally:?}");
}

#[test]
fn reported_weights_are_where_traffic_really_goes() {
    let d = Daemon::start(r#"[ { weight = 30, pause = "1h" }, { weight = 100 } ]"#);
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    let s = d.wait_for("v2 at 30%", |s| {
        s["weights"]["v2"] == 30 && healthy(s, "v2") == 2
    });
    let v1: Vec<String> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["version"] == "v1")
        .map(|i| crate::harness::pid_of(i).unwrap().to_string())
        .collect();
    // Frozen, v1 answers no health check: the proxy sends everything to v2.
    let signal = |sig: &str| {
        for p in &v1 {
            std::process::Command::new("kill")
                .args([sig, p])
                .status()
                .unwrap();
        }
    };
    signal("-STOP");
    let s = d.wait_for("effective weights to follow health", |s| {
        s["weights"]["v2"] == 100
    });
    let (_, metrics) = http(d.api, "GET", "/metrics", Some(&d.token()), "");
    signal("-CONT");
    assert_eq!(s["weights"]["v1"], 0);
    assert_eq!(s["configured_weights"]["v2"], 30);
    assert!(
        metrics.contains("cutover_traffic_weight{service=\"web\",version=\"v2\"} 100"),
        "{metrics}"
    );
    // Once v1 answers again, so is 70/30.
    d.wait_for("v1 back", |s| s["weights"]["v2"] == 30);
    assert!(d.cli(&["abort", "web"]).status.success());
}
