//! The CLI verbs that talk to a running daemon, plus `init` and `validate`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use cutover_api::wire::{History, Rollout, Service, Status};
use cutover_config::{RuntimeSettings, Settings};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::client::Client;
use crate::exit::{CliError, CliResult, Code};
use crate::output::{err, out, out_raw};
use crate::render;

/// Prints a JSON document alone on stdout.
pub(crate) fn print_json(v: &impl serde::Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::new(Code::Failure, format!("cannot encode JSON: {e}")))?;
    out(text)
}

pub fn init(config: &Path, force: bool) -> CliResult {
    if config.exists() && !force {
        return Err(CliError::new(
            Code::Usage,
            format!(
                "{} already exists; use `cutover init --force` to overwrite it",
                config.display()
            ),
        ));
    }
    std::fs::write(config, cutover_config::INIT_TEMPLATE).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot write {}: {e}", config.display()),
        )
    })?;
    let dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".cutover");
    // The state dir will hold `--env` values and the token: the owner's alone from the start.
    cutover_store::private_dir(&dir).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    out(format_args!(
        "wrote {} and {}/\nnext: `cutover validate`, then `cutover up`, then in another terminal `cutover deploy web v2 --wait`",
        config.display(),
        dir.display()
    ))
}

pub fn validate(settings: &Settings, json: bool) -> CliResult {
    // A docker service is only valid with an Engine that answers (exit 3 naming it).
    let engines = crate::containers::check_engines(settings)?;
    let engine_of = |d: &cutover_config::DockerSettings| {
        let host = crate::containers::host_of(d);
        let version = engines
            .get(&host)
            .map(|i| i.version.clone())
            .unwrap_or_default();
        (host, version)
    };
    crate::signals_cli::check_secrets(settings)?;
    // Valid, so not errors, but said on stderr (with --json too) where a person will see them.
    for w in &settings.warnings {
        err(format_args!("warning: {w}"));
    }
    if json {
        let services: Vec<serde_json::Value> = settings
            .services
            .iter()
            .map(|s| {
                let runtime = match &s.runtime {
                    RuntimeSettings::Process { command, .. } => json!({"kind": "process", "command": command}),
                    RuntimeSettings::Docker(d) => {
                        let (host, engine) = engine_of(d);
                        json!({
                            "kind": "docker",
                            "image": d.image,
                            "port": d.port,
                            "command": d.command,
                            "build": d.build.as_ref().map(|b| b.display().to_string()),
                            "host": host,
                            "engine_version": engine,
                        })
                    }
                    RuntimeSettings::Static { upstreams } => json!({
                        "kind": "static",
                        "upstreams": upstreams.iter().map(|(v, a)| (v.to_string(), a.iter().map(ToString::to_string).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>()
                    }),
                };
                json!({
                    "name": s.name.as_str(),
                    "listen": s.listen.to_string(),
                    "max_connections": s.max_connections,
                    "version": s.version.as_str(),
                    "strategy": s.rollout.strategy.as_str(),
                    "instances": s.rollout.instances,
                    "runtime": runtime,
                    "release": crate::backup::release_order(s),
                })
            })
            .collect();
        return print_json(&json!({
            "valid": true,
            "file": settings.file.display().to_string(),
            "api": settings.daemon.api.to_string(),
            "metrics": settings.daemon.metrics.map(|a| a.to_string()),
            "state_dir": settings.daemon.state_dir.display().to_string(),
            "services": services,
            "signals": crate::signals_cli::validate_json(settings),
            "warnings": settings.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }));
    }
    out(format_args!("{}: valid", settings.file.display()))?;
    out(format_args!(
        "api and dashboard on http://{}/, state in {}",
        settings.daemon.api,
        settings.daemon.state_dir.display()
    ))?;
    if let Some(m) = settings.daemon.metrics {
        out(format_args!(
            "metrics for Prometheus on http://{m}/metrics (no token; nothing else served there)"
        ))?;
    }
    for s in &settings.services {
        let what = match &s.runtime {
            RuntimeSettings::Process { command, .. } => {
                format!("{} × `{}`", s.rollout.instances, command.join(" "))
            }
            RuntimeSettings::Docker(d) => {
                let (host, engine) = engine_of(d);
                format!(
                    "{} × container {} (port {}{}) on Docker Engine {engine} at {host}",
                    s.rollout.instances,
                    d.image,
                    d.port,
                    d.build
                        .as_ref()
                        .map(|b| format!(", built from {} when missing", b.display()))
                        .unwrap_or_default()
                )
            }
            RuntimeSettings::Static { upstreams } => format!(
                "static upstreams: {}",
                upstreams
                    .iter()
                    .map(|(v, a)| format!(
                        "{v}={}",
                        a.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    ))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        };
        out(format_args!(
            "service {} on {}: {} {}, rollouts by {}",
            s.name, s.listen, s.version, what, s.rollout.strategy
        ))?;
        if let Some(order) = crate::backup::release_order(s) {
            out(format_args!("  each rollout: {order}"))?;
        }
    }
    if settings
        .services
        .iter()
        .any(|s| s.safety.database.is_some())
    {
        out(format_args!(
            "backups in {}{}",
            settings.backups.dir.display(),
            settings
                .backups
                .every
                .map(|e| format!(
                    ", one every {} (verified, then pruned)",
                    humantime::format_duration(e)
                ))
                .unwrap_or_default()
        ))?;
    }
    crate::signals_cli::validate_text(settings)
}

fn parse_env(pairs: &[String]) -> CliResult<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CliError::new(
                Code::Usage,
                format!("--env {p:?} is not KEY=VAL"),
            )),
        })
        .collect()
}

