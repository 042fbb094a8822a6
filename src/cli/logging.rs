//! Log output: text for a terminal, JSON for a log pipeline; `RUST_LOG` wins over
//! `log.level`.

use tracing_subscriber::fmt;

use crate::config::{LogConfig, LogFormat, log_filter};

pub fn init(cfg: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => {
            log_filter(&v).map_err(|e| anyhow::anyhow!("invalid RUST_LOG: {e}"))?
        }
        _ => log_filter(&cfg.level).map_err(|e| anyhow::anyhow!("invalid log.level: {e}"))?,
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}
