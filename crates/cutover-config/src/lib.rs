//! cutover-config: `cutover.toml` → validated [`Settings`].
//!
//! Two stages, like uv and ripgrep: serde reads the text into raw structs in which every value
//! keeps its byte span (unknown keys are errors), then `resolve` checks everything a user can
//! get wrong and builds the core's policy types. Every problem becomes a [`Diagnostic`] naming
//! file, line, column and key path, and all of them are reported at once. This crate starts
//! nothing and reads nothing but the config file.

mod envfile;
mod raw;
mod resolve;
pub mod signals;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_core::{BackupSettings, HealthSpec, RolloutSpec, SafetySpec, ServiceName, Version};

pub use envfile::read_env_file;
pub use resolve::{parse_duration, parse_memory};

/// A commented, working config for `cutover init`.
pub const INIT_TEMPLATE: &str = include_str!("init.toml");

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub file: PathBuf,
    pub daemon: DaemonSettings,
    /// In the order of their names.
    pub services: Vec<ServiceSettings>,
    pub notify: NotifySettings,
    /// `[dependencies.NAME]`, in the order of their names.
    pub dependencies: Vec<DependencySettings>,
    /// `[backups]`: where the catalog is, what `prune` keeps, the schedule.
    pub backups: BackupSettings,
    /// SLO alerts' receivers, routes and rules, `[policy]` and `[dora]` (docs/reference.md §12).
    pub signals: signals::SignalsSettings,
    /// What is valid but probably not meant (an API reachable from other machines, say):
    /// `validate` prints these and `up` logs them.
    pub warnings: Vec<Diagnostic>,
}

impl Settings {
    pub fn service(&self, name: &str) -> Option<&ServiceSettings> {
        self.services.iter().find(|s| s.name.as_str() == name)
    }

