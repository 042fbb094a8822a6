//! `flood`: the quiet flood of issue 13. A flooder on a second loopback address
//! opens many HTTP/2 connections with many ByteStream Write streams, pushes a
//! few MiB into each and goes quiet without ending, holding them for a while;
//! a well-behaved client on the usual address starts a little later and
//! uploads one blob with retries that honour the server's pushback. What counts
//! is how long the good client takes to get in, and what the flooder holds
//! meanwhile.
//!
//! [`flooder`] is the flood, [`good`] the good client, [`report`] what a run
//! found; this module runs them against a server from [`crate::target`], with
//! the usual [`crate::timeline`] sampling its memory and `/metrics`.

pub mod flooder;
pub mod good;
pub mod report;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    calls::RetryPolicy,
    payload::{self, Payload, Pool},
    report::{ServerInfo, median_rss},
    target::{self, Target},
    timeline::{self, Timeline},
    variant::{AFTER, IDLE},
};
use flooder::{Flooder, FlooderOptions, Live};
use report::{FloodReport, FloodRun, FloodSample};

/// Bound on waiting for a sample that should come within 50 ms.
const SAMPLE_WAIT: Duration = Duration::from_secs(10);
/// How often the flooder's own counts are read.
pub const FLOODER_INTERVAL: Duration = Duration::from_millis(100);

/// What the command line chose (defaults: the flood measured in issue 13).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloodOptions {
    /// HTTP/2 connections the flooder opens.
    pub connections: usize,
    /// Write streams per connection.
    pub streams: usize,
    /// Payload bytes each stream pushes before going quiet.
    pub push: u64,
    /// Blob size each flood stream declares.
    pub declared: u64,
    /// How long the flood holds its streams, from its start.
    #[serde(with = "secs")]
    pub hold: Duration,
    /// When the good client starts, after the flood's start.
    #[serde(with = "secs")]
    pub good_delay: Duration,
    /// The good client's blob.
    pub good_size: u64,
    /// The flooder's address (the good client uses the system's choice, 127.0.0.1).
    pub flood_ip: IpAddr,
    /// The good client stops retrying this long after its first try.
    #[serde(with = "secs")]
    pub give_up: Duration,
    /// Repeats, each against a fresh server.
    pub runs: usize,
    #[serde(skip)]
    pub retry: RetryPolicy,
    /// Where read-backs are written (tmpfs where there is one).
    pub scratch: PathBuf,
}

impl Default for FloodOptions {
    fn default() -> Self {
        FloodOptions {
            connections: 16,
            streams: 64,
            push: 4 << 20,
            declared: 150_000_000,
            hold: Duration::from_secs(40),
            good_delay: Duration::from_secs(8),
            good_size: 50_000_000,
            flood_ip: IpAddr::from([127, 0, 0, 2]),
            give_up: Duration::from_secs(60),
            runs: 1,
            retry: RetryPolicy {
                max_attempts: usize::MAX,
                ..RetryPolicy::default()
            },
            scratch: crate::openssl::scratch_dir(),
        }
    }
}

impl FloodOptions {
    /// One line for titles.
    pub fn description(&self) -> String {
        format!(
            "{} connections × {} Write streams from {}, {:.0} MiB each then quiet, held {} s; \
             a {} MB upload from 127.0.0.1 at {} s",
            self.connections,
            self.streams,
            self.flood_ip,
            crate::mib(self.push),
            self.hold.as_secs_f64(),
            self.good_size as f64 / 1e6,
            self.good_delay.as_secs_f64(),
        )
    }
}

/// Durations as seconds in the JSON.
mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Runs the flood `opts.runs` times, each against a fresh server from `target`
/// (guard on), and sums the runs up.
pub async fn run(target: &Target, opts: &FloodOptions) -> anyhow::Result<FloodReport> {
    let runs = opts.runs.max(1);
    let (pool, payloads) = {
        let (size, runs) = (opts.good_size, runs);
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Arc<Pool>, Vec<Payload>)> {
            let pool = Pool::random().context("cannot read /dev/urandom")?;
            // A distinct blob per run: a server at --addr keeps what it stored.
            let payloads = payload::make(&pool, 0, runs, size);
            Ok((pool, payloads))
        })
        .await??
    };
    let share = client_share(target);
    let mut done = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        eprintln!(
            "memgate-bench: flood run {}/{runs}: {}",
            i + 1,
            opts.description()
        );
        done.push(
            run_once(target, opts, p, share)
                .await
                .with_context(|| format!("flood run {}", i + 1))?,
        );
    }
    drop(pool);
    Ok(FloodReport::new(opts, done))
}

/// `[memory] max_client_share` of the server: from the configuration the bench
/// starts it with, else memgate's default.
fn client_share(target: &Target) -> f64 {
    let default = memgate::guard::DEFAULT_MAX_CLIENT_SHARE;
    match target {
        Target::Spawn(s) => toml::from_str::<memgate::config::Config>(&s.config_toml)
            .map_or(default, |c| c.memory.max_client_share),
        Target::External(_) => default,
    }
}

