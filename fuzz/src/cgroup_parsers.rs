//! `memgate::guard::cgroup`: the contents of `/proc/self/cgroup`, mountinfo,
//! `memory.*` and `/proc/meminfo`. The kernel writes them, but inside a container
//! they are whatever the runtime bind-mounts there, so they are not trusted.
//!
//! Input: any bytes as text (lossily converted). Every parser reads the whole
//! text. If it holds NUL characters, every NUL-separated piece is parsed on its
//! own too, and then:
//! - the mounts of the first piece (as mountinfo) are `locate`d with the cgroup
//!   paths of the second (as `/proc/self/cgroup`);
//! - with three or more pieces, `locate` also runs on a mount whose root is the
//!   first piece and mount point the second, for the path in the third.
//!
//! Invariants: a limit parser never returns `Ok(Some(0))` (0 must be an error, not
//! "no memory" nor "unlimited"); v1 limits are below `V1_UNLIMITED_THRESHOLD`;
//! `memory.max` and `memory.high` agree; PSI is a percentage; `MemTotal` is a
//! positive number of KiB; a located path is under its mount point and never
//! climbs out of it with `..`.

use std::path::{Component, Path};

use memgate::guard::cgroup::{
    CgroupMount, CgroupVersion, ParseError, V1_UNLIMITED_THRESHOLD, has_memory_controller, locate,
    parse_limit_in_bytes, parse_meminfo_total, parse_memory_high, parse_memory_max,
    parse_memory_stat, parse_mountinfo, parse_oom_kill, parse_proc_cgroup, parse_psi_some_avg10,
    parse_usage,
};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    parse_all(&text);
    if !text.contains('\0') {
        return;
    }
    let pieces: Vec<&str> = text.split('\0').collect();
    for piece in &pieces {
        parse_all(piece);
    }
    if let (Ok(mounts), Ok(cgroup)) = (parse_mountinfo(pieces[0]), parse_proc_cgroup(pieces[1])) {
        let paths = [cgroup.v1_memory.as_deref(), cgroup.v2.as_deref()];
        for mount in mounts.v1_memory.iter().chain(&mounts.v2) {
            for path in paths.into_iter().flatten() {
                check_locate(mount, path);
            }
        }
    }
    if let [root, mount_point, path, ..] = pieces[..] {
        let mount = CgroupMount {
            mount_point: mount_point.into(),
            root: root.to_owned(),
        };
        check_locate(&mount, path);
    }
}

/// An error's message must render (it goes to the logs).
fn shown<T>(r: Result<T, ParseError>) -> Result<T, ParseError> {
    if let Err(e) = &r {
        assert!(!e.to_string().is_empty());
    }
    r
}

fn parse_all(text: &str) {
    if let Ok(cg) = shown(parse_proc_cgroup(text)) {
        for path in [&cg.v1_memory, &cg.v2].into_iter().flatten() {
            assert!(path.starts_with('/'), "cgroup path {path:?} from {text:?}");
        }
    }
    if let Ok(mounts) = shown(parse_mountinfo(text)) {
        assert!(mounts.v1_memory.len() + mounts.v2.len() <= text.lines().count());
    }

    let max = shown(parse_memory_max(text));
    let high = shown(parse_memory_high(text));
    for limit in [&max, &high] {
        assert_ne!(limit.as_ref().ok(), Some(&Some(0)), "limit 0 from {text:?}");
    }
    assert_eq!(
        max.as_ref().map_err(|e| &e.problem),
        high.as_ref().map_err(|e| &e.problem),
        "memory.max and memory.high disagree on {text:?}"
    );
    assert_eq!(
        matches!(max, Ok(None)),
        text.trim() == "max",
        "{text:?} gave {max:?}"
    );

    if let Ok(Some(n)) = shown(parse_limit_in_bytes(text)) {
        assert!(
            n > 0 && n < V1_UNLIMITED_THRESHOLD,
            "v1 limit {n} from {text:?}"
        );
    }

    for file in ["memory.current", "memory.usage_in_bytes"] {
        if let Ok(n) = shown(parse_usage(file, text)) {
            assert_eq!(text.trim().parse::<u64>(), Ok(n), "usage from {text:?}");
        }
    }

    if let Ok(stat) = shown(parse_memory_stat(CgroupVersion::V1, text))
        && let Some(n) = stat.hierarchical_limit
    {
        assert!(
            n > 0 && n < V1_UNLIMITED_THRESHOLD,
            "hierarchical limit {n} from {text:?}"
        );
    }
    if let Ok(stat) = shown(parse_memory_stat(CgroupVersion::V2, text)) {
        assert_eq!(stat.hierarchical_limit, None, "v2 stat {text:?}");
    }

    for file in ["memory.oom_control", "memory.events"] {
        let _ = shown(parse_oom_kill(file, text));
    }

    if let Ok(v) = shown(parse_psi_some_avg10(text)) {
        assert!((0.0..=100.0).contains(&v), "PSI {v} from {text:?}");
    }

    if let Ok(n) = shown(parse_meminfo_total(text)) {
        assert!(n > 0 && n % 1024 == 0, "MemTotal {n} from {text:?}");
    }

    let _ = has_memory_controller(text);
}

fn check_locate(mount: &CgroupMount, cgroup_path: &str) {
    let Some(found) = locate(mount, cgroup_path) else {
        return;
    };
    let rest = found.strip_prefix(&mount.mount_point).unwrap_or_else(|_| {
        panic!("{found:?} is not under the mount point of {mount:?} (path {cgroup_path:?})")
    });
    assert!(
        !rest.components().any(|c| c == Component::ParentDir),
        "{found:?} climbs out of {mount:?} (path {cgroup_path:?})"
    );
    if mount.root != "/" {
        assert!(
            cgroup_path.starts_with(mount.root.trim_end_matches('/')),
            "{cgroup_path:?} is outside the root of {mount:?} but located at {found:?}"
        );
    }
    assert!(rest.is_relative() || rest == Path::new(""));
}
