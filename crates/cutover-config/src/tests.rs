//! Data-driven tests: every kind of mistake, with the exact diagnostic it must produce.

use std::path::Path;
use std::time::Duration;

use super::*;

const GOOD_SERVICE: &str =
    "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n";

/// Parses `text` as `cutover.toml` and expects exactly the diagnostics `want`.
fn check(text: &str, want: &[&str]) {
    let err = parse(text, Path::new("cutover.toml")).expect_err("should not parse");
    let got: Vec<String> = err.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(got, want, "for config:\n{text}");
}

#[test]
fn broken_configs_name_file_line_column_and_key() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.canary]\nsteps = [ { weight = 10 }, { weight = 140 } ]\n",
            &["cutover.toml:5:39: services.web.canary.steps[1].weight: 140 is above 100"],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.canary]\nsteps = [ { weight = 50 }, { weight = 20 }, { weight = 100 } ]\n",
            &[
                "cutover.toml:5:39: services.web.canary.steps[1].weight: 20 is not above step 0's weight 50; weights must increase",
            ],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.canary]\nsteps = [ { weight = 10 }, { weight = 50 } ]\n",
            &[
                "cutover.toml:5:39: services.web.canary.steps[1].weight: the last weight step is 50; it must be 100 so the rollout can finish",
            ],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"--port\", \"8000\"]\n",
            &[
                "cutover.toml:3:11: services.web.command: has no {port} placeholder; pass the port cutover chooses (e.g. \"--port\", \"{port}\"), or set reads_port_env = true if the program reads PORT",
            ],
        ),
        (
            "[daemon]\napi = \"127.0.0.1:8080\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n",
            &[
                "cutover.toml:4:10: services.web.listen: 127.0.0.1:8080 is already used by daemon.api",
            ],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\nstrategy = \"yolo\"\n",
            &[
                "cutover.toml:4:12: services.web.strategy: \"yolo\" is not a strategy; use \"canary\", \"blue-green\" or \"rolling\"",
            ],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\nruntime = \"docker\"\n",
            &[
                "cutover.toml:4:11: services.web.runtime: \"docker\" is not a runtime; use \"process\" or \"static\"",
            ],
        ),
        (
            "[services.api]\nlisten = \"127.0.0.1:9090\"\nruntime = \"static\"\nupstreams = { v1 = [] }\n",
            &["cutover.toml:4:20: services.api.upstreams.v1: has no addresses; list at least one"],
        ),
        (
            "[services.api]\nlisten = \"127.0.0.1:9090\"\nruntime = \"static\"\nversion = \"v3\"\nupstreams = { v1 = [\"127.0.0.1:1\"] }\n",
            &["cutover.toml:4:11: services.api.version: v3 has no upstreams; configured: v1"],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.health]\ninterval = \"soon\"\n",
            &[
                "cutover.toml:5:12: services.web.health.interval: \"soon\" is not a duration like \"250ms\", \"10s\" or \"5m\" (expected number at 0)",
            ],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\ninstances = 0\n",
            &["cutover.toml:4:13: services.web.instances: 0 is below 1"],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.analysis]\nmax_error_rate = 5.0\n",
            &[
                "cutover.toml:5:18: services.web.analysis.max_error_rate: 5 is a share between 0 and 1 (0.01 = 1%)",
            ],
        ),
        (
            "[services.web]\nlisten = \"localhost\"\ncommand = [\"app\", \"{port}\"]\n",
            &[
                "cutover.toml:2:10: services.web.listen: \"localhost\" is not an address like \"127.0.0.1:8080\"",
            ],
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n[services.web.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n",
            &[
                "cutover.toml:6:11: services.web.health.timeout: 2s must be shorter than health.interval",
            ],
        ),
    ];
    for (text, want) in cases {
        check(text, want);
    }
}

#[test]
fn serde_level_errors_have_locations_too() {
    for (text, want_prefix, want_part) in [
        (
            format!("{GOOD_SERVICE}bogus = 1\n"),
            "cutover.toml:4:1: services.web.bogus: ",
            "unknown field `bogus`",
        ),
        ("[daemon\n".to_owned(), "cutover.toml:1:", ""),
        (
            format!("{GOOD_SERVICE}instances = \"two\"\n"),
            "cutover.toml:4:13: services.web.instances: ",
            "invalid type",
        ),
    ] {
        let err = parse(&text, Path::new("cutover.toml"))
            .expect_err("should not parse")
            .to_string();
        assert!(
            err.starts_with(want_prefix) && err.contains(want_part),
            "{err}"
        );
    }
}

