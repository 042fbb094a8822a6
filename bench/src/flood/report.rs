//! What a flood run found, in the JSON report and on the terminal: the good
//! client's time to OK and its tries; the flooder's streams admitted, refused
//! and cut, by code; what the flooder held over time (the largest client's
//! reservation from `/metrics`, or the flooder's own count where the server
//! does not export it); reclaims by reason; OOM kills and memory peaks. Over
//! several runs: the median and the worst of the good client's time and tries.

use std::collections::BTreeMap;

use super::{
    FloodOptions,
    flooder::{End, StreamRecord},
    good::GoodReport,
};
use crate::{
    calls::Outcome,
    metrics::Reclaims,
    report::{Machine, ServerInfo, fmt_mib, fmt_mib_signed, fmt_s},
    stats::median,
    timeline::Sample,
};

/// Issue 13: "within 2 s of another client waiting, the flooder holds no more
/// than its share": when, after the good client's first try, the share is checked.
pub const SHARE_WITHIN_S: f64 = 2.0;

/// The flooder's own counts at one moment.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct FloodSample {
    pub t: f64,
    pub open: u64,
    pub admitted_open: u64,
    pub bytes_open: u64,
    pub bytes_admitted_open: u64,
}

/// The flooder's streams by how they fared.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamCounts {
    pub requested: usize,
    /// Got window from the server: open there.
    pub opened: usize,
    /// Seen being read by the server.
    pub admitted: usize,
    /// Not admitted, ended by the server: by code.
    pub refused: BTreeMap<String, usize>,
    /// Admitted, then ended by the server: by code.
    pub cut: BTreeMap<String, usize>,
    /// Admitted and still open when the flood ended.
    pub held_to_end: usize,
    /// Open, not admitted and not answered when the flood ended.
    pub waiting_at_end: usize,
    /// Never got a stream slot (the server's max_concurrent_streams).
    pub no_slot: usize,
    pub peak_open: u64,
    pub peak_admitted_open: u64,
}

impl StreamCounts {
    fn of(streams: &[StreamRecord], samples: &[FloodSample]) -> StreamCounts {
        let mut c = StreamCounts {
            requested: streams.len(),
            peak_open: samples.iter().map(|s| s.open).max().unwrap_or(0),
            peak_admitted_open: samples.iter().map(|s| s.admitted_open).max().unwrap_or(0),
            ..StreamCounts::default()
        };
        for s in streams {
            c.opened += usize::from(s.opened.is_some());
            c.admitted += usize::from(s.admitted.is_some());
            let code = match &s.end {
                End::Status { code, .. } => code.clone(),
                End::Reset { reason } => format!("RST_STREAM({reason})"),
                End::ConnectionLost { .. } => "CONNECTION_LOST".into(),
                End::Open if s.admitted.is_some() => {
                    c.held_to_end += 1;
                    continue;
                }
                End::Open if s.opened.is_some() => {
                    c.waiting_at_end += 1;
                    continue;
                }
                End::Open | End::NeverOpened => {
                    c.no_slot += 1;
                    continue;
                }
            };
            let into = if s.admitted.is_some() {
                &mut c.cut
            } else {
                &mut c.refused
            };
            *into.entry(code).or_default() += 1;
        }
        c
    }
}

/// What the flooder held, and whether it came down to its share once the
/// good client waited.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Held {
    /// `largest_client_reserved` (the server's `/metrics`) or `flooder_bytes_open`
    /// (the flooder's own payload bytes in open streams: not a reservation).
    pub source: &'static str,
    pub peak: Option<u64>,
    pub at_good_first_try: Option<u64>,
    /// Two seconds after the good client's first try.
    pub two_s_after_first_try: Option<u64>,
    /// `max_client_share` × budget.
    pub share: Option<u64>,
    pub client_share: f64,
    /// What the share is checked against: the largest client's reservation,
    /// or, where the server does not export it, `total_reserved`: every
    /// client's reservations together, an upper bound of the flooder's.
    pub share_checked_on: &'static str,
    /// That figure 2 s after the good client's first try.
    pub checked_2s_after_first_try: Option<u64>,
    /// Whether it was at or below the share then.
    pub within_share_2s: Option<bool>,
    /// Seconds from the good client's first try to the first reading of that
    /// figure at or below the share, while the flood held.
    pub down_to_share_after: Option<f64>,
}

