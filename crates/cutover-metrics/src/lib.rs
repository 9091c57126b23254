//! Per-version request metrics: lock-light counters, HDR histograms, windows, Prometheus text.
