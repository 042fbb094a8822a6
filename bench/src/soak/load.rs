//! Running a soak: the workers, the bursts and the idle readings between them.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::sync::watch;

use super::{Burst, IdleReading, SoakOptions, SoakReport, Workers};
use crate::{
    calls::{Kind, Outcome},
    payload::Payload,
    report::{CallRecord, Machine, ServerInfo},
    scenario::{Conn, make_payloads},
    stats::median,
    target::{self, BlobRemover, Running, Target},
    timeline::{self, Sample, Timeline},
    variant::Launch,
};

/// Bound on waiting for a sample that should come within 50 ms.
const SAMPLE_WAIT: Duration = Duration::from_secs(10);
/// An idle reading is the median over this much of the end of an idle period.
const READING: Duration = Duration::from_secs(1);

/// Runs a soak against a server from `target` (guard as configured: on, for a
/// server the bench starts). Call from a task on a thread that outlives the
/// server (see [`target::start`]).
pub async fn run(target: &Target, opts: &SoakOptions) -> anyhow::Result<SoakReport> {
    let mut running = target::start(target, spawned(target)).await?;
    let origin = Instant::now();
    let timeline = Timeline::start(running.sources(), origin, timeline::INTERVAL);
    let mut watch = timeline.watch();
    // The baseline: the idle server before any call.
    let early = collect_until(&mut watch, READING.as_secs_f64()).await;
    let baseline = reading_of(&early, READING.as_secs_f64());
    let first = timeline::wait_for(&mut watch, SAMPLE_WAIT, |s| s.guard.budget.is_some())
        .await
        .context("no /metrics reading with a budget (is the admin address right?)")?;
    let budget = first.guard.budget.context("no budget on /metrics")?;

    let workers = plan_workers(opts, budget);
    let setup_count = opts.download_workers.max(1);
    let payloads = make_payloads(setup_count + opts.upload_payloads, opts.size).await?;
    let (downloads, uploads) = payloads.split_at(setup_count);
    let process_data = {
        let p = downloads[0].clone();
        tokio::task::spawn_blocking(move || p.contiguous()).await?
    };
    let remover = running.blob_remover()?;
    let launch = Launch {
        url: running.url.clone(),
        shared: match opts.conn {
            Conn::Shared => Some(memgate::client::connect(&running.url).await?),
            Conn::PerCall => None,
        },
        policy: opts.retry,
        origin,
        scratch: opts.scratch.clone(),
    };
    for (i, p) in downloads.iter().enumerate() {
        let call = launch.call(i, Kind::Upload, p, None, None).await;
        if !call.succeeded() {
            bail!("setup upload {i} failed: {:?}", call.attempts.last());
        }
    }

    let mut bursts = Vec::new();
    let soak_start = Instant::now();
    while soak_start.elapsed() < opts.duration {
        let mut burst = burst(
            &launch,
            &remover,
            &workers,
            opts,
            downloads,
            uploads,
            &process_data,
        )
        .await?;
        let (zero_at, reading) = idle_reading(&mut watch, opts).await;
        burst.reserved_zero_at = zero_at;
        burst.reading = reading;
        eprintln!(
            "soak: burst {} ({:.0}-{:.0} s): {} calls, OK {:?}; idle RSS {}",
            bursts.len() + 1,
            burst.start,
            burst.end,
            burst.calls,
            burst.ok,
            crate::report::fmt_mib(reading.map(|r| r.rss)),
        );
        bursts.push(burst);
        if running.exit_status().is_some() {
            break;
        }
    }
    drop(launch);
    let samples = timeline.finish();
    let exit_status = running.exit_status();
    let mut report = SoakReport {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::this(),
        options: opts.clone(),
        server: server_info(&running, budget, exit_status),
        limit: running.cgroup_limit().or(first.guard.limit),
        workers,
        seconds: 0.0,
        baseline,
        bursts,
        oom_kills: running.oom_kills(),
        max_over_baseline: None,
        trend: None,
        slope_mib_per_hour: None,
        fitted_growth_mib: None,
        status_counts: BTreeMap::new(),
        ok: BTreeMap::new(),
        checks: Vec::new(),
        samples,
        stderr_tail: running.stderr_tail(20),
    };
    report.analyse();
    Ok(report)
}

/// The guard setting to ask for: on for a server we start, none for one at `--addr`.
fn spawned(target: &Target) -> Option<bool> {
    matches!(target, Target::Spawn(_)).then_some(true)
}

fn server_info(running: &Running, budget: u64, exit_status: Option<String>) -> ServerInfo {
    ServerInfo {
        url: running.url.clone(),
        pid: running.pid,
        guard: running.guard,
        cgroup: running.cgroup_path().map(|p| p.display().to_string()),
        cgroup_limit: running.cgroup_limit(),
        budget: Some(budget),
        alive_after: exit_status.is_none(),
        exit_status,
    }
}

/// How many workers of each kind offer `load_factor` x `budget`, by the
/// reservations memgate's own method table makes for each call.
pub fn plan_workers(opts: &SoakOptions, budget: u64) -> Workers {
    use crate::{calls::Kind, capacity::reservation};
    let reserve = |kind: Kind| reservation(kind, opts.size);
    let write = reserve(Kind::Upload).max(1);
    let read = reserve(Kind::Download);
    let process: u64 = (0..opts.process_workers)
        .map(|i| {
            reserve(if i % 2 == 0 {
                Kind::ProcessEcho
            } else {
                Kind::Process
            })
        })
        .sum();
    let fixed = process + read * opts.download_workers as u64;
    let target = (opts.load_factor * budget as f64) as u64;
    let uploads = opts
        .upload_workers
        .unwrap_or_else(|| target.saturating_sub(fixed).div_ceil(write).max(1) as usize);
    let offered = fixed + write * uploads as u64;
    Workers {
        uploads,
        downloads: opts.download_workers,
        process: opts.process_workers,
        offered_bytes: offered,
        offered_ratio: offered as f64 / budget.max(1) as f64,
    }
}

