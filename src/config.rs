//! Configuration: one TOML file, `MEMGATE__SECTION__KEY` environment overrides and
//! a few command-line flags, in that order of precedence (flags win).
//!
//! Every section is a plain struct with `deny_unknown_fields`, so a typo fails at
//! start-up instead of being silently ignored. Defaults are named constants whose
//! comment gives the reason. [`Config::validate`] names the key in every error.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize};

/// Loopback: the embedded default has no authentication, so it must not be
/// reachable from elsewhere. The chart, `k8s/` and the image listen on 0.0.0.0.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// Relative to the working directory, so `cargo run -- serve` works out of the box.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Big enough for the 150 MB unary payloads memgate is built for, with headroom.
pub const DEFAULT_MAX_MESSAGE_SIZE: ByteSize = ByteSize::mib(256);
/// Large blobs are the point; the cap only stops a typo'd size from filling a disk.
pub const DEFAULT_MAX_BLOB_SIZE: ByteSize = ByteSize::gib(64);
/// 1 MiB messages keep per-message overhead negligible and the in-flight window small.
pub const DEFAULT_READ_CHUNK_SIZE: ByteSize = ByteSize::mib(1);
/// A day lets an interrupted client come back after a restart or a long outage.
pub const DEFAULT_PARTIAL_UPLOAD_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Expiry is coarse; scanning the upload directory more often buys nothing.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(600);
/// Room uploads leave on the data volume for what else needs it: the
/// filesystem's own metadata, the directory entries of blobs being committed,
/// and whatever shares the volume (logs, temporary files). Small enough not to
/// waste a small volume.
pub const DEFAULT_MIN_FREE_SPACE: ByteSize = ByteSize::mib(64);
/// A port apart from gRPC keeps probes and metrics plaintext and off the gRPC
/// admission path. Loopback by default, like gRPC; deployments set 0.0.0.0 so
/// the kubelet and Prometheus can dial the pod IP.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";
/// Long enough for endpoint controllers and load balancers to stop sending new
/// connections after readiness fails (Kubernetes usually needs a few seconds).
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// With the drain delay this fits Kubernetes' default 30 s termination grace period.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(25);

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub memory: crate::guard::MemoryConfig,
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub profiling: ProfilingConfig,
}

/// `[tls]`: TLS on the gRPC listener (the admin listener stays plaintext, for
/// the kubelet's probes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; TLS is on when set.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca_file: PathBuf,
    /// How often the files are checked for changes (rotation).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: PathBuf::new(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// `[auth]`: who may call what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Require credentials (a bearer token, or a mapped client certificate).
    pub enabled: bool,
    /// TOML file of token hashes and certificate identities with their permissions.
    pub tokens_file: PathBuf,
    /// How often the file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            tokens_file: PathBuf::new(),
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// `[admin]`: the plaintext HTTP listener for probes and metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of `/livez`, `/readyz` and `/metrics`.
    pub addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADMIN_ADDR.parse().expect("valid default address"),
        }
    }
}

/// Off: a profile shows code structure to whoever reaches the plaintext admin
/// port, and sampling costs a little on every allocation; turned on per deployment.
pub const DEFAULT_PROFILING_ENABLED: bool = false;
/// 512 KiB, jemalloc's own default (`lg_prof_sample:19`): every 150 MB payload
/// buffer is sampled, and the measured cost is within noise (docs/profiling.md).
pub const DEFAULT_SAMPLE_INTERVAL: ByteSize = ByteSize::kib(512);

/// `[profiling]`: jemalloc's sampling heap profiler, served on the admin
/// listener as `/debug/pprof/heap` (pprof) and `/debug/pprof/heap.svg`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilingConfig {
    /// Sample allocations from start-up and serve heap profiles.
    pub enabled: bool,
    /// Mean bytes allocated between two samples; a power of two.
    pub sample_interval: ByteSize,
}

impl Default for ProfilingConfig {
    fn default() -> Self {
        Self {
            enabled: DEFAULT_PROFILING_ENABLED,
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
        }
    }
}

