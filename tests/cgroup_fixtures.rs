//! Limit discovery against fixture trees of real hosts (see
//! `tests/fixtures/cgroup/README.md`) and against this machine itself.

use std::path::{Path, PathBuf};

use memgate::guard::{
    cgroup::CgroupVersion,
    discover::{
        CgroupError, CgroupLimit, ResolvedLimit, Roots, discover, host_memory_total, read_limit,
        read_memory, resolve_limit,
    },
};

const MIB: u64 = 1 << 20;
const V1_HOST: u64 = 24684092 * 1024;
const V2_HOST: u64 = 2014256 * 1024;
/// This machine's usage and inactive file pages when the v1 trees were copied.
const V1_WORKING_SET: u64 = 799481856 - 493203456;
/// `memory.current` minus `inactive_file` in every v2 tree.
const V2_WORKING_SET: u64 = 52428800 - 10485760;
const OURS_V1: &str = "sys/fs/cgroup/memory/process_api/a5033911770effab80dec92c96c45561";
const OURS_V2: &str = "sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
    kubepods-burstable-pod5f1c0a7e_2b1d_4c3a_9e8f_7a6b5c4d3e2f.slice/\
    cri-containerd-8c2f4e6a1b3d5f7e9a0c2e4f6a8b0d2f4e6a8c0b2d4f6e8a0c2e4f6a8b0d2f4e.scope";
const POD_V2: &str = "sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
    kubepods-burstable-pod5f1c0a7e_2b1d_4c3a_9e8f_7a6b5c4d3e2f.slice";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cgroup")
        .join(name)
}

/// What the guard would do at start-up with `memory.limit = auto`.
fn resolve(roots: &Roots) -> (Result<Option<CgroupLimit>, CgroupError>, ResolvedLimit) {
    let host = host_memory_total(roots).unwrap();
    let limit = discover(roots).and_then(|h| h.map(|h| read_limit(&h)).transpose());
    let resolved = resolve_limit(None, limit.as_ref().map(Option::as_ref), host);
    (limit, resolved)
}

struct Case {
    tree: &'static str,
    version: Option<CgroupVersion>,
    limit: u64,
    /// `LimitSource`'s display, with the fixture directory left out.
    source: String,
    /// The file a failed read must name, relative to the tree.
    error_file: Option<String>,
    working_set: Option<u64>,
}

fn case(tree: &'static str, version: Option<CgroupVersion>, limit: u64, source: String) -> Case {
    let working_set = match version {
        Some(CgroupVersion::V1) => Some(V1_WORKING_SET),
        Some(CgroupVersion::V2) => Some(V2_WORKING_SET),
        None => None,
    };
    Case {
        tree,
        version,
        limit,
        source,
        error_file: None,
        working_set,
    }
}

/// A tree whose limit cannot be read: the host's memory, never 0.
fn failing(tree: &'static str, version: Option<CgroupVersion>, host: u64, file: String) -> Case {
    Case {
        error_file: Some(file),
        working_set: None,
        ..case(tree, version, host, "host MemTotal".into())
    }
}

