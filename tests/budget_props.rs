//! Property test of the budget's accounting: whatever the order of admissions,
//! grants, cancellations, drops and observations, the reserved total equals what
//! live permits and waiting tickets hold, and returns to zero when all are gone.

use memgate::guard::budget::{Admission, Budget, Limits, Permit, Ticket};
use proptest::prelude::*;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Acquire(u64),
    DropPermit(usize),
    CancelTicket(usize),
    Observe(u64),
    Relimit(u64),
    Grow(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..80 * MIB).prop_map(Op::Acquire),
        3 => any::<usize>().prop_map(Op::DropPermit),
        1 => any::<usize>().prop_map(Op::CancelTicket),
        1 => (0..120 * MIB).prop_map(Op::Observe),
        1 => (20 * MIB..200 * MIB).prop_map(Op::Relimit),
        2 => (any::<usize>(), 1..40 * MIB).prop_map(|(i, n)| Op::Grow(i, n)),
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
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn reserved_matches_live_permits(ops in prop::collection::vec(op(), 1..200)) {
        let budget = Budget::new(limits(100 * MIB), |_| {});
        let mut permits: Vec<Permit> = Vec::new();
        // (ticket, bytes it will grant, wait charge it holds meanwhile)
        let mut tickets: Vec<(Ticket, u64, u64)> = Vec::new();
        let mut current = limits(100 * MIB);
        let mut used = 0;
        for op in ops {
            match op {
                Op::Acquire(n) => match budget.try_acquire(n) {
                    Ok(Admission::Now(p)) => { prop_assert_eq!(p.bytes(), n); permits.push(p) }
                    Ok(Admission::Queued(t)) => tickets.push((t, n, n.min(MIB))),
                    Err(_) => {}
                },
                Op::Grow(i, n) if !permits.is_empty() => {
                    let i = i % permits.len();
                    let holds = permits[i].bytes();
                    match budget.try_grow(holds, n) {
                        Ok(Admission::Now(p)) => { prop_assert_eq!(p.bytes(), n); permits[i].absorb(p) }
                        Ok(Admission::Queued(t)) => tickets.push((t, n, 0)),
                        Err(_) => {}
                    }
                }
                Op::DropPermit(i) if !permits.is_empty() => { drop(permits.swap_remove(i % permits.len())); }
                Op::CancelTicket(i) if !tickets.is_empty() => { tickets.swap_remove(i % tickets.len()); }
                Op::Observe(u) => { used = u; budget.observe(u, current) }
                Op::Relimit(b) => { current = limits(b); budget.observe(used, current) }
                _ => {}
            }
            // Move granted tickets' permits over.
            let mut i = 0;
            while i < tickets.len() {
                if let Some(p) = tickets[i].0.try_take() {
                    prop_assert_eq!(p.bytes(), tickets[i].1);
                    permits.push(p);
                    tickets.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            let view = budget.view();
            let held: u64 = permits.iter().map(Permit::bytes).sum();
            let charged: u64 = tickets.iter().map(|(_, _, c)| *c).sum();
            prop_assert_eq!(view.reserved, held + charged);
            prop_assert_eq!(view.waiting, tickets.len());
        }
        drop(permits);
        // Dropping permits may grant tickets; those permits drop with the tickets.
        drop(tickets);
        let view = budget.view();
        prop_assert_eq!(view.reserved, 0);
        prop_assert_eq!(view.waiting, 0);
    }
}
