//! The docker runtime (`runtime = "docker"`, docs/reference.md §7.7): one container per instance on a
//! Docker Engine, through its API (bollard), never the `docker` CLI.
//!
//! A container publishes its app's `port` on 127.0.0.1 only, on a host port the Engine picks;
//! the proxy reaches it there and nowhere else (never a bridge address). Before a version's
//! first container starts, its image is made present (built from the service's context,
//! pulled, or refused with a sentence naming it), one build per image at a time.
//!
//! Each container is supervised like a process: when it stops unasked (an exit, the OOM
//! killer, a `docker rm` by hand) an [`InstanceExit`] goes to the driver with the exit code,
//! the Engine's reason and the last log lines, and after a backoff the container is made
//! again on the *same* host port, so the instance keeps its address (a restarted container
//! would get a new port from the Engine). A stop is the container's stop signal, `docker stop`
//! with `stop_timeout`, then removal.
//!
//! Containers outlive the daemon: nothing ties them to it, so a daemon that crashes leaves them
//! serving, and the next one finds them by their labels ([`DockerRuntime`]'s `recover`) and
//! supervises them again (`adopt`). Only a graceful stop (`stop_all`) removes them. This module
//! carries out what the controller decided; it never decides when to start or stop.

mod disturb;
pub mod image;
pub mod logs;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum, HostConfig,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use cutover_core::{InstanceId, ServiceName, Version};
use futures_util::StreamExt;
use tokio::sync::{OnceCell, mpsc, watch};

use crate::logs::{TAIL_LINE_BYTES, TAIL_LINES};
use crate::{
    BoxFuture, Disturbance, Found, Handle, InstanceExit, Recorded, Runtime, RuntimeError,
    StartSpec, Started,
};
use spec::Ended;

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A container that stayed up this long is healthy again: its next crash restarts quickly.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// The Engine's client timeout for a request's answer to begin (a `docker stop` waits its whole
/// grace period before it answers, so this is long).
const CLIENT_TIMEOUT_SECS: u64 = 600;
/// The socket when neither the config nor `DOCKER_HOST` names another.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// The Engine address to use: the service's `host`, else `DOCKER_HOST`, else the default
/// socket.
pub fn resolve_host(configured: Option<&str>, docker_host_env: Option<&str>) -> String {
    configured
        .or(docker_host_env.filter(|h| !h.trim().is_empty()))
        .unwrap_or(DEFAULT_HOST)
        .trim()
        .to_owned()
}

/// The Engine's own words for an error, without bollard's wrapping.
pub fn engine_message(e: &bollard::errors::Error) -> String {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError { message, .. } => message.trim().to_owned(),
        E::DockerStreamError { error } => error.trim().to_owned(),
        E::DockerContainerWaitError { error, code } => {
            format!("the container exited with code {code} {error}")
                .trim()
                .to_owned()
        }
        other => other.to_string(),
    }
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A connection to one Docker Engine, shared by the runtimes of the services that use it.
/// The API version is agreed with the Engine at the first use.
#[derive(Clone)]
pub struct Engine {
    host: String,
    client: Arc<OnceCell<Docker>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("host", &self.host).finish()
    }
}

/// What `validate` and `up` learn from an Engine that answers.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub version: String,
    pub api_version: String,
}

