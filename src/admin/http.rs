//! The plaintext admin listener: `/livez` and `/readyz` mirror the gRPC
//! health statuses (200 or 503, with a one-line reason), `/metrics` serves
//! Prometheus, and the gRPC health service itself answers here too (HTTP/2
//! without TLS), for probes when the gRPC port speaks TLS. Kept apart from the gRPC port so probes and scrapes never pass
//! through admission and stay reachable whatever the gRPC listener does.

use std::{future::Future, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use super::health::{Health, Probe};

/// Renders the metrics exposition on each scrape.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: RenderMetrics,
}

/// The admin routes, and the gRPC health service (`grpc` here, plaintext h2c):
/// with TLS on the gRPC port, this is where the kubelet's native gRPC probe
/// connects.
pub fn router(
    health: Health,
    metrics: RenderMetrics,
    grpc: Option<tonic::service::Routes>,
) -> Router {
    let http = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { health, metrics });
    match grpc {
        Some(routes) => http.merge(routes.into_axum_router()),
        None => http,
    }
}

fn probe(p: Probe) -> (StatusCode, String) {
    let code = if p.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{}\n", p.reason))
}

async fn livez(State(s): State<AdminState>) -> impl IntoResponse {
    probe(s.health.state().live)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    probe(s.health.state().ready)
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let render = s.metrics.clone();
    // Encoding reads the guard's snapshot; cheap, but keep it off the async workers' hot path.
    match tokio::task::spawn_blocking(move || render()).await {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

/// Serves the admin routes until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
