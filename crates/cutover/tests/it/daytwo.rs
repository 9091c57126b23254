//! Day-two usability, each as a user met it: a closed stdout, shell completions, `deploy --wait
//! --timeout` and `--env-file`, who did what, the token-free metrics listener, chart series
//! that survive a restart, and decisions in the daemon's own log.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Daemon, EXE, Load, free_port, http, stderr, stdout, write};

const SLOW_STEPS: &str = r#"[ { weight = 20, pause = "1h" }, { weight = 100 } ]"#;

/// Runs the CLI against `d` with stdout a pipe whose reader is already gone, so its first
/// write fails with EPIPE, as under `cutover ... | head -0` (or `| head -1` once it has read).
fn with_closed_stdout(d: &Daemon, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = Command::new(EXE)
        .args(["-c", d.config.to_str().unwrap()])
        .args(args)
        .current_dir(d.dir.path())
        .env_remove("CUTOVER_TOKEN")
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let d = Daemon::start(SLOW_STEPS);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "web"],
        &["status", "web", "--watch"],
        &["history"],
        &["history", "--json"],
        &["validate"],
        &["validate", "--json"],
        &["completions", "bash"],
        &["deploy", "web", "v2"],
    ] {
        let out = with_closed_stdout(&d, args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} should stop quietly: {}",
            stderr(&out)
        );
        assert_eq!(stderr(&out), "", "{args:?} wrote to stderr");
    }
    // The deploy above ran even though nobody read its answer.
    assert_eq!(d.status()["rollout_id"], 1);

    // `status --watch | head`: once the reader has its lines and leaves, the watch ends at
    // once rather than at the next change it would print (the rollout holds for an hour).
    let mut child = Command::new(EXE)
        .args(["-c", d.config.to_str().unwrap(), "status", "web", "--watch"])
        .current_dir(d.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("weights") {}
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("status --watch kept running after its reader left");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));

    // A closed stderr is no reason to panic either: the error is lost, its exit code is not.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let cfg = write(
        d.dir.path(),
        "unreachable.toml",
        &format!(
            "[daemon]\napi = \"127.0.0.1:{}\"\n[services.web]\nlisten = \"127.0.0.1:{}\"\ncommand = [\"app\", \"{{port}}\"]\n",
            free_port(),
            free_port()
        ),
    );
    let out = Command::new(EXE)
        .args(["-c", cfg.to_str().unwrap(), "status"])
        .env("CUTOVER_TOKEN", "x")
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let gen_for = |shell: &str| {
        let out = Command::new(EXE)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        stdout(&out)
    };
    let bash = gen_for("bash");
    assert!(
        bash.contains("--timeout") && bash.contains("--env-file"),
        "{bash}"
    );
    // The script loads in a real bash and registers itself for `cutover`.
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "cutover.bash", &bash);
    let out = Command::new("bash")
        .args([
            "-c",
            &format!("source {} && complete -p cutover", script.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && stdout(&out).contains("_cutover"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(gen_for("zsh").starts_with("#compdef cutover"));
    let fish = gen_for("fish");
    assert!(
        fish.contains("complete -c cutover") && fish.contains("deploy"),
        "{fish}"
    );
    let out = Command::new(EXE)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn deploy_wait_timeout_gives_up_waiting_but_not_the_rollout() {
    let d = Daemon::start(SLOW_STEPS);
    let out = d.cli(&["deploy", "web", "v2", "--timeout", "5s"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--timeout needs --wait: {}",
        stderr(&out)
    );
    let out = d.cli(&["deploy", "web", "v2", "--wait", "--timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let started = Instant::now();
    let out = d.cli(&["deploy", "web", "v2", "--wait", "--timeout", "3s", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the wait ended long after its timeout"
    );
    let msg = stderr(&out);
    assert!(
        msg.contains("after 3s")
            && msg.contains("still running")
            && msg.contains("cutover status web --watch"),
        "{msg}"
    );
    // With --json, stdout is the rollout as it stands.
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["id"].as_i64(), r["outcome"].as_str()),
        (Some(1), Some("in-progress"))
    );
    // The rollout goes on: only the waiting stopped.
    let s = d.wait_for("v2 at 20%", |s| s["weights"]["v2"] == 20);
    assert_eq!(s["rollout_id"], 1);
}

#[test]
fn env_file_is_merged_below_env_and_its_values_never_printed() {
    let d = Daemon::start(SLOW_STEPS);
    let bad = write(
        d.dir.path(),
        "bad.env",
        "A=fine\nthis line is hunter2 and no assignment\n",
    );
    let out = d.cli(&["deploy", "web", "v2", "--env-file", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("bad.env:2:"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    let missing = d.cli(&["deploy", "web", "v2", "--env-file", "nope.env"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));

    let file = write(
        d.dir.path(),
        ".env.web",
        "# shared settings\n\nexport SECRET_TOKEN=s3cr3t-from-file\nMODE=\"from file\"\nDEMO_LATENCY=1ms\n",
    );
    let out = d.cli(&[
        "deploy",
        "web",
        "v2",
        "--env-file",
        file.to_str().unwrap(),
        "--env",
        "MODE=from-flag",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        !printed.contains("s3cr3t") && !printed.contains("from file"),
        "{printed}"
    );
    // Values print only when asked for (`--show-env`); otherwise as ***.
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h["rollouts"][0]["env"]["SECRET_TOKEN"], "***");
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--show-env", "--json"]).stdout).unwrap();
    let env = &h["rollouts"][0]["env"];
    assert_eq!(env["SECRET_TOKEN"], "s3cr3t-from-file");
    assert_eq!(env["MODE"], "from-flag", "--env wins over the file");
    assert_eq!(env["DEMO_LATENCY"], "1ms");
    let text = stdout(&d.cli(&["history"]));
    assert!(!text.contains("s3cr3t"), "{text}");
}

/// Runs the CLI as the OS user `user` (from the CLI's point of view).
fn cli_as(d: &Daemon, user: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(EXE)
        .args(["-c", d.config.to_str().unwrap()])
        .args(args)
        .current_dir(d.dir.path())
        .env_remove("CUTOVER_TOKEN")
        .env_remove("CUTOVER_ACTOR")
        .env_remove("LOGNAME")
        .env("USER", user)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    out
}

#[test]
fn actions_record_who_did_them_in_history_events_and_the_log() {
    let d = Daemon::start(SLOW_STEPS);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let ana = format!("ana@{host}");
    cli_as(&d, "ana", &["deploy", "web", "v2"]);
    d.wait_for("v2 at 20%", |s| s["weights"]["v2"] == 20);
    cli_as(&d, "bo", &["pause", "web"]);
    cli_as(&d, "bo", &["resume", "web"]);
    cli_as(&d, "cy", &["abort", "web"]);

    let h: serde_json::Value =
        serde_json::from_slice(&cli_as(&d, "ana", &["history", "--json"]).stdout).unwrap();
    let r = &h["rollouts"][0];
    assert_eq!(r["started_by"], ana.as_str());
    assert_eq!(r["ended_by"], format!("cy@{host}"));
    assert_eq!(r["reason"], "aborted by user");
    let text = stdout(&cli_as(&d, "ana", &["history"]));
    assert!(
        text.contains(&ana) && text.contains(&format!("aborted by user (by cy@{host})")),
        "{text}"
    );

    let (status, body) = http(d.api, "GET", "/api/v1/rollouts/1", Some(&d.token()), "");
    assert_eq!(status, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let messages: Vec<&str> = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    for want in [
        format!("(by {ana})"),
        format!("paused by user (by bo@{host})"),
        format!("resumed by user (by bo@{host})"),
        format!("aborted by user (by cy@{host})"),
    ] {
        assert!(
            messages.iter().any(|m| m.ends_with(&want)),
            "{want:?} in {messages:#?}"
        );
    }
    // Decisions cutover takes on its own are nobody's.
    assert!(
        messages.iter().filter(|m| m.contains("(by ")).count() < messages.len(),
        "{messages:#?}"
    );

    // An API client that does not name itself is `api`.
    d.wait_for("v2 stopped", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["version"] == "v1")
    });
    let (status, body) = http(
        d.api,
        "POST",
        "/api/v1/services/web/deploy",
        Some(&d.token()),
        r#"{"version":"v3"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["started_by"], "api");

    // The daemon's own log (a journal under systemd) has every decision, one line each, with
    // no terminal colour codes.
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("aborted by user (by cy@{host})")))
        .unwrap_or_else(|| panic!("no abort line in the log:\n{log}"));
    assert!(
        line.contains("service=web") && line.contains("kind=aborted"),
        "{line}"
    );
    assert!(log.lines().any(|l| l.contains("kind=step")), "{log}");
    assert!(!log.contains('\x1b'), "no colour codes in a log file");
}

#[test]
fn metrics_listener_serves_only_metrics_without_a_token() {
    let port = free_port();
    let d = Daemon::start_edited(|t| {
        t.replace("STEPS", SLOW_STEPS).replace(
            "worker_threads = 2",
            &format!("worker_threads = 2\nmetrics = \"127.0.0.1:{port}\""),
        )
    });
    let m = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = http(m, "GET", "/metrics", None, "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("cutover_traffic_weight{service=\"web\",version=\"v1\"} 100"),
        "{body}"
    );
    let token = d.token();
    for path in [
        "/api/v1/status",
        "/",
        "/healthz",
        "/login",
        "/api/v1/events",
    ] {
        assert_eq!(http(m, "GET", path, None, "").0, 404, "{path}");
        assert_eq!(http(m, "GET", path, Some(&token), "").0, 404, "{path}");
    }
    assert_eq!(
        http(
            m,
            "POST",
            "/api/v1/services/web/deploy",
            Some(&token),
            r#"{"version":"v2"}"#
        )
        .0,
        404
    );
    assert_eq!(http(m, "POST", "/metrics", None, "").0, 405);
    // The API's own /metrics still wants the token.
    assert_eq!(http(d.api, "GET", "/metrics", None, "").0, 401);

    let out = d.cli(&["validate"]);
    assert!(
        stdout(&out).contains(&format!("http://127.0.0.1:{port}/metrics")),
        "{}",
        stdout(&out)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&d.cli(&["validate", "--json"]).stdout).unwrap();
    assert_eq!(v["metrics"], format!("127.0.0.1:{port}"));
    assert!(
        d.log()
            .contains(&format!("http://127.0.0.1:{port}/metrics"))
    );
}

/// The dashboard's series of `web` through the API: `(version, at, requests)` per point.
fn series(d: &Daemon) -> Vec<(String, String, u64)> {
    let (status, body) = http(
        d.api,
        "GET",
        "/api/v1/services/web/series",
        Some(&d.token()),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out = Vec::new();
    for s in v["series"].as_array().unwrap() {
        for p in s["points"].as_array().unwrap() {
            out.push((
                s["version"].as_str().unwrap().to_owned(),
                p["at"].as_str().unwrap().to_owned(),
                p["requests"].as_u64().unwrap(),
            ));
        }
    }
    out
}

#[test]
fn chart_series_survive_a_restart() {
    let mut d = Daemon::start(SLOW_STEPS);
    let load = Load::start(d.web, 2, Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy = loop {
        let busy: Vec<_> = series(&d).into_iter().filter(|p| p.2 > 0).collect();
        if busy.len() >= 2 {
            break busy;
        }
        assert!(Instant::now() < deadline, "no traffic in the series");
        std::thread::sleep(Duration::from_millis(100));
    };
    load.stop();
    assert!(d.stop().is_some_and(|s| s.success()), "{}", d.log());
    d.spawn();
    // Straight after the start, before anything new could be sampled with traffic in it.
    let after = series(&d);
    for p in &busy {
        assert!(after.contains(p), "{p:?} lost in the restart: {after:?}");
    }
    let (status, page) = http(d.api, "GET", "/services/web", Some(&d.token()), "");
    assert_eq!(status, 200);
    assert!(
        page.contains("<polyline") && page.contains("class=tick"),
        "{page}"
    );
}

/// What the instances of the `env_file` test wrote: `(port, "SECRET MODE")`.
fn seen(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_prefix("seen-")?.to_owned();
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some((name, text.trim().to_owned()))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_service_env_file_is_read_at_each_start_and_never_stored() {
    let mut d = Daemon::create(|t| {
        crate::harness::with_command(
            &t.replace("STEPS", SLOW_STEPS),
            &format!(
                "command = [\"/bin/sh\", \"-c\", \"echo \\\"$APP_SECRET $MODE\\\" > seen-{{port}}; exec {EXE} demo-app --port {{port}} --version {{version}}\"]\nenv_file = \".env.web\"\nenv = {{ MODE = \"env\" }}"
            ),
        )
    });
    let env_file = d.dir.path().join(".env.web");
    std::fs::write(&env_file, "APP_SECRET=first-secret\nMODE=file\n").unwrap();
    d.spawn();
    d.wait_for("v1 healthy", |s| crate::harness::healthy(s, "v1") >= 2);
    let first = seen(d.dir.path());
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(
        first.iter().all(|(_, t)| t == "first-secret file"),
        "the file wins over env: {first:?}"
    );

    // Read again at each start: v2's instances get the file as it is now, below --env.
    std::fs::write(&env_file, "APP_SECRET=second-secret\nMODE=file\n").unwrap();
    let out = d.cli(&["deploy", "web", "v2", "--env", "MODE=flag"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_for("v2 healthy", |s| crate::harness::healthy(s, "v2") >= 1);
    let now = seen(d.dir.path());
    assert!(
        now.iter().any(|(_, t)| t == "second-secret flag"),
        "{now:?}"
    );

    // Never stored: not in the state database, not in history even with --show-env.
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--show-env", "--json"]).stdout).unwrap();
    assert!(h["rollouts"][0]["env"].get("APP_SECRET").is_none(), "{h:#}");
    for f in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(d.dir.path().join("state").join(f)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("-secret"),
            "{f} holds a value of the env file"
        );
    }
    assert!(!d.log().contains("-secret"));

    // A broken file is found by `validate`, naming both places and never the line.
    std::fs::write(
        &env_file,
        "APP_SECRET=third-secret\nnot an assignment hunter2\n",
    )
    .unwrap();
    let out = d.cli(&["validate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("services.web.env_file") && err.contains(".env.web:2:"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2") && !err.contains("third-secret"),
        "{err}"
    );
}
