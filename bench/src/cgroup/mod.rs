//! Child memory cgroups for running the real memgate binary under a real limit:
//! the OOM torture test, the soak test and `memgate-bench` all use this one copy.
//!
//! Owns: finding this process's own memory cgroup (v1 memory controller, or the v2
//! unified hierarchy with `memory` in `cgroup.controllers`), making a uniquely named
//! child with a limit, reading its OOM-kill count, usage and peak, and tearing it
//! down on drop (SIGKILL whatever is left, wait, `rmdir`). Spawning memgate inside
//! one is [`process`]'s job; [`peaks`] samples its `memory.stat`. It deliberately
//! shares no code with `memgate::guard::discover`, so a bug there cannot hide a
//! bug here.
//!
//! Needs root and a writable memory controller; [`require_cgroup`] turns "cannot"
//! into a skip, or into a failure under `MEMGATE_REQUIRE_CGROUP=1`.

mod parse;
mod peaks;
mod process;

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub use parse::proc_status_bytes;
pub use peaks::{Peaks, Sampler, Snapshot};
pub use process::{MemgateProcess, ServerSpec, SpawnError, spawn_memgate_in};

/// How long drop waits for the processes it killed to leave the cgroup.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which cgroup hierarchy the child lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Why no child memory cgroup could be made here; the text says what is missing.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Why [`ChildCgroup::set_limit`] did not apply a limit.
#[derive(Debug)]
pub enum LimitError {
    /// v1 refused a limit below what the cgroup holds and could not reclaim
    /// (EBUSY); `usage` is what it held just after.
    Busy {
        usage: Option<u64>,
    },
    Io(io::Error),
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::Busy { usage } => write!(
                f,
                "the kernel refused the limit (EBUSY): the cgroup holds more ({}) and cannot \
                 reclaim enough",
                usage.map_or("unknown".into(), |u| format!("{:.1} MiB", crate::mib(u)))
            ),
            LimitError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LimitError {}

/// A child of this process's memory cgroup with a hard limit; removed on drop.
pub struct ChildCgroup {
    dir: PathBuf,
    version: Version,
    limit: u64,
}

/// Creates a child cgroup, or explains why it cannot: prints `skipped: <reason>`
/// and returns `None` (the test should return early), or panics with the reason
/// when `MEMGATE_REQUIRE_CGROUP=1`.
pub fn require_cgroup(name_prefix: &str, limit_bytes: u64) -> Option<ChildCgroup> {
    match ChildCgroup::create(name_prefix, limit_bytes) {
        Ok(cg) => Some(cg),
        Err(why) if std::env::var("MEMGATE_REQUIRE_CGROUP").as_deref() == Ok("1") => {
            panic!("MEMGATE_REQUIRE_CGROUP=1 but no child memory cgroup can be made: {why}")
        }
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

impl ChildCgroup {
    /// Makes `<own cgroup>/<name_prefix>-<pid>-<n>-<nanos>` and limits it to
    /// `limit_bytes` (swap included where the kernel accounts it).
    pub fn create(name_prefix: &str, limit_bytes: u64) -> Result<Self, Unavailable> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let (version, parent) = own_memory_cgroup()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "{name_prefix}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = parent.join(name);
        fs::create_dir(&dir).map_err(|e| {
            Unavailable(format!(
                "cannot create the child memory cgroup {}: {e} (needs root and a writable \
                 memory controller)",
                dir.display()
            ))
        })?;
        // From here on, drop removes the directory if setting it up fails.
        let mut cg = ChildCgroup {
            dir,
            version,
            limit: limit_bytes,
        };
        cg.set_limit(limit_bytes)
            .map_err(|e| Unavailable(format!("cannot limit {}: {e}", cg.dir.display())))?;
        Ok(cg)
    }

    /// Sets the hard limit to `limit` bytes (swap included where the kernel
    /// accounts it) while the cgroup runs, and returns the limit in force (v1
    /// rounds down to whole pages). This is what a Kubernetes in-place resize
    /// does to a container's cgroup, with no signal to the process inside.
    ///
    /// v1 tries to reclaim down to a lower limit and refuses it with EBUSY when
    /// it cannot ([`LimitError::Busy`]: retry once usage has fallen); v2 takes
    /// any limit at once and reclaims, then OOM-kills, to meet it.
    pub fn set_limit(&mut self, limit: u64) -> Result<u64, LimitError> {
        let value = limit.to_string();
        match self.version {
            Version::V1 => {
                // memory.memsw.limit_in_bytes (memory + swap) may never be below
                // memory.limit_in_bytes: lower memory first, raise memsw first.
                let memsw = self.file("memory.memsw.limit_in_bytes").exists();
                let current = self
                    .read_u64("memory.limit_in_bytes")
                    .map_err(LimitError::Io)?;
                let raising = limit > current;
                if memsw && raising {
                    self.write_limit("memory.memsw.limit_in_bytes", &value)?;
                }
                self.write_limit("memory.limit_in_bytes", &value)?;
                if memsw && !raising {
                    self.write_limit("memory.memsw.limit_in_bytes", &value)?;
                }
                self.limit = self
                    .read_u64("memory.limit_in_bytes")
                    .map_err(LimitError::Io)?;
            }
            Version::V2 => {
                if !self.file("memory.max").exists() {
                    return Err(LimitError::Io(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "the memory controller is not enabled for children of {} (add \
                             `+memory` to its cgroup.subtree_control; v2 refuses that while the \
                             cgroup itself holds processes)",
                            self.dir.parent().unwrap_or(&self.dir).display()
                        ),
                    )));
                }
                self.write_limit("memory.max", &value)?;
                if self.file("memory.swap.max").exists() {
                    self.write_limit("memory.swap.max", "0")?;
                }
                self.limit = limit;
            }
        }
        Ok(self.limit)
    }

