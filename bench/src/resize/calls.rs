//! The resize scenario's calls, which must all get done whatever the server does
//! to them: an upload keeps one upload name for all its attempts, asks
//! QueryWriteStatus where the server's copy ends before each retry and resumes
//! the Write from there (as Bazel and other ByteStream clients do); a Process call
//! is sent again. Every retryable ending is retried (not only RESOURCE_EXHAUSTED:
//! a call cut under it may end UNAVAILABLE, ABORTED or CANCELLED), after the
//! server's pushback or a doubling backoff, a bounded number of times.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};

use memgate::proto::bytestream::{
    QueryWriteStatusRequest, WriteRequest, byte_stream_client::ByteStreamClient,
};

use crate::{
    calls::{self, Kind, Outcome, RetryPolicy},
    payload::Payload,
};

/// One attempt of a call.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Try {
    /// Seconds since the run's origin.
    pub start: f64,
    pub end: f64,
    /// The offset the Write resumed from (0 for a first attempt and for Process).
    pub from: u64,
    /// What the server had committed when the next attempt asked (uploads; the
    /// blob's size after the last, OK one).
    pub committed_after: Option<u64>,
    /// `write`, or `query` when QueryWriteStatus itself failed or found the
    /// upload complete.
    pub stage: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Try {
    /// An attempt that failed after the server had taken some of its bytes.
    pub fn cut(&self) -> bool {
        self.outcome != Outcome::Ok && self.committed_after.is_some_and(|c| c > self.from)
    }
}

/// A call and all its attempts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Call {
    pub n: usize,
    pub kind: Kind,
    #[serde(skip)]
    pub digest: memgate::api::resource::Digest,
    pub bytes: u64,
    pub attempts: Vec<Try>,
}

impl Call {
    pub fn succeeded(&self) -> bool {
        matches!(self.attempts.last(), Some(t) if t.outcome == Outcome::Ok)
    }

    /// Attempts that resumed a Write from a committed offset.
    pub fn resumes(&self) -> usize {
        self.attempts.iter().filter(|t| t.from > 0).count()
    }

    pub fn name(&self) -> String {
        format!("{}#{:02}", self.kind.as_str(), self.n)
    }
}

/// Whether `outcome` is worth another attempt, and after how long: the server's
/// pushback (negative: never), else `default_backoff` doubling up to 16 ×.
fn retry_after(policy: &RetryPolicy, outcome: &Outcome, tries: usize) -> Option<Duration> {
    let backoff = policy.default_backoff * 2u32.pow(tries.min(4) as u32);
    let wait = match outcome {
        Outcome::Exhausted {
            pushback_ms: Some(ms),
        } if *ms < 0 => return None,
        Outcome::Exhausted {
            pushback_ms: Some(ms),
        } => Duration::from_millis(*ms as u64),
        Outcome::Exhausted { pushback_ms: None } | Outcome::TimedOut => backoff,
        Outcome::Failed { code, .. }
            if [
                "UNAVAILABLE",
                "ABORTED",
                "CANCELLED",
                "DEADLINE_EXCEEDED",
                "UNKNOWN",
            ]
            .contains(&code.as_str()) =>
        {
            backoff
        }
        _ => return None,
    };
    Some(wait.min(policy.max_pushback))
}

/// Runs a call's attempts until one is OK, one is not retryable, `max_attempts`
/// ran, or `gone()` says the server is no longer there to answer.
async fn until_done<F, Fut>(
    policy: &RetryPolicy,
    origin: Instant,
    gone: &(dyn Fn() -> bool + Sync),
    mut attempt: F,
) -> Vec<Try>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Try>,
{
    let mut tries: Vec<Try> = Vec::new();
    loop {
        let start = origin.elapsed().as_secs_f64();
        let t = tokio::time::timeout(policy.deadline + policy.client_grace, attempt())
            .await
            .unwrap_or_else(|_| Try {
                start,
                end: origin.elapsed().as_secs_f64(),
                // Unknown: QueryWriteStatus of the next attempt tells.
                from: 0,
                committed_after: None,
                stage: "write",
                outcome: Outcome::TimedOut,
            });
        let wait = retry_after(policy, &t.outcome, tries.len());
        tries.push(t);
        match wait {
            Some(wait) if tries.len() < policy.max_attempts && !gone() => {
                tokio::time::sleep(wait).await;
            }
            _ => return tries,
        }
    }
}

