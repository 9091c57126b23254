//! Experiments: what `cutover chaos run FILE` reads, in cutover's TOML or in Chaos Toolkit's
//! JSON experiment format, checked against the services and dependencies of the config.
//!
//! Both formats become one [`Experiment`]: a title, a steady-state hypothesis (probes with
//! tolerances), a method (actions, and probes whose numbers are taken during it) and rollbacks.
//! Every problem is reported at once as `FILE:LINE:COL: key: message` (exit 2), like the
//! config's. The model is plain data (serde) because the daemon persists it with the run's
//! state, so that a restarted daemon can still run its rollbacks.
//!
//! Chaos Toolkit activities name cutover's actions and probes through a Python-style provider
//! (`"module": "chaoscutover.actions"`, `"func": "kill_instance"`), as its extensions do;
//! `"type": "http"` providers are HTTP probes. Nothing is ever run as Python or as a process:
//! experiments only ever target cutover's own services and dependencies.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An experiment, checked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub title: String,
    pub description: Option<String>,
    /// Checked before the method (the experiment stops if they do not hold) and after it.
    pub hypothesis: Vec<Probe>,
    pub method: Vec<Activity>,
    /// Always run once the experiment started: after the method, after a failure, after
    /// Ctrl-C, and by a restarted daemon after a crash.
    pub rollbacks: Vec<Activity>,
    /// How long the hypothesis is given to hold again after the method (the recovery time is
    /// measured within it).
    #[serde(with = "ms")]
    pub recovery_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum Activity {
    Action(Action),
    Probe(Probe),
}

