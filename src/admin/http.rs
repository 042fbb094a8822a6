//! The plaintext admin listener: `/livez` and `/readyz` mirror the gRPC
//! health statuses (200 or 503, with a one-line reason), `/metrics` serves
//! Prometheus, `/debug/pprof/heap` (and `.svg`) serve heap profiles when
//! `[profiling]` is on, and the gRPC health service itself answers here too
//! (HTTP/2 without TLS), for probes when the gRPC port speaks TLS. Kept apart
//! from the gRPC port so probes and scrapes never pass through admission and
//! stay reachable whatever the gRPC listener does.
//!
//! It answers plain HTTP honestly: an unknown path is 404 and a wrong method
//! 405, so a probe or a scraper pointed at a typo fails instead of passing. Only
//! gRPC requests (`content-type: application/grpc`) get gRPC's answers,
//! UNIMPLEMENTED for an unknown method included.

use std::{future::Future, sync::Arc, time::Instant};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use super::health::{Health, Probe};
use super::pprof::{self, Format, ProfilingError};
use crate::auth::{Authorizer, Permission};
use crate::config::ProfilingConfig;
use crate::guard::Guard;

/// Renders the metrics exposition on each scrape.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Reserved from the guard's budget while a profile is taken: jemalloc's dump,
/// its parse, the symbolizer's caches of the binary's line tables, and the
/// encoded profile. Measured in docs/profiling.md (the first profile of a
/// process is the costly one: it loads the line tables).
pub const PROFILE_RESERVATION: u64 = 64 * 1024 * 1024;
/// How long a profile request waits for that memory before a 503.
const PROFILE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What `/debug/pprof/heap` needs once `[profiling]` is on: who may read
/// profiles, and the guard whose budget a profile's own memory comes from.
#[derive(Clone)]
pub struct Profiles {
    auth: Option<Authorizer>,
    guard: Guard,
}

impl Profiles {
    /// Starts jemalloc's sampling as `cfg` says; `None` when profiling is off.
    /// With `auth`, profiles need a bearer token with the `admin` permission.
    pub fn start(
        cfg: &ProfilingConfig,
        auth: Option<Authorizer>,
        guard: Guard,
    ) -> Result<Option<Self>, ProfilingError> {
        if !cfg.enabled {
            return Ok(None);
        }
        pprof::start(cfg.lg_sample())?;
        Ok(Some(Self { auth, guard }))
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: RenderMetrics,
    profiles: Option<Profiles>,
}

/// The admin routes, and the gRPC health service (`grpc` here, plaintext h2c):
/// with TLS on the gRPC port, this is where the kubelet's native gRPC probe
/// connects. `profiles`: `None` when `[profiling]` is off (the paths answer 404).
pub fn router(
    health: Health,
    metrics: RenderMetrics,
    grpc: Option<tonic::service::Routes>,
    profiles: Option<Profiles>,
) -> Router {
    let http = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/debug/pprof/heap", get(heap_pprof))
        .route("/debug/pprof/heap.svg", get(heap_svg))
        .with_state(AdminState {
            health,
            metrics,
            profiles,
        });
    let http = match grpc {
        // tonic's fallback answers every path with gRPC UNIMPLEMENTED (HTTP
        // 200); ours below tells HTTP and gRPC apart.
        Some(routes) => http.merge(
            routes
                .into_axum_router()
                .reset_fallback()
                .layer(middleware::from_fn(grpc_only)),
        ),
        None => http,
    };
    http.fallback(unknown_path)
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`, ...).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

/// In front of the gRPC services: gRPC is POST with a gRPC content type; plain
/// HTTP on a gRPC path gets 405 or 415 instead of a gRPC error inside a 200.
async fn grpc_only(req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, HeaderValue::from_static("POST"))],
            format!(
                "{} is a gRPC method: it takes POST with content-type application/grpc\n",
                req.uri().path()
            ),
        )
            .into_response();
    }
    if !is_grpc(req.headers()) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "{} is a gRPC method: send content-type application/grpc\n",
                req.uri().path()
            ),
        )
            .into_response();
    }
    next.run(req).await
}

/// Unknown paths: 404 for HTTP, gRPC UNIMPLEMENTED for gRPC.
async fn unknown_path(req: Request) -> Response {
    let path = req.uri().path();
    if is_grpc(req.headers()) {
        let status = tonic::Status::unimplemented(format!(
            "{path}: this admin listener serves only grpc.health.v1.Health"
        ));
        let (parts, ()) = status.into_http::<()>().into_parts();
        return Response::from_parts(parts, axum::body::Body::empty());
    }
    (
        StatusCode::NOT_FOUND,
        format!(
            "no such path: {path}\nthis listener serves GET /livez, /readyz, /metrics, /debug/pprof/heap and /debug/pprof/heap.svg\n"
        ),
    )
        .into_response()
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

async fn heap_pprof(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    heap_profile(s, headers, Format::Pprof).await
}

async fn heap_svg(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    heap_profile(s, headers, Format::FlamegraphSvg).await
}

fn text(code: StatusCode, body: String) -> Response {
    (code, body + "\n").into_response()
}

/// A heap profile: checked against `[auth]`, its memory reserved from the
/// budget, taken on a blocking thread (never on the workers that answer probes).
async fn heap_profile(s: AdminState, headers: HeaderMap, format: Format) -> Response {
    let Some(p) = s.profiles else {
        return text(
            StatusCode::NOT_FOUND,
            "heap profiling is off: set [profiling] enabled = true (or MEMGATE__PROFILING__ENABLED=true) and restart".into(),
        );
    };
    let path = match format {
        Format::Pprof => "/debug/pprof/heap",
        Format::FlamegraphSvg => "/debug/pprof/heap.svg",
    };
    let who = match &p.auth {
        None => None,
        Some(auth) => match auth.check_bearer(path, &[Permission::Admin], &headers) {
            Ok(principal) => Some(principal.name),
            Err(st) if st.code() == tonic::Code::Unauthenticated => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"memgate admin\""),
                    )],
                    format!("{}\n", st.message()),
                )
                    .into_response();
            }
            Err(st) => return text(StatusCode::FORBIDDEN, st.message().to_owned()),
        },
    };
    let permit = if p.guard.enabled() {
        match p
            .guard
            .budget()
            .acquire(PROFILE_RESERVATION, PROFILE_WAIT)
            .await
        {
            Ok(permit) => Some(permit),
            Err(why) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
                    format!("no memory for a heap profile now: {why}\n"),
                )
                    .into_response();
            }
        }
    } else {
        None
    };
    let started = Instant::now();
    let taken = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        pprof::profile(format)
    })
    .await;
    match taken {
        Ok(Ok(body)) => {
            tracing::info!(
                path,
                principal = who.as_deref(),
                bytes = body.len(),
                ms = started.elapsed().as_millis() as u64,
                "heap profile taken"
            );
            let (content_type, disposition) = match format {
                Format::Pprof => (
                    "application/octet-stream",
                    "attachment; filename=\"heap.pb.gz\"",
                ),
                Format::FlamegraphSvg => ("image/svg+xml", "inline; filename=\"heap.svg\""),
            };
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::CONTENT_DISPOSITION, disposition),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
                .into_response()
        }
        Ok(Err(ProfilingError::Busy)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            format!("{}\n", ProfilingError::Busy),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(path, error = %e, "heap profile failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("heap profile failed: {e}"),
        ),
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
