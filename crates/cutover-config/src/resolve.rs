//! Raw config → validated settings: every check a user can fail, with its exact location.
//!
//! It never stops at the first problem: each check records a diagnostic and goes on with a
//! fallback value, so a user fixes everything in one pass. It reads no files, binds no sockets
//! and starts nothing; addresses are only compared with each other.

mod safety;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_core::{
    AnalysisSpec, BlueGreenSpec, CanaryStep, HealthSpec, NoEvidence, RollingSpec, RolloutSpec,
    ServiceName, StrategyKind, Version, Weight,
};

use crate::raw::{Raw, RawAnalysisOrOff, RawDocker, RawService, S, line_col};
use crate::{
    ConfigError, DaemonSettings, Diagnostic, DockerSettings, NotifySettings, RuntimeSettings,
    ServiceSettings, Settings,
};

/// `"250ms"`, `"10s"`, `"5m"`, `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like \"250ms\", \"10s\" or \"5m\" ({e})"))
}

/// Collects diagnostics while resolving.
pub(crate) struct Ctx<'a> {
    pub(crate) text: &'a str,
    pub(crate) file: &'a Path,
    pub(crate) diags: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn warn<T>(&mut self, v: &S<T>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, v.span().start);
        self.warnings.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(crate) fn err_at(
        &mut self,
        offset: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = line_col(self.text, offset);
        self.diags.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(crate) fn err<T>(&mut self, v: &S<T>, key: impl Into<String>, message: impl Into<String>) {
        self.err_at(v.span().start, key, message);
    }

    fn addr(&mut self, v: &S<String>, key: &str) -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    v,
                    key,
                    format!(
                        "{:?} is not an address like \"127.0.0.1:8080\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    pub(crate) fn duration(
        &mut self,
        v: Option<&S<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.err(v, key, "must be longer than 0");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(v, key, e);
                default
            }
        }
    }

    /// A duration that may be zero (`scale_down_delay = "0s"` stops the old version at once).
    pub(crate) fn duration_or_zero(&mut self, v: &S<String>, key: &str) -> Duration {
        parse_duration(v.get_ref()).unwrap_or_else(|e| {
            self.err(v, key, e);
            Duration::ZERO
        })
    }

    pub(crate) fn count(
        &mut self,
        v: Option<&S<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: u32,
    ) -> u32 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min {
            self.err(v, key, format!("{n} is below {min}"));
            default
        } else if n > max {
            self.err(v, key, format!("{n} is above {max}"));
            default
        } else {
            u32::try_from(n).unwrap_or(default)
        }
    }
}

fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A program written as a relative path (`./shop`, `bin/shop`) is the one beside the config
/// file, like `state_dir`, wherever cutover is run from; the path is made absolute so that
/// `validate` shows what will run. A bare name (`python3`, or `cutover` for cutover itself) is
/// looked up in PATH when the instance starts, as a shell would.
fn resolve_program(program: &str, base: &Path) -> String {
    let p = Path::new(program);
    if p.is_absolute() || p.components().count() < 2 {
        return program.to_owned();
    }
    let joined = base.join(p);
    std::path::absolute(&joined)
        .unwrap_or(joined)
        .to_string_lossy()
        .into_owned()
}

/// The directory relative paths in the config resolve against: the config file's.
pub(crate) fn config_dir(file: &Path) -> PathBuf {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned()
}