/// Reads `--env-file` (see `cutover_config::read_env_file`); a problem is a usage error.
pub fn parse_env_file(path: &Path) -> CliResult<BTreeMap<String, String>> {
    cutover_config::read_env_file(path).map_err(|e| CliError::new(Code::Usage, e))
}

pub struct DeployArgs<'a> {
    pub service: &'a str,
    pub version: &'a str,
    pub env: &'a [String],
    pub env_file: Option<&'a Path>,
    pub strategy: Option<&'a str>,
    pub wait: bool,
    /// With `wait`: how long to wait at most.
    pub timeout: Option<Duration>,
    pub json: bool,
    /// DORA and the budget freeze (docs/reference.md §12).
    pub commit: Option<&'a str>,
    pub commit_time: Option<&'a str>,
    pub fixes: Option<i64>,
    pub force: bool,
    pub reason: Option<&'a str>,
}

pub async fn deploy(client: &Client, a: DeployArgs<'_>) -> CliResult {
    // The daemon applies the same rule; checking here makes a typo a usage error (exit 2)
    // before anything is read or sent.
    cutover_core::Version::parse(a.version.trim())
        .map_err(|e| CliError::new(Code::Usage, e.to_string()))?;
    // The file first, so that `--env` overrides it (docs/reference.md).
    let mut env = match a.env_file {
        Some(p) => parse_env_file(p)?,
        None => BTreeMap::new(),
    };
    env.extend(parse_env(a.env)?);
    let mut body = json!({"version": a.version, "env": env, "strategy": a.strategy});
    // The commit for DORA's lead time: as given, else the repository's HEAD when run in one.
    let (commit, commit_time) = match (a.commit, a.commit_time) {
        (None, None) => match crate::signals_cli::git_head() {
            Some((sha, t)) => (Some(sha), Some(t)),
            None => (None, None),
        },
        (c, t) => (c.map(str::to_owned), t.map(str::to_owned)),
    };
    if let Some(t) = &commit_time {
        crate::signals_cli::check_commit_time(t)?;
    }
    body["commit"] = json!(commit);
    body["commit_time"] = json!(commit_time);
    body["fixes"] = json!(a.fixes);
    body["force"] = json!(a.force);
    body["reason"] = json!(a.reason);
    let mut r: Rollout = client
        .post(&format!("/api/v1/services/{}/deploy", a.service), body)
        .await?;
    // The caller typed the values; they still do not belong in a CI log.
    redact_env(&mut r);
    if !a.wait {
        if a.json {
            return print_json(&r);
        }
        return out(format_args!(
            "rollout #{} of {} {} → {} started ({}); follow it with `cutover status {} --watch`",
            r.id, r.service, r.from, r.to, r.strategy, r.service
        ));
    }
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + t);
    let done = match follow(client, &r, a.json, deadline).await? {
        Followed::Ended(mut done) => {
            redact_env(&mut done);
            done
        }
        Followed::StillRunning(mut cur, svc) => {
            redact_env(&mut cur);
            if a.json {
                print_json(&cur)?;
            }
            let at = svc
                .map(|s| {
                    let step = match (s.step, s.steps) {
                        (Some(i), Some(n)) => format!(", step {i}/{n}"),
                        _ => String::new(),
                    };
                    let weight = s.weights.get(&cur.to).copied().unwrap_or(0);
                    format!(" ({}{step}, {} at {weight}%)", s.phase, cur.to)
                })
                .unwrap_or_default();
            return Err(CliError::new(
                Code::Failure,
                format!(
                    "gave up waiting after {}: rollout #{} of {} to {} is still running{at}; follow it with `cutover status {} --watch` (or stop it with `cutover abort {}`)",
                    humantime::format_duration(a.timeout.unwrap_or_default()),
                    cur.id,
                    cur.service,
                    cur.to,
                    cur.service,
                    cur.service
                ),
            ));
        }
    };
    if a.json {
        print_json(&done)?;
    }
    if done.outcome == "promoted" {
        Ok(())
    } else {
        Err(CliError::new(
            Code::Failure,
            format!(
                "rollout #{} ended {}: {}",
                done.id,
                done.outcome,
                done.reason.as_deref().unwrap_or("no reason recorded")
            ),
        ))
    }
}