#[test]
fn fixture_trees() {
    use CgroupVersion::{V1, V2};
    let cases = [
        case("v1_unlimited", Some(V1), V1_HOST, "host MemTotal".into()),
        case(
            "v1_limit",
            Some(V1),
            1024 * MIB,
            format!("cgroup v1 {OURS_V1}/memory.limit_in_bytes"),
        ),
        case(
            "v1_parent_limit",
            Some(V1),
            512 * MIB,
            format!("cgroup v1 {OURS_V1}/memory.stat hierarchical_memory_limit"),
        ),
        case(
            "v1_container",
            Some(V1),
            256 * MIB,
            "cgroup v1 sys/fs/cgroup/memory/memory.limit_in_bytes".into(),
        ),
        failing(
            "v1_missing_limit",
            Some(V1),
            V1_HOST,
            format!("{OURS_V1}/memory.limit_in_bytes"),
        ),
        failing(
            "v1_missing_stat",
            Some(V1),
            V1_HOST,
            format!("{OURS_V1}/memory.stat"),
        ),
        failing(
            "v1_empty_limit",
            Some(V1),
            V1_HOST,
            format!("{OURS_V1}/memory.limit_in_bytes"),
        ),
        case("hybrid_no_memory", None, V1_HOST, "host MemTotal".into()),
        case(
            "v2_limit",
            Some(V2),
            256 * MIB,
            format!("cgroup v2 {OURS_V2}/memory.max"),
        ),
        case(
            "v2_nested",
            Some(V2),
            512 * MIB,
            format!("cgroup v2 {POD_V2}/memory.max"),
        ),
        case("v2_unlimited", Some(V2), V2_HOST, "host MemTotal".into()),
        case(
            "v2_high",
            Some(V2),
            1024 * MIB,
            format!("cgroup v2 {OURS_V2}/memory.max"),
        ),
        failing(
            "v2_garbage_max",
            Some(V2),
            V2_HOST,
            format!("{OURS_V2}/memory.max"),
        ),
        case(
            "v2_namespace",
            Some(V2),
            256 * MIB,
            "cgroup v2 sys/fs/cgroup/memory.max".into(),
        ),
        case(
            "v2_escaped_root",
            Some(V2),
            128 * MIB,
            "cgroup v2 sys/fs/cgroup/memory.max".into(),
        ),
        failing("v2_not_visible", None, V2_HOST, "sys/fs/cgroup".into()),
    ];
    for c in cases {
        let root = fixture(c.tree);
        let roots = Roots::at(&root);
        let (limit, resolved) = resolve(&roots);
        let tree = c.tree;
        assert!(resolved.bytes > 0, "{tree}: {resolved:?}");
        assert_eq!(resolved.bytes, c.limit, "{tree}: {resolved:?}");
        let source = resolved
            .source
            .to_string()
            .replace(&format!("{}/", root.display()), "");
        assert_eq!(source, c.source, "{tree}");

        match (&limit, &c.error_file) {
            (Err(e), Some(file)) => {
                assert_eq!(e.path(), root.join(file), "{tree}: {e}");
                let reason = resolved.fallback_reason.as_deref().unwrap_or_default();
                assert!(reason.contains(file.as_str()), "{tree}: {reason}");
            }
            (Ok(_), None) => {}
            (got, want) => panic!("{tree}: got {got:?}, expected an error about {want:?}"),
        }

        let handle = discover(&roots).ok().flatten();
        assert_eq!(handle.as_ref().map(|h| h.version), c.version, "{tree}");
        if let (Some(h), Some(ws)) = (handle, c.working_set) {
            let m = read_memory(&h).unwrap_or_else(|e| panic!("{tree}: {e}"));
            assert_eq!(m.working_set, ws, "{tree}: {m:?}");
            assert!(m.working_set <= m.usage, "{tree}: {m:?}");
            assert_eq!(m.limit, limit.unwrap().unwrap(), "{tree}");
        }
    }
}

/// The figures besides the limit: `memory.high`, PSI, OOM kills, paths.
#[test]
fn optional_figures() {
    let read = |tree: &str| {
        let h = discover(&Roots::at(fixture(tree))).unwrap().unwrap();
        (read_memory(&h).unwrap(), h)
    };

    let (m, _) = read("v2_high");
    assert_eq!(m.limit.high, Some(768 * MIB));
    let high_file = m.limit.high_file.unwrap();
    assert!(
        high_file.ends_with(format!("{OURS_V2}/memory.high")),
        "{high_file:?}"
    );
    assert_eq!(m.psi_some_avg10, Some(12.5));
    assert_eq!(m.oom_kills, Some(0));

    // No memory.pressure and a memory.events without `oom_kill`.
    let (m, _) = read("v2_limit");
    assert_eq!(
        (m.psi_some_avg10, m.oom_kills, m.limit.high),
        (None, None, None)
    );

    let (m, h) = read("v2_namespace");
    assert_eq!(h.path, "/");
    assert_eq!(h.dir, h.top);
    assert_eq!((m.oom_kills, m.psi_some_avg10), (Some(2), Some(0.0)));

    let (m, h) = read("v2_escaped_root");
    assert_eq!(h.path, "/batch jobs/job 7");
    assert_eq!(h.dir, fixture("v2_escaped_root").join("sys/fs/cgroup"));
    assert_eq!(m.limit.max, Some(128 * MIB));

    let (m, h) = read("v1_container");
    assert_eq!(h.dir, fixture("v1_container").join("sys/fs/cgroup/memory"));
    assert_eq!(m.oom_kills, Some(2));
    assert_eq!(m.psi_some_avg10, None);
    assert_eq!(m.stat.anon, 2117632);

    let (m, _) = read("v1_unlimited");
    assert_eq!(m.limit.max, None);
    assert_eq!((m.usage, m.oom_kills), (799481856, Some(0)));
}