impl Activity {
    pub fn name(&self) -> &str {
        match self {
            Activity::Action(a) => &a.name,
            Activity::Probe(p) => &p.name,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub name: String,
    pub kind: ActionKind,
    #[serde(with = "ms")]
    pub pause_before: Duration,
    #[serde(with = "ms")]
    pub pause_after: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum ActionKind {
    /// SIGKILL `count` healthy instances of the version (stable when none is named): a crash,
    /// which the runtime restarts as it would any other.
    KillInstance {
        service: String,
        version: Option<String>,
        count: u32,
    },
    InjectLatency {
        service: String,
        version: Option<String>,
        instance: Option<String>,
        #[serde(with = "ms")]
        latency: Duration,
        #[serde(with = "ms")]
        jitter: Duration,
        #[serde(with = "ms")]
        duration: Duration,
    },
    InjectErrors {
        service: String,
        version: Option<String>,
        instance: Option<String>,
        rate: f64,
        status: u16,
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// A dependency hop reset, blackholed or slowed.
    DependencyFailure {
        dependency: String,
        mode: DependencyMode,
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Takes CPU away from `count` healthy instances of the version (stable when none is
    /// named) for `duration`: a process shares one CPU with a busy loop running `load` of the
    /// time; a container is limited to `1 - load` of a CPU. Ends by itself.
    CpuStress {
        service: String,
        version: Option<String>,
        count: u32,
        load: f64,
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// A burst of extra load through the service's listener, as users would send it: the
    /// service's current request rate times `factor - 1` on top of what it gets (at least
    /// `min_rps`, at most `max_rps`), for `duration`, with at most `concurrency` requests in
    /// flight. It runs beside the rest of the method and ends by itself.
    ScalingShock {
        service: String,
        factor: f64,
        min_rps: f64,
        max_rps: f64,
        concurrency: u32,
        paths: Vec<String>,
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Deploys `version` with injected errors and passes if analysis rolls it back within
    /// `within`.
    DeploymentRollback {
        service: String,
        version: String,
        error_rate: f64,
        #[serde(with = "ms")]
        within: Duration,
    },
    /// Clears the faults this experiment set (on one service, or all).
    ClearFaults { service: Option<String> },
    /// Aborts a rollout in progress, if there is one.
    AbortRollout { service: String },
    Wait {
        #[serde(with = "ms")]
        duration: Duration,
    },
}

/// What an action acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    Service(&'a str),
    Dependency(&'a str),
    /// Nothing in particular (`wait`; `clear-faults` of every service).
    Nothing,
}

impl ActionKind {
    /// Its name in experiment files.
    pub fn name(&self) -> &'static str {
        match self {
            ActionKind::KillInstance { .. } => "kill-instance",
            ActionKind::CpuStress { .. } => "cpu-stress",
            ActionKind::ScalingShock { .. } => "scaling-shock",
            ActionKind::InjectLatency { .. } => "inject-latency",
            ActionKind::InjectErrors { .. } => "inject-errors",
            ActionKind::DependencyFailure { .. } => "dependency-failure",
            ActionKind::DeploymentRollback { .. } => "deployment-rollback",
            ActionKind::ClearFaults { .. } => "clear-faults",
            ActionKind::AbortRollout { .. } => "abort-rollout",
            ActionKind::Wait { .. } => "wait",
        }
    }

    pub fn target(&self) -> Target<'_> {
        match self {
            ActionKind::KillInstance { service, .. }
            | ActionKind::CpuStress { service, .. }
            | ActionKind::ScalingShock { service, .. }
            | ActionKind::InjectLatency { service, .. }
            | ActionKind::InjectErrors { service, .. }
            | ActionKind::DeploymentRollback { service, .. }
            | ActionKind::AbortRollout { service }
            | ActionKind::ClearFaults {
                service: Some(service),
            } => Target::Service(service),
            ActionKind::DependencyFailure { dependency, .. } => Target::Dependency(dependency),
            ActionKind::ClearFaults { service: None } | ActionKind::Wait { .. } => Target::Nothing,
        }
    }
}

impl ProbeKind {
    /// Its name in experiment files.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::ErrorRate { .. } => "error-rate",
            ProbeKind::P99 { .. } => "p99",
            ProbeKind::SloBurnRate { .. } => "slo-burn-rate",
            ProbeKind::HealthyInstances { .. } => "healthy-instances",
            ProbeKind::Http { .. } => "http",
        }
    }

    /// The service it measures (an HTTP probe asks a URL, not a service).
    pub fn service(&self) -> Option<&str> {
        match self {
            ProbeKind::ErrorRate { service, .. }
            | ProbeKind::P99 { service, .. }
            | ProbeKind::SloBurnRate { service, .. }
            | ProbeKind::HealthyInstances { service, .. } => Some(service),
            ProbeKind::Http { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DependencyMode {
    Reset,
    Blackhole,
    Latency(#[serde(with = "ms")] Duration),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub name: String,
    pub kind: ProbeKind,
    pub tolerance: Tolerance,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "probe")]
pub enum ProbeKind {
    /// Share of 5xx answers over the next `window`, all versions or one.
    ErrorRate {
        service: String,
        version: Option<String>,
        #[serde(with = "ms")]
        window: Duration,
    },
    /// p99 latency in milliseconds over the next `window`.
    P99 {
        service: String,
        version: Option<String>,
        #[serde(with = "ms")]
        window: Duration,
    },
    /// How fast an SLO's error budget burns over the next `window`: the share of bad requests
    /// divided by the share the objective allows (1 spends the budget exactly in the SLO's
    /// window; 14.4 is the usual page).
    SloBurnRate {
        service: String,
        slo: String,
        #[serde(with = "ms")]
        window: Duration,
    },
    /// Healthy instances now, all versions or one.
    HealthyInstances {
        service: String,
        version: Option<String>,
    },
    /// One HTTP request: its status (and body).
    Http {
        url: String,
        method: String,
        headers: BTreeMap<String, String>,
        #[serde(with = "ms")]
        timeout: Duration,
    },
}

/// What a probe's value must be for the hypothesis to hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "tolerance")]
pub enum Tolerance {
    Range {
        min: Option<f64>,
        max: Option<f64>,
    },
    Status {
        status: Option<u16>,
        body_contains: Option<String>,
    },
}

impl Tolerance {
    /// Whether a number is within the range (a status tolerance takes no number).
    pub fn holds(&self, v: f64) -> bool {
        match self {
            Tolerance::Range { min, max } => {
                min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m)
            }
            Tolerance::Status { .. } => false,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Tolerance::Range {
                min: Some(a),
                max: Some(b),
            } => format!("between {a} and {b}"),
            Tolerance::Range { min: Some(a), .. } => format!("at least {a}"),
            Tolerance::Range { max: Some(b), .. } => format!("at most {b}"),
            Tolerance::Range { .. } => "any".to_owned(),
            Tolerance::Status {
                status,
                body_contains,
            } => {
                let s = status.map_or("2xx".to_owned(), |s| s.to_string());
                match body_contains {
                    Some(b) => format!("status {s} with {b:?} in the body"),
                    None => format!("status {s}"),
                }
            }
        }
    }
}

/// Durations kept as milliseconds in the persisted form.
mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What the experiment may name.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub services: Vec<String>,
    pub dependencies: Vec<String>,
    /// `(service, SLO name)` of every `[[services.X.slo]]`.
    pub slos: Vec<(String, String)>,
}

/// One problem in an experiment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

/// Everything wrong with an experiment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}:{}: ", self.file, p.line, p.column)?;
            if !p.key.is_empty() {
                write!(f, "{}: ", p.key)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A value of either format, with the byte offset it was written at.
#[derive(Clone, Debug)]
struct Node {
    v: Val,
    at: usize,
}

#[derive(Clone, Debug)]
enum Val {
    Str(String),
    Num(f64),
    Bool,
    Arr(Vec<Node>),
    Obj(Vec<(String, Node)>),
    Null,
}

impl Val {
    fn what(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Num(_) => "a number",
            Val::Bool => "a boolean",
            Val::Arr(_) => "an array",
            Val::Obj(_) => "a table",
            Val::Null => "null",
        }
    }
}

fn from_toml(v: &toml::Spanned<toml::de::DeValue<'_>>) -> Node {
    use toml::de::DeValue;
    let at = v.span().start;
    let v = match v.get_ref() {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => Val::Num(
            i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .map(|n| n as f64)
                .unwrap_or(f64::NAN),
        ),
        DeValue::Float(x) => Val::Num(x.as_str().replace('_', "").parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(_) => Val::Bool,
        DeValue::Datetime(d) => Val::Str(d.to_string()),
        DeValue::Array(a) => Val::Arr(a.iter().map(from_toml).collect()),
        DeValue::Table(t) => Val::Obj(
            t.iter()
                .map(|(k, v)| {
                    let mut n = from_toml(v);
                    // A `[[table]]`'s own span is its header; the key's is as good a place.
                    if matches!(n.v, Val::Obj(_)) {
                        n.at = k.span().start.min(n.at);
                    }
                    (k.get_ref().to_string(), n)
                })
                .collect(),
        ),
    };
    Node { v, at }
}

/// serde_json keeps no positions: each key is found in the text after its parent's, which is
/// exact for the usual one-key-per-line layout and close otherwise.
fn from_json(v: &serde_json::Value, text: &str, from: usize) -> Node {
    use serde_json::Value;
    let v = match v {
        Value::String(s) => Val::Str(s.clone()),
        Value::Number(n) => Val::Num(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(_) => Val::Bool,
        Value::Null => Val::Null,
        Value::Array(a) => {
            let mut at = from;
            Val::Arr(
                a.iter()
                    .map(|x| {
                        let n = from_json(x, text, at);
                        at = n.at + 1;
                        n
                    })
                    .collect(),
            )
        }
        Value::Object(o) => Val::Obj(
            o.iter()
                .map(|(k, x)| {
                    let needle = format!("{}:", serde_json::to_string(k).unwrap_or_default());
                    let quoted = serde_json::to_string(k).unwrap_or_default();
                    let at = text
                        .get(from..)
                        .and_then(|t| t.find(&needle).or_else(|| t.find(&quoted)))
                        .map_or(from, |i| from + i);
                    (k.clone(), from_json(x, text, at))
                })
                .collect(),
        ),
    };
    Node { v, at: from }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct Cx<'a> {
    text: &'a str,
    known: &'a Known,
    problems: Vec<Problem>,
    /// Chaos Toolkit's format: activities use its field names and units (seconds).
    ctk: bool,
}

impl Cx<'_> {
    fn err(&mut self, at: usize, key: &str, message: impl Into<String>) {
        let (line, column) = line_col(self.text, at);
        self.problems.push(Problem {
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        });
    }
}

/// A table's fields, read one by one; whatever is left unread is an unknown key.
struct Fields<'a> {
    path: String,
    at: usize,
    map: Vec<(&'a str, &'a Node)>,
}

impl<'a> Fields<'a> {
    fn of(cx: &mut Cx<'_>, n: &'a Node, path: &str) -> Option<Fields<'a>> {
        match &n.v {
            Val::Obj(o) => Some(Fields {
                path: path.to_owned(),
                at: n.at,
                map: o.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            }),
            other => {
                cx.err(
                    n.at,
                    path,
                    format!("expected a table, found {}", other.what()),
                );
                None
            }
        }
    }

    fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_owned()
        } else {
            format!("{}.{k}", self.path)
        }
    }

    fn take(&mut self, k: &str) -> Option<&'a Node> {
        let i = self.map.iter().position(|(name, _)| *name == k)?;
        Some(self.map.remove(i).1)
    }

    fn str(&mut self, cx: &mut Cx<'_>, k: &str) -> Option<String> {
        let n = self.take(k)?;
        match &n.v {
            Val::Str(s) => Some(s.clone()),
            other => {
                let key = self.key(k);
                cx.err(
                    n.at,
                    &key,
                    format!("expected a string, found {}", other.what()),
                );
                None
            }
        }
    }

    fn need_str(&mut self, cx: &mut Cx<'_>, k: &str) -> Option<String> {
        let v = self.str(cx, k);
        if v.is_none() && !cx.problems.iter().any(|p| p.key == self.key(k)) {
            let (at, key) = (self.at, self.key(k));
            cx.err(at, &key, "is required");
        }
        v
    }

    fn num(&mut self, cx: &mut Cx<'_>, k: &str) -> Option<f64> {
        let n = self.take(k)?;
        match &n.v {
            Val::Num(x) if x.is_finite() => Some(*x),
            other => {
                let key = self.key(k);
                cx.err(
                    n.at,
                    &key,
                    format!("expected a number, found {}", other.what()),
                );
                None
            }
        }
    }

    /// A duration: `"5s"`, or (Chaos Toolkit's way) a number of seconds.
    fn dur(&mut self, cx: &mut Cx<'_>, k: &str) -> Option<Duration> {
        let n = self.take(k)?;
        let key = self.key(k);
        match &n.v {
            Val::Str(s) => match cutover_config::parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    cx.err(n.at, &key, e);
                    None
                }
            },
            Val::Num(x) if *x >= 0.0 && x.is_finite() => Some(Duration::from_secs_f64(*x)),
            other => {
                cx.err(
                    n.at,
                    &key,
                    format!("expected a duration like \"5s\", found {}", other.what()),
                );
                None
            }
        }
    }

