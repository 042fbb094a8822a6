//! What a resize run found, and whether the server kept its promises through it:
//! when the guard saw the new limit, how long it stayed over its budget, how
//! high usage went against the new limit, what happened to each call, and one
//! [`Check`] per promise.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{ResizeOptions, calls::Call};
use crate::{
    calls::{Kind, Outcome},
    mib,
    report::{Machine, fmt_mib},
    soak::Check,
    timeline::Sample,
};

/// One change of the cgroup's limit.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Resize {
    /// The limit asked for.
    pub to: u64,
    /// Seconds since the run's origin.
    pub requested_at: f64,
    /// When the kernel took it; `None` if it never did.
    pub applied_at: Option<f64>,
    /// The limit in force then (v1 rounds down to pages).
    pub applied: Option<u64>,
    /// Writes the kernel refused with EBUSY first (v1: usage above the new limit).
    pub refused: u32,
    pub usage_when_refused: Option<u64>,
    pub error: Option<String>,
    /// The latest sample when it was asked for.
    pub reserved_at_request: Option<u64>,
    pub budget_at_request: Option<u64>,
    pub usage_at_request: Option<u64>,
}

/// Figures computed from the samples and the calls.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Figures {
    /// The guard's budget before the resize.
    pub budget_before: Option<u64>,
    /// First sample after the lower limit was applied in which the guard's
    /// limit shows it, and the guard's budget and reserved bytes then.
    pub guard_saw_at: Option<f64>,
    pub budget_after: Option<u64>,
    pub reserved_when_seen: Option<u64>,
    /// First sample from then on with reserved bytes within the budget, and how
    /// long after the limit was applied that came.
    pub back_under_budget_at: Option<f64>,
    pub over_budget_for: Option<f64>,
    /// Highest sampled figures from the lower limit's application on.
    pub peak_usage_after: Option<u64>,
    pub peak_working_set_after: Option<u64>,
    pub peak_rss_after: Option<u64>,
    pub peak_reserved_after: Option<u64>,
    /// Every attempt's ending by gRPC code name.
    pub status_counts: BTreeMap<String, u64>,
    /// Calls that ended OK, by kind.
    pub ok: BTreeMap<&'static str, usize>,
    /// Failed attempts after which the server had taken more of the upload (cut)
    /// or not (refused, or cut before it had committed anything).
    pub cuts: usize,
    pub refusals: usize,
    /// Upload attempts that resumed from a committed offset.
    pub resumes: usize,
    /// The last call's end minus the lower limit's application.
    pub burst_done_after: Option<f64>,
}

/// Everything a resize run found: the JSON report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResizeReport {
    pub command: String,
    pub machine: Machine,
    pub options: ResizeOptions,
    pub cgroup_version: Option<String>,
    pub limit_before: u64,
    pub lower: Resize,
    pub raise: Option<Resize>,
    pub burst_start: f64,
    pub burst_end: f64,
    pub calls: Vec<Call>,
    /// `(call number, read-back attempts)` of every upload that ended OK.
    pub verified: Vec<(usize, Vec<Outcome>)>,
    /// The attempts of an upload sent after the burst.
    pub fresh: Vec<Outcome>,
    /// Readiness changes `(seconds, status)` from the health service's Watch.
    pub readiness: Vec<(f64, String)>,
    /// When readiness was SERVING again after the burst.
    pub ready_again_at: Option<f64>,
    pub alive: bool,
    pub exit: Option<String>,
    pub oom_kills: Option<u64>,
    /// The cgroup's own high-water mark since the lower limit (v1), page cache included.
    pub peak_usage_since_resize: Option<u64>,
    pub figures: Figures,
    pub checks: Vec<Check>,
    pub samples: Vec<Sample>,
    pub stderr_tail: Vec<String>,
}

