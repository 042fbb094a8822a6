//! Property test of the budget's accounting: whatever the order of admissions,
//! grants, cancellations, drops, splits and observations, the reserved total
//! equals what live permits and waiting tickets hold, each client's holding
//! equals its live permits, and everything returns to zero when all are gone.
//!
//! And the fairness invariant: a client that holds nothing and waits is never
//! passed by any other client twice (clients take turns), whatever else happens;
//! only calls of clients over their share are ever evicted from the queue.

use std::sync::Arc;

use memgate::guard::budget::{Admission, Budget, Limits, Permit, Ticket};
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;
const CLIENTS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    Acquire(usize, u64),
    DropPermit(usize),
    CancelTicket(usize),
    Observe(u64),
    Relimit(u64),
    Grow(usize, u64),
    Split(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CLIENTS.len(), 1..80 * MIB).prop_map(|(c, n)| Op::Acquire(c, n)),
        3 => any::<usize>().prop_map(Op::DropPermit),
        1 => any::<usize>().prop_map(Op::CancelTicket),
        1 => (0..120 * MIB).prop_map(Op::Observe),
        1 => (20 * MIB..200 * MIB).prop_map(Op::Relimit),
        2 => (any::<usize>(), 1..40 * MIB).prop_map(|(i, n)| Op::Grow(i, n)),
        1 => (any::<usize>(), 0..40 * MIB).prop_map(|(i, n)| Op::Split(i, n)),
    ]
}

fn limits(budget: u64) -> Limits {
    Limits {
        limit: budget + budget / 5,
        budget,
        soft_watermark: 0.75,
        hard_watermark: 0.95,
        queue_max: 8,
        small_request: 2 * MIB,
        wait_charge: MIB,
        client_share: 0.5,
        wait_room: Limits::wait_room_for(MIB, budget),
    }
}

struct Waiting {
    ticket: Ticket,
    client: usize,
    /// Bytes it will grant, and the wait charge it holds meanwhile.
    bytes: u64,
    charge: u64,
    grower: bool,
    /// Grants to each client since this ticket became its client's next call
    /// while its client held nothing (`None`: not in that state).
    passed_by: Option<[u32; CLIENTS.len()]>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn reserved_matches_live_permits(ops in prop::collection::vec(op(), 1..200)) {
        let keys: Vec<Arc<str>> = CLIENTS.iter().map(|c| Arc::from(*c)).collect();
        let budget = Budget::new(limits(100 * MIB), |_| {});
        let mut permits: Vec<(Permit, usize)> = Vec::new();
        let mut tickets: Vec<Waiting> = Vec::new();
        let mut current = limits(100 * MIB);
        let mut used = 0;
        for op in ops {
            // New-call grants to each client during this op.
            let mut granted = [0u32; CLIENTS.len()];
            match op {
                Op::Acquire(c, n) => match budget.try_acquire_for(&keys[c], n) {
                    Ok(Admission::Now(p)) => {
                        prop_assert_eq!(p.bytes(), n);
                        granted[c] += 1;
                        permits.push((p, c));
                    }
                    Ok(Admission::Queued(t)) => {
                        tickets.push(Waiting { ticket: t, client: c, bytes: n, charge: n.min(MIB), grower: false, passed_by: None });
                    }
                    Err(_) => {}
                },
                Op::Grow(i, n) if !permits.is_empty() => {
                    let i = i % permits.len();
                    let (holds, c) = (permits[i].0.bytes(), permits[i].1);
                    match budget.try_grow_for(&keys[c], holds, n) {
                        Ok(Admission::Now(p)) => { prop_assert_eq!(p.bytes(), n); permits[i].0.absorb(p) }
                        Ok(Admission::Queued(t)) => {
                            tickets.push(Waiting { ticket: t, client: c, bytes: n, charge: 0, grower: true, passed_by: None });
                        }
                        Err(_) => {}
                    }
                }
                Op::Split(i, n) if !permits.is_empty() => {
                    let i = i % permits.len();
                    let before = permits[i].0.bytes();
                    let part = permits[i].0.split(n);
                    prop_assert_eq!(part.bytes() + permits[i].0.bytes(), before);
                    let c = permits[i].1;
                    permits.push((part, c));
                }
                Op::DropPermit(i) if !permits.is_empty() => { drop(permits.swap_remove(i % permits.len())); }
                Op::CancelTicket(i) if !tickets.is_empty() => {
                    let i = i % tickets.len();
                    tickets.remove(i);
                }
                Op::Observe(u) => { used = u; budget.observe(u, current) }
                Op::Relimit(b) => { current = limits(b); budget.observe(used, current) }
                _ => {}
            }
            // Move granted tickets' permits over; evicted tickets leave the
            // queue with their charge.
            let mut i = 0;
            while i < tickets.len() {
                match tickets[i].ticket.try_outcome() {
                    Some(Ok(p)) => {
                        prop_assert_eq!(p.bytes(), tickets[i].bytes);
                        if !tickets[i].grower {
                            granted[tickets[i].client] += 1;
                        }
                        permits.push((p, tickets[i].client));
                        tickets.remove(i);
                    }
                    Some(Err(e)) => {
                        prop_assert_eq!(e.reason(), "evicted");
                        prop_assert!(!tickets[i].grower, "growers are never evicted");
                        tickets.remove(i);
                    }
                    None => i += 1,
                }
            }
            let view = budget.view();
            let held: u64 = permits.iter().map(|(p, _)| p.bytes()).sum();
            let charged: u64 = tickets.iter().map(|t| t.charge).sum();
            prop_assert_eq!(view.reserved, held + charged);
            prop_assert_eq!(view.waiting, tickets.len());
            let mut client_held = [0u64; CLIENTS.len()];
            for (p, c) in &permits {
                client_held[*c] += p.bytes();
            }
            for (c, key) in CLIENTS.iter().enumerate() {
                prop_assert_eq!(budget.client_held(key), client_held[c], "client {}", key);
            }
            // Fairness: each client's next call (its oldest new-call ticket,
            // `tickets` keeps enqueue order), while its client holds nothing,
            // is passed at most once by each other client.
            for c in 0..CLIENTS.len() {
                let Some(head) = tickets.iter_mut().find(|t| t.client == c && !t.grower) else {
                    continue;
                };
                if client_held[c] > 0 {
                    head.passed_by = None;
                    continue;
                }
                let passed = head.passed_by.get_or_insert([0; CLIENTS.len()]);
                for (other, n) in granted.iter().enumerate() {
                    if other != c {
                        passed[other] += n;
                        prop_assert!(
                            passed[other] <= 1,
                            "client {} waited through {} grants to client {}",
                            CLIENTS[c], passed[other], CLIENTS[other]
                        );
                    }
                }
            }
        }
        drop(permits);
        // Dropping permits may grant tickets; those permits drop with the tickets.
        drop(tickets);
        let view = budget.view();
        prop_assert_eq!(view.reserved, 0);
        prop_assert_eq!(view.waiting, 0);
        for key in CLIENTS {
            prop_assert_eq!(budget.client_held(key), 0);
        }
    }
}
