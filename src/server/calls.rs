//! Calls, before the guard sees them: what each memgate method reserves from
//! the memory budget ([`method_table`]), and how many calls one client may
//! have admitted at once ([`CallLimitLayer`], `server.max_calls_per_client`).
//!
//! The cap on calls sits in front of the guard, so a call over it is refused
//! before it reserves anything or takes a place in the memory queue. It counts
//! per client as the guard's fair share does ([`client_key`]: the auth
//! identity when a token or certificate named one, else the IP address), and
//! exempts what the guard exempts (health checks, reflection).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::api::bytestream::MAX_STREAM_MESSAGE;
use crate::config::{Backend, Config};
use crate::guard::{
    estimate::{Estimate, Estimator, MethodTable},
    layer::{AdmissionObserver, client_key},
};

use super::STREAM_WINDOW;

/// Pushback (gRFC A6) on a call refused by the cap: about what a short call
/// of the same client takes to finish and free its place.
const CALLS_PUSHBACK_MS: u32 = 100;

/// Messages a Write stream may hold at once: the one in the store's queue
/// (`UPLOAD_QUEUE`), the one being written and hashed, and the one tonic is
/// decoding (the handler reads the next message only once the queue has room).
/// Each is at most [`MAX_STREAM_MESSAGE`]; the reservation follows the largest
/// seen (see [`Estimate::Stream`]).
const WRITE_MESSAGES_IN_FLIGHT: u64 = 3;
/// What a Write reserves per message before its first prefix is read: small
/// messages cost no more than this.
const FIRST_MESSAGE: u64 = 64 * 1024;
/// A unary call's fixed costs besides its message: headers, the response, tonic's
/// first decode buffer.
const UNARY_OVERHEAD: u64 = 256 * 1024;
/// Calls without a message of note (QueryWriteStatus, unknown methods).
const SMALL_CALL: u64 = 64 * 1024;

/// What each memgate method reserves; see [`Estimate`].
pub fn method_table(cfg: &Config) -> MethodTable {
    let window = STREAM_WINDOW as u64;
    let read_chunk = cfg.storage.read_chunk_size.as_u64();
    let max_message = cfg.server.max_message_size.as_u64();
    // With S3, a Write also holds the multipart part being filled and the parts
    // in flight.
    let part_buffers = match cfg.storage.backend {
        Backend::Local => 0,
        Backend::S3 => cfg.storage.s3.stream_buffer(),
    };
    MethodTable::new(Estimate::Fixed(SMALL_CALL))
        // A call keeps its reservation only while its client keeps sending or
        // reading: a stalled one is cut (server.stream_idle_timeout, min_throughput).
        .with_stream_limits(cfg.server.stream_limits())
        // The HTTP/2 window hyper may buffer plus the chunks in flight: never the blob size.
        .method(
            "/google.bytestream.ByteStream/Write",
            Estimate::Stream {
                window,
                messages: WRITE_MESSAGES_IN_FLIGHT,
                first: FIRST_MESSAGE,
                overhead: SMALL_CALL + part_buffers,
                compressed: MAX_STREAM_MESSAGE as u64,
            },
        )
        // The store's read-ahead (two chunks), one being encoded, and the send window.
        .method(
            "/google.bytestream.ByteStream/Read",
            Estimate::Fixed(window + 4 * read_chunk),
        )
        .method(
            "/google.bytestream.ByteStream/QueryWriteStatus",
            Estimate::Fixed(SMALL_CALL),
        )
        // One copy: `bytes` fields share the decode buffer. An echo grows the
        // reservation by one more copy in the handler, once it knows.
        .method(
            "/memgate.v1.Payload/Process",
            Estimate::Unary {
                copies: 1,
                overhead: UNARY_OVERHEAD,
                compressed: max_message,
            },
        )
}

/// Caps the calls one client has admitted at once; see the module docs.
#[derive(Clone)]
pub struct CallLimitLayer {
    calls: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    max: usize,
    table: MethodTable,
    observer: Arc<dyn AdmissionObserver>,
}

impl CallLimitLayer {
    /// At most `max` calls per client; `table` says which paths are exempt;
    /// refusals are told to `observer` as rejections with reason
    /// `max_calls_per_client`.
    pub fn new(max: usize, table: MethodTable, observer: Arc<dyn AdmissionObserver>) -> Self {
        Self {
            calls: Arc::default(),
            max,
            table,
            observer,
        }
    }

