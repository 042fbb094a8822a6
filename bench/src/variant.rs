//! One run of a [`Plan`] against one server (guard on, guard off, or a server at
//! `--addr`): start it, sample its memory from the first moment, take 1 s of idle
//! readings, do the setup uploads, launch the calls, wait until 1 s after the last
//! one ended, stop it, and sum it all up.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::{
    calls::{self, Attempt, Kind, Outcome, RetryPolicy},
    openssl::Baseline,
    payload::Payload,
    report::{CallRecord, Measured, ServerInfo, Summary, median_rss},
    scenario::{Conn, Params, Plan},
    target::{self, Target},
    timeline::{self, Sample, Timeline},
};

/// Idle readings before the first call.
pub const IDLE: Duration = Duration::from_secs(1);
/// "RSS 1 s after the last call".
pub const AFTER: Duration = Duration::from_secs(1);
/// Bound on waiting for a sample that should come within 50 ms.
const SAMPLE_WAIT: Duration = Duration::from_secs(10);

/// What one variant did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantReport {
    pub label: String,
    pub server: ServerInfo,
    /// When the first call started and the last ended (seconds since the server started).
    pub load_start: f64,
    pub load_end: f64,
    pub summary: Summary,
    pub calls: Vec<CallRecord>,
    pub samples: Vec<Sample>,
    /// The last lines of a spawned server's stderr, when it did not survive.
    pub stderr_tail: Vec<String>,
}

/// Runs `plan` once against a server from `target` with the guard as `guard` says.
pub async fn run(
    label: &str,
    target: &Target,
    guard: Option<bool>,
    plan: &Plan,
    payloads: &[Payload],
    params: &Params,
    openssl: Option<&Baseline>,
) -> anyhow::Result<VariantReport> {
    let setup = Setup {
        guard,
        env: Vec::new(),
    };
    run_with(label, target, &setup, plan, payloads, params, openssl).await
}

/// How a spawned server is set up for one variant of a comparison.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// `[memory] enabled`; `None` for a server we did not start.
    pub guard: Option<bool>,
    /// More `MEMGATE__*` overrides (`MEMGATE__PROFILING__ENABLED`, ...).
    pub env: Vec<(String, String)>,
}

/// [`run`] with a server set up as `setup` says.
pub async fn run_with(
    label: &str,
    target: &Target,
    setup: &Setup,
    plan: &Plan,
    payloads: &[Payload],
    params: &Params,
    openssl: Option<&Baseline>,
) -> anyhow::Result<VariantReport> {
    let mut running = target::start_with_env(target, setup.guard, &setup.env).await?;
    let origin = Instant::now();
    let timeline = Timeline::start(running.sources(), origin, timeline::INTERVAL);
    let mut watch = timeline.watch();
    timeline::wait_for(&mut watch, SAMPLE_WAIT, |s| s.t >= IDLE.as_secs_f64())
        .await
        .context("the sampler stopped")?;

    let shared = match params.conn {
        Conn::Shared => Some(memgate::client::connect(&running.url).await?),
        Conn::PerCall => None,
    };
    for &i in &plan.setup {
        let channel = match &shared {
            Some(c) => c.clone(),
            None => memgate::client::connect(&running.url).await?,
        };
        let p = &payloads[i];
        let attempts = calls::with_retries(&params.retry, origin, None, || {
            calls::upload(channel.clone(), p, params.retry.deadline)
        })
        .await;
        if let Some(last) = attempts.last().filter(|a| a.outcome != Outcome::Ok) {
            bail!("setup upload of payload {i} failed: {:?}", last.outcome);
        }
    }
    let mut data = HashMap::new();
    for &(kind, i) in &plan.calls {
        if matches!(kind, Kind::Process | Kind::ProcessEcho) {
            let p = payloads[i].clone();
            data.insert(
                i,
                tokio::task::spawn_blocking(move || p.contiguous()).await?,
            );
        }
    }
    let launch = Launch {
        url: running.url.clone(),
        shared,
        policy: params.retry,
        origin,
        scratch: params.scratch.clone(),
    };
    // The capacity run: calls paced so that their reservations fit the budget.
    let fit = match plan.fit_budget {
        false => None,
        true => {
            let budget = watch
                .borrow()
                .guard
                .budget
                .context("pacing calls to the budget needs the guard's budget from /metrics")?;
            Some(crate::capacity::Fit::new(budget))
        }
    };
    let calls = launch.all(plan, payloads, &data, fit.as_ref()).await;
    drop(data);

    let load_start = calls.iter().map(|c| c.start).fold(f64::INFINITY, f64::min);
    let load_end = calls.iter().map(|c| c.end).fold(0.0, f64::max);
    let after = timeline::wait_for(&mut watch, SAMPLE_WAIT, |s| {
        s.t >= load_end + AFTER.as_secs_f64()
    })
    .await;
    let hwm = running.peak_rss();
    let samples = timeline.finish();
    let exit_status = running.exit_status();
    let summary = Summary::compute(&Measured {
        calls: &calls,
        samples: &samples,
        idle_rss: median_rss(&samples, 0.0, IDLE.as_secs_f64()),
        after,
        hwm,
        peak_cgroup_usage: running.peak_usage(),
        oom_kills: running.oom_kills().or_else(|| {
            let first = samples.iter().find_map(|s| s.oom_kills)?;
            Some(samples.iter().rev().find_map(|s| s.oom_kills)? - first)
        }),
        openssl,
    });
    let budget = samples.iter().rev().find_map(|s| s.guard.budget);
    let guard_seen = samples.iter().rev().find_map(|s| s.guard.guard_enabled);
    let alive_after = exit_status.is_none();
    Ok(VariantReport {
        label: label.to_string(),
        server: ServerInfo {
            url: running.url.clone(),
            pid: running.pid,
            guard: running.guard.or(guard_seen),
            cgroup: running.cgroup_path().map(|p| p.display().to_string()),
            cgroup_limit: running.cgroup_limit(),
            budget,
            alive_after,
            exit_status,
        },
        load_start: if calls.is_empty() { 0.0 } else { load_start },
        load_end,
        summary,
        calls,
        samples,
        stderr_tail: if alive_after {
            Vec::new()
        } else {
            running.stderr_tail(20)
        },
    })
}