pub fn resolve(raw: Raw, text: &str, file: &Path) -> Result<Settings, ConfigError> {
    let mut cx = Ctx {
        text,
        file,
        diags: Vec::new(),
        warnings: Vec::new(),
    };
    let base = config_dir(file);

    let mut daemon = DaemonSettings {
        api: SocketAddr::from(([127, 0, 0, 1], 7070)),
        metrics: None,
        state_dir: base.join(".cutover"),
        worker_threads: 0,
    };
    if let Some(d) = &raw.daemon {
        let d = d.get_ref();
        if let Some(a) = &d.api {
            daemon.api = cx.addr(a, "daemon.api").unwrap_or(daemon.api);
            if !daemon.api.ip().is_loopback() {
                cx.warn(
                    a,
                    "daemon.api",
                    format!(
                        "{} is reachable from other machines: the API and dashboard (deploy, abort, `--env` values) are then guarded by the token alone, sent in clear over HTTP; listen on 127.0.0.1 and reach it through SSH or a TLS proxy unless this is meant",
                        daemon.api
                    ),
                );
            }
        }
        if let Some(s) = &d.state_dir {
            if s.get_ref().trim().is_empty() {
                cx.err(s, "daemon.state_dir", "must not be empty");
            } else {
                let p = PathBuf::from(s.get_ref());
                daemon.state_dir = if p.is_absolute() { p } else { base.join(p) };
            }
        }
        daemon.worker_threads = cx.count(
            d.worker_threads.as_ref(),
            "daemon.worker_threads",
            0,
            1024,
            0,
        ) as usize;
    }

    let mut notify = NotifySettings::default();
    if let Some(n) = &raw.notify
        && let Some(w) = &n.get_ref().webhook
    {
        if w.get_ref().starts_with("http://") && w.get_ref().len() > "http://".len() {
            notify.webhook = Some(w.get_ref().clone());
        } else {
            cx.err(
                w,
                "notify.webhook",
                format!("{:?} must be an http:// URL", w.get_ref()),
            );
        }
    }

    if raw.services.is_empty() {
        cx.err_at(
            text.len(),
            "services",
            "no service is configured; add a [services.NAME] table (see `cutover init`)",
        );
    }
    // Where each listen address was claimed, to report collisions at the second use.
    let mut listens: BTreeMap<SocketAddr, String> =
        BTreeMap::from([(daemon.api, "daemon.api".to_owned())]);
    if let Some(m) = raw
        .daemon
        .as_ref()
        .and_then(|d| d.get_ref().metrics.as_ref())
    {
        // Checked like the services' listeners: a fixed port, and no address used twice.
        daemon.metrics = claim(&mut cx, &mut listens, m, "daemon.metrics".to_owned());
        if let Some(a) = daemon.metrics.filter(|a| !a.ip().is_loopback()) {
            cx.warn(
                m,
                "daemon.metrics",
                format!(
                    "{a} is reachable from other machines, and /metrics there needs no token (service and version names, traffic, error rates); listen on 127.0.0.1 unless this is meant"
                ),
            );
        }
    }
    let mut services = Vec::new();
    // Checked in file order, so a collision is reported where the second use is written.
    let mut in_file_order: Vec<_> = raw.services.iter().collect();
    in_file_order.sort_by_key(|(name, svc)| (svc.span().start, name.span().start));
    for (name, svc) in in_file_order {
        if !valid_service_name(name.get_ref()) {
            cx.err(
                name,
                format!("services.{}", name.get_ref()),
                "service names use lowercase letters, digits and '-'",
            );
            continue;
        }
        if let Some(s) = service(&mut cx, name.get_ref(), svc, &mut listens) {
            services.push(s);
        }
    }
    services.sort_by(|a: &ServiceSettings, b| a.name.as_str().cmp(b.name.as_str()));
    let dependencies = chaos::dependencies(&mut cx, &raw, &mut listens);
    let backups = safety::backups(&mut cx, raw.backups.as_ref(), &daemon.state_dir);
    let service_names = raw.services.keys().map(|n| n.get_ref().clone()).collect();
    let signals = crate::signals::resolve(
        &mut cx,
        raw.alerts.as_ref(),
        raw.policy.as_ref(),
        raw.dora.as_ref(),
        &service_names,
    );
    if cx.diags.is_empty() {
        cx.warnings.sort_by_key(|d| (d.line, d.column));
        Ok(Settings {
            file: file.to_owned(),
            daemon,
            services,
            notify,
            dependencies,
            backups,
            signals,
            warnings: cx.warnings,
        })
    } else {
        cx.diags.sort_by_key(|d| (d.line, d.column));
        Err(ConfigError {
            diagnostics: cx.diags,
        })
    }
}

mod chaos;

fn claim(
    cx: &mut Ctx<'_>,
    listens: &mut BTreeMap<SocketAddr, String>,
    v: &S<String>,
    key: String,
) -> Option<SocketAddr> {
    let a = cx.addr(v, &key)?;
    if a.port() == 0 {
        let scraped = key == "daemon.metrics";
        cx.err(
            v,
            key,
            if scraped {
                format!("{a} has port 0; Prometheus needs a fixed port to scrape")
            } else {
                format!("{a} has port 0; users need a fixed port to send traffic to")
            },
        );
        return None;
    }
    // A wildcard address (0.0.0.0, [::]) takes its port on every interface, so it collides
    // with any other address on the same port, not only with an identical one.
    let clash = listens.iter().find(|(b, _)| {
        b.port() == a.port()
            && (b.ip() == a.ip() || b.ip().is_unspecified() || a.ip().is_unspecified())
    });
    if let Some((b, other)) = clash {
        let message = if *b == a {
            format!("{a} is already used by {other}")
        } else {
            format!("{a} collides with {b} of {other} (same port)")
        };
        cx.err(v, key, message);
        return None;
    }
    listens.insert(a, key);
    Some(a)
}

