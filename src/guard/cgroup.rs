//! Pure parsers for the files that say where our memory cgroup is and what it
//! allows: `/proc/self/cgroup`, `/proc/self/mountinfo`, `memory.*` of both cgroup
//! versions and `/proc/meminfo`. No I/O here: [`super::discover`] reads the files
//! and hands their contents in, so every rule is table-tested with real contents.
//!
//! Garbage never becomes a number. Empty, negative, non-numeric or truncated
//! content is a [`ParseError`] naming the file, and a limit of 0 is an error too:
//! a caller that defaulted to 0 would refuse all work, one that took 0 as
//! "unlimited" would run into the OOM killer.

use std::{collections::BTreeMap, path::PathBuf};

/// v1 writes "unlimited" as `PAGE_COUNTER_MAX` pages (9223372036854771712 with
/// 4 KiB pages; other page sizes round differently), so anything this big is no limit.
pub const V1_UNLIMITED_THRESHOLD: u64 = 1 << 62;

/// Which cgroup hierarchy a reading comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A file's content could not be understood.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct ParseError {
    /// The file's name (`memory.max`, `/proc/self/mountinfo`, ...).
    pub file: &'static str,
    pub problem: Problem,
}

/// What was wrong with a file's content.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("empty")]
    Empty,
    #[error("{0:?} is not a byte count")]
    NotANumber(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("a limit of 0 bytes leaves no memory to run in")]
    ZeroLimit,
    #[error("no {0:?} entry")]
    MissingKey(&'static str),
    #[error("line {line} ({text:?}) is malformed")]
    BadLine { line: usize, text: String },
}

fn err(file: &'static str, problem: Problem) -> ParseError {
    ParseError { file, problem }
}

/// Keeps error messages readable when a file holds something huge.
fn excerpt(s: &str) -> String {
    s.chars().take(64).collect()
}

fn bad_line(file: &'static str, index: usize, text: &str) -> ParseError {
    err(
        file,
        Problem::BadLine {
            line: index + 1,
            text: excerpt(text),
        },
    )
}

/// Our cgroup paths, relative to their hierarchy's root, from `/proc/self/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// From `N:memory:/path` or `N:cpu,memory:/path`.
    pub v1_memory: Option<String>,
    /// From `0::/path`.
    pub v2: Option<String>,
}

pub fn parse_proc_cgroup(content: &str) -> Result<ProcCgroup, ParseError> {
    const FILE: &str = "/proc/self/cgroup";
    let mut out = ProcCgroup::default();
    let mut lines = 0;
    for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        lines += 1;
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad_line(FILE, i, line));
        };
        if id.parse::<u32>().is_err() || !path.starts_with('/') {
            return Err(bad_line(FILE, i, line));
        }
        if id == "0" && controllers.is_empty() {
            out.v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            out.v1_memory = Some(path.to_owned());
        }
    }
    if lines == 0 {
        return Err(err(FILE, Problem::Empty));
    }
    Ok(out)
}

/// One mount of a cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted, as our mount namespace sees it.
    pub mount_point: PathBuf,
    /// Which cgroup of the hierarchy appears at the mount point: `/` on a host,
    /// often our own cgroup's path inside a container.
    pub root: String,
}

/// The cgroup mounts the guard can use, in mountinfo order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// `cgroup` mounts whose super options include `memory`.
    pub v1_memory: Vec<CgroupMount>,
    /// `cgroup2` mounts.
    pub v2: Vec<CgroupMount>,
}

