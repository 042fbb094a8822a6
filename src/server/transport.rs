//! The gRPC listener's transport: memgate's own accept loop and HTTP/2
//! connections in front of tonic's routes, because tonic's `Server` has no cap
//! on connections and never closes an idle one.
//!
//! Each accepted TCP connection takes a slot from [`Connections`]: at most
//! `server.max_connections` in all and `server.max_connections_per_client`
//! from one IP address. One over either cap is still answered, never left
//! hanging: it completes its TLS and HTTP/2 handshakes, every call on it gets
//! `RESOURCE_EXHAUSTED` naming the key, and after the first answer (or
//! [`REFUSAL_LINGER`]) it gets a GOAWAY and is closed. An admitted connection
//! with no call in flight for `server.connection_idle_timeout` gets a graceful
//! GOAWAY. On shutdown the listener closes at once and every connection gets
//! a graceful GOAWAY; its calls in flight may finish.
//!
//! tonic's own server puts the connection's address (and TLS peer
//! certificates) into each request's extensions and honours the client's
//! `grpc-timeout`; [`ConnService`] does both the same way, so the access log,
//! auth and the guard see what they saw under tonic.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::IpAddr,
    pin::{Pin, pin},
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Notify, Semaphore, watch},
    task::JoinSet,
};
use tonic::{Status, body::Body, transport::server::Connected};
use tower::{Service, ServiceExt};

use super::calls::WithGuard;
use crate::config::ServerConfig;
use crate::guard::estimate::parse_grpc_timeout;
use crate::tls::Tls;

/// The HTTP/2 stream window. Throughput is bounded by window / RTT and by how
/// much slack the receiver has while it is busy hashing and writing: measured on
/// loopback (2 cores), a 150 MB Write took 285–320 ms with hyper's default 1 MiB,
/// 205–265 ms with 2 MiB and 165–195 ms with 4 MiB. It is also what hyper may
/// buffer for a stream whose body nobody reads yet, which the guard charges every
/// waiting call.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// The default of `server.max_concurrent_streams`. A gRPC channel multiplexes
/// every call over one connection; 32 large payloads in flight on one
/// connection is plenty, and the number sizes the connection window.
pub const MAX_CONCURRENT_STREAMS: u32 = crate::config::DEFAULT_MAX_CONCURRENT_STREAMS;
/// The connection window with the default stream count: see [`connection_window`].
pub const CONNECTION_WINDOW: u32 = STREAM_WINDOW * MAX_CONCURRENT_STREAMS;

/// Largest HTTP/2 frame a client may send us. hyper's default of 16 KiB means
/// ~10,000 frames, each handled and copied separately, per 150 MB upload.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// How long a refused connection is kept open for its first call to be
/// answered: long enough for a client that connects first and calls later
/// (a tonic `Channel` after `connect()`) to read why, short enough that a
/// flood of refused connections holds little.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Refused connections being answered at once. Past this a refused connection
/// is closed straight after accept (the client sees a reset, not a reason):
/// answering a flood must not cost more than the flood.
const MAX_REFUSING: usize = 256;
/// Pushback (gRFC A6) on a refused connection's calls: a client that retries
/// sooner dials again into the same cap.
const REFUSAL_PUSHBACK_MS: u32 = 1000;

/// Room for every stream's full window, so streams that wait (unread) can never
/// use up the connection window that admitted streams need: no head-of-line
/// stall. `server.max_concurrent_streams` is validated so this fits HTTP/2's
/// largest window.
pub fn connection_window(cfg: &ServerConfig) -> u32 {
    STREAM_WINDOW.saturating_mul(cfg.max_concurrent_streams)
}

/// Told about connections (metrics). Reasons are bounded labels.
pub trait TransportObserver: Send + Sync + 'static {
    fn connection_opened(&self) {}
    fn connection_closed(&self) {}
    /// A connection over a cap: `reason` is the config key's name.
    fn connection_refused(&self, _reason: &'static str) {}
    /// An admitted connection closed by `server.connection_idle_timeout`.
    fn connection_closed_idle(&self) {}
}

/// The HTTP/2 settings of every connection, from `[server]`. Each is set
/// explicitly: tonic passes hyper "none" for several (streams, local resets),
/// which means unlimited rather than hyper's default.
fn http2_builder(cfg: &ServerConfig) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(cfg))
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .max_frame_size(MAX_FRAME_SIZE)
        .adaptive_window(false)
        // A peer that vanished without a FIN (dropped by a NAT or a balancer)
        // holds its streams' reservations until its connection closes: a PING
        // unanswered for keepalive_timeout closes it. Live-but-stalled
        // clients answer PINGs; the admission layer's watchdog cuts those.
        .keep_alive_interval(Some(cfg.keepalive_interval).filter(|d| !d.is_zero()))
        .keep_alive_timeout(cfg.keepalive_timeout)
        // Decoded headers are not in the memory budget; this bounds them per
        // stream (validated to at most 1 MiB, so the cast cannot truncate).
        .max_header_list_size(cfg.max_header_list_size.as_u64() as u32)
        .max_local_error_reset_streams(cfg.max_local_error_reset_streams)
        .max_pending_accept_reset_streams(cfg.max_pending_accept_reset_streams);
    b
}

