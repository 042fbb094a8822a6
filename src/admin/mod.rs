//! What the kubelet, Prometheus and an operator see: gRPC and HTTP health probes
//! and metrics.

pub mod health;
pub mod http;
pub mod metrics;
