//! [`Guard`]: the running guard, tying the sampler, the budget, the purger and
//! the live settings together. Cheap to clone.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;

use super::{
    MemoryConfig,
    budget::{Budget, BudgetView, Limits, Pressure},
    discover::Roots,
    estimate::Estimator,
    layer::{AdmissionLayer, AdmissionObserver, NoObserver},
    purge::{Purger, Timing},
    reclaim::{self, Holders},
    sampler::{self, Snapshot, Source},
};

/// The running memory guard.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

struct Inner {
    budget: Budget,
    purger: Purger,
    settings: RwLock<MemoryConfig>,
    snapshot: watch::Receiver<Snapshot>,
    purge_threshold: Arc<AtomicU64>,
    wait_charge: u64,
    observer: Arc<dyn AdmissionObserver>,
    /// Admitted calls the reclaimer may end.
    holders: Holders,
}

/// A [`Guard`] that does not keep it running (for its own tasks).
#[derive(Clone)]
pub(super) struct WeakGuard(std::sync::Weak<Inner>);

impl WeakGuard {
    pub(super) fn upgrade(&self) -> Option<Guard> {
        self.0.upgrade().map(|inner| Guard { inner })
    }
}

/// Budget limits for `cfg` and a memory limit of `limit` bytes.
pub fn limits_for(cfg: &MemoryConfig, limit: u64, wait_charge: u64) -> Limits {
    let budget = Limits::budget_for(limit, cfg.budget_ratio, cfg.reserve.as_u64());
    Limits {
        limit,
        budget,
        soft_watermark: cfg.soft_watermark,
        hard_watermark: cfg.hard_watermark,
        queue_max: cfg.queue_max,
        // "Small" under elevated pressure: below the size that is worth a purge.
        small_request: cfg.purge_threshold.as_u64(),
        wait_charge,
        client_share: cfg.max_client_share,
        wait_room: Limits::wait_room_for(wait_charge, budget),
    }
}

impl Guard {
    /// Finds the cgroup under `roots`, takes a first reading and starts the sampler.
    /// `wait_charge` is what the transport may buffer for one waiting call (its
    /// HTTP/2 stream window). Must run inside a tokio runtime.
    pub async fn start(cfg: MemoryConfig, roots: Roots, wait_charge: u64) -> Self {
        Self::start_with_observer(cfg, roots, wait_charge, Arc::new(NoObserver)).await
    }

