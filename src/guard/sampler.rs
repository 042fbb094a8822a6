//! Measuring, apart from deciding: a task that reads the cgroup and jemalloc every
//! `poll_interval` on the blocking pool, publishes a [`Snapshot`] on a watch
//! channel and feeds the budget. The request path only ever reads the result.

use std::{sync::Arc, time::Instant};

use tokio::sync::watch;

use super::{
    discover::{self, CgroupHandle, CgroupMemory, ResolvedLimit, Roots},
    jemalloc::{self, AllocStats},
};

/// One reading of everything the guard measures.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The limit in force and where it came from.
    pub limit: ResolvedLimit,
    /// The cgroup reading, when there is a memory cgroup and it could be read.
    pub cgroup: Option<CgroupMemory>,
    /// Why the cgroup could not be read, if it could not.
    pub cgroup_error: Option<String>,
    /// The kubelet's working set (usage − inactive file); the process's RSS when
    /// no cgroup can be read.
    pub working_set: u64,
    /// jemalloc's counters, when jemalloc is the allocator.
    pub alloc: Option<AllocStats>,
    /// When this reading was taken.
    pub taken_at: Instant,
    /// Counts readings, for the liveness watchdog.
    pub seq: u64,
}

/// What the sampler reads from; the cgroup is found once, at start.
pub struct Source {
    pub roots: Roots,
    pub cgroup: Option<CgroupHandle>,
    pub discover_error: Option<String>,
    pub configured_limit: Option<u64>,
}

impl Source {
    /// Finds our cgroup under `roots`.
    pub fn discover(roots: Roots, configured_limit: Option<u64>) -> Self {
        let (cgroup, discover_error) = match discover::discover(&roots) {
            Ok(c) => (c, None),
            Err(e) => (None, Some(e.to_string())),
        };
        Self {
            roots,
            cgroup,
            discover_error,
            configured_limit,
        }
    }

    /// Takes one reading. Blocking: file reads.
    pub fn sample(&self, seq: u64) -> Snapshot {
        let host = discover::host_memory_total(&self.roots).ok();
        let (cgroup, cgroup_error) = match &self.cgroup {
            Some(h) => match discover::read_memory(h) {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, self.discover_error.clone()),
        };
        let limit_input = match (&cgroup, &cgroup_error) {
            (Some(m), _) => Ok(Some(&m.limit)),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Ok(None),
        };
        let limit = resolve(self.configured_limit, limit_input, host);
        let working_set = match &cgroup {
            Some(m) => m.working_set,
            None => process_rss().unwrap_or(0),
        };
        let alloc = jemalloc::is_global_allocator()
            .then(jemalloc::stats)
            .and_then(Result::ok);
        Snapshot {
            limit,
            cgroup,
            cgroup_error,
            working_set,
            alloc,
            taken_at: Instant::now(),
            seq,
        }
    }
}

fn resolve(
    configured: Option<u64>,
    cgroup: Result<Option<&discover::CgroupLimit>, String>,
    host: Option<u64>,
) -> ResolvedLimit {
    // Without MemTotal (no /proc) and no cgroup limit, only a configured limit is
    // trustworthy; 1 TiB stands for "unbounded" and is named as such.
    let host_total = host.unwrap_or(1 << 40);
    match cgroup {
        Ok(c) => discover::resolve_limit(configured, Ok(c), host_total),
        Err(reason) => {
            let mut r = discover::resolve_limit(configured, Ok(None), host_total);
            if r.fallback_reason.is_some() {
                r.fallback_reason = Some(reason);
            }
            r
        }
    }
}

/// Resident set size of this process, from `/proc/self/statm`.
fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// Runs `source.sample` every `interval` until every receiver is gone, calling
/// `on_sample` with each reading before publishing it.
pub fn spawn(
    source: Arc<Source>,
    first: Snapshot,
    interval: impl Fn() -> std::time::Duration + Send + 'static,
    on_sample: impl Fn(&Snapshot) + Send + 'static,
) -> watch::Receiver<Snapshot> {
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut seq = tx.borrow().seq;
        loop {
            tokio::time::sleep(interval()).await;
            seq += 1;
            let src = source.clone();
            let Ok(snap) = tokio::task::spawn_blocking(move || src.sample(seq)).await else {
                continue;
            };
            on_sample(&snap);
            if tx.send(snap).is_err() {
                return;
            }
        }
    });
    rx
}
