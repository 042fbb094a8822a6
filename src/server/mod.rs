//! Builds the gRPC server from a [`Config`]: store, services and the layer
//! stack, served from memgate's own accept loop ([`transport`]: connection
//! caps, idle close, HTTP/2 limits) until the shutdown future resolves.

mod calls;
mod transport;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;

use std::sync::Arc;

use tokio::sync::oneshot;
use tonic_health::{pb::health_server::HealthServer, server::HealthService};

use crate::admin::{health::Health, http as admin_http, metrics::Metrics};
use crate::api::{
    ByteStreamService, PayloadService, access_log::AccessLogLayer, bytestream::MAX_STREAM_MESSAGE,
};
use crate::auth::{AuthLayer, Authorizer};
use crate::config::{Backend, Config};
use crate::guard::{Guard, discover::Roots, jemalloc};
use crate::proto::{
    FILE_DESCRIPTOR_SET, bytestream::byte_stream_server::ByteStreamServer,
    memgate_v1::payload_server::PayloadServer,
};
use crate::store::{self, Store, spawn_gc};
use crate::tls::Tls;

pub use calls::{CallLimitLayer, method_table};
pub use transport::{
    CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE, REFUSAL_LINGER, STREAM_WINDOW,
    TransportObserver, connection_window,
};

/// Serves memgate on `listener` until `shutdown` resolves; in-flight calls then
/// get up to `shutdown.grace` to finish. No admin listener.
pub async fn serve(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::new(cfg.clone())
        .await?
        .serve(listener, None, shutdown)
        .await
}

/// [`serve`] with a guard the caller started (and may inspect). Admission
/// metrics go to the guard's own observer, not to this server's `/metrics`.
pub async fn serve_with_guard(
    cfg: &Config,
    guard: Guard,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::with_guard(cfg.clone(), guard, Metrics::new())
        .await?
        .serve(listener, None, shutdown)
        .await
}

/// A memgate server, initialised: guard running, store open, health reporting.
pub struct Server {
    cfg: Config,
    guard: Guard,
    health: Health,
    health_service: HealthServer<HealthService>,
    store: Store,
    metrics: Metrics,
    tls: Option<Tls>,
    auth: Option<Authorizer>,
}

