//! cutover-chaos: faults, chaos experiments, synthetic traffic and scheduled probes
//! (docs/reference.md §11, docs/reference.md "Chaos experiments").
//!
//! - [`faults`]: the registry of faults injected into the proxy and the dependency hops, each
//!   with a mandatory end, every change an event.
//! - [`experiment`]: experiment files (cutover's TOML, Chaos Toolkit's JSON) checked into one
//!   model, with `file:line:col` for every problem.
//! - [`runner`]: the pure state machine of a run (hypothesis → method → hypothesis →
//!   rollbacks), in which rollbacks always run, also after a crash.
//! - [`exec`]: the daemon's executor: persists every step, runs probes and actions, finishes a
//!   crashed run's rollbacks at start.
//! - [`traffic`]: synthetic traffic for quiet canaries, blackbox probes, and scaling shocks.
//!
//! It decides nothing about releases (that is the controller's): it only acts through the
//! controller's handle, the proxy's fault slots and the metrics, and only on cutover's own
//! services and dependencies.

pub mod exec;
pub mod experiment;
pub mod faults;
mod http;
pub mod runner;
pub mod traffic;

pub use exec::{Chaos, ChaosError, Report};
pub use faults::{Clear, FaultError, FaultInfo, FaultRequest, Faults};
