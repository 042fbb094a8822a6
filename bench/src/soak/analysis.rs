//! What a soak found and whether it kept its promises: the per-burst idle
//! readings, the least-squares trend over them, and one [`Check`] per promise.

use std::collections::BTreeMap;

use super::SoakOptions;
use crate::{
    MIB, mib,
    report::{Machine, ServerInfo, fmt_mib},
    stats::{Line, least_squares},
    timeline::Sample,
};

/// How many workers of each kind ran, and what they offered the guard.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Workers {
    pub uploads: usize,
    pub downloads: usize,
    /// Half of them (rounded down) ask for an echo.
    pub process: usize,
    /// Sum of the reservations every worker's call asks for at once.
    pub offered_bytes: u64,
    /// `offered_bytes` over the budget.
    pub offered_ratio: f64,
}

/// An idle reading: the median RSS over the last second of an idle period.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct IdleReading {
    /// Seconds since the server started.
    pub t: f64,
    pub rss: u64,
    pub reserved: Option<u64>,
    pub working_set: Option<u64>,
}

/// One burst and the idle period after it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Burst {
    pub start: f64,
    pub end: f64,
    pub calls: usize,
    /// Calls that succeeded, by kind.
    pub ok: BTreeMap<&'static str, usize>,
    /// Every attempt's ending, by gRPC code name.
    pub status_counts: BTreeMap<String, u64>,
    /// Attempts that ended neither OK nor RESOURCE_EXHAUSTED: `CODE: message`
    /// and how often (the first few distinct ones).
    pub failures: BTreeMap<String, u64>,
    /// When reserved bytes were first seen at 0 after the burst.
    pub reserved_zero_at: Option<f64>,
    pub reading: Option<IdleReading>,
}

/// One promise and whether it held.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// Everything a soak found: the JSON report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakReport {
    pub command: String,
    pub machine: Machine,
    pub options: SoakOptions,
    pub server: ServerInfo,
    pub limit: Option<u64>,
    pub workers: Workers,
    /// Seconds from the first burst's start to the last reading.
    pub seconds: f64,
    /// The idle server before any call.
    pub baseline: Option<IdleReading>,
    pub bursts: Vec<Burst>,
    pub oom_kills: Option<u64>,
    /// The highest post-burst idle RSS minus the baseline.
    pub max_over_baseline: Option<i64>,
    /// Least squares over the post-burst idle readings (MiB against hours).
    pub trend: Option<Line>,
    pub slope_mib_per_hour: Option<f64>,
    /// What the trend adds up to between the first and the last reading.
    pub fitted_growth_mib: Option<f64>,
    pub status_counts: BTreeMap<String, u64>,
    pub ok: BTreeMap<&'static str, usize>,
    pub checks: Vec<Check>,
    pub samples: Vec<Sample>,
    pub stderr_tail: Vec<String>,
}

