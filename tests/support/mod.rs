//! Shared helpers for the integration tests: a real memgate server on
//! `127.0.0.1:0` with its own temporary data directory, fast deterministic
//! payloads, resource names and ByteStream request builders.
//!
//! Every test binary includes this module with `mod support;` and uses a
//! different subset of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod pki;
pub mod process;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use memgate::{
    api::resource::Digest,
    config::Config,
    proto::bytestream::{
        QueryWriteStatusRequest, ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient,
    },
};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Status, transport::Channel};

/// How long `stop()` waits for the server task before declaring it hung.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A memgate server running in this process, on `127.0.0.1:0`, with a fresh data dir.
pub struct TestServer {
    addr: SocketAddr,
    config: Config,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    data_dir: PathBuf,
    // Dropped last: the server may still be closing files in it. `None` when the
    // caller owns the directory (to restart a server on the same data).
    dir: Option<TempDir>,
}

impl TestServer {
    /// Starts a server with the default configuration, a temporary `data_dir`, and
    /// whatever `cfg_tweak` changes on top.
    pub async fn start(cfg_tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temporary data dir");
        let mut server = Self::start_in(dir.path(), cfg_tweak).await;
        server.dir = Some(dir);
        server
    }

    /// Starts a server on an existing `data_dir` that the caller keeps.
    pub async fn start_in(data_dir: &Path, cfg_tweak: impl FnOnce(&mut Config)) -> Self {
        init_logging();
        let mut config = Config::default();
        config.storage.data_dir = data_dir.to_path_buf();
        cfg_tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        config.server.grpc_addr = addr;
        let (tx, rx) = oneshot::channel::<()>();
        let cfg = config.clone();
        let task = tokio::spawn(async move {
            memgate::server::serve(&cfg, listener, async move {
                let _ = rx.await;
            })
            .await
        });
        Self {
            addr,
            config,
            shutdown: Some(tx),
            task: Some(task),
            data_dir: data_dir.to_path_buf(),
            dir: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, as the CLI's `--addr` takes it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A new channel (its own HTTP/2 connection), with the CLI client's windows.
    /// Lazy: it connects on the first call.
    pub fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .expect("valid url")
            .connect_timeout(Duration::from_secs(10))
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .connect_lazy()
    }

    /// A ByteStream client on a new channel that accepts large read chunks.
    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        bytestream(self.channel())
    }

    /// Shuts the server down and waits (bounded) for `serve` to return; panics if it
    /// failed or hung.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("server task");
        match tokio::time::timeout(STOP_TIMEOUT, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("server failed: {e:#}"),
            Ok(Err(e)) => panic!("server task panicked: {e}"),
            Err(_) => panic!("server did not stop within {STOP_TIMEOUT:?}"),
        }
    }
}

