//! The `memgate` command line: `serve`, the client commands, `limits` and
//! `profile`.

mod lifecycle;
mod limits;
mod logging;
mod profile;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "memgate",
    version,
    about = "A gRPC server for large payloads that is never OOM-killed"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Upload a file with ByteStream/Write; prints the blob's read name.
    Upload {
        file: PathBuf,
        /// Continue an interrupted upload of the same file.
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
    },
    /// Download `blobs/{sha256}/{size}` with ByteStream/Read and verify its digest.
    Download {
        name: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
    },
    /// Show what the memory guard sees: cgroup, limit, working set, budget, allocator.
    Limits {
        #[command(flatten)]
        serve: ServeArgs,
        /// Print JSON, for machines.
        #[arg(long)]
        json: bool,
    },
    /// Ask a server's gRPC health service; exits 0 when SERVING (for `helm test`,
    /// container health checks and scripts).
    Health {
        /// `readiness` for readiness, "" for liveness.
        #[arg(long, default_value = "readiness")]
        service: String,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
        /// Give up after this long.
        #[arg(long, default_value = "5s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Fetch a heap profile from a running server's admin listener ([profiling]
    /// enabled): gzipped pprof for `go tool pprof`, or a flamegraph SVG when the
    /// output ends in `.svg`.
    Profile {
        /// The server's admin listener (`admin.addr`): `host:port` or a URL.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_addr: String,
        /// Where to write the profile (`heap.pb.gz`, `heap.svg`).
        #[arg(short, long)]
        output: PathBuf,
        /// What to fetch; by default SVG for a `.svg` output, else pprof.
        #[arg(long, value_enum)]
        format: Option<profile::ProfileFormat>,
        /// With [auth] on: a file whose first line is a bearer token with the
        /// `admin` permission. Without it the token comes from `MEMGATE_TOKEN`.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Give up after this long (the first profile of a process takes longest).
        #[arg(long, default_value = "60s", value_parser = humantime_serde::re::humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Send a file to Payload/Process in one message; prints its SHA-256 and size.
    Process {
        file: PathBuf,
        /// Ask for the payload back, and check it.
        #[arg(long)]
        echo: bool,
        #[arg(long, default_value = DEFAULT_ADDR)]
        addr: String,
    },
}

const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ServeArgs {
    /// TOML configuration file; `MEMGATE__SECTION__KEY` variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides `server.grpc_addr`).
    #[arg(long)]
    grpc_addr: Option<SocketAddr>,
    /// Admin HTTP listen address: /livez, /readyz, /metrics (overrides `admin.addr`).
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Data directory (overrides `storage.data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// Loads the configuration `serve` would run with.
pub(crate) fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(a) = args.grpc_addr {
        cfg.server.grpc_addr = a;
    }
    if let Some(a) = args.admin_addr {
        cfg.admin.addr = a;
    }
    if let Some(d) = &args.data_dir {
        cfg.storage.data_dir = d.clone();
    }
    if let Some(f) = args.log_format {
        cfg.log.format = f;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Runs the command line; errors are printed as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("memgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memgate: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let cfg = load_config(&args)?;
            logging::init(&cfg.log)?;
            let grpc = tokio::net::TcpListener::bind(cfg.server.grpc_addr)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (server.grpc_addr)",
                        cfg.server.grpc_addr
                    )
                })?;
            let admin = tokio::net::TcpListener::bind(cfg.admin.addr)
                .await
                .with_context(|| format!("cannot listen on {} (admin.addr)", cfg.admin.addr))?;
            let server = crate::server::Server::new(cfg.clone()).await?;
            lifecycle::spawn_reload(args, cfg.clone(), server.guard().clone());
            let drain =
                lifecycle::drain_on_signal(server.health().clone(), cfg.shutdown.drain_delay);
            server.serve(grpc, Some(admin), drain).await?;
            tracing::info!("shutdown complete");
            Ok(())
        }
        Command::Limits { serve, json } => {
            let cfg = load_config(&serve)?;
            let report = tokio::task::spawn_blocking(move || limits::report(&cfg)).await?;
            let text = if json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                limits::render(&report)
            };
            print_out(&text)
        }
        Command::Upload { file, resume, addr } => {
            let channel = crate::client::connect(&addr).await?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("cannot open {}", file.display()))?
                .len();
            let bar = crate::client::progress(len, "hashing");
            let name = crate::client::upload(channel, &file, resume, &bar).await?;
            println!("{name}");
            Ok(())
        }
        Command::Download { name, output, addr } => {
            let channel = crate::client::connect(&addr).await?;
            let size = crate::api::resource::parse_read_name(&name)?.digest.size;
            let bar = crate::client::progress(size, "download");
            let d = crate::client::download(channel, &name, &output, &bar).await?;
            println!("{} {}", d.hex(), d.size);
            Ok(())
        }
        Command::Health {
            service,
            addr,
            timeout,
        } => {
            let status = tokio::time::timeout(timeout, crate::client::health(&addr, &service))
                .await
                .with_context(|| format!("no answer from {addr} within {timeout:?}"))??;
            println!("{status}");
            if status != "SERVING" {
                anyhow::bail!("service {service:?} is {status}");
            }
            Ok(())
        }
        Command::Profile {
            admin_addr,
            output,
            format,
            token_file,
            timeout,
        } => {
            let format = format.unwrap_or_else(|| profile::ProfileFormat::for_output(&output));
            let token = profile::token(token_file.as_deref())?;
            let size =
                profile::fetch(&admin_addr, format, token.as_deref(), timeout, &output).await?;
            println!(
                "{}: {} heap profile, {}",
                output.display(),
                match format {
                    profile::ProfileFormat::Pprof => "pprof",
                    profile::ProfileFormat::Svg => "flamegraph SVG",
                },
                bytesize::ByteSize::b(size).display().iec()
            );
            Ok(())
        }
        Command::Process { file, echo, addr } => {
            let data = tokio::fs::read(&file)
                .await
                .with_context(|| format!("cannot read {}", file.display()))?;
            let data = bytes::Bytes::from(data);
            let channel = crate::client::connect(&addr).await?;
            let resp = crate::client::process(channel, data.clone(), echo).await?;
            if echo && resp.data != data {
                anyhow::bail!("echoed data differs from what was sent");
            }
            println!("{} {}", resp.sha256, resp.size);
            Ok(())
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
