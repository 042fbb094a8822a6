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
//! so the table shows the overload being worked off.
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

use bytes::{Bytes, BytesMut};
use memgate::proto::{
    bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient},
    memgate_v1::{ProcessRequest, payload_client::PayloadClient},
};
use sha2::{Digest as _, Sha256};
use tokio::sync::Barrier;
use tonic::{
    Code, Request, Status,
    transport::{Channel, Endpoint},
};

use support_cgroup::{MachineLock, Peaks, require_cgroup, spawn_memgate_in};

const MIB: u64 = 1 << 20;
/// Three 150 MB payloads do not fit: the server must say no to most of the storm.
const CGROUP_LIMIT: u64 = 512 * MIB;
const PAYLOAD: usize = 150_000_000;
/// What real ByteStream clients send, and memgate's own client.
const CHUNK: usize = 1 << 20;
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
/// Random 1 MiB blocks that every payload is a distinct rotation of (144 chunks
/// each, so no block repeats within one payload): payloads cost no generation
/// time during the storm and the test process holds 160 MiB for all uploads.
const POOL_BLOCKS: usize = 160;

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
            code: Code::Unavailable,
            message: format!("connect after the storm: {e}"),
        });
    }
    if let Some(Ok(channel)) = after {
        for call in calls
            .iter()
            .filter(|c| c.kind == Kind::Upload && c.succeeded())
        {
            let blob = &blobs()[call.n];
            readbacks.push((
                call.n,
                with_retries(|| read_back(channel.clone(), blob)).await,
            ));
        }
        // A payload nobody sent before: the server must admit new work.
        let blob = &blobs()[UPLOADS + PROCESS_CALLS];
        fresh = with_retries(|| upload(channel.clone(), blob)).await;
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

/// How one attempt ended.
#[derive(Debug)]
enum Outcome {
    Ok,
    Exhausted {
        pushback_ms: Option<i64>,
    },
    /// Any other status, transport errors included.
    Failed {
        code: Code,
        message: String,
    },
    /// No answer by the deadline plus grace, on the client's clock.
    TimedOut,
    /// OK, with a wrong answer.
    Wrong(String),
}

impl Outcome {
    fn acceptable(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Exhausted { .. })
    }

    /// What went wrong, for the details section of the report.
    fn detail(&self) -> Option<String> {
        match self {
            Outcome::Ok | Outcome::Exhausted { .. } => None,
            Outcome::Failed { code, message } => Some(format!("{code:?}: {message}")),
            Outcome::TimedOut => Some(format!("no answer within {:?}", DEADLINE + CLIENT_GRACE)),
            Outcome::Wrong(what) => Some(format!("wrong answer: {what}")),
        }
    }

    fn short(&self) -> String {
        match self {
            Outcome::Ok => "OK".into(),
            Outcome::Exhausted {
                pushback_ms: Some(ms),
            } => format!("RE({ms}ms)"),
            Outcome::Exhausted { pushback_ms: None } => "RE".into(),
            Outcome::Failed { code, .. } => format!("{code:?}"),
            Outcome::TimedOut => "CLIENT_TIMEOUT".into(),
            Outcome::Wrong(_) => "WRONG".into(),
        }
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
                    code: Code::Unavailable,
                    message: format!("connect: {e}"),
                }],
                (Ok(ch), None) => with_retries(|| upload(ch.clone(), blob)).await,
                (Ok(ch), Some(data)) => {
                    let echo = kind == Kind::ProcessEcho;
                    with_retries(|| process(ch.clone(), data.clone(), blob, echo)).await
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

/// Runs `attempt` until it is not RESOURCE_EXHAUSTED, pushback says stop, or
/// [`MAX_ATTEMPTS`] ran; returns every attempt's outcome.
async fn with_retries<F, Fut>(mut attempt: F) -> Vec<Outcome>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut outcomes = Vec::new();
    loop {
        let outcome = tokio::time::timeout(DEADLINE + CLIENT_GRACE, attempt())
            .await
            .unwrap_or(Outcome::TimedOut);
        let wait = match outcome {
            Outcome::Exhausted {
                pushback_ms: Some(ms),
            } if ms < 0 => None,
            Outcome::Exhausted {
                pushback_ms: Some(ms),
            } => Some(Duration::from_millis(ms as u64)),
            Outcome::Exhausted { pushback_ms: None } => {
                Some(DEFAULT_BACKOFF * 2u32.pow(outcomes.len().min(4) as u32))
            }
            _ => None,
        };
        outcomes.push(outcome);
        match wait {
            Some(wait) if outcomes.len() < MAX_ATTEMPTS => {
                tokio::time::sleep(wait.min(MAX_PUSHBACK)).await;
            }
            _ => return outcomes,
        }
    }
}

