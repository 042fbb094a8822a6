//! The live memory budget: reservations, the admission rule, the wait queue and
//! pressure levels. Pure accounting: it never reads a file; the sampler feeds it
//! observations ([`Budget::observe`]) and the admission layer asks it for permits.
//!
//! The rule: a request estimated to need `e` bytes is admitted when
//! `max(used, baseline + reserved) + e <= budget`, where `used` is the latest
//! working set, `baseline` the working set last seen with nothing reserved, and
//! `reserved` the sum of live permits. Reservations are taken before the memory
//! is allocated, so they run ahead of `used`; `used` catches what no reservation
//! describes. A [`Permit`] is the only way bytes leave the budget: it releases on
//! drop, whatever ended the request.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::oneshot;

/// How hard memory is pressed, with hysteresis between levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pressure {
    /// Admit whatever fits.
    Normal,
    /// Above the soft watermark: purge, admit only small requests.
    Elevated,
    /// Above the hard watermark: admit nothing new.
    Critical,
}

impl Pressure {
    pub fn as_str(self) -> &'static str {
        match self {
            Pressure::Normal => "normal",
            Pressure::Elevated => "elevated",
            Pressure::Critical => "critical",
        }
    }
}

/// A level is left only once usage falls this share of the budget below its watermark.
const HYSTERESIS: f64 = 0.05;

/// Limits derived from the memory limit and the `[memory]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The memory limit in force.
    pub limit: u64,
    /// `limit × budget_ratio − reserve`.
    pub budget: u64,
    pub soft_watermark: f64,
    pub hard_watermark: f64,
    pub queue_max: usize,
    /// Requests at most this large are still admitted under elevated pressure.
    pub small_request: u64,
    /// What a request costs while it waits: what hyper may buffer for its stream.
    pub wait_charge: u64,
}

impl Limits {
    /// `limit × ratio − reserve`, never below zero.
    pub fn budget_for(limit: u64, ratio: f64, reserve: u64) -> u64 {
        ((limit as f64 * ratio) as u64).saturating_sub(reserve)
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error(
        "request needs {} but the whole memory budget is {} (limit {}): it can never fit; send it in smaller pieces",
        mib(*needed), mib(*budget), mib(*limit)
    )]
    NeverFits {
        needed: u64,
        budget: u64,
        limit: u64,
    },
    #[error(
        "server memory is busy: request needs {}, {} available of a {} budget (limit {}); {} requests waiting",
        mib(*needed), mib(*available), mib(*budget), mib(*limit), waiting
    )]
    Busy {
        needed: u64,
        available: u64,
        budget: u64,
        limit: u64,
        waiting: usize,
        reason: BusyReason,
    },
}

impl Rejection {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NeverFits { .. } => "never_fits",
            Rejection::Busy { reason, .. } => reason.as_str(),
        }
    }
}

/// What made a request [`Rejection::Busy`]; bounded, for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusyReason {
    /// The wait queue was full.
    QueueFull,
    /// Not even the wait charge fits: waiting would itself risk the limit.
    NoRoomToWait,
    /// Waited `queue_timeout` (or the call's deadline) without the memory freeing up.
    Timeout,
    /// A call growing its reservation would wait only for others that are
    /// themselves waiting to grow: nobody could ever proceed.
    WouldDeadlock,
}

impl BusyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BusyReason::QueueFull => "queue_full",
            BusyReason::NoRoomToWait => "no_room_to_wait",
            BusyReason::Timeout => "timeout",
            BusyReason::WouldDeadlock => "would_deadlock",
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// A point-in-time view of the budget, for metrics, health and `memgate limits`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BudgetView {
    pub limit: u64,
    pub budget: u64,
    pub used: u64,
    pub baseline: u64,
    pub reserved: u64,
    pub waiting: usize,
    pub pressure: Pressure,
}

/// The shared budget. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Called with the size of each released permit (purge after large requests).
    on_release: Box<dyn Fn(u64) + Send + Sync>,
}

struct State {
    limits: Limits,
    used: u64,
    baseline: u64,
    reserved: u64,
    pressure: Pressure,
    waiters: VecDeque<Waiter>,
    next_id: u64,
    /// Sum of what waiting growers already hold (see [`Budget::try_grow`]).
    growers_hold: u64,
    /// Sum of the wait charges of queued waiters.
    charges: u64,
}

