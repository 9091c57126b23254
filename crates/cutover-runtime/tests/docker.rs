//! The docker runtime against the real Docker Engine of this machine (and CI's): containers
//! started, stopped, crashed, OOM-killed, removed by hand, left by a "crashed" daemon and
//! adopted, images missing, built and failing to build. Nothing is pulled: the test image is
//! built from this machine's own `/bin/sh` and `sleep` with the libraries `ldd` lists.
//!
//! These tests are never skipped: without an Engine they fail and say how to start one.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use cutover_runtime::docker::{DockerOptions, DockerRuntime, Engine, image, resolve_host};
use cutover_runtime::{InstanceExit, Runtime, RuntimeError, StartSpec};
use tokio::sync::mpsc;

/// The image every test runs: a shell and `sleep`, nothing else.
const IMAGE: &str = "cutover-test-sh:1";

fn host() -> String {
    resolve_host(None, std::env::var("DOCKER_HOST").ok().as_deref())
}

/// The Engine, checked; the shell image, built once per test binary.
async fn engine() -> (Engine, Docker) {
    static BUILT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let engine = Engine::new(host());
    if let Err(e) = engine.check(Duration::from_secs(10)).await {
        panic!(
            "these tests need a Docker Engine: {e}. Start it (`service docker start`, or `dockerd &` as root) and run them again"
        );
    }
    let docker = engine.client().await.unwrap();
    BUILT
        .get_or_init(|| async {
            let files: Vec<(PathBuf, String)> = ["/bin/sh", "/bin/sleep"]
                .iter()
                .map(|p| (std::fs::canonicalize(p).unwrap(), (*p).to_owned()))
                .collect();
            let tar = image::executables_tar(&files, &["/bin/sh".into(), "-c".into()]).unwrap();
            image::build(&docker, IMAGE, "Dockerfile", tar, &HashMap::new())
                .await
                .unwrap();
        })
        .await;
    (engine, docker)
}

/// A runtime for a service of its own (tests run side by side), in a temporary state dir.
struct Setup {
    rt: DockerRuntime,
    exits: mpsc::UnboundedReceiver<InstanceExit>,
    docker: Docker,
    service: String,
    _dir: tempfile::TempDir,
    state_dir: PathBuf,
}

async fn setup(name: &str, edit: impl FnOnce(&mut DockerOptions)) -> Setup {
    let (engine, docker) = engine().await;
    let dir = tempfile::tempdir().unwrap();
    // Unique across concurrent runs of this binary too: the pid is in the name.
    let service = format!("rt-{name}-{}", std::process::id());
    let mut opts = DockerOptions::new(service.as_str(), dir.path(), IMAGE, 8080);
    edit(&mut opts);
    let (tx, exits) = mpsc::unbounded_channel();
    Setup {
        rt: DockerRuntime::new(opts, engine, tx),
        exits,
        docker,
        state_dir: dir.path().to_owned(),
        service,
        _dir: dir,
    }
}

impl Setup {
    fn spec(&self, n: usize, script: &str) -> StartSpec {
        StartSpec {
            service: self.service.as_str().into(),
            version: "v1".into(),
            instance: format!("{}-v1-{n}", self.service).into(),
            index: n,
            command: vec![script.to_owned()],
            env: BTreeMap::from([("GREETING".into(), "hello".into())]),
            port: None,
        }
    }

