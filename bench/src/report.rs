//! What a run found, in the JSON report and on the terminal: per variant (guard
//! on, guard off) the calls and their outcomes, throughput and its ratio to
//! openssl, latency percentiles, memory peaks and the guard's counters; and the
//! on/off ratios when both ran.

use std::collections::BTreeMap;

use crate::{
    calls::{Attempt, Kind, Outcome},
    mib,
    openssl::Baseline,
    stats::{median, percentile},
    timeline::Sample,
};

/// One call and all its attempts. Times are seconds since the run's origin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallRecord {
    pub n: usize,
    pub kind: Kind,
    /// Payload bytes the call carries (and, with echo, gets back).
    pub bytes: u64,
    pub start: f64,
    pub end: f64,
    pub attempts: Vec<Attempt>,
}

impl CallRecord {
    pub fn succeeded(&self) -> bool {
        matches!(self.attempts.last().map(|a| &a.outcome), Some(Outcome::Ok))
    }
}

/// The server a variant ran against.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ServerInfo {
    pub url: String,
    pub pid: Option<u32>,
    pub guard: Option<bool>,
    pub cgroup: Option<String>,
    pub cgroup_limit: Option<u64>,
    pub budget: Option<u64>,
    pub alive_after: bool,
    pub exit_status: Option<String>,
}

/// Latency percentiles in seconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl Latency {
    fn of(values: &[f64]) -> Latency {
        Latency {
            p50: percentile(values, 50.0),
            p99: percentile(values, 99.0),
        }
    }
}

/// One kind of call's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KindSummary {
    pub calls: usize,
    pub ok: usize,
    /// Of the attempts that succeeded.
    pub ok_attempt_latency: Latency,
    /// Of the calls that succeeded, from the first attempt to the last one's end.
    pub call_time: Latency,
}

/// The figures of one variant. Bytes are bytes; MB/s counts 10^6 bytes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub calls: usize,
    pub calls_ok: usize,
    pub attempts: usize,
    /// Payload bytes of the calls that succeeded.
    pub bytes_ok: u64,
    /// From the first call's start to the last call's end.
    pub seconds: f64,
    pub mb_per_s: f64,
    /// `mb_per_s` over openssl's rate with as many processes as the scenario's concurrency.
    pub ratio_to_openssl: Option<f64>,
    /// `mb_per_s` over one openssl process's rate.
    pub ratio_to_one_openssl: Option<f64>,
    pub ok_attempt_latency: Latency,
    pub call_time: Latency,
    /// p99 of the call time (first try to final answer) over p99 of the
    /// successful attempt alone: what refusals and retries add.
    pub call_time_p99_over_ok_attempt_p99: Option<f64>,
    pub by_kind: BTreeMap<&'static str, KindSummary>,
    /// Every attempt's ending, by gRPC code name.
    pub status_counts: BTreeMap<String, u64>,
    pub idle_rss: Option<u64>,
    /// The larger of the sampled peak and `VmHWM`.
    pub peak_rss: Option<u64>,
    pub peak_rss_growth: Option<i64>,
    pub rss_1s_after: Option<u64>,
    pub rss_1s_after_growth: Option<i64>,
    pub reserved_1s_after: Option<u64>,
    pub peak_working_set: Option<u64>,
    pub peak_reserved: Option<u64>,
    /// The cgroup's own high-water mark, page cache included.
    pub peak_cgroup_usage: Option<u64>,
    pub oom_kills: Option<u64>,
    /// Counter increases over the variant, from `/metrics`.
    pub admissions: Option<u64>,
    pub rejections: Option<u64>,
    pub purges: Option<u64>,
    pub purge_released_bytes: Option<u64>,
}

/// Figures only a finished variant has, gathered by the runner.
pub struct Measured<'a> {
    pub calls: &'a [CallRecord],
    pub samples: &'a [Sample],
    pub idle_rss: Option<u64>,
    pub after: Option<Sample>,
    pub hwm: Option<u64>,
    pub peak_cgroup_usage: Option<u64>,
    pub oom_kills: Option<u64>,
    pub openssl: Option<&'a Baseline>,
}

