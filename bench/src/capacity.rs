//! The capacity figure of an overload scenario (`--compare capacity`): the same
//! calls, paced by the client so that the reservations in flight never exceed
//! the guard's budget. Nothing then waits in the server's queue or is refused,
//! so the throughput of that run is what the server can do with these calls;
//! the overload run's goodput over it says how much overload costs.
//!
//! Reservations are memgate's own estimates (`memgate::server::method_table`
//! with the default configuration), the figures the guard itself charges.

use std::sync::Arc;

use memgate::guard::estimate::{Estimate, Estimator as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::calls::Kind;

/// What memgate's guard reserves for a call of `kind` carrying `size` bytes.
pub fn reservation(kind: Kind, size: u64) -> u64 {
    let table = memgate::server::method_table(&memgate::config::Config::default());
    let path = match kind {
        Kind::Upload => "/google.bytestream.ByteStream/Write",
        Kind::Download => "/google.bytestream.ByteStream/Read",
        // An echo is framed from the request's own bytes: one copy either way.
        Kind::Process | Kind::ProcessEcho => "/memgate.v1.Payload/Process",
    };
    match table.classify(path).estimate {
        Estimate::Fixed(n) => n,
        // The bench's uploads send 1 MiB messages.
        Estimate::Stream {
            window,
            messages,
            first,
            overhead,
            ..
        } => window + overhead + messages * first.max(crate::payload::CHUNK as u64),
        Estimate::Unary {
            copies, overhead, ..
        } => copies * size + overhead,
        Estimate::Bypass => 0,
    }
}

/// Permits are KiB, so a budget of many GiB still fits a `u32` count.
const UNIT: u64 = 1024;

/// A client-side budget: calls take their reservation from it before they
/// start, in launch order (tokio's semaphore is fair), and give it back when
/// they end.
#[derive(Clone)]
pub struct Fit {
    permits: Arc<Semaphore>,
    total: u32,
}

impl Fit {
    pub fn new(budget: u64) -> Fit {
        let total = u32::try_from(budget / UNIT).unwrap_or(u32::MAX).max(1);
        Fit {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `bytes` fit beside the calls in flight. A call larger than
    /// the whole budget runs alone.
    pub async fn admit(&self, bytes: u64) -> OwnedSemaphorePermit {
        let n = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total);
        self.permits
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_memgates_table() {
        let size = 150_000_000;
        let upload = reservation(Kind::Upload, size);
        assert!(upload < size, "a Write reserves a window, not the blob");
        let process = reservation(Kind::Process, size);
        let echo = reservation(Kind::ProcessEcho, size);
        assert!(process > size);
        // An echo is framed from the request's own bytes: no second copy.
        assert_eq!(echo, process, "an echo reserves what Process does");
    }

    #[tokio::test]
    async fn calls_wait_until_they_fit() {
        let fit = Fit::new(100 * UNIT);
        let a = fit.admit(60 * UNIT).await;
        let b = fit.admit(40 * UNIT).await;
        assert!(
            fit.permits.clone().try_acquire_owned().is_err(),
            "the budget is full"
        );
        let waiting = tokio::spawn({
            let fit = fit.clone();
            async move { fit.admit(10 * UNIT).await }
        });
        drop(a);
        let c = waiting.await.unwrap();
        assert_eq!(fit.permits.available_permits(), 50);
        drop((b, c));
        // Larger than the budget: runs alone instead of never.
        let _alone = fit.admit(1000 * UNIT).await;
        assert_eq!(fit.permits.available_permits(), 0);
    }
}
