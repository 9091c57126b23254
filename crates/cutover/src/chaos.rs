//! Faults and chaos experiments: their wiring in the daemon (`start`) and their verbs
//! (`cutover fault add|list|clear`, `cutover chaos run`).
//!
//! `chaos run` reads and checks the experiment here, against this config (problems exit 2
//! with `file:line:col`), then hands it to the daemon, which runs it and persists every step;
//! this command only follows it. Ctrl-C asks the daemon to stop it: the rollbacks run anyway.

use std::path::Path;
use std::time::Duration;

use cutover_chaos::exec::{ProbeResult, StepResult};
use cutover_chaos::experiment::{
    Action, ActionKind, Activity, DependencyMode, Experiment, Known, Probe, ProbeKind,
};
use cutover_chaos::traffic::{Synthetic, spawn_probe, spawn_synthetic};
use cutover_chaos::{Chaos, FaultInfo, Faults, Report};
use cutover_config::Settings;
use cutover_controller::Controller;
use cutover_metrics::Metrics;
use cutover_proxy::Proxy;
use serde_json::json;

use crate::cli::{FaultAddArgs, FaultCommand};
use crate::client::Client;
use crate::exit::{CliError, CliResult, Code};
use crate::output::{err, out, out_raw};

/// What the daemon runs for faults, experiments, synthetic traffic and probes.
pub struct Running {
    pub chaos: Chaos,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the sweeper, synthetic traffic and probes (the daemon is stopping).
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the fault registry, finishes the rollbacks of experiments a previous daemon left
/// unfinished (before the API takes anything new), and starts synthetic traffic and probes.
pub async fn start(
    settings: &Settings,
    proxy: &Proxy,
    metrics: &Metrics,
    controller: &Controller,
) -> Running {
    let faults = Faults::new(
        proxy.clone(),
        metrics.clone(),
        controller.clone(),
        settings.services.iter().map(|s| s.name.clone()).collect(),
        settings
            .dependencies
            .iter()
            .map(|d| d.name.clone())
            .collect(),
    );
    let mut tasks = vec![faults.spawn_sweeper()];
    let chaos = Chaos::new(
        faults,
        controller.clone(),
        metrics.clone(),
        &settings.daemon.state_dir,
        settings
            .services
            .iter()
            .flat_map(|s| s.slos.iter().cloned())
            .collect(),
    );
    let resumed = chaos.recover().await;
    if resumed > 0 {
        err(format_args!(
            "cutover: ran the rollbacks of {resumed} experiment(s) the previous daemon left unfinished"
        ));
    }
    for s in &settings.services {
        let analysis = &s.rollout.analysis;
        if let Some(syn) = &s.synthetic
            && analysis.enabled
        {
            tasks.push(spawn_synthetic(
                controller.clone(),
                metrics.clone(),
                Synthetic {
                    service: s.name.clone(),
                    interval: analysis.interval,
                    min_requests: analysis.min_requests,
                    settings: syn.clone(),
                },
            ));
        }
        for p in &s.probes {
            tasks.push(spawn_probe(
                controller.clone(),
                metrics.clone(),
                s.name.clone(),
                s.listen,
                p.clone(),
            ));
        }
    }
    Running { chaos, tasks }
}

fn print_json(v: &impl serde::Serialize) -> CliResult {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::new(Code::Failure, format!("cannot encode JSON: {e}")))?;
    out(text)
}

/// `cutover fault add|list|clear`.
pub async fn fault(client: &Client, cmd: &FaultCommand) -> CliResult {
    match cmd {
        FaultCommand::Add(a) => add(client, a).await,
        FaultCommand::List(r) => {
            let v: serde_json::Value = client.get("/api/v1/faults").await?;
            if r.json {
                return print_json(&v);
            }
            let faults: Vec<FaultInfo> =
                serde_json::from_value(v["faults"].clone()).unwrap_or_default();
            if faults.is_empty() {
                return out("no faults");
            }
            let mut text = format!(
                "{:<8} {:<12} {:<22} {:<28} {}\n",
                "ID", "SERVICE", "TARGET", "EFFECT", "UNTIL"
            );
            for f in faults {
                text.push_str(&format!(
                    "{:<8} {:<12} {:<22} {:<28} {}{}\n",
                    f.id,
                    f.service,
                    f.target,
                    f.effect,
                    f.expires_at,
                    f.experiment
                        .map(|e| format!("  (experiment {e})"))
                        .unwrap_or_default()
                ));
            }
            out_raw(&text)
        }
        FaultCommand::Clear { target, all, read } => {
            let body = match (target, all) {
                (Some(t), false) => json!({ "target": t }),
                (None, true) => json!({ "all": true }),
                _ => {
                    return Err(CliError::new(
                        Code::Usage,
                        "name a service, a dependency or a fault id, or give --all",
                    ));
                }
            };
            let v: serde_json::Value = client.post("/api/v1/faults/clear", body).await?;
            if read.json {
                return print_json(&v);
            }
            let n = v["cleared"].as_array().map_or(0, Vec::len);
            out(format_args!("cleared {n} fault(s)"))
        }
    }
}

