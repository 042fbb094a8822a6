//! The checks behind memgate's fuzz targets, one module per target, each with a
//! `run(&[u8])` that must never panic on any input.
//!
//! `fuzz/fuzz_targets/<name>.rs` calls `<name>::run`, and the root crate's
//! `tests/fuzz_regressions.rs` includes this file with `#[path]` and replays every
//! file of `fuzz/regressions/<name>/` and `fuzz/seeds/<name>/` through the same
//! function. So this code depends on `memgate` and `std` only.

pub mod cgroup_parsers;
pub mod config_loader;
pub mod length_prefix;
pub mod resource_names;
