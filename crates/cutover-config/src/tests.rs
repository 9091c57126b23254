//! Data-driven tests: every kind of mistake, with the exact diagnostic it must produce.

use std::path::Path;
use std::time::Duration;

use super::*;

const GOOD_SERVICE: &str =
    "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n";

/// Parses `text` as `cutover.toml` and expects exactly the diagnostics `want`.
/// Parses `text` as `cutover.toml` and expects exactly the diagnostics `want`, one per line.
fn check(text: &str, want: &str) {
    let err = parse(text, Path::new("cutover.toml")).expect_err("should not parse");
    assert_eq!(err.to_string(), want, "for config:\n{text}");
}

/// `GOOD_SERVICE` followed by `rest`.
fn web(rest: &str) -> String {
    format!("{GOOD_SERVICE}{rest}")
}

#[test]
fn broken_configs_name_file_line_column_and_key() {
    let static_api = "[services.api]\nlisten = \"127.0.0.1:9090\"\nruntime = \"static\"\n";
    let cases: Vec<(String, &str)> = vec![
        // Canary steps: range, order, end, form.
        (
            web("[services.web.canary]\nsteps = [ { weight = 10 }, { weight = 140 } ]\n"),
            "cutover.toml:5:39: services.web.canary.steps[1].weight: 140 is above 100",
        ),
        (
            web("[services.web.canary]\nsteps = [ { weight = -5 }, { weight = 100 } ]\n"),
            "cutover.toml:5:22: services.web.canary.steps[0].weight: -5 is below 0",
        ),
        (
            web("[services.web.canary]\nsteps = [ { weight = 50 }, { weight = 20 }, { weight = 100 } ]\n"),
            "cutover.toml:5:39: services.web.canary.steps[1].weight: 20 is not above step 0's weight 50; weights must increase",
        ),
        (
            web("[services.web.canary]\nsteps = [ { weight = 10 }, { weight = 50 } ]\n"),
            "cutover.toml:5:39: services.web.canary.steps[1].weight: the last weight step is 50; it must be 100 so the rollout can finish",
        ),
        (
            web("[services.web.canary]\nsteps = [ { weight = 10, approve = true }, { weight = 100 } ]\n"),
            "cutover.toml:5:22: services.web.canary.steps[0]: a step sets either weight (with an optional pause) or approve = true, not both",
        ),
        (
            web("[services.web.canary]\nsteps = [ { pause = \"5s\" }, { weight = 100 } ]\n"),
            "cutover.toml:5:11: services.web.canary.steps[0]: a step needs weight = N (0-100, optional pause) or approve = true",
        ),
        (
            web("[services.web.canary]\nsteps = [ { approve = false }, { weight = 100 } ]\n"),
            "cutover.toml:5:23: services.web.canary.steps[0].approve: only `approve = true` makes sense; remove the step instead",
        ),
        (
            web("[services.web.canary]\nsteps = []\n"),
            "cutover.toml:5:9: services.web.canary.steps: needs at least one step, e.g. [ { weight = 10, pause = \"1m\" }, { weight = 100 } ]",
        ),
        // Evidence: analysis keys and how a step or service opts out.
        (
            web("[services.web.analysis]\non_no_evidence = \"ignore\"\n"),
            "cutover.toml:5:18: services.web.analysis.on_no_evidence: \"ignore\" is not one of \"pause\", \"rollback\", \"promote\"",
        ),
        (
            web("[services.web.analysis]\nanalysis_deadline = \"0s\"\n"),
            "cutover.toml:5:21: services.web.analysis.analysis_deadline: must be longer than 0",
        ),
        (
            web("analysis = true\n"),
            "cutover.toml:4:12: services.web.analysis: `analysis = true` is the default; write an [analysis] table to tune it, or `analysis = false` to turn it off",
        ),
        (
            web("analysis = \"off\"\n"),
            "cutover.toml:4:12: services.web.analysis: invalid type: string \"off\", expected `false` or an analysis table",
        ),
        (
            web("[services.web.canary]\nsteps = [ { approve = true, analysis = false }, { weight = 100 } ]\n"),
            "cutover.toml:5:40: services.web.canary.steps[0].analysis: an approval step is a person's decision; analysis applies to weight steps",
        ),
        (
            web("scale_down_delay = \"5s\"\n[services.web.blue_green]\nscale_down_delay = \"10s\"\n"),
            "cutover.toml:6:20: services.web.blue_green.scale_down_delay: is also set as services.NAME.scale_down_delay; keep only that one",
        ),
        // Commands and runtimes.
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"--port\", \"8000\"]\n".to_owned(),
            "cutover.toml:3:11: services.web.command: has no {port} placeholder; pass the port cutover chooses (e.g. \"--port\", \"{port}\"), or set reads_port_env = true if the program reads PORT",
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = []\n".to_owned(),
            "cutover.toml:3:11: services.web.command: must name a program to run",
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\n".to_owned(),
            "cutover.toml:1:1: services.web.command: is required for process services, e.g. [\"./app\", \"--port\", \"{port}\"]",
        ),
        (
            web("runtime = \"kubernetes\"\n"),
            "cutover.toml:4:11: services.web.runtime: \"kubernetes\" is not a runtime; use \"process\", \"static\" or \"docker\"",
        ),
        (
            web("upstreams = { v1 = [\"127.0.0.1:1\"] }\n"),
            "cutover.toml:4:13: services.web.upstreams: only static services have upstreams; remove it or set runtime = \"static\"",
        ),
        (
            format!("{static_api}upstreams = {{ v1 = [\"127.0.0.1:1\"] }}\ncommand = [\"app\"]\n"),
            "cutover.toml:5:11: services.api.command: static services run nothing; remove it or set runtime = \"process\"",
        ),
        (
            format!("{static_api}upstreams = {{ v1 = [] }}\n"),
            "cutover.toml:4:20: services.api.upstreams.v1: has no addresses; list at least one",
        ),
        (
            format!("{static_api}version = \"v3\"\nupstreams = {{ v1 = [\"127.0.0.1:1\"] }}\n"),
            "cutover.toml:4:11: services.api.version: v3 has no upstreams; configured: v1",
        ),
        (
            format!("{static_api}upstreams = {{ v2 = [\"127.0.0.1:1\"] }}\n"),
            "cutover.toml:4:13: services.api.upstreams: has no entry for version v1 (the default); set version to one of: v2",
        ),
        (
            format!("{static_api}upstreams = {{ v1 = [\"127.0.0.1:1\", \"nowhere\"] }}\n"),
            "cutover.toml:4:36: services.api.upstreams.v1[1]: \"nowhere\" is not an address like \"127.0.0.1:8080\"",
        ),
        // Addresses and collisions.
        (
            "[daemon]\napi = \"127.0.0.1:8080\"\n[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n".to_owned(),
            "cutover.toml:4:10: services.web.listen: 127.0.0.1:8080 is already used by daemon.api",
        ),
        (
            // "api" sorts first by name but is written second: the second use is the one blamed.
            web("[services.api]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n"),
            "cutover.toml:5:10: services.api.listen: 127.0.0.1:8080 is already used by services.web.listen",
        ),
        (
            web("[services.web.blue_green]\npreview_listen = \"127.0.0.1:7070\"\n"),
            "cutover.toml:5:18: services.web.blue_green.preview_listen: 127.0.0.1:7070 is already used by daemon.api",
        ),
        (
            web("[services.api]\nlisten = \"0.0.0.0:8080\"\ncommand = [\"app\", \"{port}\"]\n"),
            "cutover.toml:5:10: services.api.listen: 0.0.0.0:8080 collides with 127.0.0.1:8080 of services.web.listen (same port)",
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:0\"\ncommand = [\"app\", \"{port}\"]\n".to_owned(),
            "cutover.toml:2:10: services.web.listen: 127.0.0.1:0 has port 0; users need a fixed port to send traffic to",
        ),
        (
            format!("[daemon]\nmetrics = \"127.0.0.1:7070\"\n{GOOD_SERVICE}"),
            "cutover.toml:2:11: daemon.metrics: 127.0.0.1:7070 is already used by daemon.api",
        ),
        (
            "[daemon]\nmetrics = \"0.0.0.0:9100\"\n[services.web]\nlisten = \"127.0.0.1:9100\"\ncommand = [\"app\", \"{port}\"]\n".to_owned(),
            "cutover.toml:4:10: services.web.listen: 127.0.0.1:9100 collides with 0.0.0.0:9100 of daemon.metrics (same port)",
        ),
        (
            format!("[daemon]\nmetrics = \"127.0.0.1:0\"\n{GOOD_SERVICE}"),
            "cutover.toml:2:11: daemon.metrics: 127.0.0.1:0 has port 0; Prometheus needs a fixed port to scrape",
        ),
        (
            format!("[daemon]\nmetrics = \"9100\"\n{GOOD_SERVICE}"),
            "cutover.toml:2:11: daemon.metrics: \"9100\" is not an address like \"127.0.0.1:8080\"",
        ),
        (
            "[services.web]\nlisten = \"localhost\"\ncommand = [\"app\", \"{port}\"]\n".to_owned(),
            "cutover.toml:2:10: services.web.listen: \"localhost\" is not an address like \"127.0.0.1:8080\"",
        ),
        // Names and labels.
        (
            "[services.Web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n".to_owned(),
            "cutover.toml:1:11: services.Web: service names use lowercase letters, digits and '-'",
        ),
        (
            web("version = \"v 2\"\n"),
            "cutover.toml:4:11: services.web.version: version \"v 2\" contains ' '; a version is 1-128 letters, digits, '.', '_' or '-', not starting with '-' or '.'",
        ),
        // A label becomes `{version}` in an instance's argv: no option look-alikes.
        (
            web("version = \"-rf\"\n"),
            "cutover.toml:4:11: services.web.version: version \"-rf\" starts with '-'; a version is 1-128 letters, digits, '.', '_' or '-', not starting with '-' or '.'",
        ),
        (
            format!("{static_api}version = \"v1\"\nupstreams = {{ v1 = [\"127.0.0.1:1\"], \"--help\" = [\"127.0.0.1:2\"] }}\n"),
            "cutover.toml:5:37: services.api.upstreams.--help: version \"--help\" starts with '-'; a version is 1-128 letters, digits, '.', '_' or '-', not starting with '-' or '.'",
        ),
        (
            web(&format!("version = \"{}\"\n", "v".repeat(10_000))),
            "cutover.toml:4:11: services.web.version: version \"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv…\" is 10000 characters long, more than 128; a version is 1-128 letters, digits, '.', '_' or '-', not starting with '-' or '.'",
        ),
        (
            web("strategy = \"yolo\"\n"),
            "cutover.toml:4:12: services.web.strategy: \"yolo\" is not a strategy; use \"canary\", \"blue-green\" or \"rolling\"",
        ),
        // Numbers and durations.
        (
            web("instances = 0\n"),
            "cutover.toml:4:13: services.web.instances: 0 is below 1",
        ),
        (
            web("[services.web.analysis]\nmax_error_rate = 5.0\n"),
            "cutover.toml:5:18: services.web.analysis.max_error_rate: 5 is a share between 0 and 1 (0.01 = 1%)",
        ),
        (
            web("[services.web.analysis]\nfailure_limit = 0\n"),
            "cutover.toml:5:17: services.web.analysis.failure_limit: 0 is below 1",
        ),
        (
            web("[services.web.health]\nhealthy_threshold = 0\nunhealthy_threshold = 0\n"),
            "cutover.toml:5:21: services.web.health.healthy_threshold: 0 is below 1\n\
             cutover.toml:6:23: services.web.health.unhealthy_threshold: 0 is below 1",
        ),
        (
            web("[services.web.health]\ninterval = \"soon\"\n"),
            "cutover.toml:5:12: services.web.health.interval: \"soon\" is not a duration like \"250ms\", \"10s\" or \"5m\" (expected number at 0)",
        ),
        (
            web("[services.web.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n"),
            "cutover.toml:6:11: services.web.health.timeout: 2s must be shorter than health.interval (1s)",
        ),
        (
            web("drain_timeout = \"0s\"\n"),
            "cutover.toml:4:17: services.web.drain_timeout: must be longer than 0",
        ),
        (
            web("[services.web.rolling]\nmax_surge = 0\nmax_unavailable = 0\n"),
            "cutover.toml:5:13: services.web.rolling: max_surge and max_unavailable cannot both be 0: nothing could be replaced",
        ),
        (
            web("[notify]\nwebhook = \"https://example.com/hook\"\n"),
            "cutover.toml:5:11: notify.webhook: \"https://example.com/hook\" must be an http:// URL",
        ),
        // Found by serde while reading: unknown keys, wrong types, TOML syntax.
        (
            web("bogus = 1\n"),
            "cutover.toml:4:1: services.web.bogus: unknown key `bogus`; allowed keys: `listen`, `version`, `runtime`, `command`, `env`, `env_file`, `reads_port_env`, `upstreams`, `instances`, `strategy`, `progress_deadline`, `drain_timeout`, `stop_timeout`, `upstream_timeout`, `health`, `canary`, `blue_green`, `rolling`, `scale_down_delay`, `analysis`, `max_connections`, `probe`, `image`, `port`, `docker`, `hooks`, `smoke`, `database`, `slo`",
        ),
        (
            web("[services.web.canary]\nsteps = [ { weight = 10, wait = \"5s\" }, { weight = 100 } ]\n"),
            "cutover.toml:5:26: services.web.canary.steps[0].wait: unknown key `wait`; allowed keys: `weight`, `pause`, `approve`, `analysis`",
        ),
        (
            "[demon]\napi = \"127.0.0.1:7070\"\n".to_owned(),
            "cutover.toml:1:2: demon: unknown key `demon`; allowed keys: `daemon`, `services`, `notify`, `dependencies`, `backups`, `alerts`, `policy`, `dora`",
        ),
        (
            web("instances = \"two\"\n"),
            "cutover.toml:4:13: services.web.instances: invalid type: string \"two\", expected an integer",
        ),
        (
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", 5]\n".to_owned(),
            "cutover.toml:3:19: services.web.command[1]: invalid type: integer `5`, expected a string",
        ),
        (
            "[daemon\napi = \"127.0.0.1:7070\"\n".to_owned(),
            "cutover.toml:1:8: unclosed table, expected `]`",
        ),
        (
            web("listen = \"127.0.0.1:9999\"\n"),
            "cutover.toml:4:1: duplicate key `listen`: it is already set above",
        ),
        // Every problem of the resolve stage at once, in file order.
        (
            "[services.web]\nlisten = \"nope\"\ncommand = [\"app\", \"{port}\"]\ninstances = 0\n[services.web.analysis]\nfailure_limit = 0\n".to_owned(),
            "cutover.toml:2:10: services.web.listen: \"nope\" is not an address like \"127.0.0.1:8080\"\n\
             cutover.toml:4:13: services.web.instances: 0 is below 1\n\
             cutover.toml:6:17: services.web.analysis.failure_limit: 0 is below 1",
        ),
    ];
    for (text, want) in &cases {
        check(text, want);
    }
}