    fn node(&mut self, k: &str) -> Option<&'a Node> {
        self.take(k)
    }

    /// A list of strings.
    fn strs(&mut self, cx: &mut Cx<'_>, k: &str) -> Option<Vec<String>> {
        let n = self.take(k)?;
        let key = self.key(k);
        let Val::Arr(items) = &n.v else {
            cx.err(
                n.at,
                &key,
                format!("expected a list of strings, found {}", n.v.what()),
            );
            return None;
        };
        let mut out = Vec::new();
        for i in items {
            match &i.v {
                Val::Str(s) => out.push(s.clone()),
                other => {
                    cx.err(
                        i.at,
                        &key,
                        format!("expected a string, found {}", other.what()),
                    );
                    return None;
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Reports every key nobody read.
    fn finish(self, cx: &mut Cx<'_>, allowed: &str) {
        for (k, n) in &self.map {
            cx.err(
                n.at,
                &self.key(k),
                format!("unknown key; allowed keys: {allowed}"),
            );
        }
    }
}

/// Reads an experiment from `text` (TOML, or JSON when the file ends in `.json` or the text
/// starts with `{`), checked against `known`.
pub fn parse(text: &str, file: &Path, known: &Known) -> Result<Experiment, Problems> {
    let json = file.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let mut cx = Cx {
        text,
        known,
        problems: Vec::new(),
        ctk: json,
    };
    let root = if json {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => from_json(&v, text, 0),
            Err(e) => {
                let problems = vec![Problem {
                    line: e.line(),
                    column: e.column(),
                    key: String::new(),
                    message: format!("not valid JSON: {e}"),
                }];
                return Err(Problems {
                    file: file.display().to_string(),
                    problems,
                });
            }
        }
    } else {
        match toml::de::DeTable::parse(text) {
            Ok(t) => {
                let spanned = toml::Spanned::new(
                    0..text.len(),
                    toml::de::DeValue::Table(t.get_ref().clone()),
                );
                from_toml(&spanned)
            }
            Err(e) => {
                let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
                return Err(Problems {
                    file: file.display().to_string(),
                    problems: vec![Problem {
                        line,
                        column,
                        key: String::new(),
                        message: format!("not valid TOML: {}", e.message().trim()),
                    }],
                });
            }
        }
    };
    let exp = experiment(&mut cx, &root);
    match exp {
        Some(e) if cx.problems.is_empty() => Ok(e),
        _ => {
            cx.problems.sort_by_key(|p| (p.line, p.column));
            if cx.problems.is_empty() {
                cx.err(0, "", "the experiment could not be read");
            }
            Err(Problems {
                file: file.display().to_string(),
                problems: cx.problems,
            })
        }
    }
}

fn experiment(cx: &mut Cx<'_>, root: &Node) -> Option<Experiment> {
    let mut f = Fields::of(cx, root, "")?;
    let title = f.need_str(cx, "title");
    let description = f.str(cx, "description");
    let recovery_timeout = f
        .dur(cx, "recovery_timeout")
        .unwrap_or(Duration::from_secs(30));
    let mut hypothesis = Vec::new();
    let mut method = Vec::new();
    let mut rollbacks = Vec::new();
    if cx.ctk {
        if let Some(h) = f.node("steady-state-hypothesis")
            && let Some(mut hf) = Fields::of(cx, h, "steady-state-hypothesis")
        {
            let _ = hf.str(cx, "title");
            if let Some(p) = hf.node("probes") {
                for (i, a) in list(cx, p, "steady-state-hypothesis.probes") {
                    let path = format!("steady-state-hypothesis.probes[{i}]");
                    match activity(cx, a, &path) {
                        Some(Activity::Probe(p)) => hypothesis.push(p),
                        Some(Activity::Action(_)) => {
                            cx.err(a.at, &path, "the steady-state hypothesis takes probes only")
                        }
                        None => {}
                    }
                }
            }
            hf.finish(cx, "title, probes");
        }
        // Chaos Toolkit files carry more than cutover reads; those keys are left alone.
        for k in [
            "version",
            "tags",
            "contributions",
            "configuration",
            "secrets",
            "extensions",
            "controls",
            "runtime",
        ] {
            f.take(k);
        }
    } else if let Some(h) = f.node("hypothesis") {
        for (i, a) in list(cx, h, "hypothesis") {
            let path = format!("hypothesis[{i}]");
            match activity(cx, a, &path) {
                Some(Activity::Probe(p)) => hypothesis.push(p),
                Some(Activity::Action(_)) => {
                    cx.err(a.at, &path, "the hypothesis takes probes only");
                }
                None => {}
            }
        }
    }
    for (key, into) in [("method", &mut method), ("rollbacks", &mut rollbacks)] {
        if let Some(m) = f.node(key) {
            for (i, a) in list(cx, m, key) {
                if let Some(act) = activity(cx, a, &format!("{key}[{i}]")) {
                    into.push(act);
                }
            }
        }
    }
    if method.is_empty() && cx.problems.is_empty() {
        cx.err(root.at, "method", "is required: at least one action to run");
    }
    let allowed = if cx.ctk {
        "title, description, steady-state-hypothesis, method, rollbacks, recovery_timeout"
    } else {
        "title, description, hypothesis, method, rollbacks, recovery_timeout"
    };
    f.finish(cx, allowed);
    Some(Experiment {
        title: title?,
        description,
        hypothesis,
        method,
        rollbacks,
        recovery_timeout,
    })
}

fn list<'a>(cx: &mut Cx<'_>, n: &'a Node, path: &str) -> Vec<(usize, &'a Node)> {
    match &n.v {
        Val::Arr(a) => a.iter().enumerate().collect(),
        other => {
            cx.err(
                n.at,
                path,
                format!("expected an array, found {}", other.what()),
            );
            Vec::new()
        }
    }
}

/// The cutover name of an action or probe, from either format's spelling.
fn canonical(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('_', "-")
}

const ACTIONS: &str = "kill-instance, cpu-stress, scaling-shock, inject-latency, inject-errors, dependency-failure, deployment-rollback, clear-faults, abort-rollout, wait";
const PROBES: &str = "error-rate, p99, slo-burn-rate, healthy-instances, http";

fn activity(cx: &mut Cx<'_>, n: &Node, path: &str) -> Option<Activity> {
    if cx.ctk {
        ctk_activity(cx, n, path)
    } else {
        toml_activity(cx, n, path)
    }
}

/// `{ action = "...", ... }` or `{ probe = "...", ..., max = 0.05 }`.
fn toml_activity(cx: &mut Cx<'_>, n: &Node, path: &str) -> Option<Activity> {
    let mut f = Fields::of(cx, n, path)?;
    let action = f.take("action");
    let probe = f.take("probe");
    let r = match (action, probe) {
        (Some(a), None) => {
            let Val::Str(kind) = &a.v else {
                cx.err(a.at, &f.key("action"), "expected the action's name");
                return None;
            };
            let name = f.str(cx, "name").unwrap_or_else(|| kind.clone());
            let pause_before = f.dur(cx, "pause_before").unwrap_or_default();
            let pause_after = f.dur(cx, "pause_after").unwrap_or_default();
            let kind = action_kind(cx, &mut f, &canonical(kind), a.at)?;
            Some(Activity::Action(Action {
                name,
                kind,
                pause_before,
                pause_after,
            }))
        }
        (None, Some(p)) => {
            let Val::Str(kind) = &p.v else {
                cx.err(p.at, &f.key("probe"), "expected the probe's name");
                return None;
            };
            let name = f.str(cx, "name").unwrap_or_else(|| kind.clone());
            let kind = probe_kind(cx, &mut f, &canonical(kind), p.at)?;
            let tolerance = toml_tolerance(cx, &mut f, &kind);
            Some(Activity::Probe(Probe {
                name,
                kind,
                tolerance,
            }))
        }
        (Some(a), Some(_)) => {
            cx.err(a.at, path, "give `action` or `probe`, not both");
            None
        }
        (None, None) => {
            cx.err(
                n.at,
                path,
                format!("needs `action` ({ACTIONS}) or `probe` ({PROBES})"),
            );
            None
        }
    };
    f.finish(
        cx,
        "the action's or probe's own keys (see docs/reference.md)",
    );
    r
}

fn toml_tolerance(cx: &mut Cx<'_>, f: &mut Fields<'_>, kind: &ProbeKind) -> Tolerance {
    match kind {
        ProbeKind::Http { .. } => {
            let status = f.num(cx, "status").map(|s| s as u16);
            let body_contains = f.str(cx, "body_contains");
            Tolerance::Status {
                status,
                body_contains,
            }
        }
        _ => {
            let min = f.num(cx, "min");
            let max = f.num(cx, "max");
            if min.is_none() && max.is_none() {
                let (at, key) = (f.at, f.key("max"));
                cx.err(at, &key, "a probe needs a tolerance: `max`, `min` or both");
            }
            Tolerance::Range { min, max }
        }
    }
}

/// Chaos Toolkit's activity: `{"type": "action"|"probe", "name", "provider": {...},
/// "tolerance": ..., "pauses": {"before", "after"}}`.
fn ctk_activity(cx: &mut Cx<'_>, n: &Node, path: &str) -> Option<Activity> {
    let mut f = Fields::of(cx, n, path)?;
    let kind = f.need_str(cx, "type");
    let name = f.need_str(cx, "name");
    let _ = f.take("background");
    let _ = f.take("controls");
    let (mut pause_before, mut pause_after) = (Duration::ZERO, Duration::ZERO);
    if let Some(p) = f.node("pauses")
        && let Some(mut pf) = Fields::of(cx, p, &f.key("pauses"))
    {
        pause_before = pf.dur(cx, "before").unwrap_or_default();
        pause_after = pf.dur(cx, "after").unwrap_or_default();
        pf.finish(cx, "before, after");
    }
    let provider = f.node("provider");
    let tolerance = f.node("tolerance");
    if let Some(r) = f.take("ref") {
        cx.err(
            r.at,
            path,
            "activity references are not supported; write the activity out",
        );
    }
    f.finish(
        cx,
        "type, name, provider, tolerance, pauses, background, controls",
    );
    let kind = kind?;
    let name = name?;
    let Some(provider) = provider else {
        cx.err(n.at, &format!("{path}.provider"), "is required");
        return None;
    };
    let ppath = format!("{path}.provider");
    let mut pf = Fields::of(cx, provider, &ppath)?;
    let ptype = pf.need_str(cx, "type")?;
    let act = match (kind.as_str(), ptype.as_str()) {
        ("probe", "http") => {
            let url = pf.need_str(cx, "url")?;
            let method = pf.str(cx, "method").unwrap_or_else(|| "GET".into());
            let timeout = pf.dur(cx, "timeout").unwrap_or(Duration::from_secs(5));
            let headers = pf.node("headers").map(|h| string_map(cx, h, &ppath));
            let _ = pf.take("arguments");
            let _ = pf.take("expected_status");
            pf.finish(cx, "type, url, method, timeout, headers");
            let (status, body_contains) = match tolerance {
                None => (None, None),
                Some(t) => match &t.v {
                    Val::Num(s) => (Some(*s as u16), None),
                    Val::Str(b) => (None, Some(b.clone())),
                    Val::Obj(_) => {
                        let mut tf = Fields::of(cx, t, &format!("{path}.tolerance"))?;
                        let status = tf.num(cx, "status").map(|s| s as u16);
                        let _ = tf.str(cx, "type");
                        let _ = tf.str(cx, "target");
                        let body = tf.str(cx, "pattern");
                        tf.finish(cx, "type, status, target, pattern");
                        (status, body)
                    }
                    other => {
                        cx.err(
                            t.at,
                            &format!("{path}.tolerance"),
                            format!("an HTTP probe's tolerance is a status or a text to find in the body, not {}", other.what()),
                        );
                        return None;
                    }
                },
            };
            Activity::Probe(Probe {
                name,
                kind: ProbeKind::Http {
                    url,
                    method,
                    headers: headers.unwrap_or_default(),
                    timeout,
                },
                tolerance: Tolerance::Status {
                    status,
                    body_contains,
                },
            })
        }
        (_, "python") => {
            let module = pf.need_str(cx, "module")?;
            let func = pf.need_str(cx, "func")?;
            let func_at = provider.at;
            if !module.starts_with("chaoscutover") {
                let at = locate(cx.text, &module, provider.at);
                cx.err(
                    at,
                    &format!("{ppath}.module"),
                    format!("{module:?} is not cutover's: name its actions and probes with \"chaoscutover.actions\" / \"chaoscutover.probes\"; nothing else is run"),
                );
                return None;
            }
            let args = pf.node("arguments");
            pf.finish(cx, "type, module, func, arguments");
            let empty = Node {
                v: Val::Obj(Vec::new()),
                at: provider.at,
            };
            let args = args.unwrap_or(&empty);
            let mut af = Fields::of(cx, args, &format!("{ppath}.arguments"))?;
            let at = locate(cx.text, &func, func_at);
            let r = if kind == "probe" {
                let kind = probe_kind(cx, &mut af, &canonical(&func), at)?;
                let tolerance = match tolerance {
                    Some(t) => ctk_tolerance(cx, t, &format!("{path}.tolerance"))?,
                    None => {
                        cx.err(
                            n.at,
                            &format!("{path}.tolerance"),
                            "a probe of the hypothesis needs a tolerance",
                        );
                        return None;
                    }
                };
                Activity::Probe(Probe {
                    name,
                    kind,
                    tolerance,
                })
            } else {
                let kind = action_kind(cx, &mut af, &canonical(&func), at)?;
                Activity::Action(Action {
                    name,
                    kind,
                    pause_before,
                    pause_after,
                })
            };
            af.finish(
                cx,
                "the action's or probe's own arguments (see docs/reference.md)",
            );
            r
        }
        (_, other) => {
            cx.err(
                provider.at,
                &format!("{ppath}.type"),
                format!("{other:?} providers are not run by cutover; use \"python\" with module \"chaoscutover.actions\"/\"chaoscutover.probes\", or \"http\""),
            );
            return None;
        }
    };
    Some(act)
}

/// Where `value` is written (as a JSON string) at or after `from`, else `from`.
fn locate(text: &str, value: &str, from: usize) -> usize {
    let quoted = serde_json::to_string(value).unwrap_or_default();
    text.get(from..)
        .and_then(|t| t.find(&quoted))
        .map_or(from, |i| from + i)
}

fn string_map(cx: &mut Cx<'_>, n: &Node, path: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match &n.v {
        Val::Obj(o) => {
            for (k, v) in o {
                match &v.v {
                    Val::Str(s) => {
                        out.insert(k.clone(), s.clone());
                    }
                    other => cx.err(
                        v.at,
                        &format!("{path}.{k}"),
                        format!("expected a string, found {}", other.what()),
                    ),
                }
            }
        }
        other => cx.err(
            n.at,
            path,
            format!("expected a table, found {}", other.what()),
        ),
    }
    out
}

