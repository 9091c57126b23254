//! The daemon's HTTP API, auth, server-sent events and dashboard.