#[test]
fn several_errors_are_reported_together_in_file_order() {
    let text =
        "[services.web]\nlisten = \"nope\"\ncommand = [\"app\", \"{port}\"]\ninstances = 0\n";
    let err = parse(text, Path::new("cutover.toml")).expect_err("should not parse");
    assert_eq!(err.diagnostics.len(), 2);
    assert_eq!((err.diagnostics[0].line, err.diagnostics[1].line), (2, 4));
}

#[test]
fn init_template_parses() {
    let s = parse(INIT_TEMPLATE, Path::new("/srv/app/cutover.toml")).unwrap();
    assert_eq!(s.daemon.state_dir, Path::new("/srv/app/.cutover"));
    let web = s.service("web").unwrap();
    assert_eq!(web.rollout.canary_steps.len(), 4);
    assert_eq!(
        web.rollout.canary_steps[2],
        cutover_core::CanaryStep::Approve
    );
    assert_eq!(
        web.rollout.blue_green.preview_listen,
        Some("127.0.0.1:8081".parse().unwrap())
    );
}

#[test]
fn the_contract_example_parses_with_its_values() {
    let text = r#"
[daemon]
api = "127.0.0.1:7070"
state_dir = ".cutover"
worker_threads = 0

[services.web]
listen = "127.0.0.1:8080"
version = "v1"
runtime = "process"
command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]
env = { RUST_LOG = "info" }
instances = 2
strategy = "canary"

[services.web.health]
path = "/healthz"
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 3

[services.web.canary]
steps = [ { weight = 10, pause = "20s" }, { weight = 50, pause = "20s" }, { approve = true }, { weight = 100 } ]

[services.web.blue_green]
auto_promote = true
preview_listen = "127.0.0.1:8081"
scale_down_delay = "30s"

[services.web.rolling]
max_surge = 1
max_unavailable = 0

[services.web.analysis]
interval = "2s"
min_requests = 50
max_error_rate = 0.01
max_p99 = "500ms"
failure_limit = 2
compare_to_stable = true

[services.api]
listen = "127.0.0.1:9090"
runtime = "static"
version = "v1"
upstreams = { v1 = ["127.0.0.1:18081"], v2 = ["127.0.0.1:18082"] }
"#;
    let s = parse(text, Path::new("cutover.toml")).unwrap();
    assert_eq!(s.services.len(), 2);
    let web = s.service("web").unwrap();
    assert_eq!(web.health.timeout, Duration::from_millis(500));
    assert_eq!(
        web.rollout.analysis.max_p99,
        Some(Duration::from_millis(500))
    );
    assert_eq!(web.rollout.analysis.min_requests, 50);
    match &web.runtime {
        RuntimeSettings::Process { command, env } => {
            assert_eq!(command[0], "cutover");
            assert_eq!(env.get("RUST_LOG").map(String::as_str), Some("info"));
        }
        RuntimeSettings::Static { .. } => panic!("web is a process service"),
    }
    match &s.service("api").unwrap().runtime {
        RuntimeSettings::Static { upstreams } => assert_eq!(upstreams.len(), 2),
        RuntimeSettings::Process { .. } => panic!("api is static"),
    }
}

#[test]
fn relative_state_dir_resolves_against_the_config_file() {
    let s = parse(
        &format!("[daemon]\nstate_dir = \"state\"\n{GOOD_SERVICE}"),
        Path::new("/etc/cutover/cutover.toml"),
    )
    .unwrap();
    assert_eq!(s.daemon.state_dir, Path::new("/etc/cutover/state"));
    let s = parse(
        &format!("[daemon]\nstate_dir = \"/var/lib/cutover\"\n{GOOD_SERVICE}"),
        Path::new("x/cutover.toml"),
    )
    .unwrap();
    assert_eq!(s.daemon.state_dir, Path::new("/var/lib/cutover"));
}

#[test]
fn a_missing_file_says_what_to_do() {
    let err = load(Path::new("/nonexistent/cutover.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cutover init"), "{err}");
}
