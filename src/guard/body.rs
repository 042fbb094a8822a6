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

/// Largest data frame handed to hyper at once. hyper's HTTP/2 layer keeps a frame
/// until every byte of it is sent, and asks for the next only when the stream has
/// send capacity again; handing over a 150 MB message as one frame would let the
/// body end (and the reservation go) while nearly all of it is still queued.
pub const MAX_FRAME: usize = 1024 * 1024;

pin_project! {
    /// A response body that keeps `hold` alive until it ends or is dropped, and
    /// hands data over in slices of at most [`MAX_FRAME`], so that when it ends
    /// only the last slice can still be waiting to be sent.
    pub struct Holding<B, H> {
        #[pin]
        inner: B,
        rest: Bytes,
        hold: Option<H>,
    }
}

impl<B, H> Holding<B, H> {
    pub fn new(inner: B, hold: H) -> Self {
        Self {
            inner,
            rest: Bytes::new(),
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
        if !this.rest.is_empty() {
            let n = this.rest.len().min(MAX_FRAME);
            return Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) if data.len() > MAX_FRAME => {
                    *this.rest = data.split_off(MAX_FRAME);
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            done @ (Poll::Ready(None) | Poll::Ready(Some(Err(_)))) => {
                this.hold.take();
                done
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn large_frames_are_sliced_and_the_hold_goes_at_the_end() {
        let data = Bytes::from(vec![3u8; 2 * MAX_FRAME + 10]);
        let held = std::sync::Arc::new(());
        let mut body = Holding::new(Full::new(data.clone()), held.clone());
        let mut sizes = Vec::new();
        let mut joined = Vec::new();
        while let Some(frame) = body.frame().await {
            assert_eq!(
                std::sync::Arc::strong_count(&held),
                2,
                "held while frames remain"
            );
            let d = frame.unwrap().into_data().unwrap();
            sizes.push(d.len());
            joined.extend_from_slice(&d);
        }
        assert_eq!(sizes, vec![MAX_FRAME, MAX_FRAME, 10]);
        assert_eq!(joined, data);
        assert_eq!(
            std::sync::Arc::strong_count(&held),
            1,
            "released at the end"
        );
    }
}