impl ProfilingConfig {
    /// `sample_interval` as jemalloc's `lg_prof_sample` (its base-2 logarithm).
    pub fn lg_sample(&self) -> u32 {
        self.sample_interval.as_u64().max(1).ilog2()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let n = self.sample_interval.as_u64();
        if !n.is_power_of_two() || !(4 * 1024..=1024 * 1024 * 1024).contains(&n) {
            return Err(ConfigError::invalid(
                "profiling.sample_interval",
                "must be a power of two between 4KiB and 1GiB, e.g. \"512KiB\" (jemalloc samples every 2^n bytes on average)",
            ));
        }
        Ok(())
    }
}

/// `[shutdown]`: what SIGTERM does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long to keep serving while readiness reports NOT_SERVING.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// After that, how long in-flight calls may take before they are cut.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_delay: DEFAULT_DRAIN_DELAY,
            grace: DEFAULT_GRACE,
        }
    }
}

/// A client that sends or reads nothing for this long while the server waits on
/// it is gone or stalling on purpose; half a minute outlasts TCP's retransmission
/// back-off for a briefly broken link (1 + 2 + 4 + 8 s) with room to spare.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// 1 KiB/s: a 9600-baud modem still passes, so no healthy client is cut, while a
/// slowloris dripping a byte every few seconds to dodge the idle timeout is.
pub const DEFAULT_MIN_THROUGHPUT: ByteSize = ByteSize::kib(1);
/// Long enough that a burst-then-pause client (a 4 MiB window filled at once,
/// then a wait) averages out; as long as the idle timeout.
pub const DEFAULT_MIN_THROUGHPUT_WINDOW: Duration = Duration::from_secs(30);
/// An HTTP/2 PING after this much silence finds peers that vanished without a
/// FIN (a NAT or load balancer dropped them); their streams' reservations go
/// with the connection. Cheaper than TCP keepalive's 2-hour default, and works
/// with `serve_with_incoming`, where tonic ignores TCP keepalive settings.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A live client answers a PING within a round trip; 20 s is hyper's and
/// tonic's default and tolerates a congested link.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// hyper's own default, set explicitly: twice grpc-java's 8 KiB metadata limit,
/// room for a bearer token or a forwarded client certificate, and bounded per
/// connection at 32 streams × 16 KiB of decoded headers.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: ByteSize = ByteSize::kib(16);

/// A node's worth of clients behind one address (a NAT, a CI fleet's egress)
/// each with a channel or two, with room; at a few KiB per idle connection
/// plus its socket, 4096 stay well under any pod's file-descriptor limit and
/// memory. Each open stream is charged to the memory budget anyway.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// A gRPC client needs one connection per channel, and a well-behaved one
/// shares a channel between its calls; 128 leaves room for a build farm's
/// worth of channels behind one NAT address while stopping one peer from
/// taking the whole `max_connections` (and with it every other client's place).
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 128;
/// Calls one client (its auth identity, else its IP address) may have
/// admitted at once: far more than any real client runs concurrently (Bazel's
/// default is 20 jobs), and 16 connections' worth of full streams (16 × 32).
/// A flood of calls beyond it is refused before it can queue for memory.
pub const DEFAULT_MAX_CALLS_PER_CLIENT: usize = 512;
/// A connection with no call for this long is closed with a graceful GOAWAY
/// (the client reconnects on its next call). Five minutes keeps channels that
/// are used every few seconds or minutes open (reconnecting costs a handshake,
/// and a TLS one at that), and gives back the sockets and connection slots of
/// clients that forgot theirs; grpc-go's `MaxConnectionIdle` is off by default,
/// so there is no common value to follow.
pub const DEFAULT_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// See [`crate::server::STREAM_WINDOW`]: the connection window is this many
/// stream windows, so waiting streams never stall admitted ones. hyper's
/// server default is 200 but tonic passes none (unlimited) unless told.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 32;
/// Streams the server itself may reset for a protocol error (a malformed
/// frame, a header list over the limit) before the connection gets a GOAWAY:
/// h2's own default, which tonic turns off by passing none. Without it a
/// client can provoke resets for ever, and the server does the work of each
/// stream it opens and loses, like the rapid-reset attack from the other side.
pub const DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Streams a client opened and reset before the server accepted them, allowed
/// at once before GOAWAY (the HTTP/2 rapid-reset attack, CVE-2023-44487): h2's
/// default, made explicit. A client cancelling its calls normally stays far
/// below it.
pub const DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// The most `server.max_concurrent_streams` may be: 256 stream windows of 4 MiB
/// are a 1 GiB connection window, half of HTTP/2's largest.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// `[server]`: the gRPC listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the gRPC listener.
    pub grpc_addr: SocketAddr,
    /// Largest unary message (Process request or response) accepted.
    pub max_message_size: ByteSize,
    /// A call whose client sends nothing (or reads nothing) for this long while
    /// the server waits on it is cut with DEADLINE_EXCEEDED; `0s` disables.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Least bytes per second a call's client must send or read, measured over
    /// `min_throughput_window` of the server waiting on it; `0` disables.
    pub min_throughput: ByteSize,
    /// How much waiting `min_throughput` is measured over.
    #[serde(with = "humantime_serde")]
    pub min_throughput_window: Duration,
    /// HTTP/2 PING interval on idle connections; `0s` disables.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Largest header list (all of a request's metadata, decoded) accepted.
    pub max_header_list_size: ByteSize,
    /// Connections open at once, all clients together; more are refused.
    pub max_connections: usize,
    /// Connections open at once from one IP address; more are refused.
    pub max_connections_per_client: usize,
    /// Calls admitted at once for one client (auth identity, else IP address).
    pub max_calls_per_client: usize,
    /// A connection with no call in flight for this long gets a GOAWAY; `0s` disables.
    #[serde(with = "humantime_serde")]
    pub connection_idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Streams the server may reset for protocol errors before GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// Streams a client may reset before they are accepted, before GOAWAY.
    pub max_pending_accept_reset_streams: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("valid default address"),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            min_throughput: DEFAULT_MIN_THROUGHPUT,
            min_throughput_window: DEFAULT_MIN_THROUGHPUT_WINDOW,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_calls_per_client: DEFAULT_MAX_CALLS_PER_CLIENT,
            connection_idle_timeout: DEFAULT_CONNECTION_IDLE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_local_error_reset_streams: DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS,
            max_pending_accept_reset_streams: DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS,
        }
    }
}

