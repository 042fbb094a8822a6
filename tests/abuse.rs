//! Abuse limits against a real in-process server and real tonic clients on
//! loopback: a call whose client stops sending or reading is cut with
//! DEADLINE_EXCEEDED and its reservation released (an upload cut that way
//! resumes), a slow-client attack does not lock a well-behaved client out, and
//! a client flooding the server does not starve one sending a trickle of small
//! calls. Clients are told apart by peer address: each dials from its own
//! loopback address (all of 127.0.0.0/8 is loopback on Linux). The guard reads
//! a fake cgroup, so the budget is exact whatever this machine's memory.

#[path = "support/guarded.rs"]
mod guarded;
mod support;
#[path = "support_fakecg/mod.rs"]
mod support_fakecg;
mod support_s3;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use bytesize::ByteSize;
use guarded::*;
use http_body::Frame;
use http_body_util::BodyExt;
use memgate::proto::bytestream::{ReadRequest, WriteRequest, byte_stream_client::ByteStreamClient};
use support::{
    bytestream, digest, payload, read_digest, wait_for_committed, write_name, write_requests,
};
use support_fakecg::MIB;
use support_s3::{Kind, Storage};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Status, transport::Channel};
use tower::{Service, ServiceExt};

fn assert_cut(status: &Status, message: &str) {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains(message),
        "{message:?} not in {:?}",
        status.message()
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// 64 uploads send 1 KiB each and stall, more than the budget holds; a
/// well-behaved client's 150 MB upload still completes, because the stalled
/// ones are cut after the idle timeout, and every reservation comes back.
/// The watchdog alone: reclaiming (tests/contention.rs) is off here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_attack_is_cut_and_a_good_upload_completes() {
    const ATTACKERS: usize = 64;
    // Budget: 128 MiB × 0.85 − 4 MiB ≈ 105 MiB, 24 Write reservations of 4.3 MiB.
    let s = Server::start(128 * MIB, None, |c| {
        c.memory.reclaim_grace = Duration::ZERO;
        c.memory.max_client_share = 1.0;
    })
    .await;
    let write = s.write_reservation();
    let budget = s.guard.view().budget;
    assert!(
        ATTACKERS as u64 * write > 2 * budget,
        "the attack must exhaust the budget"
    );

    let started = Instant::now();
    let attackers: Vec<Stalled> = (0..ATTACKERS)
        .map(|i| {
            // Each declares a 150 MB blob and sends its first KiB only.
            let data = payload(1024, 1000 + i as u64);
            let d = memgate::api::resource::Digest {
                size: 150_000_000,
                ..digest(&data)
            };
            stall(
                s.channel_from(CLIENT_A),
                write_requests(&write_name(&d), &data, 0, 1024, false),
            )
        })
        .collect();
    // Full: the next attacker had to wait (admitted calls leave the wait room).
    s.until("the attackers to fill the budget", |v| v.waiting > 0)
        .await;
    let full = started.elapsed();

    // The victim, from another address, uploads 150 MB and retries on pushback.
    let good = payload(150_000_000, 77);
    let t = Instant::now();
    let attempts = upload_politely(s.channel_from(CLIENT_B), &good).await;
    let good_took = t.elapsed();

    let mut cut = Vec::new();
    let mut refused = 0;
    for a in attackers {
        let (result, took) = a.task.await.unwrap();
        match result {
            Err(st) if st.code() == Code::DeadlineExceeded => {
                assert_cut(&st, "no request data for 1s (server.stream_idle_timeout)");
                assert!(took >= IDLE, "cut before the idle timeout: {took:?}");
                cut.push(took);
            }
            // Turned away before holding any memory: no room even to wait.
            Err(st) if st.code() == Code::ResourceExhausted => refused += 1,
            other => panic!("an attacker got {other:?}"),
        }
        drop(a.tx);
    }
    cut.sort();
    eprintln!(
        "slow-client attack: budget full after {full:?}; {} attackers cut (after {:?} .. {:?}), \
         {refused} refused at once; the 150 MB upload took {good_took:?} in {attempts} attempts",
        cut.len(),
        cut.first(),
        cut.last()
    );
    // Every attacker that held memory was cut: at least as many as fit the
    // budget beside what is in use and the wait room admitted calls leave.
    let room = memgate::guard::budget::Limits::wait_room_for(
        memgate::server::STREAM_WINDOW as u64,
        budget,
    );
    let fit = (budget - s.guard.view().baseline - room) / write;
    assert!(cut.len() as u64 >= fit, "only {} cut, {fit} fit", cut.len());
    assert_eq!(s.cuts(WRITE, "request_idle"), cut.len() as u64);
    // Cut promptly: the first wave one idle timeout after they stalled.
    assert!(
        cut[0] < IDLE + Duration::from_secs(2),
        "first cut after {:?}",
        cut[0]
    );
    s.until("every reservation to come back", |v| {
        v.reserved == 0 && v.waiting == 0
    })
    .await;
    s.stop().await;
}