async fn add(client: &Client, a: &FaultAddArgs) -> CliResult {
    let body = json!({
        "service": a.service,
        "version": a.version,
        "instance": a.instance,
        "for": a.duration,
        "latency": a.latency,
        "jitter": a.jitter,
        "error_rate": a.error_rate,
        "status": a.status,
        "reset_rate": a.reset_rate,
        "bandwidth": a.bandwidth,
        "blackhole": a.blackhole,
    });
    let f: FaultInfo = client.post("/api/v1/faults", body).await?;
    if a.json {
        return print_json(&f);
    }
    out(&f.id)?;
    err(format_args!(
        "fault {}: {} on {} {} until {}; `cutover fault clear {}` ends it sooner",
        f.id, f.effect, f.service, f.target, f.expires_at, f.id
    ));
    Ok(())
}

/// `cutover chaos run FILE [--dry-run] [--json]`.
pub async fn run(
    settings: &Settings,
    client: Option<&Client>,
    file: &Path,
    dry_run: bool,
    json: bool,
) -> CliResult {
    let e = read(settings, file)?;
    if dry_run {
        if json {
            return print_json(&json!({ "dry_run": true, "experiment": e }));
        }
        return out_raw(&plan(&e));
    }
    let Some(client) = client else {
        return Err(CliError::new(Code::Unreachable, "no daemon to run it"));
    };
    let body = serde_json::to_value(&e).map_err(|err| {
        CliError::new(
            Code::Failure,
            format!("cannot encode the experiment: {err}"),
        )
    })?;
    let started: serde_json::Value = client.post("/api/v1/experiments", body).await?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    if !json {
        err(format_args!(
            "experiment {id} started: {} (Ctrl-C stops it; its rollbacks still run)",
            e.title
        ));
    }
    let path = format!("/api/v1/experiments/{id}");
    let mut shown = Shown::default();
    let mut stopping = false;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let report: Report = loop {
        let r: Report = client.get(&path).await?;
        if !json {
            shown.progress(&r)?;
        }
        if r.stage == "done" {
            break r;
        }
        let interrupted = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => false,
            _ = &mut ctrl_c => true,
        };
        if interrupted {
            ctrl_c.set(tokio::signal::ctrl_c());
            if stopping {
                return Err(CliError::new(
                    Code::Failure,
                    format!(
                        "left experiment {id} to the daemon, which finishes its rollbacks; its report is at GET {path}"
                    ),
                ));
            }
            stopping = true;
            err(
                "cutover: stopping the experiment; its rollbacks run now (Ctrl-C again leaves them to the daemon)",
            );
            let _: Report = client.post(&format!("{path}/stop"), json!({})).await?;
        }
    };
    if json {
        print_json(&report)?;
    } else {
        out_raw(&verdict(&report))?;
    }
    if report.ok {
        Ok(())
    } else {
        Err(CliError::new(
            Code::Failure,
            format!(
                "the steady state did not hold: {}",
                report.verdict.as_deref().unwrap_or("unknown")
            ),
        ))
    }
}

/// `cutover chaos list [--limit N] [--json]`.
pub async fn list(client: &Client, limit: usize, json: bool) -> CliResult {
    #[derive(serde::Deserialize, serde::Serialize)]
    struct List {
        experiments: Vec<Report>,
    }
    let l: List = client
        .get(&format!("/api/v1/experiments?limit={limit}"))
        .await?;
    if json {
        return print_json(&l);
    }
    if l.experiments.is_empty() {
        return out_raw("no experiments yet\n");
    }
    let mut t = String::new();
    for r in &l.experiments {
        let recovered = match (r.recovered, r.recovery_seconds) {
            (Some(true), Some(s)) => format!("recovered in {s:.1}s"),
            (Some(false), _) => "did not recover".to_owned(),
            _ => String::new(),
        };
        t.push_str(&format!(
            "{}  {}  {:<16} {}  {}\n",
            r.id,
            r.started_at,
            r.verdict.as_deref().unwrap_or(&r.stage),
            r.title,
            recovered
        ));
    }
    out_raw(&t)
}

