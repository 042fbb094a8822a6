//! Finds this process's memory cgroup and reads its limits and usage, and
//! decides which limit the guard works with. The one place that reads cgroup
//! files and `/proc/meminfo`; every path is joined to [`Roots::root`], so tests
//! point the whole lookup at a fixture tree.
//!
//! cgroups-rs 0.3 is used only for [`host_is_cgroup2_unified`], the kernel's own
//! answer (a `statfs` on `/sys/fs/cgroup`) that `memgate limits` can show next
//! to what mountinfo said. Its readers do not fit the rest. Its hierarchies
//! (`V1`, `V2`, `auto()`) are fixed to `/proc/self/mountinfo` and
//! `/sys/fs/cgroup` and ignore a mount's root, so neither fixture trees nor
//! containers whose mount root is their own cgroup work. `MemController::new`
//! takes any directory, but `memory_stat()` turns a missing or unreadable v1
//! file into 0 (a 0 limit), reports v2 `max` as -1, and panics when one of
//! `memory.{high,low,max,min}` is missing (as at the root). Its `memory.stat`
//! parser skips garbage lines and reads a missing key as 0.
//!
//! Parsing is in [`super::cgroup`]; this module only reads and walks.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::cgroup::{self, CgroupVersion, ParseError};

/// Where the host's `/` is, and whose `/proc/<pid>` to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    /// `/` in production; a fixture directory mirroring it in tests.
    pub root: PathBuf,
    /// `None` for `/proc/self`; a pid to find another process's cgroup.
    pub pid: Option<u32>,
}

impl Default for Roots {
    fn default() -> Self {
        Self::at("/")
    }
}

impl Roots {
    /// A filesystem whose `/` is at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            pid: None,
        }
    }

    fn proc_file(&self, name: &str) -> PathBuf {
        let pid = self
            .pid
            .map_or_else(|| "self".to_owned(), |p| p.to_string());
        self.root.join("proc").join(pid).join(name)
    }

    /// An absolute path as seen by the process, under [`Roots::root`].
    fn reroot(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// Why a cgroup could not be found or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {}", path.display(), source.problem)]
    Parse { path: PathBuf, source: ParseError },
    #[error(
        "our {hierarchy} cgroup {cgroup_path:?} is not under the mount of {mount_root:?} at {}",
        mount_point.display()
    )]
    NotVisible {
        hierarchy: &'static str,
        cgroup_path: String,
        mount_root: String,
        mount_point: PathBuf,
    },
}

impl CgroupError {
    /// The file or directory that could not be used.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. } | Self::Parse { path, .. } => path,
            Self::NotVisible { mount_point, .. } => mount_point,
        }
    }
}