    fn write_limit(&self, name: &str, value: &str) -> Result<(), LimitError> {
        fs::write(self.file(name), value).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => LimitError::Busy {
                usage: self.usage().ok(),
            },
            _ => LimitError::Io(io::Error::new(
                e.kind(),
                format!(
                    "cannot write {value:?} to {}: {e}",
                    self.file(name).display()
                ),
            )),
        })
    }

    /// Starts the high-water mark ([`ChildCgroup::peak_usage`]) afresh from the
    /// current usage; `false` where the kernel offers no reset (v2 resets are per
    /// open file, so a later read would not see them).
    pub fn reset_peak_usage(&self) -> io::Result<bool> {
        match self.version {
            Version::V1 => fs::write(self.file("memory.max_usage_in_bytes"), "0").map(|()| true),
            Version::V2 => Ok(false),
        }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The hierarchy it lives in.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The limit in force, in bytes (v1 rounds the requested one down to pages).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// `cgroup.procs`: writing a pid there moves that process in.
    pub fn procs_path(&self) -> PathBuf {
        self.file("cgroup.procs")
    }

    /// Processes the kernel's OOM killer has killed in this cgroup so far.
    pub fn oom_kills(&self) -> io::Result<u64> {
        self.files().oom_kills()
    }

    /// A handle on its files for a sampler thread, which must not own the cgroup.
    pub fn files(&self) -> CgroupFiles {
        CgroupFiles {
            dir: self.dir.clone(),
            version: self.version,
        }
    }

    /// Highest usage since creation (v1 `memory.max_usage_in_bytes`, v2
    /// `memory.peak`); `None` where the kernel does not record it.
    pub fn peak_usage(&self) -> io::Result<Option<u64>> {
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        if !self.file(file).exists() {
            return Ok(None);
        }
        self.read_u64(file).map(Some)
    }

    /// Current usage, page cache included (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub fn usage(&self) -> io::Result<u64> {
        self.read_u64(match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        })
    }

    /// Pids of the processes in it.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let text = fs::read_to_string(self.procs_path())?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read_u64(&self, name: &str) -> io::Result<u64> {
        let text = fs::read_to_string(self.file(name))?;
        text.trim().parse().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{name}: {text:?}: {e}"))
        })
    }
}

