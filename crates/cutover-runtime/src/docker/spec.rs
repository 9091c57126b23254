//! What a container of an instance is made of, as pure functions of the service's options and
//! the instance's `StartSpec`: its name, labels, environment, command and image, where its port
//! is published, and how an exit reads. No Engine here: these are table-tested.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::DockerOptions;
use crate::StartSpec;

/// The labels every container of cutover carries; a restarted daemon finds its own by them.
pub const LABEL_SERVICE: &str = "io.cutover.service";
pub const LABEL_VERSION: &str = "io.cutover.version";
pub const LABEL_INSTANCE: &str = "io.cutover.instance";
pub const LABEL_STATE_DIR: &str = "io.cutover.state-dir";

/// `cutover-<instance>`: the instance id is `<service>-<version>-<n>`, so the name reads
/// `cutover-<service>-<version>-<n>`. Docker takes `[a-zA-Z0-9][a-zA-Z0-9_.-]*`; a revision's
/// `@` (`v1@r2`) becomes `_`.
pub fn container_name(instance: &str) -> String {
    let safe: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("cutover-{safe}")
}

/// The image of `version` (its base, without a revision: `v1@r2` runs `v1`'s image).
pub fn image_for(template: &str, version: &str) -> String {
    template.replace("{version}", version)
}

/// `{port}` and `{version}` filled in, as for processes.
pub fn fill(arg: &str, port: u16, version: &str) -> String {
    arg.replace("{port}", &port.to_string())
        .replace("{version}", version)
}

/// The labels of an instance's container: the service's own, then cutover's (which win).
pub fn labels(opts: &DockerOptions, state_dir: &str, spec: &StartSpec) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = opts
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    l.insert(LABEL_SERVICE.into(), spec.service.to_string());
    l.insert(LABEL_VERSION.into(), spec.version.to_string());
    l.insert(LABEL_INSTANCE.into(), spec.instance.to_string());
    l.insert(LABEL_STATE_DIR.into(), state_dir.to_owned());
    l
}

/// The container's environment as `KEY=VALUE`: the instance's (service env under rollout env),
/// then `PORT` (the port inside the container) and the `CUTOVER_*` variables. Never the
/// process runtime's `CUTOVER_STATE_DIR` marker: the keeper kills every process on this machine
/// that carries it when a daemon dies, and containers must outlive a daemon's crash.
pub fn env(spec: &StartSpec, port: u16) -> Vec<String> {
    let mut env: BTreeMap<String, String> = spec.env.clone();
    env.remove(crate::contain::STATE_DIR_ENV);
    env.insert("PORT".into(), port.to_string());
    env.insert("CUTOVER_VERSION".into(), spec.version.base().to_owned());
    env.insert("CUTOVER_SERVICE".into(), spec.service.to_string());
    env.insert("CUTOVER_INSTANCE".into(), spec.instance.to_string());
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The command that replaces the image's CMD, when the service names one.
pub fn command(spec: &StartSpec, port: u16) -> Option<Vec<String>> {
    (!spec.command.is_empty()).then(|| {
        spec.command
            .iter()
            .map(|a| fill(a, port, spec.version.base()))
            .collect()
    })
}

/// Docker's key for a TCP port: `8080/tcp`.
pub fn port_key(port: u16) -> String {
    format!("{port}/tcp")
}

/// The host port published on 127.0.0.1 for `key`, from an inspected container's port map.
/// Only a loopback binding counts: cutover never sends traffic to another address.
pub fn published_port<'a>(
    bindings: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> Option<u16> {
    bindings.into_iter().find_map(|(ip, port)| {
        let loopback = matches!(ip, Some("127.0.0.1"));
        let port = port?.parse::<u16>().ok().filter(|p| *p > 0)?;
        loopback.then_some(port)
    })
}

/// `docker stop`'s grace period in whole seconds, rounded up so a stop never gets less than
/// `stop_timeout`.
pub fn stop_seconds(stop_timeout: Duration) -> i32 {
    let whole = stop_timeout.as_secs() + u64::from(stop_timeout.subsec_nanos() > 0);
    i32::try_from(whole).unwrap_or(i32::MAX)
}

/// How a container's run ended, as the Engine tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It is not running: its exit code, whether the kernel's OOM killer ended it, and the
    /// Engine's error (a start that failed, say).
    Exited {
        code: Option<i32>,
        oom: bool,
        error: Option<String>,
    },
    /// The container is gone: someone removed it (`docker rm -f`).
    Removed,
    /// It still runs (the wait ended for another reason, a lost connection to the Engine).
    Running,
}

impl Ended {
    /// The exit code for an `InstanceExit`.
    pub fn code(&self) -> Option<i32> {
        match self {
            Ended::Exited { code, .. } => *code,
            _ => None,
        }
    }

    /// What an exit event says beyond the code, first in the tail: the Engine's reason.
    pub fn reason(&self, memory: Option<u64>) -> Option<String> {
        match self {
            Ended::Exited { oom: true, .. } => Some(match memory {
                Some(m) => format!(
                    "OOM killed: the container used up its memory limit ({})",
                    mib(m)
                ),
                None => "OOM killed: the machine ran out of memory".to_owned(),
            }),
            Ended::Exited { error: Some(e), .. } if !e.is_empty() => {
                Some(format!("the Engine says: {e}"))
            }
            Ended::Removed => {
                Some("the container was removed outside cutover (docker rm?)".to_owned())
            }
            _ => None,
        }
    }
}