fn outcome_of(status: Status) -> Outcome {
    match status.code() {
        Code::ResourceExhausted => Outcome::Exhausted {
            pushback_ms: status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        },
        code => {
            // Transport failures hide the cause (a reset, a refused connection) in the chain.
            let mut message = status.message().to_string();
            let mut source = std::error::Error::source(&status);
            while let Some(e) = source {
                let text = e.to_string();
                if !message.ends_with(&text) {
                    let _ = write!(message, ": {text}");
                }
                source = e.source();
            }
            Outcome::Failed { code, message }
        }
    }
}

async fn connect(url: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

async fn upload(channel: Channel, blob: &Blob) -> Outcome {
    let name = format!(
        "uploads/{}/blobs/{}/{PAYLOAD}",
        uuid::Uuid::new_v4(),
        blob.hex
    );
    let mut offset = 0;
    let requests = blob.chunks().enumerate().map(move |(i, data)| {
        let req = WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: offset as i64,
            finish_write: offset + data.len() == PAYLOAD,
            data,
        };
        offset += req.data.len();
        req
    });
    let mut request = Request::new(tokio_stream::iter(requests));
    request.set_timeout(DEADLINE);
    match ByteStreamClient::new(channel).write(request).await {
        Ok(r) if r.get_ref().committed_size == PAYLOAD as i64 => Outcome::Ok,
        Ok(r) => Outcome::Wrong(format!("committed {} bytes", r.get_ref().committed_size)),
        Err(status) => outcome_of(status),
    }
}

async fn process(channel: Channel, data: Bytes, blob: &Blob, echo: bool) -> Outcome {
    let mut client = PayloadClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let mut request = Request::new(ProcessRequest {
        data: data.clone(),
        echo,
    });
    request.set_timeout(DEADLINE);
    let resp = match client.process(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return outcome_of(status),
    };
    if resp.sha256 != blob.hex || resp.size != PAYLOAD as u64 {
        return Outcome::Wrong(format!("got {} / {} bytes", resp.sha256, resp.size));
    }
    match (echo, resp.data.len()) {
        (true, _) if resp.data != data => {
            Outcome::Wrong(format!("echo of {} bytes differs", resp.data.len()))
        }
        (false, n) if n != 0 => Outcome::Wrong(format!("{n} bytes echoed unasked")),
        _ => Outcome::Ok,
    }
}

/// Reads a stored blob back and checks its digest.
async fn read_back(channel: Channel, blob: &Blob) -> Outcome {
    let mut request = Request::new(ReadRequest {
        resource_name: format!("blobs/{}/{PAYLOAD}", blob.hex),
        read_offset: 0,
        read_limit: 0,
    });
    request.set_timeout(DEADLINE);
    let mut client = ByteStreamClient::new(channel).max_decoding_message_size(64 * MIB as usize);
    let mut stream = match client.read(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => return outcome_of(status),
    };
    let (mut hasher, mut size) = (Sha256::new(), 0);
    loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                hasher.update(&msg.data);
                size += msg.data.len();
            }
            Ok(None) => break,
            Err(status) => return outcome_of(status),
        }
    }
    let hex = hex::encode(hasher.finalize());
    if size != PAYLOAD || hex != blob.hex {
        return Outcome::Wrong(format!("read back {hex} / {size} bytes"));
    }
    Outcome::Ok
}

// ---------------------------------------------------------------- payloads

/// A pseudo-random payload: rotation `n` of the block pool.
struct Blob {
    n: usize,
    hex: String,
}

