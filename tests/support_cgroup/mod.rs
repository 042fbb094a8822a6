//! Child memory cgroups for tests that run the real binary under a real limit.
//!
//! The harness itself (finding the own memory cgroup, making and tearing down a
//! limited child, spawning memgate inside it, sampling `memory.stat`, the machine
//! lock) lives in the bench crate, [`memgate_bench::cgroup`], shared with
//! `memgate-bench` and the soak; this module adds what only a test has: the
//! binary cargo built for it, and a panic where the library returns an error.
//!
//! Include it with `#[path = "support_cgroup/mod.rs"] mod support_cgroup;`.
//! Needs root and a writable memory controller; [`require_cgroup`] turns "cannot"
//! into a skip, or into a failure under `MEMGATE_REQUIRE_CGROUP=1`.

// Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use memgate_bench::cgroup::{
    ChildCgroup, MachineLock, MemgateProcess, Peaks, Sampler, ServerSpec, Snapshot, require_cgroup,
};

/// The memgate binary cargo built for this test.
pub const MEMGATE: &str = env!("CARGO_BIN_EXE_memgate");

/// Starts this build's memgate in `cg` with `config_toml` and `data_dir` and waits
/// for it to listen; panics with its stderr if it cannot.
pub fn spawn_memgate_in(cg: &ChildCgroup, config_toml: &str, data_dir: &Path) -> MemgateProcess {
    let spec = ServerSpec::new(MEMGATE, config_toml, data_dir);
    memgate_bench::cgroup::spawn_memgate_in(cg, &spec).unwrap_or_else(|e| panic!("{e}"))
}
