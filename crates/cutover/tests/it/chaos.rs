//! Faults, chaos experiments, synthetic traffic and probes through the real daemon and CLI:
//! `cutover fault add|list|clear` with expiry, latency injection rolled back by the judge,
//! the README's game day (kill-instance under load, latency, errors, deployment-rollback),
//! a daemon killed mid-experiment, a quiet canary judged thanks to synthetic traffic, and
//! experiment files refused with their place.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Daemon, EXE, Load, healthy, http, stderr, stdout, write};

const QUICK_STEPS: &str =
    r#"[ { weight = 20, pause = "2s" }, { weight = 50, pause = "1s" }, { weight = 100 } ]"#;

fn metrics(d: &Daemon) -> String {
    let (s, body) = http(d.api, "GET", "/metrics", Some(&d.token()), "");
    assert_eq!(s, 200);
    body
}

fn faults(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d.cli(&["fault", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["faults"].as_array().unwrap().clone()
}

fn recent_kinds(d: &Daemon) -> Vec<String> {
    d.status()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn faults_are_added_listed_cleared_and_end_by_themselves() {
    let d = Daemon::start(QUICK_STEPS);
    // No end, no fault; no effect, no fault.
    let out = d.cli(&["fault", "add", "web", "--error-rate", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--for"), "{}", stderr(&out));
    let out = d.cli(&["fault", "add", "nope", "--for", "1m", "--blackhole"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no service or dependency named \"nope\""),
        "{}",
        stderr(&out)
    );

    let out = d.cli(&[
        "fault",
        "add",
        "web",
        "--for",
        "5m",
        "--error-rate",
        "1",
        "--status",
        "503",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_owned();
    assert!(id.starts_with('f'), "{id}");
    let (s, body) = http(d.web, "GET", "/", None, "");
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("injected fault"), "{body}");
    let list = faults(&d);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert!(metrics(&d).contains("cutover_faults_active{service=\"web\"} 1"));
    let out = d.cli(&["fault", "clear", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(http(d.web, "GET", "/", None, "").0, 200);
    assert!(metrics(&d).contains("cutover_faults_active{service=\"web\"} 0"));

    // A fault nobody clears ends by itself.
    let out = d.cli(&["fault", "add", "web", "--for", "1s", "--latency", "50ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the fault to expire", Duration::from_secs(10), || {
        faults(&d).is_empty()
    });
    let kinds = recent_kinds(&d);
    for k in ["fault-added", "fault-cleared", "fault-expired"] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
    let out = d.cli(&["fault", "clear", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn injected_latency_raises_the_candidate_p99_and_the_judge_rolls_it_back() {
    let d = Daemon::start(QUICK_STEPS);
    let load = Load::start(d.web, 4, Duration::from_millis(5));
    load.wait_answers(50);
    // The candidate is slowed beyond max_p99 (500ms) from its first request.
    let out = d.cli(&[
        "fault",
        "add",
        "web",
        "--version",
        "v2",
        "--for",
        "2m",
        "--latency",
        "700ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", stderr(&out), d.log());
    let tally = load.stop();
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    let last = &h["rollouts"][0];
    assert_eq!(last["outcome"], "rolled-back", "{last}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("p99"),
        "rolled back for its latency: {reason}"
    );
    assert_eq!(tally.errors_except("v2"), 0, "{tally:?}");
    assert_eq!(d.status()["stable"], "v1");
}

#[test]
fn the_readme_game_day_holds_under_load_and_leaves_no_fault() {
    let d = Daemon::start(QUICK_STEPS);
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/gameday.toml");
    let text = std::fs::read_to_string(file).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(
        readme.contains(text.trim()),
        "README shows examples/gameday.toml as it is"
    );
    let path = write(d.dir.path(), "gameday.toml", &text);

    let out = d.cli(&["chaos", "run", path.to_str().unwrap(), "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("kill-instance"), "{}", stdout(&out));
    assert!(faults(&d).is_empty(), "a dry run does nothing");

    let load = Load::start(d.web, 4, Duration::from_millis(5));
    load.wait_answers(100);
    let out = d.cli(&["chaos", "run", path.to_str().unwrap(), "--json"]);
    let tally = load.stop();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}\n{}", stdout(&out), stderr(&out), d.log()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report:#}\n{}\n{}",
        stderr(&out),
        d.log()
    );
    assert_eq!(report["verdict"], "held", "{report:#}");
    assert_eq!(report["recovered"], true, "{report:#}");
    let method = report["method"].as_array().unwrap();
    let kinds: Vec<&str> = method.iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "kill-instance",
            "inject-latency",
            "p99",
            "inject-errors",
            "deployment-rollback"
        ]
    );
    assert!(method.iter().all(|m| m["ok"] == true), "{report:#}");
    assert!(
        method[4]["detail"]
            .as_str()
            .unwrap()
            .contains("rolled back"),
        "{report:#}"
    );
    // The latency was felt while it was set.
    assert!(
        method[2]["detail"].as_str().unwrap().contains("within"),
        "{report:#}"
    );
    assert!(faults(&d).is_empty(), "no fault left behind");
    assert_eq!(d.status()["stable"], "v1");
    // Users saw the injected errors and the bad version's, nothing else failed for long.
    assert!(
        tally.per_version.get("v2-bad").is_some_and(|(n, _)| *n > 0),
        "{tally:?}"
    );
}

#[test]
fn kill_instance_under_load_costs_at_most_the_requests_in_flight() {
    let d = Daemon::start(QUICK_STEPS);
    let exp = r#"
title = "an instance dies"
[[hypothesis]]
probe = "healthy-instances"
service = "web"
min = 2
[[method]]
action = "kill-instance"
service = "web"
pause_after = "1s"
"#;
    let path = write(d.dir.path(), "kill.toml", exp);
    let load = Load::start(d.web, 4, Duration::from_millis(2));
    load.wait_answers(200);
    let out = d.cli(&["chaos", "run", path.to_str().unwrap()]);
    load.wait_answers(200);
    let tally = load.stop();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("SIGKILL sent to web-v1-"), "{text}");
    assert!(text.contains("verdict: held"), "{text}");
    assert!(text.contains("recovered in"), "{text}");
    // Each of the 4 connections has at most one request in flight, so the killed instance
    // can cost at most 4; the retry of unsent requests and passive ejection cover the rest.
    assert!(tally.errors_except("") <= 4, "{tally:?}");
    // The runtime saw the crash and restarted the instance: both healthy again.
    d.wait_for("both healthy", |s| healthy(s, "v1") >= 2);
    let kinds = recent_kinds(&d);
    assert!(kinds.iter().any(|k| k == "instance-exit"), "{kinds:?}");
}

#[test]
fn a_daemon_killed_mid_experiment_clears_its_faults_and_runs_rollbacks_at_restart() {
    let mut d = Daemon::start(QUICK_STEPS);
    let exp = r#"
title = "interrupted"
[[method]]
action = "inject-errors"
service = "web"
rate = 1.0
for = "5m"
[[method]]
action = "wait"
for = "5m"
[[rollbacks]]
action = "clear-faults"
[[rollbacks]]
action = "abort-rollout"
service = "web"
"#;
    let path = write(d.dir.path(), "long.toml", exp);
    let mut run = Command::new(EXE)
        .args([
            "-c",
            d.config.to_str().unwrap(),
            "chaos",
            "run",
            path.to_str().unwrap(),
        ])
        .current_dir(d.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the experiment's fault", Duration::from_secs(20), || {
        faults(&d).len() == 1
    });
    assert_eq!(http(d.web, "GET", "/", None, "").0, 500);
    let id = std::fs::read_dir(d.dir.path().join("state/chaos"))
        .unwrap()
        .flatten()
        .find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".json").map(str::to_owned)
        })
        .unwrap();
    d.kill9();
    let _ = run.kill();
    let _ = run.wait();
    d.spawn();
    d.wait_for("v1 healthy again", |s| healthy(s, "v1") >= 2);
    assert!(faults(&d).is_empty(), "no fault survives a restart");
    assert_eq!(http(d.web, "GET", "/", None, "").0, 200);
    let (s, body) = http(
        d.api,
        "GET",
        &format!("/api/v1/experiments/{id}"),
        Some(&d.token()),
        "",
    );
    assert_eq!(s, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["stage"], "done", "{r:#}");
    assert_eq!(r["verdict"], "interrupted", "{r:#}");
    assert_eq!(r["resumed"], true, "{r:#}");
    assert_eq!(r["rollbacks"].as_array().unwrap().len(), 2, "{r:#}");
    assert!(d.log().contains("left unfinished"), "{}", d.log());
}

#[test]
fn a_quiet_canary_is_judged_thanks_to_synthetic_traffic() {
    let d = Daemon::start_edited(|t| {
        t.replace("STEPS", r#"[ { weight = 50, pause = "1s" }, { weight = 100 } ]"#)
            .replace(
                "compare_to_stable = true\n",
                "compare_to_stable = true\nsynthetic = { rps = 40, paths = [\"/\"] }\n\n[[services.web.probe]]\npath = \"/healthz\"\ninterval = \"200ms\"\nstatus = 200\n",
            )
    });
    // No user traffic at all: only synthetic requests can give the judge its evidence. (The
    // probe asks the listener as a user would, every 200ms: those are the only user requests.)
    let started = Instant::now();
    let out = d.cli(&["deploy", "web", "v2", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let took = started.elapsed();
    let m = metrics(&d);
    assert!(
        m.lines().any(|l| l.starts_with("cutover_requests_total{service=\"web\",version=\"v2\",code=\"2xx\",source=\"synthetic\"}") && !l.ends_with(" 0")),
        "{m}"
    );
    // Never mixed into users' numbers: the users' counters hold the probe's requests only.
    let count = |prefix: &str| -> u64 {
        m.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let synthetic = count(
        "cutover_requests_total{service=\"web\",version=\"v2\",code=\"2xx\",source=\"synthetic\"}",
    );
    let users = count("cutover_requests_total{service=\"web\",version=\"v1\",code=\"2xx\"}")
        + count("cutover_requests_total{service=\"web\",version=\"v2\",code=\"2xx\"}");
    let probes = took.as_millis() as u64 / 200 + 20;
    assert!(
        users <= probes && synthetic > 20,
        "users {users}, probes at most {probes}, synthetic {synthetic}:\n{m}"
    );
    assert!(
        m.contains("cutover_probe_success{service=\"web\",probe=\"/healthz\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cutover_probe_duration_seconds{service=\"web\",probe=\"/healthz\"}"),
        "{m}"
    );
    let h: serde_json::Value =
        serde_json::from_slice(&d.cli(&["history", "--json"]).stdout).unwrap();
    let id = h["rollouts"][0]["id"].as_i64().unwrap();
    let events = crate::harness::rollout_events(&d, id);
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let syn = kinds
        .iter()
        .position(|k| *k == "synthetic")
        .unwrap_or_else(|| panic!("{events:?}"));
    let passed = kinds
        .iter()
        .position(|k| *k == "analysis-passed")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert!(syn < passed, "{events:?}");
    // Judged within two intervals (500ms) of the synthetic traffic starting, give or take a
    // tick: the whole rollout takes its pause plus a few intervals.
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn experiment_files_with_mistakes_exit_2_naming_the_place() {
    let d = Daemon::create(|t| t.replace("STEPS", QUICK_STEPS));
    let bad = write(
        d.dir.path(),
        "bad.toml",
        "title = \"x\"\n[[method]]\naction = \"kill-instance\"\nservice = \"wbe\"\n",
    );
    let out = d.cli(&["chaos", "run", bad.to_str().unwrap(), "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bad.toml:4:11: method[0].service: no service named \"wbe\""),
        "{}",
        stderr(&out)
    );
    let json = write(
        d.dir.path(),
        "exp.json",
        r#"{"title": "t", "method": [{"type": "action", "name": "x",
  "provider": {"type": "python", "module": "chaosk8s.pod.actions", "func": "terminate_pods"}}]}"#,
    );
    let out = d.cli(&["chaos", "run", json.to_str().unwrap(), "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exp.json:2:44: method[0].provider.module"),
        "{}",
        stderr(&out)
    );
}

/// The processes whose command line has `needle`, as `(pid, cmdline)`.
fn processes_with(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// `cutover chaos run FILE --json` in the background, its output piped.
fn chaos_run_json(d: &Daemon, file: &std::path::Path) -> std::process::Child {
    Command::new(EXE)
        .args(["-c", d.config.to_str().unwrap()])
        .args(["chaos", "run", file.to_str().unwrap(), "--json"])
        .current_dir(d.dir.path())
        .env_remove("CUTOVER_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `Cpus_allowed_list` of a process: `0-1`, `1`.
fn cpus_allowed(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn cpu_stress_a_scaling_shock_and_the_slo_burn_are_felt_and_end_by_themselves() {
    let d = Daemon::start_with(
        QUICK_STEPS,
        "\n[[services.web.slo]]\nname = \"availability\"\nobjective = 99\n",
    );
    let exp = r#"
title = "a rush of users, errors and a noisy neighbour"
recovery_timeout = "20s"

[[hypothesis]]
name = "budget"
probe = "slo-burn-rate"
service = "web"
window = "1s"
max = 1

[[method]]
action = "scaling-shock"
service = "web"
min_rps = 60
max_rps = 100
for = "3s"

[[method]]
action = "inject-errors"
service = "web"
rate = 0.5
for = "1500ms"

[[method]]
name = "burn while failing"
probe = "slo-burn-rate"
service = "web"
window = "1s"
max = 1

[[method]]
action = "cpu-stress"
service = "web"
load = 0.9
for = "4s"
pause_after = "1s"

[[method]]
name = "p99 beside the busy loop"
probe = "p99"
service = "web"
window = "1s"
max = 10000
"#;
    let path = write(d.dir.path(), "rush.toml", exp);
    // The README's load experiment is read whole against this config.
    let load_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/load.toml");
    let load_text = std::fs::read_to_string(load_file).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(
        readme.contains(load_text.trim()),
        "README shows examples/load.toml as it is"
    );
    let out = d.cli(&["chaos", "run", load_file, "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for want in ["scaling-shock", "cpu-stress", "slo-burn-rate"] {
        assert!(stdout(&out).contains(want), "{}", stdout(&out));
    }
    let before: Vec<(u64, String)> = d.status()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(crate::harness::pid_of)
        .map(|p| (p, cpus_allowed(p)))
        .collect();
    let child = chaos_run_json(&d, &path);
    // While the stress runs: a busy loop beside the instance, both on one CPU.
    let mut burner = Vec::new();
    wait_until("the busy loop", Duration::from_secs(30), || {
        burner = processes_with("__burn");
        !burner.is_empty()
    });
    let multi_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) > 1;
    let stressed = before.iter().find(|(p, cpus)| cpus_allowed(*p) != *cpus);
    if multi_cpu {
        let (pid, _) = stressed.expect("the stressed instance was pinned to one CPU");
        let pinned = cpus_allowed(*pid);
        assert!(!pinned.contains(['-', ',']), "{pinned}");
        assert!(
            burner[0].1.ends_with(&format!(" {pinned} ")),
            "{burner:?} on {pinned}"
        );
    }
    let out = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}\n{}", stdout(&out), stderr(&out), d.log()));
    assert_eq!(out.status.code(), Some(0), "{report:#}\n{}", stderr(&out));
    assert_eq!(report["verdict"], "held", "{report:#}");
    let method = report["method"].as_array().unwrap();
    // The burn probe saw the injected errors spend the budget far faster than allowed.
    let burn = method[2]["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("{report:#}"));
    assert!(
        burn.contains("burns its budget at") && burn.contains("outside"),
        "{report:#}"
    );
    assert!(
        method[3]["detail"].as_str().unwrap().contains("shares CPU"),
        "{report:#}"
    );
    // The shock: 60 req/s (the floor: no other traffic) for 3 s, through the listener.
    let shock = &report["shocks"][0];
    let sent = shock["sent"]
        .as_u64()
        .unwrap_or_else(|| panic!("{report:#}"));
    assert!((90..=185).contains(&sent), "{report:#}");
    assert!(shock["ok"].as_u64().unwrap() >= sent / 3, "{report:#}");
    // Nothing is left: no busy loop, every instance on its CPUs again, no fault.
    wait_until("no busy loop", Duration::from_secs(5), || {
        processes_with("__burn").is_empty()
    });
    for (pid, cpus) in &before {
        assert_eq!(&cpus_allowed(*pid), cpus, "pid {pid} got its CPUs back");
    }
    assert!(faults(&d).is_empty());

    // The report stays: in `chaos list` and `chaos show`, and on the dashboard.
    let id = report["id"].as_str().unwrap();
    let out = d.cli(&["chaos", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["experiments"][0]["id"], id, "{list:#}");
    let out = d.cli(&["chaos", "show", id]);
    let text = stdout(&out);
    assert!(
        text.contains("burn while failing") && text.contains("verdict: held"),
        "{text}"
    );
    assert!(text.contains("scaling shock on web"), "{text}");
    let (status, index) = http(d.api, "GET", "/", Some(&d.token()), "");
    assert_eq!(status, 200);
    assert!(index.contains(&format!("/experiments/{id}")), "{index}");
    let (status, page) = http(
        d.api,
        "GET",
        &format!("/experiments/{id}"),
        Some(&d.token()),
        "",
    );
    assert_eq!(status, 200);
    for want in [
        "Steady state before",
        "burn while failing",
        "Scaling shocks",
        "shares CPU",
        "held",
    ] {
        assert!(page.contains(want), "{want} not on the page: {page}");
    }

    // Stopped early (Ctrl-C), a long stress ends at once, with the experiment.
    let long = write(
        d.dir.path(),
        "long.toml",
        "title = \"long\"\n[[method]]\naction = \"cpu-stress\"\nservice = \"web\"\nload = 0.2\nfor = \"10m\"\n[[method]]\naction = \"wait\"\nfor = \"10m\"\n",
    );
    let child = chaos_run_json(&d, &long);
    wait_until("the long busy loop", Duration::from_secs(30), || {
        !processes_with("__burn").is_empty()
    });
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let out = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", stdout(&out), stderr(&out)));
    assert_eq!(report["verdict"], "aborted", "{report:#}");
    assert_eq!(report["stresses_ended"], 1, "{report:#}");
    // The runtime ends it as the experiment clears: within moments, not 10 minutes.
    wait_until(
        "the busy loop gone and the CPUs back",
        Duration::from_secs(5),
        || {
            processes_with("__burn").is_empty()
                && before.iter().all(|(pid, cpus)| cpus_allowed(*pid) == *cpus)
        },
    );
}
