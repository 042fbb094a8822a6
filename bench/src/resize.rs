//! `memgate-bench resize`: the memory limit shrinks under a running burst, as a
//! Kubernetes in-place resize (KEP-1287) does to a container's cgroup, with no
//! signal to the process inside.
//!
//! The server starts in a child cgroup of `--limit` (1 GiB). A burst starts, all
//! at once: `uploads` uploads and `process` Process calls (with echo). At
//! `resize_at` (or, in the test, as soon as the guard's reserved bytes pass a
//! mark) the cgroup's limit is lowered to `resize_to`, below what is reserved:
//! `memory.limit_in_bytes` on v1, which the kernel refuses with EBUSY while the
//! cgroup holds more than the new limit and cannot reclaim it (the write is then
//! retried every [`BUSY_RETRY`] and the refusals counted), `memory.max` on v2,
//! which takes it at once and reclaims, then OOM-kills, to meet it. With
//! `resize_for` the old limit comes back after that long.
//!
//! Every call must get done: a refused or cut upload is resumed from its
//! committed offset (QueryWriteStatus), a Process call is sent again, each a
//! bounded number of times ([`calls`]). Afterwards every uploaded blob is read
//! back and checked against its digest, the server must be ready again and
//! admit a fresh upload. [`report`] has the figures and the checks;
//! `crate::plot::resize` draws limit, budget, reserved and working set over time.

pub mod calls;
pub mod report;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    calls::{Kind, Outcome, RetryPolicy},
    cgroup::LimitError,
    scenario::{self, Conn},
    target::{self, Running, Target},
    timeline::{self, Sample, Timeline},
};

pub use report::{Resize, ResizeReport};

/// How often a limit the kernel refused (EBUSY) is asked for again.
pub const BUSY_RETRY: Duration = Duration::from_millis(50);
/// How long the server may take to say SERVING again after the burst.
const READY_AGAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a resize run does; [`Default`] is `memgate-bench resize` without flags.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResizeOptions {
    /// The limit the cgroup is lowered to.
    pub resize_to: u64,
    /// When, after the burst started, the limit is lowered.
    #[serde(serialize_with = "secs")]
    pub resize_at: Duration,
    /// Lower it as soon as the guard has reserved more than this, waiting at
    /// most `resize_at` (so a test knows the limit fell below what was reserved).
    pub resize_when_reserved_above: Option<u64>,
    /// Put the old limit back this long after the lower one was applied.
    #[serde(serialize_with = "opt_secs")]
    pub resize_for: Option<Duration>,
    /// How long to keep asking a kernel that refuses the lower limit (EBUSY).
    #[serde(serialize_with = "secs")]
    pub busy_timeout: Duration,
    pub uploads: usize,
    pub process: usize,
    /// Bytes per payload, uploads and Process alike.
    pub size: u64,
    /// Process calls ask for an echo.
    pub echo: bool,
    pub conn: Conn,
    #[serde(skip)]
    pub retry: RetryPolicy,
    /// Read-backs land here (then are removed): tmpfs where there is one.
    pub scratch: PathBuf,
}

