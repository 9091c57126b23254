//! Decisions taken before a rollout exists: which version a `deploy` request rolls out, and
//! what rolling back a finished promotion means. Pure, like the fsm: the driver asks and
//! carries out; the rules live here with their table tests.

use std::time::Duration;

use cutover_core::{RolloutSpec, StrategyKind, Version};

/// Why a deploy request is refused, and whether the request itself is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployRefusal {
    /// The request is wrong (API 400): a label that is not a version, a version a static
    /// service does not list.
    Invalid(String),
    /// The request conflicts with the service's state (API 409).
    Conflict(String),
}

/// What the service looks like to a deploy request.
#[derive(Clone, Copy, Debug)]
pub struct DeployContext<'a> {
    pub service: &'a str,
    pub stable: &'a Version,
    /// The request's environment equals the stable version's.
    pub same_env: bool,
    /// For static services: the versions that have addresses.
    pub known_versions: Option<&'a [Version]>,
}

/// The version a `deploy SERVICE LABEL` request rolls out.
///
/// The one rule for labels (config, CLI and API alike), since a label reaches instances'
/// argv. The stable version's label with another environment is a new revision of it
/// (`v1@r2`), rolled out like any other version; with the same environment there is nothing
/// to do. A static service can only go to versions it has addresses for, and has no
/// revisions (its addresses do not change with the environment).
pub fn deploy_version(label: &str, cx: DeployContext<'_>) -> Result<Version, DeployRefusal> {
    let name = cx.service;
    let mut version =
        Version::parse(label.trim()).map_err(|e| DeployRefusal::Invalid(e.to_string()))?;
    if version.as_str() == cx.stable.base() {
        if cx.same_env || cx.known_versions.is_some() {
            return Err(DeployRefusal::Conflict(format!(
                "{name} already runs {} with this environment; change --env to roll out a new revision of it",
                cx.stable
            )));
        }
        version = Version::revision_of(cx.stable.base(), cx.stable.revision() + 1);
    }
    if let Some(known) = cx.known_versions
        && !known.contains(&version)
    {
        let list: Vec<&str> = known.iter().map(Version::as_str).collect();
        return Err(DeployRefusal::Invalid(format!(
            "static service {name} has no upstreams for {version}; configured: {}",
            list.join(", ")
        )));
    }
    Ok(version)
}

/// How `cutover rollback` after a finished promotion goes back to the previous version.
///
/// A blue-green switch with no delay and no analysis: a person asked to go back to the
/// version that served before, so the way back is not held for a verdict, and the version
/// being left is stopped once the switch is done (it is the one suspected bad).
pub fn rollback_spec(service_spec: &RolloutSpec) -> RolloutSpec {
    let mut spec = service_spec.clone();
    spec.strategy = StrategyKind::BlueGreen;
    spec.blue_green.auto_promote = true;
    spec.scale_down_delay = Duration::ZERO;
    spec.analysis.enabled = false;
    // Going back to what served before is an instant switch: no hooks, no backup, no
    // migration, no smoke checks, and the database is left as it is.
    spec.steps = cutover_core::ReleaseSteps::default();
    spec
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cx<'a>(
        stable: &'a Version,
        same_env: bool,
        known: Option<&'a [Version]>,
    ) -> DeployContext<'a> {
        DeployContext {
            service: "web",
            stable,
            same_env,
            known_versions: known,
        }
    }

    #[test]
    fn deploy_versions() {
        let v1 = Version::new("v1");
        let v1r2 = Version::revision_of("v1", 2);
        let known = [Version::new("v1"), Version::new("v2")];
        type Row<'a> = (&'a str, DeployContext<'a>, Result<&'a str, &'a str>);
        let rows: Vec<Row> = vec![
            ("v2", cx(&v1, true, None), Ok("v2")),
            ("  v2 ", cx(&v1, true, None), Ok("v2")),
            ("v1", cx(&v1, false, None), Ok("v1@r2")),
            ("v1", cx(&v1r2, false, None), Ok("v1@r3")),
            ("v1", cx(&v1, true, None), Err("conflict")),
            ("v1", cx(&v1, false, Some(&known)), Err("conflict")),
            ("v2", cx(&v1, true, Some(&known)), Ok("v2")),
            ("v3", cx(&v1, true, Some(&known)), Err("invalid")),
            ("v2;rm -rf", cx(&v1, true, None), Err("invalid")),
            ("", cx(&v1, true, None), Err("invalid")),
        ];
        for (label, c, want) in rows {
            let got = deploy_version(label, c);
            match (want, got) {
                (Ok(w), Ok(v)) => assert_eq!(v.as_str(), w, "{label:?}"),
                (Err("conflict"), Err(DeployRefusal::Conflict(_))) => {}
                (Err("invalid"), Err(DeployRefusal::Invalid(_))) => {}
                (w, g) => panic!("{label:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn rollback_after_promotion_is_an_unjudged_instant_switch() {
        let base = RolloutSpec {
            strategy: StrategyKind::Canary,
            scale_down_delay: Duration::from_secs(30),
            ..RolloutSpec::default()
        };
        let s = rollback_spec(&base);
        assert_eq!(s.strategy, StrategyKind::BlueGreen);
        assert!(s.blue_green.auto_promote);
        assert!(!s.analysis.enabled);
        assert_eq!(s.scale_down_delay, Duration::ZERO);
        assert_eq!(s.instances, base.instances);
        let guarded = RolloutSpec {
            steps: cutover_core::ReleaseSteps {
                pre_deploy: true,
                migrate: true,
                ..Default::default()
            },
            ..base
        };
        assert!(!rollback_spec(&guarded).steps.any());
    }
}
