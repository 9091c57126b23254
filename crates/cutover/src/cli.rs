//! The command line (docs/reference.md §3) as clap derive types. Parsing only; no behaviour here.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cutover",
    version,
    about = "Deployments that promote or roll back on their own."
)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "cutover.toml",
        env = "CUTOVER_CONFIG"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a commented cutover.toml (demo service) and .cutover/ in the current directory.
    Init {
        /// Overwrite an existing cutover.toml.
        #[arg(long)]
        force: bool,
    },
    /// Check the config and print what would run; no side effects.
    Validate(ReadOpts),
    /// Run the daemon in the foreground: proxies, controller, API, dashboard.
    Up {
        /// Restart the running daemon in place on the binary now at its path (an upgrade),
        /// losing no request, and wait until it serves again.
        #[arg(long, conflicts_with = "reset_state")]
        upgrade: bool,
        /// Start although the state database is missing, empty or damaged (a damaged one is
        /// kept, renamed): the config's versions are deployed, whatever had been promoted.
        #[arg(long)]
        reset_state: bool,
    },
    /// The daemon's state on disk: its snapshots, and restoring one.
    #[command(subcommand)]
    State(StateCommand),
    /// Apply the edited config to the running daemon (also SIGHUP), losing no request.
    Reload,
    /// Start a rollout of SERVICE to VERSION.
    Deploy {
        service: String,
        version: String,
        /// Extra environment for the new version's instances (repeatable).
        #[arg(long = "env", value_name = "KEY=VAL")]
        env: Vec<String>,
        /// Extra environment from a file of KEY=VAL lines (`#` comments, blank lines, optional
        /// `export` and quotes); `--env` wins over it. Its values are never printed.
        #[arg(long, value_name = "PATH")]
        env_file: Option<PathBuf>,
        /// Override the configured strategy for this rollout: canary, blue-green or rolling.
        #[arg(long)]
        strategy: Option<String>,
        /// Follow progress until the rollout ends; exit 1 unless it was promoted.
        #[arg(long)]
        wait: bool,
        /// With --wait: stop waiting after this long (e.g. 90s, 5m) and exit 1; the rollout
        /// itself goes on.
        #[arg(long, requires = "wait", value_name = "DUR", value_parser = duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        read: ReadOpts,
        #[command(flatten)]
        signals: DeploySignals,
    },
    /// Services, versions, weights, instances and the current step.
    Status {
        service: Option<String>,
        /// Redraw in place until interrupted (with --json: one JSON document a line, each
        /// time something changed).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Pass the current pause or approval gate.
    Promote {
        service: String,
        /// Skip the remaining steps: straight to 100%.
        #[arg(long)]
        full: bool,
        /// Promote although analysis failed at the current stage and has not passed since.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Stop the rollout now: all traffic back to stable, candidate stopped.
    Abort(ServiceArg),
    /// After a promotion: return to the previous version.
    Rollback(ServiceArg),
    /// Hold the rollout where it is (analysis keeps judging).
    Pause(ServiceArg),
    /// Continue a paused rollout.
    Resume(ServiceArg),
    /// Past rollouts with outcome, reason and timings.
    History {
        service: Option<String>,
        /// How many rollouts to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the values of each rollout's `--env` variables (shown as *** otherwise).
        #[arg(long)]
        show_env: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// A self-contained tour on free ports in a temporary directory.
    Demo {
        /// Leave the daemon and dashboard running afterwards.
        #[arg(long)]
        keep: bool,
        /// Run the demo's instances as processes, or as containers on the local Docker Engine
        /// (from an image built offline from this executable).
        #[arg(long, value_enum, default_value_t = DemoRuntime::Process)]
        runtime: DemoRuntime,
    },
    /// The sample upstream used by the demo and tests.
    DemoApp(DemoAppArgs),
    /// SLOs: objective, SLI now, error budget left, burn rates and which alerts hold.
    Slo {
        service: Option<String>,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Pending and firing alerts, and how each receiver is doing.
    Alerts(ReadOpts),
    /// DORA's four keys from cutover's history: deployment frequency, lead time for changes,
    /// change failure rate (per deployment) and time to restore.
    Dora {
        service: Option<String>,
        /// The period: 30d, 12h, 2w.
        #[arg(long, default_value = "30d")]
        since: String,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Write something cutover knows in another tool's format.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Print a shell completion script, e.g. `cutover completions bash > ~/.local/share/bash-completion/completions/cutover`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the output of a service's instances, from the files in the state dir.
    Logs(LogsArgs),
    /// Faults injected into a service's requests or a dependency's connections; each ends by
    /// itself (`--for`).
    #[command(subcommand)]
    Fault(FaultCommand),
    /// Chaos experiments: steady-state hypothesis, method, rollbacks.
    #[command(subcommand)]
    Chaos(ChaosCommand),
    /// Backups of the services' databases: take, list, verify, restore, prune ([backups]).
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Started by `up`: waits for the daemon to die, then kills what its instances left.
    #[command(name = "__keeper", hide = true)]
    Keeper { state_dir: PathBuf },
    /// Started by a `cpu-stress` action: a busy loop beside a process instance.
    #[command(name = "__burn", hide = true)]
    Burn { args: Vec<String> },
}

#[derive(Subcommand, Debug)]
pub enum FaultCommand {
    /// Inject a fault; prints its id.
    Add(FaultAddArgs),
    /// The faults set now.
    List(ReadOpts),
    /// Clear a service's or dependency's faults, one fault by id, or all.
    Clear {
        /// A service, a dependency, or a fault's id.
        #[arg(required_unless_present = "all")]
        target: Option<String>,
        #[arg(long, conflicts_with = "target")]
        all: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("effect").required(true).args(["latency", "error_rate", "reset_rate", "bandwidth", "blackhole"])))]
pub struct FaultAddArgs {
    /// A service or a dependency.
    pub service: String,
    /// Only requests to this version.
    #[arg(long, conflicts_with = "instance")]
    pub version: Option<String>,
    /// Only requests to this instance (as `status` names it).
    #[arg(long)]
    pub instance: Option<String>,
    /// How long it lasts (required), e.g. 5m: a forgotten fault cannot outlive its experiment.
    #[arg(long = "for", value_name = "DUR", required = true)]
    pub duration: String,
    /// Delay every request (or chunk, for a dependency) this long.
    #[arg(long, value_name = "DUR")]
    pub latency: Option<String>,
    /// With --latency: add up to this much more, at random.
    #[arg(long, value_name = "DUR", requires = "latency")]
    pub jitter: Option<String>,
    /// Answer this share of requests (0 to 1) with an error, without asking the instance.
    #[arg(long, value_name = "F")]
    pub error_rate: Option<f64>,
    /// With --error-rate: the status (default 500).
    #[arg(long, value_name = "N", requires = "error_rate")]
    pub status: Option<u16>,
    /// Reset this share (0 to 1) of client connections (of dependency chunks).
    #[arg(long, value_name = "F")]
    pub reset_rate: Option<f64>,
    /// Let answers flow at most this many bytes per second.
    #[arg(long, value_name = "BYTES/s")]
    pub bandwidth: Option<u64>,
    /// Accept requests and never answer them, until the fault ends.
    #[arg(long)]
    pub blackhole: bool,
    /// Print the fault as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ChaosCommand {
    /// Run an experiment file (cutover's TOML or Chaos Toolkit's JSON); exit 0 when the
    /// steady state held before and after, 1 when not.
    Run {
        file: PathBuf,
        /// Print what would be done; do nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Recent experiments, newest first, with their verdicts.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// One experiment's report: each probe before and after, each action, the verdict.
    Show {
        id: String,
        #[command(flatten)]
        read: ReadOpts,
    },
}

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// Recording and alerting rules for your own Prometheus (Sloth-style SLO rules over
    /// cutover's metrics, plus [[alerts.rules]]); they pass `promtool check rules`.
    PrometheusRules { service: Option<String> },
}

/// What `deploy` records for DORA, and the way through a budget freeze.
#[derive(Args, Debug, Default)]
pub struct DeploySignals {
    /// The commit being deployed (default: `git log -1` when run in a git repository).
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    /// When it was committed, RFC 3339 (default: from `git log -1`); the lead time runs from
    /// it to the promotion.
    #[arg(long, value_name = "RFC3339")]
    pub commit_time: Option<String>,
    /// This deployment fixes the failure of rollout ID: that rollout counts as failed.
    #[arg(long, value_name = "ROLLOUT")]
    pub fixes: Option<i64>,
    /// Deploy although an error budget is exhausted and [policy] freezes deploys; needs
    /// --reason, which is recorded with the rollout.
    #[arg(long, requires = "reason")]
    pub force: bool,
    #[arg(long, requires = "force", value_name = "TEXT")]
    pub reason: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// The snapshots of the state (one after every finished rollout, the last 10), newest
    /// first.
    List(ReadOpts),
    /// Replace the state database with a snapshot (the newest sound one unless named); the
    /// daemon must be stopped. The database it replaces is kept, renamed.
    Restore {
        /// A snapshot's name as `cutover state list` shows it, or its path.
        snapshot: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Take a backup of SERVICE's database now (checksummed, in the catalog).
    Create {
        service: String,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// The backups in the catalog, newest first: size, verification, what `keep` says of each.
    List {
        service: Option<String>,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Restore a backup into a scratch database and check it (the newest unless ID is given).
    Verify {
        service: String,
        id: Option<String>,
        #[command(flatten)]
        read: ReadOpts,
    },
    /// Restore backup ID into SERVICE's live database (replaces its content; needs --yes).
    Restore {
        service: String,
        id: String,
        /// Yes, replace the database's content with the backup's.
        #[arg(long)]
        yes: bool,
    },
    /// Delete the backups the `[backups] keep` policy does not keep.
    Prune {
        /// Say what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        read: ReadOpts,
    },
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub service: String,
    /// Only the instances of this version.
    #[arg(long)]
    pub version: Option<String>,
    /// Only this instance (as `status` names it).
    #[arg(long)]
    pub instance: Option<String>,
    /// Keep printing lines as they are written, across rotations and new instances.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the last lines of each instance to print first.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: usize,
}

/// A duration like `90s`, `5m` or `1h30m`.
fn duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e}; write it like 90s, 5m or 1h30m")),
    }
}

#[derive(Args, Debug, Clone, Copy, Default)]
pub struct ReadOpts {
    /// Print one JSON document on stdout, nothing else.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ServiceArg {
    pub service: String,
    #[command(flatten)]
    pub read: ReadOpts,
}

/// Where `cutover demo` runs its instances.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoRuntime {
    Process,
    Docker,
}

#[derive(Args, Debug)]
pub struct DemoAppArgs {
    #[arg(long, env = "PORT")]
    pub port: u16,
    /// The address to listen on (0.0.0.0 in a container, so its published port reaches it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    #[arg(long, env = "CUTOVER_VERSION", default_value = "v1")]
    pub version: String,
    /// Share of requests to `/` answered with 500 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Delay added to each request to `/`, e.g. 20ms.
    #[arg(long)]
    pub latency: Option<String>,
    /// Answer /healthz with 503.
    #[arg(long)]
    pub fail_health: bool,
}