/// One burst: every worker loops until `opts.burst` has passed; an upload
/// worker removes each blob it stored at once.
async fn burst(
    launch: &Launch,
    remover: &BlobRemover,
    workers: &Workers,
    opts: &SoakOptions,
    downloads: &[Payload],
    uploads: &[Payload],
    process_data: &Bytes,
) -> anyhow::Result<Burst> {
    let start = launch.origin.elapsed().as_secs_f64();
    let end = Instant::now() + opts.burst;
    let next_upload = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let kinds = (0..workers.uploads)
        .map(|_| Kind::Upload)
        .chain((0..workers.downloads).map(|_| Kind::Download))
        .chain((0..workers.process).map(|i| {
            if i % 2 == 0 {
                Kind::ProcessEcho
            } else {
                Kind::Process
            }
        }));
    for (w, kind) in kinds.enumerate() {
        let (launch, remover) = (launch.clone(), remover.clone());
        let (downloads, uploads) = (downloads.to_vec(), uploads.to_vec());
        let next_upload = next_upload.clone();
        let data = process_data.clone();
        tasks.push(tokio::spawn(async move {
            let mut records = Vec::new();
            // Bounded: each call takes time, and none starts after `end`.
            while Instant::now() < end {
                let (payload, data) = match kind {
                    Kind::Upload => {
                        let i = next_upload.fetch_add(1, Ordering::Relaxed) % uploads.len();
                        (&uploads[i], None)
                    }
                    Kind::Download => (&downloads[w % downloads.len()], None),
                    Kind::Process | Kind::ProcessEcho => (&downloads[0], Some(data.clone())),
                };
                let record = launch
                    .call(records.len(), kind, payload, data, Some(end))
                    .await;
                if kind == Kind::Upload && record.succeeded() {
                    remover
                        .remove(&payload.digest.hex())
                        .await
                        .with_context(|| {
                            format!("removing blob {} after its upload", payload.digest)
                        })?;
                }
                records.push(record);
            }
            anyhow::Ok(records)
        }));
    }
    let mut b = Burst {
        start,
        ..Burst::default()
    };
    for task in tasks {
        for record in task.await.expect("worker task")? {
            tally(&mut b, &record);
        }
    }
    b.end = launch.origin.elapsed().as_secs_f64();
    Ok(b)
}

/// Distinct failure texts kept per burst.
const FAILURES_KEPT: usize = 5;

fn tally(b: &mut Burst, call: &CallRecord) {
    b.calls += 1;
    if call.succeeded() {
        *b.ok.entry(call.kind.as_str()).or_insert(0) += 1;
    }
    for a in &call.attempts {
        *b.status_counts.entry(a.outcome.code()).or_insert(0) += 1;
        let what = match &a.outcome {
            Outcome::Failed { code, message } => {
                format!("{} {code}: {message}", call.kind.as_str())
            }
            o if !o.acceptable() => format!("{} {o:?}", call.kind.as_str()),
            _ => continue,
        };
        if b.failures.contains_key(&what) || b.failures.len() < FAILURES_KEPT {
            *b.failures.entry(what).or_insert(0) += 1;
        }
    }
}

/// Waits for reserved bytes to reach 0 (at most `max_idle_wait`), then `idle`
/// more; the time reserved was first seen at 0, and the reading.
async fn idle_reading(
    watch: &mut watch::Receiver<Sample>,
    opts: &SoakOptions,
) -> (Option<f64>, Option<IdleReading>) {
    let zero = timeline::wait_for(watch, opts.max_idle_wait, |s| s.guard.reserved == Some(0))
        .await
        .map(|s| s.t);
    let from = zero.unwrap_or_else(|| watch.borrow().t);
    let until = from + opts.idle.as_secs_f64();
    let window = collect_until(watch, until).await;
    (zero, reading_of(&window, until))
}

/// The median RSS of `samples` over the [`READING`] before `until`, with the
/// reserved bytes and working set of the last of them.
fn reading_of(samples: &[Sample], until: f64) -> Option<IdleReading> {
    let last = samples.last()?;
    let rss: Vec<f64> = samples
        .iter()
        .filter(|s| s.t >= until - READING.as_secs_f64())
        .filter_map(|s| s.rss.map(|r| r as f64))
        .collect();
    Some(IdleReading {
        t: last.t,
        rss: median(&rss)? as u64,
        reserved: last.guard.reserved,
        working_set: last.working_set,
    })
}

/// Every sample from now until one at or past `until` seconds (bounded by the
/// sampler's own pace: it stops if no sample comes for [`SAMPLE_WAIT`]).
async fn collect_until(watch: &mut watch::Receiver<Sample>, until: f64) -> Vec<Sample> {
    let mut samples = vec![*watch.borrow_and_update()];
    while samples.last().is_some_and(|s| s.t < until) {
        match tokio::time::timeout(SAMPLE_WAIT, watch.changed()).await {
            Ok(Ok(())) => samples.push(*watch.borrow_and_update()),
            _ => break,
        }
    }
    samples
}