/// Our memory cgroup, found by [`discover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHandle {
    pub version: CgroupVersion,
    /// The cgroup's directory, under [`Roots::root`].
    pub dir: PathBuf,
    /// The cgroup's path in its hierarchy, as `/proc/self/cgroup` shows it.
    pub path: String,
    /// The highest directory of the hierarchy we can see (its mount point):
    /// where the v2 walk over ancestors stops.
    pub top: PathBuf,
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// `None` when the file does not exist; any other failure is an error.
fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parsed<T>(path: &Path, r: Result<T, ParseError>) -> Result<T, CgroupError> {
    r.map_err(|source| CgroupError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Finds our memory cgroup: the v1 memory controller when it is mounted (hybrid
/// hosts mount a cgroup2 hierarchy too, usually without the memory controller),
/// else the v2 hierarchy if its `cgroup.controllers` lists `memory`. `Ok(None)`
/// means no memory cgroup applies to us.
pub fn discover(roots: &Roots) -> Result<Option<CgroupHandle>, CgroupError> {
    let cgroup_file = roots.proc_file("cgroup");
    let ours = parsed(
        &cgroup_file,
        cgroup::parse_proc_cgroup(&read(&cgroup_file)?),
    )?;
    let mountinfo_file = roots.proc_file("mountinfo");
    let mounts = parsed(
        &mountinfo_file,
        cgroup::parse_mountinfo(&read(&mountinfo_file)?),
    )?;

    if let (Some(path), Some(first)) = (&ours.v1_memory, mounts.v1_memory.first()) {
        let handle = handle(roots, CgroupVersion::V1, path, &mounts.v1_memory, first)?;
        return Ok(Some(handle));
    }
    if let (Some(path), Some(first)) = (&ours.v2, mounts.v2.first()) {
        let handle = handle(roots, CgroupVersion::V2, path, &mounts.v2, first)?;
        let controllers = handle.dir.join("cgroup.controllers");
        if cgroup::has_memory_controller(&read(&controllers)?) {
            return Ok(Some(handle));
        }
    }
    Ok(None)
}

/// The first mount that shows our cgroup (bind mounts of sub-trees may come first).
fn handle(
    roots: &Roots,
    version: CgroupVersion,
    path: &str,
    mounts: &[cgroup::CgroupMount],
    first: &cgroup::CgroupMount,
) -> Result<CgroupHandle, CgroupError> {
    let Some((mount, dir)) = mounts
        .iter()
        .find_map(|m| cgroup::locate(m, path).map(|d| (m, d)))
    else {
        return Err(CgroupError::NotVisible {
            hierarchy: match version {
                CgroupVersion::V1 => "v1 memory",
                CgroupVersion::V2 => "v2",
            },
            cgroup_path: path.to_owned(),
            mount_root: first.root.clone(),
            mount_point: roots.reroot(&first.mount_point),
        });
    };
    let dir = roots.reroot(&dir);
    fs::metadata(&dir).map_err(|source| CgroupError::Read {
        path: dir.clone(),
        source,
    })?;
    Ok(CgroupHandle {
        version,
        dir,
        path: path.to_owned(),
        top: roots.reroot(&mount.mount_point),
    })
}

/// The cgroup's limits and the files they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLimit {
    pub version: CgroupVersion,
    /// The smallest hard limit that applies to us; `None` when there is none.
    pub max: Option<u64>,
    /// The file `max` came from (our own limit file when there is no limit).
    pub max_file: PathBuf,
    /// The `memory.stat` key `max` came from: v1 `hierarchical_memory_limit`
    /// when an ancestor's limit is the smaller one.
    pub max_key: Option<&'static str>,
    /// v2 only: the smallest `memory.high`, where the kernel starts throttling
    /// and reclaiming hard.
    pub high: Option<u64>,
    pub high_file: Option<PathBuf>,
}

/// Reads the limits. A missing, unreadable or garbage limit file is an error
/// naming it: the caller decides what to fall back to.
pub fn read_limit(h: &CgroupHandle) -> Result<CgroupLimit, CgroupError> {
    match h.version {
        CgroupVersion::V1 => read_limit_v1(h, &read_stat(h)?),
        CgroupVersion::V2 => read_limit_v2(h),
    }
}

fn read_stat(h: &CgroupHandle) -> Result<cgroup::MemoryStat, CgroupError> {
    let file = h.dir.join("memory.stat");
    parsed(&file, cgroup::parse_memory_stat(h.version, &read(&file)?))
}

/// `min(memory.limit_in_bytes, hierarchical_memory_limit)`: the second covers
/// ancestors a container cannot see.
fn read_limit_v1(h: &CgroupHandle, stat: &cgroup::MemoryStat) -> Result<CgroupLimit, CgroupError> {
    let file = h.dir.join("memory.limit_in_bytes");
    let own = parsed(&file, cgroup::parse_limit_in_bytes(&read(&file)?))?;
    let mut limit = CgroupLimit {
        version: CgroupVersion::V1,
        max: own,
        max_file: file,
        max_key: None,
        high: None,
        high_file: None,
    };
    if let Some(hier) = stat.hierarchical_limit
        && own.is_none_or(|own| hier < own)
    {
        limit.max = Some(hier);
        limit.max_file = h.dir.join("memory.stat");
        limit.max_key = Some("hierarchical_memory_limit");
    }
    Ok(limit)
}

/// The smallest `memory.max` and `memory.high` from our cgroup up to the top of
/// what we can see. Only the top may lack them: the root cgroup has neither.
fn read_limit_v2(h: &CgroupHandle) -> Result<CgroupLimit, CgroupError> {
    let mut limit = CgroupLimit {
        version: CgroupVersion::V2,
        max: None,
        max_file: h.dir.join("memory.max"),
        max_key: None,
        high: None,
        high_file: None,
    };
    let mut dir = h.dir.as_path();
    loop {
        let at_top = dir == h.top;
        // The limit in `dir/name`, if it sets one.
        let limit_at = |name: &str, parse: fn(&str) -> Result<Option<u64>, ParseError>| {
            let file = dir.join(name);
            let content = if at_top {
                read_optional(&file)?
            } else {
                Some(read(&file)?)
            };
            let value = match content {
                Some(c) => parsed(&file, parse(&c))?,
                None => None,
            };
            Ok::<_, CgroupError>(value.map(|v| (v, file)))
        };
        if let Some((v, file)) = limit_at("memory.max", cgroup::parse_memory_max)?
            && limit.max.is_none_or(|m| v < m)
        {
            (limit.max, limit.max_file) = (Some(v), file);
        }
        if let Some((v, file)) = limit_at("memory.high", cgroup::parse_memory_high)?
            && limit.high.is_none_or(|m| v < m)
        {
            (limit.high, limit.high_file) = (Some(v), Some(file));
        }
        match dir.parent() {
            Some(parent) if !at_top && parent.starts_with(&h.top) => dir = parent,
            _ => return Ok(limit),
        }
    }
}

/// One reading of the cgroup: limits, usage and the kubelet's working set.
#[derive(Debug, Clone, PartialEq)]
pub struct CgroupMemory {
    pub limit: CgroupLimit,
    /// v2 `memory.current`, v1 `memory.usage_in_bytes`: includes page cache.
    pub usage: u64,
    pub stat: cgroup::MemoryStat,
    /// `usage - inactive_file`, saturating: what the kubelet evicts on and
    /// `kubectl top` shows.
    pub working_set: u64,
    /// OOM kills in this cgroup so far, when the kernel counts them.
    pub oom_kills: Option<u64>,
    /// v2 PSI `some avg10` (percent), when `memory.pressure` exists.
    pub psi_some_avg10: Option<f64>,
}

/// Reads limits, usage, `memory.stat` and the optional counters. Missing
/// optional files (`memory.pressure`, `oom_kill`) give `None`; everything else
/// missing, unreadable or garbage is an error naming the file.
pub fn read_memory(h: &CgroupHandle) -> Result<CgroupMemory, CgroupError> {
    let stat = read_stat(h)?;
    let limit = match h.version {
        CgroupVersion::V1 => read_limit_v1(h, &stat)?,
        CgroupVersion::V2 => read_limit_v2(h)?,
    };
    let (usage_name, oom_name) = match h.version {
        CgroupVersion::V1 => ("memory.usage_in_bytes", "memory.oom_control"),
        CgroupVersion::V2 => ("memory.current", "memory.events"),
    };
    let usage_file = h.dir.join(usage_name);
    let usage = parsed(
        &usage_file,
        cgroup::parse_usage(usage_name, &read(&usage_file)?),
    )?;
    let oom_file = h.dir.join(oom_name);
    let oom_kills = match read_optional(&oom_file)? {
        Some(c) => parsed(&oom_file, cgroup::parse_oom_kill(oom_name, &c))?,
        None => None,
    };
    let psi_file = h.dir.join("memory.pressure");
    let psi_some_avg10 = match h.version {
        CgroupVersion::V1 => None,
        CgroupVersion::V2 => match read_optional(&psi_file)? {
            Some(c) => Some(parsed(&psi_file, cgroup::parse_psi_some_avg10(&c))?),
            None => None,
        },
    };
    Ok(CgroupMemory {
        limit,
        usage,
        working_set: usage.saturating_sub(stat.inactive_file),
        stat,
        oom_kills,
        psi_some_avg10,
    })
}

/// The host's memory (`MemTotal`), the limit of last resort. Never 0.
pub fn host_memory_total(roots: &Roots) -> Result<u64, CgroupError> {
    let file = roots.root.join("proc/meminfo");
    parsed(&file, cgroup::parse_meminfo_total(&read(&file)?))
}

/// Whether `/sys/fs/cgroup` is a pure cgroup v2 mount, per cgroups-rs's `statfs`
/// check. Always reads the real host, never [`Roots`]: for display and cross-checks.
#[cfg(target_os = "linux")]
pub fn host_is_cgroup2_unified() -> bool {
    cgroups_rs::hierarchies::is_cgroup2_unified_mode()
}

#[cfg(not(target_os = "linux"))]
pub fn host_is_cgroup2_unified() -> bool {
    false
}

/// Where the limit the guard works with came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitSource {
    /// `memory.limit` in the configuration.
    Config,
    /// `file` is `memory.limit_in_bytes`, or `memory.stat` with `key`
    /// `hierarchical_memory_limit` when an ancestor's limit is smaller.
    CgroupV1 {
        file: PathBuf,
        key: Option<&'static str>,
    },
    /// `file` is the smallest `memory.max` on the way up.
    CgroupV2 { file: PathBuf },
    /// `MemTotal` of `/proc/meminfo`.
    Host,
}

impl std::fmt::Display for LimitSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config => f.write_str("config memory.limit"),
            Self::CgroupV1 { file, key: None } => write!(f, "cgroup v1 {}", file.display()),
            Self::CgroupV1 {
                file,
                key: Some(key),
            } => write!(f, "cgroup v1 {} {key}", file.display()),
            Self::CgroupV2 { file } => write!(f, "cgroup v2 {}", file.display()),
            Self::Host => f.write_str("host MemTotal"),
        }
    }
}

