//! What the kubelet is told: liveness (gRPC health service `""`, `/livez`) and
//! readiness (service `"readiness"`, `/readyz`, and the two API services, which
//! follow it). Deciding is a pure function, [`evaluate`]; a monitor task applies
//! it every [`TICK`] and whenever start-up or shutdown changes the picture.
//!
//! Liveness stays SERVING under memory pressure: a restart loses in-flight
//! uploads and frees nothing the guard could not. It fails only when the server
//! is stuck: the guard's sampler has stopped refreshing, or this task itself was
//! not scheduled for far longer than its tick. Readiness fails during start-up,
//! while the object store is unreachable, at critical memory pressure, and from
//! the moment shutdown begins.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, watch};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::guard::{Guard, budget::Pressure};

/// The gRPC health service name for liveness (the whole server).
pub const LIVENESS: &str = "";
/// The gRPC health service name for readiness.
pub const READINESS: &str = "readiness";
/// API services whose health status follows readiness.
pub const API_SERVICES: [&str; 2] = ["memgate.v1.Payload", "google.bytestream.ByteStream"];
/// How often the monitor re-evaluates.
pub const TICK: Duration = Duration::from_millis(250);
/// Readiness returns only after pressure stayed below critical this long, so a
/// server hovering at the watermark does not flap in and out of endpoints.
pub const READY_HOLD: Duration = Duration::from_secs(1);
/// The monitor not running for this long means the runtime is stuck.
pub const STALL: Duration = Duration::from_secs(10);

/// One probe's answer and why, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub reason: String,
}

impl Probe {
    fn ok(reason: &str) -> Self {
        Self {
            ok: true,
            reason: reason.into(),
        }
    }
    fn fail(reason: String) -> Self {
        Self { ok: false, reason }
    }
}

/// Both probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    pub live: Probe,
    pub ready: Probe,
}

/// What [`evaluate`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub started: bool,
    /// Why the blob store cannot serve (the object store is unreachable), if so.
    pub storage_problem: Option<&'a str>,
    pub shutting_down: bool,
    pub pressure: Pressure,
    /// Bytes the reservations and working set exceed the budget by (a limit
    /// that shrank under them); the guard is reclaiming them.
    pub overcommitted: u64,
    /// How long pressure has been below critical (zero while critical).
    pub calm_for: Duration,
    /// Age of the guard's latest reading, and the interval it should refresh at.
    pub sample_age: Duration,
    pub poll_interval: Duration,
    /// Longest gap between two monitor runs lately.
    pub monitor_gap: Duration,
}

/// The health decision.
pub fn evaluate(i: Inputs<'_>) -> HealthState {
    // Several missed intervals, and never less than 2 s: a busy blocking pool may
    // delay one reading, not many.
    let stale_after = (i.poll_interval * 10).max(Duration::from_secs(2));
    let live = if i.sample_age > stale_after {
        Probe::fail(format!(
            "memory sampler has not refreshed for {:.1}s (expected every {:?})",
            i.sample_age.as_secs_f64(),
            i.poll_interval
        ))
    } else if i.monitor_gap > STALL {
        Probe::fail(format!(
            "runtime stalled: health monitor not scheduled for {:.1}s",
            i.monitor_gap.as_secs_f64()
        ))
    } else {
        Probe::ok("ok")
    };
    let ready = if i.shutting_down {
        Probe::fail("shutting down".into())
    } else if !i.started {
        Probe::fail("starting".into())
    } else if let Some(problem) = i.storage_problem {
        Probe::fail(format!("storage unavailable: {problem}"))
    } else if i.overcommitted > 0 {
        Probe::fail(format!(
            "memory limit below what is in use: {:.1} MiB over the budget, reclaiming; \
             not admitting new work",
            i.overcommitted as f64 / (1024.0 * 1024.0)
        ))
    } else if i.pressure == Pressure::Critical {
        Probe::fail("memory pressure critical: not admitting new work".into())
    } else if i.calm_for < READY_HOLD {
        Probe::fail(format!(
            "recovering from critical memory pressure ({:.1}s calm of {:?})",
            i.calm_for.as_secs_f64(),
            READY_HOLD
        ))
    } else {
        Probe::ok("ready")
    };
    HealthState { live, ready }
}

/// The server's health: feeds the gRPC health service and the HTTP probes.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    reporter: HealthReporter,
    state: watch::Sender<HealthState>,
    started: AtomicBool,
    shutting_down: AtomicBool,
    storage_problem: Mutex<Option<String>>,
    wake: Notify,
}

impl Health {
    /// Starts NOT ready (liveness SERVING); returns the gRPC health service too.
    pub async fn new() -> (Self, HealthServer<HealthService>) {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let initial = HealthState {
            live: Probe::ok("ok"),
            ready: Probe::fail("starting".into()),
        };
        let health = Self {
            inner: Arc::new(Inner {
                reporter,
                state: watch::channel(initial.clone()).0,
                started: AtomicBool::new(false),
                shutting_down: AtomicBool::new(false),
                storage_problem: Mutex::new(None),
                wake: Notify::new(),
            }),
        };
        health.publish(&initial, None).await;
        (health, service)
    }

    /// The current answers.
    pub fn state(&self) -> HealthState {
        self.inner.state.borrow().clone()
    }

    /// Every change of the answers.
    pub fn subscribe(&self) -> watch::Receiver<HealthState> {
        self.inner.state.subscribe()
    }