impl ResizeReport {
    /// Fills in the figures and the checks.
    pub fn analyse(&mut self) {
        let f = &mut self.figures;
        let applied_at = self.lower.applied_at;
        let before = |s: &&Sample| applied_at.is_none_or(|a| s.t < a);
        f.budget_before = self
            .samples
            .iter()
            .filter(before)
            .filter_map(|s| s.guard.budget)
            .next_back();
        if let (Some(a), Some(budget_before)) = (applied_at, f.budget_before) {
            let after: Vec<&Sample> = self.samples.iter().filter(|s| s.t >= a).collect();
            let seen = after
                .iter()
                .find(|s| s.guard.budget.is_some_and(|b| b < budget_before));
            if let Some(s) = seen {
                f.guard_saw_at = Some(s.t);
                f.budget_after = s.guard.budget;
                f.reserved_when_seen = s.guard.reserved;
                let back = after.iter().filter(|x| x.t >= s.t).find(
                    |x| matches!((x.guard.reserved, x.guard.budget), (Some(r), Some(b)) if r <= b),
                );
                f.back_under_budget_at = back.map(|x| x.t);
                f.over_budget_for = back.map(|x| x.t - a);
            }
            let peak = |g: fn(&Sample) -> Option<u64>| after.iter().filter_map(|s| g(s)).max();
            f.peak_usage_after = peak(|s| s.usage);
            f.peak_working_set_after = peak(|s| s.working_set);
            f.peak_rss_after = peak(|s| s.rss);
            f.peak_reserved_after = peak(|s| s.guard.reserved);
            f.burst_done_after = Some(self.burst_end - a);
        }
        for c in &self.calls {
            for t in &c.attempts {
                *f.status_counts.entry(t.outcome.code()).or_insert(0) += 1;
                if t.outcome != Outcome::Ok {
                    if t.cut() {
                        f.cuts += 1;
                    } else {
                        f.refusals += 1;
                    }
                }
            }
            f.resumes += c.resumes();
            if c.succeeded() {
                *f.ok.entry(c.kind.as_str()).or_insert(0) += 1;
            }
        }
        self.checks = self.check();
    }

