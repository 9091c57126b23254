//! The binary's side of `runtime = "docker"`: one [`DockerRuntime`] per docker service (sharing
//! one Engine connection per address), the Engine check `validate` and `up` make (exit 3 with
//! a sentence naming the socket), `cutover logs` from the Engine, and the demo's image, built
//! offline from cutover's own executable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_config::{DockerSettings, RuntimeSettings, ServiceSettings, Settings};
use cutover_runtime::docker::{DockerOptions, DockerRuntime, Engine, EngineInfo, image};
use cutover_runtime::{InstanceExit, RuntimeError};
use tokio::sync::mpsc;

use crate::cli::LogsArgs;
use crate::exit::{CliError, CliResult, Code};

/// The label of images the demo builds (and the tests, which build the same image).
pub const DEMO_LABEL: &str = "io.cutover.demo";

/// How long `validate` and `up` wait for an Engine to answer.
const CHECK_WITHIN: Duration = Duration::from_secs(5);

/// The Engine address of a docker service: its `host`, else `DOCKER_HOST`, else the socket.
pub fn host_of(d: &DockerSettings) -> String {
    cutover_runtime::docker::resolve_host(
        d.host.as_deref(),
        std::env::var("DOCKER_HOST").ok().as_deref(),
    )
}

fn docker_services(
    settings: &Settings,
) -> impl Iterator<Item = (&ServiceSettings, &DockerSettings)> {
    settings.services.iter().filter_map(|s| match &s.runtime {
        RuntimeSettings::Docker(d) => Some((s, d.as_ref())),
        _ => None,
    })
}

/// Every Engine the config's docker services use must answer; each answer's version, by
/// address. Exit 3 naming the socket when one does not.
pub fn check_engines(settings: &Settings) -> CliResult<HashMap<String, EngineInfo>> {
    if docker_services(settings).next().is_none() {
        return Ok(HashMap::new());
    }
    crate::runtime(tokio::runtime::Builder::new_current_thread())?
        .block_on(engines_answer(settings))
}

async fn engines_answer(settings: &Settings) -> CliResult<HashMap<String, EngineInfo>> {
    let mut found = HashMap::new();
    for host in docker_services(settings).map(|(_, d)| host_of(d)) {
        if found.contains_key(&host) {
            continue;
        }
        let info = Engine::new(host.as_str())
            .check(CHECK_WITHIN)
            .await
            .map_err(|e| CliError::new(Code::Unreachable, e.to_string()))?;
        found.insert(host, info);
    }
    Ok(found)
}

/// The runtimes of the config's docker services, by service name; services on the same
/// Engine share its connection.
pub fn runtimes(
    settings: &Settings,
    exits: &mpsc::UnboundedSender<InstanceExit>,
) -> HashMap<String, DockerRuntime> {
    let mut engines: HashMap<String, Engine> = HashMap::new();
    docker_services(settings)
        .map(|(s, d)| {
            let host = host_of(d);
            let engine = engines
                .entry(host.clone())
                .or_insert_with(|| Engine::new(host))
                .clone();
            let opts = DockerOptions {
                service: s.name.clone(),
                state_dir: settings.daemon.state_dir.clone(),
                image: d.image.clone(),
                port: d.port,
                build: d.build.clone(),
                dockerfile: d.dockerfile.clone(),
                pull: d.pull,
                cpus: d.cpus,
                memory: d.memory,
                volumes: d.volumes.clone(),
                network: d.network.clone(),
                labels: d.labels.clone(),
            };
            (
                s.name.to_string(),
                DockerRuntime::new(opts, engine, exits.clone()),
            )
        })
        .collect()
}

/// `cutover logs` for a docker service: its containers' output, from the Engine.
pub fn logs(settings: &Settings, d: &DockerSettings, a: &LogsArgs) -> CliResult {
    use std::io::Write;
    let rt = crate::runtime(tokio::runtime::Builder::new_current_thread())?;
    let engine = Engine::new(host_of(d));
    let query = cutover_runtime::docker::logs::Query {
        service: a.service.clone(),
        version: a.version.clone(),
        instance: a.instance.clone(),
        follow: a.follow,
        lines: a.lines,
    };
    let prefixed = a.instance.is_none();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let shown = rt.block_on(cutover_runtime::docker::logs::show(
        &engine,
        &settings.daemon.state_dir,
        &query,
        |instance, line| {
            let written = if prefixed {
                writeln!(out, "{instance} | {line}")
            } else {
                writeln!(out, "{line}")
            };
            // Following: each line as it comes.
            written.is_ok() && (!a.follow || out.flush().is_ok())
        },
    ));
    let _ = out.flush();
    use cutover_runtime::docker::logs::LogsError;
    shown.map_err(|e| match e {
        LogsError::NoSuch(m) => CliError::new(Code::Usage, m),
        LogsError::Nothing(m) => CliError::new(Code::Failure, m),
        LogsError::Runtime(e @ RuntimeError::EngineUnreachable { .. }) => {
            CliError::new(Code::Unreachable, e.to_string())
        }
        LogsError::Runtime(e) => CliError::new(Code::Failure, e.to_string()),
    })
}

/// The demo's image: cutover's own executable (`/cutover`) and the shared libraries `ldd`
/// lists for it, `FROM scratch`, running `cutover demo-app --host 0.0.0.0` (PORT and
/// CUTOVER_VERSION come from the container's environment). Built through the Engine's API;
/// nothing is pulled.
pub fn build_demo_image(tag: &str, exe: &Path) -> CliResult {
    let rt = crate::runtime(tokio::runtime::Builder::new_current_thread())?;
    let engine = Engine::new(cutover_runtime::docker::resolve_host(
        None,
        std::env::var("DOCKER_HOST").ok().as_deref(),
    ));
    rt.block_on(async {
        engine
            .check(CHECK_WITHIN)
            .await
            .map_err(|e| CliError::new(Code::Unreachable, e.to_string()))?;
        let docker = engine
            .client()
            .await
            .map_err(|e| CliError::new(Code::Unreachable, e.to_string()))?;
        let files: Vec<(PathBuf, String)> = vec![(exe.to_owned(), "/cutover".to_owned())];
        let entry: Vec<String> = ["/cutover", "demo-app", "--host", "0.0.0.0"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let tar = tokio::task::spawn_blocking(move || image::executables_tar(&files, &entry))
            .await
            .map_err(|e| CliError::new(Code::Failure, e.to_string()))?
            .map_err(|e| {
                CliError::new(
                    Code::Failure,
                    format!("cannot put the demo image together: {e}"),
                )
            })?;
        let labels = HashMap::from([(DEMO_LABEL.to_owned(), "true".to_owned())]);
        image::build(&docker, tag, "Dockerfile", tar, &labels)
            .await
            .map_err(|e| {
                CliError::new(
                    Code::Failure,
                    format!("cannot build the demo image {tag}: {e}"),
                )
            })?;
        // The previous build of the tag is untagged now: it goes, so demos do not pile up.
        if let Err(e) = image::prune_untagged(&docker, DEMO_LABEL).await {
            tracing::warn!(error = %e, "could not remove older demo images");
        }
        Ok(())
    })
}