pub fn parse_mountinfo(content: &str) -> Result<CgroupMounts, ParseError> {
    const FILE: &str = "/proc/self/mountinfo";
    let mut out = CgroupMounts::default();
    let mut lines = 0;
    for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        lines += 1;
        // id parent major:minor root mount_point options [optional...] - fstype source super_options
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        // Root and mount point may themselves be "-": look for the separator after them.
        let sep = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 6);
        let Some(sep) = sep.filter(|&s| fields.len() >= s + 4) else {
            return Err(bad_line(FILE, i, line));
        };
        let mount = || -> Result<CgroupMount, ParseError> {
            Ok(CgroupMount {
                root: unescape(fields[3]).ok_or_else(|| bad_line(FILE, i, line))?,
                mount_point: unescape(fields[4])
                    .ok_or_else(|| bad_line(FILE, i, line))?
                    .into(),
            })
        };
        match fields[sep + 1] {
            "cgroup2" => out.v2.push(mount()?),
            "cgroup" if fields[sep + 3].split(',').any(|o| o == "memory") => {
                out.v1_memory.push(mount()?)
            }
            _ => {}
        }
    }
    if lines == 0 {
        return Err(err(FILE, Problem::Empty));
    }
    Ok(out)
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape(field: &str) -> Option<String> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = std::str::from_utf8(bytes.get(i + 1..i + 4)?).ok()?;
            out.push(u8::from_str_radix(digits, 8).ok()?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where `cgroup_path` (from `/proc/self/cgroup`) lives under `mount`, or `None`
/// when the mount does not show it (the path is outside the mount's root, or
/// climbs out of it with `..` as happens across cgroup namespaces).
pub fn locate(mount: &CgroupMount, cgroup_path: &str) -> Option<PathBuf> {
    let rest = if mount.root == "/" {
        cgroup_path
    } else {
        let rest = cgroup_path.strip_prefix(mount.root.trim_end_matches('/'))?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let rest = rest.trim_start_matches('/');
    if rest.split('/').any(|c| c == "..") {
        return None;
    }
    if rest.is_empty() {
        Some(mount.mount_point.clone())
    } else {
        Some(mount.mount_point.join(rest))
    }
}

/// Whether a v2 `cgroup.controllers` lists the memory controller.
pub fn has_memory_controller(controllers: &str) -> bool {
    controllers.split_ascii_whitespace().any(|c| c == "memory")
}

fn parse_bytes(file: &'static str, content: &str) -> Result<u64, ParseError> {
    let t = content.trim();
    if t.is_empty() {
        return Err(err(file, Problem::Empty));
    }
    if t.starts_with('-') {
        return Err(err(file, Problem::Negative(excerpt(t))));
    }
    t.parse()
        .map_err(|_| err(file, Problem::NotANumber(excerpt(t))))
}

fn nonzero_limit(file: &'static str, n: u64) -> Result<u64, ParseError> {
    if n == 0 {
        Err(err(file, Problem::ZeroLimit))
    } else {
        Ok(n)
    }
}

fn parse_v2_limit(file: &'static str, content: &str) -> Result<Option<u64>, ParseError> {
    if content.trim() == "max" {
        return Ok(None);
    }
    nonzero_limit(file, parse_bytes(file, content)?).map(Some)
}

/// v2 `memory.max`: `max` is no limit.
pub fn parse_memory_max(content: &str) -> Result<Option<u64>, ParseError> {
    parse_v2_limit("memory.max", content)
}

/// v2 `memory.high`: `max` is no throttling threshold.
pub fn parse_memory_high(content: &str) -> Result<Option<u64>, ParseError> {
    parse_v2_limit("memory.high", content)
}

/// v1 `memory.limit_in_bytes`: values from [`V1_UNLIMITED_THRESHOLD`] up are no limit.
pub fn parse_limit_in_bytes(content: &str) -> Result<Option<u64>, ParseError> {
    const FILE: &str = "memory.limit_in_bytes";
    let n = nonzero_limit(FILE, parse_bytes(FILE, content)?)?;
    Ok((n < V1_UNLIMITED_THRESHOLD).then_some(n))
}

/// A single byte count where 0 is a valid reading (`memory.current`,
/// `memory.usage_in_bytes`).
pub fn parse_usage(file: &'static str, content: &str) -> Result<u64, ParseError> {
    parse_bytes(file, content)
}

/// `key value` lines, as in `memory.stat`, `memory.events` and `memory.oom_control`.
fn parse_flat_keyed<'a>(
    file: &'static str,
    content: &'a str,
) -> Result<BTreeMap<&'a str, u64>, ParseError> {
    let mut map = BTreeMap::new();
    for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let mut it = line.split_ascii_whitespace();
        let (Some(key), Some(value), None) = (it.next(), it.next(), it.next()) else {
            return Err(bad_line(file, i, line));
        };
        let value = value.parse().map_err(|_| bad_line(file, i, line))?;
        map.insert(key, value);
    }
    if map.is_empty() {
        return Err(err(file, Problem::Empty));
    }
    Ok(map)
}

