//! The server's memory over time: every 50 ms a thread of its own reads the
//! server's RSS (`/proc/<pid>/status`), its cgroup's usage and working set
//! (`memory.stat`) and the guard's `/metrics`, and keeps each reading. A thread,
//! not a task: the load saturates the runtime's workers, and a sample that is
//! late is a sample that lies about when things happened.
//!
//! The latest sample is also published on a `watch` channel, so a scenario can
//! await a state ("reserved back to 0", "1 s after the last call") instead of
//! sleeping and hoping.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::{cgroup::CgroupFiles, metrics};

/// The bench's sampling period.
pub const INTERVAL: Duration = Duration::from_millis(50);
/// A scrape that takes longer than this counts as missing: the server is gone or stuck.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(500);

/// Where the readings come from; each is optional (a server at `--addr` has no
/// cgroup of ours, and maybe no pid or admin address we know).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub pid: Option<u32>,
    pub cgroup: Option<CgroupFiles>,
    pub admin: Option<SocketAddr>,
}

/// One reading. Times are seconds since the run's origin; bytes are bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    pub t: f64,
    /// The server's `VmRSS`.
    pub rss: Option<u64>,
    /// The cgroup's usage, page cache included.
    pub usage: Option<u64>,
    /// Usage minus inactive file (the kubelet's working set); the guard's own
    /// figure when there is no cgroup of ours to read.
    pub working_set: Option<u64>,
    /// Anonymous memory in the cgroup.
    pub anon: Option<u64>,
    pub oom_kills: Option<u64>,
    #[serde(flatten)]
    pub guard: metrics::GuardReading,
}

/// A running sampler; [`Timeline::finish`] stops it and returns every sample.
pub struct Timeline {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<Vec<Sample>>>,
    latest: watch::Receiver<Sample>,
}

impl Timeline {
    /// Starts sampling `sources` every `interval`, times relative to `origin`.
    pub fn start(sources: Sources, origin: Instant, interval: Duration) -> Timeline {
        let (stop, stopped) = mpsc::channel();
        let (tx, latest) = watch::channel(Sample::default());
        let thread = thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || run(&sources, origin, interval, &stopped, &tx))
            .expect("spawn the sampler thread");
        Timeline {
            stop,
            thread: Some(thread),
            latest,
        }
    }

    /// The latest sample, updated as they come.
    pub fn watch(&self) -> watch::Receiver<Sample> {
        self.latest.clone()
    }

    /// Stops sampling; every sample taken.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Vec<Sample> {
        let _ = self.stop.send(());
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Waits until the latest sample satisfies `done`, at most `timeout`; the sample
/// that did, or `None` (timed out, or the sampler stopped).
pub async fn wait_for(
    rx: &mut watch::Receiver<Sample>,
    timeout: Duration,
    mut done: impl FnMut(&Sample) -> bool,
) -> Option<Sample> {
    let found = tokio::time::timeout(timeout, rx.wait_for(|s| done(s))).await;
    match found {
        Ok(Ok(sample)) => Some(*sample),
        _ => None,
    }
}

fn run(
    sources: &Sources,
    origin: Instant,
    interval: Duration,
    stop: &mpsc::Receiver<()>,
    tx: &watch::Sender<Sample>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut next = Instant::now();
    loop {
        let sample = take(sources, origin);
        samples.push(sample);
        tx.send_replace(sample);
        // Ticks keep their schedule; a slow reading skips ticks rather than bunching them.
        next += interval;
        let now = Instant::now();
        while next < now {
            next += interval;
        }
        match stop.recv_timeout(next - now) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return samples,
        }
    }
}

fn take(sources: &Sources, origin: Instant) -> Sample {
    let t = origin.elapsed().as_secs_f64();
    let rss = sources.pid.and_then(|pid| {
        let status = std::fs::read_to_string(proc_status(pid)).ok()?;
        crate::cgroup::proc_status_bytes(&status, "VmRSS")
    });
    let cg = sources.cgroup.as_ref().and_then(|c| c.snapshot().ok());
    let oom_kills = sources.cgroup.as_ref().and_then(|c| c.oom_kills().ok());
    let guard = sources
        .admin
        .and_then(|a| metrics::scrape(a, SCRAPE_TIMEOUT).ok())
        .unwrap_or_default();
    Sample {
        t,
        rss,
        usage: cg.map(|s| s.usage),
        working_set: cg.map(|s| s.working_set()).or(guard.working_set),
        anon: cg.map(|s| s.anon),
        oom_kills: oom_kills.or(guard.oom_kills),
        guard,
    }
}

fn proc_status(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/status"))
}
