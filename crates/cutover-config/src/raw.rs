//! The raw shape of `cutover.toml`: what serde reads, with a span on every value.
//!
//! Unknown keys are rejected here (`deny_unknown_fields`); nothing is validated beyond types.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::{ConfigError, Diagnostic};

pub type S<T> = Spanned<T>;
/// `upstreams = { v1 = ["addr", ...] }`, every part with its span.
pub type RawUpstreams = BTreeMap<S<String>, S<Vec<S<String>>>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    pub daemon: Option<S<RawDaemon>>,
    #[serde(default)]
    pub services: BTreeMap<S<String>, S<RawService>>,
    pub notify: Option<S<RawNotify>>,
    /// `[dependencies.NAME]`: TCP hops that faults can reach.
    #[serde(default)]
    pub dependencies: BTreeMap<S<String>, S<RawDependency>>,
    pub backups: Option<S<RawBackups>>,
    pub alerts: Option<S<crate::signals::RawAlerts>>,
    pub policy: Option<S<crate::signals::RawPolicy>>,
    pub dora: Option<S<crate::signals::RawDora>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDependency {
    pub listen: Option<S<String>>,
    pub upstream: Option<S<String>>,
}

/// `[[services.X.probe]]`: a scheduled blackbox probe.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub name: Option<S<String>>,
    pub path: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub status: Option<S<i64>>,
    pub body_contains: Option<S<String>>,
}

/// `synthetic = { rps, paths, headers }` in `[services.X.analysis]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSynthetic {
    pub rps: Option<S<f64>>,
    pub paths: Option<S<Vec<S<String>>>>,
    pub headers: Option<S<BTreeMap<String, String>>>,
    pub concurrency: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub api: Option<S<String>>,
    pub metrics: Option<S<String>>,
    pub state_dir: Option<S<String>>,
    pub worker_threads: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub webhook: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub listen: Option<S<String>>,
    pub version: Option<S<String>>,
    pub runtime: Option<S<String>>,
    pub command: Option<S<Vec<S<String>>>>,
    pub env: Option<S<BTreeMap<String, String>>>,
    pub env_file: Option<S<String>>,
    pub reads_port_env: Option<S<bool>>,
    pub upstreams: Option<S<RawUpstreams>>,
    pub instances: Option<S<i64>>,
    pub strategy: Option<S<String>>,
    pub progress_deadline: Option<S<String>>,
    pub drain_timeout: Option<S<String>>,
    pub stop_timeout: Option<S<String>>,
    pub upstream_timeout: Option<S<String>>,
    pub health: Option<S<RawHealth>>,
    pub canary: Option<S<RawCanary>>,
    pub blue_green: Option<S<RawBlueGreen>>,
    pub rolling: Option<S<RawRolling>>,
    pub scale_down_delay: Option<S<String>>,
    pub analysis: Option<S<RawAnalysisOrOff>>,
    pub max_connections: Option<S<i64>>,
    pub probe: Option<S<Vec<S<RawProbe>>>>,
    /// Docker services: the image (`{version}` filled in) and the port the app listens on
    /// inside its container.
    pub image: Option<S<String>>,
    pub port: Option<S<i64>>,
    pub docker: Option<S<RawDocker>>,
    pub hooks: Option<S<RawHooks>>,
    pub smoke: Option<S<Vec<S<RawSmoke>>>>,
    pub database: Option<S<RawDatabase>>,
    pub slo: Option<S<Vec<S<crate::signals::RawSlo>>>>,
}

/// `[services.X.docker]`: how containers of a docker service are built and run.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocker {
    pub build: Option<S<String>>,
    pub dockerfile: Option<S<String>>,
    pub pull: Option<S<bool>>,
    pub cpus: Option<S<f64>>,
    pub memory: Option<S<String>>,
    pub volumes: Option<S<Vec<S<String>>>>,
    pub network: Option<S<String>>,
    pub host: Option<S<String>>,
    pub labels: Option<S<BTreeMap<String, String>>>,
}

/// `[services.X.hooks]`: each hook point is one command (`["./gate.sh", "--strict"]`) or
/// several (`[["./a.sh"], ["./b.sh"]]`), run in order.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHooks {
    pub pre_deploy: Option<S<Vec<S<RawArg>>>>,
    pub pre_traffic: Option<S<Vec<S<RawArg>>>>,
    pub post_promote: Option<S<Vec<S<RawArg>>>>,
    pub on_rollback: Option<S<Vec<S<RawArg>>>>,
    pub timeout: Option<S<String>>,
}

/// One element of a hook list: an argument of a single command, or a whole command.
pub enum RawArg {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for RawArg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawArg;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string (an argument) or an array of strings (a command)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawArg::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = seq.next_element::<String>()? {
                    out.push(x);
                }
                Ok(RawArg::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `[[services.X.smoke]]` check.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmoke {
    pub path: Option<S<String>>,
    pub method: Option<S<String>>,
    pub status: Option<S<i64>>,
    pub body_contains: Option<S<String>>,
    pub headers: Option<S<BTreeMap<String, String>>>,
    pub timeout: Option<S<String>>,
}

/// `[services.X.database]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub kind: Option<S<String>>,
    pub url: Option<S<String>>,
    pub url_env: Option<S<String>>,
    pub path: Option<S<String>>,
    pub backup_before_deploy: Option<S<bool>>,
    pub migrate: Option<S<Vec<S<String>>>>,
    pub on_rollback: Option<S<String>>,
    pub migrate_down: Option<S<Vec<S<String>>>>,
    pub timeout: Option<S<String>>,
    pub bin_dir: Option<S<String>>,
}

/// `[backups]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackups {
    pub dir: Option<S<String>>,
    pub keep: Option<S<RawKeep>>,
    pub every: Option<S<String>>,
    pub verify: Option<S<bool>>,
}