/// One run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloodRun {
    pub server: ServerInfo,
    pub flood_start: f64,
    pub flood_end: f64,
    pub good: GoodReport,
    /// The good client's answers by code.
    pub good_codes: BTreeMap<String, usize>,
    pub streams: StreamCounts,
    pub connect_errors: Vec<String>,
    pub held: Held,
    /// Over the run, by reason; `None` where the server does not export them.
    pub reclaims: Option<Reclaims>,
    pub oom_kills: Option<u64>,
    pub idle_rss: Option<u64>,
    pub peak_rss: Option<u64>,
    pub peak_rss_growth: Option<i64>,
    pub peak_cgroup_usage: Option<u64>,
    pub peak_working_set: Option<u64>,
    pub peak_reserved: Option<u64>,
    pub stream_records: Vec<StreamRecord>,
    pub samples: Vec<Sample>,
    pub flooder_samples: Vec<FloodSample>,
    pub stderr_tail: Vec<String>,
}

/// What [`FloodRun::new`] is made from.
pub struct Parts {
    pub server: ServerInfo,
    pub flood_start: f64,
    pub flood_end: f64,
    pub good: GoodReport,
    pub streams: Vec<StreamRecord>,
    pub connect_errors: Vec<String>,
    pub idle_rss: Option<u64>,
    pub hwm: Option<u64>,
    pub peak_cgroup_usage: Option<u64>,
    pub oom_kills: Option<u64>,
    pub client_share: f64,
    pub samples: Vec<Sample>,
    pub flooder_samples: Vec<FloodSample>,
    pub stderr_tail: Vec<String>,
}

impl FloodRun {
    pub fn new(p: Parts) -> FloodRun {
        let mut good_codes = BTreeMap::new();
        for t in &p.good.tries {
            *good_codes.entry(t.outcome.code()).or_default() += 1;
        }
        let held = held(&p);
        let first = p.samples.iter().find_map(|s| s.guard.reclaims);
        let last = p.samples.iter().rev().find_map(|s| s.guard.reclaims);
        let reclaims = match (first, last) {
            (Some(a), Some(b)) => Some(b.since(&a)),
            _ => None,
        };
        let max = |f: &dyn Fn(&Sample) -> Option<u64>| p.samples.iter().filter_map(f).max();
        let peak_rss = max(&|s| s.rss).max(p.hwm);
        FloodRun {
            flood_start: p.flood_start,
            flood_end: p.flood_end,
            good_codes,
            streams: StreamCounts::of(&p.streams, &p.flooder_samples),
            connect_errors: p.connect_errors,
            held,
            reclaims,
            oom_kills: p.oom_kills,
            idle_rss: p.idle_rss,
            peak_rss,
            peak_rss_growth: peak_rss.zip(p.idle_rss).map(|(a, b)| a as i64 - b as i64),
            peak_cgroup_usage: p.peak_cgroup_usage,
            peak_working_set: max(&|s| s.working_set),
            peak_reserved: max(&|s| s.guard.reserved),
            stream_records: p.streams,
            server: p.server,
            good: p.good,
            samples: p.samples,
            flooder_samples: p.flooder_samples,
            stderr_tail: p.stderr_tail,
        }
    }

    /// Tries the good client made.
    pub fn tries(&self) -> usize {
        self.good.tries.len()
    }

    /// `(t, bytes)` of what the flooder held, from [`Held::source`].
    pub fn held_series(&self) -> Vec<(f64, u64)> {
        held_series(&self.samples, &self.flooder_samples)
    }
}

