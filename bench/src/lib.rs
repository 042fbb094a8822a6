//! memgate-bench: named load scenarios against memgate, a JSON report and PNG
//! pictures of what the server's memory did.
//!
//! The pieces, in the order a run uses them:
//! - [`cgroup`]: a child memory cgroup with a limit, and the real binary inside
//!   it (shared with memgate's OOM torture test);
//! - [`target`]: the server under test, spawned there or already running at an address;
//! - [`timeline`]: RSS, cgroup working set and the guard's `/metrics` every 50 ms
//!   ([`metrics`] reads the OpenMetrics text);
//! - [`payload`] and [`calls`]: in-memory payloads with known digests, and the
//!   three kinds of call with bounded retries that honour `grpc-retry-pushback-ms`;
//! - [`scenario`] and [`variant`]: the named workloads, one run per guard setting;
//!   [`capacity`] paces them to the budget for the capacity figure;
//! - [`soak`]: hours of bursts at 1.5 x the budget, and the trend of idle RSS;
//! - [`flood`]: a quiet flood from a second address while a good client uploads;
//! - [`resize`]: the cgroup limit lowered under a running burst;
//! - [`report`] and [`plot`]: what a person reads afterwards.
//!
//! The server binary does not link any of this: the crate exists so that plotters
//! and its image stack stay out of it.

pub mod calls;
pub mod capacity;
pub mod cgroup;
pub mod flood;
pub mod metrics;
pub mod openssl;
pub mod payload;
pub mod plot;
pub mod report;
pub mod resize;
pub mod scenario;
pub mod soak;
pub mod stats;
pub mod target;
pub mod timeline;
pub mod variant;

/// 2^20 bytes; memory is reported in MiB.
pub const MIB: u64 = 1 << 20;

/// `bytes` in MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}
