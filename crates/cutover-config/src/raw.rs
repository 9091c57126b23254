//! The raw shape of `cutover.toml`: what serde reads, with a span on every value.
//!
//! Unknown keys are rejected here (`deny_unknown_fields`); nothing is validated beyond types.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub api: Option<S<String>>,
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
    pub analysis: Option<S<RawAnalysis>>,
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
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key a byte offset sits under: the nearest `[table]` header above it plus the key
/// written at the offset, so serde's errors (which know only a span) name a key path too.
pub fn key_at(text: &str, span: &Range<usize>) -> String {
    let start = text.floor_char_boundary(span.start.min(text.len()));
    let table = text[..start]
        .lines()
        .filter_map(|l| {
            let t = l.trim();
            (t.starts_with('[') && !t.starts_with("[["))
                .then(|| t.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
        })
        .next_back();
    let is_key = |c: &char| c.is_ascii_alphanumeric() || *c == '_' || *c == '-';
    let mut key: String = text[start..].chars().take_while(is_key).collect();
    // A span on a value (`instances = "two"`): the key is what stands left of the `=`.
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    if let Some((lhs, _)) = text[line_start..start].rsplit_once('=')
        && !text[line_start..start].contains('{')
    {
        let lhs = lhs.trim();
        if !lhs.is_empty() && lhs.chars().all(|c| is_key(&c) || c == '.') {
            key = lhs.to_owned();
        }
    }
    match (table, key.is_empty()) {
        (Some(t), false) => format!("{t}.{key}"),
        (Some(t), true) => t,
        (None, false) => key,
        (None, true) => String::new(),
    }
}

pub fn parse(text: &str, path: &Path) -> Result<Raw, ConfigError> {
    toml::from_str::<Raw>(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let (line, column) = line_col(text, span.start);
        let message = e.message().trim().replace('\n', " ");
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: path.to_owned(),
                line,
                column,
                key: key_at(text, &span),
                message,
            }],
        }
    })
}