fn held_series(samples: &[Sample], flooder: &[FloodSample]) -> Vec<(f64, u64)> {
    let from_metrics: Vec<(f64, u64)> = samples
        .iter()
        .filter_map(|s| Some((s.t, s.guard.largest_client_reserved?)))
        .collect();
    if !from_metrics.is_empty() {
        return from_metrics;
    }
    flooder.iter().map(|s| (s.t, s.bytes_open)).collect()
}

fn held(p: &Parts) -> Held {
    let series = held_series(&p.samples, &p.flooder_samples);
    let exported = p
        .samples
        .iter()
        .any(|s| s.guard.largest_client_reserved.is_some());
    let (source, share_checked_on) = match exported {
        true => ("largest_client_reserved", "largest_client_reserved"),
        false => ("flooder_bytes_open", "total_reserved"),
    };
    let checked: Vec<(f64, u64)> = match exported {
        true => series.clone(),
        false => p
            .samples
            .iter()
            .filter_map(|s| Some((s.t, s.guard.reserved?)))
            .collect(),
    };
    let at =
        |series: &[(f64, u64)], t: f64| series.iter().find(|(st, _)| *st >= t).map(|(_, v)| *v);
    let first = p.good.first_try;
    let share = p
        .server
        .budget
        .map(|b| (b as f64 * p.client_share.min(1.0)) as u64);
    let checked_2s = first.and_then(|f| at(&checked, f + SHARE_WITHIN_S));
    let down_to_share_after = match (first, share) {
        (Some(f), Some(share)) => checked
            .iter()
            .find(|(t, v)| *t >= f && *t <= p.flood_end && *v <= share)
            .map(|(t, _)| t - f),
        _ => None,
    };
    Held {
        source,
        peak: series.iter().map(|(_, v)| *v).max(),
        at_good_first_try: first.and_then(|f| at(&series, f)),
        two_s_after_first_try: first.and_then(|f| at(&series, f + SHARE_WITHIN_S)),
        share,
        client_share: p.client_share,
        share_checked_on,
        checked_2s_after_first_try: checked_2s,
        within_share_2s: checked_2s.zip(share).map(|(v, s)| v <= s),
        down_to_share_after,
    }
}

/// The good client over all runs. A run where it never got OK counts as
/// infinitely slow: a median or worst that lands there is `None`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunsSummary {
    pub runs: usize,
    pub good_ok: usize,
    pub time_to_ok_median: Option<f64>,
    pub time_to_ok_worst: Option<f64>,
    pub tries_median: Option<f64>,
    pub tries_worst: usize,
    pub oom_kills: Option<u64>,
    /// Runs in which the flooder held no more than its share 2 s after the
    /// good client's first try.
    pub within_share_2s: usize,
}

impl RunsSummary {
    fn of(runs: &[FloodRun]) -> RunsSummary {
        let times: Vec<f64> = runs
            .iter()
            .map(|r| r.good.time_to_ok.unwrap_or(f64::INFINITY))
            .collect();
        let tries: Vec<f64> = runs.iter().map(|r| r.tries() as f64).collect();
        let finite = |v: Option<f64>| v.filter(|x| x.is_finite());
        RunsSummary {
            runs: runs.len(),
            good_ok: runs.iter().filter(|r| r.good.ok()).count(),
            time_to_ok_median: finite(median(&times)),
            time_to_ok_worst: finite(times.iter().copied().reduce(f64::max)),
            tries_median: median(&tries),
            tries_worst: runs.iter().map(FloodRun::tries).max().unwrap_or(0),
            oom_kills: runs.iter().map(|r| r.oom_kills).sum(),
            within_share_2s: runs
                .iter()
                .filter(|r| r.held.within_share_2s == Some(true))
                .count(),
        }
    }
}

/// Everything one `memgate-bench flood` found: the JSON report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloodReport {
    pub scenario: &'static str,
    pub description: String,
    pub command: String,
    pub unix_time: u64,
    pub machine: Machine,
    pub params: FloodOptions,
    pub summary: RunsSummary,
    pub runs: Vec<FloodRun>,
}