#[test]
fn diagnostics_carry_structured_fields() {
    let err = parse(&web("instances = 0\n"), Path::new("conf/cutover.toml"))
        .expect_err("should not parse");
    assert_eq!(
        err.diagnostics,
        vec![Diagnostic {
            file: "conf/cutover.toml".into(),
            line: 4,
            column: 13,
            key: "services.web.instances".into(),
            message: "0 is below 1".into(),
        }]
    );
}

#[test]
fn a_metrics_listener_is_read() {
    let s = parse(
        &format!("[daemon]\nmetrics = \"127.0.0.1:9100\"\n{GOOD_SERVICE}"),
        Path::new("cutover.toml"),
    )
    .expect("valid");
    assert_eq!(
        s.daemon.metrics,
        Some("127.0.0.1:9100".parse().expect("addr"))
    );
}

#[test]
fn an_api_or_metrics_listener_other_machines_reach_is_valid_with_a_warning() {
    let s = parse(
        &format!("[daemon]\napi = \"0.0.0.0:7070\"\nmetrics = \"[::]:9100\"\n{GOOD_SERVICE}"),
        Path::new("cutover.toml"),
    )
    .expect("valid");
    let w: Vec<String> = s.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].starts_with(
            "cutover.toml:2:7: daemon.api: 0.0.0.0:7070 is reachable from other machines"
        ),
        "{w:#?}"
    );
    assert!(
        w[1].starts_with(
            "cutover.toml:3:11: daemon.metrics: [::]:9100 is reachable from other machines"
        ),
        "{w:#?}"
    );
    // Loopback (the default) says nothing.
    let s = parse(
        &format!("[daemon]\napi = \"127.0.0.1:7070\"\nmetrics = \"[::1]:9100\"\n{GOOD_SERVICE}"),
        Path::new("cutover.toml"),
    )
    .expect("valid");
    assert_eq!(s.warnings, []);
}

