//! memgate's real binary inside a [`ChildCgroup`]. The child joins the cgroup
//! between fork and exec, so every byte it ever allocates is charged there; its
//! JSON stderr is drained by a thread for the whole run (a full pipe would stall
//! the server) and kept for assertions and reports.

use std::{
    ffi::{CStr, CString},
    fmt,
    io::{self, BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::{self, JoinHandle},
    time::Duration,
};

use super::{ChildCgroup, parse};

/// Start-up is milliseconds; the margin is for builds hogging the cores.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start: `<binary> serve --config <config_toml> --grpc-addr 127.0.0.1:0
/// --admin-addr 127.0.0.1:0 --data-dir <data_dir> --log-format json`.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The memgate binary (`env!("CARGO_BIN_EXE_memgate")` in memgate's tests).
    pub binary: PathBuf,
    /// The whole configuration file.
    pub config_toml: String,
    pub data_dir: PathBuf,
    /// `MEMGATE__*` overrides, set after every inherited `MEMGATE__*` is removed.
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    /// `binary` with `config_toml` and `data_dir`, no environment overrides.
    pub fn new(binary: impl Into<PathBuf>, config_toml: &str, data_dir: &Path) -> Self {
        ServerSpec {
            binary: binary.into(),
            config_toml: config_toml.to_string(),
            data_dir: data_dir.to_path_buf(),
            env: Vec::new(),
        }
    }
}

/// Why memgate could not be started; the text includes its stderr.
#[derive(Debug)]
pub struct SpawnError(pub String);

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpawnError {}

/// A running `memgate serve`; killed (SIGKILL) and reaped on drop.
pub struct MemgateProcess {
    /// The gRPC address from its `listening` log line.
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/readyz`) from the same line.
    pub admin_addr: Option<SocketAddr>,
    pub pid: u32,
    child: Child,
    stderr: Arc<Mutex<String>>,
    drain: Option<JoinHandle<()>>,
    _config: tempfile::NamedTempFile,
}

/// Starts memgate as `spec` says inside `cg` and waits for its `listening` line;
/// an error (with the stderr seen so far) if it exits or stays silent for a minute.
///
/// `RUST_LOG` and every inherited `MEMGATE__*` are removed from its environment,
/// so the given config and overrides are what runs. The child gets SIGKILL when
/// the spawning thread ends: call this from a thread that outlives the server
/// (a test's own thread, `main`, a runtime worker), never from `spawn_blocking`.
pub fn spawn_memgate_in(cg: &ChildCgroup, spec: &ServerSpec) -> Result<MemgateProcess, SpawnError> {
    let io_error = |what: &str, e: io::Error| SpawnError(format!("{what}: {e}"));
    let mut config = tempfile::Builder::new()
        .prefix("memgate-")
        .suffix(".toml")
        .tempfile()
        .map_err(|e| io_error("cannot create a config file", e))?;
    config
        .write_all(spec.config_toml.as_bytes())
        .and_then(|()| config.flush())
        .map_err(|e| io_error("cannot write the config file", e))?;
    let procs = CString::new(cg.procs_path().as_os_str().as_bytes())
        .map_err(|_| SpawnError("NUL in the cgroup path".into()))?;

    let mut cmd = Command::new(&spec.binary);
    cmd.arg("serve")
        .arg("--config")
        .arg(config.path())
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&spec.data_dir)
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"MEMGATE__") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed; `join_cgroup` makes raw syscalls on a
    // path built before the fork and a stack buffer, and allocates nothing.
    unsafe { cmd.pre_exec(move || join_cgroup(&procs)) };
    let mut child = cmd.spawn().map_err(|e| {
        SpawnError(format!(
            "cannot start {} in {}: {e}",
            spec.binary.display(),
            cg.path().display()
        ))
    })?;

    let pipe = child.stderr.take().expect("stderr is piped");
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let drain = {
        let stderr = stderr.clone();
        thread::spawn(move || drain_stderr(pipe, &stderr, tx))
    };
    let mut server = MemgateProcess {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        admin_addr: None,
        pid: child.id(),
        child,
        stderr,
        drain: Some(drain),
        _config: config,
    };
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok((addr, admin)) => {
            server.addr = addr;
            server.admin_addr = admin;
            Ok(server)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(SpawnError(format!(
            "memgate logged no `listening` line within {STARTUP_TIMEOUT:?}; stderr so far:\n{}",
            server.stderr_so_far()
        ))),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = server.child.wait().map(|s| s.to_string());
            Err(SpawnError(format!(
                "memgate exited before listening ({status:?}); stderr:\n{}",
                server.stderr_so_far()
            )))
        }
    }
}

impl MemgateProcess {
    /// `http://<addr>`, for `tonic::transport::Endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waitpid on memgate")
    }

    pub fn is_alive(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Its peak resident set (`VmHWM`), while it runs.
    pub fn peak_rss(&self) -> Option<u64> {
        parse::proc_status_bytes(&self.proc_status()?, "VmHWM")
    }

    /// Its resident set now (`VmRSS`), while it runs.
    pub fn rss(&self) -> Option<u64> {
        parse::proc_status_bytes(&self.proc_status()?, "VmRSS")
    }

    fn proc_status(&self) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGKILL and reap; harmless if it already exited.
    pub fn kill(&mut self) {
        if self.is_alive() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for MemgateProcess {
    fn drop(&mut self) {
        self.kill();
        // The pipe closes with the process, which ends the thread.
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

/// Runs in the child between fork and exec: die with the parent, then write our
/// own pid to `cgroup.procs` (v1 does not accept "0" for "myself").
fn join_cgroup(procs: &CStr) -> io::Result<()> {
    let mut buf = [0u8; 12];
    // SAFETY: prctl, getpid, open, write and close are async-signal-safe system
    // calls; `procs` is a NUL-terminated string that outlives the calls and `pid`
    // points into `buf`, valid for `pid.len()` bytes.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(io::Error::last_os_error());
        }
        let pid = parse::decimal(libc::getpid(), &mut buf);
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, pid.as_ptr().cast(), pid.len());
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != pid.len() as isize {
            return Err(error);
        }
    }
    Ok(())
}

/// Appends every stderr line to `into`; sends the addresses of the first
/// `listening` line on `listening`.
fn drain_stderr(pipe: ChildStderr, into: &Mutex<String>, listening: mpsc::Sender<Listening>) {
    let mut listening = Some(listening);
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(addr) = listening.as_ref().and_then(|_| listening_addr(&text)) {
            let _ = listening.take().expect("checked").send(addr);
        }
        into.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_str(&text);
    }
}

