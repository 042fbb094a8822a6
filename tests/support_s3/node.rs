//! One Garage server process on loopback: its config, data and log in a
//! directory of its own, killed with SIGKILL (a crash or a network cut, not a
//! goodbye) and started again on the same ports and data.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long a node may take to answer its RPC port or open its S3 port.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub const REGION: &str = "garage";

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

/// A new RPC secret: 64 hex characters, shared by the nodes of one cluster.
pub fn rpc_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A Garage server process and its files.
pub struct Node {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    child: Option<Child>,
}

impl Node {
    /// Writes the config for a node in `dir` (created) and starts it; returns
    /// once its RPC answers. `replication` is the cluster's replication factor.
    pub fn start(dir: &Path, secret: &str, replication: usize) -> Self {
        let mut node = Self::configure(dir, secret, replication);
        node.spawn();
        node.wait_for_rpc();
        node
    }

    /// Writes the config and starts the process without waiting: a cluster
    /// starts all its nodes first, then waits for each.
    pub fn configure(dir: &Path, secret: &str, replication: usize) -> Self {
        std::fs::create_dir_all(dir).expect("node dir");
        let (rpc, s3) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = {meta:?}\ndata_dir = {data:?}\ndb_engine = \"sqlite\"\n\
                 replication_factor = {replication}\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = dir.join("meta"),
                data = dir.join("data"),
            ),
        )
        .expect("garage config");
        Self {
            bin: garage_bin(),
            dir: dir.to_owned(),
            config,
            s3_port: s3,
            rpc_port: rpc,
            child: None,
        }
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .expect("log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Waits (bounded) until the node answers its RPC port.
    pub fn wait_for_rpc(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.try_cli(&["status"]).is_err() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "garage did not answer within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (bounded) until the S3 port accepts connections.
    pub fn wait_for_s3(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_err() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "garage's S3 API did not listen within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default()
    }

    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
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

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("garage {args:?} failed: {e}"))
    }

    /// `<hex id>@127.0.0.1:<rpc port>`, what `garage node connect` takes.
    pub fn address(&self) -> String {
        self.cli(&["node", "id", "-q"]).trim().to_owned()
    }

    /// The hexadecimal node id, what `garage layout assign` takes.
    pub fn id(&self) -> String {
        let address = self.address();
        address.split('@').next().expect("node id").to_owned()
    }

    /// Kills the process (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data; returns once both its RPC
    /// and its S3 port answer.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_for_rpc();
        self.wait_for_s3();
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Creates `bucket` and a key allowed to read, write and own it; returns
    /// the key's id and secret.
    pub fn create_bucket_and_key(&self, bucket: &str, key_name: &str) -> (String, String) {
        self.cli(&["bucket", "create", bucket]);
        let key = self.cli(&["key", "create", key_name]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name:?} in `garage key create` output:\n{key}"))
        };
        let (id, secret) = (field("Key ID:"), field("Secret key:"));
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", key_name,
        ]);
        (id, secret)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}