/// The files of a cgroup a sampler reads, without owning (or removing) the cgroup.
#[derive(Debug, Clone)]
pub struct CgroupFiles {
    dir: PathBuf,
    version: Version,
}

impl CgroupFiles {
    /// The cgroup's memory right now.
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        peaks::snapshot(&self.dir, self.version)
    }

    /// Processes the kernel's OOM killer has killed in the cgroup so far.
    pub fn oom_kills(&self) -> io::Result<u64> {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        let text = fs::read_to_string(self.dir.join(file))?;
        parse::keyed_value(&text, "oom_kill").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no `oom_kill` line in {file}"),
            )
        })
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        loop {
            let pids = self.pids().unwrap_or_default();
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("warning: {} still holds {pids:?}", self.dir.display());
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid was
                // read from this cgroup, which only the test put processes in.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The kernel may need a moment after the last task exits before rmdir works.
        let mut last = None;
        while Instant::now() < deadline + Duration::from_secs(2) {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => last = Some(e),
            }
            thread::sleep(Duration::from_millis(50));
        }
        if let Some(e) = last {
            eprintln!("warning: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// This process's memory cgroup directory: v1's memory controller if mounted,
/// else the v2 unified hierarchy when it offers `memory`.
fn own_memory_cgroup() -> Result<(Version, PathBuf), Unavailable> {
    let read =
        |p: &str| fs::read_to_string(p).map_err(|e| Unavailable(format!("cannot read {p}: {e}")));
    let candidates =
        parse::memory_cgroup_dirs(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?);
    let mut why = Vec::new();
    for (version, dir) in candidates {
        match version {
            Version::V1 => return Ok((version, dir)),
            Version::V2 => {
                let controllers = fs::read_to_string(dir.join("cgroup.controllers"));
                match controllers {
                    Ok(c) if c.split_whitespace().any(|c| c == "memory") => {
                        return Ok((version, dir));
                    }
                    Ok(_) => why.push(format!(
                        "{} has no `memory` in cgroup.controllers",
                        dir.display()
                    )),
                    Err(e) => why.push(format!("{}/cgroup.controllers: {e}", dir.display())),
                }
            }
        }
    }
    if why.is_empty() {
        why.push("no cgroup memory controller is mounted".into());
    }
    Err(Unavailable(why.join("; ")))
}

/// An exclusive lock on `<temp dir>/memgate-<name>.lock` (`/tmp` unless `TMPDIR`
/// says otherwise), held until dropped. Whatever pushes gigabytes through a
/// cgroup takes it -- the torture and soak tests, `memgate-bench` -- so that they
/// never share the machine with each other, whether they run as threads of one
/// process (cargo test), as processes (nextest) or from different checkouts.
pub struct MachineLock {
    // Held for its descriptor: closing it releases the lock.
    _file: fs::File,
}

impl MachineLock {
    /// Blocks until the lock is free.
    pub fn acquire(name: &str) -> MachineLock {
        let path = Self::path(name);
        let file = Self::open(&path);
        loop {
            match Self::flock(&file, libc::LOCK_EX) {
                Ok(()) => return MachineLock { _file: file },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("flock {}: {e}", path.display()),
            }
        }
    }

    /// Takes the lock if it is free; `None` while someone else holds it.
    pub fn try_acquire(name: &str) -> Option<MachineLock> {
        let file = Self::open(&Self::path(name));
        Self::flock(&file, libc::LOCK_EX | libc::LOCK_NB)
            .ok()
            .map(|()| MachineLock { _file: file })
    }

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("memgate-{name}.lock"))
    }

    fn open(path: &Path) -> fs::File {
        // flock needs no write access: another user's lock file works read-only.
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .or_else(|_| fs::File::open(path))
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
    }

    fn flock(file: &fs::File, operation: libc::c_int) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock(2) on a descriptor the caller owns; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
