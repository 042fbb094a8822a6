//! The quiet flood, short (issue 13): the real binary in a fresh 256 MiB memory
//! cgroup, flooded from 127.0.0.2 with 4 HTTP/2 connections × 16 ByteStream
//! Write streams, each declaring a 150 MB blob, pushing 2 MiB and then going
//! quiet without ending (the connections stay open and answer PINGs) for 12 s.
//! Alone at first, the flooder takes the whole budget (9 Writes of 20 MiB fill
//! 186 MiB). 3 s in, a well-behaved tonic client on 127.0.0.1 uploads a 50 MB
//! blob, retrying RESOURCE_EXHAUSTED, UNAVAILABLE and ABORTED after the
//! server's pushback and resuming from QueryWriteStatus. It runs the bench
//! crate's flood, the same code as `memgate-bench flood`, and asserts:
//! - the flood did fill the budget before the good client came (otherwise the
//!   test shows nothing);
//! - the kernel OOM-kills nothing and the server is still running;
//! - the good client's upload is OK in at most 2 tries, within 5 s of its first
//!   try (issue 13's worst-case target), and reads back with its digest;
//! - 2 s after the good client's first try the flooder holds no more than its
//!   share (`max_client_share` × budget): the largest client's reservation from
//!   `/metrics`, or, where the server does not export it, the total reserved
//!   (an upper bound of the flooder's part).
//!
//! The report and its picture are left in `target/tmp/flood_short.{json,png}`.
//! Needs root and a writable memory controller; elsewhere it prints `skipped:
//! <reason>` and passes, and `MEMGATE_REQUIRE_CGROUP=1` turns that into a
//! failure, as tests/oom_torture.rs does. Run with the figures shown:
//!
//! ```text
//! MEMGATE_REQUIRE_CGROUP=1 cargo nextest run --test flood_short --no-capture
//! ```

#[path = "support_cgroup/mod.rs"]
mod support_cgroup;

use std::{path::Path, time::Duration};

use memgate_bench::{
    MIB,
    flood::{
        self, FloodOptions,
        report::{self, FloodRun},
    },
    mib,
    target::{SpawnOptions, Target},
};

use support_cgroup::{MEMGATE, MachineLock, require_cgroup};

const LIMIT: u64 = 256 * MIB;
const CONNECTIONS: usize = 4;
const STREAMS: usize = 16;
const PUSH: u64 = 2 * MIB;
const HOLD: Duration = Duration::from_secs(12);
const GOOD_DELAY: Duration = Duration::from_secs(3);
const GOOD_SIZE: u64 = 50_000_000;
/// Issue 13: "in at most 2 tries".
const MAX_TRIES: usize = 2;
/// Issue 13: "within 5 s in the worst" of 5 runs, from the first try.
const MAX_TIME_TO_OK: f64 = 5.0;
/// Issue 13: "within 2 s of another client waiting, the flooder holds no more
/// than its share" (the report checks it then).
const SHARE_WITHIN: f64 = report::SHARE_WITHIN_S;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_client_gets_in_during_a_quiet_flood() {
    let _machine = MachineLock::acquire("cgroup-torture");
    // Whether a child memory cgroup can be made here at all: the bench makes
    // its own, and this turns "cannot" into the same skip (or failure) as oom_torture.
    let Some(probe) = require_cgroup("memgate-flood", LIMIT) else {
        return;
    };
    drop(probe);
    let target = Target::Spawn(SpawnOptions {
        binary: MEMGATE.into(),
        limit: LIMIT,
        config_toml: "[log]\nlevel = \"info\"\n".into(),
        // On the normal disk: tmpfs pages would be charged to the cgroup as memory.
        data_root: env!("CARGO_TARGET_TMPDIR").into(),
    });
    let opts = FloodOptions {
        connections: CONNECTIONS,
        streams: STREAMS,
        push: PUSH,
        hold: HOLD,
        good_delay: GOOD_DELAY,
        good_size: GOOD_SIZE,
        // Retries stop when the flood does: getting in after it is no credit.
        give_up: HOLD - GOOD_DELAY,
        runs: 1,
        ..FloodOptions::default()
    };
    let report = flood::run(&target, &opts).await.expect("the flood ran");
    eprint!("{}", report.text());
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let json = serde_json::to_string_pretty(&report).expect("the report as JSON");
    std::fs::write(out.join("flood_short.json"), json).expect("write the report");
    memgate_bench::plot::flood::draw(&out.join("flood_short.png"), &report)
        .expect("draw the picture");
    let broken = broken_promises(&report.runs[0]);
    if !broken.is_empty() {
        let run = &report.runs[0];
        panic!(
            "the quiet flood broke {} promise(s):\n  {}\nlast lines of memgate's stderr:\n{}",
            broken.len(),
            broken.join("\n  "),
            run.stderr_tail.join("\n")
        );
    }
}

