//! The `memgate.v1.Payload` service as a tower service, written by hand in place
//! of tonic's generated `PayloadServer` (build.rs generates only the client for
//! `memgate.v1`). The request side is tonic's own: its decoder (`Streaming`), so the
//! message size limit (OUT_OF_RANGE), gzip (and RESOURCE_EXHAUSTED for a message
//! that inflates past the limit), the decode buffer the payload slices, and every
//! status are what the generated server gave. Only the response differs: a
//! [`ReplyBody`](super::reply::ReplyBody) framed around the request's bytes
//! instead of a second buffer encoded from them.
//!
//! The builder methods are the generated server's, so the server is set up as
//! before. Responses are never compressed: neither were the generated server's,
//! which was never given `send_compressed`.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use tokio_stream::StreamExt as _;
use tonic::{
    Status,
    body::Body,
    codec::{CompressionEncoding, Streaming},
    metadata::{GRPC_CONTENT_TYPE, MetadataValue},
    server::NamedService,
};

use super::PayloadService;
use crate::proto::memgate_v1::ProcessRequest;

/// `/memgate.v1.Payload/Process`.
pub const PROCESS: &str = "/memgate.v1.Payload/Process";
/// tonic's default decoding limit, for a server built without one.
const DEFAULT_MAX_DECODING: usize = 4 * 1024 * 1024;

/// Serves [`PayloadService`] over gRPC.
#[derive(Clone)]
pub struct PayloadServer {
    inner: PayloadService,
    accept: Vec<CompressionEncoding>,
    max_decoding: usize,
    max_encoding: usize,
}

impl PayloadServer {
    pub fn new(inner: PayloadService) -> Self {
        Self {
            inner,
            accept: Vec::new(),
            max_decoding: DEFAULT_MAX_DECODING,
            max_encoding: usize::MAX,
        }
    }

    /// Accepts requests compressed with `encoding`.
    pub fn accept_compressed(mut self, encoding: CompressionEncoding) -> Self {
        if !self.accept.contains(&encoding) {
            self.accept.push(encoding);
        }
        self
    }

    /// Largest request message (after decompression); larger ones get OUT_OF_RANGE.
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding = limit;
        self
    }

    /// Largest response message; larger ones get OUT_OF_RANGE.
    pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.max_encoding = limit;
        self
    }

    async fn process<B>(self, req: http::Request<B>) -> Result<http::Response<Body>, Status>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError> + Send,
    {
        let encoding = self.request_encoding(req.headers())?;
        let body = req.into_body();
        let mut stream = Streaming::<ProcessRequest>::new_request(
            tonic_prost::ProstDecoder::<ProcessRequest>::default(),
            body,
            encoding,
            Some(self.max_decoding),
        );
        let request = stream
            .try_next()
            .await?
            .ok_or_else(|| Status::internal("Missing request message."))?;
        // As tonic does: the body is read to its end (trailers included), so an
        // error after the message still fails the call.
        stream.trailers().await?;
        let reply = self.inner.process(request).await?;
        let len = reply.encoded_len();
        if len > self.max_encoding {
            return Err(Status::out_of_range(format!(
                "Error, encoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max_encoding
            )));
        }
        let mut resp = http::Response::new(Body::new(reply.into_body()));
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
        Ok(resp)
    }

    /// The request's `grpc-encoding`, if accepted: UNIMPLEMENTED otherwise, with
    /// what is accepted in `grpc-accept-encoding` (tonic's answer, word for word).
    fn request_encoding(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<Option<CompressionEncoding>, Status> {
        let Some(value) = headers.get("grpc-encoding") else {
            return Ok(None);
        };
        if value.as_bytes() == b"identity" {
            return Ok(None);
        }
        if let Some(e) = self
            .accept
            .iter()
            .find(|e| e.to_string().as_bytes() == value.as_bytes())
        {
            return Ok(Some(*e));
        }
        let name = String::from_utf8_lossy(value.as_bytes());
        let mut status = Status::unimplemented(format!(
            "Content is compressed with `{name}` which isn't supported"
        ));
        let accepted = match self.accept.as_slice() {
            [] => "identity".to_string(),
            list => list
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        if let Ok(v) = MetadataValue::try_from(accepted.as_str()) {
            status.metadata_mut().insert("grpc-accept-encoding", v);
        }
        Err(status)
    }
}

impl NamedService for PayloadServer {
    const NAME: &'static str = "memgate.v1.Payload";
}

impl<B> tower::Service<http::Request<B>> for PayloadServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                PROCESS => this
                    .process(req)
                    .await
                    .unwrap_or_else(Status::into_http::<Body>),
                // The generated servers' answer for a method the service lacks.
                _ => Status::unimplemented("").into_http(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    fn request(path: &str, headers: &[(&str, &str)], body: Bytes) -> http::Request<Body> {
        let mut req = http::Request::builder().uri(format!("http://x{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(Body::new(http_body_util::Full::new(body)))
            .unwrap()
    }

    fn framed(msg: &ProcessRequest) -> Bytes {
        let msg = prost::Message::encode_to_vec(msg);
        let mut out = vec![0u8];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        out.into()
    }

    fn server() -> PayloadServer {
        PayloadServer::new(PayloadService).accept_compressed(CompressionEncoding::Gzip)
    }

    #[tokio::test]
    async fn an_unknown_method_is_unimplemented() {
        let resp = server()
            .oneshot(request("/memgate.v1.Payload/Nope", &[], Bytes::new()))
            .await
            .unwrap();
        assert_eq!(resp.headers()["grpc-status"], "12");
    }

    #[tokio::test]
    async fn an_unknown_encoding_is_unimplemented_and_says_what_is_accepted() {
        let body = framed(&ProcessRequest {
            data: Bytes::from_static(b"x"),
            echo: false,
        });
        let resp = server()
            .oneshot(request(PROCESS, &[("grpc-encoding", "zstd")], body))
            .await
            .unwrap();
        assert_eq!(resp.headers()["grpc-status"], "12");
        assert_eq!(resp.headers()["grpc-accept-encoding"], "gzip");
    }

    #[tokio::test]
    async fn an_echo_too_large_to_encode_is_out_of_range() {
        let body = framed(&ProcessRequest {
            data: Bytes::from(vec![1u8; 1000]),
            echo: true,
        });
        let resp = server()
            .max_encoding_message_size(1000)
            .oneshot(request(PROCESS, &[], body.clone()))
            .await
            .unwrap();
        assert_eq!(resp.headers()["grpc-status"], "11");
        // The same request without the limit: the body is the answer and the trailer says OK.
        let resp = server().oneshot(request(PROCESS, &[], body)).await.unwrap();
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        let all = resp.into_body().collect().await.unwrap();
        assert_eq!(all.trailers().unwrap()["grpc-status"], "0");
        assert!(all.to_bytes().len() > 1000);
    }
}
