//! The signals sections of `cutover.toml`: `[[services.X.slo]]`, `[alerts]` with its
//! receivers, routes and rules, `[policy]` and `[dora]` (docs/reference.md §12).
//!
//! Raw shapes (with spans) and their checks live here so the shared `raw`/`resolve` modules
//! only point at them. Receivers name the environment variables that hold their secrets;
//! the values are never read into the settings: [`crate::Settings::missing_secrets`] checks
//! that they are set (for `validate`, `up` and `reload`), and the daemon reads them only when
//! it sends.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use cutover_signals::matcher::Matcher;
use cutover_signals::route::{Route, Routing, Timing, default_group_by};
use cutover_signals::rules::{Condition, DEFAULT_RULE_WINDOW, RuleSpec};
use cutover_signals::slo::{DEFAULT_MIN_REQUESTS, LONGEST_ALERT_WINDOW, SloSpec};
use serde::Deserialize;

use crate::Diagnostic;
use crate::raw::S;
use crate::resolve::{Ctx, parse_duration};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlo {
    pub name: Option<S<String>>,
    pub objective: Option<S<f64>>,
    pub window: Option<S<String>>,
    pub latency: Option<S<String>>,
    pub min_requests: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerts {
    pub group_wait: Option<S<String>>,
    pub group_interval: Option<S<String>>,
    pub repeat_interval: Option<S<String>>,
    /// The root route's receiver: where alerts no route matches go.
    pub receiver: Option<S<String>>,
    pub receivers: Option<S<Vec<S<RawReceiver>>>>,
    pub routes: Option<S<Vec<S<RawRoute>>>>,
    pub rules: Option<S<Vec<S<RawRule>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReceiver {
    pub name: Option<S<String>>,
    pub kind: Option<S<String>>,
    pub send_resolved: Option<S<bool>>,
    pub url: Option<S<String>>,
    pub url_env: Option<S<String>>,
    pub routing_key_env: Option<S<String>>,
    pub to: Option<S<String>>,
    pub from: Option<S<String>>,
    pub smtp: Option<S<String>>,
    pub username: Option<S<String>>,
    pub password_env: Option<S<String>>,
    pub require_tls: Option<S<bool>>,
    pub ca_file: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub matchers: Option<S<Vec<S<String>>>>,
    pub receiver: Option<S<String>>,
    #[serde(rename = "continue")]
    pub continue_matching: Option<S<bool>>,
    pub group_by: Option<S<Vec<S<String>>>>,
    pub group_wait: Option<S<String>>,
    pub group_interval: Option<S<String>>,
    pub repeat_interval: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub name: Option<S<String>>,
    pub service: Option<S<String>>,
    pub when: Option<S<String>>,
    #[serde(rename = "for")]
    pub hold: Option<S<String>>,
    pub window: Option<S<String>>,
    pub severity: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub freeze_when_budget_exhausted: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDora {
    pub fix_window: Option<S<String>>,
}

/// PagerDuty's Events API v2 endpoint.
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// Where a receiver's URL comes from: written in the config, or read from the environment
/// when sending (a Slack webhook URL is a secret).
#[derive(Clone, Debug, PartialEq)]
pub enum UrlSource {
    Url(String),
    Env(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ReceiverKind {
    /// Alertmanager's webhook payload (version 4).
    Webhook { url: UrlSource },
    /// A Slack incoming webhook.
    Slack { url: UrlSource },
    /// PagerDuty Events API v2; `url` is PagerDuty's unless set (for tests and proxies).
    PagerDuty {
        url: String,
        routing_key_env: String,
    },
    /// SMTP; with `require_tls` (the default) the server must offer STARTTLS.
    Email {
        smtp: String,
        from: String,
        to: Vec<String>,
        username: Option<String>,
        password_env: Option<String>,
        require_tls: bool,
        /// A PEM certificate to trust besides the usual roots (a private CA).
        ca_file: Option<PathBuf>,
    },
}

impl ReceiverKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReceiverKind::Webhook { .. } => "webhook",
            ReceiverKind::Slack { .. } => "slack",
            ReceiverKind::PagerDuty { .. } => "pagerduty",
            ReceiverKind::Email { .. } => "email",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReceiverSettings {
    pub name: String,
    pub kind: ReceiverKind,
    pub send_resolved: bool,
}

/// An environment variable a receiver reads its secret from, and where the config names it.
#[derive(Clone, Debug, PartialEq)]
pub struct SecretRef {
    pub env: String,
    pub at: Diagnostic,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SignalsSettings {
    pub routing: Routing,
    pub receivers: Vec<ReceiverSettings>,
    pub rules: Vec<RuleSpec>,
    pub freeze_when_budget_exhausted: bool,
    /// How long after a promotion a `deploy --fixes` still marks it failed (DORA).
    pub fix_window: Duration,
    pub secrets: Vec<SecretRef>,
}

impl Default for SignalsSettings {
    fn default() -> SignalsSettings {
        SignalsSettings {
            routing: Routing::default(),
            receivers: Vec::new(),
            rules: Vec::new(),
            freeze_when_budget_exhausted: false,
            fix_window: DEFAULT_FIX_WINDOW,
            secrets: Vec::new(),
        }
    }
}

pub const DEFAULT_FIX_WINDOW: Duration = Duration::from_secs(7 * 86_400);

fn label_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn alert_name_ok(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `[[services.NAME.slo]]`.
pub(crate) fn slos(
    cx: &mut Ctx<'_>,
    service: &str,
    raw: Option<&S<Vec<S<RawSlo>>>>,
) -> Vec<SloSpec> {
    let Some(list) = raw else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, s) in list.get_ref().iter().enumerate() {
        let k = |key: &str| format!("services.{service}.slo[{i}].{key}");
        let at = s.span().start;
        let s = s.get_ref();
        let name = match &s.name {
            None => {
                cx.err_at(at, k("name"), "is required, e.g. \"availability\"");
                None
            }
            Some(n) if !label_safe(n.get_ref()) => {
                cx.err(n, k("name"), "use letters, digits, '_' and '-'");
                None
            }
            Some(n) if !names.insert(n.get_ref().clone()) => {
                cx.err(
                    n,
                    k("name"),
                    format!("{:?} is already an SLO of {service}", n.get_ref()),
                );
                None
            }
            Some(n) => Some(n.get_ref().clone()),
        };
        let objective = match &s.objective {
            None => {
                cx.err_at(
                    at,
                    k("objective"),
                    "is required: the percent of good requests, e.g. 99.9",
                );
                None
            }
            Some(o) => {
                let v = *o.get_ref();
                if !(v > 0.0 && v < 100.0) {
                    cx.err(
                        o,
                        k("objective"),
                        format!("{v} must be above 0 and below 100 (percent of good requests; 100 leaves no error budget)"),
                    );
                    None
                } else {
                    Some(v)
                }
            }
        };
        let window = cx.duration(
            s.window.as_ref(),
            &k("window"),
            Duration::from_secs(30 * 86_400),
        );
        if let Some(w) = &s.window
            && window < LONGEST_ALERT_WINDOW
            && parse_duration(w.get_ref()).is_ok()
        {
            cx.err(
                w,
                k("window"),
                format!(
                    "{} is shorter than the longest burn-rate alert window (3d); use 3d or more (30d is usual)",
                    w.get_ref()
                ),
            );
        }
        let latency = s
            .latency
            .as_ref()
            .map(|l| cx.duration(Some(l), &k("latency"), Duration::from_millis(300)));
        let min_requests = cx.count(
            s.min_requests.as_ref(),
            &k("min_requests"),
            1,
            1_000_000_000,
            u32::try_from(DEFAULT_MIN_REQUESTS).unwrap_or(100),
        );
        if let (Some(name), Some(objective)) = (name, objective) {
            out.push(SloSpec {
                service: service.to_owned(),
                name,
                objective,
                window,
                latency,
                min_requests: u64::from(min_requests),
            });
        }
    }
    out
}

/// `[alerts]`, `[policy]` and `[dora]`.
pub(crate) fn resolve(
    cx: &mut Ctx<'_>,
    alerts: Option<&S<RawAlerts>>,
    policy: Option<&S<RawPolicy>>,
    dora: Option<&S<RawDora>>,
    services: &BTreeSet<String>,
) -> SignalsSettings {
    let mut out = SignalsSettings::default();
    if let Some(p) = policy
        && let Some(f) = &p.get_ref().freeze_when_budget_exhausted
    {
        out.freeze_when_budget_exhausted = *f.get_ref();
    }
    if let Some(d) = dora {
        out.fix_window = cx.duration(
            d.get_ref().fix_window.as_ref(),
            "dora.fix_window",
            DEFAULT_FIX_WINDOW,
        );
    }
    let Some(a) = alerts else { return out };
    let a = a.get_ref();
    let d = Timing::default();
    let timing = Timing {
        group_wait: cx.duration(a.group_wait.as_ref(), "alerts.group_wait", d.group_wait),
        group_interval: cx.duration(
            a.group_interval.as_ref(),
            "alerts.group_interval",
            d.group_interval,
        ),
        repeat_interval: cx.duration(
            a.repeat_interval.as_ref(),
            "alerts.repeat_interval",
            d.repeat_interval,
        ),
    };

    let mut names: BTreeMap<String, ()> = BTreeMap::new();
    for (i, r) in a
        .receivers
        .as_ref()
        .map(|r| r.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(rec) = receiver(cx, i, r, &mut out.secrets) {
            if names.insert(rec.name.clone(), ()).is_some() {
                if let Some(n) = &r.get_ref().name {
                    cx.err(
                        n,
                        format!("alerts.receivers[{i}].name"),
                        format!("{:?} is already a receiver", rec.name),
                    );
                }
                continue;
            }
            out.receivers.push(rec);
        }
    }
    let known = |cx: &mut Ctx<'_>, v: &S<String>, key: String, names: &BTreeMap<String, ()>| {
        if names.contains_key(v.get_ref()) {
            true
        } else {
            let list: Vec<&str> = names.keys().map(String::as_str).collect();
            cx.err(
                v,
                key,
                if list.is_empty() {
                    format!(
                        "no receiver is named {:?}; add an [[alerts.receivers]] entry",
                        v.get_ref()
                    )
                } else {
                    format!(
                        "no receiver is named {:?}; receivers: {}",
                        v.get_ref(),
                        list.join(", ")
                    )
                },
            );
            false
        }
    };
    if let Some(r) = &a.receiver
        && known(cx, r, "alerts.receiver".into(), &names)
    {
        out.routing.default = Some(Route {
            matchers: Vec::new(),
            receiver: r.get_ref().clone(),
            continue_matching: false,
            group_by: default_group_by(),
            timing,
        });
    }
    for (i, r) in a
        .routes
        .as_ref()
        .map(|r| r.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let k = |key: &str| format!("alerts.routes[{i}].{key}");
        let at = r.span().start;
        let r = r.get_ref();
        let mut matchers = Vec::new();
        for (j, m) in r
            .matchers
            .as_ref()
            .map(|m| m.get_ref().as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            match Matcher::parse(m.get_ref()) {
                Ok(m) => matchers.push(m),
                Err(e) => cx.err(m, format!("alerts.routes[{i}].matchers[{j}]"), e),
            }
        }
        let receiver = match &r.receiver {
            None => {
                cx.err_at(
                    at,
                    k("receiver"),
                    "is required: the receiver this route sends to",
                );
                None
            }
            Some(v) => known(cx, v, k("receiver"), &names).then(|| v.get_ref().clone()),
        };
        let group_by = match &r.group_by {
            None => default_group_by(),
            Some(g) => {
                let mut v = Vec::new();
                for (j, l) in g.get_ref().iter().enumerate() {
                    if l.get_ref() != "..." && !alert_name_ok(l.get_ref()) {
                        cx.err(
                            l,
                            format!("alerts.routes[{i}].group_by[{j}]"),
                            format!("{:?} is not a label name", l.get_ref()),
                        );
                    }
                    v.push(l.get_ref().clone());
                }
                v
            }
        };
        let route_timing = Timing {
            group_wait: cx.duration(r.group_wait.as_ref(), &k("group_wait"), timing.group_wait),
            group_interval: cx.duration(
                r.group_interval.as_ref(),
                &k("group_interval"),
                timing.group_interval,
            ),
            repeat_interval: cx.duration(
                r.repeat_interval.as_ref(),
                &k("repeat_interval"),
                timing.repeat_interval,
            ),
        };
        if let Some(receiver) = receiver {
            out.routing.routes.push(Route {
                matchers,
                receiver,
                continue_matching: r.continue_matching.as_ref().is_some_and(|c| *c.get_ref()),
                group_by,
                timing: route_timing,
            });
        }
    }
    let mut rule_names = BTreeSet::new();
    for (i, r) in a
        .rules
        .as_ref()
        .map(|r| r.get_ref().as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let k = |key: &str| format!("alerts.rules[{i}].{key}");
        let at = r.span().start;
        let r = r.get_ref();
        let name = match &r.name {
            None => {
                cx.err_at(at, k("name"), "is required, e.g. \"HighErrorRate\"");
                None
            }
            Some(n) if !alert_name_ok(n.get_ref()) => {
                cx.err(
                    n,
                    k("name"),
                    "an alert name uses letters, digits and '_', not starting with a digit",
                );
                None
            }
            Some(n) => Some(n.get_ref().clone()),
        };
        let service = match &r.service {
            Some(s) if !services.contains(s.get_ref()) => {
                cx.err(
                    s,
                    k("service"),
                    format!("no service is named {:?} in this config", s.get_ref()),
                );
                None
            }
            Some(s) => Some(Some(s.get_ref().clone())),
            None => Some(None),
        };
        if let (Some(n), Some(s), Some(v)) = (&name, &service, &r.name)
            && !rule_names.insert((n.clone(), s.clone()))
        {
            cx.err(
                v,
                k("name"),
                format!("{n:?} is already a rule for this service"),
            );
        }
        let condition = match &r.when {
            None => {
                cx.err_at(
                    at,
                    k("when"),
                    "is required, e.g. \"error_rate > 0.05\" or \"p99 > 300ms\"",
                );
                None
            }
            Some(w) => match Condition::parse(w.get_ref(), parse_duration) {
                Ok(c) => Some(c),
                Err(e) => {
                    cx.err(w, k("when"), e);
                    None
                }
            },
        };
        let hold = r
            .hold
            .as_ref()
            .map_or(Duration::ZERO, |h| cx.duration_or_zero(h, &k("for")));
        let window = cx.duration(r.window.as_ref(), &k("window"), DEFAULT_RULE_WINDOW);
        let severity = match &r.severity {
            None => "warning".to_owned(),
            Some(s) if !label_safe(s.get_ref()) => {
                cx.err(
                    s,
                    k("severity"),
                    "use letters, digits, '_' and '-' (e.g. page, ticket)",
                );
                "warning".to_owned()
            }
            Some(s) => s.get_ref().clone(),
        };
        if let (Some(name), Some(service), Some(condition)) = (name, service, condition) {
            out.rules.push(RuleSpec {
                name,
                service,
                condition,
                hold,
                window,
                severity,
            });
        }
    }
    out
}

fn receiver(
    cx: &mut Ctx<'_>,
    i: usize,
    r: &S<RawReceiver>,
    secrets: &mut Vec<SecretRef>,
) -> Option<ReceiverSettings> {
    let k = |key: &str| format!("alerts.receivers[{i}].{key}");
    let at = r.span().start;
    let r = r.get_ref();
    let name = match &r.name {
        None => {
            cx.err_at(at, k("name"), "is required: routes name receivers by it");
            None
        }
        Some(n) if !label_safe(n.get_ref()) => {
            cx.err(n, k("name"), "use letters, digits, '_' and '-'");
            None
        }
        Some(n) => Some(n.get_ref().clone()),
    };
    let Some(kind) = &r.kind else {
        cx.err_at(
            at,
            k("kind"),
            "is required: \"webhook\", \"slack\", \"pagerduty\" or \"email\"",
        );
        return None;
    };
    let kind_name = kind.get_ref().as_str();
    // Which keys each kind takes; any other is a mistake worth naming.
    let allowed: &[&str] = match kind_name {
        "webhook" | "slack" => &["url", "url_env"],
        "pagerduty" => &["url", "routing_key_env"],
        "email" => &[
            "to",
            "from",
            "smtp",
            "username",
            "password_env",
            "require_tls",
            "ca_file",
        ],
        other => {
            cx.err(
                kind,
                k("kind"),
                format!("{other:?} is not a receiver kind; use \"webhook\", \"slack\", \"pagerduty\" or \"email\""),
            );
            return None;
        }
    };
    let present: [(&str, Option<usize>); 11] = [
        ("url", r.url.as_ref().map(|v| v.span().start)),
        ("url_env", r.url_env.as_ref().map(|v| v.span().start)),
        (
            "routing_key_env",
            r.routing_key_env.as_ref().map(|v| v.span().start),
        ),
        ("to", r.to.as_ref().map(|v| v.span().start)),
        ("from", r.from.as_ref().map(|v| v.span().start)),
        ("smtp", r.smtp.as_ref().map(|v| v.span().start)),
        ("username", r.username.as_ref().map(|v| v.span().start)),
        (
            "password_env",
            r.password_env.as_ref().map(|v| v.span().start),
        ),
        (
            "require_tls",
            r.require_tls.as_ref().map(|v| v.span().start),
        ),
        ("ca_file", r.ca_file.as_ref().map(|v| v.span().start)),
        ("send_resolved", None),
    ];
    let errors = cx.diags.len();
    for (key, at) in present {
        if let Some(at) = at
            && !allowed.contains(&key)
        {
            cx.err_at(
                at,
                k(key),
                format!(
                    "{kind_name} receivers take no {key}; they take {}",
                    allowed.join(", ")
                ),
            );
        }
    }
    let env = |cx: &mut Ctx<'_>, v: &S<String>, key: &str, secrets: &mut Vec<SecretRef>| {
        let name = v.get_ref().trim();
        let ok = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            cx.err(
                v,
                k(key),
                format!("{:?} is not an environment variable name", v.get_ref()),
            );
            return None;
        }
        let (line, column) = crate::raw::line_col(cx.text, v.span().start);
        secrets.push(SecretRef {
            env: name.to_owned(),
            at: Diagnostic {
                file: cx.file.to_owned(),
                line,
                column,
                key: k(key),
                message: String::new(),
            },
        });
        Some(name.to_owned())
    };
    let url_of = |cx: &mut Ctx<'_>, v: &S<String>| -> Option<String> {
        let u = v.get_ref().trim();
        let rest = u
            .strip_prefix("https://")
            .or_else(|| u.strip_prefix("http://"))
            .unwrap_or("");
        if rest.is_empty() {
            cx.err(
                v,
                k("url"),
                format!("{u:?} must be an http:// or https:// URL"),
            );
            None
        } else {
            Some(u.to_owned())
        }
    };
    let kind = match kind_name {
        "webhook" | "slack" => {
            let url = match (&r.url, &r.url_env) {
                (Some(u), None) => url_of(cx, u).map(UrlSource::Url),
                (None, Some(e)) => env(cx, e, "url_env", secrets).map(UrlSource::Env),
                (Some(u), Some(_)) => {
                    cx.err(u, k("url"), "set url or url_env, not both");
                    None
                }
                (None, None) => {
                    cx.err(
                        kind,
                        k("url"),
                        format!("a {kind_name} receiver needs url, or url_env naming the environment variable that holds it"),
                    );
                    None
                }
            };
            url.map(|url| {
                if kind_name == "slack" {
                    ReceiverKind::Slack { url }
                } else {
                    ReceiverKind::Webhook { url }
                }
            })
        }
        "pagerduty" => {
            let url = match &r.url {
                Some(u) => url_of(cx, u),
                None => Some(PAGERDUTY_URL.to_owned()),
            };
            let key = match &r.routing_key_env {
                Some(e) => env(cx, e, "routing_key_env", secrets),
                None => {
                    cx.err(
                        kind,
                        k("routing_key_env"),
                        "a pagerduty receiver needs routing_key_env: the environment variable that holds the integration's routing key",
                    );
                    None
                }
            };
            match (url, key) {
                (Some(url), Some(routing_key_env)) => Some(ReceiverKind::PagerDuty {
                    url,
                    routing_key_env,
                }),
                _ => None,
            }
        }
        _ => {
            let mut need = |v: &Option<S<String>>, key: &str, example: &str| match v {
                Some(v) if !v.get_ref().trim().is_empty() => Some(v.get_ref().trim().to_owned()),
                Some(v) => {
                    cx.err(v, k(key), "must not be empty");
                    None
                }
                None => {
                    cx.err(
                        kind,
                        k(key),
                        format!("an email receiver needs {key}, e.g. {example}"),
                    );
                    None
                }
            };
            let to = need(&r.to, "to", "\"oncall@example.com\"");
            let from = need(&r.from, "from", "\"cutover@example.com\"");
            let smtp = need(&r.smtp, "smtp", "\"smtp.example.com:587\"");
            if let (Some(s), Some(v)) = (&smtp, &r.smtp) {
                let port_ok = s
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !port_ok {
                    cx.err(
                        v,
                        k("smtp"),
                        format!("{s:?} must be host:port, e.g. \"smtp.example.com:587\""),
                    );
                }
            }
            let password_env = r
                .password_env
                .as_ref()
                .and_then(|e| env(cx, e, "password_env", secrets));
            if let (Some(p), None) = (&r.password_env, &r.username) {
                cx.err(p, k("password_env"), "a password needs a username too");
            }
            let ca_file = r.ca_file.as_ref().map(|c| {
                let p = PathBuf::from(c.get_ref());
                if p.is_absolute() {
                    p
                } else {
                    crate::resolve::config_dir(cx.file).join(p)
                }
            });
            match (to, from, smtp) {
                (Some(to), Some(from), Some(smtp)) => Some(ReceiverKind::Email {
                    smtp,
                    from,
                    to: to
                        .split(',')
                        .map(|t| t.trim().to_owned())
                        .filter(|t| !t.is_empty())
                        .collect(),
                    username: r.username.as_ref().map(|u| u.get_ref().clone()),
                    password_env,
                    require_tls: r.require_tls.as_ref().is_none_or(|t| *t.get_ref()),
                    ca_file,
                }),
                _ => None,
            }
        }
    };
    if cx.diags.len() > errors {
        return None;
    }
    let kind = kind?;
    // Alertmanager's defaults: webhook and PagerDuty hear of resolutions, Slack and email not.
    let resolved_by_default = matches!(
        kind,
        ReceiverKind::Webhook { .. } | ReceiverKind::PagerDuty { .. }
    );
    Some(ReceiverSettings {
        name: name?,
        kind,
        send_resolved: r
            .send_resolved
            .as_ref()
            .map_or(resolved_by_default, |s| *s.get_ref()),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::parse;

    const WEB: &str =
        "[services.web]\nlisten = \"127.0.0.1:8080\"\ncommand = [\"app\", \"{port}\"]\n";

    fn check(rest: &str, want: &str) {
        let text = format!("{WEB}{rest}");
        let err = parse(&text, Path::new("cutover.toml")).expect_err("should not parse");
        assert_eq!(err.to_string(), want, "for config:\n{text}");
    }

    #[test]
    fn a_full_signals_config_resolves() {
        let text = format!(
            "{WEB}{}",
            r#"
[[services.web.slo]]
name = "availability"
objective = 99.9

[[services.web.slo]]
name = "latency"
objective = 99
window = "28d"
latency = "300ms"
min_requests = 20

[alerts]
group_wait = "1s"
receiver = "hook"

[[alerts.receivers]]
name = "oncall"
kind = "pagerduty"
routing_key_env = "PD_KEY"
url = "http://127.0.0.1:9/v2/enqueue"

[[alerts.receivers]]
name = "hook"
kind = "webhook"
url = "http://127.0.0.1:9/hook"

[[alerts.receivers]]
name = "chat"
kind = "slack"
url_env = "SLACK_URL"

[[alerts.receivers]]
name = "mail"
kind = "email"
to = "a@example.com, b@example.com"
from = "cutover@example.com"
smtp = "127.0.0.1:2525"
require_tls = false

[[alerts.routes]]
matchers = ["severity=page"]
receiver = "oncall"
continue = true
group_wait = "2s"

[[alerts.routes]]
matchers = ["service=~\"web|api\""]
receiver = "chat"
group_by = ["alertname"]

[[alerts.rules]]
name = "HighErrorRate"
service = "web"
when = "error_rate > 0.05"
for = "5m"
severity = "page"

[[alerts.rules]]
name = "Slow"
when = "p99 > 300ms"

[policy]
freeze_when_budget_exhausted = true

[dora]
fix_window = "3d"
"#
        );
        let s = parse(&text, Path::new("cutover.toml")).unwrap();
        let slos = &s.services[0].slos;
        assert_eq!(slos.len(), 2);
        assert_eq!(slos[0].window, Duration::from_secs(30 * 86_400));
        assert_eq!(slos[0].min_requests, 100);
        assert_eq!(slos[1].latency, Some(Duration::from_millis(300)));
        let sig = &s.signals;
        assert!(sig.freeze_when_budget_exhausted);
        assert_eq!(sig.fix_window, Duration::from_secs(3 * 86_400));
        assert_eq!(
            sig.receivers
                .iter()
                .map(|r| (r.name.as_str(), r.kind.as_str(), r.send_resolved))
                .collect::<Vec<_>>(),
            vec![
                ("oncall", "pagerduty", true),
                ("hook", "webhook", true),
                ("chat", "slack", false),
                ("mail", "email", false)
            ]
        );
        match &sig.receivers[3].kind {
            ReceiverKind::Email {
                to, require_tls, ..
            } => {
                assert_eq!(to, &["a@example.com", "b@example.com"]);
                assert!(!require_tls);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(sig.routing.routes.len(), 2);
        assert!(sig.routing.routes[0].continue_matching);
        assert_eq!(
            sig.routing.routes[0].timing.group_wait,
            Duration::from_secs(2)
        );
        assert_eq!(
            sig.routing.routes[1].timing.group_wait,
            Duration::from_secs(1)
        );
        assert_eq!(sig.routing.routes[1].group_by, vec!["alertname"]);
        assert_eq!(
            sig.routing.default.as_ref().map(|r| r.receiver.as_str()),
            Some("hook")
        );
        assert_eq!(sig.rules.len(), 2);
        assert_eq!(sig.rules[1].service, None);
        assert_eq!(sig.rules[1].severity, "warning");
        assert_eq!(
            sig.secrets
                .iter()
                .map(|s| s.env.as_str())
                .collect::<Vec<_>>(),
            vec!["PD_KEY", "SLACK_URL"]
        );
        // Unset variables are reported where the config names them.
        let missing: Vec<String> = s
            .missing_secrets()
            .iter()
            .map(|d| {
                format!(
                    "{}:{}:{}: {}",
                    d.line,
                    d.column,
                    d.key,
                    d.message.split(';').next().unwrap_or("")
                )
            })
            .collect();
        assert!(
            missing.contains(&"23:19:alerts.receivers[0].routing_key_env: the environment variable PD_KEY is not set".to_owned()),
            "{missing:?}"
        );
    }

    #[test]
    fn bad_signals_configs_name_file_line_column_and_key() {
        let cases = [
            (
                "[[services.web.slo]]\nname = \"a\"\nobjective = 100\n",
                "cutover.toml:6:13: services.web.slo[0].objective: 100 must be above 0 and below 100 (percent of good requests; 100 leaves no error budget)",
            ),
            (
                "[[services.web.slo]]\nname = \"a\"\nobjective = 99.9\nwindow = \"1d\"\n",
                "cutover.toml:7:10: services.web.slo[0].window: 1d is shorter than the longest burn-rate alert window (3d); use 3d or more (30d is usual)",
            ),
            (
                "[[services.web.slo]]\nobjective = 99.9\n",
                "cutover.toml:4:1: services.web.slo[0].name: is required, e.g. \"availability\"",
            ),
            (
                "[alerts]\n[[alerts.routes]]\nmatchers = [\"severity=~\\\"(\\\"\"]\nreceiver = \"x\"\n",
                "cutover.toml:6:13: alerts.routes[0].matchers[0]: \"(\" is not a regular expression: unclosed group\ncutover.toml:7:12: alerts.routes[0].receiver: no receiver is named \"x\"; add an [[alerts.receivers]] entry",
            ),
            (
                "[[alerts.routes]]\nmatchers = [\"severity page\"]\nreceiver = \"x\"\n",
                "cutover.toml:5:13: alerts.routes[0].matchers[0]: \"severity page\" is not a matcher; write label=value, label!=value, label=~regex or label!~regex\ncutover.toml:6:12: alerts.routes[0].receiver: no receiver is named \"x\"; add an [[alerts.receivers]] entry",
            ),
            (
                "[[alerts.receivers]]\nname = \"pd\"\nkind = \"pagerduty\"\n",
                "cutover.toml:6:8: alerts.receivers[0].routing_key_env: a pagerduty receiver needs routing_key_env: the environment variable that holds the integration's routing key",
            ),
            (
                "[[alerts.receivers]]\nname = \"m\"\nkind = \"email\"\nto = \"a@b\"\nfrom = \"c@d\"\nsmtp = \"mail\"\n",
                "cutover.toml:9:8: alerts.receivers[0].smtp: \"mail\" must be host:port, e.g. \"smtp.example.com:587\"",
            ),
            (
                "[[alerts.receivers]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x\"\nsmtp = \"a:1\"\n",
                "cutover.toml:8:8: alerts.receivers[0].smtp: webhook receivers take no smtp; they take url, url_env",
            ),
            (
                "[[alerts.receivers]]\nname = \"w\"\nkind = \"sms\"\n",
                "cutover.toml:6:8: alerts.receivers[0].kind: \"sms\" is not a receiver kind; use \"webhook\", \"slack\", \"pagerduty\" or \"email\"",
            ),
            (
                "[[alerts.rules]]\nname = \"X\"\nservice = \"shop\"\nwhen = \"error_rate > 2\"\n",
                "cutover.toml:6:11: alerts.rules[0].service: no service is named \"shop\" in this config\ncutover.toml:7:8: alerts.rules[0].when: error_rate is a share between 0 and 1 (0.05 = 5%); 2 is above 1",
            ),
            (
                "[alerts]\nbogus = 1\n",
                "cutover.toml:5:1: alerts.bogus: unknown key `bogus`; allowed keys: `group_wait`, `group_interval`, `repeat_interval`, `receiver`, `receivers`, `routes`, `rules`",
            ),
        ];
        for (rest, want) in cases {
            check(rest, want);
        }
    }
}