/// `[backups] keep = { ... }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeep {
    pub last: Option<S<i64>>,
    pub hourly: Option<S<i64>>,
    pub daily: Option<S<i64>>,
    pub weekly: Option<S<i64>>,
    pub monthly: Option<S<i64>>,
    pub yearly: Option<S<i64>>,
}

/// `analysis = false`, or an `[services.X.analysis]` table.
pub enum RawAnalysisOrOff {
    Off(bool),
    Table(Box<RawAnalysis>),
}

impl<'de> Deserialize<'de> for RawAnalysisOrOff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawAnalysisOrOff;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`false` or an analysis table")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(RawAnalysisOrOff::Off(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                // The table is read by the map's own deserializer, so its values keep spans.
                RawAnalysis::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|t| RawAnalysisOrOff::Table(Box::new(t)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub healthy_threshold: Option<S<i64>>,
    pub unhealthy_threshold: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    pub steps: Option<S<Vec<S<RawStep>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub weight: Option<S<i64>>,
    pub pause: Option<S<String>>,
    pub approve: Option<S<bool>>,
    pub analysis: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBlueGreen {
    pub auto_promote: Option<S<bool>>,
    pub preview_listen: Option<S<String>>,
    pub scale_down_delay: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRolling {
    pub max_surge: Option<S<i64>>,
    pub max_unavailable: Option<S<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAnalysis {
    pub interval: Option<S<String>>,
    pub min_requests: Option<S<i64>>,
    pub max_error_rate: Option<S<f64>>,
    pub max_p99: Option<S<String>>,
    pub failure_limit: Option<S<i64>>,
    pub compare_to_stable: Option<S<bool>>,
    pub analysis_deadline: Option<S<String>>,
    pub on_no_evidence: Option<S<String>>,
    pub synthetic: Option<S<RawSynthetic>>,
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key path (`services.web.canary.steps[1].wait`) of the deepest key or value in
/// `table` whose span holds byte `offset`. serde's errors know only a span; walking the parsed
/// document turns that span into the key a user can find in the file. A `[table]`'s span covers
/// only its header, so every table is searched, not just the ones whose span holds the offset.
fn key_path_at(table: &DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    for (key, value) in table {
        let path = push_key(prefix, key.get_ref());
        if let Some(found) = value_path_at(value.get_ref(), offset, &path) {
            return Some(found);
        }
        if key.span().contains(&offset) || value.span().contains(&offset) {
            return Some(path);
        }
    }
    None
}

fn value_path_at(value: &DeValue<'_>, offset: usize, path: &str) -> Option<String> {
    match value {
        DeValue::Table(t) => key_path_at(t, offset, path),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let path = format!("{path}[{i}]");
            value_path_at(item.get_ref(), offset, &path)
                .or_else(|| item.span().contains(&offset).then_some(path))
        }),
        _ => None,
    }
}

/// Appends one key, quoted the way TOML would need it when it is not a bare key.
fn push_key(prefix: &str, key: &str) -> String {
    let mut path = prefix.to_owned();
    if !path.is_empty() {
        path.push('.');
    }
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        path.push_str(key);
    } else {
        path.push_str(&format!("{key:?}"));
    }
    path
}

/// Rewords serde's messages in TOML's terms: fields are keys, and Rust type names mean nothing
/// to someone editing a config file.
fn reword(message: &str) -> String {
    let one_line = message.trim().replace('\n', " ");
    let mut out = one_line
        .replace("unknown field", "unknown key")
        .replace(", expected one of ", "; allowed keys: ")
        .replace("expected i64", "expected an integer")
        .replace("expected f64", "expected a number")
        .replace("expected a sequence", "expected an array")
        .replace("expected a map", "expected a table");
    // serde says "unknown field `x`, expected `a` or `b`" when there are only two choices.
    if out.starts_with("unknown key") && !out.contains("allowed keys") {
        out = out.replacen(", expected ", "; allowed keys: ", 1);
    }
    out
}

/// Reads `text` into the raw shape; a syntax error, a wrong type or an unknown key becomes one
/// diagnostic at the span the TOML parser reports.
pub fn parse(text: &str, path: &Path) -> Result<Raw, ConfigError> {
    let diag = |e: toml::de::Error, doc: Option<&DeTable<'_>>| {
        let span = e.span().unwrap_or(0..0);
        let (line, column) = line_col(text, span.start);
        let key = doc
            .and_then(|d| key_path_at(d, span.start, ""))
            .unwrap_or_default();
        let mut message = reword(e.message());
        // The parser says only "duplicate key"; name the key so it can be found.
        if message == "duplicate key" {
            let word: String = text[text.floor_char_boundary(span.start.min(text.len()))..]
                .chars()
                .take_while(|c| !matches!(c, '=' | ']' | '\n'))
                .collect();
            message = format!("duplicate key `{}`: it is already set above", word.trim());
        }
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: path.to_owned(),
                line,
                column,
                key,
                message,
            }],
        }
    };
    let doc = DeTable::parse(text).map_err(|e| {
        // The recovered document still names the table a syntax error sits in, when it can.
        let (partial, _) = DeTable::parse_recoverable(text);
        diag(e, Some(partial.get_ref()))
    })?;
    toml::from_str::<Raw>(text).map_err(|e| diag(e, Some(doc.get_ref())))
}