enum Followed {
    Ended(Rollout),
    /// The deadline came first: the rollout as last seen, and its service if it was read.
    StillRunning(Rollout, Option<Box<Service>>),
}

/// Follows a rollout until it ends or `deadline` passes, printing its events (and a progress
/// bar on a terminal).
async fn follow(
    client: &Client,
    r: &Rollout,
    quiet: bool,
    deadline: Option<tokio::time::Instant>,
) -> CliResult<Followed> {
    let tty = std::io::stderr().is_terminal() && !quiet;
    let bar = if tty {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("█▉ "),
        );
        b.set_prefix(format!("#{} {} → {}", r.id, r.from, r.to));
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    let mut seen = 0i64;
    let mut last_service = None;
    loop {
        let cur: Rollout = client.get(&format!("/api/v1/rollouts/{}", r.id)).await?;
        let last = seen;
        for e in cur.events.iter().filter(|e| e.id > last) {
            seen = seen.max(e.id);
            if quiet {
                continue;
            }
            match &bar {
                Some(b) => b.println(render::event_line(e)),
                None => err(render::event_line(e)),
            }
        }
        let out_of_time = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        if (bar.is_some() || out_of_time)
            && let Ok(svc) = client
                .get::<Service>(&format!("/api/v1/services/{}", r.service))
                .await
        {
            if let Some(b) = &bar {
                b.set_position(u64::from(svc.weights.get(&r.to).copied().unwrap_or(0)));
                let step = match (svc.step, svc.steps) {
                    (Some(i), Some(n)) => format!(" step {i}/{n}"),
                    _ => String::new(),
                };
                b.set_message(format!("{}{step}", svc.phase));
            }
            last_service = Some(Box::new(svc));
        }
        if cur.outcome != "in-progress" {
            if let Some(b) = bar {
                b.finish_with_message(cur.outcome.clone());
            }
            if !quiet {
                err(format_args!(
                    "rollout #{} {}{}",
                    cur.id,
                    cur.outcome,
                    cur.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ));
            }
            return Ok(Followed::Ended(cur));
        }
        if out_of_time {
            if let Some(b) = bar {
                b.abandon_with_message("still running");
            }
            return Ok(Followed::StillRunning(cur, last_service));
        }
        let pause = tokio::time::sleep(Duration::from_millis(250));
        match deadline {
            Some(d) => {
                tokio::select! {
                    _ = pause => {}
                    _ = tokio::time::sleep_until(d) => {}
                }
            }
            None => pause.await,
        }
    }
}