impl ServerConfig {
    /// The progress limits the admission layer enforces on every guarded call.
    pub fn stream_limits(&self) -> crate::guard::watch::StreamLimits {
        crate::guard::watch::StreamLimits {
            idle_timeout: Some(self.stream_idle_timeout).filter(|d| !d.is_zero()),
            min_throughput: self.min_throughput.as_u64(),
            window: self.min_throughput_window,
        }
    }

    /// The abuse limits' ranges; the error names the key.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let idle = self.stream_idle_timeout;
        if !idle.is_zero()
            && !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600)).contains(&idle)
        {
            return Err(ConfigError::invalid(
                "server.stream_idle_timeout",
                "must be 0s (off) or between 100ms and 24h",
            ));
        }
        if self.min_throughput.as_u64() > 1024 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "server.min_throughput",
                "must be at most 1GiB (per second); 0 turns it off",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600))
            .contains(&self.min_throughput_window)
        {
            return Err(ConfigError::invalid(
                "server.min_throughput_window",
                "must be between 1s and 1h",
            ));
        }
        let ping = self.keepalive_interval;
        if !ping.is_zero()
            && !(Duration::from_secs(1)..=Duration::from_secs(2 * 3600)).contains(&ping)
        {
            return Err(ConfigError::invalid(
                "server.keepalive_interval",
                "must be 0s (off) or between 1s and 2h",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.keepalive_timeout) {
            return Err(ConfigError::invalid(
                "server.keepalive_timeout",
                "must be between 1s and 10m",
            ));
        }
        let headers = self.max_header_list_size.as_u64();
        if !(1024..=1024 * 1024).contains(&headers) {
            return Err(ConfigError::invalid(
                "server.max_header_list_size",
                "must be between 1KiB and 1MiB",
            ));
        }
        self.validate_transport()
    }

    /// The connection and HTTP/2 limits' ranges; the error names the key.
    fn validate_transport(&self) -> Result<(), ConfigError> {
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_client) {
            return Err(ConfigError::invalid(
                "server.max_connections_per_client",
                "must be between 1 and server.max_connections",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_calls_per_client) {
            return Err(ConfigError::invalid(
                "server.max_calls_per_client",
                "must be between 1 and 1000000",
            ));
        }
        let idle = self.connection_idle_timeout;
        if !idle.is_zero()
            && !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&idle)
        {
            return Err(ConfigError::invalid(
                "server.connection_idle_timeout",
                "must be 0s (off) or between 1s and 24h",
            ));
        }
        // The connection window is this many 4 MiB stream windows and HTTP/2
        // caps a window at 2^31 - 1 bytes.
        if !(1..=MAX_STREAMS_PER_CONNECTION).contains(&self.max_concurrent_streams) {
            return Err(ConfigError::invalid(
                "server.max_concurrent_streams",
                format!("must be between 1 and {MAX_STREAMS_PER_CONNECTION}"),
            ));
        }
        if !(1..=100_000).contains(&self.max_local_error_reset_streams) {
            return Err(ConfigError::invalid(
                "server.max_local_error_reset_streams",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=100_000).contains(&self.max_pending_accept_reset_streams) {
            return Err(ConfigError::invalid(
                "server.max_pending_accept_reset_streams",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}

/// `[storage]`: where blobs live and how they are streamed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where blobs live: `local` disk (one replica) or an `s3` bucket (any number).
    pub backend: Backend,
    /// Directory holding blobs and partial uploads (the `local` backend).
    pub data_dir: PathBuf,
    /// Largest blob a client may write.
    pub max_blob_size: ByteSize,
    /// Size of each `ReadResponse` chunk.
    pub read_chunk_size: ByteSize,
    /// Partial uploads untouched for longer than this are deleted.
    #[serde(with = "humantime_serde")]
    pub partial_upload_expiry: Duration,
    /// How often expired partial uploads are looked for.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Free space on the data volume that uploads must leave (the `local`
    /// backend): a Write whose remaining bytes do not fit above it is refused.
    pub min_free_space: ByteSize,
    /// `[storage.s3]`: the bucket, used when `backend = "s3"`.
    pub s3: S3Config,
}

/// Which store holds the blobs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Content-addressed files under `storage.data_dir`.
    #[default]
    Local,
    /// Objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage).
    S3,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::S3 => "s3",
        }
    }
}

/// `[storage.s3]`: where and how blobs are stored in S3. Credentials are never
/// read from here: they come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
/// (and `AWS_SESSION_TOKEN`) or from the file named by `credentials_file`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL; empty means AWS S3 in `region`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key (`blobs/...`, `uploads/...`), e.g. `memgate/`.
    pub prefix: String,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted ones.
    pub path_style: bool,
    /// An AWS shared-credentials file (INI); re-read when it changes.
    pub credentials_file: PathBuf,
    /// The profile to use in `credentials_file`.
    pub profile: String,
    /// Size of each multipart part; the memory one upload holds in parts is
    /// `part_size * parts_in_flight`.
    pub part_size: ByteSize,
    /// Part buffers per Write stream: one filling, the others uploading.
    pub parts_in_flight: usize,
    /// Longest a single request to the store may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest a connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retries of a failed request (connection errors, 5xx, throttling).
    pub max_retries: usize,
    /// Longest all retries of one request may take together.
    #[serde(with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// How often readiness checks that the bucket is reachable.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: false,
            credentials_file: PathBuf::new(),
            profile: "default".into(),
            part_size: ByteSize::mib(8),
            parts_in_flight: 4,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
            health_interval: Duration::from_secs(10),
        }
    }
}

