//! One log line per finished request (method, status, bytes in and out,
//! duration) and the request metrics. A tower layer, so it sees every call the
//! same way whatever the service: it counts request body bytes as the handler
//! reads them and response body bytes as they are sent. The line is written when
//! the last piece of the call (request body, response future, response body) is
//! dropped, so calls that fail early or whose client vanishes are logged too.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicI32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::admin::metrics::{Metrics, method_label};

/// Adds the access log and the request metrics to a service.
#[derive(Clone)]
pub struct AccessLogLayer {
    metrics: Metrics,
}

impl AccessLogLayer {
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`AccessLogLayer`].
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Metrics,
}

/// Where the auth layer records who is calling, for the log line: a
/// principal's name (a token's name or a certificate identity), never a token.
#[derive(Clone, Default)]
pub struct CallClient(Arc<std::sync::OnceLock<Arc<str>>>);

impl CallClient {
    pub fn set(&self, name: Arc<str>) {
        let _ = self.0.set(name);
    }
}

/// No gRPC status seen (yet): the client went away first.
const NO_STATUS: i32 = -1;

/// One call, shared by its request body, response future and response body;
/// logged and counted when the last of them goes.
struct Call {
    method: String,
    /// The bounded metric label of `method`.
    label: &'static str,
    start: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    status: AtomicI32,
    metrics: Metrics,
    client: CallClient,
    peer: Option<std::net::SocketAddr>,
}

impl Call {
    fn set_status(&self, headers: &http::HeaderMap) {
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
        {
            self.status.store(code, Ordering::Relaxed);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let code = match self.status.load(Ordering::Relaxed) {
            NO_STATUS => None,
            c => Some(tonic::Code::from(c)),
        };
        let shown = code.map_or_else(
            || "Cancelled (client went away)".to_string(),
            |c| format!("{c:?}"),
        );
        let (bytes_in, bytes_out) = (*self.bytes_in.get_mut(), *self.bytes_out.get_mut());
        let duration = self.start.elapsed();
        self.metrics
            .request_finished(self.label, code, bytes_in, bytes_out, duration);
        let client = self.client.0.get().map(|c| &**c);
        tracing::info!(
            method = %self.method,
            status = %shown,
            client,
            peer = self.peer.map(|p| p.to_string()),
            bytes_in,
            bytes_out,
            duration_ms = duration.as_secs_f64() * 1e3,
            "request finished"
        );
    }
}

impl<S, ResBody> Service<http::Request<tonic::body::Body>> for AccessLog<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path();
        let label = method_label(path);
        self.metrics.request_started(label);
        let call = Arc::new(Call {
            method: path.to_string(),
            label,
            start: Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            status: AtomicI32::new(NO_STATUS),
            metrics: self.metrics.clone(),
            client: CallClient::default(),
            peer: peer_addr(req.extensions()),
        });
        let mut req = req;
        req.extensions_mut().insert(call.client.clone());
        let req = req.map(|body| {
            tonic::body::Body::new(Counted {
                inner: body,
                call: call.clone(),
                outgoing: false,
            })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Trailers-only responses (errors before any message) carry the status in the headers.
            call.set_status(resp.headers());
            Ok(resp.map(|body| {
                tonic::body::Body::new(Counted {
                    inner: body,
                    call,
                    outgoing: true,
                })
            }))
        })
    }
}

pin_project! {
    /// Counts the data bytes of a request body (`outgoing` false) or a response
    /// body (true, also reading the status from the trailers).
    struct Counted<B> {
        #[pin]
        inner: B,
        call: Arc<Call>,
        outgoing: bool,
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            let counter = if *this.outgoing {
                &this.call.bytes_out
            } else {
                &this.call.bytes_in
            };
            if let Some(data) = frame.data_ref() {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            } else if let Some(trailers) = frame.trailers_ref()
                && *this.outgoing
            {
                this.call.set_status(trailers);
            }
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

/// The remote address of the call's connection, plain TCP or TLS.
pub fn peer_addr(ext: &http::Extensions) -> Option<std::net::SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}
