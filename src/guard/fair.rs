//! Fairness across clients for the budget's wait queue: every client's waiting
//! calls form their own FIFO, clients take turns (round-robin), and while other
//! clients wait, a client already holding its share of the budget lets them go
//! first. Pure bookkeeping for [`super::budget`]: bytes held per client and whose
//! turn it is; it never decides whether memory fits.
//!
//! Round-robin rather than deficit-based: what is shared is memory held for a
//! while, not bandwidth, and a call's size is already bounded by the share cap,
//! so counting turns in calls keeps the rule easy to state: when memory frees,
//! the next waiting client in turn gets it, whatever the others queued.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

/// What the queue needs to know about a waiting call.
pub(super) trait Waiting {
    fn id(&self) -> u64;
    /// The call's whole reservation once granted.
    fn needed(&self) -> u64;
    /// What it holds while it waits (its wait charge).
    fn charged(&self) -> u64;
}

/// Per-client queues and holdings. A client with nothing held and nothing
/// waiting has no entry, so the map stays as small as the set of active clients.
pub(super) struct FairQueue<W> {
    clients: HashMap<Arc<str>, Client<W>>,
    /// Clients with calls waiting, in turn order: the front is served next.
    turn: VecDeque<Arc<str>>,
    len: usize,
}

struct Client<W> {
    /// Bytes of granted permits (wait charges not included).
    held: u64,
    queue: VecDeque<W>,
}

impl<W> Default for Client<W> {
    fn default() -> Self {
        Self {
            held: 0,
            queue: VecDeque::new(),
        }
    }
}

impl<W: Waiting> FairQueue<W> {
    pub(super) fn new() -> Self {
        Self {
            clients: HashMap::new(),
            turn: VecDeque::new(),
            len: 0,
        }
    }

    /// Calls waiting, all clients together.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Calls `client` has waiting.
    pub(super) fn queued(&self, client: &str) -> usize {
        self.clients.get(client).map_or(0, |c| c.queue.len())
    }

    /// Bytes `client` holds in granted permits.
    pub(super) fn held(&self, client: &str) -> u64 {
        self.clients.get(client).map_or(0, |c| c.held)
    }

    /// Whether a client other than `client` holds memory or waits for it.
    pub(super) fn others_active(&self, client: &str) -> bool {
        self.clients.keys().any(|k| &**k != client)
    }

    /// Clients with calls waiting, in turn order.
    pub(super) fn waiting_clients(&self) -> impl Iterator<Item = &Arc<str>> {
        self.turn.iter()
    }