/// Serves `service` on `listener` (with `tls` if given) until `stop`
/// resolves, then stops accepting, sends every connection a graceful GOAWAY
/// and returns once they have all closed. Dropping the future cuts them.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<Tls>,
    service: S,
    cfg: &ServerConfig,
    observer: Arc<dyn TransportObserver>,
    stop: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = http2_builder(cfg);
    let idle = Some(cfg.connection_idle_timeout).filter(|d| !d.is_zero());
    let connections = Connections::new(
        cfg.max_connections,
        cfg.max_connections_per_client,
        observer.clone(),
    );
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (drain, draining) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut stop = pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a connection task panicked");
                }
            }
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tls = tls.clone();
                match connections.admit(peer.ip()) {
                    Ok(slot) => {
                        let conn = Conn {
                            builder: builder.clone(),
                            idle,
                            draining: draining.clone(),
                            observer: observer.clone(),
                        };
                        let service = service.clone();
                        tasks.spawn(async move {
                            match tls {
                                None => conn.serve(tcp, service).await,
                                Some(tls) => match tls.accept(tcp).await {
                                    Ok(stream) => conn.serve(stream, service).await,
                                    Err(e) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                                },
                            }
                            drop(slot);
                        });
                    }
                    Err(refusal) => {
                        observer.connection_refused(refusal.reason());
                        tracing::info!(%peer, reason = refusal.reason(), "connection refused: {refusal}");
                        let Ok(permit) = refusing.clone().try_acquire_owned() else {
                            continue;
                        };
                        let builder = builder.clone();
                        tasks.spawn(async move {
                            match tls {
                                None => refuse(tcp, refusal, &builder).await,
                                Some(tls) => {
                                    if let Ok(stream) = tls.accept(tcp).await {
                                        refuse(stream, refusal, &builder).await;
                                    }
                                }
                            }
                            drop(permit);
                        });
                    }
                }
            }
        }
    }
    drop(listener);
    let _ = drain.send(true);
    tracing::debug!(
        connections = tasks.len(),
        "waiting for connections to close"
    );
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// What serving one admitted connection needs.
struct Conn {
    builder: http2::Builder<TokioExecutor>,
    idle: Option<Duration>,
    draining: watch::Receiver<bool>,
    observer: Arc<dyn TransportObserver>,
}

impl Conn {
    /// Serves HTTP/2 on `io` until the client closes it, it is idle for too
    /// long, or the server drains.
    async fn serve<IO, S>(mut self, io: IO, service: S)
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (activity, mut calls) = watch::channel(0usize);
        let service = ConnService {
            inner: service,
            info: io.connect_info(),
            activity: Arc::new(activity),
        }
        .map_request(|req: Request<Incoming>| req.map(Body::new));
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let mut conn = pin!(conn);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = idle_for(&mut calls, self.idle.unwrap_or_default()), if !closing && self.idle.is_some() => {
                    self.observer.connection_closed_idle();
                    tracing::debug!(idle = ?self.idle, "closing an idle connection (server.connection_idle_timeout)");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = self.draining.wait_for(|d| *d), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Resolves once no call has been in flight (`calls` at 0, unchanged) for `timeout`.
async fn idle_for(calls: &mut watch::Receiver<usize>, timeout: Duration) {
    loop {
        if calls.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(timeout, calls.changed()).await {
            Err(_) => return,
            Ok(Err(_)) => return std::future::pending().await,
            // A call started (or started and ended): count from its end.
            Ok(Ok(())) => {}
        }
    }
}

/// Answers every call on a refused connection with the refusal, then closes it
/// with a GOAWAY after the first answer or [`REFUSAL_LINGER`].
async fn refuse<IO>(io: IO, refusal: Refusal, builder: &http2::Builder<TokioExecutor>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answered = Arc::new(Notify::new());
    let status = refusal.status();
    let notify = answered.clone();
    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
        notify.notify_one();
        std::future::ready(Ok::<_, Infallible>(status.clone().into_http::<Body>()))
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = answered.notified() => {}
        () = tokio::time::sleep(REFUSAL_LINGER) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(REFUSAL_LINGER, conn).await;
}

/// The connection caps, shared by the accept loop and every connection's [`Slot`].
#[derive(Clone)]
struct Connections {
    inner: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_client: usize,
    observer: Arc<dyn TransportObserver>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl Connections {
    fn new(max_total: usize, max_per_client: usize, observer: Arc<dyn TransportObserver>) -> Self {
        Self {
            inner: Arc::default(),
            max_total,
            max_per_client,
            observer,
        }
    }

    /// A slot for a new connection from `ip`, or why there is none.
    fn admit(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        // An IPv4 client on a dual-stack socket is the same client as on IPv4.
        let ip = ip.to_canonical();
        let mut counts = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.max_total {
            return Err(Refusal::Total {
                max: self.max_total,
            });
        }
        let mine = counts.per_client.entry(ip).or_insert(0);
        if *mine >= self.max_per_client {
            return Err(Refusal::PerClient {
                ip,
                max: self.max_per_client,
            });
        }
        *mine += 1;
        counts.total += 1;
        drop(counts);
        self.observer.connection_opened();
        Ok(Slot {
            connections: self.clone(),
            ip,
        })
    }
}

/// One admitted connection's place in [`Connections`], given back on drop.
struct Slot {
    connections: Connections,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = &self.connections;
        let mut counts = c.inner.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(n) = counts.per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&self.ip);
            }
        }
        drop(counts);
        c.observer.connection_closed();
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, thiserror::Error)]
enum Refusal {
    #[error("the server has {max} connections open (server.max_connections); try again later")]
    Total { max: usize },
    #[error(
        "{max} connections from {ip} are open already (server.max_connections_per_client); \
         share a channel between calls, or close channels that are idle"
    )]
    PerClient { ip: IpAddr, max: usize },
}

