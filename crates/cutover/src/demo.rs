//! `cutover demo` (the guided tour of docs/reference.md §3.3) and `cutover demo-app` (its sample upstream).
//!
//! The tour runs the real thing: it writes a config into a temporary directory with free
//! ports, starts `cutover up` as a child process, puts a steady load of about 200 requests per
//! second on the proxy (loopback only, bounded in time), canaries a healthy v2 to promotion and
//! a bad v3 (20% errors) into an automatic rollback, and checks the outcome from the outside:
//! the load generator counts every answer per version, so "zero failed requests outside the
//! canary's share" is measured, not assumed.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_api::wire::{Rollout, Service};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::{DemoAppArgs, DemoRuntime};
use crate::client::Client;
use crate::exit::{CliError, CliResult, Code};
use crate::output::{err, out};

pub fn demo_app(a: &DemoAppArgs) -> CliResult {
    let mut opts = cutover_demo_app::DemoOptions {
        version: a.version.clone(),
        // In a container every instance listens on the same port: its id tells them apart.
        instance: std::env::var("CUTOVER_INSTANCE").unwrap_or_else(|_| format!("demo-{}", a.port)),
        error_rate: a.error_rate,
        latency: match &a.latency {
            Some(l) => humantime_parse(l)?,
            None => Duration::ZERO,
        },
        fail_health: a.fail_health,
    };
    opts.apply_env(|k| std::env::var(k).ok())
        .map_err(|e| CliError::new(Code::Usage, e.to_string()))?;
    if !(0.0..=1.0).contains(&opts.error_rate) {
        return Err(CliError::new(
            Code::Usage,
            format!("--error-rate {} is not between 0 and 1", opts.error_rate),
        ));
    }
    let rt = crate::runtime(tokio::runtime::Builder::new_current_thread())?;
    rt.block_on(async move {
        let addr = SocketAddr::from((a.host, a.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::new(Code::Usage, format!("cannot listen on {addr}: {e}")))?;
        // One line for `cutover logs`, which otherwise would have nothing to show of it.
        err(format_args!(
            "demo-app {} ({}) listening on {addr}",
            opts.version, opts.instance
        ));
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
        };
        cutover_demo_app::run(listener, opts, shutdown)
            .await
            .map_err(|e| CliError::new(Code::Failure, format!("demo-app failed: {e}")))
    })
}

fn humantime_parse(s: &str) -> CliResult<Duration> {
    humantime::parse_duration(s)
        .map_err(|e| CliError::new(Code::Usage, format!("--latency {s:?}: {e}")))
}

fn free_port() -> CliResult<u16> {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CliError::new(Code::Failure, format!("cannot find a free port: {e}")))
}

const DEMO_CONFIG: &str = r#"# Written by `cutover demo`: one demo service, shortened steps so the tour takes seconds.
[daemon]
api = "127.0.0.1:API_PORT"
state_dir = "state"

[services.web]
listen = "127.0.0.1:WEB_PORT"
version = "v1"
command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]
instances = 2
strategy = "canary"
drain_timeout = "5s"
stop_timeout = "3s"

[services.web.health]
path = "/healthz"
interval = "250ms"
timeout = "200ms"
healthy_threshold = 2
unhealthy_threshold = 3

[services.web.canary]
steps = [ { weight = 10, pause = "6s" }, { weight = 50, pause = "6s" }, { weight = 100 } ]

[services.web.analysis]
interval = "1s"
min_requests = 30
max_error_rate = 0.01
max_p99 = "500ms"
failure_limit = 2
compare_to_stable = true
"#;

/// Answers the load generator saw, per version (or `proxy` when the proxy answered itself).
#[derive(Default)]
struct Tally {
    per_version: BTreeMap<String, VersionTally>,
    /// When each version answered first: a canary's first traffic.
    first: BTreeMap<String, Instant>,
}

#[derive(Default)]
struct VersionTally {
    requests: u64,
    errors: u64,
    latencies_us: Vec<u64>,
}

impl VersionTally {
    fn p99(&self) -> Option<Duration> {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let i = ((v.len() as f64) * 0.99).ceil() as usize;
        Some(Duration::from_micros(v[i.clamp(1, v.len()) - 1]))
    }
}

/// Kills the daemon child if the tour ends early, so nothing is left behind.
struct DaemonGuard(Option<Child>);

