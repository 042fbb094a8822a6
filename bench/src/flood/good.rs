//! The well-behaved client of a flood: one resumable ByteStream upload through
//! tonic from the usual loopback address, retried on RESOURCE_EXHAUSTED,
//! UNAVAILABLE and ABORTED after the server's `grpc-retry-pushback-ms` (a
//! negative one means "do not retry"), resuming where QueryWriteStatus says the
//! server's copy ends; then read back and checked against its digest.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use memgate::proto::bytestream::{
    QueryWriteStatusRequest, WriteRequest, byte_stream_client::ByteStreamClient,
};
use tonic::{Code, Status, transport::Channel};

use crate::{
    calls::{self, Outcome, RetryPolicy},
    payload::{CHUNK, Payload},
};

/// The shortest wait between tries, whatever the pushback says.
const MIN_WAIT: Duration = Duration::from_millis(10);
/// A bound on tries besides `give_up`.
const MAX_TRIES: usize = 1000;
/// Attempts at reading the blob back (RESOURCE_EXHAUSTED is retried).
const READ_BACK_ATTEMPTS: usize = 10;

/// One try: a QueryWriteStatus (on every try after the first), then a Write
/// from the offset it gave. Times are seconds since the run's origin.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Try {
    pub start: f64,
    pub seconds: f64,
    /// The call that ended the try: `write`, or `query_write_status` when that
    /// was refused and no Write went out.
    pub call: &'static str,
    /// Where the Write started (the server's committed size).
    pub offset: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The pushback the answer carried, whatever its code.
    pub pushback_ms: Option<i64>,
}

/// The good client's whole story.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GoodReport {
    pub tries: Vec<Try>,
    pub first_try: Option<f64>,
    /// When the upload was OK.
    pub ok_at: Option<f64>,
    /// From the start of the first try to the end of the one that was OK.
    pub time_to_ok: Option<f64>,
    /// The read-back's outcome (digest checked): `OK` or what went wrong.
    pub verified: Option<String>,
}

impl GoodReport {
    pub fn ok(&self) -> bool {
        self.ok_at.is_some()
    }
}

/// Codes a well-behaved client retries (as Bazel's retrier does).
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::ResourceExhausted | Code::Unavailable | Code::Aborted
    )
}