fn service(
    cx: &mut Ctx<'_>,
    name: &str,
    s: &S<RawService>,
    listens: &mut BTreeMap<SocketAddr, String>,
) -> Option<ServiceSettings> {
    let k = |key: &str| format!("services.{name}.{key}");
    let at = s.span().start;
    let s = s.get_ref();
    let errors_before = cx.diags.len();

    let listen = match &s.listen {
        Some(l) => claim(cx, listens, l, k("listen")),
        None => {
            cx.err_at(
                at,
                k("listen"),
                "is required: the address users send traffic to, e.g. \"127.0.0.1:8080\"",
            );
            None
        }
    };
    let runtime_name = s
        .runtime
        .as_ref()
        .map(|r| r.get_ref().as_str())
        .unwrap_or("process");
    let version = match &s.version {
        Some(v) => match Version::parse(v.get_ref()) {
            Ok(v) => Some(v),
            Err(e) => {
                cx.err(v, k("version"), e.to_string());
                None
            }
        },
        None => Some(Version::new("v1")),
    };

    if runtime_name != "docker" {
        only_docker(cx, s, name, runtime_name);
    }
    let runtime = match runtime_name {
        "docker" => docker(cx, s, name, at),
        "process" => {
            if let Some(u) = &s.upstreams {
                cx.err(
                    u,
                    k("upstreams"),
                    "only static services have upstreams; remove it or set runtime = \"static\"",
                );
            }
            match &s.command {
                None => {
                    cx.err_at(at, k("command"), "is required for process services, e.g. [\"./app\", \"--port\", \"{port}\"]");
                    None
                }
                Some(c) if c.get_ref().is_empty() || c.get_ref()[0].get_ref().trim().is_empty() => {
                    cx.err(c, k("command"), "must name a program to run");
                    None
                }
                Some(c) => {
                    let reads_port = s.reads_port_env.as_ref().is_some_and(|r| *r.get_ref());
                    if !reads_port && !c.get_ref().iter().any(|a| a.get_ref().contains("{port}")) {
                        cx.err(
                            c,
                            k("command"),
                            "has no {port} placeholder; pass the port cutover chooses (e.g. \"--port\", \"{port}\"), or set reads_port_env = true if the program reads PORT",
                        );
                    }
                    let mut command: Vec<String> =
                        c.get_ref().iter().map(|a| a.get_ref().clone()).collect();
                    if let Some(program) = command.first_mut() {
                        *program = resolve_program(program, &config_dir(cx.file));
                    }
                    Some(RuntimeSettings::Process {
                        command,
                        env: s
                            .env
                            .as_ref()
                            .map(|e| e.get_ref().clone())
                            .unwrap_or_default(),
                    })
                }
            }
        }
        "static" => {
            if let Some(c) = &s.command {
                cx.err(
                    c,
                    k("command"),
                    "static services run nothing; remove it or set runtime = \"process\"",
                );
            }
            if let Some(e) = &s.env {
                cx.err(
                    e,
                    k("env"),
                    "static services run nothing, so env has no effect; remove it or set runtime = \"process\"",
                );
            }
            if let Some(r) = &s.reads_port_env {
                cx.err(
                    r,
                    k("reads_port_env"),
                    "only process services are given a port; remove it or set runtime = \"process\"",
                );
            }
            match &s.upstreams {
                None => {
                    cx.err_at(
                        at,
                        k("upstreams"),
                        "is required for static services, e.g. { v1 = [\"127.0.0.1:18081\"] }",
                    );
                    None
                }
                Some(u) => {
                    let mut map = BTreeMap::new();
                    for (v, addrs) in u.get_ref() {
                        let key = format!("{}.{}", k("upstreams"), v.get_ref());
                        if let Err(e) = Version::parse(v.get_ref()) {
                            cx.err(v, key.clone(), e.to_string());
                        }
                        if addrs.get_ref().is_empty() {
                            cx.err(addrs, key.clone(), "has no addresses; list at least one");
                        }
                        let list: Vec<SocketAddr> = addrs
                            .get_ref()
                            .iter()
                            .enumerate()
                            .filter_map(|(i, a)| cx.addr(a, &format!("{key}[{i}]")))
                            .collect();
                        map.insert(Version::new(v.get_ref()), list);
                    }
                    if map.is_empty() {
                        cx.err(u, k("upstreams"), "lists no version");
                    }
                    if let Some(v) = &version
                        && !map.is_empty()
                        && !map.contains_key(v)
                    {
                        let known: Vec<&str> = map.keys().map(Version::as_str).collect();
                        match &s.version {
                            Some(raw_v) => cx.err(
                                raw_v,
                                k("version"),
                                format!("{v} has no upstreams; configured: {}", known.join(", ")),
                            ),
                            // Without a version the default v1 is deployed, so say so where the
                            // user will look: at the upstreams that lack it.
                            None => cx.err(
                                u,
                                k("upstreams"),
                                format!(
                                    "has no entry for version {v} (the default); set version to one of: {}",
                                    known.join(", ")
                                ),
                            ),
                        }
                    }
                    Some(RuntimeSettings::Static { upstreams: map })
                }
            }
        }
        other => {
            if let Some(r) = &s.runtime {
                cx.err(
                    r,
                    k("runtime"),
                    format!(
                        "{other:?} is not a runtime; use \"process\", \"static\" or \"docker\""
                    ),
                );
            }
            None
        }
    };

    let strategy = match &s.strategy {
        None => StrategyKind::Canary,
        Some(v) => StrategyKind::parse(v.get_ref()).unwrap_or_else(|| {
            cx.err(
                v,
                k("strategy"),
                format!(
                    "{:?} is not a strategy; use \"canary\", \"blue-green\" or \"rolling\"",
                    v.get_ref()
                ),
            );
            StrategyKind::Canary
        }),
    };
    let defaults = RolloutSpec::default();
    let instances = cx.count(
        s.instances.as_ref(),
        &k("instances"),
        1,
        1000,
        defaults.instances,
    );

    let health = {
        let d = HealthSpec::default();
        match &s.health {
            None => d,
            Some(h) => {
                let h = h.get_ref();
                let path = match &h.path {
                    Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
                    Some(p) => {
                        cx.err(
                            p,
                            k("health.path"),
                            format!("{:?} must start with '/'", p.get_ref()),
                        );
                        d.path.clone()
                    }
                    None => d.path.clone(),
                };
                let errors = cx.diags.len();
                let interval = cx.duration(h.interval.as_ref(), &k("health.interval"), d.interval);
                // A short interval shortens the default timeout with it, so the default is
                // always valid.
                let timeout = cx.duration(
                    h.timeout.as_ref(),
                    &k("health.timeout"),
                    d.timeout.min(interval / 2),
                );
                // Compared only when both parsed: after a bad value the fallback would produce
                // a second, misleading complaint.
                if let Some(t) = &h.timeout
                    && cx.diags.len() == errors
                    && timeout >= interval
                {
                    cx.err(
                        t,
                        k("health.timeout"),
                        format!(
                            "{} must be shorter than health.interval ({})",
                            t.get_ref(),
                            humantime::format_duration(interval)
                        ),
                    );
                }
                HealthSpec {
                    path,
                    interval,
                    timeout,
                    healthy_threshold: cx.count(
                        h.healthy_threshold.as_ref(),
                        &k("health.healthy_threshold"),
                        1,
                        100,
                        d.healthy_threshold,
                    ),
                    unhealthy_threshold: cx.count(
                        h.unhealthy_threshold.as_ref(),
                        &k("health.unhealthy_threshold"),
                        1,
                        100,
                        d.unhealthy_threshold,
                    ),
                }
            }
        }
    };

    let canary_steps = match s.canary.as_ref().and_then(|c| c.get_ref().steps.as_ref()) {
        None => defaults.canary_steps.clone(),
        Some(steps) => canary_steps(cx, &k("canary.steps"), steps),
    };

    let blue_green = match &s.blue_green {
        None => BlueGreenSpec::default(),
        Some(b) => {
            let b = b.get_ref();
            let d = BlueGreenSpec::default();
            BlueGreenSpec {
                auto_promote: b
                    .auto_promote
                    .as_ref()
                    .map_or(d.auto_promote, |v| *v.get_ref()),
                preview_listen: b
                    .preview_listen
                    .as_ref()
                    .and_then(|p| claim(cx, listens, p, k("blue_green.preview_listen"))),
            }
        }
    };
    // `scale_down_delay` is the service's since every strategy keeps the old version warm;
    // `[blue_green] scale_down_delay`, where it used to live, still works.
    let old_delay = s
        .blue_green
        .as_ref()
        .and_then(|b| b.get_ref().scale_down_delay.as_ref());
    let scale_down_delay = match (&s.scale_down_delay, old_delay) {
        (Some(_), Some(old)) => {
            cx.err(
                old,
                k("blue_green.scale_down_delay"),
                "is also set as services.NAME.scale_down_delay; keep only that one",
            );
            defaults.scale_down_delay
        }
        (Some(v), None) => cx.duration_or_zero(v, &k("scale_down_delay")),
        (None, Some(v)) => cx.duration_or_zero(v, &k("blue_green.scale_down_delay")),
        (None, None) => defaults.scale_down_delay,
    };

    let rolling = match &s.rolling {
        None => RollingSpec::default(),
        Some(r) => {
            let r = r.get_ref();
            let d = RollingSpec::default();
            let spec = RollingSpec {
                max_surge: cx.count(
                    r.max_surge.as_ref(),
                    &k("rolling.max_surge"),
                    0,
                    1000,
                    d.max_surge,
                ),
                max_unavailable: cx.count(
                    r.max_unavailable.as_ref(),
                    &k("rolling.max_unavailable"),
                    0,
                    1000,
                    d.max_unavailable,
                ),
            };
            if spec.max_surge == 0
                && spec.max_unavailable == 0
                && let Some(v) = r.max_surge.as_ref().or(r.max_unavailable.as_ref())
            {
                cx.err(
                    v,
                    k("rolling"),
                    "max_surge and max_unavailable cannot both be 0: nothing could be replaced",
                );
            }
            spec
        }
    };

    let analysis = match s.analysis.as_ref().map(|a| (a, a.get_ref())) {
        None => AnalysisSpec::default(),
        Some((at, RawAnalysisOrOff::Off(on))) => {
            if *on {
                cx.err(
                    at,
                    k("analysis"),
                    "`analysis = true` is the default; write an [analysis] table to tune it, or `analysis = false` to turn it off",
                );
            }
            AnalysisSpec {
                enabled: false,
                ..AnalysisSpec::default()
            }
        }
        Some((_, RawAnalysisOrOff::Table(a))) => {
            let d = AnalysisSpec::default();
            let max_error_rate = match &a.max_error_rate {
                Some(v) if !(0.0..=1.0).contains(v.get_ref()) => {
                    cx.err(
                        v,
                        k("analysis.max_error_rate"),
                        format!("{} is a share between 0 and 1 (0.01 = 1%)", v.get_ref()),
                    );
                    d.max_error_rate
                }
                Some(v) => Some(*v.get_ref()),
                None => d.max_error_rate,
            };
            let on_no_evidence = match &a.on_no_evidence {
                None => d.on_no_evidence,
                Some(v) => NoEvidence::parse(v.get_ref()).unwrap_or_else(|| {
                    cx.err(
                        v,
                        k("analysis.on_no_evidence"),
                        format!(
                            "{:?} is not one of \"pause\", \"rollback\", \"promote\"",
                            v.get_ref()
                        ),
                    );
                    d.on_no_evidence
                }),
            };
            AnalysisSpec {
                enabled: true,
                interval: cx.duration(a.interval.as_ref(), &k("analysis.interval"), d.interval),
                min_requests: u64::from(cx.count(
                    a.min_requests.as_ref(),
                    &k("analysis.min_requests"),
                    1,
                    1_000_000_000,
                    50,
                )),
                max_error_rate,
                max_p99: match &a.max_p99 {
                    Some(v) => Some(cx.duration(
                        Some(v),
                        &k("analysis.max_p99"),
                        Duration::from_millis(500),
                    )),
                    None => d.max_p99,
                },
                failure_limit: cx.count(
                    a.failure_limit.as_ref(),
                    &k("analysis.failure_limit"),
                    1,
                    1000,
                    d.failure_limit,
                ),
                compare_to_stable: a
                    .compare_to_stable
                    .as_ref()
                    .map_or(d.compare_to_stable, |v| *v.get_ref()),
                deadline: cx.duration(
                    a.analysis_deadline.as_ref(),
                    &k("analysis.analysis_deadline"),
                    d.deadline,
                ),
                on_no_evidence,
            }
        }
    };

    let safety = safety::service(cx, name, s);
    let rollout = RolloutSpec {
        steps: safety.steps(),
        strategy,
        instances,
        canary_steps,
        blue_green,
        rolling,
        analysis,
        progress_deadline: cx.duration(
            s.progress_deadline.as_ref(),
            &k("progress_deadline"),
            defaults.progress_deadline,
        ),
        drain_timeout: cx.duration(
            s.drain_timeout.as_ref(),
            &k("drain_timeout"),
            defaults.drain_timeout,
        ),
        stop_timeout: cx.duration(
            s.stop_timeout.as_ref(),
            &k("stop_timeout"),
            defaults.stop_timeout,
        ),
        scale_down_delay,
        runs_instances: runtime_name != "static",
    };
    let upstream_timeout = cx.duration(
        s.upstream_timeout.as_ref(),
        &k("upstream_timeout"),
        Duration::from_secs(30),
    );

    // The daemon derives a default from its descriptor limit; a million connections is more
    // than any one process's descriptors allow anyway.
    let max_connections = s
        .max_connections
        .as_ref()
        .map(|v| cx.count(Some(v), &k("max_connections"), 1, 1_000_000, 1));

    let synthetic = match s.analysis.as_ref().map(|a| a.get_ref()) {
        Some(RawAnalysisOrOff::Table(a)) => a
            .synthetic
            .as_ref()
            .and_then(|v| chaos::synthetic(cx, v, &k("analysis.synthetic"))),
        _ => None,
    };
    let probes = s
        .probe
        .as_ref()
        .map(|p| chaos::probes(cx, p, &k("probe")))
        .unwrap_or_default();
    let slos = crate::signals::slos(cx, name, s.slo.as_ref());
    let env_file = s.env_file.as_ref().and_then(|f| {
        if runtime_name == "static" {
            cx.err(
                f,
                k("env_file"),
                "static services run nothing, so env_file has no effect; remove it or set runtime = \"process\"",
            );
            return None;
        }
        let path = beside(&config_dir(cx.file), f.get_ref());
        // Checked now so that a mistake is found before a deploy; read again at each start.
        match crate::read_env_file(&path) {
            Ok(_) => Some(path),
            Err(e) => {
                cx.err(f, k("env_file"), e);
                None
            }
        }
    });

    if cx.diags.len() > errors_before {
        return None;
    }
    Some(ServiceSettings {
        name: ServiceName::new(name),
        listen: listen?,
        version: version?,
        runtime: runtime?,
        health,
        rollout,
        upstream_timeout,
        max_connections,
        synthetic,
        probes,
        safety,
        slos,
        env_file,
    })
}