impl Refusal {
    /// The metric label: the key of the cap.
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Total { .. } => "max_connections",
            Refusal::PerClient { .. } => "max_connections_per_client",
        }
    }

    fn status(&self) -> Status {
        let mut status = Status::resource_exhausted(format!("connection refused: {self}"));
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", REFUSAL_PUSHBACK_MS.into());
        status
    }
}

/// Per connection, in front of the shared service: what tonic's server adds
/// to each request (the connection's info, the client's `grpc-timeout`), and
/// the connection's count of calls in flight for the idle timeout.
#[derive(Clone)]
struct ConnService<S, C> {
    inner: S,
    info: C,
    activity: Arc<watch::Sender<usize>>,
}

/// One call in flight on a connection, until its response body is dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn start(activity: &Arc<watch::Sender<usize>>) -> Self {
        activity.send_modify(|n| *n += 1);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl<S, C> Service<Request<Body>> for ConnService<S, C>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    C: Clone + Send + Sync + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        req.extensions_mut().insert(self.info.clone());
        let timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = match timeout {
                None => response.await?,
                // As tonic's server does: the call is dropped at its deadline.
                Some(t) => match tokio::time::timeout(t, response).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(Status::cancelled("Timeout expired").into_http()),
                },
            };
            Ok(response.map(|b| Body::new(WithGuard::new(b, in_flight))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoTransportObserver;
    impl TransportObserver for NoTransportObserver {}

    fn caps(total: usize, per_client: usize) -> Connections {
        Connections::new(total, per_client, Arc::new(NoTransportObserver))
    }

    #[test]
    fn the_per_client_cap_counts_each_address_and_gives_slots_back() {
        let c = caps(10, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.admit(a).unwrap();
        let _a2 = c.admit(a).unwrap();
        let refused = c.admit(a).err().expect("a third from a");
        assert_eq!(refused.reason(), "max_connections_per_client");
        assert!(refused.to_string().contains("10.0.0.1"), "{refused}");
        // The same client through an IPv4-mapped IPv6 address.
        assert!(c.admit("::ffff:10.0.0.1".parse().unwrap()).is_err());
        let _b1 = c.admit(b).unwrap();
        drop(a1);
        let _a3 = c.admit(a).unwrap();
    }

    #[test]
    fn the_total_cap_refuses_everyone_until_a_slot_is_free() {
        let c = caps(2, 2);
        let one = c.admit("10.0.0.1".parse().unwrap()).unwrap();
        let _two = c.admit("10.0.0.2".parse().unwrap()).unwrap();
        let refused = c.admit("10.0.0.3".parse().unwrap()).err().unwrap();
        assert_eq!(refused.reason(), "max_connections");
        let status = refused.status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("server.max_connections"));
        drop(one);
        let _three = c.admit("10.0.0.3".parse().unwrap()).unwrap();
        assert_eq!(
            c.inner.lock().unwrap().per_client.len(),
            2,
            "addresses with no connection are forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_call() {
        let (tx, mut rx) = watch::channel(0usize);
        let tx = Arc::new(tx);
        let start = tokio::time::Instant::now();
        let call = InFlight::start(&tx);
        let idle = tokio::spawn(async move {
            idle_for(&mut rx, Duration::from_secs(10)).await;
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(call);
        let closed = idle.await.unwrap();
        assert_eq!(closed - start, Duration::from_secs(40));
    }
}
