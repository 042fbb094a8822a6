//! The `/metrics` exposition, parsed by a real Prometheus text-format parser
//! (`prometheus-parse`), against a real guard reading a fake cgroup v2 tree.
//!
//! prometheus-parse reads the classic Prometheus format: it ignores `# UNIT`
//! and `# EOF`, and since OpenMetrics names a counter family without its
//! `_total` suffix, it returns counter samples untyped. The OpenMetrics rules it
//! does not check (EOF last, `_total` samples, unit suffixes) are checked here,
//! and every line must be one it reads: it silently skips the others.

#[path = "support_fakecg/mod.rs"]
mod support_fakecg;

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytesize::ByteSize;
use memgate::{
    admin::metrics::{Metrics, method_label},
    guard::{
        Guard, MemoryConfig,
        budget::{Admission, Pressure},
        layer::AdmissionObserver,
    },
    server::STREAM_WINDOW,
};
use prometheus_parse::{LineInfo, Scrape, Value};
use support_fakecg::{FakeCgroup, MIB};
use tonic::Code;

const LIMIT: u64 = 512 * MIB;
const USAGE: u64 = 100 * MIB;
const WRITE: &str = "/google.bytestream.ByteStream/Write";
const PROCESS: &str = "/memgate.v1.Payload/Process";
const DIGEST: &str = "0f343b0931126a20f133d67c2b018a3b5e4d7b4c1e8d6a2f9e0b1c2d3e4f5a6b";

/// The fake cgroup, with the optional v2 files the kernel may also offer.
fn cgroup() -> FakeCgroup {
    let cg = FakeCgroup::new(LIMIT, USAGE);
    let dir = cg.roots().root.join("sys/fs/cgroup");
    let events = "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n";
    std::fs::write(dir.join("memory.events"), events).unwrap();
    let psi = "some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\n\
               full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
    std::fs::write(dir.join("memory.pressure"), psi).unwrap();
    cg
}

async fn start(cg: &FakeCgroup, metrics: &Metrics) -> Guard {
    let cfg = MemoryConfig {
        reserve: ByteSize::mib(4),
        poll_interval: Duration::from_millis(10),
        ..MemoryConfig::default()
    };
    let observer = Arc::new(metrics.clone());
    Guard::start_with_observer(cfg, cg.roots(), STREAM_WINDOW as u64, observer).await
}

/// One exposition, parsed, with the families its `#` lines declare.
struct Exposition {
    text: String,
    scrape: Scrape,
    /// Family name → (type, unit).
    families: HashMap<String, (String, Option<String>)>,
    /// The name of each sample line, in order.
    sample_names: Vec<String>,
}

fn scrape(metrics: &Metrics, guard: &Guard) -> Exposition {
    let text = metrics.encode(guard);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let mut families: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut sample_names = Vec::new();
    for line in text.lines() {
        // prometheus-parse skips what it cannot read: make it read each line.
        match LineInfo::parse(line) {
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                assert!(value.parse::<f64>().is_ok(), "{line}");
                sample_names.push(metric_name.to_owned());
            }
            LineInfo::Doc { .. } | LineInfo::Type { .. } => {}
            _ => assert!(line.starts_with("# UNIT ") || line == "# EOF", "{line}"),
        }
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["#", "TYPE", name, kind] => {
                let old = families.insert(name.into(), (kind.into(), None));
                assert!(old.is_none(), "family {name} declared twice");
            }
            ["#", "UNIT", name, unit] => {
                let family = families.get_mut(name).expect("UNIT after its TYPE");
                family.1 = Some(unit.into());
            }
            _ => {}
        }
    }
    Exposition {
        text,
        scrape,
        families,
        sample_names,
    }
}

impl Exposition {
    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.scrape.samples.iter().filter(|s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        let sample = found.next()?;
        assert!(found.next().is_none(), "{name} {labels:?} is ambiguous");
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => panic!("{name} is a histogram or summary"),
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }

    /// Asserts that the sample name belongs to exactly one declared family,
    /// with a suffix its type allows.
    fn assert_in_one_family(&self, sample: &str) {
        let candidates = [
            "", "_total", "_info", "_bucket", "_sum", "_count", "_created",
        ];
        let mut owners = candidates.iter().filter_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            let (kind, _) = self.families.get(base)?;
            let fits = match kind.as_str() {
                "counter" => *suffix == "_total" || *suffix == "_created",
                "info" => *suffix == "_info",
                "histogram" => ["_bucket", "_sum", "_count", "_created"].contains(suffix),
                _ => suffix.is_empty(),
            };
            fits.then_some(base)
        });
        assert!(owners.next().is_some(), "{sample} belongs to no family");
        assert!(owners.next().is_none(), "{sample} fits two families");
    }
}