#[test]
fn configured_limit_wins_over_everything() {
    let roots = Roots::at(fixture("v2_garbage_max"));
    let host = host_memory_total(&roots).unwrap();
    let limit = discover(&roots).and_then(|h| h.map(|h| read_limit(&h)).transpose());
    let resolved = resolve_limit(Some(300 * MIB), limit.as_ref().map(Option::as_ref), host);
    assert_eq!(
        (resolved.bytes, resolved.source.to_string()),
        (300 * MIB, "config memory.limit".into())
    );
}

/// This machine: cgroup v1 with a memory controller.
#[test]
fn real_machine() {
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if !proc_cgroup.lines().any(|l| {
        l.split(':')
            .nth(1)
            .is_some_and(|c| c.split(',').any(|c| c == "memory"))
    }) {
        eprintln!("skipped: /proc/self/cgroup has no memory controller line:\n{proc_cgroup}");
        return;
    }
    let roots = Roots::default();
    let handle = discover(&roots).unwrap().expect("a v1 memory cgroup");
    assert_eq!(handle.version, CgroupVersion::V1, "{handle:?}");
    assert!(handle.dir.starts_with(&handle.top), "{handle:?}");
    assert!(!memgate::guard::discover::host_is_cgroup2_unified());

    let m = read_memory(&handle).unwrap();
    assert!(m.usage > 0, "{m:?}");
    assert!(m.working_set <= m.usage, "{m:?}");
    assert!(m.limit.max.is_none_or(|l| l > 0), "{m:?}");

    let (_, resolved) = resolve(&roots);
    assert!(resolved.bytes > 0, "{resolved:?}");
    assert!(
        resolved.bytes <= host_memory_total(&roots).unwrap(),
        "{resolved:?}"
    );
}

/// Removes the child cgroup once its only process is gone.
struct ChildCgroup {
    dir: PathBuf,
    process: Option<std::process::Child>,
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

/// A real v1 child cgroup with a 64 MiB limit, found through the /proc entry
/// of a process moved into it: the lookup a sidecar or test harness would do.
#[test]
fn real_child_cgroup_with_a_limit() {
    let Some(ours) = discover(&Roots::default()).ok().flatten() else {
        eprintln!("skipped: no memory cgroup here");
        return;
    };
    if ours.version != CgroupVersion::V1 {
        eprintln!("skipped: this test writes v1 files, the machine has {ours:?}");
        return;
    }
    let dir = ours
        .dir
        .join(format!("memgate-test-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        eprintln!("skipped: cannot create {}: {e}", dir.display());
        return;
    }
    let mut child = ChildCgroup { dir, process: None };
    std::fs::write(child.dir.join("memory.limit_in_bytes"), "67108864").unwrap();
    let process = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = process.id();
    child.process = Some(process);
    std::fs::write(child.dir.join("cgroup.procs"), pid.to_string()).unwrap();

    let roots = Roots {
        pid: Some(pid),
        ..Roots::default()
    };
    let handle = discover(&roots).unwrap().unwrap();
    assert_eq!(handle.dir, child.dir);
    let (_, resolved) = resolve(&roots);
    assert_eq!(resolved.bytes, 64 * MIB, "{resolved:?}");
    assert_eq!(
        resolved.source.to_string(),
        format!("cgroup v1 {}/memory.limit_in_bytes", child.dir.display())
    );
    let m = read_memory(&handle).unwrap();
    assert!(m.working_set <= m.usage && m.usage < 64 * MIB, "{m:?}");
}
