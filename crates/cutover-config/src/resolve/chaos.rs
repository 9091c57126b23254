//! The keys of chaos engineering and synthetic traffic: `[dependencies.NAME]`,
//! `[services.X.analysis] synthetic` and `[[services.X.probe]]` (docs/reference.md,
//! "Chaos experiments").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cutover_core::ServiceName;

use super::{Ctx, claim, valid_service_name};
use crate::raw::{Raw, RawProbe, RawSynthetic, S};
use crate::{DependencySettings, ProbeSettings, SyntheticSettings};

/// Requests per second synthetic traffic may ask for: enough to judge any canary, never a load
/// test.
const MAX_RPS: f64 = 1000.0;

pub(super) fn dependencies(
    cx: &mut Ctx<'_>,
    raw: &Raw,
    listens: &mut BTreeMap<SocketAddr, String>,
) -> Vec<DependencySettings> {
    let mut out = Vec::new();
    for (name, d) in &raw.dependencies {
        let k = |key: &str| format!("dependencies.{}.{key}", name.get_ref());
        if !valid_service_name(name.get_ref()) {
            cx.err(
                name,
                format!("dependencies.{}", name.get_ref()),
                "dependency names use lowercase letters, digits and '-'",
            );
            continue;
        }
        // Faults name services and dependencies alike, so one name cannot be both.
        if raw.services.keys().any(|s| s.get_ref() == name.get_ref()) {
            cx.err(
                name,
                format!("dependencies.{}", name.get_ref()),
                "a service has this name too; faults and experiments name either, so give the dependency another",
            );
            continue;
        }
        let at = d.span().start;
        let d = d.get_ref();
        let listen = match &d.listen {
            Some(l) => claim(cx, listens, l, k("listen")),
            None => {
                cx.err_at(
                    at,
                    k("listen"),
                    "is required: the address the app connects to instead of the dependency, e.g. \"127.0.0.1:15432\"",
                );
                None
            }
        };
        let upstream = match &d.upstream {
            Some(u) => cx.addr(u, &k("upstream")),
            None => {
                cx.err_at(
                    at,
                    k("upstream"),
                    "is required: the dependency's real address, e.g. \"127.0.0.1:5432\"",
                );
                None
            }
        };
        if let (Some(listen), Some(upstream)) = (listen, upstream) {
            if listen == upstream {
                if let Some(u) = &d.upstream {
                    cx.err(u, k("upstream"), "is the hop's own listen address");
                }
                continue;
            }
            out.push(DependencySettings {
                name: ServiceName::new(name.get_ref()),
                listen,
                upstream,
            });
        }
    }
    out
}

pub(super) fn synthetic(
    cx: &mut Ctx<'_>,
    v: &S<RawSynthetic>,
    key: &str,
) -> Option<SyntheticSettings> {
    let s = v.get_ref();
    let rps = match &s.rps {
        None => {
            cx.err(v, format!("{key}.rps"), "is required, e.g. rps = 20");
            return None;
        }
        Some(r) if !(*r.get_ref() > 0.0 && *r.get_ref() <= MAX_RPS) => {
            cx.err(
                r,
                format!("{key}.rps"),
                format!(
                    "{} is not between 0 (excluded) and {MAX_RPS} requests per second",
                    r.get_ref()
                ),
            );
            return None;
        }
        Some(r) => *r.get_ref(),
    };
    let mut paths = Vec::new();
    match &s.paths {
        Some(p) if p.get_ref().is_empty() => {
            cx.err(p, format!("{key}.paths"), "must list at least one path");
        }
        Some(p) => {
            for (i, path) in p.get_ref().iter().enumerate() {
                if path.get_ref().starts_with('/') {
                    paths.push(path.get_ref().clone());
                } else {
                    cx.err(
                        path,
                        format!("{key}.paths[{i}]"),
                        format!("{:?} must start with '/'", path.get_ref()),
                    );
                }
            }
        }
        None => paths.push("/".to_owned()),
    }
    let concurrency = cx.count(
        s.concurrency.as_ref(),
        &format!("{key}.concurrency"),
        1,
        1000,
        // Enough for the rate at a second per request, and at least a few.
        (rps.ceil() as u32).clamp(4, 1000),
    );
    Some(SyntheticSettings {
        rps,
        paths,
        headers: s
            .headers
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_default(),
        concurrency,
    })
}

pub(super) fn probes(
    cx: &mut Ctx<'_>,
    list: &S<Vec<S<RawProbe>>>,
    key: &str,
) -> Vec<ProbeSettings> {
    let mut out: Vec<ProbeSettings> = Vec::new();
    for (i, p) in list.get_ref().iter().enumerate() {
        let k = |f: &str| format!("{key}[{i}].{f}");
        let at = p.span().start;
        let p = p.get_ref();
        let Some(path) = &p.path else {
            cx.err_at(at, k("path"), "is required, e.g. path = \"/healthz\"");
            continue;
        };
        if !path.get_ref().starts_with('/') {
            cx.err(
                path,
                k("path"),
                format!("{:?} must start with '/'", path.get_ref()),
            );
            continue;
        }
        let status = match &p.status {
            Some(s) if !(100..=599).contains(s.get_ref()) => {
                cx.err(
                    s,
                    k("status"),
                    format!("{} is not an HTTP status", s.get_ref()),
                );
                None
            }
            Some(s) => u16::try_from(*s.get_ref()).ok(),
            None => None,
        };
        let name = p
            .name
            .as_ref()
            .map_or_else(|| path.get_ref().clone(), |n| n.get_ref().clone());
        if out.iter().any(|o| o.name == name) {
            let span_at = p
                .name
                .as_ref()
                .map_or(path.span().start, |n| n.span().start);
            cx.err_at(
                span_at,
                k("name"),
                format!("another probe is named {name:?}; give each a name of its own"),
            );
            continue;
        }
        let interval = cx.duration(p.interval.as_ref(), &k("interval"), Duration::from_secs(30));
        let timeout = cx.duration(p.timeout.as_ref(), &k("timeout"), Duration::from_secs(5));
        out.push(ProbeSettings {
            name,
            path: path.get_ref().clone(),
            interval,
            timeout,
            status,
            body_contains: p.body_contains.as_ref().map(|b| b.get_ref().clone()),
        });
    }
    out
}