fn canary_steps(
    cx: &mut Ctx<'_>,
    key: &str,
    steps: &S<Vec<S<crate::raw::RawStep>>>,
) -> Vec<CanaryStep> {
    let mut out = Vec::new();
    let mut last_weight: Option<(i64, usize)> = None;
    // After a bad weight the "last step must be 100" check would only repeat the same mistake.
    let mut bad_weight = false;
    if steps.get_ref().is_empty() {
        cx.err(
            steps,
            key,
            "needs at least one step, e.g. [ { weight = 10, pause = \"1m\" }, { weight = 100 } ]",
        );
        return out;
    }
    for (i, st) in steps.get_ref().iter().enumerate() {
        let sk = format!("{key}[{i}]");
        let step = st.get_ref();
        match (&step.weight, &step.approve) {
            (Some(w), None) => {
                let n = *w.get_ref();
                let pause = step
                    .pause
                    .as_ref()
                    .map(|p| cx.duration(Some(p), &format!("{sk}.pause"), Duration::from_secs(1)));
                if n < 0 {
                    cx.err(w, format!("{sk}.weight"), format!("{n} is below 0"));
                    bad_weight = true;
                    continue;
                }
                if n > 100 {
                    cx.err(w, format!("{sk}.weight"), format!("{n} is above 100"));
                    bad_weight = true;
                    continue;
                }
                if let Some((prev, j)) = last_weight
                    && n <= prev
                {
                    cx.err(
                        w,
                        format!("{sk}.weight"),
                        format!("{n} is not above step {j}'s weight {prev}; weights must increase"),
                    );
                }
                last_weight = Some((n, i));
                out.push(CanaryStep::SetWeight {
                    weight: Weight::new(u32::try_from(n).unwrap_or(100)).unwrap_or(Weight::FULL),
                    pause,
                    analysis: step.analysis.as_ref().is_none_or(|a| *a.get_ref()),
                });
            }
            (None, Some(a)) if *a.get_ref() => {
                if let Some(x) = &step.analysis {
                    cx.err(
                        x,
                        format!("{sk}.analysis"),
                        "an approval step is a person's decision; analysis applies to weight steps",
                    );
                }
                if let Some(p) = &step.pause {
                    cx.err(
                        p,
                        format!("{sk}.pause"),
                        "an approval step waits for `cutover promote`; it takes no pause",
                    );
                }
                out.push(CanaryStep::Approve);
            }
            (None, Some(a)) => cx.err(
                a,
                format!("{sk}.approve"),
                "only `approve = true` makes sense; remove the step instead",
            ),
            (Some(w), Some(_)) => cx.err(
                w,
                sk,
                "a step sets either weight (with an optional pause) or approve = true, not both",
            ),
            (None, None) => cx.err(
                st,
                sk,
                "a step needs weight = N (0-100, optional pause) or approve = true",
            ),
        }
    }
    if bad_weight {
        return out;
    }
    if let Some((n, i)) = last_weight
        && n != 100
        && let Some(w) = steps.get_ref()[i].get_ref().weight.as_ref()
    {
        cx.err(
            w,
            format!("{key}[{i}].weight"),
            format!("the last weight step is {n}; it must be 100 so the rollout can finish"),
        );
    } else if last_weight.is_none() && !out.is_empty() {
        cx.err(
            steps,
            key,
            "has no weight step; add { weight = 100 } at the end",
        );
    }
    out
}

