//! The soak, short: two minutes of bursts offering 1.5 x the guard's budget
//! (uploads, downloads and Process calls, half of those with echo) against the
//! real binary in a fresh 512 MiB memory cgroup. It runs the bench crate's soak,
//! the same code as `memgate-bench soak` (30 minutes by default, figures in
//! docs/measurements.md), and asserts its promises:
//! - the kernel OOM-kills nothing and the server is still running;
//! - after each burst, once idle, the guard's reserved bytes are back to 0;
//! - and the server's RSS is back within 16 MiB of its idle baseline;
//! - the post-burst idle readings have no growth trend (the least-squares line
//!   climbs at most 8 MiB across the run);
//! - every attempt ends OK or RESOURCE_EXHAUSTED, and every kind of call gets
//!   work done.
//!
//! The report and its picture are left in `target/tmp/soak_short.{json,png}`.
//! Needs root and a writable memory controller; elsewhere it prints `skipped:
//! <reason>` and passes, and `MEMGATE_REQUIRE_CGROUP=1` turns that into a
//! failure, exactly as tests/oom_torture.rs does. Run with the figures shown:
//!
//! ```text
//! MEMGATE_REQUIRE_CGROUP=1 cargo nextest run --test soak_short --no-capture
//! ```

#[path = "support_cgroup/mod.rs"]
mod support_cgroup;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use memgate_bench::{
    MIB,
    soak::{self, SoakOptions},
    target::{SpawnOptions, Target},
};

use support_cgroup::{MEMGATE, MachineLock, require_cgroup};

const LIMIT: u64 = 512 * MIB;
const DURATION: Duration = Duration::from_secs(120);
/// Bursts of 15 s and about 6 s of idle after each: two minutes hold at least this many.
const MIN_BURSTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_two_minutes() {
    let waiting = Instant::now();
    let _machine = MachineLock::acquire("cgroup-torture");
    let waited = waiting.elapsed();
    // Whether a child memory cgroup can be made here at all: the soak makes its
    // own, and this turns "cannot" into the same skip (or failure) as oom_torture.
    let Some(probe) = require_cgroup("memgate-soak", LIMIT) else {
        return;
    };
    drop(probe);
    let started = Instant::now();
    let target = Target::Spawn(SpawnOptions {
        binary: MEMGATE.into(),
        limit: LIMIT,
        config_toml: "[log]\nlevel = \"info\"\n".into(),
        // On the normal disk: tmpfs pages would be charged to the cgroup as memory.
        data_root: env!("CARGO_TARGET_TMPDIR").into(),
    });
    let opts = SoakOptions {
        duration: DURATION,
        ..SoakOptions::default()
    };
    let report = soak::run(&target, &opts).await.expect("the soak runs");
    eprint!("{}", report.text());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let json = serde_json::to_vec_pretty(&report).expect("the report serialises");
    std::fs::write(dir.join("soak_short.json"), json).expect("write the report");
    memgate_bench::plot::soak::draw(&dir.join("soak_short.png"), &report).expect("draw");
    eprintln!(
        "soak_short: {:.0} s in all, after {:.0} s waiting for the machine lock; report and \
         picture in {}",
        started.elapsed().as_secs_f64(),
        waited.as_secs_f64(),
        dir.display()
    );

    assert!(
        report.bursts.len() >= MIN_BURSTS,
        "only {} bursts in {DURATION:?}",
        report.bursts.len()
    );
    assert_eq!(report.oom_kills, Some(0), "{}", report.text());
    let names: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
    for promise in [
        "no OOM kill",
        "reserved bytes return to 0 when idle",
        "idle RSS returns within tolerance of the baseline after each burst",
        "no growth trend in the idle readings",
        "every attempt ends OK or RESOURCE_EXHAUSTED",
        "each kind of call got work done",
    ] {
        assert!(
            names.contains(&promise),
            "the soak no longer checks {promise:?}"
        );
    }
    let broken: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    assert!(
        broken.is_empty(),
        "the soak broke {} promise(s):\n  {}\nlast lines of memgate's stderr:\n{}",
        broken.len(),
        broken.join("\n  "),
        report.stderr_tail.join("\n")
    );
}