impl Engine {
    pub fn new(host: impl Into<String>) -> Engine {
        Engine {
            host: host.into(),
            client: Arc::new(OnceCell::new()),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The client, connected and with the API version agreed.
    pub async fn client(&self) -> Result<Docker, RuntimeError> {
        let host = self.host.clone();
        self.client
            .get_or_try_init(|| async move {
                let docker = if let Some(path) = host.strip_prefix("unix://") {
                    Docker::connect_with_unix(
                        path,
                        CLIENT_TIMEOUT_SECS,
                        bollard::API_DEFAULT_VERSION,
                    )
                } else {
                    Docker::connect_with_http(
                        &host,
                        CLIENT_TIMEOUT_SECS,
                        bollard::API_DEFAULT_VERSION,
                    )
                }
                .map_err(|e| unreachable(&host, &e))?;
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| unreachable(&host, &e))
            })
            .await
            .cloned()
    }

    /// Asks the Engine for its version within `within`: the check `validate` and `up` make.
    pub async fn check(&self, within: Duration) -> Result<EngineInfo, RuntimeError> {
        let host = self.host.clone();
        let asked = async {
            let docker = self.client().await?;
            let v = docker.version().await.map_err(|e| unreachable(&host, &e))?;
            Ok(EngineInfo {
                version: v.version.unwrap_or_default(),
                api_version: v.api_version.unwrap_or_default(),
            })
        };
        match tokio::time::timeout(within, asked).await {
            Ok(r) => r,
            Err(_) => Err(RuntimeError::EngineUnreachable {
                host: self.host.clone(),
                why: format!("no answer within {}s", within.as_secs()),
            }),
        }
    }
}

fn unreachable(host: &str, e: &bollard::errors::Error) -> RuntimeError {
    RuntimeError::EngineUnreachable {
        host: host.to_owned(),
        why: engine_message(e),
    }
}

/// How a docker service's containers are made (docs/reference.md §7.7), resolved by the binary.
#[derive(Clone, Debug)]
pub struct DockerOptions {
    pub service: ServiceName,
    /// The daemon's state dir: containers are labelled with it (canonical), so a daemon finds
    /// its own and never another's.
    pub state_dir: PathBuf,
    /// `{version}` is filled in.
    pub image: String,
    /// The app's port inside the container.
    pub port: u16,
    pub build: Option<PathBuf>,
    pub dockerfile: String,
    pub pull: bool,
    pub cpus: Option<f64>,
    pub memory: Option<u64>,
    pub volumes: Vec<String>,
    pub network: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl DockerOptions {
    /// Options with nothing but the required keys.
    pub fn new(
        service: impl Into<ServiceName>,
        state_dir: impl Into<PathBuf>,
        image: impl Into<String>,
        port: u16,
    ) -> DockerOptions {
        DockerOptions {
            service: service.into(),
            state_dir: state_dir.into(),
            image: image.into(),
            port,
            build: None,
            dockerfile: "Dockerfile".into(),
            pull: false,
            cpus: None,
            memory: None,
            volumes: Vec::new(),
            network: None,
            labels: BTreeMap::new(),
        }
    }
}

/// Runs one docker service's instances as containers. Clones share everything.
#[derive(Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    opts: DockerOptions,
    /// The canonical state dir, as the label carries it.
    state_label: String,
    engine: Engine,
    exits: mpsc::UnboundedSender<InstanceExit>,
    ctrs: Mutex<HashMap<InstanceId, Ctr>>,
    /// One build (or pull) per image at a time; a second start of the same version waits for
    /// the first one's and then finds the image.
    images: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The CPU stresses under way (`disturb`).
    stresses: crate::Stresses,
}

/// A supervised instance.
struct Ctr {
    /// The current container's id (a restart after a crash makes a new container).
    id: Arc<Mutex<String>>,
    stop: watch::Sender<bool>,
    exited: watch::Receiver<bool>,
}

/// What the supervisor of one instance keeps across its containers.
struct Supervised {
    spec: StartSpec,
    host_port: u16,
    id: Arc<Mutex<String>>,
    stop: watch::Receiver<bool>,
    exited: watch::Sender<bool>,
    started: Instant,
}

impl Supervised {
    fn id(&self) -> String {
        self.id.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl DockerRuntime {
    pub fn new(
        opts: DockerOptions,
        engine: Engine,
        exits: mpsc::UnboundedSender<InstanceExit>,
    ) -> DockerRuntime {
        let state_label = crate::contain::canonical_state_dir(&opts.state_dir)
            .display()
            .to_string();
        DockerRuntime {
            inner: Arc::new(Inner {
                opts,
                state_label,
                engine,
                exits,
                ctrs: Mutex::new(HashMap::new()),
                images: Mutex::new(HashMap::new()),
                stresses: crate::Stresses::default(),
            }),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The state dir label this runtime's containers carry.
    pub fn state_label(&self) -> &str {
        &self.inner.state_label
    }

    async fn docker(&self) -> Result<Docker, RuntimeError> {
        self.inner.engine.client().await
    }

    /// Makes sure the image of `version` is on the Engine (see [`image::ensure`]).
    pub async fn ensure_image(&self, version: &Version) -> Result<String, RuntimeError> {
        let o = &self.inner.opts;
        let image = spec::image_for(&o.image, version.base());
        let lock = self
            .inner
            .images
            .lock()
            .map(|mut m| m.entry(image.clone()).or_default().clone())
            .map_err(|_| RuntimeError::Docker("the image table is poisoned".into()))?;
        let _one_at_a_time = lock.lock().await;
        let source = image::Source {
            build: o.build.clone().map(|b| (b, o.dockerfile.clone())),
            pull: o.pull,
            exclude: vec![o.state_dir.clone()],
            labels: HashMap::from([(spec::LABEL_SERVICE.to_owned(), o.service.to_string())]),
        };
        let docker = self.docker().await?;
        image::ensure(
            &docker,
            &image,
            &source,
            o.service.as_str(),
            self.inner.engine.host(),
        )
        .await?;
        Ok(image)
    }

    /// This service's containers of this state dir (all, or only those of `instance`).
    async fn list_own(
        &self,
        docker: &Docker,
        instance: Option<&str>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        let mut labels = vec![
            format!("{}={}", spec::LABEL_STATE_DIR, self.inner.state_label),
            format!("{}={}", spec::LABEL_SERVICE, self.inner.opts.service),
        ];
        if let Some(i) = instance {
            labels.push(format!("{}={i}", spec::LABEL_INSTANCE));
        }
        let filters = HashMap::from([("label", labels)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        docker.list_containers(Some(options)).await.map_err(|e| {
            RuntimeError::Docker(format!("cannot list containers: {}", engine_message(&e)))
        })
    }

    /// Creates and starts the instance's container, on `host_port` when given (a restart keeps
    /// its address), else on one the Engine picks. Returns its id and host port.
    async fn run_container(
        &self,
        docker: &Docker,
        spec_: &StartSpec,
        image: &str,
        host_port: Option<u16>,
    ) -> Result<(String, u16), RuntimeError> {
        let o = &self.inner.opts;
        let name = spec::container_name(spec_.instance.as_str());
        self.clear_name(docker, &name).await?;
        let key = spec::port_key(o.port);
        let memory = o.memory.and_then(|m| i64::try_from(m).ok());
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            env: Some(spec::env(spec_, o.port)),
            cmd: spec::command(spec_, o.port),
            labels: Some(spec::labels(o, &self.inner.state_label, spec_)),
            exposed_ports: Some(vec![key.clone()]),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    key.clone(),
                    Some(vec![PortBinding {
                        host_ip: Some("127.0.0.1".into()),
                        host_port: Some(host_port.map(|p| p.to_string()).unwrap_or_default()),
                    }]),
                )])),
                nano_cpus: o.cpus.map(|c| (c * 1e9).round() as i64),
                memory,
                // The limit is the limit: no swap on top of it (Docker would allow as much
                // again), so an app that outgrows it is OOM-killed and reported, not slowed.
                memory_swap: memory,
                binds: (!o.volumes.is_empty()).then(|| o.volumes.clone()),
                network_mode: o.network.clone(),
                // cutover restarts crashed containers itself (with backoff and an event);
                // the Engine restarting them too would hide exits and change ports.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                RuntimeError::Docker(format!(
                    "cannot create container {name} from {image}: {}",
                    engine_message(&e)
                ))
            })?;
        let id = created.id;
        if let Err(e) = docker.start_container(&id, None).await {
            self.remove(docker, &id).await;
            return Err(RuntimeError::Docker(format!(
                "cannot start container {name} ({image}): {}",
                engine_message(&e)
            )));
        }
        let inspected = docker.inspect_container(&id, None).await.map_err(|e| {
            RuntimeError::Docker(format!(
                "cannot inspect container {name}: {}",
                engine_message(&e)
            ))
        })?;
        let running = inspected
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        let port = inspected
            .network_settings
            .as_ref()
            .and_then(|n| n.ports.as_ref())
            .and_then(|p| p.get(&key))
            .and_then(|b| b.as_ref())
            .and_then(|b| {
                spec::published_port(
                    b.iter()
                        .map(|x| (x.host_ip.as_deref(), x.host_port.as_deref())),
                )
            });
        match (running, port) {
            (true, Some(p)) => Ok((id, p)),
            (false, _) => {
                // It is already gone: say how, with what it wrote, and leave nothing behind.
                let ended = self.ended(docker, &id).await;
                let tail = self.tail(docker, &id).await;
                self.remove(docker, &id).await;
                let how = match ended.code() {
                    Some(c) => format!("exited at once with code {c}"),
                    None => "stopped at once".to_owned(),
                };
                let reason = ended
                    .reason(o.memory)
                    .map(|r| format!("; {r}"))
                    .unwrap_or_default();
                let output = if tail.is_empty() {
                    String::new()
                } else {
                    format!("; its last output: {}", tail.join(" ⏎ "))
                };
                Err(RuntimeError::Docker(format!(
                    "container {name} ({image}) {how}{reason}{output}"
                )))
            }
            (true, None) => {
                self.remove(docker, &id).await;
                Err(RuntimeError::Docker(format!(
                    "container {name} has no port {} published on 127.0.0.1 (network {:?})",
                    o.port,
                    o.network.as_deref().unwrap_or("default")
                )))
            }
        }
    }

    /// Removes a stale container of ours that holds `name` (left by a crash of a daemon whose
    /// state was lost); another daemon's container with the name is an error, never removed.
    async fn clear_name(&self, docker: &Docker, name: &str) -> Result<(), RuntimeError> {
        match docker.inspect_container(name, None).await {
            Ok(c) => {
                let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
                if labels.get(spec::LABEL_STATE_DIR) == Some(&self.inner.state_label) {
                    if let Some(id) = c.id {
                        self.remove(docker, &id).await;
                    }
                    Ok(())
                } else {
                    Err(RuntimeError::Docker(format!(
                        "a container named {name} already exists and is not this daemon's (its state dir label is {:?}); remove it, or give this service another name",
                        labels
                            .get(spec::LABEL_STATE_DIR)
                            .cloned()
                            .unwrap_or_default()
                    )))
                }
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(RuntimeError::Docker(format!(
                "cannot look up container {name}: {}",
                engine_message(&e)
            ))),
        }
    }

    /// Removes a container, running or not; gone already is fine.
    async fn remove(&self, docker: &Docker, id: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            // Removal already under way (a second stop of the same instance).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => {}
            Err(e) => {
                tracing::warn!(container = %short(id), error = %engine_message(&e), "could not remove a container")
            }
        }
    }

    /// Its stop signal, `stop_timeout` to finish, then killed; then removed.
    async fn stop_and_remove(&self, docker: &Docker, id: &str, stop_timeout: Duration) {
        let options = StopContainerOptionsBuilder::default()
            .t(spec::stop_seconds(stop_timeout))
            .build();
        match docker.stop_container(id, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return,
            Err(e) => {
                tracing::warn!(container = %short(id), error = %engine_message(&e), "could not stop a container; removing it")
            }
        }
        self.remove(docker, id).await;
    }

    /// How the container's run ended (or that it still runs, or is gone).
    async fn ended(&self, docker: &Docker, id: &str) -> Ended {
        match docker.inspect_container(id, None).await {
            Ok(c) => {
                let s = c.state.unwrap_or_default();
                let going = matches!(
                    s.status,
                    Some(ContainerStateStatusEnum::REMOVING | ContainerStateStatusEnum::DEAD)
                );
                if going {
                    // A `docker rm -f` caught half-way: it is being removed.
                    Ended::Removed
                } else if s.running.unwrap_or(false) {
                    Ended::Running
                } else {
                    Ended::Exited {
                        code: s.exit_code.and_then(|c| i32::try_from(c).ok()),
                        oom: s.oom_killed.unwrap_or(false),
                        error: s.error,
                    }
                }
            }
            Err(e) if is_not_found(&e) => Ended::Removed,
            // The Engine does not answer: nothing is known, so the wait starts again.
            Err(_) => Ended::Running,
        }
    }

    /// The container's last lines of output (stdout and stderr), each cut short.
    async fn tail(&self, docker: &Docker, id: &str) -> Vec<String> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&TAIL_LINES.to_string())
            .build();
        let mut lines = Vec::new();
        let mut stream = docker.logs(id, Some(options));
        let read = async {
            while let Some(Ok(out)) = stream.next().await {
                let bytes = out.into_bytes();
                for l in String::from_utf8_lossy(&bytes).lines() {
                    let l = l.trim_end();
                    if !l.is_empty() {
                        lines.push(cut(l, TAIL_LINE_BYTES));
                    }
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines.split_off(skip)
    }

    /// Waits until the container is not running (or the Engine stops answering about it).
    async fn wait_stopped(&self, docker: &Docker, id: &str) {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut stream = docker.wait_container(id, Some(options));
        let _ = stream.next().await;
    }

    pub async fn start(&self, spec_: StartSpec) -> Result<Started, RuntimeError> {
        let docker = self.docker().await?;
        let image = self.ensure_image(&spec_.version).await?;
        let (id, host_port) = self
            .run_container(&docker, &spec_, &image, spec_.port)
            .await?;
        let instance = spec_.instance.clone();
        self.supervise_container(spec_, id.clone(), host_port);
        Ok(Started {
            instance,
            addr: SocketAddr::from(([127, 0, 0, 1], host_port)),
            handle: Handle::new(id),
        })
    }

    /// Supervises a container that runs: it is not started again.
    pub async fn adopt(&self, spec_: StartSpec, started: Started) -> Result<(), RuntimeError> {
        if self.supervises(&spec_.instance) {
            // Already adopted (handed over by a restart in place): one supervisor only.
            return Ok(());
        }
        let docker = self.docker().await?;
        let id = started.handle.as_str().to_owned();
        match self.ended(&docker, &id).await {
            Ended::Running => {}
            other => {
                return Err(RuntimeError::Docker(format!(
                    "container {} of {} does not run ({other:?})",
                    short(&id),
                    spec_.instance
                )));
            }
        }
        self.restore_cpus(&docker, &id).await;
        self.supervise_container(spec_, id, started.addr.port());
        Ok(())
    }

    /// Whether this runtime already supervises `instance`.
    fn supervises(&self, instance: &InstanceId) -> bool {
        self.inner
            .ctrs
            .lock()
            .is_ok_and(|c| c.contains_key(instance))
    }

    fn supervise_container(&self, spec_: StartSpec, id: String, host_port: u16) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (exited_tx, exited_rx) = watch::channel(false);
        let id = Arc::new(Mutex::new(id));
        if let Ok(mut ctrs) = self.inner.ctrs.lock() {
            ctrs.insert(
                spec_.instance.clone(),
                Ctr {
                    id: id.clone(),
                    stop: stop_tx,
                    exited: exited_rx,
                },
            );
        }
        tokio::spawn(self.clone().supervise(Supervised {
            spec: spec_,
            host_port,
            id,
            stop: stop_rx,
            exited: exited_tx,
            started: Instant::now(),
        }));
    }

    /// Waits for the container to stop; reports the exit; after a backoff makes it again on the
    /// same host port; until asked to stop. A stop request ends the loop at once and leaves
    /// the container to `stop`, which gives it its grace period.
    async fn supervise(self, mut s: Supervised) {
        let mut backoff = FIRST_BACKOFF;
        let mut exits: u32 = 0;
        'life: loop {
            let docker = match self.docker().await {
                Ok(d) => d,
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = s.stop.wait_for(|v| *v) => break,
                    }
                }
            };
            let id = s.id();
            tokio::select! {
                _ = self.wait_stopped(&docker, &id) => {}
                _ = s.stop.wait_for(|v| *v) => break,
            }
            if *s.stop.borrow() {
                break;
            }
            let ended = self.ended(&docker, &id).await;
            if ended == Ended::Running {
                // The wait ended without an exit (a connection lost): wait again, gently.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = s.stop.wait_for(|v| *v) => break,
                }
            }
            let ran_for = s.started.elapsed();
            if ran_for >= STABLE_AFTER {
                backoff = FIRST_BACKOFF;
            }
            exits = exits.saturating_add(1);
            let mut tail = Vec::new();
            if let Some(r) = ended.reason(self.inner.opts.memory) {
                tail.push(r);
            }
            if ended != Ended::Removed {
                tail.extend(self.tail(&docker, &id).await);
            }
            tracing::info!(instance = %s.spec.instance, container = %short(&id), code = ?ended.code(), "container stopped unasked");
            let _ = self.inner.exits.send(InstanceExit {
                service: s.spec.service.clone(),
                version: s.spec.version.clone(),
                instance: s.spec.instance.clone(),
                code: ended.code(),
                signal: None,
                restart_in: Some(backoff),
                exits,
                ran_for,
                stderr_tail: tail,
            });
            // Made again after the backoff, on the same host port, unless a stop comes first.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = s.stop.wait_for(|v| *v) => break 'life,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                let made = match self.ensure_image(&s.spec.version).await {
                    Ok(image) => {
                        self.run_container(&docker, &s.spec, &image, Some(s.host_port))
                            .await
                    }
                    Err(e) => Err(e),
                };
                match made {
                    Ok((new_id, _)) => {
                        if let Ok(mut g) = s.id.lock() {
                            *g = new_id;
                        }
                        s.started = Instant::now();
                        continue 'life;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %s.spec.instance, error = %e, "restart failed");
                        exits = exits.saturating_add(1);
                        let _ = self.inner.exits.send(InstanceExit {
                            service: s.spec.service.clone(),
                            version: s.spec.version.clone(),
                            instance: s.spec.instance.clone(),
                            code: None,
                            signal: None,
                            restart_in: Some(backoff),
                            exits,
                            ran_for: Duration::ZERO,
                            stderr_tail: vec![format!("could not start it again: {e}")],
                        });
                    }
                }
            }
        }
        if let Ok(mut ctrs) = self.inner.ctrs.lock() {
            ctrs.remove(&s.spec.instance);
        }
        let _ = s.exited.send(true);
    }

    /// Stops an instance's container: its supervisor first (so it makes no new one), then the
    /// stop signal with `stop_timeout`, then removal. Also removes a container of the instance
    /// that is not supervised (one a previous daemon left). Idempotent.
    pub async fn stop(
        &self,
        instance: &InstanceId,
        stop_timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let found = self.inner.ctrs.lock().ok().and_then(|c| {
            c.get(instance)
                .map(|c| (c.id.clone(), c.stop.clone(), c.exited.clone()))
        });
        let mut ids = Vec::new();
        if let Some((id, stop, mut exited)) = found {
            let _ = stop.send(true);
            // The supervisor ends promptly (at most after a create in flight).
            let _ = tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| *e)).await;
            if let Ok(g) = id.lock() {
                ids.push(g.clone());
            }
        }
        let docker = self.docker().await?;
        for c in self.list_own(&docker, Some(instance.as_str())).await? {
            if let Some(id) = c.id
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        for id in ids {
            self.stop_and_remove(&docker, &id, stop_timeout).await;
        }
        Ok(())
    }

    /// Containers of this service and state dir that run and that this runtime does not
    /// supervise yet: the ones a crashed daemon left. Those that do not run, or have no address
    /// on 127.0.0.1, are removed.
    pub async fn recover(&self) -> Vec<Found> {
        let docker = match self.docker().await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, service = %self.inner.opts.service, "cannot look for containers left by a previous daemon");
                return Vec::new();
            }
        };
        let list = match self.list_own(&docker, None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot look for containers left by a previous daemon");
                return Vec::new();
            }
        };
        let mut found = Vec::new();
        for c in list {
            let Some(id) = c.id.clone() else { continue };
            let labels = c.labels.clone().unwrap_or_default();
            let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
            let port = c.ports.as_ref().and_then(|ports| {
                let ours: Vec<(Option<&str>, Option<String>)> = ports
                    .iter()
                    .filter(|p| p.private_port == self.inner.opts.port)
                    .map(|p| (p.ip.as_deref(), p.public_port.map(|n| n.to_string())))
                    .collect();
                spec::published_port(ours.iter().map(|(ip, p)| (*ip, p.as_deref())))
            });
            let (Some(version), Some(instance)) = (
                labels.get(spec::LABEL_VERSION),
                labels.get(spec::LABEL_INSTANCE),
            ) else {
                self.remove(&docker, &id).await;
                continue;
            };
            if self.supervises(&InstanceId::new(instance)) {
                // Adopted already (a restart in place handed it over): not found twice.
                continue;
            }
            match (running, port) {
                (true, Some(port)) => found.push(Found {
                    service: self.inner.opts.service.clone(),
                    version: Version::new(version),
                    started: Started {
                        instance: InstanceId::new(instance),
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        handle: Handle::new(id),
                    },
                }),
                _ => {
                    tracing::info!(container = %short(&id), instance = %instance, "removing a container a previous daemon left that does not run");
                    self.remove(&docker, &id).await;
                }
            }
        }
        found
    }

    /// Stops and removes every container of this service and state dir.
    pub async fn stop_all(&self, stop_timeout: Duration) {
        let ids: Vec<InstanceId> = self
            .inner
            .ctrs
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let rt = self.clone();
            set.spawn(async move { rt.stop(&id, stop_timeout).await });
        }
        while set.join_next().await.is_some() {}
        // Any left that no supervisor knew (found but not adopted): removed too.
        if let Ok(docker) = self.docker().await
            && let Ok(list) = self.list_own(&docker, None).await
        {
            let mut set = tokio::task::JoinSet::new();
            for c in list {
                if let Some(id) = c.id {
                    let rt = self.clone();
                    let docker = docker.clone();
                    set.spawn(async move { rt.stop_and_remove(&docker, &id, stop_timeout).await });
                }
            }
            while set.join_next().await.is_some() {}
        }
    }
}