pub async fn status(client: &Client, service: Option<&str>, watch: bool, json: bool) -> CliResult {
    if !watch {
        return status_once(client, service, json).await.map(|_| ());
    }
    let tty = std::io::stdout().is_terminal() && !json;
    let mut last = String::new();
    let closed = crate::output::stdout_closed();
    tokio::pin!(closed);
    loop {
        let text = if json {
            // One JSON document a line (NDJSON), each time something changed.
            let services = fetch_services(client, service).await?;
            let v = match service {
                Some(_) => serde_json::to_string(&services[0]),
                None => serde_json::to_string(&Status { services }),
            };
            v.map_err(|e| CliError::new(Code::Failure, format!("cannot encode: {e}")))?
        } else {
            status_text(client, service).await?
        };
        if tty {
            // Clear and redraw in place, like `watch`.
            out_raw(&format!("\x1b[H\x1b[2J{text}"))?;
        } else if text != last {
            out(&text)?;
        }
        last = text;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            // `| head` has what it wanted: stop now, not at the next change.
            _ = &mut closed => return Ok(()),
        }
    }
}

async fn fetch_services(client: &Client, service: Option<&str>) -> CliResult<Vec<Service>> {
    Ok(match service {
        Some(s) => vec![
            client
                .get::<Service>(&format!("/api/v1/services/{s}"))
                .await?,
        ],
        None => client.get::<Status>("/api/v1/status").await?.services,
    })
}

async fn status_text(client: &Client, service: Option<&str>) -> CliResult<String> {
    let services = fetch_services(client, service).await?;
    Ok(services
        .iter()
        .map(|s| render::service(s, 8))
        .collect::<Vec<_>>()
        .join("\n"))
}

async fn status_once(
    client: &Client,
    service: Option<&str>,
    json: bool,
) -> CliResult<Vec<Service>> {
    let services = fetch_services(client, service).await?;
    if json {
        match service {
            Some(_) => print_json(&services[0])?,
            None => print_json(&Status {
                services: services.clone(),
            })?,
        }
    } else {
        for s in &services {
            out(render::service(s, 5))?;
        }
    }
    Ok(services)
}

pub async fn act(
    client: &Client,
    service: &str,
    verb: &str,
    body: serde_json::Value,
    json: bool,
) -> CliResult {
    let s: Service = client
        .post(&format!("/api/v1/services/{service}/{verb}"), body)
        .await?;
    if json {
        return print_json(&s);
    }
    let last = s
        .events
        .first()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    out(format_args!("{}: {} ({})", s.name, s.phase, last))
}

pub async fn history(
    client: &Client,
    service: Option<&str>,
    limit: usize,
    show_env: bool,
    json: bool,
) -> CliResult {
    let mut path = format!("/api/v1/history?limit={limit}");
    if let Some(s) = service {
        path.push_str(&format!("&service={s}"));
    }
    let mut h: History = client.get(&path).await?;
    if !show_env {
        h.rollouts.iter_mut().for_each(redact_env);
    }
    if json {
        return print_json(&h);
    }
    out_raw(&render::history(&h.rollouts))
}

/// What `--env` values print as unless asked for (`history --show-env`): they are often
/// secrets, and history output ends up in terminals' scrollback, CI logs and tickets. The
/// names stay, so what was set is still visible.
pub const HIDDEN: &str = "***";

fn redact_env(r: &mut Rollout) {
    r.env.values_mut().for_each(|v| *v = HIDDEN.to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(
            &path,
            "# a comment\n\nA=1\nexport B = two words \nC=\"quoted # kept\"\nD='single'\nE=\nF=a=b#c\n",
        )
        .unwrap();
        let env = parse_env_file(&path).unwrap();
        let want: BTreeMap<String, String> = [
            ("A", "1"),
            ("B", "two words"),
            ("C", "quoted # kept"),
            ("D", "single"),
            ("E", ""),
            ("F", "a=b#c"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, want);

        for (text, line) in [("A=1\nhunter2\n", ":2:"), ("1X=hunter2\n", ":1:")] {
            std::fs::write(&path, text).unwrap();
            let e = parse_env_file(&path).unwrap_err();
            assert_eq!(e.code, Code::Usage);
            assert!(e.message.contains(line), "{}", e.message);
            assert!(
                !e.message.contains("hunter2"),
                "a value leaked: {}",
                e.message
            );
        }
        let e = parse_env_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.code, Code::Usage);
    }
}