/// The gRPC address and, if logged, the admin address.
type Listening = (SocketAddr, Option<SocketAddr>);

/// The `grpc_addr` and `admin_addr` of a JSON `listening` line, flattened or under `fields`.
fn listening_addr(line: &str) -> Option<Listening> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let fields = value.get("fields").unwrap_or(&value);
    let field = |k: &str| {
        value
            .get(k)
            .or_else(|| fields.get(k))
            .and_then(|v| v.as_str())
    };
    if field("message")? != "listening" {
        return None;
    }
    let admin = field("admin_addr").and_then(|a| a.parse().ok());
    Some((field("grpc_addr")?.parse().ok()?, admin))
}

#[cfg(test)]
mod tests {
    use super::listening_addr;

    #[test]
    fn finds_the_listening_line() {
        let flat = r#"{"timestamp":"t","level":"INFO","message":"listening","grpc_addr":"127.0.0.1:4321","admin_addr":"127.0.0.1:9","data_dir":"/d","target":"memgate::server"}"#;
        let nested =
            r#"{"level":"INFO","fields":{"message":"listening","grpc_addr":"127.0.0.1:5"}}"#;
        assert_eq!(
            listening_addr(flat),
            Some((
                "127.0.0.1:4321".parse().unwrap(),
                Some("127.0.0.1:9".parse().unwrap())
            ))
        );
        assert_eq!(
            listening_addr(nested),
            Some(("127.0.0.1:5".parse().unwrap(), None))
        );
        assert_eq!(
            listening_addr(r#"{"message":"started","grpc_addr":"127.0.0.1:1"}"#),
            None
        );
        assert_eq!(listening_addr("memgate: error: boom"), None);
    }
}
