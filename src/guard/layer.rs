//! The admission layer: a tower layer in front of tonic's routes. For each call
//! it decides what memory the call needs (before tonic allocates anything: for a
//! unary call it reads the 5-byte length prefix first), takes a [`Permit`] for it
//! from the budget, waiting briefly in the queue if needed, and rejects with
//! `RESOURCE_EXHAUSTED` and a `grpc-retry-pushback-ms` trailer (gRFC A6) when
//! the memory does not come. The permit rides on the response body and is
//! released when the call ends in any way. Health checks bypass all of it.
//!
//! Reservations are taken for a client ([`ClientKey`]), so that the budget can
//! share memory fairly between clients, and every admitted call is watched for
//! progress ([`super::watch`]): a client that stops sending or reading is cut
//! with `DEADLINE_EXCEEDED` instead of holding its reservation for ever.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::{Status, body::Body};
use tower::{Layer, Service};

use super::{
    Guard,
    body::{Holding, Replay, first_bytes, read_ahead},
    budget::{self, Permit, Rejection, UNKNOWN_CLIENT},
    estimate::{Estimate, Estimator, parse_grpc_timeout, parse_prefix},
    metered::Metered,
    watch::Watch,
};

/// Told about every admission decision (metrics). Methods and reasons are
/// bounded labels.
pub trait AdmissionObserver: Send + Sync + 'static {
    fn admitted(&self, _method: &'static str, _bytes: u64, _waited: Option<Duration>) {}
    fn queued(&self, _method: &'static str) {}
    fn rejected(&self, _method: &'static str, _reason: &'static str) {}
    /// A call was cut for making no progress ([`super::watch::Cut::reason`]).
    fn stream_cut(&self, _method: &'static str, _reason: &'static str) {}
    /// A call's memory was reclaimed ([`super::reclaim::ReclaimReason::as_str`]).
    fn reclaimed(&self, _method: &'static str, _reason: &'static str, _bytes: u64) {}
}

/// Who is calling, for the budget's fair share: a request extension set by an
/// authentication layer in front of the guard (a token's name, a certificate
/// identity). Without one the guard uses the peer's IP address, else "unknown".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey(pub Arc<str>);

/// The client a call's memory is reserved for: its [`ClientKey`], else the
/// peer's IP address, else [`UNKNOWN_CLIENT`].
pub fn client_key<B>(req: &mut http::Request<B>) -> Arc<str> {
    if let Some(ClientKey(key)) = req.extensions().get::<ClientKey>() {
        return key.clone();
    }
    // tonic's own lookup knows where its transport puts the peer address, with
    // TLS (`TlsConnectInfo<TcpConnectInfo>`) and without (`TcpConnectInfo`), so
    // borrow it instead of naming types that exist only with tonic's TLS feature.
    let extensions = std::mem::take(req.extensions_mut());
    let probe = tonic::Request::from_parts(tonic::metadata::MetadataMap::new(), extensions, ());
    let peer = probe.remote_addr();
    *req.extensions_mut() = probe.into_parts().1;
    match peer {
        Some(addr) => Arc::from(addr.ip().to_canonical().to_string()),
        None => Arc::from(UNKNOWN_CLIENT),
    }
}

/// An observer that ignores everything.
pub struct NoObserver;
impl AdmissionObserver for NoObserver {}

/// A deadline is cut this much short so the rejection reaches the client in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);

/// The call's reservation, reachable by the handler through the request
/// extensions, so a handler that learns it needs more (an echo) can grow it.
#[derive(Clone)]
pub struct Reservation {
    permit: Arc<Mutex<Permit>>,
    guard: Guard,
    deadline: Option<Instant>,
    method: &'static str,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.permit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes()
    }

    /// The client the memory is reserved for.
    pub fn client(&self) -> Arc<str> {
        self.permit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .client()
            .clone()
    }

    /// Reserves `extra` bytes more, waiting like a new call would.
    pub async fn grow(&self, extra: u64) -> Result<(), Status> {
        let wait = max_wait(&self.guard, self.deadline);
        let holds = self.bytes();
        let admission = self
            .guard
            .budget()
            .try_grow_for(&self.client(), holds, extra);
        match decide(&self.guard, self.method, extra, admission, wait).await {
            Ok(more) => {
                self.permit
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .absorb(more);
                Ok(())
            }
            Err(rejection) => Err(rejection_status(&self.guard, &rejection)),
        }
    }
}

