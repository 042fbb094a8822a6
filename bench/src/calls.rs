//! The three kinds of call the bench makes, through `memgate::client`, and how
//! each attempt ended. A call that gets RESOURCE_EXHAUSTED is retried a bounded
//! number of times, after the server's `grpc-retry-pushback-ms` (a negative one
//! means "do not retry"), as a well-behaved client would; every attempt is kept.

use std::{
    fmt::Write as _,
    future::Future,
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use memgate::api::resource::Digest;
use tonic::{Code, Status, transport::Channel};

use crate::payload::Payload;

/// What a call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A ByteStream Write of a whole blob.
    Upload,
    /// Payload/Process without echo.
    Process,
    /// Payload/Process with echo: the payload comes back.
    ProcessEcho,
    /// A ByteStream Read of a whole blob.
    Download,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Upload => "upload",
            Kind::Process => "process",
            Kind::ProcessEcho => "process-echo",
            Kind::Download => "download",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// RESOURCE_EXHAUSTED, with the pushback the server sent.
    Exhausted {
        pushback_ms: Option<i64>,
    },
    /// Any other status, transport errors included.
    Failed {
        code: String,
        message: String,
    },
    /// No answer by the client's deadline.
    TimedOut,
    /// OK, with a wrong answer.
    Wrong {
        what: String,
    },
}

impl Outcome {
    /// The gRPC code's canonical name, or `CLIENT_TIMEOUT` / `WRONG_ANSWER`.
    pub fn code(&self) -> String {
        match self {
            Outcome::Ok => "OK".into(),
            Outcome::Exhausted { .. } => "RESOURCE_EXHAUSTED".into(),
            Outcome::Failed { code, .. } => code.clone(),
            Outcome::TimedOut => "CLIENT_TIMEOUT".into(),
            Outcome::Wrong { .. } => "WRONG_ANSWER".into(),
        }
    }

    /// OK or RESOURCE_EXHAUSTED: what a guarded server may answer under overload.
    pub fn acceptable(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Exhausted { .. })
    }
}

/// One attempt: when it started (seconds since the run's origin), how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub start: f64,
    pub seconds: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// How retries go.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: usize,
    /// Backoff base when a RESOURCE_EXHAUSTED carries no pushback (doubling, 4 times at most).
    pub default_backoff: Duration,
    /// A pushback beyond this is clamped, so a wrong one cannot stall the run.
    pub max_pushback: Duration,
    /// Each attempt's deadline, sent as `grpc-timeout` where the client allows,
    /// and enforced on the client's clock with `client_grace` on top.
    pub deadline: Duration,
    pub client_grace: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            default_backoff: Duration::from_millis(500),
            max_pushback: Duration::from_secs(30),
            deadline: Duration::from_secs(120),
            client_grace: Duration::from_secs(10),
        }
    }
}

/// Runs `attempt` until it is not RESOURCE_EXHAUSTED, the pushback says stop,
/// `max_attempts` ran, or `stop_retrying_at` passed; every attempt, in order.
pub async fn with_retries<F, Fut>(
    policy: &RetryPolicy,
    origin: Instant,
    stop_retrying_at: Option<Instant>,
    mut attempt: F,
) -> Vec<Attempt>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let mut attempts: Vec<Attempt> = Vec::new();
    loop {
        let started = Instant::now();
        let outcome = tokio::time::timeout(policy.deadline + policy.client_grace, attempt())
            .await
            .unwrap_or(Outcome::TimedOut);
        let wait = match outcome {
            Outcome::Exhausted {
                pushback_ms: Some(ms),
            } if ms < 0 => None,
            Outcome::Exhausted {
                pushback_ms: Some(ms),
            } => Some(Duration::from_millis(ms as u64)),
            Outcome::Exhausted { pushback_ms: None } => {
                Some(policy.default_backoff * 2u32.pow(attempts.len().min(4) as u32))
            }
            _ => None,
        };
        attempts.push(Attempt {
            start: started.duration_since(origin).as_secs_f64(),
            seconds: started.elapsed().as_secs_f64(),
            outcome,
        });
        let wait = wait.map(|w| w.min(policy.max_pushback));
        match wait {
            Some(wait)
                if attempts.len() < policy.max_attempts
                    && stop_retrying_at.is_none_or(|at| Instant::now() + wait < at) =>
            {
                tokio::time::sleep(wait).await;
            }
            _ => return attempts,
        }
    }
}

/// The outcome a failed call's status stands for.
pub fn outcome_of(status: &Status) -> Outcome {
    match status.code() {
        Code::ResourceExhausted => Outcome::Exhausted {
            pushback_ms: status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        },
        code => {
            // Transport failures hide the cause (a reset, a refused connection) in the chain.
            let mut message = status.message().to_string();
            let mut source = std::error::Error::source(status);
            while let Some(e) = source {
                let text = e.to_string();
                if !message.ends_with(&text) {
                    let _ = write!(message, ": {text}");
                }
                source = e.source();
            }
            Outcome::Failed {
                code: code_name(code),
                message,
            }
        }
    }
}

