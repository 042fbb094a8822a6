//! A memory limit that shrinks below what is held, as a Kubernetes in-place
//! resize does with no signal: the real binary in a real 1 GiB memory cgroup, a
//! burst of 8 uploads and 4 Process calls with echo (150 MB each), and, as soon
//! as the guard has reserved more than a 512 MiB limit's budget, the cgroup's
//! limit lowered to 512 MiB under it. It runs the bench crate's resize scenario,
//! the same code as `memgate-bench resize`, and asserts its promises:
//! - the limit really fell below what was reserved (else the test tested nothing);
//! - the kernel OOM-kills nothing and the server is still running;
//! - every call gets done: a refused or cut upload is resumed from its committed
//!   offset (QueryWriteStatus), a Process call is sent again;
//! - every uploaded blob reads back with its digest, every cut upload among them;
//! - readiness is SERVING again afterwards and a fresh upload is admitted.
//!
//! The report and its picture are left in `target/tmp/resize_short.{json,png}`.
//! Needs root and a writable memory controller; elsewhere it prints `skipped:
//! <reason>` and passes, and `MEMGATE_REQUIRE_CGROUP=1` turns that into a
//! failure, exactly as tests/oom_torture.rs does. Run with the figures shown:
//!
//! ```text
//! MEMGATE_REQUIRE_CGROUP=1 cargo nextest run --test resize_short --no-capture
//! ```

#[path = "support_cgroup/mod.rs"]
mod support_cgroup;

use std::{path::Path, time::Duration};

use memgate_bench::{
    MIB,
    calls::RetryPolicy,
    resize::{self, ResizeOptions},
    target::{SpawnOptions, Target},
};

use support_cgroup::{MEMGATE, MachineLock, require_cgroup};

const LIMIT: u64 = 1024 * MIB;
const RESIZE_TO: u64 = 512 * MIB;
/// The budget memgate's defaults give a 512 MiB limit (0.85 × limit − 32 MiB):
/// the resize waits until more than this is reserved.
const BUDGET_AFTER: u64 = (RESIZE_TO as f64 * 0.85) as u64 - 32 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_lowered_below_what_is_reserved() {
    let _machine = MachineLock::acquire("cgroup-torture");
    // Whether a child memory cgroup can be made here at all: the scenario makes
    // its own, and this turns "cannot" into the same skip (or failure) as oom_torture.
    let Some(probe) = require_cgroup("memgate-resize", LIMIT) else {
        return;
    };
    drop(probe);
    let target = Target::Spawn(SpawnOptions {
        binary: MEMGATE.into(),
        limit: LIMIT,
        config_toml: "[log]\nlevel = \"info\"\n".into(),
        // On the normal disk: tmpfs pages would be charged to the cgroup as memory.
        data_root: Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf(),
    });
    let opts = ResizeOptions {
        resize_to: RESIZE_TO,
        // As soon as the reservations pass the new budget; at most this late.
        resize_at: Duration::from_secs(10),
        resize_when_reserved_above: Some(BUDGET_AFTER),
        // The kernel refuses a v1 limit below usage; usage falls as calls end.
        busy_timeout: Duration::from_secs(15),
        uploads: 8,
        process: 4,
        retry: RetryPolicy {
            max_attempts: 20,
            default_backoff: Duration::from_millis(250),
            max_pushback: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
            client_grace: Duration::from_secs(5),
        },
        ..ResizeOptions::default()
    };
    let report = resize::run(&target, &opts)
        .await
        .expect("the resize scenario");
    eprint!("{}", report.text());
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(
        out.join("resize_short.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    memgate_bench::plot::resize::draw(&out.join("resize_short.png"), &report).unwrap();
    let broken: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    assert!(
        broken.is_empty(),
        "the server broke {} promise(s) when its limit shrank under it:\n  {}",
        broken.len(),
        broken.join("\n  ")
    );
}