/// `cutover chaos show ID [--json]`.
pub async fn show(client: &Client, id: &str, json: bool) -> CliResult {
    let r: Report = client.get(&format!("/api/v1/experiments/{id}")).await?;
    if json {
        return print_json(&r);
    }
    out_raw(&format!("experiment {}: {}\n", r.id, r.title))?;
    Shown::default().progress(&r)?;
    if r.stage == "done" {
        out_raw(&verdict(&r))
    } else {
        out_raw(&format!("still running: {}\n", r.stage))
    }
}

/// Reads and checks an experiment file against the config (exit 2 naming the place).
pub fn read(settings: &Settings, file: &Path) -> CliResult<Experiment> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::new(Code::Usage, format!("cannot read {}: {e}", file.display())))?;
    let known = Known {
        services: settings
            .services
            .iter()
            .map(|s| s.name.to_string())
            .collect(),
        dependencies: settings
            .dependencies
            .iter()
            .map(|d| d.name.to_string())
            .collect(),
        slos: settings
            .services
            .iter()
            .flat_map(|s| s.slos.iter().map(|o| (o.service.clone(), o.name.clone())))
            .collect(),
    };
    cutover_chaos::experiment::parse(&text, file, &known)
        .map_err(|p| CliError::new(Code::Usage, p.to_string()))
}

fn probe_text(p: &Probe) -> String {
    let what = match &p.kind {
        ProbeKind::ErrorRate {
            service,
            version,
            window,
        }
        | ProbeKind::P99 {
            service,
            version,
            window,
        } => format!(
            "{} of {service}{} over {}s",
            p.kind.name(),
            version
                .as_ref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            window.as_secs_f64()
        ),
        ProbeKind::SloBurnRate {
            service,
            slo,
            window,
        } => format!(
            "how fast {service}'s SLO {slo} burns its error budget over {}s (1 = exactly on budget)",
            window.as_secs_f64()
        ),
        ProbeKind::HealthyInstances { service, version } => format!(
            "healthy instances of {service}{}",
            version
                .as_ref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default()
        ),
        ProbeKind::Http { url, method, .. } => format!("{method} {url}"),
    };
    format!("{}: {what}, {}", p.name, p.tolerance.describe())
}

fn action_text(a: &Action) -> String {
    let ms = |d: &Duration| format!("{}ms", d.as_millis());
    let what = match &a.kind {
        ActionKind::KillInstance {
            service,
            version,
            count,
        } => format!(
            "SIGKILL {count} healthy instance(s) of {service} {}",
            version.as_deref().unwrap_or("(stable)")
        ),
        ActionKind::CpuStress {
            service,
            version,
            count,
            load,
            duration,
        } => format!(
            "take {:.0}% of a CPU from {count} healthy instance(s) of {service} {} for {} (a busy loop on the CPU a process is pinned to; a lower CPU limit for a container)",
            load * 100.0,
            version.as_deref().unwrap_or("(stable)"),
            ms(duration)
        ),
        ActionKind::ScalingShock {
            service,
            factor,
            min_rps,
            max_rps,
            concurrency,
            duration,
            ..
        } => format!(
            "send {service}'s current rate ×{} more through its listener (at least {min_rps} req/s, at most {max_rps}, {concurrency} in flight at most) for {}, beside the rest of the method",
            factor - 1.0,
            ms(duration)
        ),
        ActionKind::InjectLatency {
            service,
            version,
            latency,
            duration,
            ..
        } => format!(
            "add {} latency to {service}{} for {}",
            ms(latency),
            version
                .as_ref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            ms(duration)
        ),
        ActionKind::InjectErrors {
            service,
            version,
            rate,
            status,
            duration,
            ..
        } => format!(
            "answer {:.0}% of {service}{} requests {status} for {}",
            rate * 100.0,
            version
                .as_ref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            ms(duration)
        ),
        ActionKind::DependencyFailure {
            dependency,
            mode,
            duration,
        } => {
            let m = match mode {
                DependencyMode::Reset => "reset".to_owned(),
                DependencyMode::Blackhole => "blackhole".to_owned(),
                DependencyMode::Latency(l) => format!("slow by {}", ms(l)),
            };
            format!("{m} dependency {dependency} for {}", ms(duration))
        }
        ActionKind::DeploymentRollback {
            service,
            version,
            error_rate,
            within,
        } => format!(
            "deploy {service} {version} answering {:.0}% errors; pass if analysis rolls it back within {}s",
            error_rate * 100.0,
            within.as_secs()
        ),
        ActionKind::ClearFaults { service } => format!(
            "clear the experiment's faults{}",
            service
                .as_ref()
                .map(|s| format!(" on {s}"))
                .unwrap_or_default()
        ),
        ActionKind::AbortRollout { service } => format!("abort a rollout of {service} in progress"),
        ActionKind::Wait { duration } => format!("wait {}", ms(duration)),
    };
    let mut t = format!("{} ({}): {what}", a.name, a.kind.name());
    if !a.pause_before.is_zero() {
        t.push_str(&format!("; pause {} before", ms(&a.pause_before)));
    }
    if !a.pause_after.is_zero() {
        t.push_str(&format!("; pause {} after", ms(&a.pause_after)));
    }
    t
}