/// Bytes as people write a memory limit: `256MiB`.
pub fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: &str, command: &[&str]) -> StartSpec {
        StartSpec {
            service: "shop".into(),
            version: version.into(),
            instance: format!("shop-{version}-3").into(),
            index: 0,
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: BTreeMap::from([
                ("RUST_LOG".into(), "info".into()),
                ("PORT".into(), "1".into()),
                (crate::contain::STATE_DIR_ENV.into(), "/x".into()),
            ]),
            port: None,
        }
    }

    #[test]
    fn names_follow_the_contract_and_docker_rules() {
        for (instance, want) in [
            ("shop-v41-0", "cutover-shop-v41-0"),
            ("shop-v1@r2-7", "cutover-shop-v1_r2-7"),
            ("web-1.2.3_rc-1", "cutover-web-1.2.3_rc-1"),
        ] {
            assert_eq!(container_name(instance), want);
        }
    }

    #[test]
    fn images_commands_and_env_are_filled_in() {
        assert_eq!(image_for("shop:{version}", "v41"), "shop:v41");
        assert_eq!(
            image_for("registry:5000/shop:{version}", "v2"),
            "registry:5000/shop:v2"
        );
        assert_eq!(image_for("shop:latest", "v2"), "shop:latest");
        let s = spec("v1@r2", &["/app", "--port", "{port}", "--v={version}"]);
        assert_eq!(
            command(&s, 8080).unwrap(),
            ["/app", "--port", "8080", "--v=v1"],
            "the base version, as for processes"
        );
        assert_eq!(command(&spec("v1", &[]), 8080), None, "the image's own CMD");
        let env = env(&s, 8080);
        assert_eq!(
            env,
            [
                "CUTOVER_INSTANCE=shop-v1@r2-3",
                "CUTOVER_SERVICE=shop",
                "CUTOVER_VERSION=v1",
                "PORT=8080",
                "RUST_LOG=info",
            ],
            "PORT is the container's; never the keeper's marker"
        );
    }

    #[test]
    fn labels_are_cutovers_over_the_services_own() {
        let opts = DockerOptions {
            labels: BTreeMap::from([
                ("team".into(), "payments".into()),
                (LABEL_SERVICE.into(), "spoof".into()),
            ]),
            ..DockerOptions::new("shop", "/state", "shop:{version}", 8080)
        };
        let l = labels(&opts, "/state", &spec("v2", &[]));
        assert_eq!(l["team"], "payments");
        assert_eq!(l[LABEL_SERVICE], "shop");
        assert_eq!(l[LABEL_VERSION], "v2");
        assert_eq!(l[LABEL_INSTANCE], "shop-v2-3");
        assert_eq!(l[LABEL_STATE_DIR], "/state");
    }

    #[test]
    fn only_a_loopback_binding_is_an_address() {
        type Bindings<'a> = Vec<(Option<&'a str>, Option<&'a str>)>;
        let cases: Vec<(Bindings<'_>, Option<u16>)> = vec![
            (vec![(Some("127.0.0.1"), Some("32768"))], Some(32768)),
            (
                vec![
                    (Some("0.0.0.0"), Some("80")),
                    (Some("127.0.0.1"), Some("81")),
                ],
                Some(81),
            ),
            (vec![(Some("0.0.0.0"), Some("80"))], None),
            (vec![(Some("127.0.0.1"), Some(""))], None),
            (vec![(Some("127.0.0.1"), None)], None),
            (vec![], None),
        ];
        for (bindings, want) in cases {
            assert_eq!(published_port(bindings.clone()), want, "{bindings:?}");
        }
    }

    #[test]
    fn stop_grace_rounds_up_to_whole_seconds() {
        for (d, want) in [
            (Duration::from_secs(10), 10),
            (Duration::from_millis(300), 1),
            (Duration::from_millis(2500), 3),
            (Duration::ZERO, 0),
        ] {
            assert_eq!(stop_seconds(d), want, "{d:?}");
        }
    }

    #[test]
    fn exits_say_the_engines_reason() {
        let oom = Ended::Exited {
            code: Some(137),
            oom: true,
            error: None,
        };
        assert_eq!(oom.code(), Some(137));
        assert_eq!(
            oom.reason(Some(16 << 20)).unwrap(),
            "OOM killed: the container used up its memory limit (16MiB)"
        );
        assert_eq!(
            Ended::Removed.reason(None).unwrap(),
            "the container was removed outside cutover (docker rm?)"
        );
        assert_eq!(Ended::Removed.code(), None);
        let plain = Ended::Exited {
            code: Some(3),
            oom: false,
            error: Some(String::new()),
        };
        assert_eq!(plain.reason(None), None);
        assert_eq!(mib(1 << 30), "1GiB");
        assert_eq!(mib(1000), "1000 bytes");
    }
}