impl S3Config {
    /// Memory one Write stream holds in part buffers (the one filling and
    /// those uploading).
    pub fn stream_buffer(&self) -> u64 {
        self.part_size.as_u64() * self.parts_in_flight as u64
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Local,
            s3: S3Config::default(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            max_blob_size: DEFAULT_MAX_BLOB_SIZE,
            read_chunk_size: DEFAULT_READ_CHUNK_SIZE,
            partial_upload_expiry: DEFAULT_PARTIAL_UPLOAD_EXPIRY,
            gc_interval: DEFAULT_GC_INTERVAL,
            min_free_space: DEFAULT_MIN_FREE_SPACE,
        }
    }
}

/// `[log]`: level and format of the logs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `memgate=debug,tower=warn`); `RUST_LOG` wins when set.
    pub level: String,
    /// `text` for a terminal, `json` for a log pipeline.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable could not be read or parsed; the
    /// message is the loader's, folded onto one line.
    #[error("{0}")]
    Load(String),
    /// A value parsed but is out of range.
    #[error("invalid value for `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        Self::Load(one_line(&e.to_string()))
    }
}

/// Parses a `tracing` filter, tolerating spaces around directives
/// (`"memgate=debug, tower=warn"`), which `EnvFilter` itself rejects.
pub fn log_filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if !directives.is_ascii() {
        return Err("must be ASCII".into());
    }
    let joined: Vec<&str> = directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    tracing_subscriber::EnvFilter::try_new(joined.join(",")).map_err(|e| e.to_string())
}

