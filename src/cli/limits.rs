//! `memgate limits`: what the guard sees from inside this container, for
//! operators. Reads the cgroup and jemalloc once with the same code the server's
//! sampler uses and computes the budget the server would work with.

use serde::Serialize;

use crate::config::{Backend, Config};
use crate::guard::estimate::{Estimate, Estimator as _};
use crate::guard::{
    budget::{Budget, Pressure},
    cgroup::CgroupVersion,
    discover::Roots,
    jemalloc, limits_for,
    sampler::Source,
};
use crate::server::{STREAM_WINDOW, method_table};
use crate::store::DiskSpace;

/// Everything `memgate limits` reports; `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct LimitsReport {
    pub guard_enabled: bool,
    /// `local` or `s3`.
    pub storage_backend: &'static str,
    /// The data directory, or `s3://bucket/prefix at endpoint`.
    pub storage_location: String,
    /// What the guard reserves per ByteStream Write (for S3, part buffers included).
    pub write_reservation_bytes: u64,
    /// The data volume (local backend): free space, size, the floor uploads
    /// leave, and the largest upload admitted now. `None` with the s3 backend.
    pub disk_free_bytes: Option<u64>,
    pub disk_capacity_bytes: Option<u64>,
    pub disk_min_free_bytes: Option<u64>,
    pub disk_admittable_bytes: Option<u64>,
    /// Why the data volume could not be read.
    pub disk_error: Option<String>,
    pub cgroup_version: Option<&'static str>,
    pub cgroup_path: Option<String>,
    pub cgroup_dir: Option<String>,
    pub cgroup_error: Option<String>,
    pub limit_bytes: u64,
    pub limit_source: String,
    pub limit_fallback_reason: Option<String>,
    pub memory_high_bytes: Option<u64>,
    pub usage_bytes: Option<u64>,
    pub inactive_file_bytes: Option<u64>,
    pub working_set_bytes: u64,
    pub budget_bytes: u64,
    pub budget_ratio: f64,
    pub reserve_bytes: u64,
    pub reserved_bytes: u64,
    pub pressure: Pressure,
    pub oom_kills: Option<u64>,
    pub jemalloc_allocated_bytes: Option<u64>,
    pub jemalloc_resident_bytes: Option<u64>,
    pub malloc_conf: Option<String>,
    pub malloc_conf_source: Option<&'static str>,
    pub background_thread: Option<bool>,
    pub dirty_decay_ms: Option<i64>,
    pub muzzy_decay_ms: Option<i64>,
    /// `[profiling] enabled`: the server samples and serves `/debug/pprof/heap`.
    pub profiling_enabled: bool,
    /// `[profiling] sample_interval`.
    pub profiling_sample_interval_bytes: u64,
    /// Whether this binary's jemalloc loaded its heap profiler (`prof:true`),
    /// without which `serve` refuses `[profiling] enabled = true`.
    pub heap_profiler_loaded: Option<bool>,
}

/// Takes one reading with the server's own code.
pub fn report(cfg: &Config) -> LimitsReport {
    let source = Source::discover(Roots::default(), cfg.memory.limit.map(|b| b.as_u64()));
    let snap = source.sample(0);
    let limits = limits_for(&cfg.memory, snap.limit.bytes, STREAM_WINDOW as u64);
    let budget = Budget::new(limits, |_| {});
    budget.observe(snap.working_set, limits);
    let view = budget.view();
    let js = jemalloc::settings().ok();
    let (conf, conf_source) = match &js {
        Some(s) => match (&s.env_malloc_conf, &s.embedded_malloc_conf) {
            (Some(env), _) => (Some(env.clone()), Some("environment _RJEM_MALLOC_CONF")),
            (None, Some(emb)) => (Some(emb.clone()), Some("embedded in the binary")),
            (None, None) => (
                Some(s.built_in_malloc_conf.clone()),
                Some("jemalloc defaults"),
            ),
        },
        None => (None, None),
    };
    let st = &cfg.storage;
    let storage_location = match st.backend {
        Backend::Local => st.data_dir.display().to_string(),
        Backend::S3 => format!(
            "s3://{}/{} at {}",
            st.s3.bucket,
            st.s3.prefix.trim_start_matches('/'),
            if st.s3.endpoint.is_empty() {
                format!("AWS ({})", st.s3.region)
            } else {
                st.s3.endpoint.clone()
            }
        ),
    };
    let disk = match st.backend {
        // Before the first start the directory may not exist yet: the server
        // creates it on the filesystem of its nearest existing ancestor.
        Backend::Local => Some({
            let dir = st
                .data_dir
                .ancestors()
                .find(|d| d.exists())
                .unwrap_or(&st.data_dir);
            DiskSpace::new(dir.to_path_buf(), st.min_free_space.as_u64())
                .reading()
                .map_err(|e| format!("{}: {e}", dir.display()))
        }),
        Backend::S3 => None,
    };
    let reading = disk.as_ref().and_then(|d| d.as_ref().ok());
    let write_reservation_bytes = match method_table(cfg)
        .classify("/google.bytestream.ByteStream/Write")
        .estimate
    {
        Estimate::Fixed(n) => n,
        _ => 0,
    };
    LimitsReport {
        guard_enabled: cfg.memory.enabled,
        storage_backend: st.backend.as_str(),
        storage_location,
        write_reservation_bytes,
        disk_free_bytes: reading.map(|r| r.free),
        disk_capacity_bytes: reading.map(|r| r.capacity),
        disk_min_free_bytes: (st.backend == Backend::Local).then(|| st.min_free_space.as_u64()),
        disk_admittable_bytes: reading.map(|r| r.admittable()),
        disk_error: disk.and_then(|d| d.err()),
        cgroup_version: source.cgroup.as_ref().map(|h| match h.version {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }),
        cgroup_path: source.cgroup.as_ref().map(|h| h.path.clone()),
        cgroup_dir: source.cgroup.as_ref().map(|h| h.dir.display().to_string()),
        cgroup_error: snap.cgroup_error.clone(),
        limit_bytes: snap.limit.bytes,
        limit_source: snap.limit.source.to_string(),
        limit_fallback_reason: snap.limit.fallback_reason.clone(),
        memory_high_bytes: snap.cgroup.as_ref().and_then(|c| c.limit.high),
        usage_bytes: snap.cgroup.as_ref().map(|c| c.usage),
        inactive_file_bytes: snap.cgroup.as_ref().map(|c| c.stat.inactive_file),
        working_set_bytes: snap.working_set,
        budget_bytes: view.budget,
        budget_ratio: cfg.memory.budget_ratio,
        reserve_bytes: cfg.memory.reserve.as_u64(),
        reserved_bytes: view.reserved,
        pressure: view.pressure,
        oom_kills: snap.cgroup.as_ref().and_then(|c| c.oom_kills),
        jemalloc_allocated_bytes: snap.alloc.map(|a| a.allocated),
        jemalloc_resident_bytes: snap.alloc.map(|a| a.resident),
        malloc_conf: conf,
        malloc_conf_source: conf_source,
        background_thread: js.as_ref().map(|s| s.background_thread),
        dirty_decay_ms: js.as_ref().map(|s| s.dirty_decay_ms),
        muzzy_decay_ms: js.as_ref().map(|s| s.muzzy_decay_ms),
        profiling_enabled: cfg.profiling.enabled,
        profiling_sample_interval_bytes: cfg.profiling.sample_interval.as_u64(),
        heap_profiler_loaded: crate::admin::pprof::state().ok().map(|s| s.loaded),
    }
}

