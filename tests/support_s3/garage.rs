//! A single-node Garage with one bucket and one key, and what every test needs
//! to talk to a Garage: its key as memgate's config or credentials file, and a
//! client of its own to look at the bucket behind memgate's back.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::TryStreamExt;
use memgate::{
    config::{Backend, S3Config, StorageConfig},
    store::S3Store,
};
use object_store::{
    ObjectStore,
    aws::{AmazonS3, AmazonS3Builder},
    path::Path as Key,
};
use tempfile::TempDir;

use super::node::{Node, REGION, rpc_secret};

pub const BUCKET: &str = "memgate";

/// The key allowed to use [`BUCKET`], and a credentials file holding it.
pub struct Access {
    pub key_id: String,
    pub secret: String,
    credentials: PathBuf,
}

impl Access {
    pub fn new(key_id: String, secret: String, dir: &Path) -> Self {
        let credentials = dir.join("credentials");
        std::fs::write(
            &credentials,
            format!("[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
        )
        .expect("credentials file");
        Self {
            key_id,
            secret,
            credentials,
        }
    }

    /// An AWS shared-credentials file with this key.
    pub fn credentials_file(&self) -> PathBuf {
        self.credentials.clone()
    }

    /// `[storage.s3]` for the S3 API at `endpoint`, keys under `prefix`.
    pub fn s3_config(&self, endpoint: &str, prefix: &str) -> S3Config {
        S3Config {
            endpoint: endpoint.into(),
            region: REGION.into(),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            path_style: true,
            credentials_file: self.credentials_file(),
            // Short, so the fault tests do not wait long on a store that is down.
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            max_retries: 2,
            retry_timeout: Duration::from_secs(3),
            health_interval: Duration::from_millis(200),
            ..S3Config::default()
        }
    }

    /// A client of its own on `endpoint`.
    pub fn client(&self, endpoint: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_region(REGION)
            .with_bucket_name(BUCKET)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_allow_http(true)
            .build()
            .expect("S3 client")
    }

    /// Every object under `prefix` (through `endpoint`), with its size, sorted.
    pub async fn list(&self, endpoint: &str, prefix: &str) -> Vec<(String, u64)> {
        let client = self.client(endpoint);
        let prefix = Key::from(prefix);
        let mut keys: Vec<(String, u64)> = client
            .list(Some(&prefix))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .expect("list the bucket");
        keys.sort();
        keys
    }

    /// memgate's own store on `endpoint` under `prefix`, for what only the
    /// library shows (open multipart uploads, garbage collection).
    pub fn store(&self, endpoint: &str, prefix: &str) -> S3Store {
        let cfg = StorageConfig {
            backend: Backend::S3,
            s3: self.s3_config(endpoint, prefix),
            ..StorageConfig::default()
        };
        S3Store::open(&cfg, Arc::new(())).expect("open the S3 store")
    }

    /// The multipart uploads still open under `prefix`, with the bytes the
    /// store acknowledged for each: data held outside any object.
    pub async fn open_uploads(&self, endpoint: &str, prefix: &str) -> Vec<(String, u64)> {
        self.store(endpoint, prefix)
            .open_uploads()
            .await
            .expect("list open multipart uploads")
    }
}

/// A running single-node Garage with a bucket and a key allowed to use it.
/// Each test that needs S3 starts its own (half a second), so tests stay
/// independent and one can stop its store mid-upload.
pub struct Garage {
    node: Node,
    access: Access,
    pub s3_port: u16,
    pub key_id: String,
    pub secret: String,
    // Dropped last: the node's files live here.
    _dir: TempDir,
}

impl Garage {
    /// Starts Garage and creates the bucket and key. Blocking (a few CLI calls).
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("garage dir");
        let mut node = Node::start(dir.path(), &rpc_secret(), 1);
        let id = node.id();
        node.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        node.cli(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = node.create_bucket_and_key(BUCKET, "memgate-test");
        node.wait_for_s3();
        Self {
            s3_port: node.s3_port,
            access: Access::new(key_id.clone(), secret.clone(), dir.path()),
            key_id,
            secret,
            node,
            _dir: dir,
        }
    }

    /// Stops the server (SIGKILL: a crash or a network cut, not a goodbye).
    pub fn stop(&mut self) {
        self.node.stop();
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(!self.node.is_running(), "restart after stop");
        self.node.restart();
    }

    pub fn endpoint(&self) -> String {
        self.node.endpoint()
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    /// An AWS shared-credentials file with this Garage's key.
    pub fn credentials_file(&self) -> PathBuf {
        self.access.credentials_file()
    }

    /// `[storage.s3]` for this Garage, keys under `prefix`.
    pub fn s3_config(&self, prefix: &str) -> S3Config {
        self.access.s3_config(&self.endpoint(), prefix)
    }

    /// A client of its own, to look at the bucket behind memgate's back.
    pub fn client(&self) -> AmazonS3 {
        self.access.client(&self.endpoint())
    }

    /// Every key under `prefix`, with its size, sorted.
    pub async fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        self.access.list(&self.endpoint(), prefix).await
    }

    /// Open multipart uploads under `prefix`, with their acknowledged bytes.
    pub async fn open_uploads(&self, prefix: &str) -> Vec<(String, u64)> {
        self.access.open_uploads(&self.endpoint(), prefix).await
    }
}