impl DaemonGuard {
    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let pid = c.id();
            // SIGTERM lets the daemon drain and stop its instances; SIGKILL only if it hangs.
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The demo's image when it runs on Docker (built from this executable each time).
const DEMO_IMAGE: &str = "cutover-demo:latest";

/// `runtime = "docker"` in place of the process command: the demo app in its image, listening
/// on 8080 inside each container.
fn docker_config(config: &str) -> String {
    config.replace(
        r#"command = ["cutover", "demo-app", "--port", "{port}", "--version", "{version}"]"#,
        &format!("runtime = \"docker\"\nimage = \"{DEMO_IMAGE}\"\nport = 8080"),
    )
}

pub fn run(keep: bool, runtime: DemoRuntime) -> CliResult {
    let dir = tempfile::Builder::new()
        .prefix("cutover-demo-")
        .tempdir()
        .map_err(|e| {
            CliError::new(
                Code::Failure,
                format!("cannot create a temporary directory: {e}"),
            )
        })?;
    let (api_port, web_port) = (free_port()?, free_port()?);
    let mut config = DEMO_CONFIG
        .replace("API_PORT", &api_port.to_string())
        .replace("WEB_PORT", &web_port.to_string());
    let config_path = dir.path().join("cutover.toml");
    std::fs::write(&config_path, &config)
        .map_err(|e| CliError::new(Code::Failure, format!("cannot write the demo config: {e}")))?;
    let exe = std::env::current_exe().map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot find cutover's own executable: {e}"),
        )
    })?;
    if runtime == DemoRuntime::Docker {
        let t0 = Instant::now();
        err(format_args!(
            "cutover demo: building the image {DEMO_IMAGE} from {} (FROM scratch, no registry)",
            exe.display()
        ));
        crate::containers::build_demo_image(DEMO_IMAGE, &exe)?;
        err(format_args!(
            "cutover demo: built {DEMO_IMAGE} in {:.1}s",
            t0.elapsed().as_secs_f64()
        ));
        config = docker_config(&config);
        std::fs::write(&config_path, &config).map_err(|e| {
            CliError::new(Code::Failure, format!("cannot write the demo config: {e}"))
        })?;
    }
    let log = std::fs::File::create(dir.path().join("daemon.log"))
        .map_err(|e| CliError::new(Code::Failure, format!("cannot create the daemon log: {e}")))?;
    let child = std::process::Command::new(&exe)
        .arg("-c")
        .arg(&config_path)
        .arg("up")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| CliError::new(Code::Failure, e.to_string()))?,
        )
        .stderr(log)
        .spawn()
        .map_err(|e| CliError::new(Code::Failure, format!("cannot start `cutover up`: {e}")))?;
    let mut guard = DaemonGuard(Some(child));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2);
    let rt = crate::runtime(builder)?;
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    let web = SocketAddr::from(([127, 0, 0, 1], web_port));
    let result = rt.block_on(tour(dir.path(), api, web, keep, runtime));
    if let Err(e) = &result
        && e.code != Code::Closed
    {
        err(format_args!(
            "cutover demo: {e}\n  the daemon's log: {}",
            dir.path().join("daemon.log").display()
        ));
        // Keep the directory for a look at the log.
        let kept = dir.keep();
        err(format_args!("  (kept {})", kept.display()));
        guard.stop();
        return result;
    }
    guard.stop();
    result
}

fn say(mp: &MultiProgress, line: impl AsRef<str>) {
    if mp.is_hidden() {
        err(line.as_ref());
    } else {
        let _ = mp.println(line.as_ref());
    }
}