/// Families every exposition here has (the jemalloc ones only when jemalloc is
/// the allocator, which it is not in this test binary; the cgroup ones only
/// when the files exist).
const FAMILIES: &[&str] = &[
    "memgate_admission_admitted",
    "memgate_admission_queued",
    "memgate_admission_rejected",
    "memgate_admission_wait_seconds",
    "memgate_admission_reserved_bytes",
    "memgate_requests_in_flight",
    "memgate_received_bytes",
    "memgate_sent_bytes",
    "memgate_request_duration_seconds",
    "memgate_requests",
    "memgate_memory_limit_bytes",
    "memgate_memory_limit",
    "memgate_memory_working_set_bytes",
    "memgate_memory_budget_bytes",
    "memgate_memory_reserved_bytes",
    "memgate_memory_baseline_bytes",
    "memgate_memory_pressure_level",
    "memgate_memory_pressure",
    "memgate_admission_waiting",
    "memgate_guard_enabled",
    "memgate_purge_requests",
    "memgate_purges",
    "memgate_purge_failures",
    "memgate_purge_released_bytes",
    "memgate_purge_duration_seconds",
    "memgate_purge_last_duration_seconds",
    "memgate_cgroup_oom_kills",
    "memgate_cgroup_memory_pressure_some_avg10",
];

fn has_hex_digest(s: &str) -> bool {
    s.as_bytes()
        .split(|b| !b.is_ascii_hexdigit())
        .any(|run| run.len() >= 64)
}

/// Every metric, moved at least once.
fn record_everything(metrics: &Metrics) {
    metrics.queued(WRITE);
    metrics.admitted(WRITE, 24 * MIB, Some(Duration::from_millis(40)));
    metrics.admitted(PROCESS, 3 * MIB, None);
    metrics.rejected(PROCESS, "queue_full");
    let blob_path = format!("{WRITE}/uploads/u/blobs/{DIGEST}/5");
    for (path, code) in [
        (WRITE, Some(Code::Ok)),
        (PROCESS, Some(Code::ResourceExhausted)),
        (blob_path.as_str(), None),
        ("/grpc.health.v1.Health/Check", Some(Code::Ok)),
    ] {
        let method = method_label(path);
        metrics.request_started(method);
        metrics.request_finished(method, code, 5 * MIB, 100, Duration::from_millis(250));
    }
}

#[tokio::test]
async fn the_exposition_is_openmetrics_with_help_and_bounded_labels() {
    let cg = cgroup();
    let metrics = Metrics::new();
    let guard = start(&cg, &metrics).await;
    record_everything(&metrics);
    let e = scrape(&metrics, &guard);

    assert!(e.text.ends_with("\n# EOF\n"), "EOF must end the exposition");
    assert_eq!(e.text.matches("# EOF").count(), 1);
    for name in FAMILIES {
        assert!(e.families.contains_key(*name), "{name} is missing");
    }
    for (name, (_, unit)) in &e.families {
        assert!(name.starts_with("memgate_"), "{name}");
        let help = e.scrape.docs.get(name).map(|h| h.trim());
        assert!(help.is_some_and(|h| h.len() > 10), "{name} has no HELP");
        if let Some(unit) = unit {
            assert!(
                ["bytes", "seconds"].contains(&unit.as_str()),
                "{name}: {unit}"
            );
            assert!(name.ends_with(&format!("_{unit}")), "{name} lacks _{unit}");
        }
    }
    // Each sample belongs to a family and has its type's suffix (counters: _total).
    for name in &e.sample_names {
        e.assert_in_one_family(name);
    }
    for s in &e.scrape.samples {
        for (k, v) in s.labels.iter() {
            assert!(
                !v.contains("/blobs/") && !v.contains("/uploads/"),
                "{k}={v}"
            );
            assert!(!has_hex_digest(v), "{k}={v}");
        }
    }
    assert!(has_hex_digest(DIGEST), "the check itself works");
    assert!(!has_hex_digest(&e.text), "a digest leaked:\n{}", e.text);
    // The call on a blob path was counted, under "other".
    let other = [("method", "other"), ("code", "cancelled")];
    assert_eq!(e.get("memgate_requests_total", &other), 1.0);
    let health = [("method", "/grpc.health.v1.Health"), ("code", "ok")];
    assert_eq!(e.get("memgate_requests_total", &health), 1.0);
}