/// Every promise the run broke, in words.
fn broken_promises(run: &FloodRun) -> Vec<String> {
    let mut broken = Vec::new();
    let g = &run.good;
    let first_try = g.first_try.unwrap_or(f64::INFINITY);
    let budget = run.server.budget.unwrap_or(0);
    let write = memgate_bench::capacity::reservation(memgate_bench::calls::Kind::Upload, 0);
    let before = run
        .samples
        .iter()
        .filter(|s| s.t < first_try)
        .filter_map(|s| s.guard.reserved)
        .max()
        .unwrap_or(0);
    // Full: no room for another Write, or the guard already refused flood
    // streams (admitted calls leave a wait room and the working set aside, so
    // reserved alone never reaches the budget).
    let refused_before = run
        .samples
        .iter()
        .filter(|s| s.t < first_try)
        .filter_map(|s| s.guard.rejected)
        .max()
        .unwrap_or(0);
    if before + write <= budget && refused_before == 0 {
        broken.push(format!(
            "the flood did not fill the budget before the good client came: {:.1} of {:.1} MiB \
             reserved, room for another Write ({:.1} MiB) — the test shows nothing",
            mib(before),
            mib(budget),
            mib(write)
        ));
    }
    match run.oom_kills {
        Some(0) => {}
        other => broken.push(format!("OOM kills in the cgroup: {other:?}")),
    }
    if !run.server.alive_after {
        broken.push(format!(
            "memgate is not running after the flood ({:?})",
            run.server.exit_status
        ));
    }
    let tries: Vec<String> = g
        .tries
        .iter()
        .map(|t| {
            format!(
                "{} at {:.1} s ({:.1} s)",
                t.outcome.code(),
                t.start,
                t.seconds
            )
        })
        .collect();
    match g.time_to_ok {
        None => broken.push(format!(
            "the good client's upload was not OK while the flood held: {} tries over {:.1} s: {}",
            g.tries.len(),
            g.tries
                .last()
                .map_or(0.0, |t| t.start + t.seconds - first_try),
            tries.join(", ")
        )),
        Some(t) if t > MAX_TIME_TO_OK || g.tries.len() > MAX_TRIES => broken.push(format!(
            "the good client's upload took {t:.1} s and {} tries from its first try (at most \
             {MAX_TIME_TO_OK} s and {MAX_TRIES} allowed){}: {}",
            g.tries.len(),
            match g.ok_at {
                Some(ok) if ok > run.flood_end => {
                    format!(", OK only once the flood ended at {:.1} s", run.flood_end)
                }
                _ => String::new(),
            },
            tries.join(", ")
        )),
        Some(_) => {}
    }
    if g.ok() && g.verified.as_deref() != Some("OK") {
        broken.push(format!(
            "the good client's blob did not read back with its digest: {:?}",
            g.verified
        ));
    }
    let h = &run.held;
    if h.within_share_2s != Some(true) {
        let what = match h.share_checked_on {
            "largest_client_reserved" => "the largest client's reservation",
            // Without the per-client figure, the total is an upper bound of the flooder's part.
            _ => "the total reserved (no largest-client figure in /metrics)",
        };
        broken.push(format!(
            "{SHARE_WITHIN} s after the good client's first try the flooder held more than its \
             share: {what} was {} against a share of {}",
            h.checked_2s_after_first_try
                .map_or("not read".into(), |v| format!("{:.1} MiB", mib(v))),
            h.share
                .map_or("unknown".into(), |v| format!("{:.1} MiB", mib(v))),
        ));
    }
    broken
}