/// A Write cut for idling keeps what arrived, as on a disconnect:
/// QueryWriteStatus reports it and the upload resumes and completes.
async fn a_cut_upload_resumes(kind: Kind) {
    let storage = Storage::new(kind);
    let s = Server::start(1024 * MIB, Some(&storage), |_| {}).await;
    let data = payload(6 * MIB as usize + 123, 5);
    let d = digest(&data);
    let name = write_name(&d);
    let sent = 3 * MIB as usize;
    let stalled = stall(
        s.channel_from(CLIENT_A),
        write_requests(&name, &data.slice(..sent), 0, MIB as usize, false),
    );
    let (result, took) = stalled.task.await.unwrap();
    assert_cut(
        &result.expect_err("the stalled upload is cut"),
        "no request data for 1s (server.stream_idle_timeout)",
    );
    assert!(took >= IDLE, "{took:?}");
    drop(stalled.tx);
    assert_eq!(s.cuts(WRITE, "request_idle"), 1);

    let mut c = bytestream(s.channel_from(CLIENT_A));
    // Everything sent before the stall is there (the suspend runs as the
    // handler is dropped, so poll for it).
    let committed = wait_for_committed(&mut c, &name, |n| n == sent as i64).await;
    let rest = data.slice(sent..);
    let resp = {
        let mut c = c.clone();
        let reqs = write_requests(&name, &rest, committed as u64, MIB as usize, true);
        c.write(tokio_stream::iter(reqs)).await
    }
    .expect("the resumed Write");
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    assert_eq!(read_digest(&mut c, &d.read_name()).await.expect("Read"), d);
    s.until("every reservation to come back", |v| v.reserved == 0)
        .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_resumes_on_local_disk() {
    a_cut_upload_resumes(Kind::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_resumes_on_s3() {
    a_cut_upload_resumes(Kind::S3).await;
}

/// Sends a raw gRPC request whose body the test feeds frame by frame (a tonic
/// client always sends a unary message whole); returns its final status.
async fn raw_unary(ch: Channel, path: &str, body: mpsc::Receiver<Bytes>) -> Status {
    let frames = ReceiverStream::new(body).map(|b| Ok::<_, Status>(Frame::data(b)));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://memgate{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            frames,
        )))
        .unwrap();
    let mut ch = ch;
    let resp = ch
        .ready()
        .await
        .unwrap()
        .call(req)
        .await
        .expect("a response");
    if let Some(status) = Status::from_header_map(resp.headers()) {
        return status; // trailers-only
    }
    let collected = resp.into_body().collect().await.expect("the body");
    let trailers = collected.trailers().expect("trailers");
    Status::from_header_map(trailers).expect("grpc-status")
}

/// A unary call whose body trickles (or never comes) is cut, before or after
/// admission, and holds nothing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_body_that_stops_arriving_is_cut() {
    const PROCESS: &str = "/memgate.v1.Payload/Process";
    let s = Server::start(512 * MIB, None, |_| {}).await;
    // Headers, then nothing: not even the length prefix the guard waits for.
    let (silent_tx, silent_rx) = mpsc::channel(1);
    let silent = tokio::spawn(raw_unary(s.channel_from(CLIENT_A), PROCESS, silent_rx));
    // The prefix of a 64 MiB message and 1 KiB of it: admitted, then stalled.
    let (tx, rx) = mpsc::channel(4);
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(64 * MIB as u32).to_be_bytes());
    tx.send(Bytes::from(prefix)).await.unwrap();
    tx.send(payload(1024, 9)).await.unwrap();
    let started = Instant::now();
    let partial = tokio::spawn(raw_unary(s.channel_from(CLIENT_A), PROCESS, rx));
    s.until("the 64 MiB call to be admitted", |v| v.reserved >= 64 * MIB)
        .await;
    for status in [silent.await.unwrap(), partial.await.unwrap()] {
        assert_cut(
            &status,
            "no request data for 1s (server.stream_idle_timeout)",
        );
    }
    assert!(started.elapsed() >= IDLE);
    assert_eq!(s.cuts(PROCESS, "request_idle"), 2);
    s.until("the reservation to come back", |v| v.reserved == 0)
        .await;
    drop((silent_tx, tx));
    s.stop().await;
}