    /// The containers of this test's service, running or not: `(id, state, host port)`.
    async fn containers(&self) -> Vec<(String, String, Option<u16>)> {
        let filters = HashMap::from([(
            "label",
            vec![format!("io.cutover.service={}", self.service)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        self.docker
            .list_containers(Some(options))
            .await
            .unwrap()
            .into_iter()
            .map(|c| {
                let port = c
                    .ports
                    .unwrap_or_default()
                    .iter()
                    .find(|p| p.ip.as_deref() == Some("127.0.0.1"))
                    .and_then(|p| p.public_port);
                (
                    c.id.unwrap(),
                    c.state.map(|s| s.to_string()).unwrap_or_default(),
                    port,
                )
            })
            .collect()
    }

    async fn next_exit(&mut self) -> InstanceExit {
        tokio::time::timeout(Duration::from_secs(30), self.exits.recv())
            .await
            .expect("no exit reported within 30s")
            .unwrap()
    }

    /// Waits until the service has exactly one running container, and returns it.
    async fn one_running(&self, not: &str) -> (String, Option<u16>) {
        for _ in 0..300 {
            let c = self.containers().await;
            if let [(id, state, port)] = &c[..]
                && state == "running"
                && id != not
            {
                return (id.clone(), *port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no new running container: {:?}", self.containers().await);
    }

    async fn done(self) {
        self.rt.stop_all(Duration::from_secs(1)).await;
        assert!(
            self.containers().await.is_empty(),
            "stop_all leaves nothing: {:?}",
            self.containers().await
        );
    }
}

impl Drop for Setup {
    /// A failed test leaves no container behind either.
    fn drop(&mut self) {
        let (docker, service) = (self.docker.clone(), self.service.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let filters =
                    HashMap::from([("label", vec![format!("io.cutover.service={service}")])]);
                let options = ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build();
                for c in docker
                    .list_containers(Some(options))
                    .await
                    .unwrap_or_default()
                {
                    let force = RemoveContainerOptionsBuilder::default().force(true).build();
                    let _ = docker
                        .remove_container(&c.id.unwrap_or_default(), Some(force))
                        .await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_container_is_named_labelled_published_on_loopback_and_stopped() {
    let s = setup("basic", |o| {
        o.labels.insert("team".into(), "payments".into());
    })
    .await;
    let started =
        s.rt.start(s.spec(0, "echo \"$GREETING $PORT\"; exec sleep 300"))
            .await
            .unwrap();
    assert_eq!(started.addr.ip().to_string(), "127.0.0.1");
    let c = s
        .docker
        .inspect_container(started.handle.as_str(), None)
        .await
        .unwrap();
    assert_eq!(
        c.name.as_deref(),
        Some(format!("/cutover-{}-v1-0", s.service).as_str())
    );
    let labels = c.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["io.cutover.service"], s.service);
    assert_eq!(labels["io.cutover.version"], "v1");
    assert_eq!(labels["io.cutover.instance"], format!("{}-v1-0", s.service));
    assert_eq!(
        labels["io.cutover.state-dir"],
        std::fs::canonicalize(&s.state_dir)
            .unwrap()
            .display()
            .to_string()
    );
    assert_eq!(labels["team"], "payments");
    let env = c.config.as_ref().unwrap().env.clone().unwrap();
    assert!(env.contains(&"PORT=8080".to_owned()), "{env:?}");
    assert!(
        env.contains(&format!("CUTOVER_SERVICE={}", s.service)),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|e| e.starts_with("CUTOVER_STATE_DIR=")),
        "the keeper's marker would get the container killed when a daemon dies: {env:?}"
    );
    let host = c.host_config.as_ref().unwrap();
    assert_eq!(
        host.restart_policy.as_ref().and_then(|p| p.name),
        Some(bollard::models::RestartPolicyNameEnum::NO),
        "cutover restarts it, not the Engine"
    );
    let ports = s.containers().await;
    assert_eq!(
        ports[0].2,
        Some(started.addr.port()),
        "published on 127.0.0.1 only"
    );
    assert_eq!(
        s.rt.describe(&started.instance, &started.handle),
        format!("container {}", &started.handle.as_str()[..12])
    );
    // Something listens there: the Engine's published port.
    assert!(std::net::TcpStream::connect(started.addr).is_ok());

    let id = started.instance.clone();
    s.rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    assert!(
        s.containers().await.is_empty(),
        "a stop removes the container"
    );
    s.rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    let mut s = s;
    assert!(
        s.exits.try_recv().is_err(),
        "a stop asked for is not an exit"
    );
    s.done().await;
}

#[tokio::test]
async fn a_crash_is_reported_with_its_output_and_made_again_on_the_same_port() {
    let mut s = setup("crash", |_| {}).await;
    let started =
        s.rt.start(s.spec(0, "echo \"start $PORT\"; echo oops >&2; sleep 1; exit 3"))
            .await
            .unwrap();
    let first = s.next_exit().await;
    assert_eq!(
        (first.code, first.restart_in, first.exits),
        (Some(3), Some(Duration::from_millis(250)), 1)
    );
    assert!(
        first.stderr_tail.contains(&"oops".to_owned()),
        "{:?}",
        first.stderr_tail
    );
    assert!(
        first.stderr_tail.contains(&"start 8080".to_owned()),
        "{:?}",
        first.stderr_tail
    );
    let (again, port) = s.one_running(started.handle.as_str()).await;
    assert_ne!(again, started.handle.as_str(), "a new container");
    assert_eq!(
        port,
        Some(started.addr.port()),
        "on the same host port: the same address"
    );
    let second = s.next_exit().await;
    assert_eq!(
        (second.restart_in, second.exits),
        (Some(Duration::from_millis(500)), 2),
        "backoff doubles"
    );
    s.done().await;
}

#[tokio::test]
async fn an_oom_kill_is_reported_as_such() {
    let mut s = setup("oom", |o| o.memory = Some(16 << 20)).await;
    s.rt.start(s.spec(
        0,
        "echo filling; sleep 1; x=aaaaaaaaaaaaaaaa; while :; do x=\"$x$x\"; done",
    ))
    .await
    .unwrap();
    let e = s.next_exit().await;
    assert_eq!(e.code, Some(137));
    // Made again with the same limits.
    let (id, _) = s.one_running("").await;
    let limits = s
        .docker
        .inspect_container(&id, None)
        .await
        .unwrap()
        .host_config
        .unwrap();
    assert_eq!(
        (limits.memory, limits.memory_swap),
        (Some(16 << 20), Some(16 << 20)),
        "no swap on top of the limit"
    );
    assert_eq!(
        e.stderr_tail.first().map(String::as_str),
        Some("OOM killed: the container used up its memory limit (16MiB)"),
        "{:?}",
        e.stderr_tail
    );
    assert!(e.stderr_tail.contains(&"filling".to_owned()));
    s.done().await;
}

#[tokio::test]
async fn a_container_that_exits_at_once_says_why() {
    let mut s = setup("once", |_| {}).await;
    // Gone before its address is known: the start fails with what it said; gone a moment
    // later: it is a crash like any other, with the same words.
    match s
        .rt
        .start(s.spec(0, "echo 'bad config: no DATABASE_URL' >&2; exit 2"))
        .await
    {
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("exited at once with code 2"), "{e}");
            assert!(e.contains("bad config: no DATABASE_URL"), "{e}");
            assert!(s.containers().await.is_empty(), "nothing left behind");
        }
        Ok(_) => {
            let e = s.next_exit().await;
            assert_eq!(e.code, Some(2));
            assert!(
                e.stderr_tail
                    .contains(&"bad config: no DATABASE_URL".to_owned()),
                "{e:?}"
            );
        }
    }
    s.done().await;
}

#[tokio::test]
async fn a_container_removed_by_hand_is_an_exit_and_comes_back() {
    let mut s = setup("byhand", |_| {}).await;
    let started = s.rt.start(s.spec(0, "exec sleep 300")).await.unwrap();
    s.docker
        .remove_container(
            started.handle.as_str(),
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await
        .unwrap();
    let e = s.next_exit().await;
    assert_eq!(
        e.stderr_tail,
        ["the container was removed outside cutover (docker rm?)"]
    );
    let (_, port) = s.one_running(started.handle.as_str()).await;
    assert_eq!(port, Some(started.addr.port()));
    s.done().await;
}

#[tokio::test]
async fn containers_outlive_a_crashed_daemon_and_are_adopted() {
    let mut s = setup("adopt", |_| {}).await;
    // The "daemon" runs on a runtime of its own, then vanishes without stopping anything.
    let (first, second) = {
        let (rt, spec0, spec1) = (
            s.rt.clone(),
            s.spec(0, "exec sleep 300"),
            s.spec(1, "exec sleep 300"),
        );
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    (
                        rt.start(spec0).await.unwrap(),
                        rt.start(spec1).await.unwrap(),
                    )
                })
        })
        .join()
        .unwrap()
    };
    // One of them dies while no daemon runs.
    s.docker
        .kill_container(second.handle.as_str(), None)
        .await
        .unwrap();
    // A new daemon: a new runtime on the same state dir.
    let (tx, mut exits) = mpsc::unbounded_channel();
    let opts = DockerOptions::new(s.service.as_str(), s.state_dir.clone(), IMAGE, 8080);
    let again = DockerRuntime::new(opts, Engine::new(host()), tx);
    let found = Runtime::recover(&again, Vec::new()).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].started, first,
        "the same container, instance and address"
    );
    assert_eq!(found[0].version.as_str(), "v1");
    let left: Vec<String> = s.containers().await.into_iter().map(|c| c.0).collect();
    assert_eq!(
        left,
        [first.handle.as_str().to_owned()],
        "the exited one was removed"
    );
    // Adopted: supervised again, so a crash is reported to the new daemon and restarted.
    again
        .adopt(s.spec(0, "exec sleep 300"), first.clone())
        .await
        .unwrap();
    s.docker
        .kill_container(first.handle.as_str(), None)
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), exits.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.instance, first.instance);
    let (_, port) = s.one_running(first.handle.as_str()).await;
    assert_eq!(port, Some(first.addr.port()));
    assert!(s.exits.try_recv().is_err(), "the old daemon hears nothing");
    // What it supervises is not found again, and adopting it twice changes nothing.
    assert!(Runtime::recover(&again, Vec::new()).await.is_empty());
    again
        .adopt(s.spec(0, "exec sleep 300"), first.clone())
        .await
        .unwrap();
    again.stop_all(Duration::from_secs(1)).await;
    s.done().await;
}