fn size(b: u64) -> String {
    bytesize::ByteSize::b(b).display().iec().to_string()
}

/// The report for a person.
pub fn render(r: &LimitsReport) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    line(
        "guard",
        if r.guard_enabled {
            "on".into()
        } else {
            "off (memory.enabled = false)".into()
        },
    );
    line(
        "storage",
        format!("{} {}", r.storage_backend, r.storage_location),
    );
    line(
        "per Write",
        format!("{} reserved", size(r.write_reservation_bytes)),
    );
    match (
        r.disk_free_bytes,
        r.disk_capacity_bytes,
        r.disk_min_free_bytes,
        r.disk_admittable_bytes,
    ) {
        (Some(free), Some(cap), Some(floor), Some(admit)) => line(
            "disk",
            format!(
                "{} free of {}; uploads up to {} admitted (storage.min_free_space {})",
                size(free),
                size(cap),
                size(admit),
                size(floor)
            ),
        ),
        _ => {
            if let Some(e) = &r.disk_error {
                line("disk", format!("unreadable: {e}"));
            }
        }
    }
    match (&r.cgroup_version, &r.cgroup_path, &r.cgroup_dir) {
        (Some(v), Some(p), Some(d)) => line("cgroup", format!("{v} {p} ({d})")),
        _ => line("cgroup", "none found".into()),
    }
    if let Some(e) = &r.cgroup_error {
        line("cgroup error", e.clone());
    }
    line(
        "limit",
        format!("{} from {}", size(r.limit_bytes), r.limit_source),
    );
    if let Some(why) = &r.limit_fallback_reason {
        line("", format!("because {why}"));
    }
    if let Some(h) = r.memory_high_bytes {
        line("memory.high", size(h));
    }
    match (r.usage_bytes, r.inactive_file_bytes) {
        (Some(u), Some(i)) => line(
            "working set",
            format!(
                "{} (usage {} − inactive file {})",
                size(r.working_set_bytes),
                size(u),
                size(i)
            ),
        ),
        _ => line(
            "working set",
            format!("{} (process RSS)", size(r.working_set_bytes)),
        ),
    }
    line(
        "budget",
        format!(
            "{} (limit × {} − {})",
            size(r.budget_bytes),
            r.budget_ratio,
            size(r.reserve_bytes)
        ),
    );
    line("reserved", size(r.reserved_bytes));
    line("pressure", r.pressure.as_str().into());
    if let Some(k) = r.oom_kills {
        line("oom kills", k.to_string());
    }
    match (r.jemalloc_allocated_bytes, r.jemalloc_resident_bytes) {
        (Some(a), Some(res)) => line(
            "jemalloc",
            format!("allocated {}, resident {}", size(a), size(res)),
        ),
        _ => line("jemalloc", "not the allocator".into()),
    }
    if let (Some(c), Some(src)) = (&r.malloc_conf, r.malloc_conf_source) {
        line("malloc conf", format!("{c:?} ({src})"));
    }
    let every = size(r.profiling_sample_interval_bytes);
    line(
        "profiling",
        match (r.profiling_enabled, r.heap_profiler_loaded) {
            (false, _) => "off ([profiling] enabled = false)".into(),
            (true, Some(true)) => format!(
                "on: a sample every {every} on average; GET /debug/pprof/heap on the admin listener"
            ),
            (true, _) => "enabled, but jemalloc has no heap profiler loaded (prof:false?): serve will refuse to start".into(),
        },
    );
    out
}