impl Summary {
    pub fn compute(m: &Measured) -> Summary {
        let ok_attempts = |calls: &mut dyn Iterator<Item = &CallRecord>| -> Vec<f64> {
            calls
                .flat_map(|c| &c.attempts)
                .filter(|a| a.outcome == Outcome::Ok)
                .map(|a| a.seconds)
                .collect()
        };
        let call_times = |calls: &mut dyn Iterator<Item = &CallRecord>| -> Vec<f64> {
            calls
                .filter(|c| c.succeeded())
                .map(|c| c.end - c.start)
                .collect()
        };
        let mut by_kind: BTreeMap<&'static str, KindSummary> = BTreeMap::new();
        for call in m.calls {
            let k = by_kind.entry(call.kind.as_str()).or_default();
            k.calls += 1;
            k.ok += usize::from(call.succeeded());
        }
        for (name, k) in by_kind.iter_mut() {
            let of_kind = || m.calls.iter().filter(|c| c.kind.as_str() == *name);
            k.ok_attempt_latency = Latency::of(&ok_attempts(&mut of_kind()));
            k.call_time = Latency::of(&call_times(&mut of_kind()));
        }
        let mut status_counts = BTreeMap::new();
        for a in m.calls.iter().flat_map(|c| &c.attempts) {
            *status_counts.entry(a.outcome.code()).or_insert(0) += 1;
        }
        let start = m
            .calls
            .iter()
            .map(|c| c.start)
            .fold(f64::INFINITY, f64::min);
        let end = m.calls.iter().map(|c| c.end).fold(0.0, f64::max);
        let seconds = if m.calls.is_empty() { 0.0 } else { end - start };
        let bytes_ok: u64 = m
            .calls
            .iter()
            .filter(|c| c.succeeded())
            .map(|c| c.bytes)
            .sum();
        let mb_per_s = if seconds > 0.0 {
            bytes_ok as f64 / 1e6 / seconds
        } else {
            0.0
        };
        let max = |f: &dyn Fn(&Sample) -> Option<u64>| m.samples.iter().filter_map(f).max();
        let peak_rss = max(&|s| s.rss).max(m.hwm);
        let growth = |v: Option<u64>| Some(v? as i64 - m.idle_rss? as i64);
        let first = m.samples.iter().find(|s| s.guard.purges.is_some());
        let last = m.samples.iter().rev().find(|s| s.guard.purges.is_some());
        let delta = |f: &dyn Fn(&Sample) -> Option<u64>| Some(f(last?)?.saturating_sub(f(first?)?));
        let ok_attempt_latency = Latency::of(&ok_attempts(&mut m.calls.iter()));
        let call_time = Latency::of(&call_times(&mut m.calls.iter()));
        Summary {
            calls: m.calls.len(),
            calls_ok: m.calls.iter().filter(|c| c.succeeded()).count(),
            attempts: m.calls.iter().map(|c| c.attempts.len()).sum(),
            bytes_ok,
            seconds,
            mb_per_s,
            ratio_to_openssl: m.openssl.map(|o| mb_per_s / o.parallel_mb_s),
            ratio_to_one_openssl: m.openssl.map(|o| mb_per_s / o.one_process_mb_s),
            ok_attempt_latency,
            call_time,
            call_time_p99_over_ok_attempt_p99: match (call_time.p99, ok_attempt_latency.p99) {
                (Some(c), Some(a)) if a > 0.0 => Some(c / a),
                _ => None,
            },
            by_kind,
            status_counts,
            idle_rss: m.idle_rss,
            peak_rss,
            peak_rss_growth: growth(peak_rss),
            rss_1s_after: m.after.and_then(|s| s.rss),
            rss_1s_after_growth: growth(m.after.and_then(|s| s.rss)),
            reserved_1s_after: m.after.and_then(|s| s.guard.reserved),
            peak_working_set: max(&|s| s.working_set),
            peak_reserved: max(&|s| s.guard.reserved),
            peak_cgroup_usage: m.peak_cgroup_usage,
            oom_kills: m.oom_kills,
            admissions: delta(&|s| s.guard.admitted),
            rejections: delta(&|s| s.guard.rejected),
            purges: delta(&|s| s.guard.purges),
            purge_released_bytes: delta(&|s| s.guard.purge_released),
        }
    }
}

