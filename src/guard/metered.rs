//! A streaming call's reservation that follows its messages: the request body
//! reads each gRPC message's 5-byte length prefix as it passes and, when a
//! message is larger than any before it, grows the reservation to cover it
//! before the message goes on to tonic's decoder (see
//! [`super::estimate::Estimate::Stream`]). The transport's window is reserved
//! up front, so the bytes waiting for the growth are already paid for; nothing
//! is ever held that the budget has not granted.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tonic::{Status, body::Body};

use super::layer::Reservation;

/// Reads the length prefixes of the gRPC messages in a byte stream cut
/// anywhere (a prefix may span frames).
#[derive(Debug, Default, Clone)]
pub struct PrefixReader {
    header: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

/// A message prefix seen by [`PrefixReader::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub len: u32,
    pub compressed: bool,
}

impl PrefixReader {
    /// Reads `data`; returns the largest message that starts in it (by the
    /// bytes it may take in memory: a compressed one counts as `compressed_max`).
    pub fn feed(&mut self, mut data: &[u8], compressed_max: u32) -> Option<u32> {
        let mut largest: Option<u32> = None;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = (self.remaining as usize).min(data.len());
                self.remaining -= skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                self.have = 0;
                let h = self.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                self.remaining = len as u64;
                let counts = if h[0] != 0 {
                    len.max(compressed_max)
                } else {
                    len
                };
                largest = Some(largest.map_or(counts, |l| l.max(counts)));
            }
        }
        largest
    }
}

type Growth = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// The request body of a streaming call reserved per message. See the module docs.
pub struct Metered {
    inner: Body,
    reservation: Reservation,
    /// Messages the call may hold at once, each as large as the largest seen.
    messages: u64,
    /// The message size already covered by the reservation.
    covered: u64,
    compressed_max: u32,
    reader: PrefixReader,
    growing: Option<(Growth, Frame<Bytes>)>,
}

impl Metered {
    /// `covered` is the message size the call's first reservation already pays for.
    pub fn new(
        inner: Body,
        reservation: Reservation,
        messages: u64,
        covered: u64,
        compressed_max: u32,
    ) -> Self {
        Self {
            inner,
            reservation,
            messages,
            covered,
            compressed_max,
            reader: PrefixReader::default(),
            growing: None,
        }
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some((growth, _)) = &mut this.growing {
                return match growth.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(result) => {
                        let (_, frame) = this.growing.take().expect("just polled");
                        Poll::Ready(Some(result.map(|()| frame)))
                    }
                };
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                other => return other,
            };
            let largest = frame
                .data_ref()
                .and_then(|d| this.reader.feed(d, this.compressed_max));
            match largest {
                Some(len) if len as u64 > this.covered => {
                    let extra = this.messages * (len as u64 - this.covered);
                    this.covered = len as u64;
                    let r = this.reservation.clone();
                    this.growing = Some((Box::pin(async move { r.grow(extra).await }), frame));
                }
                _ => return Poll::Ready(Some(Ok(frame))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.growing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32, compressed: bool) -> Vec<u8> {
        let mut m = vec![u8::from(compressed)];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn prefixes_are_read_however_the_stream_is_cut() {
        let mut stream = message(10, false);
        stream.extend(message(300, false));
        stream.extend(message(20, true));
        stream.extend(message(0, false));
        for cut in [1, 2, 3, 5, 7, 64, 1000] {
            let mut r = PrefixReader::default();
            let seen: Vec<u32> = stream.chunks(cut).filter_map(|c| r.feed(c, 4096)).collect();
            let largest = seen.iter().copied().max();
            assert_eq!(largest, Some(4096), "cut {cut}: {seen:?}");
            assert!(seen.contains(&300) || cut >= 64, "cut {cut}: {seen:?}");
        }
        // Uncompressed only: the largest is the 300-byte message.
        let mut r = PrefixReader::default();
        let mut s = message(10, false);
        s.extend(message(300, false));
        assert_eq!(r.feed(&s, 4096), Some(300));
        // A body that stops inside a message reads nothing more as a prefix.
        let mut r = PrefixReader::default();
        assert_eq!(r.feed(&message(100, false)[..50], 4096), Some(100));
        assert_eq!(r.feed(&[0, 0, 0, 0, 9], 4096), None);
    }
}