/// `"256MiB"`, `"1GiB"`, `"512KiB"`, Docker's `"256m"`/`"1g"`/`"512k"` (binary units too), or
/// a plain number of bytes. Decimal units (`MB`) are refused rather than guessed at.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" | "mb" | "gb" => {
            return Err(format!(
                "{s:?}: write binary units, as Docker means them: KiB, MiB or GiB (e.g. \"256MiB\")"
            ));
        }
        _ => {
            return Err(format!(
                "{s:?} is not a size like \"256MiB\", \"1GiB\" or \"512m\""
            ));
        }
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"256MiB\", \"1GiB\" or \"512m\""))?;
    let bytes = n * factor as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Docker's smallest memory limit.
const MIN_MEMORY: u64 = 6 << 20;

/// Keys only docker services take, on a service of another runtime: each is an error.
fn only_docker(cx: &mut Ctx<'_>, s: &RawService, name: &str, runtime: &str) {
    let k = |key: &str| format!("services.{name}.{key}");
    let why = format!(
        "only docker services take it; remove it or set runtime = \"docker\" (this service is {runtime})"
    );
    if let Some(v) = &s.image {
        cx.err(v, k("image"), why.clone());
    }
    if let Some(v) = &s.port {
        cx.err(v, k("port"), why.clone());
    }
    if let Some(v) = &s.docker {
        cx.err(v, k("docker"), why);
    }
}