/// A download nobody reads is cut: its reservation comes back but for what the
/// transport still buffers, and the client, reading at last, gets the data that
/// was on its way and then DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_nobody_reads_is_cut() {
    let s = Server::start(512 * MIB, None, |_| {}).await;
    let data = payload(64 * MIB as usize, 11);
    let mut c = bytestream(s.channel_from(CLIENT_A));
    support::upload(&mut c, &data).await.expect("upload");
    s.until("the upload's reservation to go", |v| v.reserved == 0)
        .await;

    let mut reader = bytestream(s.channel_from(CLIENT_B));
    let mut stream = reader
        .read(ReadRequest {
            resource_name: digest(&data).read_name(),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .expect("Read starts")
        .into_inner();
    s.until("the Read to be admitted", |v| v.reserved > 0).await;
    // Nobody reads: the client's 1 MiB stream window fills and the server waits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.cuts("/google.bytestream.ByteStream/Read", "response_idle") == 0 {
        assert!(Instant::now() < deadline, "the Read was never cut");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What hyper and h2 may still hold (two 1 MiB frames) stays reserved.
    let view = s.guard.view();
    assert!(view.reserved <= 2 * MIB, "{view:?}");

    let mut got = 0usize;
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => got += m.data.len(),
            Ok(None) => panic!("the Read ended normally after {got} bytes"),
            Err(status) => break status,
        }
    };
    assert_cut(
        &status,
        "the client read no response data for 1s (server.stream_idle_timeout)",
    );
    assert!(got < data.len(), "{got} bytes arrived");
    s.until("the reservation to come back", |v| v.reserved == 0)
        .await;
    s.stop().await;
}

/// A client sending below `min_throughput` is cut; one above it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_below_the_minimum_throughput_are_cut() {
    let s = Server::start(512 * MIB, None, |c| {
        // Idling alone would never cut these: only throughput does.
        c.server.stream_idle_timeout = Duration::ZERO;
        c.server.min_throughput = ByteSize::kib(64);
        c.server.min_throughput_window = Duration::from_secs(1);
    })
    .await;
    // Sends `chunk` bytes every 100 ms for 3 s: a 3-second upload.
    let paced = |chunk: usize, seed: u64| {
        let data = payload(chunk * 30, seed);
        let name = write_name(&digest(&data));
        let reqs = write_requests(&name, &data, 0, chunk, true);
        let ch = s.channel_from(CLIENT_A);
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for r in reqs {
                tick.tick().await;
                if tx.send(r).await.is_err() {
                    return; // cut
                }
            }
        });
        tokio::spawn(async move {
            bytestream(ch)
                .write(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner().committed_size)
        })
    };
    // 4 KiB every 100 ms is ~40 KiB/s; 16 KiB every 100 ms is ~160 KiB/s.
    let slow = paced(4 * 1024, 21);
    let fast = paced(16 * 1024, 22);
    let status = slow.await.unwrap().expect_err("the slow upload is cut");
    assert_cut(&status, "below 64.0 KiB/s (server.min_throughput)");
    assert!(
        status.message().starts_with("request data arrived at"),
        "{status:?}"
    );
    assert_eq!(
        fast.await.unwrap().expect("the fast upload"),
        30 * 16 * 1024
    );
    assert_eq!(s.cuts(WRITE, "request_slow"), 1);
    s.until("every reservation to come back", |v| v.reserved == 0)
        .await;
    s.stop().await;
}

/// Health checks bypass the guard: a Watch stream that is silent for longer
/// than the idle timeout is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watches_are_never_cut() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let s = Server::start(512 * MIB, None, |_| {}).await;
    let mut watch = HealthClient::new(s.channel_from(CLIENT_A))
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    watch
        .message()
        .await
        .expect("first status")
        .expect("a status");
    // Nothing more comes, and nothing cuts it.
    let silent = tokio::time::timeout(3 * IDLE, watch.message()).await;
    assert!(silent.is_err(), "the Watch ended: {silent:?}");
    assert_eq!(s.cuts("/grpc.health.v1.Health", "request_idle"), 0);
    drop(watch);
    s.stop().await;
}

/// A flood upload: `base` in 1 MiB chunks, named with a digest no data has
/// (`n` in its first bytes). The server reserves, receives, hashes and writes
/// all 150 MB, and only at `finish_write` refuses it (INVALID_ARGUMENT, the
/// partial file deleted): the flood holds memory exactly like real uploads
/// without the test storing gigabytes.
fn flood_upload(base: &Bytes, n: u64) -> impl tokio_stream::Stream<Item = WriteRequest> + use<> {
    let mut hash = [0xf1u8; 32];
    hash[..8].copy_from_slice(&n.to_le_bytes());
    let d = memgate::api::resource::Digest {
        hash,
        size: base.len() as u64,
    };
    let name = write_name(&d);
    let chunk = MIB as usize;
    let base = base.clone();
    tokio_stream::iter((0..base.len()).step_by(chunk).map(move |i| {
        let end = (i + chunk).min(base.len());
        WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: i as i64,
            finish_write: end == base.len(),
            data: base.slice(i..end),
        }
    }))
}

