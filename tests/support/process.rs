//! The real `memgate serve` binary as a child process on loopback ports the OS
//! chooses, with its JSON log captured, its admin listener (probes, metrics) at
//! hand, and signals to send it.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Memgate {
    child: Child,
    /// `http://host:port` of the gRPC listener.
    pub grpc: String,
    /// `host:port` of the admin listener.
    pub admin: String,
    stderr: Arc<Mutex<String>>,
    pub config: std::path::PathBuf,
    pub dir: Option<tempfile::TempDir>,
}

impl Memgate {
    /// Starts `memgate serve` with `config` (TOML) on loopback ports chosen by the OS.
    pub fn start(config: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), config)
    }

    /// Like [`Memgate::start`], keeping its config and data in `dir`.
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Self {
        Self::start_with(dir, config, &[])
    }

    /// Like [`Memgate::start_in`], with extra environment variables (credentials).
    pub fn start_with(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_launched(dir, config, env, &[])
    }

    /// Like [`Memgate::start_with`], started through `launcher`: a program and
    /// its arguments, to which the memgate command line is appended and which
    /// must end by exec'ing it (so the pid stays memgate's), e.g.
    /// `["bash", "-c", "trap '' XFSZ; exec \"$@\"", "launcher"]`.
    pub fn start_launched(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
        launcher: &[&str],
    ) -> Self {
        let cfg = dir.path().join("memgate.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_memgate"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_memgate")),
        };
        let mut child = command
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in lines.by_ref().map_while(Result::ok) {
                if line.contains("\"listening\"")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no listening line; stderr:\n{}", stderr.lock().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        Self {
            child,
            grpc: format!("http://{}", v["grpc_addr"].as_str().unwrap()),
            admin: v["admin_addr"].as_str().unwrap().to_string(),
            stderr,
            config: cfg,
            dir: Some(dir),
        }
    }

    /// Stops the process and hands over its directory (config and data).
    pub fn take_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.take().unwrap()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub async fn http(&self, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(&self.admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (
            code,
            out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
        )
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (code, body) = self.http("/metrics").await;
        assert_eq!(code, 200);
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// Waits (bounded) for the process to exit; returns its status and how long it took.
    pub fn wait_exit(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "still running after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Memgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