/// Uploads `payload` under one upload name, resuming from the committed offset
/// after every retryable failure.
pub async fn upload(
    channel: Channel,
    payload: &Payload,
    policy: &RetryPolicy,
    origin: Instant,
    gone: &(dyn Fn() -> bool + Sync),
) -> Vec<Try> {
    let digest = payload.digest;
    let name = format!(
        "uploads/{}/blobs/{digest}",
        memgate::client::stable_upload_id(&digest)
    );
    let mut tries = until_done(policy, origin, gone, || {
        let (channel, name) = (channel.clone(), name.clone());
        async move {
            let start = origin.elapsed().as_secs_f64();
            let at = |stage, from, outcome| Try {
                start,
                end: origin.elapsed().as_secs_f64(),
                from,
                committed_after: None,
                stage,
                outcome,
            };
            // Where the server's copy ends: NOT_FOUND before the first byte.
            let mut client = ByteStreamClient::new(channel);
            let from = match client
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: name.clone(),
                })
                .await
            {
                Ok(r) if r.get_ref().complete => return at("query", digest.size, Outcome::Ok),
                Ok(r) => r.get_ref().committed_size.max(0) as u64,
                Err(s) if s.code() == Code::NotFound => 0,
                Err(s) => return at("query", 0, calls::outcome_of(&s)),
            };
            let outcome = write_from(client, payload, &name, from, policy.deadline).await;
            at("write", from, outcome)
        }
    })
    .await;
    // Each attempt's committed_after is what the next one found.
    for i in 0..tries.len() {
        let next = tries.get(i + 1).map(|t| t.from);
        let t = &mut tries[i];
        t.committed_after = match &t.outcome {
            Outcome::Ok => Some(digest.size),
            _ => next,
        };
    }
    tries
}

/// One Write of `payload` from `from` on; OK only when the server committed all of it.
async fn write_from(
    mut client: ByteStreamClient<Channel>,
    payload: &Payload,
    name: &str,
    from: u64,
    deadline: Duration,
) -> Outcome {
    let size = payload.size();
    let mut pos = 0u64;
    let mut rest: Vec<Bytes> = Vec::new();
    for chunk in payload.chunks() {
        let end = pos + chunk.len() as u64;
        if end > from {
            let skip = from.saturating_sub(pos) as usize;
            rest.push(chunk.slice(skip..));
        }
        pos = end;
    }
    if rest.is_empty() {
        // Everything committed but not finished: an empty finishing message.
        rest.push(Bytes::new());
    }
    let mut name = name.to_string();
    let mut offset = from;
    let requests = tokio_stream::iter(rest).map(move |data| {
        let req = WriteRequest {
            resource_name: std::mem::take(&mut name),
            write_offset: offset as i64,
            finish_write: offset + data.len() as u64 == size,
            data,
        };
        offset += req.data.len() as u64;
        req
    });
    let mut request = tonic::Request::new(requests);
    request.set_timeout(deadline);
    match client.write(request).await {
        Ok(r) if r.get_ref().committed_size as u64 == size => Outcome::Ok,
        Ok(r) => Outcome::Wrong {
            what: format!("committed {} of {size} bytes", r.get_ref().committed_size),
        },
        Err(status) => calls::outcome_of(&status),
    }
}

/// Sends `payload` to Process (with echo if asked) until an answer comes back,
/// which is checked against its digest.
pub async fn process(
    channel: Channel,
    payload: &Payload,
    data: Bytes,
    echo: bool,
    policy: &RetryPolicy,
    origin: Instant,
    gone: &(dyn Fn() -> bool + Sync),
) -> Vec<Try> {
    until_done(policy, origin, gone, || {
        let (channel, data) = (channel.clone(), data.clone());
        async move {
            let start = origin.elapsed().as_secs_f64();
            let outcome = calls::process(channel, data, &payload.digest, echo).await;
            Try {
                start,
                end: origin.elapsed().as_secs_f64(),
                from: 0,
                committed_after: None,
                stage: "write",
                outcome,
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_retried() {
        let p = RetryPolicy::default();
        let failed = |code: &str| Outcome::Failed {
            code: code.into(),
            message: String::new(),
        };
        let pushback = |ms| Outcome::Exhausted {
            pushback_ms: Some(ms),
        };
        assert_eq!(
            retry_after(&p, &pushback(250), 0),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_after(&p, &pushback(-1), 0), None);
        assert_eq!(
            retry_after(&p, &failed("UNAVAILABLE"), 1),
            Some(p.default_backoff * 2)
        );
        assert_eq!(
            retry_after(&p, &failed("ABORTED"), 9),
            Some(p.default_backoff * 16)
        );
        assert_eq!(retry_after(&p, &failed("INVALID_ARGUMENT"), 0), None);
        assert_eq!(retry_after(&p, &Outcome::Ok, 0), None);
        let wrong = Outcome::Wrong { what: "x".into() };
        assert_eq!(retry_after(&p, &wrong, 0), None);
    }

    #[test]
    fn a_cut_is_a_failure_after_progress() {
        let t = |outcome, from, after| Try {
            start: 0.0,
            end: 1.0,
            from,
            committed_after: after,
            stage: "write",
            outcome,
        };
        let gone = Outcome::Failed {
            code: "UNAVAILABLE".into(),
            message: String::new(),
        };
        assert!(t(gone.clone(), 0, Some(5)).cut());
        assert!(!t(gone.clone(), 5, Some(5)).cut(), "nothing taken: refused");
        assert!(!t(gone, 0, None).cut(), "never asked again");
        assert!(!t(Outcome::Ok, 0, Some(9)).cut());
    }
}
