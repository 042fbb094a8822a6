//! Caps per peer at the transport, against a real in-process server: a
//! connection over `server.max_connections_per_client` or
//! `server.max_connections` is answered with RESOURCE_EXHAUSTED naming the key
//! and then closed (never left hanging) while the connections already open
//! keep working; a connection with no call for
//! `server.connection_idle_timeout` is closed with a GOAWAY, one with a call in
//! flight is not; a client over `server.max_calls_per_client` is refused
//! before the guard reserves anything. Clients are told apart by address:
//! each dials from its own loopback address (all of 127.0.0.0/8 is loopback
//! on Linux). Clients are tonic channels, or raw hyper HTTP/2 connections
//! where the test must see the connection itself end.

mod support;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use memgate::{
    admin::metrics::Metrics,
    config::Config,
    guard::{
        Guard,
        estimate::{Estimate, Estimator},
    },
    proto::bytestream::WriteRequest,
    server::{Server, method_table},
};
use support::{bytestream, digest, payload, write_name};
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const A: [u8; 4] = [127, 0, 0, 1];
const B: [u8; 4] = [127, 0, 0, 2];
const C: [u8; 4] = [127, 0, 0, 3];
/// Longest any single step may take before the test calls it a hang.
const BOUND: Duration = Duration::from_secs(10);

struct Harness {
    addr: SocketAddr,
    cfg: Config,
    guard: Guard,
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _data: tempfile::TempDir,
}