#[test]
fn max_connections_is_optional_and_positive() {
    let s = parse(&web("max_connections = 50\n"), Path::new("cutover.toml")).expect("valid");
    assert_eq!(s.service("web").expect("web").max_connections, Some(50));
    let s = parse(GOOD_SERVICE, Path::new("cutover.toml")).expect("valid");
    assert_eq!(s.service("web").expect("web").max_connections, None);
    check(
        &web("max_connections = 0\n"),
        "cutover.toml:4:19: services.web.max_connections: 0 is below 1",
    );
}

#[test]
fn port_placeholder_may_be_absent_when_the_program_reads_port() {
    let s = parse(
        "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"./app\"]\nreads_port_env = true\n",
        Path::new("cutover.toml"),
    )
    .expect("valid");
    let here = std::env::current_dir().expect("cwd");
    let app = here.join("app").to_string_lossy().into_owned();
    assert!(matches!(
        &s.service("web").expect("web").runtime,
        RuntimeSettings::Process { command, .. } if command == &[app]
    ));
}

#[test]
fn relative_programs_resolve_against_the_config_files_directory() {
    let program = |cmd: &str, file: &str| {
        let text = format!(
            "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [{cmd}, \"{{port}}\"]\n"
        );
        match parse(&text, Path::new(file)).expect("valid").services[0]
            .runtime
            .clone()
        {
            RuntimeSettings::Process { command, .. } => command,
            other => panic!("a process service: {other:?}"),
        }
    };
    assert_eq!(
        program("\"./shop\"", "/srv/app/cutover.toml"),
        ["/srv/app/shop", "{port}"]
    );
    assert_eq!(
        program("\"bin/{version}/shop\"", "/srv/app/cutover.toml")[0],
        "/srv/app/bin/{version}/shop"
    );
    assert_eq!(
        program("\"../shop\"", "/srv/app/cutover.toml")[0],
        "/srv/app/../shop"
    );
    let here = std::env::current_dir().expect("cwd");
    assert_eq!(
        program("\"./shop\"", "../app/cutover.toml")[0],
        here.join("../app/shop").to_string_lossy()
    );
    // Bare names are looked up in PATH; absolute paths stay as written.
    assert_eq!(
        program("\"python3\"", "/srv/app/cutover.toml")[0],
        "python3"
    );
    assert_eq!(
        program("\"cutover\"", "/srv/app/cutover.toml")[0],
        "cutover"
    );
    assert_eq!(
        program("\"/usr/bin/shop\"", "/srv/app/cutover.toml")[0],
        "/usr/bin/shop"
    );
}

