//! A real in-process memgate whose guard reads a fake cgroup (the budget is
//! exact whatever this machine's memory), with clients told apart by peer
//! address: each dials from its own loopback address (all of 127.0.0.0/8 is
//! loopback on Linux). Shared by the abuse and contention tests; a test binary
//! that uses it also declares `support`, `support_fakecg` and `support_s3`.

#![allow(dead_code)]

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use bytesize::ByteSize;
use hyper_util::rt::TokioIo;
use memgate::{
    admin::metrics::Metrics,
    config::Config,
    guard::{
        Guard,
        budget::BudgetView,
        estimate::{Estimate, Estimator},
    },
    proto::bytestream::WriteRequest,
    server::{STREAM_WINDOW, method_table, serve_with_guard},
};
use tokio::{net::TcpSocket, sync::mpsc, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};

use crate::support::{bytestream, digest, write_name, write_requests};
use crate::support_fakecg::{FakeCgroup, MIB};
use crate::support_s3::Storage;

/// Two clients: two peer addresses.
pub const CLIENT_A: [u8; 4] = [127, 0, 0, 1];
pub const CLIENT_B: [u8; 4] = [127, 0, 0, 2];
pub const WRITE: &str = "/google.bytestream.ByteStream/Write";
pub const IDLE: Duration = Duration::from_secs(1);

pub struct Server {
    pub addr: SocketAddr,
    pub cfg: Config,
    pub guard: Guard,
    /// The guard's observer: admissions and cuts.
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub cg: FakeCgroup,
    _data: tempfile::TempDir,
}

impl Server {
    /// A server whose guard sees a memory limit of `limit` with 8 MiB in use, a
    /// 4 MiB reserve, a 10 s queue timeout and a 1 s `stream_idle_timeout`
    /// (no throughput minimum), unless `tweak` says otherwise.
    pub async fn start(
        limit: u64,
        storage: Option<&Storage>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let cg = FakeCgroup::new(limit, 8 * MIB);
        let data = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = data.path().to_path_buf();
        if let Some(s) = storage {
            s.configure(&mut cfg);
        }
        cfg.memory.reserve = ByteSize::mib(4);
        cfg.memory.poll_interval = Duration::from_millis(10);
        cfg.memory.queue_timeout = Duration::from_secs(10);
        cfg.server.stream_idle_timeout = IDLE;
        cfg.server.min_throughput = ByteSize::b(0);
        tweak(&mut cfg);
        cfg.validate().expect("valid test config");
        let metrics = Metrics::new();
        let guard = Guard::start_with_observer(
            cfg.memory.clone(),
            cg.roots(),
            STREAM_WINDOW as u64,
            Arc::new(metrics.clone()),
        )
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (g, c) = (guard.clone(), cfg.clone());
        let task = tokio::spawn(async move {
            serve_with_guard(&c, g, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Self {
            addr,
            cfg,
            guard,
            metrics,
            stop: Some(stop),
            task: Some(task),
            cg,
            _data: data,
        }
    }

    /// A channel (its own connection) dialled from `local`, with the CLI
    /// client's windows. Lazy: it connects on the first call.
    pub fn channel_from(&self, local: [u8; 4]) -> Channel {
        let (server, local) = (self.addr, IpAddr::from(local));
        Endpoint::from_shared(format!("http://{server}"))
            .unwrap()
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| async move {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(local, 0))?;
                let stream = socket.connect(server).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }))
    }

    /// What a Write reserves when it is admitted (before its messages grow it).
    pub fn write_reservation(&self) -> u64 {
        method_table(&self.cfg).classify(WRITE).estimate.upfront()
    }

    /// What a Write sending `chunk`-byte messages reserves once its first
    /// message has arrived (the reservation follows the largest message).
    pub fn write_reservation_with(&self, chunk: u64) -> u64 {
        match method_table(&self.cfg).classify(WRITE).estimate {
            Estimate::Stream {
                window,
                messages,
                first,
                overhead,
                ..
            } => window + overhead + messages * first.max(chunk),
            other => other.upfront(),
        }
    }

    /// `memgate_streams_cut_total{method, reason}`.
    pub fn cuts(&self, method: &str, reason: &str) -> u64 {
        let text = self.metrics.encode(&self.guard);
        let series =
            format!("memgate_streams_cut_total{{method=\"{method}\",reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse().expect("a counter value"))
    }

    /// Waits (bounded) until `cond` holds for the budget view.
    pub async fn until(&self, what: &str, cond: impl Fn(&BudgetView) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond(&self.guard.view()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.guard.view()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap())
            .await
            .expect("server stopped")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Server {
    /// A test that panicked before `stop()`.
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A Write that sends `reqs` and then nothing, its stream left open until
/// `tx` is dropped. The task returns the outcome and how long the call took.
pub struct Stalled {
    pub tx: mpsc::Sender<WriteRequest>,
    pub task: JoinHandle<(Result<i64, Status>, Duration)>,
}

pub fn stall(ch: Channel, reqs: Vec<WriteRequest>) -> Stalled {
    let (tx, rx) = mpsc::channel(reqs.len() + 1);
    for r in reqs {
        tx.try_send(r).expect("room for every request");
    }
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let r = bytestream(ch)
            .write(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().committed_size);
        (r, start.elapsed())
    });
    Stalled { tx, task }
}

pub fn pushback(s: &Status) -> Option<Duration> {
    let ms: u64 = s
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// Uploads `data` under a fresh name, retrying (bounded) after RESOURCE_EXHAUSTED
/// with the server's pushback, as a well-behaved client does. Returns the
/// number of attempts.
pub async fn upload_politely(ch: Channel, data: &Bytes) -> usize {
    let d = digest(data);
    for attempt in 1..=100 {
        let name = write_name(&d);
        let reqs = write_requests(&name, data, 0, MIB as usize, true);
        match bytestream(ch.clone()).write(tokio_stream::iter(reqs)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().committed_size, data.len() as i64);
                return attempt;
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                tokio::time::sleep(pushback(&s).unwrap_or(Duration::from_millis(250))).await;
            }
            Err(s) => panic!("upload failed: {s:?}"),
        }
    }
    panic!("upload still refused after 100 attempts");
}
