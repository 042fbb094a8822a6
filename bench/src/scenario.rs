//! The named scenarios: which calls, on which payloads, how many at once. A
//! [`Plan`] is pure data; [`crate::variant`] runs one against a server, once per
//! guard setting, and [`run`] ties the two together with the openssl yardstick.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;

use crate::{
    calls::{Kind, RetryPolicy},
    openssl,
    payload::{self, Payload, Pool},
    report::{Comparison, RunReport},
    target::Target,
    variant::{self, Setup, VariantReport},
};

/// A scenario's name on the command line and in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `count` uploads, one after the other.
    UploadSeq,
    /// `count` uploads at once (or `concurrency` at a time).
    UploadBurst,
    /// `count` Process calls with echo, `concurrency` (1) at a time.
    ProcessEcho,
    /// `uploads` uploads and `process` Process calls (with echo unless
    /// `--no-echo`), all at once: far beyond the limit.
    MixedOverload,
    /// `count` blobs uploaded first (not measured), then downloaded,
    /// `concurrency` (all) at a time.
    Download,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::UploadSeq => "upload-seq",
            Scenario::UploadBurst => "upload-burst",
            Scenario::ProcessEcho => "process-echo",
            Scenario::MixedOverload => "mixed-overload",
            Scenario::Download => "download",
        }
    }

    fn default_count(self) -> usize {
        match self {
            Scenario::UploadSeq => 5,
            Scenario::UploadBurst => 8,
            Scenario::ProcessEcho => 3,
            Scenario::MixedOverload => 0,
            Scenario::Download => 4,
        }
    }
}

/// How calls share connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conn {
    /// Every call on one channel: one HTTP/2 connection, as one gRPC client has.
    Shared,
    /// A connection per call, kept across its retries.
    PerCall,
}

/// What the command line chose.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Params {
    /// Bytes per payload.
    pub size: u64,
    pub count: Option<usize>,
    pub concurrency: Option<usize>,
    /// mixed-overload: uploads and Process calls.
    pub uploads: usize,
    pub process: usize,
    /// mixed-overload: Process calls ask for an echo.
    pub echo: bool,
    pub conn: Conn,
    #[serde(skip)]
    pub retry: RetryPolicy,
    /// Scratch files (openssl's inputs, downloads): tmpfs where there is one.
    pub scratch: PathBuf,
}

/// The calls of one scenario. Payloads are numbered from 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Uploaded before the load, not measured (what `download` reads).
    pub setup: Vec<usize>,
    /// `(kind, payload)` in launch order.
    pub calls: Vec<(Kind, usize)>,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Distinct payloads needed.
    pub payloads: usize,
    /// One line for titles: "16 × 150 MB uploads + 8 × Process (echo), at once".
    pub description: String,
    /// Launch each call only when its reservation fits the guard's budget
    /// beside the calls in flight (the capacity run, see [`crate::capacity`]).
    pub fit_budget: bool,
}

impl Plan {
    pub fn new(scenario: Scenario, p: &Params) -> Plan {
        let n = p.count.unwrap_or(scenario.default_count()).max(1);
        let size = format!("{} MB", p.size as f64 / 1e6);
        let upto = |c: usize| p.concurrency.unwrap_or(c).clamp(1, n.max(1));
        let of = |kind: Kind, count: usize, first: usize| -> Vec<(Kind, usize)> {
            (first..first + count).map(|i| (kind, i)).collect()
        };
        match scenario {
            Scenario::UploadSeq => Plan {
                setup: vec![],
                calls: of(Kind::Upload, n, 0),
                concurrency: 1,
                payloads: n,
                description: format!("{n} × {size} uploads, one at a time"),
                fit_budget: false,
            },
            Scenario::UploadBurst => Plan {
                setup: vec![],
                calls: of(Kind::Upload, n, 0),
                concurrency: upto(n),
                payloads: n,
                description: format!("{n} × {size} uploads, {} at once", upto(n)),
                fit_budget: false,
            },
            Scenario::ProcessEcho => Plan {
                setup: vec![],
                calls: of(Kind::ProcessEcho, n, 0),
                concurrency: upto(1),
                payloads: n,
                description: format!("{n} × {size} Process with echo, {} at a time", upto(1)),
                fit_budget: false,
            },
            Scenario::MixedOverload => {
                let kind = if p.echo {
                    Kind::ProcessEcho
                } else {
                    Kind::Process
                };
                let mut calls = of(Kind::Upload, p.uploads, 0);
                calls.extend(of(kind, p.process, p.uploads));
                let echo = if p.echo { " (echo)" } else { "" };
                Plan {
                    setup: vec![],
                    concurrency: calls.len().max(1),
                    payloads: calls.len(),
                    description: format!(
                        "{} × {size} uploads + {} × {size} Process{echo}, all at once",
                        p.uploads, p.process
                    ),
                    calls,
                    fit_budget: false,
                }
            }
            Scenario::Download => Plan {
                setup: (0..n).collect(),
                calls: of(Kind::Download, n, 0),
                concurrency: upto(n),
                payloads: n,
                description: format!("{n} × {size} downloads, {} at once", upto(n)),
                fit_budget: false,
            },
        }
    }
}

/// Runs `scenario` against `target`: with the guard as the server has it, or
/// (`compare_guard_off`) once with the guard on and once off, same binary, same
/// payloads. The openssl yardstick is measured first, in the same run.
pub async fn run(
    scenario: Scenario,
    params: &Params,
    target: &Target,
    compare_guard_off: bool,
) -> anyhow::Result<RunReport> {
    let compare = compare_guard_off.then_some(Compare::GuardOff);
    run_compared(scenario, params, target, compare).await
}

