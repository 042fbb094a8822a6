//! Shaping what a GET returns into the chunks a Read sends.

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, stream};

use crate::store::Result;

/// Regroups a GET body (arriving in whatever pieces the connection delivers)
/// into chunks of `chunk` bytes, the last one shorter. Pulls only as the
/// consumer pulls, so at most one chunk is held besides the socket's buffers.
pub(super) fn rechunk(
    body: stream::BoxStream<'static, Result<Bytes>>,
    chunk: usize,
) -> impl futures_util::Stream<Item = Result<Bytes>> + Send {
    stream::unfold(
        (body, BytesMut::new(), false),
        move |(mut body, mut buf, done)| async move {
            if done {
                return None;
            }
            while buf.len() < chunk {
                match body.next().await {
                    Some(Ok(piece)) => buf.extend_from_slice(&piece),
                    Some(Err(e)) => return Some((Err(e), (body, BytesMut::new(), true))),
                    None if buf.is_empty() => return None,
                    None => {
                        let last = buf.split().freeze();
                        return Some((Ok(last), (body, buf, true)));
                    }
                }
            }
            let out = buf.split_to(chunk).freeze();
            Some((Ok(out), (body, buf, false)))
        },
    )
}
#[cfg(test)]
mod tests {
    use futures_util::TryStreamExt;

    use super::*;
    use crate::store::StoreError;

    #[tokio::test]
    async fn rechunk_regroups_pieces_into_fixed_chunks() {
        let pieces: Vec<Result<Bytes>> = [3usize, 5, 1, 7, 2]
            .iter()
            .map(|&n| Ok(Bytes::from(vec![n as u8; n])))
            .collect();
        let total: Vec<u8> = pieces
            .iter()
            .flat_map(|p| p.as_ref().unwrap().to_vec())
            .collect();
        let out: Vec<Bytes> = rechunk(stream::iter(pieces).boxed(), 4)
            .try_collect()
            .await
            .unwrap();
        let sizes: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [4, 4, 4, 4, 2]);
        assert_eq!(out.concat(), total);
    }

    #[tokio::test]
    async fn rechunk_passes_an_error_on_and_stops() {
        let pieces: Vec<Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"ab")),
            Err(StoreError::Unavailable {
                context: "reading".into(),
                detail: "reset".into(),
            }),
            Ok(Bytes::from_static(b"cd")),
        ];
        let out: Vec<Result<Bytes>> = rechunk(stream::iter(pieces).boxed(), 4).collect().await;
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Err(StoreError::Unavailable { .. })));
    }
}