/// The `memory.stat` figures the guard uses, named the same for both versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStat {
    /// v1 `total_inactive_file`, v2 `inactive_file`: reclaimable page cache,
    /// which the kubelet leaves out of the working set.
    pub inactive_file: u64,
    /// v1 `total_active_file`, v2 `active_file`.
    pub active_file: u64,
    /// v1 `total_rss`, v2 `anon`.
    pub anon: u64,
    /// v1 `total_cache`, v2 `file`.
    pub file: u64,
    /// v1 `hierarchical_memory_limit`: the smallest limit among our ancestors,
    /// including those a container cannot see. Always `None` for v2.
    pub hierarchical_limit: Option<u64>,
}

/// `memory.stat` of either version. The `total_*` keys of v1 include
/// descendant cgroups, like v2's keys do.
pub fn parse_memory_stat(version: CgroupVersion, content: &str) -> Result<MemoryStat, ParseError> {
    const FILE: &str = "memory.stat";
    let map = parse_flat_keyed(FILE, content)?;
    let get = |key: &'static str| {
        map.get(key)
            .copied()
            .ok_or(err(FILE, Problem::MissingKey(key)))
    };
    Ok(match version {
        CgroupVersion::V1 => MemoryStat {
            inactive_file: get("total_inactive_file")?,
            active_file: get("total_active_file")?,
            anon: get("total_rss")?,
            file: get("total_cache")?,
            hierarchical_limit: match map.get("hierarchical_memory_limit") {
                Some(&n) => Some(nonzero_limit(FILE, n)?).filter(|&n| n < V1_UNLIMITED_THRESHOLD),
                None => None,
            },
        },
        CgroupVersion::V2 => MemoryStat {
            inactive_file: get("inactive_file")?,
            active_file: get("active_file")?,
            anon: get("anon")?,
            file: get("file")?,
            hierarchical_limit: None,
        },
    })
}

/// `oom_kill` from v1 `memory.oom_control` or v2 `memory.events`; `None` on
/// kernels too old to count it (before 4.13).
pub fn parse_oom_kill(file: &'static str, content: &str) -> Result<Option<u64>, ParseError> {
    Ok(parse_flat_keyed(file, content)?.get("oom_kill").copied())
}