/// Chaos Toolkit tolerances for numbers: `[lo, hi]`, `{"type": "range", "range": [lo, hi]}`,
/// or a single number, read as a ceiling (an exact error rate would never hold).
fn ctk_tolerance(cx: &mut Cx<'_>, t: &Node, path: &str) -> Option<Tolerance> {
    let pair = |cx: &mut Cx<'_>, n: &Node| -> Option<Tolerance> {
        match &n.v {
            Val::Arr(a) if a.len() == 2 => match (&a[0].v, &a[1].v) {
                (Val::Num(lo), Val::Num(hi)) => Some(Tolerance::Range {
                    min: Some(*lo),
                    max: Some(*hi),
                }),
                _ => {
                    cx.err(n.at, path, "a range is two numbers, [low, high]");
                    None
                }
            },
            _ => {
                cx.err(n.at, path, "a range is two numbers, [low, high]");
                None
            }
        }
    };
    match &t.v {
        Val::Num(x) => Some(Tolerance::Range {
            min: None,
            max: Some(*x),
        }),
        Val::Arr(_) => pair(cx, t),
        Val::Obj(_) => {
            let mut f = Fields::of(cx, t, path)?;
            let ty = f.str(cx, "type");
            if ty.as_deref() != Some("range") {
                cx.err(t.at, path, "only {\"type\": \"range\", \"range\": [low, high]} tolerances are understood for cutover's probes");
                return None;
            }
            let _ = f.take("target");
            let r = f.node("range").and_then(|r| pair(cx, r));
            f.finish(cx, "type, range, target");
            r
        }
        other => {
            cx.err(
                t.at,
                path,
                format!("expected a number or a range, found {}", other.what()),
            );
            None
        }
    }
}