impl Server {
    /// Starts the guard on this machine's cgroup and opens the store.
    pub async fn new(cfg: Config) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let guard = Guard::start_with_observer(
            cfg.memory.clone(),
            Roots::default(),
            STREAM_WINDOW as u64,
            Arc::new(metrics.clone()),
        )
        .await;
        Self::with_guard(cfg, guard, metrics).await
    }

    /// Like [`Server::new`] with a guard the caller started; `metrics` should be
    /// the observer that guard was started with, or admissions go uncounted.
    pub async fn with_guard(cfg: Config, guard: Guard, metrics: Metrics) -> anyhow::Result<Self> {
        let (health, health_service) = Health::new().await;
        let store = store::open(&cfg.storage, Arc::new(metrics.clone()))?;
        metrics.set_backend(cfg.storage.backend);
        metrics.watch_disk(store.disk());
        let tls = match cfg.tls.enabled() {
            true => Some(Tls::new(&cfg.tls)?),
            false => None,
        };
        let auth = match cfg.auth.enabled {
            true => Some(Authorizer::new(&cfg.auth)?),
            false => None,
        };
        Ok(Self {
            cfg,
            guard,
            health,
            health_service,
            store,
            metrics,
            tls,
            auth,
        })
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What `/metrics` shows (shared with the running server's counters).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves gRPC on `grpc` and, if given, the admin routes on `admin`, until
    /// `stop` resolves. Then no new calls are accepted, in-flight ones get
    /// `shutdown.grace` to finish, and whatever is still running is cut (partial
    /// uploads keep what they received, for resume).
    pub async fn serve(
        self,
        grpc: TcpListener,
        admin: Option<TcpListener>,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            cfg,
            guard,
            health,
            health_service,
            store,
            metrics,
            tls,
            auth,
        } = self;
        let _gc = spawn_gc(
            &store,
            cfg.storage.gc_interval,
            cfg.storage.partial_upload_expiry,
        );
        let _reachability = spawn_reachability(&store, &health, cfg.storage.s3.health_interval);
        let max_message = cfg.server.max_message_size.as_u64() as usize;
        let bytestream = ByteStreamServer::new(ByteStreamService::new(
            store,
            cfg.storage.read_chunk_size.as_u64() as usize,
        ))
        .max_decoding_message_size(MAX_STREAM_MESSAGE);
        let payload = PayloadServer::new(PayloadService)
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max_message)
            // The response carries the payload back plus a hash and a size.
            .max_encoding_message_size(max_message + 1024);
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        // jemalloc starts sampling here when [profiling] is on (an error if it cannot).
        let profiles = admin_http::Profiles::start(&cfg.profiling, auth.clone(), guard.clone())?;
        let (admin_stop, admin_stopped) = oneshot::channel::<()>();
        let admin_addr = match admin {
            Some(listener) => {
                let addr = listener.local_addr()?;
                let (g, m) = (guard.clone(), metrics.clone());
                let grpc_health = tonic::service::Routes::new(health_service.clone());
                let router = admin_http::router(
                    health.clone(),
                    Arc::new(move || m.encode(&g)),
                    Some(grpc_health),
                    profiles,
                );
                tokio::spawn(async move {
                    let stopped = async {
                        let _ = admin_stopped.await;
                    };
                    if let Err(e) = admin_http::serve(listener, router, stopped).await {
                        tracing::error!(error = %e, "admin listener failed");
                    }
                });
                Some(addr)
            }
            None => None,
        };
        let _monitor = health.spawn_monitor(guard.clone());

        let addr = grpc.local_addr()?;
        let snap = guard.snapshot();
        let view = guard.view();
        let malloc_conf = jemalloc::settings().ok().map(|s| {
            s.env_malloc_conf
                .or(s.embedded_malloc_conf)
                .unwrap_or(s.built_in_malloc_conf)
        });
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            grpc_addr = %addr,
            admin_addr = admin_addr.map(|a| a.to_string()),
            backend = cfg.storage.backend.as_str(),
            data_dir = (cfg.storage.backend == Backend::Local)
                .then(|| cfg.storage.data_dir.display().to_string()),
            bucket = (cfg.storage.backend == Backend::S3).then_some(cfg.storage.s3.bucket.as_str()),
            guard = if cfg.memory.enabled { "on" } else { "off" },
            tls = if tls.is_some() { if cfg.tls.client_ca_file.as_os_str().is_empty() { "on" } else { "mutual" } } else { "off" },
            auth = if auth.is_some() { "on" } else { "off" },
            limit = snap.limit.bytes,
            limit_source = %snap.limit.source,
            budget = view.budget,
            working_set = snap.working_set,
            malloc_conf = malloc_conf.as_deref().unwrap_or("(jemalloc not the allocator)"),
            "listening"
        );
        if auth.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                grpc_addr = %addr,
                "AUTHENTICATION IS OFF on a non-loopback address: anyone who can reach {addr} may read, write and process blobs. Set [auth] enabled = true with a tokens_file (the Helm chart does), or listen on 127.0.0.1"
            );
        }
        let _tls_reload = tls
            .as_ref()
            .map(|t| crate::tls::spawn_reload(t, cfg.tls.clone()));
        let _auth_reload = auth
            .as_ref()
            .map(|a| a.spawn_reload(cfg.auth.reload_interval));
        let table = method_table(&cfg);
        let routes = tonic::service::Routes::new(health_service)
            .add_service(bytestream)
            .add_service(payload)
            .add_service(reflection)
            .prepare();
        let service = tower::ServiceBuilder::new()
            // Outermost: logs and counts every call, including ones the layers below turn away.
            .layer(AccessLogLayer::new(metrics.clone()))
            // Then who is calling: refused before anything is counted or reserved for it.
            .layer(AuthLayer::new(auth))
            // Then how many calls that client has going: over the cap, refused
            // before it reserves memory or queues for it.
            .layer(CallLimitLayer::new(
                cfg.server.max_calls_per_client,
                table.clone(),
                Arc::new(metrics.clone()),
            ))
            // Before tonic decodes anything: reserve the call's memory or reject it.
            .layer(guard.layer(table))
            .service(routes);
        let (grpc_stop, grpc_stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = grpc_stopped.await;
        };
        // memgate's own accept loop: connection caps, idle close, drain.
        let server = transport::serve(
            grpc,
            tls.clone(),
            service,
            &cfg.server,
            Arc::new(metrics.clone()),
            stopped,
        );
        tokio::pin!(server);
        health.set_started();

        tokio::select! {
            result = &mut server => {
                let _ = admin_stop.send(());
                return result.map_err(Into::into);
            }
            () = stop => {}
        }
        let grace = cfg.shutdown.grace;
        health.begin_shutdown().await;
        tracing::info!(grace = ?grace, reserved = guard.view().reserved, "shutdown: accepting no new calls; in-flight calls may finish");
        let _ = grpc_stop.send(());
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => {
                result?;
                tracing::info!("shutdown: every in-flight call finished");
            }
            Err(_) => tracing::warn!(
                reserved = guard.view().reserved,
                "shutdown: grace period over, cutting the calls still running; partial uploads stay resumable"
            ),
        }
        let _ = admin_stop.send(());
        Ok(())
    }
}

/// Checks that the store is reachable now and every `interval`, telling
/// readiness. Only object stores can become unreachable; local disk skips it.
fn spawn_reachability(
    store: &Store,
    health: &Health,
    interval: std::time::Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    if store.backend() == Backend::Local {
        return None;
    }
    // Not ready until the first check says the bucket answers.
    health.set_storage(Err("checking that the object store is reachable".into()));
    let weak = Arc::downgrade(store);
    let health = health.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            let status = store.check_reachable().await.map_err(|e| e.to_string());
            health.set_storage(status);
        }
    }))
}
