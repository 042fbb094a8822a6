//! The memory guard's acceptance test: the real binary in a 512 MiB memory cgroup,
//! hit at once by 16 concurrent 150 MB ByteStream uploads and 8 concurrent 150 MB
//! Process calls (half with echo). Two variants, each a test against a fresh
//! server in a fresh cgroup: `shared_connection` (every call on one Channel, one
//! HTTP/2 connection) and `connection_per_call`. A machine-wide lock keeps them
//! from running at the same time, under cargo test and nextest alike.
//!
//! With the guard on (the default `[memory]`, its limit discovered from the
//! cgroup) the kernel must OOM-kill nothing, the server must still run, every
//! attempt must end OK or RESOURCE_EXHAUSTED (never UNAVAILABLE, a reset or a
//! missed deadline), every OK answer must be right, something of each kind must
//! succeed, and a new upload must be admitted afterwards. Clients retry
//! RESOURCE_EXHAUSTED a bounded number of times, honouring `grpc-retry-pushback-ms`,
//! so the table shows the overload being worked off. The calls, their retries and
//! the payloads come from the bench crate (`memgate_bench::{calls, payload}`), the
//! code `memgate-bench mixed-overload` drives the same storm with.
//!
//! The ignored test `guard_off` runs the same storm with `enabled = false` and only
//! reports: `bench/oom_guard_off.sh` runs it to show the kill the guard prevents.
//!
//! Needs root and a writable memory controller; elsewhere it prints `skipped:
//! <reason>` and passes, and `MEMGATE_REQUIRE_CGROUP=1` turns that into a failure.
//! Run with the table shown:
//!
//! ```text
//! MEMGATE_REQUIRE_CGROUP=1 cargo test --test oom_torture -- --nocapture
//! ```

#[path = "support_cgroup/mod.rs"]
mod support_cgroup;

