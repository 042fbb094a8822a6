//! What the cgroup's peak counter cannot tell: how much of it was anonymous
//! memory (what the OOM killer is really about), how much page cache, how much
//! was dirty. A thread samples `memory.stat` until stopped and keeps the maxima.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use super::{ChildCgroup, Version, parse::keyed_value};

/// The cgroup's memory at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Everything charged: anonymous memory, page cache, kernel memory.
    pub usage: u64,
    /// Anonymous memory (heap, stacks): v1 `total_rss`, v2 `anon`.
    pub anon: u64,
    /// Page cache: v1 `total_cache`, v2 `file`.
    pub file: u64,
    /// Clean, cold page cache, the first thing reclaim takes.
    pub inactive_file: u64,
    /// Page cache not yet on disk (dirty plus under writeback), which reclaim must wait for.
    pub dirty: u64,
}

impl Snapshot {
    /// What the kubelet calls the working set: usage minus inactive file pages.
    pub fn working_set(&self) -> u64 {
        self.usage.saturating_sub(self.inactive_file)
    }
}

/// The highest value each figure reached over the samples (not at the same moment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peaks {
    pub usage: u64,
    pub anon: u64,
    pub file: u64,
    pub working_set: u64,
    pub dirty: u64,
    pub samples: u64,
}

/// A running sampler; [`Sampler::finish`] stops it and returns the peaks.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Peaks>>,
}

impl ChildCgroup {
    /// The cgroup's memory right now.
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        snapshot(self.path(), self.version())
    }

    /// Samples [`ChildCgroup::snapshot`] every `interval` on a thread of its own.
    pub fn sample_every(&self, interval: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, version, flag) = (self.path().to_path_buf(), self.version(), stop.clone());
        let thread = thread::spawn(move || sample(&dir, version, interval, &flag));
        Sampler {
            stop,
            thread: Some(thread),
        }
    }
}

impl Sampler {
    /// Stops sampling; the peaks seen so far.
    pub fn finish(mut self) -> Peaks {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn sample(dir: &Path, version: Version, interval: Duration, stop: &AtomicBool) -> Peaks {
    let mut peaks = Peaks::default();
    while !stop.load(Ordering::Relaxed) {
        // The cgroup may be gone before the sampler is stopped: keep what we have.
        let Ok(s) = snapshot(dir, version) else { break };
        peaks = Peaks {
            usage: peaks.usage.max(s.usage),
            anon: peaks.anon.max(s.anon),
            file: peaks.file.max(s.file),
            working_set: peaks.working_set.max(s.working_set()),
            dirty: peaks.dirty.max(s.dirty),
            samples: peaks.samples + 1,
        };
        thread::sleep(interval);
    }
    peaks
}

pub(super) fn snapshot(dir: &Path, version: Version) -> io::Result<Snapshot> {
    let read = |name: &str| -> io::Result<String> { fs::read_to_string(dir.join(name)) };
    let (usage_file, [anon, file, inactive, dirty, writeback]) = match version {
        Version::V1 => (
            "memory.usage_in_bytes",
            [
                "total_rss",
                "total_cache",
                "total_inactive_file",
                "total_dirty",
                "total_writeback",
            ],
        ),
        Version::V2 => (
            "memory.current",
            [
                "anon",
                "file",
                "inactive_file",
                "file_dirty",
                "file_writeback",
            ],
        ),
    };
    let usage = read(usage_file)?;
    let stat = read("memory.stat")?;
    let key = |k: &str| {
        keyed_value(&stat, k).ok_or_else(|| {
            let path = PathBuf::from(dir).join("memory.stat");
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no `{k}` in {}", path.display()),
            )
        })
    };
    Ok(Snapshot {
        usage: usage.trim().parse().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{usage_file}: {e}"))
        })?,
        anon: key(anon)?,
        file: key(file)?,
        inactive_file: key(inactive)?,
        dirty: key(dirty)? + key(writeback)?,
    })
}
