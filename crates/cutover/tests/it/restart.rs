//! cutover's own restarts lose no request: `cutover up --upgrade` and `cutover reload`
//! re-execute the daemon in place under load, keeping its listeners, its client connections
//! and its instances (the same processes serve throughout).

use std::time::Duration;

use crate::harness::{Daemon, Load, healthy, pid_alive, stderr};

const STEPS: &str = r#"[ { weight = 50, pause = "1s" }, { weight = 100 } ]"#;

fn pids(s: &serde_json::Value) -> Vec<u64> {
    let mut p: Vec<u64> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(crate::harness::pid_of)
        .collect();
    p.sort_unstable();
    p
}

#[test]
fn ten_upgrades_and_five_reloads_under_load_lose_no_request() {
    let d = Daemon::start(STEPS);
    let before = pids(&d.status());
    // About 200 requests a second over keep-alive connections.
    let load = Load::start(d.web, 4, Duration::from_millis(18));
    for i in 0..15 {
        let args: &[&str] = if i % 3 == 2 {
            &["reload"]
        } else {
            &["up", "--upgrade"]
        };
        // A fifth of a second of traffic between restarts.
        load.wait_answers(40);
        let out = d.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            stderr(&out),
            d.log()
        );
        d.wait_for("both instances healthy again", |s| healthy(s, "v1") == 2);
    }
    load.wait_answers(40);
    let tally = load.stop();
    assert!(
        tally
            .per_version
            .get("v1")
            .is_some_and(|(n, _)| *n > 15 * 40),
        "{tally:?}"
    );
    assert_eq!(
        tally.errors_except(""),
        0,
        "no request lost: {tally:?}\n{}",
        d.log()
    );
    let after = pids(&d.status());
    assert_eq!(
        before, after,
        "the same instance processes serve throughout"
    );
    assert!(d.log().matches("up again (restarted in place)").count() >= 15);
}

#[test]
fn a_restart_mid_rollout_keeps_both_versions_and_the_rollout_goes_on() {
    let d = Daemon::start(STEPS);
    let load = Load::start(d.web, 2, Duration::from_millis(5));
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    let s = d.wait_for("v2 at 50%", |s| {
        s["weights"]["v2"] == 50 && healthy(s, "v2") == 2
    });
    let before = pids(&s);
    let out = d.cli(&["up", "--upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.status();
    assert_eq!(
        pids(&s),
        before,
        "v1 and v2 instances adopted, none started again"
    );
    d.wait_for("promotion after the restart", |s| {
        s["phase"] == "stable" && s["stable"] == "v2"
    });
    let tally = load.stop();
    assert_eq!(tally.errors_except(""), 0, "{tally:?}\n{}", d.log());
}

#[test]
fn reload_applies_an_edited_config_and_refuses_a_broken_one() {
    let d = Daemon::start(STEPS);
    let text = std::fs::read_to_string(&d.config).unwrap();
    // A broken edit: exit 2 with the location, and the daemon serves on untouched.
    let broken = text.replace("instances = 2", "instances = -1");
    std::fs::write(&d.config, &broken).unwrap();
    let out = d.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cutover.toml:") && stderr(&out).contains("services.web.instances"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&d.config, &text).unwrap();
    assert_eq!(healthy(&d.status(), "v1"), 2);
    assert!(d.log().contains("restart refused") || !d.log().contains("restarting in place"));
    // A good edit: three steps instead of two, used by the next rollout.
    let edited = text.replace(
        STEPS,
        r#"[ { weight = 10, pause = "1h" }, { weight = 50, pause = "1h" }, { weight = 100 } ]"#,
    );
    std::fs::write(&d.config, &edited).unwrap();
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    let s = d.wait_for("the new steps", |s| !s["step"].is_null());
    assert_eq!(s["steps"], 3, "{s:#}");
    // The rollout under way keeps the policy it started with across another reload.
    std::fs::write(&d.config, &text).unwrap();
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("the rollout resumed", |s| !s["step"].is_null());
    assert_eq!(s["steps"], 3, "still three steps: {s:#}");
    assert!(d.cli(&["abort", "web"]).status.success());
}

#[test]
fn a_crash_still_takes_every_instance_with_it() {
    let mut d = Daemon::start(STEPS);
    assert!(d.cli(&["up", "--upgrade"]).status.success());
    let before = pids(&d.status());
    d.kill9();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while before.iter().any(|p| pid_alive(*p as u32)) {
        assert!(
            std::time::Instant::now() < deadline,
            "adopted instances outlived a SIGKILLed daemon: {before:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An app that writes a line for every request (Python's http.server logs each to stderr):
/// its output pipes are handed over too, so it neither dies of a broken pipe nor blocks on a
/// full one, and its log goes on after each restart.
#[test]
fn a_chatty_app_keeps_running_and_logging_across_restarts() {
    let d = Daemon::start_edited(|t| {
        crate::harness::with_command(
            &t,
            r#"command = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]"#,
        )
        .replace("STEPS", STEPS)
        .replace("path = \"/healthz\"", "path = \"/\"")
    });
    let before = pids(&d.status());
    let load = Load::start(d.web, 2, Duration::from_millis(10));
    let log_lines = || {
        let dir = d.dir.path().join("state/logs/web/v1");
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum::<usize>()
    };
    for _ in 0..3 {
        load.wait_answers(50);
        let out = d.cli(&["up", "--upgrade"]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    }
    let lines = log_lines();
    load.wait_answers(50);
    let tally = load.stop();
    assert_eq!(tally.errors_except(""), 0, "{tally:?}\n{}", d.log());
    assert_eq!(pids(&d.status()), before, "the same python processes serve");
    let after = log_lines();
    assert!(
        after > lines,
        "the app's log goes on after the restarts ({lines} → {after})"
    );
}

#[test]
fn reload_without_a_running_daemon_exits_3() {
    let mut d = Daemon::start(STEPS);
    d.stop();
    let out = d.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is `cutover up` running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_version_kept_warm_across_a_restart_still_stops_after_its_delay() {
    let d = Daemon::start_edited(|t| {
        t.replace("STEPS", r#"[ { weight = 100 } ]"#)
            .replace("scale_down_delay = \"1s\"", "scale_down_delay = \"8s\"")
    });
    // Traffic gives the post-promotion verdict that promotes early, leaving v1 warm.
    let load = Load::start(d.web, 4, Duration::from_millis(2));
    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        d.status()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["version"] == "v1"),
        "v1 is warm right after the promotion"
    );
    assert!(d.cli(&["up", "--upgrade"]).status.success());
    d.wait_for("v1 stopped after its delay", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["version"] == "v2")
    });
    let tally = load.stop();
    assert_eq!(tally.errors_except(""), 0, "{tally:?}");
}

#[test]
fn an_open_event_stream_does_not_hold_a_restart() {
    use std::io::Write;
    let d = Daemon::start(STEPS);
    // A dashboard's live event stream stays open for ever.
    let mut sse = std::net::TcpStream::connect(d.api).unwrap();
    write!(
        sse,
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        d.token()
    )
    .unwrap();
    let t = std::time::Instant::now();
    let out = d.cli(&["up", "--upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the restart took {:?}",
        t.elapsed()
    );
}