async fn tour(
    dir: &Path,
    api: SocketAddr,
    web: SocketAddr,
    keep: bool,
    runtime: DemoRuntime,
) -> CliResult {
    let started = Instant::now();
    let mp = MultiProgress::new();
    if !std::io::stderr().is_terminal() {
        mp.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    say(
        &mp,
        format!(
            "cutover demo: a daemon in {} with service `web` on http://{web}/",
            dir.display()
        ),
    );
    let token = wait_for_token(&dir.join("state").join("token")).await?;
    let client = Client::with_token(api, token.clone());
    wait_until(
        Duration::from_secs(30),
        "the daemon's API to answer",
        || async {
            client
                .get::<serde_json::Value>("/api/v1/status")
                .await
                .is_ok()
        },
    )
    .await?;
    wait_until(
        Duration::from_secs(30),
        "v1's two instances to become healthy",
        || async {
            client
                .get::<Service>("/api/v1/services/web")
                .await
                .is_ok_and(|s| s.instances.iter().filter(|i| i.health == "healthy").count() >= 2)
        },
    )
    .await?;
    say(
        &mp,
        "v1 is serving on 2 instances; starting a steady load of ~200 requests/s",
    );

    let tally = Arc::new(Mutex::new(Tally::default()));
    let (stop_load, load_stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(load(web, tally.clone(), load_stopped));

    let t2 = canary(&mp, &client, &tally, "v2", json!({}), "a healthy v2").await?;
    let t3 = canary(
        &mp,
        &client,
        &tally,
        "v3",
        json!({"DEMO_ERROR_RATE": "0.2"}),
        "a bad v3 (20% errors)",
    )
    .await?;
    let (v2, v3) = (&t2.rollout, &t3.rollout);
    let _ = stop_load.send(true);
    let _ = load.await;

    // The load has stopped; take the counters out so no lock is held across the awaits below.
    let t = match tally.lock() {
        Ok(mut guard) => std::mem::take(&mut guard.per_version),
        Err(_) => return Err(CliError::new(Code::Failure, "load counters poisoned")),
    };
    out(format_args!(
        "\n{:<8} {:>9} {:>8} {:>9}",
        "version", "requests", "errors", "p99"
    ))?;
    let mut outside_canary_errors = 0;
    for (v, vt) in &t {
        let p99 = vt
            .p99()
            .map(|d| format!("{:.1}ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "-".into());
        out(format_args!(
            "{v:<8} {:>9} {:>8} {p99:>9}",
            vt.requests, vt.errors
        ))?;
        if v != "v3" {
            outside_canary_errors += vt.errors;
        }
    }
    out(format_args!(
        "\n{:<4} {:<10} {:<12} {:>14} {:>13} {:>16}  reason",
        "id", "rollout", "outcome", "first traffic", "decided", "time to decide"
    ))?;
    for t in [&t2, &t3] {
        let r = &t.rollout;
        out(format_args!(
            "#{:<3} {:<10} {:<12} {:>14} {:>12.1}s {:>15.1}s  {}",
            r.id,
            format!("{} → {}", r.from, r.to),
            r.outcome,
            t.first_traffic
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            r.duration_seconds.unwrap_or(0.0),
            decision_seconds(r),
            r.reason.as_deref().unwrap_or("")
        ))?;
    }
    out(format_args!(
        "(first traffic: from `deploy` to the candidate's first answer to the load; decided: from `deploy` to the rollout's end; instances ran as {})",
        match runtime {
            DemoRuntime::Process => "processes",
            DemoRuntime::Docker => "containers",
        }
    ))?;
    out(format_args!(
        "\nfailed requests outside the bad canary's share: {outside_canary_errors}; tour took {:.0}s",
        started.elapsed().as_secs_f64()
    ))?;
    let ok = v2.outcome == "promoted" && v3.outcome == "rolled-back" && outside_canary_errors == 0;
    // The verdict comes first: with --keep the tour then waits for Ctrl-C, and a reader should
    // not have to stop it to learn whether it passed.
    let result = if ok {
        out(format_args!(
            "demo passed: v2 promoted, v3 rolled back by analysis"
        ))?;
        Ok(())
    } else {
        Err(CliError::new(
            Code::Failure,
            format!(
                "demo failed: v2 {}, v3 {}, {outside_canary_errors} failed request(s) outside the canary",
                v2.outcome, v3.outcome
            ),
        ))
    };
    if let (true, Err(e)) = (keep, &result) {
        err(format_args!("cutover demo: {e}"));
    }
    if keep {
        out(format_args!(
            "\ndashboard: http://{api}/  (log in with token {token})\nproxy:     http://{web}/\nconfig:    {}\npress Ctrl-C to stop",
            dir.join("cutover.toml").display()
        ))?;
        let _ = tokio::signal::ctrl_c().await;
    }
    result
}

/// A rollout as the tour saw it: how long after `deploy` its candidate answered first.
struct Timed {
    rollout: Rollout,
    first_traffic: Option<Duration>,
}

/// Seconds from the candidate's first traffic to the rollout's end: how long cutover took to
/// decide once it had something to judge.
fn decision_seconds(r: &Rollout) -> f64 {
    let at = |kind: &str| {
        r.events
            .iter()
            .find(|e| e.kind == kind)
            .and_then(|e| e.at.parse::<jiff::Timestamp>().ok())
    };
    let end = r
        .finished_at
        .as_deref()
        .and_then(|f| f.parse::<jiff::Timestamp>().ok());
    match (at("step"), end) {
        (Some(s), Some(e)) => (e.as_millisecond() - s.as_millisecond()) as f64 / 1000.0,
        _ => r.duration_seconds.unwrap_or(0.0),
    }
}

async fn canary(
    mp: &MultiProgress,
    client: &Client,
    tally: &Arc<Mutex<Tally>>,
    version: &str,
    env: serde_json::Value,
    what: &str,
) -> CliResult<Timed> {
    say(mp, format!("\n── canary of {what} ──"));
    let deployed = Instant::now();
    let r: Rollout = client
        .post(
            "/api/v1/services/web/deploy",
            json!({"version": version, "env": env}),
        )
        .await?;
    let bar = mp.add(ProgressBar::new(100));
    bar.set_style(
        ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos:>3}%  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("█▉ "),
    );
    bar.set_prefix(format!("#{} v1→{version}", r.id));
    let mut seen = 0i64;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let cur: Rollout = client.get(&format!("/api/v1/rollouts/{}", r.id)).await?;
        let last = seen;
        for e in cur.events.iter().filter(|e| e.id > last) {
            seen = seen.max(e.id);
            say(mp, format!("  {}", crate::render::event_line(e)));
        }
        if let Ok(svc) = client.get::<Service>("/api/v1/services/web").await {
            bar.set_position(u64::from(svc.weights.get(version).copied().unwrap_or(0)));
            let counts = tally
                .lock()
                .map(|t| {
                    t.per_version
                        .iter()
                        .map(|(v, c)| format!("{v}: {} req {} err", c.requests, c.errors))
                        .collect::<Vec<_>>()
                        .join(" · ")
                })
                .unwrap_or_default();
            bar.set_message(format!("{}  {counts}", svc.phase));
        }
        if cur.outcome != "in-progress" {
            bar.finish_with_message(cur.outcome.clone());
            say(
                mp,
                format!(
                    "  → rollout #{} {}: {}",
                    cur.id,
                    cur.outcome,
                    cur.reason.as_deref().unwrap_or("")
                ),
            );
            let first = tally
                .lock()
                .ok()
                .and_then(|t| t.first.get(version).copied())
                .map(|f| f.saturating_duration_since(deployed));
            return Ok(Timed {
                rollout: cur,
                first_traffic: first,
            });
        }
        if Instant::now() > deadline {
            return Err(CliError::new(
                Code::Failure,
                format!("rollout #{} did not end within 90s", r.id),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// About 200 requests per second until told to stop, each answer tallied by the version that
/// served it.
async fn load(
    web: SocketAddr,
    tally: Arc<Mutex<Tally>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client: HyperClient<_, Empty<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = match format!("http://{web}/").parse() {
        Ok(u) => u,
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    // Bounded in time whatever happens: the tour never runs longer than this.
    let end = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if tokio::time::Instant::now() > end {
            return;
        }
        let (client, uri, tally) = (client.clone(), uri.clone(), tally.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let (version, failed) = match client.get(uri).await {
                Ok(resp) => {
                    let status = resp.status();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let version = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_owned))
                        .unwrap_or_else(|| "proxy".to_owned());
                    (version, status.is_server_error())
                }
                Err(_) => ("proxy".to_owned(), true),
            };
            let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Ok(mut t) = tally.lock() {
                t.first.entry(version.clone()).or_insert_with(Instant::now);
                let vt = t.per_version.entry(version).or_default();
                vt.requests += 1;
                vt.errors += u64::from(failed);
                vt.latencies_us.push(us);
            }
        });
    }
}

async fn wait_for_token(path: &Path) -> CliResult<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(path)
            && t.trim().len() >= 32
        {
            return Ok(t.trim().to_owned());
        }
        if Instant::now() > deadline {
            return Err(CliError::new(
                Code::Failure,
                "the daemon did not start within 30s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> CliResult
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            return Err(CliError::new(
                Code::Failure,
                format!("gave up waiting for {what} after {limit:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