impl Default for ResizeOptions {
    fn default() -> Self {
        ResizeOptions {
            resize_to: 512 * crate::MIB,
            resize_at: Duration::from_secs(2),
            resize_when_reserved_above: None,
            resize_for: None,
            busy_timeout: Duration::from_secs(30),
            uploads: 8,
            process: 4,
            size: 150_000_000,
            echo: true,
            conn: Conn::Shared,
            retry: RetryPolicy {
                max_attempts: 20,
                default_backoff: Duration::from_millis(250),
                ..RetryPolicy::default()
            },
            scratch: crate::openssl::scratch_dir(),
        }
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Runs the scenario against a server the bench starts in its own cgroup.
pub async fn run(target: &Target, opts: &ResizeOptions) -> anyhow::Result<ResizeReport> {
    if !matches!(target, Target::Spawn(_)) {
        bail!(
            "resize changes the server's cgroup limit under it: it needs a server the bench \
             starts itself in a cgroup of its own (drop --addr)"
        );
    }
    let n = opts.uploads + opts.process;
    // One more payload for the fresh upload afterwards.
    let payloads = scenario::make_payloads(n + 1, opts.size).await?;
    let bodies: Vec<Bytes> = {
        let p: Vec<_> = payloads[opts.uploads..n].to_vec();
        tokio::task::spawn_blocking(move || p.iter().map(|p| p.contiguous()).collect()).await?
    };
    let mut running = target::start(target, Some(true)).await?;
    let limit_before = running.cgroup_limit().context("no cgroup")?;
    let origin = Instant::now();
    let timeline = Timeline::start(running.sources(), origin, timeline::INTERVAL);
    let mut latest = timeline.watch();
    timeline::wait_for(&mut latest, Duration::from_secs(10), |s| {
        s.guard.budget.is_some() && s.rss.is_some()
    })
    .await
    .context("the server's /metrics did not answer")?;
    let readiness = watch_readiness(&running.url, origin).await?;

    let shared = match opts.conn {
        Conn::Shared => Some(memgate::client::connect(&running.url).await?),
        Conn::PerCall => None,
    };
    // The server is gone once its RSS can no longer be read: stop retrying then.
    let gone: Arc<dyn Fn() -> bool + Send + Sync> = {
        let rx = timeline.watch();
        Arc::new(move || rx.borrow().rss.is_none())
    };
    let burst_start = origin.elapsed().as_secs_f64();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, shared, gone) = (running.url.clone(), shared.clone(), gone.clone());
        let payload = payloads[i].clone();
        let body = (i >= opts.uploads).then(|| bodies[i - opts.uploads].clone());
        let (retry, echo) = (opts.retry, opts.echo);
        tasks.push(tokio::spawn(async move {
            let channel = match shared {
                Some(c) => c,
                None => memgate::client::connect(&url).await?,
            };
            let (kind, attempts) = match body {
                None => (
                    Kind::Upload,
                    calls::upload(channel, &payload, &retry, origin, &*gone).await,
                ),
                Some(data) => {
                    let kind = if echo {
                        Kind::ProcessEcho
                    } else {
                        Kind::Process
                    };
                    let tries =
                        calls::process(channel, &payload, data, echo, &retry, origin, &*gone);
                    (kind, tries.await)
                }
            };
            anyhow::Ok(calls::Call {
                n: i,
                kind,
                digest: payload.digest,
                bytes: payload.size(),
                attempts,
            })
        }));
    }

    // The resize: at resize_at, or once the guard has reserved past the mark.
    let at = tokio::time::Instant::now() + opts.resize_at;
    if let Some(mark) = opts.resize_when_reserved_above {
        let wait = at.saturating_duration_since(tokio::time::Instant::now());
        timeline::wait_for(&mut latest, wait, |s| s.guard.reserved > Some(mark)).await;
    } else {
        tokio::time::sleep_until(at).await;
    }
    let lower = set_limit(&mut running, opts.resize_to, opts, origin, &latest).await?;
    let peak_reset = lower.applied_at.is_some() && running.reset_cgroup_peak();
    let raise = match (opts.resize_for, lower.applied_at) {
        (Some(d), Some(_)) => {
            tokio::time::sleep(d).await;
            Some(set_limit(&mut running, limit_before, opts, origin, &latest).await?)
        }
        _ => None,
    };

    let mut calls = Vec::new();
    for t in tasks {
        calls.push(t.await??);
    }
    let burst_end = origin.elapsed().as_secs_f64();
    let alive = running.exit_status().is_none();
    let ready_again_at = match alive {
        true => {
            readiness
                .serving_after(burst_end, READY_AGAIN_TIMEOUT)
                .await
        }
        false => None,
    };
    let (verified, fresh) = match alive {
        true => after_burst(&running, &calls, &payloads[n], opts, origin).await,
        false => (Vec::new(), Vec::new()),
    };
    let peak_usage_since_resize = if peak_reset {
        running.peak_usage()
    } else {
        None
    };
    let oom_kills = running.oom_kills();
    let exit = running.exit_status();
    let stderr_tail = if exit.is_some() {
        running.stderr_tail(30)
    } else {
        Vec::new()
    };
    let samples = timeline.finish();
    let mut report = ResizeReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: crate::report::Machine::this(),
        options: opts.clone(),
        cgroup_version: running.cgroup_version().map(|v| format!("{v:?}")),
        limit_before,
        lower,
        raise,
        burst_start,
        burst_end,
        calls,
        verified,
        fresh,
        readiness: readiness.changes(),
        ready_again_at,
        alive: exit.is_none(),
        exit,
        oom_kills,
        peak_usage_since_resize,
        figures: Default::default(),
        checks: Vec::new(),
        samples,
        stderr_tail,
    };
    report.analyse();
    Ok(report)
}

