//! `cutover up`: binds every listener, starts the proxies and the API on a runtime of their
//! own and the controller on the main thread, then waits for SIGTERM/Ctrl-C (stop) or
//! SIGHUP/SIGUSR2 (restart in place, see `handover`).
//!
//! The controller gets its own thread and runtime for two reasons: its SQLite writes must never
//! stall a proxy worker, and instances are spawned from that one long-lived thread, which is
//! what PR_SET_PDEATHSIG ties their lives to. That thread is the main thread, the one that
//! survives an `exec`. Before it starts any instance, that thread sweeps what a killed daemon
//! of the same state dir left (processes its instances forked), and starts the keeper, which
//! sweeps again the moment this daemon dies, however it dies (a restart in place keeps both
//! the instances and the keeper). Shutdown runs in the order that loses no request: proxies
//! stop accepting and finish what is in flight, then instances are stopped.
//!
//! Beside them: the optional token-free `/metrics` listener (`[daemon] metrics`) and the thread
//! that keeps the dashboard's chart series in SQLite across restarts (`series`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use cutover_api::ApiState;
use cutover_config::{RuntimeSettings, ServiceSettings, Settings};
use cutover_controller::{Controller, DriverParts, SafetySetup, ServiceSetup, Shutdown};
use cutover_core::{DataPlane, RouteTable, Version};
use cutover_metrics::Metrics;
use cutover_proxy::{ClientTimeouts, Proxy, ServiceProxySpec};
use cutover_runtime::docker::DockerRuntime;
use cutover_runtime::{LogLimits, ProcessOptions, ProcessRuntime, Runtime, StaticRuntime};
use cutover_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exit::{CliError, CliResult, Code};
use crate::handover;
use crate::output::err;

/// Upstream connect timeout; a local upstream that does not accept within this is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest the proxies may take to finish requests in flight at shutdown.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);
/// The longest a restart in place waits for connections to finish their requests and park.
const HANDOVER_DRAIN: Duration = Duration::from_secs(10);

/// `reset_state`: start even on a missing or damaged state database (see `state`).
pub fn up(settings: Settings, reset_state: bool) -> CliResult {
    // Before anything binds or starts: a docker service needs its Engine (exit 3 otherwise).
    // Not after a restart in place: the containers run on, and an Engine that is away for a
    // moment must not cost the daemon its life (supervision waits for it).
    if !handover::restarting() {
        for (host, info) in crate::containers::check_engines(&settings)? {
            tracing::info!(host = %host, version = %info.version, api = %info.api_version, "Docker Engine answers");
        }
    }
    let builder = if settings.daemon.worker_threads == 1 {
        // One worker: a current-thread runtime avoids the cross-thread hand-offs that a
        // one-thread multi-thread runtime still pays for.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if settings.daemon.worker_threads > 1 {
            b.worker_threads(settings.daemon.worker_threads);
        }
        b
    };
    let rt = crate::runtime(builder)?;
    // The controller runs on this, the process's main thread, and the proxies and the API on
    // a thread of their own. Instances are spawned from the controller's thread, and the
    // parent-death signal that kills them with a crashed daemon follows the *thread* that
    // spawned them; a restart in place must `exec` from that same thread, and after an
    // `exec` the thread that called it is the main thread. So only the main thread keeps
    // both promises across any number of restarts.
    let (jobs, job) = std::sync::mpsc::channel::<MainJob>();
    let (done_tx, done) = std::sync::mpsc::channel();
    let plane = std::thread::Builder::new()
        .name("cutover-proxy".into())
        .spawn(move || rt.block_on(run(settings, reset_state, MainThread { jobs, done })))
        .map_err(|e| CliError::new(Code::Failure, format!("cannot start the proxy thread: {e}")))?;
    if let Ok(job) = job.recv() {
        let _ = done_tx.send(job());
    }
    plane.join().unwrap_or_else(|_| {
        Err(CliError::new(
            Code::Failure,
            "the proxy thread ended abnormally",
        ))
    })
}

