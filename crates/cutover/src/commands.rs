//! The CLI verbs that talk to a running daemon, plus `init` and `validate`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use cutover_api::wire::{History, Rollout, Service, Status};
use cutover_config::{RuntimeSettings, Settings};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::client::Client;
use crate::exit::{CliError, CliResult, Code};
use crate::render;

/// Prints a JSON document alone on stdout.
fn print_json(v: &impl serde::Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::new(Code::Failure, format!("cannot encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
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
    std::fs::create_dir_all(&dir).map_err(|e| {
        CliError::new(
            Code::Failure,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    println!(
        "wrote {} and {}/\nnext: `cutover validate`, then `cutover up`, then in another terminal `cutover deploy web v2 --wait`",
        config.display(),
        dir.display()
    );
    Ok(())
}

pub fn validate(settings: &Settings, json: bool) -> CliResult {
    if json {
        let services: Vec<serde_json::Value> = settings
            .services
            .iter()
            .map(|s| {
                let runtime = match &s.runtime {
                    RuntimeSettings::Process { command, .. } => json!({"kind": "process", "command": command}),
                    RuntimeSettings::Static { upstreams } => json!({
                        "kind": "static",
                        "upstreams": upstreams.iter().map(|(v, a)| (v.to_string(), a.iter().map(ToString::to_string).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>()
                    }),
                };
                json!({
                    "name": s.name.as_str(),
                    "listen": s.listen.to_string(),
                    "version": s.version.as_str(),
                    "strategy": s.rollout.strategy.as_str(),
                    "instances": s.rollout.instances,
                    "runtime": runtime,
                })
            })
            .collect();
        return print_json(&json!({
            "valid": true,
            "file": settings.file.display().to_string(),
            "api": settings.daemon.api.to_string(),
            "state_dir": settings.daemon.state_dir.display().to_string(),
            "services": services,
        }));
    }
    println!("{}: valid", settings.file.display());
    println!(
        "api and dashboard on http://{}/, state in {}",
        settings.daemon.api,
        settings.daemon.state_dir.display()
    );
    for s in &settings.services {
        let what = match &s.runtime {
            RuntimeSettings::Process { command, .. } => {
                format!("{} × `{}`", s.rollout.instances, command.join(" "))
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
        println!(
            "service {} on {}: {} {}, rollouts by {}",
            s.name, s.listen, s.version, what, s.rollout.strategy
        );
    }
    Ok(())
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

pub struct DeployArgs<'a> {
    pub service: &'a str,
    pub version: &'a str,
    pub env: &'a [String],
    pub strategy: Option<&'a str>,
    pub wait: bool,
    pub json: bool,
}

pub async fn deploy(client: &Client, a: DeployArgs<'_>) -> CliResult {
    let env = parse_env(a.env)?;
    let body = json!({"version": a.version, "env": env, "strategy": a.strategy});
    let r: Rollout = client
        .post(&format!("/api/v1/services/{}/deploy", a.service), body)
        .await?;
    if !a.wait {
        if a.json {
            return print_json(&r);
        }
        println!(
            "rollout #{} of {} {} → {} started ({}); follow it with `cutover status {} --watch`",
            r.id, r.service, r.from, r.to, r.strategy, r.service
        );
        return Ok(());
    }
    let done = follow(client, &r, a.json).await?;
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

/// Follows a rollout until it ends, printing its events (and a progress bar on a terminal).
async fn follow(client: &Client, r: &Rollout, quiet: bool) -> CliResult<Rollout> {
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
                None => eprintln!("{}", render::event_line(e)),
            }
        }
        if let Some(b) = &bar
            && let Ok(svc) = client
                .get::<Service>(&format!("/api/v1/services/{}", r.service))
                .await
        {
            b.set_position(u64::from(svc.weights.get(&r.to).copied().unwrap_or(0)));
            let step = match (svc.step, svc.steps) {
                (Some(i), Some(n)) => format!(" step {i}/{n}"),
                _ => String::new(),
            };
            b.set_message(format!("{}{step}", svc.phase));
        }
        if cur.outcome != "in-progress" {
            if let Some(b) = bar {
                b.finish_with_message(cur.outcome.clone());
            }
            if !quiet {
                eprintln!(
                    "rollout #{} {}{}",
                    cur.id,
                    cur.outcome,
                    cur.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
            }
            return Ok(cur);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn status(client: &Client, service: Option<&str>, watch: bool, json: bool) -> CliResult {
    if !watch {
        return status_once(client, service, json).await.map(|_| ());
    }
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let text = status_text(client, service).await?;
        if tty {
            // Clear and redraw in place, like `watch`.
            print!("\x1b[H\x1b[2J{text}");
            let _ = std::io::stdout().flush();
        } else if text != last {
            println!("{text}");
        }
        last = text;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
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
            println!("{}", render::service(s, 5));
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
    println!("{}: {} ({})", s.name, s.phase, last);
    Ok(())
}

pub async fn history(
    client: &Client,
    service: Option<&str>,
    limit: usize,
    json: bool,
) -> CliResult {
    let mut path = format!("/api/v1/history?limit={limit}");
    if let Some(s) = service {
        path.push_str(&format!("&service={s}"));
    }
    let h: History = client.get(&path).await?;
    if json {
        return print_json(&h);
    }
    print!("{}", render::history(&h.rollouts));
    Ok(())
}