/// What a comparison changes between its two runs of the same binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// `[memory] enabled` true, then false.
    GuardOff,
    /// `[profiling] enabled` true (jemalloc sampling at its configured
    /// interval), then false (the profiler loaded but not sampling).
    Profiling,
    /// The same calls paced to fit the guard's budget (the capacity figure),
    /// then as the scenario fires them; the comparison is the second (goodput
    /// under overload) over the first.
    Capacity,
}

impl Compare {
    /// The two variants, measured in this order; the comparison is the first over the second.
    fn variants(self) -> [(&'static str, Setup); 2] {
        let profiling = |on: bool| Setup {
            guard: Some(true),
            env: vec![("MEMGATE__PROFILING__ENABLED".into(), on.to_string())],
        };
        match self {
            Compare::GuardOff => [
                (
                    "guard on",
                    Setup {
                        guard: Some(true),
                        env: Vec::new(),
                    },
                ),
                (
                    "guard off",
                    Setup {
                        guard: Some(false),
                        env: Vec::new(),
                    },
                ),
            ],
            Compare::Profiling => [
                ("profiling on", profiling(true)),
                ("profiling off", profiling(false)),
            ],
            Compare::Capacity => {
                let on = || Setup {
                    guard: Some(true),
                    env: Vec::new(),
                };
                [("capacity (paced to the budget)", on()), ("overload", on())]
            }
        }
    }
}

/// [`run`], comparing what `compare` says (or nothing).
pub async fn run_compared(
    scenario: Scenario,
    params: &Params,
    target: &Target,
    compare: Option<Compare>,
) -> anyhow::Result<RunReport> {
    let plan = Plan::new(scenario, params);
    let payloads = make_payloads(plan.payloads, params.size).await?;
    let measured: Vec<Payload> = plan
        .calls
        .iter()
        .map(|&(_, i)| payloads[i].clone())
        .collect();
    let openssl = {
        let (scratch, concurrency) = (params.scratch.clone(), plan.concurrency);
        tokio::task::spawn_blocking(move || openssl::measure(&measured, concurrency, &scratch))
            .await?
    };
    let openssl = match openssl {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("warning: no openssl yardstick: {e:#}");
            None
        }
    };
    let setups: Vec<(&str, Setup)> = match (compare, target) {
        (Some(c), _) => c.variants().into(),
        (None, Target::Spawn(_)) => vec![(
            "guard on",
            Setup {
                guard: Some(true),
                env: Vec::new(),
            },
        )],
        (None, Target::External(_)) => vec![("as running", Setup::default())],
    };
    let mut variants: Vec<VariantReport> = Vec::new();
    for (i, (label, setup)) in setups.into_iter().enumerate() {
        let plan = Plan {
            fit_budget: compare == Some(Compare::Capacity) && i == 0,
            ..plan.clone()
        };
        eprintln!(
            "memgate-bench: {} ({label}): {}",
            scenario.name(),
            plan.description
        );
        let v = variant::run_with(
            label,
            target,
            &setup,
            &plan,
            &payloads,
            params,
            openssl.as_ref(),
        )
        .await
        .with_context(|| format!("{} ({label})", scenario.name()))?;
        variants.push(v);
    }
    let comparison = match (variants.as_slice(), compare) {
        // Goodput under overload over the capacity figure.
        ([capacity, overload], Some(Compare::Capacity)) => Some(Comparison::of(overload, capacity)),
        ([a, b], _) => Some(Comparison::of(a, b)),
        _ => None,
    };
    Ok(RunReport::new(
        scenario.name(),
        &plan.description,
        serde_json::to_value(params)?,
        openssl,
        variants,
        comparison,
    ))
}

/// `count` fresh payloads of `size` bytes, digests computed off the runtime.
pub async fn make_payloads(count: usize, size: u64) -> anyhow::Result<Vec<Payload>> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Payload>> {
        let pool: Arc<Pool> = Pool::random().context("cannot read /dev/urandom")?;
        Ok(payload::make(&pool, 0, count, size))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            size: 150_000_000,
            count: None,
            concurrency: None,
            uploads: 16,
            process: 8,
            echo: true,
            conn: Conn::Shared,
            retry: RetryPolicy::default(),
            scratch: PathBuf::from("/tmp"),
        }
    }

    #[test]
    fn plans() {
        let p = params();
        let mixed = Plan::new(Scenario::MixedOverload, &p);
        assert_eq!(mixed.calls.len(), 24);
        assert_eq!(mixed.concurrency, 24);
        assert_eq!(mixed.calls[16], (Kind::ProcessEcho, 16));
        assert_eq!(
            mixed.description,
            "16 × 150 MB uploads + 8 × 150 MB Process (echo), all at once"
        );
        let seq = Plan::new(Scenario::UploadSeq, &p);
        assert_eq!((seq.calls.len(), seq.concurrency), (5, 1));
        let burst = Plan::new(
            Scenario::UploadBurst,
            &Params {
                count: Some(4),
                concurrency: Some(9),
                ..p.clone()
            },
        );
        assert_eq!(
            (burst.calls.len(), burst.concurrency),
            (4, 4),
            "clamped to the count"
        );
        let download = Plan::new(Scenario::Download, &p);
        assert_eq!(download.setup, vec![0, 1, 2, 3]);
        assert!(download.calls.iter().all(|(k, _)| *k == Kind::Download));
        let no_echo = Plan::new(Scenario::MixedOverload, &Params { echo: false, ..p });
        assert_eq!(no_echo.calls[23], (Kind::Process, 23));
    }
}