/// A container id as people read it: its first 12 hex digits.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// At most `max` bytes of `line`, cut at a character boundary.
fn cut(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_owned();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

impl Runtime for DockerRuntime {
    fn needs_prepare(&self) -> bool {
        true
    }

    fn prepare<'a>(&'a self, version: &'a Version) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { self.ensure_image(version).await.map(|_| ()) })
    }

    fn start(&self, spec: StartSpec) -> BoxFuture<'_, Result<Started, RuntimeError>> {
        Box::pin(DockerRuntime::start(self, spec))
    }

    fn stop<'a>(
        &'a self,
        instance: &'a InstanceId,
        stop_timeout: Duration,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(DockerRuntime::stop(self, instance, stop_timeout))
    }

    fn adopt(&self, spec: StartSpec, started: Started) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(DockerRuntime::adopt(self, spec, started))
    }

    /// The record is not needed: the labels say which containers are this daemon's, including
    /// any the record missed (a crash between a start and its write).
    fn recover(&self, _recorded: Vec<Recorded>) -> BoxFuture<'_, Vec<Found>> {
        Box::pin(DockerRuntime::recover(self))
    }

    fn stop_all(&self, stop_timeout: Duration) -> BoxFuture<'_, ()> {
        Box::pin(DockerRuntime::stop_all(self, stop_timeout))
    }

    fn describe(&self, instance: &InstanceId, handle: &Handle) -> String {
        // A crash makes a new container for the instance: name the one it runs as now.
        let now = self.current(instance).ok();
        format!(
            "container {}",
            short(now.as_deref().unwrap_or(handle.as_str()))
        )
    }

    fn disturb<'a>(
        &'a self,
        instance: &'a InstanceId,
        how: Disturbance,
    ) -> BoxFuture<'a, Result<String, RuntimeError>> {
        Box::pin(DockerRuntime::disturb(self, instance, how))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_config_then_docker_host_then_the_socket() {
        let cases = [
            (
                Some("tcp://127.0.0.1:2375"),
                Some("unix:///x.sock"),
                "tcp://127.0.0.1:2375",
            ),
            (None, Some("unix:///x.sock"), "unix:///x.sock"),
            (None, Some(" "), DEFAULT_HOST),
            (None, None, DEFAULT_HOST),
        ];
        for (configured, env, want) in cases {
            assert_eq!(
                resolve_host(configured, env),
                want,
                "{configured:?} {env:?}"
            );
        }
    }

    #[test]
    fn ids_and_lines_are_cut_for_people() {
        assert_eq!(short("3fa2b1c9d0e1ffff"), "3fa2b1c9d0e1");
        assert_eq!(short("abc"), "abc");
        assert_eq!(cut("héllo", 2), "h…");
        assert_eq!(cut("hello", 10), "hello");
    }
}
