//! memgate replicas on a Garage: the real `memgate serve` binary pointed at an
//! S3 endpoint (credentials in its environment, as in a pod), and what the
//! fault tests do to them: feed a Write by hand, wait until the store has
//! acknowledged parts, resume an upload, check what the bucket holds.

use std::time::{Duration, Instant};

use bytes::Bytes;
use memgate::proto::bytestream::{
    WriteRequest, WriteResponse, byte_stream_client::ByteStreamClient,
};
use object_store::{ObjectStoreExt, path::Path as Key};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status, transport::Channel};

use super::{Access, BUCKET};
use crate::support::{bytestream, process::Memgate, write_requests};

pub const MIB: usize = 1 << 20;
/// The part size the replicas here use (memgate's default, `part_size` in
/// [`s3_toml`]), spelled out because the tests count acknowledged bytes in parts.
pub const PART: usize = 8 * MIB;

/// A memgate config for the S3 API at `endpoint`, keys under `prefix`,
/// credentials left to the environment.
pub fn s3_toml(endpoint: &str, prefix: &str) -> String {
    format!(
        "[storage]\nbackend = \"s3\"\n[storage.s3]\nendpoint = \"{endpoint}\"\nregion = \"garage\"\n\
         bucket = \"{BUCKET}\"\nprefix = \"{prefix}\"\npath_style = true\n\
         part_size = \"8MiB\"\nrequest_timeout = \"10s\"\nconnect_timeout = \"1s\"\n\
         max_retries = 2\nretry_timeout = \"3s\"\nhealth_interval = \"200ms\"\n"
    )
}

/// Starts `memgate serve` on `endpoint` with `access`'s key in its environment.
pub fn replica(access: &Access, endpoint: &str, prefix: &str) -> Memgate {
    Memgate::start_with(
        tempfile::tempdir().expect("tempdir"),
        &s3_toml(endpoint, prefix),
        &[
            ("AWS_ACCESS_KEY_ID", &access.key_id),
            ("AWS_SECRET_ACCESS_KEY", &access.secret),
        ],
    )
}

/// Polls `/readyz` (bounded) until `ready` holds; returns the body.
pub async fn wait_readyz(m: &Memgate, ready: bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = m.http("/readyz").await;
        if (code == 200) == ready {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never became {ready}: {code} {body}\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A ByteStream client of `m` on a connection of its own (lazy).
pub fn client(m: &Memgate) -> ByteStreamClient<Channel> {
    bytestream(
        tonic::transport::Endpoint::from_shared(m.grpc.clone())
            .expect("url")
            .connect_lazy(),
    )
}

/// Parts `m` has had acknowledged by the store so far.
pub async fn acknowledged_parts(m: &Memgate) -> f64 {
    m.metric(
        "memgate_object_store_requests_total",
        &[("op", "put_part"), ("outcome", "ok")],
    )
    .await
}

/// Polls `m`'s metrics (bounded) until the store acknowledged `at_least` parts.
pub async fn wait_parts(m: &Memgate, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = acknowledged_parts(m).await;
        if now >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {now} of {at_least} parts acknowledged\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `data` from `offset` under `name` through `m`, finishing.
pub async fn resume(
    m: &Memgate,
    name: &str,
    data: &Bytes,
    offset: u64,
) -> Result<Response<WriteResponse>, Status> {
    let reqs = write_requests(name, &data.slice(offset as usize..), offset, MIB, true);
    client(m).write(tokio_stream::iter(reqs)).await
}

/// A Write stream fed by hand with `data` in 1 MiB messages, the last one
/// finishing.
pub struct Feed {
    tx: Option<mpsc::Sender<WriteRequest>>,
    requests: std::vec::IntoIter<WriteRequest>,
    call: JoinHandle<Result<Response<WriteResponse>, Status>>,
    sent: usize,
}

impl Feed {
    /// Opens the stream through `m`; nothing is sent yet.
    pub fn start(m: &Memgate, name: &str, data: &Bytes) -> Self {
        Self::start_at(m, name, data, 0)
    }

    /// Like [`Feed::start`], sending `data` from `offset` on.
    pub fn start_at(m: &Memgate, name: &str, data: &Bytes, offset: u64) -> Self {
        let (tx, rx) = mpsc::channel::<WriteRequest>(2);
        let mut writer = client(m);
        let call = tokio::spawn(async move { writer.write(ReceiverStream::new(rx)).await });
        let rest = data.slice(offset as usize..);
        Self {
            tx: Some(tx),
            requests: write_requests(name, &rest, offset, MIB, true).into_iter(),
            call,
            sent: 0,
        }
    }

    /// Hands the next `bytes` (whole messages) to the stream; panics if the
    /// server stopped taking them.
    pub async fn send(&mut self, bytes: usize) {
        for _ in 0..bytes.div_ceil(MIB) {
            let r = self.requests.next().expect("more data to send");
            let n = r.data.len();
            let tx = self.tx.as_ref().expect("stream open");
            tx.send(r).await.expect("the server took the message");
            self.sent += n;
        }
    }

    /// Hands over the rest for as long as the server takes it; returns the
    /// bytes handed over in all (an upper bound of what the server received).
    pub async fn send_rest(&mut self) -> usize {
        let tx = self.tx.as_ref().expect("stream open");
        for r in self.requests.by_ref() {
            let n = r.data.len();
            if tx.send(r).await.is_err() {
                break;
            }
            self.sent += n;
        }
        self.sent
    }

    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Half-closes the stream and returns the Write's answer.
    pub async fn result(mut self) -> Result<Response<WriteResponse>, Status> {
        self.tx.take();
        self.call.await.expect("writer task")
    }
}

/// Asserts the bucket under `prefix` holds verified blobs only: no staging
/// object, no open multipart upload. A listed key that HEAD says is gone does
/// not count: Garage 2.5 can list a key deleted while one of its nodes was
/// down once that node is back (see docs/storage.md).
pub async fn assert_only_blobs(access: &Access, endpoint: &str, prefix: &str) {
    let blobs = format!("{prefix}blobs/");
    let client = access.client(endpoint);
    let mut left = Vec::new();
    for (key, size) in access.list(endpoint, prefix).await {
        if key.starts_with(&blobs) {
            continue;
        }
        match client.head(&Key::from(key.as_str())).await {
            Err(object_store::Error::NotFound { .. }) => {
                eprintln!("  listed but gone (a Garage listing ghost): {key}");
            }
            _ => left.push((key, size)),
        }
    }
    assert!(
        left.is_empty(),
        "only blobs stay once uploads finish: {left:?}"
    );
    let open = access.open_uploads(endpoint, prefix).await;
    assert!(open.is_empty(), "open multipart uploads left: {open:?}");
}