impl Drop for TestServer {
    /// A test that panicked before `stop()`: ask the server to stop and abort its
    /// task, since nothing can be awaited here. The runtime ends with the test.
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `RUST_LOG=memgate=debug cargo nextest run ...` shows the server's logs.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A ByteStream client on `channel` that accepts read chunks up to 64 MiB.
pub fn bytestream(channel: Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(channel).max_decoding_message_size(64 * 1024 * 1024)
}

// ---------------------------------------------------------------------------
// Payloads and names

/// Deterministic pseudo-random bytes. A 64 KiB + 1 block comes from xorshift64*;
/// the payload is that block rotated by a different amount for each position
/// (memcpy speed even in an unoptimised test build). No two blocks in the first
/// 4 GiB are equal, so misplaced or repeated chunks change the digest.
pub fn payload(len: usize, seed: u64) -> Bytes {
    const BLOCK: usize = 65_537; // prime: rotations by k * STEP are all distinct
    const STEP: usize = 4_099;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut base = Vec::with_capacity(BLOCK + 8);
    while base.len() < BLOCK {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        base.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    base.truncate(BLOCK);
    let mut out = Vec::with_capacity(len);
    let mut k = 0usize;
    while out.len() < len {
        let rot = (k * STEP) % BLOCK;
        let want = (len - out.len()).min(BLOCK);
        let (tail, head) = (&base[rot..], &base[..rot]);
        let first = want.min(tail.len());
        out.extend_from_slice(&tail[..first]);
        out.extend_from_slice(&head[..want - first]);
        k += 1;
    }
    Bytes::from(out)
}

/// SHA-256 and size of `data`.
pub fn digest(data: &[u8]) -> Digest {
    Digest {
        hash: Sha256::digest(data).into(),
        size: data.len() as u64,
    }
}

/// `blobs/{sha256}/{size}`.
pub fn read_name(d: &Digest) -> String {
    d.read_name()
}

/// `uploads/{uuid}/blobs/{sha256}/{size}` with the given upload id.
pub fn write_name_with(uuid: &str, d: &Digest) -> String {
    format!("uploads/{uuid}/blobs/{d}")
}

/// `uploads/{fresh uuid}/blobs/{sha256}/{size}`.
pub fn write_name(d: &Digest) -> String {
    write_name_with(&uuid::Uuid::new_v4().to_string(), d)
}

/// WriteRequests sending `data` (the bytes from `offset` on) in `chunk`-sized
/// messages; the first carries `name`, the last sets `finish_write` if `finish`.
/// An empty `data` with `finish` gives one empty finishing message.
pub fn write_requests(
    name: &str,
    data: &Bytes,
    offset: u64,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    assert!(chunk > 0);
    let mut out = Vec::with_capacity(data.len() / chunk + 1);
    let mut pos = 0usize;
    loop {
        let end = (pos + chunk).min(data.len());
        let last = end == data.len();
        out.push(WriteRequest {
            resource_name: if pos == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: offset as i64 + pos as i64,
            finish_write: finish && last,
            data: data.slice(pos..end),
        });
        pos = end;
        if last {
            return out;
        }
    }
}

/// [`write_requests`] of a whole blob (offset 0, finishing), as a request stream.
pub fn write_stream(
    name: &str,
    data: &Bytes,
    chunk: usize,
) -> tokio_stream::Iter<std::vec::IntoIter<WriteRequest>> {
    tokio_stream::iter(write_requests(name, data, 0, chunk, true))
}

/// Writes `data` under a fresh upload name in 1 MiB chunks; returns the committed size.
/// Any transport: a plain channel, or one with an interceptor (tokens).
pub async fn upload<T>(client: &mut ByteStreamClient<T>, data: &Bytes) -> Result<i64, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let name = write_name(&digest(data));
    let resp = client.write(write_stream(&name, data, 1 << 20)).await?;
    Ok(resp.into_inner().committed_size)
}

/// Reads `[offset, offset + limit)` of a blob into memory, over any transport.
pub async fn read<T>(
    client: &mut ByteStreamClient<T>,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut stream = client
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.data);
    }
    Ok(out)
}

/// Reads a whole blob, hashing as it arrives; returns the digest of what was read.
pub async fn read_digest(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
) -> Result<Digest, Status> {
    let mut stream = client
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(msg) = stream.message().await? {
        hasher.update(&msg.data);
        size += msg.data.len() as u64;
    }
    Ok(Digest {
        hash: hasher.finalize().into(),
        size,
    })
}

/// QueryWriteStatus as `(committed_size, complete)`.
pub async fn query(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
) -> Result<(i64, bool), Status> {
    let r = client
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await?
        .into_inner();
    Ok((r.committed_size, r.complete))
}

/// Polls QueryWriteStatus (bounded) until `done(committed)` holds; returns it.
pub async fn wait_for_committed(
    client: &mut ByteStreamClient<Channel>,
    name: &str,
    done: impl Fn(i64) -> bool,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((committed, _)) = query(client, name).await
            && done(committed)
        {
            return committed;
        }
        assert!(
            Instant::now() < deadline,
            "QueryWriteStatus({name}) never reached the awaited state"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Unwraps the error of `r`, asserting its code; returns the status for more checks.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: wrong code, status: {s:?}");
            s
        }
    }
}

/// A blob stored before a test feeds the server bad input.
pub struct Stored {
    pub data: Bytes,
    pub digest: Digest,
}

impl Stored {
    /// Uploads a 3 MiB + 5 bytes blob (several chunks) and checks it was committed.
    pub async fn put(client: &mut ByteStreamClient<Channel>, seed: u64) -> Self {
        let data = payload(3 * 1024 * 1024 + 5, seed);
        let digest = digest(&data);
        let committed = upload(client, &data)
            .await
            .expect("storing the reference blob");
        assert_eq!(committed, data.len() as i64);
        Self { data, digest }
    }

    /// Asserts the blob still reads back whole and unchanged.
    pub async fn assert_intact(&self, client: &mut ByteStreamClient<Channel>, after: &str) {
        let got = read_digest(client, &self.digest.read_name())
            .await
            .unwrap_or_else(|s| panic!("stored blob unreadable after {after}: {s:?}"));
        assert_eq!(got, self.digest, "stored blob changed after {after}");
    }
}