#[tokio::test]
async fn a_missing_image_is_named_with_what_to_do() {
    let s = setup("missing", |o| {
        o.image = "cutover-test-absent:{version}".into()
    })
    .await;
    let err = s.rt.start(s.spec(0, "true")).await.unwrap_err().to_string();
    assert!(
        err.starts_with("image cutover-test-absent:v1 is not on the Docker Engine at"),
        "{err}"
    );
    assert!(err.contains("neither builds nor pulls it"), "{err}");
    s.done().await;
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::test]
async fn an_image_is_built_from_the_context_and_a_failed_build_says_why() {
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        &format!("FROM {IMAGE}\nCOPY hello.txt /hello.txt\n"),
    );
    write(ctx.path(), "hello.txt", "built from a Dockerfile");
    let tag = format!("cutover-test-built-{}", std::process::id());
    let mut s = setup("build", |o| {
        o.image = format!("{tag}:{{version}}");
        o.build = Some(ctx.path().to_owned());
    })
    .await;
    let started =
        s.rt.start(s.spec(0, "read line < /hello.txt; echo \"$line\"; sleep 1; exit 4"))
            .await
            .unwrap();
    let e = s.next_exit().await;
    assert!(
        e.stderr_tail
            .contains(&"built from a Dockerfile".to_owned()),
        "{e:?}"
    );
    s.rt.stop(&started.instance, Duration::from_secs(1))
        .await
        .unwrap();
    let _ = s
        .docker
        .remove_image(
            &format!("{tag}:v1"),
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;

    // A Dockerfile that cannot build: the error carries the build's last output.
    write(
        ctx.path(),
        "Dockerfile",
        &format!("FROM {IMAGE}\nRUN echo compiling && exit 7\n"),
    );
    let mut spec = s.spec(1, "true");
    spec.version = "v2".into();
    let err = s.rt.start(spec).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RuntimeError::Docker(_)));
    assert!(
        text.starts_with(&format!("building {tag}:v2 from ")),
        "{text}"
    );
    assert!(text.contains("compiling"), "the build's output: {text}");
    assert!(text.contains("non-zero code: 7"), "{text}");
    s.done().await;
}

#[tokio::test]
async fn an_engine_that_does_not_answer_is_named() {
    let e = Engine::new("unix:///nonexistent/docker.sock")
        .check(Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("the Docker Engine at unix:///nonexistent/docker.sock does not answer"),
        "{e}"
    );
}
