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
//!
//! Every reservation belongs to a client (a token name, a certificate identity
//! or a peer address, decided by the admission layer). Waiting calls are served
//! fairly across clients ([`super::fair`]): clients take turns, and while others
//! wait no client is granted more than `client_share` of the budget.

use std::{
    collections::VecDeque,
    sync::{Arc, LazyLock, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::oneshot;

use super::fair::{FairQueue, Waiting};

/// The client of calls that name none ([`Budget::try_acquire`]).
pub const UNKNOWN_CLIENT: &str = "unknown";
static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN_CLIENT));

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
/// Calls this small (QueryWriteStatus: where a client resumes from) are
/// admitted at any pressure while they fit: refusing them frees nothing, and a
/// client that cannot ask where to resume cannot give memory back in order.
pub const TINY_CALL: u64 = 64 * 1024;
/// Wait charges the wait room holds (see [`Limits::wait_room`]): enough for a
/// few clients to wait at once; more wait in the rest of the budget if it fits.
pub const WAIT_ROOM_CHARGES: u64 = 4;

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
    /// Share of the budget, in (0, 1], one client may hold while others wait;
    /// also its share of the wait queue.
    pub client_share: f64,
    /// Bytes of the budget kept for wait charges: admitted calls never take
    /// them, so a call can always wait (and be served by a reclaim) even when
    /// the calls holding memory filled the rest. 0 keeps no room.
    pub wait_room: u64,
}

impl Limits {
    /// `limit × ratio − reserve`, never below zero.
    pub fn budget_for(limit: u64, ratio: f64, reserve: u64) -> u64 {
        ((limit as f64 * ratio) as u64).saturating_sub(reserve)
    }

    /// Bytes one client may hold while others wait; a share of 1 is no cap.
    pub fn client_cap(&self) -> u64 {
        if self.client_share >= 1.0 {
            return u64::MAX;
        }
        (self.budget as f64 * self.client_share.max(0.0)) as u64
    }

    /// The wait room for `wait_charge` and `budget`: [`WAIT_ROOM_CHARGES`]
    /// charges, at most an eighth of the budget.
    pub fn wait_room_for(wait_charge: u64, budget: u64) -> u64 {
        wait_charge
            .saturating_mul(WAIT_ROOM_CHARGES)
            .min(budget / 8)
    }

    /// Calls one client may have waiting: its share of `queue_max`, at least one.
    pub fn client_queue_max(&self) -> usize {
        ((self.queue_max as f64 * self.client_share.clamp(0.0, 1.0)).ceil() as usize).max(1)
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
    /// The client already has its share of the wait queue.
    ClientQueueFull,
    /// The call, of a client over its share of the budget, gave its place in
    /// the queue to a client within its share that had no room to wait.
    Evicted,
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
            BusyReason::ClientQueueFull => "client_queue_full",
            BusyReason::Evicted => "evicted",
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
    /// Of `reserved`, what waiting calls hold as wait charges.
    pub charges: u64,
    /// Clients holding memory.
    pub clients: usize,
    /// What the client holding most holds (wait charges not included).
    pub largest_client: u64,
    /// Bytes over the budget (see [`Budget::overcommitted`]).
    pub overcommitted: u64,
}

/// The shared budget. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

/// A [`Budget`] that does not keep it alive (for hooks the budget itself holds).
#[derive(Clone)]
pub struct WeakBudget(std::sync::Weak<Inner>);

impl WeakBudget {
    pub fn upgrade(&self) -> Option<Budget> {
        self.0.upgrade().map(|inner| Budget { inner })
    }
}

struct Inner {
    state: Mutex<State>,
    /// Called with the size of each released permit (purge after large requests).
    on_release: Box<dyn Fn(u64) + Send + Sync>,
    /// Notified when a call starts waiting or the budget is exceeded.
    demand: tokio::sync::Notify,
}

struct State {
    limits: Limits,
    used: u64,
    baseline: u64,
    reserved: u64,
    pressure: Pressure,
    /// New calls waiting, per client, served in turns.
    queue: FairQueue<Waiter>,
    /// Calls waiting to grow what they hold: served before any new call.
    growers: VecDeque<Waiter>,
    next_id: u64,
    /// Sum of what waiting growers already hold (see [`Budget::try_grow`]).
    growers_hold: u64,
    /// Sum of the wait charges of queued waiters.
    charges: u64,
}

struct Waiter {
    id: u64,
    client: Arc<str>,
    /// Total the request needs; `charged` of it is already reserved.
    needed: u64,
    charged: u64,
    /// For a grower: what its call already holds.
    holds: u64,
    tx: oneshot::Sender<Outcome>,
}

/// What a waiting call gets: its permit, or (evicted) a rejection.
type Outcome = Result<Permit, Rejection>;

impl Waiting for Waiter {
    fn id(&self) -> u64 {
        self.id
    }
    fn needed(&self) -> u64 {
        self.needed
    }
    fn charged(&self) -> u64 {
        self.charged
    }
}

/// Bytes held in the budget for one client; released on drop.
#[must_use = "a permit releases its bytes when dropped"]
pub struct Permit {
    inner: Arc<Inner>,
    bytes: u64,
    client: Arc<str>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("bytes", &self.bytes)
            .field("client", &self.client)
            .finish()
    }
}

