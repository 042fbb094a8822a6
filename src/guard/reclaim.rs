//! Taking memory back from calls that hold it without using it, while other
//! calls wait for it (or while a limit that shrank leaves the budget exceeded).
//!
//! The budget reserves a call's worst case when it is admitted; a stream whose
//! client then goes quiet keeps that reservation until the watchdog's
//! `stream_idle_timeout` (tens of seconds). While calls wait, the reclaimer
//! ends such streams instead, in this order, each list largest reservation
//! first, and only as much as needed:
//!
//! 1. **share**: while another client waits or holds memory, a client holding
//!    more than its share (`max_client_share` of the budget) loses its quiet
//!    streams (waiting on their client for [`QUIET_FOR_SHARE`]) until it is back
//!    within its share;
//! 2. **overcommit**: while the budget is exceeded (the limit shrank below what
//!    is reserved), quiet streams of anyone, and at critical pressure any
//!    stream, until the reservations fit again;
//! 3. **idle**: while the next waiting call does not fit, streams quiet for
//!    `memory.reclaim_grace`, until it does.
//!
//! A stream that keeps receiving (or whose client keeps reading) is never
//! quiet, so it is never reclaimed below critical pressure; a stream waiting on
//! the disk or the object store is not waiting on its client, so it is not
//! quiet either. A reclaimed call ends like a stalled one (see [`super::watch`]):
//! an upload is suspended and stays resumable from its committed offset, and the
//! client gets `RESOURCE_EXHAUSTED` with a pushback.
//!
//! - [`plan`]: the pure choice of victims;
//! - [`Holders`]: the admitted calls that can be reclaimed;
//! - [`run`]: the task that wakes when calls wait and reclaims.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a stream must have waited on its client before a client over its
/// share loses it: longer than a frame takes on a busy link, far shorter than
/// the grace of the idle rule.
pub const QUIET_FOR_SHARE: Duration = Duration::from_millis(250);

/// How often the reclaimer looks again while calls wait (quiet periods grow).
const TICK: Duration = Duration::from_millis(50);

/// Why a call's memory was taken back; bounded, for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReclaimReason {
    /// Its client held more than its share while another client waited.
    Share,
    /// It was quiet for `memory.reclaim_grace` while a call waited.
    Idle,
    /// The budget shrank below what was reserved.
    Overcommit,
}

impl ReclaimReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReclaimReason::Share => "share",
            ReclaimReason::Idle => "idle",
            ReclaimReason::Overcommit => "overcommit",
        }
    }
}

/// What the budget needs, read from it under its lock ([`super::budget::Budget::reclaim_inputs`]).
#[derive(Debug, Clone, Default)]
pub struct Demand {
    /// Clients with calls waiting.
    pub waiting: Vec<Arc<str>>,
    /// Whether admitted calls wait to grow (they count as waiting for the idle rule).
    pub growers: bool,
    /// Bytes held per client.
    pub held: HashMap<Arc<str>, u64>,
    /// A client's share while others wait; `None` for no cap.
    pub cap: Option<u64>,
    /// What the next waiting call lacks to fit.
    pub lacking: u64,
    /// Bytes over the budget.
    pub over: u64,
    /// Critical pressure: an exceeded budget may take calls that are not quiet.
    pub critical: bool,
}

/// An admitted call that could be reclaimed, as it is now.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: u64,
    pub client: Arc<str>,
    pub bytes: u64,
    /// How long it has been waiting on its client; `None` while data moves or
    /// the server itself is busy with it.
    pub quiet: Option<Duration>,
}

/// The victims, in order, with the reason for each: see the module docs. A
/// zero `grace` turns the idle rule off.
pub fn plan(
    candidates: &[Candidate],
    demand: &Demand,
    grace: Duration,
) -> Vec<(u64, ReclaimReason)> {
    let mut p = Picker {
        taken: HashSet::new(),
        victims: Vec::new(),
        held: demand.held.clone(),
        freed: 0,
    };
    let mut by_size: Vec<&Candidate> = candidates.iter().collect();
    by_size.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.id.cmp(&b.id)));

    // 1. Clients over their share while someone else waits or holds memory.
    if let Some(cap) = demand.cap {
        for c in &by_size {
            let others_active = demand.waiting.iter().any(|w| *w != c.client)
                || demand.held.keys().any(|k| *k != c.client);
            let over = p.held.get(&c.client).is_some_and(|h| *h > cap);
            if others_active && over && c.quiet.is_some_and(|q| q >= QUIET_FOR_SHARE) {
                p.take(c, ReclaimReason::Share);
            }
        }
    }

    // 2. An exceeded budget: quiet calls first, then (critical) any.
    if demand.over > 0 {
        for any in [false, true] {
            if any && !demand.critical {
                break;
            }
            for c in &by_size {
                if p.freed >= demand.over {
                    break;
                }
                if !p.taken.contains(&c.id) && (any || c.quiet.is_some()) {
                    p.take(c, ReclaimReason::Overcommit);
                }
            }
        }
    }

    // 3. The next waiting call does not fit: calls quiet for the grace.
    let someone_waits = !demand.waiting.is_empty() || demand.growers;
    if someone_waits && !grace.is_zero() {
        for c in &by_size {
            if p.freed >= demand.lacking {
                break;
            }
            if !p.taken.contains(&c.id) && c.quiet.is_some_and(|q| q >= grace) {
                p.take(c, ReclaimReason::Idle);
            }
        }
    }
    p.victims
}