/// Asks for `to` until the kernel takes it or `busy_timeout` has passed.
async fn set_limit(
    running: &mut Running,
    to: u64,
    opts: &ResizeOptions,
    origin: Instant,
    latest: &tokio::sync::watch::Receiver<Sample>,
) -> anyhow::Result<Resize> {
    let now = *latest.borrow();
    let mut r = Resize {
        to,
        requested_at: origin.elapsed().as_secs_f64(),
        reserved_at_request: now.guard.reserved,
        budget_at_request: now.guard.budget,
        usage_at_request: now.usage,
        ..Resize::default()
    };
    let give_up = Instant::now() + opts.busy_timeout;
    loop {
        // A v1 write reclaims before it answers: off the async workers' hands.
        match tokio::task::block_in_place(|| running.set_cgroup_limit(to))? {
            Ok(applied) => {
                r.applied = Some(applied);
                r.applied_at = Some(origin.elapsed().as_secs_f64());
                return Ok(r);
            }
            Err(LimitError::Busy { usage }) if Instant::now() < give_up => {
                r.refused += 1;
                r.usage_when_refused = usage.or(r.usage_when_refused);
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Err(e) => {
                r.error = Some(e.to_string());
                return Ok(r);
            }
        }
    }
}

/// Reads back every uploaded blob (checked against its digest) and sends one
/// fresh upload: `(upload number, read-back attempts)` and the fresh upload's.
async fn after_burst(
    running: &Running,
    calls: &[calls::Call],
    fresh: &crate::payload::Payload,
    opts: &ResizeOptions,
    origin: Instant,
) -> (Vec<(usize, Vec<Outcome>)>, Vec<Outcome>) {
    let Ok(channel) = memgate::client::connect(&running.url).await else {
        return (Vec::new(), Vec::new());
    };
    let policy = opts.retry;
    let outcomes = |a: Vec<crate::calls::Attempt>| a.into_iter().map(|a| a.outcome).collect();
    let mut verified = Vec::new();
    for call in calls
        .iter()
        .filter(|c| c.kind == Kind::Upload && c.succeeded())
    {
        let digest = call.digest;
        let tries = crate::calls::with_retries(&policy, origin, None, || {
            crate::calls::download(channel.clone(), &digest, &opts.scratch)
        })
        .await;
        verified.push((call.n, outcomes(tries)));
    }
    let tries = crate::calls::with_retries(&policy, origin, None, || {
        crate::calls::upload(channel.clone(), fresh, policy.deadline)
    })
    .await;
    (verified, outcomes(tries))
}

/// Readiness (`readiness` in the health service) as the server reports it,
/// from its Watch stream: every change, timed.
struct Readiness {
    changes: Arc<Mutex<Vec<(f64, String)>>>,
    latest: tokio::sync::watch::Receiver<String>,
}

async fn watch_readiness(url: &str, origin: Instant) -> anyhow::Result<Readiness> {
    let channel = memgate::client::connect(url).await?;
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await?
        .into_inner();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let (tx, latest) = tokio::sync::watch::channel(String::new());
    let log = changes.clone();
    tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            let status = resp.status().as_str_name().to_string();
            log.lock()
                .expect("readiness log")
                .push((origin.elapsed().as_secs_f64(), status.clone()));
            tx.send_replace(status);
        }
        tx.send_replace("GONE".into());
    });
    Ok(Readiness { changes, latest })
}

impl Readiness {
    /// When readiness was (or became) SERVING at or after `t`, waiting at most `timeout`.
    async fn serving_after(&self, t: f64, timeout: Duration) -> Option<f64> {
        let mut rx = self.latest.clone();
        let ok = tokio::time::timeout(timeout, rx.wait_for(|s| s == "SERVING" || s == "GONE"))
            .await
            .ok()?
            .ok()?
            .clone();
        if ok != "SERVING" {
            return None;
        }
        let changes = self.changes();
        let became = changes.last().map_or(t, |(at, _)| *at);
        Some(became.max(t))
    }

    fn changes(&self) -> Vec<(f64, String)> {
        self.changes.lock().expect("readiness log").clone()
    }
}
