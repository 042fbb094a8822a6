//! A cgroup v2 tree in a temporary directory whose limit and usage a test sets:
//! the guard reads it through its real discovery code (`Roots::at`), so a test
//! can put the server under any memory pressure without allocating it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use memgate::guard::discover::Roots;

pub const MIB: u64 = 1024 * 1024;

pub struct FakeCgroup {
    dir: tempfile::TempDir,
}

impl FakeCgroup {
    /// A v2 cgroup namespace root with `memory.max = limit` and `usage` in use.
    pub fn new(limit: u64, usage: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let write = |rel: &str, content: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        };
        write("proc/self/cgroup", "0::/\n");
        write(
            "proc/self/mountinfo",
            "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n",
        );
        write("proc/meminfo", "MemTotal:       25000000 kB\n");
        write("sys/fs/cgroup/cgroup.controllers", "cpu io memory pids\n");
        write("sys/fs/cgroup/memory.max", &format!("{limit}\n"));
        write("sys/fs/cgroup/memory.high", "max\n");
        let cg = Self { dir };
        cg.set_usage(usage);
        cg
    }

    pub fn roots(&self) -> Roots {
        Roots::at(self.dir.path())
    }

    fn cgroup_dir(&self) -> PathBuf {
        self.dir.path().join("sys/fs/cgroup")
    }

    /// Sets `memory.current` (all of it anonymous: the working set equals it).
    pub fn set_usage(&self, usage: u64) {
        replace(
            &self.cgroup_dir().join("memory.current"),
            &format!("{usage}\n"),
        );
        replace(
            &self.cgroup_dir().join("memory.stat"),
            &format!("anon {usage}\nfile 0\ninactive_file 0\nactive_file 0\n"),
        );
    }

    pub fn set_limit(&self, limit: u64) {
        replace(&self.cgroup_dir().join("memory.max"), &format!("{limit}\n"));
    }
}

/// Writes via a temporary file and rename, so the sampler never reads half a file.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