/// `ResourceExhausted` → `RESOURCE_EXHAUSTED`: the names the gRPC spec uses.
pub fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Uploads `payload` (ByteStream Write under a fresh upload name).
pub async fn upload(channel: Channel, payload: &Payload, deadline: Duration) -> Outcome {
    let chunks = tokio_stream::iter(payload.chunks());
    match memgate::client::write_blob(channel, &payload.digest, chunks, Some(deadline)).await {
        Ok(_) => Outcome::Ok,
        Err(status) if status.code() == Code::DataLoss => Outcome::Wrong {
            what: status.message().to_string(),
        },
        Err(status) => outcome_of(&status),
    }
}

/// Sends `data` (the bytes of `digest`) to Payload/Process and checks the answer.
pub async fn process(channel: Channel, data: Bytes, digest: &Digest, echo: bool) -> Outcome {
    let resp = match memgate::client::process(channel, data.clone(), echo).await {
        Ok(r) => r,
        Err(status) => return outcome_of(&status),
    };
    if resp.sha256 != digest.hex() || resp.size != digest.size {
        return Outcome::Wrong {
            what: format!("got {} / {} bytes", resp.sha256, resp.size),
        };
    }
    match (echo, resp.data.len()) {
        (true, _) if resp.data != data => Outcome::Wrong {
            what: format!("echo of {} bytes differs", resp.data.len()),
        },
        (false, n) if n != 0 => Outcome::Wrong {
            what: format!("{n} bytes echoed unasked"),
        },
        _ => Outcome::Ok,
    }
}

/// Downloads blob `digest` into a file in `scratch` (memgate's client verifies
/// the digest), then removes the file.
pub async fn download(channel: Channel, digest: &Digest, scratch: &Path) -> Outcome {
    let out = scratch.join(format!("{}.download", uuid_like()));
    let bar = indicatif::ProgressBar::hidden();
    let result = memgate::client::download(channel, &digest.read_name(), &out, &bar).await;
    let _ = std::fs::remove_file(&out);
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => match e.chain().find_map(|c| c.downcast_ref::<Status>()) {
            Some(status) => outcome_of(status),
            None if e.to_string().contains("downloaded data is") => Outcome::Wrong {
                what: e.to_string(),
            },
            None => Outcome::Failed {
                code: "CLIENT_ERROR".into(),
                message: format!("{e:#}"),
            },
        },
    }
}

/// A name no other download of this process uses.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_honour_pushback() {
        let policy = RetryPolicy::default();
        let origin = Instant::now();
        let started = tokio::time::Instant::now();
        let mut busy = 2;
        let attempts = with_retries(&policy, origin, None, || {
            let outcome = if busy > 0 {
                busy -= 1;
                Outcome::Exhausted {
                    pushback_ms: Some(1500),
                }
            } else {
                Outcome::Ok
            };
            async move { outcome }
        })
        .await;
        let codes: Vec<_> = attempts.iter().map(|a| a.outcome.code()).collect();
        assert_eq!(codes, ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "OK"]);
        assert!(started.elapsed() >= Duration::from_millis(3000));

        let stop = with_retries(&policy, origin, None, || async {
            Outcome::Exhausted {
                pushback_ms: Some(-1),
            }
        })
        .await;
        assert_eq!(stop.len(), 1, "a negative pushback means do not retry");
        let bounded = with_retries(&policy, origin, None, || async {
            Outcome::Exhausted { pushback_ms: None }
        })
        .await;
        assert_eq!(bounded.len(), policy.max_attempts);
        let failed = with_retries(&policy, origin, None, || async {
            Outcome::Failed {
                code: "UNAVAILABLE".into(),
                message: String::new(),
            }
        })
        .await;
        assert_eq!(failed.len(), 1, "only RESOURCE_EXHAUSTED is retried");
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_past_the_stop_time() {
        let policy = RetryPolicy::default();
        let stop_at = Instant::now() + Duration::from_secs(1);
        let attempts = with_retries(&policy, Instant::now(), Some(stop_at), || async {
            Outcome::Exhausted {
                pushback_ms: Some(5000),
            }
        })
        .await;
        assert_eq!(attempts.len(), 1);
    }

    #[test]
    fn pushback_comes_from_the_trailers() {
        let mut status = Status::resource_exhausted("busy");
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "250".parse().unwrap());
        assert_eq!(
            outcome_of(&status),
            Outcome::Exhausted {
                pushback_ms: Some(250)
            }
        );
        assert_eq!(
            outcome_of(&Status::resource_exhausted("busy")),
            Outcome::Exhausted { pushback_ms: None }
        );
        assert_eq!(
            outcome_of(&Status::unavailable("gone")).code(),
            "UNAVAILABLE"
        );
    }

    #[test]
    fn code_names_follow_the_spec() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }
}