/// The victims chosen so far, and what taking them frees.
struct Picker {
    taken: HashSet<u64>,
    victims: Vec<(u64, ReclaimReason)>,
    held: HashMap<Arc<str>, u64>,
    freed: u64,
}

impl Picker {
    fn take(&mut self, c: &Candidate, reason: ReclaimReason) {
        self.taken.insert(c.id);
        self.victims.push((c.id, reason));
        self.freed += c.bytes;
        if let Some(h) = self.held.get_mut(&c.client) {
            *h = h.saturating_sub(c.bytes);
        }
    }
}

/// A call the reclaimer can end: implemented by the stream watchdog's state.
pub(super) trait Holder: Send + Sync {
    /// Its client and what it holds, once admitted.
    fn holding(&self) -> Option<(Arc<str>, u64)>;
    /// See [`Candidate::quiet`].
    fn quiet_for(&self, now: Instant) -> Option<Duration>;
    /// The method, for logs and metrics.
    fn method(&self) -> &'static str;
    /// Ends the call, its status saying why; false if it had already ended.
    fn reclaim(&self, reason: ReclaimReason, bytes: u64, pushback: Duration) -> bool;
}

/// The admitted calls that can be reclaimed, by id. Entries are weak: a call
/// that ended is gone at the next look.
#[derive(Default)]
pub(super) struct Holders {
    calls: Mutex<HashMap<u64, Weak<dyn Holder>>>,
    next: AtomicU64,
}

impl Holders {
    /// Registers a call; it stays reclaimable until it is dropped.
    pub(super) fn add(&self, holder: Weak<dyn Holder>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, holder);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<dyn Holder>>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live calls, dropping the entries of those that ended.
    fn live(&self) -> Vec<(u64, Arc<dyn Holder>)> {
        let mut calls = self.lock();
        calls.retain(|_, w| w.strong_count() > 0);
        calls
            .iter()
            .filter_map(|(id, w)| Some((*id, w.upgrade()?)))
            .collect()
    }
}

