//! The admission layer against a real in-process server and real tonic clients.
//! The guard reads a fake cgroup v2 tree whose usage the test sets, so pressure
//! is exact and instant instead of depending on this machine's memory.

#[path = "support_fakecg/mod.rs"]
mod support_fakecg;

use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use memgate::{
    config::Config,
    guard::Guard,
    proto::{
        bytestream::{WriteRequest, byte_stream_client::ByteStreamClient},
        memgate_v1::{ProcessRequest, payload_client::PayloadClient},
    },
    server::{STREAM_WINDOW, serve_with_guard},
};
use sha2::{Digest, Sha256};
use support_fakecg::{FakeCgroup, MIB};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Code, transport::Channel};

struct Server {
    addr: std::net::SocketAddr,
    guard: Guard,
    cg: FakeCgroup,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _data: tempfile::TempDir,
}

impl Server {
    /// A server whose guard sees `limit` and `usage`, with a 4 MiB reserve, a
    /// 10 ms poll interval and a 300 ms queue timeout unless `tweak` says otherwise.
    async fn start(limit: u64, usage: u64, tweak: impl FnOnce(&mut Config)) -> Self {
        let cg = FakeCgroup::new(limit, usage);
        let data = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = data.path().to_path_buf();
        cfg.memory.reserve = ByteSize::mib(4);
        cfg.memory.poll_interval = Duration::from_millis(10);
        cfg.memory.queue_timeout = Duration::from_millis(300);
        tweak(&mut cfg);
        let guard = Guard::start(cfg.memory.clone(), cg.roots(), STREAM_WINDOW as u64).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let g = guard.clone();
        let task = tokio::spawn(async move {
            serve_with_guard(&cfg, g, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            guard,
            cg,
            stop: Some(stop),
            task: Some(task),
            _data: data,
        }
    }

    async fn channel(&self) -> Channel {
        memgate::client::connect(&format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// Sets the usage and waits until the guard has seen it.
    async fn set_usage(&self, usage: u64) {
        self.cg.set_usage(usage);
        let mut rx = self.guard.subscribe();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| s.working_set == usage),
        )
        .await
        .expect("sampler saw the new usage")
        .unwrap();
    }

    /// Waits (bounded) until `cond` holds for the budget view.
    async fn until(&self, what: &str, cond: impl Fn(&memgate::guard::budget::BudgetView) -> bool) {
        for _ in 0..1000 {
            if cond(&self.guard.view()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}: {:?}", self.guard.view());
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("server stopped")
            .unwrap()
            .unwrap();
    }
}

fn payload(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

async fn process(
    ch: Channel,
    data: Bytes,
    echo: bool,
) -> Result<memgate::proto::memgate_v1::ProcessResponse, tonic::Status> {
    let mut c = PayloadClient::new(ch)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let mut req = tonic::Request::new(ProcessRequest { data, echo });
    req.set_timeout(Duration::from_secs(30));
    c.process(req).await.map(tonic::Response::into_inner)
}

fn pushback(s: &tonic::Status) -> Option<i64> {
    s.metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_call_larger_than_the_budget_is_rejected_at_once() {
    // Budget: 64 MiB × 0.85 − 4 MiB ≈ 50 MiB.
    let s = Server::start(64 * MIB, 2 * MIB, |_| {}).await;
    let err = process(s.channel().await, payload(60 * MIB as usize, 1), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("can never fit"), "{}", err.message());
    assert_eq!(pushback(&err), Some(-1), "never retry what can never fit");
    assert_eq!(s.guard.view().reserved, 0);
    s.stop().await;
}

#[tokio::test]
async fn a_busy_server_rejects_with_numbers_and_pushback_then_admits_when_memory_frees() {
    let s = Server::start(64 * MIB, 48 * MIB, |_| {}).await;
    let data = payload(8 * MIB as usize, 2);
    let err = process(s.channel().await, data.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    for word in ["needs", "available", "budget", "limit", "MiB"] {
        assert!(
            err.message().contains(word),
            "{word} missing in {}",
            err.message()
        );
    }
    assert!(
        pushback(&err).is_some_and(|ms| ms > 0),
        "{:?}",
        err.metadata()
    );
    s.set_usage(4 * MIB).await;
    let ok = process(s.channel().await, data.clone(), false)
        .await
        .unwrap();
    assert_eq!(ok.sha256, hex::encode(Sha256::digest(&data)));
    s.stop().await;
}

#[tokio::test]
async fn a_queued_call_proceeds_as_soon_as_memory_frees() {
    let s = Server::start(64 * MIB, 44 * MIB, |c| {
        c.memory.queue_timeout = Duration::from_secs(20)
    })
    .await;
    let data = payload(8 * MIB as usize, 3);
    let call = tokio::spawn(process(s.channel().await, data.clone(), true));
    s.until("the call to queue", |v| v.waiting == 1).await;
    s.set_usage(4 * MIB).await;
    let ok = call.await.unwrap().unwrap();
    assert_eq!(ok.data, data);
    s.until("reservations to drain", |v| {
        v.reserved == 0 && v.waiting == 0
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn an_echo_reserves_one_copy() {
    let s = Server::start(64 * MIB, 2 * MIB, |_| {}).await;
    let data = payload(30 * MIB as usize, 4);
    // One copy fits the ~50 MiB budget, two do not: the echo sends the request's
    // own buffer back, so it needs no second one and is admitted.
    let call = tokio::spawn(process(s.channel().await, data.clone(), true));
    let mut peak = 0;
    while !call.is_finished() {
        peak = peak.max(s.guard.view().reserved);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ok = call.await.unwrap().unwrap();
    assert!(ok.data == data, "echoed data differs");
    assert!(
        peak > 0 && peak as f64 <= 1.1 * data.len() as f64,
        "an echo of {} bytes reserved {peak}",
        data.len()
    );
    s.until("reservations to drain", |v| v.reserved == 0).await;
    s.stop().await;
}

#[tokio::test]
async fn guard_off_admits_everything() {
    let s = Server::start(64 * MIB, 60 * MIB, |c| c.memory.enabled = false).await;
    let data = payload(30 * MIB as usize, 5);
    let ok = process(s.channel().await, data, true).await.unwrap();
    assert_eq!(ok.size, 30 * MIB);
    s.stop().await;
}

fn upload_requests(data: Bytes, uuid: &str) -> Vec<WriteRequest> {
    let name = format!(
        "uploads/{uuid}/blobs/{}/{}",
        hex::encode(Sha256::digest(&data)),
        data.len()
    );
    let chunk = MIB as usize;
    (0..data.len().div_ceil(chunk))
        .map(|i| {
            let end = ((i + 1) * chunk).min(data.len());
            WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: (i * chunk) as i64,
                finish_write: end == data.len(),
                data: data.slice(i * chunk..end),
            }
        })
        .collect()
}

/// Many large calls multiplexed on ONE HTTP/2 connection, more than the budget
/// admits at once: waiting streams must not starve admitted ones of flow-control
/// window. Every call ends OK or RESOURCE_EXHAUSTED well before its deadline.
#[tokio::test]
async fn calls_waiting_on_a_shared_connection_do_not_stall_admitted_ones() {
    // Budget ≈ 128 × 0.85 − 4 ≈ 105 MiB: two 40 MiB Process calls at a time.
    let s = Server::start(128 * MIB, 2 * MIB, |c| {
        c.memory.queue_timeout = Duration::from_secs(15)
    })
    .await;
    let ch = s.channel().await;
    let data = payload(40 * MIB as usize, 6);
    let mut calls = Vec::new();
    for i in 0..10 {
        calls.push(tokio::spawn(process(ch.clone(), data.clone(), i % 2 == 0)));
    }
    let mut uploads = Vec::new();
    for i in 0..4 {
        let reqs = upload_requests(payload(20 * MIB as usize, 100 + i), &format!("u{i}"));
        let mut c = ByteStreamClient::new(ch.clone());
        uploads.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(tokio_stream::iter(reqs));
            req.set_timeout(Duration::from_secs(30));
            c.write(req).await.map(|r| r.into_inner().committed_size)
        }));
    }
    let mut codes = Vec::new();
    for c in calls {
        codes.push(
            c.await
                .unwrap()
                .map(|r| assert_eq!(r.size, 40 * MIB))
                .map_err(|e| e.code()),
        );
    }
    for u in uploads {
        codes.push(
            u.await
                .unwrap()
                .map(|n| assert_eq!(n, 20 * MIB as i64))
                .map_err(|e| e.code()),
        );
    }
    let ok = codes.iter().filter(|c| c.is_ok()).count();
    let bad: Vec<_> = codes
        .iter()
        .filter_map(|c| c.err())
        .filter(|c| *c != Code::ResourceExhausted)
        .collect();
    assert!(bad.is_empty(), "unexpected codes {bad:?} in {codes:?}");
    assert!(
        ok >= 4,
        "only {ok} of {} calls succeeded: {codes:?}",
        codes.len()
    );
    s.until("reservations to drain", |v| {
        v.reserved == 0 && v.waiting == 0
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn reservations_are_released_when_clients_vanish() {
    let s = Server::start(64 * MIB, 2 * MIB, |c| {
        c.memory.queue_timeout = Duration::from_secs(20)
    })
    .await;
    // An admitted upload whose client disappears mid-stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut reqs = upload_requests(payload(8 * MIB as usize, 7), "vanish").into_iter();
    tx.send(reqs.next().unwrap()).await.unwrap();
    let mut c = ByteStreamClient::new(s.channel().await);
    let upload = tokio::spawn(async move {
        c.write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    s.until("the upload to be admitted", |v| v.reserved > 0)
        .await;
    // A queued call whose client gives up while waiting.
    s.set_usage(45 * MIB).await;
    let queued = tokio::spawn(process(
        s.channel().await,
        payload(8 * MIB as usize, 8),
        false,
    ));
    s.until("the call to queue", |v| v.waiting == 1).await;
    queued.abort();
    upload.abort();
    drop(tx);
    s.until("everything to be released", |v| {
        v.reserved == 0 && v.waiting == 0
    })
    .await;
    s.stop().await;
}