    /// [`Guard::start`], reporting admissions to `observer` (metrics).
    pub async fn start_with_observer(
        cfg: MemoryConfig,
        roots: Roots,
        wait_charge: u64,
        observer: Arc<dyn AdmissionObserver>,
    ) -> Self {
        let configured = cfg.limit.map(|b| b.as_u64());
        let source = Arc::new(
            tokio::task::spawn_blocking(move || Source::discover(roots, configured))
                .await
                .expect("cgroup discovery panicked"),
        );
        let src = source.clone();
        let first = tokio::task::spawn_blocking(move || src.sample(0))
            .await
            .expect("first sample panicked");
        if let Some(reason) = &first.limit.fallback_reason {
            tracing::warn!(reason = %reason, limit = first.limit.bytes, "no cgroup memory limit used; falling back to host memory");
        }
        let purger = if cfg.enabled {
            Purger::for_global_allocator(cfg.purge_min_interval)
        } else {
            Purger::disabled()
        };
        let purge_threshold = Arc::new(AtomicU64::new(cfg.purge_threshold.as_u64()));
        let (p, t) = (purger.clone(), purge_threshold.clone());
        let budget = Budget::new(
            limits_for(&cfg, first.limit.bytes, wait_charge),
            move |released| {
                if released >= t.load(Ordering::Relaxed) {
                    p.request();
                }
            },
        );
        budget.observe(
            first.working_set,
            limits_for(&cfg, first.limit.bytes, wait_charge),
        );
        // Memory freed while other calls hold theirs is reused by the next
        // large call: purge once the work stops, or at once under pressure.
        let weak = budget.downgrade();
        purger.defer_while(move || {
            let Some(v) = weak.upgrade().map(|b| b.view()) else {
                return Timing::Urgent;
            };
            if v.pressure > Pressure::Normal {
                Timing::Urgent
            } else if v.reserved > v.charges {
                Timing::Busy
            } else {
                Timing::Idle
            }
        });

        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let (w1, w2) = (weak.clone(), weak.clone());
            let snapshot = sampler::spawn(
                source,
                first,
                move || {
                    w1.upgrade()
                        .map_or(Duration::from_secs(1), |i| i.settings().poll_interval)
                },
                move |snap| {
                    if let Some(i) = w2.upgrade() {
                        i.on_sample(snap);
                    }
                },
            );
            Inner {
                budget,
                purger,
                settings: RwLock::new(cfg),
                snapshot,
                purge_threshold,
                wait_charge,
                observer,
                holders: Holders::default(),
            }
        });
        tokio::spawn(reclaim::run(WeakGuard(Arc::downgrade(&inner))));
        Self { inner }
    }

    /// The calls the reclaimer may end.
    pub(super) fn holders(&self) -> &Holders {
        &self.inner.holders
    }

    /// The admission layer for a tonic server, classifying calls with `estimator`.
    pub fn layer<E: Estimator>(&self, estimator: E) -> AdmissionLayer<E> {
        AdmissionLayer::new(self.clone(), estimator)
    }

    pub fn budget(&self) -> &Budget {
        &self.inner.budget
    }

    pub fn view(&self) -> BudgetView {
        self.inner.budget.view()
    }

    pub fn pressure(&self) -> Pressure {
        self.inner.budget.view().pressure
    }

    pub fn purger(&self) -> &Purger {
        &self.inner.purger
    }

    pub(crate) fn observer(&self) -> &dyn AdmissionObserver {
        &*self.inner.observer
    }

    /// The latest reading.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.snapshot.borrow().clone()
    }

    /// A receiver of every new reading (the liveness watchdog watches it).
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.inner.snapshot.clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> MemoryConfig {
        self.inner.settings()
    }

    pub fn enabled(&self) -> bool {
        self.inner.settings().enabled
    }

    /// Applies new `[memory]` settings live. `enabled`, `limit` and
    /// `purge_min_interval` take effect only on restart (they decide what runs);
    /// the rest at once. Returns the names of the keys that changed.
    pub fn reconfigure(&self, new: MemoryConfig) -> Vec<&'static str> {
        let old = self.settings();
        let mut changed = Vec::new();
        macro_rules! diff {
            ($($k:ident),*) => { $( if old.$k != new.$k { changed.push(stringify!($k)); } )* };
        }
        diff!(
            enabled,
            limit,
            budget_ratio,
            reserve,
            soft_watermark,
            hard_watermark,
            poll_interval,
            queue_max,
            queue_timeout,
            purge_threshold,
            purge_min_interval,
            max_client_share,
            reclaim_grace
        );
        let mut applied = new;
        applied.enabled = old.enabled;
        applied.limit = old.limit;
        applied.purge_min_interval = old.purge_min_interval;
        self.inner
            .purge_threshold
            .store(applied.purge_threshold.as_u64(), Ordering::Relaxed);
        let limit = self.inner.snapshot.borrow().limit.bytes;
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = applied.clone();
        self.inner
            .budget
            .set_limits(limits_for(&applied, limit, self.inner.wait_charge));
        changed
    }
}

impl Inner {
    fn settings(&self) -> MemoryConfig {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn on_sample(&self, snap: &Snapshot) {
        let cfg = self.settings();
        self.budget.observe(
            snap.working_set,
            limits_for(&cfg, snap.limit.bytes, self.wait_charge),
        );
        // Hand back what jemalloc holds freed (rate-limited): under pressure, and
        // whenever its dirty pages reach the purge threshold. The second catches
        // buffers freed after their request's permit went (the last bytes of a
        // response leave hyper's send queue a moment after the body ends).
        let dirty = snap
            .alloc
            .map_or(0, |a| a.resident.saturating_sub(a.active));
        if cfg.enabled
            && (self.budget.view().pressure >= Pressure::Elevated
                || dirty >= cfg.purge_threshold.as_u64())
        {
            self.purger.request();
        }
    }
}
