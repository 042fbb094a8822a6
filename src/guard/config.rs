//! `[memory]`: the guard's settings, their defaults and why.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Leaves 15% of the limit for what the guard does not reserve: allocator
/// fragmentation, kernel memory, page cache not yet reclaimed. GOMEMLIMIT users
/// and ClickHouse settle on 0.9; memgate's requests are bigger and burstier.
pub const DEFAULT_BUDGET_RATIO: f64 = 0.85;
/// The runtime, tonic's per-connection buffers and the sampler itself.
pub const DEFAULT_RESERVE: ByteSize = ByteSize::mib(32);
/// Above 75% of the budget: purge eagerly and admit only small requests.
pub const DEFAULT_SOFT_WATERMARK: f64 = 0.75;
/// Above 95% of the budget: admit nothing new until usage falls back.
pub const DEFAULT_HARD_WATERMARK: f64 = 0.95;
/// Ten samples a second: a 150 MB upload at 1 GB/s moves 15 MB between samples.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Enough waiters to absorb a burst; beyond that a fast rejection serves clients better.
pub const DEFAULT_QUEUE_MAX: usize = 64;
/// Waiting serves a client better than a refusal it may not retry: memory comes
/// back as calls finish and from reclaimed streams, and a waiter costs only its
/// wait charge. Several 150 MB calls finish in this time on a busy server; a
/// call's own grpc-timeout still cuts it shorter.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Purge after requests that reserved at least this much: smaller ones leave too
/// little dirty memory to be worth a purge (~15 µs when idle, ~30 ms for 0.5 GB).
pub const DEFAULT_PURGE_THRESHOLD: ByteSize = ByteSize::mib(32);
/// A purge of 300 MB dirty takes 20–40 ms; four a second at most caps purge CPU
/// near a tenth of a core, and an idle purge costs microseconds.
pub const DEFAULT_PURGE_MIN_INTERVAL: Duration = Duration::from_millis(250);
/// A second without a byte from its client while calls wait for memory: far
/// past the pauses of a client that is sending (frames arrive every few ms on
/// any link that moves 150 MB in reasonable time, and a busy disk or store does
/// not count), and short enough that a waiting call is served within about a
/// second instead of after `server.stream_idle_timeout`.
pub const DEFAULT_RECLAIM_GRACE: Duration = Duration::from_secs(1);
/// Half the budget: one client flooding the server still leaves the other half
/// to everyone else, and alone it can use all of it (the cap applies only while
/// others wait).
pub const DEFAULT_MAX_CLIENT_SHARE: f64 = 0.5;

/// The memory guard's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// `false` turns admission and purging off (for comparisons); limits are still read.
    pub enabled: bool,
    /// `auto` discovers the cgroup limit (else the host's memory); a size overrides it.
    #[serde(
        deserialize_with = "crate::config::auto_or_size",
        serialize_with = "crate::config::serialize_auto_or_size"
    )]
    pub limit: Option<ByteSize>,
    /// Share of the limit the budget may use, in (0, 1].
    pub budget_ratio: f64,
    /// Subtracted from `limit × budget_ratio` for the process's own fixed needs.
    pub reserve: ByteSize,
    /// Share of the budget where pressure becomes elevated.
    pub soft_watermark: f64,
    /// Share of the budget where pressure becomes critical.
    pub hard_watermark: f64,
    /// How often the sampler refreshes limit and usage.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Most requests waiting for memory at once.
    pub queue_max: usize,
    /// Longest a request waits for memory (never past its own `grpc-timeout`).
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Requests that reserved at least this much trigger a jemalloc purge when done.
    pub purge_threshold: ByteSize,
    /// Shortest time between two purges.
    #[serde(with = "humantime_serde")]
    pub purge_min_interval: Duration,
    /// Share of the budget, in (0, 1], one client may hold while other clients
    /// wait for memory; also its share of `queue_max`.
    pub max_client_share: f64,
    /// While calls wait for memory, a stream whose client sent (or read)
    /// nothing for this long is ended and its memory given to them (an upload
    /// stays resumable). 0 turns this reclaim off.
    #[serde(with = "humantime_serde")]
    pub reclaim_grace: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            limit: None,
            budget_ratio: DEFAULT_BUDGET_RATIO,
            reserve: DEFAULT_RESERVE,
            soft_watermark: DEFAULT_SOFT_WATERMARK,
            hard_watermark: DEFAULT_HARD_WATERMARK,
            poll_interval: DEFAULT_POLL_INTERVAL,
            queue_max: DEFAULT_QUEUE_MAX,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            purge_threshold: DEFAULT_PURGE_THRESHOLD,
            purge_min_interval: DEFAULT_PURGE_MIN_INTERVAL,
            max_client_share: DEFAULT_MAX_CLIENT_SHARE,
            reclaim_grace: DEFAULT_RECLAIM_GRACE,
        }
    }
}

impl MemoryConfig {
    /// Checks ranges and relations; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ratio = |key, v: f64| {
            if v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key,
                    format!("must be in (0, 1], got {v}"),
                ))
            }
        };
        ratio("memory.budget_ratio", self.budget_ratio)?;
        ratio("memory.soft_watermark", self.soft_watermark)?;
        ratio("memory.hard_watermark", self.hard_watermark)?;
        ratio("memory.max_client_share", self.max_client_share)?;
        if self.soft_watermark >= self.hard_watermark {
            return Err(ConfigError::invalid(
                "memory.soft_watermark",
                format!(
                    "must be below memory.hard_watermark ({} >= {})",
                    self.soft_watermark, self.hard_watermark
                ),
            ));
        }
        if let Some(limit) = self.limit
            && limit.as_u64() < 16 * 1024 * 1024
        {
            return Err(ConfigError::invalid(
                "memory.limit",
                "must be `auto` or at least 16MiB",
            ));
        }
        if self.poll_interval < Duration::from_millis(5)
            || self.poll_interval > Duration::from_secs(10)
        {
            return Err(ConfigError::invalid(
                "memory.poll_interval",
                "must be between 5ms and 10s",
            ));
        }
        if self.queue_max > 100_000 {
            return Err(ConfigError::invalid(
                "memory.queue_max",
                "must be at most 100000",
            ));
        }
        Ok(())
    }
}