/// `runtime = "docker"`: image, port, command (optional), env and the `[docker]` table.
fn docker(cx: &mut Ctx<'_>, s: &RawService, name: &str, at: usize) -> Option<RuntimeSettings> {
    let k = |key: &str| format!("services.{name}.{key}");
    if let Some(u) = &s.upstreams {
        cx.err(
            u,
            k("upstreams"),
            "only static services have upstreams; remove it or set runtime = \"static\"",
        );
    }
    if let Some(r) = &s.reads_port_env {
        cx.err(
            r,
            k("reads_port_env"),
            "a docker service's app always gets PORT (the container's `port`); remove it",
        );
    }
    let image = match &s.image {
        None => {
            cx.err_at(
                at,
                k("image"),
                "is required for docker services, e.g. \"shop:{version}\"",
            );
            None
        }
        Some(i) => {
            let text = i.get_ref().trim();
            // What the Engine accepts in a reference, with the placeholder allowed.
            let valid = !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-/:@{}".contains(c))
                && text
                    .replace("{version}", "")
                    .chars()
                    .all(|c| c != '{' && c != '}');
            if valid {
                Some(text.to_owned())
            } else {
                cx.err(
                    i,
                    k("image"),
                    format!(
                        "{:?} is not an image reference like \"shop:{{version}}\" or \"registry.example/shop:{{version}}\"",
                        i.get_ref()
                    ),
                );
                None
            }
        }
    };
    let port = match &s.port {
        None => {
            cx.err_at(
                at,
                k("port"),
                "is required for docker services: the port the app listens on inside its container, e.g. 8080",
            );
            None
        }
        Some(p) => match u16::try_from(*p.get_ref()) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                cx.err(
                    p,
                    k("port"),
                    format!("{} is not a port (1-65535)", p.get_ref()),
                );
                None
            }
        },
    };
    let command = match &s.command {
        None => None,
        Some(c) if c.get_ref().is_empty() || c.get_ref()[0].get_ref().trim().is_empty() => {
            cx.err(
                c,
                k("command"),
                "must name a program to run in the container, or be left out to run the image's own command",
            );
            None
        }
        Some(c) => Some(c.get_ref().iter().map(|a| a.get_ref().clone()).collect()),
    };
    let env = s
        .env
        .as_ref()
        .map(|e| e.get_ref().clone())
        .unwrap_or_default();
    let d = s.docker.as_ref().map(|d| d.get_ref());
    let options = docker_table(cx, d, name);
    let (image, port) = (image?, port?);
    let mut settings = options?;
    settings.image = image;
    settings.port = port;
    settings.command = command;
    settings.env = env;
    Some(RuntimeSettings::Docker(Box::new(settings)))
}

