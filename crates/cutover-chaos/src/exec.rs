//! The daemon's side of experiments: runs them, step by step as [`crate::runner`] decides,
//! persisting each run after every step (`state_dir/chaos/<id>.json`) so that a restarted
//! daemon finishes the rollbacks of a run its predecessor left unfinished before anything
//! else ([`Chaos::recover`]).
//!
//! This is the IO edge: probes read the metrics, the controller's views and HTTP answers;
//! actions go through the fault registry, the controller (deploy, abort) and, for
//! `kill-instance` and `cpu-stress`, the instance's runtime (`Controller::disturb`); scaling
//! shocks are tasks of the daemon's that send through the service's listener.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_controller::{Action as Act, Controller, DeployRequest};
use cutover_core::{
    EventKind, Health, InstanceId, LatencyDist, RolloutOutcome, ServiceName, Version,
};
use cutover_metrics::Metrics;
use cutover_runtime::Disturbance;
use cutover_signals::slo::SloSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::experiment::{
    Action, ActionKind, Activity, DependencyMode, Experiment, Probe, ProbeKind, Target, Tolerance,
};
use crate::faults::{Clear, FaultRequest, Faults, rfc3339, wall_now};
use crate::runner::{self, Do, Input, Run, Shape, Stage, Verdict};
pub use crate::traffic::ShockResult;

/// How often a deployment-rollback looks at its rollout.
const POLL: Duration = Duration::from_millis(250);
/// How long a scaling shock measures the service's request rate before it multiplies it.
const SHOCK_SAMPLE: Duration = Duration::from_secs(2);

/// A probe's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub name: String,
    /// The number compared to the tolerance (error share, p99 in ms, instances, status).
    pub value: Option<f64>,
    /// The value in words, with its counts.
    pub detail: String,
    pub tolerance: String,
    pub ok: bool,
}

/// An action's (or a method probe's) result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub name: String,
    pub kind: String,
    pub ok: bool,
    pub detail: String,
    pub took_ms: u64,
}

/// What `chaos run` reports: each probe's numbers before, during (method probes) and after,
/// each action, the verdict, and whether (and how fast) the system recovered.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub title: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Where the run stands (`before`, `method`, `after`, `rollback`, `clearing`, `done`).
    pub stage: String,
    /// `held`, `not-held-before`, `deviated`, `action-failed`, `aborted`, `interrupted`;
    /// `None` while it runs.
    pub verdict: Option<String>,
    /// The hypothesis held before and after, and every action ran.
    pub ok: bool,
    pub before: Vec<ProbeResult>,
    pub method: Vec<StepResult>,
    pub after: Vec<ProbeResult>,
    pub rollbacks: Vec<StepResult>,
    /// The hypothesis held again after the method (within `recovery_timeout`).
    pub recovered: Option<bool>,
    /// From the method's end until the hypothesis held again.
    pub recovery_seconds: Option<f64>,
    pub faults_cleared: usize,
    /// CPU stresses and scaling shocks still running when it cleared, ended then.
    #[serde(default)]
    pub stresses_ended: usize,
    /// What each scaling shock sent and got back.
    #[serde(default)]
    pub shocks: Vec<ShockResult>,
    /// A restarted daemon finished this run's rollbacks.
    pub resumed: bool,
}

/// A run as persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub experiment: Experiment,
    pub run: Run,
    pub report: Report,
    /// Every CPU stress it started, ended when it clears.
    #[serde(default)]
    pub stressed: Vec<Stressed>,
}

/// A CPU stress an experiment started.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stressed {
    pub service: String,
    pub instance: String,
    /// When it ends by itself (Unix milliseconds).
    pub until_ms: u64,
}

impl Record {
    fn shape(&self) -> Shape {
        Shape {
            hypothesis: self.experiment.hypothesis.len(),
            method: self.experiment.method.len(),
            rollbacks: self.experiment.rollbacks.len(),
        }
    }
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Pending => "pending",
        Stage::Before(_) => "before",
        Stage::Method(_) => "method",
        Stage::After(_) => "after",
        Stage::Rollback(_) => "rollback",
        Stage::Clearing => "clearing",
        Stage::Done => "done",
    }
}

/// Why an experiment could not be started or found.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Io(String),
}

type Shocking = (watch::Sender<bool>, tokio::task::JoinHandle<()>);

struct Live {
    record: Arc<Mutex<Record>>,
    stop: watch::Sender<bool>,
}

/// The experiments' handle. Cheap to clone.
#[derive(Clone)]
pub struct Chaos {
    inner: Arc<Inner>,
}

