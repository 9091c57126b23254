//! Experiment files in both formats, read and checked: every problem with its place.

use std::path::Path;

use super::*;

fn known() -> Known {
    Known {
        services: vec!["web".into()],
        dependencies: vec!["db".into()],
        slos: vec![("web".into(), "availability".into())],
    }
}

/// The game day of the README, in cutover's TOML.
const GAMEDAY: &str = r#"
title = "web survives losing an instance, latency and a bad deploy"
recovery_timeout = "20s"

[[hypothesis]]
name = "few errors"
probe = "error-rate"
service = "web"
window = "3s"
max = 0.05

[[hypothesis]]
probe = "http"
url = "http://127.0.0.1:8080/"
status = 200

[[method]]
action = "kill-instance"
service = "web"
pause_after = "2s"

[[method]]
probe = "p99"
service = "web"
window = "2s"
max = 500

[[method]]
action = "inject-latency"
service = "web"
latency = "200ms"
jitter = "50ms"
for = "5s"

[[method]]
action = "deployment-rollback"
service = "web"
version = "v9"
error_rate = 0.5
within = "60s"

[[rollbacks]]
action = "clear-faults"

[[rollbacks]]
action = "abort-rollout"
service = "web"
"#;

#[test]
fn a_toml_game_day_is_read_whole() {
    let e = parse(GAMEDAY, Path::new("gameday.toml"), &known()).unwrap();
    assert_eq!(e.hypothesis.len(), 2);
    assert_eq!(e.method.len(), 4);
    assert_eq!(e.rollbacks.len(), 2);
    assert_eq!(e.recovery_timeout, Duration::from_secs(20));
    assert_eq!(
        e.hypothesis[0].tolerance,
        Tolerance::Range {
            min: None,
            max: Some(0.05)
        }
    );
    let Activity::Action(a) = &e.method[0] else {
        panic!("not an action")
    };
    assert_eq!(a.pause_after, Duration::from_secs(2));
    assert!(matches!(
        &e.method[2],
        Activity::Action(Action {
            kind: ActionKind::InjectLatency { latency, duration, .. },
            ..
        }) if *latency == Duration::from_millis(200) && *duration == Duration::from_secs(5)
    ));
    // The model round-trips through its persisted form.
    let json = serde_json::to_string(&e).unwrap();
    assert_eq!(serde_json::from_str::<Experiment>(&json).unwrap(), e);
}

/// A Chaos Toolkit experiment as its documentation describes the format: title,
/// steady-state-hypothesis with probes and tolerances, method, rollbacks, pauses, and keys
/// cutover does not use (tags, configuration).
const CTK: &str = r#"{
    "version": "1.0.0",
    "title": "What is the impact of an expired certificate on our application chain?",
    "description": "If a dependency is slow, we should not fail",
    "tags": ["tls", "gameday"],
    "configuration": {"web_url": "http://127.0.0.1:8080"},
    "steady-state-hypothesis": {
        "title": "Application responds",
        "probes": [
            {
                "type": "probe",
                "name": "we-can-request-web",
                "tolerance": 200,
                "provider": {
                    "type": "http",
                    "timeout": 3,
                    "url": "http://127.0.0.1:8080/"
                }
            },
            {
                "type": "probe",
                "name": "error-rate-is-low",
                "tolerance": [0, 0.05],
                "provider": {
                    "type": "python",
                    "module": "chaoscutover.probes",
                    "func": "error_rate",
                    "arguments": {"service": "web", "window": 2}
                }
            }
        ]
    },
    "method": [
        {
            "type": "action",
            "name": "slow-the-database",
            "provider": {
                "type": "python",
                "module": "chaoscutover.actions",
                "func": "dependency_failure",
                "arguments": {"dependency": "db", "mode": "latency", "latency": "300ms", "for": 10}
            },
            "pauses": {"after": 5}
        },
        {
            "type": "probe",
            "name": "healthy-during",
            "tolerance": {"type": "range", "range": [1, 10]},
            "provider": {
                "type": "python",
                "module": "chaoscutover.probes",
                "func": "healthy_instances",
                "arguments": {"service": "web"}
            }
        }
    ],
    "rollbacks": [
        {
            "type": "action",
            "name": "clear",
            "provider": {"type": "python", "module": "chaoscutover.actions", "func": "clear_faults"}
        }
    ]
}"#;

#[test]
fn a_chaos_toolkit_experiment_is_read() {
    let e = parse(CTK, Path::new("experiment.json"), &known()).unwrap();
    assert_eq!(e.hypothesis.len(), 2);
    assert!(matches!(
        &e.hypothesis[0],
        Probe {
            kind: ProbeKind::Http { timeout, .. },
            tolerance: Tolerance::Status { status: Some(200), .. },
            ..
        } if *timeout == Duration::from_secs(3)
    ));
    assert_eq!(
        e.hypothesis[1].tolerance,
        Tolerance::Range {
            min: Some(0.0),
            max: Some(0.05)
        }
    );
    let Activity::Action(a) = &e.method[0] else {
        panic!("not an action")
    };
    assert_eq!(a.pause_after, Duration::from_secs(5));
    assert_eq!(
        a.kind,
        ActionKind::DependencyFailure {
            dependency: "db".into(),
            mode: DependencyMode::Latency(Duration::from_millis(300)),
            duration: Duration::from_secs(10),
        }
    );
    assert!(matches!(&e.method[1], Activity::Probe(_)));
    assert_eq!(e.rollbacks.len(), 1);
}

