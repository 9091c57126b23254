//! End-to-end tests of the cutover binary: real `cutover up` daemons, real `demo-app`
//! instances, real CLI invocations, all on loopback ports the OS picks.

// In tests a panic is the failure report, with its location; helpers unwrap freely.
#![allow(clippy::unwrap_used)]

mod chaos;
mod cli;
mod dashboard;
mod daytwo;
mod docker;
mod evidence;
mod failures;
mod harden;
mod harness;
mod processes;
mod restart;
mod rollouts;
mod safety;
mod signals;
mod state;
