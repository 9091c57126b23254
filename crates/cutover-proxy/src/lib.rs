//! The data plane: weighted HTTP/1.1 reverse proxy, health checks, draining.
