//! `cutover up`: binds every listener, starts the proxies and the API on the main runtime and
//! the controller on a thread of its own, then waits for SIGTERM/Ctrl-C.
//!
//! The controller gets its own thread and runtime for two reasons: its SQLite writes must never
//! stall a proxy worker, and instances are spawned from that one long-lived thread, which is
//! what PR_SET_PDEATHSIG ties their lives to. Before it starts any instance, that thread
//! sweeps what a killed daemon of the same state dir left (processes its instances forked), and
//! starts the keeper, which sweeps again the moment this daemon dies, however it dies.
//! Shutdown runs in the order that loses no request: proxies stop accepting and finish what is
//! in flight, then instances are stopped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cutover_api::ApiState;
use cutover_config::{RuntimeSettings, ServiceSettings, Settings};
use cutover_controller::{Controller, DriverParts, ServiceSetup};
use cutover_core::{DataPlane, RouteTable, Version};
use cutover_metrics::Metrics;
use cutover_proxy::{ClientTimeouts, Proxy, ServiceProxySpec};
use cutover_runtime::{LogLimits, ProcessOptions, ProcessRuntime, Runtime, StaticRuntime};
use cutover_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exit::{CliError, CliResult, Code};

/// Upstream connect timeout; a local upstream that does not accept within this is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest the proxies may take to finish requests in flight at shutdown.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);

pub fn up(settings: Settings) -> CliResult {
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
    crate::runtime(builder)?.block_on(run(settings))
}

/// Every socket `up` needs, bound before anything starts so that a taken port fails fast.
struct Listeners {
    api: TcpListener,
    services: Vec<(TcpListener, Option<TcpListener>)>,
}

async fn bind(addr: SocketAddr, key: &str) -> CliResult<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        CliError::new(
            Code::Usage,
            format!("cannot listen on {addr} ({key}): {e}; choose another address in the config"),
        )
    })
}

async fn bind_all(settings: &Settings) -> CliResult<Listeners> {
    let api = bind(settings.daemon.api, "daemon.api").await?;
    let mut services = Vec::new();
    for s in &settings.services {
        let main = bind(s.listen, &format!("services.{}.listen", s.name)).await?;
        let preview = match s.rollout.blue_green.preview_listen {
            Some(a) => {
                Some(bind(a, &format!("services.{}.blue_green.preview_listen", s.name)).await?)
            }
            None => None,
        };
        services.push((main, preview));
    }
    Ok(Listeners { api, services })
}

