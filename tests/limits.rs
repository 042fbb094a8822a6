//! `memgate limits` on the real binary: what an operator sees matches the guard's
//! configuration and the allocator options in force.

use std::process::Command;

use serde_json::Value;

fn limits(env: &[(&str, &str)]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_memgate"))
        .args(["limits", "--json"])
        .env_remove("_RJEM_MALLOC_CONF")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn reports_the_discovered_limit_and_the_embedded_allocator_options() {
    let r = limits(&[]);
    assert!(r["limit_bytes"].as_u64().unwrap() > 0);
    assert!(r["working_set_bytes"].as_u64().unwrap() > 0);
    assert!(r["budget_bytes"].as_u64().unwrap() < r["limit_bytes"].as_u64().unwrap());
    assert_eq!(r["reserved_bytes"], 0);
    assert_eq!(r["pressure"], "normal");
    assert_eq!(r["malloc_conf"], memgate::admin::pprof::MALLOC_CONF);
    assert_eq!(r["malloc_conf_source"], "embedded in the binary");
    assert_eq!(r["background_thread"], true);
    // The heap profiler is loaded but [profiling] is off by default.
    assert_eq!(r["heap_profiler_loaded"], true);
    assert_eq!(r["profiling_enabled"], false);
    assert_eq!(r["profiling_sample_interval_bytes"], 512 * 1024);
    let has_v1_memory = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        });
    if has_v1_memory {
        assert_eq!(r["cgroup_version"], "v1");
        assert!(r["usage_bytes"].as_u64().unwrap() >= r["working_set_bytes"].as_u64().unwrap());
    }
}

#[test]
fn a_configured_limit_overrides_discovery() {
    let r = limits(&[
        ("MEMGATE__MEMORY__LIMIT", "512MiB"),
        ("MEMGATE__MEMORY__BUDGET_RATIO", "0.5"),
    ]);
    assert_eq!(r["limit_bytes"], 512 * 1024 * 1024);
    assert_eq!(r["limit_source"], "config memory.limit");
    assert_eq!(r["budget_bytes"], (256 - 32) * 1024 * 1024);
}

#[test]
fn the_environment_overrides_the_embedded_allocator_options() {
    let r = limits(&[(
        "_RJEM_MALLOC_CONF",
        "background_thread:false,dirty_decay_ms:5000",
    )]);
    assert_eq!(r["malloc_conf_source"], "environment _RJEM_MALLOC_CONF");
    assert_eq!(r["background_thread"], false);
    assert_eq!(r["dirty_decay_ms"], 5000);
}