impl SoakReport {
    /// Fills in the totals, the trend and the checks from the bursts.
    pub fn analyse(&mut self) {
        let o = &self.options;
        for b in &self.bursts {
            for (k, v) in &b.status_counts {
                *self.status_counts.entry(k.clone()).or_insert(0) += v;
            }
            for (k, v) in &b.ok {
                *self.ok.entry(k).or_insert(0) += v;
            }
        }
        let readings: Vec<IdleReading> = self.bursts.iter().filter_map(|b| b.reading).collect();
        let base = self.baseline.map(|b| b.rss);
        self.max_over_baseline =
            base.and_then(|base| readings.iter().map(|r| r.rss as i64 - base as i64).max());
        let points: Vec<(f64, f64)> = readings
            .iter()
            .map(|r| (r.t / 3600.0, mib(r.rss)))
            .collect();
        self.trend = least_squares(&points);
        self.slope_mib_per_hour = self.trend.map(|l| l.slope);
        self.fitted_growth_mib = match (self.trend, points.first(), points.last()) {
            (Some(l), Some(a), Some(b)) => Some(l.slope * (b.0 - a.0)),
            _ => None,
        };
        if let (Some(first), Some(last)) = (self.bursts.first(), readings.last()) {
            self.seconds = last.t - first.start;
        }

        let mut checks = Vec::new();
        let alive = self.server.alive_after;
        checks.push(Check {
            name: "no OOM kill",
            passed: self.oom_kills == Some(0) && alive,
            detail: format!(
                "{} OOM kill(s) in the cgroup; server {}",
                self.oom_kills.map_or("unknown".into(), |k| k.to_string()),
                if alive { "alive" } else { "dead" }
            ),
        });
        let not_zero: Vec<usize> = (0..self.bursts.len())
            .filter(|&i| {
                let b = &self.bursts[i];
                b.reserved_zero_at.is_none() || b.reading.is_none_or(|r| r.reserved != Some(0))
            })
            .collect();
        checks.push(Check {
            name: "reserved bytes return to 0 when idle",
            passed: !self.bursts.is_empty() && not_zero.is_empty(),
            detail: format!(
                "{} of {} bursts left reserved bytes above 0 (bursts {not_zero:?})",
                not_zero.len(),
                self.bursts.len()
            ),
        });
        let over: Vec<usize> = (0..self.bursts.len())
            .filter(|&i| match (self.bursts[i].reading, base) {
                (Some(r), Some(base)) => r.rss > base + o.tolerance,
                _ => true,
            })
            .collect();
        checks.push(Check {
            name: "idle RSS returns within tolerance of the baseline after each burst",
            passed: !self.bursts.is_empty() && over.is_empty(),
            detail: format!(
                "baseline {}, highest reading {:+.1} MiB over it, tolerance {:.0} MiB; {} \
                 reading(s) above (bursts {over:?})",
                fmt_mib(base),
                self.max_over_baseline
                    .map_or(f64::NAN, |b| b as f64 / MIB as f64),
                mib(o.tolerance),
                over.len()
            ),
        });
        checks.push(Check {
            name: "no growth trend in the idle readings",
            passed: self
                .fitted_growth_mib
                .is_some_and(|g| g <= mib(o.trend_tolerance)),
            detail: format!(
                "slope {:+.2} MiB/hour over {} readings, {:+.2} MiB across the run (at most \
                 {:.0} MiB allowed)",
                self.slope_mib_per_hour.unwrap_or(f64::NAN),
                readings.len(),
                self.fitted_growth_mib.unwrap_or(f64::NAN),
                mib(o.trend_tolerance)
            ),
        });
        let bad: u64 = self
            .status_counts
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "OK" | "RESOURCE_EXHAUSTED"))
            .map(|(_, v)| v)
            .sum();
        let mut failures: BTreeMap<&str, u64> = BTreeMap::new();
        for (what, n) in self.bursts.iter().flat_map(|b| &b.failures) {
            *failures.entry(what).or_insert(0) += n;
        }
        checks.push(Check {
            name: "every attempt ends OK or RESOURCE_EXHAUSTED",
            passed: bad == 0,
            detail: format!("{bad} other ending(s): {failures:?}"),
        });
        let kinds = ["upload", "download", "process"];
        let idle_kinds: Vec<&str> = kinds
            .into_iter()
            .filter(|k| {
                self.ok
                    .iter()
                    .filter(|(n, _)| n.starts_with(k))
                    .all(|(_, v)| *v == 0)
            })
            .collect();
        checks.push(Check {
            name: "each kind of call got work done",
            passed: idle_kinds.is_empty(),
            detail: format!("OK calls {:?}; none for {idle_kinds:?}", self.ok),
        });
        self.checks = checks;
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The figures and the checks, for the terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let w = &self.workers;
        let _ = writeln!(
            out,
            "== soak: {:.1} min of bursts, {} bursts; {} uploads + {} downloads + {} Process \
             workers offering {:.0} MiB = {:.2} x the budget ==",
            self.seconds / 60.0,
            self.bursts.len(),
            w.uploads,
            w.downloads,
            w.process,
            mib(w.offered_bytes),
            w.offered_ratio
        );
        let _ = writeln!(
            out,
            "idle baseline RSS {}, max post-burst idle RSS over baseline {}, slope {:+.2} \
             MiB/hour, OOM kills {}",
            fmt_mib(self.baseline.map(|b| b.rss)),
            crate::report::fmt_mib_signed(self.max_over_baseline),
            self.slope_mib_per_hour.unwrap_or(f64::NAN),
            self.oom_kills.map_or("n/a".into(), |k| k.to_string()),
        );
        let _ = writeln!(
            out,
            "OK calls {:?}; attempts {:?}",
            self.ok, self.status_counts
        );
        for c in &self.checks {
            let mark = if c.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "{mark} {}: {}", c.name, c.detail);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A soak whose bursts left these idle RSS readings (MiB) behind, one a minute.
    fn soak(baseline_mib: f64, readings_mib: &[f64]) -> SoakReport {
        let reading = |t: f64, m: f64| IdleReading {
            t,
            rss: (m * MIB as f64) as u64,
            reserved: Some(0),
            working_set: None,
        };
        let bursts = readings_mib
            .iter()
            .enumerate()
            .map(|(i, &m)| {
                let t = 60.0 * (i + 1) as f64;
                Burst {
                    start: t - 20.0,
                    end: t - 5.0,
                    calls: 3,
                    ok: [("upload", 1), ("download", 1), ("process-echo", 1)].into(),
                    status_counts: [("OK".to_string(), 3)].into(),
                    failures: BTreeMap::new(),
                    reserved_zero_at: Some(t - 4.0),
                    reading: Some(reading(t, m)),
                }
            })
            .collect();
        let mut report = SoakReport {
            command: String::new(),
            machine: Machine::this(),
            options: SoakOptions::default(),
            server: ServerInfo {
                alive_after: true,
                ..ServerInfo::default()
            },
            limit: Some(512 * MIB),
            workers: Workers::default(),
            seconds: 0.0,
            baseline: Some(reading(0.5, baseline_mib)),
            bursts,
            oom_kills: Some(0),
            max_over_baseline: None,
            trend: None,
            slope_mib_per_hour: None,
            fitted_growth_mib: None,
            status_counts: BTreeMap::new(),
            ok: BTreeMap::new(),
            checks: Vec::new(),
            samples: Vec::new(),
            stderr_tail: Vec::new(),
        };
        report.analyse();
        report
    }

    fn failed(report: &SoakReport) -> Vec<&'static str> {
        report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_flat_soak_passes() {
        let r = soak(12.0, &[14.9, 15.0, 14.8, 15.1, 14.9]);
        assert!(r.passed(), "{}", r.text());
        let over = r.max_over_baseline.unwrap() as f64 / MIB as f64;
        assert!((over - 3.1).abs() < 0.01, "{over}");
        assert!(r.slope_mib_per_hour.unwrap().abs() < 5.0);
    }

    #[test]
    fn a_reading_over_the_tolerance_fails() {
        let r = soak(12.0, &[14.9, 29.0, 14.8]);
        assert_eq!(
            failed(&r),
            ["idle RSS returns within tolerance of the baseline after each burst"]
        );
    }

    #[test]
    fn a_slow_leak_is_a_trend() {
        // 3 MiB a minute: every reading within 16 MiB of the baseline, but the
        // line climbs 12 MiB across the run.
        let r = soak(12.0, &[13.0, 16.0, 19.0, 22.0, 25.0]);
        assert_eq!(failed(&r), ["no growth trend in the idle readings"]);
        assert!((r.slope_mib_per_hour.unwrap() - 180.0).abs() < 1.0);
        assert!((r.fitted_growth_mib.unwrap() - 12.0).abs() < 0.1);
    }

    #[test]
    fn kills_leftover_reservations_and_other_codes_fail() {
        let mut r = soak(12.0, &[14.0, 14.0]);
        r.oom_kills = Some(1);
        r.bursts[1].reading.as_mut().unwrap().reserved = Some(20 * MIB);
        r.bursts[0].status_counts.insert("UNAVAILABLE".into(), 2);
        r.bursts[0].ok.clear();
        r.bursts[1].ok.remove("download");
        r.status_counts.clear();
        r.ok.clear();
        r.analyse();
        assert_eq!(
            failed(&r),
            [
                "no OOM kill",
                "reserved bytes return to 0 when idle",
                "every attempt ends OK or RESOURCE_EXHAUSTED",
                "each kind of call got work done",
            ]
        );
        assert!(!soak(12.0, &[]).passed(), "no bursts is no evidence");
    }
}