impl FloodReport {
    pub fn new(opts: &FloodOptions, runs: Vec<FloodRun>) -> FloodReport {
        FloodReport {
            scenario: "flood",
            description: opts.description(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            machine: Machine::this(),
            params: opts.clone(),
            summary: RunsSummary::of(&runs),
            runs,
        }
    }

    /// A few lines per run, then the summary, for the terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "== flood: {} ==\nmachine: {} cores, {}, {}",
            self.description,
            m.cores,
            fmt_mib(m.memory_bytes),
            m.cpu.as_deref().unwrap_or("cpu unknown")
        );
        for (i, r) in self.runs.iter().enumerate() {
            out.push_str(&r.text(i + 1));
        }
        let s = &self.summary;
        let _ = writeln!(
            out,
            "== over {} run(s): good client OK in {}/{}; time from first try to OK: median {}, \
             worst {}; tries: median {}, worst {}; OOM kills {}; flooder within its share 2 s \
             after the good client's first try in {}/{} ==",
            s.runs,
            s.good_ok,
            s.runs,
            fmt_s_or_never(s.time_to_ok_median),
            fmt_s_or_never(s.time_to_ok_worst),
            s.tries_median.map_or("n/a".into(), |t| format!("{t}")),
            s.tries_worst,
            s.oom_kills.map_or("n/a".into(), |k| k.to_string()),
            s.within_share_2s,
            s.runs,
        );
        out
    }
}

fn fmt_s_or_never(v: Option<f64>) -> String {
    v.map_or("never (not OK in that run)".into(), |s| format!("{s:.3} s"))
}

fn counts(map: &BTreeMap<String, usize>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl FloodRun {
    fn text(&self, n: usize) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let g = &self.good;
        let server = if self.server.alive_after {
            "alive".to_string()
        } else {
            format!(
                "dead ({})",
                self.server.exit_status.as_deref().unwrap_or("?")
            )
        };
        let _ = writeln!(
            out,
            "-- run {n} -- server {server}, OOM kills {}; budget {}; flood from {:.1} s to {:.1} s",
            self.oom_kills.map_or("n/a".into(), |k| k.to_string()),
            fmt_mib(self.server.budget),
            self.flood_start,
            self.flood_end,
        );
        let outcome = match (g.time_to_ok, g.tries.last()) {
            (Some(t), _) => format!("OK {t:.3} s after its first try"),
            (None, Some(last)) => format!("NOT OK, last answer {}", last_answer(&last.outcome)),
            (None, None) => "never tried".into(),
        };
        let _ = writeln!(
            out,
            "  good client: {outcome}, {} tries ({}), first try at {}; read back: {}",
            g.tries.len(),
            counts(&self.good_codes),
            fmt_s(g.first_try),
            g.verified.as_deref().unwrap_or("not done"),
        );
        let st = &self.streams;
        let _ = writeln!(
            out,
            "  flooder: {} streams asked, {} opened, {} admitted (at most {} open, {} admitted \
             at once); refused: {}; cut after admission: {}; at the end: {} admitted still \
             held, {} waiting unanswered, {} without a stream slot{}",
            st.requested,
            st.opened,
            st.admitted,
            st.peak_open,
            st.peak_admitted_open,
            counts(&st.refused),
            counts(&st.cut),
            st.held_to_end,
            st.waiting_at_end,
            st.no_slot,
            if self.connect_errors.is_empty() {
                String::new()
            } else {
                format!("; {} connections failed", self.connect_errors.len())
            },
        );
        let h = &self.held;
        let source = match h.source {
            "largest_client_reserved" => "largest client's reservation, from /metrics",
            _ => "the flooder's own bytes in open streams: /metrics has no largest-client figure",
        };
        let _ = writeln!(
            out,
            "  flooder held ({source}): peak {}; at the good client's first try {}, 2 s later {}",
            fmt_mib(h.peak),
            fmt_mib(h.at_good_first_try),
            fmt_mib(h.two_s_after_first_try),
        );
        let checked = match h.share_checked_on {
            "largest_client_reserved" => "the largest client's reservation",
            _ => "the total reserved (an upper bound of the flooder's)",
        };
        let _ = writeln!(
            out,
            "  share {} ({} × budget): 2 s after the good client's first try {checked} was {}: \
             {}{}",
            fmt_mib(h.share),
            h.client_share,
            fmt_mib(h.checked_2s_after_first_try),
            match h.within_share_2s {
                Some(true) => "within",
                Some(false) => "ABOVE",
                None => "n/a",
            },
            match h.down_to_share_after {
                Some(s) => format!("; at or below the share {s:.1} s after the first try"),
                None => "; never at or below the share while the flood held".into(),
            },
        );
        let reclaims = match &self.reclaims {
            None => "n/a (the server does not export memgate_memory_reclaimed_total)".into(),
            Some(r) => {
                let one = |name: &str, c: crate::metrics::Reclaimed| {
                    format!("{name} {} ({})", c.count, fmt_mib(Some(c.bytes)))
                };
                [
                    one("share", r.share),
                    one("idle", r.idle),
                    one("overcommit", r.overcommit),
                    one("other", r.other),
                ]
                .join(", ")
            }
        };
        let _ = writeln!(out, "  reclaims: {reclaims}");
        let _ = writeln!(
            out,
            "  memory: RSS idle {}, peak {} ({}); peak working set {}, peak reserved {}, cgroup \
             peak {}",
            fmt_mib(self.idle_rss),
            fmt_mib(self.peak_rss),
            fmt_mib_signed(self.peak_rss_growth),
            fmt_mib(self.peak_working_set),
            fmt_mib(self.peak_reserved),
            fmt_mib(self.peak_cgroup_usage),
        );
        out
    }
}