    /// The receivers' environment variables that are not set, each where the config names
    /// it: `validate`, `up` and `reload` refuse such a config (the values themselves are
    /// read only when sending, never kept).
    pub fn missing_secrets(&self) -> Vec<Diagnostic> {
        self.signals
            .secrets
            .iter()
            .filter(|s| std::env::var_os(&s.env).is_none_or(|v| v.is_empty()))
            .map(|s| Diagnostic {
                message: format!(
                    "the environment variable {} is not set; export it before starting cutover (its value is read when an alert is sent, never stored)",
                    s.env
                ),
                ..s.at.clone()
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DaemonSettings {
    pub api: SocketAddr,
    /// An optional second listener serving only `GET /metrics`, without a token.
    pub metrics: Option<SocketAddr>,
    /// Resolved against the config file's directory when relative.
    pub state_dir: PathBuf,
    /// 0: one per core.
    pub worker_threads: usize,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct NotifySettings {
    pub webhook: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSettings {
    pub name: ServiceName,
    pub listen: SocketAddr,
    pub version: Version,
    pub runtime: RuntimeSettings,
    pub health: HealthSpec,
    pub rollout: RolloutSpec,
    pub upstream_timeout: Duration,
    /// Open client connections the proxy keeps for this service (main and preview listeners
    /// together); beyond it the oldest idle one is closed, or the new one gets a 503. `None`:
    /// derived from the daemon's descriptor limit at start.
    pub max_connections: Option<u32>,
    /// Probe traffic to a canary whose real traffic is too thin to judge.
    pub synthetic: Option<SyntheticSettings>,
    /// Scheduled blackbox probes (`[[services.X.probe]]`).
    pub probes: Vec<ProbeSettings>,
    /// Hooks, smoke checks and the database (docs/reference.md §10); `rollout.steps` says which run.
    pub safety: SafetySpec,
    /// `[[services.NAME.slo]]`, in the order written.
    pub slos: Vec<cutover_signals::slo::SloSpec>,
    /// `env_file` (absolute): read at each start of an instance, below `--env`; never stored.
    pub env_file: Option<std::path::PathBuf>,
}

/// A TCP hop an app uses to reach a dependency, so that faults can reach it too.
#[derive(Clone, Debug, PartialEq)]
pub struct DependencySettings {
    pub name: ServiceName,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
}

/// `[services.X.analysis] synthetic = { rps, paths, headers }`.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSettings {
    /// Requests per second to the candidate (and as many to stable), at most.
    pub rps: f64,
    /// Asked in turn.
    pub paths: Vec<String>,
    pub headers: BTreeMap<String, String>,
    /// Requests in flight at most, per version: a slow candidate never makes the rate grow.
    pub concurrency: u32,
}

/// `[[services.X.probe]]`: a blackbox check through the service's listener, on a schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSettings {
    /// The `probe` label of its metrics: `name`, or the path.
    pub name: String,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// The expected status; `None`: any 2xx.
    pub status: Option<u16>,
    pub body_contains: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RuntimeSettings {
    Process {
        command: Vec<String>,
        env: BTreeMap<String, String>,
    },
    Static {
        upstreams: BTreeMap<Version, Vec<SocketAddr>>,
    },
    /// `runtime = "docker"` (docs/reference.md §7.7): containers on a Docker Engine.
    Docker(Box<DockerSettings>),
}

/// A docker service's containers: what runs and how (docs/reference.md §7.7).
#[derive(Clone, Debug, PartialEq)]
pub struct DockerSettings {
    /// The image of a version: `{version}` is filled in with the version (without its
    /// revision); without it every version runs the same image.
    pub image: String,
    /// The port the app listens on inside its container; published on 127.0.0.1.
    pub port: u16,
    /// Replaces the image's CMD when set; `{port}` and `{version}` are filled in.
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// The build context (absolute): the image of a version is built from it when missing.
    pub build: Option<PathBuf>,
    /// The Dockerfile, relative to the build context.
    pub dockerfile: String,
    /// Pull a missing image from its registry.
    pub pull: bool,
    pub cpus: Option<f64>,
    /// Bytes.
    pub memory: Option<u64>,
    /// `name:/path` or `/host/path:/path[:ro]`, relative host paths made absolute.
    pub volumes: Vec<String>,
    pub network: Option<String>,
    /// The Engine's address as written (`unix:///…`, `tcp://…`); `None`: `DOCKER_HOST`, then
    /// the default socket, decided when the daemon starts.
    pub host: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        diagnostics: vec![Diagnostic {
            file: path.to_owned(),
            line: 1,
            column: 1,
            key: String::new(),
            message: match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "no such file; write one with `cutover init` or pass -c FILE".to_owned()
                }
                _ => format!("cannot read: {e}"),
            },
        }],
    })?;
    parse(&text, path)
}

/// Validates config `text` as if read from `path` (used in messages and to resolve
/// relative paths).
pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let raw = raw::parse(text, path)?;
    resolve::resolve(raw, text, path)
}

/// The config loader run on arbitrary bytes with its promise checked, for the fuzz target in
/// `fuzz/` and the seeded fuzz test; not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    /// Loads `data` (lossily as UTF-8, as a file with a stray byte would be read) as
    /// `cutover.toml`: it must give settings or diagnostics that each point at a place in
    /// the text (line ≥ 1, column ≥ 1, within the file) and name the file; never a panic.
    pub fn config(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let path = Path::new("cutover.toml");
        let lines = text.split('\n').count();
        let located = |d: &crate::Diagnostic| {
            d.line >= 1 && d.line <= lines && d.column >= 1 && d.file == path
        };
        match crate::parse(&text, path) {
            Ok(s) => {
                for w in &s.warnings {
                    assert!(located(w), "warning {w:?} for {text:?}");
                }
            }
            Err(e) => {
                assert!(
                    !e.diagnostics.is_empty(),
                    "an error without a diagnostic: {text:?}"
                );
                for d in &e.diagnostics {
                    assert!(located(d), "diagnostic {d:?} for {text:?}");
                }
                let _ = e.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod safety_tests;
