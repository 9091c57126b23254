//! `cutover logs` for docker services: the output of the service's containers (stdout and
//! stderr, whole lines), read from the Engine, so it needs no daemon.
//!
//! Which containers: `instance` names one; otherwise those running now, oldest first, or if
//! none runs, the newest one; `version` narrows either. Following merges the containers'
//! streams and picks up containers that start while it runs (unless one instance was named).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, LogsOptionsBuilder};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{Engine, engine_message, spec};
use crate::RuntimeError;

/// Why nothing could be shown.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The version or instance asked for has no container: a mistake in the question.
    #[error("{0}")]
    NoSuch(String),
    /// The service has no containers at all.
    #[error("{0}")]
    Nothing(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// What to show.
#[derive(Clone, Debug)]
pub struct Query {
    pub service: String,
    pub version: Option<String>,
    pub instance: Option<String>,
    pub follow: bool,
    /// The last lines of each container to print first.
    pub lines: usize,
}

/// One container of the service, as listed.
#[derive(Clone, Debug)]
struct Listed {
    id: String,
    instance: String,
    version: String,
    running: bool,
    created: i64,
}

async fn list(
    docker: &Docker,
    state_label: &str,
    service: &str,
) -> Result<Vec<Listed>, RuntimeError> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{}={state_label}", spec::LABEL_STATE_DIR),
            format!("{}={service}", spec::LABEL_SERVICE),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = docker.list_containers(Some(options)).await.map_err(|e| {
        RuntimeError::Docker(format!("cannot list containers: {}", engine_message(&e)))
    })?;
    let mut out: Vec<Listed> = list
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels.unwrap_or_default();
            Some(Listed {
                id: c.id?,
                instance: labels.get(spec::LABEL_INSTANCE)?.clone(),
                version: labels.get(spec::LABEL_VERSION)?.clone(),
                running: c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
                created: c.created.unwrap_or(0),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.created, &a.instance).cmp(&(b.created, &b.instance)));
    Ok(out)
}

/// The containers `q` asks for, or a sentence saying what there is instead.
fn choose(all: &[Listed], q: &Query) -> Result<Vec<Listed>, LogsError> {
    let service = &q.service;
    let mut pool: Vec<Listed> = all.to_vec();
    if let Some(v) = &q.version {
        pool.retain(|c| &c.version == v);
        if pool.is_empty() {
            let versions: BTreeSet<&str> = all.iter().map(|c| c.version.as_str()).collect();
            return Err(LogsError::NoSuch(if versions.is_empty() {
                format!("{service} has no containers, of {v} or any version")
            } else {
                format!(
                    "{service} has no containers of version {v}; versions with containers: {}",
                    versions.into_iter().collect::<Vec<_>>().join(", ")
                )
            }));
        }
    }
    if let Some(id) = &q.instance {
        let one: Vec<Listed> = pool.iter().filter(|c| &c.instance == id).cloned().collect();
        if one.is_empty() {
            let names: Vec<&str> = pool.iter().map(|c| c.instance.as_str()).collect();
            return Err(LogsError::NoSuch(if names.is_empty() {
                format!("{service} has no container of instance {id:?}; it has none")
            } else {
                format!(
                    "{service} has no container of instance {id:?}; instances: {}",
                    names.join(", ")
                )
            }));
        }
        return Ok(one);
    }
    let running: Vec<Listed> = pool.iter().filter(|c| c.running).cloned().collect();
    if !running.is_empty() {
        return Ok(running);
    }
    match pool.last() {
        Some(newest) => Ok(vec![newest.clone()]),
        None if q.follow => Ok(Vec::new()),
        None => Err(LogsError::Nothing(format!(
            "{service} has no containers: they exist while `cutover up` runs them (a stopped container is removed)"
        ))),
    }
}