/// The `[services.X.docker]` table (all optional); image and port are filled in by the caller.
fn docker_table(cx: &mut Ctx<'_>, d: Option<&RawDocker>, name: &str) -> Option<DockerSettings> {
    let k = |key: &str| format!("services.{name}.docker.{key}");
    let errors = cx.diags.len();
    let base = config_dir(cx.file);
    let mut out = DockerSettings {
        image: String::new(),
        port: 0,
        command: None,
        env: BTreeMap::new(),
        build: None,
        dockerfile: "Dockerfile".to_owned(),
        pull: false,
        cpus: None,
        memory: None,
        volumes: Vec::new(),
        network: None,
        host: None,
        labels: BTreeMap::new(),
    };
    let Some(d) = d else {
        return Some(out);
    };
    if let Some(b) = &d.build {
        if b.get_ref().trim().is_empty() {
            cx.err(b, k("build"), "must name the build context, e.g. \".\"");
        } else {
            out.build = Some(beside(&base, b.get_ref()));
        }
    }
    if let Some(f) = &d.dockerfile {
        let p = Path::new(f.get_ref());
        if d.build.is_none() {
            cx.err(
                f,
                k("dockerfile"),
                "is read from the build context; set build too (e.g. build = \".\")",
            );
        } else if f.get_ref().trim().is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            cx.err(
                f,
                k("dockerfile"),
                format!(
                    "{:?} must be a path inside the build context, like \"Dockerfile\" or \"deploy/Dockerfile\"",
                    f.get_ref()
                ),
            );
        } else {
            out.dockerfile = f.get_ref().clone();
        }
    }
    out.pull = d.pull.as_ref().is_some_and(|p| *p.get_ref());
    if let Some(c) = &d.cpus {
        let n = *c.get_ref();
        if n.is_finite() && n > 0.0 && n <= 1024.0 {
            out.cpus = Some(n);
        } else {
            cx.err(
                c,
                k("cpus"),
                format!("{n} is not a number of CPUs above 0 (0.5 = half a core)"),
            );
        }
    }
    if let Some(m) = &d.memory {
        match parse_memory(m.get_ref()) {
            Ok(b) if b < MIN_MEMORY => cx.err(
                m,
                k("memory"),
                format!("{:?} is below Docker's smallest limit, 6MiB", m.get_ref()),
            ),
            Ok(b) => out.memory = Some(b),
            Err(e) => cx.err(m, k("memory"), e),
        }
    }
    if let Some(vs) = &d.volumes {
        for (i, v) in vs.get_ref().iter().enumerate() {
            match volume(v.get_ref(), &base) {
                Ok(spec) => out.volumes.push(spec),
                Err(e) => cx.err(v, format!("{}[{i}]", k("volumes")), e),
            }
        }
    }
    if let Some(n) = &d.network {
        match n.get_ref().trim() {
            "" => cx.err(n, k("network"), "must name a network, e.g. \"bridge\""),
            "host" | "none" => cx.err(
                n,
                k("network"),
                format!(
                    "{:?} gives containers no port of their own to publish on 127.0.0.1; use \"bridge\" or a network of your own",
                    n.get_ref()
                ),
            ),
            net => out.network = Some(net.to_owned()),
        }
    }
    if let Some(h) = &d.host {
        let text = h.get_ref().trim();
        let ok = ["unix://", "tcp://", "http://"]
            .iter()
            .any(|p| text.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
        if ok {
            out.host = Some(text.to_owned());
        } else {
            cx.err(
                h,
                k("host"),
                format!(
                    "{:?} is not an Engine address like \"unix:///var/run/docker.sock\" or \"tcp://127.0.0.1:2375\"",
                    h.get_ref()
                ),
            );
        }
    }
    if let Some(l) = &d.labels {
        for (key, value) in l.get_ref() {
            if key.starts_with("io.cutover.") {
                cx.err(
                    l,
                    k("labels"),
                    format!("{key:?}: io.cutover.* labels are cutover's own; choose another name"),
                );
            } else if key.is_empty() {
                cx.err(l, k("labels"), "a label needs a name");
            } else {
                out.labels.insert(key.clone(), value.clone());
            }
        }
    }
    (cx.diags.len() == errors).then_some(out)
}