    fn check(&self) -> Vec<Check> {
        let f = &self.figures;
        let mut checks = Vec::new();
        // Below what was reserved when the guard saw the new limit, or, when
        // the kernel took it at the first write, when it was asked for (the
        // burst may shrink before the guard's next sample).
        let taken_at_once = self.lower.applied_at.is_some() && self.lower.refused == 0;
        let at_request = self.lower.reserved_at_request.filter(|_| taken_at_once);
        let lowered = [f.reserved_when_seen, at_request]
            .into_iter()
            .flatten()
            .zip(f.budget_after)
            .any(|(r, b)| r > b)
            || matches!((at_request, f.budget_after), (Some(r), Some(b)) if r > b);
        checks.push(Check {
            name: "the limit fell below what was reserved",
            passed: lowered,
            detail: format!(
                "{}; reserved {} when asked, {} when the guard saw it, against a budget of {}",
                match (&self.lower.applied_at, &self.lower.error) {
                    (Some(t), _) => format!(
                        "{} applied at {t:.2} s after {} EBUSY refusal(s)",
                        fmt_mib(self.lower.applied),
                        self.lower.refused
                    ),
                    (None, Some(e)) => format!("not applied: {e}"),
                    (None, None) => "not applied".into(),
                },
                fmt_mib(self.lower.reserved_at_request),
                fmt_mib(f.reserved_when_seen),
                fmt_mib(f.budget_after)
            ),
        });
        checks.push(Check {
            name: "no OOM kill",
            passed: self.oom_kills == Some(0) && self.alive,
            detail: format!(
                "{} OOM kill(s); server {}",
                self.oom_kills.map_or("unknown".into(), |k| k.to_string()),
                match &self.exit {
                    None => "alive".to_string(),
                    Some(e) => format!("dead ({e})"),
                }
            ),
        });
        let failed: Vec<String> = self
            .calls
            .iter()
            .filter(|c| !c.succeeded())
            .map(|c| {
                let last = c.attempts.last().map(|t| t.outcome.code());
                format!(
                    "{} ({} attempts, last {})",
                    c.name(),
                    c.attempts.len(),
                    last.unwrap_or_default()
                )
            })
            .collect();
        checks.push(Check {
            name: "every call done",
            passed: failed.is_empty(),
            detail: match failed.is_empty() {
                true => format!("{} calls OK", self.calls.len()),
                false => format!("not done: {}", failed.join(", ")),
            },
        });
        let uploaded = self
            .calls
            .iter()
            .filter(|c| c.kind == Kind::Upload && c.succeeded());
        let bad: Vec<usize> = uploaded
            .filter(|c| {
                !self
                    .verified
                    .iter()
                    .any(|(n, a)| *n == c.n && a.last() == Some(&Outcome::Ok))
            })
            .map(|c| c.n)
            .collect();
        checks.push(Check {
            name: "every OK upload read back and verified",
            passed: bad.is_empty(),
            detail: format!("{} verified; not: {bad:?}", self.verified.len() - bad.len()),
        });
        let cut: Vec<&Call> = self
            .calls
            .iter()
            .filter(|c| c.kind == Kind::Upload && c.attempts.iter().any(|t| t.cut()))
            .collect();
        let unresumed: Vec<String> = cut
            .iter()
            .filter(|c| !c.succeeded() || c.resumes() == 0)
            .map(|c| c.name())
            .collect();
        checks.push(Check {
            name: "every cut upload resumed to its blob",
            passed: unresumed.is_empty(),
            detail: format!(
                "{} upload(s) cut, {} resume(s) in all; not resumed to OK: {unresumed:?}",
                cut.len(),
                f.resumes
            ),
        });
        let fresh_ok = self.fresh.last() == Some(&Outcome::Ok);
        checks.push(Check {
            name: "ready again and admitting afterwards",
            passed: self.ready_again_at.is_some() && fresh_ok,
            detail: format!(
                "readiness SERVING again {}; a fresh upload: {}",
                self.ready_again_at
                    .map_or("never".into(), |t| format!("at {t:.2} s")),
                self.fresh.last().map_or("not tried".into(), |o| format!(
                    "{} after {} attempt(s)",
                    o.code(),
                    self.fresh.len()
                ))
            ),
        });
        checks
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// What the terminal shows.
    pub fn text(&self) -> String {
        let f = &self.figures;
        let o = &self.options;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "resize: {} uploads + {} Process{} of {} MB, cgroup {} (v{}) lowered to {} {}",
            o.uploads,
            o.process,
            if o.echo { " (echo)" } else { "" },
            o.size as f64 / 1e6,
            fmt_mib(Some(self.limit_before)),
            self.cgroup_version
                .as_deref()
                .unwrap_or("?")
                .trim_start_matches('V'),
            fmt_mib(Some(o.resize_to)),
            match o.resize_when_reserved_above {
                Some(m) => format!("once reserved passed {}", fmt_mib(Some(m))),
                None => format!("{:.1} s into the burst", o.resize_at.as_secs_f64()),
            }
        );
        let _ = writeln!(
            out,
            "  asked at {:.2} s (reserved {}, usage {}); applied {} after {} EBUSY refusal(s){}",
            self.lower.requested_at,
            fmt_mib(self.lower.reserved_at_request),
            fmt_mib(self.lower.usage_at_request),
            self.lower
                .applied_at
                .map_or("never".into(), |t| format!("at {t:.2} s")),
            self.lower.refused,
            self.lower
                .error
                .as_ref()
                .map_or(String::new(), |e| format!(": {e}"))
        );
        if let Some(r) = &self.raise {
            let _ = writeln!(
                out,
                "  raised back to {} at {}",
                fmt_mib(Some(r.to)),
                r.applied_at.map_or("never".into(), |t| format!("{t:.2} s"))
            );
        }
        let _ = writeln!(
            out,
            "  guard: budget {} -> {} (seen at {}), reserved then {}; back within the budget {}",
            fmt_mib(f.budget_before),
            fmt_mib(f.budget_after),
            f.guard_saw_at
                .map_or("never".into(), |t| format!("{t:.2} s")),
            fmt_mib(f.reserved_when_seen),
            f.over_budget_for
                .map_or("never".into(), |d| format!("{d:.2} s after the resize")),
        );
        let _ = writeln!(
            out,
            "  after the resize: peak usage {} (cgroup's own mark {}), working set {}, RSS {}, \
             reserved {} against a limit of {}",
            fmt_mib(f.peak_usage_after),
            fmt_mib(self.peak_usage_since_resize),
            fmt_mib(f.peak_working_set_after),
            fmt_mib(f.peak_rss_after),
            fmt_mib(f.peak_reserved_after),
            fmt_mib(self.lower.applied),
        );
        let codes: Vec<String> = f
            .status_counts
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  calls: {} OK of {}; attempts: {}; {} cut, {} refused, {} resumed; burst done {}",
            f.ok.values().sum::<usize>(),
            self.calls.len(),
            codes.join(", "),
            f.cuts,
            f.refusals,
            f.resumes,
            f.burst_done_after
                .map_or("n/a".into(), |d| format!("{d:.1} s after the resize")),
        );
        for c in &self.calls {
            let tries: Vec<String> = c
                .attempts
                .iter()
                .map(|t| match t.from {
                    0 => t.outcome.code(),
                    from => format!("{}@{:.0}MiB", t.outcome.code(), mib(from)),
                })
                .collect();
            let _ = writeln!(out, "    {:<18} {}", c.name(), tries.join(" "));
        }
        let not_ready: Vec<String> = self
            .readiness
            .iter()
            .map(|(t, s)| format!("{s} at {t:.2} s"))
            .collect();
        let _ = writeln!(out, "  readiness: {}", not_ready.join(", "));
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{} {}: {}",
                if c.passed { "PASS" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        for line in &self.stderr_tail {
            let _ = writeln!(out, "  | {line}");
        }
        out
    }
}
