//! A Process response as HTTP/2 body frames, framed around the payload instead of
//! encoded into a buffer of its own: the gRPC message prefix, the small fields and
//! the echoed field's key and length go out first (a few dozen bytes), then the
//! request's own `Bytes`, then the `grpc-status` trailer. The bytes on the wire are
//! exactly what prost would encode for the same `ProcessResponse` (tested below).
//!
//! The echo is one data frame, the request's buffer itself; the guard's body
//! (`guard::body::Holding`) hands it to hyper in 1 MiB slices of that buffer, so
//! the call's reservation lasts until all but the last slice has been sent.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use prost::Message as _;

use crate::proto::memgate_v1::ProcessResponse;

/// The gRPC message prefix: a compressed flag and a big-endian `u32` length.
const PREFIX: usize = 5;
/// `ProcessResponse.data`'s field number.
const DATA_FIELD: u32 = 3;

/// What a Process call answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Lowercase hex SHA-256 of the payload.
    pub sha256: String,
    pub size: u64,
    /// The echo: the request's own buffer, or empty.
    pub data: Bytes,
}

impl Reply {
    /// Everything before the echoed bytes: the prefix (for a message of
    /// [`Reply::encoded_len`] bytes), fields 1 and 2, and field 3's key and
    /// length when there is an echo (proto3 leaves an empty field out).
    fn head(&self) -> Bytes {
        let fields = self.fields();
        let len = self.encoded_len();
        let mut head = BytesMut::with_capacity(PREFIX + fields.len() + 16);
        head.put_u8(0);
        // The caller checked encoded_len against the encoding limit, which is
        // below 4 GiB (server.max_message_size); saturating keeps it total.
        head.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        head.extend_from_slice(&fields);
        if !self.data.is_empty() {
            prost::encoding::encode_key(
                DATA_FIELD,
                prost::encoding::WireType::LengthDelimited,
                &mut head,
            );
            prost::encoding::encode_varint(self.data.len() as u64, &mut head);
        }
        head.freeze()
    }

    /// Fields 1 and 2, encoded by prost (the echo left out).
    fn fields(&self) -> Vec<u8> {
        ProcessResponse {
            sha256: self.sha256.clone(),
            size: self.size,
            data: Bytes::new(),
        }
        .encode_to_vec()
    }

    /// The encoded `ProcessResponse`'s length, without the gRPC prefix: what the
    /// encoding limit (`max_encoding_message_size`) applies to.
    pub fn encoded_len(&self) -> usize {
        let data = match self.data.len() {
            0 => 0,
            n => {
                prost::encoding::key_len(DATA_FIELD)
                    + prost::encoding::encoded_len_varint(n as u64)
                    + n
            }
        };
        self.fields().len() + data
    }

    /// The response body: head, echo, `grpc-status: 0`.
    pub fn into_body(self) -> ReplyBody {
        let mut trailers = HeaderMap::new();
        trailers.insert(tonic::Status::GRPC_STATUS, HeaderValue::from_static("0"));
        ReplyBody {
            head: Some(self.head()),
            data: self.data,
            trailers: Some(trailers),
        }
    }
}

/// A Process response body; see the module documentation.
#[derive(Debug)]
pub struct ReplyBody {
    head: Option<Bytes>,
    /// The echo, until it is handed over.
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if !this.data.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.data)))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.data.is_empty() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn reply(data: Bytes, size: u64) -> Reply {
        Reply {
            sha256: "ab".repeat(32),
            size,
            data,
        }
    }

    /// Every frame of the body, data frames concatenated, and the trailers.
    async fn collect(body: ReplyBody) -> (Vec<Bytes>, HeaderMap) {
        let mut body = std::pin::pin!(body);
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(d) => data.push(d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        assert!(body.is_end_stream());
        (data, trailers.expect("trailers"))
    }

    /// What tonic's encoder would have sent: prefix plus prost's encoding.
    fn prost_framed(r: &Reply) -> Vec<u8> {
        let msg = ProcessResponse {
            sha256: r.sha256.clone(),
            size: r.size,
            data: r.data.clone(),
        }
        .encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        out
    }

    #[tokio::test]
    async fn the_wire_bytes_are_prosts() {
        let sizes = [0, 1, 127, 128, 16_383, 16_384, 3 * 1024 * 1024 + 11];
        for n in sizes {
            let data = Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>());
            for r in [reply(data.clone(), n as u64), reply(Bytes::new(), 0)] {
                let want = prost_framed(&r);
                assert_eq!(r.encoded_len(), want.len() - PREFIX, "{n} bytes");
                let (frames, trailers) = collect(r.into_body()).await;
                assert_eq!(frames.concat(), want, "{n} bytes");
                assert_eq!(trailers.get("grpc-status").unwrap(), "0");
                assert_eq!(trailers.len(), 1);
            }
        }
    }

    #[tokio::test]
    async fn the_echo_is_the_request_buffer_itself() {
        let data = Bytes::from(vec![7u8; 2 * 1024 * 1024 + 5]);
        let (frames, _) = collect(reply(data.clone(), data.len() as u64).into_body()).await;
        assert_eq!(frames.len(), 2, "a head and the echo");
        assert!(frames[0].len() < 100, "head of {} bytes", frames[0].len());
        // The same memory, not a copy of it.
        assert_eq!(frames[1].as_ptr_range(), data.as_ptr_range());
    }
}