/// One client floods the server with 150 MB uploads, twelve at a time,
/// retrying 20 ms after each RESOURCE_EXHAUSTED (ignoring the pushback), twice
/// what the budget holds; another sends small uploads one after another. The
/// second client's calls all succeed at the first attempt, and none waits much
/// longer than one flood upload takes: while it waits the flooder is held to
/// half the budget and gives up its places in the queue to it, so it gets the
/// next memory freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_does_not_starve_a_trickle() {
    const FLOOD: usize = 12;
    const TRICKLE: usize = 12;
    // Budget: 80 MiB × 0.85 − 4 MiB = 64 MiB: nine 7 MiB Writes (1 MiB messages).
    let s = Server::start(80 * MIB, None, |c| {
        // Not under test here; a loaded machine may pause a client briefly.
        c.server.stream_idle_timeout = Duration::from_secs(10);
    })
    .await;
    let write = s.write_reservation_with(MIB);
    assert!(FLOOD as u64 * write > s.guard.view().budget);

    let base = payload(150_000_000, 31);
    let stop = Arc::new(AtomicBool::new(false));
    let flood_ch = s.channel_from(CLIENT_A);
    let floods: Vec<JoinHandle<Vec<Duration>>> = (0..FLOOD as u64)
        .map(|f| {
            let (ch, base, stop) = (flood_ch.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut took = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) || n >= 1000 {
                        break;
                    }
                    let t = Instant::now();
                    match ByteStreamClient::new(ch.clone())
                        .write(flood_upload(&base, f * 1000 + n))
                        .await
                    {
                        Ok(r) => panic!("a flood upload with a made-up digest was stored: {r:?}"),
                        // Received whole, then refused at finish_write: done.
                        Err(st) if st.code() == Code::InvalidArgument => took.push(t.elapsed()),
                        Err(st) if st.code() == Code::ResourceExhausted => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(st) => panic!("flood upload failed: {st:?}"),
                    }
                }
                took
            })
        })
        .collect();
    s.until("the flood to fill the budget", |v| v.waiting > 0)
        .await;
    assert!(
        s.guard.budget().client_held("127.0.0.1") > 0,
        "the flood is 127.0.0.1"
    );

    let trickle_ch = s.channel_from(CLIENT_B);
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for i in 0..TRICKLE {
        let data = payload(64 * 1024, 500 + i as u64);
        let t = Instant::now();
        match support::upload(&mut bytestream(trickle_ch.clone()), &data).await {
            Ok(n) => assert_eq!(n, data.len() as i64),
            Err(st) => failures.push(st),
        }
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut flood_took: Vec<Duration> = Vec::new();
    for f in floods {
        flood_took.extend(f.await.unwrap());
    }
    latencies.sort();
    flood_took.sort();
    eprintln!(
        "fairness: trickle {}/{TRICKLE} ok, latency p50 {:?} p95 {:?} max {:?}; \
         flood {} uploads done, p50 {:?} max {:?}",
        TRICKLE - failures.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        latencies.last().unwrap(),
        flood_took.len(),
        flood_took.first().map(|_| percentile(&flood_took, 0.5)),
        flood_took.last()
    );
    // Bounds. Admission does not preempt: a trickle call that finds the memory
    // full waits for the next flood upload to end, and gets that memory (the
    // flooder is over its share, and gave its places in the queue up). So:
    // every trickle call succeeds at its first attempt (without the share cap
    // none does: the flood's waiters hold all the room to wait); none takes
    // longer than the longest flood upload, give or take a second of
    // scheduling on a busy machine; the median takes no longer than the median
    // flood upload. Without turns it would wait for several.
    const SLACK: Duration = Duration::from_secs(1);
    assert!(
        failures.is_empty(),
        "{} of {TRICKLE} trickle calls failed, the first with {:?}",
        failures.len(),
        failures.first()
    );
    assert!(!flood_took.is_empty(), "the flood made no progress");
    assert!(
        *latencies.last().unwrap() <= *flood_took.last().unwrap() + SLACK,
        "a trickle call waited {:?}, longer than any flood upload ({:?})",
        latencies.last().unwrap(),
        flood_took.last().unwrap()
    );
    assert!(
        percentile(&latencies, 0.5) <= percentile(&flood_took, 0.5),
        "trickle median {:?}, flood median {:?}",
        percentile(&latencies, 0.5),
        percentile(&flood_took, 0.5)
    );
    s.until("every reservation to come back", |v| {
        v.reserved == 0 && v.waiting == 0
    })
    .await;
    s.stop().await;
}
