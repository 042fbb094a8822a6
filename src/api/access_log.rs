//! One log line per finished request: method, status, bytes in and out, duration.
//! A tower layer, so it sees every call the same way whatever the service: it
//! counts request body bytes as the handler reads them and response body bytes
//! as they are sent, and logs when the response body ends (or is dropped, for a
//! client that went away after the response began). A call whose stream the
//! client resets before any response exists is dropped by hyper with its handler
//! and leaves no line here; the handler's own error path logs what it kept.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Adds the access log to a service.
#[derive(Clone, Copy, Debug, Default)]
pub struct AccessLogLayer;

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLog { inner }
    }
}

/// See [`AccessLogLayer`].
#[derive(Clone, Debug)]
pub struct AccessLog<S> {
    inner: S,
}

/// Shared between the request and the response body: what one call moved.
struct Call {
    method: String,
    start: Instant,
    bytes_in: AtomicU64,
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
        let call = Arc::new(Call {
            method: req.uri().path().to_string(),
            start: Instant::now(),
            bytes_in: AtomicU64::new(0),
        });
        let req = req.map(|body| {
            tonic::body::Body::new(CountIn {
                inner: body,
                call: call.clone(),
            })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Trailers-only responses (errors before any message) carry the status in the headers.
            let header_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok());
            Ok(resp.map(|body| {
                tonic::body::Body::new(CountOut {
                    inner: body,
                    log: Some(Finish {
                        call,
                        bytes_out: 0,
                        status: header_status,
                    }),
                })
            }))
        })
    }
}

pin_project! {
    struct CountIn<B> {
        #[pin]
        inner: B,
        call: Arc<Call>,
    }
}

impl<B: Body<Data = Bytes>> Body for CountIn<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.call
                .bytes_in
                .fetch_add(data.len() as u64, Ordering::Relaxed);
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

struct Finish {
    call: Arc<Call>,
    bytes_out: u64,
    status: Option<i32>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let code = match self.status {
            Some(c) => format!("{:?}", tonic::Code::from(c)),
            None => "Cancelled (client went away)".to_string(),
        };
        tracing::info!(
            method = %self.call.method,
            status = %code,
            bytes_in = self.call.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out,
            duration_ms = self.call.start.elapsed().as_secs_f64() * 1e3,
            "request finished"
        );
    }
}

pin_project! {
    struct CountOut<B> {
        #[pin]
        inner: B,
        log: Option<Finish>,
    }
}

impl<B: Body<Data = Bytes>> Body for CountOut<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(log) = this.log.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        log.bytes_out += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref() {
                        log.status = trailers
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok());
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.log.take();
            }
            Poll::Pending => {}
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
