//! A real S3 server for the tests: Garage, single node on loopback, with a
//! throwaway config and data dir, one bucket and one key made through its CLI.
//! Each test that needs S3 starts its own (half a second), so tests stay
//! independent and one can stop its store mid-upload.
//!
//! The binary comes from `MEMGATE_GARAGE_BIN`, else from the cache that
//! `scripts/install-garage.sh` fills (the test command runs it first). Without
//! it the S3 tests fail and say so: they are never skipped.
#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::TryStreamExt;
use memgate::config::{Backend, Config, S3Config};
use object_store::{ObjectStore, aws::AmazonS3Builder, path::Path as Key};
use tempfile::TempDir;

pub const BUCKET: &str = "memgate";
const REGION: &str = "garage";

/// A running Garage with a bucket and a key allowed to use it.
pub struct Garage {
    bin: PathBuf,
    dir: TempDir,
    config: PathBuf,
    pub s3_port: u16,
    child: Option<Child>,
    pub key_id: String,
    pub secret: String,
}

/// The garage binary; panics with what to do when it is missing.
pub fn garage_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MEMGATE_GARAGE_BIN") {
        return bin.into();
    }
    let cache = std::env::var_os("MEMGATE_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/memgate-tools")
        });
    let bin = cache.join("garage-2.5.0/bin/garage");
    assert!(
        bin.exists(),
        "the S3 tests need Garage, and {} does not exist: run scripts/install-garage.sh \
         (scripts/test.sh does) or set MEMGATE_GARAGE_BIN",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Garage {
    /// Starts Garage and creates the bucket and key. Blocking (a few CLI calls).
    pub fn start() -> Self {
        let bin = garage_bin();
        let dir = tempfile::tempdir().expect("garage dir");
        let (rpc, s3) = (free_port(), free_port());
        // 64 hex characters.
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let config = dir.path().join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = {meta:?}\ndata_dir = {data:?}\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = dir.path().join("meta"),
                data = dir.path().join("data"),
            ),
        )
        .expect("garage config");
        let mut g = Self {
            bin,
            dir,
            config,
            s3_port: s3,
            child: None,
            key_id: String::new(),
            secret: String::new(),
        };
        g.spawn();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().expect("node id").to_owned();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", BUCKET]);
        let key = g.cli(&["key", "create", "memgate-test"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name:?} in `garage key create` output:\n{key}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        g.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "memgate-test",
        ]);
        g.wait_for_s3();
        g
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("garage.log")).expect("log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        // Ready when its RPC answers (bounded: 20 s).
        for _ in 0..200 {
            if self.try_cli(&["status"]).is_ok() {
                return;
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("garage did not answer within 20 s; log:\n{}", self.log());
    }

    /// Ready when the S3 port accepts connections (bounded: 20 s).
    fn wait_for_s3(&mut self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok() {
                return;
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "garage's S3 API did not listen within 20 s; log:\n{}",
            self.log()
        );
    }

    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("garage exited ({status}); log:\n{}", self.log());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("garage {args:?} failed: {e}"))
    }

    /// Stops the server (SIGKILL: a crash or a network cut, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after stop");
        self.spawn();
        self.wait_for_s3();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// An AWS shared-credentials file with this Garage's key.
    pub fn credentials_file(&self) -> PathBuf {
        let path = self.dir.path().join("credentials");
        if !path.exists() {
            std::fs::write(
                &path,
                format!(
                    "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                    self.key_id, self.secret
                ),
            )
            .expect("credentials file");
        }
        path
    }

    /// `[storage.s3]` for this Garage, keys under `prefix`.
    pub fn s3_config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint(),
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

    /// A client of its own, to look at the bucket behind memgate's back.
    pub fn client(&self) -> impl ObjectStore {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_region(REGION)
            .with_bucket_name(BUCKET)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_allow_http(true)
            .build()
            .expect("S3 client")
    }

    /// Every key under `prefix`, with its size, sorted.
    pub async fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let client = self.client();
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
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a test's blobs live: local disk or a Garage bucket, chosen per test so
/// one suite runs against both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Local,
    S3,
}

/// A test's storage: its Garage (for S3) and where it keeps its objects.
pub struct Storage {
    pub kind: Kind,
    pub garage: Option<Garage>,
    prefix: String,
}

impl Storage {
    pub fn new(kind: Kind) -> Self {
        let garage = (kind == Kind::S3).then(Garage::start);
        Self {
            kind,
            garage,
            prefix: "memgate-test/".into(),
        }
    }

    /// Points `cfg` at this storage (the local data dir is the server's own).
    pub fn configure(&self, cfg: &mut Config) {
        if let Some(g) = &self.garage {
            cfg.storage.backend = Backend::S3;
            cfg.storage.s3 = g.s3_config(&self.prefix);
        }
    }

    /// Everything stored: files under `data_dir` for local disk, keys under the
    /// prefix for S3. Proof that nothing was stored, or what was.
    pub async fn stored(&self, data_dir: &Path) -> Vec<String> {
        match &self.garage {
            Some(g) => g
                .list(&self.prefix)
                .await
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            None => walk(data_dir),
        }
    }

    pub fn garage(&mut self) -> &mut Garage {
        self.garage.as_mut().expect("an S3 storage")
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out.sort();
    out
}

impl Storage {
    /// Partial uploads: `.part` files for local disk, keys under `uploads/` for S3.
    pub async fn partials(&self, data_dir: &Path) -> Vec<String> {
        match &self.garage {
            Some(g) => g
                .list(&format!("{}uploads", self.prefix))
                .await
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            None => walk(&data_dir.join("uploads"))
                .into_iter()
                .filter(|p| p.ends_with(".part"))
                .collect(),
        }
    }

    /// Where a blob with this SHA-256 is stored, as [`Storage::stored`] lists it.
    pub fn blob_entry(&self, data_dir: &Path, hex: &str) -> String {
        match self.kind {
            Kind::Local => data_dir
                .join("blobs")
                .join(&hex[..2])
                .join(hex)
                .display()
                .to_string(),
            Kind::S3 => format!("{}blobs/{hex}", self.prefix),
        }
    }
}
