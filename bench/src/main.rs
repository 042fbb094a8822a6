//! `memgate-bench SCENARIO [options]`: runs a named scenario against memgate and
//! writes a JSON report and a PNG picture. See bench/README.md.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use memgate_bench::{
    calls::RetryPolicy,
    cgroup::MachineLock,
    flood::{self, FloodOptions},
    mib, openssl,
    plot::{self, sheet::Panel},
    report::{RunReport, fmt_mib, fmt_mib_signed, fmt_ratio},
    resize::{self, ResizeOptions},
    scenario::{self, Conn, Params, Scenario},
    soak::{self, SoakOptions},
    target::{External, SpawnOptions, Target},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Name {
    UploadSeq,
    UploadBurst,
    ProcessEcho,
    MixedOverload,
    Download,
    Soak,
    /// A quiet flood from a second loopback address while a good client uploads.
    Flood,
    Resize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Compare {
    /// The same scenario against the same binary with `[memory] enabled = false`.
    GuardOff,
    /// The same scenario with jemalloc's heap profiler sampling
    /// (`[profiling] enabled = true`), then not; both with the guard on.
    Profiling,
    /// The same calls paced so that their reservations fit the guard's budget
    /// (the capacity figure), then as the scenario fires them: goodput / capacity.
    Capacity,
}

impl Compare {
    fn to_scenario(self) -> scenario::Compare {
        match self {
            Compare::GuardOff => scenario::Compare::GuardOff,
            Compare::Profiling => scenario::Compare::Profiling,
            Compare::Capacity => scenario::Compare::Capacity,
        }
    }
}

/// Runs a named load scenario against memgate and reports what its memory did.
///
/// By default it starts the memgate binary itself in a fresh child memory cgroup
/// (root and a writable cgroup memory controller needed); with --addr it drives a
/// server that is already running.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    scenario: Name,
    /// Bytes per payload (150MB = 150,000,000; 64MiB = 2^26).
    #[arg(long, default_value = "150MB")]
    size: bytesize::ByteSize,
    /// Calls (upload-seq 5, upload-burst 8, process-echo 3, download 4).
    #[arg(long)]
    count: Option<usize>,
    /// Calls in flight at once (upload-burst and download: all; process-echo: 1).
    #[arg(long)]
    concurrency: Option<usize>,
    /// mixed-overload (16) and resize (8): uploads.
    #[arg(long)]
    uploads: Option<usize>,
    /// mixed-overload (8) and resize (4): Process calls.
    #[arg(long)]
    process: Option<usize>,
    /// mixed-overload: Process calls without echo.
    #[arg(long)]
    no_echo: bool,
    /// One shared HTTP/2 connection (as one gRPC channel), or one per call.
    #[arg(long, value_enum, default_value = "shared")]
    conn: Conn,
    /// Attempts per call; RESOURCE_EXHAUSTED is retried after the server's pushback.
    #[arg(long, default_value_t = 10)]
    max_attempts: usize,
    /// Run the scenario a second time, changed as this says, and compare.
    #[arg(long, value_enum)]
    compare: Option<Compare>,

    /// Memory limit of the child cgroup the server runs in (512MiB; resize: 1GiB,
    /// the limit before the resize).
    #[arg(long)]
    limit: Option<bytesize::ByteSize>,
    /// The memgate binary (default: `memgate` beside this program).
    #[arg(long)]
    memgate: Option<PathBuf>,
    /// Configuration file for the server the bench starts (default: memgate's defaults).
    #[arg(long)]
    server_config: Option<PathBuf>,
    /// Where the started server's data directory is made: a disk, not tmpfs.
    #[arg(long)]
    data_root: Option<PathBuf>,

    /// Drive a running server at this gRPC address (`http://127.0.0.1:50051`) instead.
    #[arg(long)]
    addr: Option<String>,
    /// Its admin listener, for /metrics (reserved bytes, pressure, purges).
    #[arg(long, requires = "addr")]
    admin_addr: Option<SocketAddr>,
    /// Its pid, for RSS (same machine only).
    #[arg(long, requires = "addr")]
    pid: Option<u32>,
    /// Its data directory (the soak removes what it uploaded).
    #[arg(long, requires = "addr")]
    server_data_dir: Option<PathBuf>,

    /// soak: how long bursts keep starting.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// soak: length of each burst.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    burst: Duration,
    /// soak: idle time after reserved bytes reach 0, before each reading.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// soak: reservations offered over the guard's budget.
    #[arg(long, default_value_t = 1.5)]
    load_factor: f64,
    /// soak: Process workers (every other one with echo).
    #[arg(long, default_value_t = 2)]
    process_workers: usize,
    /// soak: download workers.
    #[arg(long, default_value_t = 2)]
    download_workers: usize,
    /// soak: upload workers (default: enough to reach --load-factor).
    #[arg(long)]
    upload_workers: Option<usize>,

    /// flood: HTTP/2 connections the flooder opens.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// flood: Write streams per flooder connection.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// flood: bytes each flood stream pushes before it goes quiet.
    #[arg(long, default_value = "4MiB")]
    push: bytesize::ByteSize,
    /// flood: blob size each flood stream declares.
    #[arg(long, default_value = "150MB")]
    declared: bytesize::ByteSize,
    /// flood: how long the flooder holds its streams.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// flood: when the good client starts, after the flood.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    good_delay: Duration,
    /// flood: the good client's blob.
    #[arg(long, default_value = "50MB")]
    good_size: bytesize::ByteSize,
    /// flood: the flooder's (loopback) address; the good client uses 127.0.0.1.
    #[arg(long, default_value = "127.0.0.2")]
    flood_addr: std::net::IpAddr,
    /// flood: the good client stops retrying this long after its first try.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    give_up: Duration,
    /// flood: runs, each against a fresh server; median and worst are reported.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// resize: the limit the cgroup is lowered to.
    #[arg(long, default_value = "512MiB")]
    resize_to: bytesize::ByteSize,
    /// resize: when, after the burst started, the limit is lowered.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    resize_at: Duration,
    /// resize: put the old limit back this long after the lower one took effect.
    #[arg(long, value_parser = humantime::parse_duration)]
    resize_for: Option<Duration>,
    /// resize: lower the limit as soon as the guard has reserved more than this
    /// (--resize-at is then the latest moment); e.g. the new limit's budget.
    #[arg(long)]
    resize_when_reserved_above: Option<bytesize::ByteSize>,

    /// The JSON report (default: target/bench/<scenario>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// The picture (default: target/bench/<scenario>.png).
    #[arg(long)]
    png: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // On Ctrl-C or SIGTERM the run is dropped: the server it started is killed,
    // its cgroup and data directory removed.
    let outcome = tokio::select! {
        r = run(&cli) => r,
        s = stop_signal() => Err(anyhow::anyhow!("stopped by {s}")),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("memgate-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Ok(false) when a soak check failed.
async fn run(cli: &Cli) -> anyhow::Result<bool> {
    let name = cli
        .scenario
        .to_possible_value()
        .expect("no skipped variants");
    let name = name.get_name();
    let json = cli
        .json
        .clone()
        .unwrap_or_else(|| default_out(name, "json"));
    let png = cli.png.clone().unwrap_or_else(|| default_out(name, "png"));
    let target = target(cli)?;
    // Whatever pushes gigabytes through a cgroup runs alone on the machine.
    let _lock = match target {
        Target::Spawn(_) => Some(match MachineLock::try_acquire("cgroup-torture") {
            Some(lock) => lock,
            None => {
                eprintln!("memgate-bench: waiting for another cgroup test or bench to finish");
                MachineLock::acquire("cgroup-torture")
            }
        }),
        Target::External(_) => None,
    };
    let retry = RetryPolicy {
        max_attempts: cli.max_attempts.max(1),
        ..RetryPolicy::default()
    };
    if cli.scenario == Name::Soak {
        let opts = SoakOptions {
            duration: cli.duration,
            burst: cli.burst,
            idle: cli.idle,
            load_factor: cli.load_factor,
            size: cli.size.as_u64(),
            process_workers: cli.process_workers,
            download_workers: cli.download_workers,
            upload_workers: cli.upload_workers,
            conn: cli.conn,
            retry,
            ..SoakOptions::default()
        };
        let report = soak::run(&target, &opts).await?;
        print!("{}", report.text());
        write_json(&json, &report)?;
        plot::soak::draw(&png, &report)?;
        eprintln!("wrote {} and {}", json.display(), png.display());
        return Ok(report.passed());
    }
    if cli.scenario == Name::Flood {
        let opts = FloodOptions {
            connections: cli.connections.max(1),
            streams: cli.streams.max(1),
            push: cli.push.as_u64(),
            declared: cli.declared.as_u64(),
            hold: cli.hold,
            good_delay: cli.good_delay,
            good_size: cli.good_size.as_u64(),
            flood_ip: cli.flood_addr,
            give_up: cli.give_up,
            runs: cli.runs.max(1),
            ..FloodOptions::default()
        };
        let report = flood::run(&target, &opts).await?;
        print!("{}", report.text());
        write_json(&json, &report)?;
        plot::flood::draw(&png, &report)?;
        eprintln!("wrote {} and {}", json.display(), png.display());
        return Ok(true);
    }
    if cli.scenario == Name::Resize {
        let opts = ResizeOptions {
            resize_to: cli.resize_to.as_u64(),
            resize_at: cli.resize_at,
            resize_for: cli.resize_for,
            resize_when_reserved_above: cli.resize_when_reserved_above.map(|b| b.as_u64()),
            uploads: cli.uploads.unwrap_or(8),
            process: cli.process.unwrap_or(4),
            size: cli.size.as_u64(),
            echo: !cli.no_echo,
            conn: cli.conn,
            retry: RetryPolicy {
                max_attempts: cli.max_attempts.max(1),
                ..ResizeOptions::default().retry
            },
            ..ResizeOptions::default()
        };
        let report = resize::run(&target, &opts).await?;
        print!("{}", report.text());
        write_json(&json, &report)?;
        plot::resize::draw(&png, &report)?;
        eprintln!("wrote {} and {}", json.display(), png.display());
        return Ok(report.passed());
    }
    let scenario = match cli.scenario {
        Name::UploadSeq => Scenario::UploadSeq,
        Name::UploadBurst => Scenario::UploadBurst,
        Name::ProcessEcho => Scenario::ProcessEcho,
        Name::MixedOverload => Scenario::MixedOverload,
        Name::Download => Scenario::Download,
        Name::Soak | Name::Flood | Name::Resize => unreachable!("handled above"),
    };
    let params = Params {
        size: cli.size.as_u64(),
        count: cli.count,
        concurrency: cli.concurrency,
        uploads: cli.uploads.unwrap_or(16),
        process: cli.process.unwrap_or(8),
        echo: !cli.no_echo,
        conn: cli.conn,
        retry,
        scratch: openssl::scratch_dir(),
    };
    let compare = cli.compare.map(Compare::to_scenario);
    let report = scenario::run_compared(scenario, &params, &target, compare).await?;
    print!("{}", report.text());
    write_json(&json, &report)?;
    draw(&png, &report)?;
    eprintln!("wrote {} and {}", json.display(), png.display());
    Ok(true)
}

fn target(cli: &Cli) -> anyhow::Result<Target> {
    if let Some(addr) = &cli.addr {
        let url = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        return Ok(Target::External(External {
            url,
            admin: cli.admin_addr,
            pid: cli.pid,
            data_dir: cli.server_data_dir.clone(),
        }));
    }
    let binary = match &cli.memgate {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name("memgate"),
    };
    let config_toml = match &cli.server_config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        None => "[log]\nlevel = \"info\"\n".to_string(),
    };
    let default_limit = match cli.scenario {
        Name::Resize => bytesize::ByteSize::gib(1),
        _ => bytesize::ByteSize::mib(512),
    };
    Ok(Target::Spawn(SpawnOptions {
        binary,
        limit: cli.limit.unwrap_or(default_limit).as_u64(),
        config_toml,
        data_root: cli.data_root.clone().unwrap_or_else(std::env::temp_dir),
    }))
}

fn default_out(name: &str, ext: &str) -> PathBuf {
    Path::new("target")
        .join("bench")
        .join(format!("{name}.{ext}"))
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The scenario's picture: a panel per variant.
fn draw(path: &Path, report: &RunReport) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let cgroup_limit = report.variants.iter().find_map(|v| v.server.cgroup_limit);
    let guard_limit = report
        .variants
        .iter()
        .flat_map(|v| &v.samples)
        .find_map(|s| s.guard.limit);
    let (limit, limit_label) = match cgroup_limit {
        Some(l) => (Some(l), "cgroup limit"),
        None => (guard_limit, "memory limit (guard's)"),
    };
    let versus = match &report.comparison {
        Some(c) => format!(": {} vs {}", c.variants[0], c.variants[1]),
        None => String::new(),
    };
    let title = match (cgroup_limit, report.variants.first()) {
        (Some(l), _) => format!(
            "memgate {}{versus}, {:.0} MiB cgroup",
            report.scenario,
            mib(l)
        ),
        (None, Some(v)) => format!(
            "memgate {}{versus}, server at {}",
            report.scenario, v.server.url
        ),
        (None, None) => format!("memgate {}", report.scenario),
    };
    let m = &report.machine;
    let subtitle = format!(
        "{}; {} cores, {} RAM{}",
        report.description,
        m.cores,
        m.memory_bytes.map_or("? GiB".into(), |b| format!(
            "{:.1} GiB",
            b as f64 / (1u64 << 30) as f64
        )),
        report.openssl.as_ref().map_or(String::new(), |o| format!(
            "; openssl dgst -sha256 on the same data: {:.0} MB/s ({} at once)",
            o.parallel_mb_s, o.parallel_processes
        ))
    );
    let panels: Vec<Panel> = report
        .variants
        .iter()
        .map(|v| {
            let s = &v.summary;
            let codes = s
                .status_counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut facts = vec![
                format!(
                    "calls OK {}/{} ({} attempts)",
                    s.calls_ok, s.calls, s.attempts
                ),
                format!(
                    "{:.0} MB/s = {} × openssl",
                    s.mb_per_s,
                    fmt_ratio(s.ratio_to_openssl)
                ),
                format!(
                    "peak RSS {} ({} over idle)",
                    fmt_mib(s.peak_rss),
                    fmt_mib_signed(s.peak_rss_growth)
                ),
                format!(
                    "RSS 1 s after the last call: {}",
                    fmt_mib_signed(s.rss_1s_after_growth)
                ),
                format!(
                    "OOM kills: {}",
                    s.oom_kills.map_or("n/a".into(), |k| k.to_string())
                ),
                format!(
                    "purges {} ({} released)",
                    s.purges.map_or("n/a".into(), |k| k.to_string()),
                    fmt_mib(s.purge_released_bytes)
                ),
            ];
            facts.extend(wrap(&codes, 34));
            Panel {
                title: v.label.clone(),
                samples: &v.samples,
                limit: v.server.cgroup_limit.or(limit),
                limit_label: limit_label.to_string(),
                budget: v.server.budget,
                guard_on: v.server.guard.unwrap_or(true),
                load_start: (!v.calls.is_empty()).then_some(v.load_start),
                facts,
            }
        })
        .collect();
    plot::sheet::draw(path, &title, &subtitle, &panels)
}

/// Splits `text` at ", " into lines of at most about `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for part in text.split(", ") {
        match lines.last_mut() {
            Some(line) if line.len() + part.len() + 2 <= width => {
                line.push_str(", ");
                line.push_str(part);
            }
            _ => lines.push(part.to_string()),
        }
    }
    lines
}