    /// The store and the guard are initialised: readiness may turn SERVING.
    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// The blob store's reachability: `Err(reason)` keeps readiness NOT_SERVING
    /// with that reason until an `Ok(())`.
    pub fn set_storage(&self, status: Result<(), String>) {
        let mut problem = self
            .inner
            .storage_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if problem.as_ref() != status.as_ref().err() {
            match &status {
                Ok(()) => tracing::info!("storage reachable again"),
                Err(reason) => tracing::warn!(%reason, "storage unreachable"),
            }
            *problem = status.err();
            self.inner.wake.notify_one();
        }
    }

    /// Shutdown began: readiness turns NOT_SERVING at once and stays so.
    pub async fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let mut state = self.state();
        state.ready = Probe::fail("shutting down".into());
        let old = self.state();
        self.publish(&state, Some(&old)).await;
        self.inner.wake.notify_one();
    }

    async fn publish(&self, new: &HealthState, old: Option<&HealthState>) {
        let status = |ok| {
            if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let r = &self.inner.reporter;
        if old.is_none_or(|o| o.live.ok != new.live.ok) {
            r.set_service_status(LIVENESS, status(new.live.ok)).await;
            if !new.live.ok {
                tracing::error!(reason = %new.live.reason, "liveness failing");
            }
        }
        if old.is_none_or(|o| o.ready.ok != new.ready.ok) {
            r.set_service_status(READINESS, status(new.ready.ok)).await;
            for s in API_SERVICES {
                r.set_service_status(s, status(new.ready.ok)).await;
            }
            if old.is_some() {
                tracing::info!(ready = new.ready.ok, reason = %new.ready.reason, "readiness changed");
            }
        }
        self.inner.state.send_replace(new.clone());
    }

    /// Runs the monitor until the process ends.
    pub fn spawn_monitor(&self, guard: Guard) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut calm_since = Some(
                Instant::now()
                    .checked_sub(READY_HOLD)
                    .unwrap_or_else(Instant::now),
            );
            let mut last_run = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = health.inner.wake.notified() => {}
                }
                let now = Instant::now();
                let gap = now - last_run;
                last_run = now;
                let pressure = guard.pressure();
                match (pressure, calm_since) {
                    (Pressure::Critical, _) => calm_since = None,
                    (_, None) => calm_since = Some(now),
                    _ => {}
                }
                let storage_problem = health
                    .inner
                    .storage_problem
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let new = evaluate(Inputs {
                    started: health.inner.started.load(Ordering::SeqCst),
                    storage_problem: storage_problem.as_deref(),
                    shutting_down: health.inner.shutting_down.load(Ordering::SeqCst),
                    pressure,
                    overcommitted: guard.budget().overcommitted(),
                    calm_for: calm_since.map_or(Duration::ZERO, |t| now - t),
                    sample_age: guard.snapshot().taken_at.elapsed(),
                    poll_interval: guard.settings().poll_interval,
                    monitor_gap: gap,
                });
                let old = health.state();
                if new != old {
                    health.publish(&new, Some(&old)).await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Inputs<'static> {
        Inputs {
            started: true,
            storage_problem: None,
            shutting_down: false,
            pressure: Pressure::Normal,
            overcommitted: 0,
            calm_for: Duration::from_secs(60),
            sample_age: Duration::from_millis(50),
            poll_interval: Duration::from_millis(100),
            monitor_gap: TICK,
        }
    }

    #[test]
    fn decisions() {
        let s = evaluate(base());
        assert!(s.live.ok && s.ready.ok);
        let s = evaluate(Inputs {
            started: false,
            ..base()
        });
        assert!(s.live.ok && !s.ready.ok && s.ready.reason == "starting");
        let s = evaluate(Inputs {
            pressure: Pressure::Critical,
            calm_for: Duration::ZERO,
            ..base()
        });
        assert!(s.live.ok, "pressure never fails liveness");
        assert!(!s.ready.ok && s.ready.reason.contains("critical"));
        let s = evaluate(Inputs {
            pressure: Pressure::Critical,
            overcommitted: 3 << 20,
            calm_for: Duration::ZERO,
            ..base()
        });
        assert!(s.live.ok, "a shrunk limit never fails liveness");
        assert!(
            !s.ready.ok && s.ready.reason.contains("3.0 MiB over the budget"),
            "{s:?}"
        );
        let s = evaluate(Inputs {
            pressure: Pressure::Elevated,
            calm_for: Duration::from_millis(300),
            ..base()
        });
        assert!(
            !s.ready.ok && s.ready.reason.contains("recovering"),
            "{s:?}"
        );
        let s = evaluate(Inputs {
            pressure: Pressure::Elevated,
            ..base()
        });
        assert!(s.ready.ok, "elevated pressure still takes work");
        let s = evaluate(Inputs {
            shutting_down: true,
            ..base()
        });
        assert!(s.live.ok && !s.ready.ok && s.ready.reason == "shutting down");
        let s = evaluate(Inputs {
            sample_age: Duration::from_secs(3),
            ..base()
        });
        assert!(!s.live.ok && s.live.reason.contains("sampler"), "{s:?}");
        let s = evaluate(Inputs {
            monitor_gap: Duration::from_secs(11),
            ..base()
        });
        assert!(!s.live.ok && s.live.reason.contains("stalled"));
        let s = evaluate(Inputs {
            storage_problem: Some("connection refused"),
            ..base()
        });
        assert!(
            s.live.ok,
            "an unreachable object store never fails liveness"
        );
        assert!(
            !s.ready.ok && s.ready.reason == "storage unavailable: connection refused",
            "{s:?}"
        );
    }
}
