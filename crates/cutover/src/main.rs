//! The cutover binary: parses arguments, loads settings and wires the parts together.
//!
//! Wiring only: every decision lives in a library crate (controller, judge, proxy). This crate
//! owns the command line, exit codes, terminal output and the demo tour.

// Terminal output goes through `output`, which survives a closed stdout (`| head`) where
// `println!` panics; clippy keeps it that way for every command added later.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod backup;
mod chaos;
mod cli;
mod client;
mod commands;
mod containers;
mod daemon;
mod demo;
mod exit;
mod handover;
mod limits;
mod logs;
mod notify;
mod output;
mod render;
mod series;
mod signals;
mod signals_cli;
mod state;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use serde_json::json;

use crate::cli::{Cli, Command};
use crate::client::Client;
use crate::exit::{CliError, CliResult, Code};

/// The proxy allocates a little for every request (header maps, channel slots, buffers);
/// mimalloc took about 2.5k of 35.5k user-space instructions off each proxied request compared
/// with glibc's malloc (ARCHITECTURE.md, "Proxy speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Up { upgrade: false, .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout has gone (`| head`): it has what it wanted.
        Err(e) if e.code == Code::Closed => ExitCode::SUCCESS,
        Err(e) => {
            output::err(format_args!("cutover: {e}"));
            ExitCode::from(e.code as u8)
        }
    }
}

fn load(cli: &Cli) -> CliResult<cutover_config::Settings> {
    cutover_config::load(&cli.config).map_err(|e| CliError::new(Code::Usage, e.to_string()))
}

/// Builds a tokio runtime, or says in one sentence why it could not.
pub(crate) fn runtime(mut builder: tokio::runtime::Builder) -> CliResult<tokio::runtime::Runtime> {
    builder.enable_all().build().map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot start the async runtime: {e}"),
        )
    })
}

/// A small runtime for commands that talk to the daemon.
fn block_on<F: std::future::Future<Output = CliResult>>(f: F) -> CliResult {
    runtime(tokio::runtime::Builder::new_current_thread())?.block_on(f)
}

fn run(cli: Cli) -> CliResult {
    match &cli.command {
        Command::Init { force } => commands::init(&cli.config, *force),
        Command::Validate(r) => commands::validate(&load(&cli)?, r.json),
        Command::Up {
            upgrade: false,
            reset_state,
        } => daemon::up(load(&cli)?, *reset_state),
        Command::Up { upgrade: true, .. } => handover::ask(&load(&cli)?, handover::Ask::Upgrade),
        Command::State(cli::StateCommand::List(r)) => state::list(&load(&cli)?, r.json),
        Command::State(cli::StateCommand::Restore { snapshot }) => {
            state::restore(&load(&cli)?, snapshot.as_deref())
        }
        Command::Reload => handover::ask(&load(&cli)?, handover::Ask::Reload),
        Command::DemoApp(a) => demo::demo_app(a),
        Command::Logs(a) => logs::run(&load(&cli)?, a),
        Command::Backup(b) => backup::run(&load(&cli)?, b),
        Command::Keeper { state_dir } => {
            let swept = cutover_runtime::keeper_main(state_dir)
                .map_err(|e| CliError::new(Code::Failure, format!("keeper: {e}")))?;
            if swept.processes > 0 {
                output::err(format_args!(
                    "cutover: the daemon is gone; its keeper killed {} leftover instance process(es)",
                    swept.processes
                ));
            }
            Ok(())
        }
        Command::Burn { args } => cutover_runtime::stress::burn_main(args)
            .map_err(|e| CliError::new(Code::Usage, format!("cutover __burn: {e}"))),
        Command::Demo { keep, runtime } => demo::run(*keep, *runtime),
        Command::Fault(f) => {
            let client = Client::new(&load(&cli)?)?;
            block_on(chaos::fault(&client, f))
        }
        Command::Chaos(cli::ChaosCommand::Run {
            file,
            dry_run,
            read,
        }) => {
            let settings = load(&cli)?;
            // A dry run needs no daemon.
            let client = if *dry_run {
                None
            } else {
                Some(Client::new(&settings)?)
            };
            block_on(chaos::run(
                &settings,
                client.as_ref(),
                file,
                *dry_run,
                read.json,
            ))
        }
        Command::Chaos(cli::ChaosCommand::List { limit, read }) => {
            let client = Client::new(&load(&cli)?)?;
            block_on(chaos::list(&client, *limit, read.json))
        }
        Command::Chaos(cli::ChaosCommand::Show { id, read }) => {
            let client = Client::new(&load(&cli)?)?;
            block_on(chaos::show(&client, id, read.json))
        }
        Command::Completions { shell } => {
            // Into a buffer first: the generator panics if its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "cutover", &mut script);
            output::out_raw(&String::from_utf8_lossy(&script))
        }
        Command::Deploy {
            service,
            version,
            env,
            env_file,
            strategy,
            wait,
            timeout,
            read,
            signals,
        } => {
            let client = Client::new(&load(&cli)?)?;
            block_on(commands::deploy(
                &client,
                commands::DeployArgs {
                    service,
                    version,
                    env,
                    env_file: env_file.as_deref(),
                    strategy: strategy.as_deref(),
                    wait: *wait,
                    timeout: *timeout,
                    json: read.json,
                    commit: signals.commit.as_deref(),
                    commit_time: signals.commit_time.as_deref(),
                    fixes: signals.fixes,
                    force: signals.force,
                    reason: signals.reason.as_deref(),
                },
            ))
        }
        Command::Slo { service, read } => {
            let client = Client::new(&load(&cli)?)?;
            block_on(signals_cli::slo(&client, service.as_deref(), read.json))
        }
        Command::Alerts(read) => {
            let client = Client::new(&load(&cli)?)?;
            block_on(signals_cli::alerts(&client, read.json))
        }
        Command::Dora {
            service,
            since,
            read,
        } => {
            let client = Client::new(&load(&cli)?)?;
            block_on(signals_cli::dora(
                &client,
                service.as_deref(),
                since,
                read.json,
            ))
        }
        Command::Export(cli::ExportCommand::PrometheusRules { service }) => {
            signals_cli::export_rules(&load(&cli)?, service.as_deref())
        }
        Command::Status {
            service,
            watch,
            read,
        } => {
            let client = Client::new(&load(&cli)?)?;
            block_on(commands::status(
                &client,
                service.as_deref(),
                *watch,
                read.json,
            ))
        }
        Command::Promote {
            service,
            full,
            force,
            read,
        } => {
            let client = Client::new(&load(&cli)?)?;
            block_on(commands::act(
                &client,
                service,
                "promote",
                json!({"full": full, "force": force}),
                read.json,
            ))
        }
        Command::Abort(a) | Command::Rollback(a) | Command::Pause(a) | Command::Resume(a) => {
            let verb = match &cli.command {
                Command::Abort(_) => "abort",
                Command::Rollback(_) => "rollback",
                Command::Pause(_) => "pause",
                _ => "resume",
            };
            let client = Client::new(&load(&cli)?)?;
            block_on(commands::act(
                &client,
                &a.service,
                verb,
                json!({}),
                a.read.json,
            ))
        }
        Command::History {
            service,
            limit,
            show_env,
            read,
        } => {
            let client = Client::new(&load(&cli)?)?;
            block_on(commands::history(
                &client,
                service.as_deref(),
                *limit,
                *show_env,
                read.json,
            ))
        }
    }
}