/// Whether a key is plain `[A-Za-z0-9_]`: config-rs reads `key[N]` as an index
/// and allocates N entries, so `x[99999999999]` would exhaust memory (found by fuzzing).
fn plain_key(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Refuses keys that config-rs would read as paths (`a.b`, `a[3]`) before it sees
/// them. A file that does not parse is left to config-rs, whose error names it.
fn check_file_keys(path: &std::path::Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    fn walk(table: &toml::Table, prefix: &str) -> Result<(), String> {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if !plain_key(k) {
                return Err(key);
            }
            if let toml::Value::Table(t) = v {
                walk(t, &key)?;
            }
        }
        Ok(())
    }
    walk(&table, "").map_err(|key| {
        ConfigError::Load(format!(
            "{}: key {key:?}: only letters, digits and _ are allowed in keys",
            path.display()
        ))
    })
}

/// Folds a multi-line parser message (TOML errors quote the line with a caret)
/// into one line: the snippet goes, the position and the explanation stay.
fn one_line(message: &str) -> String {
    let is_snippet = |l: &str| {
        l.starts_with('|')
            || l.split_once('|').is_some_and(|(n, _)| {
                let n = n.trim();
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
            })
    };
    let mut parts = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_snippet(l));
    let first = parts.next().unwrap_or_default().to_string();
    let rest: Vec<_> = parts.collect();
    if rest.is_empty() {
        first
    } else {
        format!("{first}: {}", rest.join(" "))
    }
}

impl ConfigError {
    pub(crate) fn invalid(key: &'static str, problem: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            problem: problem.into(),
        }
    }
}

impl Config {
    /// Loads the embedded defaults, then `file` (if any), then `MEMGATE__*` variables
    /// from `env`, and validates the result.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            check_file_keys(path)?;
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let mut vars = config::Map::new();
        for (k, v) in env.into_iter().filter(|(k, _)| k.starts_with("MEMGATE__")) {
            if !plain_key(&k) {
                return Err(ConfigError::Load(format!(
                    "environment variable {k:?}: only letters, digits and _ may follow MEMGATE__"
                )));
            }
            vars.insert(k, v);
        }
        let env = vars;
        builder = builder.add_source(
            config::Environment::with_prefix("MEMGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let cfg: Config = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges and relations between values; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.storage;
        self.server.validate_limits()?;
        if self.server.max_message_size.as_u64() < 1024 {
            return Err(ConfigError::invalid(
                "server.max_message_size",
                "must be at least 1KiB",
            ));
        }
        if self.server.max_message_size.as_u64() > u32::MAX as u64 {
            return Err(ConfigError::invalid(
                "server.max_message_size",
                "must be below 4GiB (the gRPC length prefix is 32 bits)",
            ));
        }
        if s.read_chunk_size.as_u64() < 1024 || s.read_chunk_size.as_u64() > 16 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "storage.read_chunk_size",
                "must be between 1KiB and 16MiB",
            ));
        }
        if s.max_blob_size.as_u64() == 0 || s.max_blob_size.as_u64() > i64::MAX as u64 {
            return Err(ConfigError::invalid(
                "storage.max_blob_size",
                "must be positive",
            ));
        }
        if s.partial_upload_expiry.is_zero() {
            return Err(ConfigError::invalid(
                "storage.partial_upload_expiry",
                "must be longer than 0s",
            ));
        }
        if s.gc_interval.is_zero() {
            return Err(ConfigError::invalid(
                "storage.gc_interval",
                "must be longer than 0s",
            ));
        }
        if s.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "storage.data_dir",
                "must not be empty",
            ));
        }
        if self.shutdown.drain_delay > Duration::from_secs(600) {
            return Err(ConfigError::invalid(
                "shutdown.drain_delay",
                "must be at most 10m",
            ));
        }
        if self.shutdown.grace > Duration::from_secs(3600) {
            return Err(ConfigError::invalid("shutdown.grace", "must be at most 1h"));
        }
        // EnvFilter panics on some non-ASCII input (found by fuzzing); directives are ASCII.
        if !self.log.level.is_ascii() {
            return Err(ConfigError::invalid(
                "log.level",
                "must be ASCII, e.g. \"info\" or \"memgate=debug,info\"",
            ));
        }
        if let Err(e) = log_filter(&self.log.level) {
            return Err(ConfigError::invalid("log.level", e.to_string()));
        }
        if s.backend == Backend::S3 {
            s.s3.validate()?;
        }
        let tls = &self.tls;
        let has_key = !tls.key_file.as_os_str().is_empty();
        if tls.enabled() != has_key {
            return Err(ConfigError::invalid(
                "tls.key_file",
                "tls.cert_file and tls.key_file must be set together",
            ));
        }
        if !tls.enabled() && !tls.client_ca_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "tls.client_ca_file",
                "client certificates (mTLS) need TLS: set tls.cert_file and tls.key_file",
            ));
        }
        if tls.reload_interval.is_zero() {
            return Err(ConfigError::invalid(
                "tls.reload_interval",
                "must be longer than 0s",
            ));
        }
        if self.auth.enabled && self.auth.tokens_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "auth.tokens_file",
                "must be set when auth.enabled = true",
            ));
        }
        if self.auth.reload_interval.is_zero() {
            return Err(ConfigError::invalid(
                "auth.reload_interval",
                "must be longer than 0s",
            ));
        }
        self.profiling.validate()?;
        self.memory.validate()
    }
}

