//! The CLI surface without rollouts: init, validate, exit codes, API authentication.

use crate::harness::{Daemon, EXE, free_port, http, stderr, stdout, write};

const SLOW_STEPS: &str = r#"[ { weight = 20, pause = "1h" }, { weight = 100 } ]"#;

#[test]
fn init_writes_a_config_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(EXE)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join(".cutover").is_dir());
    let out = run(&["validate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("valid"), "{}", stdout(&out));
    let out = run(&["validate", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], true);
    let again = run(&["init"]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "init must not overwrite: {}",
        stderr(&again)
    );
}

#[test]
fn broken_configs_exit_2_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.canary]\nsteps = [ { weight = 140 } ]\n",
            "cutover.toml:5:",
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\nbogus = 1\n",
            "bogus",
        ),
        ("[daemon\n", "cutover.toml:1:"),
    ];
    for (text, want) in cases {
        let cfg = write(dir.path(), "cutover.toml", text);
        let out = std::process::Command::new(EXE)
            .args(["-c", cfg.to_str().unwrap(), "validate"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{text}: wanted {want:?} in {}",
            stderr(&out)
        );
    }
}

#[test]
fn commands_without_a_daemon_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "cutover.toml",
        &format!(
            "[daemon]\napi = \"127.0.0.1:{}\"\n[services.web]\nlisten = \"127.0.0.1:{}\"\ncommand = [\"cutover\", \"demo-app\", \"--port\", \"{{port}}\"]\n",
            free_port(),
            free_port()
        ),
    );
    let out = std::process::Command::new(EXE)
        .args(["-c", cfg.to_str().unwrap(), "status"])
        .env("CUTOVER_TOKEN", "x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach the cutover daemon"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn api_refuses_requests_without_the_right_token() {
    let d = Daemon::start(SLOW_STEPS);
    assert_eq!(http(d.api, "GET", "/healthz", None, "").0, 200);
    let (status, body) = http(d.api, "GET", "/api/v1/status", None, "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"code\":\"unauthorized\""), "{body}");
    assert_eq!(
        http(d.api, "GET", "/api/v1/status", Some("wrong"), "").0,
        401
    );
    assert_eq!(
        http(
            d.api,
            "POST",
            "/api/v1/services/web/abort",
            Some("wrong"),
            ""
        )
        .0,
        401
    );
    assert_eq!(http(d.api, "GET", "/metrics", None, "").0, 401);
    let token = d.token();
    assert_eq!(token.len(), 64, "a 256-bit hex token");
    assert_eq!(
        http(d.api, "GET", "/api/v1/status", Some(&token), "").0,
        200
    );
    let (status, metrics) = http(d.api, "GET", "/metrics", Some(&token), "");
    assert_eq!(status, 200);
    assert!(metrics.contains("cutover_traffic_weight"), "{metrics}");
    let (status, body) = http(
        d.api,
        "POST",
        "/api/v1/services/nope/deploy",
        Some(&token),
        r#"{"version":"v2"}"#,
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = http(
        d.api,
        "POST",
        "/api/v1/services/web/deploy",
        Some(&token),
        "{not json",
    );
    assert_eq!(status, 400, "{body}");
    // The token file is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.dir.path().join("state/token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_second_deploy_is_a_conflict_and_abort_returns_traffic() {
    let d = Daemon::start(SLOW_STEPS);
    let out = d.cli(&["deploy", "web", "v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again = d.cli(&["deploy", "web", "v3"]);
    assert_eq!(again.status.code(), Some(4), "{}", stderr(&again));
    assert!(stderr(&again).contains("in progress"), "{}", stderr(&again));
    let s = d.wait_for("v2 at 20%", |s| s["weights"]["v2"] == 20);
    assert_eq!(s["phase"], "progressing");
    assert_eq!(
        (s["step"].as_u64(), s["steps"].as_u64()),
        (Some(1), Some(2))
    );
    let out = d.cli(&["pause", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.status()["phase"], "paused");
    assert_eq!(
        d.cli(&["pause", "web"]).status.code(),
        Some(4),
        "pausing twice is a conflict"
    );
    assert!(d.cli(&["resume", "web"]).status.success());
    let out = d.cli(&["abort", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = d.wait_for("v2 stopped", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["version"] == "v1")
    });
    assert_eq!(s["phase"], "stable");
    assert_eq!(s["weights"]["v1"], 100);
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    assert_eq!(h["rollouts"][0]["outcome"], "aborted");
    assert_eq!(h["rollouts"][0]["reason"], "aborted by user");
    let unknown = d.cli(&["deploy", "nope", "v2"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));
}

#[test]
fn webhook_receives_every_decision() {
    use std::io::{BufRead, BufReader, Read, Write};
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", server.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for conn in server.incoming() {
            let Ok(conn) = conn else { return };
            let mut r = BufReader::new(conn);
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
        }
    });
    let d = Daemon::start_with(SLOW_STEPS, &format!("\n[notify]\nwebhook = \"{url}\"\n"));
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    d.wait_for("v2 at 20%", |s| s["weights"]["v2"] == 20);
    assert!(d.cli(&["abort", "web"]).status.success());
    let mut kinds = Vec::new();
    while !kinds.contains(&"aborted".to_owned()) {
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("webhook events");
        assert_eq!(e["service"], "web");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        kinds.push(e["kind"].as_str().unwrap().to_owned());
    }
    for want in ["started", "ready", "step", "aborted"] {
        assert!(
            kinds.iter().any(|k| k == want),
            "{want} missing from {kinds:?}"
        );
    }
}

#[test]
fn status_watch_prints_plain_blocks_when_not_a_terminal() {
    use std::io::BufRead;
    let d = Daemon::start(SLOW_STEPS);
    let mut child = std::process::Command::new(EXE)
        .args(["-c", d.config.to_str().unwrap(), "status", "web", "--watch"])
        .current_dir(d.dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // The first block is printed at once; then a change (the deploy) prints a second one.
    while !seen.iter().any(|l: &String| l.contains("weights")) {
        seen.push(lines.next().unwrap().unwrap());
    }
    assert!(d.cli(&["deploy", "web", "v2"]).status.success());
    while !seen.iter().any(|l: &String| l.contains("rollout #1")) {
        seen.push(lines.next().unwrap().unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = seen.join("\n");
    assert!(
        !text.contains('\x1b'),
        "no terminal escapes when stdout is a pipe: {text:?}"
    );
    assert!(
        text.contains("web  STABLE") && text.contains("v1"),
        "{text}"
    );

    // With --json: one Service document a line, a new one when something changed.
    let mut child = std::process::Command::new(EXE)
        .args(["-c", d.config.to_str().unwrap()])
        .args(["status", "web", "--watch", "--json"])
        .current_dir(d.dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["name"], "web", "{first}");
    assert!(d.cli(&["abort", "web"]).status.success());
    let mut later = first.clone();
    while later["candidate"] == first["candidate"] {
        later = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