    /// A place for one more call of `client`, or `None` at the cap.
    fn start(&self, client: Arc<str>) -> Option<CallSlot> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let n = calls.entry(client.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(CallSlot {
            calls: self.calls.clone(),
            client,
        })
    }

    /// Calls `client` has in flight now.
    #[cfg(test)]
    fn in_flight(&self, client: &str) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.get(client).copied().unwrap_or(0)
    }
}

impl<S> Layer<S> for CallLimitLayer {
    type Service = CallLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallLimit {
            inner,
            limit: self.clone(),
        }
    }
}

/// One call's place under the cap, given back when its response body is dropped.
struct CallSlot {
    calls: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    client: Arc<str>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.client);
            }
        }
    }
}

/// See [`CallLimitLayer`].
#[derive(Clone)]
pub struct CallLimit<S> {
    inner: S,
    limit: CallLimitLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for CallLimit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let class = self.limit.table.classify(req.uri().path());
        if class.estimate == Estimate::Bypass {
            return Box::pin(self.inner.call(req));
        }
        let client = client_key(&mut req);
        let Some(slot) = self.limit.start(client.clone()) else {
            self.limit
                .observer
                .rejected(class.method, "max_calls_per_client");
            let max = self.limit.max;
            tracing::debug!(method = class.method, %client, max, "call refused: server.max_calls_per_client");
            let mut status = Status::resource_exhausted(format!(
                "client {client} has {max} calls in progress already (server.max_calls_per_client); \
                 wait for one to finish"
            ));
            status
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", CALLS_PUSHBACK_MS.into());
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|b| Body::new(WithGuard::new(b, slot))))
        })
    }
}

pin_project! {
    /// A body that holds `guard` (a call's place under a cap) until its last
    /// frame: the trailers, an error, or the end, whichever comes first, or
    /// until it is dropped (a cancelled call). Released before hyper sends
    /// that frame, so a client that saw its call end and starts another finds
    /// the place free.
    pub struct WithGuard<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> WithGuard<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: http_body::Body<Data = Bytes>, G> http_body::Body for WithGuard<B, G> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        let last = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if last {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::layer::NoObserver;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn layer(max: usize) -> CallLimitLayer {
        CallLimitLayer::new(max, method_table(&Config::default()), Arc::new(NoObserver))
    }

    fn request(path: &str, client: &str) -> http::Request<Body> {
        let mut req = http::Request::builder()
            .uri(path)
            .body(Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(crate::guard::ClientKey(Arc::from(client)));
        req
    }

    fn code(resp: &http::Response<Body>) -> Option<&str> {
        resp.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    const WRITE: &str = "/google.bytestream.ByteStream/Write";

    #[tokio::test]
    async fn a_client_at_its_cap_is_refused_until_a_call_ends_and_others_pass() {
        let limit = layer(2);
        let svc = limit.layer(tower::service_fn(|_req: http::Request<Body>| async {
            // Non-empty, so the slot rides on the body rather than being dropped with it.
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(
                http_body_util::Full::new(Bytes::from_static(b"x")),
            )))
        }));
        let first = svc.clone().oneshot(request(WRITE, "ci")).await.unwrap();
        let second = svc.clone().oneshot(request(WRITE, "ci")).await.unwrap();
        assert_eq!(limit.in_flight("ci"), 2);
        let third = svc.clone().oneshot(request(WRITE, "ci")).await.unwrap();
        // 8 is RESOURCE_EXHAUSTED.
        assert_eq!(code(&third), Some("8"));
        let message = third
            .headers()
            .get("grpc-message")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(message.contains("max_calls_per_client"), "{message}");
        assert!(third.headers().contains_key("grpc-retry-pushback-ms"));
        // Another client, and health checks, are not affected.
        let other = svc.clone().oneshot(request(WRITE, "bob")).await.unwrap();
        assert_eq!(code(&other), None);
        let health = svc
            .clone()
            .oneshot(request("/grpc.health.v1.Health/Check", "ci"))
            .await
            .unwrap();
        assert_eq!(code(&health), None);
        drop(first);
        assert_eq!(limit.in_flight("ci"), 1);
        // A body that ends gives the place back then, before it is dropped.
        let mut second = second.into_body();
        while let Some(frame) = second.frame().await {
            frame.unwrap();
        }
        assert_eq!(limit.in_flight("ci"), 0);
        let again = svc.clone().oneshot(request(WRITE, "ci")).await.unwrap();
        assert_eq!(code(&again), None);
    }
}
