//! The server under test: either started by the bench -- the real binary in a
//! fresh child memory cgroup with a given limit, on free loopback ports, guard on
//! or off -- or one already running at an address. [`Running`] is the same for
//! both; what cannot be known about a server we did not start (its cgroup, its
//! pid unless given) is `None`, and the report says so.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

use crate::{
    cgroup::{ChildCgroup, LimitError, MemgateProcess, ServerSpec, Version, spawn_memgate_in},
    timeline::Sources,
};

/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server comes from.
#[derive(Debug, Clone)]
pub enum Target {
    Spawn(SpawnOptions),
    External(External),
}

/// The bench starts `binary` itself, inside a child memory cgroup of `limit` bytes.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    pub binary: PathBuf,
    pub limit: u64,
    /// The server's whole configuration file; `[memory] enabled` is overridden
    /// per run through `MEMGATE__MEMORY__ENABLED`.
    pub config_toml: String,
    /// Data directories are made (and removed) under this one. On a disk, not
    /// tmpfs: tmpfs pages the server writes would be charged to its cgroup.
    pub data_root: PathBuf,
}

/// A server someone else started.
#[derive(Debug, Clone)]
pub struct External {
    /// `http://host:port`.
    pub url: String,
    pub admin: Option<SocketAddr>,
    pub pid: Option<u32>,
    /// Its data directory, if this machine can see it (the soak removes what it uploaded).
    pub data_dir: Option<PathBuf>,
}

/// A server ready for calls. A spawned one is killed and its cgroup removed on drop.
pub struct Running {
    pub url: String,
    pub admin: Option<SocketAddr>,
    pub pid: Option<u32>,
    /// Whether the guard admits calls, as its `/metrics` says (or as we set it).
    pub guard: Option<bool>,
    pub data_dir: Option<PathBuf>,
    // Drop order: the process, then its cgroup, then its data.
    process: Option<MemgateProcess>,
    cgroup: Option<ChildCgroup>,
    _data: Option<tempfile::TempDir>,
}

/// Starts (or reaches) the server and waits until its readiness is SERVING. A
/// spawned server has the guard on or off as `guard` says; `guard` must be
/// `None` for a server we did not start.
///
/// Spawning must happen on a thread that outlives the server (see
/// [`spawn_memgate_in`]): call this from `main`'s task or a test's, not from
/// `spawn_blocking`.
pub async fn start(target: &Target, guard: Option<bool>) -> anyhow::Result<Running> {
    start_with_env(target, guard, &[]).await
}

/// [`start`], with more `MEMGATE__*` overrides for a spawned server (a server
/// we did not start cannot take any).
pub async fn start_with_env(
    target: &Target,
    guard: Option<bool>,
    env: &[(String, String)],
) -> anyhow::Result<Running> {
    let running = match target {
        Target::Spawn(opts) => spawn(opts, guard.unwrap_or(true), env)?,
        Target::External(ext) => {
            if !env.is_empty() {
                bail!(
                    "comparing configurations needs a server the bench starts itself: it runs \
                     the same binary once per variant with different MEMGATE__* settings (drop --addr)"
                );
            }
            if guard.is_some() {
                bail!(
                    "turning the guard off needs a server the bench starts itself: it runs the \
                     same binary twice, once with MEMGATE__MEMORY__ENABLED=false (drop --addr)"
                );
            }
            Running {
                url: ext.url.clone(),
                admin: ext.admin,
                pid: ext.pid,
                guard: None,
                data_dir: ext.data_dir.clone(),
                process: None,
                cgroup: None,
                _data: None,
            }
        }
    };
    wait_ready(&running.url).await?;
    Ok(running)
}

fn spawn(opts: &SpawnOptions, guard: bool, env: &[(String, String)]) -> anyhow::Result<Running> {
    let cgroup = ChildCgroup::create("memgate-bench", opts.limit).map_err(|why| {
        anyhow::anyhow!(
            "cannot run memgate in a child memory cgroup: {why}\n\
             memgate-bench starts the server itself in a fresh cgroup with the limit you give; \
             that needs root and a writable cgroup memory controller (v1, or v2 with `+memory` \
             in the parent's cgroup.subtree_control). Without them, start memgate yourself and \
             pass --addr (with --admin-addr and --pid for the memory figures)."
        )
    })?;
    std::fs::create_dir_all(&opts.data_root)
        .with_context(|| format!("cannot create {}", opts.data_root.display()))?;
    let data = tempfile::Builder::new()
        .prefix("memgate-bench-data-")
        .tempdir_in(&opts.data_root)
        .with_context(|| format!("cannot create a data dir in {}", opts.data_root.display()))?;
    if !opts.binary.exists() {
        bail!(
            "no memgate binary at {} (build it with `cargo build --release --workspace`, or \
             pass --memgate PATH)",
            opts.binary.display()
        );
    }
    let mut spec = ServerSpec::new(&opts.binary, &opts.config_toml, data.path());
    spec.env
        .push(("MEMGATE__MEMORY__ENABLED".into(), guard.to_string()));
    spec.env.extend(env.iter().cloned());
    let process = spawn_memgate_in(&cgroup, &spec)?;
    Ok(Running {
        url: format!("http://{}", process.addr),
        admin: process.admin_addr,
        pid: Some(process.pid),
        guard: Some(guard),
        data_dir: Some(data.path().to_path_buf()),
        process: Some(process),
        cgroup: Some(cgroup),
        _data: Some(data),
    })
}