#[tokio::test]
async fn guard_families_show_what_the_guard_sees_at_each_scrape() {
    let cg = cgroup();
    let metrics = Metrics::new();
    let guard = start(&cg, &metrics).await;
    let Ok(Admission::Now(permit)) = guard.budget().try_acquire(10 * MIB) else {
        panic!("10 MiB fits an idle 512 MiB budget");
    };
    let e = scrape(&metrics, &guard);
    let view = guard.view();
    assert_eq!(e.get("memgate_memory_limit_bytes", &[]), LIMIT as f64);
    assert_eq!(
        e.get("memgate_memory_limit_info", &[("source", "cgroup_v2")]),
        1.0
    );
    assert_eq!(e.get("memgate_memory_working_set_bytes", &[]), USAGE as f64);
    assert_eq!(
        e.get("memgate_memory_budget_bytes", &[]),
        view.budget as f64
    );
    assert_eq!(
        e.get("memgate_memory_reserved_bytes", &[]),
        view.reserved as f64
    );
    assert_eq!(view.reserved, 10 * MIB);
    assert_eq!(
        e.get("memgate_memory_baseline_bytes", &[]),
        view.baseline as f64
    );
    assert_eq!(e.get("memgate_memory_pressure_level", &[]), 0.0);
    assert_eq!(
        e.get("memgate_memory_pressure", &[("level", "normal")]),
        1.0
    );
    assert_eq!(
        e.get("memgate_memory_pressure", &[("level", "critical")]),
        0.0
    );
    assert_eq!(e.get("memgate_admission_waiting", &[]), 0.0);
    assert_eq!(e.get("memgate_guard_enabled", &[]), 1.0);
    assert_eq!(e.get("memgate_cgroup_oom_kills_total", &[]), 2.0);
    assert_eq!(e.get("memgate_cgroup_memory_pressure_some_avg10", &[]), 1.5);
    assert_eq!(e.get("memgate_purges_total", &[]), 0.0);
    assert!(
        e.value("memgate_purge_duration_seconds_total", &[])
            .is_some()
    );
    drop(permit);

    // Usage between the watermarks, and a new limit: the next scrape shows both.
    let elevated = view.budget * 85 / 100;
    cg.set_usage(elevated);
    let mut rx = guard.subscribe();
    tokio::time::timeout(Duration::from_secs(5), async {
        rx.wait_for(|s| s.working_set == elevated).await.unwrap();
        while guard.pressure() != Pressure::Elevated {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the guard sees the new usage");
    let e = scrape(&metrics, &guard);
    assert_eq!(
        e.get("memgate_memory_working_set_bytes", &[]),
        elevated as f64
    );
    assert_eq!(e.get("memgate_memory_reserved_bytes", &[]), 0.0);
    assert_eq!(e.get("memgate_memory_pressure_level", &[]), 1.0);
    assert_eq!(
        e.get("memgate_memory_pressure", &[("level", "normal")]),
        0.0
    );
    assert_eq!(
        e.get("memgate_memory_pressure", &[("level", "elevated")]),
        1.0
    );
}

#[tokio::test]
async fn counters_move_with_admissions_and_requests() {
    let cg = cgroup();
    let metrics = Metrics::new();
    let guard = start(&cg, &metrics).await;
    let write = [("method", WRITE)];
    let before = scrape(&metrics, &guard);
    assert_eq!(
        before.value("memgate_admission_admitted_total", &write),
        None
    );
    assert_eq!(before.value("memgate_requests_in_flight", &write), None);

    metrics.request_started(method_label(WRITE));
    let during = scrape(&metrics, &guard);
    assert_eq!(during.get("memgate_requests_in_flight", &write), 1.0);

    record_everything(&metrics);
    metrics.request_finished(WRITE, Code::Ok, 7, 9, Duration::from_secs(3));
    let after = scrape(&metrics, &guard);
    assert_eq!(after.get("memgate_requests_in_flight", &write), 0.0);
    assert_eq!(after.get("memgate_admission_admitted_total", &write), 1.0);
    assert_eq!(after.get("memgate_admission_queued_total", &write), 1.0);
    assert_eq!(
        after.get("memgate_admission_reserved_bytes_total", &write),
        24.0 * MIB as f64
    );
    let full = [("method", PROCESS), ("reason", "queue_full")];
    assert_eq!(after.get("memgate_admission_rejected_total", &full), 1.0);
    assert_eq!(
        after.get("memgate_admission_wait_seconds_count", &write),
        1.0
    );
    assert_eq!(
        after.get("memgate_admission_wait_seconds_sum", &write),
        0.04
    );
    // A call that did not wait is admitted without a wait observation.
    let process = [("method", PROCESS)];
    assert_eq!(
        after.value("memgate_admission_wait_seconds_count", &process),
        None
    );

    let ok = [("method", WRITE), ("code", "ok")];
    assert_eq!(after.get("memgate_requests_total", &ok), 2.0);
    assert_eq!(
        after.get("memgate_request_duration_seconds_count", &ok),
        2.0
    );
    assert_eq!(after.get("memgate_request_duration_seconds_sum", &ok), 3.25);
    assert_eq!(
        after.get("memgate_received_bytes_total", &write),
        (5 * MIB + 7) as f64
    );
    assert_eq!(after.get("memgate_sent_bytes_total", &write), 109.0);
    let exhausted = [("method", PROCESS), ("code", "resource_exhausted")];
    assert_eq!(after.get("memgate_requests_total", &exhausted), 1.0);
    // The 250 ms call sits in the 0.25 s bucket, the 3 s one only from 5 s on.
    let bucket = after
        .scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "memgate_request_duration_seconds"
                && ok.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .expect("the ok histogram");
    let Value::Histogram(buckets) = &bucket.value else {
        panic!("not a histogram");
    };
    let count_at = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
    assert_eq!(count_at(0.25), Some(1.0));
    assert_eq!(count_at(2.5), Some(1.0));
    assert_eq!(count_at(5.0), Some(2.0));
    assert_eq!(count_at(f64::INFINITY), Some(2.0));
}
