//! `runtime = "docker"` end to end, on the real Docker Engine of this machine (and CI's):
//! canaries promoted and rolled back under load, a blue-green switch with the old containers
//! kept warm, a SIGKILLed daemon whose successor adopts the very same containers, nothing left
//! after an abort and a stop, images built from a Dockerfile, and the failures a user meets
//! (a missing image, a failed build, a container that exits at once, no Engine).
//!
//! The image is built from this test binary's `cutover` executable (`FROM scratch`, the
//! program and its shared libraries): no registry is needed. Each test has a service name of
//! its own, so containers of tests running side by side never meet. Never skipped: without an
//! Engine these tests fail and say how to start one.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bollard::query_parameters::ListContainersOptionsBuilder;
use cutover_runtime::docker::{Engine, image, resolve_host};

use crate::harness::{Daemon, EXE, Load, stderr, stdout, with_command};

/// The demo app's image, as `cutover demo --runtime docker` builds it.
const DEMO_IMAGE: &str = "cutover-it-demo:latest";

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn engine() -> Engine {
    Engine::new(resolve_host(
        None,
        std::env::var("DOCKER_HOST").ok().as_deref(),
    ))
}

/// Checks the Engine and builds the demo image, once per test binary.
fn demo_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        block_on(async {
            let engine = engine();
            if let Err(e) = engine.check(Duration::from_secs(10)).await {
                panic!(
                    "the docker tests need a Docker Engine: {e}. Start it (`service docker start`, or `dockerd &` as root) and run them again"
                );
            }
            let docker = engine.client().await.unwrap();
            let files = vec![(PathBuf::from(EXE), "/cutover".to_owned())];
            let entry: Vec<String> = ["/cutover", "demo-app", "--host", "0.0.0.0"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
            let tar = image::executables_tar(&files, &entry).unwrap();
            let labels = HashMap::from([("io.cutover.demo".to_owned(), "true".to_owned())]);
            image::build(&docker, DEMO_IMAGE, "Dockerfile", tar, &labels)
                .await
                .unwrap();
            // Each rebuilt executable leaves the previous image untagged: removed here, so
            // test runs do not pile images up on the machine.
            image::prune_untagged(&docker, "io.cutover.demo").await.unwrap();
        });
    });
}

/// A container of a service: `(id, name, state, version label)`.
type Container = (String, String, String, String);

/// The containers of `service` (running or not).
fn containers(service: &str) -> Vec<Container> {
    block_on(containers_of(service))
}

