//! What counts as progress, and when it is too little: the limits, the
//! reasons for a cut, and the pure check the watchdog runs over each side of
//! a call. No clocks are read here; the caller passes `now`.

use std::time::{Duration, Instant};

use bytesize::ByteSize;
use tonic::Status;

use crate::guard::reclaim::ReclaimReason;

/// How much progress a stream must make. Both limits off: no watchdog at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Longest the server waits on the client for one frame (`None`: for ever).
    pub idle_timeout: Option<Duration>,
    /// Least bytes per second, measured over `window` of waiting (0: no minimum).
    pub min_throughput: u64,
    /// How much waiting `min_throughput` is measured over.
    pub window: Duration,
}

impl StreamLimits {
    /// No limits.
    pub const OFF: Self = Self {
        idle_timeout: None,
        min_throughput: 0,
        window: Duration::from_secs(30),
    };

    pub fn is_off(&self) -> bool {
        self.idle_timeout.is_none() && self.min_throughput == 0
    }
}

/// Which half of a call stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client stopped sending.
    Request,
    /// The client stopped reading.
    Response,
}

/// Why a call was cut.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// One wait lasted `limit`.
    Idle { side: Side, limit: Duration },
    /// `rate` bytes per second over `over` of waiting, below `min`.
    Slow {
        side: Side,
        rate: u64,
        over: Duration,
        min: u64,
    },
    /// The reclaimer took the call's memory back for others (see
    /// [`crate::guard::reclaim`]): retryable after `pushback`.
    Reclaimed {
        reason: ReclaimReason,
        bytes: u64,
        pushback: Duration,
    },
}

impl Cut {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Cut::Idle {
                side: Side::Request,
                ..
            } => "request_idle",
            Cut::Idle {
                side: Side::Response,
                ..
            } => "response_idle",
            Cut::Slow {
                side: Side::Request,
                ..
            } => "request_slow",
            Cut::Slow {
                side: Side::Response,
                ..
            } => "response_slow",
            Cut::Reclaimed { .. } => "reclaimed",
        }
    }

    /// A stalled call is `DEADLINE_EXCEEDED`, naming the limit, its key and
    /// the numbers; a reclaimed one is `RESOURCE_EXHAUSTED` with a pushback
    /// (gRFC A6), which retrying clients honour: the server's memory failed,
    /// not the call.
    pub fn status(&self) -> Status {
        match self {
            Cut::Reclaimed { pushback, .. } => {
                let mut status = Status::resource_exhausted(self.to_string());
                if let Ok(v) = pushback.as_millis().to_string().parse() {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                status
            }
            _ => Status::deadline_exceeded(self.to_string()),
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per_sec = |n: u64| format!("{}/s", ByteSize::b(n).display().iec());
        match *self {
            Cut::Idle {
                side: Side::Request,
                limit,
            } => write!(
                f,
                "no request data for {} (server.stream_idle_timeout)",
                secs(limit)
            ),
            Cut::Idle {
                side: Side::Response,
                limit,
            } => write!(
                f,
                "the client read no response data for {} (server.stream_idle_timeout)",
                secs(limit)
            ),
            Cut::Slow {
                side,
                rate,
                over,
                min,
            } => write!(
                f,
                "{} {} over {} of waiting, below {} (server.min_throughput)",
                match side {
                    Side::Request => "request data arrived at",
                    Side::Response => "the client read response data at",
                },
                per_sec(rate),
                secs(over),
                per_sec(min)
            ),
            Cut::Reclaimed { reason, bytes, .. } => write!(
                f,
                "memory reclaimed: this call held {} and {}; retry after the pushback \
                 (an upload resumes at QueryWriteStatus's committed_size)",
                ByteSize::b(bytes).display().iec(),
                match reason {
                    ReclaimReason::Share =>
                        "its client held more than its share \
                        (memory.max_client_share) while other clients waited for memory",
                    ReclaimReason::Idle =>
                        "it moved no data for memory.reclaim_grace \
                        while other calls waited for memory",
                    ReclaimReason::Overcommit =>
                        "the memory limit fell below what \
                        admitted calls had reserved",
                }
            ),
        }
    }
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// One side's progress.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Started and not ended.
    pub(super) active: bool,
    /// When the current wait on the client began.
    pub(super) waiting_since: Option<Instant>,
    /// Total of the finished waits.
    pub(super) waited: Duration,
    pub(super) bytes: u64,
}

impl Progress {
    pub(super) fn wait(&mut self, now: Instant) {
        self.waiting_since.get_or_insert(now);
    }

    pub(super) fn stop_waiting(&mut self, now: Instant) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(since);
        }
    }

    pub(super) fn moved(&mut self, now: Instant, bytes: u64) {
        self.stop_waiting(now);
        self.bytes += bytes;
    }

    pub(super) fn end(&mut self, now: Instant) {
        self.stop_waiting(now);
        self.active = false;
    }
}

/// Where the throughput window started: waited time and bytes at that point.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Window {
    waited: Duration,
    bytes: u64,
}

