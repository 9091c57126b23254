//! Runtimes that start and stop instances: process and static.
