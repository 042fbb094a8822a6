//! Hands memory freed by big requests back to the OS without slowing them
//! down: "purge soon" requests are coalesced and rate-limited, and the purge
//! runs on tokio's blocking pool (15–37 ms for 0.5 GB dirty, ~15 µs when idle).
//!
//! It owns when to purge and the purge counters; what a purge does is
//! [`super::jemalloc::purge_all`], and who asks for one is the guard's business.
//!
//! A purge hands pages back that the next large call must fault in again: for
//! back-to-back 150 MB calls that was the guard's main cost (page faults, see
//! docs/guard.md). So a purge asked for while other calls still hold memory
//! and pressure is normal waits ([`Purger::defer_while`]) until the server has
//! been seen without them twice, [`REUSE_WINDOW`] apart: memory freed while
//! work goes on is reused by it, and it goes back to the OS once the work
//! stops, or at once when pressure rises.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::jemalloc::{self, JemallocError};

/// Resident bytes around one purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeOutcome {
    pub resident_before: u64,
    pub resident_after: u64,
}

/// Counters since the purger was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeStats {
    /// Calls to [`Purger::request`].
    pub requests: u64,
    /// Purges attempted, failed ones included.
    pub runs: u64,
    pub failures: u64,
    /// Sum of `resident_before - resident_after` over purges that lowered it.
    pub bytes_released: u64,
    pub last_duration: Duration,
    pub total_duration: Duration,
}

type Action = dyn Fn() -> Result<PurgeOutcome, JemallocError> + Send + Sync;
type Defer = dyn Fn() -> Timing + Send + Sync;

/// What the server is doing, for when a purge may run ([`Purger::defer_while`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// Pressure is up: purge at once.
    Urgent,
    /// Calls hold memory: what a purge would hand back is being reused.
    Busy,
    /// Nothing holds memory: purge once it has stayed so for [`REUSE_WINDOW`].
    Idle,
}

/// How long a deferred purge waits before it looks again whether the memory it
/// would hand back is still being reused.
pub const REUSE_WINDOW: Duration = Duration::from_millis(250);

/// A rate-limited, coalescing purge. Cheap to clone: clones share one state.
#[derive(Clone)]
pub struct Purger {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    min_interval: Duration,
    action: Box<Action>,
    /// True while a purge should wait (see [`Purger::defer_while`]).
    defer: std::sync::OnceLock<Box<Defer>>,
    state: Mutex<State>,
    requests: AtomicU64,
    runs: AtomicU64,
    failures: AtomicU64,
    bytes_released: AtomicU64,
    last_nanos: AtomicU64,
    total_nanos: AtomicU64,
    /// Failure messages already logged at warn: a broken purge would
    /// otherwise log once per large request.
    warned: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct State {
    /// A purge was asked for and has not started yet.
    pending: bool,
    /// A driver task exists; it owns every purge until it exits.
    driving: bool,
    /// When the next purge may start.
    next_allowed: Option<Instant>,
}

impl std::fmt::Debug for Purger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Purger")
            .field("enabled", &self.is_enabled())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Purges every jemalloc arena and reads `stats.resident` around it.
pub fn jemalloc_purge() -> Result<PurgeOutcome, JemallocError> {
    let resident_before = jemalloc::stats()?.resident;
    jemalloc::purge_all()?;
    let resident_after = jemalloc::stats()?.resident;
    Ok(PurgeOutcome {
        resident_before,
        resident_after,
    })
}

impl Purger {
    /// Purges jemalloc at most once per `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Self::with_action(min_interval, jemalloc_purge)
    }

    /// Like [`Purger::new`] when jemalloc is the global allocator, else disabled:
    /// purging an allocator nobody uses would only cost time.
    pub fn for_global_allocator(min_interval: Duration) -> Self {
        if jemalloc::is_global_allocator() {
            Self::new(min_interval)
        } else {
            Self::disabled()
        }
    }