/// Checks one side at `now`: a cut, or how long (in wall time) until a limit
/// could next be reached, `None` if never while the side stays as it is.
/// Waiting accrues no faster than wall time, so sleeping that long is safe.
pub(super) fn check(
    p: &Progress,
    window: &mut Window,
    limits: &StreamLimits,
    side: Side,
    now: Instant,
) -> Result<Option<Duration>, Cut> {
    if !p.active {
        return Ok(None);
    }
    let current = p
        .waiting_since
        .map(|since| now.saturating_duration_since(since));
    let mut next = None;
    if let Some(limit) = limits.idle_timeout {
        let current = current.unwrap_or_default();
        if current >= limit {
            return Err(Cut::Idle { side, limit });
        }
        next = Some(limit - current);
    }
    if limits.min_throughput > 0 {
        let waited = p.waited + current.unwrap_or_default();
        let over = waited.saturating_sub(window.waited);
        if over >= limits.window {
            let moved = p.bytes - window.bytes;
            let rate = (moved as f64 / over.as_secs_f64()) as u64;
            if rate < limits.min_throughput {
                return Err(Cut::Slow {
                    side,
                    rate,
                    over,
                    min: limits.min_throughput,
                });
            }
            *window = Window {
                waited,
                bytes: p.bytes,
            };
        }
        let left = limits
            .window
            .saturating_sub(waited.saturating_sub(window.waited));
        next = Some(next.map_or(left, |n: Duration| n.min(left)));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn limits(idle: u64, min: u64, window: u64) -> StreamLimits {
        StreamLimits {
            idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
            min_throughput: min,
            window: Duration::from_secs(window),
        }
    }

    fn active() -> Progress {
        Progress {
            active: true,
            ..Progress::default()
        }
    }

    #[test]
    fn idle_is_one_wait_that_lasts_the_timeout() {
        let l = limits(30, 0, 30);
        let t0 = Instant::now();
        let mut p = active();
        let mut w = Window::default();
        // Not waiting: nothing can happen for a whole timeout.
        assert_eq!(check(&p, &mut w, &l, Side::Request, t0), Ok(Some(30 * SEC)));
        p.wait(t0);
        assert_eq!(
            check(&p, &mut w, &l, Side::Request, t0 + 10 * SEC),
            Ok(Some(20 * SEC))
        );
        // Data ends the wait; the next one starts from zero.
        p.moved(t0 + 29 * SEC, 100);
        p.wait(t0 + 29 * SEC);
        assert!(check(&p, &mut w, &l, Side::Request, t0 + 58 * SEC).is_ok());
        let cut = check(&p, &mut w, &l, Side::Request, t0 + 59 * SEC).unwrap_err();
        assert_eq!(
            cut,
            Cut::Idle {
                side: Side::Request,
                limit: 30 * SEC
            }
        );
        assert_eq!(
            cut.to_string(),
            "no request data for 30s (server.stream_idle_timeout)"
        );
        assert_eq!(cut.reason(), "request_idle");
    }

    #[test]
    fn throughput_counts_only_time_spent_waiting() {
        // 1 KiB/s over 10 s of waiting.
        let l = limits(0, 1024, 10);
        let t0 = Instant::now();
        let mut p = active();
        let mut w = Window::default();
        // The server is busy for a minute (never waiting): no cut, whatever the bytes.
        assert_eq!(
            check(&p, &mut w, &l, Side::Request, t0 + 60 * SEC),
            Ok(Some(10 * SEC))
        );
        // 12 KiB over 10 s of waiting: fast enough, and a new window begins.
        for i in 0..10 {
            p.wait(t0 + i * SEC);
            p.moved(t0 + (i + 1) * SEC, 1200);
        }
        assert_eq!(
            check(&p, &mut w, &l, Side::Request, t0 + 10 * SEC),
            Ok(Some(10 * SEC))
        );
        // Then 100 bytes a second.
        for i in 10..20 {
            p.wait(t0 + i * SEC);
            p.moved(t0 + (i + 1) * SEC, 100);
        }
        let cut = check(&p, &mut w, &l, Side::Response, t0 + 20 * SEC).unwrap_err();
        assert_eq!(
            cut,
            Cut::Slow {
                side: Side::Response,
                rate: 100,
                over: 10 * SEC,
                min: 1024
            }
        );
        assert_eq!(
            cut.to_string(),
            "the client read response data at 100 B/s over 10s of waiting, below 1.0 KiB/s (server.min_throughput)"
        );
    }

    #[test]
    fn an_ended_side_is_never_cut() {
        let l = limits(1, 1 << 20, 1);
        let t0 = Instant::now();
        let mut p = active();
        let mut w = Window::default();
        p.wait(t0);
        p.end(t0 + SEC / 2);
        assert_eq!(
            check(&p, &mut w, &l, Side::Request, t0 + 100 * SEC),
            Ok(None)
        );
    }

    #[test]
    fn off_limits_never_wake() {
        let t0 = Instant::now();
        let mut p = active();
        p.wait(t0);
        let mut w = Window::default();
        assert_eq!(
            check(
                &p,
                &mut w,
                &StreamLimits::OFF,
                Side::Request,
                t0 + 1000 * SEC
            ),
            Ok(None)
        );
        assert!(StreamLimits::OFF.is_off());
    }
}
