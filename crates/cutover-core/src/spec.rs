//! What a user asked for, resolved: the rollout policy of one service.
//!
//! `cutover-config` builds these from `cutover.toml` after validating them, so every consumer can
//! trust them: weights of canary steps rise to 100, durations are positive, thresholds are in
//! range. The controller and the judge read them; nothing here parses text.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{NoEvidence, ReleaseSteps, StrategyKind, Weight};

/// One step of a canary rollout (`[services.X.canary] steps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanaryStep {
    /// Send `weight` percent to the candidate, then hold for at least `pause` and until
    /// analysis has passed at this weight (unless `analysis` is false for this step).
    SetWeight {
        weight: Weight,
        pause: Option<Duration>,
        /// `analysis = false` on the step: it advances on its pause alone, unjudged.
        analysis: bool,
    },
    /// Hold until a person runs `cutover promote`.
    Approve,
}

/// `[services.X.analysis]`: how the candidate is judged while it takes traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisSpec {
    /// `analysis = false` on the service: no stage waits for a verdict. The only way, with a
    /// step's own `analysis = false`, to advance without evidence.
    pub enabled: bool,
    /// How often the judge looks at the requests since its last verdict.
    pub interval: Duration,
    /// No verdict on fewer candidate requests than this; the window keeps growing instead.
    pub min_requests: u64,
    /// Largest acceptable 5xx share of candidate requests.
    pub max_error_rate: Option<f64>,
    /// Largest acceptable candidate p99 latency.
    pub max_p99: Option<Duration>,
    /// Failed evaluations, over the whole rollout, that trigger an automatic rollback.
    pub failure_limit: u32,
    /// Also compare the candidate with the stable version on the same window, statistically.
    pub compare_to_stable: bool,
    /// How long one stage (a canary step, a rolling batch, a blue-green preview) may wait for
    /// a passing verdict before `on_no_evidence` decides.
    pub deadline: Duration,
    pub on_no_evidence: NoEvidence,
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        AnalysisSpec {
            enabled: true,
            interval: Duration::from_secs(2),
            min_requests: 50,
            max_error_rate: Some(0.01),
            max_p99: Some(Duration::from_millis(500)),
            failure_limit: 2,
            compare_to_stable: true,
            deadline: Duration::from_secs(600),
            on_no_evidence: NoEvidence::Pause,
        }
    }
}

/// `[services.X.blue_green]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlueGreenSpec {
    /// Switch as soon as the full candidate set is healthy (and analysis of preview traffic, if
    /// any, did not fail); otherwise wait for `cutover promote`.
    pub auto_promote: bool,
    /// Serves only the candidate before the switch, for smoke tests.
    pub preview_listen: Option<SocketAddr>,
}

impl Default for BlueGreenSpec {
    fn default() -> Self {
        BlueGreenSpec {
            auto_promote: true,
            preview_listen: None,
        }
    }
}

/// `[services.X.rolling]`: replace instances a few at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollingSpec {
    /// Extra candidate instances allowed above `instances` during the roll.
    pub max_surge: u32,
    /// Instances allowed to be missing below `instances` during the roll.
    pub max_unavailable: u32,
}

impl Default for RollingSpec {
    fn default() -> Self {
        RollingSpec {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

/// Everything the controller needs to roll one service from one version to another.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutSpec {
    pub strategy: StrategyKind,
    /// Instances per version.
    pub instances: u32,
    pub canary_steps: Vec<CanaryStep>,
    pub blue_green: BlueGreenSpec,
    pub rolling: RollingSpec,
    pub analysis: AnalysisSpec,
    /// A candidate not healthy within this long fails; traffic never moved to it.
    pub progress_deadline: Duration,
    /// How long requests in flight on a version that lost its weight may take to finish.
    pub drain_timeout: Duration,
    /// After SIGTERM, how long an instance may take to exit before SIGKILL.
    pub stop_timeout: Duration,
    /// After a promotion (every strategy), the old version keeps running this long, out of
    /// traffic, while post-promotion analysis judges the new one; a rollback within it is an
    /// instant switch.
    pub scale_down_delay: Duration,
    /// cutover runs the instances (false for `runtime = "static"`, whose addresses something
    /// else runs): messages then say "stopped" rather than "gets no more traffic".
    pub runs_instances: bool,
    /// The release-safety steps around the rollout (hooks, backup, migration, smoke checks);
    /// none by default.
    pub steps: ReleaseSteps,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        let w = |p| Weight::new(p).unwrap_or(Weight::FULL);
        RolloutSpec {
            strategy: StrategyKind::Canary,
            instances: 2,
            canary_steps: vec![
                CanaryStep::SetWeight {
                    weight: w(10),
                    pause: Some(Duration::from_secs(20)),
                    analysis: true,
                },
                CanaryStep::SetWeight {
                    weight: w(50),
                    pause: Some(Duration::from_secs(20)),
                    analysis: true,
                },
                CanaryStep::Approve,
                CanaryStep::SetWeight {
                    weight: Weight::FULL,
                    pause: None,
                    analysis: true,
                },
            ],
            blue_green: BlueGreenSpec::default(),
            rolling: RollingSpec::default(),
            analysis: AnalysisSpec::default(),
            progress_deadline: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            scale_down_delay: Duration::from_secs(30),
            runs_instances: true,
            steps: ReleaseSteps::default(),
        }
    }
}