/// The controller's work, run on the main thread: `Some(why)` when a restart in place failed.
type MainJob = Box<dyn FnOnce() -> Option<String> + Send>;

/// How `run` reaches the main thread: it sends the controller there, and learns how it ended.
struct MainThread {
    jobs: std::sync::mpsc::Sender<MainJob>,
    done: std::sync::mpsc::Receiver<Option<String>>,
}

/// Every socket `up` needs, bound before anything starts so that a taken port fails fast.
struct Listeners {
    api: TcpListener,
    metrics: Option<TcpListener>,
    services: Vec<(TcpListener, Option<TcpListener>)>,
    /// `[dependencies.NAME]` hops, in the config's order.
    dependencies: Vec<TcpListener>,
    /// A duplicate of each, kept for a planned restart to hand over by number.
    keep: Vec<(String, OwnedFd)>,
}

async fn bind(addr: SocketAddr, key: &str) -> CliResult<TcpListener> {
    // A backlog of 4096, not mio's default (an inherited listener keeps the one it had).
    crate::limits::listen(addr).map_err(|e| {
        CliError::new(
            Code::Usage,
            format!("cannot listen on {addr} ({key}): {e}; choose another address in the config"),
        )
    })
}

/// The listener for `key` on `addr`: the one a previous program handed over when it listens
/// there (so not one connection waiting in its queue is lost), else a new one.
async fn listener(
    addr: SocketAddr,
    key: &str,
    what: &str,
    inherited: &mut BTreeMap<String, std::net::TcpListener>,
    keep: &mut Vec<(String, OwnedFd)>,
) -> CliResult<TcpListener> {
    let l = match inherited.remove(key) {
        Some(l) if l.local_addr().is_ok_and(|a| a == addr || addr.port() == 0) => l
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(l))
            .map_err(|e| CliError::new(Code::Failure, format!("cannot take over {addr}: {e}")))?,
        _ => bind(addr, what).await?,
    };
    let dup = l
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| CliError::new(Code::Failure, format!("cannot keep {addr}: {e}")))?;
    keep.push((key.to_owned(), dup));
    Ok(l)
}

async fn bind_all(
    settings: &Settings,
    inherited: &mut BTreeMap<String, std::net::TcpListener>,
) -> CliResult<Listeners> {
    let mut keep = Vec::new();
    let api = listener(
        settings.daemon.api,
        "daemon.api",
        "daemon.api",
        inherited,
        &mut keep,
    )
    .await?;
    let metrics = match settings.daemon.metrics {
        Some(a) => {
            Some(listener(a, "daemon.metrics", "daemon.metrics", inherited, &mut keep).await?)
        }
        None => None,
    };
    let mut services = Vec::new();
    for s in &settings.services {
        let name = s.name.as_str();
        let main = listener(
            s.listen,
            &handover::listener_key(name, false),
            &format!("services.{name}.listen"),
            inherited,
            &mut keep,
        )
        .await?;
        let preview = match s.rollout.blue_green.preview_listen {
            Some(a) => Some(
                listener(
                    a,
                    &handover::listener_key(name, true),
                    &format!("services.{name}.blue_green.preview_listen"),
                    inherited,
                    &mut keep,
                )
                .await?,
            ),
            None => None,
        };
        services.push((main, preview));
    }
    let mut dependencies = Vec::new();
    for d in &settings.dependencies {
        let key = format!("dependencies.{}.listen", d.name);
        dependencies.push(listener(d.listen, &key, &key, inherited, &mut keep).await?);
    }
    Ok(Listeners {
        api,
        metrics,
        services,
        dependencies,
        keep,
    })
}

/// Why the daemon's main loop ended.
enum Ending {
    Stop,
    /// Re-execute in place (reload or upgrade), with the config already validated.
    Restart,
}

/// What the controller thread needs to re-execute the daemon after its driver handed over.
struct Restart {
    listeners: Vec<(String, OwnedFd)>,
    parked: Vec<cutover_proxy::ParkedConn>,
}