use std::{
    fmt::Write as _,
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use memgate_bench::{
    calls::{self, Outcome, RetryPolicy},
    payload::{self, Payload, Pool},
};
use tokio::sync::Barrier;
use tonic::transport::{Channel, Endpoint};

use support_cgroup::{MachineLock, Peaks, require_cgroup, spawn_memgate_in};

const MIB: u64 = 1 << 20;
/// Three 150 MB payloads do not fit: the server must say no to most of the storm.
const CGROUP_LIMIT: u64 = 512 * MIB;
const PAYLOAD: u64 = 150_000_000;
const UPLOADS: usize = 16;
const PROCESS_CALLS: usize = 8;
/// Sent as `grpc-timeout` with every attempt.
const DEADLINE: Duration = Duration::from_secs(120);
/// The client stops waiting this long after the deadline the server was given.
const CLIENT_GRACE: Duration = Duration::from_secs(10);
/// Often enough to catch a 150 MB spike building up.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(25);
/// Attempts per call, the first included.
const MAX_ATTEMPTS: usize = 10;
/// Backoff base when a RESOURCE_EXHAUSTED carries no pushback.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);
/// A pushback beyond this is clamped, so a wrong one cannot stall the test.
const MAX_PUSHBACK: Duration = Duration::from_secs(30);
const RETRIES: RetryPolicy = RetryPolicy {
    max_attempts: MAX_ATTEMPTS,
    default_backoff: DEFAULT_BACKOFF,
    max_pushback: MAX_PUSHBACK,
    deadline: DEADLINE,
    client_grace: CLIENT_GRACE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_connection() {
    let _machine = MachineLock::acquire("cgroup-torture");
    if let Some(report) = run(Conn::Shared, true).await {
        report.assert_guarded();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_per_call() {
    let _machine = MachineLock::acquire("cgroup-torture");
    if let Some(report) = run(Conn::PerCall, true).await {
        report.assert_guarded();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a demonstration, not a test: run by bench/oom_guard_off.sh"]
async fn guard_off() {
    let _machine = MachineLock::acquire("cgroup-torture");
    for conn in [Conn::Shared, Conn::PerCall] {
        run(conn, false).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Conn {
    /// Every call on one Channel: one HTTP/2 connection.
    Shared,
    /// A Channel (connection) per call, kept across its retries.
    PerCall,
}

/// One variant against a fresh server in a fresh cgroup; `None` when skipped.
async fn run(conn: Conn, guard: bool) -> Option<Report> {
    let cg = require_cgroup("memgate-torture", CGROUP_LIMIT)?;
    let started = Instant::now();
    // On the normal disk: tmpfs pages would be charged to the cgroup as memory.
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("data dir");
    let config = format!("[log]\nlevel = \"info\"\n\n[memory]\nenabled = {guard}\n");
    let mut server = spawn_memgate_in(&cg, &config, data.path());
    let url = server.url();
    let sampler = cg.sample_every(SAMPLE_INTERVAL);
    tokio::task::spawn_blocking(blobs)
        .await
        .expect("payload digests");

    let calls = storm(&url, conn).await;
    // From the barrier to the last answer.
    let storm_time = calls.iter().map(|c| c.elapsed).max().unwrap_or_default();

    let mut readbacks = Vec::new();
    let mut fresh = Vec::new();
    let after = if server.is_alive() {
        Some(connect(&url).await)
    } else {
        None
    };
    if let Some(Err(e)) = &after {
        fresh.push(Outcome::Failed {
            code: "UNAVAILABLE".into(),
            message: format!("connect after the storm: {e}"),
        });
    }
    if let Some(Ok(channel)) = after {
        for call in calls
            .iter()
            .filter(|c| c.kind == Kind::Upload && c.succeeded())
        {
            let blob = &blobs()[call.n];
            let scratch = memgate_bench::openssl::scratch_dir();
            readbacks.push((
                call.n,
                with_retries(|| calls::download(channel.clone(), &blob.digest, &scratch)).await,
            ));
        }
        // A payload nobody sent before: the server must admit new work.
        let blob = &blobs()[UPLOADS + PROCESS_CALLS];
        fresh = with_retries(|| calls::upload(channel.clone(), blob, DEADLINE)).await;
    }
    let sampled = sampler.finish();
    let report = Report {
        conn,
        guard,
        calls,
        readbacks,
        fresh,
        oom_kills: cg.oom_kills().expect("read the OOM-kill count"),
        peak: cg.peak_usage().expect("read the peak usage"),
        sampled,
        server_hwm: server.peak_rss(),
        alive: server.is_alive(),
        exit: server.try_wait().map(|s| s.to_string()),
        stderr: server.stderr_so_far(),
        storm_time,
        total_time: started.elapsed(),
    };
    drop(server);
    drop(cg);
    report.print();
    Some(report)
}

// ---------------------------------------------------------------- the storm

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Upload,
    Process,
    ProcessEcho,
}

/// What went wrong in an attempt, for the details section of the report.
fn detail(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Ok | Outcome::Exhausted { .. } => None,
        Outcome::Failed { code, message } => Some(format!("{code}: {message}")),
        Outcome::TimedOut => Some(format!("no answer within {:?}", DEADLINE + CLIENT_GRACE)),
        Outcome::Wrong { what } => Some(format!("wrong answer: {what}")),
    }
}

/// An attempt in the table: `OK`, `RE(1500ms)`, `UNAVAILABLE`...
fn short(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Exhausted {
            pushback_ms: Some(ms),
        } => format!("RE({ms}ms)"),
        Outcome::Exhausted { pushback_ms: None } => "RE".into(),
        Outcome::Wrong { .. } => "WRONG".into(),
        other => other.code(),
    }
}

/// One call of the storm and all its attempts.
struct Call {
    kind: Kind,
    /// Index into [`blobs`].
    n: usize,
    attempts: Vec<Outcome>,
    elapsed: Duration,
}

impl Call {
    fn succeeded(&self) -> bool {
        matches!(self.attempts.last(), Some(Outcome::Ok))
    }

    fn name(&self) -> String {
        match self.kind {
            Kind::Upload => format!("upload#{:02}", self.n),
            Kind::Process => format!("process#{:02}", self.n - UPLOADS),
            Kind::ProcessEcho => format!("process#{:02}+echo", self.n - UPLOADS),
        }
    }
}

/// Fires every call at once (behind a barrier) and waits for all of them.
async fn storm(url: &str, conn: Conn) -> Vec<Call> {
    let shared = match conn {
        Conn::Shared => Some(connect(url).await.expect("connect")),
        Conn::PerCall => None,
    };
    let barrier = Arc::new(Barrier::new(UPLOADS + PROCESS_CALLS));
    let mut tasks = Vec::new();
    for n in 0..UPLOADS + PROCESS_CALLS {
        let (url, shared, barrier) = (url.to_string(), shared.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let kind = match n {
                _ if n < UPLOADS => Kind::Upload,
                _ if n % 2 == 0 => Kind::ProcessEcho,
                _ => Kind::Process,
            };
            let blob = &blobs()[n];
            let payload = match kind {
                Kind::Upload => None,
                _ => Some(
                    tokio::task::spawn_blocking(move || blob.contiguous())
                        .await
                        .expect("payload"),
                ),
            };
            let channel = match shared {
                Some(c) => Ok(c),
                None => connect(&url).await,
            };
            barrier.wait().await;
            let started = Instant::now();
            let attempts = match (channel, payload) {
                (Err(e), _) => vec![Outcome::Failed {
                    code: "UNAVAILABLE".into(),
                    message: format!("connect: {e}"),
                }],
                (Ok(ch), None) => with_retries(|| calls::upload(ch.clone(), blob, DEADLINE)).await,
                (Ok(ch), Some(data)) => {
                    let echo = kind == Kind::ProcessEcho;
                    with_retries(|| calls::process(ch.clone(), data.clone(), &blob.digest, echo))
                        .await
                }
            };
            Call {
                kind,
                n,
                attempts,
                elapsed: started.elapsed(),
            }
        }));
    }
    let mut calls = Vec::new();
    for task in tasks {
        calls.push(task.await.expect("call task"));
    }
    calls
}

/// Runs `attempt` with memgate-bench's retries (RESOURCE_EXHAUSTED only, after
/// the pushback, at most [`MAX_ATTEMPTS`]); every attempt's outcome.
async fn with_retries<F, Fut>(attempt: F) -> Vec<Outcome>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    calls::with_retries(&RETRIES, Instant::now(), None, attempt)
        .await
        .into_iter()
        .map(|a| a.outcome)
        .collect()
}

async fn connect(url: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

// ---------------------------------------------------------------- payloads

/// Every payload the test sends: the storm's, then one more for afterwards.
/// Distinct rotations of one random 160 MiB pool: they cost no generation time
/// during the storm, and the test process holds the pool once.
fn blobs() -> &'static [Payload] {
    static BLOBS: OnceLock<Vec<Payload>> = OnceLock::new();
    BLOBS.get_or_init(|| {
        let pool = Pool::random().expect("read /dev/urandom");
        payload::make(&pool, 0, UPLOADS + PROCESS_CALLS + 1, PAYLOAD)
    })
}

// ---------------------------------------------------------------- the report

struct Report {
    conn: Conn,
    guard: bool,
    calls: Vec<Call>,
    /// (blob index, attempts) of every upload that succeeded.
    readbacks: Vec<(usize, Vec<Outcome>)>,
    /// Attempts of the upload sent after the storm; empty if the server was gone.
    fresh: Vec<Outcome>,
    oom_kills: u64,
    /// The cgroup's own high-water mark, page cache included.
    peak: Option<u64>,
    sampled: Peaks,
    /// The server's peak RSS (`VmHWM`); `None` once it is gone.
    server_hwm: Option<u64>,
    alive: bool,
    exit: Option<String>,
    stderr: String,
    storm_time: Duration,
    total_time: Duration,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

impl Report {
    fn print(&self) {
        let guard = if self.guard { "on" } else { "off" };
        let mut out = format!(
            "\n== oom_torture: {:?} connection(s), guard {guard} ==\n",
            self.conn
        );
        let _ = writeln!(out, "{:<18} {:>8} {:>9}  attempts", "call", "final", "time");
        for call in &self.calls {
            let history: Vec<_> = call.attempts.iter().map(short).collect();
            let last = call.attempts.last().map(short).unwrap_or_default();
            let last = last.split('(').next().unwrap_or_default().to_string();
            let _ = writeln!(
                out,
                "{:<18} {last:>8} {:>8.1}s  {}",
                call.name(),
                call.elapsed.as_secs_f64(),
                history.join(" ")
            );
        }
        let mut details: Vec<(String, usize)> = Vec::new();
        let all = self.calls.iter().flat_map(|c| &c.attempts);
        let later = self
            .readbacks
            .iter()
            .flat_map(|(_, a)| a)
            .chain(&self.fresh);
        for detail in all.chain(later).filter_map(detail) {
            match details.iter_mut().find(|(d, _)| *d == detail) {
                Some((_, n)) => *n += 1,
                None => details.push((detail, 1)),
            }
        }
        for (detail, n) in details.iter().take(10) {
            let _ = writeln!(out, "  {n:>3} x {detail}");
        }
        let count = |f: &dyn Fn(&Call) -> bool| self.calls.iter().filter(|c| f(c)).count();
        let ok = count(&|c| c.succeeded());
        let ok_retried = count(&|c| c.succeeded() && c.attempts.len() > 1);
        let exhausted = count(&|c| matches!(c.attempts.last(), Some(Outcome::Exhausted { .. })));
        let attempts: usize = self.calls.iter().map(|c| c.attempts.len()).sum();
        let bad: usize = self
            .calls
            .iter()
            .flat_map(|c| &c.attempts)
            .filter(|o| !o.acceptable())
            .count();
        let readback_ok = self
            .readbacks
            .iter()
            .filter(|(_, a)| matches!(a.last(), Some(Outcome::Ok)))
            .count();
        let fresh = match self.fresh.last() {
            Some(last) => format!("{} after {} attempt(s)", short(last), self.fresh.len()),
            None => "not tried (server gone)".into(),
        };
        let peak = self.peak.map(mib).unwrap_or_else(|| "n/a".into());
        let hwm = self
            .server_hwm
            .map(mib)
            .unwrap_or_else(|| "n/a (exited)".into());
        let _ = writeln!(
            out,
            "calls: {ok}/{} OK ({ok_retried} of them after retries), {exhausted} gave up on \
             RESOURCE_EXHAUSTED; {attempts} attempts, {bad} neither OK nor RESOURCE_EXHAUSTED",
            self.calls.len()
        );
        let _ = writeln!(
            out,
            "readback: {readback_ok}/{} OK; fresh upload afterwards: {fresh}",
            self.readbacks.len(),
        );
        let _ = writeln!(
            out,
            "cgroup: oom_kill {}, peak usage {peak} of {} (page cache included); server {}; \
             storm {:.1}s, variant {:.1}s",
            self.oom_kills,
            mib(CGROUP_LIMIT),
            match (&self.exit, self.alive) {
                (_, true) => "alive".to_string(),
                (Some(status), false) => format!("dead ({status})"),
                (None, false) => "dead".to_string(),
            },
            self.storm_time.as_secs_f64(),
            self.total_time.as_secs_f64()
        );
        let s = &self.sampled;
        let _ = writeln!(
            out,
            "peaks sampled every {SAMPLE_INTERVAL:?} ({} samples): anon {}, working set {}, \
             page cache {}, dirty+writeback {}; server VmHWM {hwm}",
            s.samples,
            mib(s.anon),
            mib(s.working_set),
            mib(s.file),
            mib(s.dirty),
        );
        let _ = writeln!(
            out,
            "RESULT conn={:?} guard={guard} oom_kill={} alive={} ok={ok} ok_after_retry={ok_retried} \
             resource_exhausted={exhausted} bad_attempts={bad} peak_bytes={} peak_anon_bytes={} \
             server_hwm_bytes={}",
            self.conn,
            self.oom_kills,
            self.alive,
            self.peak.unwrap_or(0),
            self.sampled.anon,
            self.server_hwm.unwrap_or(0),
        );
        eprint!("{out}");
    }

    /// The guard's promises; every broken one is listed before failing.
    fn assert_guarded(&self) {
        let mut broken = Vec::new();
        if self.oom_kills != 0 {
            broken.push(format!(
                "the kernel OOM-killed {} process(es) in the cgroup",
                self.oom_kills
            ));
        }
        if !self.alive {
            broken.push(format!(
                "memgate is not running after the storm ({:?})",
                self.exit
            ));
        }
        for call in &self.calls {
            for (i, outcome) in call.attempts.iter().enumerate() {
                if !outcome.acceptable() {
                    broken.push(format!("{} attempt {}: {outcome:?}", call.name(), i + 1));
                }
            }
        }
        for kind in [Kind::Upload, Kind::Process] {
            let same = |k: Kind| k == kind || (kind == Kind::Process && k == Kind::ProcessEcho);
            if !self.calls.iter().any(|c| same(c.kind) && c.succeeded()) {
                broken.push(format!("no {kind:?} call succeeded, even after retries"));
            }
        }
        for (n, attempts) in &self.readbacks {
            if !matches!(attempts.last(), Some(Outcome::Ok)) {
                broken.push(format!("reading back upload#{n:02}: {attempts:?}"));
            }
        }
        if self.alive && !matches!(self.fresh.last(), Some(Outcome::Ok)) {
            broken.push(format!(
                "a new upload after the storm was not admitted: {:?}",
                self.fresh
            ));
        }
        if broken.is_empty() {
            return;
        }
        let shown = broken.len().min(20);
        let tail: Vec<_> = self.stderr.lines().rev().take(20).collect();
        panic!(
            "the memory guard broke {} promise(s) ({:?} connections):\n  {}{}\nlast lines of \
             memgate's stderr:\n{}",
            broken.len(),
            self.conn,
            broken[..shown].join("\n  "),
            if shown < broken.len() { "\n  ..." } else { "" },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}