/// Every payload the test sends: the storm's, then one more for afterwards.
fn blobs() -> &'static [Blob] {
    static BLOBS: OnceLock<Vec<Blob>> = OnceLock::new();
    BLOBS.get_or_init(|| {
        let hash = |n| {
            let mut hasher = Sha256::new();
            let blob = Blob {
                n,
                hex: String::new(),
            };
            blob.chunks().for_each(|c| hasher.update(&c));
            Blob {
                n,
                hex: hex::encode(hasher.finalize()),
            }
        };
        std::thread::scope(|s| {
            let all = 0..UPLOADS + PROCESS_CALLS + 1;
            let (even, odd): (Vec<_>, Vec<_>) = all.partition(|n| n % 2 == 0);
            let odd = s.spawn(move || odd.into_iter().map(hash).collect::<Vec<_>>());
            let mut blobs: Vec<Blob> = even.into_iter().map(hash).collect();
            blobs.extend(odd.join().expect("hashing thread"));
            blobs.sort_by_key(|b| b.n);
            blobs
        })
    })
}

impl Blob {
    /// The payload in [`CHUNK`]s, shared with the pool (no copy).
    fn chunks(&self) -> impl Iterator<Item = Bytes> + Send + 'static {
        let start = self.n * 13; // 13 is coprime with 160: every rotation differs
        (0..PAYLOAD.div_ceil(CHUNK)).map(move |i| {
            let block = &pool()[(start + i) % POOL_BLOCKS];
            block.slice(..CHUNK.min(PAYLOAD - i * CHUNK))
        })
    }

    /// The payload in one buffer, for a unary call.
    fn contiguous(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(PAYLOAD);
        self.chunks().for_each(|c| buf.extend_from_slice(&c));
        buf.freeze()
    }
}

fn pool() -> &'static [Bytes] {
    static POOL: OnceLock<Vec<Bytes>> = OnceLock::new();
    POOL.get_or_init(|| {
        (0..POOL_BLOCKS as u64)
            .map(|i| {
                // xorshift64: fast, and plenty random for bytes nobody compresses.
                let mut x = 0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let mut block = vec![0u8; CHUNK];
                for word in block.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    word.copy_from_slice(&x.to_le_bytes());
                }
                Bytes::from(block)
            })
            .collect()
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
            let history: Vec<_> = call.attempts.iter().map(Outcome::short).collect();
            let last = call.attempts.last().map(Outcome::short).unwrap_or_default();
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
        for detail in all.chain(later).filter_map(Outcome::detail) {
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
            Some(last) => format!("{} after {} attempt(s)", last.short(), self.fresh.len()),
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

// ---------------------------------------------------------------- the harness itself

#[tokio::test(start_paused = true)]
async fn retries_honour_pushback() {
    let started = tokio::time::Instant::now();
    let mut busy = 2;
    let outcomes = with_retries(|| {
        let outcome = if busy > 0 {
            busy -= 1;
            Outcome::Exhausted {
                pushback_ms: Some(1500),
            }
        } else {
            Outcome::Ok
        };
        async move { outcome }
    })
    .await;
    let shorts: Vec<_> = outcomes.iter().map(Outcome::short).collect();
    assert_eq!(shorts, ["RE(1500ms)", "RE(1500ms)", "OK"]);
    assert!(started.elapsed() >= Duration::from_millis(3000));

    let stop = with_retries(|| async {
        Outcome::Exhausted {
            pushback_ms: Some(-1),
        }
    })
    .await;
    assert_eq!(stop.len(), 1, "a negative pushback means do not retry");
    let bounded = with_retries(|| async { Outcome::Exhausted { pushback_ms: None } }).await;
    assert_eq!(bounded.len(), MAX_ATTEMPTS);
    let failed = with_retries(|| async {
        Outcome::Failed {
            code: Code::Unavailable,
            message: String::new(),
        }
    })
    .await;
    assert_eq!(failed.len(), 1, "only RESOURCE_EXHAUSTED is retried");
}

#[test]
fn pushback_comes_from_the_trailers() {
    let mut status = Status::resource_exhausted("busy");
    status
        .metadata_mut()
        .insert("grpc-retry-pushback-ms", "250".parse().unwrap());
    assert!(matches!(
        outcome_of(status),
        Outcome::Exhausted {
            pushback_ms: Some(250)
        }
    ));
    let bare = Status::resource_exhausted("busy");
    assert!(matches!(
        outcome_of(bare),
        Outcome::Exhausted { pushback_ms: None }
    ));
}
