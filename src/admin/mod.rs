//! What the kubelet, Prometheus and an operator see: gRPC and HTTP health probes,
//! metrics, and heap profiles.

pub mod health;
pub mod http;
pub mod metrics;
pub mod pprof;