#[test]
fn defaults_fill_what_is_not_written() {
    let s = parse(GOOD_SERVICE, Path::new("cutover.toml")).expect("valid");
    assert_eq!(s.daemon.api, "127.0.0.1:7070".parse().expect("addr"));
    assert_eq!(s.daemon.state_dir, Path::new("./.cutover"));
    assert_eq!(s.daemon.worker_threads, 0);
    assert_eq!(s.daemon.metrics, None);
    assert_eq!(s.notify.webhook, None);
    let web = s.service("web").expect("web");
    assert_eq!(web.version.as_str(), "v1");
    assert_eq!(web.health, cutover_core::HealthSpec::default());
    assert_eq!(web.upstream_timeout, Duration::from_secs(30));
    let d = cutover_core::RolloutSpec::default();
    assert_eq!(web.rollout.strategy, cutover_core::StrategyKind::Canary);
    assert_eq!(web.rollout.instances, d.instances);
    assert_eq!(web.rollout.canary_steps, d.canary_steps);
    assert_eq!(web.rollout.analysis, cutover_core::AnalysisSpec::default());
    assert_eq!(web.rollout.progress_deadline, Duration::from_secs(60));
    assert_eq!(web.rollout.drain_timeout, Duration::from_secs(30));
    assert_eq!(web.rollout.stop_timeout, Duration::from_secs(10));
}