/// `some avg10` of v2 `memory.pressure`: the percentage of the last 10 s in
/// which at least one task stalled waiting for memory.
pub fn parse_psi_some_avg10(content: &str) -> Result<f64, ParseError> {
    const FILE: &str = "memory.pressure";
    let (i, line) = content
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with("some "))
        .ok_or(err(FILE, Problem::MissingKey("some")))?;
    let avg10 = line
        .split_ascii_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))
        .ok_or_else(|| bad_line(FILE, i, line))?;
    match avg10.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(bad_line(FILE, i, line)),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo_total(content: &str) -> Result<u64, ParseError> {
    const FILE: &str = "/proc/meminfo";
    let (i, line) = content
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with("MemTotal:"))
        .ok_or(err(FILE, Problem::MissingKey("MemTotal")))?;
    let mut it = line["MemTotal:".len()..].split_ascii_whitespace();
    let (Some(n), Some("kB"), None) = (it.next(), it.next(), it.next()) else {
        return Err(bad_line(FILE, i, line));
    };
    let kib = nonzero_limit(FILE, parse_bytes(FILE, n)?)?;
    kib.checked_mul(1024).ok_or_else(|| bad_line(FILE, i, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This development machine: cgroup v1 plus a cgroup2 mount without controllers.
    const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
        4:memory:/process_api/a5033911770effab80dec92c96c45561\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A systemd host on cgroup v2 (Debian 12), optional fields present.
    const V2_MOUNTINFO: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    /// Docker on a v1 host without a cgroup namespace: the hierarchy's root is
    /// our own cgroup, and a co-mounted cpu,memory hierarchy.
    const CONTAINER_MOUNTINFO: &str = "\
1203 1195 0:95 /docker/0b1f /sys/fs/cgroup/cpu,memory ro,nosuid,nodev,noexec,relatime master:25 - cgroup cgroup rw,cpu,memory
";

    fn mount(mount_point: &str, root: &str) -> CgroupMount {
        CgroupMount {
            mount_point: mount_point.into(),
            root: root.into(),
        }
    }

    #[test]
    fn proc_cgroup_finds_both_versions() {
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            (
                HYBRID_CGROUP,
                Some("/process_api/a5033911770effab80dec92c96c45561"),
                Some("/"),
            ),
            (
                "0::/system.slice/memgate.service\n",
                None,
                Some("/system.slice/memgate.service"),
            ),
            (
                "12:cpu,memory:/docker/0b1f\n1:name=systemd:/docker/0b1f\n",
                Some("/docker/0b1f"),
                None,
            ),
            // A memory-ish name that is not the memory controller.
            ("3:name=memoryless:/x\n", None, None),
            ("0::/a:b\n", None, Some("/a:b")),
        ];
        for (content, v1, v2) in cases {
            let got = parse_proc_cgroup(content).unwrap();
            assert_eq!(got.v1_memory.as_deref(), *v1, "{content}");
            assert_eq!(got.v2.as_deref(), *v2, "{content}");
        }
    }

    #[test]
    fn proc_cgroup_rejects_garbage() {
        for content in [
            "",
            "\n\n",
            "memory:/x\n",
            "x:memory:/a\n",
            "4:memory:relative\n",
            "4:memo",
        ] {
            let e = parse_proc_cgroup(content).unwrap_err();
            assert_eq!(e.file, "/proc/self/cgroup", "{content:?}");
        }
    }

    #[test]
    fn mountinfo_finds_memory_mounts() {
        let cases: &[(&str, Vec<CgroupMount>, Vec<CgroupMount>)] = &[
            (
                HYBRID_MOUNTINFO,
                vec![mount("/sys/fs/cgroup/memory", "/")],
                vec![mount("/sys/fs/cgroup/unified", "/")],
            ),
            (V2_MOUNTINFO, vec![], vec![mount("/sys/fs/cgroup", "/")]),
            (
                CONTAINER_MOUNTINFO,
                vec![mount("/sys/fs/cgroup/cpu,memory", "/docker/0b1f")],
                vec![],
            ),
            (
                "30 28 0:26 /kube\\040pods/x\\134y /sys/fs/my\\011cg rw - cgroup2 cgroup2 rw\n",
                vec![],
                vec![mount("/sys/fs/my\tcg", "/kube pods/x\\y")],
            ),
            // A mount point literally named "-" is not the separator.
            (
                "30 28 0:26 / - rw - cgroup2 cgroup2 rw\n",
                vec![],
                vec![mount("-", "/")],
            ),
        ];
        for (content, v1, v2) in cases {
            let got = parse_mountinfo(content).unwrap();
            assert_eq!(&got.v1_memory, v1, "{content}");
            assert_eq!(&got.v2, v2, "{content}");
        }
    }

    #[test]
    fn mountinfo_rejects_garbage() {
        for content in [
            "",
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2\n",
            "41 31 0:38 /\n",
            "41 31 0:38 / /bad\\04 rw - cgroup2 cgroup2 rw\n",
        ] {
            let e = parse_mountinfo(content).unwrap_err();
            assert_eq!(e.file, "/proc/self/mountinfo", "{content:?}");
        }
    }

    #[test]
    fn locate_handles_mount_roots() {
        let host = mount("/sys/fs/cgroup/memory", "/");
        let container = mount("/sys/fs/cgroup/memory", "/docker/0b1f");
        let cases: &[(&CgroupMount, &str, Option<&str>)] = &[
            (
                &host,
                "/process_api/a5",
                Some("/sys/fs/cgroup/memory/process_api/a5"),
            ),
            (&host, "/", Some("/sys/fs/cgroup/memory")),
            (&container, "/docker/0b1f", Some("/sys/fs/cgroup/memory")),
            (
                &container,
                "/docker/0b1f/sub",
                Some("/sys/fs/cgroup/memory/sub"),
            ),
            (&container, "/docker/0b1f2", None),
            (&container, "/other", None),
            (&host, "/../escaped", None),
        ];
        for (m, path, want) in cases {
            assert_eq!(
                locate(m, path).as_deref(),
                want.map(std::path::Path::new),
                "{path}"
            );
        }
    }

    #[test]
    fn limits_parse_or_fail_loudly() {
        let max: &[(&str, Result<Option<u64>, Problem>)] = &[
            ("max\n", Ok(None)),
            ("1073741824\n", Ok(Some(1 << 30))),
            ("0\n", Err(Problem::ZeroLimit)),
            ("", Err(Problem::Empty)),
            ("\n", Err(Problem::Empty)),
            ("-1\n", Err(Problem::Negative("-1".into()))),
            ("12abc\n", Err(Problem::NotANumber("12abc".into()))),
            ("ma", Err(Problem::NotANumber("ma".into()))),
            (
                "99999999999999999999\n",
                Err(Problem::NotANumber("99999999999999999999".into())),
            ),
        ];
        for (content, want) in max {
            let got = parse_memory_max(content).map_err(|e| e.problem);
            assert_eq!(&got, want, "memory.max {content:?}");
            assert_eq!(parse_memory_high(content).map_err(|e| e.problem), *want);
        }
        let v1: &[(&str, Result<Option<u64>, Problem>)] = &[
            ("9223372036854771712\n", Ok(None)),
            ("9223372036854775807\n", Ok(None)),
            ("4611686018427387903\n", Ok(Some((1 << 62) - 1))),
            ("536870912\n", Ok(Some(512 << 20))),
            ("0\n", Err(Problem::ZeroLimit)),
            ("max\n", Err(Problem::NotANumber("max".into()))),
            ("-1\n", Err(Problem::Negative("-1".into()))),
        ];
        for (content, want) in v1 {
            let got = parse_limit_in_bytes(content).map_err(|e| e.problem);
            assert_eq!(&got, want, "memory.limit_in_bytes {content:?}");
        }
        assert_eq!(
            parse_memory_max("x").unwrap_err().to_string(),
            "memory.max: \"x\" is not a byte count"
        );
        assert_eq!(parse_usage("memory.current", "0\n"), Ok(0));
    }

    /// This machine's v1 `memory.stat`, shortened.
    const V1_STAT: &str = "cache 7659520\nrss 1658880\ninactive_file 24576\nactive_file 7634944\n\
        hierarchical_memory_limit 9223372036854771712\ntotal_cache 7659520\ntotal_rss 1658880\n\
        total_inactive_file 24576\ntotal_active_file 7634944\n";
    const V2_STAT: &str = "anon 1531904\nfile 8192000\nkernel 1245184\nshmem 0\n\
        inactive_anon 1499136\nactive_anon 32768\ninactive_file 6000640\nactive_file 2191360\n";

    #[test]
    fn memory_stat_maps_both_versions() {
        let v1 = parse_memory_stat(CgroupVersion::V1, V1_STAT).unwrap();
        assert_eq!(
            v1,
            MemoryStat {
                inactive_file: 24576,
                active_file: 7634944,
                anon: 1658880,
                file: 7659520,
                hierarchical_limit: None,
            }
        );
        let limited = V1_STAT.replace("9223372036854771712", "536870912");
        let v1 = parse_memory_stat(CgroupVersion::V1, &limited).unwrap();
        assert_eq!(v1.hierarchical_limit, Some(512 << 20));
        let v2 = parse_memory_stat(CgroupVersion::V2, V2_STAT).unwrap();
        assert_eq!(
            (v2.inactive_file, v2.active_file, v2.anon, v2.file),
            (6000640, 2191360, 1531904, 8192000)
        );

        let bad: &[(CgroupVersion, &str, Problem)] = &[
            (CgroupVersion::V1, "", Problem::Empty),
            (CgroupVersion::V2, V1_STAT, Problem::MissingKey("anon")),
            (
                CgroupVersion::V1,
                V2_STAT,
                Problem::MissingKey("total_inactive_file"),
            ),
            (
                CgroupVersion::V2,
                "anon 1\nfile",
                Problem::BadLine {
                    line: 2,
                    text: "file".into(),
                },
            ),
            (
                CgroupVersion::V2,
                "anon -4\n",
                Problem::BadLine {
                    line: 1,
                    text: "anon -4".into(),
                },
            ),
            (
                CgroupVersion::V2,
                "anon 1 2\n",
                Problem::BadLine {
                    line: 1,
                    text: "anon 1 2".into(),
                },
            ),
            (
                CgroupVersion::V1,
                &V1_STAT.replace("9223372036854771712", "0"),
                Problem::ZeroLimit,
            ),
        ];
        for (version, content, want) in bad {
            let e = parse_memory_stat(*version, content).unwrap_err();
            assert_eq!((&e.problem, e.file), (want, "memory.stat"), "{content:?}");
        }
    }

    #[test]
    fn oom_kill_psi_and_meminfo() {
        let oom_v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let events_v2 = "low 0\nhigh 12\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill("memory.oom_control", oom_v1), Ok(Some(3)));
        assert_eq!(parse_oom_kill("memory.events", events_v2), Ok(Some(1)));
        assert_eq!(
            parse_oom_kill("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n"),
            Ok(None)
        );
        assert!(parse_oom_kill("memory.events", "oom_kill x\n").is_err());

        let psi = "some avg10=1.53 avg60=0.40 avg300=0.09 total=1234567\n\
                   full avg10=0.80 avg60=0.20 avg300=0.04 total=654321\n";
        assert_eq!(parse_psi_some_avg10(psi), Ok(1.53));
        for bad in [
            "",
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
            "some avg10=abc\n",
            "some avg10=-1\n",
            "some avg60=1\n",
        ] {
            assert_eq!(
                parse_psi_some_avg10(bad).unwrap_err().file,
                "memory.pressure",
                "{bad:?}"
            );
        }

        let meminfo = "MemTotal:       24684092 kB\nMemFree:        23320824 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Ok(24684092 * 1024));
        for bad in [
            "",
            "MemFree: 1 kB\n",
            "MemTotal: 0 kB\n",
            "MemTotal: 12\n",
            "MemTotal: x kB\n",
            "MemTotal: 1 MB\n",
        ] {
            assert_eq!(
                parse_meminfo_total(bad).unwrap_err().file,
                "/proc/meminfo",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn controllers() {
        assert!(has_memory_controller(
            "cpuset cpu io memory hugetlb pids rdma misc\n"
        ));
        assert!(!has_memory_controller("hugetlb\n"));
        assert!(!has_memory_controller(""));
    }
}