impl Harness {
    /// A memgate server with its defaults (the machine's own memory limit) and
    /// whatever `tweak` changes.
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = data.path().to_path_buf();
        tweak(&mut cfg);
        cfg.validate().expect("valid test config");
        let server = Server::new(cfg.clone()).await.unwrap();
        let (guard, metrics) = (server.guard().clone(), server.metrics().clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, None, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            cfg,
            guard,
            metrics,
            stop: Some(stop),
            task: Some(task),
            _data: data,
        }
    }

    /// A TCP connection to the server from `local`.
    async fn dial(&self, local: [u8; 4]) -> TcpStream {
        dial(self.addr, local).await.unwrap()
    }

    /// A tonic channel (its own connection) dialled from `local`, connected
    /// on its first call.
    fn channel_from(&self, local: [u8; 4]) -> Channel {
        let server = self.addr;
        Endpoint::from_shared(format!("http://{server}"))
            .unwrap()
            .connect_timeout(BOUND)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| async move {
                dial(server, local).await.map(TokioIo::new)
            }))
    }

    /// A raw HTTP/2 connection from `local`: the request sender and the
    /// connection's own future, which ends when the server closes it.
    async fn raw_from<Bd>(&self, local: [u8; 4]) -> (SendRequest<Bd>, JoinHandle<()>)
    where
        Bd: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        Bd::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = self.dial(local).await;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        (send, conn)
    }

    /// `name`'s value in `/metrics` (the line that is exactly `name value`).
    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics.encode(&self.guard);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    /// Waits (bounded) until `/metrics` shows `name` at `value`: the server
    /// side of a close the client already saw.
    async fn until_metric(&self, name: &str, value: f64) {
        let start = Instant::now();
        while self.metric(name) != value {
            assert!(
                start.elapsed() < BOUND,
                "{name} stayed at {} (want {value})",
                self.metric(name)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server stopped")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn dial(server: SocketAddr, local: [u8; 4]) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(local), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A health check on `ch`, bounded: Ok, or the status it got.
async fn check(ch: &Channel) -> Result<(), tonic::Status> {
    let mut client = HealthClient::new(ch.clone());
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    tokio::time::timeout(BOUND, call)
        .await
        .expect("the health check hung")
        .map(|_| ())
}

/// A health check over a raw connection: the gRPC status code and message.
async fn raw_check(send: &mut SendRequest<Full<Bytes>>) -> (String, String) {
    let request = http::Request::post("http://memgate/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // An empty HealthCheckRequest: uncompressed, length 0.
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let response = tokio::time::timeout(BOUND, send.send_request(request))
        .await
        .expect("no response")
        .expect("a response");
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("the body");
    let trailers = body.trailers().cloned().unwrap_or_default();
    let get = |k: &str| {
        headers
            .get(k)
            .or_else(|| trailers.get(k))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

/// Asserts `status` is the refusal of a connection over `key`.
fn assert_refused(status: &tonic::Status, key: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("connection refused") && status.message().contains(key),
        "{status:?}"
    );
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok()),
        Some("1000")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_refuses_the_extra_connection_cleanly() {
    let s = Harness::start(|c| c.server.max_connections_per_client = 2).await;
    let (one, two) = (s.channel_from(A), s.channel_from(A));
    check(&one).await.unwrap();
    check(&two).await.unwrap();
    s.until_metric("memgate_connections_open", 2.0).await;

    // The third from the same address: answered, with the key, at once.
    let start = Instant::now();
    let refused = check(&s.channel_from(A)).await.unwrap_err();
    assert_refused(&refused, "server.max_connections_per_client");
    assert!(refused.message().contains("127.0.0.1"), "{refused:?}");
    let answered = start.elapsed();
    eprintln!("refused connection answered after {answered:?}");
    assert!(answered < Duration::from_secs(2), "{answered:?}");

    // Over raw HTTP/2: the same answer, then the server closes the
    // connection by itself (GOAWAY, then the socket).
    let connected = Instant::now();
    let (mut send, conn) = s.raw_from::<Full<Bytes>>(A).await;
    let (code, message) = raw_check(&mut send).await;
    assert_eq!(code, "8", "RESOURCE_EXHAUSTED: {message}");
    assert!(
        message.contains("server.max_connections_per_client"),
        "{message}"
    );
    tokio::time::timeout(BOUND, conn)
        .await
        .expect("the refused connection was not closed")
        .unwrap();
    eprintln!(
        "refused raw connection closed by the server {:?} after it connected",
        connected.elapsed()
    );
    assert_eq!(
        s.metric("memgate_connections_refused_total{reason=\"max_connections_per_client\"}"),
        2.0
    );

    // The connections already open keep working, and another address is
    // not affected.
    for _ in 0..3 {
        check(&one).await.unwrap();
        check(&two).await.unwrap();
    }
    let other = s.channel_from(B);
    check(&other).await.unwrap();
    s.until_metric("memgate_connections_open", 3.0).await;

    // A closed connection gives its place back.
    drop(one);
    s.until_metric("memgate_connections_open", 2.0).await;
    check(&s.channel_from(A)).await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_cap_refuses_every_address_over_it() {
    let s = Harness::start(|c| {
        c.server.max_connections = 2;
        c.server.max_connections_per_client = 2;
    })
    .await;
    let (a, b) = (s.channel_from(A), s.channel_from(B));
    check(&a).await.unwrap();
    check(&b).await.unwrap();
    let refused = check(&s.channel_from(C)).await.unwrap_err();
    assert_refused(&refused, "server.max_connections");
    assert!(!refused.message().contains("per_client"), "{refused:?}");
    assert_eq!(
        s.metric("memgate_connections_refused_total{reason=\"max_connections\"}"),
        1.0
    );
    check(&a).await.unwrap();
    check(&b).await.unwrap();
    drop(b);
    s.until_metric("memgate_connections_open", 1.0).await;
    check(&s.channel_from(C)).await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    const IDLE: Duration = Duration::from_secs(1);
    let s = Harness::start(|c| c.server.connection_idle_timeout = IDLE).await;

    // One call, then nothing: the server closes the connection one timeout
    // after the call ended (so, counted from before it started, no sooner).
    let (mut idle, idle_conn) = s.raw_from::<Full<Bytes>>(A).await;
    let last_call = Instant::now();
    assert_eq!(raw_check(&mut idle).await.0, "0");

    // Another connection with a call that stays in flight (a Write that has
    // sent its first chunk) for three timeouts.
    type Streamed = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
    let (mut busy, mut busy_conn) = s.raw_from::<Streamed>(B).await;
    let data = payload(4 << 20, 7);
    let (tx, rx) = mpsc::channel(4);
    let first = WriteRequest {
        resource_name: write_name(&digest(&data)),
        write_offset: 0,
        finish_write: false,
        data: data.slice(..1 << 20),
    };
    tx.send(Ok(Frame::data(grpc_frame(&first)))).await.unwrap();
    let request = http::Request::post("http://memgate/google.bytestream.ByteStream/Write")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    let response = tokio::spawn(busy.send_request(request));

    tokio::time::timeout(BOUND, idle_conn)
        .await
        .expect("the idle connection was not closed")
        .unwrap();
    let idle_for = last_call.elapsed();
    eprintln!("idle connection closed {idle_for:?} after its last call began");
    assert!(
        idle_for >= IDLE && idle_for < IDLE + Duration::from_secs(2),
        "closed after {idle_for:?} without a call"
    );
    // The busy connection outlives three timeouts.
    assert!(
        tokio::time::timeout(3 * IDLE, &mut busy_conn)
            .await
            .is_err(),
        "the connection with a call in flight was closed"
    );
    // Its call ends (the client gives up the upload), and then it is idle too.
    drop(tx);
    let _ = tokio::time::timeout(BOUND, response)
        .await
        .expect("the Write ended");
    tokio::time::timeout(BOUND, busy_conn)
        .await
        .expect("the connection was not closed once idle")
        .unwrap();
    assert_eq!(s.metric("memgate_connections_closed_idle_total"), 2.0);
    s.stop().await;
}

/// `msg` as one gRPC message: uncompressed, length-prefixed.
fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    Bytes::from(framed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_per_client_cap_are_refused_before_they_reserve() {
    let s = Harness::start(|c| c.server.max_calls_per_client = 2).await;
    // What each upload reserves once its first 1 MiB message has arrived.
    let write = match method_table(&s.cfg)
        .classify("/google.bytestream.ByteStream/Write")
        .estimate
    {
        Estimate::Stream {
            window,
            messages,
            overhead,
            ..
        } => window + overhead + messages * (1 << 20),
        other => panic!("{other:?}"),
    };
    // Two uploads from A that have sent their first chunk and wait.
    let data = payload(4 << 20, 9);
    let d = digest(&data);
    let ch = s.channel_from(A);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = mpsc::channel::<WriteRequest>(4);
        tx.send(WriteRequest {
            resource_name: write_name(&d),
            write_offset: 0,
            finish_write: false,
            data: data.slice(..1 << 20),
        })
        .await
        .unwrap();
        let mut client = bytestream(ch.clone());
        let call = tokio::spawn(async move { client.write(ReceiverStream::new(rx)).await });
        held.push((tx, call));
    }
    let start = Instant::now();
    while s.guard.view().reserved < 2 * write {
        assert!(
            start.elapsed() < BOUND,
            "the two uploads were never admitted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reserved = s.guard.view().reserved;

    // A third call of A's, even on another connection, is refused at once,
    // naming the key, and reserves nothing.
    let (mut third, small) = (bytestream(s.channel_from(A)), payload(1024, 1));
    let refused = tokio::time::timeout(BOUND, support::upload(&mut third, &small))
        .await
        .expect("the third call hung")
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("server.max_calls_per_client"),
        "{refused:?}"
    );
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some());
    assert_eq!(s.guard.view().reserved, reserved);
    assert_eq!(
        s.metric(
            "memgate_admission_rejected_total{method=\"/google.bytestream.ByteStream/Write\",reason=\"max_calls_per_client\"}"
        ),
        1.0
    );
    // Health checks are not counted; another client is not affected.
    check(&ch).await.unwrap();
    let other = payload(1024, 2);
    let n = support::upload(&mut bytestream(s.channel_from(B)), &other)
        .await
        .unwrap();
    assert_eq!(n, other.len() as i64);

    // One of A's uploads finishes; its place is free again.
    let (tx, call) = held.pop().unwrap();
    for c in 1..4usize {
        tx.send(WriteRequest {
            resource_name: String::new(),
            write_offset: (c << 20) as i64,
            finish_write: c == 3,
            data: data.slice(c << 20..(c + 1) << 20),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let committed = call.await.unwrap().unwrap().into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
    let again = payload(2048, 3);
    let n = support::upload(&mut bytestream(s.channel_from(A)), &again)
        .await
        .unwrap();
    assert_eq!(n, again.len() as i64);
    drop(held);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_over_the_cap_is_refused_with_the_reason_too() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::Ca::new("transport test CA");
    let server = ca.server();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &server.cert).unwrap();
    std::fs::write(&key, &server.key).unwrap();
    let s = Harness::start(|c| {
        c.tls.cert_file = cert;
        c.tls.key_file = key;
        c.server.max_connections_per_client = 1;
    })
    .await;
    let channel = || {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem))
            .domain_name("localhost");
        Endpoint::from_shared(format!("https://localhost:{}", s.addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(BOUND)
            .connect_lazy()
    };
    let first = channel();
    check(&first).await.unwrap();
    // The refusal comes after the TLS handshake, so the client reads it.
    let refused = check(&channel()).await.unwrap_err();
    assert_refused(&refused, "server.max_connections_per_client");
    check(&first).await.unwrap();
    s.stop().await;
}