/// Adds admission control to a service. See the module docs.
#[derive(Clone)]
pub struct AdmissionLayer<E> {
    guard: Guard,
    estimator: E,
}

impl<E> AdmissionLayer<E> {
    pub fn new(guard: Guard, estimator: E) -> Self {
        Self { guard, estimator }
    }
}

impl<S, E: Clone> Layer<S> for AdmissionLayer<E> {
    type Service = AdmissionService<S, E>;
    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            guard: self.guard.clone(),
            estimator: self.estimator.clone(),
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Clone)]
pub struct AdmissionService<S, E> {
    inner: S,
    guard: Guard,
    estimator: E,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, E, ResBody> Service<http::Request<Body>> for AdmissionService<S, E>
where
    S: Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    E: Estimator,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let class = self.estimator.classify(req.uri().path());
        if class.estimate == Estimate::Bypass || !self.guard.enabled() {
            let fut = inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(Body::new)) });
        }
        let guard = self.guard.clone();
        let client = client_key(&mut req);
        // Watched from the first byte: a client that sends headers and then
        // nothing is cut too, even before it is admitted.
        let limits = self.estimator.stream_limits();
        let watch = (!limits.is_off()).then(|| Watch::start(class.method, limits, guard.clone()));
        let req = match &watch {
            Some(w) => req.map(|b| w.request_body(b)),
            None => req,
        };
        let watch2 = watch.clone();
        let admitted = async move {
            let deadline = req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
                .map(|t| Instant::now() + t);
            let (bytes, req) = match class.estimate {
                Estimate::Fixed(_) | Estimate::Stream { .. } => (class.estimate.upfront(), req),
                Estimate::Unary {
                    copies,
                    overhead,
                    compressed,
                } => {
                    let (parts, mut body) = req.into_parts();
                    let (ahead, ended) = match read_ahead(&mut body, 5).await {
                        Ok(r) => r,
                        Err(e) => {
                            return Ok(
                                Status::cancelled(format!("request body failed: {e}")).into_http()
                            );
                        }
                    };
                    let bytes = parse_prefix(&first_bytes(&ahead, 5)).map_or(overhead, |p| {
                        Estimate::for_prefix(copies, overhead, compressed, p)
                    });
                    let body = Body::new(Replay::new(ahead, body, ended));
                    (bytes, http::Request::from_parts(parts, body))
                }
                Estimate::Bypass => unreachable!("handled above"),
            };
            let wait = max_wait(&guard, deadline);
            let permit = match acquire(&guard, class.method, &client, bytes, wait).await {
                Ok(p) => p,
                Err(rejection) => return Ok(rejection_status(&guard, &rejection).into_http()),
            };
            let reservation = Reservation {
                permit: Arc::new(Mutex::new(permit)),
                guard,
                deadline,
                method: class.method,
            };
            if let Some(w) = &watch2 {
                w.admitted(&reservation.permit, &reservation.guard);
            }
            let mut req = match class.estimate {
                Estimate::Stream {
                    messages,
                    first,
                    compressed,
                    ..
                } => {
                    let r = reservation.clone();
                    req.map(|b| {
                        Body::new(Metered::new(
                            b,
                            r,
                            messages,
                            first,
                            compressed.min(u32::MAX as u64) as u32,
                        ))
                    })
                }
                _ => req,
            };
            req.extensions_mut().insert(reservation.clone());
            let resp = inner.call(req).await?;
            let body = |b| Body::new(Holding::new(b, reservation));
            Ok(match &watch2 {
                Some(w) => resp.map(|b| w.response_body(body(b))),
                None => resp.map(body),
            })
        };
        let Some(watch) = watch else {
            return Box::pin(admitted);
        };
        Box::pin(async move {
            let mut admitted = std::pin::pin!(admitted);
            // A cut before the handler answered drops its future (and with it
            // the request body and any upload in progress, suspended as on a
            // disconnect) and answers in its place.
            std::future::poll_fn(|cx| {
                // The cut first: once there is one the handler is not polled
                // again (it would only see its request body fail).
                if let Poll::Ready(cut) = watch.poll_cut(cx) {
                    return Poll::Ready(Ok(cut.status().into_http()));
                }
                admitted.as_mut().poll(cx)
            })
            .await
        })
    }
}