#[test]
fn extensions_and_services_in_name_order() {
    let text = "[notify]\nwebhook = \"http://127.0.0.1:9000/hook\"\n\
        [services.zeta]\nlisten = \"127.0.0.1:8082\"\ncommand = [\"app\", \"{port}\"]\n\
        progress_deadline = \"2m\"\ndrain_timeout = \"250ms\"\nstop_timeout = \"3s\"\n\
        upstream_timeout = \"5s\"\nstrategy = \"blue-green\"\n\
        [services.alpha]\nlisten = \"127.0.0.1:8081\"\ncommand = [\"app\", \"{port}\"]\n\
        strategy = \"rolling\"\n[services.alpha.health]\ninterval = \"200ms\"\n";
    let s = parse(text, Path::new("cutover.toml")).expect("valid");
    let names: Vec<&str> = s.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    assert_eq!(
        s.notify.webhook.as_deref(),
        Some("http://127.0.0.1:9000/hook")
    );
    let zeta = s.service("zeta").expect("zeta");
    assert_eq!(zeta.rollout.strategy, cutover_core::StrategyKind::BlueGreen);
    assert_eq!(zeta.rollout.progress_deadline, Duration::from_secs(120));
    assert_eq!(zeta.rollout.drain_timeout, Duration::from_millis(250));
    assert_eq!(zeta.rollout.stop_timeout, Duration::from_secs(3));
    assert_eq!(zeta.upstream_timeout, Duration::from_secs(5));
    let alpha = s.service("alpha").expect("alpha");
    assert_eq!(alpha.rollout.strategy, cutover_core::StrategyKind::Rolling);
    // A short interval brings the default timeout down with it.
    assert_eq!(alpha.health.interval, Duration::from_millis(200));
    assert_eq!(alpha.health.timeout, Duration::from_millis(100));
}