/// Median of the RSS readings in `[from, to)` seconds.
pub fn median_rss(samples: &[Sample], from: f64, to: f64) -> Option<u64> {
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| s.t >= from && s.t < to)
        .filter_map(|s| s.rss.map(|r| r as f64))
        .collect();
    median(&v).map(|m| m as u64)
}

/// The first variant over the second: guard on over guard off, or profiling on
/// over profiling off.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// The two variants' labels, first over second.
    pub variants: [String; 2],
    /// First's MB/s over second's; `None` when the second moved nothing.
    pub throughput_ratio: Option<f64>,
    pub peak_rss_ratio: Option<f64>,
    /// First minus second, in bytes: what the first costs in memory.
    pub idle_rss_diff: Option<i64>,
    pub peak_rss_diff: Option<i64>,
    pub rss_1s_after_diff: Option<i64>,
    pub oom_kills_on: Option<u64>,
    pub oom_kills_off: Option<u64>,
    pub calls_ok_on: usize,
    pub calls_ok_off: usize,
}

impl Comparison {
    pub fn of(
        first: &crate::variant::VariantReport,
        second: &crate::variant::VariantReport,
    ) -> Comparison {
        let (on, off) = (&first.summary, &second.summary);
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let diff = |a: Option<u64>, b: Option<u64>| Some(a? as i64 - b? as i64);
        Comparison {
            variants: [first.label.clone(), second.label.clone()],
            throughput_ratio: ratio(on.mb_per_s, off.mb_per_s),
            peak_rss_ratio: match (on.peak_rss, off.peak_rss) {
                (Some(a), Some(b)) => ratio(a as f64, b as f64),
                _ => None,
            },
            idle_rss_diff: diff(on.idle_rss, off.idle_rss),
            peak_rss_diff: diff(on.peak_rss, off.peak_rss),
            rss_1s_after_diff: diff(on.rss_1s_after, off.rss_1s_after),
            oom_kills_on: on.oom_kills,
            oom_kills_off: off.oom_kills,
            calls_ok_on: on.calls_ok,
            calls_ok_off: off.calls_ok,
        }
    }
}

/// `12.3 MiB`, or `n/a`.
pub fn fmt_mib(v: Option<u64>) -> String {
    v.map_or("n/a".into(), |b| format!("{:.1} MiB", mib(b)))
}

/// `+12.3 MiB`, or `n/a`.
pub fn fmt_mib_signed(v: Option<i64>) -> String {
    v.map_or("n/a".into(), |b| {
        format!("{:+.1} MiB", b as f64 / crate::MIB as f64)
    })
}

/// `0.123 s`, or `n/a`.
pub fn fmt_s(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |s| format!("{s:.3} s"))
}

/// `1.23`, or `n/a`.
pub fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |r| format!("{r:.2}"))
}

/// The machine a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub cpu: Option<String>,
    pub kernel: Option<String>,
}

impl Machine {
    pub fn this() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: read("/proc/meminfo")
                .and_then(|m| crate::cgroup::proc_status_bytes(&m, "MemTotal")),
            cpu: read("/proc/cpuinfo").and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            }),
            kernel: read("/proc/sys/kernel/osrelease").map(|k| k.trim().to_string()),
        }
    }
}

/// Everything one `memgate-bench` run found: the JSON report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub description: String,
    pub command: String,
    pub unix_time: u64,
    pub machine: Machine,
    pub params: serde_json::Value,
    pub openssl: Option<Baseline>,
    pub variants: Vec<crate::variant::VariantReport>,
    /// Guard on over guard off, when both ran.
    pub comparison: Option<Comparison>,
}

impl RunReport {
    pub fn new(
        scenario: &str,
        description: &str,
        params: serde_json::Value,
        openssl: Option<Baseline>,
        variants: Vec<crate::variant::VariantReport>,
        comparison: Option<Comparison>,
    ) -> RunReport {
        RunReport {
            scenario: scenario.to_string(),
            description: description.to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            machine: Machine::this(),
            params,
            openssl,
            variants,
            comparison,
        }
    }