/// Prints the output `q` asks for through `line(instance, text)`, which returns `false` when
/// its reader is gone. Ends at once, or with `follow` only when `line` says so.
pub async fn show(
    engine: &Engine,
    state_dir: &Path,
    q: &Query,
    mut line: impl FnMut(&str, &str) -> bool,
) -> Result<(), LogsError> {
    let docker = engine.client().await?;
    let state_label = crate::contain::canonical_state_dir(state_dir)
        .display()
        .to_string();
    let all = list(&docker, &state_label, &q.service).await?;
    let chosen = choose(&all, q)?;
    if !q.follow {
        for c in &chosen {
            let mut s = stream(&docker, &c.id, Some(q.lines), false);
            while let Some(text) = s.next().await {
                if !emit(&mut line, &c.instance, &text) {
                    return Ok(());
                }
            }
        }
        return Ok(());
    }
    let (tx, mut rx) = mpsc::channel::<(String, String)>(1024);
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let follow_one = |c: &Listed, lines: Option<usize>| {
        let tx = tx.clone();
        let docker = docker.clone();
        let (id, instance) = (c.id.clone(), c.instance.clone());
        tokio::spawn(async move {
            let mut s = stream(&docker, &id, lines, true);
            while let Some(text) = s.next().await {
                if tx.send((instance.clone(), text)).await.is_err() {
                    return;
                }
            }
        });
    };
    for c in &chosen {
        seen.insert(c.id.clone());
        follow_one(c, Some(q.lines));
    }
    let mut discover = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            got = rx.recv() => {
                let Some((instance, text)) = got else { return Ok(()) };
                if !emit(&mut line, &instance, &text) {
                    return Ok(());
                }
            }
            _ = discover.tick(), if q.instance.is_none() => {
                // Containers started since (a rollout's, or one made again after a crash):
                // read from their beginning.
                if let Ok(now) = list(&docker, &state_label, &q.service).await {
                    for c in now.iter().filter(|c| c.running) {
                        let wanted = q.version.as_ref().is_none_or(|v| *v == c.version);
                        if wanted && seen.insert(c.id.clone()) {
                            follow_one(c, None);
                        }
                    }
                }
            }
        }
    }
}

fn emit(line: &mut impl FnMut(&str, &str) -> bool, instance: &str, text: &str) -> bool {
    text.lines().all(|l| line(instance, l))
}

/// A container's output as text chunks (whole lines, as the log driver keeps them).
fn stream(
    docker: &Docker,
    id: &str,
    lines: Option<usize>,
    follow: bool,
) -> impl futures_util::Stream<Item = String> + Send + 'static {
    let tail = lines.map_or_else(|| "all".to_owned(), |n| n.to_string());
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .follow(follow)
        .tail(&tail)
        .build();
    docker
        .logs(id, Some(options))
        .take_while(|r| std::future::ready(r.is_ok()))
        .filter_map(|r| {
            std::future::ready(
                r.ok()
                    .map(|o| String::from_utf8_lossy(&o.into_bytes()).into_owned()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(instance: &str, version: &str, running: bool, created: i64) -> Listed {
        Listed {
            id: format!("id-{instance}"),
            instance: instance.into(),
            version: version.into(),
            running,
            created,
        }
    }

    fn q(version: Option<&str>, instance: Option<&str>, follow: bool) -> Query {
        Query {
            service: "shop".into(),
            version: version.map(Into::into),
            instance: instance.map(Into::into),
            follow,
            lines: 10,
        }
    }

    #[test]
    fn which_containers_are_shown() {
        let all = [
            c("shop-v1-0", "v1", true, 1),
            c("shop-v1-1", "v1", true, 2),
            c("shop-v2-2", "v2", false, 3),
        ];
        let names = |r: Result<Vec<Listed>, LogsError>| -> Vec<String> {
            r.unwrap().into_iter().map(|c| c.instance).collect()
        };
        assert_eq!(
            names(choose(&all, &q(None, None, false))),
            ["shop-v1-0", "shop-v1-1"]
        );
        assert_eq!(
            names(choose(&all, &q(Some("v2"), None, false))),
            ["shop-v2-2"],
            "none of v2 runs: the newest"
        );
        assert_eq!(
            names(choose(&all, &q(None, Some("shop-v1-1"), false))),
            ["shop-v1-1"]
        );
        assert_eq!(
            choose(&all, &q(Some("v9"), None, false))
                .unwrap_err()
                .to_string(),
            "shop has no containers of version v9; versions with containers: v1, v2"
        );
        assert!(matches!(
            choose(&all, &q(None, Some("shop-v1-7"), false)),
            Err(LogsError::NoSuch(_))
        ));
        assert_eq!(
            choose(&all, &q(None, Some("shop-v1-7"), false))
                .unwrap_err()
                .to_string(),
            "shop has no container of instance \"shop-v1-7\"; instances: shop-v1-0, shop-v1-1, shop-v2-2"
        );
        assert!(
            choose(&[], &q(None, None, true)).unwrap().is_empty(),
            "follow waits"
        );
        assert!(matches!(
            choose(&[], &q(None, None, false)),
            Err(LogsError::Nothing(_))
        ));
    }
}