/// A volume as Docker takes it: `name:/path[:opts]` (a named volume) or `host/path:/path[:opts]`
/// (a bind mount; a relative host path is the one beside the config file).
fn volume(v: &str, base: &Path) -> Result<String, String> {
    let bad = || {
        format!("{v:?} is not a volume like \"shop-data:/data\" or \"./uploads:/app/uploads:ro\"")
    };
    let mut parts = v.splitn(3, ':');
    let (Some(source), Some(target)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    let opts = parts.next();
    if source.is_empty() || !target.starts_with('/') {
        return Err(bad());
    }
    if let Some(o) = opts
        && !o.split(',').all(|x| {
            matches!(
                x,
                "ro" | "rw"
                    | "z"
                    | "Z"
                    | "nocopy"
                    | "shared"
                    | "slave"
                    | "private"
                    | "rshared"
                    | "rslave"
                    | "rprivate"
            )
        })
    {
        return Err(format!(
            "{v:?}: {o:?} is not a mount option Docker knows (ro, rw, z, Z, nocopy, …)"
        ));
    }
    let is_path = source.starts_with('/') || source.starts_with('.') || source.contains('/');
    let source = if is_path && !source.starts_with('/') {
        beside(base, source).to_string_lossy().into_owned()
    } else {
        source.to_owned()
    };
    Ok(match opts {
        Some(o) => format!("{source}:{target}:{o}"),
        None => format!("{source}:{target}"),
    })
}

/// `path` as an absolute path, relative ones taken from `base` (the config file's directory),
/// without `.` components (`./uploads` beside `/etc/app/cutover.toml` is `/etc/app/uploads`).
fn beside(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    let joined = if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    };
    let abs = std::path::absolute(&joined).unwrap_or(joined);
    abs.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}