fn last_answer(o: &Outcome) -> String {
    match o {
        Outcome::Failed { code, message } => format!("{code}: {message}"),
        other => other.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(admitted: bool, opened: bool, end: End) -> StreamRecord {
        StreamRecord {
            connection: 0,
            stream: 0,
            opened: opened.then_some(1.0),
            pushed: 0,
            admitted: admitted.then_some(1.1),
            ended: None,
            end,
        }
    }

    fn status(code: &str) -> End {
        End::Status {
            code: code.into(),
            message: String::new(),
            pushback_ms: None,
        }
    }

    #[test]
    fn streams_are_told_apart_by_admission_and_end() {
        let streams = [
            stream(false, true, status("RESOURCE_EXHAUSTED")),
            stream(false, true, status("RESOURCE_EXHAUSTED")),
            stream(true, true, status("DEADLINE_EXCEEDED")),
            stream(true, true, End::Open),
            stream(false, true, End::Open),
            stream(false, false, End::Open),
            stream(false, false, End::NeverOpened),
            stream(
                true,
                true,
                End::Reset {
                    reason: "CANCEL".into(),
                },
            ),
        ];
        let c = StreamCounts::of(&streams, &[]);
        assert_eq!((c.requested, c.opened, c.admitted), (8, 6, 3));
        assert_eq!(c.refused.get("RESOURCE_EXHAUSTED"), Some(&2));
        assert_eq!(c.cut.get("DEADLINE_EXCEEDED"), Some(&1));
        assert_eq!(c.cut.get("RST_STREAM(CANCEL)"), Some(&1));
        assert_eq!((c.held_to_end, c.waiting_at_end, c.no_slot), (1, 1, 2));
    }

    #[test]
    fn the_metric_wins_over_the_flooders_own_count() {
        let mut samples = vec![Sample::default(); 2];
        samples[1].t = 0.05;
        let flooder = [FloodSample {
            t: 0.1,
            bytes_open: 7,
            ..FloodSample::default()
        }];
        assert_eq!(held_series(&samples, &flooder), vec![(0.1, 7)]);
        samples[1].guard.largest_client_reserved = Some(9);
        assert_eq!(held_series(&samples, &flooder), vec![(0.05, 9)]);
    }
}