impl Permit {
    /// Bytes this permit holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The client the bytes are held for.
    pub fn client(&self) -> &Arc<str> {
        &self.client
    }

    /// Adds `other`'s bytes to this permit (the same client's).
    pub fn absorb(&mut self, mut other: Permit) {
        debug_assert!(Arc::ptr_eq(&self.inner, &other.inner));
        debug_assert_eq!(self.client, other.client);
        self.bytes += std::mem::take(&mut other.bytes);
    }

    /// Moves up to `bytes` of this permit into a new one, so the two can be
    /// released apart (a cut stream keeps only what the transport still buffers).
    pub fn split(&mut self, bytes: u64) -> Permit {
        let moved = bytes.min(self.bytes);
        self.bytes -= moved;
        Permit {
            inner: self.inner.clone(),
            bytes: moved,
            client: self.client.clone(),
        }
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
            st.queue.release(&self.client, self.bytes);
            st.update_pressure();
            st.grant(&self.inner)
        };
        deliver(grants);
        (self.inner.on_release)(self.bytes);
    }
}

/// Grants made under the lock, delivered after it is released (a permit that
/// nobody receives any more drops, and dropping takes the lock).
type Grants = Vec<(oneshot::Sender<Outcome>, Outcome)>;

fn deliver(grants: Grants) {
    for (tx, outcome) in grants {
        let _ = tx.send(outcome);
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

    /// The part of the wait room no charge uses yet: admitted calls leave it free.
    fn room_left(&self) -> u64 {
        self.limits.wait_room.saturating_sub(self.charges)
    }

    /// Whether a call of `bytes` may be admitted (the wait room kept free).
    fn fits(&self, bytes: u64) -> bool {
        self.fits_after_releasing(0, bytes)
    }

    /// Whether a wait charge of `charge` fits: in the wait room, else in the budget.
    fn fits_charge(&self, charge: u64) -> bool {
        charge <= self.room_left() || self.fits(charge)
    }

    /// [`State::fits_charge`] once `evicted` bytes of other waiters' charges go.
    fn fits_charge_after_evicting(&self, evicted: u64, charge: u64) -> bool {
        let room_left =
            (self.limits.wait_room).saturating_sub(self.charges.saturating_sub(evicted));
        charge <= room_left || self.fits_after_releasing(evicted, charge)
    }

    /// Bytes over the budget: reservations and the working set beyond a budget
    /// that shrank (a lower limit), what reclaiming must give back.
    pub(super) fn overcommitted(&self) -> u64 {
        self.committed().saturating_sub(self.limits.budget)
    }

    fn available(&self) -> u64 {
        self.limits.budget.saturating_sub(self.committed())
    }

    /// Whether the pressure level lets a request of `bytes` in.
    fn level_allows(&self, bytes: u64) -> bool {
        match self.pressure {
            Pressure::Normal => true,
            Pressure::Elevated => bytes <= self.limits.small_request,
            Pressure::Critical => bytes <= TINY_CALL,
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

    /// Whether `client`, given `bytes` more, would hold more than its share
    /// (a client holding nothing never does; a share of 1 is no cap).
    fn over_share(&self, client: &str, bytes: u64) -> bool {
        let held = self.queue.held(client);
        held > 0 && held.saturating_add(bytes) > self.limits.client_cap()
    }

    /// Whether the share cap keeps `client` from `bytes` more now: it would be
    /// over its share while another client holds memory or waits for it.
    fn capped(&self, client: &str, bytes: u64) -> bool {
        self.queue.others_active(client) && self.over_share(client, bytes)
    }

    /// Whether a call of `bytes` would fit once a waiter's charge of `release`
    /// bytes goes (it becomes part of the call's reservation), the wait room
    /// kept free for the other waiters.
    fn fits_after_releasing(&self, release: u64, bytes: u64) -> bool {
        self.excess_after_releasing(release, bytes) == 0
    }

    /// How far a call of `bytes` would take the budget over once `release`
    /// bytes of wait charges go (0: it fits), the wait room kept free for the
    /// other waiters. The one admission formula: fitting, eviction and what
    /// the reclaimer must free all ask it.
    fn excess_after_releasing(&self, release: u64, bytes: u64) -> u64 {
        let reserved = self.reserved.saturating_sub(release);
        let room_left =
            (self.limits.wait_room).saturating_sub(self.charges.saturating_sub(release));
        self.used
            .max(self.baseline.saturating_add(reserved))
            .saturating_add(room_left)
            .saturating_add(bytes)
            .saturating_sub(self.limits.budget)
    }

    fn waiting(&self) -> usize {
        self.queue.len() + self.growers.len()
    }

    /// Admits waiters while they fit: growers first, then new calls, the client
    /// whose turn it is first. Whoever is next waits until its call fits;
    /// nobody behind it jumps ahead (a large call is not starved by small ones).
    fn grant(&mut self, inner: &Arc<Inner>) -> Grants {
        let mut grants = Vec::new();
        loop {
            let cap = self.limits.client_cap();
            let next = match self.growers.front() {
                Some(g) => Some((g.charged, g.needed)),
                None => self.queue.next(cap).map(|(_, w)| (w.charged, w.needed)),
            };
            let Some((charged, needed)) = next else { break };
            // The rule a new call meets, its own wait charge aside: when the
            // working set dominates, the charge does not raise it, so checking
            // only `needed - charged` would admit calls that do not fit.
            if !self.fits_after_releasing(charged, needed) || !self.level_allows(needed) {
                break;
            }
            let extra = needed - charged;
            let w = match self.growers.pop_front() {
                Some(g) => g,
                None => {
                    let client = self.queue.next(cap).expect("checked above").0.clone();
                    self.queue.pop(&client).expect("client has a waiter")
                }
            };
            self.reserved += extra;
            self.growers_hold -= w.holds;
            self.charges -= w.charged;
            self.queue.hold(&w.client, w.needed);
            grants.push((
                w.tx,
                Ok(Permit {
                    inner: inner.clone(),
                    bytes: w.needed,
                    client: w.client,
                }),
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
    client: Arc<str>,
    grower: bool,
    rx: Option<oneshot::Receiver<Outcome>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl Ticket {
    /// The permit, if it has been granted already (non-blocking).
    pub fn try_take(&mut self) -> Option<Permit> {
        self.try_outcome()?.ok()
    }

    /// The permit, or the rejection of a call evicted from the queue, if
    /// either has come (non-blocking).
    pub fn try_outcome(&mut self) -> Option<Result<Permit, Rejection>> {
        self.rx.as_mut()?.try_recv().ok()
    }

    /// Waits up to `max_wait` for the permit.
    pub async fn wait(mut self, max_wait: Duration) -> Result<Permit, Rejection> {
        let Some(rx) = self.rx.as_mut() else {
            unreachable!("a ticket is waited on once")
        };
        match tokio::time::timeout(max_wait, rx).await {
            Ok(Ok(outcome)) => outcome,
            _ => {
                let st = self.inner.lock();
                let needed = if self.grower {
                    st.growers.iter().find(|w| w.id == self.id)
                } else {
                    st.queue.get(&self.client, self.id)
                }
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
            let w = if self.grower {
                let pos = st.growers.iter().position(|w| w.id == self.id);
                pos.and_then(|pos| st.growers.remove(pos))
            } else {
                st.queue.remove(&self.client, self.id)
            };
            let Some(w) = w else {
                // Already granted: the permit, if never received, drops with the channel.
                return;
            };
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
        waiting: st.waiting(),
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
                    queue: FairQueue::new(),
                    growers: VecDeque::new(),
                    next_id: 0,
                    growers_hold: 0,
                    charges: 0,
                }),
                on_release: Box::new(on_release),
                demand: tokio::sync::Notify::new(),
            }),
        }
    }

    /// A handle that does not keep the budget alive.
    pub fn downgrade(&self) -> WeakBudget {
        WeakBudget(Arc::downgrade(&self.inner))
    }

    /// [`Budget::try_acquire_for`] a call that names no client.
    pub fn try_acquire(&self, bytes: u64) -> Result<Admission, Rejection> {
        self.try_acquire_for(&UNKNOWN, bytes)
    }

    /// Takes `bytes` for `client` now if they fit and nobody is waiting; else
    /// joins the client's queue (reserving the wait charge), or rejects when the
    /// queue (or the client's share of it) is full or even waiting cannot be afforded.
    pub fn try_acquire_for(&self, client: &Arc<str>, bytes: u64) -> Result<Admission, Rejection> {
        let (ticket, grants) = {
            let mut st = self.inner.lock();
            if bytes > st.limits.budget {
                return Err(Rejection::NeverFits {
                    needed: bytes,
                    budget: st.limits.budget,
                    limit: st.limits.limit,
                });
            }
            if st.waiting() == 0
                && st.level_allows(bytes)
                && st.fits(bytes)
                && !st.capped(client, bytes)
            {
                st.reserved += bytes;
                st.queue.hold(client, bytes);
                st.update_pressure();
                return Ok(Admission::Now(Permit {
                    inner: self.inner.clone(),
                    bytes,
                    client: client.clone(),
                }));
            }
            // New calls only: admitted calls waiting to grow (a Write whose
            // messages got larger) must not fill the queue for everyone else.
            if st.queue.len() >= st.limits.queue_max {
                return Err(busy(&st, bytes, BusyReason::QueueFull));
            }
            if st.queue.queued(client) >= st.limits.client_queue_max() {
                return Err(busy(&st, bytes, BusyReason::ClientQueueFull));
            }
            let charge = st.limits.wait_charge.min(bytes);
            // A client flooding the queue must not lock the others out of it:
            // one within its share may take the place of a call of a client
            // over its share (which gets RESOURCE_EXHAUSTED, as if it had come
            // a moment later).
            let mut outcomes = Vec::new();
            if !st.fits_charge(charge) && !st.over_share(client, bytes) {
                let cap = st.limits.client_cap();
                if st.fits_charge_after_evicting(st.queue.evictable(cap, client), charge) {
                    while !st.fits_charge(charge) {
                        let w = st.queue.evict(cap, client).expect("evictable charges");
                        st.reserved -= w.charged;
                        st.charges -= w.charged;
                        let rejection = busy(&st, w.needed, BusyReason::Evicted);
                        outcomes.push((w.tx, Err(rejection)));
                    }
                    st.update_pressure();
                }
            }
            if !st.fits_charge(charge) {
                return Err(busy(&st, bytes, BusyReason::NoRoomToWait));
            }
            st.reserved += charge;
            st.charges += charge;
            let ticket = self.enqueue(&mut st, client, bytes, charge, None);
            // Its turn may be now: the clients ahead may all be over their share.
            outcomes.extend(st.grant(&self.inner));
            (ticket, outcomes)
        };
        deliver(grants);
        Ok(Admission::Queued(ticket))
    }

    /// Queues a call of `client` needing `needed` (of which `charged` is already
    /// reserved); a grower (`grows`: what its call holds) goes ahead of every new call.
    fn enqueue(
        &self,
        st: &mut State,
        client: &Arc<str>,
        needed: u64,
        charged: u64,
        grows: Option<u64>,
    ) -> Ticket {
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = oneshot::channel();
        let grower = grows.is_some();
        let holds = grows.unwrap_or(0);
        let w = Waiter {
            id,
            client: client.clone(),
            needed,
            charged,
            holds,
            tx,
        };
        if grower {
            st.growers.push_back(w);
        } else {
            st.queue.push(client, w);
        }
        st.growers_hold += holds;
        st.update_pressure();
        self.inner.demand.notify_one();
        Ticket {
            inner: self.inner.clone(),
            id,
            client: client.clone(),
            grower,
            rx: Some(rx),
        }
    }

    /// [`Budget::try_grow_for`] a call that names no client.
    pub fn try_grow(&self, holds: u64, extra: u64) -> Result<Admission, Rejection> {
        self.try_grow_for(&UNKNOWN, holds, extra)
    }

    /// Adds `extra` bytes for a call of `client` that already holds `holds` (an
    /// echo learnt after decoding). It goes ahead of the queue and past the
    /// client's share, since finishing it frees memory; it is rejected at once
    /// when everything it could wait for is itself waiting to grow
    /// (hold-and-wait would deadlock).
    pub fn try_grow_for(
        &self,
        client: &Arc<str>,
        holds: u64,
        extra: u64,
    ) -> Result<Admission, Rejection> {
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
            st.queue.hold(client, extra);
            st.update_pressure();
            return Ok(Admission::Now(Permit {
                inner: self.inner.clone(),
                bytes: extra,
                client: client.clone(),
            }));
        }
        let releasable = st
            .reserved
            .saturating_sub(holds + st.growers_hold + st.charges);
        if releasable == 0 {
            return Err(busy(&st, extra, BusyReason::WouldDeadlock));
        }
        Ok(Admission::Queued(self.enqueue(
            &mut st,
            client,
            extra,
            0,
            Some(holds),
        )))
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
            if st.reserved == 0 && st.waiting() == 0 {
                st.baseline = used;
            } else {
                // Busy: the idle footprint is at most what is in use now.
                st.baseline = st.baseline.min(used);
            }
            st.update_pressure();
            if st.overcommitted() > 0 {
                self.inner.demand.notify_one();
            }
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
            waiting: st.waiting(),
            pressure: st.pressure,
            charges: st.charges,
            clients: st.queue.holdings().count(),
            largest_client: st.queue.holdings().map(|(_, b)| b).max().unwrap_or(0),
            overcommitted: st.overcommitted(),
        }
    }

    /// What reclaiming needs to know now, or `None` when nobody waits and the
    /// budget holds everything (nothing to reclaim for).
    pub(super) fn reclaim_inputs(&self) -> Option<super::reclaim::Demand> {
        let st = self.inner.lock();
        let over = st.overcommitted();
        let cap = st.limits.client_cap();
        // A client over its share while another holds memory: the cap binds
        // even when nobody waits at this moment.
        let capped = st.limits.client_share < 1.0
            && st.queue.holdings().count() > 1
            && st.queue.holdings().any(|(_, held)| held > cap);
        if st.waiting() == 0 && over == 0 && !capped {
            return None;
        }
        // What the next waiter in turn still lacks once its charge is its own.
        let head = match st.growers.front() {
            Some(g) => Some((g.charged, g.needed)),
            None => st.queue.next(cap).map(|(_, w)| (w.charged, w.needed)),
        };
        let lacking = head.map_or(0, |(charged, needed)| {
            st.excess_after_releasing(charged, needed)
        });
        Some(super::reclaim::Demand {
            waiting: st.queue.waiting_clients().cloned().collect(),
            growers: !st.growers.is_empty(),
            held: st.queue.holdings().map(|(k, b)| (k.clone(), b)).collect(),
            cap: if st.limits.client_share >= 1.0 {
                None
            } else {
                Some(cap)
            },
            lacking,
            over,
            critical: st.pressure == Pressure::Critical,
        })
    }

    /// Wakes when a call starts waiting or the budget is exceeded: the
    /// reclaimer sleeps on it while nothing is to be done.
    pub(super) fn demand_changed(&self) -> &tokio::sync::Notify {
        &self.inner.demand
    }

    /// Bytes over the budget now: what a limit that shrank below the
    /// reservations (and the working set) leaves to give back.
    pub fn overcommitted(&self) -> u64 {
        self.inner.lock().overcommitted()
    }

    /// Bytes `client` holds in granted permits (wait charges not included).
    pub fn client_held(&self, client: &str) -> u64 {
        self.inner.lock().queue.held(client)
    }

    /// Suggested client back-off (gRFC A6 pushback): longer as the queue grows,
    /// with ±20% jitter so clients rejected together do not all come back together.
    pub fn pushback(&self) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let waiting = self.inner.lock().waiting() as u64;
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
            client_share: 1.0,
            wait_room: 0,
        }
    }

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn queued(a: Result<Admission, Rejection>) -> Ticket {
        match a {
            Ok(Admission::Queued(t)) => t,
            Ok(Admission::Now(p)) => panic!("admitted at once: {p:?}"),
            Err(e) => panic!("{e}"),
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
        // At critical pressure only a tiny call (QueryWriteStatus) gets in.
        drop(now(b.try_acquire(TINY_CALL)));
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

    /// Half the budget per client; pressure levels out of the way.
    fn shared(budget: u64) -> Limits {
        Limits {
            client_share: 0.5,
            small_request: budget,
            ..limits(budget)
        }
    }

    #[test]
    fn waiting_clients_take_turns() {
        let (a, b) = (key("a"), key("b"));
        let bud = Budget::new(shared(100 * MIB), |_| {});
        let hold = now(bud.try_acquire_for(&a, 90 * MIB));
        // a queues two calls before b queues one.
        let mut a1 = queued(bud.try_acquire_for(&a, 40 * MIB));
        let mut a2 = queued(bud.try_acquire_for(&a, 40 * MIB));
        let mut b1 = queued(bud.try_acquire_for(&b, 40 * MIB));
        drop(hold);
        // Room for two: a's first, then b's turn, ahead of a's second (FIFO
        // would have granted a1 and a2).
        let a1 = a1.try_take().expect("a1 granted");
        let b1 = b1.try_take().expect("b1 granted before a2");
        assert!(a2.try_take().is_none());
        assert_eq!(bud.client_held("a"), 40 * MIB);
        assert_eq!(bud.client_held("b"), 40 * MIB);
        drop((a1, b1));
        assert!(a2.try_take().is_some());
    }

    #[test]
    fn a_client_over_its_share_waits_while_others_are_served() {
        let (a, b) = (key("a"), key("b"));
        let bud = Budget::new(shared(100 * MIB), |_| {});
        // Nobody waits: a may take more than its share (50 MiB).
        let p1 = now(bud.try_acquire_for(&a, 40 * MIB));
        let _p2 = now(bud.try_acquire_for(&a, 55 * MIB));
        let mut a3 = queued(bud.try_acquire_for(&a, 30 * MIB));
        let mut b1 = queued(bud.try_acquire_for(&b, 30 * MIB));
        drop(p1);
        // a, first in turn, would hold 85 MiB: over its share while b waits.
        let b1 = b1.try_take().expect("b served first");
        assert!(a3.try_take().is_none(), "no room left for a");
        drop(b1);
        assert!(a3.try_take().is_some(), "a next");
        assert_eq!(bud.client_held("a"), 55 * MIB);
    }

    #[test]
    fn a_new_client_goes_past_a_client_over_its_share() {
        let (a, b) = (key("a"), key("b"));
        let bud = Budget::new(shared(100 * MIB), |_| {});
        let _p = now(bud.try_acquire_for(&a, 90 * MIB));
        let mut a2 = queued(bud.try_acquire_for(&a, 20 * MIB));
        // 5 MiB fit; a's waiting call is ahead in the queue but a is over its share.
        let mut b1 = queued(bud.try_acquire_for(&b, 5 * MIB));
        assert_eq!(b1.try_take().map(|p| p.bytes()), Some(5 * MIB));
        assert!(a2.try_take().is_none());
    }

    #[test]
    fn a_client_gets_its_share_of_the_queue() {
        let (a, b) = (key("a"), key("b"));
        // queue_max 4, share 0.5: two waiters per client.
        let bud = Budget::new(shared(100 * MIB), |_| {});
        let _p = now(bud.try_acquire_for(&a, 90 * MIB));
        let _t: Vec<_> = (0..2)
            .map(|_| queued(bud.try_acquire_for(&a, 20 * MIB)))
            .collect();
        let e = bud
            .try_acquire_for(&a, 20 * MIB)
            .expect_err("a's share is full");
        assert!(matches!(
            e,
            Rejection::Busy {
                reason: BusyReason::ClientQueueFull,
                ..
            }
        ));
        let _b = queued(bud.try_acquire_for(&b, 20 * MIB));
    }

    #[test]
    fn split_permits_release_apart() {
        let a = key("a");
        let bud = Budget::new(limits(100 * MIB), |_| {});
        let mut p = now(bud.try_acquire_for(&a, 10 * MIB));
        let kept = p.split(2 * MIB);
        assert_eq!((p.bytes(), kept.bytes()), (8 * MIB, 2 * MIB));
        drop(p);
        assert_eq!(bud.view().reserved, 2 * MIB);
        assert_eq!(bud.client_held("a"), 2 * MIB);
        let mut small = kept;
        assert_eq!(
            small.split(5 * MIB).bytes(),
            2 * MIB,
            "at most what it holds"
        );
        drop(small);
        assert_eq!(bud.view().reserved, 0);
        assert_eq!(bud.client_held("a"), 0);
    }

    #[test]
    fn a_client_within_its_share_takes_the_place_of_one_over_it() {
        let (a, b) = (key("a"), key("b"));
        let limits = Limits {
            queue_max: 8,
            ..shared(100 * MIB)
        };
        let bud = Budget::new(limits, |_| {});
        let _p = now(bud.try_acquire_for(&a, 98 * MIB));
        // a alone takes every place there is room for.
        let mut a1 = queued(bud.try_acquire_for(&a, 20 * MIB));
        let mut a2 = queued(bud.try_acquire_for(&a, 20 * MIB));
        let e = bud.try_acquire_for(&a, 20 * MIB).expect_err("no room");
        assert!(matches!(
            e,
            Rejection::Busy {
                reason: BusyReason::NoRoomToWait,
                ..
            }
        ));
        // b holds nothing: a's newest call gives its place up.
        let mut b1 = queued(bud.try_acquire_for(&b, 20 * MIB));
        assert!(matches!(
            a2.try_outcome(),
            Some(Err(Rejection::Busy {
                reason: BusyReason::Evicted,
                ..
            }))
        ));
        assert!(a1.try_outcome().is_none(), "a's older call still waits");
        assert!(b1.try_outcome().is_none());
        assert_eq!(bud.view().reserved, 100 * MIB);
        assert_eq!(bud.view().waiting, 2);
        drop(a2);
        assert_eq!(
            bud.view().reserved,
            100 * MIB,
            "its charge went at eviction"
        );
    }
}