/// What every call task needs.
#[derive(Clone)]
pub struct Launch {
    pub url: String,
    pub shared: Option<Channel>,
    pub policy: RetryPolicy,
    pub origin: Instant,
    pub scratch: PathBuf,
}

impl Launch {
    /// Launches every call of `plan` in order, at most `plan.concurrency` at once
    /// (and, with `fit`, only while their reservations fit the budget), and
    /// waits for all of them.
    async fn all(
        &self,
        plan: &Plan,
        payloads: &[Payload],
        data: &HashMap<usize, Bytes>,
        fit: Option<&crate::capacity::Fit>,
    ) -> Vec<CallRecord> {
        let slots = Arc::new(Semaphore::new(plan.concurrency));
        let mut tasks = Vec::new();
        for (n, &(kind, i)) in plan.calls.iter().enumerate() {
            let (launch, slots) = (self.clone(), slots.clone());
            let (payload, data) = (payloads[i].clone(), data.get(&i).cloned());
            // Taken here, in launch order, so that pacing keeps the plan's order.
            let room = match fit {
                Some(f) => Some(
                    f.admit(crate::capacity::reservation(kind, payload.size()))
                        .await,
                ),
                None => None,
            };
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.expect("never closed");
                let record = launch.call(n, kind, &payload, data, None).await;
                drop(room);
                record
            }));
        }
        let mut calls = Vec::new();
        for task in tasks {
            calls.push(task.await.expect("call task"));
        }
        calls
    }

    /// One call with its retries (none after `stop_retrying_at`).
    pub async fn call(
        &self,
        n: usize,
        kind: Kind,
        payload: &Payload,
        data: Option<Bytes>,
        stop_retrying_at: Option<Instant>,
    ) -> CallRecord {
        let start = self.origin.elapsed().as_secs_f64();
        let channel = match &self.shared {
            Some(c) => Ok(c.clone()),
            None => memgate::client::connect(&self.url).await,
        };
        let attempts = match channel {
            Err(e) => vec![Attempt {
                start,
                seconds: self.origin.elapsed().as_secs_f64() - start,
                outcome: Outcome::Failed {
                    code: "UNAVAILABLE".into(),
                    message: format!("{e:#}"),
                },
            }],
            Ok(ch) => {
                let deadline = self.policy.deadline;
                calls::with_retries(&self.policy, self.origin, stop_retrying_at, || {
                    let ch = ch.clone();
                    let data = data.clone();
                    async move {
                        match kind {
                            Kind::Upload => calls::upload(ch, payload, deadline).await,
                            Kind::Process | Kind::ProcessEcho => {
                                let data = data.unwrap_or_else(|| payload.contiguous());
                                let echo = kind == Kind::ProcessEcho;
                                calls::process(ch, data, &payload.digest, echo).await
                            }
                            Kind::Download => {
                                calls::download(ch, &payload.digest, &self.scratch).await
                            }
                        }
                    }
                })
                .await
            }
        };
        CallRecord {
            n,
            kind,
            bytes: payload.size(),
            start,
            end: self.origin.elapsed().as_secs_f64(),
            attempts,
        }
    }
}