/// The limit the guard works with. `bytes` is never 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedLimit {
    pub bytes: u64,
    pub source: LimitSource,
    /// Why the cgroup limit was not used, when it was looked for and not
    /// used: worth a log line, since the host's memory may be far more than
    /// what the container may really use.
    pub fallback_reason: Option<String>,
}

/// Picks the limit: a configured one wins, then the cgroup's, then the host's
/// memory. A cgroup that could not be read falls back to the host with the
/// reason, never to 0. A cgroup limit above the host's memory is no real
/// bound, so the host's memory wins then.
pub fn resolve_limit(
    configured: Option<u64>,
    cgroup: Result<Option<&CgroupLimit>, &CgroupError>,
    host_total: u64,
) -> ResolvedLimit {
    let host = |reason: String| ResolvedLimit {
        bytes: host_total.max(1),
        source: LimitSource::Host,
        fallback_reason: Some(reason),
    };
    if let Some(bytes) = configured.filter(|&b| b > 0) {
        return ResolvedLimit {
            bytes,
            source: LimitSource::Config,
            fallback_reason: None,
        };
    }
    let limit = match cgroup {
        Err(e) => return host(e.to_string()),
        Ok(None) => return host("no memory cgroup applies to this process".into()),
        Ok(Some(limit)) => limit,
    };
    let Some(bytes) = limit.max.filter(|&b| b > 0) else {
        return host(format!(
            "no cgroup memory limit ({} is unlimited)",
            limit.max_file.display()
        ));
    };
    if bytes > host_total {
        return host(format!(
            "cgroup limit {bytes} in {} exceeds host memory {host_total}",
            limit.max_file.display()
        ));
    }
    let file = limit.max_file.clone();
    let source = match limit.version {
        CgroupVersion::V1 => LimitSource::CgroupV1 {
            file,
            key: limit.max_key,
        },
        CgroupVersion::V2 => LimitSource::CgroupV2 { file },
    };
    ResolvedLimit {
        bytes,
        source,
        fallback_reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 16 << 30;

    type Cgroup<'a> = Result<Option<&'a CgroupLimit>, &'a CgroupError>;

    fn limit(version: CgroupVersion, max: Option<u64>) -> CgroupLimit {
        CgroupLimit {
            version,
            max,
            max_file: "/sys/fs/cgroup/memory.max".into(),
            max_key: None,
            high: None,
            high_file: None,
        }
    }

    #[test]
    fn resolve_limit_prefers_config_then_cgroup_then_host() {
        let v2 = limit(CgroupVersion::V2, Some(1 << 30));
        let v1 = limit(CgroupVersion::V1, Some(1 << 30));
        let unlimited = limit(CgroupVersion::V2, None);
        let huge = limit(CgroupVersion::V1, Some(HOST * 2));
        let broken = CgroupError::Parse {
            path: "/sys/fs/cgroup/memory.max".into(),
            source: cgroup::parse_memory_max("12abc").unwrap_err(),
        };
        let cases: Vec<(Option<u64>, Cgroup<'_>, u64, &str, bool)> = vec![
            (
                Some(512 << 20),
                Ok(Some(&v2)),
                512 << 20,
                "config memory.limit",
                false,
            ),
            (
                None,
                Ok(Some(&v2)),
                1 << 30,
                "cgroup v2 /sys/fs/cgroup/memory.max",
                false,
            ),
            (
                None,
                Ok(Some(&v1)),
                1 << 30,
                "cgroup v1 /sys/fs/cgroup/memory.max",
                false,
            ),
            (None, Ok(Some(&unlimited)), HOST, "host MemTotal", true),
            (None, Ok(Some(&huge)), HOST, "host MemTotal", true),
            (None, Ok(None), HOST, "host MemTotal", true),
            (None, Err(&broken), HOST, "host MemTotal", true),
            (Some(0), Err(&broken), HOST, "host MemTotal", true),
        ];
        for (configured, cgroup, bytes, source, fell_back) in cases {
            let got = resolve_limit(configured, cgroup, HOST);
            assert_eq!(got.bytes, bytes, "{got:?}");
            assert_eq!(got.source.to_string(), source, "{got:?}");
            assert_eq!(got.fallback_reason.is_some(), fell_back, "{got:?}");
        }
        let reason = resolve_limit(None, Err(&broken), HOST)
            .fallback_reason
            .unwrap();
        assert!(
            reason.contains("/sys/fs/cgroup/memory.max") && reason.contains("12abc"),
            "{reason}"
        );
    }
}