    /// Every client holding bytes, with what it holds.
    pub(super) fn holdings(&self) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.clients
            .iter()
            .filter(|(_, c)| c.held > 0)
            .map(|(k, c)| (k, c.held))
    }

    fn entry(&mut self, client: &Arc<str>) -> &mut Client<W> {
        // Look up by &str first: the common case needs no Arc clone.
        if !self.clients.contains_key(&**client) {
            self.clients.insert(client.clone(), Client::default());
        }
        self.clients.get_mut(&**client).expect("just inserted")
    }

    /// `client` was granted `bytes`.
    pub(super) fn hold(&mut self, client: &Arc<str>, bytes: u64) {
        self.entry(client).held += bytes;
    }

    /// `client` released `bytes` it held.
    pub(super) fn release(&mut self, client: &str, bytes: u64) {
        let c = self
            .clients
            .get_mut(client)
            .expect("budget accounting: release by a client holding nothing");
        c.held = c
            .held
            .checked_sub(bytes)
            .expect("budget accounting: client released more than it held");
        self.forget_if_idle(client);
    }

    fn forget_if_idle(&mut self, client: &str) {
        if self
            .clients
            .get(client)
            .is_some_and(|c| c.held == 0 && c.queue.is_empty())
        {
            self.clients.remove(client);
        }
    }

    /// Queues `w` behind `client`'s other waiting calls; a client that had none
    /// takes its turn after the clients already waiting.
    pub(super) fn push(&mut self, client: &Arc<str>, w: W) {
        let c = self.entry(client);
        c.queue.push_back(w);
        if c.queue.len() == 1 {
            self.turn.push_back(client.clone());
        }
        self.len += 1;
    }

    /// The waiting call `id` of `client`, if it is still waiting.
    pub(super) fn get(&self, client: &str, id: u64) -> Option<&W> {
        self.clients
            .get(client)?
            .queue
            .iter()
            .find(|w| w.id() == id)
    }

    /// Takes the waiting call `id` of `client` out of the queue.
    pub(super) fn remove(&mut self, client: &str, id: u64) -> Option<W> {
        let c = self.clients.get_mut(client)?;
        let pos = c.queue.iter().position(|w| w.id() == id)?;
        let w = c.queue.remove(pos).expect("position exists");
        if c.queue.is_empty() {
            self.turn.retain(|t| &**t != client);
        }
        self.len -= 1;
        self.forget_if_idle(client);
        Some(w)
    }

    /// Whether `c`'s next call would take it past `cap` while it holds something.
    fn over(c: &Client<W>, cap: u64) -> bool {
        let needed = c.queue.front().map_or(0, Waiting::needed);
        c.held > 0 && c.held.saturating_add(needed) > cap
    }

    /// Wait charges held by the waiting calls of clients other than `except`
    /// that are over their share (`cap`): what [`FairQueue::evict`] can free.
    pub(super) fn evictable(&self, cap: u64, except: &str) -> u64 {
        self.turn
            .iter()
            .filter(|c| &***c != except)
            .filter_map(|c| self.clients.get(&**c))
            .filter(|c| Self::over(c, cap))
            .flat_map(|c| c.queue.iter().map(Waiting::charged))
            .sum()
    }

    /// Takes out the newest waiting call of the client furthest past its share
    /// (`cap`), other than `except`: the call that gives its place up so that a
    /// client within its share can wait.
    pub(super) fn evict(&mut self, cap: u64, except: &str) -> Option<W> {
        let client = self
            .turn
            .iter()
            .filter(|c| &***c != except)
            .filter(|c| self.clients.get(&***c).is_some_and(|c| Self::over(c, cap)))
            .max_by_key(|c| self.clients.get(&***c).map_or(0, |c| c.held))?
            .clone();
        let c = self.clients.get_mut(&*client)?;
        let w = c.queue.pop_back()?;
        if c.queue.is_empty() {
            self.turn.retain(|t| *t != client);
        }
        self.len -= 1;
        self.forget_if_idle(&client);
        Some(w)
    }

    /// Whether `client`'s next call stays within `cap`: always when no other
    /// client holds memory or waits for it, and for a client holding nothing
    /// (a single call larger than the share still gets its turn instead of
    /// starving). The cap protects clients that hold memory as well as those
    /// that wait: a client already served is not crowded out of its next
    /// message by a flooder's queued calls.
    fn within_share(&self, client: &str, cap: u64) -> bool {
        let Some(c) = self.clients.get(client) else {
            return true;
        };
        let needed = c.queue.front().map_or(0, Waiting::needed);
        let others_active = self.clients.len() > 1;
        !others_active || c.held == 0 || c.held.saturating_add(needed) <= cap
    }

    /// Whose turn it is, and their next call: the first client in turn order
    /// within its share (`cap` bytes). When every waiting client is over its
    /// share and no other client holds memory, the front one (the cap then
    /// protects nobody); while another client holds memory, nobody over its
    /// share is served.
    pub(super) fn next(&self, cap: u64) -> Option<(&Arc<str>, &W)> {
        let client = self
            .turn
            .iter()
            .find(|c| self.within_share(c, cap))
            .or_else(|| {
                let everyone_waits = self.turn.len() == self.clients.len();
                everyone_waits.then(|| self.turn.front()).flatten()
            })?;
        let head = self.clients.get(client)?.queue.front()?;
        Some((client, head))
    }

    /// Takes `client`'s next call out of the queue; the client goes to the back
    /// of the turn order if it has more waiting. Clients skipped over because
    /// they were over their share keep their place at the front.
    pub(super) fn pop(&mut self, client: &Arc<str>) -> Option<W> {
        let c = self.clients.get_mut(&**client)?;
        let w = c.queue.pop_front()?;
        let more = !c.queue.is_empty();
        self.len -= 1;
        if let Some(pos) = self.turn.iter().position(|t| t == client) {
            self.turn.remove(pos);
        }
        if more {
            self.turn.push_back(client.clone());
        }
        self.forget_if_idle(client);
        Some(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct W(u64, u64);
    impl Waiting for W {
        fn id(&self) -> u64 {
            self.0
        }
        fn needed(&self) -> u64 {
            self.1
        }
        fn charged(&self) -> u64 {
            1
        }
    }

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// Serves everything (no cap in play), returning ids in grant order.
    fn drain(q: &mut FairQueue<W>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((c, _)) = q.next(u64::MAX) {
            let c = c.clone();
            out.push(q.pop(&c).unwrap().0);
        }
        out
    }

    #[test]
    fn clients_take_turns_and_each_client_is_fifo() {
        let mut q = FairQueue::new();
        let (a, b, c) = (key("a"), key("b"), key("c"));
        // a floods first; b and c arrive later with one call each.
        for id in 1..=4 {
            q.push(&a, W(id, 10));
        }
        q.push(&b, W(5, 10));
        q.push(&c, W(6, 10));
        q.push(&b, W(7, 10));
        assert_eq!(q.len(), 7);
        assert_eq!(drain(&mut q), vec![1, 5, 6, 2, 7, 3, 4]);
        assert_eq!(q.len(), 0);
        assert!(q.clients.is_empty(), "idle clients are forgotten");
    }

    #[test]
    fn a_client_over_its_share_lets_others_go_first() {
        let mut q = FairQueue::new();
        let (a, b) = (key("a"), key("b"));
        q.hold(&a, 60);
        q.push(&a, W(1, 20));
        q.push(&b, W(2, 20));
        // cap 50: a (60 held) is over it, b is not.
        let (who, w) = q.next(50).unwrap();
        assert_eq!((&**who, w.0), ("b", 2));
        let who = who.clone();
        q.pop(&who);
        // Only a waits now: the cap protects nobody, a is served.
        let (who, w) = q.next(50).unwrap();
        assert_eq!((&**who, w.0), ("a", 1));
    }

    #[test]
    fn the_share_counts_what_the_call_adds() {
        let mut q = FairQueue::new();
        let (a, b) = (key("a"), key("b"));
        q.hold(&a, 30);
        q.push(&a, W(1, 20)); // 30 + 20 = 50: within a cap of 50
        q.push(&b, W(2, 10));
        assert_eq!(q.next(50).unwrap().1.0, 1);
        assert_eq!(q.next(49).unwrap().1.0, 2, "over a cap of 49");
    }

    #[test]
    fn a_call_larger_than_the_share_is_served_when_its_client_holds_nothing() {
        let mut q = FairQueue::new();
        let (a, b) = (key("a"), key("b"));
        q.push(&a, W(1, 80));
        q.hold(&b, 10);
        q.push(&b, W(2, 10));
        assert_eq!(q.next(50).unwrap().1.0, 1);
    }

    #[test]
    fn when_every_client_is_over_its_share_the_front_one_goes() {
        let mut q = FairQueue::new();
        let (a, b) = (key("a"), key("b"));
        q.hold(&a, 40);
        q.hold(&b, 40);
        q.push(&a, W(1, 20));
        q.push(&b, W(2, 20));
        assert_eq!(q.next(50).unwrap().1.0, 1);
    }

    #[test]
    fn skipped_clients_keep_their_place() {
        let mut q = FairQueue::new();
        let (a, b, c) = (key("a"), key("b"), key("c"));
        q.hold(&a, 100);
        q.push(&a, W(1, 10));
        q.push(&b, W(2, 10));
        q.push(&c, W(3, 10));
        let b2 = q.next(50).unwrap().0.clone();
        q.pop(&b2);
        // a released what it held: it is first in turn again, ahead of c.
        q.release(&a, 100);
        assert_eq!(q.next(50).unwrap().1.0, 1);
    }

    #[test]
    fn removing_a_waiter_keeps_the_counts_right() {
        let mut q = FairQueue::new();
        let (a, b) = (key("a"), key("b"));
        q.push(&a, W(1, 10));
        q.push(&a, W(2, 10));
        q.push(&b, W(3, 10));
        assert_eq!(q.queued("a"), 2);
        assert!(q.get("a", 2).is_some());
        assert_eq!(q.remove("a", 2), Some(W(2, 10)));
        assert_eq!(q.remove("a", 2), None, "removed once");
        assert_eq!(q.remove("b", 3), Some(W(3, 10)));
        assert_eq!((q.len(), q.turn.len()), (1, 1));
        assert_eq!(drain(&mut q), vec![1]);
    }

    #[test]
    fn holdings_are_per_client() {
        let mut q: FairQueue<W> = FairQueue::new();
        let (a, b) = (key("a"), key("b"));
        q.hold(&a, 5);
        q.hold(&a, 7);
        q.hold(&b, 1);
        assert_eq!((q.held("a"), q.held("b"), q.held("c")), (12, 1, 0));
        q.release("a", 12);
        assert_eq!(q.held("a"), 0);
        assert!(!q.clients.contains_key("a"));
    }

    #[test]
    fn the_newest_call_of_the_client_furthest_over_its_share_is_evicted() {
        let mut q = FairQueue::new();
        let (a, b, c) = (key("a"), key("b"), key("c"));
        q.hold(&a, 60);
        q.hold(&b, 80);
        q.push(&a, W(1, 10));
        q.push(&b, W(2, 10));
        q.push(&b, W(3, 10));
        q.push(&c, W(4, 10));
        // cap 50: a and b are over it (two and one charges of 1), c holds nothing.
        assert_eq!(q.evictable(50, "c"), 3);
        assert_eq!(q.evictable(50, "b"), 1, "never a client's own calls");
        assert_eq!(q.evict(50, "c"), Some(W(3, 10)), "b's newest");
        assert_eq!(q.evict(50, "c"), Some(W(2, 10)));
        assert_eq!(q.evict(50, "c"), Some(W(1, 10)), "then a's");
        assert_eq!(q.evict(50, "c"), None, "c is within its share");
        assert_eq!(q.len(), 1);
        assert_eq!(drain(&mut q), vec![4]);
    }
}
