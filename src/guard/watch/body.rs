//! The request and response bodies of a watched call: they record when the
//! server starts and stops waiting on the client, and what moved.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::Frame;
use tonic::{Status, body::Body};

use super::{Watch, store};

/// The request body, recording when the handler waits for data and what arrives.
pub(super) struct RequestBody {
    pub(super) inner: Body,
    pub(super) watch: Arc<Watch>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(cut) = this.watch.lock().cut {
            // Only reached by a handler still reading after it answered.
            return Poll::Ready(Some(Err(cut.status())));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let now = Instant::now();
        let mut st = this.watch.lock();
        match &polled {
            Poll::Pending => {
                st.request.wait(now);
                store(&mut st.request_waker, cx.waker());
            }
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                st.request.moved(now, n as u64);
                if this.inner.is_end_stream() {
                    st.request.end(now);
                }
            }
            Poll::Ready(_) => st.request.end(now),
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

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.watch.lock().request.end(Instant::now());
    }
}

/// The response body, read from the watch's slot, recording how long hyper
/// takes to come back for more after each frame.
pub(super) struct ResponseBody {
    pub(super) watch: Arc<Watch>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let w = &self.watch;
        {
            // hyper is back for more: the client made room.
            let mut st = w.lock();
            st.response.stop_waiting(Instant::now());
            store(&mut st.response_waker, cx.waker());
        }
        let mut slot = w.slot();
        let Some(body) = slot.as_mut() else {
            drop(slot);
            // Cut: the status as trailers, once; or already ended.
            let mut st = w.lock();
            return match st.cut {
                Some(cut) if !st.trailers_sent => {
                    st.trailers_sent = true;
                    let mut trailers = http::HeaderMap::new();
                    let _ = cut.status().add_header(&mut trailers);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                _ => Poll::Ready(None),
            };
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let now = Instant::now();
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let mut st = w.lock();
                    st.response.moved(now, data.len() as u64);
                    // Until hyper asks again, the server waits on the client.
                    st.response.wait(now);
                }
                false
            }
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if ended {
            let body = slot.take();
            drop(slot);
            w.lock().response.end(now);
            drop(body);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        if let Some(body) = self.watch.slot().as_ref() {
            return body.is_end_stream();
        }
        let st = self.watch.lock();
        st.cut.is_none() || st.trailers_sent
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let body = self.watch.slot().take();
        let kept = {
            let mut st = self.watch.lock();
            st.response.end(Instant::now());
            st.kept.take()
        };
        drop((body, kept));
    }
}