/// An optional string naming a service the config has.
fn service(cx: &mut Cx<'_>, f: &mut Fields<'_>, key: &str) -> Option<String> {
    let at = f.map.iter().find(|(k, _)| *k == key).map(|(_, n)| n.at);
    let s = f.need_str(cx, key)?;
    if !cx.known.services.contains(&s) {
        let at = at.map_or(f.at, |a| locate(cx.text, &s, a));
        let known = cx.known.services.join(", ");
        cx.err(
            at,
            &f.key(key),
            format!("no service named {s:?} in the config (services: {known}); experiments only target cutover's own services"),
        );
        return None;
    }
    Some(s)
}

fn action_kind(cx: &mut Cx<'_>, f: &mut Fields<'_>, kind: &str, at: usize) -> Option<ActionKind> {
    let secs = |d: Option<Duration>| d.unwrap_or(Duration::from_secs(30));
    let k = match kind {
        "kill-instance" => ActionKind::KillInstance {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
            count: f.num(cx, "count").map_or(1, |c| c.max(1.0) as u32),
        },
        "inject-latency" => ActionKind::InjectLatency {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
            instance: f.str(cx, "instance"),
            latency: f.dur(cx, "latency").or_else(|| {
                let (at, key) = (f.at, f.key("latency"));
                cx.err(at, &key, "is required, e.g. latency = \"300ms\"");
                None
            })?,
            jitter: f.dur(cx, "jitter").unwrap_or_default(),
            duration: secs(f.dur(cx, "for")),
        },
        "inject-errors" => ActionKind::InjectErrors {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
            instance: f.str(cx, "instance"),
            rate: rate(cx, f, "rate")?,
            status: f.num(cx, "status").map_or(500, |s| s as u16),
            duration: secs(f.dur(cx, "for")),
        },
        "dependency-failure" => {
            let at_dep = f
                .map
                .iter()
                .find(|(k, _)| *k == "dependency")
                .map(|(_, n)| n.at);
            let dependency = f.need_str(cx, "dependency")?;
            if !cx.known.dependencies.contains(&dependency) {
                let at = at_dep.map_or(f.at, |a| locate(cx.text, &dependency, a));
                let known = cx.known.dependencies.join(", ");
                cx.err(
                    at,
                    &f.key("dependency"),
                    format!("no dependency named {dependency:?} in the config (dependencies: {known}); add a [dependencies.NAME] hop"),
                );
                return None;
            }
            let mode = match f.str(cx, "mode").as_deref().unwrap_or("reset") {
                "reset" => DependencyMode::Reset,
                "blackhole" => DependencyMode::Blackhole,
                "latency" => DependencyMode::Latency(
                    f.dur(cx, "latency").unwrap_or(Duration::from_millis(500)),
                ),
                other => {
                    let (at, key) = (f.at, f.key("mode"));
                    cx.err(
                        at,
                        &key,
                        format!("{other:?} is not one of \"reset\", \"blackhole\", \"latency\""),
                    );
                    return None;
                }
            };
            ActionKind::DependencyFailure {
                dependency,
                mode,
                duration: secs(f.dur(cx, "for")),
            }
        }
        "deployment-rollback" => ActionKind::DeploymentRollback {
            service: service(cx, f, "service")?,
            version: f.need_str(cx, "version")?,
            error_rate: f.num(cx, "error_rate").unwrap_or(0.5),
            within: f.dur(cx, "within").unwrap_or(Duration::from_secs(120)),
        },
        "clear-faults" => ActionKind::ClearFaults {
            service: if f.map.iter().any(|(k, _)| *k == "service") {
                Some(service(cx, f, "service")?)
            } else {
                None
            },
        },
        "abort-rollout" => ActionKind::AbortRollout {
            service: service(cx, f, "service")?,
        },
        "wait" => ActionKind::Wait {
            duration: f.dur(cx, "for").unwrap_or(Duration::from_secs(5)),
        },
        "cpu-stress" => ActionKind::CpuStress {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
            count: f.num(cx, "count").map_or(1, |c| c.max(1.0) as u32),
            load: if f.map.iter().any(|(k, _)| *k == "load") {
                rate(cx, f, "load")?
            } else {
                1.0
            },
            duration: secs(f.dur(cx, "for")),
        },
        "scaling-shock" => {
            let service = service(cx, f, "service")?;
            let factor = f.num(cx, "factor").unwrap_or(3.0);
            if factor <= 1.0 {
                let (at, key) = (f.at, f.key("factor"));
                cx.err(at, &key, format!("{factor} must be above 1: the load becomes factor times what the service gets now"));
                return None;
            }
            let min_rps = f.num(cx, "min_rps").unwrap_or(10.0).max(0.1);
            let max_rps = f.num(cx, "max_rps").unwrap_or(1000.0);
            if max_rps < min_rps {
                let (at, key) = (f.at, f.key("max_rps"));
                cx.err(at, &key, format!("{max_rps} is below min_rps {min_rps}"));
                return None;
            }
            let paths = f.strs(cx, "paths").unwrap_or_else(|| vec!["/".to_owned()]);
            if let Some(bad) = paths.iter().find(|p| !p.starts_with('/')) {
                let (at, key) = (f.at, f.key("paths"));
                cx.err(
                    at,
                    &key,
                    format!("{bad:?} is not a path: paths start with /"),
                );
                return None;
            }
            ActionKind::ScalingShock {
                service,
                factor,
                min_rps,
                max_rps,
                concurrency: f.num(cx, "concurrency").map_or(64, |c| c.max(1.0) as u32),
                paths,
                duration: secs(f.dur(cx, "for")),
            }
        }
        other => {
            cx.err(
                at,
                &f.path,
                format!("unknown action {other:?}; actions: {ACTIONS}"),
            );
            return None;
        }
    };
    Some(k)
}

