//! The soak: a steady mix of uploads, downloads and Process calls offering 1.5 x
//! what the guard's budget allows, in bursts, for a long time, to show what
//! overload does to memory over time:
//! - no OOM kill;
//! - after each burst, once idle, the guard's reserved bytes are back to 0;
//! - and the server's RSS is back within 16 MiB of its idle baseline;
//! - the post-burst idle RSS readings have no growth trend (least squares).
//!
//! Each burst runs worker loops for `burst`. An upload worker removes the blob it
//! stored as soon as the upload succeeded (memgate has no delete call; this keeps
//! the disk from filling and lets the same payloads be uploaded again). After
//! the burst the soak waits for reserved bytes to reach 0, waits `idle` more,
//! and takes the median RSS of the last second as that burst's idle reading. The baseline is the median RSS
//! of the idle server's first second, before any call.

mod analysis;
mod load;

use std::{path::PathBuf, time::Duration};

use crate::{calls::RetryPolicy, scenario::Conn};

pub use analysis::{Burst, Check, IdleReading, SoakReport, Workers};
pub use load::run;

/// What a soak does; [`Default`] is the 30-minute run docs/measurements.md quotes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakOptions {
    /// How long bursts keep starting (setup and the last burst come on top).
    #[serde(with = "as_secs")]
    pub duration: Duration,
    #[serde(with = "as_secs")]
    pub burst: Duration,
    /// Idle time after reserved bytes reach 0, before the reading.
    #[serde(with = "as_secs")]
    pub idle: Duration,
    /// Offered reservations over the budget.
    pub load_factor: f64,
    /// Bytes per payload.
    pub size: u64,
    /// Process workers; every other one asks for an echo.
    pub process_workers: usize,
    pub download_workers: usize,
    /// `None`: as many as it takes to reach `load_factor`.
    pub upload_workers: Option<usize>,
    /// Distinct upload payloads, used in turn (more than there are upload
    /// workers, so that no two uploads of one payload overlap).
    pub upload_payloads: usize,
    /// How far above the baseline an idle reading may be.
    pub tolerance: u64,
    /// How much the fitted trend may climb over the run.
    pub trend_tolerance: u64,
    /// Bound on waiting for reserved bytes to reach 0 after a burst.
    #[serde(with = "as_secs")]
    pub max_idle_wait: Duration,
    pub conn: Conn,
    #[serde(skip)]
    pub retry: RetryPolicy,
    /// Downloads land here (then are removed): tmpfs where there is one.
    pub scratch: PathBuf,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            duration: Duration::from_secs(30 * 60),
            burst: Duration::from_secs(15),
            idle: Duration::from_secs(5),
            load_factor: 1.5,
            size: 150_000_000,
            process_workers: 2,
            download_workers: 2,
            upload_workers: None,
            upload_payloads: 16,
            tolerance: 16 * crate::MIB,
            trend_tolerance: 8 * crate::MIB,
            max_idle_wait: Duration::from_secs(60),
            conn: Conn::Shared,
            retry: RetryPolicy::default(),
            scratch: crate::openssl::scratch_dir(),
        }
    }
}

/// Durations as seconds in the JSON report.
mod as_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