async fn run(settings: Settings, reset_state: bool, main: MainThread) -> CliResult {
    // Listening for the signals before anything is announced: a SIGHUP sent the moment the
    // daemon looks ready (a `reload` right after start) would otherwise meet its default
    // action and end the daemon.
    let signals = Signals::listen();
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    // A receiver whose secret is not in the environment could never send: refuse to start.
    let missing = settings.missing_secrets();
    if !missing.is_empty() {
        let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Err(CliError::new(Code::Usage, text.join("\n")));
    }
    // Before any descriptor is opened; the default max_connections follows from the result.
    let default_max_connections = crate::limits::prepare(&settings);
    let mut taken = handover::take().map_err(|e| CliError::new(Code::Failure, e))?;
    // Damaged or lost state is refused before anything opens (and so creates) the database.
    crate::state::check_at_start(&settings.daemon.state_dir, reset_state)?;
    let store = Store::open(&settings.daemon.state_dir).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!(
                "cannot open the state in {}: {e}",
                settings.daemon.state_dir.display()
            ),
        )
    })?;
    // The record of promoted versions exists from the first start on (a state dir from before
    // it gets one now), so that a database lost later is noticed.
    if !cutover_store::integrity::record_path(&settings.daemon.state_dir).exists()
        && let Err(e) = store.save_record()
    {
        tracing::warn!(error = %e, "could not write the record of promoted versions");
    }
    let token = cutover_store::ensure_token(&settings.daemon.state_dir)
        .map_err(|e| CliError::new(Code::Failure, format!("cannot set up the API token: {e}")))?;
    let mut inherited = taken
        .as_mut()
        .map(|t| std::mem::take(&mut t.listeners))
        .unwrap_or_default();
    let listeners = bind_all(&settings, &mut inherited).await?;
    // Listeners the new config no longer has close here.
    drop(inherited);

    let metrics = Metrics::new();
    // The charts' last 15 minutes from before this start, before anything samples anew.
    let started = crate::series::now();
    match crate::series::restore(&store, &metrics, started) {
        Ok(n) => tracing::debug!(points = n, "restored the dashboard's chart points"),
        Err(e) => tracing::warn!(error = %e, "could not restore the dashboard's chart points"),
    }
    let series_saver = match Store::open(&settings.daemon.state_dir) {
        Ok(s) => crate::series::Saver::start(s, metrics.clone(), started)
            .map_err(|e| tracing::warn!(error = %e, "cannot start saving chart points"))
            .ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the state for chart points; charts will start empty after a restart");
            None
        }
    };
    let (health_tx, health_rx) = tokio::sync::mpsc::unbounded_channel();
    let proxy = Proxy::new(metrics.clone(), health_tx);
    let restarted = taken.is_some();
    let adopt = taken
        .as_mut()
        .map(|t| std::mem::take(&mut t.instances))
        .unwrap_or_default();
    // The controller restores and publishes every route table before the proxies accept
    // anything, so after a restart in place the first request already finds its instances.
    let (restart_tx, restart_rx) = std::sync::mpsc::channel::<Restart>();
    let MainThread { jobs, done } = main;
    let (controller, stop_driver) = start_controller(
        &settings, store, &proxy, &metrics, health_rx, adopt, restart_rx, &jobs,
    )?;
    let (stop_proxies, proxies_stopping) = watch::channel(false);
    let mut proxy_tasks = Vec::new();
    for (s, (listener, preview)) in settings.services.iter().zip(listeners.services) {
        let spec = ServiceProxySpec {
            service: s.name.clone(),
            health: s.health.clone(),
            upstream_timeout: s.upstream_timeout,
            connect_timeout: CONNECT_TIMEOUT,
            client: ClientTimeouts::default(),
            max_connections: s
                .max_connections
                .map_or(default_max_connections, |m| m as usize),
        };
        // Replaced by the table the controller already published.
        let initial = RouteTable::single(s.name.clone(), s.version.clone(), Vec::new());
        let p = proxy.clone();
        let name = s.name.clone();
        let stop = wait_true(proxies_stopping.clone());
        let adopted = taken
            .as_mut()
            .map(|t| t.adopted(s.name.as_str()))
            .unwrap_or_default();
        proxy_tasks.push(tokio::spawn(async move {
            if let Err(e) = p
                .serve_adopting(spec, listener, preview, initial, stop, adopted)
                .await
            {
                tracing::error!(service = %name, error = %e, "proxy stopped with an error");
            }
        }));
    }

    if let Some(url) = &settings.notify.webhook {
        match url.parse::<hyper::Uri>() {
            Ok(uri) => {
                tokio::spawn(crate::notify::webhook(uri, controller.clone()));
            }
            Err(e) => {
                return Err(CliError::new(
                    Code::Usage,
                    format!("notify.webhook {url:?} is not a URL: {e}"),
                ));
            }
        }
    }
    // Dependency hops, then faults, experiments, synthetic traffic and probes.
    for (d, l) in settings.dependencies.iter().zip(listeners.dependencies) {
        let p = proxy.clone();
        let (name, upstream) = (d.name.clone(), d.upstream);
        let stop = wait_true(proxies_stopping.clone());
        proxy_tasks.push(tokio::spawn(async move {
            p.serve_dependency(name, l, upstream, stop).await;
        }));
    }
    let chaos = crate::chaos::start(&settings, &proxy, &metrics, &controller).await;
    let (stop_api, api_stopping) = watch::channel(false);
    let api_addr = listeners.api.local_addr().unwrap_or(settings.daemon.api);
    // SLOs, alerts and DORA on a thread of their own (`signals`).
    let (signals_task, signals_handle) = match crate::signals::start(
        &settings,
        &metrics,
        &controller,
        format!("http://{api_addr}/"),
    ) {
        Ok((r, h)) => (Some(r), Some(h)),
        Err(e) => {
            tracing::error!("{e}; no SLOs or alerts");
            (None, None)
        }
    };
    let mut api_state =
        ApiState::new(controller, metrics.clone(), &token).with_chaos(chaos.chaos.clone());
    if let Some(h) = signals_handle {
        api_state = api_state.with_signals(h);
    }
    let api = tokio::spawn(cutover_api::serve(
        listeners.api,
        api_state,
        wait_true(api_stopping.clone()),
    ));
    let scrape = listeners.metrics.map(|l| {
        let addr = l.local_addr().ok();
        let task = tokio::spawn(cutover_api::serve_metrics(
            l,
            metrics.clone(),
            wait_true(api_stopping),
        ));
        (addr, task)
    });
    let state_dir = settings.daemon.state_dir.clone();
    let _ = cutover_store::write_private(
        &handover::pid_path(&state_dir),
        format!("{}\n", std::process::id()).as_bytes(),
    );
    err(format_args!(
        "cutover is {}: dashboard and API on http://{api_addr}/ (token in {}){}; {} service(s): {}",
        if restarted {
            "up again (restarted in place)"
        } else {
            "up"
        },
        settings.daemon.state_dir.join("token").display(),
        scrape
            .as_ref()
            .and_then(|(a, _)| *a)
            .map(|a| format!(", metrics without a token on http://{a}/metrics"))
            .unwrap_or_default(),
        settings.services.len(),
        settings
            .services
            .iter()
            .map(|s| format!("{} on {}", s.name, s.listen))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // The CLI follows a restart by this file: written once everything serves.
    let boot = format!(
        "{}\n",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let _ = cutover_store::write_private(&handover::boot_path(&state_dir), boot.as_bytes());

    let ending = wait_for_ending(&settings, signals).await;
    match ending {
        Ending::Stop => {
            err("cutover: shutting down: finishing requests in flight, then stopping instances")
        }
        Ending::Restart => {
            err(
                "cutover: restarting in place: finishing requests in flight, keeping connections and instances",
            );
            proxy.hand_over();
        }
    }
    chaos.stop();
    let _ = stop_proxies.send(true);
    let _ = stop_api.send(true);
    let drain = match ending {
        Ending::Stop => SHUTDOWN_DRAIN,
        // A connection still mid-request after this is closed rather than hold the restart.
        Ending::Restart => HANDOVER_DRAIN,
    };
    let drained = tokio::time::timeout(drain, futures_join(proxy_tasks)).await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {drain:?}; going on anyway");
    }
    // API connections that stay open (a dashboard's event stream) must not hold a restart,
    // during which no new proxy connection is accepted: they get a moment, then are closed.
    let api_grace = match ending {
        Ending::Stop => Duration::from_secs(5),
        Ending::Restart => Duration::from_millis(300),
    };
    let _ = tokio::time::timeout(api_grace, api).await;
    if let Some((_, task)) = scrape {
        let _ = tokio::time::timeout(api_grace, task).await;
    }
    if let Some(s) = series_saver {
        // The chart points up to now are saved for the next start (or program).
        let _ = tokio::task::spawn_blocking(move || s.stop()).await;
    }
    if let Some(s) = signals_task {
        // The counts up to now are saved too.
        let _ = tokio::task::spawn_blocking(move || s.stop()).await;
    }
    if let Ending::Restart = ending {
        let _ = restart_tx.send(Restart {
            listeners: listeners.keep,
            parked: proxy.take_parked(),
        });
    }
    let _ = stop_driver.send(Some(match ending {
        Ending::Stop => Shutdown::Stop,
        Ending::Restart => Shutdown::HandOver,
    }));
    // The driver stops every instance before it ends (or, for a restart, the main thread
    // replaces this program); waiting for it off the runtime keeps this thread free meanwhile.
    let joined = tokio::task::spawn_blocking(move || done.recv()).await;
    match joined {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(why))) => {
            return Err(CliError::new(
                Code::Failure,
                format!("the restart failed, and the daemon stopped: {why}"),
            ));
        }
        _ => {
            return Err(CliError::new(
                Code::Failure,
                "the controller thread ended abnormally",
            ));
        }
    }
    // Nothing runs any more: the CLI must not find a pid to signal.
    let _ = std::fs::remove_file(handover::pid_path(&state_dir));
    let _ = std::fs::remove_file(handover::boot_path(&state_dir));
    err("cutover: stopped");
    Ok(())
}