/// Waits for readiness SERVING through the health service's Watch stream.
async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let watch = async {
        let channel = memgate::client::connect(url).await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut stream = client
            .watch(HealthCheckRequest {
                service: "readiness".into(),
            })
            .await?
            .into_inner();
        while let Some(resp) = stream.message().await? {
            if resp.status() == ServingStatus::Serving {
                return Ok(());
            }
        }
        bail!("the health stream ended before readiness was SERVING")
    };
    tokio::time::timeout(READY_TIMEOUT, watch)
        .await
        .with_context(|| format!("{url} was not ready within {READY_TIMEOUT:?}"))?
}

impl Running {
    /// What the timeline can read about this server.
    pub fn sources(&self) -> Sources {
        Sources {
            pid: self.pid,
            cgroup: self.cgroup.as_ref().map(ChildCgroup::files),
            admin: self.admin,
        }
    }

    /// The cgroup's limit, if we made the cgroup.
    pub fn cgroup_limit(&self) -> Option<u64> {
        self.cgroup.as_ref().map(ChildCgroup::limit)
    }

    pub fn cgroup_path(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(ChildCgroup::path)
    }

    /// The hierarchy our cgroup lives in; `None` for a server we did not start.
    pub fn cgroup_version(&self) -> Option<Version> {
        self.cgroup.as_ref().map(ChildCgroup::version)
    }

    /// Changes our cgroup's limit under the running server (see
    /// [`ChildCgroup::set_limit`]); the limit in force.
    pub fn set_cgroup_limit(&mut self, bytes: u64) -> anyhow::Result<Result<u64, LimitError>> {
        match self.cgroup.as_mut() {
            Some(cg) => Ok(cg.set_limit(bytes)),
            None => bail!("the cgroup limit can only be changed for a server the bench starts"),
        }
    }

    /// Restarts our cgroup's high-water mark from its current usage; whether it could.
    pub fn reset_cgroup_peak(&self) -> bool {
        self.cgroup
            .as_ref()
            .is_some_and(|c| c.reset_peak_usage().unwrap_or(false))
    }

    /// OOM kills in our cgroup so far; `None` for a server we did not start.
    pub fn oom_kills(&self) -> Option<u64> {
        self.cgroup.as_ref().and_then(|c| c.oom_kills().ok())
    }

    /// The cgroup's own high-water mark, page cache included.
    pub fn peak_usage(&self) -> Option<u64> {
        self.cgroup
            .as_ref()
            .and_then(|c| c.peak_usage().ok().flatten())
    }

    /// The server's `VmHWM`, while it runs (catches peaks between samples).
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        crate::cgroup::proc_status_bytes(&status, "VmHWM")
    }

    /// `Some(status)` once a server we started has exited.
    pub fn exit_status(&mut self) -> Option<String> {
        self.process
            .as_mut()
            .and_then(MemgateProcess::try_wait)
            .map(|s| s.to_string())
    }

    /// The last `n` lines of a spawned server's stderr.
    pub fn stderr_tail(&self, n: usize) -> Vec<String> {
        let Some(p) = &self.process else {
            return Vec::new();
        };
        let all = p.stderr_so_far();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    /// What removes stored blobs from this server's data directory; an error
    /// when it is unknown.
    pub fn blob_remover(&self) -> anyhow::Result<BlobRemover> {
        match &self.data_dir {
            Some(dir) => Ok(BlobRemover { dir: dir.clone() }),
            None => bail!(
                "the server's data directory is unknown, so the blobs uploaded cannot be \
                 removed again (pass --server-data-dir with --addr)"
            ),
        }
    }
}

/// Removes blobs from a local store's directory behind the server's back:
/// memgate has no delete call. A long run removes what it uploads, so that the
/// disk does not fill and the same payloads can be uploaded again (an upload of
/// a stored blob would be answered at once without its bytes).
#[derive(Debug, Clone)]
pub struct BlobRemover {
    dir: PathBuf,
}

impl BlobRemover {
    /// Removes blob `hex` (lowercase SHA-256); whether it was there.
    pub async fn remove(&self, hex: &str) -> std::io::Result<bool> {
        let Some(prefix) = hex.get(..2) else {
            return Ok(false);
        };
        let path = self.dir.join("blobs").join(prefix).join(hex);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}