#[test]
fn analysis_opt_outs_and_the_service_scale_down_delay() {
    let s = parse(
        &web("scale_down_delay = \"0s\"\nanalysis = false\n[services.web.canary]\nsteps = [ { weight = 10, pause = \"5s\", analysis = false }, { weight = 100 } ]\n"),
        Path::new("cutover.toml"),
    )
    .expect("valid");
    let r = &s.service("web").expect("web").rollout;
    assert!(!r.analysis.enabled);
    assert_eq!(r.scale_down_delay, Duration::ZERO);
    assert!(matches!(
        r.canary_steps[0],
        cutover_core::CanaryStep::SetWeight {
            analysis: false,
            ..
        }
    ));
    let s = parse(
        &web("[services.web.blue_green]\nscale_down_delay = \"7s\"\n[services.web.analysis]\nanalysis_deadline = \"3m\"\non_no_evidence = \"rollback\"\n"),
        Path::new("cutover.toml"),
    )
    .expect("valid");
    let r = &s.service("web").expect("web").rollout;
    assert!(r.analysis.enabled);
    assert_eq!(r.scale_down_delay, Duration::from_secs(7));
    assert_eq!(r.analysis.deadline, Duration::from_secs(180));
    assert_eq!(
        r.analysis.on_no_evidence,
        cutover_core::NoEvidence::Rollback
    );
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
    let s = parse(text, Path::new("cutover.toml")).expect("valid");
    let addr = |a: &str| a.parse::<std::net::SocketAddr>().expect("addr");
    assert_eq!(s.daemon.api, addr("127.0.0.1:7070"));
    assert_eq!(s.daemon.worker_threads, 0);
    assert_eq!(s.services.len(), 2);
    let web = s.service("web").expect("web");
    assert_eq!(web.listen, addr("127.0.0.1:8080"));
    assert_eq!(web.version.as_str(), "v1");
    assert_eq!(
        web.health,
        cutover_core::HealthSpec {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    );
    let r = &web.rollout;
    assert_eq!(r.strategy, cutover_core::StrategyKind::Canary);
    assert_eq!(r.instances, 2);
    let w = |n| cutover_core::Weight::new(n).expect("weight");
    let pause = Some(Duration::from_secs(20));
    assert_eq!(
        r.canary_steps,
        vec![
            cutover_core::CanaryStep::SetWeight {
                weight: w(10),
                pause,
                analysis: true,
            },
            cutover_core::CanaryStep::SetWeight {
                weight: w(50),
                pause,
                analysis: true,
            },
            cutover_core::CanaryStep::Approve,
            cutover_core::CanaryStep::SetWeight {
                weight: w(100),
                pause: None,
                analysis: true,
            },
        ]
    );
    assert!(r.blue_green.auto_promote);
    assert_eq!(r.blue_green.preview_listen, Some(addr("127.0.0.1:8081")));
    assert_eq!(r.scale_down_delay, Duration::from_secs(30));
    assert_eq!((r.rolling.max_surge, r.rolling.max_unavailable), (1, 0));
    assert_eq!(
        r.analysis,
        cutover_core::AnalysisSpec {
            enabled: true,
            deadline: Duration::from_secs(600),
            on_no_evidence: cutover_core::NoEvidence::Pause,
            interval: Duration::from_secs(2),
            min_requests: 50,
            max_error_rate: Some(0.01),
            max_p99: Some(Duration::from_millis(500)),
            failure_limit: 2,
            compare_to_stable: true,
        }
    );
    match &web.runtime {
        RuntimeSettings::Process { command, env } => {
            assert_eq!(
                command,
                &[
                    "cutover",
                    "demo-app",
                    "--port",
                    "{port}",
                    "--version",
                    "{version}"
                ]
            );
            assert_eq!(env.get("RUST_LOG").map(String::as_str), Some("info"));
        }
        other => panic!("web is a process service: {other:?}"),
    }
    let api = s.service("api").expect("api");
    assert_eq!(api.listen, addr("127.0.0.1:9090"));
    match &api.runtime {
        RuntimeSettings::Static { upstreams } => assert_eq!(
            upstreams,
            &BTreeMap::from([
                (
                    cutover_core::Version::new("v1"),
                    vec![addr("127.0.0.1:18081")]
                ),
                (
                    cutover_core::Version::new("v2"),
                    vec![addr("127.0.0.1:18082")]
                ),
            ])
        ),
        other => panic!("api is static: {other:?}"),
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

#[test]
fn load_reads_the_file_and_resolves_state_dir_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cutover.toml");
    std::fs::write(&path, INIT_TEMPLATE).expect("write");
    let s = load(&path).expect("valid");
    assert_eq!(s.file, path);
    assert_eq!(s.daemon.state_dir, dir.path().join(".cutover"));
    // Diagnostics from a loaded file name that file.
    std::fs::write(&path, web("instances = 0\n")).expect("write");
    let err = load(&path).expect_err("invalid");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:4:13: services.web.instances: 0 is below 1",
            path.display()
        )
    );
}

