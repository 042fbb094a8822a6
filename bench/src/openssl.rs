//! The yardstick for throughput: `openssl dgst -sha256` over the same payloads,
//! measured in the same run on the same machine. memgate hashes every byte it
//! receives, so "how close to a bare SHA-256 pass" is a rate that survives a
//! change of machine better than MB/s does.
//!
//! The payloads are written to files in a scratch directory (tmpfs where there is
//! one, so openssl reads memory, not a disk), hashed once by one process and once
//! by `parallel` processes at the same time (the scenario's concurrency), checked
//! against the digests the bench computed, and removed.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::payload::Payload;

/// openssl's rates over the scenario's payloads. MB = 10^6 bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Baseline {
    pub files: usize,
    pub bytes: u64,
    /// One `openssl dgst` process over every file in turn.
    pub one_process_mb_s: f64,
    /// `parallel_processes` processes at once, each over its share of the files.
    pub parallel_processes: usize,
    pub parallel_mb_s: f64,
}

/// Measures `openssl dgst -sha256` over `payloads` (blocking: call from
/// `spawn_blocking`). `parallel` is clamped to the number of payloads.
pub fn measure(payloads: &[Payload], parallel: usize, scratch: &Path) -> anyhow::Result<Baseline> {
    if payloads.is_empty() {
        bail!("no payloads to hash");
    }
    let dir = tempfile::Builder::new()
        .prefix("memgate-bench-openssl-")
        .tempdir_in(scratch)
        .with_context(|| format!("cannot create a scratch dir in {}", scratch.display()))?;
    let mut files = Vec::new();
    for p in payloads {
        let path = dir.path().join(format!("payload-{}.bin", p.index));
        let mut f = std::fs::File::create(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        for chunk in p.chunks() {
            f.write_all(&chunk)?;
        }
        files.push((path, p.digest.hex()));
    }
    let bytes: u64 = payloads.iter().map(Payload::size).sum();
    let mb = bytes as f64 / 1e6;

    let started = Instant::now();
    let out = run(files.iter().map(|(p, _)| p.as_path()))?;
    let one = started.elapsed().as_secs_f64();
    for (path, hex) in &files {
        let line = out
            .lines()
            .find(|l| l.contains(&*path.to_string_lossy()))
            .with_context(|| format!("openssl printed nothing for {}", path.display()))?;
        if !line.trim_end().ends_with(hex.as_str()) {
            bail!(
                "openssl disagrees with the bench on {}: {line}",
                path.display()
            );
        }
    }

    let parallel = parallel.clamp(1, files.len());
    let started = Instant::now();
    let children: Vec<_> = (0..parallel)
        .map(|i| {
            let share = files
                .iter()
                .skip(i)
                .step_by(parallel)
                .map(|(p, _)| p.as_path());
            spawn(share)
        })
        .collect::<anyhow::Result<_>>()?;
    for child in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "openssl dgst failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let all = started.elapsed().as_secs_f64();
    Ok(Baseline {
        files: files.len(),
        bytes,
        one_process_mb_s: mb / one,
        parallel_processes: parallel,
        parallel_mb_s: mb / all,
    })
}

fn spawn<'a>(files: impl Iterator<Item = &'a Path>) -> anyhow::Result<std::process::Child> {
    Command::new("openssl")
        .args(["dgst", "-sha256"])
        .args(files)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `openssl` (is it installed?)")
}

fn run<'a>(files: impl Iterator<Item = &'a Path>) -> anyhow::Result<String> {
    let out = spawn(files)?.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "openssl dgst failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where scratch files go: `/dev/shm` when it is there, else the temp dir.
pub fn scratch_dir() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
