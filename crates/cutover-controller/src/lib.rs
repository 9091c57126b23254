//! cutover-controller: decides what happens to a release, and makes it happen.
//!
//! [`fsm`] is the pure state machine (no IO, no clock); [`checkpoint`] turns its state into
//! text for the store; the driver (in `driver`) owns the side effects: it feeds events into
//! `fsm::step`, persists every transition before running its commands, reconciles instances
//! through the runtime and publishes route tables through the [`cutover_core::DataPlane`].
//!
//! The controller must never be needed for requests to flow: the proxy keeps serving the last
//! route table it was given if this crate's tasks stop.

pub mod checkpoint;
pub mod driver;
pub mod fsm;
pub mod plan;
mod probe;
pub mod view;

pub use driver::{
    Controller, Driver, DriverParts, HandedOver, SafetySetup, ServiceSetup, Shutdown, driver,
};
pub use view::{
    Action, ControlError, DeployRequest, EventView, InstanceView, Notice, RolloutView, ServiceView,
};
