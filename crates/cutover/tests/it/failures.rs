//! Every failure says why: a health check that can never pass, and a candidate that
//! crash-loops, each end with the reason a person needs (the probe's answer, the exit code
//! and the last lines the process wrote), in status, in an event and in the outcome.

use std::time::{Duration, Instant};

use crate::harness::{Daemon, EXE, stderr};

#[test]
fn a_health_check_that_cannot_pass_says_why_everywhere() {
    // A real app without /healthz: every probe gets 404.
    let d = Daemon::start_edited(|t| {
        t.replace("STEPS", r#"[ { weight = 100 } ]"#)
            .replace("progress_deadline = \"20s\"", "progress_deadline = \"4s\"")
    });
    let text = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("path = \"/healthz\"", "path = \"/no-such-health-path\"");
    std::fs::write(&d.config, text).unwrap();
    // The running v1 keeps its admitted instances; the edit applies to what comes next.
    assert!(d.cli(&["reload"]).status.success(), "{}", d.log());
    let out = d.cli(&["deploy", "web", "v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("a candidate instance with a reason", |s| {
        s["instances"].as_array().unwrap().iter().any(|i| {
            i["version"] == "v2"
                && i["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("GET /no-such-health-path answered 404"))
        })
    });
    let id = s["rollout_id"].as_i64().unwrap();
    let out = d.cli(&["status", "web"]);
    assert!(
        crate::harness::stdout(&out).contains("answered 404"),
        "status text shows it: {}",
        crate::harness::stdout(&out)
    );
    d.wait_for("the deadline", |s| s["phase"] == "stable");
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    let r = &h["rollouts"][0];
    assert_eq!(r["id"], id);
    assert_eq!(r["outcome"], "failed");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("not healthy within progress_deadline 4s")
            && reason.contains("GET /no-such-health-path answered 404"),
        "{reason}"
    );
    // One health event per reason, not one per probe.
    let (_, body) = crate::harness::http(
        d.api,
        "GET",
        &format!("/api/v1/rollouts/{id}"),
        Some(&d.token()),
        "",
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let notes = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "health")
        .count();
    assert!((1..=4).contains(&notes), "{notes} health events: {body}");
}

#[test]
fn a_crash_looping_candidate_fails_at_once_with_its_exit_code_and_output() {
    let command = format!(
        r#"command = ["/bin/sh", "-c", "if [ -n \"$CRASH\" ]; then echo 'boom: DATABASE_URL is not set' >&2; exit 3; fi; exec {EXE} demo-app --port {{port}} --version {{version}}"]"#
    );
    let d = Daemon::start_edited(|t| {
        crate::harness::with_command(&t, &command).replace("STEPS", r#"[ { weight = 100 } ]"#)
    });
    let started = Instant::now();
    let out = d.cli(&["deploy", "web", "v2", "--env", "CRASH=1", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "did not wait out the 20 s progress_deadline: {:?}",
        started.elapsed()
    );
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    let r = &h["rollouts"][0];
    assert_eq!(r["outcome"], "failed", "{r:#}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("crash-looped")
            && reason.contains("exited with code 3")
            && reason.contains("boom: DATABASE_URL is not set"),
        "{reason}"
    );
    assert_eq!(d.status()["stable"], "v1");
}

#[test]
fn the_same_version_with_a_changed_env_is_a_new_revision_rolled_out_like_any_other() {
    let d = Daemon::start(r#"[ { weight = 50, pause = "1s" }, { weight = 100 } ]"#);
    let load = crate::harness::Load::start(d.web, 2, Duration::from_millis(5));
    let out = d.cli(&["deploy", "web", "v1"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "nothing to do: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("change --env"), "{}", stderr(&out));
    let out = d.cli(&["deploy", "web", "v1", "--env", "FEATURE_X=on", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let s = d.status();
    assert_eq!(s["stable"], "v1@r2");
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h["rollouts"][0]["to"], "v1@r2");
    assert_eq!(h["rollouts"][0]["from"], "v1");
    // The app still sees its own label: {version} and CUTOVER_VERSION are "v1".
    let (status, body) = crate::harness::http(d.web, "GET", "/", None, "");
    assert_eq!(status, 200);
    assert!(body.contains("\"version\":\"v1\""), "{body}");
    let tally = load.stop();
    assert_eq!(tally.errors_except(""), 0, "{tally:?}");
}