fn pushback(status: &Status) -> Option<i64> {
    status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Uploads `payload` under a stable upload name until OK, a non-retryable
/// answer, a negative pushback, or `give_up` after the first try; then reads
/// it back.
pub async fn upload(
    channel: Channel,
    payload: &Payload,
    policy: &RetryPolicy,
    give_up: Duration,
    origin: Instant,
    scratch: &Path,
) -> GoodReport {
    let digest = &payload.digest;
    let name = format!(
        "uploads/{}/blobs/{digest}",
        memgate::client::stable_upload_id(digest)
    );
    let mut report = GoodReport::default();
    let first = Instant::now();
    let stop_at = first + give_up;
    loop {
        let started = Instant::now();
        let at = |t: Instant| t.duration_since(origin).as_secs_f64();
        let attempt = tokio::time::timeout(
            policy.deadline + policy.client_grace,
            one_try(
                &channel,
                &name,
                payload,
                policy.deadline,
                !report.tries.is_empty(),
            ),
        )
        .await;
        let (call, offset, result) = match attempt {
            Ok(r) => r,
            Err(_) => ("write", 0, Err(Status::deadline_exceeded("client timeout"))),
        };
        let (outcome, pushback_ms, code) = match &result {
            Ok(()) => (Outcome::Ok, None, Code::Ok),
            Err(s) if s.code() == Code::DataLoss => (
                Outcome::Wrong {
                    what: s.message().to_string(),
                },
                None,
                s.code(),
            ),
            Err(s) => (calls::outcome_of(s), pushback(s), s.code()),
        };
        report.tries.push(Try {
            start: at(started),
            seconds: started.elapsed().as_secs_f64(),
            call,
            offset,
            outcome,
            pushback_ms,
        });
        if code == Code::Ok {
            report.ok_at = Some(at(Instant::now()));
            report.time_to_ok = Some(first.elapsed().as_secs_f64());
            break;
        }
        let wait = match pushback_ms {
            _ if !retryable(code) => None,
            Some(ms) if ms < 0 => None,
            Some(ms) => Some(Duration::from_millis(ms as u64)),
            None => Some(policy.default_backoff * 2u32.pow(report.tries.len().min(4) as u32)),
        };
        // Bounded by time (`give_up`), and never a busy loop on a zero pushback.
        match wait.map(|w| w.clamp(MIN_WAIT, policy.max_pushback)) {
            Some(w) if Instant::now() + w < stop_at && report.tries.len() < MAX_TRIES => {
                tokio::time::sleep(w).await
            }
            _ => break,
        }
    }
    report.first_try = report.tries.first().map(|t| t.start);
    if report.ok() {
        let policy = RetryPolicy {
            max_attempts: READ_BACK_ATTEMPTS,
            ..*policy
        };
        let attempts = calls::with_retries(&policy, origin, None, || {
            calls::download(channel.clone(), digest, scratch)
        })
        .await;
        report.verified = attempts.last().map(|a| a.outcome.code());
    }
    report
}

/// A try: where to resume (asked from the second try on), then the Write.
async fn one_try(
    channel: &Channel,
    name: &str,
    payload: &Payload,
    deadline: Duration,
    resume: bool,
) -> (&'static str, u64, Result<(), Status>) {
    let mut client = ByteStreamClient::new(channel.clone());
    let offset = if resume {
        let mut req = tonic::Request::new(QueryWriteStatusRequest {
            resource_name: name.to_string(),
        });
        req.set_timeout(deadline);
        match client.query_write_status(req).await {
            Ok(r) if r.get_ref().complete => return ("query_write_status", payload.size(), Ok(())),
            Ok(r) => r.get_ref().committed_size.max(0) as u64,
            Err(s) if s.code() == Code::NotFound => 0,
            Err(s) => return ("query_write_status", 0, Err(s)),
        }
    } else {
        0
    };
    let size = payload.size();
    let requests = requests_from(name, payload, offset);
    let mut req = tonic::Request::new(tokio_stream::iter(requests));
    req.set_timeout(deadline);
    let result = match client.write(req).await {
        Ok(r) if r.get_ref().committed_size as u64 == size => Ok(()),
        Ok(r) => Err(Status::data_loss(format!(
            "server committed {} of {size} bytes",
            r.get_ref().committed_size
        ))),
        Err(s) => Err(s),
    };
    ("write", offset, result)
}

/// The WriteRequests of `payload` from `offset` on: the name in the first,
/// `finish_write` on the last.
fn requests_from(name: &str, payload: &Payload, offset: u64) -> Vec<WriteRequest> {
    let size = payload.size();
    let skip = (offset / CHUNK as u64) as usize;
    let within = (offset % CHUNK as u64) as usize;
    let mut pos = offset;
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks().skip(skip).enumerate() {
        let data = if i == 0 { chunk.slice(within..) } else { chunk };
        let len = data.len() as u64;
        out.push(WriteRequest {
            resource_name: if i == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: pos as i64,
            finish_write: pos + len == size,
            data,
        });
        pos += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{self, Pool};

    #[test]
    fn resumes_from_any_offset() {
        let pool = Pool::random().unwrap();
        let p = &payload::make(&pool, 0, 1, 3 * CHUNK as u64 + 10)[0];
        let whole: Vec<u8> = p.contiguous().to_vec();
        for offset in [0, 1, CHUNK as u64, 2 * CHUNK as u64 + 5, p.size() - 1] {
            let reqs = requests_from("n", p, offset);
            assert_eq!(reqs[0].resource_name, "n");
            assert_eq!(reqs[0].write_offset as u64, offset);
            assert!(reqs.iter().skip(1).all(|r| r.resource_name.is_empty()));
            assert!(reqs.last().unwrap().finish_write);
            assert_eq!(reqs.iter().filter(|r| r.finish_write).count(), 1);
            let sent: Vec<u8> = reqs.iter().flat_map(|r| r.data.to_vec()).collect();
            assert_eq!(sent, whole[offset as usize..]);
        }
    }

    #[test]
    fn retries_what_a_careful_client_retries() {
        assert!(retryable(Code::ResourceExhausted));
        assert!(retryable(Code::Unavailable));
        assert!(retryable(Code::Aborted));
        assert!(!retryable(Code::InvalidArgument));
        assert!(!retryable(Code::DeadlineExceeded));
    }
}
