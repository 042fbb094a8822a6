//! Probing a running server the way the kubelet does: gRPC health Check on `""`
//! and `"readiness"`, and HTTP `/livez` `/readyz` on the admin listener. The
//! guard reads a fake cgroup whose usage the test sets, so pressure is exact.

#[path = "support_fakecg/mod.rs"]
mod support_fakecg;

use std::time::Duration;

use bytesize::ByteSize;
use memgate::{
    admin::metrics::Metrics,
    config::Config,
    guard::Guard,
    server::{STREAM_WINDOW, Server},
};
use support_fakecg::{FakeCgroup, MIB};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

struct Running {
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    guard: Guard,
    cg: FakeCgroup,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
}

async fn start(limit: u64, usage: u64) -> Running {
    let cg = FakeCgroup::new(limit, usage);
    let data = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.storage.data_dir = data.path().to_path_buf();
    cfg.memory.reserve = ByteSize::mib(4);
    cfg.memory.poll_interval = Duration::from_millis(10);
    cfg.shutdown.grace = Duration::from_secs(5);
    let metrics = Metrics::new();
    let guard = Guard::start_with_observer(
        cfg.memory.clone(),
        cg.roots(),
        STREAM_WINDOW as u64,
        std::sync::Arc::new(metrics.clone()),
    )
    .await;
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
    let server = Server::with_guard(cfg, guard.clone(), metrics)
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(grpc, Some(admin), async {
        let _ = stopped.await;
    }));
    Running {
        grpc: grpc_addr,
        admin: admin_addr,
        guard,
        cg,
        stop: Some(stop),
        task,
        _data: data,
    }
}

impl Running {
    async fn health(&self) -> HealthClient<tonic::transport::Channel> {
        HealthClient::new(
            memgate::client::connect(&format!("http://{}", self.grpc))
                .await
                .unwrap(),
        )
    }

    async fn check(&self, service: &str) -> ServingStatus {
        let r = self
            .health()
            .await
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        r.into_inner().status()
    }

    /// A plain HTTP/1.1 GET, as the kubelet's httpGet probe sends it.
    async fn http(&self, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (code, body)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Waits on a Watch stream until `service` reports `want`.
async fn watch_until(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
    want: ServingStatus,
) {
    let mut stream = client
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = stream.next().await {
            if msg.unwrap().status() == want {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "{service} never reported {want:?}");
}

#[tokio::test]
async fn a_healthy_server_is_live_and_ready_over_grpc_and_http() {
    let s = start(256 * MIB, 10 * MIB).await;
    let mut h = s.health().await;
    watch_until(&mut h, "readiness", ServingStatus::Serving).await;
    assert_eq!(s.check("").await, ServingStatus::Serving);
    assert_eq!(s.check("memgate.v1.Payload").await, ServingStatus::Serving);
    assert_eq!(
        s.check("google.bytestream.ByteStream").await,
        ServingStatus::Serving
    );
    assert_eq!(s.http("/livez").await, (200, "ok\n".into()));
    assert_eq!(s.http("/readyz").await, (200, "ready\n".into()));
    let unknown = s
        .health()
        .await
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    s.stop().await;
}

#[tokio::test]
async fn readiness_follows_critical_pressure_while_liveness_stays() {
    // Budget ≈ 256 × 0.85 − 4 ≈ 213.6 MiB; critical at 95 % of it.
    let s = start(256 * MIB, 10 * MIB).await;
    let mut h = s.health().await;
    watch_until(&mut h, "readiness", ServingStatus::Serving).await;
    let mut live = h
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        live.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    s.cg.set_usage(210 * MIB);
    watch_until(&mut h, "readiness", ServingStatus::NotServing).await;
    assert_eq!(
        s.check("memgate.v1.Payload").await,
        ServingStatus::NotServing
    );
    let (code, body) = s.http("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("critical"), "{body}");
    assert_eq!(s.check("").await, ServingStatus::Serving);
    assert_eq!(s.http("/livez").await.0, 200);

    // Inside the hysteresis band (above hard − 5 %) readiness stays off.
    s.cg.set_usage(200 * MIB);
    let mut rx = s.guard.subscribe();
    rx.wait_for(|snap| snap.working_set == 200 * MIB)
        .await
        .unwrap();
    assert_eq!(s.check("readiness").await, ServingStatus::NotServing);

    s.cg.set_usage(20 * MIB);
    watch_until(&mut h, "readiness", ServingStatus::Serving).await;
    assert_eq!(s.http("/readyz").await.0, 200);
    // Liveness never changed: its Watch stream has nothing new to say.
    let next = tokio::time::timeout(Duration::from_millis(300), live.next()).await;
    assert!(
        next.is_err(),
        "liveness changed under memory pressure: {next:?}"
    );
    // Open Watch streams would hold the graceful shutdown for its whole grace period.
    drop((live, h));
    s.stop().await;
}

#[tokio::test]
async fn shutdown_turns_readiness_off_first() {
    let s = start(256 * MIB, 10 * MIB).await;
    let mut h = s.health().await;
    watch_until(&mut h, "readiness", ServingStatus::Serving).await;
    let mut ready = h
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ready.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let Running { stop, task, .. } = s;
    stop.unwrap().send(()).unwrap();
    // The Watch stream on an existing connection sees NOT_SERVING before the server goes.
    let status = ready.next().await.unwrap().unwrap().status();
    assert_eq!(status, ServingStatus::NotServing);
    drop(ready);
    drop(h);
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
