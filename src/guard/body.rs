//! Bodies the admission layer wraps: a request body whose first frames were read
//! ahead (to see the length prefix) and are replayed, and a response body that
//! holds the call's reservation until the last byte is sent or the client leaves.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

pin_project! {
    /// Replays `ahead`, then continues with `rest`.
    pub struct Replay<B> {
        ahead: VecDeque<Frame<Bytes>>,
        #[pin]
        rest: B,
        rest_done: bool,
    }
}

impl<B> Replay<B> {
    pub fn new(ahead: VecDeque<Frame<Bytes>>, rest: B, rest_done: bool) -> Self {
        Self {
            ahead,
            rest,
            rest_done,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Replay<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(frame) = this.ahead.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if *this.rest_done {
            return Poll::Ready(None);
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && (self.rest_done || self.rest.is_end_stream())
    }
}

/// Reads frames from `body` until `want` data bytes are buffered or the body ends.
/// Returns the frames read and whether the body ended.
pub async fn read_ahead<B>(
    body: &mut B,
    want: usize,
) -> Result<(VecDeque<Frame<Bytes>>, bool), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut frames = VecDeque::new();
    let mut have = 0;
    while have < want {
        match std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                have += frame.data_ref().map_or(0, Bytes::len);
                frames.push_back(frame);
            }
            Some(Err(e)) => return Err(e),
            None => return Ok((frames, true)),
        }
    }
    Ok((frames, false))
}

/// The first `n` data bytes of `frames`, copied (n is 5: the gRPC prefix).
pub fn first_bytes(frames: &VecDeque<Frame<Bytes>>, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for data in frames.iter().filter_map(Frame::data_ref) {
        let take = (n - out.len()).min(data.len());
        out.extend_from_slice(&data[..take]);
        if out.len() == n {
            break;
        }
    }
    out
}

pin_project! {
    /// A response body that keeps `hold` alive until it ends or is dropped.
    pub struct Holding<B, H> {
        #[pin]
        inner: B,
        hold: Option<H>,
    }
}

impl<B, H> Holding<B, H> {
    pub fn new(inner: B, hold: H) -> Self {
        Self {
            inner,
            hold: Some(hold),
        }
    }
}

impl<B: Body<Data = Bytes>, H> Body for Holding<B, H> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.hold.take();
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