    /// Runs `action` instead of a jemalloc purge (other allocators, tests).
    pub fn with_action(
        min_interval: Duration,
        action: impl Fn() -> Result<PurgeOutcome, JemallocError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner: Some(Arc::new(Inner {
                min_interval,
                action: Box::new(action),
                defer: std::sync::OnceLock::new(),
                state: Mutex::default(),
                requests: AtomicU64::new(0),
                runs: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                bytes_released: AtomicU64::new(0),
                last_nanos: AtomicU64::new(0),
                total_nanos: AtomicU64::new(0),
                warned: Mutex::default(),
            })),
        }
    }

    /// A purger that never purges, for when the guard is off.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Makes purges follow `timing`: at once when it says [`Timing::Urgent`];
    /// while it says [`Timing::Busy`], wait and look again every
    /// [`REUSE_WINDOW`]; after it said [`Timing::Idle`] twice in a row, one
    /// window apart. Back-to-back large calls then reuse each other's memory
    /// instead of faulting it in again. Set once; later calls are ignored.
    pub fn defer_while(&self, timing: impl Fn() -> Timing + Send + Sync + 'static) {
        if let Some(inner) = &self.inner {
            let _ = inner.defer.set(Box::new(timing));
        }
    }

    /// Asks for a purge soon, without waiting for it. Right away if none ran
    /// in the last `min_interval`, else once that interval is over; requests
    /// made meanwhile share that one purge. Needs a tokio runtime.
    pub fn request(&self) {
        let Some(inner) = &self.inner else { return };
        inner.requests.fetch_add(1, Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            inner.failures.fetch_add(1, Relaxed);
            inner.warn_once("purge requested outside a tokio runtime; skipped");
            return;
        };
        let mut state = inner.lock();
        state.pending = true;
        if !state.driving {
            state.driving = true;
            runtime.spawn(drive(Driving {
                inner: inner.clone(),
                armed: true,
            }));
        }
    }

    pub fn stats(&self) -> PurgeStats {
        let Some(inner) = &self.inner else {
            return PurgeStats::default();
        };
        PurgeStats {
            requests: inner.requests.load(Relaxed),
            runs: inner.runs.load(Relaxed),
            failures: inner.failures.load(Relaxed),
            bytes_released: inner.bytes_released.load(Relaxed),
            last_duration: Duration::from_nanos(inner.last_nanos.load(Relaxed)),
            total_duration: Duration::from_nanos(inner.total_nanos.load(Relaxed)),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: plain flags.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn warn_once(&self, message: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.insert(message.to_owned()) {
            tracing::warn!("{message} (further identical failures are only counted)");
        }
    }

    fn record(&self, result: Result<PurgeOutcome, String>, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.runs.fetch_add(1, Relaxed);
        self.last_nanos.store(nanos, Relaxed);
        self.total_nanos.fetch_add(nanos, Relaxed);
        match result {
            Ok(o) => {
                let released = o.resident_before.saturating_sub(o.resident_after);
                self.bytes_released.fetch_add(released, Relaxed);
                tracing::debug!(
                    released,
                    resident_before = o.resident_before,
                    resident_after = o.resident_after,
                    ?took,
                    "jemalloc purge"
                );
            }
            Err(message) => {
                self.failures.fetch_add(1, Relaxed);
                self.warn_once(&format!("jemalloc purge failed: {message}"));
            }
        }
    }
}

/// The driver's claim on `State::driving`. Released by the driver itself when
/// it runs out of work, or on drop if the runtime drops the task mid-wait, so
/// a later request can start a new driver.
struct Driving {
    inner: Arc<Inner>,
    armed: bool,
}

impl Drop for Driving {
    fn drop(&mut self) {
        if self.armed {
            self.inner.lock().driving = false;
        }
    }
}

/// Runs purges while requests keep coming, one per `min_interval` at most.
async fn drive(mut driving: Driving) {
    let inner = driving.inner.clone();
    // Whether the last look, one window ago, found the server idle.
    let mut idle_before = false;
    loop {
        let next_allowed = inner.lock().next_allowed;
        if let Some(at) = next_allowed {
            tokio::time::sleep_until(at).await;
        }
        match inner.defer.get().map(|timing| timing()) {
            None | Some(Timing::Urgent) => {}
            Some(Timing::Idle) if idle_before => {}
            Some(t) => {
                idle_before = t == Timing::Idle;
                tokio::time::sleep(REUSE_WINDOW).await;
                continue;
            }
        }
        idle_before = false;
        {
            let mut state = inner.lock();
            if !state.pending {
                // Still under the lock: a request now either sees `driving`
                // false and spawns a driver, or was already seen as pending.
                state.driving = false;
                driving.armed = false;
                return;
            }
            state.pending = false;
            state.next_allowed = Some(Instant::now() + inner.min_interval);
        }
        let worker = inner.clone();
        let run = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = (worker.action)().map_err(|e| e.to_string());
            (result, started.elapsed())
        });
        match run.await {
            Ok((result, took)) => inner.record(result, took),
            Err(e) => inner.record(Err(format!("purge task failed: {e}")), Duration::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    /// A purger whose action reports each run on a channel and releases 1 MiB.
    fn counting(fail: bool) -> (Purger, mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let purger = Purger::with_action(INTERVAL, move || {
            let _ = tx.send(());
            if fail {
                return Err(JemallocError::Mallctl {
                    name: "arena.4096.purge",
                    errno: libc::EPERM,
                });
            }
            Ok(PurgeOutcome {
                resident_before: 3 << 20,
                resident_after: 2 << 20,
            })
        });
        (purger, rx)
    }

    /// Lets virtual time run well past the interval so every purge owed has run.
    async fn settle() {
        tokio::time::sleep(INTERVAL * 5).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_requests_coalesces() {
        let (purger, mut runs) = counting(false);
        for _ in 0..10 {
            purger.request();
        }
        runs.recv().await.unwrap();
        settle().await;
        let stats = purger.stats();
        assert_eq!(stats.requests, 10);
        assert!((1..=2).contains(&stats.runs), "{stats:?}");
        assert_eq!(stats.bytes_released, stats.runs << 20);
        assert_eq!(stats.failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_purge_waits_while_calls_reuse_the_memory() {
        let (purger, mut runs) = counting(false);
        let timing = Arc::new(Mutex::new(Timing::Busy));
        let t = timing.clone();
        purger.defer_while(move || *t.lock().unwrap());
        let t0 = Instant::now();
        purger.request();
        // Busy for two seconds: no purge.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(runs.try_recv().is_err(), "purged while calls held memory");
        // Idle: it purges after two looks one window apart, not at once.
        *timing.lock().unwrap() = Timing::Idle;
        runs.recv().await.unwrap();
        let waited = t0.elapsed() - Duration::from_secs(2);
        assert!(
            waited > Duration::ZERO && waited <= 2 * REUSE_WINDOW,
            "purged {waited:?} after the calls ended"
        );
        // Under pressure a request purges at once (after the rate limit).
        *timing.lock().unwrap() = Timing::Urgent;
        tokio::time::sleep(INTERVAL).await;
        let t1 = Instant::now();
        purger.request();
        runs.recv().await.unwrap();
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_during_the_interval_run_once_right_after_it() {
        let (purger, mut runs) = counting(false);
        let t0 = Instant::now();
        purger.request();
        runs.recv().await.unwrap();
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "the first purge waits for nothing"
        );

        for _ in 0..3 {
            purger.request();
            tokio::time::sleep(INTERVAL / 10).await;
        }
        runs.recv().await.unwrap();
        let waited = t0.elapsed();
        assert!(waited >= INTERVAL, "second purge after {waited:?}");
        assert!(
            waited < INTERVAL + INTERVAL / 10,
            "second purge after {waited:?}"
        );
        settle().await;
        assert_eq!(
            purger.stats().runs,
            2,
            "the three requests shared one purge"
        );

        // Idle for longer than the interval: the next request runs at once.
        let t1 = Instant::now();
        purger.request();
        runs.recv().await.unwrap();
        assert_eq!(t1.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_and_warned_once() {
        let (purger, mut runs) = counting(true);
        purger.request();
        runs.recv().await.unwrap();
        purger.request();
        runs.recv().await.unwrap();
        settle().await;
        let stats = purger.stats();
        assert_eq!(
            (stats.runs, stats.failures, stats.bytes_released),
            (2, 2, 0)
        );
        let warned = purger
            .inner
            .as_ref()
            .unwrap()
            .warned
            .lock()
            .unwrap()
            .clone();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned.iter().all(|w| w.contains("EPERM")), "{warned:?}");
    }

    #[test]
    fn outside_a_runtime_a_request_is_a_counted_failure() {
        let (purger, _runs) = counting(false);
        purger.request();
        let stats = purger.stats();
        assert_eq!((stats.requests, stats.runs, stats.failures), (1, 0, 1));
    }

    /// A driver dropped with its runtime must not leave the purger thinking
    /// one still runs: the next runtime's request has to purge.
    #[test]
    fn a_purger_outlives_its_runtime() {
        let (purger, mut runs) = counting(false);
        // Paused: a missing purge fails the timeout at once instead of hanging.
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let first = runtime();
        // Spawns the driver, which never gets polled before the runtime goes.
        first.block_on(async { purger.request() });
        drop(first);
        runtime().block_on(async {
            purger.request();
            tokio::time::timeout(INTERVAL * 10, runs.recv())
                .await
                .expect("the second runtime's request purges");
        });
        assert_eq!(purger.stats().requests, 2);
    }

    #[test]
    fn disabled_does_nothing() {
        let purger = Purger::disabled();
        purger.request();
        assert!(!purger.is_enabled());
        assert_eq!(purger.stats(), PurgeStats::default());
    }

    /// The real thing: this test binary runs on jemalloc (see `jemalloc::tests`).
    #[cfg(target_os = "linux")]
    #[test]
    fn purges_jemalloc_and_measures_it() {
        // Held outside the runtime: no other test may purge in between.
        let _serial = jemalloc::tests::SERIAL
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let stats = runtime.block_on(async {
            let (tx, mut done) = mpsc::unbounded_channel();
            let purger = Purger::with_action(INTERVAL, move || {
                let r = jemalloc_purge();
                let _ = tx.send(());
                r
            });
            assert!(jemalloc::is_global_allocator());
            // 1 MiB pieces stay dirty after free (see `jemalloc::tests`).
            drop((0..32).map(|_| vec![1u8; 1 << 20]).collect::<Vec<_>>());
            purger.request();
            done.recv().await.unwrap();
            settle().await;
            purger.stats()
        });
        assert_eq!((stats.runs, stats.failures), (1, 0), "{stats:?}");
        assert!(stats.bytes_released >= 16 << 20, "{stats:?}");
        assert!(stats.last_duration > Duration::ZERO, "{stats:?}");
        assert_eq!(stats.total_duration, stats.last_duration);
    }
}