struct Waiter {
    id: u64,
    /// Total the request needs; `charged` of it is already reserved.
    needed: u64,
    charged: u64,
    /// For a grower: what its call already holds.
    holds: u64,
    tx: oneshot::Sender<Permit>,
}

/// Bytes held in the budget; released on drop.
#[must_use = "a permit releases its bytes when dropped"]
pub struct Permit {
    inner: Arc<Inner>,
    bytes: u64,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Permit {
    /// Bytes this permit holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds `other`'s bytes to this permit.
    pub fn absorb(&mut self, mut other: Permit) {
        debug_assert!(Arc::ptr_eq(&self.inner, &other.inner));
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let grants = {
            let mut st = self.inner.lock();
            st.reserved = st
                .reserved
                .checked_sub(self.bytes)
                .expect("budget accounting: released more than reserved");
            st.update_pressure();
            st.grant(&self.inner)
        };
        deliver(grants);
        (self.inner.on_release)(self.bytes);
    }
}

/// Grants made under the lock, delivered after it is released (a permit that
/// nobody receives any more drops, and dropping takes the lock).
type Grants = Vec<(oneshot::Sender<Permit>, Permit)>;

fn deliver(grants: Grants) {
    for (tx, permit) in grants {
        let _ = tx.send(permit);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn committed(&self) -> u64 {
        self.used.max(self.baseline.saturating_add(self.reserved))
    }

    fn fits(&self, bytes: u64) -> bool {
        self.committed().saturating_add(bytes) <= self.limits.budget
    }

    fn available(&self) -> u64 {
        self.limits.budget.saturating_sub(self.committed())
    }

    /// Whether the pressure level lets a request of `bytes` in.
    fn level_allows(&self, bytes: u64) -> bool {
        match self.pressure {
            Pressure::Normal => true,
            Pressure::Elevated => bytes <= self.limits.small_request,
            Pressure::Critical => false,
        }
    }

    fn update_pressure(&mut self) {
        let share = if self.limits.budget == 0 {
            1.0
        } else {
            self.committed() as f64 / self.limits.budget as f64
        };
        let (soft, hard) = (self.limits.soft_watermark, self.limits.hard_watermark);
        self.pressure = match self.pressure {
            _ if share >= hard => Pressure::Critical,
            Pressure::Critical if share >= hard - HYSTERESIS => Pressure::Critical,
            _ if share >= soft => Pressure::Elevated,
            Pressure::Critical | Pressure::Elevated if share >= soft - HYSTERESIS => {
                Pressure::Elevated
            }
            _ => Pressure::Normal,
        };
    }

    /// Admits waiters from the head of the queue while they fit (strict FIFO: a
    /// large request at the head is not starved by small ones behind it).
    fn grant(&mut self, inner: &Arc<Inner>) -> Grants {
        let mut grants = Vec::new();
        while let Some(head) = self.waiters.front() {
            let extra = head.needed - head.charged;
            if !self.fits(extra) || !self.level_allows(head.needed) {
                break;
            }
            let w = self.waiters.pop_front().expect("front exists");
            self.reserved += extra;
            self.growers_hold -= w.holds;
            self.charges -= w.charged;
            grants.push((
                w.tx,
                Permit {
                    inner: inner.clone(),
                    bytes: w.needed,
                },
            ));
        }
        if !grants.is_empty() {
            self.update_pressure();
        }
        grants
    }
}

/// The outcome of [`Budget::try_acquire`].
#[derive(Debug)]
pub enum Admission {
    /// Admitted at once.
    Now(Permit),
    /// Queued; await the ticket.
    Queued(Ticket),
}

/// A place in the wait queue. Dropping it leaves the queue and returns its charge.
pub struct Ticket {
    inner: Arc<Inner>,
    id: u64,
    rx: Option<oneshot::Receiver<Permit>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl Ticket {
    /// The permit, if it has been granted already (non-blocking).
    pub fn try_take(&mut self) -> Option<Permit> {
        self.rx.as_mut()?.try_recv().ok()
    }

    /// Waits up to `max_wait` for the permit.
    pub async fn wait(mut self, max_wait: Duration) -> Result<Permit, Rejection> {
        let Some(rx) = self.rx.as_mut() else {
            unreachable!("a ticket is waited on once")
        };
        match tokio::time::timeout(max_wait, rx).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                let st = self.inner.lock();
                let needed = st
                    .waiters
                    .iter()
                    .find(|w| w.id == self.id)
                    .map_or(0, |w| w.needed);
                Err(busy(&st, needed, BusyReason::Timeout))
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let grants = {
            let mut st = self.inner.lock();
            let Some(pos) = st.waiters.iter().position(|w| w.id == self.id) else {
                // Already granted: the permit, if never received, drops with the channel.
                return;
            };
            let w = st.waiters.remove(pos).expect("position exists");
            st.reserved -= w.charged;
            st.charges -= w.charged;
            st.growers_hold -= w.holds;
            st.update_pressure();
            // A large request leaving the head may unblock smaller ones behind it.
            st.grant(&self.inner)
        };
        deliver(grants);
    }
}

fn busy(st: &State, needed: u64, reason: BusyReason) -> Rejection {
    Rejection::Busy {
        needed,
        available: st.available(),
        budget: st.limits.budget,
        limit: st.limits.limit,
        waiting: st.waiters.len(),
        reason,
    }
}

impl Budget {
    /// A budget with the given limits and nothing observed yet.
    pub fn new(limits: Limits, on_release: impl Fn(u64) + Send + Sync + 'static) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    limits,
                    used: 0,
                    baseline: 0,
                    reserved: 0,
                    pressure: Pressure::Normal,
                    waiters: VecDeque::new(),
                    next_id: 0,
                    growers_hold: 0,
                    charges: 0,
                }),
                on_release: Box::new(on_release),
            }),
        }
    }

    /// Takes `bytes` now if they fit and nobody is waiting ahead; else joins the
    /// queue (reserving the wait charge), or rejects when even waiting cannot be afforded.
    pub fn try_acquire(&self, bytes: u64) -> Result<Admission, Rejection> {
        let mut st = self.inner.lock();
        if bytes > st.limits.budget {
            return Err(Rejection::NeverFits {
                needed: bytes,
                budget: st.limits.budget,
                limit: st.limits.limit,
            });
        }
        if st.waiters.is_empty() && st.level_allows(bytes) && st.fits(bytes) {
            st.reserved += bytes;
            st.update_pressure();
            return Ok(Admission::Now(Permit {
                inner: self.inner.clone(),
                bytes,
            }));
        }
        if st.waiters.len() >= st.limits.queue_max {
            return Err(busy(&st, bytes, BusyReason::QueueFull));
        }
        let charge = st.limits.wait_charge.min(bytes);
        if !st.fits(charge) {
            return Err(busy(&st, bytes, BusyReason::NoRoomToWait));
        }
        st.reserved += charge;
        st.charges += charge;
        Ok(Admission::Queued(
            self.enqueue(&mut st, bytes, charge, 0, false),
        ))
    }

    fn enqueue(
        &self,
        st: &mut State,
        needed: u64,
        charged: u64,
        holds: u64,
        front: bool,
    ) -> Ticket {
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = oneshot::channel();
        let w = Waiter {
            id,
            needed,
            charged,
            holds,
            tx,
        };
        if front {
            st.waiters.push_front(w);
        } else {
            st.waiters.push_back(w);
        }
        st.growers_hold += holds;
        st.update_pressure();
        Ticket {
            inner: self.inner.clone(),
            id,
            rx: Some(rx),
        }
    }

    /// Adds `extra` bytes for a call that already holds `holds` (an echo learnt
    /// after decoding). It goes ahead of the queue, since finishing it frees
    /// memory; it is rejected at once when everything it could wait for is
    /// itself waiting to grow (hold-and-wait would deadlock).
    pub fn try_grow(&self, holds: u64, extra: u64) -> Result<Admission, Rejection> {
        let mut st = self.inner.lock();
        if holds.saturating_add(extra) > st.limits.budget {
            return Err(Rejection::NeverFits {
                needed: holds + extra,
                budget: st.limits.budget,
                limit: st.limits.limit,
            });
        }
        if st.pressure < Pressure::Critical && st.fits(extra) {
            st.reserved += extra;
            st.update_pressure();
            return Ok(Admission::Now(Permit {
                inner: self.inner.clone(),
                bytes: extra,
            }));
        }
        let releasable = st
            .reserved
            .saturating_sub(holds + st.growers_hold + st.charges);
        if releasable == 0 {
            return Err(busy(&st, extra, BusyReason::WouldDeadlock));
        }
        Ok(Admission::Queued(
            self.enqueue(&mut st, extra, 0, holds, true),
        ))
    }

    /// [`Budget::try_acquire`], then waiting up to `max_wait` in the queue.
    pub async fn acquire(&self, bytes: u64, max_wait: Duration) -> Result<Permit, Rejection> {
        match self.try_acquire(bytes)? {
            Admission::Now(p) => Ok(p),
            Admission::Queued(t) => t.wait(max_wait).await,
        }
    }

    /// Feeds a new observation of the working set and limits; may admit waiters.
    pub fn observe(&self, used: u64, limits: Limits) {
        let grants = {
            let mut st = self.inner.lock();
            st.used = used;
            st.limits = limits;
            if st.reserved == 0 && st.waiters.is_empty() {
                st.baseline = used;
            } else {
                // Busy: the idle footprint is at most what is in use now.
                st.baseline = st.baseline.min(used);
            }
            st.update_pressure();
            st.grant(&self.inner)
        };
        deliver(grants);
    }

    /// Changes the limits (a live config reload); may admit waiters.
    pub fn set_limits(&self, limits: Limits) {
        let used = self.inner.lock().used;
        self.observe(used, limits);
    }

    /// The current state.
    pub fn view(&self) -> BudgetView {
        let st = self.inner.lock();
        BudgetView {
            limit: st.limits.limit,
            budget: st.limits.budget,
            used: st.used,
            baseline: st.baseline,
            reserved: st.reserved,
            waiting: st.waiters.len(),
            pressure: st.pressure,
        }
    }

    /// Suggested client back-off (gRFC A6 pushback): longer as the queue grows,
    /// with ±20% jitter so clients rejected together do not all come back together.
    pub fn pushback(&self) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let waiting = self.inner.lock().waiters.len() as u64;
        let base = (250 * (1 + waiting)).min(5000);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let jitter = base * (random % 41) / 100; // 0..=40 % of base
        Duration::from_millis(base * 8 / 10 + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn limits(budget: u64) -> Limits {
        Limits {
            limit: budget * 2,
            budget,
            soft_watermark: 0.75,
            hard_watermark: 0.95,
            queue_max: 4,
            small_request: MIB,
            wait_charge: MIB,
        }
    }

    fn now(a: Result<Admission, Rejection>) -> Permit {
        match a {
            Ok(Admission::Now(p)) => p,
            Ok(Admission::Queued(_)) => panic!("queued"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn admits_what_fits_and_releases_on_drop() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        let p = now(b.try_acquire(60 * MIB));
        assert_eq!(b.view().reserved, 60 * MIB);
        assert!(matches!(b.try_acquire(50 * MIB), Ok(Admission::Queued(_))));
        drop(p);
        assert_eq!(b.view().reserved, 0);
        let _p = now(b.try_acquire(90 * MIB));
    }

    #[test]
    fn working_set_counts_when_above_reservations() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        b.observe(10 * MIB, limits(100 * MIB));
        assert_eq!(b.view().baseline, 10 * MIB);
        let _p = now(b.try_acquire(20 * MIB));
        // Something the guard did not reserve grew the working set to 90 MiB.
        b.observe(90 * MIB, limits(100 * MIB));
        assert!(matches!(b.try_acquire(20 * MIB), Ok(Admission::Queued(_))));
    }

    #[test]
    fn never_fits_is_rejected_at_once() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        b.observe(10 * MIB, limits(100 * MIB));
        assert!(
            matches!(b.try_acquire(95 * MIB), Ok(Admission::Queued(_))),
            "fits once usage falls"
        );
        let e = b.try_acquire(101 * MIB).expect_err("rejected");
        assert!(matches!(e, Rejection::NeverFits { .. }));
        assert!(e.to_string().contains("can never fit"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_is_fifo_and_bounded() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        let big = now(b.try_acquire(90 * MIB));
        let Ok(Admission::Queued(t1)) = b.try_acquire(8 * MIB) else {
            panic!()
        };
        let Ok(Admission::Queued(t2)) = b.try_acquire(2 * MIB) else {
            panic!()
        };
        // Two waiters hold their wait charge (1 MiB each): 90 + 2 reserved.
        assert_eq!(b.view().reserved, 92 * MIB);
        assert_eq!(b.view().waiting, 2);
        drop(big);
        let p1 = t1.wait(Duration::from_secs(1)).await.expect("granted");
        let p2 = t2.wait(Duration::from_secs(1)).await.expect("granted");
        assert_eq!((p1.bytes(), p2.bytes()), (8 * MIB, 2 * MIB));
        assert_eq!(b.view().reserved, 10 * MIB);
        let _hold = now(b.try_acquire(80 * MIB));
        let tickets: Vec<_> = (0..4).map(|_| b.try_acquire(20 * MIB)).collect();
        assert!(
            tickets
                .iter()
                .all(|t| matches!(t, Ok(Admission::Queued(_))))
        );
        let full = b.try_acquire(20 * MIB).expect_err("queue full");
        assert!(matches!(
            full,
            Rejection::Busy {
                reason: BusyReason::QueueFull,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_times_out_and_returns_its_charge() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        let _hold = now(b.try_acquire(95 * MIB));
        let Ok(Admission::Queued(t)) = b.try_acquire(50 * MIB) else {
            panic!()
        };
        assert_eq!(b.view().reserved, 96 * MIB);
        let e = t
            .wait(Duration::from_millis(100))
            .await
            .expect_err("timed out");
        assert!(matches!(
            e,
            Rejection::Busy {
                reason: BusyReason::Timeout,
                ..
            }
        ));
        assert!(e.to_string().contains("50.0 MiB"), "{e}");
        assert_eq!(b.view().reserved, 95 * MIB);
        assert_eq!(b.view().waiting, 0);
    }

    #[test]
    fn no_room_to_wait_is_rejected() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        let _hold = now(b.try_acquire(100 * MIB));
        let e = b.try_acquire(50 * MIB).expect_err("rejected");
        assert!(matches!(
            e,
            Rejection::Busy {
                reason: BusyReason::NoRoomToWait,
                ..
            }
        ));
    }

    #[test]
    fn pressure_has_hysteresis() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        b.observe(80 * MIB, limits(100 * MIB));
        assert_eq!(b.view().pressure, Pressure::Elevated);
        // Small requests still pass under elevated pressure, large ones wait.
        drop(now(b.try_acquire(MIB / 2)));
        assert!(matches!(b.try_acquire(5 * MIB), Ok(Admission::Queued(_))));
        b.observe(96 * MIB, limits(100 * MIB));
        assert_eq!(b.view().pressure, Pressure::Critical);
        b.observe(92 * MIB, limits(100 * MIB));
        assert_eq!(b.view().pressure, Pressure::Critical, "within hysteresis");
        b.observe(89 * MIB, limits(100 * MIB));
        assert_eq!(b.view().pressure, Pressure::Elevated);
        b.observe(72 * MIB, limits(100 * MIB));
        assert_eq!(b.view().pressure, Pressure::Elevated, "within hysteresis");
        b.observe(60 * MIB, limits(100 * MIB));
        assert_eq!(b.view().pressure, Pressure::Normal);
    }

    #[test]
    fn pushback_grows_with_the_queue_and_is_jittered() {
        let b = Budget::new(limits(100 * MIB), |_| {});
        let idle: Vec<_> = (0..50).map(|_| b.pushback().as_millis()).collect();
        assert!(idle.iter().all(|ms| (200..=300).contains(ms)), "{idle:?}");
        assert!(idle.iter().any(|ms| *ms != idle[0]), "no jitter: {idle:?}");
        let _hold = now(b.try_acquire(95 * MIB));
        let _t: Vec<_> = (0..3).map(|_| b.try_acquire(10 * MIB).unwrap()).collect();
        let busy = b.pushback().as_millis();
        assert!((800..=1200).contains(&busy), "{busy}");
    }

    #[test]
    fn release_hook_sees_each_permit() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let b = Budget::new(limits(100 * MIB), move |n| s.lock().unwrap().push(n));
        let mut p = now(b.try_acquire(3 * MIB));
        p.absorb(now(b.try_acquire(4 * MIB)));
        assert_eq!(p.bytes(), 7 * MIB);
        drop(p);
        assert_eq!(*seen.lock().unwrap(), vec![7 * MIB]);
        assert_eq!(b.view().reserved, 0);
    }
}
