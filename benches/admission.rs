//! Admission cost: `cargo bench --bench admission`.
//!
//! 1. The fast-path decision: `Budget::try_acquire` that admits at once, plus the
//!    permit's release, in a tight loop (median of batches, ns per decision).
//! 2. A rejection as a client sees it: a real tonic client against a real
//!    in-process server on loopback whose budget nothing fits, so every call is
//!    answered `RESOURCE_EXHAUSTED` straight from the length prefix (p50/p99).
//!
//! Targets (issue "The memory guard"): decision < 1 µs; rejection p99 < 1 ms.

#[path = "../tests/support_fakecg/mod.rs"]
mod support_fakecg;

use std::time::{Duration, Instant};

use bytesize::ByteSize;
use memgate::{
    config::Config,
    guard::{
        Guard,
        budget::{Admission, Budget, Limits},
    },
    proto::memgate_v1::{ProcessRequest, payload_client::PayloadClient},
    server::{STREAM_WINDOW, serve_with_guard},
};
use support_fakecg::{FakeCgroup, MIB};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn decision_cost() -> f64 {
    let limits = Limits {
        limit: 1 << 30,
        budget: 800 * MIB,
        soft_watermark: 0.75,
        hard_watermark: 0.95,
        queue_max: 64,
        small_request: 32 * MIB,
        wait_charge: MIB,
        client_share: 1.0,
        wait_room: Limits::wait_room_for(MIB, 800 * MIB),
    };
    let budget = Budget::new(limits, |_| {});
    budget.observe(50 * MIB, limits);
    const N: u32 = 200_000;
    let mut batches: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..N {
                match budget.try_acquire(std::hint::black_box(17 * MIB)) {
                    Ok(Admission::Now(p)) => drop(std::hint::black_box(p)),
                    _ => panic!("fast path expected"),
                }
            }
            start.elapsed().as_nanos() as f64 / N as f64
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    batches[batches.len() / 2]
}

async fn rejection_latency(payload_len: usize) -> (Duration, Duration, usize) {
    let cg = FakeCgroup::new(64 * MIB, 2 * MIB);
    let data = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.storage.data_dir = data.path().to_path_buf();
    // 64 MiB × 0.25 − 16 MiB = 0: no call can ever fit.
    cfg.memory.budget_ratio = 0.25;
    cfg.memory.reserve = ByteSize::mib(16);
    let guard = Guard::start(cfg.memory.clone(), cg.roots(), STREAM_WINDOW as u64).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve_with_guard(&cfg, guard, listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = memgate::client::connect(&format!("http://{addr}"))
        .await
        .unwrap();
    let mut client = PayloadClient::new(channel).max_encoding_message_size(usize::MAX);
    // Whatever the size, only the prefix and the first frames are read.
    let payload = bytes::Bytes::from(vec![7u8; payload_len]);
    let mut times = Vec::new();
    for i in 0..2200 {
        let start = Instant::now();
        let err = client
            .process(ProcessRequest {
                data: payload.clone(),
                echo: false,
            })
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        if i >= 200 {
            times.push(took); // the first 200 warm up the connection
        }
    }
    times.sort();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    (
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.len(),
    )
}

fn main() {
    let ns = decision_cost();
    println!(
        "admission decision (fast path, acquire + release): median {ns:.0} ns  (target < 1000 ns)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (len, what) in [(1024, "1 KiB"), (2 * MIB as usize, "2 MiB")] {
        let (p50, p99, n) = rt.block_on(rejection_latency(len));
        println!(
            "rejection of a {what} Process call seen by a loopback client ({n} calls): p50 {:.0} µs, p99 {:.0} µs  (target p99 < 1000 µs)",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
}