    /// A few lines per variant for the terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "== {}: {} ==\nmachine: {} cores, {}, {}",
            self.scenario,
            self.description,
            m.cores,
            fmt_mib(m.memory_bytes),
            m.cpu.as_deref().unwrap_or("cpu unknown")
        );
        if let Some(o) = &self.openssl {
            let _ = writeln!(
                out,
                "openssl dgst -sha256 of the same {} payloads: {:.0} MB/s (1 process), {:.0} MB/s \
                 ({} at once)",
                o.files, o.one_process_mb_s, o.parallel_mb_s, o.parallel_processes
            );
        }
        for v in &self.variants {
            let s = &v.summary;
            let _ = writeln!(
                out,
                "-- {} -- server {}, OOM kills {}\n  calls OK {}/{} ({} attempts), {:.0} MB/s \
                 (x{} openssl, x{} one openssl) over {:.1} s\n  status: {}\n  latency of OK \
                 attempts p50 {} p99 {}; call time p50 {} p99 {} (p99 x{} the OK attempt's)\n  \
                 RSS idle {}, peak {} ({}), \
                 1 s after {} ({}); peak working set {}, peak reserved {}, cgroup peak {}\n  \
                 admissions {}, rejections {}, purges {} releasing {}",
                v.label,
                if v.server.alive_after {
                    "alive".to_string()
                } else {
                    format!("dead ({})", v.server.exit_status.as_deref().unwrap_or("?"))
                },
                s.oom_kills.map_or("n/a".into(), |k| k.to_string()),
                s.calls_ok,
                s.calls,
                s.attempts,
                s.mb_per_s,
                fmt_ratio(s.ratio_to_openssl),
                fmt_ratio(s.ratio_to_one_openssl),
                s.seconds,
                s.status_counts
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                fmt_s(s.ok_attempt_latency.p50),
                fmt_s(s.ok_attempt_latency.p99),
                fmt_s(s.call_time.p50),
                fmt_s(s.call_time.p99),
                fmt_ratio(s.call_time_p99_over_ok_attempt_p99),
                fmt_mib(s.idle_rss),
                fmt_mib(s.peak_rss),
                fmt_mib_signed(s.peak_rss_growth),
                fmt_mib(s.rss_1s_after),
                fmt_mib_signed(s.rss_1s_after_growth),
                fmt_mib(s.peak_working_set),
                fmt_mib(s.peak_reserved),
                fmt_mib(s.peak_cgroup_usage),
                s.admissions.map_or("n/a".into(), |v| v.to_string()),
                s.rejections.map_or("n/a".into(), |v| v.to_string()),
                s.purges.map_or("n/a".into(), |v| v.to_string()),
                fmt_mib(s.purge_released_bytes),
            );
        }
        if let Some(c) = self
            .comparison
            .as_ref()
            .filter(|c| c.variants[1].starts_with("capacity"))
        {
            let _ = writeln!(
                out,
                "-- capacity figure -- goodput under overload / throughput paced to the budget: x{}",
                fmt_ratio(c.throughput_ratio)
            );
        }
        if let Some(c) = &self.comparison {
            let _ = writeln!(
                out,
                "-- {} / {} -- throughput x{}, peak RSS x{} ({}), idle RSS {}, RSS 1 s after {}, \
                 OOM kills {} vs {}, calls OK {} vs {}",
                c.variants[0],
                c.variants[1],
                fmt_ratio(c.throughput_ratio),
                fmt_ratio(c.peak_rss_ratio),
                fmt_mib_signed(c.peak_rss_diff),
                fmt_mib_signed(c.idle_rss_diff),
                fmt_mib_signed(c.rss_1s_after_diff),
                c.oom_kills_on.map_or("n/a".into(), |k| k.to_string()),
                c.oom_kills_off.map_or("n/a".into(), |k| k.to_string()),
                c.calls_ok_on,
                c.calls_ok_off,
            );
        }
        out
    }
}