impl S3Config {
    /// Checked only when the backend is `s3`, so the local default needs no bucket.
    fn validate(&self) -> Result<(), ConfigError> {
        const MIN_PART: u64 = 5 * 1024 * 1024; // S3's minimum for all parts but the last
        const MAX_PART: u64 = 5 * 1024 * 1024 * 1024;
        if self.bucket.is_empty() {
            return Err(ConfigError::invalid(
                "storage.s3.bucket",
                "must be set when storage.backend = \"s3\"",
            ));
        }
        let e = &self.endpoint;
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            return Err(ConfigError::invalid(
                "storage.s3.endpoint",
                "must start with http:// or https://",
            ));
        }
        if self.region.is_empty() {
            return Err(ConfigError::invalid(
                "storage.s3.region",
                "must not be empty",
            ));
        }
        let part = self.part_size.as_u64();
        if !(MIN_PART..=MAX_PART).contains(&part) {
            return Err(ConfigError::invalid(
                "storage.s3.part_size",
                "must be between 5MiB and 5GiB (S3's limits for a part)",
            ));
        }
        if !(1..=64).contains(&self.parts_in_flight) {
            return Err(ConfigError::invalid(
                "storage.s3.parts_in_flight",
                "must be between 1 and 64",
            ));
        }
        for (key, d) in [
            ("storage.s3.request_timeout", self.request_timeout),
            ("storage.s3.connect_timeout", self.connect_timeout),
            ("storage.s3.retry_timeout", self.retry_timeout),
            ("storage.s3.health_interval", self.health_interval),
        ] {
            if d.is_zero() {
                return Err(ConfigError::invalid(key, "must be longer than 0s"));
            }
        }
        if self.max_retries > 20 {
            return Err(ConfigError::invalid(
                "storage.s3.max_retries",
                "must be at most 20",
            ));
        }
        Ok(())
    }
}

/// Deserializes a [`ByteSize`] that may also be the word `auto` (returned as `None`).
pub(crate) fn auto_or_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(Some(ByteSize::b(n))),
        Raw::Text(t) if t.trim().eq_ignore_ascii_case("auto") => Ok(None),
        Raw::Text(t) => t.trim().parse::<ByteSize>().map(Some).map_err(|e| {
            serde::de::Error::custom(format!("expected `auto` or a size like \"512MiB\": {e}"))
        }),
    }
}

/// Serializes the counterpart of [`auto_or_size`].
pub(crate) fn serialize_auto_or_size<S: serde::Serializer>(
    v: &Option<ByteSize>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_str("auto"),
        Some(b) => s.serialize_str(&b.display().iec_short().to_string()),
    }
}