/// What `--dry-run` prints: what would be done, in order.
fn plan(e: &Experiment) -> String {
    let mut t = format!("experiment: {} (dry run: nothing is done)\n", e.title);
    let act = |a: &Activity| match a {
        Activity::Action(a) => action_text(a),
        Activity::Probe(p) => format!("probe {}", probe_text(p)),
    };
    t.push_str(
        "1. steady-state hypothesis, checked before (the experiment stops if it does not hold):\n",
    );
    for p in &e.hypothesis {
        t.push_str(&format!("   - {}\n", probe_text(p)));
    }
    t.push_str("2. method:\n");
    for a in &e.method {
        t.push_str(&format!("   - {}\n", act(a)));
    }
    t.push_str(&format!(
        "3. the hypothesis again, given {}s to hold (the recovery time is measured)\n",
        e.recovery_timeout.as_secs()
    ));
    t.push_str("4. rollbacks (always, also after Ctrl-C or a daemon crash), then every fault the experiment set is cleared:\n");
    for a in &e.rollbacks {
        t.push_str(&format!("   - {}\n", act(a)));
    }
    t
}

/// How much of the report has been printed.
#[derive(Default)]
struct Shown {
    before: usize,
    method: usize,
    after: usize,
    rollbacks: usize,
}

fn probe_line(p: &ProbeResult) -> String {
    format!(
        "  {} {}: {} (tolerance: {})\n",
        if p.ok { "ok  " } else { "FAIL" },
        p.name,
        p.detail,
        p.tolerance
    )
}

fn step_line(s: &StepResult) -> String {
    format!(
        "  {} {} ({}): {} [{:.1}s]\n",
        if s.ok { "ok  " } else { "FAIL" },
        s.name,
        s.kind,
        s.detail,
        s.took_ms as f64 / 1000.0
    )
}

impl Shown {
    fn progress(&mut self, r: &Report) -> CliResult {
        let mut t = String::new();
        let sections: [(&str, usize, &mut usize); 4] = [
            ("steady state before", r.before.len(), &mut self.before),
            ("method", r.method.len(), &mut self.method),
            ("steady state after", r.after.len(), &mut self.after),
            ("rollbacks", r.rollbacks.len(), &mut self.rollbacks),
        ];
        for (i, (title, len, seen)) in sections.into_iter().enumerate() {
            if len > *seen {
                if *seen == 0 {
                    t.push_str(&format!("{title}:\n"));
                }
                for n in *seen..len {
                    t.push_str(&match i {
                        0 => probe_line(&r.before[n]),
                        1 => step_line(&r.method[n]),
                        2 => probe_line(&r.after[n]),
                        _ => step_line(&r.rollbacks[n]),
                    });
                }
                *seen = len;
            }
        }
        if t.is_empty() {
            return Ok(());
        }
        out_raw(&t)
    }
}

fn verdict(r: &Report) -> String {
    let v = r.verdict.as_deref().unwrap_or("unknown");
    let why = match v {
        "held" => "the steady state held before and after".to_owned(),
        "not-held-before" => {
            "the steady state did not hold before the method: nothing was done".to_owned()
        }
        "deviated" => "the steady state did not hold after the method".to_owned(),
        "action-failed" => "an action of the method failed".to_owned(),
        "aborted" => "stopped before the end".to_owned(),
        "interrupted" => "the daemon restarted during it; its rollbacks ran at start".to_owned(),
        other => other.to_owned(),
    };
    let recovered = match (r.recovered, r.recovery_seconds) {
        (Some(true), Some(s)) => format!("; recovered in {s:.1}s"),
        (Some(false), _) => "; did not recover".to_owned(),
        _ => String::new(),
    };
    let mut t = String::new();
    for shock in &r.shocks {
        t.push_str(&format!(
            "scaling shock on {}: {}\n",
            shock.service,
            shock.describe()
        ));
    }
    let ended = if r.stresses_ended > 0 {
        format!(
            ", {} CPU stress(es) or shock(s) ended early",
            r.stresses_ended
        )
    } else {
        String::new()
    };
    t + &format!(
        "verdict: {v}: {why}{recovered}; {} fault(s) cleared at the end{ended}{}\n",
        r.faults_cleared,
        if r.resumed {
            " (by a restarted daemon)"
        } else {
            ""
        }
    )
}
