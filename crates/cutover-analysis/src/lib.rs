//! The judge: thresholds and canary-versus-stable statistics, pure.
