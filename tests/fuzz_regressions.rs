//! Replays the fuzz targets' inputs on stable Rust, as a normal test: every file
//! of `fuzz/regressions/<target>/` (inputs that once crashed a target, kept after
//! the fix) and of `fuzz/seeds/<target>/` (the realistic starting corpus) goes
//! through the very function the target calls, which must not panic.
//!
//! The checks live in `fuzz/src/` and are included here with `#[path]`, so the
//! root crate builds them without libfuzzer-sys. See `fuzz/README.md`.
//!
//! The first fuzzing runs found three panics, all fixed, their inputs kept under
//! `fuzz/regressions/`: `parse_grpc_timeout` on a multi-byte unit
//! (`length_prefix/grpc_timeout_*`), config-rs allocating for `key[N]` indices
//! (`config_loader/*index*`), and tracing-subscriber's filter parser on non-ASCII
//! `log.level` (`config_loader/*log_level*`).

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted, without dot-files (`.gitkeep`).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("read a directory entry").path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            p.is_file() && name.is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs each file through `run`; fails naming every input that panicked.
fn replay_files(what: &str, run: fn(&[u8]), files: &[PathBuf]) {
    let mut failed = Vec::new();
    for path in files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(format!("{} ({data:?})", path.display()));
        }
    }
    assert!(!files.is_empty(), "no inputs for {what}");
    assert!(
        failed.is_empty(),
        "{} of {} {what} inputs panicked:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

/// Every regression and seed input of `target`.
fn replay(target: &str, run: fn(&[u8])) {
    let files: Vec<PathBuf> = inputs("regressions", target)
        .into_iter()
        .chain(inputs("seeds", target))
        .collect();
    replay_files(target, run, &files);
}

#[test]
fn resource_names() {
    replay("resource_names", harness::resource_names::run);
}

#[test]
fn cgroup_parsers() {
    replay("cgroup_parsers", harness::cgroup_parsers::run);
}

#[test]
fn length_prefix() {
    replay("length_prefix", harness::length_prefix::run);
}

#[test]
fn config_loader() {
    replay("config_loader", harness::config_loader::run);
}