/// Waits for SIGTERM/Ctrl-C (stop) or SIGHUP/SIGUSR2 (restart in place). A restart whose
/// config does not load is refused: the reason goes to the log and to `restart-error` for
/// the CLI, and the daemon goes on as it was.
async fn wait_for_ending(settings: &Settings, signals: Signals) -> Ending {
    async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    let Signals {
        mut hup,
        mut usr2,
        mut term,
        mut int,
    } = signals;
    loop {
        tokio::select! {
            _ = recv(&mut term) => return Ending::Stop,
            _ = recv(&mut int) => return Ending::Stop,
            _ = recv(&mut hup) => {}
            _ = recv(&mut usr2) => {}
        }
        let state_dir = &settings.daemon.state_dir;
        let refused = match cutover_config::load(&settings.file) {
            Err(e) => Some(e.to_string()),
            Ok(new) if !new.missing_secrets().is_empty() => Some(
                new.missing_secrets()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            Ok(new) if new.daemon.state_dir != *state_dir => Some(format!(
                "daemon.state_dir changed from {} to {}: that needs a full restart (stop, then `cutover up`)",
                state_dir.display(),
                new.daemon.state_dir.display()
            )),
            Ok(_) => None,
        };
        match refused {
            Some(why) => {
                tracing::error!("restart refused; still running as before: {why}");
                let _ = cutover_store::write_private(
                    &handover::error_path(state_dir),
                    format!("{why}\n").as_bytes(),
                );
            }
            None => {
                let _ = std::fs::remove_file(handover::error_path(state_dir));
                return Ending::Restart;
            }
        }
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Resolves once the watch turns true (or its sender is gone).
async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// The signals the daemon acts on, listened for from its start: SIGTERM and SIGINT stop it,
/// SIGHUP and SIGUSR2 restart it in place.
struct Signals {
    hup: Option<tokio::signal::unix::Signal>,
    usr2: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            hup: signal(SignalKind::hangup()).ok(),
            usr2: signal(SignalKind::user_defined2()).ok(),
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }
}

/// Starts the controller on the main thread with a runtime of its own; returns its handle
/// once it has restored its state. Its result, on `MainThread::done`, is `Some(why)` when a
/// restart in place failed.
#[allow(clippy::too_many_arguments)]
fn start_controller(
    settings: &Settings,
    store: Store,
    proxy: &Proxy,
    metrics: &Metrics,
    health: tokio::sync::mpsc::UnboundedReceiver<cutover_core::HealthChange>,
    adopt: handover::Adoption,
    restart: std::sync::mpsc::Receiver<Restart>,
    main: &std::sync::mpsc::Sender<MainJob>,
) -> CliResult<(Controller, watch::Sender<Option<Shutdown>>)> {
    let services: Vec<ServiceSettings> = settings.services.clone();
    let settings_for_docker = settings.clone();
    let state_dir = settings.daemon.state_dir.clone();
    let safety_base = SafetyBase {
        backups: settings.backups.clone(),
        state_dir: cutover_runtime::canonical_state_dir(&state_dir),
        workdir: settings
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(std::path::absolute)
            .and_then(Result::ok),
    };
    // Instances run where the config file is, like its relative paths resolve.
    let workdir = settings
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::absolute)
        .and_then(Result::ok);
    let self_exe = std::env::current_exe().map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot find cutover's own executable: {e}"),
        )
    })?;
    let dataplane: Arc<dyn DataPlane> = Arc::new(proxy.clone());
    let metrics = metrics.clone();
    let (stop_tx, mut stop_rx) = watch::channel(None);
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    main.send(Box::new(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = handle_tx.send(Err(format!("cannot start the controller runtime: {e}")));
                return None;
            }
        };
        let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
        let containers = crate::containers::runtimes(&settings_for_docker, &exits_tx);
        let process = ProcessRuntime::with_options(
            ProcessOptions {
                state_dir: state_dir.clone(),
                workdir,
                self_exe,
                logs: LogLimits::default(),
                cgroups: true,
            },
            exits_tx,
        );
        let handover::Adoption {
            instances: adopt,
            keeper,
            inherited,
        } = adopt;
        match keeper {
            // A restart in place: the instances and the keeper of the previous program live
            // on, and this program takes them over instead of sweeping them away.
            Some(k) => {
                process.keep_keeper(k);
                for (id, i) in inherited {
                    process.expect(id, i);
                }
            }
            None => {
                // Before anything starts: what a killed daemon of this state dir left
                // (workers of a forking server may still hold its instances' ports) is
                // killed first.
                match process.sweep_leftovers(Duration::from_secs(10)) {
                    Ok(swept) if swept.processes > 0 => tracing::warn!(
                        killed = swept.processes,
                        cgroups = swept.cgroups,
                        "killed instance processes left over by a previous daemon"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return None;
                    }
                }
                if let Err(e) = process.spawn_keeper() {
                    tracing::warn!(error = %e, "no keeper: if this daemon is killed, workers its instances forked live until the next start");
                }
            }
        }
        let runtime: Arc<dyn Runtime> = Arc::new(process.clone());
        let handed = rt.block_on(async move {
            let setups = services
                .iter()
                .map(|s| service_setup(s, &runtime, containers.get(s.name.as_str()), &safety_base))
                .collect();
            let (mut driver, controller) = cutover_controller::driver(DriverParts {
                services: setups,
                store,
                dataplane,
                metrics,
                health,
                exits: exits_rx,
                adopt,
            });
            driver.restore_first().await;
            let _ = handle_tx.send(Ok(controller));
            let shutdown = async move {
                match stop_rx.wait_for(Option::is_some).await {
                    Ok(s) => s.unwrap_or(Shutdown::Stop),
                    Err(_) => Shutdown::Stop,
                }
            };
            driver.run(shutdown).await
        });
        // The main thread asks for a restart before it stops the driver, so the request
        // is here by now if there is one.
        let r = restart.try_recv().ok()?;
        let (keeper, inherited) = process.hand_over();
        // This thread spawned the instances, so it is the one that must exec (see the
        // `handover` module's doc).
        Some(handover::exec(
            &state_dir,
            &r.listeners,
            r.parked,
            handover::Adoption {
                instances: handed,
                keeper,
                inherited,
            },
        ))
    }))
    .map_err(|_| CliError::new(Code::Failure, "the main thread is gone"))?;
    let controller = handle_rx
        .recv()
        .map_err(|_| {
            CliError::new(
                Code::Failure,
                "the controller thread ended before it started",
            )
        })?
        .map_err(|e| CliError::new(Code::Failure, e))?;
    Ok((controller, stop_tx))
}