async fn run(settings: Settings) -> CliResult {
    let store = Store::open(&settings.daemon.state_dir).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!(
                "cannot open the state in {}: {e}",
                settings.daemon.state_dir.display()
            ),
        )
    })?;
    let token = cutover_store::ensure_token(&settings.daemon.state_dir)
        .map_err(|e| CliError::new(Code::Failure, format!("cannot set up the API token: {e}")))?;
    let listeners = bind_all(&settings).await?;

    let metrics = Metrics::new();
    let (health_tx, health_rx) = tokio::sync::mpsc::unbounded_channel();
    let proxy = Proxy::new(metrics.clone(), health_tx);
    let (stop_proxies, proxies_stopping) = watch::channel(false);
    let mut proxy_tasks = Vec::new();
    for (s, (listener, preview)) in settings.services.iter().zip(listeners.services) {
        let spec = ServiceProxySpec {
            service: s.name.clone(),
            health: s.health.clone(),
            upstream_timeout: s.upstream_timeout,
            connect_timeout: CONNECT_TIMEOUT,
            client: ClientTimeouts::default(),
        };
        // Until the controller publishes, the proxy answers 503: no instance is healthy yet.
        let initial = RouteTable::single(s.name.clone(), s.version.clone(), Vec::new());
        let p = proxy.clone();
        let name = s.name.clone();
        let stop = wait_true(proxies_stopping.clone());
        proxy_tasks.push(tokio::spawn(async move {
            if let Err(e) = p.serve(spec, listener, preview, initial, stop).await {
                tracing::error!(service = %name, error = %e, "proxy stopped with an error");
            }
        }));
    }

    let (controller, driver_thread, stop_driver) =
        start_controller(&settings, store, &proxy, &metrics, health_rx)?;

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
    let (stop_api, api_stopping) = watch::channel(false);
    let api_state = ApiState {
        controller,
        metrics: metrics.clone(),
        token: Arc::from(token.as_str()),
    };
    let api_addr = listeners.api.local_addr().unwrap_or(settings.daemon.api);
    let api = tokio::spawn(cutover_api::serve(
        listeners.api,
        api_state,
        wait_true(api_stopping),
    ));
    eprintln!(
        "cutover is up: dashboard and API on http://{api_addr}/ (token in {}); {} service(s): {}",
        settings.daemon.state_dir.join("token").display(),
        settings.services.len(),
        settings
            .services
            .iter()
            .map(|s| format!("{} on {}", s.name, s.listen))
            .collect::<Vec<_>>()
            .join(", ")
    );

    shutdown_signal().await;
    eprintln!("cutover: shutting down: finishing requests in flight, then stopping instances");
    let _ = stop_proxies.send(true);
    let _ = stop_api.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_DRAIN, futures_join(proxy_tasks)).await;
    if drained.is_err() {
        tracing::warn!("requests still in flight after {SHUTDOWN_DRAIN:?}; stopping anyway");
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
    let _ = stop_driver.send(true);
    // The driver stops every instance before its thread ends; joining it off the runtime keeps
    // this thread free to run the proxies' last tasks meanwhile.
    let joined = tokio::task::spawn_blocking(move || driver_thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        return Err(CliError::new(
            Code::Failure,
            "the controller thread ended abnormally",
        ));
    }
    eprintln!("cutover: stopped");
    Ok(())
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

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Starts the controller on its own thread and runtime; returns its handle once it is running.
fn start_controller(
    settings: &Settings,
    store: Store,
    proxy: &Proxy,
    metrics: &Metrics,
    health: tokio::sync::mpsc::UnboundedReceiver<cutover_core::HealthChange>,
) -> CliResult<(Controller, std::thread::JoinHandle<()>, watch::Sender<bool>)> {
    let services: Vec<ServiceSettings> = settings.services.clone();
    let state_dir = settings.daemon.state_dir.clone();
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
    let (stop_tx, stop_rx) = watch::channel(false);
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("cutover-controller".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ =
                        handle_tx.send(Err(format!("cannot start the controller runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
                let process = ProcessRuntime::with_options(
                    ProcessOptions {
                        state_dir,
                        workdir,
                        self_exe,
                        logs: LogLimits::default(),
                        cgroups: true,
                    },
                    exits_tx,
                );
                // Before anything starts: what a killed daemon of this state dir left (workers
                // of a forking server may still hold its instances' ports) is killed first.
                match process.sweep_leftovers(Duration::from_secs(10)) {
                    Ok(swept) if swept.processes > 0 => tracing::warn!(
                        killed = swept.processes,
                        cgroups = swept.cgroups,
                        "killed instance processes left over by a previous daemon"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                if let Err(e) = process.spawn_keeper() {
                    tracing::warn!(error = %e, "no keeper: if this daemon is killed, workers its instances forked live until the next start");
                }
                let process = Arc::new(Runtime::Process(process));
                let setups = services
                    .iter()
                    .map(|s| service_setup(s, &process))
                    .collect();
                let (driver, controller) = cutover_controller::driver(DriverParts {
                    services: setups,
                    store,
                    dataplane,
                    metrics,
                    health,
                    exits: exits_rx,
                });
                let _ = handle_tx.send(Ok(controller));
                driver.run(wait_true(stop_rx)).await;
            });
        })
        .map_err(|e| {
            CliError::new(
                Code::Failure,
                format!("cannot start the controller thread: {e}"),
            )
        })?;
    let controller = handle_rx
        .recv()
        .map_err(|_| {
            CliError::new(
                Code::Failure,
                "the controller thread ended before it started",
            )
        })?
        .map_err(|e| CliError::new(Code::Failure, e))?;
    Ok((controller, thread, stop_tx))
}

fn service_setup(s: &ServiceSettings, process: &Arc<Runtime>) -> ServiceSetup {
    let (runtime, command, env, known) = match &s.runtime {
        RuntimeSettings::Process { command, env } => {
            (process.clone(), command.clone(), env.clone(), None)
        }
        RuntimeSettings::Static { upstreams } => (
            Arc::new(Runtime::Static(StaticRuntime::new(upstreams.clone()))),
            Vec::new(),
            BTreeMap::new(),
            Some(upstreams.keys().cloned().collect::<Vec<Version>>()),
        ),
    };
    let mut spec = s.rollout.clone();
    if let Some(k) = &known {
        // One instance per address of the version that lists the most, so that every listed
        // address gets traffic; a version with fewer addresses repeats them (`StaticRuntime`).
        let most = k.iter().filter_map(|v| match &s.runtime {
            RuntimeSettings::Static { upstreams } => upstreams.get(v).map(Vec::len),
            RuntimeSettings::Process { .. } => None,
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
        spec,
        command,
        env,
        known_versions: known,
        runtime,
    }
}
