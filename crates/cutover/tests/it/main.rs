//! End-to-end tests of the cutover binary: real `cutover up` daemons, real `demo-app`
//! instances, real CLI invocations, all on loopback ports the OS picks.

mod cli;
mod harness;
mod rollouts;