#[test]
fn cpu_stress_scaling_shock_and_burn_rate_are_read_in_both_formats() {
    let toml = r#"
title = "load"
[[hypothesis]]
probe = "slo-burn-rate"
service = "web"
window = "20s"
max = 2
[[method]]
action = "cpu-stress"
service = "web"
version = "v2"
count = 2
load = 0.8
for = "10s"
[[method]]
action = "scaling-shock"
service = "web"
factor = 4
max_rps = 300
concurrency = 16
paths = ["/", "/api"]
for = "5s"
"#;
    let e = parse(toml, Path::new("x.toml"), &known()).unwrap();
    assert_eq!(
        e.hypothesis[0].kind,
        ProbeKind::SloBurnRate {
            service: "web".into(),
            slo: "availability".into(),
            window: Duration::from_secs(20),
        }
    );
    let kinds: Vec<&ActionKind> = e
        .method
        .iter()
        .map(|a| match a {
            Activity::Action(a) => &a.kind,
            Activity::Probe(_) => panic!("a probe"),
        })
        .collect();
    assert_eq!(
        kinds[0],
        &ActionKind::CpuStress {
            service: "web".into(),
            version: Some("v2".into()),
            count: 2,
            load: 0.8,
            duration: Duration::from_secs(10),
        }
    );
    assert_eq!(
        kinds[1],
        &ActionKind::ScalingShock {
            service: "web".into(),
            factor: 4.0,
            min_rps: 10.0,
            max_rps: 300.0,
            concurrency: 16,
            paths: vec!["/".into(), "/api".into()],
            duration: Duration::from_secs(5),
        }
    );
    let json = r#"{"title": "load", "method": [
      {"type": "action", "name": "burn", "provider": {"type": "python",
        "module": "chaoscutover.actions", "func": "cpu_stress",
        "arguments": {"service": "web", "load": 0.5, "for": 3}}},
      {"type": "probe", "name": "budget", "tolerance": [0, 1], "provider": {"type": "python",
        "module": "chaoscutover.probes", "func": "slo_burn_rate",
        "arguments": {"service": "web", "slo": "availability"}}}
    ]}"#;
    let e = parse(json, Path::new("x.json"), &known()).unwrap();
    assert!(matches!(
        &e.method[0],
        Activity::Action(Action { kind: ActionKind::CpuStress { load, count: 1, .. }, .. }) if *load == 0.5
    ));
    assert!(matches!(
        &e.method[1],
        Activity::Probe(Probe {
            kind: ProbeKind::SloBurnRate { .. },
            ..
        })
    ));
}

/// Bad input: each row a file and the `line:col: key: message` its first problem must have.
#[test]
fn problems_name_their_place() {
    let rows: Vec<(&str, &str, &str)> = vec![
        (
            "t.toml",
            "title = \"x\"\n[[method]]\naction = \"kill-instance\"\nservice = \"wbe\"\n",
            "t.toml:4:11: method[0].service: no service named \"wbe\"",
        ),
        (
            "t.toml",
            "title = \"x\"\n[[method]]\naction = \"explode\"\nservice = \"web\"\n",
            "t.toml:3:10: method[0]: unknown action \"explode\"",
        ),
        (
            "t.toml",
            "title = \"x\"\n[[hypothesis]]\nprobe = \"vibes\"\n[[method]]\naction = \"wait\"\n",
            "t.toml:3:9: hypothesis[0]: unknown probe \"vibes\"",
        ),
        (
            "t.toml",
            "title = \"x\"\n[[method]]\naction = \"wait\"\nfor = \"5s\"\ncolour = 1\n",
            "t.toml:5:10: method[0].colour: unknown key",
        ),
        (
            "t.toml",
            "title = \"x\"\n[[method]]\naction = \"dependency-failure\"\ndependency = \"redis\"\n",
            "t.toml:4:14: method[0].dependency: no dependency named \"redis\"",
        ),
        ("t.toml", "title = \n", "t.toml:1:9: not valid TOML"),
        (
            "t.toml",
            "title = \"x\"\n[[method]]\naction = \"cpu-stress\"\nservice = \"web\"\nload = 1.5\n",
            "t.toml:2:1: method[0].load: 1.5 is a share above 0 and at most 1",
        ),
        (
            "t.toml",
            "title = \"x\"\n[[method]]\naction = \"scaling-shock\"\nservice = \"web\"\nfactor = 1\n",
            "t.toml:2:1: method[0].factor: 1 must be above 1",
        ),
        (
            "t.toml",
            "title = \"x\"\n[[hypothesis]]\nprobe = \"slo-burn-rate\"\nservice = \"web\"\nslo = \"latency\"\nmax = 1\n",
            "t.toml:2:1: hypothesis[0].slo: web has no SLO named \"latency\" (its SLOs: availability)",
        ),
        (
            "t.json",
            "{\"title\": \"x\",\n \"method\": [{\"type\": \"action\", \"name\": \"k\",\n  \"provider\": {\"type\": \"python\", \"module\": \"chaoscutover.actions\", \"func\": \"kill_instanse\", \"arguments\": {\"service\": \"web\"}}}]}",
            "t.json:3:76: method[0].provider.arguments: unknown action \"kill-instanse\"",
        ),
        (
            "t.json",
            "{\"title\": \"x\",\n \"method\": [{\"type\": \"action\", \"name\": \"k\",\n  \"provider\": {\"type\": \"process\", \"path\": \"rm\"}}]}",
            "t.json:3:3: method[0].provider.type: \"process\" providers are not run by cutover",
        ),
        ("t.json", "{\"title\": ", "t.json:1:10: not valid JSON"),
    ];
    for (file, text, want) in rows {
        let e = parse(text, Path::new(file), &known()).unwrap_err();
        let got = e.to_string();
        let first = got.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(want),
            "{file}: {text:?}\n got: {got}\nwant: {want}"
        );
    }
}
