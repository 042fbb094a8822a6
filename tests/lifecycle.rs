//! The real binary's lifecycle: SIGTERM drains (readiness off first, in-flight
//! uploads finish, exit 0 within the grace period), SIGHUP reloads `[memory]`
//! live (a broken file changes nothing), and `/metrics` scraped over HTTP and
//! parsed by a Prometheus parser shows the admission and purge counters move.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use memgate::guard::budget::Limits;
use memgate::proto::{
    bytestream::{WriteRequest, byte_stream_client::ByteStreamClient},
    memgate_v1::{ProcessRequest, payload_client::PayloadClient},
};
use sha2::{Digest, Sha256};
use support::process::Memgate;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const MIB: usize = 1 << 20;

fn payload(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// Polls readiness (bounded) until it reports `want`; whether it did.
async fn wait_readiness(
    health: &mut HealthClient<tonic::transport::Channel>,
    want: ServingStatus,
) -> bool {
    for _ in 0..400 {
        let r = health
            .check(HealthCheckRequest {
                service: "readiness".into(),
            })
            .await
            .unwrap();
        if r.into_inner().status() == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_off_then_lets_inflight_uploads_finish() {
    let mut m = Memgate::start("[shutdown]\ndrain_delay = \"1s\"\ngrace = \"20s\"\n");
    let channel = memgate::client::connect(&m.grpc).await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    assert!(
        wait_readiness(&mut health, ServingStatus::Serving).await,
        "never ready:\n{}",
        m.log()
    );
    // Two uploads, each half sent when the signal arrives.
    let mut uploads = Vec::new();
    let mut feeds = Vec::new();
    for i in 0..2u8 {
        let data = payload(32 * MIB, i);
        let name = format!(
            "uploads/sig{i}/blobs/{}/{}",
            hex::encode(Sha256::digest(&data)),
            data.len()
        );
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(64);
        let mut client = ByteStreamClient::new(channel.clone());
        uploads.push(tokio::spawn(async move {
            client
                .write(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }));
        let reqs: Vec<_> = (0..32)
            .map(|c| WriteRequest {
                resource_name: if c == 0 { name.clone() } else { String::new() },
                write_offset: (c * MIB) as i64,
                finish_write: c == 31,
                data: data.slice(c * MIB..(c + 1) * MIB),
            })
            .collect();
        let (first, rest) = reqs.split_at(16);
        for r in first {
            tx.send(r.clone()).await.unwrap();
        }
        feeds.push((tx, rest.to_vec(), data));
    }
    let signalled = Instant::now();
    m.signal(libc::SIGTERM);
    // Readiness goes first, while the process still serves the connection.
    let off = wait_readiness(&mut health, ServingStatus::NotServing).await;
    assert!(off, "readiness never turned NOT_SERVING:\n{}", m.log());
    assert_eq!(
        health.check(check("")).await.unwrap().into_inner().status(),
        ServingStatus::Serving
    );
    assert_eq!(m.http("/readyz").await.0, 503);
    assert_eq!(m.http("/livez").await.0, 200);
    // The rest of each upload, after the drain delay has passed and new calls are refused.
    for (tx, rest, _) in &feeds {
        for r in rest {
            tx.send(r.clone()).await.unwrap();
        }
    }
    for (u, (_, _, data)) in uploads.into_iter().zip(&feeds) {
        let committed = u.await.unwrap().unwrap().into_inner().committed_size;
        assert_eq!(committed, data.len() as i64);
    }
    drop(health);
    drop(channel);
    let (status, m) = tokio::task::spawn_blocking(move || {
        let (status, _) = m.wait_exit(Duration::from_secs(25));
        (status, m)
    })
    .await
    .unwrap();
    let log = m.log();
    // What was committed during the drain is on disk, whole and right.
    for (_, _, data) in &feeds {
        let hash = hex::encode(Sha256::digest(data));
        let stored = std::fs::read(
            m.dir
                .as_ref()
                .unwrap()
                .path()
                .join("data/blobs")
                .join(&hash[..2])
                .join(&hash),
        )
        .unwrap();
        assert_eq!(hex::encode(Sha256::digest(&stored)), hash);
    }
    assert!(status.success(), "exit {status:?}:\n{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(21),
        "took {:?}",
        signalled.elapsed()
    );
    let phases = [
        "readiness is NOT_SERVING",
        "accepting no new calls",
        "every in-flight call finished",
        "shutdown complete",
    ];
    let mut at = 0;
    for p in phases {
        let found = log[at..]
            .find(p)
            .unwrap_or_else(|| panic!("phase {p:?} not logged in order:\n{log}"));
        at += found;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_at_the_grace_deadline_keeps_its_data_for_resume() {
    let config = "[shutdown]\ndrain_delay = \"0s\"\ngrace = \"1s\"\n";
    let mut m = Memgate::start(config);
    let data = payload(16 * MIB, 42);
    let name = format!(
        "uploads/cut/blobs/{}/{}",
        hex::encode(Sha256::digest(&data)),
        data.len()
    );
    let request = |c: usize| WriteRequest {
        resource_name: if c == 0 { name.clone() } else { String::new() },
        write_offset: (c * MIB) as i64,
        finish_write: c == 15,
        data: data.slice(c * MIB..(c + 1) * MIB),
    };
    let channel = memgate::client::connect(&m.grpc).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(16);
    let mut client = ByteStreamClient::new(channel.clone());
    let upload = tokio::spawn(async move {
        client
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    for c in 0..8 {
        tx.send(request(c)).await.unwrap();
    }
    // Wait until the server holds the first 8 MiB (it fsyncs when the stream ends).
    let mut probe = ByteStreamClient::new(channel.clone());
    for _ in 0..500 {
        let q = probe
            .query_write_status(memgate::proto::bytestream::QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await;
        if q.is_ok_and(|r| r.into_inner().committed_size == 8 * MIB as i64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    m.signal(libc::SIGTERM);
    // The stream stays open and idle: the grace period runs out and the server cuts it.
    let (status, m) =
        tokio::task::spawn_blocking(move || (m.wait_exit(Duration::from_secs(15)).0, m))
            .await
            .unwrap();
    assert!(status.success(), "exit {status:?}:\n{}", m.log());
    assert!(m.log().contains("grace period over"), "{}", m.log());
    assert!(
        upload.await.unwrap().is_err(),
        "the cut upload cannot have succeeded"
    );
    drop(tx);

    // A new server on the same data continues the upload where it was cut.
    let dir = m.take_dir();
    let m = Memgate::start_in(dir, config);
    let mut client = ByteStreamClient::new(memgate::client::connect(&m.grpc).await.unwrap());
    let committed = client
        .query_write_status(memgate::proto::bytestream::QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .committed_size;
    assert_eq!(
        committed,
        8 * MIB as i64,
        "the partial upload did not survive shutdown"
    );
    let rest: Vec<_> = (8..16)
        .map(|c| WriteRequest {
            resource_name: if c == 8 { name.clone() } else { String::new() },
            ..request(c)
        })
        .collect();
    let done = client
        .write(tokio_stream::iter(rest))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.committed_size, data.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_budget_and_keeps_it_when_the_file_is_broken() {
    let m = Memgate::start("[memory]\nlimit = \"1GiB\"\nbudget_ratio = 0.85\n");
    let budget = |ratio| Limits::budget_for(1 << 30, ratio, 32 * MIB as u64) as f64;
    let before = m.metric("memgate_memory_budget_bytes", &[]).await;
    assert_eq!(before, budget(0.85));
    std::fs::write(
        &m.config,
        "[memory]\nlimit = \"1GiB\"\nbudget_ratio = 0.5\n",
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    let want = budget(0.5);
    let mut now = before;
    for _ in 0..500 {
        now = m.metric("memgate_memory_budget_bytes", &[]).await;
        if now == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(now, want, "new budget not applied:\n{}", m.log());
    // The log line follows the change it reports: wait for it (bounded).
    for _ in 0..500 {
        if m.log().contains("configuration reloaded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(m.log().contains("configuration reloaded"), "{}", m.log());

    std::fs::write(&m.config, "[memory]\nbudget_ratio = 7\n").unwrap();
    m.signal(libc::SIGHUP);
    for _ in 0..500 {
        if m.log().contains("configuration reload failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = m.log();
    assert!(
        log.contains("configuration reload failed") && log.contains("memory.budget_ratio"),
        "{log}"
    );
    assert_eq!(
        m.metric("memgate_memory_budget_bytes", &[]).await,
        want,
        "a broken file changed the budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_admissions_and_purges_as_requests_run() {
    let m = Memgate::start("[memory]\npurge_threshold = \"8MiB\"\n");
    let channel = memgate::client::connect(&m.grpc).await.unwrap();
    let mut c = PayloadClient::new(channel).max_encoding_message_size(usize::MAX);
    let process = "/memgate.v1.Payload/Process";
    let admitted0 = m
        .metric("memgate_admission_admitted_total", &[("method", process)])
        .await;
    let purges0 = m.metric("memgate_purges_total", &[]).await;
    for seed in 0..3 {
        let r = c
            .process(ProcessRequest {
                data: payload(16 * MIB, seed),
                echo: false,
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().size, 16 * MIB as u64);
    }
    let admitted = m
        .metric("memgate_admission_admitted_total", &[("method", process)])
        .await;
    assert_eq!(admitted - admitted0, 3.0);
    let ok = m
        .metric(
            "memgate_requests_total",
            &[("method", process), ("code", "ok")],
        )
        .await;
    assert_eq!(ok, 3.0);
    let received = m
        .metric("memgate_received_bytes_total", &[("method", process)])
        .await;
    assert!(received >= 3.0 * (16 * MIB) as f64, "received {received}");
    // Each 16 MiB call reserved above purge_threshold: purges follow (rate-limited).
    let mut purges = purges0;
    for _ in 0..300 {
        purges = m.metric("memgate_purges_total", &[]).await;
        if purges > purges0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(purges > purges0, "no purge counted:\n{}", m.log());
    assert_eq!(m.metric("memgate_memory_reserved_bytes", &[]).await, 0.0);
    assert_eq!(
        m.metric("memgate_requests_in_flight", &[("method", process)])
            .await,
        0.0
    );
}