/// The reclaimer: sleeps until a call waits or the budget is exceeded, then
/// reclaims by [`plan`] every [`TICK`] while that lasts. Ends with the guard.
pub(super) async fn run(guard: super::handle::WeakGuard) {
    loop {
        let Some(g) = guard.upgrade() else { return };
        let demand = g.budget().reclaim_inputs();
        let notified = {
            let budget = g.budget().clone();
            async move { budget.demand_changed().notified().await }
        };
        match demand {
            None => {
                drop(g);
                // Bounded, so the task notices the guard is gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            }
            Some(demand) => {
                reclaim_once(&g, &demand);
                drop(g);
                tokio::time::sleep(TICK).await;
            }
        }
    }
}

/// One look: plans and ends the victims.
fn reclaim_once(guard: &super::Guard, demand: &Demand) {
    let now = Instant::now();
    let holders = guard.holders().live();
    let candidates: Vec<Candidate> = holders
        .iter()
        .filter_map(|(id, h)| {
            let (client, bytes) = h.holding()?;
            Some(Candidate {
                id: *id,
                client,
                bytes,
                quiet: h.quiet_for(now),
            })
        })
        .collect();
    let victims = plan(&candidates, demand, guard.settings().reclaim_grace);
    if victims.is_empty() {
        return;
    }
    let pushback = guard.budget().pushback();
    for (id, reason) in victims {
        let Some((_, h)) = holders.iter().find(|(i, _)| *i == id) else {
            continue;
        };
        let Some(c) = candidates.iter().find(|c| c.id == id) else {
            continue;
        };
        if h.reclaim(reason, c.bytes, pushback) {
            tracing::info!(
                client = %c.client,
                method = h.method(),
                bytes = c.bytes,
                reason = reason.as_str(),
                quiet_ms = c.quiet.map_or(0, |q| q.as_millis() as u64),
                "memory reclaimed from a call"
            );
            guard
                .observer()
                .reclaimed(h.method(), reason.as_str(), c.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SEC: Duration = Duration::from_secs(1);

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn call(id: u64, client: &str, mib: u64, quiet_ms: Option<u64>) -> Candidate {
        Candidate {
            id,
            client: key(client),
            bytes: mib * MIB,
            quiet: quiet_ms.map(Duration::from_millis),
        }
    }

    fn demand(calls: &[Candidate], waiting: &[&str]) -> Demand {
        let mut held = HashMap::new();
        for c in calls {
            *held.entry(c.client.clone()).or_insert(0) += c.bytes;
        }
        Demand {
            waiting: waiting.iter().map(|w| key(w)).collect(),
            held,
            cap: Some(100 * MIB),
            ..Demand::default()
        }
    }

    #[test]
    fn a_client_over_its_share_loses_its_quiet_streams_largest_first() {
        let calls = [
            call(1, "flood", 20, Some(5000)),
            call(2, "flood", 30, Some(5000)),
            call(3, "flood", 60, Some(300)),
            call(4, "flood", 40, None),
            call(5, "good", 10, Some(9000)),
        ];
        let d = demand(&calls, &["good"]);
        // flood holds 150 of a 100 cap: its 60 (quiet 300 ms) goes, then it is
        // at 90; the busy one and the other client's are never touched.
        assert_eq!(plan(&calls, &d, SEC), vec![(3, ReclaimReason::Share)]);
    }

    #[test]
    fn a_client_alone_keeps_what_it_holds() {
        let calls = [call(1, "flood", 150, Some(5000))];
        assert!(plan(&calls, &demand(&calls, &["flood"]), SEC).is_empty());
        assert!(plan(&calls, &demand(&calls, &[]), SEC).is_empty());
    }

    #[test]
    fn another_client_holding_memory_is_protected_by_the_share_too() {
        let calls = [
            call(1, "flood", 60, Some(5000)),
            call(2, "flood", 60, Some(5000)),
            call(3, "good", 10, None),
        ];
        // Nobody waits, but the good client holds memory: the flooder's 120
        // go down to its 100.
        assert_eq!(
            plan(&calls, &demand(&calls, &[]), SEC),
            vec![(1, ReclaimReason::Share)]
        );
    }

    #[test]
    fn a_waiter_that_does_not_fit_takes_streams_idle_for_the_grace_only() {
        let calls = [
            call(1, "a", 20, Some(1500)),
            call(2, "b", 30, Some(800)),
            call(3, "c", 25, Some(4000)),
            call(4, "d", 50, None),
        ];
        let mut d = demand(&calls, &["e"]);
        d.lacking = 30 * MIB;
        // Idle for the grace: 3 (25) and 1 (20), largest first, enough for 30.
        assert_eq!(
            plan(&calls, &d, SEC),
            vec![(3, ReclaimReason::Idle), (1, ReclaimReason::Idle)]
        );
        d.lacking = 10 * MIB;
        assert_eq!(plan(&calls, &d, SEC), vec![(3, ReclaimReason::Idle)]);
        d.lacking = 0;
        assert!(plan(&calls, &d, SEC).is_empty());
    }

    #[test]
    fn an_exceeded_budget_takes_quiet_calls_then_at_critical_any() {
        let calls = [call(1, "a", 40, None), call(2, "b", 10, Some(10))];
        let mut d = demand(&calls, &[]);
        d.over = 30 * MIB;
        assert_eq!(plan(&calls, &d, SEC), vec![(2, ReclaimReason::Overcommit)]);
        d.critical = true;
        assert_eq!(
            plan(&calls, &d, SEC),
            vec![
                (2, ReclaimReason::Overcommit),
                (1, ReclaimReason::Overcommit)
            ]
        );
    }

    #[test]
    fn share_reclaims_count_toward_what_a_waiter_lacks() {
        let calls = [
            call(1, "flood", 80, Some(400)),
            call(2, "flood", 80, Some(400)),
            call(3, "x", 30, Some(5000)),
        ];
        let mut d = demand(&calls, &["good"]);
        d.lacking = 50 * MIB;
        // The share rule frees 80, more than the 50 lacking: nothing idle goes.
        assert_eq!(plan(&calls, &d, SEC), vec![(1, ReclaimReason::Share)]);
    }
}