fn rate(cx: &mut Cx<'_>, f: &mut Fields<'_>, key: &str) -> Option<f64> {
    let at = f.at;
    match f.num(cx, key) {
        Some(r) if r > 0.0 && r <= 1.0 => Some(r),
        Some(r) => {
            cx.err(
                at,
                &f.key(key),
                format!("{r} is a share above 0 and at most 1"),
            );
            None
        }
        None => {
            cx.err(at, &f.key(key), "is required, e.g. rate = 0.2");
            None
        }
    }
}

fn probe_kind(cx: &mut Cx<'_>, f: &mut Fields<'_>, kind: &str, at: usize) -> Option<ProbeKind> {
    let window =
        |cx: &mut Cx<'_>, f: &mut Fields<'_>| f.dur(cx, "window").unwrap_or(Duration::from_secs(5));
    let k = match kind {
        "error-rate" => ProbeKind::ErrorRate {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
            window: window(cx, f),
        },
        "p99" | "p99-latency" => ProbeKind::P99 {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
            window: window(cx, f),
        },
        "slo-burn-rate" | "burn-rate" => {
            let service = service(cx, f, "service")?;
            let named: Vec<&String> = cx
                .known
                .slos
                .iter()
                .filter(|(s, _)| *s == service)
                .map(|(_, n)| n)
                .collect();
            let slo = match f.str(cx, "slo") {
                Some(n) if named.contains(&&n) => n,
                Some(n) => {
                    let (at, key) = (f.at, f.key("slo"));
                    let list: Vec<&str> = named.iter().map(|n| n.as_str()).collect();
                    cx.err(
                        at,
                        &key,
                        format!(
                            "{service} has no SLO named {n:?} (its SLOs: {})",
                            if list.is_empty() {
                                "none".to_owned()
                            } else {
                                list.join(", ")
                            }
                        ),
                    );
                    return None;
                }
                None => match named.first() {
                    Some(n) => (*n).clone(),
                    None => {
                        let (at, key) = (f.at, f.key("slo"));
                        cx.err(
                            at,
                            &key,
                            format!("{service} has no SLO: add a [[services.{service}.slo]]"),
                        );
                        return None;
                    }
                },
            };
            ProbeKind::SloBurnRate {
                service,
                slo,
                window: f.dur(cx, "window").unwrap_or(Duration::from_secs(10)),
            }
        }
        "healthy-instances" => ProbeKind::HealthyInstances {
            service: service(cx, f, "service")?,
            version: f.str(cx, "version"),
        },
        "http" => ProbeKind::Http {
            url: f.need_str(cx, "url")?,
            method: f.str(cx, "method").unwrap_or_else(|| "GET".into()),
            headers: f
                .node("headers")
                .map(|h| string_map(cx, h, "headers"))
                .unwrap_or_default(),
            timeout: f.dur(cx, "timeout").unwrap_or(Duration::from_secs(5)),
        },
        other => {
            cx.err(
                at,
                &f.path,
                format!("unknown probe {other:?}; probes: {PROBES}"),
            );
            return None;
        }
    };
    Some(k)
}

#[cfg(test)]
mod tests;