/// How long a call may wait: the queue timeout, cut to its own deadline.
fn max_wait(guard: &Guard, deadline: Option<Instant>) -> Duration {
    let queue = guard.settings().queue_timeout;
    match deadline {
        Some(d) => queue.min(
            d.saturating_duration_since(Instant::now())
                .saturating_sub(DEADLINE_MARGIN),
        ),
        None => queue,
    }
}

async fn acquire(
    guard: &Guard,
    method: &'static str,
    client: &Arc<str>,
    bytes: u64,
    wait: Duration,
) -> Result<Permit, Rejection> {
    decide(
        guard,
        method,
        bytes,
        guard.budget().try_acquire_for(client, bytes),
        wait,
    )
    .await
}

/// Waits out a queued admission and tells the observer how it went.
async fn decide(
    guard: &Guard,
    method: &'static str,
    bytes: u64,
    admission: Result<budget::Admission, Rejection>,
    wait: Duration,
) -> Result<Permit, Rejection> {
    let observer = guard.observer();
    let result = match admission {
        Ok(budget::Admission::Now(p)) => {
            observer.admitted(method, bytes, None);
            return Ok(p);
        }
        Ok(budget::Admission::Queued(ticket)) => {
            observer.queued(method);
            let start = Instant::now();
            let r = ticket.wait(wait).await;
            if r.is_ok() {
                observer.admitted(method, bytes, Some(start.elapsed()));
            }
            r
        }
        Err(e) => Err(e),
    };
    if let Err(rejection) = &result {
        observer.rejected(method, rejection.reason());
        tracing::debug!(method, bytes, %rejection, "call rejected");
    }
    result
}

/// `RESOURCE_EXHAUSTED` with the numbers and a pushback: negative (do not retry)
/// for a call that can never fit.
pub fn rejection_status(guard: &Guard, rejection: &Rejection) -> Status {
    let pushback = match rejection {
        Rejection::NeverFits { .. } => -1,
        Rejection::Busy { .. } => guard.budget().pushback().as_millis() as i64,
    };
    let mut status = Status::resource_exhausted(rejection.to_string());
    if let Ok(v) = pushback.to_string().parse() {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::transport::server::TcpConnectInfo;

    #[test]
    fn the_client_is_its_key_else_its_peer_address_else_unknown() {
        let mut req = http::Request::new(());
        assert_eq!(&*client_key(&mut req), UNKNOWN_CLIENT);
        req.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some("[::ffff:10.0.0.7]:50000".parse().unwrap()),
        });
        // An IPv4 peer is one client whether it came over IPv4 or IPv6.
        assert_eq!(&*client_key(&mut req), "10.0.0.7");
        assert!(
            req.extensions().get::<TcpConnectInfo>().is_some(),
            "the extensions are put back"
        );
        req.extensions_mut()
            .insert(ClientKey(Arc::from("ci-token")));
        assert_eq!(&*client_key(&mut req), "ci-token");
    }
}