/// What every service's release-safety setup shares.
struct SafetyBase {
    backups: cutover_core::BackupSettings,
    state_dir: std::path::PathBuf,
    workdir: Option<std::path::PathBuf>,
}

fn safety_setup(s: &ServiceSettings, base: &SafetyBase) -> SafetySetup {
    let env = match &s.runtime {
        RuntimeSettings::Process { env, .. } => env.clone(),
        RuntimeSettings::Docker(d) => d.env.clone(),
        // A static service runs nothing, so it has no env of its own.
        RuntimeSettings::Static { .. } => BTreeMap::new(),
    };
    let database = s.safety.database.as_ref().map(|d| {
        let t = cutover_safety::target::resolve(d, &env);
        if let Err(e) = &t {
            tracing::warn!(service = %s.name, "{e}; its backups and migrations will fail until it is fixed");
        }
        t
    });
    SafetySetup {
        spec: s.safety.clone(),
        database,
        backups: base.backups.clone(),
        state_dir: Some(base.state_dir.clone()),
        workdir: base.workdir.clone(),
        groups: Default::default(),
    }
}

fn service_setup(
    s: &ServiceSettings,
    process: &Arc<dyn Runtime>,
    docker: Option<&DockerRuntime>,
    base: &SafetyBase,
) -> ServiceSetup {
    let (runtime, command, env, known) = match &s.runtime {
        RuntimeSettings::Process { command, env } => {
            (process.clone(), command.clone(), env.clone(), None)
        }
        RuntimeSettings::Docker(d) => (
            // `containers::runtimes` made one for every docker service.
            docker.map_or_else(
                || process.clone(),
                |r| Arc::new(r.clone()) as Arc<dyn Runtime>,
            ),
            d.command.clone().unwrap_or_default(),
            d.env.clone(),
            None,
        ),
        RuntimeSettings::Static { upstreams } => (
            Arc::new(StaticRuntime::new(upstreams.clone())) as Arc<dyn Runtime>,
            Vec::new(),
            BTreeMap::new(),
            Some(upstreams.keys().cloned().collect::<Vec<Version>>()),
        ),
    };
    let mut spec = s.rollout.clone();
    spec.runs_instances = known.is_none();
    if let Some(k) = &known {
        // One instance per address of the version that lists the most, so that every listed
        // address gets traffic; a version with fewer addresses repeats them (`StaticRuntime`).
        let most = k.iter().filter_map(|v| match &s.runtime {
            RuntimeSettings::Static { upstreams } => upstreams.get(v).map(Vec::len),
            RuntimeSettings::Process { .. } | RuntimeSettings::Docker(_) => None,
        });
        spec.instances = most
            .max()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(1)
            .max(1);
    }
    ServiceSetup {
        name: s.name.clone(),
        listen: s.listen,
        preview_listen: s.rollout.blue_green.preview_listen,
        initial_version: s.version.clone(),
        probe_paths: if s.health.path == "/" {
            vec!["/".to_owned()]
        } else {
            vec![s.health.path.clone(), "/".to_owned()]
        },
        spec,
        command,
        env,
        env_file: s.env_file.clone(),
        known_versions: known,
        runtime,
        safety: Arc::new(safety_setup(s, base)),
    }
}