/// `[dependencies]`, `analysis.synthetic` and `[[probe]]`: read when right, and each mistake
/// named at its place.
#[test]
fn chaos_keys_are_read_and_checked() {
    let good = web(
        "[services.web.analysis]\nmin_requests = 20\nsynthetic = { rps = 20, paths = [\"/\", \"/api\"], headers = { X-Probe = \"1\" } }\n\
         [[services.web.probe]]\npath = \"/healthz\"\ninterval = \"5s\"\nstatus = 200\n\
         [[services.web.probe]]\nname = \"home\"\npath = \"/\"\nbody_contains = \"version\"\n\
         [dependencies.db]\nlisten = \"127.0.0.1:15432\"\nupstream = \"127.0.0.1:5432\"\n",
    );
    let s = parse(&good, Path::new("cutover.toml")).expect("valid");
    let web = s.service("web").expect("web");
    let syn = web.synthetic.as_ref().expect("synthetic");
    assert_eq!(syn.rps, 20.0);
    assert_eq!(syn.paths, ["/", "/api"]);
    assert_eq!(syn.concurrency, 20);
    assert_eq!(web.probes.len(), 2);
    assert_eq!(web.probes[0].name, "/healthz");
    assert_eq!(web.probes[0].interval, Duration::from_secs(5));
    assert_eq!(web.probes[1].body_contains.as_deref(), Some("version"));
    assert_eq!(s.dependencies.len(), 1);
    assert_eq!(s.dependencies[0].listen.port(), 15432);
    let cases: Vec<(String, &str)> = vec![
        (
            web_with("[services.web.analysis]\nsynthetic = { rps = 0 }\n"),
            "cutover.toml:5:21: services.web.analysis.synthetic.rps: 0 is not between 0 (excluded) and 1000 requests per second",
        ),
        (
            web_with("[services.web.analysis]\nsynthetic = { rps = 5, paths = [\"api\"] }\n"),
            "cutover.toml:5:33: services.web.analysis.synthetic.paths[0]: \"api\" must start with '/'",
        ),
        (
            web_with("[[services.web.probe]]\ninterval = \"5s\"\n"),
            "cutover.toml:4:1: services.web.probe[0].path: is required, e.g. path = \"/healthz\"",
        ),
        (
            web_with("[[services.web.probe]]\npath = \"/\"\nstatus = 700\n"),
            "cutover.toml:6:10: services.web.probe[0].status: 700 is not an HTTP status",
        ),
        (
            web_with(
                "[dependencies.web]\nlisten = \"127.0.0.1:15432\"\nupstream = \"127.0.0.1:5432\"\n",
            ),
            "cutover.toml:4:15: dependencies.web: a service has this name too; faults and experiments name either, so give the dependency another",
        ),
        (
            web_with(
                "[dependencies.db]\nlisten = \"127.0.0.1:8080\"\nupstream = \"127.0.0.1:5432\"\n",
            ),
            "cutover.toml:5:10: dependencies.db.listen: 127.0.0.1:8080 is already used by services.web.listen",
        ),
        (
            web_with("[dependencies.db]\nlisten = \"127.0.0.1:15432\"\n"),
            "cutover.toml:4:1: dependencies.db.upstream: is required: the dependency's real address, e.g. \"127.0.0.1:5432\"",
        ),
    ];
    for (text, want) in cases {
        check(&text, want);
    }
}

const DOCKER_SERVICE: &str = "[services.shop]\nlisten = \"127.0.0.1:8080\"\nruntime = \"docker\"\nimage = \"shop:{version}\"\nport = 8080\n";

#[test]
fn broken_docker_configs_name_file_line_column_and_key() {
    let d = |rest: &str| format!("{DOCKER_SERVICE}{rest}");
    let cases: Vec<(String, &str)> = vec![
        (
            "[services.shop]\nlisten = \"127.0.0.1:8080\"\nruntime = \"docker\"\n".to_owned(),
            "cutover.toml:1:1: services.shop.image: is required for docker services, e.g. \"shop:{version}\"\ncutover.toml:1:1: services.shop.port: is required for docker services: the port the app listens on inside its container, e.g. 8080",
        ),
        (
            DOCKER_SERVICE.replace("port = 8080", "port = 70000"),
            "cutover.toml:5:8: services.shop.port: 70000 is not a port (1-65535)",
        ),
        (
            DOCKER_SERVICE.replace("shop:{version}", "shop:{ver}"),
            "cutover.toml:4:9: services.shop.image: \"shop:{ver}\" is not an image reference like \"shop:{version}\" or \"registry.example/shop:{version}\"",
        ),
        (
            d("command = []\n"),
            "cutover.toml:6:11: services.shop.command: must name a program to run in the container, or be left out to run the image's own command",
        ),
        (
            d("[services.shop.docker]\nmemory = \"256MB\"\n"),
            "cutover.toml:7:10: services.shop.docker.memory: \"256MB\": write binary units, as Docker means them: KiB, MiB or GiB (e.g. \"256MiB\")",
        ),
        (
            d("[services.shop.docker]\nmemory = \"1m\"\n"),
            "cutover.toml:7:10: services.shop.docker.memory: \"1m\" is below Docker's smallest limit, 6MiB",
        ),
        (
            d("[services.shop.docker]\ncpus = 0\n"),
            "cutover.toml:7:8: services.shop.docker.cpus: 0 is not a number of CPUs above 0 (0.5 = half a core)",
        ),
        (
            d("[services.shop.docker]\nvolumes = [\"data\"]\n"),
            "cutover.toml:7:12: services.shop.docker.volumes[0]: \"data\" is not a volume like \"shop-data:/data\" or \"./uploads:/app/uploads:ro\"",
        ),
        (
            d("[services.shop.docker]\nnetwork = \"host\"\n"),
            "cutover.toml:7:11: services.shop.docker.network: \"host\" gives containers no port of their own to publish on 127.0.0.1; use \"bridge\" or a network of your own",
        ),
        (
            d("[services.shop.docker]\nhost = \"/var/run/docker.sock\"\n"),
            "cutover.toml:7:8: services.shop.docker.host: \"/var/run/docker.sock\" is not an Engine address like \"unix:///var/run/docker.sock\" or \"tcp://127.0.0.1:2375\"",
        ),
        (
            d("[services.shop.docker]\ndockerfile = \"Dockerfile.prod\"\n"),
            "cutover.toml:7:14: services.shop.docker.dockerfile: is read from the build context; set build too (e.g. build = \".\")",
        ),
        (
            d("[services.shop.docker]\nlabels = { \"io.cutover.service\" = \"x\" }\n"),
            "cutover.toml:7:10: services.shop.docker.labels: \"io.cutover.service\": io.cutover.* labels are cutover's own; choose another name",
        ),
        (
            d("[services.shop.docker]\nbuidl = \".\"\n"),
            "cutover.toml:7:1: services.shop.docker.buidl: unknown key `buidl`; allowed keys: `build`, `dockerfile`, `pull`, `cpus`, `memory`, `volumes`, `network`, `host`, `labels`",
        ),
        (
            web("image = \"web:{version}\"\n"),
            "cutover.toml:4:9: services.web.image: only docker services take it; remove it or set runtime = \"docker\" (this service is process)",
        ),
        (
            web("[services.web.docker]\npull = true\n"),
            "cutover.toml:4:1: services.web.docker: only docker services take it; remove it or set runtime = \"docker\" (this service is process)",
        ),
        (
            web("runtime = \"dokcer\"\n"),
            "cutover.toml:4:11: services.web.runtime: \"dokcer\" is not a runtime; use \"process\", \"static\" or \"docker\"",
        ),
    ];
    for (text, want) in cases {
        check(&text, want);
    }
}

