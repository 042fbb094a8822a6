//! What the guard shows at the moment of a scrape: limit, working set, budget,
//! pressure, allocator and cgroup readings, purge counters. Built afresh on each
//! scrape as constant metrics from one reading of each source, so the values
//! of one exposition agree with each other and nothing has to mirror the
//! guard's own counters between scrapes.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::ConstCounter, family::Family, gauge::ConstGauge, gauge::Gauge, info::Info},
    registry::{Registry, Unit},
};

use crate::guard::{Guard, budget::Pressure, discover::LimitSource};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabel {
    level: &'static str,
}

/// The guard's families, as `guard` reads now.
pub(super) fn registry(guard: &Guard) -> Registry {
    let snap = guard.snapshot();
    let view = guard.view();
    let purge = guard.purger().stats();
    let mut r = Registry::with_prefix(super::PREFIX);

    bytes(
        &mut r,
        "memory_limit",
        "Memory limit the guard works with",
        snap.limit.bytes,
    );
    r.register(
        "memory_limit",
        "Where the memory limit came from: config, cgroup_v1, cgroup_v2 or host",
        Info::new(SourceLabel {
            source: source_label(&snap.limit.source),
        }),
    );
    bytes(
        &mut r,
        "memory_working_set",
        "Working set as the kubelet counts it (cgroup usage minus inactive file), or the process RSS without a cgroup",
        snap.working_set,
    );
    bytes(
        &mut r,
        "memory_budget",
        "Memory admission may hand out: limit times budget_ratio minus reserve",
        view.budget,
    );
    bytes(
        &mut r,
        "memory_reserved",
        "Memory held by admitted calls' reservations",
        view.reserved,
    );
    bytes(
        &mut r,
        "memory_baseline",
        "Working set last seen with nothing reserved",
        view.baseline,
    );
    r.register(
        "memory_pressure_level",
        "Memory pressure: 0 normal, 1 elevated (above the soft watermark), 2 critical (above the hard watermark)",
        ConstGauge::new(level_number(view.pressure)),
    );
    let pressure: Family<LevelLabel, Gauge> = Family::default();
    for level in [Pressure::Normal, Pressure::Elevated, Pressure::Critical] {
        let labels = LevelLabel {
            level: level.as_str(),
        };
        pressure
            .get_or_create(&labels)
            .set(i64::from(level == view.pressure));
    }
    r.register(
        "memory_pressure",
        "1 for the memory pressure level in force, 0 for the others",
        pressure,
    );
    bytes(
        &mut r,
        "memory_wait_charges",
        "Of the reserved memory, what waiting calls hold for the transport's buffers",
        view.charges,
    );
    bytes(
        &mut r,
        "memory_largest_client_reserved",
        "Memory reserved by the client holding most (the one max_client_share caps while others wait)",
        view.largest_client,
    );
    r.register(
        "memory_clients",
        "Clients holding reservations",
        ConstGauge::new(view.clients as u64),
    );
    bytes(
        &mut r,
        "memory_overcommitted",
        "Reservations and working set above the budget (a limit that shrank); reclaimed first",
        view.overcommitted,
    );
    r.register(
        "admission_waiting",
        "Calls waiting in the admission queue",
        ConstGauge::new(view.waiting as u64),
    );
    r.register(
        "guard_enabled",
        "1 when the memory guard admits calls, 0 when it is switched off",
        ConstGauge::new(i64::from(guard.enabled())),
    );

    if let Some(alloc) = snap.alloc {
        bytes(
            &mut r,
            "jemalloc_allocated",
            "Bytes the application holds allocated in jemalloc",
            alloc.allocated,
        );
        bytes(
            &mut r,
            "jemalloc_resident",
            "Bytes of jemalloc's pages resident in memory, freed but unpurged ones included",
            alloc.resident,
        );
    }
    if let Some(cg) = &snap.cgroup {
        if let Some(kills) = cg.oom_kills {
            r.register(
                "cgroup_oom_kills",
                "Processes the kernel OOM-killed in memgate's memory cgroup",
                ConstCounter::new(kills),
            );
        }
        if let Some(avg10) = cg.psi_some_avg10 {
            r.register(
                "cgroup_memory_pressure_some_avg10",
                "Percent of the last 10 s in which some task of the cgroup stalled on memory (cgroup v2 PSI)",
                ConstGauge::new(avg10),
            );
        }
    }

    r.register(
        "purge_requests",
        "Purges asked for, coalesced and rate-limited into fewer runs",
        ConstCounter::new(purge.requests),
    );
    r.register(
        "purges",
        "jemalloc purges run, failed ones included",
        ConstCounter::new(purge.runs),
    );
    r.register(
        "purge_failures",
        "jemalloc purges that failed",
        ConstCounter::new(purge.failures),
    );
    r.register_with_unit(
        "purge_released",
        "Resident memory purges handed back to the OS",
        Unit::Bytes,
        ConstCounter::new(purge.bytes_released),
    );
    r.register_with_unit(
        "purge_duration",
        "Time spent purging",
        Unit::Seconds,
        ConstCounter::new(purge.total_duration.as_secs_f64()),
    );
    r.register_with_unit(
        "purge_last_duration",
        "How long the latest purge took",
        Unit::Seconds,
        ConstGauge::new(purge.last_duration.as_secs_f64()),
    );
    r
}

fn bytes(r: &mut Registry, name: &str, help: &str, value: u64) {
    r.register_with_unit(name, help, Unit::Bytes, ConstGauge::new(value));
}

/// The kind of source only: a file path would be an unbounded label.
fn source_label(source: &LimitSource) -> &'static str {
    match source {
        LimitSource::Config => "config",
        LimitSource::CgroupV1 { .. } => "cgroup_v1",
        LimitSource::CgroupV2 { .. } => "cgroup_v2",
        LimitSource::Host => "host",
    }
}

fn level_number(p: Pressure) -> i64 {
    match p {
        Pressure::Normal => 0,
        Pressure::Elevated => 1,
        Pressure::Critical => 2,
    }
}
