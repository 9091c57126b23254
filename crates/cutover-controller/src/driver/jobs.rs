//! Release-safety jobs (stub).

use super::*;

impl Driver {
    pub(super) fn run_job(&mut self, _name: &ServiceName, _job: fsm::Job) {}
}