/// One flood against a fresh server (or the one at `--addr`).
pub async fn run_once(
    target: &Target,
    opts: &FloodOptions,
    payload: &Payload,
    client_share: f64,
) -> anyhow::Result<FloodRun> {
    let guard = matches!(target, Target::Spawn(_)).then_some(true);
    let mut running = target::start(target, guard).await?;
    let origin = Instant::now();
    let timeline = Timeline::start(running.sources(), origin, timeline::INTERVAL);
    let mut watch = timeline.watch();
    timeline::wait_for(&mut watch, SAMPLE_WAIT, |s| s.t >= IDLE.as_secs_f64())
        .await
        .context("the sampler stopped")?;
    let server = server_addr(&running.url).await?;

    let fopts = FlooderOptions {
        server,
        local_ip: opts.flood_ip,
        connections: opts.connections,
        streams: opts.streams,
        push: opts.push,
        declared: opts.declared,
        stream_window: u64::from(memgate::server::STREAM_WINDOW),
    };
    let flood_start = origin.elapsed().as_secs_f64();
    let flooder = Flooder::start(&fopts, origin);
    let counts = FlooderSampler::start(flooder.live.clone(), origin);

    let good = {
        let (url, payload, opts) = (running.url.clone(), payload.clone(), opts.clone());
        tokio::spawn(async move {
            tokio::time::sleep(opts.good_delay).await;
            let channel = memgate::client::connect(&url).await?;
            let policy = opts.retry;
            Ok::<_, anyhow::Error>(
                good::upload(
                    channel,
                    &payload,
                    &policy,
                    opts.give_up,
                    origin,
                    &opts.scratch,
                )
                .await,
            )
        })
    };
    tokio::time::sleep(opts.hold).await;
    let connect_errors = flooder
        .connect_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let streams = flooder.stop().await;
    let flood_end = origin.elapsed().as_secs_f64();
    let good = good.await.context("the good client's task")??;
    let flooder_samples = counts.finish();

    let last = good
        .tries
        .last()
        .map_or(flood_end, |t| t.start + t.seconds)
        .max(flood_end);
    timeline::wait_for(&mut watch, SAMPLE_WAIT, |s| {
        s.t >= last + AFTER.as_secs_f64()
    })
    .await;
    let hwm = running.peak_rss();
    let samples = timeline.finish();
    let exit_status = running.exit_status();
    let alive_after = exit_status.is_none();
    let budget = samples.iter().rev().find_map(|s| s.guard.budget);
    let oom_kills = running.oom_kills().or_else(|| {
        let first = samples.iter().find_map(|s| s.oom_kills)?;
        Some(samples.iter().rev().find_map(|s| s.oom_kills)? - first)
    });
    Ok(FloodRun::new(report::Parts {
        server: ServerInfo {
            url: running.url.clone(),
            pid: running.pid,
            guard: running.guard,
            cgroup: running.cgroup_path().map(|p| p.display().to_string()),
            cgroup_limit: running.cgroup_limit(),
            budget,
            alive_after,
            exit_status,
        },
        flood_start,
        flood_end,
        good,
        streams,
        connect_errors,
        idle_rss: median_rss(&samples, 0.0, IDLE.as_secs_f64()),
        hwm,
        peak_cgroup_usage: running.peak_usage(),
        oom_kills,
        client_share,
        samples,
        flooder_samples,
        stderr_tail: if alive_after {
            Vec::new()
        } else {
            running.stderr_tail(20)
        },
    }))
}

/// `http://host:port` → an address to connect a socket to.
async fn server_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let hostport = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/');
    tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("cannot resolve {hostport}"))?
        .next()
        .with_context(|| format!("{hostport} resolves to nothing"))
}

/// Reads the flooder's [`Live`] counts every [`FLOODER_INTERVAL`] on a thread
/// of its own, as the timeline does for the server.
struct FlooderSampler {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Vec<FloodSample>>,
}

impl FlooderSampler {
    fn start(live: Arc<Live>, origin: Instant) -> FlooderSampler {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("flood-sampler".into())
            .spawn(move || {
                let mut samples = Vec::new();
                loop {
                    samples.push(FloodSample {
                        t: origin.elapsed().as_secs_f64(),
                        open: live.open.load(Ordering::Relaxed),
                        admitted_open: live.admitted_open.load(Ordering::Relaxed),
                        bytes_open: live.bytes_open.load(Ordering::Relaxed),
                        bytes_admitted_open: live.bytes_admitted_open.load(Ordering::Relaxed),
                    });
                    match stopped.recv_timeout(FLOODER_INTERVAL) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return samples,
                    }
                }
            })
            .expect("spawn the flood sampler thread");
        FlooderSampler { stop, thread }
    }

    fn finish(self) -> Vec<FloodSample> {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}