async fn containers_of(service: &str) -> Vec<Container> {
    {
        let docker = engine().client().await.unwrap();
        let filters = HashMap::from([("label", vec![format!("io.cutover.service={service}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        docker
            .list_containers(Some(options))
            .await
            .unwrap()
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                (
                    c.id.unwrap_or_default(),
                    c.names
                        .unwrap_or_default()
                        .first()
                        .cloned()
                        .unwrap_or_default(),
                    c.state.map(|s| s.to_string()).unwrap_or_default(),
                    labels
                        .get("io.cutover.version")
                        .cloned()
                        .unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// Removes whatever a failed test left of `service`, and its images.
fn clean(service: &str, images: &[String]) {
    block_on(async {
        let docker = engine().client().await.unwrap();
        for (id, ..) in containers_of(service).await {
            let force = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                .force(true)
                .build();
            let _ = docker.remove_container(&id, Some(force)).await;
        }
        for i in images {
            let _ = docker
                .remove_image(
                    i,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
        }
    });
}

/// A daemon whose one service runs in containers, under a name of its own.
struct Docked {
    d: Daemon,
    svc: String,
    /// Images this test built, removed at the end.
    images: Vec<String>,
}

impl Docked {
    /// `FAST` with the service renamed, `runtime = "docker"` with `image` instead of its
    /// command, `edit` applied; started, and waited for until v1 is healthy on 2 containers.
    fn start(name: &str, image: &str, edit: impl FnOnce(String) -> String) -> Docked {
        demo_image();
        let svc = format!("{name}-{}", std::process::id());
        let mut d = Daemon::create(|t| {
            let t = with_command(
                &t,
                &format!("runtime = \"docker\"\nimage = \"{image}\"\nport = 8080"),
            );
            // Freshly made containers answer slower than warm ones for their first seconds
            // (their executable pages in through the Engine's storage driver, FUSE here), and
            // the comparison with stable notices that on a busy machine. These tests are about
            // containers, not that judgement: the thresholds still judge every candidate.
            let t = t.replace("compare_to_stable = true", "compare_to_stable = false");
            edit(t).replace("[services.web", &format!("[services.{svc}"))
        });
        d.spawn();
        let docked = Docked {
            d,
            svc,
            images: Vec::new(),
        };
        docked.wait_for("v1 healthy on 2 containers", |s| healthy(s, "v1") >= 2);
        docked
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "SVC" { self.svc.as_str() } else { a })
            .collect();
        self.d.cli(&args)
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "SVC", "--json"]);
        assert!(out.status.success(), "status: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_for(&self, what: &str, f: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        self.d.wait_for_service(&self.svc, what, f)
    }

    fn containers(&self) -> Vec<Container> {
        containers(&self.svc)
    }

    /// Waits until the service's containers are exactly `want` (as `(state, version)` pairs,
    /// in any order).
    fn wait_containers(&self, what: &str, want: &[(&str, &str)]) -> Vec<Container> {
        let mut want: Vec<(String, String)> = want
            .iter()
            .map(|(s, v)| ((*s).to_owned(), (*v).to_owned()))
            .collect();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = self.containers();
            let mut have: Vec<(String, String)> =
                c.iter().map(|x| (x.2.clone(), x.3.clone())).collect();
            have.sort();
            if have == want {
                return c;
            }
            assert!(Instant::now() < deadline, "{what}: containers {c:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `(kind, message)` of every event of the newest rollout.
    fn last_rollout(&self) -> (serde_json::Value, Vec<(String, String)>) {
        let h: serde_json::Value =
            serde_json::from_slice(&self.cli(&["history", "SVC", "--json"]).stdout).unwrap();
        let last = h["rollouts"][0].clone();
        let events = crate::harness::rollout_events(&self.d, last["id"].as_i64().unwrap());
        (last, events)
    }
}

impl Drop for Docked {
    fn drop(&mut self) {
        self.d.stop();
        clean(&self.svc, &self.images);
    }
}

/// Healthy instances of `version`.
fn healthy(s: &serde_json::Value, version: &str) -> usize {
    crate::harness::healthy(s, version)
}

/// The containers the status names (`runs_as`: `container <12 hex>`), by instance id.
fn runs_as(s: &serde_json::Value) -> BTreeSet<(String, String)> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["runs_as"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn docker_canary_is_promoted_and_a_bad_one_rolled_back_under_load() {
    let steps = r#"[ { weight = 20, pause = "1s" }, { weight = 100 } ]"#;
    let d = Docked::start("canary", DEMO_IMAGE, |t| t.replace("STEPS", steps));
    let s = d.status();
    for i in s["instances"].as_array().unwrap() {
        let address = i["address"].as_str().unwrap();
        assert!(address.starts_with("127.0.0.1:"), "loopback only: {s:#}");
        assert!(
            i["runs_as"].as_str().unwrap().starts_with("container "),
            "{s:#}"
        );
    }
    // Named `cutover-<service>-<version>-<n>` after the instances they run.
    let names: BTreeSet<String> = d.containers().into_iter().map(|c| c.1).collect();
    let instances: BTreeSet<String> = runs_as(&s)
        .into_iter()
        .map(|(id, _)| format!("/cutover-{id}"))
        .collect();
    assert_eq!(names, instances);
    assert!(
        names
            .iter()
            .all(|n| n.starts_with(&format!("/cutover-{}-v1-", d.svc))),
        "{names:?}"
    );

    let load = Load::start(d.d.web, 4, Duration::from_millis(5));
    let out = d.cli(&["deploy", "SVC", "v2", "--wait"]);
    assert!(
        out.status.success(),
        "v2 should be promoted: {}\n{}",
        stderr(&out),
        d.d.log()
    );
    let out = d.cli(&[
        "deploy",
        "SVC",
        "v3",
        "--env",
        "DEMO_ERROR_RATE=0.3",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let tally = load.stop();
    let (last, _) = d.last_rollout();
    assert_eq!(last["outcome"], "rolled-back");
    assert!(
        last["reason"].as_str().unwrap().contains("analysis failed"),
        "{last:#}"
    );
    assert!(
        tally.per_version.get("v3").is_some_and(|(n, _)| *n > 0),
        "{tally:?}"
    );
    assert_eq!(tally.errors_except("v3"), 0, "{tally:?}");
    // v1 was kept warm for scale_down_delay, then removed; v3 is gone at once.
    d.wait_containers("v2 alone", &[("running", "v2"), ("running", "v2")]);

    // The containers' output comes from the Engine.
    let out = d.cli(&["logs", "SVC", "--lines", "5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{}-v2-", d.svc))
                && l.contains("demo-app v2")
                && l.contains("listening on 0.0.0.0:8080")),
        "{text}"
    );

    let out = d.cli(&["logs", "SVC", "--instance", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("has no container of instance \"nope\""),
        "{}",
        stderr(&out)
    );

    // A restart in place keeps the containers, each supervised once.
    let before = d.status();
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = d.wait_for("healthy again after the reload", |s| healthy(s, "v2") == 2);
    assert_eq!(runs_as(&after), runs_as(&before));
    assert!(
        !d.d.log().contains("adopted an instance that outlived"),
        "handed over, not found again: {}",
        d.d.log()
    );
    d.wait_containers("the same two", &[("running", "v2"), ("running", "v2")]);
}

#[test]
fn docker_blue_green_keeps_the_old_containers_warm_then_removes_them() {
    let switches: usize = std::env::var("CUTOVER_DOCKER_SWITCHES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let d = Docked::start("bluegreen", DEMO_IMAGE, |t| {
        t.replace("STEPS", r#"[ { weight = 100 } ]"#)
            .replace("scale_down_delay = \"1s\"", "scale_down_delay = \"3s\"")
    });
    let load = Load::start(d.d.web, 8, Duration::from_millis(1));
    let t0 = Instant::now();
    for n in 0..switches {
        let (old, new) = (format!("v{}", n + 1), format!("v{}", n + 2));
        let out = d.cli(&["deploy", "SVC", &new, "--strategy", "blue-green", "--wait"]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), d.d.log());
        if n == 0 {
            // Promoted: all traffic on the new version, the old containers still up.
            let c = d.containers();
            let warm = c.iter().filter(|x| x.3 == old && x.2 == "running").count();
            assert_eq!(warm, 2, "the old version kept warm: {c:?}");
        }
        d.wait_containers(
            "the old version removed after scale_down_delay",
            &[("running", new.as_str()), ("running", new.as_str())],
        );
    }
    let tally = load.stop();
    eprintln!(
        "{switches} blue-green switches with containers in {:.1}s: {} requests, {} failed",
        t0.elapsed().as_secs_f64(),
        tally.per_version.values().map(|(n, _)| n).sum::<u64>() + tally.failed,
        tally.errors_except("")
    );
    assert_eq!(
        tally.errors_except(""),
        0,
        "no failed request across the switches: {tally:?}"
    );
}

#[test]
fn docker_sigkill_mid_rollout_adopts_the_same_containers_and_leaves_none_after_abort() {
    let steps = r#"[ { weight = 20, pause = "1s" }, { approve = true }, { weight = 100 } ]"#;
    let mut d = Docked::start("adopt", DEMO_IMAGE, |t| t.replace("STEPS", steps));
    let load = Load::start(d.d.web, 2, Duration::from_millis(5));
    assert!(d.cli(&["deploy", "SVC", "v2"]).status.success());
    let before = d.wait_for("v2 at 20%", |s| {
        s["weights"]["v2"] == 20 && healthy(s, "v2") == 2
    });
    let ids_before: BTreeSet<String> = d.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(ids_before.len(), 4, "{:?}", d.containers());
    d.d.kill9();
    // Containers outlive the daemon: they serve on, nothing is tied to its life.
    std::thread::sleep(Duration::from_millis(500));
    let after_kill = d.containers();
    assert!(
        after_kill.iter().all(|c| c.2 == "running") && after_kill.len() == 4,
        "{after_kill:?}"
    );
    d.d.spawn();
    let s = d.wait_for("the rollout to resume at its approval gate", |s| {
        s["phase"] == "awaiting-approval" && healthy(s, "v2") == 2
    });
    assert_eq!(s["candidate"], "v2");
    assert_eq!(
        runs_as(&s),
        runs_as(&before),
        "the same instances on the same containers"
    );
    let ids_after: BTreeSet<String> = d.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(ids_after, ids_before, "adopted, not started again");
    assert!(
        d.d.log()
            .contains("adopted an instance that outlived the previous daemon"),
        "{}",
        d.d.log()
    );

    let out = d.cli(&["abort", "SVC"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.wait_containers(
        "the candidate removed",
        &[("running", "v1"), ("running", "v1")],
    );
    load.stop();
    let stopped = d.d.stop();
    assert!(stopped.is_some_and(|s| s.success()), "{}", d.d.log());
    assert!(
        d.containers().is_empty(),
        "a daemon that stops removes its containers: {:?}",
        d.containers()
    );
}

#[test]
fn docker_images_are_built_from_a_dockerfile_and_a_failed_build_fails_the_rollout() {
    let svc_image = format!("cutover-it-built-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(
        app.join("Dockerfile"),
        format!("FROM {DEMO_IMAGE}\nCOPY greeting.txt /greeting.txt\n"),
    )
    .unwrap();
    std::fs::write(app.join("greeting.txt"), "hello").unwrap();
    // The build context sits beside the config.
    let mut d = Docked::start("build", &format!("{svc_image}:{{version}}"), |t| {
        let t = t.replace("STEPS", r#"[ { weight = 100 } ]"#);
        format!(
            "{t}\n[services.web.docker]\nbuild = \"{}\"\n",
            app.display()
        )
    });
    d.images = vec![
        format!("{svc_image}:v1"),
        format!("{svc_image}:v2"),
        format!("{svc_image}:v3"),
    ];
    let out = d.cli(&["deploy", "SVC", "v2", "--wait"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.d.log());
    let built = block_on(async {
        let docker = engine().client().await.unwrap();
        docker
            .inspect_image(&format!("{svc_image}:v2"))
            .await
            .is_ok()
    });
    assert!(built, "deploy built {svc_image}:v2");

    std::fs::write(
        app.join("Dockerfile"),
        format!("FROM {DEMO_IMAGE}\nCOPY missing.txt /missing.txt\n"),
    )
    .unwrap();
    let out = d.cli(&["deploy", "SVC", "v3", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let (last, events) = d.last_rollout();
    assert_eq!(last["outcome"], "failed", "{last:#}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("building {svc_image}:v3 from {}", app.display())),
        "{reason}"
    );
    assert!(
        reason.contains("missing.txt"),
        "the build's output: {reason}"
    );
    assert!(
        events.iter().any(|(k, _)| k == "start-failed"),
        "{events:?}"
    );
    let s = d.status();
    assert_eq!(s["weights"]["v2"], 100, "traffic never moved: {s:#}");
    assert_eq!(s["stable"], "v2");
}

#[test]
fn docker_a_missing_image_or_a_container_that_exits_at_once_fails_the_rollout() {
    let svc_image = format!("cutover-it-tagged-{}", std::process::id());
    // v1 and v3 exist (tags of the demo image); v2 does not, and nothing builds or pulls it.
    demo_image();
    block_on(async {
        let docker = engine().client().await.unwrap();
        for v in ["v1", "v3"] {
            let options = bollard::query_parameters::TagImageOptionsBuilder::default()
                .repo(&svc_image)
                .tag(v)
                .build();
            docker.tag_image(DEMO_IMAGE, Some(options)).await.unwrap();
        }
    });
    let mut d = Docked::start("failures", &format!("{svc_image}:{{version}}"), |t| {
        t.replace(
            "STEPS",
            r#"[ { weight = 50, pause = "1s" }, { weight = 100 } ]"#,
        )
    });
    d.images = vec![format!("{svc_image}:v1"), format!("{svc_image}:v3")];
    let out = d.cli(&["validate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "2 × container {svc_image}:{{version}} (port 8080) on Docker Engine"
        )),
        "{}",
        stdout(&out)
    );

    let out = d.cli(&["deploy", "SVC", "v2", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let (last, _) = d.last_rollout();
    assert_eq!(last["outcome"], "failed");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("image {svc_image}:v2 is not on the Docker Engine")),
        "{reason}"
    );

    // The app refuses its environment and exits at once, every time.
    let out = d.cli(&[
        "deploy",
        "SVC",
        "v3",
        "--env",
        "DEMO_ERROR_RATE=lots",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let (last, _) = d.last_rollout();
    assert_eq!(last["outcome"], "failed");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("DEMO_ERROR_RATE"),
        "what the app said: {reason}"
    );
    let s = d.status();
    assert_eq!(s["weights"]["v1"], 100, "traffic never moved: {s:#}");
    d.wait_containers(
        "the failed candidates removed",
        &[("running", "v1"), ("running", "v1")],
    );
}

#[test]
fn docker_validate_and_up_name_an_engine_that_does_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\napi = \"127.0.0.1:{}\"\n[services.shop]\nlisten = \"127.0.0.1:{}\"\nruntime = \"docker\"\nimage = \"shop:{{version}}\"\nport = 8080\n[services.shop.docker]\nhost = \"unix:///nonexistent/docker.sock\"\n",
            crate::harness::free_port(),
            crate::harness::free_port()
        ),
    )
    .unwrap();
    for verb in ["validate", "up"] {
        let out = std::process::Command::new(EXE)
            .args(["-c", config.to_str().unwrap(), verb])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{verb}: {}", stderr(&out));
        let text = stderr(&out);
        assert!(
            text.contains("the Docker Engine at unix:///nonexistent/docker.sock does not answer"),
            "{verb}: {text}"
        );
        assert_eq!(text.trim().lines().count(), 1, "one sentence: {text}");
    }
}

/// The CPU limit of a container, in `NanoCpus` (0: none).
fn nano_cpus(id: &str) -> i64 {
    block_on(async {
        let docker = engine().client().await.unwrap();
        docker
            .inspect_container(id, None)
            .await
            .map(|c| c.host_config.and_then(|h| h.nano_cpus).unwrap_or(0))
            .unwrap_or(0)
    })
}

#[test]
fn docker_chaos_kills_a_container_and_a_cpu_stress_ends_even_when_the_daemon_dies() {
    let steps = r#"[ { weight = 50, pause = "1s" }, { weight = 100 } ]"#;
    let mut d = Docked::start("chaos", DEMO_IMAGE, |t| t.replace("STEPS", steps));
    let first: BTreeSet<String> = d.containers().into_iter().map(|c| c.0).collect();
    let exp = format!(
        r#"
title = "a container dies and another starves"
[[method]]
action = "kill-instance"
service = "{svc}"
pause_after = "3s"
[[method]]
action = "cpu-stress"
service = "{svc}"
load = 0.5
for = "10m"
[[method]]
action = "wait"
for = "10m"
"#,
        svc = d.svc
    );
    let path = crate::harness::write(d.d.dir.path(), "starve.toml", &exp);
    let mut run = std::process::Command::new(EXE)
        .args(["-c", d.d.config.to_str().unwrap()])
        .args(["chaos", "run", path.to_str().unwrap()])
        .current_dir(d.d.dir.path())
        .env_remove("CUTOVER_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The killed container is replaced by a new one (same instance, new id); the stress puts
    // half a CPU on one of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stressed = loop {
        let ids: Vec<String> = d
            .containers()
            .into_iter()
            .filter(|c| c.2 == "running")
            .map(|c| c.0)
            .collect();
        if let Some(id) = ids.iter().find(|id| nano_cpus(id) == 500_000_000) {
            break id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no container was limited: {ids:?}\n{}",
            d.d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let s = d.wait_for("two healthy again after the kill", |s| {
        healthy(s, "v1") >= 2
    });
    let now: BTreeSet<String> = d.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(
        now.difference(&first).count(),
        1,
        "one container made anew: {first:?} → {now:?}"
    );
    let kinds: Vec<&str> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"instance-exit"), "{kinds:?}");

    // The daemon dies mid-stress: the container outlives it, and so would its limit, but the
    // next daemon gives it back when it adopts the container.
    d.d.kill9();
    let _ = run.kill();
    let _ = run.wait();
    assert_eq!(nano_cpus(&stressed), 500_000_000);
    d.d.spawn();
    d.wait_for("v1 healthy on 2 containers again", |s| {
        healthy(s, "v1") >= 2
    });
    let limit = nano_cpus(&stressed);
    assert!(
        limit == 0 || limit >= 1_000_000_000,
        "the adopted container got its CPUs back: {limit}\n{}",
        d.d.log()
    );
    assert!(
        d.d.log()
            .contains("finishing the rollbacks of an experiment"),
        "{}",
        d.d.log()
    );
}