fn web_with(rest: &str) -> String {
    web(rest)
}

#[test]
fn a_docker_service_reads_every_key_of_contract_8() {
    let text = r#"
[services.shop]
listen = "127.0.0.1:8080"
runtime = "docker"
version = "v41"
image = "shop:{version}"
port = 8080
instances = 2
env = { RUST_LOG = "info" }

[services.shop.docker]
build = "."
dockerfile = "deploy/Dockerfile"
pull = false
cpus = 0.5
memory = "256MiB"
volumes = ["shop-data:/data", "./uploads:/app/uploads:ro"]
network = "bridge"
host = "unix:///var/run/docker.sock"
labels = { team = "payments" }
"#;
    let s = parse(text, Path::new("/etc/app/cutover.toml")).unwrap();
    let RuntimeSettings::Docker(d) = &s.services[0].runtime else {
        panic!("a docker service: {:?}", s.services[0].runtime)
    };
    assert_eq!(d.image, "shop:{version}");
    assert_eq!(d.port, 8080);
    assert_eq!(d.command, None, "the image's own command");
    assert_eq!(d.env["RUST_LOG"], "info");
    assert_eq!(d.build.as_deref(), Some(Path::new("/etc/app")));
    assert_eq!(d.dockerfile, "deploy/Dockerfile");
    assert!(!d.pull);
    assert_eq!(d.cpus, Some(0.5));
    assert_eq!(d.memory, Some(256 << 20));
    assert_eq!(
        d.volumes,
        ["shop-data:/data", "/etc/app/uploads:/app/uploads:ro"]
    );
    assert_eq!(d.network.as_deref(), Some("bridge"));
    assert_eq!(d.host.as_deref(), Some("unix:///var/run/docker.sock"));
    assert_eq!(d.labels["team"], "payments");
    assert!(s.services[0].rollout.runs_instances);

    // The ten-line form: no table, a whole number of CPUs, a command with placeholders.
    let short = format!(
        "{DOCKER_SERVICE}command = [\"/app\", \"--port\", \"{{port}}\"]\n[services.shop.docker]\ncpus = 2\n"
    );
    let s = parse(&short, Path::new("cutover.toml")).unwrap();
    let RuntimeSettings::Docker(d) = &s.services[0].runtime else {
        panic!("docker")
    };
    assert_eq!(d.cpus, Some(2.0));
    assert_eq!(d.dockerfile, "Dockerfile");
    assert_eq!(
        d.host, None,
        "DOCKER_HOST or the default socket, decided at start"
    );
    assert_eq!(
        d.command.as_deref(),
        Some(&["/app".to_owned(), "--port".into(), "{port}".into()][..])
    );
}

#[test]
fn memory_sizes_read_as_docker_means_them() {
    for (text, want) in [
        ("256MiB", Ok(256 << 20)),
        ("1GiB", Ok(1 << 30)),
        ("512m", Ok(512 << 20)),
        ("1.5g", Ok(3 << 29)),
        ("64k", Ok(64 << 10)),
        ("1048576", Ok(1 << 20)),
        (" 8 MiB ", Ok(8 << 20)),
    ] {
        assert_eq!(parse_memory(text), want, "{text}");
    }
    for bad in ["", "MiB", "lots", "10MB", "-5m", "1e999g"] {
        assert!(parse_memory(bad).is_err(), "{bad:?} should be refused");
    }
}