struct Inner {
    faults: Faults,
    controller: Controller,
    metrics: Metrics,
    dir: PathBuf,
    runs: Mutex<BTreeMap<String, Live>>,
    /// The SLOs `slo-burn-rate` probes measure.
    slos: Vec<SloSpec>,
    /// Scaling shocks running beside an experiment's method, by experiment: the signal that
    /// stops one early, and its task.
    shocks: Mutex<BTreeMap<String, Vec<Shocking>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Chaos {
    /// `state_dir`: the daemon's; runs are kept in its `chaos/`. `slos`: every service's, for
    /// `slo-burn-rate` probes.
    pub fn new(
        faults: Faults,
        controller: Controller,
        metrics: Metrics,
        state_dir: &std::path::Path,
        slos: Vec<SloSpec>,
    ) -> Chaos {
        Chaos {
            inner: Arc::new(Inner {
                faults,
                controller,
                metrics,
                dir: state_dir.join("chaos"),
                runs: Mutex::new(BTreeMap::new()),
                slos,
                shocks: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    fn path(&self, id: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}.json"))
    }

    fn persist(&self, r: &Record) {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.inner.dir)?;
            let text = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
            let tmp = self.inner.dir.join(format!(".{}.tmp", r.report.id));
            std::fs::write(&tmp, text)?;
            // A rename is atomic: a crash leaves the old state or the new, never half of one.
            std::fs::rename(tmp, self.path(&r.report.id))
        };
        if let Err(e) = write() {
            tracing::error!(error = %e, id = %r.report.id, "could not save an experiment's state");
        }
    }

    /// Starts an experiment; its id. A second one while another runs is a conflict: two
    /// experiments' faults and rollbacks would mix.
    pub fn start(&self, experiment: Experiment) -> Result<String, ChaosError> {
        self.check(&experiment)?;
        let mut runs = lock(&self.inner.runs);
        if let Some((id, _)) = runs.iter().find(|(_, l)| !lock(&l.record).run.done()) {
            return Err(ChaosError::Conflict(format!(
                "experiment {id} is still running; wait for it or stop it first"
            )));
        }
        let id = format!("x{:06x}", rand::random::<u32>() & 0xff_ffff);
        let record = Record {
            report: Report {
                id: id.clone(),
                title: experiment.title.clone(),
                started_at: rfc3339(wall_now()),
                stage: "pending".into(),
                ..Report::default()
            },
            experiment,
            run: Run::new(),
            stressed: Vec::new(),
        };
        self.persist(&record);
        let record = Arc::new(Mutex::new(record));
        let (stop, stopped) = watch::channel(false);
        runs.insert(
            id.clone(),
            Live {
                record: record.clone(),
                stop,
            },
        );
        drop(runs);
        let me = self.clone();
        tokio::spawn(async move {
            me.drive(record, stopped, Input::Start).await;
        });
        Ok(id)
    }

    /// The services and dependencies an experiment names exist here (the CLI checked them
    /// against its config already; the daemon's may differ).
    fn check(&self, e: &Experiment) -> Result<(), ChaosError> {
        let services = self.inner.faults.services();
        let deps = self.inner.faults.dependencies();
        let known = |s: &str| services.iter().any(|k| k.as_str() == s);
        let mut names = Vec::new();
        for a in e.method.iter().chain(&e.rollbacks) {
            match a {
                Activity::Action(a) => match a.kind.target() {
                    Target::Service(s) => names.push(s.to_owned()),
                    Target::Dependency(d) => {
                        if !deps.iter().any(|k| k.as_str() == d) {
                            return Err(ChaosError::Invalid(format!(
                                "the daemon has no dependency named {d:?}"
                            )));
                        }
                    }
                    Target::Nothing => {}
                },
                Activity::Probe(p) => names.extend(probe_service(p)),
            }
        }
        names.extend(e.hypothesis.iter().filter_map(probe_service));
        match names.iter().find(|n| !known(n)) {
            Some(n) => Err(ChaosError::Invalid(format!(
                "the daemon has no service named {n:?}"
            ))),
            None => Ok(()),
        }
    }

    pub fn report(&self, id: &str) -> Result<Report, ChaosError> {
        if let Some(l) = lock(&self.inner.runs).get(id) {
            return Ok(lock(&l.record).report.clone());
        }
        // Runs of earlier daemons are read from their files.
        let text = std::fs::read(self.path(id))
            .map_err(|_| ChaosError::NotFound(format!("no experiment {id:?}")))?;
        serde_json::from_slice::<Record>(&text)
            .map(|r| r.report)
            .map_err(|e| ChaosError::Io(format!("experiment {id}: {e}")))
    }

    /// The newest `limit` runs, this daemon's and earlier ones', newest first.
    pub fn list(&self, limit: usize) -> Vec<Report> {
        let mut all: BTreeMap<String, Report> = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(&self.inner.dir) {
            for entry in dir.flatten() {
                let p = entry.path();
                if p.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                if let Ok(r) = std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_slice::<Record>(&t).map_err(|e| e.to_string()))
                {
                    all.insert(r.report.id.clone(), r.report);
                }
            }
        }
        // A live run's report is newer than its file between two steps.
        for (id, l) in lock(&self.inner.runs).iter() {
            all.insert(id.clone(), lock(&l.record).report.clone());
        }
        let mut v: Vec<Report> = all.into_values().collect();
        // RFC 3339 in UTC sorts as time.
        v.sort_by(|a, b| b.started_at.cmp(&a.started_at));
        v.truncate(limit);
        v
    }

    /// Asks a run to stop: it goes to its rollbacks at once.
    pub fn stop(&self, id: &str) -> Result<Report, ChaosError> {
        {
            let runs = lock(&self.inner.runs);
            let l = runs
                .get(id)
                .ok_or_else(|| ChaosError::NotFound(format!("no running experiment {id:?}")))?;
            let _ = l.stop.send(true);
        }
        self.report(id)
    }

    /// Finishes the runs a previous daemon left unfinished: their rollbacks, then clearing
    /// their faults. Called at start, before the API takes new experiments; returns once
    /// every one is done.
    pub async fn recover(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.inner.dir) else {
            return 0;
        };
        let mut found = Vec::new();
        for entry in dir.flatten() {
            let p = entry.path();
            if p.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(text) = std::fs::read(&p) else {
                continue;
            };
            match serde_json::from_slice::<Record>(&text) {
                Ok(r) if !r.run.done() => found.push(r),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "unreadable experiment state")
                }
            }
        }
        let n = found.len();
        for mut r in found {
            r.report.resumed = true;
            let id = r.report.id.clone();
            tracing::warn!(id = %id, "finishing the rollbacks of an experiment the previous daemon left unfinished");
            let record = Arc::new(Mutex::new(r));
            let (stop, stopped) = watch::channel(false);
            lock(&self.inner.runs).insert(
                id,
                Live {
                    record: record.clone(),
                    stop,
                },
            );
            self.drive(record, stopped, Input::Resumed).await;
        }
        n
    }

    async fn event(&self, record: &Arc<Mutex<Record>>, message: String) {
        let service = {
            let r = lock(record);
            first_service(&r.experiment)
        };
        let Some(service) = service else { return };
        let _ = self
            .inner
            .controller
            .record(&ServiceName::new(service), EventKind::Experiment, message)
            .await;
    }

    /// Runs the state machine from `first` to the end.
    async fn drive(
        &self,
        record: Arc<Mutex<Record>>,
        mut stopped: watch::Receiver<bool>,
        first: Input,
    ) {
        let (id, title) = {
            let r = lock(&record);
            (r.report.id.clone(), r.experiment.title.clone())
        };
        let mut input = first;
        let mut method_end: Option<Instant> = None;
        match first {
            Input::Resumed => {
                self.event(&record, format!("experiment {id} ({title}): the daemon restarted during it; running its rollbacks")).await;
            }
            _ => {
                self.event(&record, format!("experiment {id} started: {title}"))
                    .await;
            }
        }
        loop {
            let (run, todo) = {
                let mut r = lock(&record);
                let shape = r.shape();
                let (run, todo) = if input == Input::Resumed {
                    runner::resume(&shape, r.run)
                } else {
                    runner::step(&shape, r.run, input)
                };
                r.run = run;
                r.report.stage = stage_name(run.stage).to_owned();
                r.report.verdict = run.verdict.map(|v| v.as_str().to_owned());
                // Durable before it is done: a crash from here on resumes at this step.
                self.persist(&r);
                (run, todo)
            };
            let ok = match todo {
                Do::Nothing => break,
                Do::Finish(v) => {
                    self.finish(&record, v).await;
                    break;
                }
                Do::Probe(n) => {
                    let after = matches!(run.stage, Stage::After(_));
                    if after && n == 0 && method_end.is_none() {
                        method_end = Some(Instant::now());
                    }
                    let probe = lock(&record).experiment.hypothesis.get(n).cloned();
                    let Some(probe) = probe else { break };
                    let fut = self.hypothesis_probe(&record, probe, after, method_end);
                    match until_stopped(&mut stopped, fut).await {
                        Some(ok) => ok,
                        None => {
                            input = Input::Stop;
                            continue;
                        }
                    }
                }
                Do::Method(n) => {
                    let a = lock(&record).experiment.method.get(n).cloned();
                    let Some(a) = a else { break };
                    let fut = self.activity(&record, a);
                    match until_stopped(&mut stopped, fut).await {
                        Some(res) => {
                            let ok = res.ok;
                            self.event(
                                &record,
                                format!(
                                    "experiment {id}: {} {}: {}",
                                    res.kind,
                                    if ok { "done" } else { "FAILED" },
                                    res.detail
                                ),
                            )
                            .await;
                            lock(&record).report.method.push(res);
                            ok
                        }
                        None => {
                            input = Input::Stop;
                            continue;
                        }
                    }
                }
                Do::Rollback(n) => {
                    let a = lock(&record).experiment.rollbacks.get(n).cloned();
                    let Some(a) = a else { break };
                    // Rollbacks are not interrupted by a stop: they are what a stop asks for.
                    let res = self.activity(&record, a).await;
                    self.event(
                        &record,
                        format!("experiment {id}: rollback {}: {}", res.kind, res.detail),
                    )
                    .await;
                    let ok = res.ok;
                    lock(&record).report.rollbacks.push(res);
                    ok
                }
                Do::ClearFaults => {
                    let cleared = self
                        .inner
                        .faults
                        .clear(&Clear::Experiment(id.clone()))
                        .await
                        .map(|c| c.len())
                        .unwrap_or(0);
                    let calmed = self.calm(&record).await;
                    let mut r = lock(&record);
                    r.report.faults_cleared += cleared;
                    r.report.stresses_ended += calmed;
                    true
                }
            };
            input = if *stopped.borrow()
                && !matches!(run.stage, Stage::Rollback(_) | Stage::Clearing)
            {
                Input::Stop
            } else {
                Input::Result { ok }
            };
        }
    }

    async fn finish(&self, record: &Arc<Mutex<Record>>, v: Verdict) {
        let (id, msg) = {
            let mut r = lock(record);
            r.report.finished_at = Some(rfc3339(wall_now()));
            r.report.verdict = Some(v.as_str().to_owned());
            r.report.ok = v.ok();
            r.report.stage = "done".into();
            if r.report.recovered.is_none() && v == Verdict::Deviated {
                r.report.recovered = Some(false);
            }
            self.persist(&r);
            (
                r.report.id.clone(),
                format!(
                    "experiment {} ended: {} ({} fault(s) cleared)",
                    r.report.id,
                    v.as_str(),
                    r.report.faults_cleared
                ),
            )
        };
        tracing::info!(id = %id, verdict = v.as_str(), "experiment ended");
        self.event(record, msg).await;
    }

    /// A hypothesis probe. After the method, a probe that does not hold is asked again until
    /// it does or `recovery_timeout` has passed since the method ended: how fast the system
    /// recovered is measured so.
    async fn hypothesis_probe(
        &self,
        record: &Arc<Mutex<Record>>,
        probe: Probe,
        after: bool,
        method_end: Option<Instant>,
    ) -> bool {
        let timeout = lock(record).experiment.recovery_timeout;
        loop {
            let res = self.probe(&probe).await;
            let ok = res.ok;
            let end = method_end.unwrap_or_else(Instant::now);
            let give_up = !after || ok || end.elapsed() >= timeout;
            if give_up {
                let mut r = lock(record);
                if after {
                    r.report.after.push(res);
                    let all = r.report.after.len() == r.experiment.hypothesis.len();
                    if !ok {
                        r.report.recovered = Some(false);
                    } else if all && r.report.recovered.is_none() {
                        r.report.recovered = Some(true);
                        r.report.recovery_seconds = Some(end.elapsed().as_secs_f64());
                    }
                } else {
                    r.report.before.push(res);
                }
                return ok;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs a method or rollback activity.
    async fn activity(&self, record: &Arc<Mutex<Record>>, a: Activity) -> StepResult {
        let started = Instant::now();
        let (name, kind, r) = match a {
            Activity::Probe(p) => {
                // Taken during the method for its numbers; it does not fail the method.
                let res = self.probe(&p).await;
                let detail = format!(
                    "{} ({}; tolerance {})",
                    res.detail,
                    if res.ok { "within" } else { "outside" },
                    res.tolerance
                );
                (p.name.clone(), p.kind.name().to_owned(), Ok(detail))
            }
            Activity::Action(a) => {
                if !a.pause_before.is_zero() {
                    tokio::time::sleep(a.pause_before).await;
                }
                let r = self.action(record, &a).await;
                if !a.pause_after.is_zero() {
                    tokio::time::sleep(a.pause_after).await;
                }
                (a.name.clone(), a.kind.name().to_owned(), r)
            }
        };
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        StepResult {
            name,
            kind,
            ok,
            detail,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    async fn action(&self, record: &Arc<Mutex<Record>>, a: &Action) -> Result<String, String> {
        let id = lock(record).report.id.clone();
        let id = id.as_str();
        let c = &self.inner.controller;
        let fault = |service: &str| FaultRequest {
            service: service.to_owned(),
            experiment: Some(id.to_owned()),
            ..FaultRequest::default()
        };
        let secs = |d: &Duration| format!("{}ms", d.as_millis());
        match &a.kind {
            ActionKind::KillInstance {
                service,
                version,
                count,
            } => {
                self.disturb_each(
                    record,
                    service,
                    version.as_deref(),
                    *count,
                    Disturbance::Kill,
                )
                .await
            }
            ActionKind::CpuStress {
                service,
                version,
                count,
                load,
                duration,
            } => {
                let how = Disturbance::CpuStress {
                    load: *load,
                    duration: *duration,
                };
                self.disturb_each(record, service, version.as_deref(), *count, how)
                    .await
            }
            kind @ ActionKind::ScalingShock { .. } => self.shock(record, kind).await,
            ActionKind::InjectLatency {
                service,
                version,
                instance,
                latency,
                jitter,
                duration,
            } => {
                let mut f = fault(service);
                f.version = version.clone();
                f.instance = instance.clone();
                f.latency = Some(secs(latency));
                f.jitter = (!jitter.is_zero()).then(|| secs(jitter));
                f.duration = Some(secs(duration));
                self.add_fault(&f).await
            }
            ActionKind::InjectErrors {
                service,
                version,
                instance,
                rate,
                status,
                duration,
            } => {
                let mut f = fault(service);
                f.version = version.clone();
                f.instance = instance.clone();
                f.error_rate = Some(*rate);
                f.status = Some(*status);
                f.duration = Some(secs(duration));
                self.add_fault(&f).await
            }
            ActionKind::DependencyFailure {
                dependency,
                mode,
                duration,
            } => {
                let mut f = fault(dependency);
                match mode {
                    DependencyMode::Reset => f.reset_rate = Some(1.0),
                    DependencyMode::Blackhole => f.blackhole = true,
                    DependencyMode::Latency(l) => f.latency = Some(secs(l)),
                }
                f.duration = Some(secs(duration));
                self.add_fault(&f).await
            }
            ActionKind::DeploymentRollback {
                service,
                version,
                error_rate,
                within,
            } => {
                self.deployment_rollback(id, service, version, *error_rate, *within)
                    .await
            }
            ActionKind::ClearFaults { service } => {
                let mine: Vec<String> = self
                    .inner
                    .faults
                    .list()
                    .into_iter()
                    .filter(|f| f.experiment.as_deref() == Some(id))
                    .filter(|f| service.as_ref().is_none_or(|s| *s == f.service))
                    .map(|f| f.id)
                    .collect();
                for fid in &mine {
                    let _ = self.inner.faults.clear(&Clear::Target(fid.clone())).await;
                }
                Ok(format!("{} fault(s) cleared", mine.len()))
            }
            ActionKind::AbortRollout { service } => {
                let v = c.service(service).await.map_err(|e| e.to_string())?;
                if v.candidate.is_none() {
                    return Ok(format!("{service} has no rollout in progress"));
                }
                c.act(service, Act::Abort, format!("experiment {id}"))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(format!("the rollout of {service} was aborted"))
            }
            ActionKind::Wait { duration } => {
                tokio::time::sleep(*duration).await;
                Ok(format!("waited {}", secs(duration)))
            }
        }
    }

    async fn add_fault(&self, f: &FaultRequest) -> Result<String, String> {
        self.inner
            .faults
            .add(f)
            .await
            .map(|i| {
                format!(
                    "fault {}: {} on {} {} until {}",
                    i.id, i.effect, i.service, i.target, i.expires_at
                )
            })
            .map_err(|e| e.to_string())
    }

    /// Up to `count` healthy instances of `version` (stable by default), as `(id, runs_as)`.
    async fn victims(
        &self,
        service: &str,
        version: Option<&str>,
        count: u32,
    ) -> Result<Vec<(InstanceId, String)>, String> {
        let v = self
            .inner
            .controller
            .service(service)
            .await
            .map_err(|e| e.to_string())?;
        let want = version.map_or(v.stable.clone(), Version::new);
        let victims: Vec<_> = v
            .instances
            .iter()
            .filter(|i| i.version == want && i.health == Health::Healthy)
            .take(count as usize)
            .map(|i| (i.id.clone(), i.runs_as.clone()))
            .collect();
        if victims.is_empty() {
            return Err(format!("{service} has no healthy instance of {want}"));
        }
        Ok(victims)
    }

    /// Has the runtime of `count` healthy instances of `version` (stable by default) do `how`
    /// to each: `Kill` is a SIGKILL to a process tree or a `docker kill` (the runtime sees an
    /// exit it did not ask for and restarts the instance, as after any crash); a CPU stress
    /// ends by itself and is written down so that the experiment's clearing ends it early.
    async fn disturb_each(
        &self,
        record: &Arc<Mutex<Record>>,
        service: &str,
        version: Option<&str>,
        count: u32,
        how: Disturbance,
    ) -> Result<String, String> {
        let mut done = Vec::new();
        for (id, _) in self.victims(service, version, count).await? {
            let d = self
                .inner
                .controller
                .disturb(service, &id, how)
                .await
                .map_err(|e| format!("{id}: {e}"))?;
            if let Disturbance::CpuStress { duration, .. } = how {
                let mut r = lock(record);
                let until = wall_now().plus(duration);
                r.stressed.push(Stressed {
                    service: service.to_owned(),
                    instance: id.to_string(),
                    until_ms: until.0,
                });
                // Durable before it matters: a crash from here on still calms it at restart.
                self.persist(&r);
            }
            done.push(d);
        }
        Ok(done.join("; "))
    }

    /// Starts a scaling shock beside the rest of the method; its numbers go to the report
    /// when it ends.
    async fn shock(
        &self,
        record: &Arc<Mutex<Record>>,
        kind: &ActionKind,
    ) -> Result<String, String> {
        let ActionKind::ScalingShock {
            service,
            factor,
            min_rps,
            max_rps,
            concurrency,
            paths,
            duration,
        } = kind
        else {
            return Err("not a scaling shock".into());
        };
        let c = &self.inner.controller;
        let v = c.service(service).await.map_err(|e| e.to_string())?;
        let name = ServiceName::new(service);
        let current = crate::traffic::user_rate(&self.inner.metrics, &name, SHOCK_SAMPLE).await;
        let rps = crate::traffic::shock_rate(current, *factor, *min_rps, *max_rps);
        let plan = crate::traffic::Shock {
            service: name,
            to: crate::traffic::reach(v.listen),
            rps,
            concurrency: *concurrency,
            paths: paths.clone(),
            duration: *duration,
        };
        let started = format!(
            "{rps:.1} extra req/s through {} for {}s ({current:.1} req/s now ×{factor}, at most {concurrency} in flight)",
            plan.to,
            duration.as_secs_f64()
        );
        let me = self.clone();
        let record_ = record.clone();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let result = crate::traffic::run_shock(&plan, stopped).await;
            let msg = format!(
                "scaling shock on {} ended: {}",
                plan.service,
                result.describe()
            );
            {
                let mut r = lock(&record_);
                r.report.shocks.push(result);
                me.persist(&r);
            }
            me.event(&record_, msg).await;
        });
        let id = lock(record).report.id.clone();
        lock(&self.inner.shocks)
            .entry(id)
            .or_default()
            .push((stop, task));
        Ok(started)
    }

    /// Ends what an experiment left running beside its faults: CPU stresses and scaling
    /// shocks. Returns how many.
    async fn calm(&self, record: &Arc<Mutex<Record>>) -> usize {
        let (id, stressed) = {
            let r = lock(record);
            (r.report.id.clone(), r.stressed.clone())
        };
        let now = wall_now().0;
        // Those past their end have ended by themselves; calming them again does no harm.
        let mut n = stressed.iter().filter(|s| s.until_ms > now).count();
        for s in stressed {
            let i = InstanceId::new(&s.instance);
            let _ = self
                .inner
                .controller
                .disturb(&s.service, &i, Disturbance::Calm)
                .await;
        }
        let shocks = lock(&self.inner.shocks).remove(&id).unwrap_or_default();
        for (stop, task) in shocks {
            if !task.is_finished() {
                n += 1;
            }
            // It stops sending at once and reports what it sent once those are answered.
            let _ = stop.send(true);
            let _ = task.await;
        }
        n
    }

    /// Deploys `version` with errors injected into it and waits for analysis to roll it back.
    async fn deployment_rollback(
        &self,
        id: &str,
        service: &str,
        version: &str,
        error_rate: f64,
        within: Duration,
    ) -> Result<String, String> {
        let c = &self.inner.controller;
        // The errors are in place before the first request reaches the candidate.
        let f = FaultRequest {
            service: service.to_owned(),
            version: Some(version.to_owned()),
            error_rate: Some(error_rate),
            status: Some(500),
            duration: Some(format!(
                "{}ms",
                (within + Duration::from_secs(60)).as_millis()
            )),
            experiment: Some(id.to_owned()),
            ..FaultRequest::default()
        };
        self.inner.faults.add(&f).await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let rollout = c
            .deploy(DeployRequest {
                service: service.to_owned(),
                version: version.to_owned(),
                env: BTreeMap::new(),
                strategy: None,
                actor: format!("experiment {id}"),
            })
            .await
            .map_err(|e| format!("cannot deploy {service} {version}: {e}"))?;
        loop {
            let r = c.rollout(rollout.id).await.map_err(|e| e.to_string())?;
            let took = started.elapsed().as_secs_f64();
            match r.outcome {
                RolloutOutcome::RolledBack => {
                    return Ok(format!(
                        "rollout {} of {version} rolled back after {took:.1}s: {}",
                        r.id,
                        r.reason.unwrap_or_default()
                    ));
                }
                RolloutOutcome::InProgress if started.elapsed() < within => {
                    tokio::time::sleep(POLL).await;
                }
                RolloutOutcome::InProgress => {
                    // Nothing is left behind: the bad version is taken out now.
                    let _ = c.act(service, Act::Abort, format!("experiment {id}")).await;
                    return Err(format!(
                        "rollout {} of {version} was not rolled back within {}s; aborted it",
                        r.id,
                        within.as_secs()
                    ));
                }
                other => {
                    return Err(format!(
                        "rollout {} of {version} ended {other} after {took:.1}s, not rolled back: {}",
                        r.id,
                        r.reason.unwrap_or_default()
                    ));
                }
            }
        }
    }

    /// Takes a probe's value and compares it to its tolerance.
    pub async fn probe(&self, p: &Probe) -> ProbeResult {
        let tolerance = p.tolerance.describe();
        let (value, detail, ok) = match self.measure(p).await {
            Err(e) => (None, e, false),
            Ok(Measured::Number(v, d)) => (Some(v), d, p.tolerance.holds(v)),
            Ok(Measured::Answer(status, body)) => {
                let ok = match &p.tolerance {
                    Tolerance::Status {
                        status: want,
                        body_contains,
                    } => {
                        want.map_or((200..300).contains(&status), |w| w == status)
                            && body_contains.as_ref().is_none_or(|b| body.contains(b))
                    }
                    Tolerance::Range { .. } => p.tolerance.holds(f64::from(status)),
                };
                (Some(f64::from(status)), format!("answered {status}"), ok)
            }
        };
        ProbeResult {
            name: p.name.clone(),
            value,
            detail,
            tolerance,
            ok,
        }
    }

    async fn measure(&self, p: &Probe) -> Result<Measured, String> {
        match &p.kind {
            ProbeKind::ErrorRate {
                service,
                version,
                window,
            } => {
                let w = self
                    .window(service, version.as_deref(), *window, None)
                    .await?;
                let rate = if w.requests == 0 {
                    0.0
                } else {
                    w.errors as f64 / w.requests as f64
                };
                Ok(Measured::Number(
                    rate,
                    format!(
                        "error rate {:.2}% ({}/{}) over {}s",
                        rate * 100.0,
                        w.errors,
                        w.requests,
                        window.as_secs_f64()
                    ),
                ))
            }
            ProbeKind::P99 {
                service,
                version,
                window,
            } => {
                let w = self
                    .window(service, version.as_deref(), *window, None)
                    .await?;
                let p99 = w.latency.quantile(0.99).unwrap_or_default();
                let ms = p99.as_secs_f64() * 1000.0;
                Ok(Measured::Number(
                    ms,
                    format!("p99 {ms:.1}ms over {} requests", w.requests),
                ))
            }
            ProbeKind::SloBurnRate {
                service,
                slo,
                window,
            } => {
                let spec = self
                    .inner
                    .slos
                    .iter()
                    .find(|s| s.service == *service && s.name == *slo)
                    .ok_or_else(|| format!("the daemon has no SLO {slo:?} for {service}"))?;
                let w = self.window(service, None, *window, spec.latency).await?;
                let bad = match spec.latency {
                    Some(_) => w.slow,
                    None => w.errors,
                };
                let budget = spec.error_budget();
                let rate = if w.requests == 0 {
                    0.0
                } else {
                    (bad as f64 / w.requests as f64) / budget
                };
                let what = match spec.latency {
                    Some(l) => format!("slower than {}ms", l.as_millis()),
                    None => "5xx".to_owned(),
                };
                Ok(Measured::Number(
                    rate,
                    format!(
                        "SLO {slo} ({}) burns its budget at {rate:.2}× over {}s: {bad}/{} requests {what}, {:.3}% allowed",
                        spec.describe(),
                        window.as_secs_f64(),
                        w.requests,
                        budget * 100.0
                    ),
                ))
            }
            ProbeKind::HealthyInstances { service, version } => {
                let v = self
                    .inner
                    .controller
                    .service(service)
                    .await
                    .map_err(|e| e.to_string())?;
                let n = v
                    .instances
                    .iter()
                    .filter(|i| i.health == Health::Healthy)
                    .filter(|i| version.as_ref().is_none_or(|w| i.version.as_str() == w))
                    .count();
                Ok(Measured::Number(
                    n as f64,
                    format!("{n} healthy instance(s)"),
                ))
            }
            ProbeKind::Http {
                url,
                method,
                headers,
                timeout,
            } => {
                let (addr, path) = crate::http::split_url(url)?;
                let headers: Vec<(String, String)> = headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let (status, body) =
                    crate::http::request(&addr, method, &path, &headers, *timeout).await?;
                Ok(Measured::Answer(status, body))
            }
        }
    }

    /// What a service (one version, or all it runs) answered over the next `window`; with
    /// `threshold`, also how many answers were slower than it.
    async fn window(
        &self,
        service: &str,
        version: Option<&str>,
        window: Duration,
        threshold: Option<Duration>,
    ) -> Result<Window, String> {
        let name = ServiceName::new(service);
        let versions: Vec<Version> = match version {
            Some(v) => vec![Version::new(v)],
            None => {
                let v = self
                    .inner
                    .controller
                    .service(service)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut vs: Vec<Version> = v.weights.iter().map(|(v, _)| v.clone()).collect();
                vs.extend(v.instances.iter().map(|i| i.version.clone()));
                vs.sort();
                vs.dedup();
                vs
            }
        };
        let m = &self.inner.metrics;
        let first: Vec<_> = versions.iter().map(|v| m.snapshot(&name, v)).collect();
        tokio::time::sleep(window).await;
        let mut w = Window {
            requests: 0,
            errors: 0,
            slow: 0,
            latency: LatencyDist::default(),
        };
        for (v, before) in versions.iter().zip(&first) {
            let now = m.snapshot(&name, v);
            let s = now.window_since(Some(before));
            w.requests += s.requests;
            w.errors += s.errors;
            if let Some(t) = threshold {
                let fast = now.within(t).saturating_sub(before.within(t));
                w.slow += s.requests.saturating_sub(fast);
            }
            w.latency.merge(&s.latency);
        }
        Ok(w)
    }
}

struct Window {
    requests: u64,
    errors: u64,
    /// Answers slower than the threshold asked for (0 without one).
    slow: u64,
    latency: LatencyDist,
}

enum Measured {
    Number(f64, String),
    Answer(u16, String),
}

/// Runs `fut` unless the stop signal comes first (`None`).
async fn until_stopped<T>(
    stopped: &mut watch::Receiver<bool>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    if *stopped.borrow() {
        return None;
    }
    tokio::select! {
        r = fut => Some(r),
        _ = stopped.wait_for(|s| *s) => None,
    }
}

fn probe_service(p: &Probe) -> Option<String> {
    p.kind.service().map(str::to_owned)
}

/// The service an experiment's events are recorded under: the first it names.
fn first_service(e: &Experiment) -> Option<String> {
    let from_action = |a: &Activity| match a {
        Activity::Action(a) => match a.kind.target() {
            Target::Service(s) | Target::Dependency(s) => Some(s.to_owned()),
            Target::Nothing => None,
        },
        Activity::Probe(p) => probe_service(p),
    };
    e.hypothesis
        .iter()
        .find_map(probe_service)
        .or_else(|| e.method.iter().find_map(from_action))
        .or_else(|| e.rollbacks.iter().find_map(from_action))
}
