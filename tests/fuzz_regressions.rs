//! Replays the fuzz targets' inputs on stable Rust, as a normal test: every file
//! of `fuzz/regressions/<target>/` (inputs that once crashed a target, kept after
//! the fix) and of `fuzz/seeds/<target>/` (the realistic starting corpus) goes
//! through the very function the target calls, which must not panic.
//!
//! The checks live in `fuzz/src/` and are included here with `#[path]`, so the
//! root crate builds them without libfuzzer-sys. See `fuzz/README.md`.

#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

/// The files of `fuzz/<kind>/<target>/`, sorted, without dot-files (`.gitkeep`).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("read a directory entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `target` through `run`; fails naming each input that panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let mut failed = Vec::new();
    let mut count = 0;
    for path in inputs("regressions", target)
        .into_iter()
        .chain(inputs("seeds", target))
    {
        let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        count += 1;
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(format!("{} ({data:?})", path.display()));
        }
    }
    assert!(count > 0, "no inputs for {target}");
    assert!(
        failed.is_empty(),
        "{} of {count} {target} inputs panicked:\n{}",
        failed.len(),
        failed.join("\n")
    );
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
