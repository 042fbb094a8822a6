//! Pure parsers for the files [`super`] reads: `/proc/self/cgroup`,
//! `/proc/self/mountinfo`, the `key value` lines of `memory.oom_control` and
//! `memory.events`, and `/proc/<pid>/status`. No I/O here, so they are tested on
//! real file contents.

use std::path::{Path, PathBuf};

use super::Version;

/// Candidate memory cgroup directories of the process whose `/proc/<pid>/cgroup`
/// and `/proc/<pid>/mountinfo` are given, v1 first. A v2 candidate still needs
/// `memory` in its `cgroup.controllers`, which only the filesystem can tell.
pub fn memory_cgroup_dirs(proc_cgroup: &str, mountinfo: &str) -> Vec<(Version, PathBuf)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    let mut found = Vec::new();
    for mount in mountinfo.lines().filter_map(Mount::parse) {
        let wanted = match mount.fstype {
            "cgroup" if mount.super_options.split(',').any(|o| o == "memory") => {
                v1.map(|p| (Version::V1, p))
            }
            "cgroup2" => v2.map(|p| (Version::V2, p)),
            _ => None,
        };
        if let Some((version, path)) = wanted
            && !found.iter().any(|(v, _)| *v == version)
        {
            found.push((version, mount.locate(path)));
        }
    }
    found.sort_by_key(|(v, _)| *v == Version::V2);
    found
}

/// `key value` lines, as in `memory.oom_control` and `memory.events`.
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in bytes.
pub fn proc_status_bytes(status: &str, key: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Writes `pid` in decimal into `buf` and returns the digits, without allocating
/// (it runs between fork and exec).
pub fn decimal(pid: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut n = pid.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// The fields of one mountinfo line that matter here.
struct Mount<'a> {
    root: String,
    mount_point: String,
    fstype: &'a str,
    super_options: &'a str,
}

impl<'a> Mount<'a> {
    /// `id parent maj:min root mount_point options [optional...] - fstype source super_options`
    fn parse(line: &'a str) -> Option<Self> {
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let _source = right.next()?;
        Some(Mount {
            root: unescape(left.get(3)?),
            mount_point: unescape(left.get(4)?),
            fstype,
            super_options: right.next().unwrap_or(""),
        })
    }

    /// Where cgroup `path` (as `/proc/self/cgroup` names it) is under this mount.
    /// A mount of a sub-tree (`root` not `/`) hides that prefix; under a cgroup
    /// namespace the path is already relative to the mount's root.
    fn locate(&self, path: &str) -> PathBuf {
        let rel = Path::new(path)
            .strip_prefix(&self.root)
            .unwrap_or(Path::new(path));
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        Path::new(&self.mount_point).join(rel)
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine (cgroup v1, hybrid), trimmed.
    const V1_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/8aae52a3\n\
        2:cpuacct:/\n1:cpu:/\n0::/\n";
    const V1_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A Kubernetes pod on cgroup v2 with a cgroup namespace.
    const V2_CGROUP: &str = "0::/\n";
    const V2_MOUNTINFO: &str = "\
700 600 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup rw,nsdelegate
";

    /// `/proc/self/cgroup`, `/proc/self/mountinfo`, the directories expected.
    type Case = (
        &'static str,
        &'static str,
        &'static [(Version, &'static str)],
    );

    #[test]
    fn finds_memory_cgroups() {
        let table: &[Case] = &[
            (
                V1_CGROUP,
                V1_MOUNTINFO,
                &[
                    (Version::V1, "/sys/fs/cgroup/memory/process_api/8aae52a3"),
                    (Version::V2, "/sys/fs/cgroup/unified"),
                ],
            ),
            (V2_CGROUP, V2_MOUNTINFO, &[(Version::V2, "/sys/fs/cgroup")]),
            // A v1 memory mount of a sub-tree (a container without cgroupns).
            (
                "5:memory:/docker/abc/sub\n",
                "40 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n",
                &[(Version::V1, "/sys/fs/cgroup/memory/sub")],
            ),
            // No memory controller at all.
            (
                "1:cpu:/\n",
                "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
                &[],
            ),
            // Escaped mount point.
            (
                "0::/a\n",
                "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n",
                &[(Version::V2, "/mnt/my cg/a")],
            ),
        ];
        for (cgroup, mountinfo, want) in table {
            let got = memory_cgroup_dirs(cgroup, mountinfo);
            let want: Vec<_> = want.iter().map(|(v, p)| (*v, PathBuf::from(p))).collect();
            assert_eq!(got, want, "{cgroup:?}");
        }
    }

    #[test]
    fn reads_keyed_values() {
        let oom_control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let events = "low 0\nhigh 12\nmax 40\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_value(oom_control, "oom_kill"), Some(3));
        assert_eq!(keyed_value(events, "oom_kill"), Some(1));
        assert_eq!(keyed_value(events, "oom"), Some(2));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
    }

    #[test]
    fn reads_proc_status() {
        let status = "Name:\tmemgate\nVmPeak:\t 1000 kB\nVmHWM:\t  363520 kB\n\
            VmRSS:\t   10240 kB\nRssAnon:\t 5 kB\n";
        assert_eq!(proc_status_bytes(status, "VmHWM"), Some(363_520 * 1024));
        assert_eq!(proc_status_bytes(status, "VmRSS"), Some(10_240 * 1024));
        // `VmRSS` must not match `VmRSSx`-like prefixes or lines without kB.
        assert_eq!(proc_status_bytes(status, "Vm"), None);
        assert_eq!(proc_status_bytes("VmRSS:\t12\n", "VmRSS"), None);
        assert_eq!(proc_status_bytes(status, "VmSwap"), None);
    }

    #[test]
    fn writes_decimals() {
        let mut buf = [0; 12];
        for pid in [0, 7, 10, 4_194_304, i32::MAX] {
            assert_eq!(decimal(pid, &mut buf), pid.to_string().as_bytes());
        }
    }
}
